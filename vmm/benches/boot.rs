//! Boot figures: wall time from starting `vmm` to the probe
//! guest's reset, and the VMM's peak RSS. Runs the release binary several
//! times, vPMU off and on interleaved, and prints median and spread.
//!
//! `cargo bench -p vmm --bench boot`

#[path = "common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::Instant;

const ROUNDS: usize = 15;

/// Runs vmm once; returns (wall ms, peak RSS KiB).
fn run_once(args: &[&str]) -> (f64, i64) {
    let start = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting vmm");
    let (status, rss, wall) = common::wait_with_peak_rss(child, start);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "vmm {args:?} failed: {status:#x}"
    );
    (wall.as_secs_f64() * 1000.0, rss)
}

fn summary(name: &str, samples: &mut [(f64, i64)]) {
    samples.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = samples.len();
    let wall: Vec<f64> = samples.iter().map(|s| s.0).collect();
    let rss = samples.iter().map(|s| s.1).max().unwrap_or(0);
    println!(
        "{name:<34} median {:>7.1} ms   min {:>7.1}   max {:>7.1}   peak RSS {:>6} KiB",
        wall[n / 2],
        wall[0],
        wall[n - 1],
        rss
    );
}

fn main() {
    if std::fs::metadata("/dev/kvm").is_err() {
        println!("boot benchmark skipped: /dev/kvm is not available");
        return;
    }
    let variants: [(&str, Vec<&str>); 3] = [
        (
            "probe, vPMU off, 1 vCPU",
            vec!["--vpmu", "off", "--cmdline", "probe.tests=none"],
        ),
        (
            "probe, vPMU on, 1 vCPU",
            vec!["--vpmu", "on", "--cmdline", "probe.tests=none"],
        ),
        (
            "probe, vPMU on, 8 vCPUs",
            vec![
                "--vpmu",
                "on",
                "--vcpus",
                "8",
                "--cmdline",
                "probe.tests=none",
            ],
        ),
    ];
    let mut results: Vec<Vec<(f64, i64)>> = vec![Vec::new(); variants.len()];
    for _ in 0..ROUNDS {
        for (i, (_, args)) in variants.iter().enumerate() {
            results[i].push(run_once(args));
        }
    }
    println!("vmm start to probe reset ({ROUNDS} rounds, interleaved):");
    for ((name, _), samples) in variants.iter().zip(results.iter_mut()) {
        summary(name, samples);
    }
}
