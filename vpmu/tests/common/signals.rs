//! A real-time signal for host perf's overflow notifications, counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use vpmu::backend::perf::PerfBackend;
use vpmu::OverflowNotify;

/// Signals delivered so far (all threads of the test process).
pub static SIGNALS: AtomicU64 = AtomicU64::new(0);
static HANDLER: Once = Once::new();

extern "C" fn count_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// A real-time signal whose handler counts deliveries.
pub fn overflow_signal() -> i32 {
    let signal = libc::SIGRTMIN() + 5;
    HANDLER.call_once(|| {
        // SAFETY: installs an async-signal-safe handler (one atomic add)
        // with a zeroed, then filled, sigaction.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = count_signal as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            assert_eq!(libc::sigaction(signal, &action, std::ptr::null_mut()), 0);
        }
    });
    signal
}

pub fn notify_here() -> OverflowNotify {
    OverflowNotify {
        tid: PerfBackend::current_tid(),
        signal: overflow_signal(),
    }
}
