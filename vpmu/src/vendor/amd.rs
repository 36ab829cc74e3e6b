//! AMD: legacy K7 counters, PerfCtrExtCore and PerfMonV2 (APM vol. 2 ch. 13).

use super::{index_in, CounterWrite, Layout, NamedEvent, Register, ReservedWrites, VendorOps};
use crate::evtsel::*;
use crate::model::{AmdFeatures, HostFacts, ModelError, MsrRange, PmuModel, VendorFeatures};
use crate::msr::*;
use crate::value::low_bits;
use crate::x86::{
    self, CpuidRegs, Leaf, Vendor, EXT_ECX_PERFCTR_CORE, LEAF_EXT_FEATURES, LEAF_EXT_PERFMON,
};

pub(crate) struct Amd;

const WIDTH: u8 = 48;
const LEGACY_COUNTERS: u8 = 4;
const CORE_COUNTERS: u8 = 6;

/// Linux's generic hardware events on AMD (`amd_perfmon_event_map`) that
/// have a fixed meaning across families.
static NAMED: [NamedEvent; 4] = [
    NamedEvent::new(0x76, 0, "cycles", true, true),
    NamedEvent::new(0xC0, 0, "instructions", true, false),
    NamedEvent::new(0xC2, 0, "branches", false, false),
    NamedEvent::new(0xC3, 0, "branch-misses", false, false),
];

/// Whether `m` has PerfCtrExtCore ([`super::ops`] gives this vendor only
/// AMD models).
fn perfctr_core(m: &PmuModel) -> bool {
    m.amd().is_some_and(|f| f.perfctr_core)
}

fn gp_error(count: u8, why: &'static str) -> ModelError {
    ModelError::GpCounters {
        vendor: Vendor::Amd,
        count,
        why,
    }
}

impl VendorOps for Amd {
    fn validate(&self, m: &PmuModel) -> Result<(), ModelError> {
        if !(1..=2).contains(&m.version) {
            return Err(ModelError::Version {
                vendor: Vendor::Amd,
                version: m.version,
                supported: "1 = legacy or PerfCtrExtCore, 2 = PerfMonV2",
            });
        }
        if m.gp_width != WIDTH {
            return Err(ModelError::Width {
                what: "AMD counter",
                width: m.gp_width,
                supported: "48",
            });
        }
        let perfctr_core = perfctr_core(m);
        if m.version == 2 && !perfctr_core {
            return Err(ModelError::Feature {
                feature: "AMD PerfMonV2",
                why: "needs PerfCtrExtCore",
            });
        }
        match (m.version, perfctr_core) {
            (2, _) if !(1..=CORE_COUNTERS).contains(&m.gp_counters) => Err(gp_error(
                m.gp_counters,
                "PerfMonV2 has 1 to 6 core counters",
            )),
            (1, true) if m.gp_counters != CORE_COUNTERS => Err(gp_error(
                m.gp_counters,
                "PerfCtrExtCore without PerfMonV2 has exactly 6 (use version 2 to choose a count)",
            )),
            (1, false) if m.gp_counters != LEGACY_COUNTERS => Err(gp_error(
                m.gp_counters,
                "the legacy PMU has exactly 4 (use version 2 to choose a count)",
            )),
            _ => Ok(()),
        }
    }

    fn best_for_host(&self, host: &HostFacts) -> PmuModel {
        let v2 = PmuModel::new(2, CORE_COUNTERS, WIDTH, AmdFeatures { perfctr_core: true });
        let Some(cpuid) = host.cpuid.filter(|_| host.hardware_events) else {
            return v2;
        };
        if cpuid.leaf_0x8000_0022.eax & 1 != 0 {
            let count = (cpuid.leaf_0x8000_0022.ebx & 0xF) as u8;
            v2.with_gp_counters(count.clamp(1, CORE_COUNTERS))
        } else if cpuid.ext_features_ecx & EXT_ECX_PERFCTR_CORE != 0 {
            v2.with_version(1)
        } else {
            PmuModel::new(1, LEGACY_COUNTERS, WIDTH, AmdFeatures::default())
        }
    }

