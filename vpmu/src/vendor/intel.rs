//! Intel architectural performance monitoring, versions 1 to 4 (SDM vol. 3
//! ch. 20).

use super::{index_in, CounterWrite, Layout, NamedEvent, Register, ReservedWrites, VendorOps};
use crate::evtsel::*;
use crate::model::{HostFacts, IntelFeatures, ModelError, MsrRange, PmuModel};
use crate::msr::*;
use crate::value::low_bits;
use crate::x86::{self, CpuidRegs, Leaf, Vendor, LEAF1_ECX_PDCM, LEAF_ARCH_PERFMON};

pub(crate) struct Intel;

const MAX_GP: u8 = 8;
const MAX_FIXED: u8 = 3;
const MAX_VERSION: u8 = 4;
const WIDTHS: std::ops::RangeInclusive<u8> = 32..=48;
/// Architectural events enumerated by CPUID.0AH:EBX (length in EAX\[31:24\]).
const ARCH_EVENTS: u32 = 7;

/// The architectural events (CPUID.0AH:EBX bit order), plus the
/// pseudo-encoding 0x0300 that Linux and the SDM use for fixed counter 2.
static NAMED: [NamedEvent; 8] = [
    NamedEvent::new(0x3C, 0x00, "cycles", true, true),
    NamedEvent::new(0xC0, 0x00, "instructions", true, false),
    NamedEvent::new(0x3C, 0x01, "ref-cycles", false, true),
    NamedEvent::new(0x2E, 0x4F, "llc-references", false, false),
    NamedEvent::new(0x2E, 0x41, "llc-misses", false, false),
    NamedEvent::new(0xC4, 0x00, "branches", false, false),
    NamedEvent::new(0xC5, 0x00, "branch-misses", false, false),
    NamedEvent::new(0x00, 0x03, "ref-cycles", false, true),
];

/// Fixed counters: instructions retired, core cycles, reference cycles.
const FIXED_EVENTS: [EventCode; MAX_FIXED as usize] = [
    EventCode::new(0xC0, 0x00),
    EventCode::new(0x3C, 0x00),
    EventCode::new(0x00, 0x03),
];

/// The events of the fixed counters `f` has, in counter order.
pub(super) fn fixed_events(f: &IntelFeatures) -> &'static [EventCode] {
    &FIXED_EVENTS[..FIXED_EVENTS.len().min(f.fixed_counters as usize)]
}

/// The Intel part of `m` ([`super::ops`] gives this vendor only Intel
/// models; an AMD model has none of these features).
fn features(m: &PmuModel) -> IntelFeatures {
    m.intel().copied().unwrap_or_default()
}

/// Non-counter GLOBAL_STATUS flags each version defines (SDM 20.2.2-20.2.4):
/// v2 OvfBuf(62) and CondChgd(63); v3 adds Ovf_Uncore(61); v4 adds
/// Trace_ToPA_PMI(55), LBR_Frz(58), CTR_Frz(59) and ASCI(60).
fn status_flags(version: u8) -> u64 {
    const V2: u64 = (1 << 62) | (1 << 63);
    const V3: u64 = V2 | (1 << 61);
    const V4: u64 = V3 | (1 << 55) | (1 << 58) | (1 << 59) | (1 << 60);
    match version {
        0 | 1 => 0,
        2 => V2,
        3 => V3,
        _ => V4,
    }
}

