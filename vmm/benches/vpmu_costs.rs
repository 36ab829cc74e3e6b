//! What the vPMU costs per MSR access, per exit and per PMI, side by side
//! with its floors (BENCHMARKS.md explains every figure).
//!
//! `cargo bench -p vmm --bench vpmu_costs`
//!
//! Runs the release `vmm` with the probe guest's `bench_*` tests under real
//! KVM, with the hidden `--bench-msr` (a null MSR the VMM answers with 0)
//! and `--bench-trace` (the VMM's exit counts at guest marks, PMI times),
//! and prints one table. Every ratio compares variants measured in the
//! same run: interleaved rounds inside one guest, or (vPMU off against on)
//! VMM runs that alternate. Medians, with the spread over rounds.

#[path = "../../tests/common/mod.rs"]
mod common;

#[path = "common/mod.rs"]
mod bench_common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::{probe_results, ProbeResult};

/// The null MSR: in KVM's paravirtual range, unused by KVM and the VMM.
const NULL_MSR: &str = "0x4b564df0";
/// Alternating vPMU off/on VMM runs for figures 1 and 2.
const PAIRS: usize = 10;
/// Repetitions of each vCPU count for figures 3 and 5.
const GROWTH_REPS: usize = 2;
const VCPUS: [u32; 4] = [1, 2, 4, 8];
const RATES: [u64; 3] = [100, 1000, 10000];
/// Figure 3's rate, 1 000 PMIs/s, as an index into `RATES`.
const FIG3_RATE: usize = 1;
const _: () = assert!(RATES[FIG3_RATE] == 1000);
/// Length of each PMI window (and of its control window), ms.
const PMI_WINDOW_MS: u64 = 300;
const RSS_RUNS: usize = 3;

/// One `vmm` run.
struct Run {
    results: Vec<ProbeResult>,
    stderr: String,
    trace: Option<Trace>,
    tsc_khz: f64,
    max_rss_kib: i64,
}

fn tmp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vpmu-costs-{}-{name}", std::process::id()))
}

/// The `vmm` under test: this build's, or `VPMU_COSTS_VMM` (another build
/// with the `bench` feature, e.g. a previous commit's, measured by this
/// same harness: `scripts/bench-compare.sh`).
fn vmm_binary() -> PathBuf {
    std::env::var_os("VPMU_COSTS_VMM")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_vmm")), PathBuf::from)
}

/// Runs vmm; panics unless the guest reset cleanly.
fn run_vmm(vpmu_on: bool, vcpus: u32, cmdline: &str, trace: bool) -> Run {
    let trace_path = tmp_path("trace");
    let out_path = tmp_path("out");
    let err_path = tmp_path("err");
    let mut cmd = Command::new(vmm_binary());
    cmd.args(["--vpmu", if vpmu_on { "on" } else { "off" }])
        .args(["--vcpus", &vcpus.to_string()])
        .args(["--bench-msr", NULL_MSR])
        .args(["--cmdline", cmdline])
        .args(["--timeout", "120"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    if trace {
        cmd.arg("--bench-trace").arg(&trace_path);
    }
    let child = cmd.spawn().expect("starting vmm");
    let (status, hwm_kib, _) = bench_common::wait_with_peak_rss(child, std::time::Instant::now());
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "vmm failed ({status:#x}) with {cmdline:?}:\n{stderr}\n{stdout}"
    );
    let tsc_khz = common::tsc_khz(&stdout);
    let trace = trace.then(|| Trace::parse(&std::fs::read_to_string(&trace_path).unwrap()));
    let _ = std::fs::remove_file(&trace_path);
    Run {
        results: probe_results(&stdout),
        stderr,
        trace,
        tsc_khz,
        max_rss_kib: hwm_kib,
    }
}

// ---------------------------------------------------------------------------
// Statistics

#[derive(Clone, Copy, Debug)]
struct Spread {
    median: f64,
    lo: f64,
    hi: f64,
    n: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    s
}

/// Median with the 10th and 90th percentiles as spread.
fn spread(v: &[f64]) -> Spread {
    let s = sorted(v);
    Spread {
        median: percentile(&s, 0.5),
        lo: percentile(&s, 0.1),
        hi: percentile(&s, 0.9),
        n: s.len(),
    }
}

fn rounds(r: &ProbeResult) -> Vec<f64> {
    r.get("rounds")
        .split(',')
        .filter_map(|v| v.parse().ok())
        .collect()
}

// ---------------------------------------------------------------------------
// The VMM's trace (see vmm/src/bench.rs)

type Fields = BTreeMap<String, String>;

#[derive(Default)]
struct Trace {
    records: Vec<(String, Fields)>,
}

impl Trace {
    fn parse(text: &str) -> Trace {
        let records = text
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let kind = words.next()?.to_string();
                let fields = words
                    .filter_map(|w| w.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                Some((kind, fields))
            })
            .collect();
        Trace { records }
    }

    fn of<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Fields> + 'a {
        self.records
            .iter()
            .filter(move |(k, _)| k == kind)
            .map(|(_, f)| f)
    }
}

