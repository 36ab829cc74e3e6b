//! AMD register semantics, MSR by MSR (APM vol. 2 ch. 13; reserved-bit
//! handling as the AMD PPRs and KVM's svm/pmu.c: writes drop them).

mod common;

use common::*;
use vpmu::evtsel::{EN, INT, OS, USR};
use vpmu::msr::*;
use vpmu::Fault;

const CTL_VALID: u64 = 0x0000_030F_FFD7_FFFF;

#[test]
fn legacy_model_has_exactly_the_k7_msrs() {
    let mut pmu = vpmu(amd_legacy(), true);
    for n in 0..4 {
        pmu.wrmsr(AMD_K7_PERF_CTL0 + n, 0x76 + n as u64).unwrap();
        pmu.wrmsr(AMD_K7_PERF_CTR0 + n, 1000 + n as u64).unwrap();
        assert_eq!(pmu.rdmsr(AMD_K7_PERF_CTL0 + n), Ok(0x76 + n as u64));
        assert_eq!(pmu.rdmsr(AMD_K7_PERF_CTR0 + n), Ok(1000 + n as u64));
    }
    for msr in [
        AMD_K7_PERF_CTR0 + 4,
        AMD_PERF_CTL0,
        AMD_PERF_CTL0 + 1,
        AMD_GLOBAL_STATUS,
        AMD_GLOBAL_CTL,
        0xC1,
        0x186,
    ] {
        assert_eq!(pmu.rdmsr(msr), Err(Fault::NotInModel(msr)), "{msr:#x}");
        assert_eq!(pmu.wrmsr(msr, 0), Err(Fault::NotInModel(msr)), "{msr:#x}");
    }
    assert_eq!(pmu.stats().faults, 14);
    assert_eq!(pmu.stats().rdmsr.unknown, 7);
}

#[test]
fn perfctr_core_msrs_alias_the_legacy_ones() {
    let mut pmu = vpmu(amd_core(), true);
    pmu.wrmsr(AMD_K7_PERF_CTL0 + 2, 0xC0).unwrap();
    assert_eq!(pmu.rdmsr(AMD_PERF_CTL0 + 4), Ok(0xC0));
    pmu.wrmsr(AMD_PERF_CTL0 + 7, 0x1234).unwrap(); // PERF_CTR3
    assert_eq!(pmu.rdmsr(AMD_K7_PERF_CTR0 + 3), Ok(0x1234));
    pmu.wrmsr(AMD_PERF_CTL0 + 10, 0x76).unwrap(); // PERF_CTL5 has no alias
    assert_eq!(pmu.rdmsr(AMD_PERF_CTL0 + 10), Ok(0x76));
    assert_eq!(
        pmu.rdmsr(AMD_PERF_CTL0 + 12),
        Err(Fault::NotInModel(AMD_PERF_CTL0 + 12))
    );
    assert_eq!(
        pmu.rdmsr(AMD_GLOBAL_CTL),
        Err(Fault::NotInModel(AMD_GLOBAL_CTL))
    );
}

#[test]
fn counters_beyond_the_model_fault_in_both_ranges() {
    let mut pmu = vpmu(amd_v2(3), true);
    assert!(pmu.rdmsr(AMD_K7_PERF_CTL0 + 2).is_ok());
    for msr in [
        AMD_K7_PERF_CTL0 + 3,
        AMD_K7_PERF_CTR0 + 3,
        AMD_PERF_CTL0 + 6,
        AMD_PERF_CTL0 + 7,
    ] {
        assert_eq!(pmu.wrmsr(msr, 0), Err(Fault::NotInModel(msr)));
    }
}

#[test]
fn event_select_drops_reserved_bits() {
    let mut pmu = vpmu(amd_v2(6), true);
    for bit in 0..64 {
        pmu.wrmsr(AMD_PERF_CTL0, 1 << bit).unwrap();
        let expected = (1u64 << bit) & CTL_VALID;
        assert_eq!(pmu.rdmsr(AMD_PERF_CTL0), Ok(expected), "bit {bit}");
    }
    pmu.wrmsr(AMD_PERF_CTL0, u64::MAX).unwrap();
    assert_eq!(pmu.rdmsr(AMD_PERF_CTL0), Ok(CTL_VALID));
    assert_eq!(pmu.stats().faults, 0);
}

#[test]
fn counter_writes_truncate_to_48_bits_and_wrap() {
    let mut pmu = vpmu(amd_core(), true);
    pmu.wrmsr(AMD_K7_PERF_CTR0, u64::MAX).unwrap();
    assert_eq!(pmu.rdmsr(AMD_K7_PERF_CTR0), Ok(M48));
    pmu.wrmsr(AMD_K7_PERF_CTR0, M48 - 9).unwrap();
    pmu.wrmsr(AMD_K7_PERF_CTL0, 0x76 | USR | OS | EN).unwrap();
    count_hw(&mut pmu, 15);
    assert_eq!(pmu.rdmsr(AMD_K7_PERF_CTR0), Ok(5));
    assert_eq!(pmu.stats().overflows, 1);
    assert!(!pmu.take_pending_pmi(), "no INT, no PMI");
}