impl VendorOps for Intel {
    fn validate(&self, m: &PmuModel) -> Result<(), ModelError> {
        if !(1..=MAX_VERSION).contains(&m.version) {
            return Err(ModelError::Version {
                vendor: Vendor::Intel,
                version: m.version,
                supported: "1 to 4; for no PMU give no model",
            });
        }
        if !(1..=MAX_GP).contains(&m.gp_counters) {
            return Err(ModelError::GpCounters {
                vendor: Vendor::Intel,
                count: m.gp_counters,
                why: "1 to 8 are modelled",
            });
        }
        if !WIDTHS.contains(&m.gp_width) {
            return Err(ModelError::Width {
                what: "Intel general-purpose counter",
                width: m.gp_width,
                supported: "32 to 48",
            });
        }
        let f = features(m);
        let fixed_error = |why| ModelError::FixedCounters {
            vendor: Vendor::Intel,
            version: m.version,
            count: f.fixed_counters,
            why,
        };
        if m.version == 1 && f.fixed_counters > 0 {
            return Err(fixed_error("fixed counters need version 2"));
        }
        if f.fixed_counters > MAX_FIXED {
            return Err(fixed_error("at most 3 are modelled"));
        }
        let width_ok = match f.fixed_counters {
            0 => f.fixed_width == 0,
            _ => WIDTHS.contains(&f.fixed_width),
        };
        if !width_ok {
            return Err(ModelError::Width {
                what: "Intel fixed counter",
                width: f.fixed_width,
                supported: "32 to 48, or 0 without fixed counters",
            });
        }
        if f.full_width_writes && !f.pdcm {
            return Err(ModelError::Feature {
                feature: "Intel full-width writes",
                why: "need PDCM (IA32_PERF_CAPABILITIES advertises them)",
            });
        }
        if u32::from(f.unavailable_events) >> ARCH_EVENTS != 0 {
            return Err(ModelError::Feature {
                feature: "the event availability mask",
                why: "has bits beyond the 7 architectural events",
            });
        }
        Ok(())
    }

    fn best_for_host(&self, host: &HostFacts) -> PmuModel {
        let emulated = PmuModel::new(
            MAX_VERSION,
            4,
            48,
            IntelFeatures {
                fixed_counters: MAX_FIXED,
                fixed_width: 48,
                pdcm: true,
                full_width_writes: true,
                unavailable_events: 0,
            },
        );
        let Some(leaf) = host
            .cpuid
            .map(|c| c.leaf_0xa)
            .filter(|l| host.hardware_events && l.eax & 0xFF != 0)
        else {
            return emulated;
        };
        let version = ((leaf.eax & 0xFF) as u8).min(MAX_VERSION);
        let width = |bits: u32| (bits as u8).clamp(*WIDTHS.start(), *WIDTHS.end());
        let fixed = match ((leaf.edx & 0x1F) as u8).min(MAX_FIXED) {
            count if version >= 2 && count > 0 => (count, width(leaf.edx >> 5)),
            _ => (0, 0),
        };
        PmuModel::new(
            version,
            ((leaf.eax >> 8) as u8).clamp(1, MAX_GP),
            width(leaf.eax >> 16),
            IntelFeatures {
                fixed_counters: fixed.0,
                fixed_width: fixed.1,
                pdcm: host.intel_full_width_writes,
                full_width_writes: host.intel_full_width_writes,
                unavailable_events: (leaf.ebx & low_bits(ARCH_EVENTS) as u32) as u8,
            },
        )
    }

    /// The whole architectural range, whatever the model has: a register
    /// the model lacks must #GP as on hardware with that shape, not reach
    /// KVM (which, for instance, ignores `IA32_PMC1` and `IA32_PERFEVTSEL1`
    /// as P6 MSRs whatever the guest's PMU).
    fn msr_ranges(&self, _m: &PmuModel) -> Vec<MsrRange> {
        let range = |base, count| MsrRange { base, count };
        vec![
            range(INTEL_PMC0, INTEL_GP_BLOCK_LEN),
            range(INTEL_PERFEVTSEL0, INTEL_GP_BLOCK_LEN),
            range(INTEL_FIXED_CTR0, INTEL_FIXED_BLOCK_LEN),
            range(INTEL_PERF_CAPABILITIES, 1),
            range(
                INTEL_FIXED_CTR_CTRL,
                INTEL_GLOBAL_INUSE - INTEL_FIXED_CTR_CTRL + 1,
            ),
            range(INTEL_A_PMC0, INTEL_GP_BLOCK_LEN),
        ]
    }

