//! Snapshot and restore (issue 21) with the probe guest: a VM saved while
//! its counters run and PMIs arrive continues, in another VMM, with the
//! same vPMU (model, programming, values), PMIs at the programmed period on
//! host events opened afresh, and its exported totals carried on. Bad
//! snapshots and bad requests are refused whole, before any guest runs.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{api, api_with_body, num, result, timing_lock, Running};
use serde_json::Value;

/// 5 M cycles: a PMI every ~2 ms of guest time, few enough that the host
/// never throttles them.
const PERIOD: f64 = 5_000_000.0;

/// Takes a snapshot of `vm` into `path` through the API; returns the answer.
fn take(vm: &Running, path: &Path, resume: bool) -> Value {
    let body = serde_json::json!({ "path": path, "resume": resume }).to_string();
    let (status, answer) =
        api_with_body(&vm.sock, "PUT", "/vm/snapshot", &body).expect("PUT /vm/snapshot");
    assert_eq!(status, 200, "{answer}");
    serde_json::from_str(&answer).unwrap()
}

/// Counter `i` of vCPU `vcpu` in a `GET /vpmu` document.
fn counter(doc: &Value, vcpu: usize, i: usize) -> &Value {
    &doc["vcpus"][vcpu]["vpmu"]["counters"][i]
}

/// What a VM counted in all, by its totals.
fn total(doc: &Value) -> u64 {
    doc["totals"]
        .as_array()
        .map(|t| t.iter().map(|e| num(&e["count"])).sum())
        .unwrap_or(0)
}

/// The cycles by which the restored guest's TSC ran past its saved value
/// (the VMM says so where the host does not let it set the TSC), else 0.
fn tsc_gap(stderr: &str, vcpu: u32) -> f64 {
    let prefix = format!(
        "vmm: vCPU {vcpu}: this host does not let the VMM set the guest's TSC: it continues "
    );
    stderr
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .map_or(0.0, |n| n.parse().unwrap())
}

/// The guest's `pmi` result on `cpu`: its PMIs arrived at the programmed
/// period over the time it ran, on both sides of the restore (the TSC gap
/// taken out), each with its status bit, none after it disabled them.
fn assert_pmis_over_the_run(end: &common::Ended, cpu: u32) {
    let results = end.results();
    let p = result(&results, cpu, "pmi");
    let gap = tsc_gap(&end.stderr, cpu) / PERIOD;
    let run = p.num("expected_run") - gap;
    let pmis = p.num("pmis");
    eprintln!(
        "cpu {cpu}: {pmis} PMIs over {run:.0} periods of run time (TSC gap {gap:.0} periods)"
    );
    assert!(
        run >= 200.0,
        "too short a run to judge: {run} periods: {p:?}"
    );
    assert!(
        (pmis - run).abs() <= 0.3 * run,
        "{pmis} PMIs over {run:.0} periods of run time (TSC gap {gap:.0}): {p:?}\n{}",
        end.stderr
    );
    assert_eq!(p.num("status_ok"), pmis, "{p:?}");
    assert_eq!(p.num("after_disable"), 0.0, "{p:?}");
    assert_eq!(p.num("unexpected_nmis"), 0.0, "{p:?}");
}

/// Saves `vm` (left paused) after `after` of its run, ends it, and
/// restores the snapshot: (the document while paused, the restored VMM).
fn save_and_restore(vm: Running, dir: &Path, after: Duration, flags: &[&str]) -> (Value, Running) {
    vm.wait_serial("cpus_online", Duration::from_secs(60));
    std::thread::sleep(after);
    let path = dir.join("vm.snap");
    let answer = take(&vm, &path, false);
    assert_eq!(answer["resumed"], false, "{answer}");
    let before = vm.vpmu();
    assert_eq!(before["vm"]["paused"], true, "{before}");
    let ended = vm.terminate();
    assert_eq!(ended.code, Some(128 + libc::SIGTERM), "{}", ended.stderr);
    (before, Running::restore(&path, flags))
}

