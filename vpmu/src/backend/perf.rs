//! [`Backend`] on Linux `perf_event_open(2)`: one event per virtual counter
//! on the vCPU thread (`pid` = its tid, `cpu` = -1), so the host scheduler
//! switches it with the thread.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use perf_event_open_sys::bindings::{
    perf_event_attr, perf_event_mmap_page, PERF_COUNT_HW_CPU_CYCLES, PERF_COUNT_SW_TASK_CLOCK,
    PERF_FLAG_FD_CLOEXEC, PERF_FORMAT_TOTAL_TIME_ENABLED, PERF_FORMAT_TOTAL_TIME_RUNNING,
    PERF_TYPE_HARDWARE, PERF_TYPE_RAW, PERF_TYPE_SOFTWARE,
};
use perf_event_open_sys::{ioctls, perf_event_open};

use super::{Backend, BackendError, EventSource, EventSpec, OverflowNotify, Reading};

// glibc's fcntl constants that the libc crate does not export for Linux.
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

/// `struct f_owner_ex` of fcntl(2).
#[repr(C)]
struct FOwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

/// Handle of a [`PerfBackend`] event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PerfHandle(u32);

/// An event's first mmap page (`struct perf_event_mmap_page`), read-only:
/// the kernel updates it, under its seqcount `lock`, whenever the event is
/// scheduled in or out with its thread.
#[derive(Debug)]
struct UserPage(std::ptr::NonNull<perf_event_mmap_page>);

impl UserPage {
    fn map(fd: RawFd) -> Option<Self> {
        // SAFETY: sysconf has no memory effects.
        let len = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // SAFETY: maps one read-only shared page of a perf fd (no ring
        // buffer: the kernel allows the first page alone); checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        std::ptr::NonNull::new(ptr.cast()).map(Self)
    }

    /// The seqcount, or None while the kernel is updating the page.
    fn lock(&self) -> Option<u32> {
        // SAFETY: the page stays mapped for as long as `self` lives; the
        // kernel writes the field concurrently, hence the volatile read.
        let lock = unsafe { std::ptr::addr_of!((*self.0.as_ptr()).lock).read_volatile() };
        (lock & 1 == 0).then_some(lock)
    }
}

// SAFETY: a read-only mapping owned by this value; reading it from any
// thread is sound (the kernel's updates are read volatile).
unsafe impl Send for UserPage {}
// SAFETY: as for Send: `&UserPage` only allows volatile reads.
unsafe impl Sync for UserPage {}

impl Drop for UserPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the page `map` mapped.
        unsafe {
            let len = libc::sysconf(libc::_SC_PAGESIZE) as usize;
            libc::munmap(self.0.as_ptr().cast(), len);
        }
    }
}

/// One open event; its user page is mapped on first use.
#[derive(Debug)]
struct Event {
    // Declared first: unmapped before the fd closes.
    page: Option<UserPage>,
    fd: OwnedFd,
}

/// Host perf events of one vCPU thread.
#[derive(Debug)]
pub struct PerfBackend {
    pid: libc::pid_t,
    notify: Option<OverflowNotify>,
    events: Vec<Option<Event>>,
}

impl PerfBackend {
    /// Events on thread `tid` (0 = the calling thread).
    pub fn new(tid: libc::pid_t) -> Self {
        Self {
            pid: tid,
            notify: None,
            events: Vec::new(),
        }
    }

    /// The calling thread's id, to pass as `tid` or in [`OverflowNotify`].
    pub fn current_tid() -> libc::pid_t {
        // SAFETY: gettid has no arguments and cannot fail.
        unsafe { libc::gettid() }
    }

    /// Whether this host can count hardware events: opens and closes one
    /// cycles event on the calling thread. The error says why not.
    pub fn probe_hardware() -> Result<(), BackendError> {
        let mut attr = base_attr();
        attr.type_ = PERF_TYPE_HARDWARE;
        attr.config = PERF_COUNT_HW_CPU_CYCLES as u64;
        open_fd(&mut attr, 0).map(drop)
    }