    fn decode(&self, m: &PmuModel, msr: u32) -> Option<Register> {
        let f = features(m);
        let gp = m.gp_counters as usize;
        if let Some(i) = index_in(msr, INTEL_PMC0, gp) {
            return Some(Register::GpCounter(i, CounterWrite::SignExtend32));
        }
        if let Some(i) = index_in(msr, INTEL_PERFEVTSEL0, gp) {
            return Some(Register::EventSelect(i));
        }
        if f.full_width_writes {
            if let Some(i) = index_in(msr, INTEL_A_PMC0, gp) {
                return Some(Register::GpCounter(i, CounterWrite::FullWidth));
            }
        }
        if f.pdcm && msr == INTEL_PERF_CAPABILITIES {
            return Some(Register::PerfCapabilities);
        }
        if m.version < 2 {
            return None;
        }
        if let Some(i) = index_in(msr, INTEL_FIXED_CTR0, f.fixed_counters as usize) {
            return Some(Register::FixedCounter(i));
        }
        match msr {
            INTEL_FIXED_CTR_CTRL => Some(Register::FixedCtrl),
            INTEL_GLOBAL_STATUS => Some(Register::GlobalStatus),
            INTEL_GLOBAL_CTRL => Some(Register::GlobalCtrl),
            INTEL_GLOBAL_OVF_CTRL => Some(Register::GlobalStatusReset),
            INTEL_GLOBAL_STATUS_SET if m.version >= 4 => Some(Register::GlobalStatusSet),
            INTEL_GLOBAL_INUSE if m.version >= 4 => Some(Register::GlobalInUse),
            _ => None,
        }
    }

    fn layout(&self, m: &PmuModel) -> Layout {
        let f = features(m);
        let any = if m.version >= 3 { ANY } else { 0 };
        // Per fixed counter: OS(0), USR(1), AnyThread(2, v3+), PMI(3).
        let field = 0b1011 | if m.version >= 3 { 0b0100 } else { 0 };
        let fixed_ctrl_valid =
            (0..f.fixed_counters as u32).fold(0, |acc, i| acc | (field << (4 * i)));
        let gp = low_bits(m.gp_counters as u32);
        let counters = gp | (low_bits(f.fixed_counters as u32) << 32);
        let global = m.version >= 2;
        Layout {
            evtsel_valid: EVENT_LOW | UMASK | USR | OS | EDGE | PC | INT | any | EN | INV | CMASK,
            fixed_ctrl_valid,
            global_ctrl_valid: if global { counters } else { 0 },
            // SDM: GLOBAL_CTRL resets with every general-purpose enable set.
            global_ctrl_reset: if global { gp } else { 0 },
            status_valid: if global {
                counters | status_flags(m.version)
            } else {
                0
            },
            reserved_writes: ReservedWrites::Fault,
            perf_capabilities: if f.full_width_writes {
                PERF_CAP_FULL_WIDTH_WRITE
            } else {
                0
            },
        }
    }

    fn counter_msr(&self, _m: &PmuModel, fixed: bool, index: usize) -> u32 {
        let base = if fixed { INTEL_FIXED_CTR0 } else { INTEL_PMC0 };
        base + index as u32
    }

    fn named_events(&self) -> &'static [NamedEvent] {
        &NAMED
    }

    fn advertise(&self, m: &PmuModel, leaf: u32, _subleaf: u32, regs: &mut CpuidRegs) {
        let f = features(m);
        match leaf {
            0 => x86::raise_max_leaf(regs, LEAF_ARCH_PERFMON),
            1 if f.pdcm => regs.ecx |= LEAF1_ECX_PDCM,
            LEAF_ARCH_PERFMON => {
                regs.eax = m.version as u32
                    | (m.gp_counters as u32) << 8
                    | (m.gp_width as u32) << 16
                    | ARCH_EVENTS << 24;
                regs.ebx = f.unavailable_events as u32;
                if m.version >= 2 {
                    regs.edx = f.fixed_counters as u32 | (f.fixed_width as u32) << 5;
                }
            }
            _ => {}
        }
    }

    fn required_leaves(&self, _m: &PmuModel) -> &'static [Leaf] {
        &[(0, 0), (1, 0), (LEAF_ARCH_PERFMON, 0)]
    }

    /// SDM: the LVT performance counter entry's mask bit is set when a PMI
    /// is delivered; the handler unmasks it.
    fn masks_lvtpc_on_pmi(&self) -> bool {
        true
    }
}
