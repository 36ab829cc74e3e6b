//! The PMU tests. Each prints one result line
//! `probe: cpu=N test=NAME key=value ...`, or `... skipped=REASON`, or
//! `... error=gp op=rdmsr|wrmsr msr=0x...` when a PMU MSR access the test
//! relies on faulted.

use core::sync::atomic::Ordering;

use crate::cmdline::{Config, Test};
use crate::cpu::{rdpmc_safe, rdtsc, sti_hlt_cli};
use crate::percpu::{self, PMI_DISABLED, PMI_IDLE, PMI_RUNNING};
use crate::pmu::{
    self, amd, fixed_index, intel, low_bits, CounterName, Fault, Kind, Pmu, ProbeFail,
    ProbeResult, VendorStr, SEL_EN, SEL_INT,
};
use crate::serial::{Hex, Line, Put};
use crate::{apic, out, steal, time};

/// Runs the configured tests on this vCPU; returns how many ran.
pub fn run_all(cfg: &Config, cpu: u32) -> usize {
    let pmu = Pmu::detect();
    pmu::set_current(&pmu);
    let probe = pmu.has_counters().then(|| pmu.msr_probe());
    let usable = pmu.has_counters() && (matches!(probe, Some(Ok(_))) || cfg.force);
    if usable {
        let _ = pmu.reset();
    }
    let mut n = 0;
    for &t in cfg.tests() {
        n += 1;
        if t == Test::Detect {
            detect(cpu, &pmu, probe.as_ref());
            continue;
        }
        if t == Test::Nmi {
            self_nmi(cfg, cpu);
            continue;
        }
        if matches!(t, Test::BenchMsr | Test::BenchIo | Test::BenchPmi) {
            crate::bench::run(t, cfg, cpu, &pmu, usable);
            continue;
        }
        if Test::STORM.contains(&t) {
            crate::storm::run(t, cfg, cpu, &pmu, usable);
            continue;
        }
        if Test::PROFILE.contains(&t) {
            crate::profile::run(t, cfg, cpu, &pmu, usable);
            continue;
        }
        let name = t.name();
        if !usable {
            let why = if pmu.has_counters() {
                "msr_probe_failed"
            } else {
                "no_pmu"
            };
            out!("cpu=", cpu, " test=", name, " skipped=", why);
            continue;
        }
        let i = cfg.counter;
        if !pmu.has_counter(i) {
            out!(
                "cpu=",
                cpu,
                " test=",
                name,
                " skipped=no_counter counter=",
                CounterName(i),
                " gp=",
                pmu.num_gp,
                " fixed=",
                pmu.num_fixed
            );
            continue;
        }
        if fixed_index(i).is_some()
            && !matches!(t, Test::Cycles | Test::Halt | Test::Pmi | Test::Instructions)
        {
            out!("cpu=", cpu, " test=", name, " skipped=gp_counters_only");
            continue;
        }
        let r = match t {
            Test::Detect | Test::Nmi | Test::BenchMsr | Test::BenchIo | Test::BenchPmi => Ok(()),
            Test::MsrStorm
            | Test::PmiStorm
            | Test::Edges
            | Test::Inflight
            | Test::Exits
            | Test::Observe
            | Test::Spin
            | Test::BadStack => Ok(()),
            Test::Cycles => cycles(cfg, cpu, &pmu, i),
            Test::Halt => halt(cfg, cpu, &pmu, i),
            Test::Pmi => pmi(cfg, cpu, &pmu, i),
            Test::Gp => gp(cfg, cpu, &pmu),
            Test::Toggle => toggle(cfg, cpu, &pmu, i),
            Test::Rdpmc => rdpmc(cfg, cpu, &pmu, i),
            Test::Instructions => instructions(cfg, cpu, &pmu, i),
        };
        if let Err(f) = r {
            out!("cpu=", cpu, " test=", name, " ", f);
        }
        // Leave the PMU clean for the next test whatever happened.
        percpu::this_cpu()
            .pmi_phase
            .store(PMI_IDLE, Ordering::Release);
        apic::write(apic::REG_LVT_PC, apic::LVT_MASKED | apic::LVT_DM_NMI);
        apic::disarm_timer();
        let _ = pmu.reset();
    }
    n
}

