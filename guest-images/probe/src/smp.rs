//! Coordination between the BSP and the APs (all vCPUs enter at `_start`,
//! the APs when the BSP wakes them through the ACPI MP wakeup mailbox):
//! APs report online, wait for the BSP to publish the configuration ("go"),
//! run their tests and report done; the BSP resets only after every online
//! AP is done, or after a timeout.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::cmdline::Config;
use crate::cpu::{pause, rdtsc};
use crate::time;

struct ConfigCell(UnsafeCell<Config>);
// SAFETY: written once by the BSP before GO is released, read-only after.
unsafe impl Sync for ConfigCell {}

#[link_section = ".data.probe_state"]
static CONFIG: ConfigCell = ConfigCell(UnsafeCell::new(Config::default()));
#[link_section = ".data.probe_state"]
static GO: AtomicBool = AtomicBool::new(false);
#[link_section = ".data.probe_state"]
static ONLINE: AtomicU32 = AtomicU32::new(0);
#[link_section = ".data.probe_state"]
static DONE: AtomicU32 = AtomicU32::new(0);
/// Bit n: AP n is online / done.
#[link_section = ".data.probe_state"]
static ONLINE_MASK: AtomicU64 = AtomicU64::new(0);
#[link_section = ".data.probe_state"]
static DONE_MASK: AtomicU64 = AtomicU64::new(0);

/// AP: announce that this vCPU is up.
pub fn ap_online(cpu: u32) {
    ONLINE_MASK.fetch_or(1 << cpu, Ordering::Relaxed);
    ONLINE.fetch_add(1, Ordering::Release);
}

/// AP: wait for the BSP's go, then take a copy of the configuration.
pub fn ap_wait_go() -> Config {
    while !GO.load(Ordering::Acquire) {
        pause();
    }
    // SAFETY: GO (acquire) orders this read after the BSP's only write.
    unsafe { *CONFIG.0.get() }
}

/// AP: report this vCPU's tests finished.
pub fn ap_done(cpu: u32) {
    DONE_MASK.fetch_or(1 << cpu, Ordering::Relaxed);
    DONE.fetch_add(1, Ordering::Release);
}

/// BSP: wait (bounded) until `expected` APs are online; returns how many are.
pub fn bsp_wait_online(expected: u32, timeout_ms: u64) -> u32 {
    wait_for(&ONLINE, expected, timeout_ms)
}

/// BSP: publish the configuration and release the APs.
pub fn bsp_go(cfg: &Config) {
    // SAFETY: no AP reads CONFIG before GO is set, and it is set only here.
    unsafe { *CONFIG.0.get() = *cfg };
    GO.store(true, Ordering::Release);
}

/// BSP: wait (bounded) until `expected` APs are done; returns how many are.
pub fn bsp_wait_done(expected: u32, timeout_ms: u64) -> u32 {
    wait_for(&DONE, expected, timeout_ms)
}

pub fn online_mask() -> u64 {
    ONLINE_MASK.load(Ordering::Relaxed)
}

pub fn done_mask() -> u64 {
    DONE_MASK.load(Ordering::Relaxed)
}

fn wait_for(counter: &AtomicU32, expected: u32, timeout_ms: u64) -> u32 {
    let limit = time::ms_to_tsc(timeout_ms);
    let t0 = rdtsc();
    loop {
        let n = counter.load(Ordering::Acquire);
        if n >= expected || rdtsc().wrapping_sub(t0) >= limit {
            return n;
        }
        pause();
    }
}
