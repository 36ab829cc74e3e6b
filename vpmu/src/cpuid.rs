//! CPUID leaves that advertise exactly the model, or no PMU at all.
//!
//! Call [`apply`] on every entry the VMM gives the guest (after KVM's
//! supported values are in place). Make sure every leaf of
//! [`leaves_required`] exists first: KVM's supported list may lack some
//! (0x8000_0022 on older hosts), and a missing leaf cannot advertise.

use crate::model::PmuModel;
use crate::vendor;
pub use crate::x86::{
    CpuidRegs, Leaf, EXT_ECX_PERFCTR_CORE, EXT_ECX_PERFCTR_LLC, EXT_ECX_PERFCTR_NB,
    LEAF1_ECX_DTES64, LEAF1_ECX_PDCM, LEAF1_EDX_DS, LEAF_ARCH_PERFMON, LEAF_EXT_FEATURES,
    LEAF_EXT_PERFMON,
};

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
