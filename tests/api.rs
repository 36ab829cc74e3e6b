//! The host-side API end to end: a running probe guest watched through
//! `--api-socket` (GET /vpmu, GET /metrics, pause/resume, totals), under
//! concurrent scrapers and malformed requests, and `vmm stat`.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{num, send_raw, Ended, Running as Vm};
use serde_json::Value;

/// Waits until counter 0 of each of the first `vcpus` vCPUs counted.
fn wait_counting(vm: &Vm, vcpus: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let doc = vm.vpmu();
        if (0..vcpus).all(|vcpu| counted(&doc, vcpu, 0) > 0) {
            return;
        }
        assert!(Instant::now() < deadline, "the counters never ran: {doc}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VM total of the cycles programming in a GET /vpmu document.
fn cycles_total(doc: &Value) -> Option<&Value> {
    doc["totals"]
        .as_array()?
        .iter()
        .find(|t| t["event"] == "cycles")
}

/// `counted` of counter `counter` of vCPU `vcpu`.
fn counted(doc: &Value, vcpu: usize, counter: usize) -> u64 {
    num(&doc["vcpus"][vcpu]["vpmu"]["counters"][counter]["counted"])
}

#[test]
fn export_grows_while_the_guest_counts_and_ends_equal_to_its_readings() {
    require_kvm!();
    let _serial = common::timing_lock();
    // Two vCPUs run the cycles test twice each: four counter contexts of
    // one programming, ended by the probe's PMU reset after each test.
    let vm = Vm::start(
        "probe.tests=cycles,cycles probe.cpus=all probe.cycles_ms=700 probe.hold_ms=4000",
        &["--vcpus", "2"],
    );
    let mut seen: Vec<u64> = Vec::new();
    while !vm.printed("probe: hold") {
        let doc = vm.vpmu();
        if let Some(t) = cycles_total(&doc) {
            seen.push(num(&t["count"]));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "VM totals never go back, across reprogramming: {seen:?}"
    );
    let growth = seen.windows(2).filter(|w| w[0] < w[1]).count();
    assert!(
        growth >= 5,
        "successive reads grew only {growth} times: {seen:?}"
    );

    // The guest holds with its counters cleared: the totals keep what
    // they counted.
    let doc = vm.vpmu();
    let end = vm.finish();
    end.assert_reset();
    let results = end.results();
    let total = cycles_total(&doc).unwrap_or_else(|| panic!("{doc}"));
    let mut sum = 0;
    for cpu in 0..2u32 {
        let readings: Vec<u64> = results
            .iter()
            .filter(|r| r.cpu == cpu && r.test == "cycles")
            .map(|r| r.num("cycles") as u64)
            .collect();
        assert_eq!(readings.len(), 2, "{}", end.stdout);
        assert!(readings.iter().all(|&c| c > 0), "{readings:?}");
        let of_vcpu = total["vcpus"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vcpu"] == cpu)
            .map(|v| num(&v["count"]));
        assert_eq!(
            of_vcpu,
            Some(readings.iter().sum()),
            "vCPU {cpu}: export vs the guest's readings {readings:?}: {total}"
        );
        sum += readings.iter().sum::<u64>();
        assert_eq!(counted(&doc, cpu as usize, 0), 0, "the probe cleared it");
        assert_eq!(
            num(&doc["vcpus"][cpu as usize]["vpmu"]["counters"][0]["value"]),
            0
        );
    }
    assert_eq!(num(&total["count"]), sum, "{total}");
    assert_eq!(num(&total["retired"]), sum, "{total}");
    assert_eq!(
        (num(&total["contexts"]), num(&total["live"])),
        (4, 0),
        "{total}"
    );
    assert!(total["decoded"]["usr"] == true && total["decoded"]["os"] == true);
}

/// Parses Prometheus text with `prometheus_client`'s parser (installed by
/// scripts/ensure-python-deps.sh) into {family: {type, samples}}.
fn parse_prometheus(text: &str) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ensure-python-deps.sh");
    let out = Command::new("bash").arg(&script).output().unwrap();
    assert!(
        out.status.success(),
        "installing prometheus_client failed (the test needs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let python = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let code = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    out[f.name] = {"type": f.type, "samples": [
        {"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
print(json.dumps(out))
"#;
    let mut child = Command::new(&python)
        .args(["-c", code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn samples<'a>(families: &'a Value, family: &str) -> &'a Vec<Value> {
    families[family]["samples"]
        .as_array()
        .unwrap_or_else(|| panic!("no family {family}: {families}"))
}

#[test]
fn totals_survive_guest_reboots() {
    require_kvm!();
    // Each boot counts cycles once, holds with its counters disabled, then
    // resets; with --on-reset reboot the VM boots again and the totals
    // carry on.
    let vm = Vm::start(
        "probe.tests=cycles probe.cycles_ms=50 probe.hold_ms=1500",
        &["--on-reset", "reboot"],
    );
    let holds = |vm: &Vm| {
        vm.serial_lines()
            .iter()
            .filter(|l| l.starts_with("probe: hold"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while holds(&vm) < 2 {
        assert!(Instant::now() < deadline, "no second boot reached its hold");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The second boot holds: its reading and the first boot's are final.
    let doc = vm.vpmu();
    let readings: Vec<u64> = vm
        .serial_lines()
        .iter()
        .filter_map(|l| common::probe_results(l).into_iter().next())
        .filter(|r| r.test == "cycles")
        .map(|r| r.num("cycles") as u64)
        .collect();
    assert_eq!(readings.len(), 2, "{readings:?}");
    let total = cycles_total(&doc).unwrap_or_else(|| panic!("no cycles total: {doc}"));
    assert_eq!(
        num(&total["count"]),
        readings.iter().sum::<u64>(),
        "the VM total is both boots' readings: {total}"
    );
    assert_eq!(num(&total["contexts"]), 2, "{total}");
    let Ended {
        code, stderr: err, ..
    } = vm.terminate();
    assert_eq!(code, Some(128 + 15), "{err}");
    assert!(err.contains("guest reset: reboot 2"), "{err}");
}

#[test]
fn metrics_parse_with_a_prometheus_text_parser() {
    require_kvm!();
    let _serial = common::timing_lock();
    let vm = Vm::start(
        "probe.tests=cycles probe.cpus=all probe.cycles_ms=500 probe.hold_ms=3000",
        &["--vcpus", "2"],
    );
    wait_counting(&vm, 2);
    let (status, running) = common::api(&vm.sock, "GET", "/metrics").unwrap();
    assert_eq!(status, 200);
    vm.wait_serial("probe: hold", Duration::from_secs(30));
    let (status, held) = common::api(&vm.sock, "GET", "/metrics").unwrap();
    assert_eq!(status, 200);
    let end = vm.finish();
    end.assert_reset();

    for text in [&running, &held] {
        let families = parse_prometheus(text);
        // Per counter: labels vcpu, counter, event, for 2 vCPUs x every counter.
        for family in [
            "vmm_vpmu_counter_value",
            "vmm_vpmu_counter_counted",
            "vmm_vpmu_counter_host_enabled_seconds",
            "vmm_vpmu_counter_host_running_seconds",
            "vmm_vpmu_counter_overflows",
            "vmm_vpmu_counter_pmis",
            "vmm_vpmu_counter_backing",
        ] {
            let s = samples(&families, family);
            assert!(s.len() >= 2 * 4, "{family}: {s:?}");
            for sample in s {
                for label in ["vcpu", "counter", "event"] {
                    assert!(sample["labels"][label].is_string(), "{family}: {sample}");
                }
            }
            let vcpus: std::collections::BTreeSet<&str> = s
                .iter()
                .map(|x| x["labels"]["vcpu"].as_str().unwrap())
                .collect();
            assert_eq!(
                vcpus.into_iter().collect::<Vec<_>>(),
                ["0", "1"],
                "{family}"
            );
        }
        assert_eq!(families["vmm_vpmu_counter_counted"]["type"], "counter");
        assert_eq!(families["vmm_vm_vpmu_events"]["type"], "counter");
        for family in [
            "vmm_vpmu_msr_accesses",
            "vmm_vpmu_pmi_deliveries",
            "vmm_vpmu_opens",
        ] {
            assert!(!samples(&families, family).is_empty(), "{family}");
        }
        assert_eq!(samples(&families, "vmm_vm_vpmu_enabled")[0]["value"], 1.0);
    }
    // While the guest counts, cycles are counted and software-backed.
    let families = parse_prometheus(&running);
    let backing = samples(&families, "vmm_vpmu_counter_backing");
    assert!(
        backing
            .iter()
            .any(|s| s["labels"]["event"] == "cycles" && s["labels"]["backing"].is_string()),
        "{backing:?}"
    );
    // Held: the VM total per programming equals what the guests read.
    let families = parse_prometheus(&held);
    let vm_total = samples(&families, "vmm_vm_vpmu_events")
        .iter()
        .find(|s| s["labels"]["event"] == "cycles")
        .unwrap_or_else(|| panic!("{families}"));
    assert!(vm_total["labels"]["id"].as_str().unwrap().starts_with("0x"));
    let guest: f64 = end
        .results()
        .iter()
        .filter(|r| r.test == "cycles")
        .map(|r| r.num("cycles"))
        .sum();
    assert!(guest > 0.0);
    assert_eq!(vm_total["value"].as_f64(), Some(guest), "{vm_total}");
    let per_vcpu: f64 = samples(&families, "vmm_vpmu_events")
        .iter()
        .filter(|s| s["labels"]["event"] == "cycles")
        .map(|s| s["value"].as_f64().unwrap())
        .sum();
    assert_eq!(per_vcpu, guest);
}

#[test]
fn pause_and_resume_through_the_api_stop_and_restart_counting() {
    require_kvm!();
    let _serial = common::timing_lock();
    let vm = Vm::start(
        "probe.tests=cycles probe.cycles_ms=4000 probe.hold_ms=500",
        &[],
    );
    wait_counting(&vm, 1);
    std::thread::sleep(Duration::from_millis(200));
    let (status, body) = common::api(&vm.sock, "PUT", "/vm/pause").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"all_vcpus_parked\": true"), "{body}");
    let at_pause = vm.vpmu();
    assert_eq!(at_pause["vm"]["paused"], true);
    assert_eq!(at_pause["vcpus"][0]["paused"], true);
    std::thread::sleep(Duration::from_millis(800));
    let later = vm.vpmu();
    let (c0, c1) = (counted(&at_pause, 0, 0), counted(&later, 0, 0));
    assert!(c0 > 0);
    assert_eq!(c1, c0, "counted while paused");
    assert_eq!(
        cycles_total(&later).map(|t| num(&t["count"])),
        cycles_total(&at_pause).map(|t| num(&t["count"]))
    );
    let (status, _) = common::api(&vm.sock, "PUT", "/vm/resume").unwrap();
    assert_eq!(status, 200);
    std::thread::sleep(Duration::from_millis(300));
    let resumed = vm.vpmu();
    assert_eq!(resumed["vm"]["paused"], false);
    assert!(
        counted(&resumed, 0, 0) > c1,
        "counting goes on after resume: {} vs {c1}",
        counted(&resumed, 0, 0)
    );
    let end = vm.finish();
    end.assert_reset();
    assert!(end.stdout.contains("test=cycles"), "{}", end.stdout);
}

/// One run of the probe's pmi test, optionally with `scrapers` clients
/// scraping GET /vpmu and GET /metrics back to back for `scrape`. Returns
/// (PMIs the guest handled, cycles the export counted under that
/// programming, the PMI period, requests, failed requests).
fn pmi_run(scrapers: usize, scrape: Duration) -> (f64, f64, f64, u64, u64) {
    let vm = Vm::start("probe.tests=pmi probe.pmi_ms=11000 probe.hold_ms=3000", &[]);
    vm.wait_serial("probe: cpus_online", Duration::from_secs(30));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..scrapers)
        .map(|i| {
            let (sock, ok, failed, stop) =
                (vm.sock.clone(), ok.clone(), failed.clone(), stop.clone());
            std::thread::spawn(move || {
                let path = if i.is_multiple_of(2) {
                    "/vpmu"
                } else {
                    "/metrics"
                };
                while !stop.load(Ordering::Relaxed) {
                    match common::api(&sock, "GET", path) {
                        Ok((200, body)) if !body.is_empty() => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(scrape);
    stop.store(true, Ordering::Relaxed);
    clients.into_iter().for_each(|c| c.join().unwrap());
    vm.wait_serial("probe: hold", Duration::from_secs(60));
    let doc = vm.vpmu();
    let end = vm.finish();
    end.assert_reset();
    let results = end.results();
    let p = common::result(&results, 0, "pmi");
    assert_eq!(p.num("after_disable"), 0.0, "{p:?}");
    assert_eq!(p.num("status_ok"), p.num("pmis"), "{p:?}");
    let counted = num(&cycles_total(&doc).unwrap_or_else(|| panic!("{doc}"))["count"]);
    eprintln!(
        "{scrapers} scrapers: {} PMIs, {counted} cycles counted, period {}, guest tsc {}, \
         steal {} us, {} requests ({} failed)",
        p.num("pmis"),
        p.num("period"),
        p.num("tsc"),
        p.fields.get("steal_us").map(String::as_str).unwrap_or("?"),
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    (
        p.num("pmis"),
        counted as f64,
        p.num("period"),
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    )
}

/// The PMI rate that host load cannot change: PMIs the guest handled per
/// period's worth of guest cycles the VMM counted for it (1.0 = one PMI
/// per period). Wall-clock PMIs per second fall when scrapers take CPU
/// from the vCPU thread on a 2-core host; per counted guest cycle they do
/// not, unless the VMM loses, delays or invents PMIs.
#[test]
fn sixteen_scrapers_for_ten_seconds_leave_the_pmi_rate_alone() {
    require_kvm!();
    let _serial = common::timing_lock();
    let (pmis_quiet, cycles_quiet, period, _, _) = pmi_run(0, Duration::ZERO);
    let (pmis_busy, cycles_busy, _, requests, failed) = pmi_run(16, Duration::from_secs(10));
    assert_eq!(
        failed, 0,
        "every request answered 200 ({requests} answered)"
    );
    assert!(requests >= 160, "only {requests} requests in 10 s");
    let quiet = pmis_quiet / (cycles_quiet / period);
    let busy = pmis_busy / (cycles_busy / period);
    eprintln!("PMIs per period of counted cycles: unscraped {quiet:.4}, scraped {busy:.4}");
    assert!(
        (0.6..=1.05).contains(&quiet),
        "unscraped: {pmis_quiet} PMIs for {cycles_quiet} cycles at period {period}"
    );
    assert!(
        (busy / quiet - 1.0).abs() <= 0.10,
        "scraped rate {busy:.4} vs unscraped {quiet:.4}"
    );
}

#[test]
fn malformed_requests_are_refused_and_the_vmm_keeps_running() {
    require_kvm!();
    // A busy guest and 200 connections: keep it away from the timed tests.
    let _serial = common::timing_lock();
    let vm = Vm::start(
        "probe.tests=cycles probe.cycles_ms=3000 probe.hold_ms=1000",
        &[],
    );
    let sock = vm.sock.clone();
    let refused = |code: Option<u16>| code.is_none_or(|c| (400..500).contains(&c) || c == 503);
    let mut huge_head = b"GET /vpmu HTTP/1.1\r\nX-Big: ".to_vec();
    huge_head.extend(std::iter::repeat_n(b'a', 64 * 1024));
    huge_head.extend(b"\r\n\r\n");
    let many_headers: String = (0..200).map(|i| format!("X-{i}: {i}\r\n")).collect();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let cases: Vec<(&str, Vec<u8>, Option<u16>)> = vec![
        (
            "bad verb",
            b"BREW /vpmu HTTP/1.1\r\n\r\n".to_vec(),
            Some(405),
        ),
        (
            "GET on an action",
            b"GET /vm/pause HTTP/1.1\r\n\r\n".to_vec(),
            Some(405),
        ),
        (
            "unknown path",
            b"GET /etc/passwd HTTP/1.1\r\n\r\n".to_vec(),
            Some(404),
        ),
        ("huge header", huge_head, Some(431)),
        (
            "too many headers",
            format!("GET /vpmu HTTP/1.1\r\n{many_headers}\r\n").into_bytes(),
            None,
        ),
        (
            "huge body",
            b"PUT /vm/resume HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n".to_vec(),
            Some(413),
        ),
        (
            "bad length",
            b"PUT /vm/resume HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
            Some(400),
        ),
        (
            "chunked",
            b"PUT /vm/resume HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            Some(400),
        ),
        ("garbage", garbage, None),
        ("nul bytes", vec![0u8; 300], None),
        (
            "half a request, half-closed",
            b"GET /vpmu HT".to_vec(),
            None,
        ),
        ("nothing, half-closed", Vec::new(), None),
        (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            None,
        ),
    ];
    for (what, raw, expected) in &cases {
        let got = send_raw(&sock, raw);
        assert!(refused(got), "{what}: answered {got:?}");
        if let Some(code) = expected {
            assert_eq!(got, Some(*code), "{what}");
        }
    }
    // 100 connections at once, each sending a request: every one is
    // answered (200, or 503 beyond the connection cap) or dropped.
    let statuses: Vec<Option<u16>> = (0..100)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                send_raw(&sock, b"GET /vpmu HTTP/1.1\r\nConnection: close\r\n\r\n")
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(
        statuses
            .iter()
            .all(|s| matches!(s, None | Some(200) | Some(503))),
        "{statuses:?}"
    );
    assert!(statuses.contains(&Some(200)), "{statuses:?}");
    // 100 silent connections held open: the cap answers the rest 503, and
    // the API serves again once they are gone.
    let silent: Vec<UnixStream> = (0..100)
        .filter_map(|_| UnixStream::connect(&sock).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let crowded = send_raw(&sock, b"GET /vpmu HTTP/1.1\r\n\r\n");
    assert!(
        matches!(crowded, None | Some(503) | Some(200)),
        "{crowded:?}"
    );
    drop(silent);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match common::api(&sock, "GET", "/vpmu") {
            Ok((200, _)) => break,
            other => assert!(
                Instant::now() < deadline,
                "the API did not recover: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let doc = vm.vpmu();
    assert!(doc["vcpus"][0]["vpmu"]["counters"].is_array());
    let end = vm.finish();
    end.assert_reset();
    let results = end.results();
    assert!(common::result(&results, 0, "cycles").num("cycles") > 0.0);
}

fn stat(args: &[&str]) -> std::process::Output {
    common::vmm().arg("stat").args(args).output().unwrap()
}

#[test]
fn vmm_stat_shows_the_counters_per_vcpu_and_total() {
    require_kvm!();
    let _serial = common::timing_lock();
    let vm = Vm::start(
        "probe.tests=cycles probe.cpus=all probe.cycles_ms=3000 probe.hold_ms=500",
        &["--vcpus", "2"],
    );
    let sock = vm.sock.to_str().unwrap().to_string();
    wait_counting(&vm, 2);
    let o = stat(&[
        "--api-socket",
        &sock,
        "--count",
        "1",
        "--json",
        "--interval",
        "200",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    let lines: Vec<&str> = std::str::from_utf8(&o.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let j: Value = serde_json::from_str(lines[0]).unwrap();
    for vcpu in 0..2 {
        let c = &j["vcpus"][vcpu]["counters"][0];
        assert_eq!(c["event"], "cycles", "{j}");
        assert!(num(&c["count"]) > 0, "{c}");
        assert!(c["rate_per_s"].as_f64().unwrap() > 0.0, "{c}");
        assert_eq!(c["running"], true);
        assert!(c["backing"].is_string());
    }
    let total = &j["totals"][0];
    assert_eq!(total["event"], "cycles");
    assert!(total["rate_per_s"].as_f64().unwrap() > 0.0, "{total}");
    assert!(j["interval_ms"].as_u64().unwrap() >= 150);

    let o = stat(&["--api-socket", &sock, "--count", "2", "--interval", "150"]);
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    let text = common::stdout(&o);
    assert_eq!(text.matches("vmm stat ").count(), 2, "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("0  gp0") && l.contains("cycles")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("1  gp0")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("total") && l.contains("cycles")),
        "{text}"
    );
    vm.finish().assert_reset();
}

#[test]
fn vmm_stat_refuses_bad_input_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    common::assert_bad_input(&stat(&["--api-socket", &path("none")]), "no such socket");
    std::fs::write(path("file"), "not a socket").unwrap();
    common::assert_bad_input(&stat(&["--api-socket", &path("file")]), "not a socket");
    drop(UnixListener::bind(path("stale")).unwrap());
    common::assert_bad_input(&stat(&["--api-socket", &path("stale")]), "stale");
    // Sockets served by something else than a vmm.
    for (name, answer) in [
        ("ssh", &b"SSH-2.0-OpenSSH_9.2\r\n"[..]),
        (
            "web",
            b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"hello\": 1}\n",
        ),
        (
            "missing",
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        ),
    ] {
        let listener = UnixListener::bind(path(name)).unwrap();
        let server = std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(answer);
            }
        });
        common::assert_bad_input(
            &stat(&["--api-socket", &path(name)]),
            "not a vmm API socket",
        );
        server.join().unwrap();
    }
    let sock = path("none");
    for (args, expected) in [
        (vec!["--api-socket", &sock, "--interval", "0"], "--interval"),
        (
            vec!["--api-socket", &sock, "--interval", "soon"],
            "--interval",
        ),
        (vec!["--api-socket", &sock, "--count", "0"], "--count"),
        (vec!["--api-socket", &sock, "--count", "-3"], "-3"),
        (vec!["--api-socket", &sock, "--frobnicate"], "--frobnicate"),
        (vec!["--count", "1"], "--api-socket"),
    ] {
        common::assert_bad_input(&stat(&args), expected);
    }
}
