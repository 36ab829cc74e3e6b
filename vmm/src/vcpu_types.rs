//! What a vCPU thread shares with the rest of the VMM, kept in a leaf
//! module so that the run loop (`vcpu`), its vPMU glue (`pmu::vcpu`), the
//! export, the API and the benchmark trace can all depend on it without
//! depending on each other.

use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::Serialize;
use vpmu::VpmuSnapshot;

/// The host's TSC.
pub fn host_tsc() -> u64 {
    // SAFETY: RDTSC has no preconditions and touches no memory.
    unsafe { core::arch::x86_64::_rdtsc() }
}

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

/// One PMI the VMM delivered, as the run loop learns of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeliveredPmi {
    /// Host TSC right after the injection (0 unless PMIs are traced).
    pub injected_tsc: u64,
    /// Events the sampling counter counted past its overflow before the
    /// VMM noticed (0 unless PMIs are traced).
    pub overshoot: u64,
}

/// An observer of one vCPU's exits: the vCPU's single optional hook for
/// instrumentation (the benchmark trace of the `bench` module, built with
/// the `bench` feature). Every method runs on the vCPU thread; without an
/// observer each call site costs one branch.
pub trait ExitObserver: Send {
    /// Before the first entry.
    fn start(&mut self, fd: &VcpuFd);
    /// Right before `KVM_RUN`.
    fn entering(&mut self, fd: &VcpuFd);
    /// Right after `KVM_RUN` returned; `signal`: it returned because of a
    /// signal.
    fn exited(&mut self, signal: bool);
    /// Whether MSR `index` is the observer's own (not the vPMU's): it reads
    /// as 0 and its writes go to [`ExitObserver::msr_written`].
    fn owns_msr(&self, index: u32) -> bool;
    /// The guest wrote `value` to the observer's MSR. `exits` and `pmis`:
    /// the vCPU's counts so far. (The vCPU's fd is busy with the exit: work
    /// that needs it waits for [`ExitObserver::entering`].)
    fn msr_written(&mut self, value: u64, exits: ExitCounts, pmis: u64);
    /// A vPMU MSR exit reached the VMM.
    fn pmu_msr(&mut self);
    /// Whether PMIs should carry their times ([`DeliveredPmi`]).
    fn traces_pmis(&self) -> bool;
    /// The VMM delivered a PMI.
    fn pmi_delivered(&mut self, pmi: DeliveredPmi);
    /// The vCPU thread ends: what the observer leaves in the vCPU's report.
    fn finish(self: Box<Self>, fd: &VcpuFd) -> Option<ObserverLog>;
}

/// A sampler of the guest's state: the vCPU's hook for the host-side
/// profiler (`profile`), present in every build. Both methods run on the
/// vCPU thread, between an exit and the next entry.
pub trait GuestSampler: Send {
    /// Before an entry. `kicked`: a signal brought the vCPU out since the
    /// last entry (a sampling event's overflow, among others).
    fn before_entry(&mut self, kicked: bool, fd: &VcpuFd);
    /// The vCPU thread ends: hand in whatever is in progress.
    fn finish(&mut self, fd: &VcpuFd);
}

/// What an observer leaves behind, for whoever created it to downcast.
pub type ObserverLog = std::sync::Arc<dyn std::any::Any + Send + Sync>;

/// How PMIs reached the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PmiDelivery {
    pub nmi: u64,
    pub fixed: u64,
    /// Dropped: LVTPC was masked (hardware loses them too; the status bit
    /// stays set).
    pub masked: u64,
    /// LVTPC in a mode a PMI cannot use (SMI, INIT, ExtINT...).
    pub unsupported_mode: u64,
    pub failed: u64,
    /// Intel model, xAPIC mode: LVTPC was left unmasked after a PMI (see
    /// `mask_lvtpc`).
    pub mask_skipped: u64,
}

/// What a vCPU leaves behind when its thread ends.
#[derive(Clone, Debug)]
pub struct VcpuReport {
    pub index: u8,
    pub vpmu: Option<(VpmuSnapshot, PmiDelivery)>,
    /// Userspace exits by reason.
    pub exits: ExitCounts,
    /// What its [`ExitObserver`] left, if it had one.
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
