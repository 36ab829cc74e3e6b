//! Microbenchmarks of what the vPMU costs the guest (the host-side
//! harness is `vmm/benches/vpmu_costs.rs`, the figures are in
//! BENCHMARKS.md). Every figure is in guest TSC cycles, measured around
//! loops (never per instruction: on the development hosts RDTSC itself
//! traps, about 6 us), in several rounds interleaved across the variants,
//! with each round's KVM steal time taken out.
//!
//! - `bench_msr`: loops of RDMSR and WRMSR (same value again, so nothing is
//!   reprogrammed) of a PMU counter, a PMU event select, the "null" MSR the
//!   VMM answers with 0 (`vmm --bench-msr`), and an MSR KVM handles in the
//!   kernel.
//! - `bench_io`: a loop of `out` to a port nothing claims (an exit to the
//!   VMM each), with 0, 1, 4 or all counters running.
//! - `bench_pmi`: a Linux-like PMI handler at a given PMI rate: a window
//!   with the counter counting but no PMIs, then one with PMIs, each
//!   bracketed by marks (WRMSR of [`MARK`]` | tag` to the null MSR: the VMM
//!   records its exit counts there), then the handler's entry TSC values
//!   sent as stamps (WRMSR of [`STAMP`]` | tsc`) so that the host can match
//!   them with the times it received the overflow signals.
//!
//! Parameters are `probe.bench_*` keys of the command line (README.md).

use core::arch::asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::cmdline::{parse_u64, Config, Test};
use crate::cpu::{rdmsr_loop, rdmsr_safe, rdpmc_safe, rdtsc, wrmsr_safe};
use crate::pmu::{self, Kind, Pmu, SEL_EN, SEL_INT};
use crate::serial::{Hex, Line, Put};
use crate::{apic, out, percpu, steal, time, MAX_CPUS};

/// WRMSR of `MARK | tag` to the null MSR: the VMM records a mark.
const MARK: u64 = 1 << 60;
/// WRMSR of `STAMP | tsc`: the VMM records a guest TSC value.
const STAMP: u64 = 2 << 60;

/// Mark kinds (bits 31:24 of the tag; rate index in 23:16, round in 15:8).
const MARK_CONTROL_START: u64 = 1;
const MARK_CONTROL_END: u64 = 2;
const MARK_PMI_START: u64 = 3;
const MARK_PMI_END: u64 = 4;
/// Around each timed loop of `bench_io` (variant in 23:16, round in 15:8).
const MARK_IO_START: u64 = 5;
const MARK_IO_END: u64 = 6;

const MAX_ROUNDS: usize = 32;
const MAX_LIST: usize = 8;
/// Handler entry stamps kept per vCPU and window.
const MAX_STAMPS: usize = 1024;
/// Iterations of one work chunk of the PMI windows (a DEC/JNZ loop). On
/// the development hosts KVM emulates every guest instruction (about 0.6 us
/// each, see BENCHMARKS.md), so this is about 120 us there; the RDTSC after
/// each chunk costs about 6 us.
const CHUNK: u64 = 100;
/// Self-NMIs that time KVM's NMI delivery and the probe's NMI entry path.
const CALIBRATIONS: usize = 16;

/// The `probe.bench_*` parameters.
struct Params {
    null_msr: u32,
    kernel_msr: u32,
    port: u16,
    ops: u64,
    rounds: usize,
    /// Counters running in the `bench_io` variants (`u32::MAX` = all).
    counters: [u32; MAX_LIST],
    ncounters: usize,
    /// PMIs per second of the `bench_pmi` variants.
    rates: [u64; MAX_LIST],
    nrates: usize,
    ms: u64,
    pmi_rounds: usize,
    stamps: usize,
    /// `bench_pmi`'s handler: `basic` (no freeze, one status read) instead
    /// of Linux's.
    basic_handler: bool,
}

