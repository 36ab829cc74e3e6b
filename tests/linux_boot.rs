//! Linux guests: the kernel `guest-images/linux/build.sh` builds for these
//! hosts from Debian's linux-source (patched, small config) and the busybox +
//! perf initramfs (the first run downloads into guest-images/linux/cache/
//! and builds the kernel there; later runs reuse it).
//!
//! - `linux_perf_acceptance_passes_every_check` runs
//!   `guest-images/linux/acceptance.sh`: four guests (vPMU on, off, with
//!   cycles denied, and 2 vCPUs started through the MP wakeup mailbox) run
//!   Linux's own perf, and every row of its table (driver detection, cycles
//!   vs run time, unbacked events, privilege filters, sampling rate,
//!   user/kernel split and hot symbol, multiplexing, the API live and after,
//!   the NMI watchdog, the host's own `vmm profile` of the workload against
//!   the guest's `perf report`, no PMU, a denied event; on 2 vCPUs: both
//!   online, `perf stat -a` and per CPU, `perf record -a`, a migrating task,
//!   per-vCPU totals; each guest's boot log: Linux loaded the VMM's ACPI
//!   tables with no ACPI error; in the `off` guest, tracepoints: perf lists
//!   sched, syscalls and irq events, counts `syscalls:sys_enter_openat` and
//!   records `sched:sched_switch`) must pass.
//! - `guest_shell_under_tmux_...` boots the guest with `vmm.exit=shell`
//!   under tmux, types a command at its shell and checks its output, one
//!   echo of what was typed, no terminal answer (`^[[50;8R`) on screen, and
//!   the terminal's settings restored after the VMM ends.
//! - `a_linux_guest_restored_from_a_snapshot_runs_perf_and_counts_across_the_restore`
//!   boots the guest to its shell, snapshots it in the middle of a
//!   `perf record` of a `perf stat` of fixed work, restores it 20 s later
//!   and checks the count (both sides, not the stop) and the recording
//!   (PMIs on both sides, as many samples as the same work recorded after
//!   the restore, none lost) against the same command run after the
//!   restore, the host export's totals continuing, and that the restored
//!   VMM opened host events and delivered PMIs.
//! - `bzimage_boots_to_its_banner` boots the same kernel as a bzImage (the
//!   VMM unpacks its gzip payload) until its banner and command line.
//! - `initramfs_holds_init_busybox_perf_and_its_loader` checks the image.
//!
//! Without /dev/kvm they say they did not run (and fail when
//! VMM_REQUIRE_KVM is set, as in CI); VMM_TEST_SKIP_LINUX skips them.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The bzImage boot only has to show the banner and command line (about
/// 10 s in here); it is then stopped by its --timeout.
const BZIMAGE_TIMEOUT_S: u64 = 60;
/// Bound on the whole acceptance run (four guests: main, off and deny side
/// by side, then smp; 10-35 minutes here, most of it emulated kernel code).
const ACCEPTANCE_LIMIT_S: u64 = 2400;
/// Margin on top of --timeout before the test kills the VMM and fails.
const STOP_MARGIN_S: u64 = 30;
/// Bound on build.sh (first run: downloads about 40 MB).
const BUILD_LIMIT_S: u64 = 1800;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

struct Image {
    out: PathBuf,
}

/// Why the Linux tests cannot run on this host, if they cannot.
fn skip_reason(test: &str) -> Option<String> {
    if std::env::var_os("VMM_TEST_SKIP_LINUX").is_some() {
        return Some("VMM_TEST_SKIP_LINUX is set".into());
    }
    if !common::kvm_available(test) {
        return Some("/dev/kvm is not usable".into());
    }
    for tool in ["apt-get", "dpkg-deb"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            return Some(format!(
                "{tool} is missing: guest-images/linux/build.sh needs a Debian host"
            ));
        }
    }
    None
}

