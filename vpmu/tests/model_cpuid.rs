//! Models: validation, host-derived models, MSR ranges, CPUID.

mod common;

use common::*;
use vpmu::cpuid::{self, CpuidRegs};
use vpmu::{
    AmdFeatures, HostCpuid, HostFacts, IntelFeatures, ModelError, MsrRange, PmuModel, Vendor,
};

fn regs(eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidRegs {
    CpuidRegs { eax, ebx, ecx, edx }
}

#[test]
fn impossible_models_are_rejected_with_the_rule() {
    let cases: Vec<(PmuModel, &str)> = vec![
        (amd_legacy().with_version(2), "needs PerfCtrExtCore"),
        (amd_v2(7), "1 to 6"),
        (amd_v2(0), "1 to 6"),
        (amd_core().with_gp_counters(4), "exactly 6"),
        (amd_legacy().with_gp_counters(6), "exactly 4"),
        (amd_legacy().with_version(3), "PerfMonV2"),
        (PmuModel::new(1, 4, 40, AmdFeatures::default()), "48"),
        (intel(2).with_version(0), "for no PMU give no model"),
        (intel(2).with_version(5), "1 to 4"),
        (
            intel_with(1, IntelFeatures::default().with_fixed_counters(2)),
            "need version 2",
        ),
        (
            intel_with(2, intel_features(2).with_fixed_counters(4)),
            "at most 3",
        ),
        (intel(2).with_gp_counters(9), "1 to 8"),
        (
            PmuModel::new(2, 4, 31, IntelFeatures::default()),
            "32 to 48",
        ),
        (
            intel_with(
                2,
                IntelFeatures {
                    fixed_width: 49,
                    ..intel_features(2)
                },
            ),
            "or 0 without fixed counters",
        ),
        (
            intel_with(
                2,
                IntelFeatures {
                    pdcm: false,
                    ..intel_features(2)
                },
            ),
            "need PDCM",
        ),
        (
            intel_with(
                2,
                IntelFeatures {
                    unavailable_events: 0x80,
                    ..intel_features(2)
                },
            ),
            "7 architectural",
        ),
    ];
    for (model, rule) in cases {
        let error = model.validate().expect_err(rule).to_string();
        assert!(error.contains(rule), "{error:?} should mention {rule:?}");
    }
    let mut old = intel(2);
    old.format = 9;
    assert_eq!(old.validate(), Err(ModelError::Format(9)));
    // A user's shape cannot give AMD fixed counters.
    let error = amd_v2(6).shaped(None, None, Some(1)).unwrap_err();
    assert!(error.to_string().contains("no fixed counters"), "{error:?}");
}

#[test]
fn one_vendors_features_cannot_be_given_to_the_other() {
    // The vendor is the variant of the features: a model of one vendor
    // with the other's features does not even deserialize.
    let amd_with_pdcm = r#"{"format": 2, "vendor": "amd", "version": 1, "gp_counters": 4,
        "gp_width": 48, "features": {"perfctr_core": false, "pdcm": true}}"#;
    let intel_with_core = r#"{"format": 2, "vendor": "intel", "version": 2, "gp_counters": 4,
        "gp_width": 48, "features": {"perfctr_core": true}}"#;
    for (json, field) in [(amd_with_pdcm, "pdcm"), (intel_with_core, "perfctr_core")] {
        let error = serde_json::from_str::<PmuModel>(json).unwrap_err();
        assert!(error.to_string().contains(field), "{error}");
    }
    // Format 1 (flat, with amd_/intel_ fields) is refused, not misread.
    let format_1 = r#"{"format": 1, "vendor": "amd", "version": 2, "gp_counters": 6,
        "gp_width": 48, "fixed_counters": 0, "fixed_width": 0, "amd_perfctr_core": true,
        "intel_pdcm": false, "intel_full_width_writes": false, "intel_unavailable_events": 0}"#;
    assert!(serde_json::from_str::<PmuModel>(format_1).is_err());
}

#[test]
fn valid_models_pass() {
    for model in all_models() {
        model.validate().unwrap();
    }
}

#[test]
fn without_hardware_events_the_best_model_is_fully_emulated() {
    let host = HostFacts::default();
    let amd = PmuModel::best_for_host(Vendor::Amd, &host);
    assert_eq!(amd, amd_v2(6));
    let intel_model = PmuModel::best_for_host(Vendor::Intel, &host);
    assert_eq!(
        (
            intel_model.version,
            intel_model.gp_counters,
            intel_model.fixed_counters()
        ),
        (4, 4, 3)
    );
    assert!(intel_model.intel().unwrap().full_width_writes);
    intel_model.validate().unwrap();
}

