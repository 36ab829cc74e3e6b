//! The host side is hostile too: stalled consoles, endless
//! input, odd and oversized files, other users' sockets, slow API clients,
//! signals at any time and images that overlap. Each test drives the VMM
//! the way an attacker or an unlucky operator would and checks that it
//! ends cleanly, within bounds, touching nothing that is not its own.
//!
//! Every run here is bounded by the test itself (`Bounded`): a VMM that
//! hangs is killed and the test fails, it never hangs the suite.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::Running;

// ---------------------------------------------------------------------------
// Bounded runs, watched from outside.

/// How a bounded run ended.
#[derive(Debug)]
struct Ended {
    /// Exit code; `None` when killed by a signal (or by the bound).
    code: Option<i32>,
    /// The run outlived its bound and was killed.
    hung: bool,
    stderr: String,
    /// Peak resident memory of the process (kernel's ru_maxrss), KiB.
    max_rss_kib: u64,
    took: Duration,
}

impl Ended {
    fn assert_code(&self, code: i32) {
        assert!(
            !self.hung,
            "the VMM hung (killed after {:?}): {}",
            self.took, self.stderr
        );
        assert_eq!(self.code, Some(code), "stderr: {}", self.stderr);
    }

    /// Exit code 2 with one line on stderr containing `expected`.
    fn assert_bad_input(&self, expected: &str) {
        self.assert_code(2);
        assert_eq!(
            self.stderr.lines().count(),
            1,
            "one line: {:?}",
            self.stderr
        );
        assert!(
            self.stderr.contains(expected),
            "stderr {:?} should contain {expected:?}",
            self.stderr
        );
    }
}

/// A spawned VMM with its stderr collected; waited for with a bound.
struct Bounded {
    child: Child,
    stderr: Option<JoinHandle<String>>,
    /// What the VMM wrote to stderr so far, line by line.
    stderr_so_far: Arc<std::sync::Mutex<String>>,
    started: Instant,
}

impl Bounded {
    fn spawn(mut cmd: Command) -> Bounded {
        let mut child = cmd.stderr(Stdio::piped()).spawn().expect("spawning vmm");
        let pipe = std::io::BufReader::new(child.stderr.take().unwrap());
        let stderr_so_far = Arc::new(std::sync::Mutex::new(String::new()));
        let text = stderr_so_far.clone();
        let stderr = std::thread::spawn(move || {
            for line in std::io::BufRead::lines(pipe).map_while(Result::ok) {
                let mut text = text.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
            let text = text.lock().unwrap();
            text.clone()
        });
        Bounded {
            child,
            stderr: Some(stderr),
            stderr_so_far,
            started: Instant::now(),
        }
    }

    /// What the VMM has written to stderr so far.
    fn stderr_so_far(&self) -> String {
        self.stderr_so_far.lock().unwrap().clone()
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, signal: i32) {
        // SAFETY: signals our own child, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    /// Waits up to `bound` for the process to end (killing it after that),
    /// with its peak RSS from wait4.
    fn wait(mut self, bound: Duration) -> Ended {
        let mut hung = false;
        let (status, rusage) = loop {
            let mut status = 0;
            // SAFETY: a zeroed rusage is valid for wait4 to fill.
            let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: wait4 on our own child with valid out-pointers.
            let rc = unsafe { libc::wait4(self.pid(), &mut status, libc::WNOHANG, &mut rusage) };
            if rc == self.pid() {
                break (status, rusage);
            }
            assert!(rc == 0, "wait4: {}", std::io::Error::last_os_error());
            if self.started.elapsed() > bound && !hung {
                hung = true;
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = self.started.elapsed();
        let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
        Ended {
            code,
            hung,
            stderr: self.stderr.take().unwrap().join().unwrap(),
            max_rss_kib: rusage.ru_maxrss as u64,
            took,
        }
    }
}

fn vmm_cmd(args: &[&str]) -> Command {
    let mut cmd = common::vmm();
    cmd.args(args).stdout(Stdio::null());
    cmd
}

/// Runs `vmm args` to its end (at most `bound`).
fn run_bounded(args: &[&str], bound: Duration) -> Ended {
    Bounded::spawn(vmm_cmd(args)).wait(bound)
}

/// Resident memory of a running process, KiB.
fn rss_kib(pid: i32) -> u64 {
    common::status_kib(pid as u32, "VmRSS")
}

/// Whether `pid` (our child, not yet reaped) still runs: not a zombie.
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.trim_start().starts_with('Z')))
        == Some(false)
}

/// Names of the threads of `pid`.
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
    assert!(std::fs::metadata(path).unwrap().file_type().is_fifo());
}

/// Bytes waiting in the pipe whose read end is `fd`.
fn pipe_bytes(fd: i32) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through a valid pointer.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0);
    n as usize
}

// ---------------------------------------------------------------------------
// 1. Console output nobody reads.

/// The flood guest with stdout going to a pipe the test never reads:
/// returns the running VMM and the pipe (kept open, undrained).
fn flood_into_a_stalled_pipe(extra: &[&str]) -> (Bounded, std::process::ChildStdout) {
    let flood = common::build_guest("flood");
    let mut cmd = common::vmm();
    cmd.arg("--kernel")
        .arg(&flood)
        .args(extra)
        .stdout(Stdio::piped());
    let mut vm = Bounded::spawn(cmd);
    let stdout = vm.child.stdout.take().unwrap();
    // Wait until the pipe is full: from here on a write(2) to it blocks.
    let deadline = Instant::now() + Duration::from_secs(60);
    while pipe_bytes(stdout.as_raw_fd()) < 60 * 1024 {
        assert!(Instant::now() < deadline, "the guest never filled the pipe");
        std::thread::sleep(Duration::from_millis(20));
    }
    (vm, stdout)
}