#[test]
fn counters_pmis_and_totals_continue_after_a_restore_where_they_were() {
    require_kvm!();
    let _serial = timing_lock();
    let dir = tempfile::tempdir().unwrap();
    // 8 s of TSC: the guest's loop still runs after a restore that comes
    // seconds later on a loaded host (these hosts' TSC runs on meanwhile).
    let vm = Running::start(
        "probe.tests=pmi probe.pmi_ms=8000 probe.pmi_period=5000000",
        &[],
    );
    let (before, restored) = save_and_restore(vm, dir.path(), Duration::from_millis(1500), &[]);
    let after = restored.vpmu();
    // The same model and programming, counting on from the saved value on
    // a host event of this VMM.
    assert_eq!(after["vm"]["model"], before["vm"]["model"]);
    let (b, a) = (counter(&before, 0, 0), counter(&after, 0, 0));
    assert_eq!(a["control"], b["control"], "{a}\n{b}");
    assert!(a["running"].as_bool().unwrap(), "{a}");
    assert_ne!(a["backing"]["kind"], "unbacked", "{a}");
    // A sampling counter: armed at minus its period and re-armed by the
    // guest's handler at each PMI, so it reads within a period or two below
    // the wrap, or just past it while a PMI is pending (a snapshot can take
    // it then); a restore that lost it would read 0 and count up from there.
    let top = 1u64 << 48;
    let near_wrap = |v: u64| v >= top - 2 * PERIOD as u64 || v < PERIOD as u64;
    for (side, value) in [("saved", num(&b["value"])), ("restored", num(&a["value"]))] {
        assert!(
            near_wrap(value),
            "{side} value {value:#x} is not a sampling counter's"
        );
    }
    assert!(total(&after) >= total(&before), "{after}\n{before}");
    let pmis_before = num(&before["vcpus"][0]["pmi_delivery"]["nmi"]);
    assert!(pmis_before > 100, "{before}");

    let end = restored.finish();
    end.assert_reset();
    assert_pmis_over_the_run(&end, 0);
    // This VMM delivered PMIs of its own, counted on from the saved ones.
    let pmis_total = common::vpmu_summary_text(&end.stderr, 0, " PMIs");
    assert!(pmis_total > pmis_before + 100, "{}", end.stderr);
    assert!(end.stderr.contains("vmm: restored from"), "{}", end.stderr);
}

#[test]
fn an_smp_guest_on_the_intel_model_continues_on_every_vcpu() {
    require_kvm!();
    let _serial = timing_lock();
    let dir = tempfile::tempdir().unwrap();
    let vm = Running::start(
        "probe.tests=pmi probe.cpus=all probe.pmi_ms=5000 probe.pmi_period=5000000",
        &["--vcpus", "2", "--cpu-vendor", "intel"],
    );
    let (before, restored) = save_and_restore(vm, dir.path(), Duration::from_millis(2000), &[]);
    let after = restored.vpmu();
    assert_eq!(after["vm"]["model"], before["vm"]["model"]);
    for vcpu in 0..2 {
        let (b, a) = (counter(&before, vcpu, 0), counter(&after, vcpu, 0));
        assert_eq!(a["control"], b["control"], "vCPU {vcpu}: {a}\n{b}");
    }
    let end = restored.finish();
    end.assert_reset();
    for cpu in 0..2 {
        assert_pmis_over_the_run(&end, cpu);
    }
}

#[test]
fn a_guest_without_a_vpmu_restores_without_one() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let vm = Running::start_plain("probe.tests=detect probe.hold_ms=3000", &["--vpmu", "off"]);
    vm.wait_serial("test=detect", Duration::from_secs(60));
    let path = dir.path().join("off.snap");
    take(&vm, &path, true);
    let original = vm.finish();
    original.assert_reset();
    let restored = Running::restore(&path, &[]);
    let end = restored.finish();
    end.assert_reset();
    assert!(
        end.stderr.contains("vPMU off, as in the snapshot"),
        "{}",
        end.stderr
    );
    assert!(end.stdout.contains("probe: reset"), "{}", end.stdout);
    // The restored guest went on after its detect test: it did not boot.
    assert!(!end.stdout.contains("test=detect"), "{}", end.stdout);
}