fn num(f: &Fields, key: &str) -> f64 {
    f.get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key} in {f:?}"))
}

/// What one PMI window (against its control window) showed on one vCPU.
#[derive(Default, Clone)]
struct PmiWindow {
    /// Per PMI, net of the control window's rate.
    user_exits: f64,
    msr_exits: f64,
    signal_exits: f64,
    kvm_exits: f64,
    emulated: f64,
    nmi_injections: f64,
}

const MARK_CONTROL_START: u64 = 1;
const MARK_PMI_START: u64 = 3;

/// Exit counts per PMI of every (vCPU, rate index) window of a trace,
/// net of what the control window's work loop causes: its counts scaled
/// by the work chunks each window ran (from the probe's `bench_pmi` lines
/// in `results`).
fn pmi_windows(trace: &Trace, results: &[ProbeResult]) -> BTreeMap<(u64, u64), Vec<PmiWindow>> {
    let mut by_vcpu: BTreeMap<u64, Vec<&Fields>> = BTreeMap::new();
    for m in trace.of("mark") {
        by_vcpu.entry(num(m, "vcpu") as u64).or_default().push(m);
    }
    let mut out: BTreeMap<(u64, u64), Vec<PmiWindow>> = BTreeMap::new();
    for (vcpu, marks) in by_vcpu {
        // Marks come in fours: control start/end, PMI start/end.
        for w in marks.windows(4) {
            let tag = |m: &Fields| num(m, "tag") as u64;
            if tag(w[0]) >> 24 != MARK_CONTROL_START || tag(w[2]) >> 24 != MARK_PMI_START {
                continue;
            }
            let (rate, round) = ((tag(w[0]) >> 16) & 0xff, (tag(w[0]) >> 8) & 0xff);
            let Some(line) = results.iter().find(|r| {
                r.test == "bench_pmi"
                    && u64::from(r.cpu) == vcpu
                    && r.get("round") == round.to_string()
                    && RATES.get(rate as usize).map(u64::to_string).as_deref()
                        == Some(r.get("rate"))
            }) else {
                continue;
            };
            let d = |a: &Fields, b: &Fields, k: &str| num(b, k) - num(a, k);
            let scale = line.num("pmi_chunks") / line.num("control_chunks");
            let net = |k: &str| d(w[2], w[3], k) - d(w[0], w[1], k) * scale;
            let pmis = d(w[2], w[3], "pmis");
            if pmis <= 0.0 {
                continue;
            }
            out.entry((vcpu, rate)).or_default().push(PmiWindow {
                user_exits: net("exits") / pmis,
                msr_exits: (net("msr_read") + net("msr_write")) / pmis,
                signal_exits: net("signal") / pmis,
                kvm_exits: net("kvm_exits") / pmis,
                emulated: net("kvm_insn_emulation") / pmis,
                nmi_injections: net("kvm_nmi_injections") / pmis,
            });
        }
    }
    out
}

/// The PMI windows of every vCPU of `runs` at rate index `rate`.
fn windows_at<'a>(runs: impl IntoIterator<Item = &'a Run>, rate: usize) -> Vec<PmiWindow> {
    runs.into_iter()
        .flat_map(|run| pmi_windows(run.trace.as_ref().unwrap(), &run.results))
        .filter(|((_, r), _)| *r == rate as u64)
        .flat_map(|(_, w)| w)
        .collect()
}

/// The spread of one per-PMI figure over `windows`.
fn per_pmi(windows: &[PmiWindow], f: impl Fn(&PmiWindow) -> f64) -> Spread {
    spread(&windows.iter().map(f).collect::<Vec<_>>())
}

/// PMI delivery latencies of a trace, in TSC cycles: (signal to handler
/// stamp, injection to stamp, signal to injection, overshoot + signal to
/// stamp), one per matched stamp.
#[derive(Default)]
struct Latencies {
    signal_to_stamp: Vec<f64>,
    inject_to_stamp: Vec<f64>,
    signal_to_inject: Vec<f64>,
    overflow_to_stamp: Vec<f64>,
    /// The same, for PMIs whose vCPU thread kept its CPU from the signal
    /// to the handler's first PMU MSR access.
    overflow_to_stamp_kept_cpu: Vec<f64>,
    overshoot: Vec<f64>,
    unmatched: usize,
}

impl Latencies {
    fn absorb(&mut self, other: Latencies) {
        self.signal_to_stamp.extend(other.signal_to_stamp);
        self.inject_to_stamp.extend(other.inject_to_stamp);
        self.signal_to_inject.extend(other.signal_to_inject);
        self.overflow_to_stamp.extend(other.overflow_to_stamp);
        self.overflow_to_stamp_kept_cpu
            .extend(other.overflow_to_stamp_kept_cpu);
        self.overshoot.extend(other.overshoot);
        self.unmatched += other.unmatched;
    }
}

