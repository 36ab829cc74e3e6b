//! One KVM exit in, one typed [`Step`] out.
//!
//! [`handle_exit`] is a free function over what `KVM_RUN` returned and the
//! parts an exit may reach ([`ExitParts`]): the port and MMIO buses, the
//! vCPU's MSR handler (its vPMU) and its observer. It never touches KVM, so
//! unit tests feed it made-up exits. The run loop ([`super::Vcpu`]) turns a
//! [`Step::Stop`] into an [`Outcome`], reading what it needs (RIP, the
//! internal error's suberror) once the exit no longer borrows `kvm_run`.

use devices::{MmioBus, PioBus};
use kvm_ioctls::{ReadMsrExit, VcpuExit, WriteMsrExit};

use super::{interrupted, ExitCounts, ExitObserver, Outcome};

/// KVM_SYSTEM_EVENT types (uapi/linux/kvm.h).
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// What one exit asks of the run loop.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Enter the guest again.
    Enter,
    /// A signal interrupted `KVM_RUN` (a kick or a host overflow): clear
    /// `immediate_exit` and enter again; the kick flag stays set for the
    /// next entry to act on.
    Interrupted,
    Stop(Stop),
}

/// Why the guest stops. The last three report the guest's RIP, read once
/// `kvm_run` is no longer borrowed by the exit.
#[derive(Debug, PartialEq)]
pub enum Stop {
    Outcome(Outcome),
    Shutdown,
    InternalError,
    FailEntry(u64),
}

/// Guest MSR accesses the MSR filter sends to userspace (the vPMU's).
pub trait MsrHandler {
    /// The value of MSR `index`, or `None` for a #GP.
    fn rdmsr(&mut self, index: u32) -> Option<u64>;
    /// Writes MSR `index`; `false` for a #GP.
    fn wrmsr(&mut self, index: u32, value: u64) -> bool;
    /// PMIs delivered so far (for the observer's marks).
    fn pmis_delivered(&self) -> u64;
}

/// What an exit may reach.
pub struct ExitParts<'a> {
    pub vcpu: u8,
    pub pio: &'a PioBus,
    pub mmio: &'a MmioBus,
    /// None: the guest has no vPMU, and every trapped MSR is a #GP.
    pub msrs: Option<&'a mut dyn MsrHandler>,
    pub observer: Option<&'a mut dyn ExitObserver>,
    /// The vCPU's exits so far, this one included.
    pub exits: ExitCounts,
}

/// Handles one return of `KVM_RUN`.
pub fn handle_exit(result: Result<VcpuExit<'_>, kvm_ioctls::Error>, parts: &mut ExitParts) -> Step {
    match result {
        Ok(VcpuExit::X86Rdmsr(exit)) => rdmsr(exit, parts),
        Ok(VcpuExit::X86Wrmsr(exit)) => wrmsr(exit, parts),
        Ok(VcpuExit::IoIn(port, data)) => {
            parts.pio.read(port, data);
            Step::Enter
        }
        Ok(VcpuExit::IoOut(port, data)) => {
            parts.pio.write(port, data);
            Step::Enter
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            parts.mmio.read(addr, data);
            Step::Enter
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            parts.mmio.write(addr, data);
            Step::Enter
        }
        Ok(VcpuExit::Intr) => Step::Enter,
        Ok(VcpuExit::Shutdown) => Step::Stop(Stop::Shutdown),
        Ok(VcpuExit::InternalError) => Step::Stop(Stop::InternalError),
        Ok(VcpuExit::FailEntry(reason, _)) => Step::Stop(Stop::FailEntry(reason)),
        Ok(VcpuExit::SystemEvent(kind, data)) => system_event(kind).unwrap_or_else(|| {
            let exit = VcpuExit::SystemEvent(kind, data);
            vcpu_error(parts.vcpu, format!("unhandled KVM exit {exit:?}"))
        }),
        Ok(exit) => vcpu_error(parts.vcpu, format!("unhandled KVM exit {exit:?}")),
        Err(e) if interrupted(&e) => Step::Interrupted,
        Err(e) => vcpu_error(parts.vcpu, format!("KVM_RUN failed: {e}")),
    }
}

