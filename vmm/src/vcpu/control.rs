//! What the vCPU threads, the VMM's main loop and the API share about the
//! VM's run: stop, pause, kicks and the vCPUs' reports ([`VmControl`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use devices::sync::Recover;
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::kick;
use crate::vcpu::state::SavedVcpu;
use crate::vcpu::Outcome;
use crate::vcpu::VcpuReport;

/// What the vCPU threads and the VMM's main loop share: whether to stop or
/// pause, and the first reason anything stopped.
pub struct VmControl {
    stop: AtomicBool,
    /// A guest reset starts a new boot (`--on-reset reboot`): the stop it
    /// causes ends that boot, not the VM.
    reboots: bool,
    /// The VM is ending for good: a stop that is not a reboot's.
    ending: AtomicBool,
    /// vCPU threads, by index, while they run: where kicks go.
    threads: Mutex<Vec<Option<libc::pthread_t>>>,
    /// vCPUs held off the CPU by a pause.
    held: Mutex<usize>,
    held_changed: Condvar,
    outcome: Mutex<Option<Outcome>>,
    paused: Mutex<bool>,
    /// `paused`, readable without the lock on every exit.
    pause_flag: AtomicBool,
    resumed: Condvar,
    /// Written when an outcome is recorded, to wake the main loop.
    pub wake: EventFd,
    reports: Mutex<Vec<VcpuReport>>,
    /// A snapshot's request to the held vCPUs, and what they saved.
    capture: Mutex<Capture>,
    captured: Condvar,
}

/// What a snapshot asks of the held vCPUs: each saves its own state (on its
/// own thread, where its vPMU lives) into its slot.
#[derive(Default)]
struct Capture {
    active: bool,
    /// The MSRs each vCPU saves.
    msrs: std::sync::Arc<Vec<u32>>,
    saved: Vec<Option<Result<SavedVcpu, String>>>,
}

/// A held vCPU's answer to a capture: its state, or why it has none.
pub type CaptureResult = Result<SavedVcpu, String>;

impl VmControl {
    pub fn new(vcpus: usize) -> std::io::Result<Self> {
        Ok(Self {
            stop: AtomicBool::new(false),
            reboots: false,
            ending: AtomicBool::new(false),
            threads: Mutex::new(vec![None; vcpus]),
            held: Mutex::new(0),
            held_changed: Condvar::new(),
            outcome: Mutex::new(None),
            paused: Mutex::new(false),
            pause_flag: AtomicBool::new(false),
            resumed: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            reports: Mutex::new(Vec::new()),
            capture: Mutex::new(Capture::default()),
            captured: Condvar::new(),
        })
    }

    /// A guest reset reboots the VM (`--on-reset reboot`) instead of ending
    /// it: [`VmControl::ending`] stays false for a reset.
    pub fn rebooting_on_reset(mut self, reboots: bool) -> Self {
        self.reboots = reboots;
        self
    }

    /// Pauses the VM: every running vCPU leaves the CPU and is held there. Returns
    /// once they all have (or after `timeout`), with whether they did.
    ///
    /// During a reboot the pause stays in force: the old boot's vCPUs end,
    /// the new boot's are held before their first guest instruction, and
    /// the answer comes once no vCPU runs the guest.
    pub fn pause(&self, timeout: std::time::Duration) -> bool {
        *self.paused.lock().recover() = true;
        self.pause_flag.store(true, Ordering::SeqCst);
        self.kick_all();
        let held = self.held.lock().recover();
        let (held, _) = self
            .held_changed
            .wait_timeout_while(held, timeout, |p| {
                *p < self.running_vcpus() && !self.ending()
            })
            .recover();
        *held >= self.running_vcpus()
    }

    fn running_vcpus(&self) -> usize {
        let threads = self.threads.lock().recover();
        threads.iter().flatten().count()
    }

    /// Gets vCPU `index` out of `KVM_RUN` (it will look at its flags).
    pub fn kick(&self, index: usize) {
        let threads = self.threads.lock().recover();
        if let Some(Some(thread)) = threads.get(index) {
            // SAFETY: the pthread_t is registered only while its thread runs
            // (under this lock), so it names a live thread.
            unsafe { libc::pthread_kill(*thread, kick::kick_signal()) };
        }
    }