fn latencies(trace: &Trace) -> Latencies {
    let mut l = Latencies::default();
    let vcpus: Vec<u64> = trace.of("dropped").map(|f| num(f, "vcpu") as u64).collect();
    for vcpu in vcpus {
        let of_vcpu = |kind| {
            trace
                .of(kind)
                .filter(move |f| num(f, "vcpu") as u64 == vcpu)
                .collect::<Vec<_>>()
        };
        // Guest TSC = host TSC + offset (same rate: checked against the
        // KVM_GET_MSRS pairs below).
        let offset = of_vcpu("tsc_offset")
            .first()
            .map_or(0.0, |f| num(f, "offset"));
        for pair in of_vcpu("tsc") {
            let host = num(pair, "guest") - offset;
            assert!(
                host >= num(pair, "host_before") - 1.0 && host <= num(pair, "host_after") + 1.0,
                "guest TSC is not host TSC + {offset}: {pair:?}"
            );
        }
        let pmis: Vec<(f64, f64, f64, bool)> = of_vcpu("pmi")
            .iter()
            .map(|f| {
                let preempted = num(f, "preempted") != 0.0;
                (
                    num(f, "signal"),
                    num(f, "injected"),
                    num(f, "overshoot"),
                    preempted,
                )
            })
            .collect();
        for p in &pmis {
            l.signal_to_inject.push(p.1 - p.0);
        }
        for s in of_vcpu("stamp") {
            let host = num(s, "guest_tsc") - offset;
            // The last PMI injected before the handler ran.
            let i = pmis.partition_point(|p| p.1 <= host);
            if i == 0 {
                l.unmatched += 1;
                continue;
            }
            let (signal, injected, overshoot, preempted) = pmis[i - 1];
            l.signal_to_stamp.push(host - signal);
            l.inject_to_stamp.push(host - injected);
            l.overflow_to_stamp.push(host - signal + overshoot);
            if !preempted {
                l.overflow_to_stamp_kept_cpu.push(host - signal + overshoot);
            }
            l.overshoot.push(overshoot);
        }
    }
    l
}

// ---------------------------------------------------------------------------
// The table

struct Table {
    rows: String,
    targets: Vec<(String, bool)>,
}

impl Table {
    fn new() -> Table {
        let mut rows = String::new();
        rows.push_str("| # | figure | median | spread (p10..p90) | n | target |\n");
        rows.push_str("|---|---|---:|---:|---:|---|\n");
        Table {
            rows,
            targets: Vec::new(),
        }
    }

    fn row(
        &mut self,
        fig: &str,
        name: &str,
        value: String,
        spread: String,
        n: usize,
        target: &str,
    ) {
        let _ = writeln!(
            self.rows,
            "| {fig} | {name} | {value} | {spread} | {n} | {target} |"
        );
    }

    /// A figure in TSC cycles, shown in microseconds.
    fn us(&mut self, fig: &str, name: &str, s: Spread, khz: f64) {
        let us = |c: f64| c / khz * 1000.0;
        self.row(
            fig,
            name,
            format!("{:.2} us", us(s.median)),
            format!("{:.2}..{:.2}", us(s.lo), us(s.hi)),
            s.n,
            "",
        );
    }

    /// Records whether `value` meets `max` (described as `what`) and
    /// returns the target cell.
    fn target(&mut self, fig: &str, name: &str, value: f64, max: f64, what: &str) -> String {
        let met = value <= max;
        self.targets.push((format!("{fig}: {name} {what}"), met));
        format!("{what}: {}", if met { "met" } else { "NOT met" })
    }

    fn ratio(&mut self, fig: &str, name: &str, s: Spread, max: Option<f64>) {
        let target = max.map_or(String::new(), |max| {
            self.target(fig, name, s.median, max, &format!("<= {max}"))
        });
        let (value, spread) = (
            format!("{:.3}", s.median),
            format!("{:.3}..{:.3}", s.lo, s.hi),
        );
        self.row(fig, name, value, spread, s.n, &target);
    }

    fn plain(&mut self, fig: &str, name: &str, s: Spread, unit: &str, target: Option<(f64, &str)>) {
        // A figure held against a target shows enough digits to see why it
        // is met or not.
        let digits = if target.is_some() { 3 } else { 2 };
        let target = target.map_or(String::new(), |(max, what)| {
            self.target(fig, name, s.median, max, what)
        });
        let (value, spread) = (
            format!("{:.digits$}{unit}", s.median),
            format!("{:.digits$}..{:.digits$}", s.lo, s.hi),
        );
        self.row(fig, name, value, spread, s.n, &target);
    }
}

fn find<'a>(
    results: &'a [ProbeResult],
    test: &str,
    key: &str,
    value: &str,
) -> Vec<&'a ProbeResult> {
    results
        .iter()
        .filter(|r| r.test == test && r.fields.get(key).map(String::as_str) == Some(value))
        .filter(|r| !r.fields.contains_key("skipped"))
        .collect()
}

