//! A plain, serializable picture of one vCPU's vPMU for the host-side
//! export: every counter decoded, valued and explained.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::evtsel::DecodedSelect;
use crate::model::PmuModel;
use crate::stats::VpmuStats;
use crate::totals::ProgrammingId;

/// General-purpose or fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CounterKind {
    /// General-purpose counter.
    Gp,
    /// Intel fixed counter.
    Fixed,
}

/// A guest privilege level as the vPMU's event selects name them: user
/// (`USR`, CPL 3) or kernel (`OS`, CPL 0-2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestMode {
    /// CPL 3.
    User,
    /// CPL 0, 1 or 2.
    Kernel,
}

/// How a counter's counts are produced on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Backing {
    /// Not backed yet: the counter has not run with this programming.
    Idle,
    /// A host hardware event (`PERF_TYPE_RAW`, guest-only).
    HardwareRaw,
    /// Host task-clock of the vCPU thread, guest time only, converted to
    /// guest TSC cycles. It cannot tell guest user from kernel time.
    SoftwareClock,
    /// An estimate for a user-only or kernel-only count where the host has
    /// no hardware events: the guest time (as [`Backing::SoftwareClock`])
    /// that the guest's privilege level, sampled at the vCPU's clock
    /// signals, attributes to `mode`. Its error is a sampling error: see
    /// [`crate::VpmuStats::mode_samples`].
    SoftwareClockEstimate {
        /// The guest mode it counts.
        mode: GuestMode,
    },
    /// Nothing counts; `reason` says why.
    Unbacked {
        /// Why.
        reason: Cow<'static, str>,
    },
    /// The event policy denies this event; it was never opened.
    Denied,
}

impl Backing {
    /// Counted from the vCPU thread's task clock (exactly, or as an
    /// estimate of one guest mode).
    pub fn is_clock(&self) -> bool {
        matches!(
            self,
            Self::SoftwareClock | Self::SoftwareClockEstimate { .. }
        )
    }
}

/// One counter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterSnapshot {
    /// General-purpose or fixed.
    pub kind: CounterKind,
    /// Index within its kind.
    pub index: usize,
    /// The counter's MSR.
    pub msr: u32,
    /// Raw programming: the event select, or the 4-bit field of
    /// `IA32_FIXED_CTR_CTRL` for a fixed counter.
    pub control: u64,
    /// The (effective) event select decoded.
    pub decoded: DecodedSelect,
    /// Well-known name of the event, if it has one.
    pub event_name: Option<Cow<'static, str>>,
    /// Current value.
    pub value: u64,
    /// Architecturally running (enabled, at least one of USR/OS, global enable).
    pub running: bool,
    /// How it is backed.
    pub backing: Backing,
    /// Programming generation (changes only with the programming).
    pub generation: u64,
    /// Host event's enabled time, ns.
    pub host_time_enabled_ns: u64,
    /// Host event's running time, ns (less than enabled: multiplexed).
    pub host_time_running_ns: u64,
    /// Overflows so far.
    pub overflows: u64,
    /// PMIs this counter requested.
    pub pmis: u64,
    /// What the counter counts (see [`ProgrammingId`]): the key its
    /// context's count merges under when the context ends.
    pub programming_id: ProgrammingId,
    /// Events counted since the current programming began; guest writes
    /// of the value do not change it (a sampling guest rewrites the value
    /// at every PMI).
    pub counted: u64,
    /// The counter has run with its current programming (its context will
    /// be merged into the totals when it ends, even with a count of 0).
    pub ran: bool,
}

/// The whole vPMU of one vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpmuSnapshot {
    /// The model.
    pub model: PmuModel,
    /// Counters, general-purpose first.
    pub counters: Vec<CounterSnapshot>,
    /// Global control (0 without global registers).
    pub global_ctrl: u64,
    /// Global status (0 without global registers).
    pub global_status: u64,
    /// A PMI waits for delivery.
    pub pending_pmi: bool,
    /// Guest time measured by the entry/exit hooks, ns.
    pub guest_time_ns: u64,
    /// Why hardware events are unavailable, once learned.
    pub no_hardware_reason: Option<String>,
    /// Statistics.
    pub stats: VpmuStats,
}

/// A change in a counter's host backing that the VMM should report once
/// (a log line), not once per attempt: the host started refusing to back
/// the counter, or backs it again. Drained with
/// [`crate::Vpmu::take_notices`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "notice", rename_all = "snake_case")]
pub enum BackingNotice {
    /// The host refused to open (or lost) the counter's event: it counts
    /// nothing until an open succeeds. Retried when the counter starts or
    /// is read (at most once per retry interval) and with every new
    /// programming; further refusals are not noticed again.
    Lost {
        /// General-purpose or fixed.
        kind: CounterKind,
        /// Index within its kind.
        index: usize,
        /// Why (the host's error).
        reason: String,
    },
    /// An open succeeded again after `refused` refused attempts.
    Recovered {
        /// General-purpose or fixed.
        kind: CounterKind,
        /// Index within its kind.
        index: usize,
        /// Attempts the host refused in between.
        refused: u64,
    },
}

impl std::fmt::Display for BackingNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = |kind: &CounterKind, index: &usize| match kind {
            CounterKind::Gp => format!("gp{index}"),
            CounterKind::Fixed => format!("fixed{index}"),
        };
        match self {
            Self::Lost {
                kind,
                index,
                reason,
            } => write!(
                f,
                "counter {} lost its host backing and counts nothing until the host allows \
                 it again: {reason}",
                name(kind, index)
            ),
            Self::Recovered {
                kind,
                index,
                refused,
            } => write!(
                f,
                "counter {} is backed by the host again (after {refused} refused attempts)",
                name(kind, index)
            ),
        }
    }
}
