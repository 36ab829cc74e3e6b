//! Robustness and security end to end: hostile guests (the
//! probe's `storm.rs` tests), a failing host (perf_event_open refused
//! through the `VMM_TEST_PERF_FAULT` seam), signal storms, vanished API
//! clients, the event policy as a boundary, guest-only counting, bad input,
//! and resources over every exit path. While the guest misbehaves the tests
//! watch the VMM from outside: the API must answer, CPU, memory, threads
//! and descriptors must stay bounded.
//!
//! Tests that load a CPU or measure time take `common::timing_lock()`.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{num, result, send_raw, Ended, ProbeResult, Running};
use serde_json::Value;

// ---------------------------------------------------------------------------
// A running VMM seen from outside (`common::Running`), and what /proc says.

/// What these tests look at in a running VMM beyond its API.
trait ProcView {
    fn proc(&self) -> Proc;
    fn settled(&self) -> Proc;
    fn thread(&self, name: &str) -> i32;
}

impl ProcView for Running {
    fn proc(&self) -> Proc {
        Proc::of(self.pid)
    }

    /// /proc once the VMM is at rest: the same descriptors and threads in
    /// three samples 50 ms apart, and no API connection thread (one is
    /// named after its parent, "api", until it names itself).
    fn settled(&self) -> Proc {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last: Vec<(usize, usize)> = Vec::new();
        loop {
            let p = self.proc();
            let all = threads(self.pid);
            let conn = all.iter().any(|(_, n)| n == "api-conn");
            last.push((p.fds, all.len()));
            let n = last.len();
            if !conn && n >= 3 && last[n - 3..].iter().all(|&x| x == last[n - 1]) {
                return p;
            }
            assert!(Instant::now() < deadline, "never at rest: {last:?} {all:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The thread id of `name` (e.g. "vcpu0").
    fn thread(&self, name: &str) -> i32 {
        threads(self.pid)
            .into_iter()
            .find(|(_, n)| n == name)
            .unwrap_or_else(|| panic!("no thread {name} in {:?}", threads(self.pid)))
            .0
    }
}

/// (tid, name) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(i32, String)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let tid = e.file_name().to_str()?.parse().ok()?;
        let name = std::fs::read_to_string(e.path().join("comm")).ok()?;
        Some((tid, name.trim().to_string()))
    })
    .collect()
}

/// What /proc says about a VMM process.
#[derive(Clone, Copy, Debug)]
struct Proc {
    fds: usize,
    /// Threads, not counting API connection threads (one per request in
    /// flight, gone with it).
    threads: usize,
    rss_kib: u64,
    cpu: Duration,
    /// Signals queued for this user, all processes (`SigQ`).
    queued_signals: u64,
}

impl Proc {
    fn of(pid: u32) -> Proc {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        // A connection thread is named after its parent ("api") until it
        // names itself: count one "api" thread at most.
        let all = threads(pid);
        let api = all.iter().any(|(_, n)| n == "api") as usize;
        let threads = all
            .iter()
            .filter(|(_, n)| n != "api-conn" && n != "api")
            .count()
            + api;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let queued_signals = status
            .lines()
            .find_map(|l| l.strip_prefix("SigQ:"))
            .and_then(|v| v.trim().split('/').next()?.parse().ok())
            .unwrap_or(0);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the parenthesised name: utime and stime are 14 and 15.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<u64> = after
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
        Proc {
            fds,
            threads,
            rss_kib,
            cpu: Duration::from_millis(ticks * 1000 / hz),
            queued_signals,
        }
    }
}

/// Watches a running VMM from outside: GET /vpmu every `every` (its
/// latency) and /proc, until stopped.
struct Watch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Watched>,
}

#[derive(Debug, Default)]
struct Watched {
    latencies: Vec<Duration>,
    failures: usize,
    samples: Vec<Proc>,
}

impl Watched {
    fn max_latency(&self) -> Duration {
        self.latencies.iter().copied().max().unwrap_or_default()
    }

    fn median_latency(&self) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(l.len() / 2).copied().unwrap_or_default()
    }

    fn range(&self, f: impl Fn(&Proc) -> u64) -> (u64, u64) {
        let values: Vec<u64> = self.samples.iter().map(f).collect();
        (
            values.iter().copied().min().unwrap_or(0),
            values.iter().copied().max().unwrap_or(0),
        )
    }
}