fn detect(cpu: u32, p: &Pmu, probe: Option<&Result<ProbeResult, ProbeFail>>) {
    let (probe_txt, bios, final_kind): (&dyn Put, u64, Kind) = match probe {
        None => (&"msr_probe=skipped", 0, Kind::None),
        Some(Ok(r)) => (&"msr_probe=ok", r.bios_enabled, p.kind),
        Some(Err(e)) => (e, 0, Kind::None),
    };
    out!(
        "cpu=",
        cpu,
        " test=detect vendor=",
        VendorStr(&p.vendor),
        " family=",
        Hex(p.family as u64),
        " hypervisor=",
        VendorStr(&p.hypervisor),
        " cpuid_pmu=",
        p.kind.name(),
        " version=",
        p.version,
        " gp=",
        p.num_gp,
        " gp_width=",
        p.gp_width,
        " fixed=",
        p.num_fixed,
        " fixed_width=",
        p.fixed_width,
        " ext_core=",
        p.amd_ext_core,
        " perfmon_v2=",
        p.amd_v2,
        " full_width=",
        p.intel_full_width,
        " events_unavailable=",
        Hex(p.intel_unavail as u64),
        " ",
        probe_txt,
        " bios_enabled=",
        Hex(bios),
        " pmu=",
        final_kind.name()
    );
}

/// a * 1000 / b without 128-bit arithmetic (compiler_builtins' 128-bit
/// division is precompiled with SSE).
/// Self-test of the NMI path (IST stack, handler, IRET) without a PMU:
/// NMIs sent to this vCPU through its own ICR arrive as "unexpected" NMIs.
fn self_nmi(cfg: &Config, cpu: u32) {
    let pc = percpu::this_cpu();
    let n0 = pc.nmis_unexpected.load(Ordering::Relaxed);
    let mut received = 0;
    for k in 0..cfg.nmis {
        apic::send_nmi_to_self();
        // Wait up to 10 ms for each one.
        let t0 = rdtsc();
        let limit = time::ms_to_tsc(10);
        while pc.nmis_unexpected.load(Ordering::Relaxed) - n0 <= k && rdtsc() - t0 < limit {
            core::hint::spin_loop();
        }
        received = pc.nmis_unexpected.load(Ordering::Relaxed) - n0;
    }
    out!(
        "cpu=",
        cpu,
        " test=nmi sent=",
        cfg.nmis,
        " received=",
        received
    );
}

fn permille(a: u64, b: u64) -> u64 {
    match (a.checked_div(b), a.checked_rem(b)) {
        (Some(q), Some(r)) => q.saturating_mul(1000) + r.saturating_mul(1000) / b,
        _ => 0,
    }
}

/// Core cycles over a busy loop of a known TSC length.
fn cycles(cfg: &Config, cpu: u32, p: &Pmu, i: u32) -> Result<(), Fault> {
    let n = cfg
        .cycles_tsc
        .unwrap_or_else(|| time::ms_to_tsc(cfg.cycles_ms));
    let sel = p.cycles_sel();
    p.setup(i, sel, 0)?;
    // The TSC window is the loop alone: the enable/disable WRMSRs exit to
    // the VMM, whose time is (correctly) not guest time.
    p.start(i, sel)?;
    let s0 = steal::steal_ns();
    let t0 = rdtsc();
    let (_, iters) = time::spin_tsc_counting(n);
    let tsc = rdtsc() - t0;
    let stolen = steal::steal_ns() - s0;
    p.stop(i, sel)?;
    let v = p.read(i)?;
    let run = tsc.saturating_sub(time::ns_to_tsc(stolen));
    out!(
        "cpu=",
        cpu,
        " test=cycles counter=",
        CounterName(i),
        " cycles=",
        v,
        " tsc=",
        tsc,
        " loop_tsc=",
        n,
        " loop_iters=",
        iters,
        " steal_us=",
        stolen / 1000,
        " ratio_permille=",
        permille(v, tsc),
        " run_ratio_permille=",
        permille(v, run)
    );
    Ok(())
}

