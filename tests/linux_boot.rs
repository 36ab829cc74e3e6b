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
//!   records `sched:sched_switch`; snapshot and restore: each guest is
//!   snapshotted at its shell, and `main` mid-way through a `perf record`
//!   of a `perf stat` and continued in a new VMM, whose count and samples
//!   must cover both sides and not the stop, and in which `main`'s later
//!   steps run) must pass.
//! - `guest_shell_under_tmux_...` boots the guest with `vmm.exit=shell`
//!   under tmux, types a command at its shell and checks its output, one
//!   echo of what was typed, no terminal answer (`^[[50;8R`) on screen, and
//!   the terminal's settings restored after the VMM ends.
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
    "main.restore-count",
    "main.restore-record",
    "main.restore-vpmu",
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
