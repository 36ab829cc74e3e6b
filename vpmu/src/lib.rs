//! A userspace virtual PMU for a KVM VMM, without KVM: the guest-visible
//! [`PmuModel`], the PMU MSRs' semantics, CPUID leaves ([`cpuid`]), host
//! backing through a [`Backend`] ([`backend::perf::PerfBackend`];
//! [`backend::fake::FakeBackend`] for tests), an [`EventPolicy`], context
//! save/restore and export snapshots. How it works inside is described in
//! `ARCHITECTURE.md` at the repository root. How counters are numbered
//! (MSR index, index within their kind, slot in the [`Vpmu`], global
//! control/status bit, RDPMC index) is defined once, in [`msr`].
//!
//! # Set-up (per VM, then per vCPU)
//! 1. Model: [`PmuModel::best_for_host`] (with [`HostFacts`] from
//!    [`backend::perf::PerfBackend::probe_hardware`] and
//!    [`HostCpuid::detect`], or from KVM), a user's overrides with
//!    [`PmuModel::shaped`], the events the policy denies with
//!    [`PmuModel::with_unavailable_events`], then [`PmuModel::validate`].
//!    No model means no PMU at all.
//! 2. CPUID: make sure every leaf of [`cpuid::leaves_required`] exists, then
//!    run [`cpuid::apply`] on every entry (`None` advertises no PMU).
//! 3. MSR filter: trap every range of [`PmuModel::msr_ranges`] and route the
//!    exits to the vCPU's [`Vpmu::rdmsr`] / [`Vpmu::wrmsr`]; an `Err`
//!    ([`Fault`]) is a #GP (set the exit's error flag).
//! 4. On the vCPU thread: `PerfBackend::new(tid)` (0 = calling thread),
//!    [`Backend::set_overflow_notify`] with that tid and the signal the VMM
//!    handles, then [`Vpmu::new`] with the model, the [`EventPolicy`]
//!    (`--vpmu-events`) and the guest TSC rate ([`GuestClock`]).
//!
//! # The vCPU loop
//! - Right before `KVM_RUN`: [`Vpmu::on_guest_entry`]. Right after it
//!   returns, whatever the reason: [`Vpmu::on_guest_exit`]. They have work
//!   only while [`Vpmu::exit_hooks_needed`]; calling them always is fine.
//! - When `KVM_RUN` was interrupted (`EINTR`) by the overflow signal, or
//!   any time: [`Vpmu::handle_host_overflow`]. Before it, if the guest ran
//!   until the signal and [`Vpmu::samples_guest_mode`]: the guest's
//!   privilege level then to [`Vpmu::observe_guest_mode`] (user-only and
//!   kernel-only counts on the task clock are estimated from them).
//! - After an MSR exit and after [`Vpmu::handle_host_overflow`]:
//!   [`Vpmu::take_pending_pmi`]; when true, deliver a PMI through the
//!   guest's LVTPC (the VMM owns the APIC side).
//! - After [`Vpmu::wrmsr`], [`Vpmu::restore`] and [`Vpmu::reset`]:
//!   [`Vpmu::take_retired`], merged into [`EventTotals`]; now and then
//!   [`Vpmu::take_notices`] for the log.
//! - Where KVM's in-kernel PMU serves guest RDPMC, mirror
//!   [`Vpmu::counter_values`] into it after PMU MSR exits and before PMIs.
//!
//! # Pause, context switch, reset, export
//! Pausing needs no call: paused time is never counted as long as
//! [`Vpmu::on_guest_exit`] runs when `KVM_RUN` returns. [`Vpmu::save`] and
//! [`Vpmu::restore`] move a plain [`VpmuContext`] (an equivalent restore
//! opens and closes nothing); [`Vpmu::reset`] is the power-on state;
//! [`Vpmu::snapshot`] gives the export's [`VpmuSnapshot`].

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
mod x86;

pub use backend::{Backend, BackendError, EventSource, EventSpec, OverflowNotify, Reading};
pub use clock::GuestClock;
pub use context::{ContextError, VpmuContext};
pub use cpuid::CpuidRegs;
pub use model::{
    AmdFeatures, HostCpuid, HostFacts, IntelFeatures, ModelError, MsrRange, PmuModel, Vendor,
    VendorFeatures,
};
pub use policy::{EventPolicy, PolicyError, Preset};
pub use snapshot::{Backing, BackingNotice, CounterKind, CounterSnapshot, GuestMode, VpmuSnapshot};
pub use stats::{MsrAccessCounts, VpmuStats};
pub use totals::{EventTotal, EventTotals, ProgrammingId, Retired};
pub use vpmu::{
    Fault, Limits, Vpmu, DEFAULT_RETRY_INTERVAL, HARDWARE_RECHECK, MAX_NOTICES, MAX_RETIRED,
};
