//! A host that refuses events for a while: the counter is unbacked with the
//! host's reason and one notice, the guest keeps running, retries are
//! bounded, and the counter is backed again once the host allows it.
//! Also what a hostile guest cannot learn or cause through the backing:
//! denied and unsupported events look the same, spurious overflow signals
//! change nothing.

mod common;

use std::time::Duration;

use common::*;
use common::{amd_ctl as ctl, amd_ctr as ctr};
use vpmu::backend::fake::FakeBackend;
use vpmu::evtsel::{EN, INT, OS, USR};
use vpmu::msr::*;
use vpmu::{Backend, BackendError, Backing, BackingNotice, CounterKind, Vpmu, MAX_NOTICES};

fn refuse(errno: i32) -> Option<BackendError> {
    Some(BackendError::from_errno("perf_event_open", errno))
}

const RETRY: Duration = Duration::from_millis(20);

/// A vPMU on a host without hardware events (like the CI hosts: cycles are
/// backed by task-clock), retrying refused opens after `RETRY`.
fn clock_host() -> Vpmu<FakeBackend> {
    vpmu(amd_v2(6), false).with_retry_interval(RETRY)
}

fn backing(pmu: &mut Vpmu<FakeBackend>, counter: usize) -> Backing {
    pmu.snapshot().counters[counter].backing.clone()
}

fn lost(reason: &str) -> impl Fn(&BackingNotice) -> bool + '_ {
    move |n| matches!(n, BackingNotice::Lost { kind: CounterKind::Gp, index: 0, reason: r } if r.contains(reason))
}

#[test]
fn every_refusal_errno_unbacks_with_its_reason_and_recovers() {
    for (errno, name) in [
        (libc::ENOENT, "ENOENT"),
        (libc::EACCES, "EACCES"),
        (libc::EMFILE, "EMFILE"),
        (libc::EBUSY, "EBUSY"),
    ] {
        let mut pmu = clock_host();
        pmu.backend_mut().fail_opens = refuse(errno);
        pmu.wrmsr(ctl(0), CYCLES).unwrap();
        let Backing::Unbacked { reason } = backing(&mut pmu, 0) else {
            panic!("{name}: {:?}", pmu.snapshot())
        };
        assert!(reason.contains(name), "{name}: {reason}");
        let notices = pmu.take_notices();
        assert_eq!(notices.len(), 1, "{name}: {notices:?}");
        assert!(lost(name)(&notices[0]), "{name}: {notices:?}");
        assert!(notices[0].to_string().contains(name));

        // The guest keeps running; the counter reads as not counting.
        run_guest(&mut pmu, 1_000_000);
        assert_eq!(pmu.rdmsr(ctr(0)), Ok(0), "{name}");
        assert!(pmu.snapshot().counters[0].running, "{name}");

        pmu.backend_mut().fail_opens = None;
        std::thread::sleep(RETRY);
        // The guest restarts the counter (Linux does at every context
        // switch): the retry opens it.
        pmu.wrmsr(ctl(0), CYCLES & !EN).unwrap();
        pmu.wrmsr(ctl(0), CYCLES).unwrap();
        assert_eq!(backing(&mut pmu, 0), Backing::SoftwareClock, "{name}");
        assert_eq!(
            pmu.take_notices(),
            vec![BackingNotice::Recovered {
                kind: CounterKind::Gp,
                index: 0,
                refused: 1
            }],
            "{name}"
        );
        run_guest(&mut pmu, 1_000_000);
        assert_eq!(pmu.rdmsr(ctr(0)), Ok(3_000_000), "{name}");
        let stats = pmu.stats();
        assert_eq!((stats.backing_lost, stats.backing_recovered), (1, 1));
        assert_eq!(stats.open_retries, 1, "{name}: {stats:?}");
    }
}

