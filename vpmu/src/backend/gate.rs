//! A [`Backend`] whose opens an [`OpenGate`] may refuse before they reach
//! it, as a host would: for tests of the refusal paths on a real host (the
//! VMM's fault seam, or a host's hardware events hidden).

use super::{Backend, BackendError, EventSpec, OverflowNotify, Reading};

/// Decides, before each open, whether it fails as a refused one would.
pub trait OpenGate {
    /// The error the open of `spec` fails with, or `None` to let it pass.
    fn refusal(&mut self, spec: &EventSpec) -> Option<BackendError>;
}

/// `inner` with its opens passed through `gate` first; everything else is
/// `inner`'s.
#[derive(Debug)]
pub struct Gated<B, G> {
    /// The backend that does the work.
    pub inner: B,
    /// What refuses opens.
    pub gate: G,
}

impl<B: Backend, G: OpenGate> Backend for Gated<B, G> {
    type Handle = B::Handle;

    fn open(&mut self, spec: &EventSpec) -> Result<B::Handle, BackendError> {
        match self.gate.refusal(spec) {
            Some(error) => Err(error),
            None => self.inner.open(spec),
        }
    }

    fn start(&mut self, handle: B::Handle) -> Result<(), BackendError> {
        self.inner.start(handle)
    }

    fn stop(&mut self, handle: B::Handle) -> Result<(), BackendError> {
        self.inner.stop(handle)
    }

    fn read(&mut self, handle: B::Handle) -> Result<Reading, BackendError> {
        self.inner.read(handle)
    }

    fn set_period(&mut self, handle: B::Handle, period: u64) -> Result<(), BackendError> {
        self.inner.set_period(handle, period)
    }

    fn close(&mut self, handle: B::Handle) {
        self.inner.close(handle)
    }

    fn schedule_epoch(&mut self, handle: B::Handle) -> Option<u32> {
        self.inner.schedule_epoch(handle)
    }

    fn set_overflow_notify(&mut self, notify: Option<OverflowNotify>) {
        self.inner.set_overflow_notify(notify)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::FakeBackend;

    /// Refuses the first `n` opens with EBUSY.
    struct RefuseFirst(u32);

    impl OpenGate for RefuseFirst {
        fn refusal(&mut self, _spec: &EventSpec) -> Option<BackendError> {
            self.0 = self.0.checked_sub(1)?;
            Some(BackendError::from_errno("perf_event_open", libc::EBUSY))
        }
    }

    #[test]
    fn refused_opens_never_reach_the_inner_backend() {
        let mut gated = Gated {
            inner: FakeBackend::new(true),
            gate: RefuseFirst(1),
        };
        let spec = EventSpec::clock(Some(100));
        let error = gated.open(&spec).unwrap_err();
        assert!(error.to_string().contains("EBUSY"), "{error}");
        assert_eq!(gated.inner.calls.open, 0);
        let handle = gated.open(&spec).unwrap();
        gated.start(handle).unwrap();
        gated.inner.advance(false, 7);
        assert_eq!(gated.read(handle).unwrap().value, 7);
        gated.set_period(handle, 50).unwrap();
        gated.stop(handle).unwrap();
        gated.close(handle);
        let calls = gated.inner.calls;
        assert_eq!(
            (
                calls.open,
                calls.start,
                calls.read,
                calls.set_period,
                calls.stop,
                calls.close
            ),
            (1, 1, 1, 1, 1, 1)
        );
    }
}
