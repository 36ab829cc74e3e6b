//! The probe guest: a freestanding x86-64 program that the `vmm` crate embeds
//! and boots when no `--kernel` is given.
//!
//! It is entered exactly like a Linux `vmlinux` through the 64-bit boot
//! protocol (long mode, identity-mapped low 4 GiB, RSI = `struct boot_params`).
//! Every vCPU enters at the same entry point (no INIT/SIPI on these hosts),
//! picks its own stack by its LAPIC ID, sets up its own GDT/TSS/IDT, and then
//! the bootstrap processor prints the banner, the command line and the number
//! of vCPUs it was told about (MP table). The tests selected on the command
//! line run on the selected vCPUs; every result is one `probe: ...` line on
//! COM1. See `README.md` for the command-line grammar and the output lines.
//!
//! Built by `vmm/build.rs` with the stable host toolchain: host target,
//! `panic=abort`, static relocation model, linked with `linker.ld` at 0x200000.

#![no_std]
#![no_main]

mod apic;
mod bench;
mod boot;
mod cmdline;
mod cpu;
mod mem;
mod mptable;
mod percpu;
mod pmu;
mod profile;
mod serial;
mod smp;
mod steal;
mod storm;
mod tests;
mod time;
mod trap;
mod wakeup;

use core::arch::global_asm;

/// Version printed in the banner; bump when the output format changes.
pub const PROBE_VERSION: &str = "1";
// Statics whose initial value matters are placed in `.data.probe_state`
// (file-backed, so a VMM that reloads the image on a guest reboot restores
// them); `.bss` only holds stacks and tables that are written before use,
// because the loader does not clear `.bss`.

/// Most vCPUs (LAPIC IDs 0..MAX_CPUS) the probe supports.
pub const MAX_CPUS: usize = 32;
/// Size of each vCPU's main stack.
pub const STACK_SIZE: usize = 64 * 1024;
const STACK_SHIFT: u32 = 16;
const _: () = assert!(1 << STACK_SHIFT == STACK_SIZE);

#[repr(C, align(4096))]
struct Stacks([[u8; STACK_SIZE]; MAX_CPUS]);

/// Main stacks, one per LAPIC ID. Only touched by the entry code (through
/// its address) and then used as a stack; never accessed from Rust.
static mut STACKS: Stacks = Stacks([[0; STACK_SIZE]; MAX_CPUS]);

// Entry point, for every vCPU.
//
// State on entry (boot contract of the VMM, same as a vmlinux 64-bit entry):
// long mode, CS = 0x08 flat 64-bit, interrupts off, RSI = boot_params,
// RSP undefined on secondary vCPUs. We find our LAPIC ID without touching
// memory other than the LAPIC itself: from the x2APIC ID MSR if the VMM
// already enabled x2APIC, else from the xAPIC ID register (MMIO at the base
// in IA32_APIC_BASE). That ID is the truth the in-kernel LAPIC uses, whatever
// CPUID says. It selects the stack; IDs >= MAX_CPUS park the vCPU.
global_asm!(
    ".section .text.probe_entry, \"ax\"",
    ".global _start",
    ".type _start, @function",
    "_start:",
    "    cli",
    "    cld",
    "    mov r12, rsi",
    // SSE must work before any Rust code runs (core uses it): CR0.EM off,
    // MP on, TS off; CR4.OSFXSR | OSXMMEXCPT on. The VMM should have done
    // this already; doing it again is harmless.
    "    mov rax, cr0",
    "    and rax, -5",
    "    or rax, 2",
    "    mov cr0, rax",
    "    clts",
    "    mov rax, cr4",
    "    or rax, 0x600",
    "    mov cr4, rax",
    "    mov ecx, 0x1b",
    "    rdmsr",
    "    test eax, 0x400",
    "    jnz 2f",
    "    shl rdx, 32",
    "    mov eax, eax",
    "    or rax, rdx",
    "    and rax, -4096",
    "    mov ebx, dword ptr [rax + 0x20]",
    "    shr ebx, 24",
    "    jmp 3f",
    "2:",
    "    mov ecx, 0x802",
    "    rdmsr",
    "    mov ebx, eax",
    "3:",
    "    cmp ebx, {max_cpus}",
    "    jae 9f",
    "    lea rsp, [rip + {stacks}]",
    "    mov eax, ebx",
    "    inc eax",
    "    shl rax, {stack_shift}",
    "    add rsp, rax",
    "    xor ebp, ebp",
    "    mov edi, ebx",
    "    mov rsi, r12",
    "    call {main}",
    "9:",
    "    cli",
    "    hlt",
    "    jmp 9b",
    ".size _start, . - _start",
    ".text",
    max_cpus = const MAX_CPUS,
    stack_shift = const STACK_SHIFT,
    stacks = sym STACKS,
    main = sym boot::probe_main,
);

// The precompiled `core` was built with unwinding and refers to the
// personality routine (from its unwind tables, which the linker script
// discards) and possibly to `_Unwind_Resume`. With panic=abort nothing ever
// unwinds; these stubs only satisfy the linker and trap if ever reached.
global_asm!(
    ".section .text.probe_unwind_stubs, \"ax\"",
    ".global rust_eh_personality",
    "rust_eh_personality:",
    ".global _Unwind_Resume",
    "_Unwind_Resume:",
    "    ud2",
    ".text",
);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut l = serial::Line::new();
    l.put("panic cpu=").put(&percpu::try_this_cpu_id());
    if let Some(loc) = info.location() {
        l.put(" at=").put(loc.file()).put(":").put(&loc.line());
    }
    // Only static messages are printed: formatting arguments would need
    // core::fmt, which uses SSE (see serial.rs).
    l.put(" msg=\"")
        .put(info.message().as_str().unwrap_or("(formatted message)"))
        .put("\"");
    l.emergency();
    cpu::triple_fault()
}