#[test]
fn refused_hardware_events_recover_on_a_hardware_host() {
    for errno in [libc::EACCES, libc::EMFILE, libc::EBUSY] {
        let mut pmu = vpmu(amd_v2(6), true).with_retry_interval(RETRY);
        pmu.backend_mut().fail_opens = refuse(errno);
        pmu.wrmsr(ctl(0), INSTRUCTIONS).unwrap();
        assert!(matches!(backing(&mut pmu, 0), Backing::Unbacked { .. }));
        count_hw(&mut pmu, 100);
        assert_eq!(pmu.rdmsr(ctr(0)), Ok(0));
        pmu.backend_mut().fail_opens = None;
        std::thread::sleep(RETRY);
        assert_eq!(backing(&mut pmu, 0), Backing::HardwareRaw, "errno {errno}");
        count_hw(&mut pmu, 100);
        assert_eq!(pmu.rdmsr(ctr(0)), Ok(100));
        assert!(
            pmu.snapshot().no_hardware_reason.is_none(),
            "a refusal is not a host without hardware events"
        );
    }
}

#[test]
fn retries_are_bounded_and_noticed_once() {
    let mut pmu = clock_host();
    pmu.backend_mut().fail_opens = refuse(libc::EMFILE);
    pmu.wrmsr(ctl(0), CYCLES).unwrap();
    // The hardware attempt is refused (not "no hardware events"): no
    // fallback to the clock.
    assert_eq!(pmu.backend().calls.open, 1);
    // A guest hammering the enable bit while the host refuses causes no
    // open at all until the retry interval has passed.
    for _ in 0..1000 {
        pmu.wrmsr(ctl(0), CYCLES & !EN).unwrap();
        pmu.wrmsr(ctl(0), CYCLES).unwrap();
        pmu.rdmsr(ctr(0)).unwrap();
    }
    assert_eq!(pmu.backend().calls.open, 1);
    std::thread::sleep(RETRY);
    for _ in 0..1000 {
        pmu.wrmsr(AMD_GLOBAL_CTL, 0).unwrap();
        pmu.wrmsr(AMD_GLOBAL_CTL, 0x3F).unwrap();
    }
    assert_eq!(pmu.backend().calls.open, 2, "one retry per interval");
    // Another programming is a new request: tried at once, and refused
    // again without a second notice.
    pmu.wrmsr(ctl(0), CYCLES & !USR).unwrap();
    assert_eq!(pmu.backend().calls.open, 3);
    let notices = pmu.take_notices();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(pmu.stats().backing_lost, 1);
    assert_eq!(pmu.stats().open_failures, 3);
}

#[test]
fn a_running_counter_recovers_without_guest_writes() {
    let mut pmu = clock_host();
    pmu.backend_mut().fail_opens = refuse(libc::EBUSY);
    pmu.wrmsr(ctl(0), CYCLES).unwrap();
    run_guest(&mut pmu, 1_000_000);
    assert!(!pmu.exit_hooks_needed(), "nothing clock-backed runs");
    pmu.backend_mut().fail_opens = None;
    std::thread::sleep(RETRY);
    // The VMM publishes its export periodically: that read retries.
    assert_eq!(backing(&mut pmu, 0), Backing::SoftwareClock);
    assert!(pmu.exit_hooks_needed(), "the hooks run from the next entry");
    run_guest(&mut pmu, 1_000_000);
    assert_eq!(pmu.rdmsr(ctr(0)), Ok(3_000_000));
    assert_eq!(pmu.take_notices().len(), 2);
}

#[test]
fn host_events_lost_after_open_are_reopened() {
    let mut pmu = vpmu(amd_v2(6), true).with_retry_interval(RETRY);
    pmu.wrmsr(ctl(0), INSTRUCTIONS).unwrap();
    count_hw(&mut pmu, 7);
    pmu.backend_mut().close(0); // the host event vanished (evicted, closed)
    assert_eq!(pmu.rdmsr(ctr(0)), Ok(0));
    assert!(matches!(backing(&mut pmu, 0), Backing::Unbacked { .. }));
    assert!(matches!(
        pmu.take_notices().as_slice(),
        [BackingNotice::Lost { .. }]
    ));
    std::thread::sleep(RETRY);
    count_hw(&mut pmu, 5); // nothing open: nothing counts
    assert_eq!(backing(&mut pmu, 0), Backing::HardwareRaw);
    count_hw(&mut pmu, 9);
    assert_eq!(pmu.rdmsr(ctr(0)), Ok(9));
    assert_eq!(
        pmu.backend().open_events().count(),
        1,
        "the lost one closed"
    );
}

