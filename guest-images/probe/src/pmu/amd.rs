//! AMD PMU model (APM vol. 2, ch. 13): legacy PERF_CTL0-3 / PERF_CTR0-3,
//! PerfCtrExtCore (6 counters, interleaved CTL/CTR pairs; the legacy MSRs
//! alias counters 0-3), PerfMonV2 global control/status. Counters are 48 bits.

use super::{Kind, Pmu};
use crate::cpu::cpuid;

pub const LEGACY_CTL0: u32 = 0xc001_0000;
pub const LEGACY_CTR0: u32 = 0xc001_0004;
pub const EXT_CTL0: u32 = 0xc001_0200;
pub const EXT_CTR0: u32 = 0xc001_0201;
pub const GLOBAL_STATUS: u32 = 0xc000_0300;
pub const GLOBAL_CTL: u32 = 0xc000_0301;
pub const GLOBAL_STATUS_CLR: u32 = 0xc000_0302;
pub const GLOBAL_STATUS_SET: u32 = 0xc000_0303;

pub const LEGACY_COUNTERS: u32 = 4;
pub const EXT_COUNTERS: u32 = 6;

/// Defined PERF_CTL bits: event[7:0], umask[15:8], USR 16, OS 17, edge 18,
/// INT 20, En 22, inv 23, cmask[31:24], event[35:32], GuestOnly 40,
/// HostOnly 41. Everything else is reserved (bits 19, 21, 36-39, 42-63).
pub const CTL_VALID: u64 = 0x0000_030f_ffd7_ffff;

pub fn detect(p: &mut Pmu) {
    // Every 64-bit AMD CPU architecturally has the 4 legacy counters; there
    // is no CPUID bit for them (Linux only checks family >= 6), so whether a
    // PMU is really there is decided by the MSR probe.
    if p.family < 6 {
        return;
    }
    p.kind = Kind::Amd;
    p.version = 1;
    p.num_gp = LEGACY_COUNTERS;
    p.gp_width = 48;
    let max_ext = cpuid(0x8000_0000, 0).0;
    if max_ext >= 0x8000_0001 && cpuid(0x8000_0001, 0).2 & (1 << 23) != 0 {
        p.amd_ext_core = true;
        p.num_gp = EXT_COUNTERS;
    }
    if max_ext >= 0x8000_0022 {
        let (eax, ebx, _, _) = cpuid(0x8000_0022, 0);
        if eax & 1 != 0 {
            p.amd_v2 = true;
            p.version = 2;
            let n = ebx & 0xf;
            if n > 0 {
                p.num_gp = n;
            }
        }
    }
}

pub fn ctl_msr(p: &Pmu, i: u32) -> u32 {
    if p.amd_ext_core {
        EXT_CTL0 + 2 * i
    } else {
        LEGACY_CTL0 + i
    }
}

pub fn ctr_msr(p: &Pmu, i: u32) -> u32 {
    if p.amd_ext_core {
        EXT_CTR0 + 2 * i
    } else {
        LEGACY_CTR0 + i
    }
}
