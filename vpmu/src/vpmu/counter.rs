//! One virtual counter's state.

use std::borrow::Cow;
use std::time::Instant;

use crate::snapshot::{Backing, CounterKind, GuestMode};

/// How a counter is backed right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum BackingState<H> {
    /// Nothing opened for the current programming yet.
    Idle,
    /// A hardware event.
    Hardware(H),
    /// A task-clock event (only for overflow notification; counts come
    /// from the guest-time reference). With a mode, the counter counts
    /// only guest user or only guest kernel time: the guest time that
    /// sampled privilege levels attribute to that mode (an estimate; see
    /// `Vpmu::observe_guest_mode`).
    Clock(H, Option<GuestMode>),
    /// Nothing counts: the host cannot count this event (no hardware
    /// events and not a clock event). Permanent for this programming.
    Unbacked(Cow<'static, str>),
    /// Nothing counts: the host refused to open (or lost) the event. Tried
    /// again when the counter starts or is read, at most once per retry
    /// interval, and with every new programming.
    Refused(Cow<'static, str>),
    /// Denied by the event policy.
    Denied,
}

impl<H: Copy> BackingState<H> {
    /// A clock event backs it (with or without a mode).
    pub(super) fn is_clock(&self) -> bool {
        matches!(self, Self::Clock(..))
    }

    pub(super) fn handle(&self) -> Option<H> {
        match self {
            Self::Hardware(h) | Self::Clock(h, _) => Some(*h),
            _ => None,
        }
    }

    pub(super) fn export(&self) -> Backing {
        match self {
            Self::Idle => Backing::Idle,
            Self::Hardware(_) => Backing::HardwareRaw,
            Self::Clock(_, None) => Backing::SoftwareClock,
            Self::Clock(_, Some(mode)) => Backing::SoftwareClockEstimate { mode: *mode },
            Self::Unbacked(reason) | Self::Refused(reason) => Backing::Unbacked {
                reason: reason.clone(),
            },
            Self::Denied => Backing::Denied,
        }
    }
}

/// The host refuses to back a counter: one episode, from the first refusal
/// to the next successful open (which may be of another programming).
#[derive(Clone, Debug)]
pub(super) struct Failure {
    /// Refused attempts so far.
    pub attempts: u64,
    /// When the last attempt failed.
    pub last: Instant,
}

/// A host sample period and the host count it was set at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Armed {
    pub at: u64,
    pub period: u64,
    /// Clock events: the distance to overflow when armed, ns (the period
    /// is shorter by the lead, or longer when raised to the minimum).
    pub distance_ns: u64,
}

/// A host sample period for a counter's distance to overflow.
#[derive(Clone, Copy, Debug)]
pub(super) struct HostPeriod {
    /// In events (hardware) or ns (clock), raised to the host minimum.
    pub period: u64,
    /// Clock events: the distance to overflow, ns (0 for hardware).
    pub distance_ns: u64,
    /// Raised to the minimum: a throttle, counted once the host takes it.
    pub throttled: bool,
}

/// One virtual counter.
#[derive(Clone, Debug)]
pub(super) struct Counter<H> {
    pub kind: CounterKind,
    pub index: usize,
    pub mask: u64,
    /// Its bit in GLOBAL_CTRL/GLOBAL_STATUS.
    pub status_bit: u64,
    /// Effective event select (synthesized for fixed counters).
    pub select: u64,
    /// The programming the backing was opened for.
    pub programming: u64,
    pub generation: u64,
    pub value: u64,
    pub running: bool,
    pub backing: BackingState<H>,
    /// Hardware: host count at the last sync.
    pub host_count: u64,
    /// Clock: guest nanoseconds at the last sync, and the sub-cycle carry.
    pub clock_ns: u64,
    pub carry: u64,
    pub armed: Option<Armed>,
    /// The value changed while the host event was stopped: re-arm at start.
    pub rearm: bool,
    /// The host event is enabled. Hardware events are enabled exactly
    /// while the counter runs; a clock event (it only notifies overflows,
    /// the counts come from the guest-time reference) stays enabled when
    /// its counter stops, so that stopping and starting cost no ioctl, and
    /// is disabled at the next overflow signal if the counter still stands.
    pub host_enabled: bool,
    /// An overflow signal asked for a re-arm, done right before the next
    /// entry (after the PMI is delivered).
    pub arm_at_entry: bool,
    pub time_enabled: u64,
    pub time_running: u64,
    pub overflows: u64,
    pub pmis: u64,
    /// Events counted since the current programming began (guest writes
    /// of the value do not change it): what retires into the totals.
    pub counted: u64,
    /// The counter ran with the current programming.
    pub ran: bool,
    /// The host refuses to back this counter (survives reprogramming and
    /// resets: it is about the host, not the programming).
    pub failure: Option<Failure>,
}

impl<H> Counter<H> {
    pub(super) fn new(kind: CounterKind, index: usize, width: u8) -> Self {
        let bit = match kind {
            CounterKind::Gp => index,
            CounterKind::Fixed => 32 + index,
        };
        Self {
            kind,
            index,
            mask: crate::value::width_mask(width),
            status_bit: 1 << bit,
            select: 0,
            programming: 0,
            generation: 0,
            value: 0,
            running: false,
            backing: BackingState::Idle,
            host_count: 0,
            clock_ns: 0,
            carry: 0,
            armed: None,
            rearm: false,
            host_enabled: false,
            arm_at_entry: false,
            time_enabled: 0,
            time_running: 0,
            overflows: 0,
            pmis: 0,
            counted: 0,
            ran: false,
            failure: None,
        }
    }
}
