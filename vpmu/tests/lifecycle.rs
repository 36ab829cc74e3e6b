//! Host backing life cycle on a fake host: open once per programming,
//! clock backing with guest-time hooks, overflows, throttling, policy,
//! context save/restore, reset and the export snapshot.

mod common;

use common::*;
use common::{amd_ctl as ctl, amd_ctr as ctr};
use vpmu::backend::fake::FakeBackend;
use vpmu::backend::EventSource;
use vpmu::evtsel::{EN, INT, OS, USR};
use vpmu::msr::*;
use vpmu::{Backend, BackendError, Backing, ContextError, CounterKind, GuestMode, Limits, Vpmu};

#[test]
fn enable_toggles_writes_pmis_and_hooks_never_reopen() {
    let mut pmu = vpmu(amd_v2(6), true);
    pmu.wrmsr(ctl(0), CYCLES | INT).unwrap();
    for round in 0..50u64 {
        pmu.wrmsr(AMD_GLOBAL_CTL, 0).unwrap();
        pmu.wrmsr(ctr(0), M48 - 10).unwrap();
        pmu.wrmsr(ctl(0), (CYCLES | INT) & !EN).unwrap();
        pmu.wrmsr(ctl(0), CYCLES | INT).unwrap();
        pmu.wrmsr(AMD_GLOBAL_CTL, 0x3F).unwrap();
        pmu.on_guest_entry();
        count_hw(&mut pmu, 20);
        pmu.on_guest_exit();
        pmu.handle_host_overflow();
        assert!(pmu.take_pending_pmi(), "round {round}");
        pmu.wrmsr(AMD_GLOBAL_STATUS_CLR, 1).unwrap();
        let context = pmu.save();
        pmu.restore(&context).unwrap();
    }
    let stats = *pmu.stats();
    assert_eq!((stats.opens, stats.closes, stats.reprograms), (1, 0, 1));
    assert_eq!(stats.restores_equivalent, 50);
    assert_eq!(stats.overflows, 50);
    assert_eq!(pmu.backend().calls.open, 1);
    assert_eq!(pmu.generation(0), Some(1));
}

#[test]
fn generations_move_only_with_the_programming() {
    let mut pmu = vpmu(amd_v2(6), true);
    let steps: [(u64, u64); 8] = [
        (CYCLES, 1),
        (CYCLES | INT, 1),
        (CYCLES & !EN, 1),
        (CYCLES | (1 << 41), 1), // HostOnly is not host programming
        (CYCLES & !(USR | OS), 1),
        (CYCLES | 0x100, 2), // new unit mask
        ((CYCLES | 0x100) & !USR, 3),
        (CYCLES | 0x100 | (1 << 24), 4), // counter mask
    ];
    for (select, generation) in steps {
        pmu.wrmsr(ctl(2), select).unwrap();
        assert_eq!(pmu.generation(2), Some(generation), "{select:#x}");
    }
    assert_eq!(pmu.stats().closes, 3);
}