impl Watch {
    fn start(vm: &Running, every: Duration) -> Watch {
        let (sock, pid) = (vm.sock.clone(), vm.pid);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut w = Watched::default();
            while !stopped.load(Ordering::SeqCst) {
                let t0 = Instant::now();
                match common::api(&sock, "GET", "/vpmu") {
                    Ok((200, _)) => w.latencies.push(t0.elapsed()),
                    _ => w.failures += 1,
                }
                w.samples.push(Proc::of(pid));
                std::thread::sleep(every);
            }
            w
        });
        Watch { stop, thread }
    }

    fn stop(self) -> Watched {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// Polls GET /vpmu until `pred` holds (at most `timeout`); returns the
/// document that satisfied it.
fn wait_for(vm: &Running, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let doc = vm.vpmu();
        if pred(&doc) {
            return doc;
        }
        assert!(Instant::now() < deadline, "never {what}: {doc:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn counter(doc: &Value, vcpu: usize, counter: usize) -> &Value {
    &doc["vcpus"][vcpu]["vpmu"]["counters"][counter]
}

fn stats(doc: &Value, vcpu: usize) -> &Value {
    &doc["vcpus"][vcpu]["vpmu"]["stats"]
}

// ---------------------------------------------------------------------------
// Hostile guests.

/// A hostile guest run watched from outside: /proc before and after, the
/// API polled every `every` until the probe holds, the final /vpmu.
struct Storm {
    end: Ended,
    doc: Value,
    watched: Watched,
    before: Proc,
    after: Proc,
    wall: Duration,
}

impl Storm {
    fn run(cmdline: &str, every: Duration) -> Storm {
        let vm = Running::start_with_env(cmdline, &[], &[]);
        let before = vm.proc();
        let started = Instant::now();
        let watch = Watch::start(&vm, every);
        // The storm is over when the probe holds; sample the VMM at rest.
        vm.wait_serial("probe: hold", Duration::from_secs(90));
        let doc = vm.vpmu();
        let watched = watch.stop();
        let (wall, after) = (started.elapsed(), vm.proc());
        let end = vm.finish();
        end.assert_reset();
        Storm {
            end,
            doc,
            watched,
            before,
            after,
            wall,
        }
    }

    fn cpu(&self) -> Duration {
        self.after.cpu.saturating_sub(self.before.cpu)
    }

    /// The VMM answered the API all along, used at most one vCPU's worth of
    /// CPU, and ended with the threads it started with.
    fn assert_vmm_stayed_well(&self) {
        let w = &self.watched;
        eprintln!(
            "{:?}: API GET /vpmu median {:?} max {:?} ({} requests, {} failed), RSS {} -> {} \
             KiB, threads {} -> {}, fds {:?}, VMM CPU {:?}, signals queued {:?}",
            self.wall,
            w.median_latency(),
            w.max_latency(),
            w.latencies.len(),
            w.failures,
            self.before.rss_kib,
            self.after.rss_kib,
            self.before.threads,
            self.after.threads,
            w.range(|p| p.fds as u64),
            self.cpu(),
            w.range(|p| p.queued_signals),
        );
        assert_eq!(w.failures, 0);
        assert!(w.latencies.len() >= 5, "{w:?}");
        assert!(
            w.max_latency() < Duration::from_secs(1),
            "API latency during the storm: {:?}",
            w.max_latency()
        );
        assert!(
            self.cpu().as_secs_f64() <= 1.3 * self.wall.as_secs_f64() + 0.5,
            "one vCPU's worth of CPU at most: {:?} in {:?}",
            self.cpu(),
            self.wall
        );
        assert_eq!(
            self.after.threads, self.before.threads,
            "threads came or went"
        );
        // Overflow signals merge while pending: the host's signal queue
        // stays near empty (it once grew by 80 000 a second until full).
        let (_, queued) = w.range(|p| p.queued_signals);
        assert!(queued < 1000, "signals queued for this user: {queued}");
    }
}

#[test]
fn a_million_msr_accesses_get_hardware_answers_and_the_vmm_stays_well() {
    require_kvm!();
    let _serial = common::timing_lock();
    let storm = Storm::run(
        "probe.tests=msrstorm,detect probe.storm_n=1000000 probe.hold_ms=1500",
        Duration::from_millis(100),
    );
    let r = storm.end.results();
    let s = result(&r, 0, "msrstorm");
    eprintln!("msrstorm: {s:?}");
    common::assert_msr_storm_answered(s, 1_000_000.0);
    assert_eq!(result(&r, 0, "detect").get("msr_probe"), "ok");

    // The VMM stayed responsive, and bounded in CPU, memory, threads and
    // descriptors, while it reprogrammed host events at the guest's rate.
    storm.assert_vmm_stayed_well();
    let (before, after) = (storm.before, storm.after);
    assert!(
        after.rss_kib < before.rss_kib + 2048,
        "RSS grew from {} to {} KiB",
        before.rss_kib,
        after.rss_kib
    );
    let (fd_min, fd_max) = storm.watched.range(|p| p.fds as u64);
    assert!(
        fd_max <= before.fds as u64 + 8 && fd_min + 8 >= before.fds as u64,
        "descriptors {fd_min}..{fd_max}, {} at start",
        before.fds
    );
    let opens = num(&stats(&storm.doc, 0)["opens"]);
    eprintln!("msrstorm: {opens} perf_event_open");
    assert!(
        opens > 10_000,
        "the storm reprogrammed host events: {opens}"
    );
}

#[test]
fn a_pmi_storm_of_period_one_is_throttled_and_the_guest_runs_on() {
    require_kvm!();
    let _serial = common::timing_lock();
    let storm = Storm::run(
        "probe.tests=pmistorm,detect probe.storm_ms=600 probe.hold_ms=300",
        Duration::from_millis(50),
    );
    let r = storm.end.results();
    let p = result(&r, 0, "pmistorm");
    let s = stats(&storm.doc, 0);
    eprintln!("pmistorm: {p:?}; {s}");
    assert!(p.num("pmis") >= 1.0, "{p:?}");
    assert_eq!(
        p.num("nostatus"),
        0.0,
        "every PMI has an overflowed counter: {p:?}"
    );
    assert!(p.num("late") <= 1.0, "{p:?}");
    assert_eq!(p.num("gp") + p.num("handler_gp"), 0.0, "{p:?}");
    assert_eq!(p.num("unexpected_nmis"), 0.0, "{p:?}");
    assert!(p.num("loop_iters") > 0.0, "the guest's own loop ran: {p:?}");
    assert_eq!(result(&r, 0, "detect").get("msr_probe"), "ok");
    // Throttled like host perf: the vCPU's counters share a minimum period
    // of 50 us of thread time, so at most about 20 000 overflow signals per
    // second for the vCPU, however many counters storm (with a minimum per
    // counter, six counters signalled faster than the thread could take
    // the signals).
    assert!(num(&s["throttles"]) > 0, "{s}");
    assert!(p.num("counters") >= 2.0, "{p:?}");
    assert!(
        (num(&s["overflow_signals"]) as f64) < storm.wall.as_secs_f64() * 20_000.0 * 1.2,
        "{s}"
    );
    storm.assert_vmm_stayed_well();
}

#[test]
fn every_reserved_bit_and_every_msr_just_outside_the_model_faults_like_hardware() {
    require_kvm!();
    let rsvd = common::rsvd_mode();
    for model in [
        &[][..],
        &["--vpmu-gp-counters", "2"],
        &["--vpmu-version", "1"],
        &["--vpmu-version", "1", "--vpmu-gp-counters", "4"],
    ] {
        let mut flags = vec!["--vpmu", "on"];
        flags.extend_from_slice(model);
        let (r, _) = common::run_probe(
            &format!("probe.tests=edges,detect probe.rsvd={rsvd}"),
            &flags,
        );
        let e = result(&r, 0, "edges");
        assert!(e.num("checks") > 100.0, "{model:?}: {e:?}");
        assert_eq!(e.num("mismatches"), 0.0, "{model:?}: {e:?}");
        assert_eq!(e.num("kept"), 0.0, "{model:?}: {e:?}");
        let (gp, total) = e.get("outside").split_once('/').unwrap();
        assert!(total.parse::<u32>().unwrap() >= 12, "{model:?}: {e:?}");
        assert_eq!(gp, total, "{model:?}: {e:?}");
        assert_eq!(result(&r, 0, "detect").get("msr_probe"), "ok");
    }
    // The Intel model of each version, whatever the host (tests/intel.rs):
    // every reserved bit faults.
    for version in ["1", "2", "3", "4"] {
        let flags = [
            "--cpu-vendor",
            "intel",
            "--vpmu",
            "on",
            "--vpmu-version",
            version,
        ];
        let (r, _) = common::run_probe("probe.tests=edges probe.rsvd=gp", &flags);
        let e = result(&r, 0, "edges");
        assert_eq!(e.num("mismatches"), 0.0, "Intel v{version}: {e:?}");
        for category in ["outside", "reserved"] {
            let (gp, total) = e.get(category).split_once('/').unwrap();
            assert!(
                total.parse::<u32>().unwrap() >= 36,
                "Intel v{version}: {e:?}"
            );
            assert_eq!(gp, total, "Intel v{version}: {e:?}");
        }
    }
}

#[test]
fn programming_while_pmis_are_in_flight_invents_no_pmi() {
    require_kvm!();
    let _serial = common::timing_lock();
    for model in [
        &[][..],
        &["--vpmu-version", "1", "--vpmu-gp-counters", "4"],
        &["--cpu-vendor", "intel"],
        &["--cpu-vendor", "intel", "--vpmu-version", "1"],
    ] {
        let mut flags = vec!["--vpmu", "on"];
        flags.extend_from_slice(model);
        let (r, o) = common::run_probe("probe.tests=inflight,detect probe.storm_ms=400", &flags);
        let p = result(&r, 0, "inflight");
        eprintln!("inflight {model:?}: {p:?}");
        assert!(p.num("pmis") >= 10.0, "{model:?}: {p:?}");
        assert!(p.num("rounds") >= 10.0, "{model:?}: {p:?}");
        if p.get("global_status") == "1" {
            assert_eq!(
                p.num("nostatus"),
                0.0,
                "a PMI without its status bit: {p:?}"
            );
        }
        assert!(p.num("late") <= 1.0, "{model:?}: {p:?}");
        assert_eq!(p.num("gp") + p.num("handler_gp"), 0.0, "{model:?}: {p:?}");
        assert_eq!(p.num("unexpected_nmis"), 0.0, "{model:?}: {p:?}");
        assert_eq!(result(&r, 0, "detect").get("msr_probe"), "ok");
        // Every round was a new programming: one host event each, no more.
        assert!(
            common::perf_opens(&o, 0) <= p.num("rounds") as u64 * 2 + 8,
            "{}",
            common::stderr(&o)
        );
    }
}

// ---------------------------------------------------------------------------
// A failing host.

#[test]
fn refused_perf_events_are_unbacked_logged_once_and_recover() {
    require_kvm!();
    let _serial = common::timing_lock();
    let dir = tempfile::tempdir().unwrap();
    let fault = dir.path().join("perf-fault");
    std::fs::write(&fault, "ENOENT").unwrap();
    // The guest reprograms its sampling counter about a thousand times a
    // second: every reprogramming is an open the host refuses.
    let vm = Running::start_with_env(
        "probe.tests=inflight,detect probe.storm_ms=6000 probe.hold_ms=200",
        &[],
        &[("VMM_TEST_PERF_FAULT", fault.to_str().unwrap())],
    );
    let backing = |d: &Value| counter(d, 0, 0)["backing"].clone();
    for errno in ["ENOENT", "EACCES", "EMFILE", "EBUSY"] {
        std::fs::write(&fault, errno).unwrap();
        let doc = wait_for(&vm, Duration::from_secs(10), "unbacked", |d| {
            backing(d)["kind"] == "unbacked"
                && backing(d)["reason"].as_str().unwrap().contains(errno)
        });
        let refused = num(&stats(&doc, 0)["open_failures"]);
        // The guest keeps running and reprogramming: more refusals.
        wait_for(&vm, Duration::from_secs(10), "refused again", |d| {
            num(&stats(d, 0)["open_failures"]) > refused + 5
        });
        std::fs::remove_file(&fault).unwrap();
        wait_for(&vm, Duration::from_secs(10), "backed again", |d| {
            backing(d)["kind"] == "software_clock"
        });
    }
    let doc = vm.vpmu();
    let end = vm.finish();
    end.assert_reset();
    let r = end.results();
    let p = result(&r, 0, "inflight");
    assert!(p.num("pmis") > 0.0, "PMIs again once backed: {p:?}");
    assert_eq!(p.num("gp") + p.num("handler_gp"), 0.0, "{p:?}");
    assert_eq!(result(&r, 0, "detect").get("msr_probe"), "ok");
    let s = stats(&doc, 0);
    assert_eq!(
        (num(&s["backing_lost"]), num(&s["backing_recovered"])),
        (4, 4),
        "{s}"
    );
    assert!(num(&s["open_failures"]) > 20, "{s}");
    // One line when the backing is lost and one when it is back, per
    // episode: never one per refused attempt.
    let lost: Vec<&str> = end
        .stderr
        .lines()
        .filter(|l| l.contains("lost its host backing"))
        .collect();
    let back: Vec<&str> = end
        .stderr
        .lines()
        .filter(|l| l.contains("backed by the host again"))
        .collect();
    assert_eq!(lost.len(), 4, "{}", end.stderr);
    assert_eq!(back.len(), 4, "{}", end.stderr);
    for (line, errno) in lost.iter().zip(["ENOENT", "EACCES", "EMFILE", "EBUSY"]) {
        assert!(line.contains(errno) && line.contains("vCPU 0"), "{line}");
    }
    assert!(end.stderr.contains("TEST SEAM VMM_TEST_PERF_FAULT"));
}

#[test]
fn a_panicking_vcpu_thread_stops_the_vm_instead_of_hanging_it() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let fault = dir.path().join("perf-fault");
    std::fs::write(&fault, "panic").unwrap();
    let started = Instant::now();
    let o = common::vmm()
        .args([
            "--vpmu",
            "on",
            "--timeout",
            "60",
            "--cmdline",
            "probe.tests=cycles",
        ])
        .env("VMM_TEST_PERF_FAULT", &fault)
        .output()
        .unwrap();
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.contains("vmm: internal error (a bug): test seam"),
        "{err}"
    );
    assert!(err.contains("vCPU 0 stopped: its thread panicked"), "{err}");
}

