//! What a vCPU counts of its exits and leaves behind when its thread ends.

use kvm_ioctls::VcpuExit;
use serde::Serialize;
use vpmu::VpmuSnapshot;

use super::hooks::ObserverLog;
use crate::pmu::PmiDelivery;

/// Userspace exits of one vCPU (`KVM_RUN` returning), by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExitCounts {
    pub msr_read: u64,
    pub msr_write: u64,
    pub io: u64,
    pub mmio: u64,
    /// `KVM_RUN` interrupted by a signal: kicks and host overflow signals.
    pub signal: u64,
    pub other: u64,
}

/// Whether `KVM_RUN` failed because a signal interrupted it (a kick or a
/// host overflow signal): EINTR, or EAGAIN.
pub fn interrupted(error: &kvm_ioctls::Error) -> bool {
    error.errno() == libc::EINTR || error.errno() == libc::EAGAIN
}

impl ExitCounts {
    /// Counts one return of `KVM_RUN`.
    pub fn count(&mut self, result: &Result<VcpuExit<'_>, kvm_ioctls::Error>) {
        let slot = match result {
            Ok(VcpuExit::X86Rdmsr(_)) => &mut self.msr_read,
            Ok(VcpuExit::X86Wrmsr(_)) => &mut self.msr_write,
            Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => &mut self.io,
            Ok(VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)) => &mut self.mmio,
            Ok(VcpuExit::Intr) => &mut self.signal,
            Err(e) if interrupted(e) => &mut self.signal,
            _ => &mut self.other,
        };
        *slot += 1;
    }

    pub fn total(&self) -> u64 {
        self.msr_read + self.msr_write + self.io + self.mmio + self.signal + self.other
    }
}

/// What a vCPU leaves behind when its thread ends.
#[derive(Clone, Debug)]
pub struct VcpuReport {
    pub index: u8,
    pub vpmu: Option<(VpmuSnapshot, PmiDelivery)>,
    /// Userspace exits by reason.
    pub exits: ExitCounts,
    /// What its [`ExitObserver`](super::ExitObserver) left, if it had one.
    pub observer_log: Option<ObserverLog>,
    /// Where the guest was when the thread ended (None: never started, or
    /// KVM would not say): for guests stopped by a timeout or a signal.
    pub rip: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::{MsrExitReason, ReadMsrExit, WriteMsrExit};

    #[test]
    fn exits_are_counted_by_reason() {
        let mut counts = ExitCounts::default();
        let (mut data, mut error, mut io) = (0u64, 0u8, [0u8; 1]);
        counts.count(&Ok(VcpuExit::X86Rdmsr(ReadMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index: 0xc001_0000,
            data: &mut data,
        })));
        for _ in 0..2 {
            counts.count(&Ok(VcpuExit::X86Wrmsr(WriteMsrExit {
                error: &mut error,
                reason: MsrExitReason::Filter,
                index: 0xc001_0000,
                data: 1,
            })));
        }
        counts.count(&Ok(VcpuExit::IoIn(0x3f8, &mut io)));
        counts.count(&Ok(VcpuExit::IoOut(0x3f8, &[0])));
        counts.count(&Ok(VcpuExit::MmioRead(0xfee0_0000, &mut io)));
        counts.count(&Ok(VcpuExit::MmioWrite(0xfee0_0000, &[0])));
        counts.count(&Ok(VcpuExit::Intr));
        counts.count(&Err(kvm_ioctls::Error::new(libc::EINTR)));
        counts.count(&Err(kvm_ioctls::Error::new(libc::EAGAIN)));
        counts.count(&Ok(VcpuExit::Shutdown));
        counts.count(&Ok(VcpuExit::Hlt));
        counts.count(&Err(kvm_ioctls::Error::new(libc::EFAULT)));
        assert_eq!(
            counts,
            ExitCounts {
                msr_read: 1,
                msr_write: 2,
                io: 2,
                mmio: 2,
                signal: 3,
                other: 3,
            }
        );
        assert_eq!(counts.total(), 13);
    }

    #[test]
    fn only_eintr_and_eagain_mean_a_signal() {
        assert!(interrupted(&kvm_ioctls::Error::new(libc::EINTR)));
        assert!(interrupted(&kvm_ioctls::Error::new(libc::EAGAIN)));
        assert!(!interrupted(&kvm_ioctls::Error::new(libc::EFAULT)));
        assert!(!interrupted(&kvm_ioctls::Error::new(libc::ENXIO)));
    }
}
