//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod signals;

use vpmu::backend::fake::FakeBackend;
use vpmu::evtsel::{EN, OS, USR};
use vpmu::{AmdFeatures, EventPolicy, GuestClock, IntelFeatures, PmuModel, Vpmu};

/// 3 GHz guest TSC.
pub const TSC_KHZ: u32 = 3_000_000;
pub const M48: u64 = (1 << 48) - 1;

/// Core cycles (AMD event 0x76), user and kernel, enabled.
pub const CYCLES: u64 = 0x76 | USR | OS | EN;
/// Retired instructions (AMD event 0xC0), user and kernel, enabled.
pub const INSTRUCTIONS: u64 = 0xC0 | USR | OS | EN;

pub fn amd_legacy() -> PmuModel {
    PmuModel::new(1, 4, 48, AmdFeatures::default())
}

pub fn amd_core() -> PmuModel {
    PmuModel::new(1, 6, 48, AmdFeatures { perfctr_core: true })
}

pub fn amd_v2(counters: u8) -> PmuModel {
    amd_core().with_version(2).with_gp_counters(counters)
}

/// The Intel features of [`intel`]`(version)`: from version 2, 3 fixed
/// counters and full-width writes.
pub fn intel_features(version: u8) -> IntelFeatures {
    match version {
        1 => IntelFeatures::default(),
        _ => IntelFeatures {
            pdcm: true,
            full_width_writes: true,
            ..IntelFeatures::default().with_fixed_counters(3)
        },
    }
}

/// An Intel model with 4 general-purpose counters of 48 bits.
pub fn intel_with(version: u8, features: IntelFeatures) -> PmuModel {
    PmuModel::new(version, 4, 48, features)
}

pub fn intel(version: u8) -> PmuModel {
    intel_with(version, intel_features(version))
}

/// One model of every kind.
pub fn all_models() -> Vec<PmuModel> {
    vec![
        amd_legacy(),
        amd_core(),
        amd_v2(1),
        amd_v2(6),
        intel(1),
        intel(2),
        intel(3),
        intel(4),
    ]
}

/// A vPMU on a fake host with (`hardware`) or without a hardware PMU.
pub fn vpmu(model: PmuModel, hardware: bool) -> Vpmu<FakeBackend> {
    vpmu_with(model, hardware, EventPolicy::allow_all())
}

pub fn vpmu_with(model: PmuModel, hardware: bool, policy: EventPolicy) -> Vpmu<FakeBackend> {
    Vpmu::new(
        model,
        policy,
        FakeBackend::new(hardware),
        GuestClock::new(TSC_KHZ),
    )
    .expect("valid model")
}

/// Lets every running hardware event count `events`.
pub fn count_hw(vpmu: &mut Vpmu<FakeBackend>, events: u64) {
    vpmu.backend_mut().advance(true, events);
}

/// Runs the guest for `ns` of host task-clock time, through the hooks.
pub fn run_guest(vpmu: &mut Vpmu<FakeBackend>, ns: u64) {
    vpmu.on_guest_entry();
    vpmu.backend_mut().advance(false, ns);
    vpmu.on_guest_exit();
}

/// Spends `ns` of host task-clock time in the VMM (between exit and entry).
pub fn run_vmm(vpmu: &mut Vpmu<FakeBackend>, ns: u64) {
    vpmu.backend_mut().advance(false, ns);
}

/// AMD `PERF_CTLn` (PerfCtrExtCore numbering).
pub fn amd_ctl(n: u32) -> u32 {
    vpmu::msr::AMD_PERF_CTL0 + 2 * n
}

/// AMD `PERF_CTRn` (PerfCtrExtCore numbering).
pub fn amd_ctr(n: u32) -> u32 {
    vpmu::msr::AMD_PERF_CTL0 + 2 * n + 1
}
