//! Property tests: random guest MSR sequences (with host counting, signals,
//! saves and resets in between) never panic and keep the invariants.

mod common;

use common::*;
use proptest::prelude::*;
use vpmu::backend::fake::FakeBackend;
use vpmu::evtsel::{OS, PROGRAMMING_BITS, USR};
use vpmu::{CounterKind, Fault, IntelFeatures, PmuModel, VendorFeatures, Vpmu};

#[derive(Clone, Debug)]
enum Op {
    Read(u32),
    Write(u32, u64),
    CountHardware(u64),
    RunGuest(u64),
    RunVmm(u64),
    Signal,
    TakePmi,
    SaveRestore,
    Reset,
    /// Programs a counter close to its overflow: select, then counter.
    Arm(u32, u64, u32, u64),
}

fn models() -> Vec<PmuModel> {
    let mut models = all_models();
    models.push(PmuModel::new(
        2,
        3,
        32,
        IntelFeatures::default().with_fixed_counters(2),
    ));
    models
}

/// Every MSR of the model's ranges plus a few neighbours outside them.
fn msrs(model: &PmuModel) -> Vec<u32> {
    let mut msrs: Vec<u32> = model
        .msr_ranges()
        .iter()
        .flat_map(|r| r.base..r.base + r.count)
        .collect();
    msrs.extend([0xC0, 0x185, 0x393, 0xC001_0008, 0xC000_0304, 0x4C9]);
    msrs
}

fn value() -> impl Strategy<Value = u64> {
    let event = proptest::sample::select(vec![0x76u64, 0x3C, 0xC0, 0x2E, 0x1C2]);
    let umask = prop_oneof![Just(0u64), Just(0x4F), 0u64..0x100];
    // Mostly running selects: ring levels and EN set, INT half the time.
    let select = (
        event,
        umask,
        1u64..4,
        any::<bool>(),
        proptest::bool::weighted(0.8),
    )
        .prop_map(|(e, u, levels, int, en)| {
            e | u << 8 | levels << 16 | (int as u64) << 20 | (en as u64) << 22
        });
    prop_oneof![
        2 => any::<u64>(),
        6 => select,
        1 => Just(0u64),
        1 => Just(u64::MAX),
        1 => prop_oneof![Just(0x333u64), Just(0xBBB), Just(0x7_0000_000F), Just(0x3F)],
        1 => (0u64..64).prop_map(|b| 1 << b),
        4 => (1u64..1000).prop_map(|d| (1u64 << 48) - d),
    ]
}

/// (select MSR, select value, counter MSR) of every counter of the model.
fn counters_of(model: &PmuModel) -> Vec<(u32, u64, u32)> {
    use vpmu::msr::*;
    let running = 0x76 | USR | OS | 1 << 20 | 1 << 22;
    let mut list: Vec<(u32, u64, u32)> = match model.features {
        VendorFeatures::Amd(f) if f.perfctr_core => (0..model.gp_counters as u32)
            .map(|n| (AMD_PERF_CTL0 + 2 * n, running, AMD_PERF_CTL0 + 2 * n + 1))
            .collect(),
        VendorFeatures::Amd(_) => (0..4)
            .map(|n| (AMD_K7_PERF_CTL0 + n, running, AMD_K7_PERF_CTR0 + n))
            .collect(),
        VendorFeatures::Intel(_) => (0..model.gp_counters as u32)
            .map(|n| {
                (
                    INTEL_PERFEVTSEL0 + n,
                    0x3C | USR | OS | 1 << 20 | 1 << 22,
                    INTEL_PMC0 + n,
                )
            })
            .collect(),
    };
    list.extend((0..model.fixed_counters() as u32).map(|n| {
        (
            INTEL_FIXED_CTR_CTRL,
            0xBu64 << (4 * n),
            INTEL_FIXED_CTR0 + n,
        )
    }));
    list
}

fn ops(model: &PmuModel) -> impl Strategy<Value = Vec<Op>> {
    let msr = proptest::sample::select(msrs(model));
    let arm = (proptest::sample::select(counters_of(model)), 1u64..2000).prop_map(
        |((sel, value, ctr), distance)| Op::Arm(sel, value, ctr, (1u64 << 48) - distance),
    );
    let op = prop_oneof![
        4 => msr.clone().prop_map(Op::Read),
        8 => (msr, value()).prop_map(|(m, v)| Op::Write(m, v)),
        2 => (0u64..1 << 20).prop_map(Op::CountHardware),
        2 => (0u64..5_000_000).prop_map(Op::RunGuest),
        1 => (0u64..5_000_000).prop_map(Op::RunVmm),
        1 => Just(Op::Signal),
        1 => Just(Op::TakePmi),
        1 => Just(Op::SaveRestore),
        1 => Just(Op::Reset),
        2 => arm,
    ];
    proptest::collection::vec(op, 1..80)
}