/// Runs `cmd` with stdout/stderr into `log`, killing it after `limit`.
/// Returns the exit code (None when killed or signalled) and the time taken.
fn run_bounded(cmd: &mut Command, log: &Path, limit: Duration) -> (Option<i32>, Duration, bool) {
    let file = fs::File::create(log).expect("creating log file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("spawning");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            return (status.code(), start.elapsed(), false);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return (None, start.elapsed(), true);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Builds the image once per test binary, through the project's script.
fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let script = repo().join("guest-images/linux/build.sh");
        let out = repo().join("guest-images/linux/out");
        let log = std::env::temp_dir().join(format!("vmm-linux-build-{}.log", std::process::id()));
        // build.sh's exit code, time, whether it was killed, and its output.
        let build = || {
            let (code, took, killed) = run_bounded(
                Command::new("bash").arg(&script).arg("--out").arg(&out),
                &log,
                Duration::from_secs(BUILD_LIMIT_S),
            );
            let text = fs::read_to_string(&log).unwrap_or_default();
            let _ = fs::remove_file(&log);
            (code, took, killed, text)
        };
        let (code, took, killed, text) = build();
        assert!(
            !killed,
            "build.sh did not finish in {BUILD_LIMIT_S} s:\n{text}"
        );
        assert_eq!(code, Some(0), "build.sh failed:\n{text}");
        eprintln!("build.sh: {:.1} s", took.as_secs_f64());
        for f in ["vmlinux", "bzImage", "initramfs.cpio"] {
            let meta = fs::metadata(out.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(meta.len() > 1 << 20, "{f} is only {} bytes", meta.len());
        }
        // Cached: with unchanged inputs a second run builds nothing.
        let (code, took, _, again) = build();
        assert_eq!(code, Some(0), "build.sh failed the second time:\n{again}");
        assert!(
            again.contains("up to date") && !again.contains("building the kernel"),
            "a second build.sh with unchanged inputs rebuilt:\n{again}"
        );
        eprintln!("build.sh again: {:.1} s, up to date", took.as_secs_f64());
        Image { out }
    })
}

struct Boot {
    code: Option<i32>,
    killed: bool,
    took: Duration,
    banner_after: Option<Duration>,
    serial: String,
    stderr: String,
}

