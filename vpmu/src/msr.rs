//! MSR indices of the PMU registers (Intel SDM vol. 4 "Model-Specific
//! Registers", AMD APM vol. 2 ch. 13 and the AMD PPRs).

/// AMD legacy `PERF_CTL0`; `PERF_CTL0..3` are `0xC001_0000..=0xC001_0003`.
pub const AMD_K7_PERF_CTL0: u32 = 0xC001_0000;
/// AMD legacy `PERF_CTR0`; `PERF_CTR0..3` are `0xC001_0004..=0xC001_0007`.
pub const AMD_K7_PERF_CTR0: u32 = 0xC001_0004;
/// AMD PerfCtrExtCore `PERF_CTL0`; counter n has `PERF_CTLn` at `+2n` and `PERF_CTRn` at `+2n+1`.
pub const AMD_PERF_CTL0: u32 = 0xC001_0200;
/// AMD PerfMonV2 `PerfCntrGlobalStatus` (read-only).
pub const AMD_GLOBAL_STATUS: u32 = 0xC000_0300;
/// AMD PerfMonV2 `PerfCntrGlobalCtl`.
pub const AMD_GLOBAL_CTL: u32 = 0xC000_0301;
/// AMD PerfMonV2 `PerfCntrGlobalStatusClr`.
pub const AMD_GLOBAL_STATUS_CLR: u32 = 0xC000_0302;
/// AMD PerfMonV2 `PerfCntrGlobalStatusSet`.
pub const AMD_GLOBAL_STATUS_SET: u32 = 0xC000_0303;
/// Number of MSRs in the legacy AMD block (4 CTL + 4 CTR).
pub const AMD_K7_BLOCK_LEN: u32 = 8;
/// Number of MSRs in the PerfCtrExtCore block (6 CTL/CTR pairs).
pub const AMD_CORE_BLOCK_LEN: u32 = 12;
/// Number of MSRs in the PerfMonV2 global block.
pub const AMD_GLOBAL_BLOCK_LEN: u32 = 4;

/// Intel `IA32_PMC0`; legacy writes sign-extend bit 31.
pub const INTEL_PMC0: u32 = 0xC1;
/// Intel `IA32_PERFEVTSEL0`.
pub const INTEL_PERFEVTSEL0: u32 = 0x186;
/// Intel `IA32_PERF_CAPABILITIES` (read-only, present with PDCM).
pub const INTEL_PERF_CAPABILITIES: u32 = 0x345;
/// Intel `IA32_FIXED_CTR0`.
pub const INTEL_FIXED_CTR0: u32 = 0x309;
/// Intel `IA32_FIXED_CTR_CTRL`.
pub const INTEL_FIXED_CTR_CTRL: u32 = 0x38D;
/// Intel `IA32_PERF_GLOBAL_STATUS` (read-only).
pub const INTEL_GLOBAL_STATUS: u32 = 0x38E;
/// Intel `IA32_PERF_GLOBAL_CTRL`.
pub const INTEL_GLOBAL_CTRL: u32 = 0x38F;
/// Intel `IA32_PERF_GLOBAL_OVF_CTRL` (v4: `IA32_PERF_GLOBAL_STATUS_RESET`).
pub const INTEL_GLOBAL_OVF_CTRL: u32 = 0x390;
/// Intel `IA32_PERF_GLOBAL_STATUS_SET` (v4).
pub const INTEL_GLOBAL_STATUS_SET: u32 = 0x391;
/// Intel `IA32_PERF_GLOBAL_INUSE` (v4, read-only).
pub const INTEL_GLOBAL_INUSE: u32 = 0x392;
/// Intel `IA32_A_PMC0`: full-width counter writes.
pub const INTEL_A_PMC0: u32 = 0x4C1;

/// `IA32_PERF_CAPABILITIES` bit 13: full-width writes through `IA32_A_PMCx`.
pub const PERF_CAP_FULL_WIDTH_WRITE: u64 = 1 << 13;
