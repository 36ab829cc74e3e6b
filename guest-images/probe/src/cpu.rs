//! Thin wrappers around privileged x86 instructions: port I/O, MSRs, CPUID,
//! TSC, HLT, and the fault-tolerant `rdmsr_safe`/`wrmsr_safe`/`rdpmc_safe`.
//!
//! The `_safe` variants are small assembly functions whose faulting
//! instruction has a known address; the #GP handler (`trap.rs`) looks the
//! faulting RIP up in [`FIXUPS`] and resumes at the matching fixup label,
//! which returns "faulted" to the caller. They are ordinary `extern "C"`
//! functions, so the compiler knows exactly what they clobber.

use core::arch::{asm, global_asm};

/// Reads an I/O port byte.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O has no memory effects visible to Rust; the ports we
    // touch (UART, PIT, PIC, i8042) are devices owned by this guest.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes an I/O port byte.
pub fn outb(port: u16, v: u8) {
    // SAFETY: as for `inb`.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

/// CPUID leaf/subleaf: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Reads the time-stamp counter (ordered after earlier loads by LFENCE).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: RDTSC has no side effects; CR4.TSD is clear at CPL 0 anyway.
    unsafe {
        asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    ((hi as u64) << 32) | lo as u64
}

/// `n` (at least 1) iterations of `dec; jnz`: exactly 2n instructions and
/// n branches, for counting.
#[inline(never)]
pub fn known_loop(n: u64) {
    // SAFETY: counts a register down to zero; touches no memory or stack.
    unsafe {
        asm!("2:", "dec {0}", "jnz 2b", inout(reg) n.max(1) => _, options(nomem, nostack));
    }
}

/// RDMSR of an MSR that is known to exist (architectural ones we rely on).
///
/// # Safety
/// The MSR must exist (else #GP, which is fatal outside the fixup table) and
/// reading it must have no side effect the caller does not expect.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let lo: u32;
    let hi: u32;
    asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    ((hi as u64) << 32) | lo as u64
}

/// WRMSR of an MSR that is known to exist.
///
/// # Safety
/// The MSR must exist and accept `val`; the write must not break invariants
/// the program relies on (e.g. GS base, APIC base).
pub unsafe fn wrmsr(msr: u32, val: u64) {
    asm!("wrmsr", in("ecx") msr, in("eax") val as u32, in("edx") (val >> 32) as u32,
         options(nostack, preserves_flags));
}

extern "C" {
    fn probe_rdmsr_safe(msr: u32, out: *mut u64) -> u32;
    fn probe_wrmsr_safe(msr: u32, val: u64) -> u32;
    fn probe_rdpmc_safe(idx: u32, out: *mut u64) -> u32;
    static probe_fixups: [Fixup; 3];
}

/// One entry of the exception fixup table.
#[repr(C)]
pub struct Fixup {
    /// Address of the instruction that may fault.
    pub insn: u64,
    /// Where to resume if it does.
    pub fixup: u64,
}

global_asm!(
    ".section .text.probe_safe, \"ax\"",
    ".global probe_rdmsr_safe",
    "probe_rdmsr_safe:",
    "    mov ecx, edi",
    "1:  rdmsr",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov [rsi], rax",
    "    xor eax, eax",
    "    ret",
    "2:  mov eax, 1",
    "    ret",
    ".global probe_wrmsr_safe",
    "probe_wrmsr_safe:",
    "    mov ecx, edi",
    "    mov eax, esi",
    "    mov rdx, rsi",
    "    shr rdx, 32",
    "3:  wrmsr",
    "    xor eax, eax",
    "    ret",
    "4:  mov eax, 1",
    "    ret",
    ".global probe_rdpmc_safe",
    "probe_rdpmc_safe:",
    "    mov ecx, edi",
    "5:  rdpmc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov [rsi], rax",
    "    xor eax, eax",
    "    ret",
    "6:  mov eax, 1",
    "    ret",
    ".section .rodata.probe_fixups, \"a\"",
    ".balign 8",
    ".global probe_fixups",
    "probe_fixups:",
    "    .quad 1b, 2b",
    "    .quad 3b, 4b",
    "    .quad 5b, 6b",
    ".text",
);

