//! A vCPU thread and its run loop: enter the guest, handle the exit, repeat,
//! until the guest stops or the VMM asks the vCPU to.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use devices::PioBus;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;
use vpmu::VpmuSnapshot;

use crate::error::Outcome;
use crate::kick;
use crate::pmu::vcpu::{PmiDelivery, VcpuPmu};
use crate::pmu::PmuPlan;

/// KVM_SYSTEM_EVENT types (uapi/linux/kvm.h).
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// What a vCPU leaves behind when its thread ends.
#[derive(Clone, Debug)]
pub struct VcpuReport {
    pub index: u8,
    pub vpmu: Option<(VpmuSnapshot, PmiDelivery)>,
}

/// What the vCPU threads and the VMM's main loop share: whether to stop or
/// pause, and the first reason anything stopped.
pub struct VmControl {
    stop: AtomicBool,
    outcome: Mutex<Option<Outcome>>,
    paused: Mutex<bool>,
    resumed: Condvar,
    /// Written when an outcome is recorded, to wake the main loop.
    pub wake: EventFd,
    reports: Mutex<Vec<VcpuReport>>,
}

impl VmControl {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            paused: Mutex::new(false),
            resumed: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            reports: Mutex::new(Vec::new()),
        })
    }

    /// Asks the vCPUs to leave the CPU and wait; the caller kicks them.
    pub fn pause(&self) {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    pub fn resume(&self) {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.resumed.notify_all();
    }

    pub fn pause_requested(&self) -> bool {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks the calling vCPU thread while the VM is paused and not
    /// stopping.
    fn wait_while_paused(&self) {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        while *paused && !self.stopping() {
            paused = self.resumed.wait(paused).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The reports of every vCPU thread that has ended, by vCPU index.
    pub fn reports(&self) -> Vec<VcpuReport> {
        let mut reports = self
            .reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        reports.sort_by_key(|r| r.index);
        reports
    }

    /// Records why the VM stops (the first reason wins) and asks every vCPU
    /// to stop.
    pub fn finish(&self, outcome: Outcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(outcome);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.resumed.notify_all();
        // The eventfd cannot overflow in practice; a failed wake only delays
        // the main loop to its next timeout.
        let _ = self.wake.write(1);
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// What a vCPU needs of its vPMU to build it on its own thread.
pub struct PmuSetup {
    pub plan: Arc<PmuPlan>,
    pub tsc_khz: u32,
}

/// One vCPU, ready to run on its own thread.
pub struct Vcpu {
    pub index: u8,
    fd: VcpuFd,
    vm: Arc<VmFd>,
    bus: Arc<PioBus>,
    control: Arc<VmControl>,
    pmu_setup: Option<PmuSetup>,
    pmu: Option<VcpuPmu>,
    /// The last exit was a PMU MSR access.
    msr_exit: bool,
}

/// What an exit asks of the loop, decided while `kvm_run` is borrowed.
enum Step {
    Continue,
    Stop(Outcome),
    Shutdown,
    InternalError,
    FailEntry(u64),
}

impl Vcpu {
    pub fn new(
        index: u8,
        fd: VcpuFd,
        vm: Arc<VmFd>,
        bus: Arc<PioBus>,
        control: Arc<VmControl>,
        pmu_setup: Option<PmuSetup>,
    ) -> Self {
        Self {
            index,
            fd,
            vm,
            bus,
            control,
            pmu_setup,
            pmu: None,
            msr_exit: false,
        }
    }

    /// Starts the vCPU's thread.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || self.run())
    }

    fn run(mut self) {
        kick::arm(self.fd.get_kvm_run());
        let outcome = self.start_pmu().err().or_else(|| self.run_loop());
        kick::disarm();
        let report = VcpuReport {
            index: self.index,
            vpmu: self.pmu.as_mut().map(|p| (p.snapshot(), p.delivery)),
        };
        self.control
            .reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(report);
        if let Some(outcome) = outcome {
            self.control.finish(outcome);
        }
    }

    /// Builds the vPMU here, on the thread its host events belong to.
    fn start_pmu(&mut self) -> Result<(), Outcome> {
        let Some(setup) = self.pmu_setup.take() else {
            return Ok(());
        };
        let pmu = VcpuPmu::new(&setup.plan, self.index, setup.tsc_khz).map_err(|message| {
            Outcome::VcpuError {
                vcpu: self.index,
                message: format!("cannot build its vPMU: {message}"),
            }
        })?;
        self.pmu = Some(pmu);
        Ok(())
    }

    fn run_loop(&mut self) -> Option<Outcome> {
        loop {
            if self.control.stopping() {
                return None;
            }
            if self.control.pause_requested() {
                self.park();
                continue;
            }
            let kicked = kick::take_kicked();
            if let Some(pmu) = &mut self.pmu {
                pmu.before_entry(kicked, &self.fd, &self.vm, self.msr_exit);
            }
            if let Some(outcome) = self.run_once() {
                return Some(outcome);
            }
        }
    }

    /// Holds the vCPU off the CPU while the VM is paused, its vPMU context
    /// switched out so that paused time is never counted.
    fn park(&mut self) {
        if let Some(pmu) = &mut self.pmu {
            pmu.switch_out();
        }
        self.control.wait_while_paused();
        if let Some(pmu) = &mut self.pmu {
            pmu.switch_in();
        }
    }

    /// Enters the guest once and handles the exit.
    fn run_once(&mut self) -> Option<Outcome> {
        let vcpu = self.index;
        let result = self.fd.run();
        if let Some(pmu) = &mut self.pmu {
            pmu.after_exit();
        }
        self.msr_exit = false;
        let step = match result {
            Ok(VcpuExit::X86Rdmsr(exit)) => {
                self.msr_exit = true;
                match self.pmu.as_mut().map(|p| p.rdmsr(exit.index)) {
                    Some(Ok(value)) => *exit.data = value,
                    _ => *exit.error = 1,
                }
                Step::Continue
            }
            Ok(VcpuExit::X86Wrmsr(exit)) => {
                self.msr_exit = true;
                match self.pmu.as_mut().map(|p| p.wrmsr(exit.index, exit.data)) {
                    Some(Ok(())) => {}
                    _ => *exit.error = 1,
                }
                Step::Continue
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.bus.read(port, data);
                Step::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                self.bus.write(port, data);
                Step::Continue
            }
            // Nothing is mapped for MMIO: reads float high, writes vanish.
            Ok(VcpuExit::MmioRead(_, data)) => {
                data.fill(0xff);
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(..)) => Step::Continue,
            Ok(VcpuExit::Intr) => Step::Continue,
            Ok(VcpuExit::Shutdown) => Step::Shutdown,
            Ok(VcpuExit::InternalError) => Step::InternalError,
            Ok(VcpuExit::FailEntry(reason, _)) => Step::FailEntry(reason),
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => Step::Stop(Outcome::Reset),
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => Step::Shutdown,
            Ok(exit) => Step::Stop(Outcome::VcpuError {
                vcpu,
                message: format!("unhandled KVM exit {exit:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // The kick flag stays set for the next entry to act on.
                self.fd.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => Step::Stop(Outcome::VcpuError {
                vcpu,
                message: format!("KVM_RUN failed: {e}"),
            }),
        };
        match step {
            Step::Continue => None,
            Step::Stop(outcome) => Some(outcome),
            Step::Shutdown => Some(Outcome::Shutdown {
                vcpu,
                rip: self.rip(),
            }),
            Step::InternalError => {
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member
                // of the exit union is the valid one.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Some(Outcome::InternalError {
                    vcpu,
                    suberror,
                    rip: self.rip(),
                })
            }
            Step::FailEntry(reason) => Some(Outcome::FailEntry {
                vcpu,
                reason,
                rip: self.rip(),
            }),
        }
    }

    fn rip(&self) -> Option<u64> {
        self.fd.get_regs().ok().map(|r| r.rip)
    }
}