#[test]
fn a_privilege_filter_on_the_task_clock_counts_the_time_sampled_modes_attribute() {
    let mut pmu = vpmu(amd_v2(6), false);
    pmu.wrmsr(ctl(2), CYCLES).unwrap();
    assert!(!pmu.samples_guest_mode(), "plain cycles need no samples");
    run_guest(&mut pmu, 1_000_000);
    pmu.observe_guest_mode(GuestMode::User); // nobody's: ignored
    assert_eq!(pmu.stats().mode_samples, 0);

    pmu.wrmsr(ctl(0), 0x76 | USR | EN).unwrap(); // cycles:u
    pmu.wrmsr(ctl(1), 0x76 | OS | EN).unwrap(); // cycles:k
    assert!(pmu.samples_guest_mode());
    // Each mode counter's clock event signals every sample period.
    let periods: Vec<u64> = pmu
        .backend()
        .open_events()
        .filter_map(|e| e.period)
        .collect();
    assert_eq!(periods.len(), 3, "{periods:?}");
    assert_eq!(periods.iter().filter(|&&p| p == 1_000_000).count(), 2);

    run_guest(&mut pmu, 1_000_000); // 1 ms, then a sample in user mode
    pmu.observe_guest_mode(GuestMode::User);
    run_guest(&mut pmu, 2_000_000);
    pmu.on_guest_entry();
    pmu.observe_guest_mode(GuestMode::User); // inside the guest: ignored
    pmu.on_guest_exit();
    pmu.observe_guest_mode(GuestMode::Kernel); // 2 ms in kernel mode
    run_guest(&mut pmu, 500_000); // not sampled yet: nobody's for now
    assert_eq!(pmu.rdmsr(ctr(0)), Ok(3_000_000), "cycles:u: 1 ms");
    assert_eq!(pmu.rdmsr(ctr(1)), Ok(6_000_000), "cycles:k: 2 ms");
    assert_eq!(pmu.rdmsr(ctr(2)), Ok(13_500_000), "cycles: all 4.5 ms");
    pmu.observe_guest_mode(GuestMode::User);
    assert_eq!(pmu.rdmsr(ctr(0)), Ok(4_500_000));

    let snapshot = pmu.snapshot();
    let modes = [GuestMode::User, GuestMode::Kernel];
    for (c, mode) in snapshot.counters.iter().zip(modes) {
        assert_eq!(c.backing, Backing::SoftwareClockEstimate { mode });
    }
    assert_eq!(snapshot.counters[2].backing, Backing::SoftwareClock);
    let stats = pmu.stats();
    assert_eq!((stats.mode_samples, stats.mode_samples_user), (3, 2));
}

#[test]
fn a_user_only_count_on_the_task_clock_overflows_into_a_pmi_at_a_sample() {
    let mut pmu = vpmu(amd_v2(6), false);
    pmu.wrmsr(ctr(0), M48 - 2_999_999).unwrap(); // 1 ms of user time left
    pmu.wrmsr(ctl(0), 0x76 | USR | EN | INT).unwrap();
    run_guest(&mut pmu, 5_000_000);
    pmu.observe_guest_mode(GuestMode::Kernel);
    pmu.handle_host_overflow();
    assert!(!pmu.take_pending_pmi(), "kernel time is not user time");
    run_guest(&mut pmu, 1_000_000);
    pmu.observe_guest_mode(GuestMode::User);
    pmu.handle_host_overflow();
    assert!(pmu.take_pending_pmi());
    assert_eq!(pmu.rdmsr(ctr(0)), Ok(0), "wrapped exactly at 1 ms");
    assert_eq!(pmu.rdmsr(AMD_GLOBAL_STATUS), Ok(1));
    // A sampling guest's period of 1: still one signal per sample period,
    // not the minimum period's storm through its kernel time.
    pmu.wrmsr(ctr(0), M48).unwrap();
    pmu.on_guest_entry(); // the re-arm happens at the entry
    pmu.on_guest_exit();
    let period = pmu.backend().open_events().find_map(|e| e.period);
    assert_eq!(period, Some(1_000_000));
    assert_eq!(pmu.stats().throttles, 0);
}

#[test]
fn sampling_starts_afresh_when_a_mode_counter_starts() {
    let mut pmu = vpmu(amd_v2(6), false);
    pmu.wrmsr(ctl(2), CYCLES).unwrap();
    run_guest(&mut pmu, 7_000_000); // before any mode counter: nobody's
    pmu.wrmsr(ctl(0), 0x76 | USR | EN).unwrap();
    run_guest(&mut pmu, 1_000_000);
    pmu.observe_guest_mode(GuestMode::User);
    assert_eq!(pmu.rdmsr(ctr(0)), Ok(3_000_000));
}

