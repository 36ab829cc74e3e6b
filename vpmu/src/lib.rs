//! A userspace virtual PMU for a KVM VMM. It knows nothing of KVM: register
//! models, MSR semantics, CPUID leaves, counter arithmetic, host backing
//! through a [`Backend`] (real: [`backend::perf::PerfBackend`], tests:
//! [`backend::fake::FakeBackend`]), event policy, context save/restore and
//! export snapshots.
//!
//! # Set-up (per VM, then per vCPU)
//! 1. Pick a [`PmuModel`]: [`PmuModel::best_for_host`] (with
//!    [`HostFacts::detect`] or facts from KVM), trimmed with
//!    [`PmuModel::with_gp_counters`], [`PmuModel::with_fixed_counters`],
//!    [`PmuModel::with_version`] …, then [`PmuModel::validate`]. No model
//!    means no PMU at all.
//! 2. CPUID: make sure every leaf of [`cpuid::leaves_required`] exists, then
//!    run [`cpuid::apply`] on every entry (`None` advertises no PMU).
//! 3. MSR filter: trap every range of [`PmuModel::msr_ranges`] and route the
//!    exits to the vCPU's [`Vpmu::rdmsr`] / [`Vpmu::wrmsr`]; an `Err`
//!    ([`Fault`]) is a #GP (set the exit's error flag).
//! 4. Event policy: parse `--vpmu-events` into an [`EventPolicy`] (grammar
//!    in [`policy`]). [`EventPolicy::intel_unavailable_events`] gives the
//!    matching CPUID mask for [`PmuModel::with_intel_unavailable_events`].
//! 5. On the vCPU thread: `PerfBackend::new(tid)` (0 = calling thread),
//!    [`Backend::set_overflow_notify`] with that tid and the signal the VMM
//!    handles, then [`Vpmu::new`] with the guest TSC rate ([`GuestClock`]).
//!
//! # The vCPU loop
//! - Right before `KVM_RUN`: [`Vpmu::on_guest_entry`]. Right after it
//!   returns, whatever the reason: [`Vpmu::on_guest_exit`]. Both do nothing
//!   (one branch) unless a counter backed by the host task-clock runs, then
//!   one `read()` at the exit and at most one at the entry: task-clock
//!   cannot tell guest from host, so only the time between entry and exit
//!   is credited. The entry needs no read when [`Backend::schedule_epoch`]
//!   shows the thread kept its CPU since the exit's read (the perf backend
//!   reads it from the event's mmap page): the reference then advanced by
//!   the wall time since. [`Vpmu::exit_hooks_needed`] says whether they
//!   have work; calling them always is fine.
//! - `KVM_RUN` interrupted (`EINTR`) by the overflow signal, or any time:
//!   [`Vpmu::handle_host_overflow`]. It updates the counters and sets the
//!   status bits of those that really overflowed; the host events whose
//!   period elapsed are re-armed by the next [`Vpmu::on_guest_entry`], after
//!   the VMM delivered the PMI (so [`Vpmu::exit_hooks_needed`] is true
//!   until then).
//! - After an MSR exit and after [`Vpmu::handle_host_overflow`]:
//!   [`Vpmu::take_pending_pmi`]; when true, deliver a PMI through the
//!   guest's LVTPC (the VMM owns the APIC side).
//! - Where KVM's in-kernel PMU serves guest RDPMC, mirror
//!   [`Vpmu::counter_values`] into it after PMU MSR exits and before PMIs.
//!
//! # Pause, context switches, reset, export
//! - Pausing needs no call: hardware events count guest mode only
//!   (`exclude_host`) and clock-backed counters advance only between entry
//!   and exit, so paused time is never counted as long as the VMM calls
//!   [`Vpmu::on_guest_exit`] when `KVM_RUN` returns.
//! - [`Vpmu::save`] gives a plain [`VpmuContext`] (every register, value and
//!   generation); [`Vpmu::restore`] loads one. Counters whose programming
//!   equals the one open on the host keep their host event: an equivalent
//!   restore opens and closes nothing ([`VpmuStats::restores_equivalent`]).
//! - [`Vpmu::reset`] returns to the power-on state (guest reset).
//! - Totals that outlive contexts: each counter counts per programming
//!   (`counted` in its snapshot, unchanged by guest writes of the value).
//!   When a programming ends (new programming, reset, restore of another
//!   one) its final count is queued as a [`Retired`] entry; drain them with
//!   [`Vpmu::take_retired`] after `wrmsr`, `restore` and `reset` and merge
//!   them into [`EventTotals`] by [`ProgrammingId`] (module [`totals`]).
//! - [`Vpmu::snapshot`] gives a [`VpmuSnapshot`] for the export: every
//!   counter decoded, valued, and how it is backed ([`Backing`]), with the
//!   host's enabled/running times and [`VpmuStats`].
//!
//! # Host backing: stop and start, never release
//! One host event per (counter, programming), opened when the counter
//! first runs: a raw hardware event (`exclude_host`, `pinned`, USR/OS as
//! `exclude_user`/`exclude_kernel`), or where the host has no hardware
//! events the host task-clock for cycle events (AMD 0x76, Intel 0x3C/0x00,
//! 0x3C/0x01 and fixed counters 1 and 2, in guest TSC cycles); every other
//! event is unbacked with its reason. The programming is the event, unit
//! mask, edge, invert, counter mask and ring levels; EN, INT, global
//! enables, counter writes, PMIs, exits, pause and restore only start,
//! stop, read or re-arm. A task-clock event only notifies overflows (the
//! counts come from the guest-time reference), so it stays enabled when
//! its counter stops and is disabled at the next overflow signal if the
//! counter still stands: stop and start cost no ioctl; and at the signal
//! of a counter that just wrapped the re-arm waits (the guest's PMI
//! handler rewrites the counter, which re-arms it). Clearing both ring levels only disables (Linux
//! disables fixed counters that way). Each counter's generation moves on
//! exactly when its programming changes.
//!
//! When the host refuses an open (no free counter, no descriptor left, no
//! permission: any error but "no hardware events at all"), or an open
//! event fails later, the counter is unbacked with the host's reason and
//! counts nothing; the guest keeps running. The same programming is tried
//! again when the counter starts or is read, at most once per retry
//! interval ([`Vpmu::with_retry_interval`]), and every new programming is
//! tried at once. Each episode gives one [`BackingNotice`] when it starts
//! and one when an open succeeds again ([`Vpmu::take_notices`]: the VMM
//! logs them), never one per attempt. "No hardware events" (ENOENT from a
//! hardware event) is believed for [`HARDWARE_RECHECK`]: meanwhile core
//! cycles use the task-clock.
//!
//! Every counter's host event is armed with its distance to overflow;
//! periods below [`Limits`] (per vCPU: shared by its running counters)
//! are raised ([`VpmuStats::throttles`]), so a guest period of 1 on every
//! counter cannot flood the vCPU thread with signals. Clock
//! events are armed earlier by the host's usual timer lateness, learnt from
//! how far past their overflow recent signals found counters
//! ([`VpmuStats::clock_lead_ns`]); a signal that comes early only re-arms.
//!
//! # Register semantics
//! Intel: reserved bits and writes to read-only registers fault, legacy
//! `IA32_PMCx` writes sign-extend bit 31, `IA32_A_PMCx` writes above the
//! width fault, AnyThread is valid from version 3. AMD (per the PPRs and
//! KVM's svm/pmu.c): writes drop reserved bits and writes to
//! `GLOBAL_STATUS` are ignored (Linux writes all ones to
//! `GLOBAL_STATUS_CLR`); only MSRs outside the model fault; GuestOnly and
//! HostOnly are kept but do not change counting (the guest has no SVM).
//! Counter values wrap at their width; each wrap is an overflow that sets
//! the global status bit (models with global registers) and, with INT or
//! the fixed PMI bit, a pending PMI.

pub mod backend;
pub mod clock;
pub mod context;
pub mod cpuid;
pub mod evtsel;
pub mod model;
pub mod msr;
pub mod policy;
pub mod snapshot;
pub mod stats;
pub mod totals;
mod value;
mod vendor;
mod vpmu;

pub use backend::{Backend, BackendError, EventSource, EventSpec, OverflowNotify, Reading};
pub use clock::GuestClock;
pub use context::{ContextError, VpmuContext};
pub use cpuid::CpuidRegs;
pub use model::{HostCpuid, HostFacts, ModelError, MsrRange, PmuModel, Vendor};
pub use policy::{EventPolicy, PolicyError, Preset};
pub use snapshot::{Backing, BackingNotice, CounterKind, CounterSnapshot, VpmuSnapshot};
pub use stats::{MsrAccessCounts, RegisterKind, VpmuStats};
pub use totals::{EventTotal, EventTotals, ProgrammingId, Retired};
pub use vpmu::{
    Fault, Limits, Vpmu, DEFAULT_RETRY_INTERVAL, HARDWARE_RECHECK, MAX_NOTICES, MAX_RETIRED,
};