/// A guest RDMSR the MSR filter sent here: the observer's own MSR reads as
/// 0; any other goes to the vPMU, and a fault (or no vPMU) is a #GP.
fn rdmsr(exit: ReadMsrExit<'_>, parts: &mut ExitParts) -> Step {
    if parts
        .observer
        .as_ref()
        .is_some_and(|o| o.owns_msr(exit.index))
    {
        *exit.data = 0;
        return Step::Enter;
    }
    match parts.msrs.as_mut().and_then(|m| m.rdmsr(exit.index)) {
        Some(value) => *exit.data = value,
        None => *exit.error = 1,
    }
    pmu_msr_done(parts)
}

/// A guest WRMSR the MSR filter sent here: the observer's own MSR goes to
/// the observer, any other to the vPMU, and a fault (or no vPMU) is a #GP.
fn wrmsr(exit: WriteMsrExit<'_>, parts: &mut ExitParts) -> Step {
    if let Some(observer) = parts.observer.as_mut().filter(|o| o.owns_msr(exit.index)) {
        let pmis = parts.msrs.as_ref().map_or(0, |m| m.pmis_delivered());
        observer.msr_written(exit.data, parts.exits, pmis);
        return Step::Enter;
    }
    if !parts
        .msrs
        .as_mut()
        .is_some_and(|m| m.wrmsr(exit.index, exit.data))
    {
        *exit.error = 1;
    }
    pmu_msr_done(parts)
}

/// After a vPMU MSR exit was handled.
fn pmu_msr_done(parts: &mut ExitParts) -> Step {
    if let Some(observer) = parts.observer.as_mut() {
        observer.pmu_msr();
    }
    Step::Enter
}

/// `KVM_EXIT_SYSTEM_EVENT`: the guest reset or powered off (None: another
/// event, which the VMM does not handle).
fn system_event(kind: u32) -> Option<Step> {
    match kind {
        KVM_SYSTEM_EVENT_RESET => Some(Step::Stop(Stop::Outcome(Outcome::Reset))),
        KVM_SYSTEM_EVENT_SHUTDOWN => Some(Step::Stop(Stop::Shutdown)),
        _ => None,
    }
}