#[test]
fn notices_are_bounded() {
    let mut pmu = vpmu(intel(4), false).with_retry_interval(Duration::ZERO);
    pmu.backend_mut().fail_opens = refuse(libc::EMFILE);
    pmu.wrmsr(INTEL_GLOBAL_CTRL, 0xF).unwrap();
    for round in 0..100u64 {
        pmu.wrmsr(INTEL_PERFEVTSEL0, 0x3C | USR | OS | EN).unwrap();
        pmu.backend_mut().fail_opens = refuse(libc::EMFILE).filter(|_| round % 2 == 1);
        pmu.wrmsr(INTEL_PERFEVTSEL0, 0x3C | OS | EN).unwrap();
    }
    assert_eq!(pmu.take_notices().len(), MAX_NOTICES);
    assert!(pmu.stats().notices_dropped > 0);
    assert!(!pmu.has_notices());
}

/// Every PMU register of the model as the guest reads it.
fn guest_view(pmu: &mut Vpmu<FakeBackend>) -> Vec<(u32, Result<u64, vpmu::Fault>)> {
    let msrs: Vec<u32> = pmu
        .model()
        .msr_ranges()
        .iter()
        .flat_map(|r| r.base..r.base + r.count)
        .collect();
    msrs.into_iter().map(|m| (m, pmu.rdmsr(m))).collect()
}

#[test]
fn denied_and_unsupported_events_look_the_same_to_the_guest() {
    // Cycles denied by the policy, against instructions on a host without
    // hardware events (unbacked): the same guest actions, the same reads,
    // apart from the event code the guest itself wrote.
    let run = |pmu: &mut Vpmu<FakeBackend>, event: u64| {
        let select = event | USR | OS | INT | EN;
        pmu.wrmsr(ctr(2), M48 - 10).unwrap();
        pmu.wrmsr(ctl(2), select).unwrap();
        run_guest(pmu, 5_000_000);
        count_hw(pmu, 1000);
        pmu.handle_host_overflow();
        let pmi = pmu.take_pending_pmi();
        let mut view = guest_view(pmu);
        for (msr, value) in &mut view {
            if *msr == ctl(2) || *msr == AMD_K7_PERF_CTL0 + 2 {
                *value = value.map(|v| v & !0xFF);
            }
        }
        (pmi, view)
    };
    let mut denied = vpmu_with(amd_v2(6), false, "all;deny:0x76".parse().unwrap());
    let mut unsupported = vpmu(amd_v2(6), false);
    assert_eq!(run(&mut denied, 0x76), run(&mut unsupported, 0xC0));
    let (d, u) = (denied.snapshot(), unsupported.snapshot());
    assert_eq!(d.counters[2].backing, Backing::Denied);
    assert!(matches!(u.counters[2].backing, Backing::Unbacked { .. }));
    assert_eq!(
        denied.backend().calls.open,
        0,
        "a denied event never reaches the host"
    );
    assert_eq!(d.stats.opens + d.stats.open_failures, 0);
}

#[test]
fn spurious_overflow_signals_change_nothing() {
    let mut pmu = vpmu(amd_v2(6), false);
    pmu.wrmsr(ctr(0), M48 - 3_000_000_000).unwrap(); // 1 s of guest time away
    pmu.wrmsr(ctl(0), CYCLES | INT).unwrap();
    pmu.wrmsr(ctl(1), CYCLES).unwrap();
    run_guest(&mut pmu, 1_000_000);
    let before = (pmu.rdmsr(ctr(0)), pmu.rdmsr(ctr(1)));
    for _ in 0..10_000 {
        pmu.handle_host_overflow();
        assert!(!pmu.take_pending_pmi());
    }
    assert_eq!((pmu.rdmsr(ctr(0)), pmu.rdmsr(ctr(1))), before);
    assert_eq!(pmu.rdmsr(AMD_GLOBAL_STATUS), Ok(0));
    let s = pmu.snapshot();
    assert_eq!(s.counters[0].overflows + s.counters[0].pmis, 0);
    assert_eq!(
        s.stats.opens, 3,
        "two counters and the guest-time reference"
    );
}
