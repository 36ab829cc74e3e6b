//! Host-side export figures: scrape latency of `GET /vpmu` and
//! `GET /metrics` with 8 vCPUs whose counters run, and the guest's
//! slowdown while it is scraped, unscraped and scraped runs interleaved.
//!
//! `cargo bench -p vmm --bench api`

#[path = "../../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Slowdown rounds per configuration (each: one unscraped, one scraped run).
const ROUNDS: usize = 7;
/// Length of the guest's busy loop in the slowdown runs.
const LOOP_MS: u64 = 2000;
/// Scrapes per endpoint in the CPU cost phase.
const COST_SCRAPES: usize = 400;
/// Scrape interval of the paced scraper (a very eager Prometheus).
const PACE: Duration = Duration::from_millis(100);

fn spawn(vcpus: u32, cmdline: &str, sock: &Path) -> Child {
    common::vmm()
        .args(["--vpmu", "on", "--timeout", "300", "--vcpus"])
        .arg(vcpus.to_string())
        .args(["--cmdline", cmdline, "--api-socket"])
        .arg(sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting vmm")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    println!(
        "{name:<44} n={:>5}  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms[ms.len() - 1]
    );
}

/// Times `GET path` for `duration`, one request every `pace` (back to back
/// when zero). Returns the latencies in ms.
fn scrape(sock: &Path, path: &str, duration: Duration, pace: Duration) -> Vec<f64> {
    let end = Instant::now() + duration;
    let mut ms = Vec::new();
    while Instant::now() < end {
        let t0 = Instant::now();
        let (status, body) = common::api(sock, "GET", path).expect("scrape");
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        assert!(status == 200 && !body.is_empty(), "{status}");
        std::thread::sleep(pace.saturating_sub(t0.elapsed()));
    }
    ms
}

