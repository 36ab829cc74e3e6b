//! CPUID leaves that advertise exactly the model, or no PMU at all.
//!
//! Call [`apply`] on every entry the VMM gives the guest (after KVM's
//! supported values are in place). Make sure every leaf of
//! [`leaves_required`] exists first: KVM's supported list may lack some
//! (0x8000_0022 on older hosts), and a missing leaf cannot advertise.

use serde::{Deserialize, Serialize};

use crate::model::PmuModel;
use crate::vendor;

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

/// Rewrites `regs` of `leaf`/`subleaf` so the guest sees exactly `model`,
/// or no PMU at all with `None`.
///
/// Every PMU bit this crate knows is first cleared (leaf 0xA, PDCM, DS,
/// DTES64, AMD PerfCtrExtCore/NB/LLC, leaf 0x8000_0022), then the model's
/// vendor advertises what it has. Leaves 0 and 0x8000_0000 get their
/// maximum raised when the model needs a higher leaf.
pub fn apply(model: Option<&PmuModel>, leaf: u32, subleaf: u32, regs: &mut CpuidRegs) {
    clear_pmu(leaf, regs);
    if let Some(model) = model {
        vendor::ops(model.vendor()).advertise(model, leaf, subleaf, regs);
    }
}

/// The leaves that must exist for [`apply`] to advertise `model` (or its
/// absence): add them, zeroed, when the host's list lacks them.
pub fn leaves_required(model: Option<&PmuModel>) -> &'static [Leaf] {
    match model {
        Some(model) => vendor::ops(model.vendor()).required_leaves(model),
        None => &[],
    }
}

/// Clears every PMU advertisement, whatever the vendor.
fn clear_pmu(leaf: u32, regs: &mut CpuidRegs) {
    match leaf {
        1 => {
            regs.ecx &= !(LEAF1_ECX_PDCM | LEAF1_ECX_DTES64);
            regs.edx &= !LEAF1_EDX_DS;
        }
        LEAF_ARCH_PERFMON | LEAF_EXT_PERFMON => *regs = CpuidRegs::default(),
        LEAF_EXT_FEATURES => {
            regs.ecx &= !(EXT_ECX_PERFCTR_CORE | EXT_ECX_PERFCTR_NB | EXT_ECX_PERFCTR_LLC);
        }
        _ => {}
    }
}

/// Raises a max-leaf value in EAX to at least `needed`.
pub(crate) fn raise_max_leaf(regs: &mut CpuidRegs, needed: u32) {
    regs.eax = regs.eax.max(needed);
}
