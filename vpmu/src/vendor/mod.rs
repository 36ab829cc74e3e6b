//! Vendor specifics behind one small table of operations, as Linux splits
//! `arch/x86/kvm/pmu.c` (generic) from `svm/pmu.c` and `vmx/pmu_intel.c`.
//!
//! A vendor answers questions about a [`PmuModel`] (which register an MSR
//! is, which bits are valid, what CPUID says); the generic core in
//! [`crate::vpmu`] owns all state and behaviour. The model's methods that
//! apply a vendor's rules (`best_for_host`, `shaped`, `validate`,
//! `msr_ranges`) are written here, above [`crate::model`]'s data.

mod amd;
mod intel;

use crate::evtsel::{self, EventCode};
use crate::model::{
    merge_ranges, HostFacts, ModelError, MsrRange, PmuModel, VendorFeatures, MODEL_FORMAT,
};
use crate::x86::{CpuidRegs, Leaf, Vendor};

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

impl Vendor {
    /// Whether this vendor's local APIC masks LVTPC when it delivers a PMI
    /// (Intel; the guest's handler unmasks it), so a VMM delivering PMIs
    /// must mask it too.
    pub fn masks_lvtpc_on_pmi(self) -> bool {
        ops(self).masks_lvtpc_on_pmi()
    }
}

/// The model's methods that apply its vendor's rules (the data and what
/// follows from it alone are in [`crate::model`]).
impl PmuModel {
    /// The best model this host can back for a guest of `vendor`.
    ///
    /// With hardware events and host CPUID, the host's PMU is mirrored
    /// (clamped to what this crate models). Without hardware events every
    /// counter is emulated anyway (only clock events are backed, by
    /// task-clock), so the richest model the Linux drivers handle best is
    /// chosen: AMD PerfMonV2 with 6 counters (one exit disables them all),
    /// Intel v4 with 4 + 3 counters and full-width writes.
    pub fn best_for_host(vendor: Vendor, host: &HostFacts) -> Self {
        ops(vendor).best_for_host(host)
    }

    /// The model with a user's overrides of version and counter counts,
    /// under the vendor's rules for what they imply (e.g. AMD's 4 legacy
    /// counters). Fixed counters on AMD are an error (0 is no override);
    /// check the result with [`PmuModel::validate`].
    pub fn shaped(
        self,
        version: Option<u8>,
        gp_counters: Option<u8>,
        fixed_counters: Option<u8>,
    ) -> Result<Self, ModelError> {
        let mut model = self;
        if let Some(v) = version {
            model = model.with_version(v);
            // Fixed counters came with Intel's version 2: an older model
            // has none unless they are asked for (which `validate` refuses).
            if let (VendorFeatures::Intel(features), true) = (&mut model.features, v < 2) {
                *features = features.with_fixed_counters(0);
            }
        }
        if let Some(n) = gp_counters {
            model = ops(model.vendor()).with_gp_counters(model, n);
        }
        match (&mut model.features, fixed_counters) {
            (_, None) | (VendorFeatures::Amd(_), Some(0)) => {}
            (VendorFeatures::Intel(features), Some(n)) => {
                *features = features.with_fixed_counters(n)
            }
            (VendorFeatures::Amd(_), Some(count)) => {
                return Err(ModelError::FixedCounters {
                    vendor: Vendor::Amd,
                    version: model.version,
                    count,
                    why: "AMD has no fixed counters",
                })
            }
        }
        Ok(model)
    }

