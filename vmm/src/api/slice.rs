//! The API's threads ask the host's scheduler for short time slices.
//!
//! Why: an API thread sleeps nearly always and, woken by a request, needs
//! well under a millisecond of CPU. On a host whose cores are oversubscribed
//! with vCPU threads (a fleet of busy guests), a woken thread with the
//! default slice waits behind busy threads' slices (each about 1-3 ms) before
//! it runs, several times per request. Linux's EEVDF scheduler (6.12 on)
//! takes a fair task's `sched_runtime` as its requested slice: a short one
//! gives it an earlier deadline, so it is picked (and may preempt) as soon as
//! it is eligible, without more than its fair share of CPU. It needs no
//! privilege and changes neither the policy nor the nice value. Older
//! kernels ignore the field for fair tasks, so there it changes nothing.
//! Threads spawned by a thread that asked inherit its slice.

use std::time::Duration;

/// The slice the API's threads ask for: the shortest Linux grants (0.1 ms).
pub const API_SLICE: Duration = Duration::from_micros(100);

/// `SCHED_OTHER` and `SCHED_BATCH`: the fair policies whose slice can be asked.
const FAIR_POLICIES: [u32; 2] = [libc::SCHED_OTHER as u32, libc::SCHED_BATCH as u32];

/// The kernel's `struct sched_attr` as of its first version (48 bytes),
/// which every kernel with `sched_setattr` takes.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// This thread's scheduling attributes.
fn get() -> std::io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    // SAFETY: `attr` is a writable `sched_attr` of the size passed; pid 0 is
    // the calling thread; the kernel writes at most that many bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            std::mem::size_of::<SchedAttr>() as u32,
            0u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr)
}

/// Asks for `slice` for the calling thread (and the threads it spawns from
/// now on), keeping its policy and nice value. `Ok(false)`: the thread runs
/// under a policy that is not fair (a real-time one an operator chose), which
/// is left alone.
pub fn ask(slice: Duration) -> std::io::Result<bool> {
    let mut attr = get()?;
    if !FAIR_POLICIES.contains(&attr.policy) {
        return Ok(false);
    }
    attr.size = std::mem::size_of::<SchedAttr>() as u32;
    attr.flags = 0;
    attr.runtime = slice.as_nanos().min(u64::MAX as u128) as u64;
    // SAFETY: `attr` is a valid `sched_attr` of the size it states; pid 0 is
    // the calling thread; the kernel only reads it.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slice_is_asked_keeping_policy_and_nice_and_threads_spawned_after_inherit_it() {
        std::thread::spawn(|| {
            // SAFETY: setpriority on the calling thread (who 0); only raises
            // its nice value, which needs no privilege.
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 3) }, 0);
            let before = get().unwrap();
            assert!(ask(API_SLICE).unwrap(), "a fair thread's slice is asked");
            let after = get().unwrap();
            assert_eq!((after.policy, after.nice), (before.policy, 3));
            // Kernels whose scheduler takes the slice report it (6.12 on: a
            // fair task's runtime is its slice); older ones report 0.
            let reports_slices = before.runtime != 0;
            if reports_slices {
                assert_eq!(after.runtime, API_SLICE.as_nanos() as u64);
            }
            let child = std::thread::spawn(|| {
                let attr = get().unwrap();
                (attr.runtime, attr.nice)
            });
            let (runtime, nice) = child.join().unwrap();
            assert_eq!(nice, 3, "a spawned thread inherits the nice value");
            if reports_slices {
                assert_eq!(runtime, API_SLICE.as_nanos() as u64, "and the slice");
            }
        })
        .join()
        .unwrap();
    }
}