#[test]
fn clock_events_count_guest_time_only_and_idle_hooks_cost_nothing() {
    let mut pmu = vpmu(amd_v2(6), false);
    assert!(!pmu.exit_hooks_needed());
    pmu.on_guest_entry();
    pmu.on_guest_exit();
    assert_eq!(pmu.stats().clock_reads, 0, "idle hooks read nothing");

    pmu.wrmsr(ctl(0), CYCLES).unwrap();
    pmu.wrmsr(ctl(1), 0xC0 | USR | OS | EN).unwrap();
    assert!(pmu.exit_hooks_needed());
    run_guest(&mut pmu, 1_000_000); // 1 ms at 3 GHz
    run_vmm(&mut pmu, 5_000_000);
    run_guest(&mut pmu, 1_000);
    assert_eq!(pmu.rdmsr(ctr(0)), Ok(3_003_000), "VMM time not counted");
    assert_eq!(
        pmu.rdmsr(ctr(1)),
        Ok(0),
        "instructions have no backing here"
    );
    assert_eq!(pmu.stats().clock_reads, 4);

    let snapshot = pmu.snapshot();
    assert_eq!(snapshot.counters[0].backing, Backing::SoftwareClock);
    assert_eq!(snapshot.counters[0].event_name.as_deref(), Some("cycles"));
    let Backing::Unbacked { reason } = &snapshot.counters[1].backing else {
        panic!("{snapshot:?}")
    };
    assert!(reason.contains("ENOENT"), "{reason}");
    assert!(snapshot.no_hardware_reason.unwrap().contains("ENOENT"));

    pmu.wrmsr(ctl(0), CYCLES & !EN).unwrap();
    assert!(!pmu.exit_hooks_needed(), "no clock counter runs");
    run_guest(&mut pmu, 1_000_000);
    assert_eq!(pmu.rdmsr(ctr(0)), Ok(3_003_000));
    assert_eq!(pmu.stats().clock_reads, 4, "hooks idle again");
    // One failed hardware open taught the vPMU the host has none.
    assert_eq!(pmu.stats().open_failures, 1);
}

#[test]
fn clock_overflow_signals_may_come_early_and_are_re_armed() {
    let mut pmu = vpmu(intel(4), false);
    let distance = 3_000_000; // 1 ms of guest time
    pmu.wrmsr(INTEL_FIXED_CTR0 + 1, (M48 + 1) - distance)
        .unwrap();
    pmu.wrmsr(INTEL_FIXED_CTR_CTRL, 0b1011 << 4).unwrap();
    pmu.wrmsr(INTEL_GLOBAL_CTRL, 1 << 33).unwrap();
    let handle = pmu
        .backend()
        .open_events()
        .position(|e| e.spec.sample_period.is_some())
        .unwrap();
    assert_eq!(
        pmu.backend().events[handle].period,
        Some(1_000_000),
        "armed with the distance in ns"
    );

    run_vmm(&mut pmu, 600_000);
    run_guest(&mut pmu, 400_000); // host clock reached the period: early signal
    pmu.handle_host_overflow();
    assert!(!pmu.take_pending_pmi());
    pmu.on_guest_entry(); // re-arms happen right before the next entry
    assert_eq!(
        pmu.backend().events[handle].period,
        Some(600_000),
        "re-armed with the guest distance left"
    );
    pmu.backend_mut().advance(false, 600_000);
    pmu.on_guest_exit();
    pmu.handle_host_overflow();
    assert!(pmu.take_pending_pmi());
    assert_eq!(pmu.rdmsr(INTEL_GLOBAL_STATUS), Ok(1 << 33));
    assert_eq!(pmu.rdmsr(INTEL_FIXED_CTR0 + 1), Ok(0));
    assert_eq!(pmu.stats().pmis, 1);
}

