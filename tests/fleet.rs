//! A host's fleet: `vmm run --name`, `vmm exporter` scraped by a real
//! Prometheus (Debian's, from `scripts/ensure-tool.sh prometheus`), VMs that go
//! down or appear, hostile clients of the exporter, and `vmm top`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{api, num, vmm, wait_for_api};
use serde_json::Value;

/// A probe guest counting cycles for a long while, API socket in `dir`.
struct Guest {
    child: Child,
    sock: PathBuf,
}

impl Guest {
    fn start(dir: &Path, file: &str, name: Option<&str>) -> Guest {
        let sock = dir.join(file);
        let mut cmd = vmm();
        cmd.args(["--vpmu", "on", "--serial", "none", "--timeout", "150"])
            .args(["--cmdline", "probe.tests=cycles probe.cycles_ms=140000"])
            .arg("--api-socket")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(name) = name {
            cmd.args(["--name", name]);
        }
        let child = cmd.spawn().unwrap();
        wait_for_api(&sock);
        Guest { child, sock }
    }

    fn vpmu(&self) -> Value {
        let (status, body) = api(&self.sock, "GET", "/vpmu").expect("GET /vpmu");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The VM total of its cycles programming.
    fn cycles(&self) -> u64 {
        cycles_of(&self.vpmu())
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Stops the VMM with SIGTERM; its stderr.
    fn stop(mut self) -> String {
        self.signal("-TERM");
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        self.child.wait().unwrap();
        err
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cycles_of(doc: &Value) -> u64 {
    doc["totals"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["event"] == "cycles"))
        .map_or(0, |t| num(&t["count"]))
}

/// Waits until every guest counted some cycles.
fn wait_counting(guests: &[&Guest]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !guests.iter().all(|g| g.cycles() > 0) {
        assert!(Instant::now() < deadline, "the guests never counted");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running `vmm exporter` on a loopback port of its own.
struct Exporter {
    child: Child,
    addr: String,
}

impl Exporter {
    fn start(dir: &Path, extra: &[&str]) -> Exporter {
        let mut child = vmm()
            .args(["exporter", "--listen", "127.0.0.1:0", "--sockets"])
            .arg(dir)
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let line = lines.next().unwrap().unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        // Keep draining stderr so the exporter never blocks on it.
        std::thread::spawn(move || lines.for_each(drop));
        Exporter { child, addr }
    }

    /// `GET /metrics`: status, body and how long it took.
    fn scrape(&self) -> (u16, String, Duration) {
        let start = Instant::now();
        let (status, body) = http(
            &self.addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        (status, body, start.elapsed())
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `raw` to `addr`, reads to the end: status (0: none) and body.
fn http(addr: &str, raw: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(raw);
    // One answer, to its Content-Length (a server may keep the connection
    // open after it), else to the connection's end.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let whole = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .and_then(|head| {
                let length = String::from_utf8_lossy(&answer[..head])
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })?;
                Some(answer.len() >= head + 4 + length)
            });
        if whole == Some(true) {
            break;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample whose line starts with `series` (name and
/// labels as printed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn names_are_checked_shown_in_the_log_and_in_get_vpmu() {
    require_kvm!();
    // Its guests would load the cores under the Prometheus test's window.
    let _serial = common::timing_lock();
    let bad = common::run(&["run", "--name", "no spaces"]);
    common::assert_bad_input(&bad, "--name");
    let long = "x".repeat(65);
    common::assert_bad_input(&common::run(&["--name", &long]), "at most 64");
    let dir = tempfile::tempdir().unwrap();
    let named = Guest::start(dir.path(), "a.sock", Some("web-1"));
    let plain = Guest::start(dir.path(), "db.2.sock", None);
    assert_eq!(named.vpmu()["vm"]["name"], "web-1");
    assert_eq!(plain.vpmu()["vm"]["name"], "db.2");
    assert!(named.stop().lines().any(|l| l == "vmm: VM web-1"));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Prometheus server scraping `target` every second.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(binary: &Path, target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  \
                 - job_name: vmm\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(&p.addr).is_err()
            || http(&p.addr, b"GET /-/ready HTTP/1.0\r\n\r\n").0 != 200
        {
            assert!(Instant::now() < deadline, "Prometheus never got ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// An instant query at `time` (Unix seconds): each result's `vm` label
    /// (or "") and value.
    fn query(&self, promql: &str, time: f64) -> Vec<(String, f64)> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let request = format!("GET /api/v1/query?query={encoded}&time={time:.3} HTTP/1.0\r\n\r\n");
        let (status, body) = http(&self.addr, request.as_bytes());
        assert_eq!(status, 200, "{promql}: {body}");
        let doc: Value = serde_json::from_str(&body).unwrap();
        doc["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let vm = r["metric"]["vm"].as_str().unwrap_or_default().to_string();
                (vm, r["value"][1].as_str().unwrap().parse().unwrap())
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn a_real_prometheus_sees_every_guests_counters_as_each_vm_reports_them() {
    require_kvm!();
    let Some(binary) = common::ensure_tool("prometheus") else {
        return;
    };
    let _serial = common::timing_lock();
    let dir = tempfile::tempdir().unwrap();
    let names = ["web-1", "web-2", "db"];
    let guests: Vec<Guest> = names
        .iter()
        .map(|n| Guest::start(dir.path(), &format!("{n}.sock"), Some(n)))
        .collect();
    wait_counting(&guests.iter().collect::<Vec<_>>());
    let exporter = Exporter::start(dir.path(), &[]);
    let prometheus = Prometheus::start(&binary, &exporter.addr);
    // Once Prometheus holds samples of every VM (its first scrape comes
    // when it chooses), read every VM at the window's start and end.
    let deadline = Instant::now() + Duration::from_secs(60);
    while prometheus.query("vmm_exporter_vm_up", unix_now()).len() < names.len() {
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped every VM"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_secs(2));
    // Prometheus stamps a sample when its scrape starts and extrapolates
    // `increase` to the window's ends; the VMs' own readings come a little
    // later. A long window keeps that jitter (0.5 s seen at load 6-9 on two
    // cores: 5.9% of an 8 s window) well inside the 5% bound.
    let window = 20.0;
    let (t0, before) = (
        unix_now(),
        guests.iter().map(Guest::cycles).collect::<Vec<_>>(),
    );
    std::thread::sleep(Duration::from_secs_f64(window));
    let (t1, after) = (
        unix_now(),
        guests.iter().map(Guest::cycles).collect::<Vec<_>>(),
    );
    // Let Prometheus take the scrape after t1.
    std::thread::sleep(Duration::from_secs(3));
    let promql = format!(
        "increase(vmm_vm_vpmu_events_total{{event=\"cycles\"}}[{}ms])",
        ((t1 - t0) * 1000.0) as u64
    );
    let increases = prometheus.query(&promql, t1);
    for (i, name) in names.iter().enumerate() {
        let own = (after[i] - before[i]) as f64;
        let seen = increases
            .iter()
            .find(|(vm, _)| vm == name)
            .unwrap_or_else(|| panic!("{name} not in {increases:?}"))
            .1;
        assert!(own > 0.0, "{name} did not count");
        let off = (seen - own).abs() / own;
        assert!(
            off <= 0.05,
            "{name}: Prometheus {seen}, GET /vpmu {own} ({:.1}% off)",
            off * 100.0
        );
    }
    let up = prometheus.query("up{job=\"vmm\"}", t1);
    assert_eq!(up.iter().map(|u| u.1).collect::<Vec<_>>(), [1.0], "{up:?}");
    let mut vm_up = prometheus.query("vmm_exporter_vm_up", t1);
    vm_up.sort_by(|a, b| a.0.cmp(&b.0));
    let expected: Vec<(String, f64)> = ["db", "web-1", "web-2"]
        .map(|n| (n.to_string(), 1.0))
        .into();
    assert_eq!(vm_up, expected);
}

/// `vmm_exporter_vm_up` of VM `vm` in a scrape.
fn vm_up(text: &str, vm: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(&format!("vmm_exporter_vm_up{{vm=\"{vm}\","))?;
        rest.rsplit_once(' ')?.1.parse().ok()
    })
}

#[test]
fn stopped_killed_and_stale_vms_are_down_within_the_bound_and_new_ones_picked_up() {
    require_kvm!();
    // Its guests would load the cores under the Prometheus test's window.
    let _serial = common::timing_lock();
    let dir = tempfile::tempdir().unwrap();
    let a = Guest::start(dir.path(), "a.sock", None);
    let b = Guest::start(dir.path(), "b.sock", None);
    wait_counting(&[&a, &b]);
    drop(UnixListener::bind(dir.path().join("stale.sock")).unwrap());
    let bound = Duration::from_millis(600);
    let exporter = Exporter::start(
        dir.path(),
        &["--vm-timeout", "300", "--scrape-timeout", "600"],
    );
    let (status, text, _) = exporter.scrape();
    assert_eq!(status, 200);
    assert_eq!(
        (vm_up(&text, "a"), vm_up(&text, "b")),
        (Some(1.0), Some(1.0)),
        "{text}"
    );
    assert_eq!(vm_up(&text, "stale"), Some(0.0), "{text}");
    // b stopped (SIGSTOP: its API accepts nothing), a gone.
    b.signal("-STOP");
    drop(a);
    // The host's own measure of an exporter answer without VMs, now.
    let start = Instant::now();
    assert_eq!(http(&exporter.addr, b"GET / HTTP/1.0\r\n\r\n").0, 200);
    let plain = start.elapsed();
    let (status, text, took) = exporter.scrape();
    assert_eq!(status, 200);
    assert!(
        took <= bound + plain + Duration::from_millis(400),
        "{took:?} (plain answer {plain:?})"
    );
    let own = sample(&text, "vmm_exporter_scrape_seconds").unwrap();
    assert!(own <= bound.as_secs_f64() * 1.1, "{own}");
    assert_eq!(
        (vm_up(&text, "b"), vm_up(&text, "stale")),
        (Some(0.0), Some(0.0)),
        "{text}"
    );
    assert!(
        !text.contains("vm=\"b\",vcpu"),
        "no series of a down VM: {text}"
    );
    assert_eq!(
        sample(&text, "vmm_exporter_errors_total{kind=\"timeout\"}"),
        Some(1.0),
        "{text}"
    );
    // A new VM is found at the next scrape.
    assert_eq!(
        vm_up(&text, "a"),
        Some(0.0),
        "killed: its socket is stale: {text}"
    );
    let c = Guest::start(dir.path(), "c.sock", Some("late"));
    wait_counting(&[&c]);
    let (_, text, _) = exporter.scrape();
    assert_eq!(vm_up(&text, "late"), Some(1.0), "{text}");
    assert!(
        text.contains("vmm_vm_vpmu_events_total{vm=\"late\",event=\"cycles\""),
        "{text}"
    );
    b.signal("-CONT");
    let (_, text, _) = exporter.scrape();
    assert_eq!(vm_up(&text, "b"), Some(1.0), "resumed: {text}");
}

#[test]
fn hostile_clients_and_a_cluttered_directory_never_stop_the_exporter() {
    require_kvm!();
    // Its guests would load the cores under the Prometheus test's window.
    let _serial = common::timing_lock();
    let dir = tempfile::tempdir().unwrap();
    let guest = Guest::start(dir.path(), "vm.sock", Some("real"));
    // Thousands of other files and sockets of other programs: one that
    // never answers, one that answers garbage.
    for i in 0..3000 {
        std::fs::write(dir.path().join(format!("file{i}")), "x").unwrap();
    }
    let _silent = UnixListener::bind(dir.path().join("silent.sock")).unwrap();
    let garbage = UnixListener::bind(dir.path().join("garbage.sock")).unwrap();
    std::thread::spawn(move || {
        for mut c in garbage.incoming().flatten() {
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\n\r\n{\"not\": \"a vmm\"}");
        }
    });
    let exporter = Exporter::start(dir.path(), &[]);
    let addr = exporter.addr.clone();
    let answer = |raw: &[u8]| http(&addr, raw).0;
    assert_eq!(
        answer(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
        405
    );
    assert_eq!(answer(b"DELETE / HTTP/1.1\r\n\r\n"), 405);
    for path in [
        "/metrics/../etc/passwd",
        "//metrics",
        "/%6detrics",
        "/vpmu",
        "/metrics/",
    ] {
        assert_eq!(
            answer(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes()),
            404,
            "{path}"
        );
    }
    assert_eq!(answer(b"\x00\x01garbage\r\n\r\n"), 400);
    let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1 << 20));
    assert_eq!(answer(&huge), 431);
    assert_eq!(
        answer(b"GET /metrics HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
        413
    );
    // Slow clients holding every connection: a prompt scrape still works.
    let slow: Vec<TcpStream> = (0..80)
        .filter_map(|_| {
            let mut s = TcpStream::connect(&addr).ok()?;
            s.write_all(b"GET /metr").ok()?;
            Some(s)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let (status, text, _) = exporter.scrape();
    assert_eq!(status, 200, "{text}");
    assert_eq!(vm_up(&text, "real"), Some(1.0), "{text}");
    assert_eq!(
        (vm_up(&text, "silent"), vm_up(&text, "garbage")),
        (Some(0.0), Some(0.0))
    );
    assert_eq!(sample(&text, "vmm_exporter_vms_seen"), Some(3.0), "{text}");
    assert!(
        text.contains("vmm_vm_vpmu_events_total{vm=\"real\""),
        "{text}"
    );
    drop(slow);
    drop(guest);
}

#[test]
fn exporter_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, "").unwrap();
    let run = |args: &[&str]| common::run(&[&["exporter"], args].concat());
    common::assert_bad_input(
        &run(&["--sockets", file.to_str().unwrap()]),
        "not a directory",
    );
    common::assert_bad_input(&run(&["--sockets", "/nonexistent/x"]), "--sockets");
    let d = dir.path().to_str().unwrap();
    common::assert_bad_input(&run(&["--sockets", d, "--listen", "nope"]), "--listen");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    common::assert_bad_input(&run(&["--sockets", d, "--listen", &addr]), "--listen");
    let order = [
        "--sockets",
        d,
        "--vm-timeout",
        "900",
        "--scrape-timeout",
        "500",
    ];
    common::assert_bad_input(&run(&order), "--vm-timeout");
}

#[test]
fn top_shows_every_vm_live_under_tmux_and_q_quits_with_0() {
    require_kvm!();
    // Its guests would load the cores under the Prometheus test's window.
    let _serial = common::timing_lock();
    if common::ensure_tool("tmux").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = ["alpha", "bravo", "charlie"];
    let guests: Vec<Guest> = names
        .iter()
        .map(|n| Guest::start(dir.path(), &format!("{n}.sock"), None))
        .collect();
    wait_counting(&guests.iter().collect::<Vec<_>>());
    let server = dir.path().join("tmux.server");
    let status = dir.path().join("status");
    let command = format!(
        "{} top --sockets {} --interval 500; echo $? > {}",
        env!("CARGO_BIN_EXE_vmm"),
        dir.path().display(),
        status.display()
    );
    let new = common::tmux(
        &server,
        &["new-session", "-d", "-x", "120", "-y", "20", &command],
    );
    assert!(new.status.success(), "{new:?}");
    // Each VM's row with a cycle rate (a figure with a unit: G, M or k).
    let deadline = Instant::now() + Duration::from_secs(20);
    let pane = loop {
        let pane = String::from_utf8_lossy(&common::tmux(&server, &["capture-pane", "-p"]).stdout)
            .into_owned();
        let counting = |n: &str| {
            pane.lines().any(|l| {
                let cells: Vec<&str> = l
                    .trim_matches(|c: char| !c.is_alphanumeric())
                    .split_whitespace()
                    .collect();
                cells.first() == Some(&n)
                    && cells.get(3).is_some_and(|u| ["G", "M", "k"].contains(u))
            })
        };
        if names.iter().all(|n| counting(n)) {
            break pane;
        }
        assert!(
            Instant::now() < deadline,
            "no live rows for every VM:\n{pane}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        pane.contains("cycles/s/vCPU") && pane.contains("running"),
        "{pane}"
    );
    common::tmux(&server, &["send-keys", "q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !status.exists() {
        assert!(Instant::now() < deadline, "q did not end vmm top");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read_to_string(&status).unwrap().trim(), "0");
    let _ = common::tmux(&server, &["kill-server"]);
    // The plain mode, for scripts.
    let once = common::run(&[
        "top",
        "--sockets",
        dir.path().to_str().unwrap(),
        "--once",
        "--interval",
        "300",
    ]);
    assert_eq!(once.status.code(), Some(0), "{once:?}");
    let text = common::stdout(&once);
    for n in names {
        assert!(
            text.lines()
                .any(|l| l.starts_with(n) && l.contains("running")),
            "{text}"
        );
    }
}
