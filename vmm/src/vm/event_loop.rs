//! The VMM's main thread: an `event-manager` loop over host-side file
//! descriptors (stdin for the serial console, stop notifications from vCPUs
//! and devices, the termination signals of [`super::signals`]), never
//! touching a vCPU.
//!
//! Console input is bounded: the serial device keeps at most
//! [`devices::INPUT_BUFFER`] bytes the guest has not read and drops the
//! rest. While that buffer is full, stdin is read at most every
//! [`INPUT_PAUSE`], so an endless stdin costs neither memory nor a core.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::sync::Recover;
use devices::SerialDevice;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::vcpu::control::VmControl;
use crate::vcpu::Outcome;
use crate::vm::signals;

/// Longest single wait, so that a deadline is checked often enough.
pub const MAX_WAIT: Duration = Duration::from_millis(500);
/// How long stdin rests while the guest's input buffer is full.
pub const INPUT_PAUSE: Duration = Duration::from_millis(50);
/// Largest read from stdin.
const INPUT_CHUNK: usize = 16 * 1024;

const TAG_WAKE: u32 = 1;
const TAG_STDIN: u32 = 3;
const TAG_TERMINATE: u32 = 4;
const TAG_INPUT_TIMER: u32 = 5;

/// Handles every host-side event source.
struct Controller {
    control: Arc<VmControl>,
    serial: Arc<Mutex<SerialDevice>>,
    terminate_evt: EventFd,
    /// Ends an input pause.
    input_timer: TimerFd,
    /// Stdin is registered (not at its end, not paused).
    stdin_registered: bool,
}

impl Controller {
    fn stdin_events() -> Events {
        Events::with_data_raw(libc::STDIN_FILENO, TAG_STDIN, EventSet::IN)
    }

    fn read_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; INPUT_CHUNK];
        match std::io::stdin().lock().read(&mut buf) {
            Ok(0) => self.drop_stdin(ops),
            Ok(n) => {
                let mut serial = self.serial.lock().recover();
                serial.queue_input(&buf[..n]);
                if serial.input_full() {
                    drop(serial);
                    // The guest does not read: rest, then read (and drop)
                    // again, instead of spinning on an endless stdin.
                    if self.input_timer.reset(INPUT_PAUSE, None).is_ok() {
                        let _ = ops.remove(Self::stdin_events());
                        self.stdin_registered = false;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => self.drop_stdin(ops),
        }
    }

    fn drop_stdin(&mut self, ops: &mut EventOps) {
        let _ = ops.remove(Self::stdin_events());
        self.stdin_registered = false;
    }
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        let input = EventSet::IN;
        let sources = [
            (self.control.wake.as_raw_fd(), TAG_WAKE),
            (self.terminate_evt.as_raw_fd(), TAG_TERMINATE),
            (self.input_timer.as_raw_fd(), TAG_INPUT_TIMER),
        ];
        for (fd, tag) in sources {
            // These are our own descriptors: adding them cannot fail short of
            // running out of memory, and then the timeouts still run the loop.
            let _ = ops.add(Events::with_data_raw(fd, tag, input));
        }
        // Stdin may be a file or /dev/null, which epoll refuses: then the
        // guest simply gets no input.
        self.stdin_registered = ops.add(Self::stdin_events()).is_ok();
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TAG_WAKE => {
                let _ = self.control.wake.read();
            }
            TAG_TERMINATE => {
                let _ = self.terminate_evt.read();
                if let Some(signal) = signals::pending() {
                    self.control.finish(Outcome::Terminated { signal });
                }
            }
            TAG_STDIN => self.read_stdin(ops),
            TAG_INPUT_TIMER => {
                let _ = self.input_timer.wait();
                if !self.stdin_registered {
                    self.stdin_registered = ops.add(Self::stdin_events()).is_ok();
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
    /// The loop, with the termination signals waking it (a signal that
    /// came during start-up is seen at its first round).
    pub fn new(control: Arc<VmControl>, serial: Arc<Mutex<SerialDevice>>) -> std::io::Result<Self> {
        let terminate_evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let input_timer = TimerFd::new().map_err(std::io::Error::from)?;
        let mut manager = EventManager::new().map_err(|e| std::io::Error::other(e.to_string()))?;
        signals::set_wake_fd(terminate_evt.as_raw_fd());
        let controller: Box<dyn MutEventSubscriber> = Box::new(Controller {
            control,
            serial,
            terminate_evt,
            input_timer,
            stdin_registered: false,
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
        signals::clear_wake_fd();
    }
}