/// Per-round ratios a/b of two variants measured in the same rounds.
fn round_ratios(a: &[&ProbeResult], b: &[&ProbeResult]) -> Vec<f64> {
    let mut out = Vec::new();
    for (a, b) in a.iter().zip(b) {
        assert_eq!((a.cpu, a.test.as_str()), (b.cpu, b.test.as_str()));
        out.extend(rounds(a).iter().zip(rounds(b)).map(|(x, y)| x / y));
    }
    out
}

fn all_rounds(rs: &[&ProbeResult]) -> Vec<f64> {
    rs.iter().flat_map(|r| rounds(r)).collect()
}

fn main() {
    if std::fs::metadata("/dev/kvm").is_err() {
        println!("vpmu_costs skipped: /dev/kvm is not available");
        return;
    }
    let started = Instant::now();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!("vpmu_costs: {cpus} host CPUs, load average {}", load.trim());
    let mut t = Table::new();
    let mut khz = 0.0;

    // Figures 1 and 2: MSR accesses and the exit path, 1 vCPU, vPMU off and
    // on in alternating runs; inside each run the variants alternate round
    // by round.
    let base = "probe.tests=bench_msr,bench_io probe.bench_rounds=7 probe.bench_ops=400 \
                probe.bench_counters=0,1,4,all";
    let mut on_runs = Vec::new();
    let mut off_runs = Vec::new();
    for pair in 0..PAIRS {
        let order = if pair % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for on in order {
            let run = run_vmm(on, 1, &format!("{base} probe.bench_msr={NULL_MSR}"), true);
            khz = run.tsc_khz;
            if on {
                on_runs.push(run);
            } else {
                off_runs.push(run);
            }
        }
    }
    eprintln!("vpmu_costs: figures 1-2 done in {:.0?}", started.elapsed());
    let on_results: Vec<ProbeResult> = on_runs.iter().flat_map(|r| r.results.clone()).collect();
    for op in ["rd", "wr"] {
        let kind = |k: &str| -> Vec<&ProbeResult> {
            find(&on_results, "bench_msr", "msr", k)
                .into_iter()
                .filter(|r| r.get("op") == op)
                .collect()
        };
        let (ctr, sel, null, kernel) = (
            kind("pmu_ctr"),
            kind("pmu_sel"),
            kind("null"),
            kind("kernel"),
        );
        let name = if op == "rd" { "RDMSR" } else { "WRMSR" };
        for (what, rs) in [
            ("PMU counter (vPMU)", &ctr),
            ("PMU event select (vPMU)", &sel),
            ("null MSR (userspace exit, answered 0)", &null),
            ("IA32_SYSENTER_CS (in KVM)", &kernel),
        ] {
            t.us("1", &format!("{name} {what}"), spread(&all_rounds(rs)), khz);
        }
        for (what, a, b, max) in [
            ("counter / null", &ctr, &null, Some(1.05)),
            ("event select / null", &sel, &null, Some(1.05)),
            ("null / in-KVM", &null, &kernel, None),
        ] {
            let ratios = spread(&round_ratios(a, b));
            t.ratio("1", &format!("{name} {what}"), ratios, max);
        }
    }

    let io = |results: &[ProbeResult], k: &str| -> Vec<ProbeResult> {
        find(results, "bench_io", "counters", k)
            .into_iter()
            .cloned()
            .collect()
    };
    let off_results: Vec<ProbeResult> = off_runs.iter().flat_map(|r| r.results.clone()).collect();
    let off_idle = io(&off_results, "0");
    t.us(
        "2",
        "port I/O exit, vPMU off",
        spread(&all_rounds(&off_idle.iter().collect::<Vec<_>>())),
        khz,
    );
    let idle = io(&on_results, "0");
    t.us(
        "2",
        "port I/O exit, vPMU on, idle",
        spread(&all_rounds(&idle.iter().collect::<Vec<_>>())),
        khz,
    );
    // Off against on: run medians of alternating runs, paired.
    let pair_ratios: Vec<f64> = on_runs
        .iter()
        .zip(&off_runs)
        .map(|(on, off)| {
            let m = |r: &Run| find(&r.results, "bench_io", "counters", "0")[0].num("median");
            m(on) / m(off)
        })
        .collect();
    t.ratio(
        "2",
        "on, idle / off (paired runs)",
        spread(&pair_ratios),
        Some(1.01),
    );
    // Where the time of an exit goes: the VMM's own share (host TSC from
    // KVM_RUN returning to the next KVM_RUN), measured by the VMM around
    // the same loops. The rest is KVM's round trip, the same with the vPMU
    // on or off.
    let user = |runs: &[Run], j: u64| -> Vec<f64> {
        runs.iter()
            .flat_map(|r| io_user_per_exit(r.trace.as_ref().unwrap(), j))
            .collect()
    };
    let user_off = spread(&user(&off_runs, 0));
    let user_idle = spread(&user(&on_runs, 0));
    t.us(
        "2",
        "  of which in the VMM (userspace), vPMU off",
        user_off,
        khz,
    );
    t.us(
        "2",
        "  of which in the VMM (userspace), vPMU on, idle",
        user_idle,
        khz,
    );
    let exit_off = spread(&all_rounds(&off_idle.iter().collect::<Vec<_>>())).median;
    t.ratio(
        "2",
        "on, idle / off from the VMM's share: 1 + (on - off) / exit",
        Spread {
            median: 1.0 + (user_idle.median - user_off.median) / exit_off,
            lo: 1.0 + (user_idle.lo - user_off.hi) / exit_off,
            hi: 1.0 + (user_idle.hi - user_off.lo) / exit_off,
            n: user_idle.n.min(user_off.n),
        },
        Some(1.01),
    );
    for (j, k) in [(1, "1"), (2, "4"), (3, "all")] {
        t.us(
            "2",
            &format!("  of which in the VMM (userspace), {k} counters running"),
            spread(&user(&on_runs, j)),
            khz,
        );
    }
    for k in ["1", "4", "all"] {
        let running = io(&on_results, k);
        let running: Vec<&ProbeResult> = running.iter().collect();
        let idle: Vec<&ProbeResult> = idle.iter().collect();
        t.us(
            "2",
            &format!("port I/O exit, {k} counters running"),
            spread(&all_rounds(&running)),
            khz,
        );
        t.ratio(
            "2",
            &format!("{k} running / on, idle (same rounds)"),
            spread(&round_ratios(&running, &idle)),
            Some(1.15),
        );
    }

    // Figures 3 and 5: PMIs and the exit path with 1-8 vCPUs, PMI rates
    // 100-10000/s per vCPU; figure 4 from the same sessions.
    let rates: Vec<String> = RATES.iter().map(u64::to_string).collect();
    let pmi_cmdline = format!(
        "probe.cpus=all probe.tests=bench_io,bench_pmi probe.bench_rounds=5 probe.bench_ops=300 \
         probe.bench_counters=0,1,4,all probe.bench_rates={} probe.bench_ms={PMI_WINDOW_MS} \
         probe.bench_pmi_rounds=1 probe.bench_stamps=400 probe.bench_msr={NULL_MSR}",
        rates.join(",")
    );
    let mut growth: BTreeMap<u32, Vec<Run>> = BTreeMap::new();
    let mut growth_off: BTreeMap<u32, Vec<Run>> = BTreeMap::new();
    for _ in 0..GROWTH_REPS {
        for &n in &VCPUS {
            growth
                .entry(n)
                .or_default()
                .push(run_vmm(true, n, &pmi_cmdline, true));
            let off = format!(
                "probe.cpus=all probe.tests=bench_io probe.bench_rounds=5 probe.bench_ops=300 \
                 probe.bench_counters=0 probe.bench_msr={NULL_MSR}"
            );
            growth_off
                .entry(n)
                .or_default()
                .push(run_vmm(false, n, &off, false));
        }
    }
    eprintln!(
        "vpmu_costs: figures 3 and 5 done in {:.0?}",
        started.elapsed()
    );

    let mut growth_rows = String::new();
    let _ = writeln!(
        growth_rows,
        "| vCPUs | PMI/s/vCPU | exit off | exit on idle | exit 1/4/all running | PMIs/vCPU | exits/PMI (VMM) | exits/PMI (KVM, all) | emulated insns/PMI | handler us/PMI | guest time lost us/PMI | latency p50 / p99 us | same, thread kept its CPU (share) |"
    );
    let _ = writeln!(
        growth_rows,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for &n in &VCPUS {
        let runs = &growth[&n];
        let results: Vec<ProbeResult> = runs.iter().flat_map(|r| r.results.clone()).collect();
        let off_results: Vec<ProbeResult> = growth_off[&n]
            .iter()
            .flat_map(|r| r.results.clone())
            .collect();
        let med = |rs: Vec<ProbeResult>| {
            spread(&all_rounds(&rs.iter().collect::<Vec<_>>())).median / khz * 1000.0
        };
        let exit_off = med(io(&off_results, "0"));
        let exit_idle = med(io(&results, "0"));
        let exit_run: Vec<String> = ["1", "4", "all"]
            .iter()
            .map(|k| format!("{:.1}", med(io(&results, k))))
            .collect();
        for (ri, &rate) in RATES.iter().enumerate() {
            let windows = windows_at(runs, ri);
            let mut latency = Latencies::default();
            for run in runs {
                latency.absorb(latencies_for_rate(run.trace.as_ref().unwrap(), ri as u64));
            }
            let pmi_lines: Vec<&ProbeResult> = results
                .iter()
                .filter(|r| r.test == "bench_pmi" && r.get("rate") == rate.to_string())
                .collect();
            let per = |f: fn(&PmiWindow) -> f64| per_pmi(&windows, f).median;
            let handler: Vec<f64> = pmi_lines.iter().map(|r| handler_per_pmi(r)).collect();
            let lost: Vec<f64> = pmi_lines.iter().map(|r| lost_per_pmi(r, khz)).collect();
            let pmis = spread(&pmi_lines.iter().map(|r| r.num("pmis")).collect::<Vec<_>>());
            let kept = sorted(&latency.overflow_to_stamp_kept_cpu);
            let latency = sorted(&latency.overflow_to_stamp);
            let us = |c: f64| c / khz * 1000.0;
            let _ = writeln!(
                growth_rows,
                "| {n} | {rate} | {exit_off:.1} | {exit_idle:.1} | {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} / {:.0} | {:.0} / {:.0} ({:.0}%) |",
                exit_run.join(" / "),
                pmis.median,
                per(|w| w.user_exits),
                per(|w| w.kvm_exits),
                per(|w| w.emulated),
                us(spread(&handler).median),
                us(spread(&lost).median),
                us(percentile(&latency, 0.5)),
                us(percentile(&latency, 0.99)),
                us(percentile(&kept, 0.5)),
                us(percentile(&kept, 0.99)),
                100.0 * kept.len() as f64 / latency.len().max(1) as f64,
            );
        }
    }

    // Figure 3 (1 vCPU, 1000 PMIs/s): the detailed rows.
    let one = &growth[&1];
    let w3 = windows_at(one, FIG3_RATE);
    // The minimal handler (read status, read counter, write period,
    // ack, re-enable), in a session of its own; then Linux's, which also
    // freezes the counters first.
    let basic = run_vmm(
        true,
        1,
        &format!(
            "probe.tests=bench_pmi probe.bench_handler=basic probe.bench_rates={} \
             probe.bench_ms={PMI_WINDOW_MS} probe.bench_pmi_rounds=2 probe.bench_msr={NULL_MSR}",
            rates.join(",")
        ),
        true,
    );
    let wb = windows_at([&basic], FIG3_RATE);
    t.plain(
        "3",
        "exits to the VMM per PMI, basic handler: status, counter, period, ack, re-enable (1 vCPU, 1000/s)",
        per_pmi(&wb, |w| w.user_exits),
        "",
        Some((6.0, "<= 6")),
    );
    t.plain(
        "3",
        "  of which PMU MSR exits",
        per_pmi(&wb, |w| w.msr_exits),
        "",
        None,
    );
    t.plain(
        "3",
        "exits to the VMM per PMI, Linux's AMD v2 handler: freeze + the same (1 vCPU, 1000/s)",
        per_pmi(&w3, |w| w.user_exits),
        "",
        Some((6.0, "<= 6")),
    );
    t.plain(
        "3",
        "  of which PMU MSR exits",
        per_pmi(&w3, |w| w.msr_exits),
        "",
        None,
    );
    t.plain(
        "3",
        "  of which overflow-signal exits",
        per_pmi(&w3, |w| w.signal_exits),
        "",
        None,
    );
    t.plain(
        "3",
        "all KVM exits per PMI (incl. in-kernel)",
        per_pmi(&w3, |w| w.kvm_exits),
        "",
        None,
    );
    t.plain(
        "3",
        "NMIs injected per PMI",
        per_pmi(&w3, |w| w.nmi_injections),
        "",
        None,
    );
    t.plain(
        "3",
        "guest instructions KVM emulated per PMI",
        per_pmi(&w3, |w| w.emulated),
        "",
        None,
    );
    // KVM on these hosts emulates every guest instruction: what one costs,
    // from the control windows (the work loop alone).
    let mut per_insn = Vec::new();
    for run in one {
        let trace = run.trace.as_ref().unwrap();
        let marks: Vec<&Fields> = trace.of("mark").collect();
        for w in marks.windows(2) {
            if num(w[0], "tag") as u64 >> 24 == MARK_CONTROL_START
                && w[0].get("vcpu") == w[1].get("vcpu")
            {
                let d = |k: &str| num(w[1], k) - num(w[0], k);
                per_insn.push(d("host_tsc") / d("kvm_insn_emulation"));
            }
        }
    }
    t.us(
        "3",
        "KVM's time per emulated guest instruction (work loop)",
        spread(&per_insn),
        khz,
    );
    let lines: Vec<&ProbeResult> = one
        .iter()
        .flat_map(|r| r.results.iter())
        .filter(|r| r.test == "bench_pmi" && r.get("rate") == RATES[FIG3_RATE].to_string())
        .collect();
    let handler: Vec<f64> = lines.iter().map(|r| handler_per_pmi(r)).collect();
    t.us(
        "3",
        "guest handler time per PMI (entry to last instruction)",
        spread(&handler),
        khz,
    );
    let lost: Vec<f64> = lines.iter().map(|r| lost_per_pmi(r, khz)).collect();
    t.us(
        "3",
        "guest time lost per PMI (work loop, steal removed)",
        spread(&lost),
        khz,
    );
    let mut l1 = Latencies::default();
    for run in one {
        l1.absorb(latencies_for_rate(
            run.trace.as_ref().unwrap(),
            FIG3_RATE as u64,
        ));
    }
    let lat = |v: &[f64]| {
        let s = sorted(v);
        (
            percentile(&s, 0.5) / khz * 1000.0,
            percentile(&s, 0.99) / khz * 1000.0,
            s.len(),
        )
    };
    for (name, v, target) in [
        (
            "PMI latency: counter overflow to guest handler",
            &l1.overflow_to_stamp,
            true,
        ),
        (
            "PMI latency, vCPU thread kept its CPU (not preempted)",
            &l1.overflow_to_stamp_kept_cpu,
            true,
        ),
        (
            "  overflow to the VMM seeing the signal (counter overshoot)",
            &l1.overshoot,
            false,
        ),
        (
            "  signal received to guest handler",
            &l1.signal_to_stamp,
            false,
        ),
        (
            "  signal received to NMI injected (VMM)",
            &l1.signal_to_inject,
            false,
        ),
        (
            "  NMI injected to guest handler (KVM entry + guest entry path)",
            &l1.inject_to_stamp,
            false,
        ),
    ] {
        let (p50, p99, n) = lat(v);
        let target = if target {
            let met = p99 < 100.0;
            t.targets
                .push((format!("3: {} p99 < 100 us", name.trim()), met));
            format!("p99 < 100 us: {}", if met { "met" } else { "NOT met" })
        } else {
            String::new()
        };
        t.row(
            "3",
            name,
            format!("p50 {p50:.1} us"),
            format!("p99 {p99:.1} us"),
            n,
            &target,
        );
    }

    // Figure 4: perf_event_open for a whole probe session (every test).
    let session = run_vmm(
        true,
        1,
        &format!(
            "probe.tests=all,bench_msr,bench_io,bench_pmi probe.bench_rounds=2 probe.bench_ops=100 \
             probe.bench_rates=1000 probe.bench_ms=50 probe.bench_msr={NULL_MSR}"
        ),
        true,
    );
    let stats = session
        .trace
        .as_ref()
        .unwrap()
        .of("vpmu")
        .next()
        .unwrap()
        .clone();
    let opens = num(&stats, "opens");
    let contexts = num(&stats, "contexts_ran");
    let toggles = num(&stats, "starts") + num(&stats, "stops");
    // One event per counter context that ran, plus the vCPU's guest-time
    // reference clock.
    let expected = contexts + 1.0;
    let met = opens <= expected;
    t.targets.push((
        "4: perf_event_open = programmings that ran (+1 reference clock)".into(),
        met,
    ));
    t.row(
        "4",
        "perf_event_open, whole probe session (all tests + bench)",
        format!("{opens}"),
        format!("{contexts} programmings ran + 1 clock; {toggles} starts/stops"),
        1,
        &format!(
            "one per programming, none per toggle: {}",
            if met { "met" } else { "NOT met" }
        ),
    );
    let _ = session.stderr;

    // Figure 6: peak RSS with 8 vCPUs, vPMU off and on.
    let mut rss = (Vec::new(), Vec::new());
    for _ in 0..RSS_RUNS {
        for on in [false, true] {
            let run = run_vmm(
                on,
                8,
                "probe.cpus=all probe.tests=cycles,pmi probe.pmi_ms=100 probe.cycles_ms=50",
                false,
            );
            let v = run.max_rss_kib as f64 / 1024.0;
            if on {
                rss.1.push(v)
            } else {
                rss.0.push(v)
            }
        }
    }
    t.plain(
        "6",
        "peak RSS, 8 vCPUs, vPMU off",
        spread(&rss.0),
        " MiB",
        None,
    );
    t.plain(
        "6",
        "peak RSS, 8 vCPUs, vPMU on (counting, PMIs)",
        spread(&rss.1),
        " MiB",
        None,
    );

    // Where the PMI path's VMM time goes: the ioctls it makes, timed alone.
    for (name, s) in ioctl_costs() {
        t.row(
            "p",
            name,
            format!("{:.2} us", s.median),
            format!("{:.2}..{:.2}", s.lo, s.hi),
            s.n,
            "",
        );
    }

    println!(
        "vPMU costs: {cpus} host CPUs, guest TSC {:.0} MHz, load average at start {}, {:.0?} in all\n",
        khz / 1000.0,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        started.elapsed()
    );
    println!("{}", t.rows);
    println!("Figure 5: growth with vCPUs (host has {cpus} CPUs: above that, vCPUs contend) and PMI rate (exit costs in us per exit; latency from counter overflow to guest handler)\n");
    println!("{growth_rows}");
    println!("Targets:");
    for (name, met) in &t.targets {
        println!("  {} {name}", if *met { "met    " } else { "NOT MET" });
    }
}

/// The KVM ioctls of a PMI delivery on an idle vCPU of a fresh VM, in us
/// (median and spread over batches of 200 calls).
fn ioctl_costs() -> Vec<(&'static str, Spread)> {
    use kvm_bindings::{kvm_msi, kvm_msr_entry, Msrs};
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let nmi_msi = kvm_msi {
        address_lo: 0xfee0_0000,
        data: 0x400,
        ..Default::default()
    };
    let mut tsc = Msrs::from_entries(&[kvm_msr_entry {
        index: 0x10,
        ..Default::default()
    }])
    .unwrap();
    let time = |f: &mut dyn FnMut()| {
        let batches: Vec<f64> = (0..15)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..200 {
                    f();
                }
                start.elapsed().as_secs_f64() * 1e6 / 200.0
            })
            .collect();
        spread(&batches)
    };
    vec![
        (
            "KVM_GET_LAPIC (read LVTPC; a vCPU ioctl)",
            time(&mut || {
                let _ = vcpu.get_lapic();
            }),
        ),
        (
            "KVM_NMI (a vCPU ioctl; the VMM's PMI path before the NMI MSI)",
            time(&mut || {
                let _ = vcpu.nmi();
            }),
        ),
        (
            "KVM_SIGNAL_MSI, NMI mode (a VM ioctl; what the VMM uses)",
            time(&mut || {
                let _ = vm.signal_msi(nmi_msi);
            }),
        ),
        (
            "KVM_GET_MSRS(IA32_TSC)",
            time(&mut || {
                let _ = vcpu.get_msrs(&mut tsc);
            }),
        ),
        (
            "getrusage(RUSAGE_THREAD) (the trace's preemption check)",
            time(&mut || {
                // SAFETY: an all-zero rusage is a valid value to fill.
                let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
                // SAFETY: fills `usage`, which lives across the call.
                unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
            }),
        ),
    ]
}

