//! GDT, TSS, IDT and the trap entry path.
//!
//! Every vCPU gets its own GDT (flat code 0x08, data 0x10, a 64-bit TSS at
//! 0x18) and TSS whose IST slots point at that vCPU's own interrupt stacks.
//! The IDT is shared and built once by the BSP. EVERY vector runs on an IST
//! stack: the precompiled `core` uses the red zone below RSP, which an
//! interrupt pushing its frame on the current stack would clobber. Vectors are
//! spread over separate ISTs so that the nestings that can happen (an NMI or a
//! #GP inside an interrupt handler, a #GP inside the NMI handler) never reuse
//! the stack they interrupted:
//!   IST1 NMI, IST2 exceptions, IST3 external interrupts, IST4 #DF and #MC.
//!
//! The stubs save all general-purpose registers, build a [`TrapFrame`] and
//! call [`probe_trap`]. No SSE state is saved: the probe is compiled without
//! SSE and links no SSE code (see README.md), so there is none to clobber.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::serial::{Hex, Line};
use crate::{apic, cpu, percpu, pmu, MAX_CPUS};

/// Vector of the LAPIC timer.
pub const TIMER_VECTOR: u8 = 0x40;
/// Spurious-interrupt vector programmed into the SVR.
pub const SPURIOUS_VECTOR: u8 = 0xff;

const IST_NMI: u8 = 1;
const IST_EXC: u8 = 2;
const IST_IRQ: u8 = 3;
const IST_FATAL: u8 = 4;

const IST_NMI_SIZE: usize = 16 * 1024;
const IST_EXC_SIZE: usize = 16 * 1024;
const IST_IRQ_SIZE: usize = 8 * 1024;
const IST_FATAL_SIZE: usize = 8 * 1024;

#[repr(C, align(16))]
struct IstStacks {
    nmi: [u8; IST_NMI_SIZE],
    exc: [u8; IST_EXC_SIZE],
    irq: [u8; IST_IRQ_SIZE],
    fatal: [u8; IST_FATAL_SIZE],
}

/// 64-bit TSS (only the IST slots are used; no privilege changes happen).
#[repr(C, packed(4))]
struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}
const TSS_SIZE: usize = core::mem::size_of::<Tss>();
const _: () = assert!(TSS_SIZE == 104);

#[repr(C, align(16))]
struct Gdt([u64; 5]);

/// Per-CPU descriptor tables and IST stacks. Each vCPU only ever touches its
/// own element, and only during `init_cpu`; afterwards the CPU reads them.
struct CpuTables {
    gdt: Gdt,
    tss: Tss,
    ist: IstStacks,
}

struct PerCpuTables(UnsafeCell<[CpuTables; MAX_CPUS]>);
// SAFETY: element i is only written by vCPU i (see `init_cpu`).
unsafe impl Sync for PerCpuTables {}

static TABLES: PerCpuTables = PerCpuTables(UnsafeCell::new(
    [const {
        CpuTables {
            gdt: Gdt([0; 5]),
            tss: Tss {
                _reserved0: 0,
                rsp: [0; 3],
                _reserved1: 0,
                ist: [0; 7],
                _reserved2: 0,
                _reserved3: 0,
                iomap_base: 0,
            },
            ist: IstStacks {
                nmi: [0; IST_NMI_SIZE],
                exc: [0; IST_EXC_SIZE],
                irq: [0; IST_IRQ_SIZE],
                fatal: [0; IST_FATAL_SIZE],
            },
        }
    }; MAX_CPUS],
));

#[derive(Clone, Copy)]
#[repr(C)]
struct IdtEntry {
    off_lo: u16,
    selector: u16,
    ist: u8,
    attr: u8,
    off_mid: u16,
    off_hi: u32,
    _reserved: u32,
}

#[repr(C, align(16))]
struct Idt([IdtEntry; 256]);

struct SharedIdt(UnsafeCell<Idt>);
// SAFETY: written once by the BSP before IDT_READY is released; read-only
// (by the CPU) afterwards.
unsafe impl Sync for SharedIdt {}

static IDT: SharedIdt = SharedIdt(UnsafeCell::new(Idt([IdtEntry {
    off_lo: 0,
    selector: 0,
    ist: 0,
    attr: 0,
    off_mid: 0,
    off_hi: 0,
    _reserved: 0,
}; 256])));
#[link_section = ".data.probe_state"]
static IDT_READY: AtomicBool = AtomicBool::new(false);

#[repr(C, packed)]
struct DescPtr {
    limit: u16,
    base: u64,
}