    pub fn kick_all(&self) {
        let count = self.threads.lock().recover().len();
        for index in 0..count {
            self.kick(index);
        }
    }

    pub(crate) fn register_thread(&self, index: usize, running: bool) {
        let mut threads = self.threads.lock().recover();
        if let Some(slot) = threads.get_mut(index) {
            // SAFETY: pthread_self has no preconditions.
            *slot = running.then(|| unsafe { libc::pthread_self() });
        }
        drop(threads);
        // A pause waits for every running vCPU: one fewer or one more.
        self.notify_held_changed();
    }

    /// Wakes a pause waiting for the vCPUs; taking the lock first means a
    /// waiter either sees the change or is already waiting.
    fn notify_held_changed(&self) {
        let _held = self.held.lock().recover();
        self.held_changed.notify_all();
    }

    pub fn resume(&self) {
        *self.paused.lock().recover() = false;
        self.pause_flag.store(false, Ordering::SeqCst);
        self.resumed.notify_all();
    }

    /// Checked on every exit: one atomic load, no lock.
    pub fn pause_requested(&self) -> bool {
        self.pause_flag.load(Ordering::SeqCst)
    }

    /// Blocks the calling vCPU thread (vCPU `index`) while the VM is
    /// paused and not stopping; meanwhile it saves its state with `save`
    /// whenever a snapshot asks ([`VmControl::capture`]).
    pub(crate) fn wait_while_paused(
        &self,
        index: usize,
        mut save: impl FnMut(&[u32]) -> CaptureResult,
    ) {
        self.count_held(1);
        while let Some(msrs) = self.wait_for_resume(index) {
            let saved = save(&msrs);
            let mut capture = self.capture.lock().recover();
            if let Some(slot) = capture.saved.get_mut(index) {
                *slot = Some(saved);
            }
            self.captured.notify_all();
        }
        self.count_held(-1);
    }

    /// Asks the held vCPUs `vcpus` to save their state (saving `msrs`) and
    /// waits up to `timeout` for them. The VM must be paused. `Err`: a
    /// vCPU that could not save, or did not answer in time.
    pub fn capture(
        &self,
        vcpus: &[usize],
        msrs: Vec<u32>,
        timeout: std::time::Duration,
    ) -> Result<Vec<(usize, SavedVcpu)>, String> {
        {
            // Under the pause lock: a held vCPU either sees the request or
            // is already waiting for the notification.
            let _paused = self.paused.lock().recover();
            let mut capture = self.capture.lock().recover();
            let count = self.threads.lock().recover().len();
            *capture = Capture {
                active: true,
                msrs: std::sync::Arc::new(msrs),
                saved: (0..count).map(|_| None).collect(),
            };
            self.resumed.notify_all();
        }
        let capture = self.capture.lock().recover();
        let (mut capture, _) = self
            .captured
            .wait_timeout_while(capture, timeout, |c| {
                vcpus.iter().any(|&i| matches!(c.saved.get(i), Some(None))) && !self.stopping()
            })
            .recover();
        capture.active = false;
        let mut saved = Vec::with_capacity(vcpus.len());
        for &index in vcpus {
            match capture.saved.get_mut(index).and_then(Option::take) {
                Some(Ok(state)) => saved.push((index, state)),
                Some(Err(e)) => return Err(format!("vCPU {index}: {e}")),
                None if self.stopping() => return Err("the VM is stopping".into()),
                None => return Err(format!("vCPU {index} did not stop in time")),
            }
        }
        Ok(saved)
    }

    fn count_held(&self, delta: isize) {
        let mut held = self.held.lock().recover();
        *held = held.saturating_add_signed(delta);
        self.held_changed.notify_all();
    }