#[test]
fn a_console_nobody_reads_never_blocks_timeout_or_sigterm() {
    require_kvm!();
    // --timeout: the guest floods for 5 s into a pipe that fills in about
    // one; the VMM still ends at its timeout.
    let flood = common::build_guest("flood");
    let mut cmd = common::vmm();
    cmd.arg("--kernel")
        .arg(&flood)
        .args(["--timeout", "5"])
        .stdout(Stdio::piped());
    let mut vm = Bounded::spawn(cmd);
    let stdout = vm.child.stdout.take().unwrap();
    let end = vm.wait(Duration::from_secs(60));
    end.assert_code(3);
    assert!(
        pipe_bytes(stdout.as_raw_fd()) >= 60 * 1024,
        "the pipe never filled: the test proves nothing"
    );
    assert!(
        end.took < Duration::from_secs(30),
        "took {:?} to end",
        end.took
    );
    assert!(
        end.stderr.contains("bytes of guest output dropped"),
        "{}",
        end.stderr
    );
    drop(stdout);

    // SIGTERM while the pipe is full.
    let (vm, stdout) = flood_into_a_stalled_pipe(&[]);
    let signalled = Instant::now();
    vm.signal(libc::SIGTERM);
    let end = vm.wait(Duration::from_secs(60));
    end.assert_code(128 + libc::SIGTERM);
    assert!(
        signalled.elapsed() < Duration::from_secs(30),
        "SIGTERM took {:?}",
        signalled.elapsed()
    );
    // The guest's output kept flowing until the pipe filled, in order.
    let mut head = vec![0u8; 4096];
    let mut stdout = stdout;
    stdout.read_exact(&mut head).unwrap();
    let text = String::from_utf8_lossy(&head);
    assert!(
        text.starts_with("flood: the guest writes to COM1"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------
// 2. Console input the guest does not read.

#[test]
fn endless_stdin_the_guest_never_reads_keeps_memory_bounded() {
    require_kvm!();
    let hang = common::build_guest("hang");
    let mut cmd = common::vmm();
    cmd.arg("--kernel")
        .arg(&hang)
        .args(["--memory", "64", "--timeout", "8"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut vm = Bounded::spawn(cmd);
    let pid = vm.pid();
    let mut stdin = vm.child.stdin.take().unwrap();
    let fed = Arc::new(AtomicU64::new(0));
    let writer = {
        let fed = fed.clone();
        std::thread::spawn(move || {
            let chunk = vec![b'y'; 64 * 1024];
            // Until the VMM is gone (EPIPE).
            while stdin.write_all(&chunk).is_ok() {
                fed.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        })
    };
    // VmRSS as it runs (ru_maxrss below is the peak the kernel saw).
    let mut samples = Vec::new();
    while running(pid) && vm.started.elapsed() < Duration::from_secs(60) {
        samples.push(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    let end = vm.wait(Duration::from_secs(60));
    writer.join().unwrap();
    let fed = fed.load(Ordering::Relaxed);
    let max = samples.iter().copied().max().unwrap_or(0);
    eprintln!(
        "endless stdin: {} MiB fed, VmRSS max {max} KiB over {} samples, ru_maxrss {} KiB",
        fed >> 20,
        samples.len(),
        end.max_rss_kib
    );
    end.assert_code(3);
    // The VMM kept taking input (and dropping it) past its buffer and the
    // pipe, not just stopping to read...
    assert!(fed > 512 << 10, "only {fed} bytes taken");
    assert!(
        end.stderr.contains("bytes of host input dropped"),
        "{}",
        end.stderr
    );
    // ...and its memory stayed flat: the binary, its threads and whatever
    // the guest touched, nothing per byte of input.
    assert!(
        end.max_rss_kib < 64 * 1024,
        "peak RSS {} KiB",
        end.max_rss_kib
    );
}

// ---------------------------------------------------------------------------
// 3. and 7. Kernel, initrd and serial files: kind, size, unpacking.

/// A bzImage whose payload is `payload`.
fn bzimage(payload: &[u8]) -> Vec<u8> {
    let setup_sects = 1u8;
    let mut image = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    image[0x1f1] = setup_sects;
    image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    image[0x211] = 1; // LOADED_HIGH
    image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    image[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes());
    image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    image[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes());
    image.extend_from_slice(payload);
    image
}

/// 1 GiB of zeros, gzip-compressed (about 1 MiB).
fn gzip_bomb() -> Vec<u8> {
    use flate2::write::GzEncoder;
    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        enc.write_all(&zeros).unwrap();
    }
    enc.finish().unwrap()
}

/// 1 GiB of zeros in lz4 legacy blocks, with a trailer that lies (4 KiB).
fn lz4_bomb() -> Vec<u8> {
    let block = lz4_flex::block::compress(&vec![0u8; 8 << 20]);
    let mut frame = vec![0x02, 0x21, 0x4c, 0x18];
    for _ in 0..128 {
        frame.extend_from_slice(&(block.len() as u32).to_le_bytes());
        frame.extend_from_slice(&block);
    }
    frame.extend_from_slice(&4096u32.to_le_bytes());
    frame
}

/// Peak RSS allowed for a refused image with `--memory 64`: the binary,
/// the file, and at most one guest memory's worth of unpacked payload.
const BOUNDED_KIB: u64 = 200 * 1024;

#[test]
fn decompression_bombs_are_refused_with_bounded_memory() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    for (name, payload) in [("gzip", gzip_bomb()), ("lz4", lz4_bomb())] {
        let path = dir.path().join(format!("{name}.bzImage"));
        std::fs::write(&path, bzimage(&payload)).unwrap();
        let p = path.to_str().unwrap();
        let end = run_bounded(
            &["--kernel", p, "--memory", "64", "--timeout", "20"],
            Duration::from_secs(120),
        );
        eprintln!(
            "{name} bomb ({} KiB file, 1 GiB unpacked): exit {:?} in {:?}, peak RSS {} KiB",
            payload.len() >> 10,
            end.code,
            end.took,
            end.max_rss_kib
        );
        end.assert_bad_input(&format!(
            "{p}: the bzImage payload unpacks to more than --memory 64 MiB can hold"
        ));
        assert!(
            end.max_rss_kib < BOUNDED_KIB,
            "{name}: peak RSS {} KiB",
            end.max_rss_kib
        );
    }
}

#[test]
fn endless_huge_and_odd_files_are_refused_before_they_are_read() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hello = common::build_guest("hello");
    let hello = hello.to_str().unwrap();
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    let fifo = fifo.to_str().unwrap();
    // A sparse file of 1 GiB: larger than the guest's memory.
    let huge = d.join("huge");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let huge = huge.to_str().unwrap();
    let dir_s = d.to_str().unwrap();
    let bound = Duration::from_secs(60);
    let cases: Vec<(Vec<&str>, String)> = vec![
        // An endless device, a FIFO nobody writes, a directory, a file
        // larger than the guest.
        (
            vec!["--kernel", "/dev/zero"],
            "kernel /dev/zero is a character device, not a regular file".into(),
        ),
        (
            vec!["--kernel", fifo],
            format!("kernel {fifo} is a FIFO, not a regular file"),
        ),
        (
            vec!["--kernel", dir_s],
            format!("kernel {dir_s} is a directory, not a regular file"),
        ),
        (
            vec!["--kernel", huge],
            format!("kernel {huge} (1073741824 bytes) does not fit in --memory 64 MiB"),
        ),
        (
            vec!["--kernel", hello, "--initrd", "/dev/zero"],
            "initrd /dev/zero is a character device, not a regular file".into(),
        ),
        (
            vec!["--kernel", hello, "--initrd", fifo],
            format!("initrd {fifo} is a FIFO, not a regular file"),
        ),
        (
            vec!["--kernel", hello, "--initrd", huge],
            format!("initrd {huge} (1073741824 bytes) does not fit in --memory 64 MiB"),
        ),
    ];
    for (args, expected) in &cases {
        let mut all = args.clone();
        all.extend(["--memory", "64", "--timeout", "20"]);
        let end = run_bounded(&all, bound);
        end.assert_bad_input(expected);
        assert!(
            end.max_rss_kib < BOUNDED_KIB,
            "{args:?}: peak RSS {} KiB",
            end.max_rss_kib
        );
    }
    // A FIFO as the serial file: refused, not waited on for a reader.
    let serial = format!("file:{fifo}");
    let end = run_bounded(&["--kernel", hello, "--serial", &serial], bound);
    end.assert_bad_input(&format!(
        "--serial file:{fifo} is a FIFO; it must be a regular file or a character device"
    ));
    // A character device is fine (and a regular file, as always).
    let end = run_bounded(&["--kernel", hello, "--serial", "file:/dev/null"], bound);
    end.assert_code(0);
}

// ---------------------------------------------------------------------------
// 4. and 5. The API socket: never someone else's.

#[test]
fn another_users_live_socket_survives() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("theirs.sock");
    // Someone else's VMM: a live socket owned by nobody (65534), mode 0600.
    let theirs = UnixListener::bind(&path).unwrap();
    std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = std::fs::symlink_metadata(&path).unwrap();
    // Our VMM runs as root but without CAP_DAC_OVERRIDE (and
    // CAP_DAC_READ_SEARCH): connecting to that socket is EACCES, as for
    // any other user.
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--inh-caps=-all",
        "--bounding-set=-dac_override,-dac_read_search",
        "--",
    ])
    .arg(env!("CARGO_BIN_EXE_vmm"))
    .args(["--timeout", "20", "--api-socket"])
    .arg(&path)
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    let end = Bounded::spawn(cmd).wait(Duration::from_secs(60));
    end.assert_bad_input("permission denied");
    assert!(
        end.stderr.contains("refusing to replace it"),
        "{}",
        end.stderr
    );
    let after = std::fs::symlink_metadata(&path).expect("their socket was removed");
    assert_eq!((after.dev(), after.ino()), (before.dev(), before.ino()));
    // And it still works for them.
    let _client = UnixStream::connect(&path).unwrap();
    theirs.set_nonblocking(false).unwrap();
    assert!(theirs.accept().is_ok());
}

/// A probe that idles with an API socket at `sock`, ready.
fn serving(sock: &Path) -> Bounded {
    let mut cmd = vmm_cmd(&["--cmdline", "probe.tests=none probe.hold_ms=60000"]);
    cmd.arg("--timeout")
        .arg("120")
        .arg("--api-socket")
        .arg(sock);
    let vm = Bounded::spawn(cmd);
    common::wait_for_api(sock);
    vm
}

#[test]
fn a_socket_path_replaced_while_running_survives_the_vmms_exit() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    // Replaced by another VMM's socket.
    let vm = serving(&sock);
    std::fs::remove_file(&sock).unwrap();
    let other = UnixListener::bind(&sock).unwrap();
    let before = std::fs::symlink_metadata(&sock).unwrap();
    vm.signal(libc::SIGTERM);
    let end = vm.wait(Duration::from_secs(60));
    end.assert_code(128 + libc::SIGTERM);
    assert!(
        end.stderr.contains("was replaced while the VMM ran"),
        "{}",
        end.stderr
    );
    let after = std::fs::symlink_metadata(&sock).expect("the other socket was removed");
    assert_eq!((after.dev(), after.ino()), (before.dev(), before.ino()));
    let _client = UnixStream::connect(&sock).unwrap();
    assert!(other.accept().is_ok());
    drop(other);
    std::fs::remove_file(&sock).unwrap();

    // Replaced by a regular file.
    let vm = serving(&sock);
    std::fs::remove_file(&sock).unwrap();
    std::fs::write(&sock, "not yours").unwrap();
    vm.signal(libc::SIGTERM);
    let end = vm.wait(Duration::from_secs(60));
    end.assert_code(128 + libc::SIGTERM);
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "not yours");
    std::fs::remove_file(&sock).unwrap();

    // Not replaced: removed as always.
    let vm = serving(&sock);
    vm.signal(libc::SIGTERM);
    vm.wait(Duration::from_secs(60))
        .assert_code(128 + libc::SIGTERM);
    assert!(!sock.exists(), "our own socket was left behind");
}