#[test]
fn with_hardware_events_the_host_pmu_is_mirrored_and_clamped() {
    let host = |cpuid: HostCpuid, fw: bool| HostFacts {
        hardware_events: true,
        cpuid: Some(cpuid),
        intel_full_width_writes: fw,
    };
    let amd = |ecx: u32, leaf22: CpuidRegs| {
        PmuModel::best_for_host(
            Vendor::Amd,
            &host(
                HostCpuid {
                    ext_features_ecx: ecx,
                    leaf_0x8000_0022: leaf22,
                    ..Default::default()
                },
                false,
            ),
        )
    };
    assert_eq!(amd(0, CpuidRegs::default()), amd_legacy());
    assert_eq!(amd(1 << 23, CpuidRegs::default()), amd_core());
    assert_eq!(amd(1 << 23, regs(1, 5, 0, 0)), amd_v2(5));
    assert_eq!(amd(1 << 23, regs(1, 0xF, 0, 0)), amd_v2(6));

    // Sapphire-Rapids-like leaf 0xA: v5, 8 gp x 48, 4 fixed x 48.
    let leaf = regs(0x0730_0805, 0x0000_0004, 0xF, 0x0000_8604);
    let model = PmuModel::best_for_host(
        Vendor::Intel,
        &host(
            HostCpuid {
                leaf_0xa: leaf,
                ..Default::default()
            },
            true,
        ),
    );
    assert_eq!(
        (model.version, model.gp_counters, model.gp_width),
        (4, 8, 48)
    );
    assert_eq!(
        model.features,
        IntelFeatures {
            fixed_counters: 3,
            fixed_width: 48,
            pdcm: true,
            full_width_writes: true,
            unavailable_events: 0x4,
        }
        .into()
    );
    model.validate().unwrap();
}

#[test]
fn msr_ranges_cover_the_vendors_whole_pmu_range_whatever_the_model() {
    // What a model lacks must fault as on hardware of its shape, so the
    // ranges do not shrink with it.
    let r = |base, count| MsrRange { base, count };
    let amd = vec![r(0xC000_0300, 4), r(0xC001_0000, 8), r(0xC001_0200, 12)];
    for model in [amd_legacy(), amd_core(), amd_v2(1), amd_v2(3)] {
        assert_eq!(model.msr_ranges(), amd, "{model:?}");
    }
    let intel_ranges = vec![
        r(0xC1, 8),
        r(0x186, 8),
        r(0x309, 4),
        r(0x345, 1),
        r(0x38D, 6),
        r(0x4C1, 8),
    ];
    let no_pdcm = PmuModel::new(2, 2, 48, IntelFeatures::default().with_fixed_counters(3));
    for model in [intel(1), no_pdcm, intel(4)] {
        assert_eq!(model.msr_ranges(), intel_ranges, "{model:?}");
    }
}

#[test]
fn every_msr_of_the_ranges_decodes_or_faults_consistently() {
    // Each model register lies in a range; every range MSR outside the
    // model faults instead of reaching KVM.
    for model in [
        amd_legacy(),
        amd_core(),
        amd_v2(3),
        intel(1),
        intel(2),
        intel(4),
    ] {
        let mut pmu = vpmu(model.clone(), false);
        let ranges = model.msr_ranges();
        for range in &ranges {
            for msr in range.base..range.base + range.count {
                let _ = pmu.rdmsr(msr);
            }
        }
        let probes = [
            0xC1,
            0x186,
            0x309,
            0x345,
            0x38D,
            0x391,
            0x4C1,
            0xC001_0000,
            0xC001_0200,
            0xC000_0300,
        ];
        for msr in probes {
            if pmu.rdmsr(msr).is_ok() {
                assert!(
                    ranges.iter().any(|r| r.contains(msr)),
                    "{model:?}: {msr:#x} not trapped"
                );
            }
        }
    }
}

