//! Intel architectural PMU (SDM vol. 3, ch. 20), described by CPUID leaf
//! 0xA: version, general-purpose counters (IA32_PMCx / IA32_A_PMCx with
//! IA32_PERFEVTSELx), fixed counters (v2+) and the global control, status
//! and overflow-control MSRs (v2+).

use super::{Kind, Pmu};
use crate::cpu::{cpuid, rdmsr_safe};

pub const PMC0: u32 = 0xc1;
pub const PERFEVTSEL0: u32 = 0x186;
pub const PERF_CAPABILITIES: u32 = 0x345;
pub const FIXED_CTR0: u32 = 0x309;
pub const FIXED_CTR_CTRL: u32 = 0x38d;
pub const GLOBAL_STATUS: u32 = 0x38e;
pub const GLOBAL_CTRL: u32 = 0x38f;
pub const GLOBAL_OVF_CTRL: u32 = 0x390;
pub const GLOBAL_STATUS_SET: u32 = 0x391;
pub const GLOBAL_INUSE: u32 = 0x392;
pub const A_PMC0: u32 = 0x4c1;
/// Architectural general-purpose MSRs of each kind: `IA32_PMC0..7`,
/// `IA32_PERFEVTSEL0..7`, `IA32_A_PMC0..7`.
pub const GP_BLOCK: u32 = 8;
/// Architectural fixed counters: `IA32_FIXED_CTR0..3`.
pub const FIXED_BLOCK: u32 = 4;

/// PERFEVTSEL bits that are defined for every version: event, umask, USR,
/// OS, edge, PC, INT, EN, INV, cmask (bits 0-31 except ANY, bit 21, whose
/// validity depends on the version and is not tested). Bits 32-63 reserved.
pub const EVTSEL_VALID: u64 = 0x0000_0000_ffdf_ffff;
pub const EVTSEL_ANY: u64 = 1 << 21;

/// IA32_PERF_CAPABILITIES bit 13: full-width writes through IA32_A_PMCx.
const CAP_FW_WRITE: u64 = 1 << 13;

pub fn detect(p: &mut Pmu, ecx1: u32) {
    if cpuid(0, 0).0 < 0xa {
        return;
    }
    let (eax, ebx, _, edx) = cpuid(0xa, 0);
    let version = eax & 0xff;
    if version == 0 {
        return;
    }
    p.kind = Kind::Intel;
    p.version = version;
    p.num_gp = (eax >> 8) & 0xff;
    p.gp_width = (eax >> 16) & 0xff;
    p.intel_unavail = ebx;
    if version >= 2 {
        p.num_fixed = edx & 0x1f;
        p.fixed_width = (edx >> 5) & 0xff;
    }
    // PDCM (CPUID.1:ECX[15]) says IA32_PERF_CAPABILITIES exists.
    if ecx1 & (1 << 15) != 0 {
        p.intel_pdcm = true;
        if let Ok(cap) = rdmsr_safe(PERF_CAPABILITIES) {
            p.intel_full_width = cap & CAP_FW_WRITE != 0;
        }
    }
}

/// FIXED_CTR_CTRL field bits of one fixed counter (shifted by 4i).
pub const FIXED_OS: u64 = 1 << 0;
pub const FIXED_USR: u64 = 1 << 1;
pub const FIXED_PMI: u64 = 1 << 3;

/// Non-counter GLOBAL_STATUS flags of `version` (SDM 20.2.2-20.2.4), which
/// GLOBAL_OVF_CTRL may clear and GLOBAL_STATUS_SET may set: v2 OvfBuf(62)
/// and CondChgd(63), v3 Ovf_Uncore(61), v4 Trace_ToPA_PMI(55), LBR_Frz(58),
/// CTR_Frz(59), ASCI(60).
pub fn status_flags(version: u32) -> u64 {
    let v2 = (1 << 62) | (1 << 63);
    let v3 = v2 | (1 << 61);
    match version {
        0 | 1 => 0,
        2 => v2,
        3 => v3,
        _ => v3 | (1 << 55) | (0b111 << 58),
    }
}

/// FIXED_CTR_CTRL bits defined for `n` fixed counters: OS, USR and PMI of
/// each 4-bit field (the ANY bit, 4i+2, is version dependent and not tested).
pub fn fixed_ctrl_valid(n: u32) -> u64 {
    (0..n).fold(0, |m, i| m | (0xb << (4 * i)))
}

/// FIXED_CTR_CTRL ANY bits of `n` fixed counters.
pub fn fixed_ctrl_any(n: u32) -> u64 {
    (0..n).fold(0, |m, i| m | (0x4 << (4 * i)))
}