    /// Waits until the VM resumes or stops (`None`), or a capture wants
    /// vCPU `index`'s state (the MSRs to save).
    fn wait_for_resume(&self, index: usize) -> Option<std::sync::Arc<Vec<u32>>> {
        let mut paused = self.paused.lock().recover();
        while *paused && !self.stopping() {
            {
                let capture = self.capture.lock().recover();
                if capture.active && matches!(capture.saved.get(index), Some(None)) {
                    return Some(capture.msrs.clone());
                }
            }
            paused = self.resumed.wait(paused).recover();
        }
        None
    }

    /// Called by a vCPU thread as it ends.
    pub(crate) fn add_report(&self, report: VcpuReport) {
        self.reports.lock().recover().push(report);
    }

    /// The reports of every vCPU thread that has ended, by vCPU index.
    pub fn reports(&self) -> Vec<VcpuReport> {
        let mut reports = self.reports.lock().recover().clone();
        reports.sort_by_key(|r| r.index);
        reports
    }

    /// Readies the control for the next boot after a guest reboot: no stop,
    /// no outcome, no vCPU reports. A pause stays in force.
    pub fn reset_for_reboot(&self) {
        *self.outcome.lock().recover() = None;
        self.reports.lock().recover().clear();
        self.stop.store(false, Ordering::SeqCst);
    }

    /// Records why the VM stops (the first reason wins) and asks every vCPU
    /// to stop.
    pub fn finish(&self, outcome: Outcome) {
        let mut slot = self.outcome.lock().recover();
        if slot.is_none() {
            *slot = Some(outcome);
        }
        let reboot = self.reboots && *slot == Some(Outcome::Reset);
        drop(slot);
        self.stop_all(!reboot);
    }

    /// Ends the VM with `outcome` in place of a reset that was to reboot
    /// it (the timeout expired, or the next boot could not start).
    pub fn end_instead(&self, outcome: Outcome) {
        *self.outcome.lock().recover() = Some(outcome);
        self.stop_all(true);
    }

    /// Asks every vCPU to stop; `ending`: for good, not for a reboot.
    fn stop_all(&self, ending: bool) {
        if ending {
            self.ending.store(true, Ordering::SeqCst);
        }
        self.stop.store(true, Ordering::SeqCst);
        {
            // Under the lock: a vCPU about to wait for a resume sees the stop.
            let _paused = self.paused.lock().recover();
            self.resumed.notify_all();
        }
        self.notify_held_changed();
        {
            let _capture = self.capture.lock().recover();
            self.captured.notify_all();
        }
        // The eventfd cannot overflow in practice; a failed wake only delays
        // the main loop to its next timeout.
        let _ = self.wake.write(1);
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome.lock().recover().clone()
    }

    /// The vCPUs are to stop: the VM ends, or the boot does for a reboot.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The VM is ending for good (a stop that is not a reboot's).
    pub fn ending(&self) -> bool {
        self.ending.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_reset_that_reboots_stops_the_vcpus_but_does_not_end_the_vm() {
        let control = VmControl::new(2).unwrap().rebooting_on_reset(true);
        control.finish(Outcome::Reset);
        assert!(control.stopping());
        assert!(!control.ending());
        // No vCPU runs the guest between boots: the pause holds at once.
        assert!(control.pause(Duration::from_millis(100)));
        control.reset_for_reboot();
        assert!(!control.stopping() && control.pause_requested());
        // A reboot that does not happen ends the VM after all.
        control.finish(Outcome::Reset);
        control.end_instead(Outcome::Timeout { seconds: 1.0 });
        assert!(control.ending());
        assert_eq!(control.outcome(), Some(Outcome::Timeout { seconds: 1.0 }));
    }

    #[test]
    fn every_other_stop_ends_the_vm() {
        let once = VmControl::new(1).unwrap();
        once.finish(Outcome::Reset);
        assert!(once.ending());
        let rebooting = VmControl::new(1).unwrap().rebooting_on_reset(true);
        rebooting.finish(Outcome::Timeout { seconds: 1.0 });
        // The first reason wins: a reset after the timeout ends it still.
        rebooting.finish(Outcome::Reset);
        assert!(rebooting.ending());
    }
}