fn scenario() -> impl Strategy<Value = (PmuModel, bool, Vec<Op>)> {
    (proptest::sample::select(models()), any::<bool>())
        .prop_flat_map(|(model, hardware)| (Just(model.clone()), Just(hardware), ops(&model)))
}

/// The programming rule, restated: event bits plus the last ring levels
/// selected (selecting none only disables).
fn programming(select: u64, previous: u64) -> u64 {
    let levels = match select & (USR | OS) {
        0 => previous & (USR | OS),
        levels => levels,
    };
    (select & PROGRAMMING_BITS & !(USR | OS)) | levels
}

fn apply(pmu: &mut Vpmu<FakeBackend>, op: &Op) -> Result<(), Fault> {
    match *op {
        Op::Read(msr) => return pmu.rdmsr(msr).map(drop),
        Op::Write(msr, value) => return pmu.wrmsr(msr, value),
        Op::CountHardware(n) => count_hw(pmu, n),
        Op::RunGuest(ns) => run_guest(pmu, ns),
        Op::RunVmm(ns) => run_vmm(pmu, ns),
        Op::Signal => {
            pmu.handle_host_overflow();
            // The VMM's next entry, which does the re-arms the signal asked
            // for (with no guest time).
            if pmu.exit_hooks_needed() {
                pmu.on_guest_entry();
                pmu.on_guest_exit();
            }
        }
        Op::TakePmi => drop(pmu.take_pending_pmi()),
        Op::SaveRestore => {
            let context = pmu.save();
            pmu.restore(&context).expect("own context restores");
        }
        Op::Reset => pmu.reset(),
        Op::Arm(select_msr, select, counter_msr, value) => {
            let _ = pmu.wrmsr(select_msr, select);
            return pmu.wrmsr(counter_msr, value);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_the_invariants((model, hardware, ops) in scenario()) {
        let mut pmu = vpmu(model.clone(), hardware);
        let counters = model.counters();
        let gp_mask = (1u64 << model.gp_width) - 1;
        let fixed_mask = (1u64 << model.fixed_width()) - 1;
        let counter_bits = ((1u64 << model.gp_counters) - 1) | (((1u64 << model.fixed_counters()) - 1) << 32);
        let mut before = pmu.snapshot();
        let mut may_be_set = 0u64; // status bits explained by overflows or STATUS_SET
        let mut selects: Vec<u64> = before.counters.iter().map(|c| c.decoded.to_select()).collect();
        let mut expected: Vec<u64> = selects.iter().map(|&s| programming(s, 0)).collect();

        for op in &ops {
            let result = apply(&mut pmu, op);
            let after = pmu.snapshot();

            // Values stay within their width.
            for c in &after.counters {
                let mask = if c.kind == CounterKind::Gp { gp_mask } else { fixed_mask };
                prop_assert!(c.value <= mask, "{op:?}: {c:?}");
            }

            // Status: every counter bit set is explained, every fresh
            // overflow of a model with status shows.
            match op {
                Op::Reset | Op::SaveRestore => may_be_set = after.global_status,
                Op::Write(_, value) if result.is_ok() && after.global_status & !before.global_status != 0 => {
                    may_be_set |= value;
                }
                _ => {}
            }
            for (b, a) in before.counters.iter().zip(&after.counters) {
                let bit = if a.kind == CounterKind::Gp { 1 << a.index } else { 1 << (32 + a.index) };
                if a.overflows > b.overflows {
                    may_be_set |= bit;
                    if model.has_global_registers() && !matches!(op, Op::Reset) {
                        prop_assert!(after.global_status & bit != 0, "{op:?}: overflow without status");
                    }
                }
            }
            prop_assert_eq!(after.global_status & counter_bits & !may_be_set, 0, "{:?}", op);
            prop_assert_eq!(after.global_status & !counter_bits & !may_be_set, 0, "{:?}", op);

            // Generations move exactly when the programming does.
            for (i, c) in after.counters.iter().enumerate() {
                let select = c.decoded.to_select();
                let programming_now = programming(select, expected[i]);
                let changed = programming_now != expected[i];
                match op {
                    Op::Reset => expected[i] = programming(select, 0),
                    _ => {
                        prop_assert_eq!(c.generation != before.counters[i].generation, changed,
                            "{:?}: counter {} {:#x} -> {:#x}", op, i, selects[i], select);
                        expected[i] = programming_now;
                    }
                }
                selects[i] = select;
            }

            // Each programming opens at most one host event (plus the
            // guest-time reference).
            let stats = after.stats;
            prop_assert!(stats.opens + stats.open_failures <= stats.reprograms + counters as u64 + 1, "{stats:?}");
            prop_assert_eq!(stats.opens - stats.closes, pmu.backend().open_events().count() as u64);

            // The exit hooks have work only while a clock-backed counter runs.
            let clock_running = after.counters.iter().any(|c| c.running && c.backing.is_clock());
            prop_assert_eq!(pmu.exit_hooks_needed(), clock_running);
            before = after;
        }
    }
}
