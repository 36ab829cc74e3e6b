//! Host-side profiler figures: the guest's slowdown while
//! profiled at 99, 999 and 4999 Hz, and the VMM's time per sample and per
//! stack frame walked.
//!
//! One VM (1 vCPU) runs the probe's `spin`: rounds of fixed work under a
//! known call depth, each timed by the guest (TSC less KVM steal time: the
//! time the vCPU ran, VMM time on exits included). Meanwhile the host
//! rotates through windows of no profile and profiles at each rate, side
//! by side in one run; a round counts for the window it lies wholly in.
//!
//! `cargo bench -p vmm --bench profile`

#[path = "../../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Fixed work per round (probe chunks), the call depth, the rounds.
const CHUNKS: u64 = 150;
const DEPTH: u64 = 8;
const ROUNDS: u64 = 240;
/// Length of each window.
const WINDOW: Duration = Duration::from_secs(3);
const RATES: [Option<u32>; 4] = [None, Some(99), Some(999), Some(4999)];

/// One round the guest reported: when it began and ended on the host's
/// clock, and the time the vCPU ran.
struct Round {
    start: Instant,
    end: Instant,
    run_ms: f64,
}

/// One window: its rate, its span, and the profile taken in it.
struct Window {
    hz: Option<u32>,
    start: Instant,
    end: Instant,
    profile: Option<serde_json::Value>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn sum(profiles: &[&serde_json::Value], key: &str) -> f64 {
    profiles
        .iter()
        .flat_map(|p| p["per_vcpu"].as_array().cloned().unwrap_or_default())
        .map(|v| v[key].as_f64().unwrap_or(0.0))
        .sum()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let cmdline = format!(
        "probe.tests=spin probe.spin_iters={CHUNKS} probe.spin_rounds={ROUNDS} \
         probe.spin_depth={DEPTH}"
    );
    let mut child = common::vmm()
        .args([
            "--vpmu",
            "off",
            "--timeout",
            "900",
            "--cmdline",
            &cmdline,
            "--api-socket",
        ])
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting vmm");
    let lines: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let reader = {
        let (stdout, lines) = (child.stdout.take().unwrap(), lines.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap().push((Instant::now(), line));
            }
        })
    };
    common::wait_for_api(&sock);
    let mut windows = Vec::new();
    'rotation: loop {
        for hz in RATES {
            if child.try_wait().unwrap().is_some() {
                break 'rotation;
            }
            let start = Instant::now();
            let profile = match hz {
                None => {
                    std::thread::sleep(WINDOW);
                    None
                }
                Some(hz) => {
                    let query = format!("/profile?seconds={}&hz={hz}", WINDOW.as_secs_f64());
                    match common::api(&sock, "GET", &query) {
                        Ok((200, body)) => serde_json::from_str(&body).ok(),
                        _ => None,
                    }
                }
            };
            windows.push(Window {
                hz,
                start,
                end: Instant::now(),
                profile,
            });
        }
    }
    let _ = child.wait();
    reader.join().unwrap();
    let lines = lines.lock().unwrap();
    let text: String = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
    let tsc_khz = common::tsc_khz(&text);
    let rounds: Vec<Round> = lines
        .iter()
        .filter_map(|(at, line)| {
            let r = common::probe_results(line).pop()?;
            (r.test == "spin").then(|| {
                let wall = Duration::from_secs_f64(r.num("tsc") / tsc_khz / 1000.0);
                Round {
                    start: *at - wall,
                    end: *at,
                    run_ms: r.num("tsc") / tsc_khz - r.num("steal_us") / 1000.0,
                }
            })
        })
        .collect();
    println!(
        "profiler cost: 1 vCPU, rounds of fixed work ({CHUNKS} chunks under {DEPTH} frames of \
         descend), {} rounds, {} windows of {:.0} s rotating no profile / 99 / 999 / 4999 Hz",
        rounds.len(),
        windows.len(),
        WINDOW.as_secs_f64()
    );
    println!(
        "{:<10} {:>7} {:>14} {:>9} {:>9} {:>13} {:>13} {:>13}",
        "profile",
        "rounds",
        "run ms/round",
        "slowdown",
        "samples",
        "VMM us/sample",
        "walk ns/frame",
        "frames/sample"
    );
    let mut base = f64::NAN;
    for hz in RATES {
        let mine: Vec<&Window> = windows.iter().filter(|w| w.hz == hz).collect();
        let runs: Vec<f64> = rounds
            .iter()
            .filter(|r| mine.iter().any(|w| r.start >= w.start && r.end <= w.end))
            .map(|r| r.run_ms)
            .collect();
        let n = runs.len();
        let run = median(runs);
        let label = hz.map_or("none".to_string(), |hz| format!("{hz} Hz"));
        if hz.is_none() {
            base = run;
            println!("{label:<10} {n:>7} {run:>14.1} {:>9}", "-");
            continue;
        }
        let profiles: Vec<&serde_json::Value> =
            mine.iter().filter_map(|w| w.profile.as_ref()).collect();
        let samples = sum(&profiles, "samples");
        let frames = sum(&profiles, "frames");
        println!(
            "{label:<10} {n:>7} {run:>14.1} {:>+8.1}% {samples:>9.0} {:>13.1} {:>13.0} {:>13.1}",
            (run / base - 1.0) * 100.0,
            sum(&profiles, "sample_ns") / samples / 1000.0,
            sum(&profiles, "walk_ns") / frames,
            frames / samples,
        );
    }
}