/// Guest TSC cycles from PMI handler entry to its last instruction.
fn handler_per_pmi(r: &ProbeResult) -> f64 {
    r.num("handler_tsc") / r.num("pmis")
}

/// Guest TSC cycles the work loop lost per PMI: the PMI window's busy
/// time (steal removed) less its chunks at the control window's pace.
fn lost_per_pmi(r: &ProbeResult, khz: f64) -> f64 {
    let steal = |key| r.num(key) * khz / 1000.0;
    let chunk = (r.num("control_tsc") - steal("control_steal_us")) / r.num("control_chunks");
    let busy = r.num("pmi_tsc") - steal("pmi_steal_us");
    (busy - r.num("pmi_chunks") * chunk) / r.num("pmis")
}

const MARK_IO_START: u64 = 5;

/// VMM userspace TSC cycles per exit in each timed `bench_io` loop of
/// variant `j` (one value per round), from the marks around the loops.
fn io_user_per_exit(trace: &Trace, j: u64) -> Vec<f64> {
    let marks: Vec<&Fields> = trace.of("mark").collect();
    marks
        .windows(2)
        .filter(|w| {
            let tag = num(w[0], "tag") as u64;
            tag >> 24 == MARK_IO_START
                && (tag >> 16) & 0xff == j
                && w[0].get("vcpu") == w[1].get("vcpu")
        })
        .map(|w| {
            let d = |k: &str| num(w[1], k) - num(w[0], k);
            d("user_tsc") / d("exits")
        })
        .collect()
}