fn tgkill(pid: u32, tid: i32, signal: i32) -> bool {
    // SAFETY: tgkill with plain integers; a vanished thread gives ESRCH.
    unsafe { libc::syscall(libc::SYS_tgkill, pid as i32, tid, signal) == 0 }
}

#[test]
fn signal_storms_on_the_vcpu_thread_change_nothing() {
    require_kvm!();
    let _serial = common::timing_lock();
    let vm = Running::start_with_env(
        "probe.tests=pmi,cycles probe.pmi_ms=600 probe.cycles_ms=600 probe.hold_ms=200",
        &[],
        &[],
    );
    let (pid, vcpu) = (vm.pid, vm.thread("vcpu0"));
    let kick = vmm::vcpu::kick::kick_signal();
    let overflow = vmm::vcpu::kick::overflow_signal();
    // About 6 000 signals a second for 2 s: kicks and fake overflow
    // signals at the vCPU thread, kicks and overflow signals at the process
    // (any thread may take those). The overflow signal is SIGIO, whose
    // default action would kill the VMM.
    assert_eq!(overflow, libc::SIGIO);
    let mut sent = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        for signal in [kick, overflow, overflow, kick] {
            sent += tgkill(pid, vcpu, signal) as u32;
        }
        for signal in [kick, overflow] {
            // SAFETY: kill with plain integers.
            sent += (unsafe { libc::kill(pid as i32, signal) } == 0) as u32;
        }
        std::thread::sleep(Duration::from_micros(900));
    }
    let doc = vm.vpmu();
    let end = vm.finish();
    end.assert_reset();
    assert!(sent > 5_000, "{sent} signals");
    let r = end.results();
    let p = result(&r, 0, "pmi");
    eprintln!("signal storm: {sent} signals; {p:?}; {}", stats(&doc, 0));
    // Every PMI the guest got was a real overflow, none after the counter
    // stopped, and about as many as the period asks for.
    assert_eq!(p.num("status_ok"), p.num("pmis"), "{p:?}");
    assert_eq!(p.num("after_disable"), 0.0, "{p:?}");
    assert_eq!(p.num("unexpected_nmis") + p.num("handler_gp"), 0.0, "{p:?}");
    let expected = p.num("expected_run");
    assert!(
        p.num("pmis") <= 1.3 * expected + 2.0 && p.num("pmis") >= 0.5 * expected,
        "{p:?}"
    );
    let c = result(&r, 0, "cycles");
    let ratio = c.num("run_ratio_permille") / 1000.0;
    assert!(
        (0.6..=1.15).contains(&ratio),
        "cycles/(tsc - steal) {ratio:.3}: {c:?}"
    );
    assert!(
        num(&stats(&doc, 0)["overflow_signals"]) > 1000,
        "the signals arrived"
    );
}

