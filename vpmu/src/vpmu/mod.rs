//! The generic core: one vCPU's virtual PMU.

mod counter;
mod host;
mod registers;
mod state;

use std::time::{Duration, Instant};

use thiserror::Error;

use crate::backend::Backend;
use crate::clock::GuestClock;
use crate::evtsel::{self, EventCode, ANY, EN, INT, OS, USR};
use crate::model::{ModelError, PmuModel, Vendor};
use crate::policy::EventPolicy;
use crate::snapshot::{BackingNotice, CounterKind, GuestMode};
use crate::stats::VpmuStats;
use crate::totals::{ProgrammingId, Retired};
use crate::vendor::{self, Layout, VendorOps};

use counter::Counter;

/// The programming `select` asks the host for. Selecting no privilege
/// level only disables the counter (Linux disables fixed counters by
/// clearing theirs), so the last levels are kept from `previous`.
fn programming(select: u64, previous: u64) -> u64 {
    let levels = match select & (USR | OS) {
        0 => previous & (USR | OS),
        levels => levels,
    };
    select & evtsel::PROGRAMMING_BITS & !(USR | OS) | levels
}

/// A guest MSR access that real hardware answers with #GP. The VMM sets
/// the exit's error flag; the reason is for logs only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum Fault {
    /// The MSR is not a register of this model.
    #[error("#GP: MSR {0:#x} is not a register of this PMU model")]
    NotInModel(u32),
    /// The write sets reserved bits.
    #[error("#GP: writing {value:#x} to MSR {msr:#x} sets reserved bits {reserved:#x}")]
    ReservedBits {
        /// MSR.
        msr: u32,
        /// Written value.
        value: u64,
        /// The reserved bits it sets.
        reserved: u64,
    },
    /// The MSR is read-only.
    #[error("#GP: MSR {0:#x} is read-only")]
    ReadOnly(u32),
}

/// Lower bounds on host sample periods, so that a guest programming a tiny
/// period cannot flood its vCPU thread with signals (like perf's
/// `perf_event_max_sample_rate`). The bounds are per vCPU: with n counters
/// running, each is armed at no less than n times the bound. Each clamp
/// counts in [`VpmuStats::throttles`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Smallest period of a hardware event, in events.
    pub min_hardware_period: u64,
    /// Smallest period of a clock event, in ns.
    pub min_clock_period_ns: u64,
    /// Period of a clock event that backs a user-only or kernel-only
    /// count, in ns: the guest's privilege level is sampled at its signals
    /// (see [`Vpmu::observe_guest_mode`]), and such a counter overflows at
    /// the first sample in its mode past its overflow.
    pub mode_sample_ns: u64,
}

impl Default for Limits {
    /// 100 000 events (about 30 us at 3 GHz) and 50 us: at most about
    /// 20 000-30 000 overflow signals per second and vCPU. Privilege levels
    /// sampled every 1 ms of guest time: 1 000 samples a second
    /// (each costs an exit and a register read), a share's standard error
    /// under 1.6 points over a second of running.
    fn default() -> Self {
        Self {
            min_hardware_period: 100_000,
            min_clock_period_ns: 50_000,
            mode_sample_ns: 1_000_000,
        }
    }
}

/// Guest time measured by the entry/exit hooks, from one task-clock event
/// per vCPU: clock-backed counters advance by it.
#[derive(Clone, Copy, Debug)]
struct GuestTime<H> {
    reference: Option<H>,
    /// Guest nanoseconds up to the last exit.
    accumulated_ns: u64,
    /// Reference count at the last entry.
    entry_ns: u64,
    in_guest: bool,
    /// The reference's last value, taken at an entry or an exit.
    last: Option<ReferenceValue>,
    /// Guest nanoseconds attributed to each mode by sampled privilege
    /// levels ([`Vpmu::observe_guest_mode`]): user, kernel.
    by_mode_ns: [u64; 2],
    /// Guest nanoseconds up to the last sample (or the start of sampling):
    /// what comes after is attributed by the next sample.
    attributed_ns: u64,
}

