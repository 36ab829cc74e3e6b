//! A vCPU thread and its run loop: enter the guest, handle the exit, repeat,
//! until the guest stops or the VMM asks the vCPU to.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use devices::PioBus;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::control::VmControl;
use crate::error::Outcome;
use crate::export::{Export, PUBLISH_INTERVAL};
use crate::kick;
use crate::pmu::vcpu::VcpuPmu;
use crate::pmu::PmuPlan;
use crate::vcpu_types::{interrupted, DeliveredPmi, ExitCounts, ExitObserver, VcpuReport};

/// KVM_SYSTEM_EVENT types (uapi/linux/kvm.h).
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

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
