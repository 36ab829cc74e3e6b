//! Snapshot and restore figures (issue 21), side by side in one run, for
//! the probe guest with 256 MiB and 2 GiB of memory: how long a snapshot
//! holds the guest and how big it is (apparent and on disk); how long
//! `vmm run --restore` takes to the guest's reset, against a cold boot of
//! the same guest to its reset; the VMM's peak RSS in both.
//!
//! The restore figure is the VMM's own (`vmm: restored from F in N ms`):
//! from `run` starting to the vCPU threads about to enter the guest, the
//! file checked (headers, checksums of the state and of guest memory's
//! data) and the VM built. The cold boot runs the probe to its reset (its
//! first instruction comes a few ms before).
//!
//! `cargo bench -p vmm --bench snapshot`

#[path = "common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 9;

fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
}

/// Runs vmm to its end; (wall ms, peak RSS KiB, its stderr).
fn run_once(args: &[&str]) -> (f64, i64, String) {
    let start = Instant::now();
    let err = std::env::temp_dir().join(format!("vmm-bench-{}.err", std::process::id()));
    let child = vmm()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("starting vmm");
    let (status, rss, wall) = common::wait_with_peak_rss(child, start);
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let _ = std::fs::remove_file(&err);
    assert!(
        libc::WIFEXITED(status) && matches!(libc::WEXITSTATUS(status), 0 | 3),
        "vmm {args:?} failed: {status:#x}: {stderr}"
    );
    (wall.as_secs_f64() * 1000.0, rss, stderr)
}

/// The VMM's own figure: file checked and VM built, vCPUs about to enter.
fn restored_in(stderr: &str) -> f64 {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("vmm: restored from "))
        .and_then(|rest| rest.rsplit(" in ").next())
        .and_then(|ms| ms.strip_suffix(" ms"))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no restore time in {stderr}"))
}

fn put_snapshot(sock: &Path, path: &Path) -> (f64, serde_json::Value) {
    let body = serde_json::json!({ "path": path, "overwrite": true }).to_string();
    let start = Instant::now();
    let mut s = UnixStream::connect(sock).expect("API socket");
    write!(
        s,
        "PUT /vm/snapshot HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let json = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    (ms, serde_json::from_str(json).unwrap())
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn bench(memory_mib: u64, dir: &Path) {
    let mem = memory_mib.to_string();
    let sock = dir.join(format!("bench-{memory_mib}.sock"));
    let serial = dir.join(format!("bench-{memory_mib}.out"));
    let snap = dir.join(format!("bench-{memory_mib}.snap"));
    let mut child = vmm()
        .args(["run", "--memory", &mem, "--vpmu", "on", "--timeout", "300"])
        .args(["--cmdline", "probe.tests=none probe.hold_ms=200000"])
        .arg("--api-socket")
        .arg(&sock)
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .stderr(Stdio::null())
        .spawn()
        .expect("starting vmm");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&serial).is_ok_and(|s| s.contains("probe: hold")) {
        assert!(Instant::now() < deadline, "the probe never held");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut took = Vec::new();
    let mut held = Vec::new();
    let mut doc = serde_json::Value::Null;
    for _ in 0..ROUNDS {
        let (ms, answer) = put_snapshot(&sock, &snap);
        took.push(ms);
        held.push(answer["paused_ms"].as_f64().unwrap());
        doc = answer;
    }
    let _ = child.kill();
    let _ = child.wait();
    let meta = std::fs::metadata(&snap).unwrap();
    let snap_arg = snap.to_str().unwrap();
    let mut restores = Vec::new();
    let mut boots = Vec::new();
    let (mut restore_rss, mut boot_rss) = (0, 0);
    for _ in 0..ROUNDS {
        // The restored probe holds on; the timeout ends it (exit 3).
        let (_, rss, stderr) = run_once(&[
            "run",
            "--restore",
            snap_arg,
            "--serial",
            "none",
            "--timeout",
            "0.3",
        ]);
        restores.push(restored_in(&stderr));
        restore_rss = restore_rss.max(rss);
        let (ms, rss, _) = run_once(&[
            "run",
            "--memory",
            &mem,
            "--vpmu",
            "on",
            "--serial",
            "none",
            "--cmdline",
            "probe.tests=none",
        ]);
        boots.push(ms);
        boot_rss = boot_rss.max(rss);
    }
    let (t, t0, t1) = median(took);
    let (h, _, _) = median(held);
    let (r, r0, r1) = median(restores);
    let (b, b0, b1) = median(boots);
    println!("probe guest, {memory_mib} MiB, vPMU on, {ROUNDS} rounds each:");
    println!(
        "  snapshot (PUT /vm/snapshot)            median {t:>6.1} ms  min {t0:>6.1}  max {t1:>6.1}  (guest held {h:.1} ms)"
    );
    println!(
        "  snapshot file                          {} MiB apparent, {:.2} MiB on disk, {:.2} MiB of guest memory data",
        meta.len() >> 20,
        (meta.blocks() * 512) as f64 / (1 << 20) as f64,
        doc["memory_data_bytes"].as_f64().unwrap() / (1 << 20) as f64
    );
    println!(
        "  restore to the first guest instruction  median {r:>6.1} ms  min {r0:>6.1}  max {r1:>6.1}  peak RSS {restore_rss} KiB"
    );
    println!(
        "  cold boot to the probe's reset         median {b:>6.1} ms  min {b0:>6.1}  max {b1:>6.1}  peak RSS {boot_rss} KiB"
    );
    let _ = std::fs::remove_file(&snap);
}

fn main() {
    if std::fs::metadata("/dev/kvm").is_err() {
        println!("snapshot benchmark skipped: /dev/kvm is not available");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmm-snapshot-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for memory_mib in [256, 2048] {
        bench(memory_mib, &dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
