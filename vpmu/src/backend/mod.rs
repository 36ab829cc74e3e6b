//! Host counters that back virtual counters.
//!
//! A [`Backend`] opens one host event per (virtual counter, programming)
//! and then only starts, stops, reads and re-arms it; [`crate::Vpmu`]
//! decides when. [`perf::PerfBackend`] is the real one (`perf_event_open`
//! on the vCPU thread), [`fake::FakeBackend`] a scriptable one for tests,
//! and [`gate::Gated`] one whose opens a test may refuse first.

pub mod fake;
pub mod gate;
pub mod perf;

use std::fmt::Debug;

use thiserror::Error;

/// What a host event counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventSource {
    /// Same-vendor raw hardware event (`PERF_TYPE_RAW`), `config` holding the
    /// event-select bits (event, umask, edge, inv, cmask).
    HardwareRaw {
        /// Raw config.
        config: u64,
    },
    /// Host task-clock of the vCPU thread, in nanoseconds.
    SoftwareClock,
    /// The host's generic core cycles (`PERF_TYPE_HARDWARE` cycles), for a
    /// sampler that needs no particular vendor's event (the VMM's guest
    /// profiler).
    HardwareCycles,
}

/// Everything needed to open one host event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventSpec {
    /// What to count.
    pub source: EventSource,
    /// Do not count guest user mode (guest USR clear).
    pub exclude_user: bool,
    /// Do not count guest kernel mode (guest OS clear).
    pub exclude_kernel: bool,
    /// Count only while the guest runs (hardware events).
    pub exclude_host: bool,
    /// Keep the event on a hardware counter or put it in error state.
    pub pinned: bool,
    /// Overflow (and notify) every this many units; `None` counts only.
    pub sample_period: Option<u64>,
}

impl EventSpec {
    /// A raw hardware event for a guest event select.
    pub fn hardware(config: u64, usr: bool, os: bool, sample_period: u64) -> Self {
        Self {
            source: EventSource::HardwareRaw { config },
            exclude_user: !usr,
            exclude_kernel: !os,
            exclude_host: true,
            pinned: true,
            sample_period: Some(sample_period),
        }
    }

    /// Core cycles of the guest only (host time excluded), sampled every
    /// `sample_period` cycles.
    pub fn guest_cycles(sample_period: u64) -> Self {
        Self {
            source: EventSource::HardwareCycles,
            exclude_user: false,
            exclude_kernel: false,
            exclude_host: true,
            pinned: false,
            sample_period: Some(sample_period),
        }
    }

    /// A task-clock event; counts thread time in host user and kernel
    /// mode alike (the vCPU thread runs the guest from host kernel mode).
    pub fn clock(sample_period: Option<u64>) -> Self {
        Self {
            source: EventSource::SoftwareClock,
            exclude_user: false,
            exclude_kernel: false,
            exclude_host: false,
            pinned: false,
            sample_period,
        }
    }
}

/// One read of a host event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// Count (events, or nanoseconds for clocks).
    pub value: u64,
    /// Nanoseconds the event was enabled.
    pub time_enabled: u64,
    /// Nanoseconds it was on a counter (less than enabled: multiplexed).
    pub time_running: u64,
}

/// Where overflow notifications go: `signal` to thread `tid`, which makes
/// its `KVM_RUN` return `EINTR`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverflowNotify {
    /// Thread id of the vCPU thread.
    pub tid: i32,
    /// Signal number (the VMM installs a handler for it).
    pub signal: i32,
}