#[test]
fn one_snapshot_restored_twice_at_once_gives_two_guests_and_stays_unchanged() {
    require_kvm!();
    let _serial = timing_lock();
    let dir = tempfile::tempdir().unwrap();
    let vm = Running::start(
        "probe.tests=pmi probe.pmi_ms=3000 probe.pmi_period=5000000",
        &[],
    );
    vm.wait_serial("cpus_online", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1000));
    let path = dir.path().join("twice.snap");
    take(&vm, &path, true);
    vm.finish().assert_reset();
    let bytes = std::fs::read(&path).unwrap();
    let (first, second) = (Running::restore(&path, &[]), Running::restore(&path, &[]));
    assert_ne!(first.pid, second.pid);
    for end in [first.finish(), second.finish()] {
        end.assert_reset();
        let results = end.results();
        let p = result(&results, 0, "pmi");
        assert!(p.num("pmis") > 100.0, "{p:?}");
    }
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "a restore wrote to the snapshot"
    );
}

/// A snapshot of a small, quiet probe (it holds 30 s), taken once for the
/// bad-input tests.
fn quiet_snapshot(dir: &Path) -> PathBuf {
    let vm = Running::start("probe.tests=none probe.hold_ms=30000", &[]);
    vm.wait_serial("probe: hold", Duration::from_secs(60));
    let path = dir.join("good.snap");
    take(&vm, &path, true);
    vm.terminate();
    path
}

/// `vmm run --restore path`: exit 2 with one line naming the problem,
/// before any guest output.
fn assert_refused(path: &Path, expected: &str) {
    let o = common::run(&[
        "run",
        "--restore",
        path.to_str().unwrap(),
        "--timeout",
        "20",
    ]);
    common::assert_bad_input(&o, expected);
    assert!(
        common::stdout(&o).is_empty(),
        "the guest ran: {}",
        common::stdout(&o)
    );
}

/// The file's header fields: (state length, memory offset).
fn layout(bytes: &[u8]) -> (usize, usize) {
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
    (u64_at(16), u64_at(32))
}

/// `bytes` with the state replaced by `edit(state)`, checksums made right.
fn with_state(bytes: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let (state_len, memory_offset) = layout(bytes);
    let mut state: Value = serde_json::from_slice(&bytes[4096..4096 + state_len]).unwrap();
    edit(&mut state);
    let json = serde_json::to_vec(&state).unwrap();
    assert!(
        4096 + json.len() <= memory_offset,
        "the edited state must fit"
    );
    let mut out = bytes.to_vec();
    out[4096..memory_offset].fill(0);
    out[4096..4096 + json.len()].copy_from_slice(&json);
    out[16..24].copy_from_slice(&(json.len() as u64).to_le_bytes());
    out[24..28].copy_from_slice(&crc32fast::hash(&json).to_le_bytes());
    let crc = crc32fast::hash(&out[..60]);
    out[60..64].copy_from_slice(&crc.to_le_bytes());
    out
}

