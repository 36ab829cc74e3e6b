//! A scriptable [`Backend`] for tests: counts its calls, lets a test make
//! events count and fail.

use super::{Backend, BackendError, EventSource, EventSpec, OverflowNotify, Reading};

/// One event of a [`FakeBackend`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeEvent {
    /// How it was opened.
    pub spec: EventSpec,
    /// Counting now.
    pub running: bool,
    /// Current count.
    pub value: u64,
    /// Current sample period.
    pub period: Option<u64>,
    /// Count when the period was last set (or the event opened).
    pub armed_at: u64,
    /// Closed.
    pub closed: bool,
    /// Notification target when it was opened.
    pub notify: Option<OverflowNotify>,
}

/// How often each operation was called.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FakeCalls {
    /// `open` calls (failed ones included).
    pub open: u64,
    /// `start` calls.
    pub start: u64,
    /// `stop` calls.
    pub stop: u64,
    /// `read` calls.
    pub read: u64,
    /// `set_period` calls.
    pub set_period: u64,
    /// `close` calls.
    pub close: u64,
}

/// A backend whose events count only when the test says so.
#[derive(Clone, Debug)]
pub struct FakeBackend {
    /// Every event ever opened, indexed by handle.
    pub events: Vec<FakeEvent>,
    /// Call counts.
    pub calls: FakeCalls,
    /// Whether hardware events open (`false`: they fail like a host
    /// without a PMU, with ENOENT).
    pub hardware: bool,
    /// Whether software clock events open.
    pub software: bool,
    /// Fails the next open with this error.
    pub fail_next_open: Option<BackendError>,
    /// Fails every open with this error while set (a host that refuses
    /// events for a while: no free counter, no descriptor, no permission).
    pub fail_opens: Option<BackendError>,
    notify: Option<OverflowNotify>,
}

impl Default for FakeBackend {
    fn default() -> Self {
        Self::new(true)
    }
}

impl FakeBackend {
    /// A fake host; `hardware` says whether it has a hardware PMU.
    pub fn new(hardware: bool) -> Self {
        Self {
            events: Vec::new(),
            calls: FakeCalls::default(),
            hardware,
            software: true,
            fail_next_open: None,
            fail_opens: None,
            notify: None,
        }
    }

    /// Adds `delta` to every running hardware event (`hardware`) or every
    /// running clock event; returns the handles whose sample period elapsed.
    pub fn advance(&mut self, hardware: bool, delta: u64) -> Vec<u32> {
        let mut fired = Vec::new();
        for (handle, event) in self.events.iter_mut().enumerate() {
            let is_hw = !matches!(event.spec.source, EventSource::SoftwareClock);
            if event.closed || !event.running || is_hw != hardware {
                continue;
            }
            event.value += delta;
            if let Some(period) = event.period {
                if event.value - event.armed_at >= period {
                    fired.push(handle as u32);
                    event.armed_at += period * ((event.value - event.armed_at) / period);
                }
            }
        }
        fired
    }

    /// Open (not closed) events.
    pub fn open_events(&self) -> impl Iterator<Item = &FakeEvent> {
        self.events.iter().filter(|e| !e.closed)
    }

    fn event(&mut self, handle: u32) -> Result<&mut FakeEvent, BackendError> {
        match self.events.get_mut(handle as usize) {
            Some(event) if !event.closed => Ok(event),
            _ => Err(BackendError::UnknownHandle(handle as u64)),
        }
    }
}

impl Backend for FakeBackend {
    type Handle = u32;

    fn open(&mut self, spec: &EventSpec) -> Result<u32, BackendError> {
        self.calls.open += 1;
        if let Some(error) = self.fail_next_open.take().or(self.fail_opens.clone()) {
            return Err(error);
        }
        let available = match spec.source {
            EventSource::HardwareRaw { .. } | EventSource::HardwareCycles => self.hardware,
            EventSource::SoftwareClock => self.software,
        };
        if !available {
            return Err(BackendError::from_errno("perf_event_open", libc::ENOENT));
        }
        self.events.push(FakeEvent {
            spec: *spec,
            running: false,
            value: 0,
            period: spec.sample_period,
            armed_at: 0,
            closed: false,
            notify: self.notify,
        });
        Ok(self.events.len() as u32 - 1)
    }

    fn start(&mut self, handle: u32) -> Result<(), BackendError> {
        self.calls.start += 1;
        self.event(handle)?.running = true;
        Ok(())
    }

    fn stop(&mut self, handle: u32) -> Result<(), BackendError> {
        self.calls.stop += 1;
        self.event(handle)?.running = false;
        Ok(())
    }

    fn read(&mut self, handle: u32) -> Result<Reading, BackendError> {
        self.calls.read += 1;
        let value = self.event(handle)?.value;
        Ok(Reading {
            value,
            time_enabled: value,
            time_running: value,
        })
    }

    fn set_period(&mut self, handle: u32, period: u64) -> Result<(), BackendError> {
        self.calls.set_period += 1;
        let event = self.event(handle)?;
        event.period = Some(period);
        event.armed_at = event.value;
        Ok(())
    }

    fn close(&mut self, handle: u32) {
        self.calls.close += 1;
        if let Some(event) = self.events.get_mut(handle as usize) {
            event.closed = true;
            event.running = false;
        }
    }

    fn set_overflow_notify(&mut self, notify: Option<OverflowNotify>) {
        self.notify = notify;
    }
}