/// Retired instructions and branches of a known loop (`probe.loops`
/// iterations of `dec; jnz`: 2 instructions and 1 branch each), on counter
/// `i` and, where the model has it, branches on `i + 1`; on Intel's fixed
/// counter 0 (instructions retired) alone. Exact on hardware backing (the
/// guest's own instructions only); 0 where the host cannot count them.
fn instructions(cfg: &Config, cpu: u32, p: &Pmu, i: u32) -> Result<(), Fault> {
    let (v, branches, b) = match fixed_index(i) {
        Some(0) => {
            p.setup(i, 0, 0)?;
            p.start(i, 0)?;
            crate::cpu::known_loop(cfg.loops);
            p.stop(i, 0)?;
            (p.read(i)?, 0, None)
        }
        Some(_) => {
            out!("cpu=", cpu, " test=instructions skipped=fixed_counter_counts_no_instructions");
            return Ok(());
        }
        None => instructions_and_branches(cfg, p, i)?,
    };
    out!(
        "cpu=",
        cpu,
        " test=instructions counter=",
        CounterName(i),
        " loops=",
        cfg.loops,
        " instructions=",
        v,
        " branches=",
        branches,
        " branch_counter=",
        b
    );
    Ok(())
}

/// The known loop on general-purpose counter `i` (instructions) and `i + 1`
/// (branches, where the model has it): (instructions, branches, `i + 1`).
fn instructions_and_branches(cfg: &Config, p: &Pmu, i: u32) -> Result<(u64, u64, Option<u32>), Fault> {
    let b = i + 1;
    let with_branches = fixed_index(b).is_none() && p.has_counter(b);
    let (isel, bsel) = (p.instructions_sel(), p.branches_sel());
    p.setup(i, isel, 0)?;
    let mut enable = 1u64 << i;
    if with_branches {
        p.setup(b, bsel, 0)?;
        enable |= 1 << b;
    }
    // Both selects enabled, then (where the model has one) the global
    // enable starts both at once.
    pmu::wr(p.ctl_msr(i), isel | SEL_EN)?;
    if with_branches {
        pmu::wr(p.ctl_msr(b), bsel | SEL_EN)?;
    }
    if let Some(g) = p.global_ctl_msr() {
        pmu::wr(g, enable)?;
    }
    crate::cpu::known_loop(cfg.loops);
    match p.global_ctl_msr() {
        Some(g) => pmu::wr(g, 0)?,
        None => {
            p.disable(i, isel)?;
            if with_branches {
                p.disable(b, bsel)?;
            }
        }
    }
    let branches = if with_branches { p.read(b)? } else { 0 };
    Ok((p.read(i)?, branches, with_branches.then_some(b)))
}

/// Core cycles across a HLT that a one-shot LAPIC timer ends.
fn halt(cfg: &Config, cpu: u32, p: &Pmu, i: u32) -> Result<(), Fault> {
    if apic::timer_khz() == 0 {
        out!("cpu=", cpu, " test=halt skipped=no_apic_timer");
        return Ok(());
    }
    let pc = percpu::this_cpu();
    let sel = p.cycles_sel();
    p.setup(i, sel, 0)?;
    pc.timer_fired.store(false, Ordering::Release);
    let irqs0 = pc.timer_irqs.load(Ordering::Relaxed);
    p.start(i, sel)?;
    let s0 = steal::steal_ns();
    let t0 = rdtsc();
    apic::arm_oneshot_ms(cfg.halt_ms);
    let mut wakeups = 0u64;
    while !pc.timer_fired.load(Ordering::Acquire) {
        sti_hlt_cli();
        wakeups += 1;
    }
    let tsc = rdtsc() - t0;
    let stolen = steal::steal_ns() - s0;
    p.stop(i, sel)?;
    apic::disarm_timer();
    let v = p.read(i)?;
    out!(
        "cpu=",
        cpu,
        " test=halt counter=",
        CounterName(i),
        " cycles=",
        v,
        " tsc=",
        tsc,
        " halt_ms=",
        cfg.halt_ms,
        " elapsed_us=",
        time::tsc_to_us(tsc),
        " wakeups=",
        wakeups,
        " timer_irqs=",
        pc.timer_irqs.load(Ordering::Relaxed) - irqs0,
        " steal_us=",
        stolen / 1000,
        " ratio_permille=",
        permille(v, tsc)
    );
    Ok(())
}