/// Returns the fixup address for a faulting RIP, if it is one of ours.
pub fn fixup_for(rip: u64) -> Option<u64> {
    // SAFETY: the table is immutable data defined in the assembly above.
    let table = unsafe { &*core::ptr::addr_of!(probe_fixups) };
    table.iter().find(|f| f.insn == rip).map(|f| f.fixup)
}

/// RDMSR that survives a #GP: `Err(())` if the access faulted.
pub fn rdmsr_safe(msr: u32) -> Result<u64, ()> {
    let mut v = 0u64;
    // SAFETY: the function only reads the MSR and writes `v`; a #GP is
    // turned into an error return by the fixup table. PMU MSR reads have
    // no side effects.
    let r = unsafe { probe_rdmsr_safe(msr, &mut v) };
    if r == 0 {
        Ok(v)
    } else {
        Err(())
    }
}

/// `n` RDMSRs of `msr` in a tight loop (a benchmark body). Only for an MSR
/// that was read once without a fault: these reads have no fixup.
pub fn rdmsr_loop(msr: u32, n: u64) {
    // SAFETY: callers pass an MSR that reads without #GP (checked first
    // with `rdmsr_safe`, or a register of the model); RDMSR only writes
    // EAX/EDX and touches no memory.
    unsafe {
        core::arch::asm!("2:", "rdmsr", "dec {n}", "jnz 2b", n = inout(reg) n => _,
            in("ecx") msr, out("eax") _, out("edx") _, options(nomem, nostack));
    }
}

/// WRMSR that survives a #GP: `Err(())` if the access faulted.
///
/// Only used for PMU and LAPIC MSRs, whose writes cannot break memory safety.
pub fn wrmsr_safe(msr: u32, val: u64) -> Result<(), ()> {
    // SAFETY: see above; callers only pass PMU MSRs.
    let r = unsafe { probe_wrmsr_safe(msr, val) };
    if r == 0 {
        Ok(())
    } else {
        Err(())
    }
}

/// RDPMC that survives a #GP (KVM injects #GP when its in-kernel PMU is off).
pub fn rdpmc_safe(idx: u32) -> Result<u64, ()> {
    let mut v = 0u64;
    // SAFETY: as for `rdmsr_safe`.
    let r = unsafe { probe_rdpmc_safe(idx, &mut v) };
    if r == 0 {
        Ok(v)
    } else {
        Err(())
    }
}

/// Spin-loop hint.
#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}

/// Enables interrupts and halts until one arrives, atomically (STI shadow),
/// then disables them again. Returns after the interrupt handler ran.
pub fn sti_hlt_cli() {
    // SAFETY: the IDT is loaded before anyone calls this; handlers run on
    // IST stacks.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

/// Halts forever with interrupts off (NMIs are still handled).
pub fn park() -> ! {
    loop {
        // SAFETY: HLT with IF = 0 only waits for NMI/SMI/INIT.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Reads CR0.
pub fn cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Reads CR4.
pub fn cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Reads CR2 (page-fault linear address).
pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Resets the machine through the i8042 (the VMM exits 0 on it). The VMM
/// may act on the reset asynchronously, so the vCPU then waits (interrupts
/// off) for up to ~10 s before falling back to a triple fault.
pub fn reset() -> ! {
    outb(0x64, 0xfe);
    let khz = crate::time::tsc_khz();
    let limit = if khz == 0 {
        30_000_000_000
    } else {
        khz * 10_000
    };
    let t0 = rdtsc();
    while rdtsc().wrapping_sub(t0) < limit {
        pause();
    }
    triple_fault()
}

/// Forces a triple fault (shutdown): the VMM reports it and exits non-zero.
/// With an empty IDT, the #GP of reading a non-existent MSR cannot be
/// delivered, nor can the resulting #DF.
pub fn triple_fault() -> ! {
    #[repr(C, packed)]
    struct Idtr {
        limit: u16,
        base: u64,
    }
    let idtr = Idtr { limit: 0, base: 0 };
    // SAFETY: deliberately destroys the IDT and faults; never returns.
    unsafe {
        asm!("lidt [{}]", "rdmsr", in(reg) &idtr, in("ecx") 0xffff_ffffu32,
             out("eax") _, out("edx") _, options(nostack));
    }
    park()
}