#[test]
fn global_registers_follow_perfmon_v2() {
    let mut pmu = vpmu(amd_v2(4), true);
    assert_eq!(
        pmu.rdmsr(AMD_GLOBAL_CTL),
        Ok(0xF),
        "reset value enables every counter"
    );
    pmu.wrmsr(AMD_GLOBAL_CTL, u64::MAX).unwrap();
    assert_eq!(pmu.rdmsr(AMD_GLOBAL_CTL), Ok(0xF), "reserved bits dropped");
    pmu.wrmsr(AMD_GLOBAL_STATUS, 0xF).unwrap();
    assert_eq!(
        pmu.rdmsr(AMD_GLOBAL_STATUS),
        Ok(0),
        "read-only: the write is ignored"
    );
    pmu.wrmsr(AMD_GLOBAL_STATUS_SET, u64::MAX).unwrap();
    assert_eq!(
        pmu.rdmsr(AMD_GLOBAL_STATUS),
        Ok(0xF),
        "SET sets the counter bits only"
    );
    pmu.wrmsr(AMD_GLOBAL_STATUS_CLR, 0x5).unwrap();
    assert_eq!(pmu.rdmsr(AMD_GLOBAL_STATUS), Ok(0xA));
    pmu.wrmsr(AMD_GLOBAL_STATUS_CLR, u64::MAX).unwrap(); // Linux writes ~status
    assert_eq!(pmu.rdmsr(AMD_GLOBAL_STATUS), Ok(0));
    assert_eq!(pmu.rdmsr(AMD_GLOBAL_STATUS_CLR), Ok(0));
    assert_eq!(pmu.rdmsr(AMD_GLOBAL_STATUS_SET), Ok(0));
    assert_eq!(pmu.stats().faults, 0);
}

#[test]
fn a_v2_counter_runs_only_with_en_and_its_global_bit() {
    let mut pmu = vpmu(amd_v2(6), true);
    pmu.wrmsr(AMD_GLOBAL_CTL, 0).unwrap();
    pmu.wrmsr(AMD_PERF_CTL0, 0x76 | USR | OS | EN).unwrap();
    count_hw(&mut pmu, 100);
    assert_eq!(pmu.rdmsr(AMD_PERF_CTL0 + 1), Ok(0), "global bit clear");
    pmu.wrmsr(AMD_GLOBAL_CTL, 1).unwrap();
    count_hw(&mut pmu, 100);
    assert_eq!(pmu.rdmsr(AMD_PERF_CTL0 + 1), Ok(100));
    pmu.wrmsr(AMD_PERF_CTL0, 0x76 | USR | OS).unwrap();
    count_hw(&mut pmu, 100);
    assert_eq!(pmu.rdmsr(AMD_PERF_CTL0 + 1), Ok(100), "EN clear");
    pmu.wrmsr(AMD_PERF_CTL0, 0x76 | EN).unwrap();
    count_hw(&mut pmu, 100);
    assert_eq!(
        pmu.rdmsr(AMD_PERF_CTL0 + 1),
        Ok(100),
        "neither USR nor OS: counts nothing"
    );
}

#[test]
fn overflow_sets_status_and_raises_a_pmi_with_int() {
    let mut pmu = vpmu(amd_v2(6), true);
    pmu.wrmsr(AMD_PERF_CTL0 + 3, M48 - 99).unwrap(); // PERF_CTR1
    pmu.wrmsr(AMD_PERF_CTL0 + 2, 0xC0 | USR | OS | INT | EN)
        .unwrap();
    count_hw(&mut pmu, 99);
    pmu.handle_host_overflow();
    assert!(!pmu.take_pending_pmi());
    assert_eq!(pmu.rdmsr(AMD_GLOBAL_STATUS), Ok(0));
    count_hw(&mut pmu, 2);
    pmu.handle_host_overflow();
    assert!(pmu.take_pending_pmi());
    assert!(!pmu.take_pending_pmi(), "taken once");
    assert_eq!(pmu.rdmsr(AMD_GLOBAL_STATUS), Ok(0b10));
    assert_eq!(pmu.rdmsr(AMD_PERF_CTL0 + 3), Ok(1));
}

#[test]
fn legacy_overflow_has_no_status_but_raises_the_pmi() {
    let mut pmu = vpmu(amd_legacy(), true);
    pmu.wrmsr(AMD_K7_PERF_CTR0, M48).unwrap();
    pmu.wrmsr(AMD_K7_PERF_CTL0, 0x76 | OS | INT | EN).unwrap();
    count_hw(&mut pmu, 1);
    pmu.handle_host_overflow();
    assert!(pmu.take_pending_pmi());
    assert_eq!(pmu.rdmsr(AMD_K7_PERF_CTR0), Ok(0));
}