impl<H> GuestTime<H> {
    fn in_mode(&self, mode: GuestMode) -> u64 {
        self.by_mode_ns[mode as usize]
    }
}

/// A value of the guest-time reference: with the host's schedule epoch
/// unchanged later, the thread stayed on its CPU in between, so the
/// reference has advanced by exactly the wall time since and needs no
/// host read.
#[derive(Clone, Copy, Debug)]
struct ReferenceValue {
    value: u64,
    epoch: Option<u32>,
    at: Instant,
    /// Values estimated in a row since the last read.
    estimates: u32,
}

/// How late the host's clock events fire. A task-clock event's overflow
/// comes from a host timer, whose interrupt and signal reach the vCPU
/// thread some time after the period elapsed (about 20-30 us on the nested
/// development hosts, a few us on bare metal): the virtual counter has run
/// past its overflow by then. Clock events are armed earlier by the
/// smallest lateness seen in the last few signals, less a margin, so that
/// they fire about on time; a lead too large only makes a signal early,
/// which re-arms without a PMI and lowers the lead (an early signal
/// counts as a lateness of at most the lead less the distance left).
#[derive(Clone, Copy, Debug, Default)]
struct ClockLead {
    samples: [u64; CLOCK_LEAD_SAMPLES],
    seen: usize,
}

const CLOCK_LEAD_SAMPLES: usize = 8;
/// Kept below the smallest lateness seen.
const CLOCK_LEAD_MARGIN_NS: u64 = 3_000;
/// Never more, whatever the host's timers do.
const CLOCK_LEAD_MAX_NS: u64 = 200_000;

impl ClockLead {
    /// An overflow seen `late_ns` after the clock event's period would have
    /// elapsed without lead.
    fn observe(&mut self, late_ns: u64) {
        self.samples[self.seen % CLOCK_LEAD_SAMPLES] = late_ns;
        self.seen += 1;
    }

    fn lead_ns(&self) -> u64 {
        if self.seen < CLOCK_LEAD_SAMPLES {
            return 0;
        }
        let smallest = self.samples.iter().copied().min().unwrap_or(0);
        smallest
            .saturating_sub(CLOCK_LEAD_MARGIN_NS)
            .min(CLOCK_LEAD_MAX_NS)
    }
}

/// Estimated reference values in a row before a host read anyway (bounds
/// any drift between the wall clock and the host's task-clock).
const MAX_ESTIMATES: u32 = 1024;

/// One vCPU's virtual PMU.
///
/// See the crate documentation for what the VMM calls when.
pub struct Vpmu<B: Backend> {
    model: PmuModel,
    ops: &'static dyn VendorOps,
    layout: Layout,
    /// What each fixed counter counts.
    fixed_events: &'static [EventCode],
    policy: EventPolicy,
    backend: B,
    clock: GuestClock,
    limits: Limits,
    event_selects: Vec<u64>,
    fixed_ctrl: u64,
    global_ctrl: u64,
    global_status: u64,
    counters: Vec<Counter<B::Handle>>,
    guest_time: GuestTime<B::Handle>,
    /// Some clock-backed counter runs: the entry/exit hooks have work.
    clock_running: bool,
    /// Some running clock-backed counter counts one guest mode: the VMM
    /// samples the guest's privilege level at signals.
    mode_sampling: bool,
    /// Some counter waits for its re-arm at the next entry.
    arms_pending: bool,
    clock_lead: ClockLead,
    pending_pmi: bool,
    /// Why hardware events cannot be opened, once the host said so.
    no_hardware: Option<String>,
    /// When the host said so (the verdict is checked again after
    /// [`HARDWARE_RECHECK`]).
    no_hardware_since: Option<Instant>,
    /// Ended counter contexts the VMM has not taken yet, one per id.
    retired: Vec<Retired>,
    /// Shortest time between two attempts to open a refused programming.
    retry_interval: Duration,
    /// Backing changes the VMM has not taken yet.
    notices: Vec<BackingNotice>,
    stats: VpmuStats,
}