fn vcpu_error(vcpu: u8, message: String) -> Step {
    Step::Stop(Stop::Outcome(Outcome::VcpuError { vcpu, message }))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use devices::bus::BusDevice;
    use kvm_ioctls::{MsrExitReason, VcpuFd};

    use super::*;
    use crate::pmu::DeliveredPmi;
    use crate::vcpu::ObserverLog;

    /// A device that remembers what was written and reads back `0x5a`.
    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);

    impl BusDevice<u16> for Recorder {
        fn read(&mut self, _offset: u16, data: &mut [u8]) {
            data.fill(0x5a);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.push((u64::from(offset), data.to_vec()));
        }
    }

    impl BusDevice<u64> for Recorder {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x5a);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    /// A vPMU stand-in: MSR 0xc001_0004 holds a value, every other MSR
    /// faults.
    #[derive(Default)]
    struct Msrs {
        counter: u64,
        accesses: usize,
    }

    const COUNTER: u32 = 0xc001_0004;

    impl MsrHandler for Msrs {
        fn rdmsr(&mut self, index: u32) -> Option<u64> {
            self.accesses += 1;
            (index == COUNTER).then_some(self.counter)
        }
        fn wrmsr(&mut self, index: u32, value: u64) -> bool {
            self.accesses += 1;
            if index == COUNTER {
                self.counter = value;
            }
            index == COUNTER
        }
        fn pmis_delivered(&self) -> u64 {
            7
        }
    }

    /// An observer that owns MSR 0x4000_1000 and logs what it is told.
    #[derive(Default)]
    struct Log(Vec<String>);

    const OBSERVER_MSR: u32 = 0x4000_1000;

    impl ExitObserver for Log {
        fn start(&mut self, _fd: &VcpuFd) {}
        fn entering(&mut self, _fd: &VcpuFd) {}
        fn exited(&mut self, _signal: bool) {}
        fn owns_msr(&self, index: u32) -> bool {
            index == OBSERVER_MSR
        }
        fn msr_written(&mut self, value: u64, exits: ExitCounts, pmis: u64) {
            self.0.push(format!(
                "mark {value} after {} exits, {pmis} PMIs",
                exits.total()
            ));
        }
        fn pmu_msr(&mut self) {
            self.0.push("pmu msr".into());
        }
        fn traces_pmis(&self) -> bool {
            false
        }
        fn pmi_delivered(&mut self, _pmi: DeliveredPmi) {}
        fn finish(self: Box<Self>, _fd: &VcpuFd) -> Option<ObserverLog> {
            None
        }
    }

    struct Rig {
        pio: PioBus,
        mmio: MmioBus,
        port: Arc<Mutex<Recorder>>,
        page: Arc<Mutex<Recorder>>,
        msrs: Msrs,
        log: Log,
    }

    impl Rig {
        fn new() -> Self {
            let port = Arc::new(Mutex::new(Recorder::default()));
            let page = Arc::new(Mutex::new(Recorder::default()));
            let mut pio = PioBus::new();
            pio.insert(port.clone(), 0x3f8, 8).unwrap();
            let mut mmio = MmioBus::new();
            mmio.insert(page.clone(), 0xfed0_0000, 0x1000).unwrap();
            Rig {
                pio,
                mmio,
                port,
                page,
                msrs: Msrs::default(),
                log: Log::default(),
            }
        }

        /// Handles `exit` with the vPMU stand-in and, if `observed`, the
        /// observer.
        fn handle(
            &mut self,
            exit: Result<VcpuExit<'_>, kvm_ioctls::Error>,
            observed: bool,
        ) -> Step {
            let mut parts = ExitParts {
                vcpu: 3,
                pio: &self.pio,
                mmio: &self.mmio,
                msrs: Some(&mut self.msrs),
                observer: observed.then_some(&mut self.log as &mut dyn ExitObserver),
                exits: ExitCounts {
                    io: 4,
                    ..Default::default()
                },
            };
            handle_exit(exit, &mut parts)
        }
    }

    fn read_msr(rig: &mut Rig, index: u32, observed: bool) -> (Step, u64, u8) {
        let (mut data, mut error) = (0xdead, 0u8);
        let exit = VcpuExit::X86Rdmsr(ReadMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index,
            data: &mut data,
        });
        let step = rig.handle(Ok(exit), observed);
        (step, data, error)
    }

    fn write_msr(rig: &mut Rig, index: u32, data: u64, observed: bool) -> (Step, u8) {
        let mut error = 0u8;
        let exit = VcpuExit::X86Wrmsr(WriteMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index,
            data,
        });
        let step = rig.handle(Ok(exit), observed);
        (step, error)
    }

    #[test]
    fn port_and_mmio_exits_reach_the_device_at_its_offset() {
        let mut rig = Rig::new();
        let mut byte = [0u8; 1];
        assert_eq!(
            rig.handle(Ok(VcpuExit::IoIn(0x3fd, &mut byte)), false),
            Step::Enter
        );
        assert_eq!(byte, [0x5a]);
        assert_eq!(
            rig.handle(Ok(VcpuExit::IoOut(0x3f9, &[7])), false),
            Step::Enter
        );
        let mut word = [0u8; 4];
        let read = VcpuExit::MmioRead(0xfed0_0010, &mut word);
        assert_eq!(rig.handle(Ok(read), false), Step::Enter);
        assert_eq!(word, [0x5a; 4]);
        let write = VcpuExit::MmioWrite(0xfed0_0020, &[1, 2]);
        assert_eq!(rig.handle(Ok(write), false), Step::Enter);
        assert_eq!(rig.port.lock().unwrap().0, vec![(1, vec![7])]);
        assert_eq!(rig.page.lock().unwrap().0, vec![(0x20, vec![1, 2])]);
    }

    #[test]
    fn trapped_msrs_go_to_the_vpmu_and_its_faults_are_a_gp() {
        let mut rig = Rig::new();
        assert_eq!(write_msr(&mut rig, COUNTER, 42, true), (Step::Enter, 0));
        assert_eq!(read_msr(&mut rig, COUNTER, true), (Step::Enter, 42, 0));
        // Outside the model: #GP, and the data is left alone.
        assert_eq!(
            read_msr(&mut rig, 0xc001_0100, true),
            (Step::Enter, 0xdead, 1)
        );
        assert_eq!(write_msr(&mut rig, 0xc001_0100, 1, true), (Step::Enter, 1));
        assert_eq!(rig.msrs.accesses, 4);
        assert_eq!(rig.log.0, vec!["pmu msr"; 4]);
    }

    #[test]
    fn without_a_vpmu_every_trapped_msr_is_a_gp() {
        let rig = Rig::new();
        let (mut data, mut error) = (0u64, 0u8);
        let mut parts = ExitParts {
            vcpu: 0,
            pio: &rig.pio,
            mmio: &rig.mmio,
            msrs: None,
            observer: None,
            exits: ExitCounts::default(),
        };
        let exit = VcpuExit::X86Rdmsr(ReadMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index: COUNTER,
            data: &mut data,
        });
        assert_eq!(handle_exit(Ok(exit), &mut parts), Step::Enter);
        assert_eq!(error, 1);
    }

    #[test]
    fn the_observers_msr_never_reaches_the_vpmu() {
        let mut rig = Rig::new();
        assert_eq!(read_msr(&mut rig, OBSERVER_MSR, true), (Step::Enter, 0, 0));
        assert_eq!(write_msr(&mut rig, OBSERVER_MSR, 9, true), (Step::Enter, 0));
        assert_eq!(rig.msrs.accesses, 0);
        assert_eq!(rig.log.0, vec!["mark 9 after 4 exits, 7 PMIs"]);
        // Without the observer the same MSR is the vPMU's (a #GP here).
        assert_eq!(
            write_msr(&mut rig, OBSERVER_MSR, 9, false),
            (Step::Enter, 1)
        );
        assert_eq!(rig.msrs.accesses, 1);
    }

    #[test]
    fn signals_resume_and_other_kvm_errors_stop_the_vcpu() {
        let mut rig = Rig::new();
        for errno in [libc::EINTR, libc::EAGAIN] {
            let step = rig.handle(Err(kvm_ioctls::Error::new(errno)), false);
            assert_eq!(step, Step::Interrupted);
        }
        assert_eq!(rig.handle(Ok(VcpuExit::Intr), false), Step::Enter);
        let Step::Stop(Stop::Outcome(Outcome::VcpuError { vcpu, message })) =
            rig.handle(Err(kvm_ioctls::Error::new(libc::EFAULT)), false)
        else {
            panic!("EFAULT must stop the vCPU");
        };
        assert_eq!(vcpu, 3);
        assert!(message.starts_with("KVM_RUN failed: "), "{message}");
    }

    #[test]
    fn resets_shutdowns_and_failed_entries_stop_the_guest() {
        let mut rig = Rig::new();
        let reset = VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]);
        assert_eq!(
            rig.handle(Ok(reset), false),
            Step::Stop(Stop::Outcome(Outcome::Reset))
        );
        let off = VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[]);
        assert_eq!(rig.handle(Ok(off), false), Step::Stop(Stop::Shutdown));
        assert_eq!(
            rig.handle(Ok(VcpuExit::Shutdown), false),
            Step::Stop(Stop::Shutdown)
        );
        assert_eq!(
            rig.handle(Ok(VcpuExit::InternalError), false),
            Step::Stop(Stop::InternalError)
        );
        assert_eq!(
            rig.handle(Ok(VcpuExit::FailEntry(0x80000021, 1)), false),
            Step::Stop(Stop::FailEntry(0x80000021))
        );
    }

    #[test]
    fn exits_the_vmm_does_not_handle_name_themselves() {
        let mut rig = Rig::new();
        for exit in [VcpuExit::Hlt, VcpuExit::SystemEvent(5, &[])] {
            let Step::Stop(Stop::Outcome(Outcome::VcpuError { message, .. })) =
                rig.handle(Ok(exit), false)
            else {
                panic!("an unhandled exit must stop the vCPU");
            };
            assert!(message.starts_with("unhandled KVM exit "), "{message}");
        }
    }
}