#[test]
fn clock_events_stay_enabled_across_stops_and_re_arm_after_the_pmi() {
    let mut pmu = vpmu(amd_v2(6), false);
    let period = 3_000_000; // 1 ms of guest time
    pmu.wrmsr(ctr(0), M48 + 1 - period).unwrap();
    pmu.wrmsr(ctl(0), CYCLES | INT).unwrap();
    let handle = pmu
        .backend()
        .open_events()
        .position(|e| e.spec.sample_period.is_some())
        .unwrap();
    let calls = pmu.backend().calls;
    for _ in 0..10 {
        // A Linux PMI handler's freeze and unfreeze, an EN toggle.
        pmu.wrmsr(AMD_GLOBAL_CTL, 0).unwrap();
        pmu.wrmsr(AMD_GLOBAL_CTL, 0x3f).unwrap();
        pmu.wrmsr(ctl(0), (CYCLES | INT) & !EN).unwrap();
        pmu.wrmsr(ctl(0), CYCLES | INT).unwrap();
    }
    assert_eq!(
        (pmu.backend().calls.start, pmu.backend().calls.stop),
        (calls.start, calls.stop),
        "stopping a clock-backed counter leaves its event enabled"
    );
    assert!(pmu.backend().events[handle].running);

    // The counter wraps: the signal re-arms nothing before the PMI is
    // delivered; the re-arm comes with the next entry.
    run_guest(&mut pmu, 1_000_000);
    let set_period = pmu.backend().calls.set_period;
    pmu.handle_host_overflow();
    assert!(pmu.take_pending_pmi());
    assert_eq!(pmu.backend().calls.set_period, set_period, "not yet");
    assert!(pmu.exit_hooks_needed());
    pmu.on_guest_entry();
    assert_eq!(
        pmu.backend().calls.set_period,
        set_period + 1,
        "at the entry"
    );
    assert!(
        pmu.backend().events[handle].period.unwrap() > 1_000_000_000,
        "armed at the full distance to the next wrap"
    );
    pmu.on_guest_exit();
    // The guest's handler rewrites the counter: re-armed at its period.
    pmu.wrmsr(AMD_GLOBAL_CTL, 0).unwrap();
    pmu.wrmsr(ctr(0), M48 + 1 - period).unwrap();
    pmu.wrmsr(AMD_GLOBAL_STATUS_CLR, 1).unwrap();
    pmu.wrmsr(AMD_GLOBAL_CTL, 0x3f).unwrap();
    assert_eq!(pmu.backend().events[handle].period, Some(1_000_000));

    // Stopped for good: the next signal disables the event.
    pmu.wrmsr(ctl(0), (CYCLES | INT) & !EN).unwrap();
    assert!(pmu.backend().events[handle].running);
    pmu.handle_host_overflow();
    assert!(!pmu.backend().events[handle].running);
    let value = pmu.rdmsr(ctr(0)).unwrap();
    run_guest(&mut pmu, 1_000_000);
    assert_eq!(
        pmu.rdmsr(ctr(0)),
        Ok(value),
        "a stopped counter counts nothing"
    );
    pmu.wrmsr(ctl(0), CYCLES | INT).unwrap();
    assert!(
        pmu.backend().events[handle].running,
        "enabled again on start"
    );
}

#[test]
fn tiny_periods_are_throttled_to_the_host_minimum() {
    let limits = Limits {
        min_hardware_period: 5_000,
        min_clock_period_ns: 20_000,
        ..Limits::default()
    };
    let mut pmu = vpmu(amd_v2(6), true).with_limits(limits);
    pmu.wrmsr(ctr(0), M48).unwrap(); // overflow after one event
    pmu.wrmsr(ctl(0), CYCLES | INT).unwrap();
    assert_eq!(pmu.backend().events[0].period, Some(5_000));
    assert_eq!(pmu.stats().throttles, 1);
    for _ in 0..10 {
        pmu.wrmsr(ctr(0), M48).unwrap();
    }
    assert_eq!(pmu.stats().throttles, 11);
    assert!(pmu.backend().events[0].period >= Some(5_000));

    let mut clock = vpmu(amd_v2(6), false).with_limits(limits);
    clock.wrmsr(ctr(0), M48 - 2).unwrap();
    clock.wrmsr(ctl(0), CYCLES | INT).unwrap();
    let armed = clock
        .backend()
        .open_events()
        .find_map(|e| e.period)
        .unwrap();
    assert_eq!(armed, 20_000);
    // One throttle for the one period the host took, though the hardware
    // event was tried first.
    assert_eq!(clock.stats().open_failures, 1);
    assert_eq!(clock.stats().throttles, 1);
}