#[test]
fn vanished_api_clients_change_nothing() {
    require_kvm!();
    let _serial = common::timing_lock();
    let vm = Running::start_with_env(
        "probe.tests=cycles probe.cycles_ms=1500 probe.hold_ms=500",
        &[],
        &[],
    );
    // Counting (its host events open) before the clients come and go.
    wait_for(&vm, Duration::from_secs(10), "counting", |d| {
        counter(d, 0, 0)["running"].as_bool() == Some(true)
    });
    let before = vm.settled();
    let send = |raw: &[u8]| {
        let mut s = UnixStream::connect(&vm.sock).unwrap();
        let _ = s.write_all(raw);
        s
    };
    let vanish = |rounds: usize| {
        for round in 0..rounds {
            // Half a request, then gone.
            drop(send(b"GET /vpmu HTTP/1.1\r\nHost: v"));
            // A whole request, gone before the answer (the VMM writes into
            // a closed socket: EPIPE, never SIGPIPE).
            drop(send(b"GET /vpmu HTTP/1.1\r\n\r\n"));
            drop(send(b"PUT /vm/resume HTTP/1.1\r\n\r\n"));
            // Connected, silent, gone.
            drop(UnixStream::connect(&vm.sock).unwrap());
            if round % 10 == 0 {
                // A slow reader: reads one byte of the answer and vanishes.
                let mut s = send(b"GET /metrics HTTP/1.1\r\n\r\n");
                let _ = s.read(&mut [0u8; 1]);
            }
        }
        // Every connection thread ends with its client.
        vm.settled()
    };
    let first = vanish(50);
    let t0 = Instant::now();
    let (status, _) = common::api(&vm.sock, "GET", "/vpmu").unwrap();
    assert_eq!(status, 200);
    let latency = t0.elapsed();
    let after = vanish(50);
    let doc = vm.vpmu();
    let end = vm.finish();
    end.assert_reset();
    assert!(latency < Duration::from_secs(1), "{latency:?}");
    for p in [first, after] {
        assert_eq!(
            (p.fds, p.threads),
            (before.fds, before.threads),
            "{before:?} -> {p:?}"
        );
    }
    // Short-lived connection threads leave the allocator a few per-thread
    // arenas (glibc keeps at most 8 per core): bounded, not per client.
    assert!(
        after.rss_kib < before.rss_kib + 4096,
        "RSS {before:?} -> {first:?} -> {after:?}"
    );
    assert_eq!(
        doc["vm"]["paused"], false,
        "a vanished resume paused nothing"
    );
    let results = end.results();
    let c = result(&results, 0, "cycles");
    let ratio = c.num("run_ratio_permille") / 1000.0;
    assert!(
        (0.7..=1.15).contains(&ratio),
        "cycles/(tsc - steal) {ratio:.3}: {c:?}"
    );
}

