//! Counts that outlive counter contexts: every ended programming retires
//! its final count, exactly once, keyed by its programming id.

mod common;

use common::*;
use vpmu::evtsel::{EN, INT, OS, USR};
use vpmu::msr::*;
use vpmu::{EventTotals, ProgrammingId, Retired};

fn id(select: u64) -> ProgrammingId {
    ProgrammingId::of_select(select)
}

fn counts(retired: &[Retired]) -> Vec<(ProgrammingId, u64, u64)> {
    retired
        .iter()
        .map(|r| (r.id, r.counted, r.contexts))
        .collect()
}

#[test]
fn a_new_programming_retires_the_final_count_whatever_the_guest_wrote() {
    let mut pmu = vpmu(amd_v2(6), true);
    pmu.wrmsr(amd_ctl(0), CYCLES | INT).unwrap();
    count_hw(&mut pmu, 100);
    // A sampling guest rewrites the value; what was counted stays counted.
    pmu.wrmsr(amd_ctr(0), M48 - 9).unwrap();
    count_hw(&mut pmu, 30); // wraps: an overflow
    assert_eq!(pmu.rdmsr(amd_ctr(0)), Ok(20));
    // Toggles, INT and counter writes are no new programming.
    pmu.wrmsr(amd_ctl(0), CYCLES & !EN).unwrap();
    pmu.wrmsr(amd_ctl(0), CYCLES).unwrap();
    count_hw(&mut pmu, 5);
    assert!(!pmu.has_retired());
    let snapshot = pmu.snapshot();
    assert_eq!(snapshot.counters[0].counted, 135);
    assert_eq!(snapshot.counters[0].programming_id, id(CYCLES));
    assert!(snapshot.counters[0].ran);

    pmu.wrmsr(amd_ctl(0), INSTRUCTIONS).unwrap();
    let retired = pmu.take_retired();
    assert_eq!(counts(&retired), [(id(CYCLES), 135, 1)]);
    assert_eq!(retired[0].event_name.as_deref(), Some("cycles"));
    assert!(pmu.take_retired().is_empty(), "taken once");
    assert_eq!(pmu.snapshot().counters[0].counted, 0, "a new context");
    assert_eq!(pmu.stats().retired_contexts, 1);
}

#[test]
fn contexts_that_never_ran_retire_nothing() {
    let mut pmu = vpmu(amd_v2(6), true);
    pmu.wrmsr(amd_ctl(1), CYCLES & !EN).unwrap();
    pmu.wrmsr(amd_ctr(1), 1234).unwrap();
    pmu.wrmsr(amd_ctl(1), INSTRUCTIONS & !EN).unwrap();
    pmu.wrmsr(amd_ctl(1), 0).unwrap();
    assert!(!pmu.has_retired());
    // A context that ran but counted nothing (say, an unbacked event) is
    // reported with 0: the guest did count it.
    let mut bare = vpmu(amd_v2(6), false);
    bare.wrmsr(amd_ctl(0), INSTRUCTIONS).unwrap();
    bare.wrmsr(amd_ctl(0), 0).unwrap();
    assert_eq!(counts(&bare.take_retired()), [(id(INSTRUCTIONS), 0, 1)]);
}

#[test]
fn same_ids_merge_and_other_ids_are_kept_apart_across_counters_and_resets() {
    let mut pmu = vpmu(intel(2), true);
    // Fixed counter 1 (core cycles, OS|USR) and a gp counter with 0x3C/0x00:
    // the same programming id.
    let core_cycles = 0x3C | USR | OS;
    pmu.wrmsr(INTEL_FIXED_CTR_CTRL, 0b0011 << 4).unwrap();
    pmu.wrmsr(INTEL_PERFEVTSEL0, core_cycles | EN).unwrap();
    pmu.wrmsr(INTEL_PERFEVTSEL0 + 1, 0xC0 | USR | EN).unwrap();
    pmu.wrmsr(INTEL_GLOBAL_CTRL, 0x2_0000_0003).unwrap();
    count_hw(&mut pmu, 40);
    pmu.wrmsr(INTEL_PMC0, 0).unwrap();
    count_hw(&mut pmu, 2);
    pmu.reset();
    let mut totals = EventTotals::default();
    totals.absorb(pmu.take_retired());
    let cycles = totals.get(id(core_cycles)).unwrap();
    assert_eq!((cycles.count, cycles.contexts), (84, 2));
    assert_eq!(cycles.event_name.as_deref(), Some("cycles"));
    let user_instructions = totals.get(id(0xC0 | USR)).unwrap();
    assert_eq!(
        (user_instructions.count, user_instructions.contexts),
        (42, 1)
    );
    assert!(user_instructions.decoded.usr && !user_instructions.decoded.os);
    assert_eq!(totals.entries.len(), 2);

    // After the reset the same programming counts on into the same total.
    pmu.wrmsr(INTEL_PERFEVTSEL0, core_cycles | EN).unwrap();
    pmu.wrmsr(INTEL_GLOBAL_CTRL, 1).unwrap();
    count_hw(&mut pmu, 8);
    pmu.reset();
    totals.absorb(pmu.take_retired());
    assert_eq!(totals.get(id(core_cycles)).unwrap().count, 92);
    assert_eq!(pmu.stats().retired_contexts, 4);
}

#[test]
fn restores_retire_only_what_they_reprogram() {
    let mut pmu = vpmu(amd_v2(6), true);
    pmu.wrmsr(amd_ctl(0), CYCLES).unwrap();
    count_hw(&mut pmu, 10);
    let cycles = pmu.save();
    pmu.restore(&cycles).unwrap();
    assert!(!pmu.has_retired(), "an equivalent restore ends no context");
    count_hw(&mut pmu, 5);
    let mut other = cycles.clone();
    other.event_selects[0] = INSTRUCTIONS;
    pmu.restore(&other).unwrap();
    assert_eq!(counts(&pmu.take_retired()), [(id(CYCLES), 15, 1)]);
}

#[test]
fn the_pending_list_is_bounded() {
    let mut pmu = vpmu(amd_v2(6), true);
    let n = vpmu::MAX_RETIRED as u64 + 5;
    for umask in 0..n {
        pmu.wrmsr(amd_ctl(0), umask << 8 | 0xC0 | USR | EN).unwrap();
    }
    pmu.wrmsr(amd_ctl(0), 0).unwrap();
    assert_eq!(pmu.take_retired().len(), vpmu::MAX_RETIRED);
    assert_eq!(pmu.stats().retired_dropped, 5);
}