/// Boots `kernel` with the initramfs, letting the VMM run to its own stop
/// (bounded by --timeout, and by the test after STOP_MARGIN_S more).
fn boot(kernel: &Path, initrd: &Path, token: &str, timeout_s: u64) -> Boot {
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let errlog = dir.path().join("vmm.err");
    let base = fs::read_to_string(image().out.join("cmdline")).expect("out/cmdline");
    let cmdline = format!("{} vmm.cmd=\"uname -r\" vmm.token={token}", base.trim());
    let mut child = common::vmm()
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--memory", "512", "--cmdline", &cmdline])
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .args(["--timeout", &timeout_s.to_string()])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&errlog).unwrap())
        .spawn()
        .expect("spawning vmm");
    let start = Instant::now();
    let limit = Duration::from_secs(timeout_s + STOP_MARGIN_S);
    let mut banner_after = None;
    let (code, killed) = loop {
        if banner_after.is_none()
            && fs::read(&serial)
                .map(|b| String::from_utf8_lossy(&b).contains("Linux version "))
                .unwrap_or(false)
        {
            banner_after = Some(start.elapsed());
        }
        if let Some(status) = child.try_wait().expect("waiting for vmm") {
            break (status.code(), false);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = start.elapsed();
    let serial = String::from_utf8_lossy(&fs::read(&serial).unwrap_or_default()).replace('\r', "");
    let stderr = fs::read_to_string(&errlog).unwrap_or_default();
    if banner_after.is_none() && serial.contains("Linux version ") {
        banner_after = Some(took);
    }
    Boot {
        code,
        killed,
        took,
        banner_after,
        serial,
        stderr,
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The assertions shared by the vmlinux and bzImage boots.
fn check_boot(what: &str, b: &Boot, token: &str, timeout_s: u64) {
    let context = format!(
        "{what}: exit {:?} after {:.1} s\n--- vmm stderr ---\n{}\n--- last serial lines ---\n{}",
        b.code,
        b.took.as_secs_f64(),
        b.stderr.trim_end(),
        tail(&b.serial, 15)
    );
    eprintln!("{context}");
    assert!(
        !b.killed,
        "the VMM did not stop by itself within --timeout {timeout_s} s + {STOP_MARGIN_S} s\n{context}"
    );
    assert!(
        !b.stderr.contains("panicked"),
        "the VMM panicked\n{context}"
    );

    // The banner and the command line, with this run's token.
    let banner = b.serial.lines().find(|l| l.contains("Linux version "));
    assert!(
        banner.is_some(),
        "no kernel banner on the serial console\n{context}"
    );
    assert!(
        b.serial
            .lines()
            .any(|l| l.contains("Command line: ") && l.contains(token)),
        "no 'Command line: ... {token}' on the serial console\n{context}"
    );
    eprintln!(
        "{what}: banner after {:.1} s: {}",
        b.banner_after.unwrap_or(b.took).as_secs_f64(),
        banner.unwrap().trim()
    );

    if let Some(done) = b.serial.lines().find(|l| l.starts_with("VMM-GUEST-DONE")) {
        // A host where Linux boots completely: /init ran its command.
        assert_eq!(
            done.trim(),
            "VMM-GUEST-DONE rc=0",
            "/init's command failed\n{context}"
        );
        assert!(
            b.serial.lines().any(|l| l.starts_with("VMM-GUEST-START")),
            "{context}"
        );
        assert_eq!(
            b.code,
            Some(0),
            "the guest's reboot should end the VMM with 0\n{context}"
        );
        eprintln!("{what}: Linux booted completely and /init ran its command");
        return;
    }

    // Linux could not finish booting here: the VMM must say why it stopped.
    let report = b.stderr.trim();
    assert!(
        !report.is_empty(),
        "the VMM stopped without saying why\n{context}"
    );
    match b.code {
        Some(1) => assert!(
            report.contains("RIP"),
            "an abnormal stop must name the guest RIP\n{context}"
        ),
        Some(3) => assert!(report.contains("timed out"), "{context}"),
        Some(0) => assert!(
            report.contains("reset"),
            "exit 0 without /init's marker must be a reported guest reset\n{context}"
        ),
        other => panic!("unexpected VMM exit {other:?}\n{context}"),
    }
    assert!(
        b.took < Duration::from_secs(timeout_s + STOP_MARGIN_S),
        "{context}"
    );
    eprintln!(
        "{what}: Linux could not finish booting on this host; the VMM stopped after {:.1} s: {}",
        b.took.as_secs_f64(),
        report.lines().last().unwrap_or_default()
    );
}

fn token(kind: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("lb-{kind}-{}-{nanos:x}", std::process::id())
}

#[test]
fn bzimage_boots_to_its_banner() {
    if let Some(why) = skip_reason(module_path!()) {
        eprintln!("skipped bzimage_boots_to_its_banner: {why}");
        return;
    }
    let img = image();
    let token = token("bzimage");
    let b = boot(
        &img.out.join("bzImage"),
        &img.out.join("initramfs.cpio"),
        &token,
        BZIMAGE_TIMEOUT_S,
    );
    check_boot("bzImage", &b, &token, BZIMAGE_TIMEOUT_S);
}

#[test]
fn initramfs_holds_init_busybox_perf_and_its_loader() {
    if let Some(why) = skip_reason(module_path!()) {
        eprintln!("skipped initramfs_holds_init_busybox_perf_and_its_loader: {why}");
        return;
    }
    let img = image();
    // The listing build.sh checked and recorded, from `cpio -t`.
    let manifest = fs::read_to_string(img.out.join("manifest.txt")).expect("manifest.txt");
    for entry in [
        "dev/console",
        "init",
        "bin/busybox",
        "bin/sh",
        "bin/busy",
        "bin/perf-checks",
        "boot/System.map",
        "sbin/reboot",
        "usr/bin/perf",
        "lib64/ld-linux-x86-64.so.2",
        "lib/x86_64-linux-gnu/libc.so.6",
        "lib/x86_64-linux-gnu/libpython3.11.so.1.0",
        "lib/x86_64-linux-gnu/libperl.so.5.36",
    ] {
        assert!(
            manifest.lines().any(|l| l == entry),
            "initramfs lacks {entry}"
        );
    }
    // perf runs with the tree's own loader and libraries only.
    let root = img.out.join("rootfs");
    let out = Command::new(root.join("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"))
        .arg("--inhibit-cache")
        .arg("--library-path")
        .arg(root.join("lib/x86_64-linux-gnu"))
        .arg(root.join("usr/bin/perf"))
        .arg("--version")
        .output()
        .expect("running perf through the tree's loader");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("perf version"),
        "{text}"
    );
    // The workload is an ELF whose hot function has a symbol for perf.
    let syms = Command::new("readelf")
        .arg("-s")
        .arg(root.join("bin/busy"))
        .output()
        .expect("readelf");
    assert!(
        String::from_utf8_lossy(&syms.stdout).contains(" spin_user"),
        "bin/busy has no spin_user symbol"
    );
    // The init script parses the command line and prints the markers.
    let init = fs::read_to_string(root.join("init")).unwrap();
    for needle in [
        "vmm.cmd",
        "VMM-GUEST-START",
        "VMM-GUEST-DONE rc=",
        "reboot -f",
    ] {
        assert!(init.contains(needle), "/init lacks {needle}");
    }
}

/// The checks acceptance.py must report, each PASS.
const ACCEPTANCE_CHECKS: &[&str] = &[
    "main.run",
    "main.detect",
    "main.stat-cycles",
    "main.unbacked",
    "main.privilege",
    "main.record-samples",
    "main.record-modes",
    "main.record-symbol",
    "main.multiplex",
    "main.api-live",
    "main.api-count",
    "main.watchdog",
    "main.profile-kernel",
    "main.profile-user",
    "main.boot-log",
    "off.run",
    "off.boot-log",
    "off.no-pmu",
    "off.tracepoint-list",
    "off.tracepoint-stat",
    "off.tracepoint-record",
    "deny.run",
    "deny.boot-log",
    "deny.cycles",
    "smp.run",
    "smp.boot-log",
    "smp.cpus",
    "smp.stat-all",
    "smp.per-cpu",
    "smp.record-all",
    "smp.migrate",
    "smp.migrate-opens",
    "smp.vcpu-totals",
];

#[test]
fn linux_perf_acceptance_passes_every_check() {
    if let Some(why) = skip_reason(module_path!()) {
        eprintln!("skipped linux_perf_acceptance_passes_every_check: {why}");
        return;
    }
    image();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("table.json");
    let log = dir.path().join("acceptance.log");
    let keep = std::env::temp_dir().join(format!("vmm-acceptance-{}", std::process::id()));
    let (code, took, killed) = run_bounded(
        Command::new("bash")
            .arg(repo().join("guest-images/linux/acceptance.sh"))
            .arg("--json")
            .arg(&json)
            .arg("--keep")
            .arg(&keep)
            .env("VMM", env!("CARGO_BIN_EXE_vmm")),
        &log,
        Duration::from_secs(ACCEPTANCE_LIMIT_S),
    );
    let text = fs::read_to_string(&log).unwrap_or_default();
    eprintln!("{text}");
    eprintln!(
        "acceptance.sh: exit {code:?} after {:.0} s (logs in {})",
        took.as_secs_f64(),
        keep.display()
    );
    assert!(
        !killed,
        "acceptance.sh did not finish in {ACCEPTANCE_LIMIT_S} s"
    );
    let table: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(&json).unwrap_or_else(|e| panic!("no JSON table ({e}):\n{text}")),
    )
    .expect("acceptance JSON");
    let rows = table["rows"].as_array().expect("rows");
    for check in ACCEPTANCE_CHECKS {
        let row = rows
            .iter()
            .find(|r| r["check"] == *check)
            .unwrap_or_else(|| panic!("acceptance.py reported no '{check}' row"));
        assert_eq!(row["result"], "PASS", "{check}: {}\n{text}", row["detail"]);
    }
    assert_eq!(code, Some(0), "acceptance.sh failed:\n{text}");
    let _ = fs::remove_dir_all(&keep);
}

/// A Linux guest on the serial console: commands in, output collected.
struct Console {
    child: std::process::Child,
    out: std::sync::Arc<std::sync::Mutex<String>>,
    err: PathBuf,
    sock: PathBuf,
}

impl Console {
    fn start(args: &[&str], dir: &Path, name: &str) -> Console {
        let sock = dir.join(format!("{name}.sock"));
        let err = dir.join(format!("{name}.err"));
        let mut child = common::vmm()
            .args(args)
            .arg("--api-socket")
            .arg(&sock)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&err).unwrap())
            .spawn()
            .expect("spawning vmm");
        let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = out.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut chunk) {
                let text = String::from_utf8_lossy(&chunk[..n]).replace('\r', "");
                sink.lock().unwrap().push_str(&text);
            }
        });
        Console {
            child,
            out,
            err,
            sock,
        }
    }

    fn send(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for a line that starts with `marker`; everything printed so far.
    fn wait(&self, marker: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let text = self.out.lock().unwrap().clone();
            if text.lines().any(|l| l.starts_with(marker)) {
                return text;
            }
            assert!(
                start.elapsed() < limit,
                "no line starting {marker:?} within {limit:?}\n--- vmm stderr ---\n{}\n--- console ---\n{}",
                fs::read_to_string(&self.err).unwrap_or_default(),
                tail(&text, 30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }
}

/// The count perf stat -x, printed for `event` after the line `after`.
fn perf_csv_count(text: &str, after: &str, event: &str) -> u64 {
    let rest = text.split_once(after).map_or("", |(_, r)| r);
    rest.lines()
        .find_map(|l| {
            let fields: Vec<&str> = l.split(',').collect();
            (fields.len() > 2 && fields[2] == event).then(|| fields[0].parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {event} count after {after:?} in:\n{}", tail(rest, 20)))
}

#[test]
fn a_linux_guest_restored_from_a_snapshot_runs_perf_and_counts_across_the_restore() {
    if let Some(why) = skip_reason(module_path!()) {
        eprintln!("skipped a_linux_guest_restored_from_a_snapshot...: {why}");
        return;
    }
    let out = &image().out;
    let dir = tempfile::tempdir().unwrap();
    let base = fs::read_to_string(out.join("cmdline")).expect("out/cmdline");
    let cmdline = format!("{} vmm.cmd=\"true\" vmm.exit=shell", base.trim());
    let (vmlinux, initrd) = (out.join("vmlinux"), out.join("initramfs.cpio"));
    let boot_started = Instant::now();
    let mut booted = Console::start(
        &[
            "run",
            "--kernel",
            vmlinux.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "512",
            "--vpmu",
            "on",
            "--cmdline",
            &cmdline,
            "--timeout",
            "2400",
        ],
        dir.path(),
        "booted",
    );
    booted.wait("init: vmm.exit=shell", Duration::from_secs(1800));
    booted.send("echo READY-$((6*7))");
    booted.wait("READY-42", Duration::from_secs(120));
    let boot_took = boot_started.elapsed();
    // Fixed work, counted by perf stat and sampled by perf record, that
    // the snapshot interrupts. The PMIs the booted VMM delivers from its
    // start to the snapshot are the recording's first side.
    booted.send(&format!(
        "{SPAN_RECORD} -o /tmp/span.data -- {SPAN_STAT} 2>&1; echo SPAN-DONE"
    ));
    booted.wait("WORK-START", Duration::from_secs(600));
    let at_start = vpmu_doc(&booted.sock);
    std::thread::sleep(Duration::from_secs(2));
    let at_snapshot = vpmu_doc(&booted.sock);
    let snap = dir.path().join("linux.snap");
    let body = serde_json::json!({ "path": snap, "resume": false }).to_string();
    let (status, answer) =
        common::api_with_body(&booted.sock, "PUT", "/vm/snapshot", &body).unwrap();
    assert_eq!(status, 200, "{answer}");
    let mut booted = booted;
    let _ = booted.child.kill();
    let _ = booted.child.wait();
    // Stopped for 20 s: about 50 G cycles that the count must not include.
    std::thread::sleep(Duration::from_secs(20));

    let restore_started = Instant::now();
    let mut restored = Console::start(
        &[
            "run",
            "--restore",
            snap.to_str().unwrap(),
            "--timeout",
            "1800",
        ],
        dir.path(),
        "restored",
    );
    restored.send("echo RESTORED-$((6*7))");
    restored.wait("RESTORED-42", Duration::from_secs(120));
    let answer_took = restore_started.elapsed();
    let at_restore = vpmu_doc(&restored.sock);
    let text = restored.wait("SPAN-DONE", Duration::from_secs(900));
    let span = perf_csv_count(&text, "WORK-END", "cycles");
    let at_span_end = vpmu_doc(&restored.sock);
    let opened = restored.stderr();
    // The same, recorded and counted wholly after the restore.
    restored.send(&format!(
        "{SPAN_RECORD} -o /tmp/ref.data -- {} 2>&1; echo REF-DONE",
        SPAN_STAT.replace("WORK-", "REF-")
    ));
    let text = restored.wait("REF-DONE", Duration::from_secs(900));
    let reference = perf_csv_count(&text, "\nREF-END", "cycles");
    restored.send(
        "for f in span ref; do echo STATS-$f; perf report -i /tmp/$f.data --stats 2>&1 \
         | grep -E 'SAMPLE events|LOST'; done; echo STATS-DONE",
    );
    let text = restored.wait("STATS-DONE", Duration::from_secs(900));
    let stats = text.rsplit_once("STATS-span").map_or("", |(_, r)| r);
    let (span_stats, ref_stats) = stats.split_once("STATS-ref").unwrap_or((stats, ""));
    let (span_samples, ref_samples) = (sample_events(span_stats), sample_events(ref_stats));
    restored.send("reboot -f");
    let status = restored.child.wait().unwrap();
    let stderr = restored.stderr();
    // The recording's two sides, as the host delivered them.
    let before = pmis(&at_snapshot) - pmis(&at_start);
    let after = pmis(&at_span_end) - pmis(&at_snapshot);
    eprintln!(
        "booted to a shell in {:.0} s; restored to the shell's answer in {:.1} s; \
         cycles of the work: {span} across the restore, {reference} after it; \
         perf record: {span_samples} samples across the restore ({before} PMIs before the \
         snapshot, {after} after), {ref_samples} after it\n{stderr}",
        boot_took.as_secs_f64(),
        answer_took.as_secs_f64()
    );
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(opened.contains("vmm: restored from"), "{opened}");
    // Both sides of the work counted, and not the 20 s stopped (counting
    // it would make the ratio 3 or more; measured here: 1.24 idle, 1.54 at
    // load 5 when the reference was the bare command).
    let ratio = span as f64 / reference as f64;
    assert!(
        (0.5..=2.0).contains(&ratio),
        "{span} cycles across the restore vs {reference} without: {ratio:.2}"
    );
    // The recording has samples from both sides, as many as the same work
    // recorded after the restore, and lost none.
    assert!(
        before > 0 && after > 0,
        "PMIs {before} before, {after} after the snapshot"
    );
    let recorded = text
        .split_once("WORK-START")
        .map_or(text.as_str(), |(_, r)| r);
    assert!(
        !stats.contains("LOST") && !recorded.contains(" lost "),
        "perf lost events:\n{}",
        tail(recorded, 30)
    );
    let samples_ratio = span_samples as f64 / ref_samples.max(1) as f64;
    assert!(
        ref_samples > 10 && (0.5..=2.0).contains(&samples_ratio),
        "{span_samples} samples across the restore vs {ref_samples} after it"
    );
    // The host export's totals continued from the snapshot's: a restored
    // VMM that started from zero would show less than the booted one did.
    assert!(
        totals(&at_restore) >= totals(&at_snapshot),
        "totals {} at the restore < {} at the snapshot",
        totals(&at_restore),
        totals(&at_snapshot)
    );
    assert_eq!(at_span_end["vm"]["vpmu"], true, "{at_span_end}");
    // The restored VMM did the work: host events opened, PMIs delivered.
    assert!(
        common::vpmu_summary_text(&stderr, 0, " perf_event_open") > 0,
        "{stderr}"
    );
    assert!(
        common::vpmu_summary_text(&stderr, 0, " PMIs") >= ref_samples,
        "{stderr}"
    );
}

/// perf record of the restore test: cycles every 25 M (about 100 per
/// second of guest time, under the guest's sample-rate limit).
const SPAN_RECORD: &str = "perf record -e cycles -c 25000000";
/// perf stat of the restore test's fixed work (about 3 s of CPU natively).
const SPAN_STAT: &str =
    "perf stat -x, -e cycles -- sh -c 'echo WORK-START; /bin/busy work 300; echo WORK-END'";

/// GET /vpmu of a running VMM.
fn vpmu_doc(sock: &Path) -> serde_json::Value {
    let (status, body) = common::api(sock, "GET", "/vpmu").expect("GET /vpmu");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("GET /vpmu is JSON")
}

/// PMIs the VMM delivered to all vCPUs (NMI and fixed-vector).
fn pmis(doc: &serde_json::Value) -> u64 {
    doc["vcpus"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| common::num(&v["pmi_delivery"]["nmi"]) + common::num(&v["pmi_delivery"]["fixed"]))
        .sum()
}

/// The sum of every event's total the VMM exported.
fn totals(doc: &serde_json::Value) -> u64 {
    doc["totals"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| common::num(&t["count"]))
        .sum()
}

/// The SAMPLE events count of `perf report --stats` output.
fn sample_events(text: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("SAMPLE events:")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no SAMPLE events line in:\n{text}"))
}

/// Bound on the interactive guest: boot to /init (2 to 6 minutes here),
/// two commands typed at its shell, the reboot.
const SHELL_TIMEOUT_S: u64 = 1200;

/// Everything the pane showed, its history included, wrapped lines joined.
fn pane_history(server: &Path) -> String {
    String::from_utf8_lossy(&common::tmux(server, &["capture-pane", "-p", "-J", "-S", "-"]).stdout)
        .into_owned()
}

/// The answers to a cursor-position query (`ESC [ row ; col R`) shown on
/// screen, however the escape itself was drawn (`^[`, or not at all).
fn terminal_answers(screen: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (at, _) in screen.match_indices('[') {
        let rest = &screen[at + 1..];
        let row = rest.chars().take_while(char::is_ascii_digit).count();
        if row == 0 || !rest[row..].starts_with(';') {
            continue;
        }
        let col = rest[row + 1..]
            .chars()
            .take_while(char::is_ascii_digit)
            .count();
        if col > 0 && rest[row + 1 + col..].starts_with('R') {
            found.push(format!("[{}", &rest[..row + 2 + col]));
        }
    }
    found
}

#[test]
fn terminal_answers_are_found_however_drawn() {
    assert_eq!(
        terminal_answers("/tmp # ^[[50;8R\n~ # [3;12Rls\n"),
        vec!["[50;8R", "[3;12R"]
    );
    assert!(terminal_answers("[    1.0] ACPI: [50;x] [;8R [8R").is_empty());
}

/// Waits until `done` holds for the pane's history; panics with it after
/// `limit`.
fn wait_pane(server: &Path, limit: Duration, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let screen = pane_history(server);
        if done(&screen) {
            return screen;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen in {} s; the pane:\n{}",
            limit.as_secs(),
            tail(&screen, 40)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The last line of the screen that is not empty.
fn last_line(screen: &str) -> &str {
    screen
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
}

#[test]
fn guest_shell_under_tmux_echoes_each_key_once_and_shows_no_terminal_answers() {
    if let Some(why) = skip_reason(module_path!()) {
        eprintln!("skipped guest_shell_under_tmux: {why}");
        return;
    }
    if common::ensure_tool("tmux").is_none() {
        return;
    }
    let img = image();
    let dir = tempfile::tempdir().unwrap();
    let server = dir.path().join("tmux.server");
    let status = dir.path().join("status");
    let (before, after) = (
        dir.path().join("stty.before"),
        dir.path().join("stty.after"),
    );
    let base = fs::read_to_string(img.out.join("cmdline")).expect("out/cmdline");
    // The pane: the terminal's settings, the VMM with the guest's console
    // on it, the VMM's exit code and the settings it left; then it stays
    // open to be read.
    let command = format!(
        "stty -g > {before}; {vmm} run --kernel {kernel} --initrd {initrd} --memory 512 \
         --timeout {SHELL_TIMEOUT_S} --cmdline '{cmdline} vmm.cmd=true vmm.exit=shell'; \
         echo $? > {status}; stty -g > {after}; sleep {SHELL_TIMEOUT_S}",
        before = before.display(),
        after = after.display(),
        status = status.display(),
        vmm = env!("CARGO_BIN_EXE_vmm"),
        kernel = img.out.join("vmlinux").display(),
        initrd = img.out.join("initramfs.cpio").display(),
        cmdline = base.trim(),
    );
    let new = common::tmux(
        &server,
        &["new-session", "-d", "-x", "160", "-y", "50", &command],
    );
    assert!(new.status.success(), "{new:?}");
    let start = Instant::now();
    let limit = Duration::from_secs(SHELL_TIMEOUT_S);
    // busybox's shell prompt ("/tmp # "), after /init said it starts it.
    let screen = wait_pane(&server, limit, "the guest shell's prompt", |s| {
        s.contains("vmm.exit=shell: starting a shell") && last_line(s).trim_end().ends_with('#')
    });
    eprintln!(
        "guest shell: prompt after {:.0} s",
        start.elapsed().as_secs_f64()
    );
    let prompt = last_line(&screen).trim_end().to_string();
    // A command as a user types it: its output is not its own text.
    let typed = "echo shell-$((6 * 7))-ok";
    common::tmux(&server, &["send-keys", "-l", typed]);
    common::tmux(&server, &["send-keys", "Enter"]);
    let screen = wait_pane(
        &server,
        Duration::from_secs(120),
        "the command's output",
        |s| {
            s.lines().any(|l| l.trim() == "shell-42-ok")
                && last_line(s).trim_end().ends_with('#')
                && s.matches(prompt.as_str()).count() >= 2
        },
    );
    common::tmux(&server, &["send-keys", "-l", "exit"]);
    common::tmux(&server, &["send-keys", "Enter"]);
    let deadline = Instant::now() + Duration::from_secs(300);
    while fs::read_to_string(&status).map_or(true, |s| s.trim().is_empty()) {
        assert!(
            Instant::now() < deadline,
            "leaving the shell did not end the VMM; the pane:\n{}",
            tail(&pane_history(&server), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(300));
    let end = pane_history(&server);
    let _ = common::tmux(&server, &["kill-server"]);
    let context = format!("the pane:\n{}", tail(&end, 30));
    eprintln!("{context}");
    // The shell sends a cursor-position query at each prompt; the answer
    // goes to the guest and is never shown.
    assert_eq!(
        terminal_answers(&end),
        Vec::<String>::new(),
        "terminal answers on screen\n{context}"
    );
    // Typed once, shown once: by the guest's echo, not also the host's.
    let shown = screen.lines().filter(|l| l.contains(typed)).count();
    assert_eq!(shown, 1, "the typed command shown {shown} times\n{context}");
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with(&prompt) && l.contains(typed)),
        "the command is not on its prompt's line\n{context}"
    );
    assert_eq!(
        fs::read_to_string(&status).unwrap().trim(),
        "0",
        "the guest's reboot ends the VMM with 0\n{context}"
    );
    assert_eq!(
        fs::read_to_string(&before).unwrap(),
        fs::read_to_string(&after).unwrap(),
        "the VMM left the terminal's settings changed"
    );
}