// ---------------------------------------------------------------------------
// The event policy as a boundary, and guest-only counting.

/// Runs `observe` for `event` under `policy`; returns its line and the
/// final /vpmu document.
/// The events are AMD's (0x76 cycles, 0xc0 retired instructions), so the
/// guest gets the AMD model whatever the host's vendor: on an Intel host
/// (a foreign vendor) cycles are backed by the task clock and other events
/// are unbacked, as on an AMD host without a hardware PMU.
fn observe(policy: &str, event: &str) -> (ProbeResult, Value) {
    let vm = Running::start_with_env(
        &format!("probe.tests=observe probe.storm_event={event} probe.storm_ms=400"),
        &["--vpmu-events", policy, "--cpu-vendor", "amd"],
        &[],
    );
    // While the guest observes: the counter runs, and how it is backed.
    let doc = wait_for(&vm, Duration::from_secs(30), "observing", |d| {
        counter(d, 0, 0)["running"].as_bool() == Some(true)
            && counter(d, 0, 0)["backing"]["kind"] != "idle"
    });
    let end = vm.finish();
    end.assert_reset();
    (result(&end.results(), 0, "observe").clone(), doc)
}

#[test]
fn denied_events_never_reach_the_host_and_look_like_unsupported_ones() {
    require_kvm!();
    let (denied, denied_doc) = observe("all;deny:0x76", "0x76");
    let (unsupported, unsupported_doc) = observe("all", "0xc0");
    let (allowed, _) = observe("all", "0x76");

    // Nothing of a denied event reaches the host: no perf_event_open at
    // all (the vCPU's statistics count every attempt, failed or not).
    let s = stats(&denied_doc, 0);
    assert_eq!(num(&s["opens"]) + num(&s["open_failures"]), 0, "{s}");
    assert_eq!(counter(&denied_doc, 0, 0)["backing"]["kind"], "denied");
    assert_eq!(
        counter(&unsupported_doc, 0, 0)["backing"]["kind"],
        "unbacked"
    );

    // The guest sees the same for both: not counting, no overflow, no PMI,
    // its own programming read back.
    assert_eq!(denied.get("counting"), "0", "{denied:?}");
    for key in [
        "setup",
        "value",
        "counting",
        "select_rest",
        "status",
        "pmis",
    ] {
        assert_eq!(
            denied.get(key),
            unsupported.get(key),
            "{key}: {denied:?} vs {unsupported:?}"
        );
    }
    // The same event allowed counts (the comparison is not vacuous).
    assert_eq!(allowed.get("counting"), "1", "{allowed:?}");

    // `none`: no event at all reaches the host.
    let (r, o) = common::run_probe(
        "probe.tests=cycles,pmi probe.cycles_ms=50 probe.pmi_ms=50",
        &["--vpmu", "on", "--vpmu-events", "none"],
    );
    assert_eq!(result(&r, 0, "cycles").num("cycles"), 0.0);
    assert_eq!(result(&r, 0, "pmi").num("pmis"), 0.0);
    assert_eq!(common::perf_opens(&o, 0), 0, "{}", common::stderr(&o));
}

fn exits_run(delay_us: Option<&str>, scrape: bool) -> ProbeResult {
    let env: Vec<(&str, &str)> = delay_us
        .map(|d| vec![("VMM_TEST_EXIT_DELAY_US", d)])
        .unwrap_or_default();
    let vm = Running::start_with_env(
        "probe.tests=exits probe.storm_exits=200 probe.storm_spin_us=1000",
        &[],
        &env,
    );
    // Heavy scraping: every request makes the vCPU publish a snapshot on
    // its own thread, between an exit and the next entry.
    let watch = scrape.then(|| Watch::start(&vm, Duration::from_millis(1)));
    let end = vm.finish();
    if let Some(w) = watch {
        let w = w.stop();
        eprintln!("exits: {} scrapes during the run", w.latencies.len());
    }
    end.assert_reset();
    if delay_us.is_some() {
        assert!(end.stderr.contains("TEST SEAM VMM_TEST_EXIT_DELAY_US"));
    }
    result(&end.results(), 0, "exits").clone()
}

