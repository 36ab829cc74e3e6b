//! Hostile-guest tests: what a guest that abuses its PMU gets,
//! and that the VMM stays well. Each prints one result line; the host side
//! is `tests/robustness.rs`, which also watches the VMM (API answers, CPU,
//! memory, threads, descriptors) while they run.
//!
//! - `msrstorm`: `probe.storm_n` PMU MSR accesses (reads and writes of
//!   random values, reserved bits included) spread over every PMU MSR of
//!   the model, the ones just outside it and the neighbours of every block;
//!   then a sanity check that the PMU still counts.
//! - `pmistorm`: every counter (fixed ones too) armed at -1 with PMIs on:
//!   period 1. A Linux-like handler acknowledges and re-arms at -1 for
//!   `probe.storm_ms`; the main loop must keep running.
//! - `edges`: every reserved bit of every writable register, alone and all
//!   at once; counter bits above the width; MSRs just outside every block
//!   and counters beyond the model's count (read and write).
//! - `inflight`: a sampling counter is reprogrammed (ring levels, value,
//!   enable, global enable) as fast as possible while its PMIs come in.
//! - `exits`: core cycles over `probe.storm_exits` PMU MSR exits separated
//!   by `probe.storm_spin_us` of busy loop: the counter must track the
//!   busy loops (guest time), not the time the VMM spent on the exits.
//! - `observe`: what the guest can see of one event (`probe.storm_event`)
//!   programmed to overflow quickly, for `probe.storm_ms`: value, select, status, PMIs. A denied
//!   event and one the host cannot count must look the same.
//!
//! Parameters are `probe.storm_*` keys (README.md).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::cmdline::{numeric_params, parse_u64, Config, Test};
use crate::cpu::{rdmsr_loop, rdtsc, wrmsr_safe};
use crate::pmu::{amd, intel, low_bits, Kind, Pmu, SEL_EN, SEL_INT, SEL_OS, SEL_USR};
use crate::serial::Hex;
use crate::{apic, out, percpu, steal, time, MAX_CPUS};

/// The `probe.storm_*` parameters.
struct Params {
    n: u64,
    random: u64,
    seed: u64,
    ms: u64,
    exits: u64,
    spin_us: u64,
    period: u64,
    event: Option<u64>,
}

impl Params {
    fn parse(raw: &[u8]) -> Params {
        let mut p = Params {
            n: 1_000_000,
            random: 20_000,
            seed: 1,
            ms: 300,
            exits: 200,
            spin_us: 1000,
            period: 20_000,
            event: None,
        };
        for (key, n) in numeric_params(raw) {
            match key {
                b"probe.storm_n" => p.n = n,
                b"probe.storm_random" => p.random = n,
                b"probe.storm_seed" => p.seed = n.max(1),
                b"probe.storm_ms" => p.ms = n.max(1),
                b"probe.storm_exits" => p.exits = n,
                b"probe.storm_spin_us" => p.spin_us = n,
                b"probe.storm_period" => p.period = n.max(1),
                b"probe.storm_event" => p.event = Some(n),
                _ => {}
            }
        }
        p
    }
}

/// Whether `key` is a `probe.storm_*` parameter with a valid value (the
/// command-line parser asks, so that they get no warning).
pub fn known_key(key: &[u8], value: &[u8]) -> bool {
    matches!(
        key,
        b"probe.storm_n"
            | b"probe.storm_random"
            | b"probe.storm_seed"
            | b"probe.storm_ms"
            | b"probe.storm_exits"
            | b"probe.storm_spin_us"
            | b"probe.storm_period"
            | b"probe.storm_event"
    ) && parse_u64(value).is_some()
}

/// Runs one storm test on this vCPU. `usable`: the PMU passed its probe.
pub fn run(t: Test, cfg: &Config, cpu: u32, p: &Pmu, usable: bool) {
    if !usable {
        out!("cpu=", cpu, " test=", t.name(), " skipped=no_pmu");
        return;
    }
    let params = Params::parse(cfg.raw);
    let i = cfg.counter.min(p.num_gp - 1);
    match t {
        Test::MsrStorm => msr_storm(&params, cfg, cpu, p, i),
        Test::PmiStorm => pmi_storm(&params, cpu, p),
        Test::Edges => edges(cfg, cpu, p),
        Test::Inflight => inflight(&params, cpu, p, i),
        Test::Exits => exits(&params, cpu, p, i),
        Test::Observe => observe(&params, cpu, p, i),
        _ => {}
    }
    let st = state();
    st.mode.store(MODE_IDLE, Ordering::Release);
    apic::write(apic::REG_LVT_PC, apic::LVT_MASKED | apic::LVT_DM_NMI);
    let _ = p.reset();
}

// ---------------------------------------------------------------------------
// Shared with the NMI handler.

