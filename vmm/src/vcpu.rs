//! A vCPU thread and its run loop: enter the guest, handle the exit, repeat,
//! until the guest stops or the VMM asks the vCPU to.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use devices::PioBus;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::error::Outcome;
use crate::export::{Export, PUBLISH_INTERVAL};
use crate::kick;
use crate::pmu::vcpu::VcpuPmu;
use crate::pmu::PmuPlan;
pub use crate::vcpu_types::VcpuReport;
use crate::vcpu_types::{interrupted, DeliveredPmi, ExitCounts, ExitObserver};

/// KVM_SYSTEM_EVENT types (uapi/linux/kvm.h).
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// What the vCPU threads and the VMM's main loop share: whether to stop or
/// pause, and the first reason anything stopped.
pub struct VmControl {
    stop: AtomicBool,
    /// vCPU threads, by index, while they run: where kicks go.
    threads: Mutex<Vec<Option<libc::pthread_t>>>,
    /// vCPUs parked by a pause.
    parked: Mutex<usize>,
    parked_changed: Condvar,
    outcome: Mutex<Option<Outcome>>,
    paused: Mutex<bool>,
    /// `paused`, readable without the lock on every exit.
    pause_flag: AtomicBool,
    resumed: Condvar,
    /// Written when an outcome is recorded, to wake the main loop.
    pub wake: EventFd,
    reports: Mutex<Vec<VcpuReport>>,
}

impl VmControl {
    pub fn new(vcpus: usize) -> std::io::Result<Self> {
        Ok(Self {
            stop: AtomicBool::new(false),
            threads: Mutex::new(vec![None; vcpus]),
            parked: Mutex::new(0),
            parked_changed: Condvar::new(),
            outcome: Mutex::new(None),
            paused: Mutex::new(false),
            pause_flag: AtomicBool::new(false),
            resumed: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            reports: Mutex::new(Vec::new()),
        })
    }

    /// Pauses the VM: every running vCPU leaves the CPU and parks. Returns
    /// once they all have (or after `timeout`), with whether they did.
    pub fn pause(&self, timeout: std::time::Duration) -> bool {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.pause_flag.store(true, Ordering::SeqCst);
        self.kick_all();
        let running = self.running_vcpus();
        let parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        let (parked, _) = self
            .parked_changed
            .wait_timeout_while(parked, timeout, |p| *p < running && !self.stopping())
            .unwrap_or_else(|e| e.into_inner());
        *parked >= running
    }

    fn running_vcpus(&self) -> usize {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.iter().flatten().count()
    }

