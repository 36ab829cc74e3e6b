//! Shared helpers for the end-to-end tests: the `vmm` binary, a KVM check
//! that skips with a reason, and small assembly guests built with `cc`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The `vmm` binary under test.
pub fn vmm() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.stdin(Stdio::null());
    cmd
}

/// Whether /dev/kvm can be used; prints why a test skips when not.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            // CI has /dev/kvm: there a missing one is a failure, not a skip.
            assert!(
                std::env::var_os("VMM_REQUIRE_KVM").is_none(),
                "{test}: /dev/kvm is not usable ({e}) and VMM_REQUIRE_KVM is set"
            );
            eprintln!("skipped {test}: /dev/kvm is not usable here ({e})");
            false
        }
    }
}

/// Skips the calling test (returns early) when KVM is unavailable.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !common::kvm_available(module_path!()) {
            return;
        }
    };
}

/// Builds `tests/guests/<name>.S` into an ELF linked at 2 MiB.
pub fn build_guest(name: &str) -> PathBuf {
    build_guest_as(name, &[], &[])
}

/// Builds `tests/guests/<name>.S` into a 32-bit i386 ELF linked at 2 MiB
/// (a Multiboot kernel).
pub fn build_guest32(name: &str) -> PathBuf {
    build_guest_as(name, &["-m32"], &["-m", "elf_i386"])
}

/// Builds `tests/guests/<name>.S` with extra assembler and linker flags.
fn build_guest_as(name: &str, cc_flags: &[&str], ld_flags: &[&str]) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/guests")
        .join(format!("{name}.S"));
    let dir = std::env::temp_dir().join(format!("vmm-test-guests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let obj = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    let status = Command::new("cc")
        .args(cc_flags)
        .args(["-c", "-o"])
        .arg(&obj)
        .arg(&src)
        .status()
        .expect("running cc");
    assert!(status.success(), "assembling {}", src.display());
    let status = Command::new("ld")
        .args(ld_flags)
        .args([
            "-static",
            "-nostdlib",
            "-Ttext=0x200000",
            "-e",
            "_start",
            "-o",
        ])
        .arg(&elf)
        .arg(&obj)
        .status()
        .expect("running ld");
    assert!(status.success(), "linking {}", obj.display());
    elf
}

/// Runs `vmm` with `args` and returns its output.
pub fn run(args: &[&str]) -> Output {
    vmm().args(args).output().expect("running vmm")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a one-line error on stderr and exit code 2.
pub fn assert_bad_input(o: &Output, expected: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "exit code; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected, got: {err:?}");
    assert!(
        err.contains(expected),
        "stderr {err:?} should contain {expected:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Serializes tests that measure time inside a guest: run side by side on
/// two host cores they would steal each other's CPU and skew the counts.
pub fn timing_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// One `probe: cpu=N test=NAME key=value ...` result line.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub cpu: u32,
    pub test: String,
    pub fields: std::collections::HashMap<String, String>,
}

impl ProbeResult {
    pub fn get(&self, key: &str) -> &str {
        self.fields
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {key} in {self:?}"))
    }

    pub fn num(&self, key: &str) -> f64 {
        let v = self.get(key);
        v.parse()
            .unwrap_or_else(|_| panic!("{key}={v} is not a number in {self:?}"))
    }
}

/// Every test result the probe printed.
pub fn probe_results(stdout: &str) -> Vec<ProbeResult> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("probe: "))
        .filter_map(|rest| {
            let fields: std::collections::HashMap<String, String> = rest
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect();
            let cpu = fields.get("cpu")?.parse().ok()?;
            let test = fields.get("test")?.clone();
            Some(ProbeResult { cpu, test, fields })
        })
        .collect()
}

/// Runs the probe with `cmdline` (and extra flags) and returns its results,
/// asserting it reset normally.
pub fn run_probe(cmdline: &str, extra: &[&str]) -> (Vec<ProbeResult>, Output) {
    let mut args = vec!["--cmdline", cmdline, "--timeout", "60"];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "probe did not reset cleanly; stderr: {}\nstdout: {}",
        stderr(&o),
        stdout(&o)
    );
    (probe_results(&stdout(&o)), o)
}

/// The result of `test` on `cpu`.
pub fn result<'a>(results: &'a [ProbeResult], cpu: u32, test: &str) -> &'a ProbeResult {
    results
        .iter()
        .find(|r| r.cpu == cpu && r.test == test)
        .unwrap_or_else(|| panic!("no result for test {test} on cpu {cpu} in {results:?}"))
}

