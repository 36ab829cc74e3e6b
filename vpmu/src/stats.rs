//! Counters about the vPMU itself: what the guest accessed and what it
//! cost on the host. They prove that stop/start never reopens.

use serde::{Deserialize, Serialize};

use crate::vendor::Register;

/// Accesses per kind of register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrAccessCounts {
    /// General-purpose counters.
    pub gp_counter: u64,
    /// Event selects.
    pub event_select: u64,
    /// Fixed counters.
    pub fixed_counter: u64,
    /// Fixed counter control.
    pub fixed_ctrl: u64,
    /// Global status.
    pub global_status: u64,
    /// Global control.
    pub global_ctrl: u64,
    /// Global status reset/clear.
    pub global_status_reset: u64,
    /// Global status set.
    pub global_status_set: u64,
    /// Global in-use.
    pub global_inuse: u64,
    /// Perf capabilities.
    pub perf_capabilities: u64,
    /// MSRs outside the model.
    pub unknown: u64,
}

impl MsrAccessCounts {
    /// Counts one access to `register`, `None` for an MSR outside the model.
    pub(crate) fn count(&mut self, register: Option<Register>) {
        let slot = match register {
            Some(Register::GpCounter(..)) => &mut self.gp_counter,
            Some(Register::EventSelect(_)) => &mut self.event_select,
            Some(Register::FixedCounter(_)) => &mut self.fixed_counter,
            Some(Register::FixedCtrl) => &mut self.fixed_ctrl,
            Some(Register::GlobalStatus) => &mut self.global_status,
            Some(Register::GlobalCtrl) => &mut self.global_ctrl,
            Some(Register::GlobalStatusReset) => &mut self.global_status_reset,
            Some(Register::GlobalStatusSet) => &mut self.global_status_set,
            Some(Register::GlobalInUse) => &mut self.global_inuse,
            Some(Register::PerfCapabilities) => &mut self.perf_capabilities,
            None => &mut self.unknown,
        };
        *slot += 1;
    }

    /// All accesses.
    pub fn total(&self) -> u64 {
        self.gp_counter
            + self.event_select
            + self.fixed_counter
            + self.fixed_ctrl
            + self.global_status
            + self.global_ctrl
            + self.global_status_reset
            + self.global_status_set
            + self.global_inuse
            + self.perf_capabilities
            + self.unknown
    }
}

/// Statistics of one vCPU's vPMU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpmuStats {
    /// Guest RDMSRs by register.
    pub rdmsr: MsrAccessCounts,
    /// Guest WRMSRs by register.
    pub wrmsr: MsrAccessCounts,
    /// Accesses answered with #GP.
    pub faults: u64,
    /// Host events opened (`perf_event_open` calls that succeeded).
    pub opens: u64,
    /// Host event opens that failed.
    pub open_failures: u64,
    /// Host events closed.
    pub closes: u64,
    /// Programming changes (a counter's generation moved on).
    pub reprograms: u64,
    /// Host event starts (enable ioctls).
    pub starts: u64,
    /// Host event stops (disable ioctls).
    pub stops: u64,
    /// Host reads of counter events.
    pub reads: u64,
    /// Host reads of the guest-time reference at entries and exits.
    pub clock_reads: u64,
    /// Entries that needed no read of the reference: the backend showed
    /// the thread had stayed on its CPU since the exit's read.
    pub clock_reads_saved: u64,
    /// How much earlier than their distance clock events are armed now,
    /// ns (the host's clock events fire late by about this much more).
    pub clock_lead_ns: u64,
    /// Sample period updates.
    pub period_updates: u64,
    /// Virtual counter overflows.
    pub overflows: u64,
    /// Calls of [`crate::Vpmu::handle_host_overflow`].
    pub overflow_signals: u64,
    /// PMIs handed to the VMM by [`crate::Vpmu::take_pending_pmi`].
    pub pmis: u64,
    /// Sample periods raised to the host minimum.
    pub throttles: u64,
    /// Host operations that failed after open (the counter became unbacked).
    pub backend_errors: u64,
    /// Opens retried for a programming the host had refused.
    pub open_retries: u64,
    /// Counters that lost their host backing (one per refusal episode, see
    /// [`crate::BackingNotice`]).
    pub backing_lost: u64,
    /// Counters backed again after a refusal episode.
    pub backing_recovered: u64,
    /// Notices dropped because the VMM did not take them in time.
    pub notices_dropped: u64,
    /// Context saves.
    pub saves: u64,
    /// Context restores.
    pub restores: u64,
    /// Restores that reprogrammed nothing (every counter equivalent).
    pub restores_equivalent: u64,
    /// Resets to the power-on state.
    pub resets: u64,
    /// Counter contexts that ended (programming changed) after running;
    /// each one's count went to [`crate::Vpmu::take_retired`].
    pub retired_contexts: u64,
    /// Ended contexts dropped because the VMM did not take them in time
    /// (more than [`crate::MAX_RETIRED`] ids waiting).
    pub retired_dropped: u64,
    /// Guest privilege levels sampled for user-only or kernel-only counts
    /// on the task clock ([`crate::Backing::SoftwareClockEstimate`]).
    #[serde(default)]
    pub mode_samples: u64,
    /// Of those, the samples that found the guest in user mode.
    #[serde(default)]
    pub mode_samples_user: u64,
}
