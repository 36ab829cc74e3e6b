//! Intel register semantics, MSR by MSR (SDM vol. 3 ch. 20, vol. 4): every
//! reserved bit and read-only register faults.

mod common;

use common::*;
use vpmu::evtsel::{ANY, EN, INT, OS, USR};
use vpmu::msr::*;
use vpmu::{Fault, IntelFeatures, PmuModel};

/// Valid EVTSEL bits before v3 (no AnyThread).
const EVTSEL_VALID_V2: u64 = 0xFFDF_FFFF;

fn reserved(msr: u32, value: u64, reserved: u64) -> Result<(), Fault> {
    Err(Fault::ReservedBits {
        msr,
        value,
        reserved,
    })
}

#[test]
fn version_1_has_only_pmcs_and_event_selects() {
    let mut pmu = vpmu(intel(1), true);
    for n in 0..4 {
        pmu.wrmsr(INTEL_PERFEVTSEL0 + n, 0x3C).unwrap();
        pmu.wrmsr(INTEL_PMC0 + n, 7).unwrap();
        assert_eq!(pmu.rdmsr(INTEL_PMC0 + n), Ok(7));
    }
    for msr in [
        INTEL_PMC0 + 4,
        INTEL_PERFEVTSEL0 + 4,
        INTEL_FIXED_CTR0,
        INTEL_FIXED_CTR_CTRL,
        INTEL_GLOBAL_STATUS,
        INTEL_GLOBAL_CTRL,
        INTEL_GLOBAL_OVF_CTRL,
        INTEL_GLOBAL_STATUS_SET,
        INTEL_GLOBAL_INUSE,
        INTEL_PERF_CAPABILITIES,
        INTEL_A_PMC0,
        AMD_K7_PERF_CTL0,
    ] {
        assert_eq!(pmu.rdmsr(msr), Err(Fault::NotInModel(msr)), "{msr:#x}");
    }
}

#[test]
fn every_reserved_event_select_bit_faults() {
    for version in [2, 3] {
        let mut pmu = vpmu(intel(version), true);
        let valid = EVTSEL_VALID_V2 | if version >= 3 { ANY } else { 0 };
        for bit in 0..64 {
            let value = 1u64 << bit;
            let result = pmu.wrmsr(INTEL_PERFEVTSEL0 + 1, value);
            if value & valid != 0 {
                assert_eq!(result, Ok(()), "v{version} bit {bit}");
                assert_eq!(pmu.rdmsr(INTEL_PERFEVTSEL0 + 1), Ok(value));
            } else {
                assert_eq!(
                    result,
                    reserved(INTEL_PERFEVTSEL0 + 1, value, value),
                    "v{version} bit {bit}"
                );
            }
        }
    }
}

#[test]
fn legacy_pmc_writes_sign_extend_bit_31() {
    let mut pmu = vpmu(intel(2), true);
    pmu.wrmsr(INTEL_PMC0, 0x8000_0000).unwrap();
    assert_eq!(pmu.rdmsr(INTEL_PMC0), Ok(0xFFFF_8000_0000));
    pmu.wrmsr(INTEL_PMC0, 0x7FFF_FFFF).unwrap();
    assert_eq!(pmu.rdmsr(INTEL_PMC0), Ok(0x7FFF_FFFF));
    pmu.wrmsr(INTEL_PMC0, 0xFFFF_FFFF_0000_0001).unwrap();
    assert_eq!(
        pmu.rdmsr(INTEL_PMC0),
        Ok(1),
        "bits 63:32 of the value are ignored"
    );
    assert_eq!(
        pmu.rdmsr(INTEL_A_PMC0),
        Ok(1),
        "A_PMC reads the same counter"
    );
}

#[test]
fn narrow_counters_sign_extend_to_their_width() {
    let model = PmuModel::new(2, 2, 40, IntelFeatures::default());
    let mut pmu = vpmu(model, true);
    pmu.wrmsr(INTEL_PMC0, 0x8000_0000).unwrap();
    assert_eq!(pmu.rdmsr(INTEL_PMC0), Ok(0xFF_8000_0000));
}

#[test]
fn full_width_writes_take_the_width_and_fault_above_it() {
    let mut pmu = vpmu(intel(2), true);
    pmu.wrmsr(INTEL_A_PMC0 + 3, 0xFFFF_0000_0001).unwrap();
    assert_eq!(pmu.rdmsr(INTEL_PMC0 + 3), Ok(0xFFFF_0000_0001));
    let too_wide = 1u64 << 48;
    assert_eq!(
        pmu.wrmsr(INTEL_A_PMC0 + 3, too_wide | 5),
        reserved(INTEL_A_PMC0 + 3, too_wide | 5, too_wide)
    );
    assert_eq!(
        pmu.rdmsr(INTEL_PMC0 + 3),
        Ok(0xFFFF_0000_0001),
        "a faulting write changes nothing"
    );
    let pdcm_only = IntelFeatures {
        full_width_writes: false,
        ..intel_features(2)
    };
    let mut no_fw = vpmu(intel_with(2, pdcm_only), true);
    assert_eq!(
        no_fw.wrmsr(INTEL_A_PMC0, 1),
        Err(Fault::NotInModel(INTEL_A_PMC0))
    );
    assert_eq!(no_fw.rdmsr(INTEL_PERF_CAPABILITIES), Ok(0));
}

