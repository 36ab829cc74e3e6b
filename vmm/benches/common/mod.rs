//! Shared by the benchmark binaries.

use std::process::Child;
use std::time::{Duration, Instant};

/// Waits for `child` to exit, polling its peak RSS (VmHWM) meanwhile.
/// Returns (wait status, peak RSS in KiB, time until the exit was seen).
///
/// `wait4()`'s `ru_maxrss` is not used: a spawned child inherits the
/// spawning process's RSS as its high-water mark, so it would report the
/// benchmark's own memory whenever that is larger than the VMM's.
// The child is reaped with waitpid().
#[allow(clippy::zombie_processes)]
pub fn wait_with_peak_rss(child: Child, started: Instant) -> (i32, i64, Duration) {
    let pid = child.id() as i32;
    let mut hwm_kib = 0;
    let mut status = 0;
    loop {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let hwm = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok());
            hwm_kib = hwm_kib.max(hwm.unwrap_or(0));
        }
        // SAFETY: polls our own child; status is a valid pointer.
        let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(done >= 0, "waitpid");
        if done == pid {
            return (status, hwm_kib, started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