/// A host counter operation failed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum BackendError {
    /// The host cannot count this kind of event at all.
    #[error("host has no such event ({what}: {errno_name})")]
    NotSupported {
        /// The failed operation.
        what: &'static str,
        /// errno.
        errno: i32,
        /// errno's name.
        errno_name: &'static str,
    },
    /// perf refused this event (invalid config, no counter free, ...).
    #[error("host refused the event ({what}: {errno_name}, errno {errno})")]
    Refused {
        /// The failed operation.
        what: &'static str,
        /// errno.
        errno: i32,
        /// errno's name.
        errno_name: &'static str,
    },
    /// Not allowed (perf_event_paranoid, capabilities).
    #[error("not permitted to open host events ({what}: {errno_name})")]
    PermissionDenied {
        /// The failed operation.
        what: &'static str,
        /// errno.
        errno: i32,
        /// errno's name.
        errno_name: &'static str,
    },
    /// Any other operating-system error.
    #[error("{what} failed: {errno_name} (errno {errno})")]
    Os {
        /// The failed operation.
        what: &'static str,
        /// errno.
        errno: i32,
        /// errno's name.
        errno_name: &'static str,
    },
    /// A pinned event lost its hardware counter (perf put it in error state).
    #[error("the host took the pinned counter away (event in error state)")]
    Evicted,
    /// The handle is not (or no longer) open.
    #[error("no open host event with handle {0}")]
    UnknownHandle(u64),
    /// An error a test injected.
    #[error("injected failure: {0}")]
    Injected(&'static str),
}

impl BackendError {
    /// Builds the error for `errno` from operation `what`.
    pub fn from_errno(what: &'static str, errno: i32) -> Self {
        let errno_name = errno_name(errno);
        match errno {
            libc::ENOENT | libc::EOPNOTSUPP | libc::ENODEV => Self::NotSupported {
                what,
                errno,
                errno_name,
            },
            libc::EACCES | libc::EPERM => Self::PermissionDenied {
                what,
                errno,
                errno_name,
            },
            libc::EINVAL | libc::EBUSY | libc::ENOSPC | libc::E2BIG | libc::EMFILE => {
                Self::Refused {
                    what,
                    errno,
                    errno_name,
                }
            }
            _ => Self::Os {
                what,
                errno,
                errno_name,
            },
        }
    }

    /// True when the failure says the host has no hardware events at all,
    /// so trying other hardware events is pointless.
    pub fn means_no_hardware(&self) -> bool {
        matches!(self, Self::NotSupported { .. })
    }
}

fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::ENOENT => "ENOENT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENODEV => "ENODEV",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EINVAL => "EINVAL",
        libc::EBUSY => "EBUSY",
        libc::ENOSPC => "ENOSPC",
        libc::E2BIG => "E2BIG",
        libc::EMFILE => "EMFILE",
        libc::EBADF => "EBADF",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        _ => "errno",
    }
}

/// Host counters for one vCPU.
///
/// Events are opened disabled; `start` enables, `stop` disables without
/// losing the count or the remaining sample period.
pub trait Backend {
    /// Identifies one open event.
    type Handle: Copy + Eq + Debug;

    /// Opens an event (disabled). With a sample period, the event notifies
    /// as set by [`Backend::set_overflow_notify`] on every overflow.
    fn open(&mut self, spec: &EventSpec) -> Result<Self::Handle, BackendError>;
    /// Starts counting.
    fn start(&mut self, handle: Self::Handle) -> Result<(), BackendError>;
    /// Stops counting; the count and remaining period are kept.
    fn stop(&mut self, handle: Self::Handle) -> Result<(), BackendError>;
    /// Reads count and times.
    fn read(&mut self, handle: Self::Handle) -> Result<Reading, BackendError>;
    /// Sets the sample period, counted from now.
    fn set_period(&mut self, handle: Self::Handle, period: u64) -> Result<(), BackendError>;
    /// Closes the event.
    fn close(&mut self, handle: Self::Handle);
    /// A value that changes whenever the calling thread is scheduled out,
    /// read from event `handle` without a system call; `None` if the
    /// backend cannot tell (the default). Equal values at two points mean
    /// the thread stayed on its CPU in between, so a clock event advanced
    /// by the wall time between them.
    fn schedule_epoch(&mut self, handle: Self::Handle) -> Option<u32> {
        let _ = handle;
        None
    }
    /// Where overflows of sampling events opened from now on are notified
    /// (`None`: nowhere; the VMM then polls with
    /// [`crate::Vpmu::handle_host_overflow`]).
    fn set_overflow_notify(&mut self, notify: Option<OverflowNotify>);
}
