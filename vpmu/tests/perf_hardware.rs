//! The perf backend against the host's hardware PMU: raw events opened,
//! stopped and started on one descriptor, overflow periods, exact counts of
//! a known loop, and the user/kernel split. These need a host PMU, so they
//! are ignored by `cargo test`; `scripts/pmu-host-check` runs them
//! (`--ignored`) where `vmm host` finds hardware events, and says why not
//! elsewhere. On a host without them every test fails at its first open.
//!
//! The events count this host thread, so they include host time
//! (`exclude_host` off) and exclude the kernel where said: the start and
//! stop ioctls run in the kernel, so a user-only count of the loop is its
//! own instructions plus a few dozen of the calls around it.

mod common;

use std::arch::asm;
use std::sync::atomic::Ordering;

use common::signals::{notify_here, SIGNALS};
use vpmu::backend::perf::{PerfBackend, PerfHandle};
use vpmu::{Backend, EventSource, EventSpec};

/// Instructions the calls around a counted loop may add, user mode only.
const SLACK: u64 = 2_000;

/// The host's raw event codes: (instructions, branches, core cycles).
fn events() -> (u64, u64, u64) {
    let leaf0 = std::arch::x86_64::__cpuid(0);
    let amd = leaf0.ebx.to_le_bytes() == *b"Auth";
    // Retired instructions are 0xC0 on both; branches AMD 0xC2, Intel 0xC4;
    // core cycles AMD 0x76, Intel 0x3C (unhalted core cycles).
    if amd {
        (0xC0, 0xC2, 0x76)
    } else {
        (0xC0, 0xC4, 0x3C)
    }
}

/// `n` iterations of `dec; jnz`: 2n instructions, n branches, in user mode.
fn known_loop(n: u64) {
    // SAFETY: counts a register down to zero; touches no memory or stack.
    unsafe {
        asm!("2:", "dec {0}", "jnz 2b", inout(reg) n => _, options(nomem, nostack));
    }
}

fn spec(config: u64, user: bool, kernel: bool, period: Option<u64>) -> EventSpec {
    EventSpec {
        source: EventSource::HardwareRaw { config },
        exclude_user: !user,
        exclude_kernel: !kernel,
        exclude_host: false,
        pinned: true,
        sample_period: period,
    }
}

fn open(backend: &mut PerfBackend, spec: &EventSpec) -> PerfHandle {
    backend
        .open(spec)
        .unwrap_or_else(|e| panic!("a hardware event must open on this host: {e}"))
}

/// Counts `work` with `handle` running; returns the count added.
fn counted(backend: &mut PerfBackend, handle: PerfHandle, work: impl FnOnce()) -> u64 {
    let before = backend.read(handle).unwrap().value;
    backend.start(handle).unwrap();
    work();
    backend.stop(handle).unwrap();
    backend.read(handle).unwrap().value - before
}

#[test]
#[ignore = "needs a host hardware PMU: scripts/pmu-host-check runs it"]
fn a_known_loop_retires_exactly_its_instructions_and_branches() {
    let (instructions, branches, _) = events();
    let mut backend = PerfBackend::new(0);
    let i = open(&mut backend, &spec(instructions, true, false, None));
    let b = open(&mut backend, &spec(branches, true, false, None));
    for n in [1_000_000u64, 10_000_000] {
        backend.start(b).unwrap();
        let got = counted(&mut backend, i, || known_loop(n));
        backend.stop(b).unwrap();
        assert!(
            (2 * n..=2 * n + SLACK).contains(&got),
            "{got} instructions for a loop of {} (user mode)",
            2 * n
        );
    }
    let branches = backend.read(b).unwrap().value;
    assert!(
        (11_000_000..=11_000_000 + SLACK).contains(&branches),
        "{branches} branches for loops of 11 000 000"
    );
}

#[test]
#[ignore = "needs a host hardware PMU: scripts/pmu-host-check runs it"]
fn a_hardware_event_stops_and_starts_on_one_descriptor() {
    let (instructions, _, _) = events();
    let mut backend = PerfBackend::new(0);
    let i = open(&mut backend, &spec(instructions, true, false, None));
    let first = counted(&mut backend, i, || known_loop(1_000_000));
    let stopped = backend.read(i).unwrap().value;
    known_loop(5_000_000);
    assert_eq!(
        backend.read(i).unwrap().value,
        stopped,
        "stopped: no counting"
    );
    let second = counted(&mut backend, i, || known_loop(1_000_000));
    assert!(first.abs_diff(second) <= SLACK, "{first} then {second}");
    assert_eq!(backend.open_events(), 1, "never reopened");
}

#[test]
#[ignore = "needs a host hardware PMU: scripts/pmu-host-check runs it"]
fn hardware_overflow_signals_arrive_at_the_period() {
    let (instructions, _, _) = events();
    let mut backend = PerfBackend::new(0);
    backend.set_overflow_notify(Some(notify_here()));
    let period = 1_000_000;
    let i = open(&mut backend, &spec(instructions, true, false, Some(period)));
    let before = SIGNALS.load(Ordering::SeqCst);
    // 100 periods of user-mode instructions.
    counted(&mut backend, i, || known_loop(50 * period));
    let delivered = SIGNALS.load(Ordering::SeqCst) - before;
    assert!(
        (95..=101).contains(&delivered),
        "{delivered} overflow signals for 100 periods"
    );
}

#[test]
#[ignore = "needs a host hardware PMU: scripts/pmu-host-check runs it"]
fn user_and_kernel_modes_are_counted_apart() {
    let (instructions, _, cycles) = events();
    let mut backend = PerfBackend::new(0);
    let user = open(&mut backend, &spec(instructions, true, false, None));
    let kernel = open(&mut backend, &spec(instructions, false, true, None));
    let kernel_cycles = open(&mut backend, &spec(cycles, false, true, None));
    let start_all = |b: &mut PerfBackend| {
        for h in [user, kernel, kernel_cycles] {
            b.start(h).unwrap();
        }
    };
    let stop_all = |b: &mut PerfBackend| {
        for h in [user, kernel, kernel_cycles] {
            b.stop(h).unwrap();
        }
    };
    let read = |b: &mut PerfBackend| [user, kernel].map(|h| b.read(h).unwrap().value);

    // A user-mode loop: its instructions are user instructions; the kernel
    // adds only interrupts and the stop ioctl.
    let n = 20_000_000;
    let [u0, k0] = read(&mut backend);
    start_all(&mut backend);
    known_loop(n);
    stop_all(&mut backend);
    let [u1, k1] = read(&mut backend);
    assert!(
        (2 * n..=2 * n + SLACK).contains(&(u1 - u0)),
        "user {}",
        u1 - u0
    );
    assert!(
        k1 - k0 < 2 * n / 20,
        "kernel {} during a user loop",
        k1 - k0
    );

    // System calls: most of their instructions are the kernel's.
    let calls = 100_000;
    start_all(&mut backend);
    for _ in 0..calls {
        // SAFETY: getppid has no arguments and cannot fail.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
    stop_all(&mut backend);
    let [u2, k2] = read(&mut backend);
    let (user_per_call, kernel_per_call) = ((u2 - u1) / calls, (k2 - k1) / calls);
    assert!(
        kernel_per_call >= 30 && kernel_per_call > user_per_call,
        "per getppid: {kernel_per_call} kernel, {user_per_call} user instructions"
    );
    assert!(
        backend.read(kernel_cycles).unwrap().value > 0,
        "kernel cycles counted"
    );
}