// ---------------------------------------------------------------------------
// 6. Slow API clients.

/// A client that opens a connection and sends a never-ending request head
/// a byte per second, reconnecting whenever the server drops it.
fn slow_client(sock: PathBuf, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let Ok(mut s) = UnixStream::connect(&sock) else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            let _ = s.set_nonblocking(true);
            let head = b"GET /vpmu HTTP/1.1\r\nX-Slow: ";
            for b in head.iter().chain(std::iter::repeat(&b'a')) {
                if stop.load(Ordering::SeqCst) || s.write_all(&[*b]).is_err() {
                    break;
                }
                // A 503 or a cut-off: start over.
                let mut byte = [0u8; 64];
                match s.read(&mut byte) {
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
                for _ in 0..10 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    })
}

#[test]
fn slow_clients_holding_every_slot_cannot_lock_out_a_prompt_one() {
    require_kvm!();
    let vm = Running::start("probe.tests=none probe.hold_ms=100000", &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let slow: Vec<JoinHandle<()>> = (0..80)
        .map(|_| slow_client(vm.sock.clone(), stop.clone()))
        .collect();
    // Every one of the 64 connection slots is held by a slow client.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let conns = thread_names(vm.pid)
            .iter()
            .filter(|n| *n == "api-conn")
            .count();
        if conns >= 64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {conns} slow connections held"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let them all trickle for longer than the eviction age (and, on the
    // old server, than its per-read timeout would ever matter).
    std::thread::sleep(Duration::from_secs(2));
    let mut took = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let (status, body) = common::api(&vm.sock, "GET", "/vpmu").expect("GET /vpmu");
        took.push(start.elapsed());
        assert_eq!(status, 200, "a prompt client was refused: {body}");
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!("prompt client among 80 slow ones: {took:?}");
    assert!(took.iter().all(|t| *t < Duration::from_secs(2)), "{took:?}");
    // `vmm stat` gets through too.
    let start = Instant::now();
    let o = common::vmm()
        .arg("stat")
        .arg("--api-socket")
        .arg(&vm.sock)
        .args(["--count", "1", "--interval", "100", "--json"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    stop.store(true, Ordering::SeqCst);
    for t in slow {
        t.join().unwrap();
    }
    let end = vm.terminate();
    assert_eq!(end.code, Some(128 + libc::SIGTERM), "{}", end.stderr);
}

/// CPU time (user + system) of process `pid` so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command (which may hold spaces): state is field 3,
    // utime 14 and stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// The share of one core process `pid` used over `window`, against the
/// wall-clock ticks the host counted over the same window.
fn cpu_share(pid: u32, window: Duration, during: impl Fn()) -> f64 {
    // SAFETY: sysconf takes a constant and has no other effect.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (start, ticks) = (Instant::now(), cpu_ticks(pid));
    while start.elapsed() < window {
        during();
    }
    (cpu_ticks(pid) - ticks) as f64 / (start.elapsed().as_secs_f64() * hz)
}

/// Sets the soft `RLIMIT_NOFILE` of process `pid` (the hard one stays);
/// the soft one it had.
fn set_nofile(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on our own child, reading its limits into `old`.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: prlimit on our own child with a valid new limit.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    old.rlim_cur
}

#[test]
fn a_vmm_out_of_descriptors_answers_503_without_spinning() {
    require_kvm!();
    let vm = Running::start("probe.tests=none probe.hold_ms=100000", &[]);
    let ask = || common::send_raw(&vm.sock, b"GET /vpmu HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(ask(), Some(200));
    let idle = cpu_share(vm.pid, Duration::from_secs(2), || {
        std::thread::sleep(Duration::from_millis(100))
    });
    // As if the guest's counters had taken every descriptor left: the
    // limit at the lowest free number, no new one can be opened.
    let open: Vec<u64> = std::fs::read_dir(format!("/proc/{}/fd", vm.pid))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    let lowest_free = (0..).find(|n| !open.contains(n)).unwrap();
    let soft = set_nofile(vm.pid, lowest_free);
    // Clients get a prompt 503, and the API thread does not spin, while
    // they come and after they left.
    let answers = AtomicU64::new(0);
    let under_attack = cpu_share(vm.pid, Duration::from_secs(3), || {
        assert_eq!(ask(), Some(503));
        answers.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
    });
    // One left waiting on the listener (connected, never read).
    let _waiting = UnixStream::connect(&vm.sock).unwrap();
    let after = cpu_share(vm.pid, Duration::from_secs(2), || {
        std::thread::sleep(Duration::from_millis(100))
    });
    assert!(answers.load(Ordering::Relaxed) >= 5);
    for (what, share) in [("under attack", under_attack), ("after", after)] {
        assert!(
            share < idle + 0.25,
            "{what}: {share:.2} of a core against {idle:.2} idle"
        );
    }
    // With descriptors back, the API serves again.
    set_nofile(vm.pid, soft);
    assert_eq!(ask(), Some(200));
    let _ = vm.terminate();
}

#[test]
fn vmm_stat_reports_a_busy_api_as_busy() {
    // A server that answers 503 as the VMM does when it has no free slot.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("busy.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let body = "{\"error\": \"too many connections\"}\n";
                    let _ = write!(
                        s,
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    let o = common::vmm()
        .arg("stat")
        .arg("--api-socket")
        .arg(&sock)
        .args(["--count", "1"])
        .output()
        .unwrap();
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("API is busy") && err.contains("503"), "{err}");
    assert!(!err.contains("not a vmm API"), "{err}");
    drop(server);
}

/// A fake API server on `sock`: each connection is handed, after its
/// request head is read, to `answer` on a thread of its own, for up to
/// `for_at_most`.
fn fake_server(
    sock: &Path,
    for_at_most: Duration,
    answer: fn(UnixStream),
) -> JoinHandle<Vec<JoinHandle<()>>> {
    let listener = UnixListener::bind(sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let until = Instant::now() + for_at_most;
        let mut served = Vec::new();
        while Instant::now() < until {
            match listener.accept() {
                Ok((mut s, _)) => served.push(std::thread::spawn(move || {
                    s.set_nonblocking(false).unwrap();
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                        head.push(byte[0]);
                    }
                    answer(s)
                })),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        served
    })
}

/// Most bytes a trickling server sent before a client hung up.
static TRICKLED_BEFORE_HANGUP: AtomicU64 = AtomicU64::new(0);
/// Clients that hung up on the trickling server.
static HANGUPS: AtomicU64 = AtomicU64::new(0);

#[test]
fn a_trickling_server_cannot_hold_vmm_stat_or_vmm_profile() {
    // One byte every 0.5 s of an answer that would take minutes: each read
    // is quick, the exchange never ends.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("slow.sock");
    let server = fake_server(&sock, Duration::from_secs(120), |mut s| {
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{}",
            " ".repeat(500)
        );
        for (sent, b) in answer.bytes().enumerate() {
            if s.write_all(&[b]).is_err() {
                TRICKLED_BEFORE_HANGUP.fetch_max(sent as u64, Ordering::SeqCst);
                HANGUPS.fetch_add(1, Ordering::SeqCst);
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let sock_arg = sock.to_str().unwrap();
    let stat = Bounded::spawn(vmm_cmd(&["stat", "--api-socket", sock_arg, "--count", "1"]));
    let profile = Bounded::spawn(vmm_cmd(&[
        "profile",
        "--api-socket",
        sock_arg,
        "--seconds",
        "0.1",
    ]));
    // The answer takes 280 s to trickle: both clients must give up on their
    // own deadline (5 s; the profile's length + 30 s) long before that.
    for (what, ended, code) in [
        ("stat", stat.wait(Duration::from_secs(100)), 2),
        ("profile", profile.wait(Duration::from_secs(100)), 1),
    ] {
        ended.assert_code(code);
        assert_eq!(ended.stderr.lines().count(), 1, "{what}: {}", ended.stderr);
        assert!(
            ended.stderr.contains("timed out"),
            "{what}: {}",
            ended.stderr
        );
        assert!(
            !ended.stderr.contains("not a vmm API"),
            "{what}: {}",
            ended.stderr
        );
    }
    // Seen by the server (its next write fails within 0.5 s): both clients
    // hung up mid-trickle.
    let until = Instant::now() + Duration::from_secs(10);
    while HANGUPS.load(Ordering::SeqCst) < 2 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(HANGUPS.load(Ordering::SeqCst), 2);
    let sent = TRICKLED_BEFORE_HANGUP.load(Ordering::SeqCst);
    assert!(sent < 200, "{sent} bytes trickled before the last hang-up");
    drop(server);
}

#[test]
fn control_characters_from_a_server_are_escaped_before_printing() {
    // An error message that would set the window title, clear the screen
    // and forge a line of the client's own.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("hostile.sock");
    let server = fake_server(&sock, Duration::from_secs(30), |mut s| {
        let body = r#"{"error": "\u001b]0;x\u0007 title \u001b[2J clear\nvmm profile: forged \u009b1m c1 \u007f del"}"#;
        let _ = write!(
            s,
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    });
    let sock_arg = sock.to_str().unwrap();
    for args in [
        &["stat", "--api-socket", sock_arg, "--count", "1"][..],
        &["profile", "--api-socket", sock_arg, "--seconds", "0.1"],
    ] {
        let ended = run_bounded(args, Duration::from_secs(30));
        assert!(!ended.hung, "{args:?}");
        let err = &ended.stderr;
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err:?}");
        assert!(
            !err.chars().any(|c| c.is_control() && c != '\n'),
            "{args:?}: raw control characters: {err:?}"
        );
        assert!(err.contains("\\u{1b}]0;x\\u{7} title"), "{args:?}: {err:?}");
        assert!(
            err.contains("\\u{1b}[2J clear\\nvmm profile: forged"),
            "{err:?}"
        );
        assert!(err.contains("\\u{9b}1m c1 \\u{7f} del"), "{err:?}");
    }
    drop(server);
}

// ---------------------------------------------------------------------------
// 6. Signals.

#[test]
fn every_common_termination_signal_ends_the_vmm_cleanly() {
    require_kvm!();
    for signal in [
        libc::SIGHUP,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGQUIT,
        libc::SIGINT,
        libc::SIGTERM,
    ] {
        let vm = Running::start("probe.tests=none probe.hold_ms=60000", &[]);
        let sock = vm.sock.clone();
        // SAFETY: signals our own child, which is running.
        unsafe { libc::kill(vm.pid as i32, signal) };
        let end = vm.finish();
        assert_eq!(
            end.code,
            Some(128 + signal),
            "signal {signal}: {}",
            end.stderr
        );
        assert!(
            end.stderr.contains(&format!("stopped by signal {signal}")),
            "{}",
            end.stderr
        );
        assert!(
            !sock.exists(),
            "signal {signal}: the socket was left behind"
        );
    }
    // SIGPIPE (a closed stdout) does not end it: the output is dropped.
    let vm = Running::start("probe.tests=none probe.hold_ms=60000", &[]);
    // SAFETY: signals our own child, which is running.
    unsafe { libc::kill(vm.pid as i32, libc::SIGPIPE) };
    assert_eq!(common::api(&vm.sock, "GET", "/vpmu").unwrap().0, 200);
    let end = vm.terminate();
    assert_eq!(end.code, Some(128 + libc::SIGTERM), "{}", end.stderr);
}

#[test]
fn a_signal_during_start_up_ends_cleanly_before_the_guest_runs() {
    require_kvm!();
    let hang = common::build_guest("hang");
    for signal in [libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let mut cmd = common::vmm();
        cmd.arg("--kernel")
            .arg(&hang)
            .args(["--timeout", "30", "--api-socket"])
            .arg(&sock)
            .stdout(Stdio::null());
        // The signal is blocked from before exec, so it arrives while the
        // VMM starts: pending from its first instruction until it takes
        // the signals over.
        // SAFETY: the closure only calls async-signal-safe sigprocmask
        // functions between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, signal);
                libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        let vm = Bounded::spawn(cmd);
        vm.signal(signal);
        let end = vm.wait(Duration::from_secs(60));
        end.assert_code(128 + signal);
        assert!(
            end.stderr
                .contains(&format!("stopped by signal {signal} during start-up")),
            "{}",
            end.stderr
        );
        assert_eq!(end.stderr.lines().count(), 1, "{}", end.stderr);
        assert!(end.took < Duration::from_secs(20), "{:?}", end.took);
        assert!(!sock.exists(), "the socket was left behind");
    }
}

// ---------------------------------------------------------------------------
// 8. Image placement.

/// A minimal x86-64 ELF executable: `segments` are (physical address,
/// contents, memory size); the entry is `entry`.
fn elf(segments: &[(u64, Vec<u8>, u64)], entry: u64) -> Vec<u8> {
    let phoff = 64u64;
    let mut data_at = phoff + 56 * segments.len() as u64;
    let mut out = Vec::new();
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&entry.to_le_bytes());
    out.extend_from_slice(&phoff.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes()); // no sections
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&64u16.to_le_bytes());
    out.extend_from_slice(&56u16.to_le_bytes());
    out.extend_from_slice(&(segments.len() as u16).to_le_bytes());
    out.extend_from_slice(&[0u8; 6]);
    for (paddr, bytes, memsz) in segments {
        out.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        out.extend_from_slice(&7u32.to_le_bytes()); // RWX
        out.extend_from_slice(&data_at.to_le_bytes());
        out.extend_from_slice(&paddr.to_le_bytes());
        out.extend_from_slice(&paddr.to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(&memsz.to_le_bytes());
        out.extend_from_slice(&0x1000u64.to_le_bytes());
        data_at += bytes.len() as u64;
    }
    for (_, bytes, _) in segments {
        out.extend_from_slice(bytes);
    }
    out
}

/// `cli; hlt; jmp .-1`: a kernel that just sits there.
fn halt_code() -> Vec<u8> {
    vec![0xfa, 0xf4, 0xeb, 0xfd]
}

#[test]
fn overlapping_images_are_refused_naming_the_overlap() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: Vec<u8>| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path.to_str().unwrap().to_string()
    };
    let code = (0x20_0000, halt_code(), 0x1000);
    let data = |at: u64| (at, vec![0x55u8; 0x100], 0x100);
    let cases = [
        (
            write(
                "zero_page.elf",
                elf(&[code.clone(), data(0x7000)], 0x20_0000),
            ),
            "ELF segment 1 [0x7000, 0x7100) overlaps the zero page [0x7000, 0x8000)",
        ),
        (
            write(
                "mptable.elf",
                elf(&[code.clone(), data(0xf0000)], 0x20_0000),
            ),
            "ELF segment 1 [0xf0000, 0xf0100) overlaps the MP table [0xf0000, 0x100000)",
        ),
        (
            write("acpi.elf", elf(&[code.clone(), data(0xe0040)], 0x20_0000)),
            "ELF segment 1 [0xe0040, 0xe0140) overlaps the ACPI tables [0xe0000, 0xf0000)",
        ),
        (
            write(
                "page_tables.elf",
                elf(&[code.clone(), data(0xa800)], 0x20_0000),
            ),
            "overlaps the boot page tables [0x9000, 0xf000)",
        ),
        (
            write(
                "each_other.elf",
                elf(&[code.clone(), (0x20_0800, vec![1; 16], 0x1000)], 0x20_0000),
            ),
            "ELF segment 0 [0x200000, 0x201000) overlaps kernel",
        ),
    ];
    for (path, expected) in &cases {
        let end = run_bounded(
            &["--kernel", path, "--memory", "16", "--timeout", "5"],
            Duration::from_secs(60),
        );
        end.assert_bad_input(expected);
        assert!(
            end.stderr.contains(&format!("kernel {path}: ")),
            "{}",
            end.stderr
        );
    }
    // An initrd that would land over the kernel: 16 MiB of memory, the
    // kernel at 14 MiB, a 4 MiB initrd placed as high as it goes (12 MiB).
    let kernel = write(
        "high.elf",
        elf(&[(0xe0_0000, halt_code(), 0x10_0000)], 0xe0_0000),
    );
    let initrd = write("initrd", vec![0u8; 4 << 20]);
    let end = run_bounded(
        &[
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--memory",
            "16",
            "--timeout",
            "5",
        ],
        Duration::from_secs(60),
    );
    end.assert_bad_input(&format!(
        "initrd {initrd} [0xc00000, 0x1000000) overlaps kernel {kernel}: ELF segment 0 [0xe00000, 0xf00000)"
    ));
    // The same images with room to spare boot (and just sit there).
    let end = run_bounded(
        &[
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--memory",
            "32",
            "--timeout",
            "1",
        ],
        Duration::from_secs(60),
    );
    end.assert_code(3);
}

// ---------------------------------------------------------------------------
// 9. Reboot loops (`--on-reset reboot`).

/// The first CPU this test may run on.
fn first_cpu() -> usize {
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer and its size.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    assert_eq!(rc, 0, "sched_getaffinity");
    // SAFETY: CPU_ISSET reads the set, in bounds.
    (0..libc::CPU_SETSIZE as usize)
        .find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .unwrap_or(0)
}

/// A set of one CPU.
fn only_cpu(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: a zeroed cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes the set, in bounds (cpu < CPU_SETSIZE).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

/// Runs the command's process on `cpu` only.
fn pin(cmd: &mut Command, cpu: usize) {
    let set = only_cpu(cpu);
    // SAFETY: between fork and exec the closure only makes the
    // sched_setaffinity system call, on a set built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The host's own measure of how loaded it is over a window: how late a
/// thread that sleeps 10 ms at a time wakes, summed. A wall-clock bound
/// on a VMM that shares the CPU adds it.
struct Lateness {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Duration>,
}

impl Lateness {
    /// Starts measuring on `cpu` (the CPU the VMM is pinned to).
    fn start(cpu: usize) -> Lateness {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let set = only_cpu(cpu);
            // SAFETY: a valid set and its size, for this thread.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
            let step = Duration::from_millis(10);
            let mut late = Duration::ZERO;
            while !flag.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                std::thread::sleep(step);
                late += t0.elapsed().saturating_sub(step);
            }
            late
        });
        Lateness { stop, thread }
    }

    fn stop(self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// How far past its `--timeout` a reboot loop may end: this margin, plus
/// the host's lateness over the run.
const TIMEOUT_MARGIN: Duration = Duration::from_secs(3);

/// The reboot loop of the `reset` guest with `args`, the VMM pinned to
/// one CPU: (how it ended, the host's lateness over the run).
fn reboot_loop(args: &[&str]) -> (Ended, Duration) {
    let reset = common::build_guest("reset");
    let mut cmd = vmm_cmd(&["--serial", "none", "--on-reset", "reboot", "--kernel"]);
    cmd.arg(&reset).args(args);
    let cpu = first_cpu();
    pin(&mut cmd, cpu);
    let lateness = Lateness::start(cpu);
    let end = Bounded::spawn(cmd).wait(Duration::from_secs(60));
    (end, lateness.stop())
}

#[test]
fn timeout_bounds_a_guest_that_resets_at_once_on_many_vcpus() {
    require_kvm!();
    // The guest resets with its first instruction, on the boot vCPU, while
    // the VMM still starts the other 127 vCPU threads: every boot is cut
    // short during its start-up. On one host CPU (a loaded host's lot)
    // that happens every time.
    let (end, late) = reboot_loop(&["--vcpus", "128", "--timeout", "5"]);
    end.assert_code(3);
    assert!(
        end.stderr.contains("guest reset: reboot 2"),
        "no reboot loop: {}",
        end.stderr
    );
    let bound = Duration::from_secs(5) + TIMEOUT_MARGIN + late;
    assert!(
        end.took <= bound,
        "--timeout 5 ended after {:?} (bound {bound:?}, host lateness {late:?}): {}",
        end.took,
        end.stderr
    );
}

/// `vmm: the guest booted N times in all; M reboots were not logged one
/// by one`: (N, M).
fn reboot_summary(stderr: &str) -> Option<(u64, u64)> {
    let line = stderr.lines().find(|l| l.contains("times in all"))?;
    let n = line
        .split("booted ")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    let m = line.split("; ").nth(1)?.split(' ').next()?.parse().ok()?;
    Some((n, m))
}

#[test]
fn a_fast_reboot_loop_logs_a_bounded_number_of_lines_and_ends_at_its_timeout() {
    require_kvm!();
    let (end, late) = reboot_loop(&["--timeout", "3"]);
    end.assert_code(3);
    let bound = Duration::from_secs(3) + TIMEOUT_MARGIN + late;
    assert!(end.took <= bound, "took {:?} (bound {bound:?})", end.took);
    let lines = end.stderr.matches("guest reset: reboot").count() as u64;
    let (boots, unlogged) = reboot_summary(&end.stderr)
        .unwrap_or_else(|| panic!("no closing count of reboots: {}", end.stderr));
    // Every reboot is counted: on a line of its own or in the summary.
    assert_eq!(boots - 1, lines + unlogged, "{}", end.stderr);
    assert!(
        boots >= 20,
        "not a fast loop ({boots} boots): {}",
        end.stderr
    );
    // Five at once, then one a second.
    let allowed = 5 + end.took.as_secs() + 1;
    assert!(
        lines <= allowed,
        "{lines} reboot lines in {:?} (at most {allowed}): {}",
        end.took,
        end.stderr
    );
}

/// The lines of a reboot loop's stderr that name a reboot.
fn reboot_lines(stderr: &str) -> usize {
    stderr.matches("guest reset: reboot").count()
}

/// Waits (at most 10 s) until the VMM has written more than `lines`
/// reboot lines.
fn wait_for_reboot_lines(vm: &Bounded, lines: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while reboot_lines(&vm.stderr_so_far()) <= lines {
        assert!(
            Instant::now() < deadline,
            "no reboot past line {lines}: {}",
            vm.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_pause_during_a_reboot_loop_holds_across_the_reboot() {
    require_kvm!();
    // Documented: a reboot is not the VM's end, so `PUT /vm/pause` is
    // answered 200 during one, and the next boot's vCPUs hold before their
    // first instruction.
    let reset = common::build_guest("reset");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut cmd = vmm_cmd(&[
        "--serial",
        "none",
        "--on-reset",
        "reboot",
        "--timeout",
        "12",
    ]);
    cmd.arg("--kernel")
        .arg(&reset)
        .arg("--api-socket")
        .arg(&sock);
    let vm = Bounded::spawn(cmd);
    common::wait_for_api(&sock);
    // The loop runs: five reboots get their lines at once.
    wait_for_reboot_lines(&vm, 4);
    for round in 0..10 {
        let (status, body) = common::api(&sock, "PUT", "/vm/pause").unwrap();
        assert_eq!(status, 200, "pause {round}: {body}");
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["paused"], true, "{body}");
        assert_eq!(doc["all_vcpus_parked"], true, "{body}");
        if round < 9 {
            assert_eq!(common::api(&sock, "PUT", "/vm/resume").unwrap().0, 200);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Paused, the loop stands still: over 2.5 s a reboot would have had a
    // line (one a second at least), none comes.
    let lines = reboot_lines(&vm.stderr_so_far());
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        reboot_lines(&vm.stderr_so_far()),
        lines,
        "the guest rebooted while paused: {}",
        vm.stderr_so_far()
    );
    let (_, doc) = common::api(&sock, "GET", "/vpmu").unwrap();
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(doc["vm"]["paused"], true, "{doc}");
    // Resumed, the loop goes on, to its timeout.
    assert_eq!(common::api(&sock, "PUT", "/vm/resume").unwrap().0, 200);
    wait_for_reboot_lines(&vm, lines);
    let end = vm.wait(Duration::from_secs(60));
    end.assert_code(3);
}

// ---------------------------------------------------------------------------
// 10. The profiler's symbol files: bounded, never waited on, and the kernel's
// read from what was booted.

/// [`elf`] of [`halt_code`] at 2 MiB with a symbol table of `count`
/// function symbols (one per byte from 2 MiB up) that all share one name of
/// `name_len` bytes: a small file whose names, copied per symbol, are
/// gigabytes.
fn elf_with_shared_names(count: u32, name_len: usize) -> Vec<u8> {
    let code = halt_code();
    let code_at = 64 + 56;
    let mut out = elf(&[(0x200000, code.clone(), code.len() as u64)], 0x200000);
    let pad = |out: &mut Vec<u8>| out.resize(out.len().next_multiple_of(8), 0);
    pad(&mut out);
    let symtab = out.len();
    out.extend_from_slice(&[0u8; 24]);
    for i in 0..u64::from(count) {
        out.extend_from_slice(&1u32.to_le_bytes()); // the shared name
        out.push(0x12); // STB_GLOBAL, STT_FUNC
        out.push(0);
        out.extend_from_slice(&1u16.to_le_bytes()); // .text
        out.extend_from_slice(&(0x200000 + i).to_le_bytes());
        out.extend_from_slice(&1u64.to_le_bytes());
    }
    let strtab = out.len();
    out.push(0);
    out.extend(std::iter::repeat_n(b'n', name_len));
    out.push(0);
    let shstrtab = out.len();
    out.extend_from_slice(b"\0.text\0.symtab\0.strtab\0.shstrtab\0");
    let end = out.len();
    pad(&mut out);
    let shoff = out.len() as u64;
    let section = |name: u32, kind: u32, at: usize, size: usize| Section {
        name,
        kind,
        offset: at as u64,
        size: size as u64,
        ..Default::default()
    };
    let sections = [
        Section::default(),
        Section {
            flags: 6, // SHF_ALLOC | SHF_EXECINSTR
            addr: 0x200000,
            ..section(1, 1, code_at, code.len())
        },
        Section {
            link: 3,
            info: 1,
            entsize: 24,
            ..section(7, 2, symtab, strtab - symtab)
        },
        section(15, 3, strtab, shstrtab - strtab),
        section(23, 3, shstrtab, end - shstrtab),
    ];
    for s in sections {
        s.write(&mut out);
    }
    out[40..48].copy_from_slice(&shoff.to_le_bytes());
    out[58..60].copy_from_slice(&64u16.to_le_bytes());
    out[60..62].copy_from_slice(&5u16.to_le_bytes());
    out[62..64].copy_from_slice(&4u16.to_le_bytes());
    out
}

/// An ELF section header.
#[derive(Default)]
struct Section {
    name: u32,
    kind: u32,
    flags: u64,
    addr: u64,
    offset: u64,
    size: u64,
    link: u32,
    info: u32,
    entsize: u64,
}

impl Section {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.name.to_le_bytes());
        out.extend_from_slice(&self.kind.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.addr.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.link.to_le_bytes());
        out.extend_from_slice(&self.info.to_le_bytes());
        out.extend_from_slice(&8u64.to_le_bytes());
        out.extend_from_slice(&self.entsize.to_le_bytes());
    }
}

/// Memory that symbols of a small file must stay under (names copied per
/// symbol took 16 KiB x 20 000 = 320 MiB here).
const SYMBOLS_KIB: u64 = 96 * 1024;

/// `vmm profile --symbols PATH` against a socket that is not there: the
/// symbols are read before the socket is tried.
fn profile_symbols(dir: &Path, symbols: &str) -> Ended {
    let none = dir.join("none.sock");
    let args = [
        "profile",
        "--api-socket",
        none.to_str().unwrap(),
        "--symbols",
        symbols,
    ];
    run_bounded(&args, Duration::from_secs(30))
}

#[test]
fn symbol_files_that_are_not_regular_files_are_refused_never_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let fifo = fifo.to_str().unwrap();
    for (path, kind) in [(fifo, "a FIFO"), ("/dev/zero", "a character device")] {
        let end = profile_symbols(dir.path(), path);
        end.assert_bad_input(&format!("--symbols {path}: {kind}, not a regular file"));
        assert!(
            end.max_rss_kib < SYMBOLS_KIB,
            "{path}: {} KiB",
            end.max_rss_kib
        );
    }
}

#[test]
fn symbols_sharing_one_long_name_are_read_in_bounded_memory() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let shared = d.join("shared-names.elf");
    std::fs::write(&shared, elf_with_shared_names(20_000, 16 << 10)).unwrap();
    let shared = shared.to_str().unwrap();
    let end = profile_symbols(d, shared);
    eprintln!("--symbols: peak RSS {} KiB", end.max_rss_kib);
    end.assert_bad_input("no such socket");
    assert!(
        end.max_rss_kib < SYMBOLS_KIB,
        "--symbols: peak RSS {} KiB",
        end.max_rss_kib
    );

    // The same file as the kernel: its symbols named in bounded memory.
    let sock = d.join("api.sock");
    let vm = Bounded::spawn(vmm_cmd(&[
        "--kernel",
        shared,
        "--memory",
        "64",
        "--timeout",
        "60",
        "--api-socket",
        sock.to_str().unwrap(),
    ]));
    common::wait_for_api(&sock);
    let (status, body) = common::api(&sock, "GET", "/profile?seconds=0.5&hz=99").unwrap();
    assert_eq!(status, 200, "{body}");
    let p: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        p["symbols"].as_str().unwrap().starts_with("20000 symbols"),
        "{}",
        p["symbols"]
    );
    let peak = common::status_kib(vm.pid() as u32, "VmHWM");
    eprintln!("the VMM: peak RSS {peak} KiB");
    vm.signal(libc::SIGTERM);
    vm.wait(Duration::from_secs(30))
        .assert_code(128 + libc::SIGTERM);
    assert!(peak < SYMBOLS_KIB, "the VMM's peak RSS {peak} KiB");
}

#[test]
fn a_profile_names_frames_from_the_kernel_as_booted_whatever_the_path_names_later() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::copy(common::build_guest("hot_loop"), &kernel).unwrap();
    let sock = dir.path().join("api.sock");
    let vm = Bounded::spawn(vmm_cmd(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--timeout",
        "60",
        "--api-socket",
        sock.to_str().unwrap(),
    ]));
    common::wait_for_api(&sock);
    let top = || {
        // At most 10 s: a profile that waits for a FIFO's writer fails.
        let (status, body) =
            common::api(&sock, "GET", "/profile?seconds=1&hz=199").expect("an answer within 10 s");
        assert_eq!(status, 200, "{body}");
        let p: serde_json::Value = serde_json::from_str(&body).unwrap();
        p["stacks"][0]["names"][0]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // Replaced by a FIFO nobody writes: never opened.
    std::fs::remove_file(&kernel).unwrap();
    mkfifo(&kernel);
    assert_eq!(top(), "hot_loop");
    // Replaced by another kernel: the booted one still names the frames.
    std::fs::remove_file(&kernel).unwrap();
    std::fs::copy(common::build_guest("hello"), &kernel).unwrap();
    assert_eq!(top(), "hot_loop");
    vm.signal(libc::SIGTERM);
    vm.wait(Duration::from_secs(30))
        .assert_code(128 + libc::SIGTERM);
}