/// Sampling: counter armed at -period with INT, LVTPC in NMI mode; the NMI
/// handler (`pmu::nmi`) counts, checks the status bit, acks and re-arms.
fn pmi(cfg: &Config, cpu: u32, p: &Pmu, i: u32) -> Result<(), Fault> {
    let pc = percpu::this_cpu();
    let period = cfg
        .pmi_period
        .unwrap_or_else(time::tsc_khz)
        .clamp(1, p.max_period());
    let sel = p.cycles_sel() | SEL_INT;
    let window = time::ms_to_tsc(cfg.pmi_ms);

    pc.pmi_count.store(0, Ordering::Relaxed);
    pc.pmi_status_ok.store(0, Ordering::Relaxed);
    pc.pmi_after_disable.store(0, Ordering::Relaxed);
    pc.pmi_handler_gp.store(0, Ordering::Relaxed);
    pc.pmi_first_bad_status.store(0, Ordering::Relaxed);
    pc.pmi_lvt_masked.store(0, Ordering::Relaxed);
    pc.pmi_counter.store(i, Ordering::Relaxed);
    pc.pmi_period.store(period, Ordering::Relaxed);
    let nmis0 = pc.nmis.load(Ordering::Relaxed);
    let unexpected0 = pc.nmis_unexpected.load(Ordering::Relaxed);

    if let Some(a) = p.global_ack_msr() {
        pmu::wr(a, p.status_bits())?;
    }
    p.setup(i, sel, period.wrapping_neg())?;
    apic::write(apic::REG_LVT_PC, apic::LVT_DM_NMI);
    pc.pmi_phase.store(PMI_RUNNING, Ordering::Release);
    p.start(i, sel)?;
    let s0 = steal::steal_ns();
    let t0 = rdtsc();
    time::spin_tsc(window);
    let tsc = rdtsc() - t0;
    let stolen = steal::steal_ns() - s0;
    // Stop: EN off first (the counter stops), read it, then global off.
    p.disable(i, sel)?;
    let run = tsc.saturating_sub(time::ns_to_tsc(stolen));
    let last = p.read(i)?;
    if let Some(g) = p.global_ctl_msr() {
        pmu::wr(g, 0)?;
    }
    pc.pmi_phase.store(PMI_DISABLED, Ordering::Release);
    let pmis = pc.pmi_count.load(Ordering::Relaxed);
    let status_ok = pc.pmi_status_ok.load(Ordering::Relaxed);

    // Any PMI from now on is one too many.
    time::spin_tsc(window);
    pc.pmi_phase.store(PMI_IDLE, Ordering::Release);
    apic::write(apic::REG_LVT_PC, apic::LVT_MASKED | apic::LVT_DM_NMI);
    let after = pc.pmi_after_disable.load(Ordering::Relaxed);

    let start = period.wrapping_neg() & p.mask(i);
    let partial = last.wrapping_sub(start) & p.mask(i);
    let counted = pmis.saturating_mul(period).saturating_add(partial);
    let bad = pc.pmi_first_bad_status.load(Ordering::Relaxed);
    out!(
        "cpu=",
        cpu,
        " test=pmi counter=",
        CounterName(i),
        " period=",
        period,
        " ms=",
        cfg.pmi_ms,
        " pmis=",
        pmis,
        " status_ok=",
        status_ok,
        " after_disable=",
        after,
        " expected=",
        tsc / period,
        " expected_run=",
        run / period,
        " tsc=",
        tsc,
        " steal_us=",
        stolen / 1000,
        " counted=",
        counted,
        " nmis=",
        pc.nmis.load(Ordering::Relaxed) - nmis0,
        " unexpected_nmis=",
        pc.nmis_unexpected.load(Ordering::Relaxed) - unexpected0,
        " handler_gp=",
        pc.pmi_handler_gp.load(Ordering::Relaxed),
        " lvt_masked=",
        pc.pmi_lvt_masked.load(Ordering::Relaxed),
        " first_bad_status=",
        (bad != 0).then_some(Hex(bad & !(1 << 63)))
    );
    Ok(())
}