    /// Whether this kernel bumps an event's user-page seqcount when its
    /// thread is scheduled out and in, which [`Backend::schedule_epoch`]
    /// relies on: opens a task-clock event on the calling thread, sleeps
    /// 2 ms and looks. Checked once per process (the first call sleeps).
    pub fn probe_schedule_epoch() -> bool {
        static BUMPS: OnceLock<bool> = OnceLock::new();
        *BUMPS.get_or_init(|| {
            let mut attr = base_attr();
            attr.type_ = PERF_TYPE_SOFTWARE;
            attr.config = PERF_COUNT_SW_TASK_CLOCK as u64;
            attr.set_disabled(0);
            let Ok(fd) = open_fd(&mut attr, 0) else {
                return false;
            };
            let Some(page) = UserPage::map(fd.as_raw_fd()) else {
                return false;
            };
            let before = page.lock();
            std::thread::sleep(std::time::Duration::from_millis(2));
            let after = page.lock();
            before.is_some() && after.is_some() && before != after
        })
    }

    /// Open events right now.
    pub fn open_events(&self) -> usize {
        self.events.iter().flatten().count()
    }

    fn fd(&self, handle: PerfHandle) -> Result<RawFd, BackendError> {
        match self.events.get(handle.0 as usize) {
            Some(Some(event)) => Ok(event.fd.as_raw_fd()),
            _ => Err(BackendError::UnknownHandle(handle.0 as u64)),
        }
    }

    fn insert(&mut self, fd: OwnedFd) -> PerfHandle {
        let slot = self
            .events
            .iter()
            .position(Option::is_none)
            .unwrap_or_else(|| {
                self.events.push(None);
                self.events.len() - 1
            });
        self.events[slot] = Some(Event { page: None, fd });
        PerfHandle(slot as u32)
    }
}

fn base_attr() -> perf_event_attr {
    let mut attr = perf_event_attr {
        size: size_of::<perf_event_attr>() as u32,
        read_format: (PERF_FORMAT_TOTAL_TIME_ENABLED | PERF_FORMAT_TOTAL_TIME_RUNNING) as u64,
        ..Default::default()
    };
    attr.set_disabled(1);
    attr.set_exclude_hv(1);
    attr
}

fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn open_fd(attr: &mut perf_event_attr, pid: libc::pid_t) -> Result<OwnedFd, BackendError> {
    // SAFETY: attr is a fully initialised perf_event_attr with its size set;
    // the kernel only reads it (and may write its size field).
    let fd = unsafe { perf_event_open(attr, pid, -1, -1, PERF_FLAG_FD_CLOEXEC as libc::c_ulong) };
    if fd < 0 {
        return Err(BackendError::from_errno("perf_event_open", last_errno()));
    }
    // SAFETY: fd was just returned by perf_event_open and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Routes overflow signals of `fd` to `notify.tid` as `notify.signal`.
fn route_overflows(fd: RawFd, notify: &OverflowNotify) -> Result<(), BackendError> {
    let owner = FOwnerEx {
        kind: F_OWNER_TID,
        pid: notify.tid,
    };
    // SAFETY: fcntl on a valid fd; F_SETOWN_EX reads one f_owner_ex that
    // lives across the call, F_SETSIG/F_GETFL/F_SETFL take integers.
    unsafe {
        if libc::fcntl(fd, F_SETOWN_EX, &owner as *const FOwnerEx) < 0 {
            return Err(BackendError::from_errno("fcntl(F_SETOWN_EX)", last_errno()));
        }
        if libc::fcntl(fd, F_SETSIG, notify.signal) < 0 {
            return Err(BackendError::from_errno("fcntl(F_SETSIG)", last_errno()));
        }
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_ASYNC) < 0 {
            return Err(BackendError::from_errno("fcntl(O_ASYNC)", last_errno()));
        }
    }
    Ok(())
}

/// Runs one perf ioctl; `call` gets the fd.
fn ioctl(
    what: &'static str,
    fd: RawFd,
    call: impl FnOnce(RawFd) -> libc::c_int,
) -> Result<(), BackendError> {
    if call(fd) < 0 {
        return Err(BackendError::from_errno(what, last_errno()));
    }
    Ok(())
}

