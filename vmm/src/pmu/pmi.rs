//! What the run loop and the host learn of the PMIs a vCPU's vPMU
//! delivered.

use serde::{Deserialize, Serialize};

/// The host's TSC.
pub fn host_tsc() -> u64 {
    // SAFETY: RDTSC has no preconditions and touches no memory.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// One PMI the VMM delivered, as the run loop learns of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeliveredPmi {
    /// Host TSC right after the injection (0 unless PMIs are traced).
    pub injected_tsc: u64,
    /// Events the sampling counter counted past its overflow before the
    /// VMM noticed (0 unless PMIs are traced).
    pub overshoot: u64,
}

/// How PMIs reached the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmiDelivery {
    pub nmi: u64,
    pub fixed: u64,
    /// Dropped: LVTPC was masked (hardware loses them too; the status bit
    /// stays set).
    pub masked: u64,
    /// LVTPC in a mode a PMI cannot use (SMI, INIT, ExtINT...).
    pub unsupported_mode: u64,
    pub failed: u64,
    /// Intel model, xAPIC mode: LVTPC was left unmasked after a PMI (see
    /// `mask_lvtpc`).
    pub mask_skipped: u64,
}