/// Enable/disable the counter many times (each a WRMSR exit), then read it.
fn toggle(cfg: &Config, cpu: u32, p: &Pmu, i: u32) -> Result<(), Fault> {
    let sel = p.cycles_sel();
    let ctl = p.ctl_msr(i);
    p.setup(i, sel, 0)?;
    if let Some(g) = p.global_ctl_msr() {
        pmu::wr(g, 1 << i)?;
    }
    let t0 = rdtsc();
    for _ in 0..cfg.toggles {
        pmu::wr(ctl, sel | SEL_EN)?;
        pmu::wr(ctl, sel)?;
    }
    let tsc = rdtsc() - t0;
    if let Some(g) = p.global_ctl_msr() {
        pmu::wr(g, 0)?;
    }
    let v = p.read(i)?;
    out!(
        "cpu=",
        cpu,
        " test=toggle counter=",
        i,
        " toggles=",
        cfg.toggles,
        " value=",
        v,
        " tsc=",
        tsc,
        " us_per_toggle=",
        time::tsc_to_us(tsc) / cfg.toggles.max(1)
    );
    Ok(())
}

/// RDPMC against RDMSR of a stopped counter (only with `probe.rdpmc=1`).
fn rdpmc(cfg: &Config, cpu: u32, p: &Pmu, i: u32) -> Result<(), Fault> {
    if !cfg.rdpmc {
        out!("cpu=", cpu, " test=rdpmc skipped=not_enabled");
        return Ok(());
    }
    let sel = p.cycles_sel();
    p.setup(i, sel, 0)?;
    p.start(i, sel)?;
    time::spin_tsc(time::ms_to_tsc(1));
    p.stop(i, sel)?;
    let v = p.read(i)?;
    let gp0 = percpu::this_cpu().gp_fixups.load(Ordering::Relaxed);
    let r = rdpmc_safe(p.rdpmc_index(i));
    let gps = percpu::this_cpu().gp_fixups.load(Ordering::Relaxed) - gp0;
    let (verdict, value) = match r {
        Err(()) => ("gp", None),
        Ok(x) if x & p.gp_mask() == v => ("ok", Some(x)),
        Ok(x) => ("mismatch", Some(x)),
    };
    out!(
        "cpu=",
        cpu,
        " test=rdpmc counter=",
        i,
        " rdpmc=",
        verdict,
        " value=",
        value,
        " rdmsr=",
        v,
        " gps=",
        gps
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// gp: out-of-model MSRs must #GP; defined MSRs with defined values must not;
// reserved bits must #GP (`probe.rsvd=gp`, the default) or be dropped
// (`probe.rsvd=ignore`: the write succeeds and the bit reads back as 0).

const MAX_MISMATCH: usize = 6;

/// What a check found wrong.
#[derive(Clone, Copy)]
enum Miss {
    /// Expected #GP, got none.
    NoGp,
    /// Unexpected #GP.
    Gp,
    /// Reserved bit accepted and kept (reads back set) in `ignore` mode.
    Kept,
    /// A counter write read back another value.
    Value,
}

#[derive(Clone, Copy)]
struct Mismatch {
    write: bool,
    msr: u32,
    val: u64,
    miss: Miss,
}

/// Categories of checks, reported as `name=<#GPs>/<accesses>`.
#[derive(Clone, Copy)]
enum Cat {
    /// Defined MSRs, defined values: 0 #GPs expected.
    Defined,
    /// Reserved bits of event selects.
    EvtselRsvd,
    /// Reserved bits of global control/status/fixed-control MSRs.
    GlobalRsvd,
    /// Writes to read-only MSRs (global status).
    RoWrite,
    /// MSRs outside the model: all #GP.
    Outside,
    /// Bits above the width in full-width counter writes.
    CounterRsvd,
}
const CATS: usize = 6;
const CAT_NAMES: [&str; CATS] = [
    "defined",
    "evtsel_rsvd",
    "global_rsvd",
    "ro_write",
    "outside",
    "counter_rsvd",
];

struct Tally {
    /// Expect #GP for reserved bits and read-only writes (else: ignored).
    rsvd_gp: bool,
    checks: u64,
    gp_expected: u64,
    gp_got: u64,
    mismatches: u64,
    kept: u64,
    cat_gp: [u64; CATS],
    cat_total: [u64; CATS],
    first: [Option<Mismatch>; MAX_MISMATCH],
}

impl Tally {
    fn new(rsvd_gp: bool) -> Tally {
        Tally {
            rsvd_gp,
            checks: 0,
            gp_expected: 0,
            gp_got: 0,
            mismatches: 0,
            kept: 0,
            cat_gp: [0; CATS],
            cat_total: [0; CATS],
            first: [None; MAX_MISMATCH],
        }
    }

    fn miss(&mut self, m: Mismatch) {
        if let Some(slot) = self.first.iter_mut().find(|s| s.is_none()) {
            *slot = Some(m);
        }
        self.mismatches += 1;
    }

    fn record(&mut self, cat: Cat, write: bool, msr: u32, val: u64, expect_gp: bool, got_gp: bool) {
        self.checks += 1;
        self.gp_expected += expect_gp as u64;
        self.gp_got += got_gp as u64;
        self.cat_total[cat as usize] += 1;
        self.cat_gp[cat as usize] += got_gp as u64;
        if expect_gp != got_gp {
            let miss = if got_gp { Miss::Gp } else { Miss::NoGp };
            self.miss(Mismatch {
                write,
                msr,
                val,
                miss,
            });
        }
    }

    /// RDMSR; returns the value if it did not fault.
    fn read(&mut self, cat: Cat, msr: u32, expect_gp: bool) -> Option<u64> {
        let r = pmu::rd(msr).ok();
        self.record(cat, false, msr, 0, expect_gp, r.is_none());
        r
    }

    /// WRMSR; returns whether it succeeded.
    fn write(&mut self, cat: Cat, msr: u32, val: u64, expect_gp: bool) -> bool {
        let ok = pmu::wr(msr, val).is_ok();
        self.record(cat, true, msr, val, expect_gp, !ok);
        ok
    }

    /// Writes each bit outside `valid` (and outside `skip`) on its own, then
    /// restores the old value. Also checks that 0 is accepted.
    fn reserved_bits(&mut self, cat: Cat, msr: u32, valid: u64, skip: u64) {
        let old = self.read(Cat::Defined, msr, false).unwrap_or(0) & valid;
        self.write(Cat::Defined, msr, 0, false);
        for b in 0..64 {
            let bit = 1u64 << b;
            if (valid | skip) & bit != 0 {
                continue;
            }
            if self.write(cat, msr, bit, self.rsvd_gp) {
                self.check_dropped(msr, msr, bit);
            }
        }
        let _ = pmu::wr(msr, old);
    }

    /// After a reserved `bit` was written to `msr` without a #GP: in
    /// `ignore` mode it must have been dropped (`read_msr` shows it clear).
    fn check_dropped(&mut self, msr: u32, read_msr: u32, bit: u64) {
        if !self.rsvd_gp && pmu::rd(read_msr).is_ok_and(|v| v & bit != 0) {
            self.kept += 1;
            self.miss(Mismatch {
                write: true,
                msr,
                val: bit,
                miss: Miss::Kept,
            });
        }
    }

    /// A read-only MSR: reads work, writes #GP (or are ignored).
    fn read_only(&mut self, msr: u32) {
        self.read(Cat::Defined, msr, false);
        self.write(Cat::RoWrite, msr, 0, self.rsvd_gp);
    }

    /// An MSR outside the model: read and write must both #GP.
    fn outside(&mut self, msr: u32) {
        self.read(Cat::Outside, msr, true);
        self.write(Cat::Outside, msr, 0, true);
    }

    /// A defined counter MSR: writing `val` must work and read back as
    /// `expect`.
    fn reads_back(&mut self, msr: u32, val: u64, expect: u64) {
        let old = self.read(Cat::Defined, msr, false).unwrap_or(0);
        if self.write(Cat::Defined, msr, val, false)
            && self.read(Cat::Defined, msr, false) != Some(expect)
        {
            self.miss(Mismatch {
                write: true,
                msr,
                val,
                miss: Miss::Value,
            });
        }
        let _ = pmu::wr(msr, old);
    }

    /// A defined counter MSR: read and write of 0 must work.
    fn counter(&mut self, msr: u32) {
        let old = self.read(Cat::Defined, msr, false).unwrap_or(0);
        self.write(Cat::Defined, msr, 0, false);
        let _ = pmu::wr(msr, old);
    }
}

struct MismatchList<'a>(&'a [Option<Mismatch>]);

impl Put for MismatchList<'_> {
    fn put(&self, l: &mut Line) {
        let mut any = false;
        for m in self.0.iter().flatten() {
            if any {
                l.byte(b',');
            }
            any = true;
            let what = match m.miss {
                Miss::NoGp => "nogp",
                Miss::Gp => "gp",
                Miss::Kept => "kept",
                Miss::Value => "value",
            };
            if m.write {
                l.put("w:")
                    .put(&Hex(m.msr as u64))
                    .put(":")
                    .put(&Hex(m.val))
                    .put(":")
                    .put(what);
            } else {
                l.put("r:").put(&Hex(m.msr as u64)).put(":").put(what);
            }
        }
        if !any {
            l.bytes(b"none");
        }
    }
}