    /// Every block (legacy, PerfCtrExtCore, PerfMonV2 globals), whatever
    /// the model has: the registers it lacks fault here, as on hardware of
    /// that shape, instead of reaching KVM.
    fn msr_ranges(&self, _m: &PmuModel) -> Vec<MsrRange> {
        let range = |base, count| MsrRange { base, count };
        vec![
            range(AMD_K7_PERF_CTL0, AMD_K7_BLOCK_LEN),
            range(AMD_PERF_CTL0, AMD_CORE_BLOCK_LEN),
            range(AMD_GLOBAL_STATUS, AMD_GLOBAL_BLOCK_LEN),
        ]
    }

    fn decode(&self, m: &PmuModel, msr: u32) -> Option<Register> {
        let n = m.gp_counters as usize;
        if let Some(i) = index_in(msr, AMD_K7_PERF_CTL0, n.min(4)) {
            return Some(Register::EventSelect(i));
        }
        if let Some(i) = index_in(msr, AMD_K7_PERF_CTR0, n.min(4)) {
            return Some(Register::GpCounter(i, CounterWrite::Truncate));
        }
        if perfctr_core(m) {
            if let Some(offset) = index_in(msr, AMD_PERF_CTL0, 2 * n) {
                return Some(match offset % 2 {
                    0 => Register::EventSelect(offset / 2),
                    _ => Register::GpCounter(offset / 2, CounterWrite::Truncate),
                });
            }
        }
        if !m.has_amd_perfmon_v2() {
            return None;
        }
        match msr {
            AMD_GLOBAL_STATUS => Some(Register::GlobalStatus),
            AMD_GLOBAL_CTL => Some(Register::GlobalCtrl),
            AMD_GLOBAL_STATUS_CLR => Some(Register::GlobalStatusReset),
            AMD_GLOBAL_STATUS_SET => Some(Register::GlobalStatusSet),
            _ => None,
        }
    }

    fn layout(&self, m: &PmuModel) -> Layout {
        let counters = low_bits(m.gp_counters as u32);
        let global = if m.has_amd_perfmon_v2() { counters } else { 0 };
        Layout {
            evtsel_valid: EVENT_LOW
                | UMASK
                | USR
                | OS
                | EDGE
                | INT
                | EN
                | INV
                | CMASK
                | EVENT_HIGH
                | GUEST_ONLY
                | HOST_ONLY,
            fixed_ctrl_valid: 0,
            global_ctrl_valid: global,
            // Set at reset so software unaware of PerfMonV2 still counts.
            global_ctrl_reset: global,
            status_valid: global,
            reserved_writes: ReservedWrites::Ignore,
            perf_capabilities: 0,
        }
    }

    fn counter_msr(&self, m: &PmuModel, _fixed: bool, index: usize) -> u32 {
        if perfctr_core(m) {
            AMD_PERF_CTL0 + 2 * index as u32 + 1
        } else {
            AMD_K7_PERF_CTR0 + index as u32
        }
    }

    fn named_events(&self) -> &'static [NamedEvent] {
        &NAMED
    }

    fn advertise(&self, m: &PmuModel, leaf: u32, _subleaf: u32, regs: &mut CpuidRegs) {
        match leaf {
            0x8000_0000 if m.has_amd_perfmon_v2() => x86::raise_max_leaf(regs, LEAF_EXT_PERFMON),
            LEAF_EXT_FEATURES if perfctr_core(m) => regs.ecx |= EXT_ECX_PERFCTR_CORE,
            LEAF_EXT_PERFMON if m.has_amd_perfmon_v2() => {
                regs.eax = 1;
                regs.ebx = m.gp_counters as u32 & 0xF;
            }
            _ => {}
        }
    }

    /// AMD's 4 legacy counters are the version-1 model without
    /// PerfCtrExtCore; with it, version 1 has exactly 6.
    fn with_gp_counters(&self, model: PmuModel, count: u8) -> PmuModel {
        let mut model = model.with_gp_counters(count);
        match &mut model.features {
            VendorFeatures::Amd(features) if model.version == 1 && count <= LEGACY_COUNTERS => {
                features.perfctr_core = false
            }
            _ => {}
        }
        model
    }

    fn masks_lvtpc_on_pmi(&self) -> bool {
        false
    }

    fn required_leaves(&self, m: &PmuModel) -> &'static [Leaf] {
        if m.has_amd_perfmon_v2() {
            &[
                (0x8000_0000, 0),
                (LEAF_EXT_FEATURES, 0),
                (LEAF_EXT_PERFMON, 0),
            ]
        } else {
            &[(LEAF_EXT_FEATURES, 0)]
        }
    }
}