    /// Gets vCPU `index` out of `KVM_RUN` (it will look at its flags).
    pub fn kick(&self, index: usize) {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Some(thread)) = threads.get(index) {
            // SAFETY: the pthread_t is registered only while its thread runs
            // (under this lock), so it names a live thread.
            unsafe { libc::pthread_kill(*thread, kick::kick_signal()) };
        }
    }

    pub fn kick_all(&self) {
        let count = self.threads.lock().unwrap_or_else(|e| e.into_inner()).len();
        for index in 0..count {
            self.kick(index);
        }
    }

    fn register_thread(&self, index: usize, running: bool) {
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = threads.get_mut(index) {
            // SAFETY: pthread_self has no preconditions.
            *slot = running.then(|| unsafe { libc::pthread_self() });
        }
    }

    pub fn resume(&self) {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.pause_flag.store(false, Ordering::SeqCst);
        self.resumed.notify_all();
    }

    /// Checked on every exit: one atomic load, no lock.
    pub fn pause_requested(&self) -> bool {
        self.pause_flag.load(Ordering::SeqCst)
    }

    /// Blocks the calling vCPU thread while the VM is paused and not
    /// stopping.
    fn wait_while_paused(&self) {
        self.count_parked(1);
        self.wait_for_resume();
        self.count_parked(-1);
    }

    fn count_parked(&self, delta: isize) {
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        *parked = parked.saturating_add_signed(delta);
        self.parked_changed.notify_all();
    }

    fn wait_for_resume(&self) {
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

    /// Readies the control for the next boot after a guest reboot: no stop,
    /// no outcome, no vCPU reports. A pause stays in force.
    pub fn rearm(&self) {
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.stop.store(false, Ordering::SeqCst);
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
    pub export: Arc<Export>,
    /// The vCPU's counts from previous boots, merged into its totals.
    pub carried: Option<vpmu::EventTotals>,
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
    export: Option<Arc<Export>>,
    last_publish: Instant,
    /// The last exit was a PMU MSR access.
    msr_exit: bool,
    exits: ExitCounts,
    /// Instrumentation (the benchmark trace): normally none.
    observer: Option<Box<dyn ExitObserver>>,
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
            export: None,
            last_publish: Instant::now(),
            msr_exit: false,
            exits: ExitCounts::default(),
            observer: None,
        }
    }

    /// Instruments the vCPU (see [`ExitObserver`]).
    pub fn with_observer(mut self, observer: Option<Box<dyn ExitObserver>>) -> Self {
        self.observer = observer;
        self
    }

    /// Starts the vCPU's thread.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || self.run())
    }

    fn run(mut self) {
        let index = usize::from(self.index);
        kick::arm(self.fd.get_kvm_run());
        self.control.register_thread(index, true);
        if let Some(observer) = &mut self.observer {
            observer.start(&self.fd);
        }
        let outcome = self.start_pmu().err().or_else(|| self.run_loop());
        self.control.register_thread(index, false);
        kick::disarm();
        self.publish(false);
        let report = VcpuReport {
            index: self.index,
            vpmu: self.pmu.as_mut().map(|p| (p.snapshot(), p.delivery)),
            exits: self.exits,
            observer_log: self.observer.take().and_then(|o| o.finish(&self.fd)),
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
        let mut pmu = VcpuPmu::new(&setup.plan, self.index, setup.tsc_khz, setup.carried).map_err(
            |message| Outcome::VcpuError {
                vcpu: self.index,
                message: format!("cannot build its vPMU: {message}"),
            },
        )?;
        pmu.trace_pmis = self.observer.as_ref().is_some_and(|o| o.traces_pmis());
        self.pmu = Some(pmu);
        self.export = Some(setup.export);
        self.publish(false);
        Ok(())
    }

    /// Publishes this vCPU's vPMU for the host.
    fn publish(&mut self, paused: bool) {
        if let (Some(pmu), Some(export)) = (&mut self.pmu, &self.export) {
            pmu.publish(export, paused);
            self.last_publish = Instant::now();
        }
    }

    /// Publishes when a reader asked or the last view is getting old.
    /// A signal exit (`kicked`) may carry a PMI: the periodic view (a
    /// snapshot, tens of us here) waits for the next exit rather than delay
    /// the PMI; a reader's request does not wait.
    fn publish_if_due(&mut self, kicked: bool) {
        let Some(export) = &self.export else {
            return;
        };
        if export.take_refresh(self.index)
            || (!kicked && self.last_publish.elapsed() >= PUBLISH_INTERVAL)
        {
            self.publish(false);
        }
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
            self.publish_if_due(kicked);
            if let Some(pmu) = &mut self.pmu {
                let delivered = pmu.delivery.nmi + pmu.delivery.fixed;
                pmu.before_entry(kicked, &self.fd, &self.vm, self.msr_exit);
                if let Some(observer) = &mut self.observer {
                    if pmu.delivery.nmi + pmu.delivery.fixed != delivered {
                        observer.pmi_delivered(DeliveredPmi {
                            injected_tsc: pmu.last_pmi_tsc,
                            overshoot: pmu.last_pmi_overshoot,
                        });
                    }
                }
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
        self.publish(true);
        self.control.wait_while_paused();
        if let Some(pmu) = &mut self.pmu {
            pmu.switch_in();
        }
        // Readers serve a paused view as it is: replace it now.
        self.publish(false);
    }

    /// Enters the guest once and handles the exit.
    fn run_once(&mut self) -> Option<Outcome> {
        let vcpu = self.index;
        if let Some(observer) = &mut self.observer {
            observer.entering();
        }
        let result = self.fd.run();
        if let Some(observer) = &mut self.observer {
            observer.exited(matches!(&result, Err(e) if interrupted(e)));
        }
        if let Some(pmu) = &mut self.pmu {
            pmu.after_exit();
        }
        self.exits.count(&result);
        self.msr_exit = false;
        let step = match result {
            Ok(VcpuExit::X86Rdmsr(exit))
                if self
                    .observer
                    .as_ref()
                    .is_some_and(|o| o.owns_msr(exit.index)) =>
            {
                *exit.data = 0;
                Step::Continue
            }
            Ok(VcpuExit::X86Wrmsr(exit))
                if self
                    .observer
                    .as_ref()
                    .is_some_and(|o| o.owns_msr(exit.index)) =>
            {
                if let Some(observer) = &mut self.observer {
                    let pmis = self
                        .pmu
                        .as_ref()
                        .map_or(0, |p| p.delivery.nmi + p.delivery.fixed);
                    observer.msr_written(exit.data, &self.fd, self.exits, pmis);
                }
                Step::Continue
            }
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
            Err(e) if interrupted(&e) => {
                // The kick flag stays set for the next entry to act on.
                self.fd.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => Step::Stop(Outcome::VcpuError {
                vcpu,
                message: format!("KVM_RUN failed: {e}"),
            }),
        };
        if self.msr_exit {
            if let Some(observer) = &mut self.observer {
                observer.pmu_msr();
            }
        }
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