    /// Checks that real hardware of this vendor could look like this.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.format != MODEL_FORMAT {
            return Err(ModelError::Format(self.format));
        }
        ops(self.vendor()).validate(self)
    }

    /// The MSR ranges this model owns: trap them all (KVM MSR filter) and
    /// route their exits to [`crate::Vpmu::rdmsr`]/[`crate::Vpmu::wrmsr`].
    pub fn msr_ranges(&self) -> Vec<MsrRange> {
        merge_ranges(ops(self.vendor()).msr_ranges(self))
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

/// Index of `msr` in `[base, base + count)`.
pub(crate) fn index_in(msr: u32, base: u32, count: usize) -> Option<usize> {
    let offset = msr.wrapping_sub(base) as usize;
    (offset < count).then_some(offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AmdFeatures, IntelFeatures};

    const CORE: AmdFeatures = AmdFeatures { perfctr_core: true };

    /// Every shape the CLI can ask for: each vendor from its emulated best
    /// model, with every version, gp counter count and fixed counter count
    /// overridden (or not), kept if it validates.
    fn every_accepted_shape() -> Vec<PmuModel> {
        let mut shapes = Vec::new();
        for vendor in [Vendor::Amd, Vendor::Intel] {
            let best = PmuModel::best_for_host(vendor, &HostFacts::default());
            for version in [None, Some(1), Some(2), Some(3), Some(4)] {
                for gp in std::iter::once(None).chain((1..=8).map(Some)) {
                    for fixed in std::iter::once(None).chain((0..=3).map(Some)) {
                        let shaped = best.clone().shaped(version, gp, fixed);
                        shapes.extend(shaped.ok().filter(|m| m.validate().is_ok()));
                    }
                }
            }
        }
        shapes
    }

    /// The vendor's whole architectural PMU range, as the manuals list it.
    fn architectural_msrs(vendor: Vendor) -> Vec<u32> {
        match vendor {
            Vendor::Intel => [
                0xC1..=0xC8,
                0x186..=0x18D,
                0x309..=0x30C,
                0x345..=0x345,
                0x38D..=0x392,
                0x4C1..=0x4C8,
            ]
            .into_iter()
            .flatten()
            .collect(),
            Vendor::Amd => [
                0xC001_0000..=0xC001_0007,
                0xC001_0200..=0xC001_020B,
                0xC000_0300..=0xC000_0303,
            ]
            .into_iter()
            .flatten()
            .collect(),
        }
    }

    #[test]
    fn the_filter_covers_the_whole_architectural_range_whatever_the_shape() {
        let shapes = every_accepted_shape();
        // Both vendors, every Intel gp count and every fixed count.
        for (vendor, gp, fixed) in [(Vendor::Intel, 1, 0), (Vendor::Intel, 8, 3)] {
            assert!(shapes
                .iter()
                .any(|m| (m.vendor(), m.gp_counters, m.fixed_counters()) == (vendor, gp, fixed)));
        }
        assert!(shapes
            .iter()
            .any(|m| m.vendor() == Vendor::Amd && m.version == 1));
        assert!(shapes.len() > 100, "{}", shapes.len());
        for model in &shapes {
            let ranges = model.msr_ranges();
            for msr in architectural_msrs(model.vendor()) {
                // Trapped: what the model lacks then faults in the vPMU
                // (`decode` gives no register), never in KVM's own way.
                assert!(
                    ranges.iter().any(|r| r.contains(msr)),
                    "{msr:#x} is not trapped for {model:?}: {ranges:x?}"
                );
            }
            // Nothing of the other vendor's range is taken from KVM.
            let other = match model.vendor() {
                Vendor::Amd => Vendor::Intel,
                Vendor::Intel => Vendor::Amd,
            };
            for msr in architectural_msrs(other) {
                assert!(!ranges.iter().any(|r| r.contains(msr)), "{msr:#x}");
            }
            // Every register the model has lies in the range.
            let ops = ops(model.vendor());
            let decoded = |lo: u32, hi: u32| (lo..hi).filter(|&m| ops.decode(model, m).is_some());
            let all: Vec<u32> = decoded(0, 0x1000)
                .chain(decoded(0xC000_0000, 0xC000_1000))
                .chain(decoded(0xC001_0000, 0xC001_1000))
                .collect();
            let arch = architectural_msrs(model.vendor());
            assert!(all.iter().all(|m| arch.contains(m)), "{model:?}: {all:x?}");
        }
    }

    #[test]
    fn vendor_rules_shape_the_users_overrides() {
        // AMD: 4 or fewer counters at version 1 are the legacy PMU, 6 keep
        // PerfCtrExtCore.
        let amd = PmuModel::new(2, 6, 48, CORE);
        let legacy = amd.clone().shaped(Some(1), Some(4), None).unwrap();
        assert_eq!(legacy.amd(), Some(&AmdFeatures::default()));
        assert!(legacy.validate().is_ok(), "{legacy:?}");
        let ext = amd.clone().shaped(Some(1), Some(6), Some(0)).unwrap();
        assert_eq!((ext.amd(), ext.gp_counters), (Some(&CORE), 6));
        // AMD has no fixed counters to give.
        let error = amd.shaped(None, None, Some(1)).unwrap_err();
        assert!(error.to_string().contains("no fixed counters"), "{error}");
        // Intel: counts are taken as given.
        let intel = PmuModel::new(4, 8, 48, IntelFeatures::default())
            .shaped(Some(2), Some(2), Some(3))
            .unwrap();
        assert_eq!(
            (intel.version, intel.gp_counters, intel.fixed_counters()),
            (2, 2, 3)
        );
        assert_eq!(intel.fixed_width(), 48);
        // Version 1 drops the fixed counters it cannot have, unless asked.
        let v4 = PmuModel::new(4, 4, 48, IntelFeatures::default().with_fixed_counters(3));
        let v1 = v4.clone().shaped(Some(1), None, None).unwrap();
        assert_eq!(v1.fixed_counters(), 0);
        assert!(v1.validate().is_ok(), "{v1:?}");
        assert!(v4
            .shaped(Some(1), None, Some(3))
            .unwrap()
            .validate()
            .is_err());
    }
}