#[test]
fn vmm_time_on_exits_is_never_counted_as_guest_time() {
    require_kvm!();
    let _serial = common::timing_lock();
    let plain = exits_run(None, false);
    // 200 exits that each keep the vCPU thread busy in the VMM for 2 ms:
    // 400 ms of host CPU time on the vCPU thread against 200 ms of guest
    // busy loops.
    let slow = exits_run(Some("2000"), true);
    eprintln!("exits: plain {plain:?}\nexits: slow VMM {slow:?}");
    // The exits took at least the seam's 2 ms each (a busy host only makes
    // them longer); without the seam they take microseconds.
    let outside_ms = |r: &ProbeResult| r.num("outside_us") / 1000.0;
    assert!(
        outside_ms(&slow) > 390.0,
        "the seam slowed the exits: {:.0} ms",
        outside_ms(&slow)
    );
    assert!(
        outside_ms(&plain) < outside_ms(&slow) / 2.0,
        "plain exits {:.0} ms, slowed {:.0} ms",
        outside_ms(&plain),
        outside_ms(&slow)
    );
    for r in [&plain, &slow] {
        let busy = r.num("busy_run_permille");
        assert!(
            (800.0..=1200.0).contains(&busy),
            "cycles track the busy loops: {r:?}"
        );
    }
    // Counted cycles follow guest time only: the slow run's window is
    // three times longer than its busy loops, its count is not.
    assert!(slow.num("window_permille") < 500.0, "{slow:?}");
}

// ---------------------------------------------------------------------------
// Bad input.

fn bad(args: &[&str], expected: &str) {
    let o = common::run(args);
    common::assert_bad_input(&o, expected);
}

#[test]
fn bad_flag_values_are_one_line_errors_and_leave_nothing_behind() {
    // Values clap refuses before anything starts.
    bad(&["--memory", "-1"], "--memory");
    bad(&["--memory", "1.5"], "invalid value '1.5'");
    bad(&["--memory", "99999999999999999999"], "--memory");
    bad(&["--vcpus", "two"], "invalid value 'two'");
    bad(&["--vcpus", "4294967296"], "--vcpus");
    bad(&["--timeout", "0"], "positive number of seconds");
    bad(&["--timeout", "nan"], "positive number of seconds");
    bad(&["--timeout", "inf"], "positive number of seconds");
    bad(&["--timeout", "1e12"], "positive number of seconds");
    bad(&["--serial", ""], "expected stdio, none or file:PATH");
    bad(&["--serial", "STDIO"], "expected stdio, none or file:PATH");
    bad(&["--vpmu", ""], "--vpmu");
    bad(&["--vpmu-gp-counters", "-1"], "--vpmu-gp-counters");
    bad(&["--vpmu-fixed-counters", "x"], "--vpmu-fixed-counters");
    bad(&["--vpmu-fixed-counters", "256"], "--vpmu-fixed-counters");
    bad(&["--vpmu-version", "-2"], "--vpmu-version");
    bad(&["--vpmu-events", ""], "empty event policy");
    bad(&["--vpmu-events", "ipc;arch"], "more than one preset");
    bad(&["--vpmu-events", "deny:"], "empty entry");
    bad(&["--vpmu-events", "allow:0x76,,0xc0"], "empty entry");
    bad(&["--vpmu-events", "allow:0xc0/0x100"], "larger than 0xff");
    bad(&["--vpmu-events", "allow:cycles"], "is not a number");
    bad(
        &["--on-reset", "never"],
        "invalid value 'never' for '--on-reset",
    );
    // The hidden benchmark flags too.
    bad(&["--bench-msr", "zz"], "expected an MSR index");
    bad(&["--bench-msr", "0x1_0000_0000"], "expected an MSR index");
    bad(
        &["--bench-trace", "/nonexistent/dir/trace.json"],
        "cannot create the benchmark trace /nonexistent/dir/trace.json",
    );
    bad(&["--memory", "64", "--memory", "128"], "--memory");
    bad(&["--kernel"], "--kernel");
    bad(&["--api-socket"], "--api-socket");
    bad(&["start"], "unrecognized subcommand 'start'");
    bad(
        &["run", "--vcpus", "1", "extra"],
        "unexpected argument 'extra'",
    );
    // Not UTF-8.
    use std::os::unix::ffi::OsStrExt;
    let o = common::vmm()
        .arg("--cmdline")
        .arg(std::ffi::OsStr::from_bytes(b"probe.tests=\xff"))
        .output()
        .unwrap();
    common::assert_bad_input(&o, "UTF-8");

    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let path = |name: &str| d.join(name).to_str().unwrap().to_string();
    bad(&["--kernel", ""], "a value is required for '--kernel");
    // AMD has no fixed counters (on an Intel host too, with its model).
    bad(
        &["--vpmu-fixed-counters", "1", "--cpu-vendor", "amd"],
        "impossible vPMU",
    );
    bad(&["--cmdline", &"x".repeat(5000)], "--cmdline is 50");
    bad(
        &["--serial", "file:/nonexistent/dir/out"],
        "cannot create serial output file",
    );
    // The API socket: a directory that does not exist, a path too long
    // for a Unix socket, a file that is not a socket, a socket in use.
    bad(
        &["--api-socket", "/nonexistent/dir/api.sock"],
        "--api-socket /nonexistent/dir/api.sock",
    );
    let long = d.join("x".repeat(120));
    bad(&["--api-socket", long.to_str().unwrap()], "--api-socket");
    std::fs::write(path("file"), "keep").unwrap();
    bad(&["--api-socket", &path("file")], "is not a socket");
    assert_eq!(std::fs::read_to_string(path("file")).unwrap(), "keep");
    let busy = std::os::unix::net::UnixListener::bind(path("busy.sock")).unwrap();
    bad(&["--api-socket", &path("busy.sock")], "already serving");
    drop(busy);
    std::fs::remove_file(path("busy.sock")).unwrap();
    // Bad input found after the socket was bound (the serial file is
    // created after it): the socket goes too.
    let sock = path("late.sock");
    bad(
        &[
            "--api-socket",
            &sock,
            "--serial",
            "file:/nonexistent/dir/out",
        ],
        "cannot create serial output file",
    );
    assert!(!Path::new(&sock).exists(), "the socket was left behind");
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("file")],
        "nothing else was created"
    );
}

