//! Per-vCPU state, reachable from any context (including the NMI handler)
//! through the GS base, which each vCPU points at its own [`PerCpu`].
//!
//! All fields that an interrupt handler touches are atomics, so handlers and
//! the interrupted code can share them without data races.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::MAX_CPUS;

/// PMI test phase, see `tests::pmi`.
pub const PMI_IDLE: u32 = 0;
/// Counter armed and running: overflows are counted as PMIs.
pub const PMI_RUNNING: u32 = 1;
/// Counter disabled: any PMI now counts as "after disable".
pub const PMI_DISABLED: u32 = 2;

#[repr(C)]
pub struct PerCpu {
    /// Must stay the first field: read through `gs:[0]`.
    pub id: AtomicU64,
    /// #GPs recovered through the fixup table.
    pub gp_fixups: AtomicU64,
    /// NMIs received in total.
    pub nmis: AtomicU64,
    /// NMIs that arrived while no PMI test was armed.
    pub nmis_unexpected: AtomicU64,
    /// LAPIC timer interrupts.
    pub timer_irqs: AtomicU64,
    /// Other (unexpected) external interrupts, and spurious vectors.
    pub other_irqs: AtomicU64,
    /// Set by the LAPIC timer handler.
    pub timer_fired: AtomicBool,

    // --- PMI test state, shared with the NMI handler ---
    pub pmi_phase: AtomicU32,
    pub pmi_counter: AtomicU32,
    /// Sampling period in counter units.
    pub pmi_period: AtomicU64,
    /// PMIs while running.
    pub pmi_count: AtomicU64,
    /// PMIs whose overflow status bit (or legacy overflow test) was set.
    pub pmi_status_ok: AtomicU64,
    /// PMIs after the counter was disabled.
    pub pmi_after_disable: AtomicU64,
    /// MSR accesses that faulted inside the NMI handler.
    pub pmi_handler_gp: AtomicU64,
    /// Status value seen by the first PMI whose bit was missing (debug aid).
    pub pmi_first_bad_status: AtomicU64,
    /// PMIs whose handler found LVTPC masked.
    pub pmi_lvt_masked: AtomicU64,
}

impl PerCpu {
    const fn new() -> Self {
        PerCpu {
            id: AtomicU64::new(u64::MAX),
            gp_fixups: AtomicU64::new(0),
            nmis: AtomicU64::new(0),
            nmis_unexpected: AtomicU64::new(0),
            timer_irqs: AtomicU64::new(0),
            other_irqs: AtomicU64::new(0),
            timer_fired: AtomicBool::new(false),
            pmi_phase: AtomicU32::new(PMI_IDLE),
            pmi_counter: AtomicU32::new(0),
            pmi_period: AtomicU64::new(0),
            pmi_count: AtomicU64::new(0),
            pmi_status_ok: AtomicU64::new(0),
            pmi_after_disable: AtomicU64::new(0),
            pmi_handler_gp: AtomicU64::new(0),
            pmi_first_bad_status: AtomicU64::new(0),
            pmi_lvt_masked: AtomicU64::new(0),
        }
    }
}

#[allow(clippy::declare_interior_mutable_const)]
const PERCPU_INIT: PerCpu = PerCpu::new();
#[link_section = ".data.probe_state"]
static PERCPU: [PerCpu; MAX_CPUS] = [PERCPU_INIT; MAX_CPUS];

/// Has this vCPU pointed its GS base at its `PerCpu` yet?
#[link_section = ".data.probe_state"]
static GS_READY: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

const IA32_GS_BASE: u32 = 0xc000_0101;

/// Points this vCPU's GS base at its per-CPU block. Called once, early.
pub fn init(cpu: u32) {
    let pc = &PERCPU[cpu as usize];
    pc.id.store(cpu as u64, Ordering::Relaxed);
    // SAFETY: IA32_GS_BASE exists on every x86-64 CPU; nothing else uses GS.
    unsafe { crate::cpu::wrmsr(IA32_GS_BASE, pc as *const PerCpu as u64) };
    GS_READY[cpu as usize].store(true, Ordering::Release);
}

/// This vCPU's index (= LAPIC ID).
#[inline(always)]
pub fn this_cpu_id() -> u32 {
    let v: u64;
    // SAFETY: GS points at this CPU's `PerCpu` (set in `init` before any
    // caller runs); the first field is the id.
    unsafe {
        asm!("mov {}, qword ptr gs:[0]", out(reg) v, options(nostack, preserves_flags, readonly))
    };
    v as u32
}

/// This vCPU's per-CPU block.
#[inline(always)]
pub fn this_cpu() -> &'static PerCpu {
    &PERCPU[this_cpu_id() as usize]
}

/// The current CPU id if it can be determined, for panic/fatal paths that
/// may run before `init`: falls back to the LAPIC ID from CPUID.
pub fn try_this_cpu_id() -> u32 {
    let id = (crate::cpu::cpuid(1, 0).1 >> 24) as usize;
    if id < MAX_CPUS && GS_READY[id].load(Ordering::Acquire) {
        this_cpu_id()
    } else {
        id as u32
    }
}