impl Backend for PerfBackend {
    type Handle = PerfHandle;

    fn open(&mut self, spec: &EventSpec) -> Result<PerfHandle, BackendError> {
        let mut attr = base_attr();
        match spec.source {
            EventSource::HardwareRaw { config } => {
                attr.type_ = PERF_TYPE_RAW;
                attr.config = config;
            }
            EventSource::SoftwareClock => {
                attr.type_ = PERF_TYPE_SOFTWARE;
                attr.config = PERF_COUNT_SW_TASK_CLOCK as u64;
            }
            EventSource::HardwareCycles => {
                attr.type_ = PERF_TYPE_HARDWARE;
                attr.config = PERF_COUNT_HW_CPU_CYCLES as u64;
            }
        }
        attr.set_exclude_user(spec.exclude_user as u64);
        attr.set_exclude_kernel(spec.exclude_kernel as u64);
        attr.set_exclude_host(spec.exclude_host as u64);
        attr.set_pinned(spec.pinned as u64);
        if let Some(period) = spec.sample_period {
            attr.__bindgen_anon_1.sample_period = period.max(1);
        }
        let fd = open_fd(&mut attr, self.pid)?;
        if let (Some(notify), Some(_)) = (self.notify, spec.sample_period) {
            route_overflows(fd.as_raw_fd(), &notify)?;
        }
        Ok(self.insert(fd))
    }

    fn start(&mut self, handle: PerfHandle) -> Result<(), BackendError> {
        // SAFETY: ENABLE on a perf fd this backend owns; the argument is unused.
        ioctl("PERF_EVENT_IOC_ENABLE", self.fd(handle)?, |fd| unsafe {
            ioctls::ENABLE(fd, 0)
        })
    }

    fn stop(&mut self, handle: PerfHandle) -> Result<(), BackendError> {
        // SAFETY: DISABLE on a perf fd this backend owns; the argument is unused.
        ioctl("PERF_EVENT_IOC_DISABLE", self.fd(handle)?, |fd| unsafe {
            ioctls::DISABLE(fd, 0)
        })
    }

    fn read(&mut self, handle: PerfHandle) -> Result<Reading, BackendError> {
        let fd = self.fd(handle)?;
        let mut words = [0u64; 3];
        // SAFETY: reads at most size_of_val(&words) bytes into a local buffer.
        let n = unsafe { libc::read(fd, words.as_mut_ptr().cast(), size_of::<[u64; 3]>()) };
        match n {
            n if n < 0 => Err(BackendError::from_errno("read", last_errno())),
            // perf returns EOF for a pinned event it could not schedule.
            0 => Err(BackendError::Evicted),
            _ => Ok(Reading {
                value: words[0],
                time_enabled: words[1],
                time_running: words[2],
            }),
        }
    }

    fn set_period(&mut self, handle: PerfHandle, period: u64) -> Result<(), BackendError> {
        // SAFETY: PERIOD takes a pointer to a u64 that lives across the call.
        ioctl("PERF_EVENT_IOC_PERIOD", self.fd(handle)?, |fd| unsafe {
            libc::ioctl(
                fd,
                perf_event_open_sys::bindings::PERIOD as _,
                &period as *const u64,
            )
        })
    }

    fn close(&mut self, handle: PerfHandle) {
        if let Some(slot) = self.events.get_mut(handle.0 as usize) {
            *slot = None;
        }
    }

    fn set_overflow_notify(&mut self, notify: Option<OverflowNotify>) {
        self.notify = notify;
    }

    /// The event's user-page seqcount: the kernel bumps it when the event
    /// is scheduled out or in with the thread (it does not for a thread
    /// that keeps its CPU). Only meaningful for events of the calling
    /// thread.
    fn schedule_epoch(&mut self, handle: PerfHandle) -> Option<u32> {
        if !Self::probe_schedule_epoch() {
            return None;
        }
        let event = self.events.get_mut(handle.0 as usize)?.as_mut()?;
        if event.page.is_none() {
            event.page = UserPage::map(event.fd.as_raw_fd());
        }
        event.page.as_ref()?.lock()
    }
}