#[test]
fn every_api_request_with_a_bad_method_path_or_form_gets_a_4xx() {
    require_kvm!();
    let vm = Running::start_with_env(
        "probe.tests=cycles probe.cycles_ms=1000 probe.hold_ms=300",
        &[],
        &[],
    );
    let mut cases: Vec<(String, Option<u16>)> = Vec::new();
    // Every method on every resource: only GET reads, only PUT acts.
    for method in [
        "GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS", "get",
    ] {
        for (path, allowed) in [
            ("/vpmu", "GET"),
            ("/metrics", "GET"),
            ("/vm/pause", "PUT"),
            ("/vm/resume", "PUT"),
        ] {
            if method == allowed || (method, path) == ("PUT", "/vm/pause") {
                continue; // pausing is tested below
            }
            cases.push((format!("{method} {path} HTTP/1.1\r\n\r\n"), Some(405)));
        }
    }
    for path in [
        "/",
        "/vpmu/",
        "/VPMU",
        "/vpmu/../metrics",
        "/vm",
        "/vm/pause/now",
        "/vm/reset",
        "//vpmu",
        "/metrics%00",
        "*",
    ] {
        cases.push((format!("GET {path} HTTP/1.1\r\n\r\n"), Some(404)));
    }
    let long_path = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(15_000));
    cases.extend([
        (long_path, Some(404)),
        ("GET /vpmu HTTP/3.0\r\n\r\n".into(), Some(400)),
        ("GET /vpmu HTTP/1.1\r\nNo-Colon\r\n\r\n".into(), Some(400)),
        ("GET  /vpmu HTTP/1.1\r\n\r\n".into(), Some(400)),
        ("GET /vpmu\r\n\r\n".into(), Some(400)),
        (
            "PUT /vm/resume HTTP/1.1\r\nContent-Length: 1x\r\n\r\n".into(),
            Some(400),
        ),
        (
            "PUT /vm/resume HTTP/1.1\r\nContent-Length: 4097\r\n\r\n".into(),
            Some(413),
        ),
    ]);
    // Accepted forms that must not misbehave: a query string, HTTP/1.0, a
    // small ignored body, resume without pause.
    cases.extend([
        ("GET /vpmu?x=1&y HTTP/1.1\r\n\r\n".into(), Some(200)),
        ("GET /metrics HTTP/1.0\r\n\r\n".into(), Some(200)),
        (
            "GET /vpmu HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".into(),
            Some(200),
        ),
        ("PUT /vm/resume HTTP/1.1\r\n\r\n".into(), Some(200)),
    ]);
    let mut wrong = BTreeMap::new();
    for (raw, expected) in &cases {
        let got = send_raw(&vm.sock, raw.as_bytes());
        if got != *expected {
            wrong.insert(raw.chars().take(60).collect::<String>(), (got, *expected));
        }
    }
    assert!(
        wrong.is_empty(),
        "unexpected answers (got, expected): {wrong:#?}"
    );
    // Pausing twice, resuming twice: idempotent.
    for _ in 0..2 {
        let (status, body) = common::api(&vm.sock, "PUT", "/vm/pause").unwrap();
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(vm.vpmu()["vm"]["paused"], true);
    for _ in 0..2 {
        assert_eq!(common::api(&vm.sock, "PUT", "/vm/resume").unwrap().0, 200);
    }
    assert_eq!(vm.vpmu()["vm"]["paused"], false);
    let end = vm.finish();
    end.assert_reset();
    assert!(result(&end.results(), 0, "cycles").num("cycles") > 0.0);
}

// ---------------------------------------------------------------------------
// Resources over every exit path.

/// This process's descriptors that a VM owns (KVM, perf, eventfds,
/// sockets, epoll), by number with their target.
fn vm_descriptors() -> BTreeMap<i32, String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let target = target.to_string_lossy().into_owned();
            let owned = [
                "kvm",
                "perf_event",
                "eventfd",
                "socket:",
                "eventpoll",
                "/dev/kvm",
            ];
            owned
                .iter()
                .any(|k| target.contains(k))
                .then_some((fd, target))
        })
        .collect()
}

/// Threads of this process a VM starts.
fn vm_threads() -> Vec<String> {
    threads(std::process::id())
        .into_iter()
        .map(|(_, n)| n)
        .filter(|n| n.starts_with("vcpu") || n.starts_with("api"))
        .collect()
}

/// `vmm` run in this process (`vmm::cli::main_with_args`); returns its exit
/// code.
fn in_process(args: &[&str]) -> i32 {
    vmm::cli::main_with_args(std::iter::once("vmm").chain(args.iter().copied()))
}

