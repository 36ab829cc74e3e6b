//! A vCPU thread and its run loop: enter the guest, handle the exit, repeat,
//! until the guest stops or the VMM asks the vCPU to.
//!
//! Owns: the vCPU thread, its run loop ([`Vcpu`]), the exit handler
//! ([`exit::handle_exit`]), kicks ([`kick`]), secondary vCPUs parked until
//! their wakeup ([`ap_start`]), what the vCPUs share with the rest
//! ([`control::VmControl`]) and how a run ends ([`Outcome`]). May use
//! `pmu` (the vCPU's vPMU) and `arch`; knows nothing of how the VM is
//! built, the API, the profiler or the benchmark trace: the last two reach
//! it only through the traits of `hooks` ([`ExitObserver`],
//! [`GuestSampler`]).

pub mod ap_start;
pub mod control;
pub mod exit;
mod hooks;
pub mod kick;
mod outcome;
mod report;
pub mod state;

pub use hooks::{ExitObserver, GuestSampler, ObserverLog};
pub use outcome::Outcome;
pub use report::{interrupted, ExitCounts, VcpuReport};

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use devices::{MmioBus, PioBus};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::arch::regs;
use crate::pmu::export::{Export, PUBLISH_INTERVAL};
use crate::pmu::vcpu::VcpuPmu;
use crate::pmu::PmuPlan;
use ap_start::ApGate;
use control::VmControl;
use exit::{handle_exit, ExitParts, MsrHandler, Step, Stop};

/// What a vCPU needs of its vPMU to build it on its own thread.
pub struct PmuSetup {
    pub plan: Arc<PmuPlan>,
    pub tsc_khz: u32,
    pub export: Arc<Export>,
    /// The vCPU's counts from previous boots, merged into its totals.
    pub carried: Option<vpmu::EventTotals>,
    /// A restore: the vPMU continues from this saved state.
    pub restored: Option<crate::pmu::vcpu::PmuState>,
}

