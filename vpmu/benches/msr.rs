//! Cost of handling guest PMU MSR accesses, in ns per access.
//!
//! `cargo bench -p vpmu --bench msr`. The fake backend measures the vPMU's
//! own logic; the perf backend adds the real host syscalls of this machine.

use std::hint::black_box;
use std::time::Instant;

use vpmu::backend::fake::FakeBackend;
use vpmu::backend::perf::PerfBackend;
use vpmu::evtsel::{EN, OS, USR};
use vpmu::msr::*;
use vpmu::{Backend, EventPolicy, GuestClock, PmuModel, Vendor, Vpmu};

const CTL0: u32 = AMD_PERF_CTL0;
const CTR0: u32 = AMD_PERF_CTL0 + 1;
const CYCLES: u64 = 0x76 | USR | OS | EN;

fn vpmu<B: Backend>(backend: B) -> Vpmu<B> {
    let model = PmuModel::best_for_host(Vendor::Amd, &Default::default());
    Vpmu::new(
        model,
        EventPolicy::allow_all(),
        backend,
        GuestClock::new(3_000_000),
    )
    .unwrap()
}

/// Runs `op` `iterations` times (after a warm-up) and prints ns per call.
fn measure(name: &str, iterations: u32, mut op: impl FnMut(u32)) {
    for i in 0..iterations / 10 {
        op(i);
    }
    let start = Instant::now();
    for i in 0..iterations {
        op(i);
    }
    let ns = start.elapsed().as_nanos() as f64 / iterations as f64;
    println!("{name:<62} {ns:>10.1} ns/op");
}

/// Accesses that touch no host event; counter 0 runs `CYCLES`.
fn measure_without_host_work<B: Backend>(pmu: &mut Vpmu<B>, counter_read: &str) {
    measure("rdmsr PERF_CTL0", 2_000_000, |_| {
        black_box(pmu.rdmsr(black_box(CTL0)).unwrap());
    });
    measure(counter_read, 2_000_000, |_| {
        black_box(pmu.rdmsr(black_box(CTR0)).unwrap());
    });
    measure("wrmsr PERF_CTL0, same value", 2_000_000, |_| {
        pmu.wrmsr(CTL0, black_box(CYCLES)).unwrap()
    });
    measure("wrmsr GLOBAL_STATUS_CLR", 2_000_000, |i| {
        pmu.wrmsr(AMD_GLOBAL_STATUS_CLR, i as u64 & 0x3F).unwrap()
    });
    pmu.wrmsr(AMD_PERF_CTL0 + 2, CYCLES & !EN).unwrap();
    measure("wrmsr PERF_CTR1, counter stopped", 2_000_000, |i| {
        pmu.wrmsr(AMD_PERF_CTL0 + 3, i as u64).unwrap()
    });
}

fn fake_backend() {
    println!("-- fake backend (vPMU logic only)");
    let mut pmu = vpmu(FakeBackend::new(true));
    pmu.wrmsr(CTL0, CYCLES).unwrap();
    measure_without_host_work(
        &mut pmu,
        "rdmsr PERF_CTR0, running hardware-backed (one host read)",
    );
    measure(
        "wrmsr PERF_CTL0, EN toggle (host stop/start)",
        2_000_000,
        |i| pmu.wrmsr(CTL0, CYCLES & !((i as u64 & 1) * EN)).unwrap(),
    );
    measure(
        "wrmsr PERF_CTL0, new event (host close + open)",
        1_000_000,
        |i| pmu.wrmsr(CTL0, CYCLES | (i as u64 & 1) << 8).unwrap(),
    );
}

fn perf_backend() {
    println!("-- perf backend (this host: clock-backed cycles)");
    let mut pmu = vpmu(PerfBackend::new(0));
    pmu.on_guest_entry();
    pmu.on_guest_exit();
    measure(
        "on_guest_entry + on_guest_exit, no counter running",
        5_000_000,
        |_| {
            pmu.on_guest_entry();
            pmu.on_guest_exit();
        },
    );
    pmu.wrmsr(CTL0, CYCLES).unwrap();
    measure_without_host_work(
        &mut pmu,
        "rdmsr PERF_CTR0, running clock-backed (no syscall)",
    );
    measure(
        "entry + exit hooks, clock counter running (no read)",
        200_000,
        |_| {
            pmu.on_guest_entry();
            pmu.on_guest_exit();
        },
    );
    measure(
        "wrmsr PERF_CTR0, counter running (re-arm ioctl)",
        100_000,
        |i| pmu.wrmsr(CTR0, i as u64).unwrap(),
    );
    measure(
        "wrmsr PERF_CTL0, EN toggle (clock event stays on)",
        100_000,
        |i| pmu.wrmsr(CTL0, CYCLES & !((i as u64 & 1) * EN)).unwrap(),
    );
    measure(
        "wrmsr PERF_CTL0, new programming (close + open + start)",
        20_000,
        |i| pmu.wrmsr(CTL0, CYCLES & !((i as u64 & 1) * USR)).unwrap(),
    );
    measure(
        "handle_host_overflow + entry re-arm, clock counter",
        100_000,
        |_| {
            pmu.handle_host_overflow();
            pmu.on_guest_entry();
            pmu.on_guest_exit();
        },
    );
    let stats = pmu.stats();
    println!(
        "   (perf_event_open calls: {}, closes: {}, starts: {}, stops: {})",
        stats.opens, stats.closes, stats.starts, stats.stops
    );
}

fn main() {
    fake_backend();
    perf_backend();
}