#[test]
fn fifty_runs_over_every_exit_path_leak_no_descriptor_thread_or_socket() {
    require_kvm!();
    let _serial = common::timing_lock();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let sock_s = sock.to_str().unwrap().to_string();
    let triple = common::build_guest("triple_fault");
    let hang = common::build_guest("hang");
    let (triple, hang) = (triple.to_str().unwrap(), hang.to_str().unwrap());
    let fds_before = vm_descriptors();
    let mut codes = BTreeMap::new();
    for round in 0..50 {
        let serial = ["--serial", "none", "--api-socket", &sock_s];
        let code = match round % 10 {
            // The guest resets (the probe, with the vPMU counting).
            0..=2 => in_process(
                &[
                    &serial[..],
                    &[
                        "--vpmu",
                        "on",
                        "--cmdline",
                        "probe.tests=cycles,pmi probe.cycles_ms=20 probe.pmi_ms=20",
                    ],
                ]
                .concat(),
            ),
            // The guest stops abnormally (triple fault).
            3 => in_process(&[&serial[..], &["--kernel", triple]].concat()),
            // --timeout.
            4 => in_process(&[&serial[..], &["--kernel", hang, "--timeout", "0.2"]].concat()),
            // Bad input found late, after KVM, memory and the socket.
            5 => in_process(
                &[
                    &serial[..2],
                    &["--api-socket", &sock_s, "--serial", "file:/nonexistent/x"],
                ]
                .concat(),
            ),
            // Bad input found early.
            6 => in_process(&[&serial[..], &["--vpmu-version", "9"]].concat()),
            // The guest resets and boots again in a fresh VM, again and
            // again, until --timeout.
            7 => in_process(
                &[
                    &serial[..],
                    &["--vpmu", "on", "--on-reset", "reboot", "--timeout", "0.8"],
                    &["--cmdline", "probe.tests=cycles probe.cycles_ms=10"],
                ]
                .concat(),
            ),
            // Two vCPUs, the guest resets.
            8 => in_process(
                &[
                    &serial[..],
                    &[
                        "--vcpus",
                        "2",
                        "--cmdline",
                        "probe.tests=detect probe.cpus=all",
                    ],
                ]
                .concat(),
            ),
            // SIGTERM (to this process: the VMM's handler takes it).
            _ => {
                let path = sock.clone();
                let killer = std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while common::api(&path, "GET", "/vpmu").is_err() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    // SAFETY: signals this process; the VMM's SIGTERM handler runs.
                    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                });
                let code = in_process(
                    &[
                        &serial[..],
                        &[
                            "--vpmu",
                            "on",
                            "--cmdline",
                            "probe.tests=cycles probe.cycles_ms=5000",
                        ],
                    ]
                    .concat(),
                );
                killer.join().unwrap();
                code
            }
        };
        *codes.entry(code).or_insert(0) += 1;
        assert!(
            !sock.exists(),
            "round {round}: the API socket was left behind"
        );
        assert_eq!(
            vm_threads(),
            Vec::<String>::new(),
            "round {round}: threads left"
        );
        assert_eq!(
            vm_descriptors(),
            fds_before,
            "round {round} (exit {code}): descriptors left"
        );
    }
    assert_eq!(codes.get(&0), Some(&20), "{codes:?}");
    assert_eq!(codes.get(&1), Some(&5), "{codes:?}");
    assert_eq!(codes.get(&3), Some(&10), "{codes:?}");
    assert_eq!(codes.get(&2), Some(&10), "{codes:?}");
    assert_eq!(codes.get(&(128 + libc::SIGTERM)), Some(&5), "{codes:?}");

    // And ten real processes, ended every way, with a process-level view:
    // each one gone (reaped), its socket removed, no child of its own.
    for round in 0..10 {
        let mut child = common::vmm()
            .args(["--serial", "none", "--vpmu", "on", "--api-socket", &sock_s])
            .args(["--cmdline", "probe.tests=cycles probe.cycles_ms=3000"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        common::wait_for_api(&sock);
        let pid = child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        assert!(
            children.trim().is_empty(),
            "the VMM started processes: {children}"
        );
        let signal = [libc::SIGTERM, libc::SIGINT][round % 2];
        // SAFETY: signals our own child.
        unsafe { libc::kill(pid as i32, signal) };
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(128 + signal));
        assert!(!sock.exists(), "socket left after signal {signal}");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} left"
        );
    }
    assert_eq!(vm_descriptors(), fds_before);

    // Within one process: reboot after reboot (a fresh VM each time), the
    // VMM's descriptors and threads stay where they were.
    let child = common::vmm()
        .args(["--serial", "none", "--vpmu", "on", "--on-reset", "reboot"])
        .args(["--cmdline", "probe.tests=cycles probe.cycles_ms=10"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(300));
    let samples: Vec<Proc> = (0..30)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            Proc::of(pid)
        })
        .collect();
    // SAFETY: signals our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(128 + libc::SIGTERM), "{err}");
    let reboots = err.matches("guest reset: reboot").count();
    let fds: Vec<usize> = samples.iter().map(|p| p.fds).collect();
    let threads: Vec<usize> = samples.iter().map(|p| p.threads).collect();
    eprintln!("{reboots} reboots; descriptors {fds:?}; threads {threads:?}");
    assert!(reboots >= 5, "{err}");
    let (min, max) = (fds.iter().min().unwrap(), fds.iter().max().unwrap());
    assert!(
        max - min <= 10,
        "descriptors {fds:?} over {reboots} reboots"
    );
    assert!(threads.iter().all(|&t| t <= 3), "threads {threads:?}");
}