#[test]
fn intel_cpuid_advertises_the_model() {
    let model = intel_with(
        4,
        IntelFeatures {
            unavailable_events: 0b100,
            ..intel_features(4)
        },
    );
    let mut leaf_a = regs(0x0730_0805, 0, 0xF, 0x8604);
    cpuid::apply(Some(&model), 0xA, 0, &mut leaf_a);
    assert_eq!(leaf_a, regs(0x0730_0404, 0b100, 0, 0x0603));
    let mut leaf1 = regs(0, 0, 0, 1 << 21);
    cpuid::apply(Some(&model), 1, 0, &mut leaf1);
    assert_eq!(leaf1, regs(0, 0, 1 << 15, 0), "PDCM set, DS cleared");
    let mut leaf0 = regs(7, 0x756E_6547, 0x6C65_746E, 0x4965_6E69);
    cpuid::apply(Some(&model), 0, 0, &mut leaf0);
    assert_eq!(leaf0.eax, 0xA);
    let mut v1 = regs(0, 0, 0, 0xFFFF);
    cpuid::apply(Some(&intel(1)), 0xA, 0, &mut v1);
    assert_eq!(
        v1,
        regs(0x0730_0401, 0, 0, 0),
        "v1 reports no fixed counters"
    );
    let mut amd_bits = regs(0, 0, 0x1180_0000, 0);
    cpuid::apply(Some(&model), 0x8000_0001, 0, &mut amd_bits);
    assert_eq!(amd_bits.ecx, 0, "AMD PMU bits cleared on Intel");
    assert_eq!(
        cpuid::leaves_required(Some(&model)),
        &[(0, 0), (1, 0), (0xA, 0)]
    );
}

#[test]
fn amd_cpuid_advertises_the_model() {
    let mut ext = regs(0, 0, 0x1180_0001, 0);
    cpuid::apply(Some(&amd_v2(5)), 0x8000_0001, 0, &mut ext);
    assert_eq!(
        ext.ecx, 0x0080_0001,
        "PerfCtrExtCore kept, NB and LLC cleared"
    );
    let mut leaf22 = regs(0x7, 0x1234_5676, 1, 1);
    cpuid::apply(Some(&amd_v2(5)), 0x8000_0022, 0, &mut leaf22);
    assert_eq!(leaf22, regs(1, 5, 0, 0));
    let mut max = regs(0x8000_0021, 0, 0, 0);
    cpuid::apply(Some(&amd_v2(5)), 0x8000_0000, 0, &mut max);
    assert_eq!(max.eax, 0x8000_0022);
    let mut leaf22 = regs(1, 6, 0, 0);
    cpuid::apply(Some(&amd_core()), 0x8000_0022, 0, &mut leaf22);
    assert_eq!(
        leaf22,
        CpuidRegs::default(),
        "no PerfMonV2 without version 2"
    );
    let mut leaf_a = regs(0x0730_0805, 0, 0, 0x603);
    cpuid::apply(Some(&amd_core()), 0xA, 0, &mut leaf_a);
    assert_eq!(leaf_a, CpuidRegs::default());
    assert_eq!(
        cpuid::leaves_required(Some(&amd_v2(6))),
        &[(0x8000_0000, 0), (0x8000_0001, 0), (0x8000_0022, 0)]
    );
    assert_eq!(
        cpuid::leaves_required(Some(&amd_legacy())),
        &[(0x8000_0001, 0)]
    );
}

#[test]
fn no_model_advertises_no_pmu() {
    let cases = [
        (0xA, regs(0x0730_0805, 4, 0xF, 0x8604), CpuidRegs::default()),
        (
            1,
            regs(1, 2, (1 << 15) | (1 << 2) | 1, (1 << 21) | 1),
            regs(1, 2, 1, 1),
        ),
        (0x8000_0001, regs(0, 0, 0x1180_0001, 0), regs(0, 0, 1, 0)),
        (0x8000_0022, regs(1, 6, 0, 0), CpuidRegs::default()),
        (
            0x8000_0000,
            regs(0x8000_0028, 0, 0, 0),
            regs(0x8000_0028, 0, 0, 0),
        ),
    ];
    for (leaf, mut given, expected) in cases {
        cpuid::apply(None, leaf, 0, &mut given);
        assert_eq!(given, expected, "leaf {leaf:#x}");
    }
    assert!(cpuid::leaves_required(None).is_empty());
}

#[test]
fn models_round_trip_through_json() {
    for model in [amd_legacy(), amd_v2(4), intel(1), intel(4)] {
        let json = serde_json::to_string(&model).unwrap();
        assert_eq!(serde_json::from_str::<PmuModel>(&json).unwrap(), model);
    }
    assert_eq!(
        serde_json::to_value(amd_v2(4)).unwrap(),
        serde_json::json!({
            "format": 2, "vendor": "amd", "version": 2, "gp_counters": 4, "gp_width": 48,
            "features": {"perfctr_core": true}
        })
    );
    assert_eq!(
        serde_json::to_value(intel(4)).unwrap(),
        serde_json::json!({
            "format": 2, "vendor": "intel", "version": 4, "gp_counters": 4, "gp_width": 48,
            "features": {"fixed_counters": 3, "fixed_width": 48, "pdcm": true,
                         "full_width_writes": true, "unavailable_events": 0}
        })
    );
}
