//! What the x86 architecture names and every layer of this crate shares:
//! the CPU [`Vendor`], the registers of a CPUID leaf ([`CpuidRegs`]) and
//! the CPUID bits of the PMU. A leaf module: it imports nothing from the
//! crate. Users see these items through [`crate::model`] and
//! [`crate::cpuid`].

use serde::{Deserialize, Serialize};

/// CPU vendor of the guest: the host's, unless the VMM presents another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    /// AuthenticAMD.
    Amd,
    /// GenuineIntel.
    Intel,
}

/// The four registers of one CPUID leaf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidRegs {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// A leaf and subleaf.
pub type Leaf = (u32, u32);

/// Leaf 1 ECX\[2\]: DTES64 (debug store; PEBS/BTS are not modelled).
pub const LEAF1_ECX_DTES64: u32 = 1 << 2;
/// Leaf 1 ECX\[15\]: PDCM (`IA32_PERF_CAPABILITIES`).
pub const LEAF1_ECX_PDCM: u32 = 1 << 15;
/// Leaf 1 EDX\[21\]: DS (debug store).
pub const LEAF1_EDX_DS: u32 = 1 << 21;
/// Leaf 0x8000_0001 ECX\[23\]: PerfCtrExtCore.
pub const EXT_ECX_PERFCTR_CORE: u32 = 1 << 23;
/// Leaf 0x8000_0001 ECX\[24\]: PerfCtrExtNB (not modelled).
pub const EXT_ECX_PERFCTR_NB: u32 = 1 << 24;
/// Leaf 0x8000_0001 ECX\[28\]: PerfCtrExtLLC (not modelled).
pub const EXT_ECX_PERFCTR_LLC: u32 = 1 << 28;

/// Intel architectural perfmon leaf.
pub const LEAF_ARCH_PERFMON: u32 = 0xA;
/// AMD extended features leaf.
pub const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
/// AMD extended performance monitoring and debug leaf.
pub const LEAF_EXT_PERFMON: u32 = 0x8000_0022;

/// Raises a max-leaf value in EAX to at least `needed`.
pub(crate) fn raise_max_leaf(regs: &mut CpuidRegs, needed: u32) {
    regs.eax = regs.eax.max(needed);
}
