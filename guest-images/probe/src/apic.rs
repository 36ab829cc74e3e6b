//! Local APIC access: x2APIC (MSRs 0x800 + reg/16) when CPUID.1:ECX[21]
//! offers it, else xAPIC MMIO at the base in IA32_APIC_BASE. Also the LAPIC
//! timer (one-shot, calibrated against the TSC) used by the halt test.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::cpu::{self, rdmsr, wrmsr};
use crate::time;
use crate::trap::{SPURIOUS_VECTOR, TIMER_VECTOR};

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_EN: u64 = 1 << 11;
const APIC_BASE_EXTD: u64 = 1 << 10;

pub const REG_ID: u32 = 0x20;
pub const REG_TPR: u32 = 0x80;
pub const REG_EOI: u32 = 0xb0;
pub const REG_SVR: u32 = 0xf0;
pub const REG_ICR_LO: u32 = 0x300;
pub const REG_ICR_HI: u32 = 0x310;
pub const REG_LVT_TIMER: u32 = 0x320;
pub const REG_LVT_PC: u32 = 0x340;
pub const REG_LVT_LINT0: u32 = 0x350;
pub const REG_TMICT: u32 = 0x380;
pub const REG_TMCCT: u32 = 0x390;
pub const REG_TDCR: u32 = 0x3e0;

pub const LVT_MASKED: u32 = 1 << 16;
/// Delivery mode NMI.
pub const LVT_DM_NMI: u32 = 0b100 << 8;

#[link_section = ".data.probe_state"]
static X2APIC: AtomicBool = AtomicBool::new(false);
static XAPIC_BASE: AtomicU64 = AtomicU64::new(0xfee0_0000);
/// LAPIC timer ticks per millisecond at divide-by-1 (0 = not calibrated).
#[link_section = ".data.probe_state"]
static TIMER_KHZ: AtomicU64 = AtomicU64::new(0);

/// Is this vCPU's LAPIC in x2APIC mode?
pub fn is_x2apic() -> bool {
    X2APIC.load(Ordering::Relaxed)
}

/// Reads a LAPIC register (offset as in the xAPIC MMIO page).
pub fn read(reg: u32) -> u32 {
    if is_x2apic() {
        // SAFETY: x2APIC is enabled on this vCPU; 0x800+reg/16 are its MSRs.
        unsafe { rdmsr(0x800 + (reg >> 4)) as u32 }
    } else {
        let a = XAPIC_BASE.load(Ordering::Relaxed) + reg as u64;
        // SAFETY: the xAPIC page is identity-mapped MMIO emulated by KVM.
        unsafe { core::ptr::read_volatile(a as *const u32) }
    }
}

/// Writes a LAPIC register (offset as in the xAPIC MMIO page).
pub fn write(reg: u32, val: u32) {
    if is_x2apic() {
        // SAFETY: as in `read`; LAPIC writes have no memory effects.
        unsafe { wrmsr(0x800 + (reg >> 4), val as u64) }
    } else {
        let a = XAPIC_BASE.load(Ordering::Relaxed) + reg as u64;
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile(a as *mut u32, val) }
    }
}

/// Enables this vCPU's LAPIC (x2APIC if available and `allow_x2apic`),
/// software-enables it with the spurious vector, accepts all priorities and
/// masks LINT0 (the 8259 ExtINT path), the timer and LVTPC.
pub fn init(allow_x2apic: bool) {
    let x2 = allow_x2apic && cpu::cpuid(1, 0).2 & (1 << 21) != 0;
    // SAFETY: IA32_APIC_BASE exists; we only set the enable bits and keep
    // the base address.
    unsafe {
        let base = rdmsr(IA32_APIC_BASE);
        XAPIC_BASE.store(base & 0x000f_ffff_ffff_f000, Ordering::Relaxed);
        let mut nb = base | APIC_BASE_EN;
        if x2 {
            nb |= APIC_BASE_EXTD;
        }
        if nb != base {
            wrmsr(IA32_APIC_BASE, nb);
        }
    }
    X2APIC.store(x2, Ordering::Relaxed);
    write(REG_TPR, 0);
    write(REG_SVR, 0x100 | SPURIOUS_VECTOR as u32);
    write(REG_LVT_LINT0, LVT_MASKED);
    write(REG_LVT_TIMER, LVT_MASKED | TIMER_VECTOR as u32);
    write(REG_LVT_PC, LVT_MASKED | LVT_DM_NMI);
}

/// This vCPU's APIC ID.
pub fn id() -> u32 {
    if is_x2apic() {
        read(REG_ID)
    } else {
        read(REG_ID) >> 24
    }
}

/// Sends an NMI to this vCPU through the ICR (physical destination = own
/// APIC ID; the "self" shorthand is not valid with NMI delivery).
pub fn send_nmi_to_self() {
    // The APIC ID the entry code took as this CPU's id: no LAPIC read in
    // the interval `bench_pmi` times.
    let me = crate::percpu::this_cpu_id();
    let icr_lo = LVT_DM_NMI | (1 << 14); // NMI, level assert
    if is_x2apic() {
        // SAFETY: x2APIC ICR MSR; sending an IPI has no memory effects.
        unsafe { wrmsr(0x830, ((me as u64) << 32) | icr_lo as u64) };
    } else {
        write(REG_ICR_HI, me << 24);
        write(REG_ICR_LO, icr_lo);
    }
}

/// End of interrupt.
pub fn eoi() {
    write(REG_EOI, 0);
}

/// Measures the LAPIC timer rate (divide by 1) against the TSC over ~10 ms.
/// Needs the TSC frequency. Returns ticks per millisecond.
pub fn calibrate_timer() -> u64 {
    write(REG_LVT_TIMER, LVT_MASKED | TIMER_VECTOR as u32);
    write(REG_TDCR, 0b1011); // divide by 1
    write(REG_TMICT, u32::MAX);
    let t0 = cpu::rdtsc();
    let c0 = read(REG_TMCCT);
    time::spin_tsc(time::ms_to_tsc(10));
    let c1 = read(REG_TMCCT);
    let t1 = cpu::rdtsc();
    write(REG_TMICT, 0);
    let ticks = c0.wrapping_sub(c1) as u64;
    let us = time::tsc_to_us(t1 - t0).max(1);
    let khz = ticks * 1000 / us;
    TIMER_KHZ.store(khz, Ordering::Relaxed);
    khz
}

/// Timer ticks per millisecond (after `calibrate_timer`).
pub fn timer_khz() -> u64 {
    TIMER_KHZ.load(Ordering::Relaxed)
}

/// Arms a one-shot LAPIC timer interrupt `ms` milliseconds from now on
/// this vCPU. Returns false if the timer is not calibrated.
pub fn arm_oneshot_ms(ms: u64) -> bool {
    let khz = timer_khz();
    if khz == 0 {
        return false;
    }
    let mut ticks = ms.saturating_mul(khz).max(1);
    // Use divide-by-128 when the count does not fit in 32 bits.
    let tdcr = if ticks > u32::MAX as u64 {
        ticks = (ticks / 128).clamp(1, u32::MAX as u64);
        0b1010
    } else {
        0b1011
    };
    write(REG_TDCR, tdcr);
    write(REG_LVT_TIMER, TIMER_VECTOR as u32); // one-shot, unmasked
    write(REG_TMICT, ticks as u32);
    true
}

/// Stops the timer and masks it.
pub fn disarm_timer() {
    write(REG_TMICT, 0);
    write(REG_LVT_TIMER, LVT_MASKED | TIMER_VECTOR as u32);
}
