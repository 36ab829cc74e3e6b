//! Vendor specifics behind one small table of operations, as Linux splits
//! `arch/x86/kvm/pmu.c` (generic) from `svm/pmu.c` and `vmx/pmu_intel.c`.
//!
//! A vendor answers questions about a [`PmuModel`] (which register an MSR
//! is, which bits are valid, what CPUID says); the generic core in
//! [`crate::vpmu`] owns all state and behaviour.

mod amd;
mod intel;

use crate::cpuid::{CpuidRegs, Leaf};
use crate::evtsel::{self, EventCode};
use crate::model::{HostFacts, ModelError, MsrRange, PmuModel, Vendor, VendorFeatures};

/// How a counter MSR write turns the written value into a counter value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CounterWrite {
    /// Intel legacy `IA32_PMCx`: bits 31:0 sign-extended to the width.
    SignExtend32,
    /// Intel `IA32_A_PMCx`: the full width; bits above it fault.
    FullWidth,
    /// AMD counters and Intel fixed counters: truncated to the width.
    Truncate,
}

/// One PMU register, as the generic core sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Register {
    GpCounter(usize, CounterWrite),
    FixedCounter(usize),
    EventSelect(usize),
    FixedCtrl,
    GlobalStatus,
    GlobalCtrl,
    /// Intel `GLOBAL_OVF_CTRL`/`STATUS_RESET`, AMD `GLOBAL_STATUS_CLR`.
    GlobalStatusReset,
    GlobalStatusSet,
    GlobalInUse,
    PerfCapabilities,
}

/// What a write with reserved bits, or to a read-only register, does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReservedWrites {
    /// #GP (Intel).
    Fault,
    /// The reserved bits (or the whole write) are dropped (AMD PPR; KVM's
    /// svm/pmu.c and pmu.c do the same).
    Ignore,
}

/// Bit masks derived once from a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub evtsel_valid: u64,
    pub fixed_ctrl_valid: u64,
    /// Zero when the model has no global registers.
    pub global_ctrl_valid: u64,
    pub global_ctrl_reset: u64,
    /// Bits that STATUS_SET/STATUS_RESET may touch (counters and flags).
    pub status_valid: u64,
    pub reserved_writes: ReservedWrites,
    pub perf_capabilities: u64,
}

/// An event with a well-known name.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NamedEvent {
    pub code: EventCode,
    pub name: &'static str,
    /// Part of the "ipc" preset.
    pub ipc: bool,
    /// Counts core or reference clock cycles: task-clock can back it.
    pub clock: bool,
}

impl NamedEvent {
    const fn new(event: u16, umask: u8, name: &'static str, ipc: bool, clock: bool) -> Self {
        Self {
            code: EventCode::new(event, umask),
            name,
            ipc,
            clock,
        }
    }
}

/// The table of vendor operations.
pub(crate) trait VendorOps: Sync {
    fn validate(&self, model: &PmuModel) -> Result<(), ModelError>;
    fn best_for_host(&self, host: &HostFacts) -> PmuModel;
    fn msr_ranges(&self, model: &PmuModel) -> Vec<MsrRange>;
    fn decode(&self, model: &PmuModel, msr: u32) -> Option<Register>;
    fn layout(&self, model: &PmuModel) -> Layout;
    /// The MSR that holds gp counter `index` (`fixed == false`) or fixed
    /// counter `index`, for export and for mirroring values.
    fn counter_msr(&self, model: &PmuModel, fixed: bool, index: usize) -> u32;
    fn named_events(&self) -> &'static [NamedEvent];
    fn advertise(&self, model: &PmuModel, leaf: u32, subleaf: u32, regs: &mut CpuidRegs);
    fn required_leaves(&self, model: &PmuModel) -> &'static [Leaf];
    /// `model` with `count` general-purpose counters, under this vendor's
    /// rules for what that count implies.
    fn with_gp_counters(&self, model: PmuModel, count: u8) -> PmuModel {
        model.with_gp_counters(count)
    }
    /// Whether the local APIC masks LVTPC when it delivers a PMI.
    fn masks_lvtpc_on_pmi(&self) -> bool;
}

/// The operations of `vendor`.
pub(crate) fn ops(vendor: Vendor) -> &'static dyn VendorOps {
    match vendor {
        Vendor::Amd => &amd::Amd,
        Vendor::Intel => &intel::Intel,
    }
}

/// The events `model`'s fixed counters count, in counter order. Only
/// Intel has fixed counters.
pub(crate) fn fixed_events(model: &PmuModel) -> &'static [EventCode] {
    match &model.features {
        VendorFeatures::Intel(features) => intel::fixed_events(features),
        VendorFeatures::Amd(_) => &[],
    }
}

/// The well-known event `select` counts, if any.
pub(crate) fn named_event(vendor: Vendor, select: u64) -> Option<&'static NamedEvent> {
    if !evtsel::is_plain(select) {
        return None;
    }
    let code = evtsel::event_code(select);
    ops(vendor).named_events().iter().find(|e| e.code == code)
}

/// Whether task-clock can stand in for `select` (a plain clock event).
pub(crate) fn is_clock_event(vendor: Vendor, select: u64) -> bool {
    named_event(vendor, select).is_some_and(|e| e.clock)
}

/// `(1 << bits) - 1` without overflow at 64.
pub(crate) const fn low_bits(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Index of `msr` in `[base, base + count)`.
pub(crate) fn index_in(msr: u32, base: u32, count: usize) -> Option<usize> {
    let offset = msr.wrapping_sub(base) as usize;
    (offset < count).then_some(offset)
}