#[test]
fn the_minimum_period_is_shared_by_the_running_counters_of_a_vcpu() {
    let limits = Limits {
        min_hardware_period: 5_000,
        min_clock_period_ns: 20_000,
        ..Limits::default()
    };
    let mut pmu = vpmu(amd_v2(6), true).with_limits(limits);
    for i in 0..6 {
        pmu.wrmsr(ctr(i), M48).unwrap();
        pmu.wrmsr(ctl(i), CYCLES | INT).unwrap();
    }
    // Re-armed at a period of 1 with all six running: six times the
    // minimum each, so that together they signal no more often than one.
    for i in 0..6 {
        pmu.wrmsr(ctr(i), M48).unwrap();
    }
    let periods: Vec<_> = pmu.backend().open_events().map(|e| e.period).collect();
    assert_eq!(periods, vec![Some(30_000); 6]);
    // A counter whose distance is above the shared minimum keeps it.
    pmu.wrmsr(ctr(0), M48 - 99_999).unwrap();
    assert_eq!(pmu.backend().events[0].period, Some(100_000));
    // With one counter left running, the minimum is its own again.
    for i in 1..6 {
        pmu.wrmsr(ctl(i), (CYCLES | INT) & !EN).unwrap();
    }
    pmu.wrmsr(ctr(0), M48).unwrap();
    assert_eq!(pmu.backend().events[0].period, Some(5_000));
}

#[test]
fn denied_events_are_never_opened_and_read_as_not_counting() {
    let mut pmu = vpmu_with(amd_v2(6), true, "ipc".parse().unwrap());
    pmu.wrmsr(ctl(0), 0xC2 | USR | OS | EN).unwrap();
    pmu.wrmsr(ctl(1), 0xC0 | USR | OS | EN).unwrap();
    count_hw(&mut pmu, 500);
    assert_eq!(pmu.rdmsr(ctr(0)), Ok(0));
    assert_eq!(pmu.rdmsr(ctr(1)), Ok(500));
    assert_eq!(pmu.backend().calls.open, 1);
    let snapshot = pmu.snapshot();
    assert_eq!(snapshot.counters[0].backing, Backing::Denied);
    assert_eq!(snapshot.counters[1].backing, Backing::HardwareRaw);
    assert!(
        snapshot.counters[0].running,
        "the guest sees it running; it just does not count"
    );
}

#[test]
fn a_model_of_another_vendor_never_opens_raw_events_on_a_hardware_host() {
    // An Intel model on a host with an AMD PMU (`--cpu-vendor intel`):
    // event 0xC0 is instructions on Intel but not on AMD.
    let mut pmu = vpmu(intel(4), true).with_host_vendor(Some(vpmu::Vendor::Amd));
    pmu.wrmsr(INTEL_PERFEVTSEL0, 0x3C | USR | OS | EN).unwrap(); // cycles
    pmu.wrmsr(INTEL_PERFEVTSEL0 + 1, 0xC0 | USR | OS | EN)
        .unwrap(); // instructions
    pmu.wrmsr(INTEL_GLOBAL_CTRL, 0b11).unwrap();
    run_guest(&mut pmu, 1_000_000);
    assert!(
        pmu.backend()
            .events
            .iter()
            .all(|e| !matches!(e.spec.source, EventSource::HardwareRaw { .. })),
        "no raw event was opened"
    );
    assert!(pmu.rdmsr(INTEL_PMC0).unwrap() > 0, "cycles still count");
    assert_eq!(pmu.rdmsr(INTEL_PMC0 + 1), Ok(0));
    let snapshot = pmu.snapshot();
    assert_eq!(snapshot.counters[0].backing, Backing::SoftwareClock);
    let Backing::Unbacked { reason } = &snapshot.counters[1].backing else {
        panic!("{:?}", snapshot.counters[1])
    };
    assert!(reason.contains("Intel event codes"), "{reason}");
    // The same model on its own vendor's host counts in hardware.
    let mut pmu = vpmu(intel(4), true).with_host_vendor(Some(vpmu::Vendor::Intel));
    pmu.wrmsr(INTEL_PERFEVTSEL0 + 1, 0xC0 | USR | OS | EN)
        .unwrap();
    pmu.wrmsr(INTEL_GLOBAL_CTRL, 0b10).unwrap();
    assert_eq!(pmu.snapshot().counters[1].backing, Backing::HardwareRaw);
}