/// The probe's toggle test with `flags`: 1000 enable toggles open no more
/// host events than 10 do (and 10 open at least one).
pub fn assert_toggles_open_no_host_events(flags: &[&str]) {
    let (few, o_few) = run_probe("probe.tests=toggle probe.toggles=10", flags);
    let (many, o_many) = run_probe("probe.tests=toggle probe.toggles=1000", flags);
    assert_eq!(result(&few, 0, "toggle").num("toggles"), 10.0);
    assert_eq!(result(&many, 0, "toggle").num("toggles"), 1000.0);
    let (opens_few, opens_many) = (perf_opens(&o_few, 0), perf_opens(&o_many, 0));
    assert!(opens_few >= 1, "the counter was backed at all");
    assert_eq!(
        opens_many, opens_few,
        "990 more toggles must not open host events"
    );
}

/// A `msrstorm` result of `n` accesses: each got what hardware gives, each
/// outside the model faulted, and the PMU still counts after it.
pub fn assert_msr_storm_answered(s: &ProbeResult, n: f64) {
    assert_eq!(s.num("n"), n, "{s:?}");
    assert_eq!(
        s.num("mismatches"),
        0.0,
        "the guest got what hardware gives: {s:?}"
    );
    let (gp, total) = s.get("outside").split_once('/').unwrap();
    assert_eq!(gp, total, "every access outside the model faults: {s:?}");
    assert_eq!(s.get("counts_after"), "1", "the PMU still counts: {s:?}");
}

/// The count before `label` (as in "3 perf_event_open") in vCPU `vcpu`'s
/// vPMU line of the VMM's exit summary.
pub fn vpmu_summary(o: &Output, vcpu: u32, label: &str) -> u64 {
    vpmu_summary_text(&stderr(o), vcpu, label)
}

/// [`vpmu_summary`] of the VMM's stderr text `err`.
pub fn vpmu_summary_text(err: &str, vcpu: u32, label: &str) -> u64 {
    let prefix = format!("vmm: vCPU {vcpu} vPMU:");
    let line = err
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no vPMU summary for vCPU {vcpu}: {err}"));
    line.split(label)
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no '{label}' count in {line}"))
}

/// `perf_event_open` calls of vCPU `vcpu`, from the VMM's exit summary.
pub fn perf_opens(o: &Output, vcpu: u32) -> u64 {
    vpmu_summary(o, vcpu, " perf_event_open")
}

/// Whether the host CPU is AMD's (its vPMU model, by default, is AMD's).
pub fn host_is_amd() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains("AuthenticAMD"))
}

/// The guest TSC rate the probe reports (`probe: tsc_khz=...`), in kHz.
pub fn tsc_khz(stdout: &str) -> f64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("probe: tsc_khz="))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no 'probe: tsc_khz=' line in {stdout}"))
}

/// The probe's `probe.rsvd` for this host's model: AMD drops reserved
/// bits (as AMD hardware and KVM's svm/pmu.c do), Intel faults on them.
pub fn rsvd_mode() -> &'static str {
    let (d, _) = run_probe("probe.tests=detect", &["--vpmu", "on"]);
    match result(&d, 0, "detect").get("pmu") {
        "amd" => "ignore",
        _ => "gp",
    }
}

/// One HTTP/1.1 request over the VMM's API socket: (status, body).
pub fn api(socket: &Path, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    api_with_body(socket, method, path, "")
}