#[test]
fn bad_snapshots_are_refused_whole_before_the_guest_runs() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let good = quiet_snapshot(dir.path());
    let bytes = std::fs::read(&good).unwrap();
    let (state_len, memory_offset) = layout(&bytes);
    let write = |name: &str, content: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    };
    let flipped = |at: usize| {
        let mut b = bytes.clone();
        b[at] ^= 0x20;
        b
    };
    // The first data page of guest memory (the probe's code), and a page
    // that is a hole.
    let state: Value = serde_json::from_slice(&bytes[4096..4096 + state_len]).unwrap();
    let runs = state["data_runs"].as_array().unwrap();
    let first_data = num(&runs[0][0]) as usize;
    let hole = (num(&runs[0][0]) + num(&runs[0][1])) as usize;

    assert_refused(&write("empty", b""), "truncated");
    assert_refused(&write("short", &bytes[..memory_offset + 4096]), "truncated");
    assert_refused(&write("text", b"not a snapshot at all"), "truncated");
    assert_refused(&write("magic", &flipped(0)), "not a vmm snapshot");
    assert_refused(&write("header", &flipped(20)), "header is corrupted");
    assert_refused(
        &write("state", &flipped(4096 + state_len / 2)),
        "state is corrupted",
    );
    assert_refused(
        &write("memory", &flipped(memory_offset + first_data + 100)),
        "altered",
    );
    assert_refused(
        &write("hole", &flipped(memory_offset + hole + 8)),
        "altered",
    );
    let mut future = bytes.clone();
    future[8..12].copy_from_slice(&99u32.to_le_bytes());
    let crc = crc32fast::hash(&future[..60]);
    future[60..64].copy_from_slice(&crc.to_le_bytes());
    assert_refused(&write("format", &future), "snapshot format 99");
    let huge = with_state(&bytes, |s| {
        s["config"]["memory_mib"] = Value::from(1u64 << 30);
    });
    assert_refused(&write("huge", &huge), "memory");
    let odd = with_state(&bytes, |s| s["vcpus"] = Value::from(Vec::<Value>::new()));
    assert_refused(&write("no-vcpus", &odd), "vCPUs");
    let fifo = dir.path().join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    assert_refused(&fifo, "FIFO");
    assert_refused(dir.path(), "directory");
    assert_refused(&dir.path().join("missing"), "--restore");
    // The machine is the snapshot's: flags that would change it are refused.
    let o = common::run(&["run", "--restore", good.to_str().unwrap(), "--memory", "64"]);
    common::assert_bad_input(&o, "--memory");
    // And the good one still restores.
    let end = Running::restore(&good, &[]).terminate();
    assert_eq!(end.code, Some(128 + libc::SIGTERM), "{}", end.stderr);
}

#[test]
fn snapshot_requests_that_cannot_be_done_are_refused_and_leave_nothing() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let vm = Running::start("probe.tests=none probe.hold_ms=30000", &[]);
    vm.wait_serial("probe: hold", Duration::from_secs(60));
    let put = |body: &str| api_with_body(&vm.sock, "PUT", "/vm/snapshot", body).unwrap();
    assert_eq!(put(r#"{"path": "relative.snap"}"#).0, 400);
    assert_eq!(put("not json").0, 400);
    assert_eq!(put(r#"{"path": "/tmp/x", "bogus": 1}"#).0, 400);
    assert_eq!(api(&vm.sock, "GET", "/vm/snapshot").unwrap().0, 405);
    let missing_dir = dir.path().join("no/such/dir/x.snap");
    let body = serde_json::json!({ "path": missing_dir }).to_string();
    assert_eq!(put(&body).0, 400);

    // An existing file is kept unless --force.
    let path = dir.path().join("kept.snap");
    std::fs::write(&path, "precious").unwrap();
    let cli = |extra: &[&str]| {
        common::vmm()
            .args(["snapshot", "--api-socket", vm.sock.to_str().unwrap()])
            .args(extra)
            .arg(&path)
            .output()
            .unwrap()
    };
    let o = cli(&[]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    assert!(
        common::stderr(&o).contains("exists"),
        "{}",
        common::stderr(&o)
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    let o = cli(&["--force"]);
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    assert!(
        common::stdout(&o).contains("running again"),
        "{}",
        common::stdout(&o)
    );
    assert!(std::fs::metadata(&path).unwrap().len() > 1 << 20);
    // A directory is never replaced.
    let o = common::vmm()
        .args([
            "snapshot",
            "--force",
            "--api-socket",
            vm.sock.to_str().unwrap(),
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    // No temporary file is left behind, and the VM still runs.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".partial")), "{names:?}");
    assert_eq!(vm.vpmu()["vm"]["paused"], false);
    // Paused by its user, a VM stays paused after a snapshot.
    assert_eq!(api(&vm.sock, "PUT", "/vm/pause").unwrap().0, 200);
    let answer = take(&vm, &dir.path().join("paused.snap"), true);
    assert_eq!(answer["resumed"], false, "{answer}");
    assert_eq!(vm.vpmu()["vm"]["paused"], true);
}