const KERNEL_CS: u16 = 0x08;
const KERNEL_DS: u16 = 0x10;
const TSS_SEL: u16 = 0x18;

extern "C" {
    static probe_isr_stubs: [u8; 256 * 16];
}

/// Saved state of the interrupted context, as laid out by the stubs.
#[repr(C)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// 256 stubs, 16 bytes apart: push a dummy error code where the CPU pushes
// none, push the vector, jump to the common path. The common path keeps the
// stack 16-byte aligned at the call: the CPU aligns RSP before pushing its
// 5-word frame, and 5 + 2 + 15 words = 176 bytes.
global_asm!(
    ".section .text.probe_isr, \"ax\"",
    ".balign 16",
    ".global probe_isr_stubs",
    "probe_isr_stubs:",
    ".set .Lvec, 0",
    ".rept 256",
    "  .balign 16",
    "  .if (.Lvec == 8) || (.Lvec == 10) || (.Lvec == 11) || (.Lvec == 12) || (.Lvec == 13) || (.Lvec == 14) || (.Lvec == 17) || (.Lvec == 21) || (.Lvec == 29) || (.Lvec == 30)",
    "    pushq $.Lvec",
    "  .else",
    "    pushq $0",
    "    pushq $.Lvec",
    "  .endif",
    "  jmp probe_isr_common",
    "  .set .Lvec, .Lvec + 1",
    ".endr",
    ".balign 16",
    "probe_isr_common:",
    "  pushq %rax",
    "  pushq %rcx",
    "  pushq %rdx",
    "  pushq %rbx",
    "  pushq %rbp",
    "  pushq %rsi",
    "  pushq %rdi",
    "  pushq %r8",
    "  pushq %r9",
    "  pushq %r10",
    "  pushq %r11",
    "  pushq %r12",
    "  pushq %r13",
    "  pushq %r14",
    "  pushq %r15",
    "  movq %rsp, %rdi",
    "  cld",
    "  call probe_trap",
    "  popq %r15",
    "  popq %r14",
    "  popq %r13",
    "  popq %r12",
    "  popq %r11",
    "  popq %r10",
    "  popq %r9",
    "  popq %r8",
    "  popq %rdi",
    "  popq %rsi",
    "  popq %rbp",
    "  popq %rbx",
    "  popq %rdx",
    "  popq %rcx",
    "  popq %rax",
    "  addq $16, %rsp",
    "  iretq",
    ".text",
    options(att_syntax)
);

fn stub_addr(vector: usize) -> u64 {
    // SAFETY: taking the address of the assembly-defined stub array.
    let base = core::ptr::addr_of!(probe_isr_stubs) as u64;
    base + 16 * vector as u64
}

/// Builds the shared IDT (BSP only, once, before any AP loads it).
pub fn build_idt() {
    // SAFETY: only the BSP calls this, before IDT_READY is set; APs wait
    // for IDT_READY before touching the IDT.
    let idt = unsafe { &mut *IDT.0.get() };
    for (v, e) in idt.0.iter_mut().enumerate() {
        let addr = stub_addr(v);
        // Sanity check of the 16-byte stub stride: each stub starts with a
        // PUSH imm8 (0x6a) or PUSH imm32 (0x68).
        // SAFETY: reading our own code bytes.
        let first = unsafe { core::ptr::read_volatile(addr as *const u8) };
        assert!(first == 0x6a || first == 0x68, "bad ISR stub layout");
        let ist = match v {
            2 => IST_NMI,
            8 | 18 => IST_FATAL,
            0..=31 => IST_EXC,
            _ => IST_IRQ,
        };
        *e = IdtEntry {
            off_lo: addr as u16,
            selector: KERNEL_CS,
            ist,
            attr: 0x8e, // present, DPL 0, 64-bit interrupt gate (IF cleared)
            off_mid: (addr >> 16) as u16,
            off_hi: (addr >> 32) as u32,
            _reserved: 0,
        };
    }
    IDT_READY.store(true, Ordering::Release);
}