impl Params {
    fn parse(raw: &[u8]) -> Params {
        let mut p = Params {
            null_msr: 0x4b56_4df0,
            kernel_msr: 0x174,
            port: 0x80,
            ops: 500,
            rounds: 9,
            counters: [0, 1, 4, u32::MAX, 0, 0, 0, 0],
            ncounters: 4,
            rates: [1000, 0, 0, 0, 0, 0, 0, 0],
            nrates: 1,
            ms: 200,
            pmi_rounds: 2,
            stamps: 256,
            basic_handler: false,
        };
        for tok in raw.split(|b| b.is_ascii_whitespace()) {
            let Some(i) = tok.iter().position(|&b| b == b'=') else {
                continue;
            };
            let (key, val) = (&tok[..i], &tok[i + 1..]);
            // A malformed number leaves the default (the command-line
            // parser warns about it), as for every other parameter.
            match (key, parse_u64(val)) {
                (b"probe.bench_msr", Some(n)) => p.null_msr = n as u32,
                (b"probe.bench_kmsr", Some(n)) => p.kernel_msr = n as u32,
                (b"probe.bench_port", Some(n)) => p.port = n as u16,
                (b"probe.bench_ops", Some(n)) => p.ops = n.max(1),
                (b"probe.bench_rounds", Some(n)) => p.rounds = (n as usize).clamp(1, MAX_ROUNDS),
                (b"probe.bench_ms", Some(n)) => p.ms = n.max(1),
                (b"probe.bench_pmi_rounds", Some(n)) => {
                    p.pmi_rounds = (n as usize).clamp(1, MAX_ROUNDS)
                }
                (b"probe.bench_stamps", Some(n)) => p.stamps = (n as usize).min(MAX_STAMPS),
                (b"probe.bench_handler", _) => p.basic_handler = val == b"basic",
                (b"probe.bench_counters", _) => {
                    p.ncounters = 0;
                    for part in val.split(|&b| b == b',') {
                        let k = match part {
                            b"all" => Some(u32::MAX),
                            _ => parse_u64(part).map(|v| v as u32),
                        };
                        if let (Some(k), true) = (k, p.ncounters < MAX_LIST) {
                            p.counters[p.ncounters] = k;
                            p.ncounters += 1;
                        }
                    }
                }
                (b"probe.bench_rates", _) => {
                    p.nrates = 0;
                    for part in val.split(|&b| b == b',') {
                        if let (Some(r), true) = (parse_u64(part), p.nrates < MAX_LIST) {
                            p.rates[p.nrates] = r.max(1);
                            p.nrates += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        p
    }
}

/// Whether `key` (with `value`) is a `probe.bench_*` parameter this module
/// reads; the command-line parser asks, so that they get no warning.
pub fn known_key(key: &[u8], value: &[u8]) -> bool {
    let list = |v: &[u8]| {
        v.split(|&b| b == b',')
            .all(|p| p == b"all" || parse_u64(p).is_some())
    };
    match key {
        b"probe.bench_counters" => list(value),
        b"probe.bench_rates" => list(value) && !value.split(|&b| b == b',').any(|p| p == b"all"),
        b"probe.bench_msr"
        | b"probe.bench_kmsr"
        | b"probe.bench_port"
        | b"probe.bench_ops"
        | b"probe.bench_rounds"
        | b"probe.bench_ms"
        | b"probe.bench_pmi_rounds"
        | b"probe.bench_stamps" => parse_u64(value).is_some(),
        b"probe.bench_handler" => value == b"linux" || value == b"basic",
        _ => false,
    }
}

/// Runs one of the bench tests on this vCPU. `usable`: the PMU passed its
/// MSR probe (PMU variants are skipped otherwise).
pub fn run(t: Test, cfg: &Config, cpu: u32, p: &Pmu, usable: bool) {
    let params = Params::parse(cfg.raw);
    let usable = usable && cfg.counter < p.num_gp;
    match t {
        Test::BenchMsr => bench_msr(&params, cpu, p, cfg.counter, usable),
        Test::BenchIo => bench_io(&params, cpu, p, usable),
        Test::BenchPmi => bench_pmi(&params, cfg, cpu, p, usable),
        _ => {}
    }
    if usable {
        apic::write(apic::REG_LVT_PC, apic::LVT_MASKED | apic::LVT_DM_NMI);
        let _ = p.reset();
    }
}

// ---------------------------------------------------------------------------
// Loops. Each runs `n` (> 0) iterations of one exiting instruction.

fn wrmsr_loop(msr: u32, value: u64, n: u64) {
    // SAFETY: `value` was read from the MSR (or written to it) without a
    // fault; writing it again changes nothing.
    unsafe {
        asm!("2:", "wrmsr", "dec {n}", "jnz 2b", n = inout(reg) n => _, in("ecx") msr,
             in("eax") value as u32, in("edx") (value >> 32) as u32, options(nomem, nostack));
    }
}

fn out_loop(port: u16, n: u64) {
    // SAFETY: a port no device of the VMM claims: writes vanish.
    unsafe {
        asm!("2:", "out dx, al", "dec {n}", "jnz 2b", n = inout(reg) n => _, in("dx") port,
             in("al") 0u8, options(nomem, nostack));
    }
}

/// `CHUNK` iterations of a register-only loop: guest work with no exit.
fn work_chunk() {
    // SAFETY: touches only its own register.
    unsafe {
        asm!("2:", "dec {n}", "jnz 2b", n = inout(reg) CHUNK => _, options(nomem, nostack));
    }
}

/// Per-op cycles of each round, and their median.
struct Rounds {
    v: [u64; MAX_ROUNDS],
    n: usize,
}

impl Rounds {
    const fn new() -> Rounds {
        Rounds {
            v: [0; MAX_ROUNDS],
            n: 0,
        }
    }

    fn push(&mut self, x: u64) {
        if self.n < MAX_ROUNDS {
            self.v[self.n] = x;
            self.n += 1;
        }
    }

    fn median(&self) -> u64 {
        let mut s = [0u64; MAX_ROUNDS];
        s[..self.n].copy_from_slice(&self.v[..self.n]);
        let s = &mut s[..self.n];
        // Insertion sort: at most MAX_ROUNDS values.
        for i in 1..s.len() {
            let mut j = i;
            while j > 0 && s[j - 1] > s[j] {
                s.swap(j - 1, j);
                j -= 1;
            }
        }
        s.get(s.len() / 2).copied().unwrap_or(0)
    }
}

impl Put for Rounds {
    fn put(&self, l: &mut Line) {
        l.put("median=").put(&self.median()).put(" rounds=");
        for (i, v) in self.v[..self.n].iter().enumerate() {
            if i > 0 {
                l.byte(b',');
            }
            l.put(v);
        }
    }
}

// ---------------------------------------------------------------------------
// bench_msr

/// The MSRs of `bench_msr`, in the order each round runs them.
const MSR_KINDS: [&str; 4] = ["pmu_ctr", "pmu_sel", "null", "kernel"];

fn bench_msr(params: &Params, cpu: u32, p: &Pmu, counter: u32, usable: bool) {
    if usable {
        let _ = p.reset();
        // A stopped cycles counter with a non-zero value: writes of the same
        // values reprogram nothing.
        let _ = p.setup(counter, p.cycles_sel(), 0x1234);
    }
    let msrs = [
        usable.then(|| p.ctr_msr(counter)),
        usable.then(|| p.ctl_msr(counter)),
        Some(params.null_msr),
        Some(params.kernel_msr),
    ];
    // Each MSR is read once with #GP protection; one that faults is skipped.
    let mut values = [None; 4];
    for (v, msr) in values.iter_mut().zip(msrs) {
        *v = msr.and_then(|m| rdmsr_safe(m).ok().filter(|&x| wrmsr_safe(m, x).is_ok()));
    }
    let mut rd = [const { Rounds::new() }; 4];
    let mut wr = [const { Rounds::new() }; 4];
    let n = params.ops;
    for _ in 0..params.rounds {
        for k in 0..4 {
            if let (Some(msr), Some(_)) = (msrs[k], values[k]) {
                rd[k].push(steal::run_tsc(|| rdmsr_loop(msr, n)) / n);
            }
        }
        for k in 0..4 {
            if let (Some(msr), Some(v)) = (msrs[k], values[k]) {
                wr[k].push(steal::run_tsc(|| wrmsr_loop(msr, v, n)) / n);
            }
        }
    }
    for k in 0..4 {
        for (op, r) in [("rd", &rd[k]), ("wr", &wr[k])] {
            let mut l = Line::new();
            l.put("cpu=")
                .put(&cpu)
                .put(" test=bench_msr op=")
                .put(op)
                .put(" msr=")
                .put(MSR_KINDS[k]);
            match (msrs[k], values[k]) {
                (Some(msr), value) => {
                    l.put(" index=").put(&Hex(msr as u64));
                    match value {
                        Some(_) => l.put(" ops=").put(&n).put(" ").put(r),
                        None => l.put(" skipped=gp"),
                    };
                }
                (None, _) => {
                    l.put(" skipped=no_pmu");
                }
            }
            l.print();
        }
    }
}

// ---------------------------------------------------------------------------
// bench_io

/// Starts the first `k` counters counting cycles (no INT); returns how many.
fn start_counters(p: &Pmu, k: u32) -> u32 {
    let k = k.min(p.num_gp);
    let sel = p.cycles_sel();
    let mut mask = 0;
    for i in 0..k {
        let _ = p.setup(i, sel, 0);
        let _ = pmu::wr(p.ctl_msr(i), sel | SEL_EN);
        mask |= 1 << i;
    }
    if let Some(g) = p.global_ctl_msr() {
        let _ = pmu::wr(g, mask);
    }
    k
}

fn stop_counters(p: &Pmu, k: u32) {
    if let Some(g) = p.global_ctl_msr() {
        let _ = pmu::wr(g, 0);
    }
    for i in 0..k.min(p.num_gp) {
        let _ = pmu::wr(p.ctl_msr(i), p.cycles_sel());
    }
}

fn bench_io(params: &Params, cpu: u32, p: &Pmu, usable: bool) {
    let mut results = [const { Rounds::new() }; MAX_LIST];
    let n = params.ops;
    for round in 0..params.rounds {
        for (j, &k) in params.counters[..params.ncounters].iter().enumerate() {
            if k > 0 && !usable {
                continue;
            }
            let running = if usable { start_counters(p, k) } else { 0 };
            mark(params.null_msr, MARK_IO_START, j, round);
            results[j].push(steal::run_tsc(|| out_loop(params.port, n)) / n);
            mark(params.null_msr, MARK_IO_END, j, round);
            if usable {
                stop_counters(p, running);
            }
        }
    }
    for (j, &k) in params.counters[..params.ncounters].iter().enumerate() {
        let label: &dyn Put = if k == u32::MAX { &"all" } else { &k };
        if k > 0 && !usable {
            out!(
                "cpu=",
                cpu,
                " test=bench_io counters=",
                label,
                " skipped=no_pmu"
            );
            continue;
        }
        let running = if usable { k.min(p.num_gp) } else { 0 };
        out!(
            "cpu=",
            cpu,
            " test=bench_io counters=",
            label,
            " running=",
            running,
            " vpmu=",
            usable,
            " port=",
            Hex(params.port as u64),
            " ops=",
            n,
            " ",
            &results[j]
        );
    }
}

// ---------------------------------------------------------------------------
// bench_pmi

/// This vCPU's state shared with its PMI handler.
struct BenchCpu {
    armed: AtomicBool,
    counter: AtomicU32,
    period: AtomicU64,
    pmis: AtomicU64,
    /// TSC cycles from handler entry to its last instruction, summed.
    handler_tsc: AtomicU64,
    /// PMU MSR accesses the handler made.
    msr_accesses: AtomicU64,
    /// Of those, faulted.
    gps: AtomicU64,
    /// Overflow status (or legacy top-bit test) seen set.
    status_ok: AtomicU64,
    /// Read the counter with RDPMC instead of RDMSR.
    rdpmc: AtomicBool,
    /// The basic handler instead of Linux's.
    basic: AtomicBool,
    /// A self-NMI times the entry path: the handler only stamps.
    calibrating: AtomicBool,
    calibration_stamp: AtomicU64,
}

#[link_section = ".data.probe_state"]
static STATE: [BenchCpu; MAX_CPUS] = [const {
    BenchCpu {
        armed: AtomicBool::new(false),
        counter: AtomicU32::new(0),
        period: AtomicU64::new(0),
        pmis: AtomicU64::new(0),
        handler_tsc: AtomicU64::new(0),
        msr_accesses: AtomicU64::new(0),
        gps: AtomicU64::new(0),
        status_ok: AtomicU64::new(0),
        rdpmc: AtomicBool::new(false),
        basic: AtomicBool::new(false),
        calibrating: AtomicBool::new(false),
        calibration_stamp: AtomicU64::new(0),
    }
}; MAX_CPUS];

/// Handler entry TSC values, per vCPU: written by its handler while armed,
/// read by the vCPU after disarming.
struct Stamps(UnsafeCell<[[u64; MAX_STAMPS]; MAX_CPUS]>);
// SAFETY: row i is only touched by vCPU i (its handler while armed, the
// test after disarming, never both at once).
unsafe impl Sync for Stamps {}
static STAMPS: Stamps = Stamps(UnsafeCell::new([[0; MAX_STAMPS]; MAX_CPUS]));

fn stamp_slot(cpu: u32, i: usize) -> *mut u64 {
    // SAFETY: in bounds (callers check i < MAX_STAMPS, cpu < MAX_CPUS); only
    // a raw pointer is formed.
    unsafe { (STAMPS.0.get() as *mut u64).add(cpu as usize * MAX_STAMPS + i) }
}

/// The NMI handler's hook: handles the NMI if this vCPU's PMI benchmark is
/// armed (returns true), else leaves it to the probe's own handler.
pub fn handle_nmi() -> bool {
    let t0 = rdtsc();
    let cpu = percpu::this_cpu_id();
    let st = &STATE[cpu as usize];
    if st.calibrating.load(Ordering::Acquire) {
        st.calibration_stamp.store(t0, Ordering::Release);
        return true;
    }
    if !st.armed.load(Ordering::Acquire) {
        return false;
    }
    let Some(p) = pmu::current() else {
        return false;
    };
    let n = st.pmis.fetch_add(1, Ordering::Relaxed);
    if (n as usize) < MAX_STAMPS {
        // SAFETY: this vCPU's row, written only here while armed.
        unsafe { stamp_slot(cpu, n as usize).write_volatile(t0) };
    }
    let i = st.counter.load(Ordering::Relaxed);
    let period = st.period.load(Ordering::Relaxed);
    let handler = Handler {
        rdpmc: st.rdpmc.load(Ordering::Relaxed),
        basic: st.basic.load(Ordering::Relaxed),
    };
    let (accesses, gps, ok) = handler.run(&p, i, period);
    st.msr_accesses.fetch_add(accesses, Ordering::Relaxed);
    st.gps.fetch_add(gps, Ordering::Relaxed);
    st.status_ok.fetch_add(ok as u64, Ordering::Relaxed);
    st.handler_tsc
        .fetch_add(rdtsc().wrapping_sub(t0), Ordering::Relaxed);
    true
}

/// The benchmark's PMI handler.
struct Handler {
    /// Read the counter with RDPMC, as Linux does, instead of RDMSR.
    rdpmc: bool,
    /// Only read status, read the counter, write the period, ack and
    /// re-enable (the minimal handler): no freeze first, no second
    /// status read on Intel.
    basic: bool,
}

impl Handler {
    /// What Linux's PMI handler does for one overflowed counter `i`
    /// (`amd_pmu_v2_handle_irq`, `intel_pmu_handle_irq`, `x86_pmu_handle_irq`
    /// for models without global registers), or the basic handler. Returns
    /// (PMU MSR accesses, #GPs, overflow seen).
    fn run(&self, p: &Pmu, i: u32, period: u64) -> (u64, u64, bool) {
        let rdpmc = self.rdpmc;
        let mut acc = Access { n: 0, gp: 0 };
        let bit = 1u64 << i;
        let rearm = period.wrapping_neg() & p.gp_mask();
        let (Some(ctl), Some(status), Some(ack)) = (
            p.global_ctl_msr(),
            p.global_status_msr(),
            p.global_ack_msr(),
        ) else {
            // Legacy: LVTPC unmasked, the counter read, re-armed if its top
            // bit is clear (it wrapped).
            apic::write(apic::REG_LVT_PC, apic::LVT_DM_NMI);
            let v = read_counter(p, i, rdpmc, &mut acc);
            let overflowed = v & (1 << (p.gp_width - 1)) == 0;
            if overflowed {
                acc.wr(p.ctr_msr(i), rearm);
            }
            return (acc.n, acc.gp, overflowed);
        };
        if p.kind == Kind::Intel {
            // Intel: LVTPC unmasked first (the LAPIC masked it on delivery).
            apic::write(apic::REG_LVT_PC, apic::LVT_DM_NMI);
        }
        if !self.basic {
            // Freeze: Linux stops every counter before looking at them.
            acc.wr(ctl, 0);
        }
        let s = acc.rd(status);
        read_counter(p, i, rdpmc, &mut acc);
        if s & bit != 0 {
            acc.wr(p.ctr_msr(i), rearm);
        }
        acc.wr(ack, s);
        if p.kind == Kind::Intel && !self.basic {
            // Intel reads the status again for overflows that came meanwhile.
            acc.rd(status);
        }
        acc.wr(ctl, bit);
        (acc.n, acc.gp, s & bit != 0)
    }
}

/// PMU MSR accesses of the handler and how many faulted.
struct Access {
    n: u64,
    gp: u64,
}

impl Access {
    fn rd(&mut self, msr: u32) -> u64 {
        self.n += 1;
        rdmsr_safe(msr).unwrap_or_else(|_| {
            self.gp += 1;
            0
        })
    }

    fn wr(&mut self, msr: u32, value: u64) {
        self.n += 1;
        self.gp += wrmsr_safe(msr, value).is_err() as u64;
    }
}

fn read_counter(p: &Pmu, i: u32, rdpmc: bool, acc: &mut Access) -> u64 {
    if rdpmc {
        rdpmc_safe(p.rdpmc_index(i)).unwrap_or(0)
    } else {
        acc.rd(p.ctr_msr(i))
    }
}

fn mark(null_msr: u32, kind: u64, rate: usize, round: usize) {
    let tag = kind << 24 | (rate as u64) << 16 | (round as u64) << 8;
    let _ = wrmsr_safe(null_msr, MARK | tag);
}

/// Busy work for `window` TSC cycles in chunks; returns (chunks, TSC
/// cycles, steal ns).
fn work(window: u64) -> (u64, u64, u64) {
    let s0 = steal::steal_ns();
    let t0 = rdtsc();
    let mut chunks = 0;
    loop {
        work_chunk();
        chunks += 1;
        let t = rdtsc() - t0;
        if t >= window {
            return (chunks, t, steal::steal_ns() - s0);
        }
    }
}

/// TSC cycles from a self-NMI (an x2APIC/xAPIC ICR write, which KVM
/// handles in the kernel) to the stamp this module's NMI hook takes first:
/// KVM's own NMI delivery plus the probe's vector-2 entry path (IDT gate,
/// stub, dispatch), which a PMI also takes before its stamp. Median of a
/// few.
fn self_nmi_latency(st: &BenchCpu) -> u64 {
    let mut r = Rounds::new();
    st.calibrating.store(true, Ordering::Release);
    for _ in 0..CALIBRATIONS {
        st.calibration_stamp.store(0, Ordering::Release);
        let t0 = rdtsc();
        apic::send_nmi_to_self();
        let limit = time::ms_to_tsc(10);
        while st.calibration_stamp.load(Ordering::Acquire) == 0 && rdtsc() - t0 < limit {
            core::hint::spin_loop();
        }
        let t1 = st.calibration_stamp.load(Ordering::Acquire);
        if t1 != 0 {
            r.push(t1.wrapping_sub(t0));
        }
    }
    st.calibrating.store(false, Ordering::Release);
    r.median()
}

fn bench_pmi(params: &Params, cfg: &Config, cpu: u32, p: &Pmu, usable: bool) {
    if !usable {
        out!("cpu=", cpu, " test=bench_pmi skipped=no_pmu");
        return;
    }
    let st = &STATE[cpu as usize];
    out!(
        "cpu=",
        cpu,
        " test=bench_pmi_entry self_nmi_to_stamp_tsc=",
        self_nmi_latency(st)
    );
    let i = cfg.counter;
    let sel = p.cycles_sel();
    let window = time::ms_to_tsc(params.ms);
    let null = params.null_msr;
    st.counter.store(i, Ordering::Relaxed);
    st.rdpmc.store(cfg.rdpmc, Ordering::Relaxed);
    st.basic.store(params.basic_handler, Ordering::Relaxed);
    for (ri, &rate) in params.rates[..params.nrates].iter().enumerate() {
        let period = (time::tsc_khz() * 1000 / rate).clamp(1, p.max_period());
        st.period.store(period, Ordering::Relaxed);
        for round in 0..params.pmi_rounds {
            // Control: the counter counts, no PMI.
            let _ = p.reset();
            let _ = p.setup(i, sel, 0);
            let _ = p.start(i, sel);
            mark(null, MARK_CONTROL_START, ri, round);
            let (c_chunks, c_tsc, c_steal) = work(window);
            mark(null, MARK_CONTROL_END, ri, round);
            let _ = p.stop(i, sel);

            // The same with PMIs.
            let _ = p.reset();
            st.pmis.store(0, Ordering::Relaxed);
            st.handler_tsc.store(0, Ordering::Relaxed);
            st.msr_accesses.store(0, Ordering::Relaxed);
            st.gps.store(0, Ordering::Relaxed);
            st.status_ok.store(0, Ordering::Relaxed);
            let _ = p.setup(i, sel | SEL_INT, period.wrapping_neg());
            apic::write(apic::REG_LVT_PC, apic::LVT_DM_NMI);
            st.armed.store(true, Ordering::Release);
            let _ = p.start(i, sel | SEL_INT);
            mark(null, MARK_PMI_START, ri, round);
            let (p_chunks, p_tsc, p_steal) = work(window);
            mark(null, MARK_PMI_END, ri, round);
            let _ = p.stop(i, sel | SEL_INT);
            apic::write(apic::REG_LVT_PC, apic::LVT_MASKED | apic::LVT_DM_NMI);
            st.armed.store(false, Ordering::Release);

            let pmis = st.pmis.load(Ordering::Relaxed);
            let stamps = (pmis as usize).min(params.stamps).min(MAX_STAMPS);
            for k in 0..stamps {
                // SAFETY: disarmed: the handler no longer writes the row.
                let t = unsafe { stamp_slot(cpu, k).read_volatile() };
                let _ = wrmsr_safe(null, STAMP | (t & !(0xf << 60)));
            }
            let handler = st.handler_tsc.load(Ordering::Relaxed);
            out!(
                "cpu=",
                cpu,
                " test=bench_pmi rate=",
                rate,
                " round=",
                round,
                " period=",
                period,
                " ms=",
                params.ms,
                " pmis=",
                pmis,
                " status_ok=",
                st.status_ok.load(Ordering::Relaxed),
                " handler_msrs=",
                st.msr_accesses.load(Ordering::Relaxed),
                " handler_gps=",
                st.gps.load(Ordering::Relaxed),
                " handler_tsc=",
                handler,
                " control_chunks=",
                c_chunks,
                " control_tsc=",
                c_tsc,
                " control_steal_us=",
                c_steal / 1000,
                " pmi_chunks=",
                p_chunks,
                " pmi_tsc=",
                p_tsc,
                " pmi_steal_us=",
                p_steal / 1000,
                " stamps=",
                stamps,
                " rdpmc=",
                cfg.rdpmc,
                " handler=",
                if params.basic_handler {
                    "basic"
                } else {
                    "linux"
                }
            );
        }
    }
}