struct Categories<'a>(&'a Tally);

impl Put for Categories<'_> {
    fn put(&self, l: &mut Line) {
        for (i, name) in CAT_NAMES.iter().enumerate() {
            if i > 0 {
                l.byte(b' ');
            }
            l.put(*name)
                .put("=")
                .put(&self.0.cat_gp[i])
                .put("/")
                .put(&self.0.cat_total[i]);
        }
    }
}

fn gp(cfg: &Config, cpu: u32, p: &Pmu) -> Result<(), Fault> {
    let pc = percpu::this_cpu();
    let gp0 = pc.gp_fixups.load(Ordering::Relaxed);
    let mut t = Tally::new(cfg.rsvd_gp);
    match p.kind {
        Kind::Amd => gp_amd(&mut t, p),
        Kind::Intel => gp_intel(&mut t, p),
        Kind::None => {}
    }
    let _ = p.reset();
    out!(
        "cpu=",
        cpu,
        " test=gp model=",
        p.kind.name(),
        " rsvd=",
        if t.rsvd_gp { "gp" } else { "ignore" },
        " checks=",
        t.checks,
        " gp_expected=",
        t.gp_expected,
        " gp_got=",
        t.gp_got,
        " gp_handled=",
        pc.gp_fixups.load(Ordering::Relaxed) - gp0,
        " ",
        Categories(&t),
        " kept=",
        t.kept,
        " mismatches=",
        t.mismatches,
        " first=",
        MismatchList(&t.first)
    );
    Ok(())
}