#[test]
fn perf_capabilities_is_read_only_and_needs_pdcm() {
    let mut pmu = vpmu(intel(2), true);
    assert_eq!(
        pmu.rdmsr(INTEL_PERF_CAPABILITIES),
        Ok(PERF_CAP_FULL_WIDTH_WRITE)
    );
    assert_eq!(
        pmu.wrmsr(INTEL_PERF_CAPABILITIES, 0),
        Err(Fault::ReadOnly(INTEL_PERF_CAPABILITIES))
    );
    let mut no_pdcm = vpmu(intel_with(2, IntelFeatures::default()), true);
    assert_eq!(
        no_pdcm.rdmsr(INTEL_PERF_CAPABILITIES),
        Err(Fault::NotInModel(INTEL_PERF_CAPABILITIES))
    );
}

#[test]
fn fixed_counters_truncate_and_wrap() {
    let mut pmu = vpmu(intel(2), true);
    pmu.wrmsr(INTEL_FIXED_CTR0 + 1, u64::MAX).unwrap();
    assert_eq!(pmu.rdmsr(INTEL_FIXED_CTR0 + 1), Ok(M48));
    pmu.wrmsr(INTEL_FIXED_CTR_CTRL, 0b0011 << 4).unwrap(); // fixed 1: OS|USR
    count_hw(&mut pmu, 3);
    assert_eq!(
        pmu.rdmsr(INTEL_FIXED_CTR0 + 1),
        Ok(M48),
        "fixed enables are clear at reset"
    );
    pmu.wrmsr(INTEL_GLOBAL_CTRL, 1 << 33).unwrap();
    count_hw(&mut pmu, 3);
    assert_eq!(pmu.rdmsr(INTEL_FIXED_CTR0 + 1), Ok(2));
    assert_eq!(pmu.rdmsr(INTEL_GLOBAL_STATUS), Ok(1 << 33));
    assert_eq!(
        pmu.rdmsr(INTEL_FIXED_CTR0 + 3),
        Err(Fault::NotInModel(INTEL_FIXED_CTR0 + 3))
    );
}

#[test]
fn every_reserved_fixed_ctrl_bit_faults() {
    for version in [2, 3] {
        let model = intel_with(version, IntelFeatures::default().with_fixed_counters(2));
        let mut pmu = vpmu(model, true);
        let field = if version >= 3 { 0xF } else { 0xB };
        let valid = field | field << 4;
        for bit in 0..64 {
            let value = 1u64 << bit;
            let result = pmu.wrmsr(INTEL_FIXED_CTR_CTRL, value);
            match value & valid {
                0 => assert_eq!(
                    result,
                    reserved(INTEL_FIXED_CTR_CTRL, value, value),
                    "v{version} bit {bit}"
                ),
                _ => assert_eq!(result, Ok(()), "v{version} bit {bit}"),
            }
        }
    }
}

#[test]
fn global_ctrl_resets_with_gp_enables_and_faults_on_reserved_bits() {
    let mut pmu = vpmu(intel(2), true);
    assert_eq!(pmu.rdmsr(INTEL_GLOBAL_CTRL), Ok(0xF));
    let valid = 0xF | 0x7 << 32;
    pmu.wrmsr(INTEL_GLOBAL_CTRL, valid).unwrap();
    assert_eq!(pmu.rdmsr(INTEL_GLOBAL_CTRL), Ok(valid));
    for bit in (0..64).filter(|b| valid & (1 << b) == 0) {
        let value = 1u64 << bit;
        assert_eq!(
            pmu.wrmsr(INTEL_GLOBAL_CTRL, value),
            reserved(INTEL_GLOBAL_CTRL, value, value),
            "bit {bit}"
        );
    }
    assert_eq!(pmu.rdmsr(INTEL_GLOBAL_CTRL), Ok(valid));
}

#[test]
fn global_status_is_read_only_and_cleared_through_ovf_ctrl() {
    let mut pmu = vpmu(intel(4), true);
    assert_eq!(
        pmu.wrmsr(INTEL_GLOBAL_STATUS, 1),
        Err(Fault::ReadOnly(INTEL_GLOBAL_STATUS))
    );
    pmu.wrmsr(INTEL_GLOBAL_STATUS_SET, 0b101 | 1 << 34 | 1 << 62)
        .unwrap();
    assert_eq!(
        pmu.rdmsr(INTEL_GLOBAL_STATUS),
        Ok(0b101 | 1 << 34 | 1 << 62)
    );
    assert_eq!(pmu.rdmsr(INTEL_GLOBAL_STATUS_SET), Ok(0));
    pmu.wrmsr(INTEL_GLOBAL_OVF_CTRL, 0b001 | 1 << 62).unwrap();
    assert_eq!(pmu.rdmsr(INTEL_GLOBAL_STATUS), Ok(0b100 | 1 << 34));
    assert_eq!(pmu.rdmsr(INTEL_GLOBAL_OVF_CTRL), Ok(0));
    let value = 1u64 << 35;
    assert_eq!(
        pmu.wrmsr(INTEL_GLOBAL_OVF_CTRL, value),
        reserved(INTEL_GLOBAL_OVF_CTRL, value, value)
    );
    assert_eq!(
        pmu.wrmsr(INTEL_GLOBAL_STATUS_SET, value),
        reserved(INTEL_GLOBAL_STATUS_SET, value, value)
    );
}