const MODE_IDLE: u32 = 0;
/// `pmistorm`: acknowledge every overflowed counter and re-arm it at -1.
const MODE_STORM: u32 = 1;
/// `inflight`: one counter, re-armed at -period.
const MODE_INFLIGHT: u32 = 2;
/// Counters disabled (or only observed): count and acknowledge.
const MODE_COUNT: u32 = 3;

struct State {
    mode: AtomicU32,
    counter: AtomicU32,
    period: AtomicU64,
    pmis: AtomicU64,
    /// PMIs whose handler found no overflowed counter.
    nostatus: AtomicU64,
    /// Overflowed counters seen by the handlers.
    bits: AtomicU64,
    handler_gp: AtomicU64,
    handler_tsc: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const STATE_INIT: State = State {
    mode: AtomicU32::new(MODE_IDLE),
    counter: AtomicU32::new(0),
    period: AtomicU64::new(1),
    pmis: AtomicU64::new(0),
    nostatus: AtomicU64::new(0),
    bits: AtomicU64::new(0),
    handler_gp: AtomicU64::new(0),
    handler_tsc: AtomicU64::new(0),
};
#[link_section = ".data.probe_state"]
static STATE: [State; MAX_CPUS] = [STATE_INIT; MAX_CPUS];

fn state() -> &'static State {
    &STATE[percpu::this_cpu_id() as usize]
}

/// Clears the counts and enters `mode`.
fn arm(mode: u32, counter: u32, period: u64) {
    let st = state();
    for a in [
        &st.pmis,
        &st.nostatus,
        &st.bits,
        &st.handler_gp,
        &st.handler_tsc,
    ] {
        a.store(0, Ordering::Relaxed);
    }
    st.counter.store(counter, Ordering::Relaxed);
    st.period.store(period, Ordering::Relaxed);
    st.mode.store(mode, Ordering::Release);
}

/// What the handlers counted up to a stop, and the PMIs after it.
struct Counts {
    pmis: u64,
    nostatus: u64,
    bits: u64,
    handler_tsc: u64,
    handler_gp: u64,
    late: u64,
}

/// Call right after stopping the counters (mode `MODE_COUNT`): takes the
/// counts, then waits a quarter of the `ms` window for late PMIs (one
/// raised before the stop may still arrive, on hardware too; more would be
/// PMIs without an overflow) and disarms the handler.
fn settle(ms: u64) -> Counts {
    let st = state();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut counts = Counts {
        pmis: load(&st.pmis),
        nostatus: load(&st.nostatus),
        bits: load(&st.bits),
        handler_tsc: load(&st.handler_tsc),
        handler_gp: load(&st.handler_gp),
        late: 0,
    };
    time::spin_tsc(time::ms_to_tsc(ms / 4 + 1));
    counts.late = load(&st.pmis) - counts.pmis;
    st.mode.store(MODE_IDLE, Ordering::Release);
    counts
}

/// The NMI handler's entry for these tests; `false` when none is armed on
/// this vCPU (the other handlers get the NMI).
pub fn handle_nmi() -> bool {
    let t0 = rdtsc();
    let st = state();
    let mode = st.mode.load(Ordering::Acquire);
    if mode == MODE_IDLE {
        return false;
    }
    let Some(p) = crate::pmu::current() else {
        return false;
    };
    st.pmis.fetch_add(1, Ordering::Relaxed);
    let mut gp = 0;
    let bits = match mode {
        MODE_STORM => rearm_overflowed(&p, p.status_bits(), 1, &mut gp),
        MODE_INFLIGHT => {
            let i = st.counter.load(Ordering::Relaxed);
            let period = st.period.load(Ordering::Relaxed);
            rearm_overflowed(&p, 1 << i, period, &mut gp)
        }
        _ => rearm_overflowed(&p, p.status_bits(), 0, &mut gp),
    };
    if bits == 0 {
        st.nostatus.fetch_add(1, Ordering::Relaxed);
    }
    st.bits
        .fetch_add(bits.count_ones() as u64, Ordering::Relaxed);
    st.handler_gp.fetch_add(gp, Ordering::Relaxed);
    apic::write(apic::REG_LVT_PC, apic::LVT_DM_NMI);
    st.handler_tsc
        .fetch_add(rdtsc().wrapping_sub(t0), Ordering::Relaxed);
    true
}

fn wr_count(msr: u32, v: u64, gp: &mut u64) {
    *gp += wrmsr_safe(msr, v).is_err() as u64;
}

/// Counter MSR of counter bit `b` (gp counters 0-31, fixed from 32).
fn counter_msr(p: &Pmu, b: u32) -> u32 {
    if b >= 32 {
        intel::FIXED_CTR0 + b - 32
    } else {
        p.ctr_msr(b)
    }
}

fn width_mask(p: &Pmu, b: u32) -> u64 {
    low_bits(if b >= 32 { p.fixed_width } else { p.gp_width })
}