/// How long "the host has no hardware events" (ENOENT from a hardware
/// event) is believed before a new programming tries hardware again.
pub const HARDWARE_RECHECK: Duration = Duration::from_secs(10);

/// Default of [`Vpmu::with_retry_interval`].
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Notices [`Vpmu::take_notices`] holds between two calls; more are
/// dropped (and counted in [`VpmuStats::notices_dropped`]).
pub const MAX_NOTICES: usize = 64;

/// Distinct programming ids [`Vpmu::take_retired`] holds between two
/// calls; contexts of further ids are dropped (and counted).
pub const MAX_RETIRED: usize = 64;

impl<B: Backend> Vpmu<B> {
    /// A vPMU in its power-on state. Fails when the model is invalid.
    pub fn new(
        model: PmuModel,
        policy: EventPolicy,
        backend: B,
        clock: GuestClock,
    ) -> Result<Self, ModelError> {
        model.validate()?;
        let ops = vendor::ops(model.vendor());
        let layout = ops.layout(&model);
        let fixed_events = vendor::fixed_events(&model);
        let gp = (0..model.gp_counters as usize)
            .map(|i| Counter::new(CounterKind::Gp, i, model.gp_width));
        let fixed = (0..fixed_events.len())
            .map(|i| Counter::new(CounterKind::Fixed, i, model.fixed_width()));
        let counters = gp.chain(fixed).collect();
        let mut vpmu = Self {
            event_selects: vec![0; model.gp_counters as usize],
            model,
            ops,
            layout,
            fixed_events,
            policy,
            backend,
            clock,
            limits: Limits::default(),
            fixed_ctrl: 0,
            global_ctrl: layout.global_ctrl_reset,
            global_status: 0,
            counters,
            guest_time: GuestTime {
                reference: None,
                accumulated_ns: 0,
                entry_ns: 0,
                in_guest: false,
                last: None,
                by_mode_ns: [0; 2],
                attributed_ns: 0,
            },
            clock_running: false,
            mode_sampling: false,
            arms_pending: false,
            clock_lead: ClockLead::default(),
            pending_pmi: false,
            no_hardware: None,
            no_hardware_since: None,
            retired: Vec::new(),
            retry_interval: DEFAULT_RETRY_INTERVAL,
            notices: Vec::new(),
            stats: VpmuStats::default(),
        };
        for i in 0..vpmu.counters.len() {
            let select = vpmu.effective_select(i);
            vpmu.counters[i].select = select;
            vpmu.counters[i].programming = programming(select, 0);
        }
        Ok(vpmu)
    }

    /// Tells the vPMU the vendor of the PMU host perf drives (`None`:
    /// neither AMD nor Intel). A model of another vendor never opens raw
    /// hardware events, whose codes mean other events on the host's PMU: its
    /// clock events are counted by the host task-clock, the rest is
    /// unbacked with the reason. Without this call the host is taken to
    /// be of the model's vendor.
    pub fn with_host_vendor(mut self, host: Option<Vendor>) -> Self {
        if host != Some(self.model.vendor()) {
            self.no_hardware = Some(format!(
                "the guest's {:?} event codes mean other events on this host's PMU",
                self.model.vendor()
            ));
            // Never rechecked: the vendors will not change.
            self.no_hardware_since = None;
        }
        self
    }

    /// Replaces the sample period limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Replaces the shortest time between two attempts to open a
    /// programming the host refused ([`DEFAULT_RETRY_INTERVAL`]). A new
    /// programming is always tried at once.
    pub fn with_retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// Takes the backing changes since the last call: a counter the host
    /// stopped backing, or backs again. One notice per change, never one
    /// per attempt; the VMM logs them.
    pub fn take_notices(&mut self) -> Vec<BackingNotice> {
        std::mem::take(&mut self.notices)
    }