/// Loads this vCPU's GDT and TSS, reloads the segment registers and, once the
/// BSP has built it, the IDT.
pub fn init_cpu(cpu: u32) {
    // SAFETY: vCPU `cpu` is the only writer of element `cpu`.
    let t = unsafe { &mut (*TABLES.0.get())[cpu as usize] };
    let ist_base = &t.ist as *const IstStacks as u64;
    let ist_top = |off: usize, size: usize| ist_base + (off + size) as u64;
    t.tss.ist[IST_NMI as usize - 1] = ist_top(0, IST_NMI_SIZE);
    t.tss.ist[IST_EXC as usize - 1] = ist_top(IST_NMI_SIZE, IST_EXC_SIZE);
    t.tss.ist[IST_IRQ as usize - 1] = ist_top(IST_NMI_SIZE + IST_EXC_SIZE, IST_IRQ_SIZE);
    t.tss.ist[IST_FATAL as usize - 1] =
        ist_top(IST_NMI_SIZE + IST_EXC_SIZE + IST_IRQ_SIZE, IST_FATAL_SIZE);
    t.tss.iomap_base = TSS_SIZE as u16;

    let tss = &t.tss as *const Tss as u64;
    let limit = (TSS_SIZE - 1) as u64;
    let tss_lo = (limit & 0xffff)
        | ((tss & 0xff_ffff) << 16)
        | (0x89 << 40) // present, 64-bit available TSS
        | (((limit >> 16) & 0xf) << 48)
        | (((tss >> 24) & 0xff) << 56);
    let tss_hi = tss >> 32;
    t.gdt.0 = [
        0,
        0x00af_9a00_0000_ffff, // 0x08: 64-bit code, DPL 0
        0x00cf_9200_0000_ffff, // 0x10: data
        tss_lo,                // 0x18: TSS (16 bytes)
        tss_hi,
    ];
    let gdtr = DescPtr {
        limit: (core::mem::size_of::<Gdt>() - 1) as u16,
        base: &t.gdt as *const Gdt as u64,
    };
    // SAFETY: the new GDT has the same flat code/data descriptors at the
    // same selectors as the VMM's, so reloading CS/SS/DS/ES is transparent;
    // the TSS descriptor is fresh (not busy) for LTR. FS and GS are left
    // alone: loading GS would reset the GS base that points at `PerCpu`.
    unsafe {
        asm!(
            "lgdt [{gdtr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {tmp:e}, {ds}",
            "mov ds, {tmp:e}",
            "mov es, {tmp:e}",
            "mov ss, {tmp:e}",
            "mov {tmp:e}, {tss}",
            "ltr {tmp:x}",
            gdtr = in(reg) &gdtr,
            cs = const KERNEL_CS as u64,
            ds = const KERNEL_DS as u32,
            tss = const TSS_SEL as u32,
            tmp = out(reg) _,
        );
    }

    while !IDT_READY.load(Ordering::Acquire) {
        cpu::pause();
    }
    let idtr = DescPtr {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: the IDT is complete (IDT_READY) and every gate points at a stub.
    unsafe { asm!("lidt [{}]", in(reg) &idtr, options(nostack, readonly)) };
}

/// Common trap handler, called by the stubs with interrupts disabled.
#[no_mangle]
extern "C" fn probe_trap(f: &mut TrapFrame) {
    let vector = f.vector as u8;
    match vector {
        2 => {
            if !crate::bench::handle_nmi() && !crate::storm::handle_nmi() {
                pmu::nmi::handle_nmi();
            }
        }
        13 => {
            if let Some(fix) = cpu::fixup_for(f.rip) {
                percpu::this_cpu().gp_fixups.fetch_add(1, Ordering::Relaxed);
                f.rip = fix;
            } else {
                fatal(f);
            }
        }
        TIMER_VECTOR => {
            let pc = percpu::this_cpu();
            pc.timer_irqs.fetch_add(1, Ordering::Relaxed);
            pc.timer_fired.store(true, Ordering::Release);
            apic::eoi();
        }
        SPURIOUS_VECTOR => {
            // Spurious interrupts are not acknowledged.
            percpu::this_cpu()
                .other_irqs
                .fetch_add(1, Ordering::Relaxed);
        }
        32..=254 => {
            percpu::this_cpu()
                .other_irqs
                .fetch_add(1, Ordering::Relaxed);
            apic::eoi();
        }
        _ => fatal(f),
    }
}

/// Reports an unexpected exception and stops the VM with a triple fault so
/// the VMM exits non-zero.
fn fatal(f: &TrapFrame) -> ! {
    let cr2 = if f.vector == 14 { cpu::cr2() } else { 0 };
    let mut l = Line::new();
    l.put("fatal cpu=")
        .put(&percpu::try_this_cpu_id())
        .put(" vector=")
        .put(&f.vector)
        .put(" error=")
        .put(&Hex(f.error))
        .put(" rip=")
        .put(&Hex(f.rip))
        .put(" rsp=")
        .put(&Hex(f.rsp))
        .put(" cr2=")
        .put(&Hex(cr2))
        .put(" rax=")
        .put(&Hex(f.rax))
        .put(" rcx=")
        .put(&Hex(f.rcx));
    l.emergency();
    cpu::triple_fault()
}
