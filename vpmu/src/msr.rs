//! MSR indices of the PMU registers (Intel SDM vol. 4 "Model-Specific
//! Registers", AMD APM vol. 2 ch. 13 and the AMD PPRs).
//!
//! # Index spaces
//!
//! A counter has a number in each of these spaces; they differ, so code
//! says which one it holds.
//!
//! - **MSR index** (`u32`): what the guest's RDMSR/WRMSR and the VMM's
//!   KVM MSR filter use. `vendor/{amd,intel}.rs` `decode` turns it into a
//!   register and a *kind index*; nothing else reads MSR numbers.
//!   - Intel: general-purpose counter `i` is `IA32_PMCi` = `0xC1 + i`
//!     (legacy writes sign-extend bit 31) and, with full-width writes,
//!     also `IA32_A_PMCi` = `0x4C1 + i`; its event select is
//!     `IA32_PERFEVTSELi` = `0x186 + i`. Fixed counter `j` is
//!     `IA32_FIXED_CTRj` = `0x309 + j`.
//!   - AMD legacy (K7): `PERF_CTLn` = `0xC001_0000 + n` and `PERF_CTRn` =
//!     `0xC001_0004 + n`, `n` < 4: controls first, then counters.
//!   - AMD PerfCtrExtCore: interleaved pairs, `PERF_CTLn` =
//!     `0xC001_0200 + 2n` and `PERF_CTRn` = `0xC001_0201 + 2n`, `n` < 6.
//!     The legacy MSRs stay as aliases of counters 0 to 3 (with fewer
//!     counters, the legacy MSRs of the missing ones fault).
//! - **Kind index**: the counter's number among its kind, general-purpose
//!   (`i`, also its event select's) or fixed (`j`); `Register::GpCounter(i, _)`,
//!   `Register::FixedCounter(j)`, and [`crate::CounterSnapshot`]'s `kind`
//!   and `index` (exported as `gp{i}` / `fixed{j}`). AMD has no fixed
//!   counters.
//! - **Slot**: a counter's place in the [`crate::Vpmu`]: general-purpose
//!   counters first, then the fixed ones, so fixed counter `j` is slot
//!   `gp_counters + j`. Slot order is the order of
//!   [`crate::Vpmu::counter_values`], [`crate::Vpmu::generation`], the
//!   snapshot's counters and the saved context's values.
//! - **Global bit**: a counter's bit in `GLOBAL_CTRL`, `GLOBAL_STATUS`,
//!   `GLOBAL_STATUS_SET`/`RESET` and Intel's `GLOBAL_INUSE`:
//!   general-purpose `i` at bit `i`, fixed `j` at bit `32 + j` (Intel
//!   v2+; AMD PerfMonV2 has only bits `0..gp_counters`). Intel's
//!   non-counter status flags sit at bits 55 and 58 to 63 by version;
//!   `GLOBAL_INUSE` bit 63 means a PMI is in use. Fixed counter `j`'s
//!   control is the 4-bit field at bits `4j..4j + 3` of
//!   `IA32_FIXED_CTR_CTRL` (OS 0, USR 1, AnyThread 2, PMI 3).
//! - **RDPMC index** (the guest's ECX): not decoded here. Guest RDPMC is
//!   served by KVM's own PMU from the values the VMM mirrors there
//!   ([`crate::Vpmu::counter_values`]: each counter with its canonical MSR,
//!   `IA32_PMCi`/`IA32_FIXED_CTRj` on Intel, the PerfCtrExtCore
//!   `PERF_CTRn` on AMD if the model has it, else the legacy one). The
//!   architectural encoding it follows: Intel general-purpose `i` is ECX
//!   `i` and fixed `j` is ECX `(1 << 30) | j`; AMD counter `n` is ECX `n`.
//! - **Architectural event bit** (Intel): bit `k` of CPUID.0AH:EBX
//!   ([`crate::IntelFeatures::unavailable_events`]) is the `k`-th event of
//!   the architectural event table in `vendor/intel.rs` (cycles,
//!   instructions, ref-cycles, LLC references, LLC misses, branches,
//!   branch misses).

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

/// Intel's architectural general-purpose counters: `IA32_PMC0..7`,
/// `IA32_PERFEVTSEL0..7` and `IA32_A_PMC0..7` (the most CPUID.0AH can
/// advertise below the MSRs that follow each block).
pub const INTEL_GP_BLOCK_LEN: u32 = 8;
/// Intel's architectural fixed counters: `IA32_FIXED_CTR0..3`.
pub const INTEL_FIXED_BLOCK_LEN: u32 = 4;

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
