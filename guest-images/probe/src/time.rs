//! TSC frequency and TSC-based delays.
//!
//! Sources, first that answers wins: `tsc_khz=` on the command line, CPUID
//! 0x15 (Intel: TSC/crystal ratio and crystal frequency), the hypervisor
//! timing leaf 0x40000010 (EAX = TSC kHz), then a calibration against PIT
//! channel 2 (the way Linux's `pit_calibrate_tsc` does it).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu::{cpuid, inb, outb, rdtsc};

#[link_section = ".data.probe_state"]
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy)]
pub enum Source {
    Cmdline,
    Cpuid15,
    Hypervisor,
    Pit,
    Guess,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Cmdline => "cmdline",
            Source::Cpuid15 => "cpuid15",
            Source::Hypervisor => "hypervisor",
            Source::Pit => "pit",
            Source::Guess => "guess",
        }
    }
}

/// Determines the TSC frequency (BSP, once) and publishes it.
pub fn init(from_cmdline: Option<u64>) -> (u64, Source) {
    let (khz, src) = if let Some(k) = from_cmdline {
        (k, Source::Cmdline)
    } else if let Some(k) = from_cpuid15() {
        (k, Source::Cpuid15)
    } else if let Some(k) = from_hypervisor_leaf() {
        (k, Source::Hypervisor)
    } else if let Some(k) = from_pit() {
        (k, Source::Pit)
    } else {
        (1_000_000, Source::Guess)
    };
    TSC_KHZ.store(khz, Ordering::Release);
    (khz, src)
}

fn from_cpuid15() -> Option<u64> {
    if cpuid(0, 0).0 < 0x15 {
        return None;
    }
    let (den, num, crystal_hz, _) = cpuid(0x15, 0);
    if den == 0 || num == 0 || crystal_hz == 0 {
        return None;
    }
    Some(crystal_hz as u64 * num as u64 / den as u64 / 1000)
}

fn from_hypervisor_leaf() -> Option<u64> {
    if cpuid(1, 0).2 & (1 << 31) == 0 {
        return None;
    }
    let max = cpuid(0x4000_0000, 0).0;
    if !(0x4000_0010..0x4000_0100).contains(&max) {
        return None;
    }
    let khz = cpuid(0x4000_0010, 0).0 as u64;
    (khz != 0).then_some(khz)
}

/// PIT channel 2 in mode 0 with the speaker gate: count a 50 ms window.
fn from_pit() -> Option<u64> {
    const MS: u64 = 50;
    const PIT_HZ: u64 = 1_193_182;
    let latch = (PIT_HZ * MS / 1000) as u16;
    // Gate high, speaker off.
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    // Channel 2, lobyte/hibyte, mode 0, binary.
    outb(0x43, 0xb0);
    outb(0x42, latch as u8);
    outb(0x42, (latch >> 8) as u8);
    let t0 = rdtsc();
    let mut polls = 0u64;
    while inb(0x61) & 0x20 == 0 {
        polls += 1;
        if polls > 50_000_000 {
            return None;
        }
    }
    let t1 = rdtsc();
    if polls < 10 {
        return None; // OUT2 was already high: no working PIT.
    }
    Some((t1 - t0) / MS)
}

/// TSC kHz (valid after `init` on the BSP and the release of the APs).
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Acquire)
}

pub fn ms_to_tsc(ms: u64) -> u64 {
    ms.saturating_mul(tsc_khz())
}

/// Nanoseconds to TSC cycles (for short intervals).
pub fn ns_to_tsc(ns: u64) -> u64 {
    let khz = tsc_khz();
    (ns / 1_000_000).saturating_mul(khz) + (ns % 1_000_000) * khz / 1_000_000
}

pub fn tsc_to_us(t: u64) -> u64 {
    let khz = tsc_khz().max(1);
    (t / khz) * 1000 + (t % khz) * 1000 / khz
}

/// Busy-waits until the TSC advanced by `n` (a busy loop the PMU counts).
/// Returns the TSC delta actually elapsed. No PAUSE in the loop: KVM's
/// pause-loop exiting could deschedule the vCPU and make a busy loop look
/// idle.
pub fn spin_tsc(n: u64) -> u64 {
    spin_tsc_counting(n).0
}

/// `spin_tsc`, also returning how many loop iterations (TSC reads) it took.
pub fn spin_tsc_counting(n: u64) -> (u64, u64) {
    let t0 = rdtsc();
    let mut iters = 0u64;
    loop {
        iters += 1;
        let d = rdtsc().wrapping_sub(t0);
        if d >= n {
            return (d, iters);
        }
    }
}