    /// Whether [`Vpmu::take_notices`] has anything (cheap).
    pub fn has_notices(&self) -> bool {
        !self.notices.is_empty()
    }

    /// The model.
    pub fn model(&self) -> &PmuModel {
        &self.model
    }

    /// The event policy.
    pub fn policy(&self) -> &EventPolicy {
        &self.policy
    }

    /// Statistics so far.
    pub fn stats(&self) -> &VpmuStats {
        &self.stats
    }

    /// Counts on from `stats` (a restored vPMU carries its saved ones).
    pub fn carry_stats(&mut self, stats: VpmuStats) {
        self.stats = stats;
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably (tests script a fake through it).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Generation of counter `counter` (general-purpose first, then fixed).
    pub fn generation(&self, counter: usize) -> Option<u64> {
        self.counters.get(counter).map(|c| c.generation)
    }

    /// True while a counter backed by the host clock runs: only then do
    /// [`Vpmu::on_guest_entry`] and [`Vpmu::on_guest_exit`] have work.
    pub fn exit_hooks_needed(&self) -> bool {
        self.clock_running || self.guest_time.in_guest || self.arms_pending
    }

    /// True while a running counter counts only guest user or only guest
    /// kernel time on the task clock: then, whenever a signal interrupted
    /// the guest (`KVM_RUN` returned `EINTR`), the VMM reads the guest's
    /// privilege level and passes it to [`Vpmu::observe_guest_mode`]
    /// before [`Vpmu::handle_host_overflow`]. Such counters' clock events
    /// fire every [`Limits::mode_sample_ns`] of guest time, so
    /// the samples are spread evenly over the guest's time.
    pub fn samples_guest_mode(&self) -> bool {
        self.mode_sampling
    }

    /// The guest was in `mode` when a signal interrupted it: the guest time
    /// since the last sample is attributed to that mode. The signals come
    /// from host timers (clock events, kicks), which fire whatever mode the
    /// guest is in, so each mode's share of the samples estimates its share
    /// of the guest's time. Ignored inside the guest and while no counter
    /// needs it.
    pub fn observe_guest_mode(&mut self, mode: GuestMode) {
        if !self.mode_sampling || self.guest_time.in_guest {
            return;
        }
        let time = &mut self.guest_time;
        let since = time.accumulated_ns.saturating_sub(time.attributed_ns);
        time.by_mode_ns[mode as usize] += since;
        time.attributed_ns = time.accumulated_ns;
        self.stats.mode_samples += 1;
        self.stats.mode_samples_user += (mode == GuestMode::User) as u64;
    }

    /// True while any counter runs, whatever backs it: the counters' values
    /// change under the guest, so a VMM that mirrors them for guest RDPMC
    /// refreshes the mirror at every exit.
    pub fn any_running(&self) -> bool {
        self.counters.iter().any(|c| c.running)
    }

    /// Returns (and clears) whether the VMM must deliver a PMI through the
    /// guest's LVTPC.
    pub fn take_pending_pmi(&mut self) -> bool {
        let pending = std::mem::take(&mut self.pending_pmi);
        self.stats.pmis += pending as u64;
        pending
    }

    /// Takes the counter contexts that ended since the last call (a new
    /// programming, a reset, a restore of another programming), each with
    /// its programming id and what it counted; contexts of the same id are
    /// merged. Contexts that never ran are not reported. The VMM merges
    /// them into its [`crate::EventTotals`]; call it after every
    /// [`Vpmu::wrmsr`], [`Vpmu::restore`] and [`Vpmu::reset`] (at most
    /// [`MAX_RETIRED`] ids are held in between).
    pub fn take_retired(&mut self) -> Vec<Retired> {
        std::mem::take(&mut self.retired)
    }

    /// Whether [`Vpmu::take_retired`] has anything (cheap).
    pub fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// Counter `i`'s context ends (its programming is about to change):
    /// record what it counted.
    fn retire(&mut self, i: usize) {
        let counter = &mut self.counters[i];
        let (ran, counted) = (counter.ran, counter.counted);
        counter.ran = false;
        counter.counted = 0;
        if !ran && counted == 0 {
            return;
        }
        self.stats.retired_contexts += 1;
        let id = ProgrammingId(counter.programming);
        if let Some(entry) = self.retired.iter_mut().find(|r| r.id == id) {
            entry.counted = entry.counted.saturating_add(counted);
            entry.contexts += 1;
        } else if self.retired.len() < MAX_RETIRED {
            self.retired.push(Retired {
                id,
                event_name: id.event_name(self.model.vendor()).map(Into::into),
                counted,
                contexts: 1,
            });
        } else {
            self.stats.retired_dropped += 1;
        }
    }

    /// Current value of every counter with its canonical MSR, general-purpose
    /// first: what the VMM mirrors into KVM so that guest RDPMC agrees.
    pub fn counter_values(&mut self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.sync_running();
        let (ops, model) = (self.ops, &self.model);
        self.counters.iter().map(move |c| {
            (
                ops.counter_msr(model, c.kind == CounterKind::Fixed, c.index),
                c.value,
            )
        })
    }

    /// The event select counter `i` acts on: the guest's for a
    /// general-purpose counter, synthesized from its `FIXED_CTR_CTRL` field
    /// for a fixed counter.
    fn effective_select(&self, i: usize) -> u64 {
        let counter = &self.counters[i];
        if counter.kind == CounterKind::Gp {
            return self.event_selects[counter.index];
        }
        let field = self.fixed_field(counter.index);
        let flags = [
            (0b0001, OS),
            (0b0010, USR),
            (0b0100, ANY),
            (0b1000, INT),
            (0b0011, EN),
        ];
        flags.iter().filter(|(bits, _)| field & bits != 0).fold(
            self.fixed_events[counter.index].to_select(),
            |sel, (_, flag)| sel | flag,
        )
    }

    fn fixed_field(&self, index: usize) -> u64 {
        (self.fixed_ctrl >> (4 * index)) & 0xF
    }

    /// Architecturally counting: enabled, some privilege level selected,
    /// and (with global registers) globally enabled.
    fn should_run(&self, i: usize, select: u64) -> bool {
        let counter = &self.counters[i];
        let global =
            !self.model.has_global_registers() || self.global_ctrl & counter.status_bit != 0;
        select & evtsel::EN != 0 && select & (USR | OS) != 0 && global
    }

    /// Brings counter `i` in line with the registers: a new programming
    /// releases the old backing and moves the generation on; enable
    /// changes only start or stop it.
    fn reconcile(&mut self, i: usize) {
        let select = self.effective_select(i);
        let programming = programming(select, self.counters[i].programming);
        if programming != self.counters[i].programming {
            self.stop(i);
            self.retire(i);
            self.release(i);
            self.counters[i].generation += 1;
            self.counters[i].programming = programming;
            self.stats.reprograms += 1;
        }
        self.counters[i].select = select;
        match (self.should_run(i, select), self.counters[i].running) {
            (true, false) => self.start(i),
            (false, true) => self.stop(i),
            _ => {}
        }
    }

    /// Recomputes whether the entry/exit hooks have work and whether the
    /// guest's mode is sampled.
    fn refresh_hooks(&mut self) {
        let mut running = self.counters.iter().filter(|c| c.running);
        self.clock_running = running.clone().any(|c| c.backing.is_clock());
        self.mode_sampling =
            running.any(|c| matches!(c.backing, counter::BackingState::Clock(_, Some(_))));
    }
}