/// [`api`] with a request body.
pub fn api_with_body(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Sends `raw` on a fresh connection to the API socket (then half-closes
/// it) and returns the status code, or `None` when the server ended the
/// connection without one.
pub fn send_raw(sock: &Path, raw: &[u8]) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let _ = s.write_all(raw);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// A JSON count (of `GET /vpmu`, `GET /profile`): panics on anything else.
pub fn num(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// A JSON number, as a float: panics on anything else.
pub fn float(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Waits until the API socket at `path` answers.
pub fn wait_for_api(path: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if api(path, "GET", "/vpmu").is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("API socket {} never answered", path.display());
}

/// A `vmm` running the probe with `--vpmu on` and an API socket, its output
/// collected as it comes; killed if dropped while running.
pub struct Running {
    child: Child,
    pub pid: u32,
    pub sock: PathBuf,
    /// The serial output so far.
    serial: Arc<Mutex<String>>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    _dir: tempfile::TempDir,
}

/// How a VMM run ended.
pub struct Ended {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ended {
    pub fn results(&self) -> Vec<ProbeResult> {
        probe_results(&self.stdout)
    }

    pub fn assert_reset(&self) {
        assert_eq!(
            self.code,
            Some(0),
            "the guest did not reset; stderr: {}\nstdout: {}",
            self.stderr,
            self.stdout
        );
    }
}

/// Reads `pipe` to its end, also into `sofar` as it comes.
fn collect(
    mut pipe: impl std::io::Read + Send + 'static,
    sofar: Arc<Mutex<String>>,
) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = pipe.read(&mut chunk) {
            sofar
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
        let text = sofar.lock().unwrap().clone();
        text
    })
}

impl Running {
    /// Starts the probe with `cmdline`, extra `flags` and environment.
    pub fn start_with_env(cmdline: &str, flags: &[&str], env: &[(&str, &str)]) -> Running {
        Self::spawn(cmdline, &[&["--vpmu", "on"], flags].concat(), env)
    }

    /// Starts the probe with `cmdline` and `flags` only (no `--vpmu on`).
    pub fn start_plain(cmdline: &str, flags: &[&str]) -> Running {
        Self::spawn(cmdline, flags, &[])
    }

    fn spawn(cmdline: &str, flags: &[&str], env: &[(&str, &str)]) -> Running {
        let args = [&["--timeout", "120", "--cmdline", cmdline], flags].concat();
        Self::spawn_args(&args, env)
    }

    /// Continues the VM saved in `snapshot` (`vmm run --restore`), with
    /// `flags` (host-side ones) and an API socket.
    pub fn restore(snapshot: &Path, flags: &[&str]) -> Running {
        let path = snapshot.to_str().unwrap();
        let args = [&["run", "--restore", path, "--timeout", "120"], flags].concat();
        Self::spawn_args(&args, &[])
    }

    fn spawn_args(args: &[&str], env: &[(&str, &str)]) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let mut child = vmm()
            .args(args)
            .arg("--api-socket")
            .arg(&sock)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let serial = Arc::new(Mutex::new(String::new()));
        let stdout = collect(child.stdout.take().unwrap(), serial.clone());
        let stderr = collect(child.stderr.take().unwrap(), Default::default());
        wait_for_api(&sock);
        Running {
            pid: child.id(),
            child,
            sock,
            serial,
            stdout: Some(stdout),
            stderr: Some(stderr),
            _dir: dir,
        }
    }

    pub fn start(cmdline: &str, flags: &[&str]) -> Running {
        Self::start_with_env(cmdline, flags, &[])
    }

    /// The serial output so far, line by line.
    pub fn serial_lines(&self) -> Vec<String> {
        self.serial
            .lock()
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Whether the guest printed `needle` yet.
    pub fn printed(&self, needle: &str) -> bool {
        self.serial.lock().unwrap().contains(needle)
    }

    /// Waits until the guest printed `needle`.
    pub fn wait_serial(&self, needle: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while !self.serial.lock().unwrap().contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {needle:?} within {timeout:?}: {}",
                self.serial.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// GET /vpmu, parsed.
    pub fn vpmu(&self) -> serde_json::Value {
        let (status, body) = api(&self.sock, "GET", "/vpmu").expect("GET /vpmu");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Waits for the VMM to end.
    pub fn finish(mut self) -> Ended {
        let status = self.child.wait().unwrap();
        Ended {
            code: status.code(),
            stdout: self.stdout.take().unwrap().join().unwrap(),
            stderr: self.stderr.take().unwrap().join().unwrap(),
        }
    }

    /// Stops the VMM with SIGTERM and waits for it to end.
    pub fn terminate(self) -> Ended {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.finish()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A memory figure of `/proc/PID/status` (`VmRSS`, `VmHWM`...), KiB; 0 if
/// the process is gone.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Runs tmux with `args` on the test's own server socket (the tests that
/// drive a terminal: `vmm top`, the guest shell).
pub fn tmux(server: &Path, args: &[&str]) -> std::process::Output {
    Command::new("tmux")
        .arg("-S")
        .arg(server)
        .args(args)
        .output()
        .expect("running tmux")
}

/// A tool from Debian's packages (`prometheus`, `tmux`), installed by the
/// project's script; `None` (the test skips with a message) where it
/// cannot be installed, unless VMM_REQUIRE_KVM says this is CI.
pub fn ensure_tool(tool: &str) -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ensure-tool.sh");
    let out = Command::new(script)
        .arg(tool)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    if out.status.success() {
        return Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    assert!(
        std::env::var_os("VMM_REQUIRE_KVM").is_none(),
        "scripts/ensure-tool.sh {tool} failed and VMM_REQUIRE_KVM is set"
    );
    eprintln!("skipped: {tool} is not installed and cannot be installed here");
    None
}