#[test]
fn hardware_events_carry_the_guest_programming() {
    let mut pmu = vpmu(amd_v2(6), true);
    pmu.wrmsr(
        ctl(3),
        0x1_0000_0000 | 0x0F2E | USR | (1 << 18) | (3 << 24) | EN,
    )
    .unwrap();
    let spec = pmu.backend().events[0].spec;
    assert_eq!(
        spec.source,
        EventSource::HardwareRaw {
            config: 0x1_0304_0F2E
        }
    );
    assert!(!spec.exclude_user && spec.exclude_kernel && spec.exclude_host && spec.pinned);
}

#[test]
fn open_failures_leave_the_counter_unbacked_with_the_reason() {
    let mut pmu = vpmu(amd_v2(6), true);
    pmu.backend_mut().fail_next_open =
        Some(BackendError::from_errno("perf_event_open", libc::EBUSY));
    pmu.wrmsr(ctl(0), CYCLES).unwrap();
    let snapshot = pmu.snapshot();
    let Backing::Unbacked { reason } = &snapshot.counters[0].backing else {
        panic!()
    };
    assert!(reason.contains("EBUSY"), "{reason}");
    // Another programming tries again, and hardware still works.
    pmu.wrmsr(ctl(0), CYCLES | 0x100).unwrap();
    count_hw(&mut pmu, 3);
    assert_eq!(pmu.rdmsr(ctr(0)), Ok(3));
    assert_eq!(pmu.stats().open_failures, 1);
}

#[test]
fn runtime_host_errors_degrade_the_counter_not_the_guest() {
    let mut pmu = vpmu(amd_v2(6), true);
    pmu.wrmsr(ctl(0), CYCLES).unwrap();
    count_hw(&mut pmu, 7);
    pmu.backend_mut().close(0); // the host event vanished
    assert_eq!(
        pmu.rdmsr(ctr(0)),
        Ok(0),
        "the read failed: nothing credited"
    );
    assert_eq!(pmu.stats().backend_errors, 1);
    assert!(matches!(
        pmu.snapshot().counters[0].backing,
        Backing::Unbacked { .. }
    ));
    assert_eq!(pmu.wrmsr(ctl(0), 0), Ok(()));
}

#[test]
fn restore_of_other_programmings_reopens_and_generations_never_go_back() {
    let mut pmu = vpmu(amd_v2(6), true);
    pmu.wrmsr(ctl(0), CYCLES).unwrap();
    count_hw(&mut pmu, 100);
    let cycles = pmu.save();
    pmu.wrmsr(ctl(0), 0xC0 | USR | OS | EN).unwrap();
    count_hw(&mut pmu, 50);
    assert_eq!(pmu.generation(0), Some(2));
    let instructions = pmu.save();
    assert_eq!(instructions.values[0], 150);

    pmu.restore(&cycles).unwrap();
    assert_eq!(pmu.rdmsr(ctr(0)), Ok(100));
    assert_eq!(pmu.generation(0), Some(3));
    assert_eq!(pmu.stats().restores_equivalent, 0);
    count_hw(&mut pmu, 1);
    let now = pmu.save();
    pmu.restore(&now).unwrap();
    assert_eq!(pmu.rdmsr(ctr(0)), Ok(101));
    assert_eq!(pmu.stats().restores_equivalent, 1);
    assert_eq!((pmu.stats().opens, pmu.stats().closes), (3, 2));
}

#[test]
fn restore_into_a_new_vpmu_keeps_values_and_generations() {
    let mut first = vpmu(intel(4), true);
    first
        .wrmsr(INTEL_PERFEVTSEL0, 0xC4 | USR | OS | EN)
        .unwrap();
    first
        .wrmsr(INTEL_PERFEVTSEL0, 0xC5 | USR | OS | EN)
        .unwrap();
    count_hw(&mut first, 42);
    let context = first.save();
    let json = serde_json::to_string(&context).unwrap();
    let mut second = vpmu(intel(4), true);
    second
        .restore(&serde_json::from_str(&json).unwrap())
        .unwrap();
    assert_eq!(second.rdmsr(INTEL_PMC0), Ok(42));
    assert_eq!(second.rdmsr(INTEL_PERFEVTSEL0), Ok(0xC5 | USR | OS | EN));
    assert_eq!(
        second.generation(0),
        Some(3),
        "larger of the two, plus the change"
    );
    count_hw(&mut second, 8);
    assert_eq!(second.rdmsr(INTEL_PMC0), Ok(50));
}

