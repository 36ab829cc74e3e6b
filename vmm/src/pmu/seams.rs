//! Test-only seams for the robustness tests (`tests/robustness.rs`): host
//! faults injected where the real ones would come from. Compiled only with
//! the `test-seams` feature, which `cargo test` turns on (see
//! `vmm/Cargo.toml`); other builds get the inert stand-ins of
//! `no_seams.rs`. Read once from the environment when the first vPMU is
//! built; never set in normal use, and when one is set the VMM says so on
//! stderr.
//!
//! - `VMM_TEST_PERF_FAULT=PATH`: while the file PATH exists and names an
//!   errno (`ENOENT`, `EACCES`, `EPERM`, `EMFILE`, `EBUSY`, `ENOSPC`,
//!   `EINVAL`, or a number), every `perf_event_open` of the vPMU fails with
//!   it before reaching the kernel, as if the host had refused. The whole
//!   refusal path runs as it would for a real refusal: the counter is
//!   unbacked with the reason in the export, one log line, bounded retries,
//!   recovery once the file is gone. The file is read at each open (opens
//!   are rare: one per programming, plus retries at most every 100 ms).
//!   `panic` in the file makes the open panic instead: a VMM bug on the
//!   vCPU thread, which must stop the VM, not hang it.
//! - `VMM_TEST_EXIT_DELAY_US=N`: after handling each PMU MSR exit the vCPU
//!   thread busy-waits N us: host CPU time on the vCPU thread between exit
//!   and entry, which must never be counted as guest time.
//!
//! Without either variable [`HostBackend`] is [`PerfBackend`] with one
//! branch per open, and no exit waits.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vpmu::backend::gate::{Gated, OpenGate};
use vpmu::backend::perf::PerfBackend;
use vpmu::{BackendError, EventSpec};

pub const PERF_FAULT_VAR: &str = "VMM_TEST_PERF_FAULT";
pub const EXIT_DELAY_VAR: &str = "VMM_TEST_EXIT_DELAY_US";

/// The seams in force.
#[derive(Debug, Default)]
pub struct Seams {
    pub perf_fault: Option<PathBuf>,
    pub exit_delay: Option<Duration>,
}

/// The seams, read from the environment on first use.
pub fn seams() -> &'static Seams {
    static SEAMS: OnceLock<Seams> = OnceLock::new();
    SEAMS.get_or_init(|| {
        let seams = Seams {
            perf_fault: std::env::var_os(PERF_FAULT_VAR).map(PathBuf::from),
            exit_delay: std::env::var(EXIT_DELAY_VAR)
                .ok()
                .and_then(|us| us.trim().parse().ok())
                .filter(|&us| us > 0)
                .map(Duration::from_micros),
        };
        if let Some(path) = &seams.perf_fault {
            eprintln!(
                "vmm: TEST SEAM {PERF_FAULT_VAR}: perf_event_open fails with the errno named in \
                 {} while it exists",
                path.display()
            );
        }
        if let Some(delay) = seams.exit_delay {
            eprintln!("vmm: TEST SEAM {EXIT_DELAY_VAR}: every PMU MSR exit costs {delay:?} more");
        }
        seams
    })
}

/// The exit delay seam of one vCPU.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExitDelay(Option<Duration>);

impl ExitDelay {
    pub fn from_env() -> Self {
        Self(seams().exit_delay)
    }

    /// Busy-waits the delay after a PMU MSR exit.
    pub fn wait(self) {
        if let Some(delay) = self.0 {
            let start = Instant::now();
            while start.elapsed() < delay {
                std::hint::spin_loop();
            }
        }
    }
}

/// The host backend of a vCPU.
pub fn host_backend(perf: PerfBackend) -> HostBackend {
    Gated {
        inner: perf,
        gate: FaultFile(seams().perf_fault.as_deref()),
    }
}

/// The errno named in `text`: a name or a number.
fn parse_errno(text: &str) -> Option<i32> {
    let text = text.trim();
    Some(match text {
        "ENOENT" => libc::ENOENT,
        "EACCES" => libc::EACCES,
        "EPERM" => libc::EPERM,
        "EMFILE" => libc::EMFILE,
        "EBUSY" => libc::EBUSY,
        "ENOSPC" => libc::ENOSPC,
        "EINVAL" => libc::EINVAL,
        _ => text.parse().ok().filter(|&n: &i32| n > 0)?,
    })
}

/// The `VMM_TEST_PERF_FAULT` file, the gate of [`HostBackend`]'s opens.
#[derive(Debug)]
pub struct FaultFile(Option<&'static Path>);

impl FaultFile {
    /// The errno the fault file names right now, if any. `panic` in the
    /// file stands for a bug in the VMM: the vCPU thread panics.
    fn injected(&self) -> Option<i32> {
        let path = self.0?;
        let text = std::fs::read_to_string(path).ok()?;
        if text.trim() == "panic" {
            panic!("test seam {PERF_FAULT_VAR}: injected panic in perf_event_open");
        }
        parse_errno(&text)
    }
}

impl OpenGate for FaultFile {
    fn refusal(&mut self, _spec: &EventSpec) -> Option<BackendError> {
        let errno = self.injected()?;
        Some(BackendError::from_errno("perf_event_open", errno))
    }
}

/// The host backend of a vCPU: perf, plus the fault seam when it is set.
pub type HostBackend = Gated<PerfBackend, FaultFile>;

#[cfg(test)]
mod tests {
    use super::*;
    use vpmu::Backend;

    #[test]
    fn errno_names_and_numbers_parse() {
        assert_eq!(parse_errno("EMFILE\n"), Some(libc::EMFILE));
        assert_eq!(parse_errno(" 16 "), Some(libc::EBUSY));
        assert_eq!(parse_errno(""), None);
        assert_eq!(parse_errno("-1"), None);
        assert_eq!(parse_errno("nonsense"), None);
    }

    #[test]
    fn the_fault_file_refuses_opens_while_it_names_an_errno() {
        let dir = tempfile::tempdir().unwrap();
        let path: &'static std::path::Path = Box::leak(dir.path().join("fault").into_boxed_path());
        let mut backend = Gated {
            inner: PerfBackend::new(0),
            gate: FaultFile(Some(path)),
        };
        let clock = EventSpec::clock(None);
        std::fs::write(path, "EACCES").unwrap();
        let error = backend.open(&clock).unwrap_err();
        assert!(
            matches!(error, BackendError::PermissionDenied { .. }),
            "{error}"
        );
        std::fs::write(path, "EBUSY").unwrap();
        assert!(backend
            .open(&clock)
            .unwrap_err()
            .to_string()
            .contains("EBUSY"));
        std::fs::remove_file(path).unwrap();
        let handle = backend.open(&clock).expect("task-clock opens again");
        backend.close(handle);
    }
}
