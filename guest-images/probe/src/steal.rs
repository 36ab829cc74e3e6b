//! KVM steal time (`MSR_KVM_STEAL_TIME`): how long this vCPU was runnable
//! but not running on the host. A busy loop timed with the TSC includes that
//! time, while a counter backed by the vCPU thread's CPU time does not; the
//! tests report it so that a loaded host can be told apart from a VMM that
//! counts too little.

use core::cell::UnsafeCell;
use core::sync::atomic::{compiler_fence, Ordering};

use crate::cpu::{cpuid, wrmsr_safe};
use crate::MAX_CPUS;

const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
const KVM_FEATURE_STEAL_TIME: u32 = 1 << 5;
const KVM_MSR_ENABLED: u64 = 1;

/// `struct kvm_steal_time` (64 bytes, 64-byte aligned), written by KVM.
#[repr(C, align(64))]
struct StealTime {
    steal: u64,
    version: u32,
    flags: u32,
    preempted: u8,
    _pad: [u8; 47],
}

struct Areas(UnsafeCell<[StealTime; MAX_CPUS]>);
// SAFETY: area i is only read by vCPU i; KVM writes it (outside Rust's view),
// which is why every access is volatile.
unsafe impl Sync for Areas {}

static AREAS: Areas = Areas(UnsafeCell::new(
    [const {
        StealTime {
            steal: 0,
            version: 0,
            flags: 0,
            preempted: 0,
            _pad: [0; 47],
        }
    }; MAX_CPUS],
));

fn area(cpu: u32) -> *mut StealTime {
    // SAFETY: in bounds (cpu < MAX_CPUS); only a raw pointer is formed.
    unsafe { (AREAS.0.get() as *mut StealTime).add(cpu as usize) }
}

/// Does the hypervisor offer steal time (KVM PV feature)?
pub fn available() -> bool {
    if cpuid(1, 0).2 & (1 << 31) == 0 {
        return false;
    }
    let (max, b, c, d) = cpuid(0x4000_0000, 0);
    let sig = [b.to_le_bytes(), c.to_le_bytes(), d.to_le_bytes()];
    if sig != [*b"KVMK", *b"VMKV", *b"M\0\0\0"] || max < 0x4000_0001 {
        return false;
    }
    cpuid(0x4000_0001, 0).0 & KVM_FEATURE_STEAL_TIME != 0
}

/// Registers this vCPU's steal-time area. Returns false if unavailable.
pub fn init(cpu: u32) -> bool {
    if !available() {
        return false;
    }
    // Identity mapping: the virtual address is the guest-physical one.
    wrmsr_safe(MSR_KVM_STEAL_TIME, area(cpu) as u64 | KVM_MSR_ENABLED).is_ok()
}

/// Steal time of this vCPU so far, in ns (0 if not registered).
pub fn steal_ns() -> u64 {
    let a = area(crate::percpu::this_cpu_id());
    loop {
        // SAFETY: `a` points at this vCPU's area; KVM updates it with a
        // version seqlock (odd = update in progress).
        let (v0, steal, v1) = unsafe {
            let v0 = core::ptr::read_volatile(core::ptr::addr_of!((*a).version));
            compiler_fence(Ordering::Acquire);
            let s = core::ptr::read_volatile(core::ptr::addr_of!((*a).steal));
            compiler_fence(Ordering::Acquire);
            let v1 = core::ptr::read_volatile(core::ptr::addr_of!((*a).version));
            (v0, s, v1)
        };
        if v0 == v1 && v0 & 1 == 0 {
            return steal;
        }
        core::hint::spin_loop();
    }
}

/// Runs `f` and returns the TSC cycles it took less the KVM steal time of
/// that interval: the time this vCPU actually ran.
pub fn run_tsc(f: impl FnOnce()) -> u64 {
    let s0 = steal_ns();
    let t0 = crate::cpu::rdtsc();
    f();
    let t = crate::cpu::rdtsc() - t0;
    t.saturating_sub(crate::time::ns_to_tsc(steal_ns() - s0))
}