/// Like Linux's PMI handlers: freeze (global control off), find the
/// overflowed counters among `mask` (global status, or the counter's top
/// bit without one), acknowledge them, re-arm each at -`period` (0: leave
/// it), unfreeze. Returns the overflowed counter bits.
fn rearm_overflowed(p: &Pmu, mask: u64, period: u64, gp: &mut u64) -> u64 {
    let global = p.global_ctl_msr();
    let enabled = match global {
        Some(g) => {
            let old = crate::cpu::rdmsr_safe(g).unwrap_or(0);
            wr_count(g, 0, gp);
            old
        }
        None => 0,
    };
    let bits = match p.global_status_msr() {
        Some(status) => match crate::cpu::rdmsr_safe(status) {
            Ok(s) => s & mask,
            Err(()) => {
                *gp += 1;
                0
            }
        },
        None => {
            let mut bits = 0;
            for b in 0..p.num_gp {
                if mask & (1 << b) == 0 {
                    continue;
                }
                match crate::cpu::rdmsr_safe(p.ctr_msr(b)) {
                    // Armed at minus a period, the counter has its top bit
                    // set until it wraps.
                    Ok(v) if v & (1 << (p.gp_width - 1)) == 0 => bits |= 1 << b,
                    Ok(_) => {}
                    Err(()) => *gp += 1,
                }
            }
            bits
        }
    };
    if let Some(ack) = p.global_ack_msr() {
        if bits != 0 {
            wr_count(ack, bits, gp);
        }
    }
    if period != 0 {
        let mut rest = bits;
        while rest != 0 {
            let b = rest.trailing_zeros();
            rest &= rest - 1;
            wr_count(
                counter_msr(p, b),
                period.wrapping_neg() & width_mask(p, b),
                gp,
            );
        }
    }
    if let Some(g) = global {
        wr_count(g, enabled, gp);
    }
    bits
}

// ---------------------------------------------------------------------------
// msrstorm

/// What hardware answers for an MSR of the storm list.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    /// A register of the model: reads work; AMD writes never fault.
    Defined,
    /// Read-only register of the model (global status): reads work, writes
    /// fault on Intel and are ignored on AMD.
    ReadOnly,
    /// Not a register of the model: reads and writes fault.
    Outside,
}

const MAX_STORM_MSRS: usize = 80;

struct MsrList {
    msr: [u32; MAX_STORM_MSRS],
    class: [Class; MAX_STORM_MSRS],
    /// Valid bits of a register (AMD: what a write keeps).
    valid: [u64; MAX_STORM_MSRS],
    n: usize,
}

impl MsrList {
    fn push(&mut self, msr: u32, class: Class, valid: u64) {
        // A neighbour that is itself a register keeps its first class.
        if self.n < MAX_STORM_MSRS && !self.msr[..self.n].contains(&msr) {
            self.msr[self.n] = msr;
            self.class[self.n] = class;
            self.valid[self.n] = valid;
            self.n += 1;
        }
    }
}

fn in_or_out(inside: bool) -> Class {
    if inside {
        Class::Defined
    } else {
        Class::Outside
    }
}

