//! Getting a vCPU thread out of `KVM_RUN`.
//!
//! A signal to the vCPU thread interrupts `KVM_RUN` (it returns EINTR). A
//! signal that lands while the thread is in userspace would be missed, so
//! the handler also sets the thread's `kvm_run.immediate_exit`: the next
//! `KVM_RUN` then returns at once. The same handler serves host perf
//! overflow signals, which must also bring the vCPU out to deliver a PMI.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::ptr;

use kvm_bindings::kvm_run;
use libc::siginfo_t;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    // The running vCPU's kvm_run page; null outside a vCPU loop. A const
    // initializer without destructor: safe to touch from a signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
    // Set by the handler; the loop reads and clears it.
    static KICKED: Cell<bool> = const { Cell::new(false) };
}

/// The signal that kicks vCPU threads (an offset from SIGRTMIN).
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

/// The signal host perf events raise on overflow: SIGIO, a standard
/// signal, so that overflows the thread has not taken yet merge into one
/// pending signal (the vCPU re-reads every counter anyway). A real-time
/// signal would queue one entry per overflow; under a storm that outruns
/// the thread the per-user queue fills, and the kernel then sends SIGIO
/// regardless.
pub fn overflow_signal() -> c_int {
    libc::SIGIO
}

extern "C" fn handle(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    KICKED.with(|k| k.set(true));
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own mapped kvm_run page, set
        // by `attach` and cleared by `detach` before it is unmapped.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

/// Installs the handler for both signals (once per process). SIGIO's
/// default action would kill the VMM: from now on it is a kick.
pub fn install() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), handle)?;
    register_signal_handler(overflow_signal(), handle)
}

/// Makes kicks of this thread stop its `KVM_RUN`.
pub fn attach(run: &mut kvm_run) {
    KVM_RUN.with(|r| r.set(run as *mut kvm_run));
}

/// Undoes `attach`.
pub fn detach() {
    KVM_RUN.with(|r| r.set(ptr::null_mut()));
}

/// Whether this thread was kicked since the last call; clears the flag.
pub fn take_kicked() -> bool {
    KICKED.with(|k| k.replace(false))
}