/// One vCPU, ready to run on its own thread.
pub struct Vcpu {
    pub index: u8,
    fd: VcpuFd,
    vm: Arc<VmFd>,
    bus: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    /// A secondary vCPU waits here until the guest wakes it.
    gate: Option<Arc<ApGate>>,
    control: Arc<VmControl>,
    pmu_setup: Option<PmuSetup>,
    pmu: Option<VcpuPmu>,
    export: Option<Arc<Export>>,
    last_publish: Instant,
    exits: ExitCounts,
    /// The vCPU has entered the guest (a parked one has not).
    started: bool,
    /// Instrumentation (the benchmark trace): normally none.
    observer: Option<Box<dyn ExitObserver>>,
    /// The host-side profiler's sampler.
    sampler: Option<Box<dyn GuestSampler>>,
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
            mmio: Arc::new(MmioBus::new()),
            gate: None,
            control,
            pmu_setup,
            pmu: None,
            export: None,
            last_publish: Instant::now(),
            exits: ExitCounts::default(),
            started: false,
            observer: None,
            sampler: None,
        }
    }

    /// Instruments the vCPU (see [`ExitObserver`]).
    pub fn with_observer(mut self, observer: Option<Box<dyn ExitObserver>>) -> Self {
        self.observer = observer;
        self
    }

    /// Gives the vCPU the VM's MMIO devices (none: reads float high).
    pub fn with_mmio(mut self, mmio: Arc<MmioBus>) -> Self {
        self.mmio = mmio;
        self
    }

    /// Parks the vCPU at `gate` until the guest wakes it (secondary vCPUs).
    pub fn parked(mut self, gate: Arc<ApGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Gives the vCPU a sampler (see [`GuestSampler`]).
    pub fn with_sampler(mut self, sampler: Option<Box<dyn GuestSampler>>) -> Self {
        self.sampler = sampler;
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
        kick::attach(self.fd.get_kvm_run());
        // A parked vCPU is not running: it takes no kicks and a pause does
        // not wait for it. A boot that stops while its threads start (a
        // guest that resets at once, a timeout) skips the rest of the
        // start-up: no vPMU is built, the thread only reports and ends.
        let mut outcome = None;
        if !self.control.stopping() {
            outcome = self.start_pmu().err().or_else(|| self.wait_for_wakeup());
        }
        self.control.register_thread(index, true);
        if let Some(observer) = &mut self.observer {
            observer.start(&self.fd);
        }
        self.started = !self.control.stopping();
        outcome = outcome.or_else(|| self.run_loop());
        if let Some(sampler) = &mut self.sampler {
            sampler.finish(&self.fd);
        }
        self.control.register_thread(index, false);
        kick::detach();
        self.publish(false);
        let report = VcpuReport {
            index: self.index,
            vpmu: self.pmu.as_mut().map(|p| (p.snapshot(), p.delivery)),
            exits: self.exits,
            observer_log: self.observer.take().and_then(|o| o.finish(&self.fd)),
            rip: self.started.then(|| self.rip()).flatten(),
        };
        self.control.add_report(report);
        if let Some(outcome) = outcome {
            self.control.finish(outcome);
        }
    }

    /// Builds the vPMU here, on the thread its host events belong to.
    fn start_pmu(&mut self) -> Result<(), Outcome> {
        let Some(setup) = self.pmu_setup.take() else {
            return Ok(());
        };
        let mut pmu = VcpuPmu::new(
            &setup.plan,
            self.index,
            setup.tsc_khz,
            setup.carried,
            kick::overflow_signal(),
        )
        .map_err(|message| Outcome::VcpuError {
            vcpu: self.index,
            message: format!("cannot build its vPMU: {message}"),
        })?;
        if let Some(saved) = &setup.restored {
            pmu.restore_state(saved).map_err(|e| Outcome::VcpuError {
                vcpu: self.index,
                message: format!("cannot restore its vPMU: {e}"),
            })?;
        }
        pmu.trace_pmis = self.observer.as_ref().is_some_and(|o| o.traces_pmis());
        self.pmu = Some(pmu);
        self.export = Some(setup.export);
        self.publish(false);
        Ok(())
    }

    /// A secondary vCPU: blocks until the guest wakes it through the MP
    /// wakeup mailbox, then starts at the wakeup vector. Its view reads as
    /// paused meanwhile, so readers do not wait for it. Returns an outcome
    /// only if the start failed; a stop while parked leaves `run_loop` to
    /// see the stop flag.
    fn wait_for_wakeup(&mut self) -> Option<Outcome> {
        let gate = self.gate.take()?;
        self.publish(true);
        let vector = gate.wait(usize::from(self.index))?;
        let started = regs::start_ap(&self.fd, vector).map_err(|e| Outcome::VcpuError {
            vcpu: self.index,
            message: format!("cannot start at wakeup vector {vector:#x}: {e}"),
        });
        self.publish(false);
        started.err()
    }

    /// Publishes this vCPU's vPMU for the host.
    fn publish(&mut self, paused: bool) {
        if let (Some(pmu), Some(export)) = (&mut self.pmu, &self.export) {
            pmu.publish(export, paused);
            self.last_publish = Instant::now();
        }
    }

    /// Publishes when a reader asked, a counter context ended (rare: only
    /// on reprogramming) or the last view is getting old.
    /// A signal exit (`kicked`) may carry a PMI: the periodic view (a
    /// snapshot, tens of us here) waits for the next exit rather than delay
    /// the PMI; a reader's request does not wait.
    fn publish_if_due(&mut self, kicked: bool) {
        let Some(export) = &self.export else {
            return;
        };
        let retired = self.pmu.as_ref().is_some_and(|p| p.publish_due());
        // A guest that writes its PMU and then idles in HLT (handled inside
        // KVM) makes no exit to republish on: readers must know the view
        // predates the write, however young it is.
        if self.pmu.as_ref().is_some_and(|p| p.written_since_publish()) {
            export.mark_outdated(self.index);
        }
        if export.take_refresh(self.index)
            || retired
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
                self.hold_while_paused();
                continue;
            }
            let kicked = kick::take_kicked();
            self.publish_if_due(kicked);
            self.before_entry(kicked);
            match self.run_once() {
                Step::Enter => {}
                Step::Interrupted => self.fd.set_kvm_immediate_exit(0),
                Step::Stop(stop) => return Some(self.outcome(stop)),
            }
        }
    }

    /// The sampler's and the vPMU's work before an entry (see
    /// [`GuestSampler::before_entry`], [`VcpuPmu::before_entry`]).
    fn before_entry(&mut self, kicked: bool) {
        if let Some(sampler) = &mut self.sampler {
            sampler.before_entry(kicked, &self.fd);
        }
        let Some(pmu) = &mut self.pmu else {
            return;
        };
        let delivered = pmu.before_entry(kicked, &self.fd, &self.vm);
        if let (Some(pmi), Some(observer)) = (delivered, &mut self.observer) {
            observer.pmi_delivered(pmi);
        }
    }

    /// Holds the vCPU off the CPU while the VM is paused, its vPMU context
    /// switched out so that paused time is never counted.
    fn hold_while_paused(&mut self) {
        if let Some(pmu) = &mut self.pmu {
            pmu.switch_out();
        }
        self.publish(true);
        let control = self.control.clone();
        control.wait_while_paused(usize::from(self.index), |msrs| self.save(msrs));
        if let Some(pmu) = &mut self.pmu {
            pmu.switch_in();
        }
        // Readers serve a paused view as it is: replace it now.
        self.publish(false);
    }

    /// This vCPU's state for a snapshot (it is held off the CPU).
    fn save(&mut self, msrs: &[u32]) -> control::CaptureResult {
        Ok(state::SavedVcpu {
            kvm: state::VcpuState::capture(&self.fd, msrs).map_err(|e| e.to_string())?,
            pmu: self.pmu.as_mut().map(|p| p.save_state()),
        })
    }

    /// Enters the guest once and hands the exit to [`handle_exit`]. The
    /// observer sees the entry and the exit; the vPMU closes its guest-time
    /// window before anything else runs.
    fn run_once(&mut self) -> Step {
        if let Some(observer) = &mut self.observer {
            observer.entering(&self.fd);
        }
        let result = self.fd.run();
        let signalled = matches!(&result, Err(e) if interrupted(e));
        if let Some(observer) = &mut self.observer {
            observer.exited(signalled);
        }
        if let Some(pmu) = &mut self.pmu {
            pmu.after_exit(signalled);
        }
        self.exits.count(&result);
        let mut parts = ExitParts {
            vcpu: self.index,
            pio: &self.bus,
            mmio: &self.mmio,
            msrs: self.pmu.as_mut().map(|p| p as &mut dyn MsrHandler),
            observer: self
                .observer
                .as_deref_mut()
                .map(|o| o as &mut dyn ExitObserver),
            exits: self.exits,
        };
        handle_exit(result, &mut parts)
    }

    /// Why the guest stopped, for a step that stops it.
    fn outcome(&mut self, stop: Stop) -> Outcome {
        let vcpu = self.index;
        match stop {
            Stop::Outcome(outcome) => outcome,
            Stop::Shutdown => Outcome::Shutdown {
                vcpu,
                rip: self.rip(),
            },
            Stop::InternalError => {
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member
                // of the exit union is the valid one.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Outcome::InternalError {
                    vcpu,
                    suberror,
                    rip: self.rip(),
                }
            }
            Stop::FailEntry(reason) => Outcome::FailEntry {
                vcpu,
                reason,
                rip: self.rip(),
            },
        }
    }

    fn rip(&self) -> Option<u64> {
        self.fd.get_regs().ok().map(|r| r.rip)
    }
}

/// The vPMU answers the MSRs the filter traps; a fault is a #GP.
impl MsrHandler for VcpuPmu {
    fn rdmsr(&mut self, index: u32) -> Option<u64> {
        VcpuPmu::rdmsr(self, index).ok()
    }

    fn wrmsr(&mut self, index: u32, value: u64) -> bool {
        VcpuPmu::wrmsr(self, index, value).is_ok()
    }

    fn pmis_delivered(&self) -> u64 {
        VcpuPmu::pmis_delivered(self)
    }
}