#[test]
fn a_pmi_pending_at_a_snapshot_is_delivered_once_by_the_restored_vpmu() {
    // The counter overflows; the VMM saves before its next entry, so the
    // PMI is pending in the saved context, with its status bit.
    let mut first = vpmu(amd_v2(6), true);
    first.wrmsr(ctr(0), M48 - 10).unwrap();
    first.wrmsr(ctl(0), CYCLES | INT).unwrap();
    first.on_guest_entry();
    count_hw(&mut first, 20);
    first.on_guest_exit();
    first.handle_host_overflow();
    let context = first.save();
    assert!(context.pending_pmi);
    let json = serde_json::to_string(&context).unwrap();
    let mut restored = vpmu(amd_v2(6), true);
    restored
        .restore(&serde_json::from_str(&json).unwrap())
        .unwrap();
    assert_eq!(restored.rdmsr(AMD_GLOBAL_STATUS), Ok(1));
    assert!(restored.take_pending_pmi(), "the pending PMI survives");
    assert!(!restored.take_pending_pmi(), "and is delivered once");
    assert_eq!(restored.rdmsr(ctr(0)), Ok((M48 - 10 + 20) & M48));
}

#[test]
fn bad_contexts_are_refused() {
    let mut pmu = vpmu(amd_v2(6), true);
    let good = pmu.save();
    let mut other = vpmu(amd_v2(4), true);
    assert_eq!(other.restore(&good), Err(ContextError::ModelMismatch));
    let mut short = good.clone();
    short.values.pop();
    assert_eq!(
        pmu.restore(&short),
        Err(ContextError::Length {
            what: "counter values",
            expected: 6,
            got: 5
        })
    );
    let mut wide = good.clone();
    wide.values[2] = 1 << 48;
    assert!(matches!(
        pmu.restore(&wide),
        Err(ContextError::InvalidBits {
            what: "counter value",
            ..
        })
    ));
    let mut reserved = good.clone();
    reserved.event_selects[0] = 1 << 21;
    assert!(matches!(
        pmu.restore(&reserved),
        Err(ContextError::InvalidBits {
            what: "event select",
            ..
        })
    ));
    let mut format = good;
    format.format = 1; // before the model's vendor features
    assert_eq!(pmu.restore(&format), Err(ContextError::Format(1)));
    format.format = 3;
    assert_eq!(pmu.restore(&format), Err(ContextError::Format(3)));
    assert_eq!(pmu.stats().restores, 0);
}

#[test]
fn reset_returns_to_power_on() {
    let mut pmu = vpmu(intel(2), true);
    pmu.wrmsr(INTEL_PERFEVTSEL0, 0xC0 | USR | OS | INT | EN)
        .unwrap();
    pmu.wrmsr(INTEL_FIXED_CTR_CTRL, 0x333).unwrap();
    pmu.wrmsr(INTEL_GLOBAL_CTRL, 0x7_0000_000F).unwrap();
    count_hw(&mut pmu, 99);
    pmu.reset();
    for (msr, value) in [
        (INTEL_PERFEVTSEL0, 0),
        (INTEL_PMC0, 0),
        (INTEL_FIXED_CTR0, 0),
        (INTEL_FIXED_CTR_CTRL, 0),
        (INTEL_GLOBAL_CTRL, 0xF),
        (INTEL_GLOBAL_STATUS, 0),
    ] {
        assert_eq!(pmu.rdmsr(msr), Ok(value), "{msr:#x}");
    }
    assert_eq!(
        pmu.backend().open_events().count(),
        0,
        "programmings gone, events closed"
    );
    assert_eq!(pmu.stats().resets, 1);
}