#[test]
fn status_flag_bits_depend_on_the_version() {
    let flag_ok = |version: u8, bit: u32| {
        let mut pmu = vpmu(intel(version), true);
        pmu.wrmsr(INTEL_GLOBAL_OVF_CTRL, 1 << bit).is_ok()
    };
    for bit in [62, 63] {
        assert!(flag_ok(2, bit) && flag_ok(3, bit) && flag_ok(4, bit));
    }
    assert!(!flag_ok(2, 61) && flag_ok(3, 61) && flag_ok(4, 61));
    for bit in [55, 58, 59, 60] {
        assert!(!flag_ok(3, bit) && flag_ok(4, bit), "bit {bit}");
    }
    for bit in [4, 31, 35, 40, 54, 56, 57] {
        assert!(!flag_ok(4, bit), "bit {bit}");
    }
}

#[test]
fn version_4_registers_exist_only_in_version_4() {
    let mut v3 = vpmu(intel(3), true);
    assert_eq!(
        v3.wrmsr(INTEL_GLOBAL_STATUS_SET, 1),
        Err(Fault::NotInModel(INTEL_GLOBAL_STATUS_SET))
    );
    assert_eq!(
        v3.rdmsr(INTEL_GLOBAL_INUSE),
        Err(Fault::NotInModel(INTEL_GLOBAL_INUSE))
    );
}

#[test]
fn global_inuse_reflects_programming() {
    let mut pmu = vpmu(intel(4), true);
    assert_eq!(pmu.rdmsr(INTEL_GLOBAL_INUSE), Ok(0));
    pmu.wrmsr(INTEL_PERFEVTSEL0 + 2, 0x2E | 0x4F << 8).unwrap();
    pmu.wrmsr(INTEL_FIXED_CTR_CTRL, 0b1010 << 8).unwrap(); // fixed 2: USR|PMI
    assert_eq!(pmu.rdmsr(INTEL_GLOBAL_INUSE), Ok(0b100 | 1 << 34 | 1 << 63));
    pmu.wrmsr(INTEL_PERFEVTSEL0, INT).unwrap(); // no event: not in use, but PMI is
    pmu.wrmsr(INTEL_FIXED_CTR_CTRL, 0).unwrap();
    assert_eq!(pmu.rdmsr(INTEL_GLOBAL_INUSE), Ok(0b100 | 1 << 63));
    assert_eq!(
        pmu.wrmsr(INTEL_GLOBAL_INUSE, 0),
        Err(Fault::ReadOnly(INTEL_GLOBAL_INUSE))
    );
}

#[test]
fn counters_run_only_when_enable_bits_and_global_ctrl_agree() {
    let mut pmu = vpmu(intel(2), true);
    pmu.wrmsr(INTEL_GLOBAL_CTRL, 0).unwrap();
    pmu.wrmsr(INTEL_PERFEVTSEL0, 0xC0 | USR | OS | EN).unwrap();
    pmu.wrmsr(INTEL_FIXED_CTR_CTRL, 0b0011).unwrap();
    count_hw(&mut pmu, 10);
    assert_eq!(
        (pmu.rdmsr(INTEL_PMC0), pmu.rdmsr(INTEL_FIXED_CTR0)),
        (Ok(0), Ok(0))
    );
    pmu.wrmsr(INTEL_GLOBAL_CTRL, 1 | 1 << 32).unwrap();
    count_hw(&mut pmu, 10);
    assert_eq!(
        (pmu.rdmsr(INTEL_PMC0), pmu.rdmsr(INTEL_FIXED_CTR0)),
        (Ok(10), Ok(10))
    );
    pmu.wrmsr(INTEL_FIXED_CTR_CTRL, 0b1000).unwrap(); // PMI alone does not enable
    count_hw(&mut pmu, 10);
    assert_eq!(
        (pmu.rdmsr(INTEL_PMC0), pmu.rdmsr(INTEL_FIXED_CTR0)),
        (Ok(20), Ok(10))
    );
}

#[test]
fn version_1_counters_need_only_en() {
    let mut pmu = vpmu(intel(1), true);
    pmu.wrmsr(INTEL_PMC0, 0xFFFF_FFFF).unwrap(); // -1, sign-extended
    pmu.wrmsr(INTEL_PERFEVTSEL0, 0x3C | USR | INT | EN).unwrap();
    count_hw(&mut pmu, 2);
    assert_eq!(pmu.rdmsr(INTEL_PMC0), Ok(1));
    assert!(pmu.take_pending_pmi());
}
