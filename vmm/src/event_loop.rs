//! The VMM's main thread: an `event-manager` loop over host-side file
//! descriptors (stdin for the serial console, stop notifications from vCPUs
//! and devices, SIGINT/SIGTERM), never touching a vCPU.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::SerialDevice;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::error::Outcome;
use crate::vcpu::VmControl;

/// Longest single wait, so that a deadline is checked often enough.
pub const MAX_WAIT: Duration = Duration::from_millis(500);

const TAG_WAKE: u32 = 1;
const TAG_STDIN: u32 = 3;
const TAG_TERMINATE: u32 = 4;

// The eventfd SIGINT/SIGTERM write to, and which signal came.
static TERMINATE_FD: AtomicI32 = AtomicI32::new(-1);
static TERMINATE_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_terminate(signal: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERMINATE_SIGNAL.store(signal, Ordering::SeqCst);
    let fd = TERMINATE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live u64 and
        // the fd is an eventfd that lives as long as the main loop.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// Handles every host-side event source.
struct Controller {
    control: Arc<VmControl>,
    serial: Arc<Mutex<SerialDevice>>,
    terminate_evt: EventFd,
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        let input = EventSet::IN;
        let sources = [
            (self.control.wake.as_raw_fd(), TAG_WAKE),
            (self.terminate_evt.as_raw_fd(), TAG_TERMINATE),
        ];
        for (fd, tag) in sources {
            // These are our own eventfds: adding them cannot fail short of
            // running out of memory, and then the timeouts still run the loop.
            let _ = ops.add(Events::with_data_raw(fd, tag, input));
        }
        // Stdin may be a file or /dev/null, which epoll refuses: then the
        // guest simply gets no input.
        let _ = ops.add(Events::with_data_raw(libc::STDIN_FILENO, TAG_STDIN, input));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TAG_WAKE => {
                let _ = self.control.wake.read();
            }
            TAG_TERMINATE => {
                let _ = self.terminate_evt.read();
                let signal = TERMINATE_SIGNAL.load(Ordering::SeqCst);
                self.control.finish(Outcome::Terminated { signal });
            }
            TAG_STDIN => {
                let mut buf = [0u8; 1024];
                match std::io::stdin().lock().read(&mut buf) {
                    Ok(0) => {
                        let _ = ops.remove(events);
                    }
                    Ok(n) => self
                        .serial
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .queue_input(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        let _ = ops.remove(events);
                    }
                }
            }
            _ => {}
        }
    }
}

/// The main thread's event loop.
pub struct MainLoop {
    manager: EventManager<Box<dyn MutEventSubscriber>>,
}

impl MainLoop {
    pub fn new(control: Arc<VmControl>, serial: Arc<Mutex<SerialDevice>>) -> std::io::Result<Self> {
        let terminate_evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        TERMINATE_FD.store(terminate_evt.as_raw_fd(), Ordering::SeqCst);
        for signal in [libc::SIGINT, libc::SIGTERM] {
            vmm_sys_util::signal::register_signal_handler(signal, on_terminate)
                .map_err(std::io::Error::from)?;
        }
        let mut manager = EventManager::new().map_err(|e| std::io::Error::other(e.to_string()))?;
        let controller: Box<dyn MutEventSubscriber> = Box::new(Controller {
            control,
            serial,
            terminate_evt,
        });
        manager.add_subscriber(controller);
        Ok(Self { manager })
    }

    /// Waits up to `timeout` and handles whatever is ready.
    pub fn run_once(&mut self, timeout: Duration) {
        let ms = timeout.as_millis().clamp(0, i32::MAX as u128) as i32;
        // An epoll failure (EINTR from a signal) just ends this round.
        let _ = self.manager.run_with_timeout(ms);
    }
}

impl Drop for MainLoop {
    fn drop(&mut self) {
        // The eventfd closes with the manager; late signals must not write
        // to whatever reuses its number.
        TERMINATE_FD.store(-1, Ordering::SeqCst);
    }
}
