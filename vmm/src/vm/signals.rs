//! Termination signals: every common one ends the VMM cleanly.
//!
//! SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1 and SIGUSR2 are taken over
//! first thing when `vmm run` starts ([`install`]), before anything is
//! created, so that none of them can kill the VMM with its default action
//! (which would leave the API socket behind). The handler only records the
//! first signal and wakes the main loop; start-up checks [`check`] between
//! its stages, and the main loop stops the guest. The VMM then ends with
//! exit code 128+N and removes its socket. SIGPIPE is ignored: a console
//! or API peer that went away is an `EPIPE` on that descriptor, handled
//! where it happens. The vCPU kick and the vPMU's overflow signal (SIGIO)
//! belong to [`crate::vcpu::kick`] and are not touched here.

use std::sync::atomic::{AtomicI32, Ordering};

/// The signals that end the VMM (exit code 128+N).
pub const TERMINATING: [libc::c_int; 6] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// The first terminating signal received since [`install`] (0: none).
static PENDING: AtomicI32 = AtomicI32::new(0);
/// An eventfd the handler writes to wake the main loop (-1: none yet).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The first signal decides the exit code.
    let _ = PENDING.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live u64
        // and the fd is an eventfd that stays open while it is registered
        // here (`set_wake_fd` is undone before it closes).
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// Takes over the terminating signals, ignores SIGPIPE and unblocks them
/// all on the calling thread (threads created later inherit its mask): a
/// parent that started us with them blocked must not make us unkillable.
/// A signal that was pending while blocked is taken now and shows in
/// [`pending`].
pub fn install() -> std::io::Result<()> {
    PENDING.store(0, Ordering::SeqCst);
    for signal in TERMINATING {
        vmm_sys_util::signal::register_signal_handler(signal, on_signal)
            .map_err(std::io::Error::from)?;
    }
    // SAFETY: setting SIGPIPE's disposition to SIG_IGN has no memory effects.
    if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error());
    }
    for signal in TERMINATING.iter().chain(&[libc::SIGPIPE]) {
        vmm_sys_util::signal::unblock_signal(*signal)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    Ok(())
}

/// The terminating signal received since [`install`], if any.
pub fn pending() -> Option<i32> {
    match PENDING.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// Start-up's check between its stages: `Err(signal)` once one came.
pub fn check() -> Result<(), i32> {
    pending().map_or(Ok(()), Err)
}

/// Makes the handler write to the eventfd `fd`; if a signal came already,
/// writes it now, so the main loop sees it at once.
pub fn set_wake_fd(fd: i32) {
    WAKE_FD.store(fd, Ordering::SeqCst);
    if pending().is_some() {
        let one = 1u64;
        // SAFETY: the caller's eventfd is open; the buffer is a live u64.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// Undoes [`set_wake_fd`] before the eventfd closes: late signals must not
/// write to whatever reuses its number.
pub fn clear_wake_fd() {
    WAKE_FD.store(-1, Ordering::SeqCst);
}