fn gp_amd(t: &mut Tally, p: &Pmu) {
    for i in 0..p.num_gp {
        t.reserved_bits(Cat::EvtselRsvd, p.ctl_msr(i), amd::CTL_VALID, 0);
        t.counter(p.ctr_msr(i));
    }
    let legacy_in_model = if p.amd_ext_core {
        p.num_gp.min(amd::LEGACY_COUNTERS)
    } else {
        p.num_gp
    };
    if p.amd_ext_core {
        // Legacy MSRs alias counters 0-3: same rules.
        for i in 0..legacy_in_model {
            t.reserved_bits(Cat::EvtselRsvd, amd::LEGACY_CTL0 + i, amd::CTL_VALID, 0);
            t.counter(amd::LEGACY_CTR0 + i);
        }
        // Extended counters beyond the model, and the first one past 6.
        for i in p.num_gp..=amd::EXT_COUNTERS {
            t.outside(amd::EXT_CTL0 + 2 * i);
            t.outside(amd::EXT_CTR0 + 2 * i);
        }
    } else {
        // No PerfCtrExtCore: its whole block faults.
        for i in 0..amd::EXT_COUNTERS {
            t.outside(amd::EXT_CTL0 + 2 * i);
            t.outside(amd::EXT_CTR0 + 2 * i);
        }
    }
    for i in legacy_in_model..amd::LEGACY_COUNTERS {
        t.outside(amd::LEGACY_CTL0 + i);
        t.outside(amd::LEGACY_CTR0 + i);
    }
    t.outside(amd::LEGACY_CTR0 + amd::LEGACY_COUNTERS); // 0xc0010008
    if p.amd_v2 {
        let counters = low_bits(p.num_gp);
        t.reserved_bits(Cat::GlobalRsvd, amd::GLOBAL_CTL, counters, 0);
        t.reserved_bits(Cat::GlobalRsvd, amd::GLOBAL_STATUS_CLR, counters, 0);
        // SET: 0 and reserved bits only (valid bits would raise status).
        t.write(Cat::Defined, amd::GLOBAL_STATUS_SET, 0, false);
        for b in p.num_gp..64 {
            let bit = 1u64 << b;
            if t.write(Cat::GlobalRsvd, amd::GLOBAL_STATUS_SET, bit, t.rsvd_gp) {
                t.check_dropped(amd::GLOBAL_STATUS_SET, amd::GLOBAL_STATUS, bit);
            }
        }
        t.read_only(amd::GLOBAL_STATUS);
        t.outside(amd::GLOBAL_STATUS - 1);
        t.outside(amd::GLOBAL_STATUS_SET + 1);
    } else {
        for m in amd::GLOBAL_STATUS..=amd::GLOBAL_STATUS_SET {
            t.outside(m);
        }
    }
}