/// Every PMU MSR of the vendor's architecture (in the model or not) and
/// the MSR just before and after each block.
fn storm_msrs(p: &Pmu) -> MsrList {
    let mut l = MsrList {
        msr: [0; MAX_STORM_MSRS],
        class: [Class::Outside; MAX_STORM_MSRS],
        valid: [0; MAX_STORM_MSRS],
        n: 0,
    };
    let counters = low_bits(p.num_gp);
    match p.kind {
        Kind::Amd => {
            let width = low_bits(p.gp_width);
            let legacy = if p.amd_ext_core {
                p.num_gp.min(amd::LEGACY_COUNTERS)
            } else {
                p.num_gp
            };
            for i in 0..amd::LEGACY_COUNTERS {
                l.push(amd::LEGACY_CTL0 + i, in_or_out(i < legacy), amd::CTL_VALID);
                l.push(amd::LEGACY_CTR0 + i, in_or_out(i < legacy), width);
            }
            for i in 0..amd::EXT_COUNTERS {
                let inside = p.amd_ext_core && i < p.num_gp;
                l.push(amd::EXT_CTL0 + 2 * i, in_or_out(inside), amd::CTL_VALID);
                l.push(amd::EXT_CTR0 + 2 * i, in_or_out(inside), width);
            }
            l.push(
                amd::GLOBAL_STATUS,
                if p.amd_v2 {
                    Class::ReadOnly
                } else {
                    Class::Outside
                },
                0,
            );
            for msr in [
                amd::GLOBAL_CTL,
                amd::GLOBAL_STATUS_CLR,
                amd::GLOBAL_STATUS_SET,
            ] {
                l.push(msr, in_or_out(p.amd_v2), counters);
            }
            for msr in [
                amd::LEGACY_CTL0 - 1,
                amd::LEGACY_CTR0 + amd::LEGACY_COUNTERS,
                amd::EXT_CTL0 - 1,
                amd::EXT_CTL0 + 2 * amd::EXT_COUNTERS,
                amd::GLOBAL_STATUS - 1,
                amd::GLOBAL_STATUS_SET + 1,
            ] {
                l.push(msr, Class::Outside, 0);
            }
        }
        Kind::Intel => {
            let v2 = p.version >= 2;
            let all = counters | (low_bits(p.num_fixed) << 32);
            for i in 0..8 {
                let inside = i < p.num_gp;
                l.push(intel::PMC0 + i, in_or_out(inside), u64::MAX);
                l.push(
                    intel::PERFEVTSEL0 + i,
                    in_or_out(inside),
                    intel::EVTSEL_VALID,
                );
                l.push(
                    intel::A_PMC0 + i,
                    in_or_out(inside && p.intel_full_width),
                    low_bits(p.gp_width),
                );
            }
            for i in 0..3 {
                l.push(
                    intel::FIXED_CTR0 + i,
                    in_or_out(v2 && i < p.num_fixed),
                    u64::MAX,
                );
            }
            l.push(
                intel::FIXED_CTR_CTRL,
                in_or_out(v2),
                intel::fixed_ctrl_valid(p.num_fixed),
            );
            l.push(
                intel::GLOBAL_STATUS,
                if v2 { Class::ReadOnly } else { Class::Outside },
                0,
            );
            l.push(intel::GLOBAL_CTRL, in_or_out(v2), all);
            l.push(intel::GLOBAL_OVF_CTRL, in_or_out(v2), all);
            l.push(intel::GLOBAL_STATUS_SET, in_or_out(p.version >= 4), all);
            l.push(
                intel::GLOBAL_INUSE,
                if p.version >= 4 {
                    Class::ReadOnly
                } else {
                    Class::Outside
                },
                0,
            );
            for msr in [
                intel::PMC0 - 1,
                intel::PERFEVTSEL0 - 1,
                intel::FIXED_CTR0 - 1,
                intel::FIXED_CTR_CTRL - 1,
                intel::GLOBAL_INUSE + 1,
                intel::A_PMC0 - 1,
            ] {
                l.push(msr, Class::Outside, 0);
            }
        }
        Kind::None => {}
    }
    l
}

struct Rng(u64);