/// The latencies of the PMI windows of rate index `rate` only (stamps and
/// PMIs inside those windows' host-time ranges).
fn latencies_for_rate(trace: &Trace, rate: u64) -> Latencies {
    let mut ranges: Vec<(f64, f64)> = Vec::new();
    let marks: Vec<&Fields> = trace.of("mark").collect();
    for m in &marks {
        let tag = num(m, "tag") as u64;
        if tag >> 24 == MARK_PMI_START && (tag >> 16) & 0xff == rate {
            let vcpu = num(m, "vcpu");
            let start = num(m, "host_tsc");
            let end = marks
                .iter()
                .filter(|e| num(e, "vcpu") == vcpu && num(e, "host_tsc") > start)
                .map(|e| num(e, "host_tsc"))
                .fold(f64::INFINITY, f64::min);
            ranges.push((start, end));
        }
    }
    let offset_of = |vcpu: f64| {
        trace
            .of("tsc_offset")
            .find(|f| num(f, "vcpu") == vcpu)
            .map_or(0.0, |f| num(f, "offset"))
    };
    let inside = |t: f64| ranges.iter().any(|&(a, b)| t >= a && t <= b);
    let records = trace
        .records
        .iter()
        .filter(|(k, f)| match k.as_str() {
            "pmi" => inside(num(f, "injected")),
            "stamp" => inside(num(f, "guest_tsc") - offset_of(num(f, "vcpu"))),
            _ => true,
        })
        .cloned()
        .collect();
    latencies(&Trace { records })
}