#[test]
fn snapshot_decodes_every_counter_and_serializes() {
    let mut pmu = vpmu(intel(4), true);
    pmu.wrmsr(INTEL_PERFEVTSEL0 + 1, 0x2E | 0x41 << 8 | USR | INT | EN)
        .unwrap();
    pmu.wrmsr(INTEL_FIXED_CTR_CTRL, 0b0010 << 8).unwrap();
    pmu.wrmsr(INTEL_GLOBAL_CTRL, 0xF | 1 << 34).unwrap();
    count_hw(&mut pmu, 11);
    let snapshot = pmu.snapshot();
    assert_eq!(snapshot.counters.len(), 7);
    let llc = &snapshot.counters[1];
    assert_eq!(
        (llc.kind, llc.index, llc.msr),
        (CounterKind::Gp, 1, INTEL_PMC0 + 1)
    );
    assert_eq!(llc.event_name.as_deref(), Some("llc-misses"));
    assert!(llc.decoded.usr && !llc.decoded.os && llc.decoded.int && llc.running);
    assert_eq!((llc.value, llc.host_time_enabled_ns), (11, 11));
    let ref_cycles = &snapshot.counters[6];
    assert_eq!(
        (ref_cycles.kind, ref_cycles.msr, ref_cycles.control),
        (CounterKind::Fixed, 0x30B, 0b0010)
    );
    assert_eq!(ref_cycles.event_name.as_deref(), Some("ref-cycles"));
    assert_eq!(ref_cycles.value, 11);
    let json = serde_json::to_value(&snapshot).unwrap();
    assert_eq!(json["counters"][1]["backing"]["kind"], "hardware_raw");
    assert_eq!(json["counters"][0]["backing"]["kind"], "idle");
    assert_eq!(json["stats"]["wrmsr"]["global_ctrl"], 1);
    assert_eq!(json["model"]["vendor"], "intel");
}

#[test]
fn counter_values_give_every_counter_msr_for_mirroring() {
    let mut pmu = vpmu(intel(2), true);
    pmu.wrmsr(INTEL_PMC0 + 3, 5).unwrap();
    pmu.wrmsr(INTEL_FIXED_CTR0 + 2, 9).unwrap();
    let values: Vec<(u32, u64)> = pmu.counter_values().collect();
    assert_eq!(
        values,
        [
            (0xC1, 0),
            (0xC2, 0),
            (0xC3, 0),
            (0xC4, 5),
            (0x309, 0),
            (0x30A, 0),
            (0x30B, 9)
        ]
    );
    let mut amd = vpmu(amd_legacy(), true);
    let msrs: Vec<u32> = amd.counter_values().map(|(msr, _)| msr).collect();
    assert_eq!(msrs, [0xC001_0004, 0xC001_0005, 0xC001_0006, 0xC001_0007]);
}

#[test]
fn fake_backend_keeps_notifications_for_sampling_events() {
    let mut backend = FakeBackend::new(true);
    let notify = vpmu::OverflowNotify {
        tid: 1234,
        signal: 40,
    };
    backend.set_overflow_notify(Some(notify));
    let mut pmu = Vpmu::new(
        amd_v2(6),
        Default::default(),
        backend,
        vpmu::GuestClock::new(TSC_KHZ),
    )
    .unwrap();
    pmu.wrmsr(ctl(0), CYCLES).unwrap();
    assert_eq!(pmu.backend().events[0].notify, Some(notify));
}

#[test]
fn any_running_follows_the_enables_whatever_backs_the_counter() {
    for hardware in [true, false] {
        let mut pmu = vpmu(amd_v2(6), hardware);
        assert!(!pmu.any_running());
        // Instructions: hardware-backed, or unbacked without hardware.
        pmu.wrmsr(ctl(1), 0xc0 | USR | OS | EN).unwrap();
        assert!(pmu.any_running(), "an enabled counter runs ({hardware})");
        pmu.wrmsr(AMD_GLOBAL_CTL, 0).unwrap();
        assert!(
            !pmu.any_running(),
            "the global enable stops it ({hardware})"
        );
        pmu.wrmsr(AMD_GLOBAL_CTL, 0x3f).unwrap();
        pmu.wrmsr(ctl(1), (0xc0 | USR | OS) & !EN).unwrap();
        assert!(!pmu.any_running());
    }
}