impl Rng {
    /// xorshift64.
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// A value a hostile guest might write: anything, reserved bits, enabled
/// selects of real events with PMIs, values about to overflow.
fn storm_value(r: u64, valid: u64) -> u64 {
    let x = r >> 8;
    match r & 7 {
        0 => x ^ (x << 40),
        1 => {
            let event = [0x76u64, 0xC0, 0x3C, 0x2E, 0xC2][(x % 5) as usize];
            event | (x & 0xFF00) | SEL_USR | SEL_OS | (x & SEL_INT) | SEL_EN
        }
        2 => 0,
        3 => (1u64 << 48) - 1 - (x & 0xFF),
        4 => 1 << (x & 63),
        5 => u64::MAX,
        6 => !valid,
        _ => x & valid,
    }
}

fn msr_storm(params: &Params, cfg: &Config, cpu: u32, p: &Pmu, i: u32) {
    let l = storm_msrs(p);
    let mut rng = Rng(params.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (mut reads, mut writes, mut gps) = (0u64, 0u64, 0u64);
    let (mut outside, mut outside_gp) = (0u64, 0u64);
    let mut mismatches = 0u64;
    let mut first: Option<Hex> = None;
    let amd = p.kind == Kind::Amd;
    let random = params.n.min(params.random);
    // PMIs stay off: LVTPC masked (the VMM drops them, as the LAPIC would).
    apic::write(apic::REG_LVT_PC, apic::LVT_MASKED | apic::LVT_DM_NMI);
    let t0 = rdtsc();
    for _ in 0..random {
        let r = rng.next();
        let k = (r >> 32) as usize % l.n;
        let (msr, class) = (l.msr[k], l.class[k]);
        let write = r & (1 << 31) != 0;
        let faulted = if write {
            writes += 1;
            wrmsr_safe(msr, storm_value(r, l.valid[k])).is_err()
        } else {
            reads += 1;
            crate::cpu::rdmsr_safe(msr).is_err()
        };
        gps += faulted as u64;
        let expected = match class {
            Class::Outside => Some(true),
            _ if !write => Some(false),
            Class::Defined | Class::ReadOnly if amd => Some(false),
            // Intel writes fault on reserved bits: not modelled here (the
            // `gp` and `edges` tests check them bit by bit).
            _ => None,
        };
        if class == Class::Outside {
            outside += 1;
            outside_gp += faulted as u64;
        }
        if expected.is_some_and(|e| e != faulted) {
            mismatches += 1;
            first.get_or_insert(Hex(msr as u64 | (write as u64) << 32));
        }
    }
    let random_tsc = rdtsc() - t0;
    let t1 = rdtsc();
    let looped = storm_loops(p, &l, params.n - random);
    let loop_tsc = rdtsc() - t1;
    let _ = p.reset();
    let (ok, ratio) = still_counts(p, i);
    let ns = |tsc: u64, n: u64| time::tsc_to_us(tsc).saturating_mul(1000) / n.max(1);
    out!(
        "cpu=",
        cpu,
        " test=msrstorm n=",
        random + looped,
        " msrs=",
        l.n,
        " random=",
        random,
        " reads=",
        reads,
        " writes=",
        writes,
        " gps=",
        gps,
        " outside=",
        outside_gp,
        "/",
        outside,
        " mismatches=",
        mismatches,
        " first=",
        first,
        " random_ns=",
        ns(random_tsc, random),
        " looped=",
        looped,
        " loop_ns=",
        ns(loop_tsc, looped),
        " tsc=",
        random_tsc + loop_tsc,
        " counts_after=",
        ok,
        " ratio_permille=",
        ratio,
        " counter=",
        cfg.counter
    );
}

/// Accesses of the defined registers in tight loops (the random part pays
/// for its bookkeeping and #GPs; these cost about one exit each), `budget`
/// in all: for each register in turn a read loop, then a write loop
/// alternating two values that hardware accepts (for event selects two
/// programmings, so every write reprograms the counter on the host).
/// Returns the accesses made.
fn storm_loops(p: &Pmu, l: &MsrList, budget: u64) -> u64 {
    const CHUNK: u64 = 1000;
    let cycles = p.cycles_sel() | SEL_EN;
    let mut done = 0;
    while done < budget {
        let before = done;
        for k in 0..l.n {
            let (msr, class, valid) = (l.msr[k], l.class[k], l.valid[k]);
            if class == Class::Outside {
                continue;
            }
            let n = CHUNK.min(budget - done);
            if n == 0 {
                return done;
            }
            rdmsr_loop(msr, n);
            done += n;
            let n = CHUNK.min(budget - done);
            if class != Class::Defined || n == 0 {
                continue;
            }
            let (a, b) = if valid == amd::CTL_VALID || valid == intel::EVTSEL_VALID {
                (cycles, cycles & !SEL_USR)
            } else {
                (
                    0,
                    valid & ((1u64 << 47) | 0x8000_0000_0000_000F | (0xF << 32)),
                )
            };
            wrmsr_loop(msr, a, a ^ b, n);
            done += n;
        }
        if done == before {
            break; // no defined register
        }
    }
    done
}

/// `n` WRMSRs to `msr`: `a`, then `a ^ toggle`, and so on.
fn wrmsr_loop(msr: u32, a: u64, toggle: u64, n: u64) {
    // SAFETY: both values are accepted by the register (no fault); PMU
    // MSR writes do not touch guest memory.
    unsafe {
        core::arch::asm!("2:", "wrmsr", "xor eax, {tl:e}", "xor edx, {th:e}", "dec {n}",
            "jnz 2b", n = inout(reg) n => _, tl = in(reg) toggle as u32,
            th = in(reg) (toggle >> 32) as u32, in("ecx") msr,
            inout("eax") a as u32 => _, inout("edx") (a >> 32) as u32 => _,
            options(nomem, nostack));
    }
}

/// Whether counter `i` still counts core cycles over a 20 ms busy loop
/// (within a factor 2 of the TSC), and the ratio in permille.
fn still_counts(p: &Pmu, i: u32) -> (bool, u64) {
    let sel = p.cycles_sel();
    if p.setup(i, sel, 0).is_err() || p.start(i, sel).is_err() {
        return (false, 0);
    }
    // Against the time the vCPU ran: a host busy with other work steals
    // much of the 20 ms, which is not guest time.
    let run = steal::run_tsc(|| {
        time::spin_tsc(time::ms_to_tsc(20));
    });
    let v = p.stop(i, sel).and_then(|_| p.read(i)).unwrap_or(0);
    let ratio = v.saturating_mul(1000) / run.max(1);
    ((500..=2000).contains(&ratio), ratio)
}

// ---------------------------------------------------------------------------
// pmistorm

fn pmi_storm(params: &Params, cpu: u32, p: &Pmu) {
    let mut gp = 0u64;
    let sel = p.cycles_sel() | SEL_INT;
    let fixed = if p.kind == Kind::Intel && p.version >= 2 {
        p.num_fixed
    } else {
        0
    };
    let _ = p.reset();
    arm(MODE_STORM, 0, 1);
    apic::write(apic::REG_LVT_PC, apic::LVT_DM_NMI);
    for i in 0..p.num_gp {
        wr_count(p.ctl_msr(i), sel, &mut gp);
        wr_count(p.ctr_msr(i), u64::MAX & p.gp_mask(), &mut gp);
    }
    for j in 0..fixed {
        wr_count(intel::FIXED_CTR0 + j, width_mask(p, 32 + j), &mut gp);
    }
    if fixed > 0 {
        wr_count(
            intel::FIXED_CTR_CTRL,
            (0..fixed).fold(0u64, |m, j| m | 0xb << (4 * j)),
            &mut gp,
        );
    }
    let enable_all = p.status_bits();
    for i in 0..p.num_gp {
        wr_count(p.ctl_msr(i), sel | SEL_EN, &mut gp);
    }
    if let Some(g) = p.global_ctl_msr() {
        wr_count(g, enable_all, &mut gp);
    }
    let st = state();
    let t0 = rdtsc();
    let (_, iters) = time::spin_tsc_counting(time::ms_to_tsc(params.ms));
    let tsc = rdtsc() - t0;
    // Stop everything; PMIs from now on are late.
    st.mode.store(MODE_COUNT, Ordering::Release);
    if let Some(g) = p.global_ctl_msr() {
        wr_count(g, 0, &mut gp);
    }
    for i in 0..p.num_gp {
        wr_count(p.ctl_msr(i), sel, &mut gp);
    }
    if fixed > 0 {
        wr_count(intel::FIXED_CTR_CTRL, 0, &mut gp);
    }
    let Counts {
        pmis,
        nostatus,
        bits,
        handler_tsc,
        handler_gp,
        late,
    } = settle(params.ms);
    out!(
        "cpu=",
        cpu,
        " test=pmistorm counters=",
        p.num_gp + fixed,
        " ms=",
        params.ms,
        " pmis=",
        pmis,
        " overflows_seen=",
        bits,
        " nostatus=",
        nostatus,
        " late=",
        late,
        " tsc=",
        tsc,
        " loop_iters=",
        iters,
        " handler_permille=",
        handler_tsc.saturating_mul(1000) / tsc.max(1),
        " gp=",
        gp,
        " handler_gp=",
        handler_gp,
        " unexpected_nmis=",
        percpu::this_cpu().nmis_unexpected.load(Ordering::Relaxed)
    );
}

// ---------------------------------------------------------------------------
// edges

struct Edges {
    rsvd_gp: bool,
    checks: u64,
    mismatches: u64,
    first: Option<Hex>,
    outside: u64,
    outside_gp: u64,
    reserved: u64,
    reserved_gp: u64,
    kept: u64,
}

impl Edges {
    fn miss(&mut self, msr: u32, write: bool) {
        self.mismatches += 1;
        self.first
            .get_or_insert(Hex(msr as u64 | (write as u64) << 32));
    }

    /// An MSR that is not a register of the model: read and write fault.
    fn outside(&mut self, msr: u32) {
        for write in [false, true] {
            let faulted = match write {
                false => crate::cpu::rdmsr_safe(msr).is_err(),
                true => wrmsr_safe(msr, 0).is_err(),
            };
            self.checks += 1;
            self.outside += 1;
            self.outside_gp += faulted as u64;
            if !faulted {
                self.miss(msr, write);
            }
        }
    }

    /// Writes `bits` (reserved) to `msr`: a #GP (`rsvd_gp`), or dropped
    /// (reads back without them). Restores the register to `restore`.
    fn reserved(&mut self, msr: u32, bits: u64, restore: u64) {
        let faulted = wrmsr_safe(msr, bits).is_err();
        self.checks += 1;
        self.reserved += 1;
        self.reserved_gp += faulted as u64;
        if faulted != self.rsvd_gp {
            self.miss(msr, true);
        } else if !faulted && crate::cpu::rdmsr_safe(msr).is_ok_and(|v| v & bits != 0) {
            self.kept += 1;
            self.miss(msr, true);
        }
        let _ = wrmsr_safe(msr, restore);
    }

    /// Each bit outside `valid | skip` alone, then all of them at once.
    fn every_reserved_bit(&mut self, msr: u32, valid: u64, skip: u64) {
        let reserved = !(valid | skip);
        for b in 0..64 {
            if reserved & (1 << b) != 0 {
                self.reserved(msr, 1 << b, 0);
            }
        }
        if reserved != 0 {
            self.reserved(msr, reserved, 0);
        }
    }

    /// A counter written with bits above its width: `fault` says whether
    /// hardware faults (Intel full-width writes); else they are dropped.
    fn above_width(&mut self, msr: u32, width: u32, fault: bool) {
        if width >= 64 {
            return;
        }
        let value = u64::MAX << width | 1;
        let faulted = wrmsr_safe(msr, value).is_err();
        self.checks += 1;
        if faulted != fault {
            self.miss(msr, true);
        } else if !faulted && crate::cpu::rdmsr_safe(msr).is_ok_and(|v| v >> width != 0) {
            self.kept += 1;
            self.miss(msr, true);
        }
        let _ = wrmsr_safe(msr, 0);
    }
}

fn edges(cfg: &Config, cpu: u32, p: &Pmu) {
    let mut e = Edges {
        rsvd_gp: cfg.rsvd_gp,
        checks: 0,
        mismatches: 0,
        first: None,
        outside: 0,
        outside_gp: 0,
        reserved: 0,
        reserved_gp: 0,
        kept: 0,
    };
    let _ = p.reset();
    let l = storm_msrs(p);
    for k in 0..l.n {
        if l.class[k] == Class::Outside {
            e.outside(l.msr[k]);
        }
    }
    let counters = low_bits(p.num_gp);
    match p.kind {
        Kind::Amd => {
            for i in 0..p.num_gp {
                e.every_reserved_bit(p.ctl_msr(i), amd::CTL_VALID, 0);
                e.above_width(p.ctr_msr(i), p.gp_width, false);
            }
            if p.amd_v2 {
                e.every_reserved_bit(amd::GLOBAL_CTL, counters, 0);
                e.every_reserved_bit(amd::GLOBAL_STATUS_CLR, counters, 0);
                // SET: reserved bits only (valid ones would raise status);
                // they must not show in GLOBAL_STATUS either.
                for b in p.num_gp..64 {
                    e.reserved(amd::GLOBAL_STATUS_SET, 1 << b, 0);
                    if crate::cpu::rdmsr_safe(amd::GLOBAL_STATUS).is_ok_and(|s| s >> p.num_gp != 0)
                    {
                        e.kept += 1;
                        e.miss(amd::GLOBAL_STATUS, false);
                    }
                }
            }
        }
        Kind::Intel => {
            for i in 0..p.num_gp {
                e.every_reserved_bit(
                    intel::PERFEVTSEL0 + i,
                    intel::EVTSEL_VALID,
                    intel::EVTSEL_ANY,
                );
                // Legacy IA32_PMCx writes sign-extend bit 31: never a fault.
                e.above_width(intel::PMC0 + i, 64, false);
                if p.intel_full_width {
                    e.above_width(intel::A_PMC0 + i, p.gp_width, true);
                }
            }
            if p.version >= 2 {
                let all = counters | (low_bits(p.num_fixed) << 32);
                for j in 0..p.num_fixed {
                    e.above_width(intel::FIXED_CTR0 + j, p.fixed_width, false);
                }
                e.every_reserved_bit(
                    intel::FIXED_CTR_CTRL,
                    intel::fixed_ctrl_valid(p.num_fixed),
                    intel::fixed_ctrl_any(p.num_fixed),
                );
                e.every_reserved_bit(intel::GLOBAL_CTRL, all, 0);
                // The version's non-counter status flags (v4: 55, 58-63).
                let flags = intel::status_flags(p.version);
                e.every_reserved_bit(intel::GLOBAL_OVF_CTRL, all, flags);
                if p.version >= 4 {
                    e.every_reserved_bit(intel::GLOBAL_STATUS_SET, all, flags);
                }
            }
        }
        Kind::None => {}
    }
    let _ = p.reset();
    out!(
        "cpu=",
        cpu,
        " test=edges rsvd=",
        if e.rsvd_gp { "gp" } else { "ignore" },
        " checks=",
        e.checks,
        " outside=",
        e.outside_gp,
        "/",
        e.outside,
        " reserved=",
        e.reserved_gp,
        "/",
        e.reserved,
        " kept=",
        e.kept,
        " mismatches=",
        e.mismatches,
        " first=",
        e.first
    );
}

// ---------------------------------------------------------------------------
// inflight

fn inflight(params: &Params, cpu: u32, p: &Pmu, i: u32) {
    let mut gp = 0u64;
    let period = params.period.min(p.max_period());
    let start = period.wrapping_neg() & p.gp_mask();
    let both = p.cycles_sel() | SEL_INT;
    let os_only = both & !SEL_USR;
    let global = p.global_ctl_msr();
    let _ = p.reset();
    arm(MODE_INFLIGHT, i, period);
    apic::write(apic::REG_LVT_PC, apic::LVT_DM_NMI);
    let _ = p.setup(i, both, start);
    if let Some(g) = global {
        wr_count(g, 1 << i, &mut gp);
    }
    wr_count(p.ctl_msr(i), both | SEL_EN, &mut gp);
    let st = state();
    let t0 = rdtsc();
    let deadline = time::ms_to_tsc(params.ms);
    let mut rounds = 0u64;
    while rdtsc() - t0 < deadline {
        // A new programming (ring levels), a new value, enable toggles of
        // both kinds: each is an exit that may meet a PMI on its way.
        let sel = if rounds & 1 == 0 { os_only } else { both };
        wr_count(p.ctl_msr(i), sel | SEL_EN, &mut gp);
        time::spin_tsc(time::ms_to_tsc(1) / 4);
        wr_count(p.ctr_msr(i), start, &mut gp);
        if let Some(g) = global {
            wr_count(g, 0, &mut gp);
            wr_count(g, 1 << i, &mut gp);
        }
        wr_count(p.ctl_msr(i), sel, &mut gp);
        wr_count(p.ctl_msr(i), sel | SEL_EN, &mut gp);
        time::spin_tsc(time::ms_to_tsc(1) / 4);
        rounds += 1;
    }
    st.mode.store(MODE_COUNT, Ordering::Release);
    wr_count(p.ctl_msr(i), both, &mut gp);
    if let Some(g) = global {
        wr_count(g, 0, &mut gp);
    }
    let Counts {
        pmis,
        nostatus,
        handler_gp,
        late,
        ..
    } = settle(params.ms);
    out!(
        "cpu=",
        cpu,
        " test=inflight counter=",
        i,
        " period=",
        period,
        " ms=",
        params.ms,
        " rounds=",
        rounds,
        " pmis=",
        pmis,
        " nostatus=",
        nostatus,
        " late=",
        late,
        " global_status=",
        p.global_status_msr().is_some(),
        " gp=",
        gp,
        " handler_gp=",
        handler_gp,
        " unexpected_nmis=",
        percpu::this_cpu().nmis_unexpected.load(Ordering::Relaxed)
    );
}

// ---------------------------------------------------------------------------
// exits

fn exits(params: &Params, cpu: u32, p: &Pmu, i: u32) {
    let sel = p.cycles_sel();
    if p.setup(i, sel, 0).is_err() || p.start(i, sel).is_err() {
        out!("cpu=", cpu, " test=exits error=setup");
        return;
    }
    let spin = params.spin_us.saturating_mul(time::tsc_khz()) / 1000;
    let ctl = p.ctl_msr(i);
    let (mut busy, mut stolen) = (0u64, 0u64);
    let mut gp = 0u64;
    let t0 = rdtsc();
    for _ in 0..params.exits {
        let (s, steal0) = (rdtsc(), steal::steal_ns());
        time::spin_tsc(spin);
        busy += rdtsc() - s;
        // KVM steal time of the busy loop: the host ran something else.
        stolen += steal::steal_ns() - steal0;
        // One exit to the VMM: reading the event select changes nothing.
        gp += crate::cpu::rdmsr_safe(ctl).is_err() as u64;
    }
    let window = rdtsc() - t0;
    let v = p.stop(i, sel).and_then(|_| p.read(i)).unwrap_or(0);
    let busy_run = busy.saturating_sub(time::ns_to_tsc(stolen));
    out!(
        "cpu=",
        cpu,
        " test=exits counter=",
        i,
        " exits=",
        params.exits,
        " spin_us=",
        params.spin_us,
        " cycles=",
        v,
        " busy_tsc=",
        busy,
        " window_tsc=",
        window,
        " busy_permille=",
        v.saturating_mul(1000) / busy.max(1),
        " busy_steal_us=",
        stolen / 1000,
        " busy_run_permille=",
        v.saturating_mul(1000) / busy_run.max(1),
        " window_permille=",
        v.saturating_mul(1000) / window.max(1),
        " outside_us=",
        time::tsc_to_us(window - busy),
        " gp=",
        gp
    );
}

// ---------------------------------------------------------------------------
// observe

fn observe(params: &Params, cpu: u32, p: &Pmu, i: u32) {
    let event_bits = 0xFFFF | 0xF_0000_0000;
    let event = params.event.unwrap_or(p.cycles_sel()) & event_bits;
    let sel = event | SEL_USR | SEL_OS | SEL_INT;
    let start = 1000u64.wrapping_neg() & p.gp_mask();
    let _ = p.reset();
    arm(MODE_COUNT, i, 0);
    apic::write(apic::REG_LVT_PC, apic::LVT_DM_NMI);
    let setup = p.setup(i, sel, start).and_then(|_| p.start(i, sel));
    time::spin_tsc(time::ms_to_tsc(params.ms));
    let value = p.read(i).ok();
    let select = crate::cpu::rdmsr_safe(p.ctl_msr(i))
        .ok()
        .map(|s| s & !event_bits);
    let status = p
        .global_status_msr()
        .map(|m| crate::cpu::rdmsr_safe(m).unwrap_or(u64::MAX));
    let _ = p.stop(i, sel);
    let st = state();
    out!(
        "cpu=",
        cpu,
        " test=observe event=",
        Hex(event),
        " setup=",
        setup.is_ok(),
        " value=",
        value.map(Hex),
        " counting=",
        value != Some(start),
        " select_rest=",
        select.map(Hex),
        " status=",
        status.map(Hex),
        " pmis=",
        st.pmis.load(Ordering::Relaxed)
    );
}
