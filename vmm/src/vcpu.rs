//! A vCPU thread and its run loop: enter the guest, handle the exit, repeat,
//! until the guest stops or the VMM asks the vCPU to.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::PioBus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::error::Outcome;
use crate::kick;

/// KVM_SYSTEM_EVENT types (uapi/linux/kvm.h).
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// What the vCPU threads and the VMM's main loop share: whether to stop,
/// and the first reason anything stopped.
pub struct VmControl {
    stop: AtomicBool,
    outcome: Mutex<Option<Outcome>>,
    /// Written when an outcome is recorded, to wake the main loop.
    pub wake: EventFd,
}

impl VmControl {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    /// Records why the VM stops (the first reason wins) and asks every vCPU
    /// to stop.
    pub fn finish(&self, outcome: Outcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(outcome);
        }
        self.stop.store(true, Ordering::SeqCst);
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

/// One vCPU, ready to run on its own thread.
pub struct Vcpu {
    pub index: u8,
    fd: VcpuFd,
    bus: Arc<PioBus>,
    control: Arc<VmControl>,
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
    pub fn new(index: u8, fd: VcpuFd, bus: Arc<PioBus>, control: Arc<VmControl>) -> Self {
        Self {
            index,
            fd,
            bus,
            control,
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
        let outcome = loop {
            if self.control.stopping() {
                break None;
            }
            if let Some(outcome) = self.run_once() {
                break Some(outcome);
            }
        };
        kick::disarm();
        if let Some(outcome) = outcome {
            self.control.finish(outcome);
        }
    }

    /// Enters the guest once and handles the exit.
    fn run_once(&mut self) -> Option<Outcome> {
        let vcpu = self.index;
        let step = match self.fd.run() {
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
                self.fd.set_kvm_immediate_exit(0);
                kick::take_kicked();
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