fn latency() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut child = spawn(
        8,
        "probe.tests=cycles probe.cpus=all probe.cycles_ms=60000",
        &sock,
    );
    common::wait_for_api(&sock);
    // Let every vCPU start its counter.
    std::thread::sleep(Duration::from_secs(2));
    println!("scrape latency, 8 vCPUs counting cycles in busy loops (2 host cores):");
    for (label, pace, secs) in [
        ("every 100 ms (every scrape refreshes)", PACE, 15),
        ("back to back", Duration::ZERO, 5),
    ] {
        for path in ["/vpmu", "/metrics"] {
            let ms = scrape(&sock, path, Duration::from_secs(secs), pace);
            report(&format!("  GET {path:<8} {label}"), ms);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// CPU time (user + system) of process `pid` so far, in ms.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1000.0 / hz
}

/// With 8 idle vCPUs (HLT): latency when vCPU threads get a CPU at once,
/// and the VMM's CPU time per scrape (the API thread, plus the kick, exit
/// and republication of every vCPU). Returns the CPU ms per scrape of
/// each endpoint.
fn cost() -> Vec<(&'static str, f64)> {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut child = spawn(8, "probe.tests=none probe.hold_ms=120000", &sock);
    common::wait_for_api(&sock);
    std::thread::sleep(Duration::from_secs(1));
    println!("8 idle vCPUs (HLT): every scrape kicks all 8 to republish:");
    let mut costs = Vec::new();
    for path in ["/vpmu", "/metrics"] {
        let before = cpu_ms(child.id());
        let mut ms = Vec::new();
        for _ in 0..COST_SCRAPES {
            // 12 ms apart: every view is older than the API's 10 ms
            // freshness, so every scrape refreshes all of them.
            let t0 = Instant::now();
            let (status, _) = common::api(&sock, "GET", path).expect("scrape");
            ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(status, 200);
            std::thread::sleep(Duration::from_millis(12).saturating_sub(t0.elapsed()));
        }
        let per_scrape = (cpu_ms(child.id()) - before) / COST_SCRAPES as f64;
        report(&format!("  GET {path:<8} every 12 ms"), ms);
        println!("  GET {path:<8} VMM CPU time per scrape: {per_scrape:.3} ms");
        costs.push((path, per_scrape));
    }
    let _ = child.kill();
    let _ = child.wait();
    costs
}

/// One run of the cycles test on `vcpus` vCPUs, scraped every `PACE`
/// (alternating /vpmu and /metrics) or not. Returns the guests' busy-loop
/// iterations per TSC cycle and per TSC cycle not stolen by the host
/// (KVM steal time), summed over vCPUs, and the scrapes made.
fn slowdown_run(vcpus: u32, scraped: bool) -> (f64, f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let sock: PathBuf = dir.path().join("api.sock");
    let cmdline = format!("probe.tests=cycles probe.cpus=all probe.cycles_ms={LOOP_MS}");
    let mut child = spawn(vcpus, &cmdline, &sock);
    let stdout = child.stdout.take().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicU64::new(0));
    let scraper = scraped.then(|| {
        let (sock, stop, scrapes) = (sock.clone(), stop.clone(), scrapes.clone());
        std::thread::spawn(move || {
            common::wait_for_api(&sock);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let path = if i.is_multiple_of(2) {
                    "/vpmu"
                } else {
                    "/metrics"
                };
                if matches!(common::api(&sock, "GET", path), Ok((200, _))) {
                    scrapes.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                std::thread::sleep(PACE.saturating_sub(t0.elapsed()));
            }
        })
    });
    let out: Vec<String> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .collect();
    let status = child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    if let Some(s) = scraper {
        s.join().unwrap();
    }
    assert!(status.success(), "vmm failed: {status}");
    let out = out.join("\n");
    let tsc_khz = common::tsc_khz(&out);
    let results = common::probe_results(&out);
    let (mut per_tsc, mut per_run) = (0.0, 0.0);
    for cpu in 0..vcpus {
        let c = common::result(&results, cpu, "cycles");
        let stolen = c.num("steal_us") * tsc_khz / 1000.0;
        per_tsc += c.num("loop_iters") / c.num("tsc");
        per_run += c.num("loop_iters") / (c.num("tsc") - stolen);
    }
    (per_tsc, per_run, scrapes.load(Ordering::Relaxed))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn slowdown(vcpus: u32) {
    let (mut raw, mut run) = (Vec::new(), Vec::new());
    let mut scrapes = 0;
    for _ in 0..ROUNDS {
        let (quiet, quiet_run, _) = slowdown_run(vcpus, false);
        let (busy, busy_run, n) = slowdown_run(vcpus, true);
        scrapes += n;
        raw.push(busy / quiet);
        run.push(busy_run / quiet_run);
    }
    let rounds = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "  {vcpus} vCPU(s), {} scrapes/run: loop rate scraped/unscraped per TSC: median {:.4} \
         (slowdown {:+.2}%) [{}]; per TSC less steal: median {:.4} (slowdown {:+.2}%) [{}]",
        scrapes / ROUNDS as u64,
        median(raw.clone()),
        (1.0 - median(raw.clone())) * 100.0,
        rounds(&raw),
        median(run.clone()),
        (1.0 - median(run.clone())) * 100.0,
        rounds(&run),
    );
}

fn main() {
    if std::fs::metadata("/dev/kvm").is_err() {
        println!("api benchmark skipped: /dev/kvm is not available");
        return;
    }
    latency();
    let costs = cost();
    for rate in [1.0, 10.0] {
        let worst: Vec<String> = costs
            .iter()
            .map(|(path, ms)| format!("{path} {:.3}%", ms * rate / 1000.0 / 2.0 * 100.0))
            .collect();
        println!(
            "  => at {rate} scrapes/s, if every scrape's CPU time came out of guest time on \
             the 2 host cores: {}",
            worst.join(", ")
        );
    }
    println!(
        "guest slowdown while scraped every {} ms ({LOOP_MS} ms busy loops, {ROUNDS} rounds, \
         runs interleaved):",
        PACE.as_millis()
    );
    slowdown(8);
    slowdown(1);
}