fn gp_intel(t: &mut Tally, p: &Pmu) {
    // IA32_PMCx writes sign-extend bit 31 into the upper bits; the
    // full-width aliases take the value as written (SDM 20.2.6).
    let top = 1u64 << 31;
    let extended = (p.gp_mask() & !(top - 1)) | top;
    for i in 0..p.num_gp {
        t.reads_back(intel::PMC0 + i, top, extended);
        t.reads_back(intel::PMC0 + i, top - 1, top - 1);
        if p.intel_full_width {
            t.reads_back(intel::A_PMC0 + i, top, top);
            t.reads_back(intel::A_PMC0 + i, extended, extended);
            t.reserved_bits(Cat::CounterRsvd, intel::A_PMC0 + i, p.gp_mask(), 0);
        }
    }
    if p.intel_pdcm {
        t.read_only(intel::PERF_CAPABILITIES);
    }
    for i in 0..p.num_gp {
        t.reserved_bits(
            Cat::EvtselRsvd,
            intel::PERFEVTSEL0 + i,
            intel::EVTSEL_VALID,
            intel::EVTSEL_ANY,
        );
        t.counter(intel::PMC0 + i);
        if p.intel_full_width {
            t.counter(intel::A_PMC0 + i);
        }
    }
    // Every architectural MSR the model lacks, whatever its counter
    // counts, and the event select after the last one.
    for i in p.num_gp..intel::GP_BLOCK {
        t.outside(intel::PMC0 + i);
    }
    for i in p.num_gp..intel::GP_BLOCK.max(p.num_gp + 1) {
        t.outside(intel::PERFEVTSEL0 + i);
    }
    let full_width = if p.intel_full_width { p.num_gp } else { 0 };
    for i in full_width..intel::GP_BLOCK.max(full_width + 1) {
        t.outside(intel::A_PMC0 + i);
    }
    if !p.intel_pdcm {
        t.outside(intel::PERF_CAPABILITIES);
    }
    let fixed = if p.version >= 2 { p.num_fixed } else { 0 };
    for i in fixed..intel::FIXED_BLOCK {
        t.outside(intel::FIXED_CTR0 + i);
    }
    if p.version >= 2 {
        if p.num_fixed > 0 {
            t.reserved_bits(
                Cat::GlobalRsvd,
                intel::FIXED_CTR_CTRL,
                intel::fixed_ctrl_valid(p.num_fixed),
                intel::fixed_ctrl_any(p.num_fixed),
            );
            for i in 0..p.num_fixed {
                t.counter(intel::FIXED_CTR0 + i);
            }
        }
        let counters = low_bits(p.num_gp) | (low_bits(p.num_fixed) << 32);
        t.reserved_bits(Cat::GlobalRsvd, intel::GLOBAL_CTRL, counters, 0);
        // The version's non-counter status flags are valid in OVF_CTRL
        // (and, v4, STATUS_SET); which of them a CPU really has varies, so
        // they are not tested.
        let flags = intel::status_flags(p.version);
        t.reserved_bits(Cat::GlobalRsvd, intel::GLOBAL_OVF_CTRL, counters, flags);
        t.read_only(intel::GLOBAL_STATUS);
        if p.version >= 4 {
            // Reserved bits only: a valid one would raise an overflow.
            t.reserved_bits(Cat::GlobalRsvd, intel::GLOBAL_STATUS_SET, 0, counters | flags);
            t.read_only(intel::GLOBAL_INUSE);
        } else {
            t.outside(intel::GLOBAL_STATUS_SET);
            t.outside(intel::GLOBAL_INUSE);
        }
    } else {
        for m in intel::FIXED_CTR_CTRL..=intel::GLOBAL_OVF_CTRL {
            t.outside(m);
        }
    }
}
