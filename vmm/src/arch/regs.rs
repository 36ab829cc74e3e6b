//! Register state for a 64-bit entry: the boot protocol's long-mode start
//! (paging on with the first 4 GiB identity-mapped, flat 64-bit segments,
//! interrupts off, RSI = zero page). These hosts cannot run real mode, so
//! every vCPU starts here: the boot vCPU at the kernel's entry, the others
//! at the vector the guest gives the MP wakeup mailbox ([`start_ap`]).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_WP: u64 = 1 << 16;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const SELECTOR_CODE: u16 = 0x08;
const SELECTOR_DATA: u16 = 0x10;
const SELECTOR_TSS: u16 = 0x18;

/// Errors setting up a vCPU's registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing boot page tables or GDT to guest memory failed")]
    GuestMemory,
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// A GDT entry from its flags, base and limit (the SDM's layout).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The `kvm_segment` KVM wants for a GDT entry.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
            // With granularity set the limit counts 4 KiB pages.
            if bit(55) == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: 0,
        padding: 0,
    }
}

/// Where one set of start-up tables lives: GDT, (empty) IDT, and the
/// identity map (PML4, then PDPT and page directories in the next pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootTables {
    pub gdt: u64,
    pub idt: u64,
    pub pml4: u64,
}

/// The boot vCPU's tables, in low RAM (the kernel replaces them early).
pub const BSP_TABLES: BootTables = BootTables {
    gdt: GDT_START,
    idt: IDT_START,
    pml4: PML4_START,
};

/// The secondary vCPUs' tables, in reserved memory the guest leaves alone.
pub const AP_TABLES: BootTables = BootTables {
    gdt: AP_GDT_START,
    idt: AP_IDT_START,
    pml4: AP_PML4_START,
};

/// Writes both sets of start-up tables (GDT, IDT, identity-mapping page
/// tables). Call once per boot.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    write_tables(mem, &BSP_TABLES)?;
    write_tables(mem, &AP_TABLES)
}

fn write_tables(mem: &GuestMemoryMmap, at: &BootTables) -> Result<(), RegsError> {
    let gdt = boot_gdt();
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(at.gdt + 8 * i as u64))
            .map_err(|_| RegsError::GuestMemory)?;
    }
    mem.write_obj(0u64, GuestAddress(at.idt))
        .map_err(|_| RegsError::GuestMemory)?;

    // PML4[0] -> PDPT; PDPT[i] -> PD i; each PD maps 1 GiB with 2 MiB pages.
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let pdpt = at.pml4 + 0x1000;
    let pd_start = at.pml4 + 0x2000;
    mem.write_obj(pdpt | PRESENT_RW, GuestAddress(at.pml4))
        .map_err(|_| RegsError::GuestMemory)?;
    for pd in 0..PD_COUNT {
        let pd_addr = pd_start + pd * 0x1000;
        mem.write_obj(pd_addr | PRESENT_RW, GuestAddress(pdpt + pd * 8))
            .map_err(|_| RegsError::GuestMemory)?;
        for i in 0..512u64 {
            let phys = (pd << 30) | (i << 21);
            mem.write_obj(
                phys | PRESENT_RW | PAGE_SIZE_2M,
                GuestAddress(pd_addr + i * 8),
            )
            .map_err(|_| RegsError::GuestMemory)?;
        }
    }
    Ok(())
}

fn boot_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),            // null
        gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ]
}

/// Puts the boot vCPU at the kernel's 64-bit entry point.
pub fn setup_boot_cpu(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    setup_long_mode(vcpu, entry, BOOT_STACK_TOP, ZERO_PAGE_START, &BSP_TABLES)
}

/// Puts the boot vCPU at a Multiboot kernel's entry: 32-bit protected
/// mode, paging off, flat 4 GiB code and data segments, interrupts off,
/// `EAX` = `magic` and `EBX` = the Multiboot information (the
/// specification's machine state; the kernel sets up its own GDT).
pub fn setup_multiboot_cpu(
    vcpu: &VcpuFd,
    entry: u64,
    info: u64,
    magic: u32,
) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let flat = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    // Execute/read and read/write, both accessed.
    let (code, data) = (flat(SELECTOR_CODE, 0xb), flat(SELECTOR_DATA, 0x3));
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(boot_gdt()[3], SELECTOR_TSS);
    sregs.gdt.base = BSP_TABLES.gdt;
    sregs.gdt.limit = (std::mem::size_of_val(&boot_gdt()) - 1) as u16;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    enter_with(
        vcpu,
        kvm_regs {
            rflags: 0x2,
            rip: entry,
            rax: u64::from(magic),
            rbx: info,
            ..Default::default()
        },
    )
}

/// Starts a parked secondary vCPU at `vector`, in the state the ACPI MP
/// wakeup structure promises: 64-bit mode, paging on with the vector
/// identity-mapped, flat selectors, interrupts off. Then it is runnable.
pub fn start_ap(vcpu: &VcpuFd, vector: u64) -> Result<(), RegsError> {
    setup_long_mode(vcpu, vector, 0, 0, &AP_TABLES)?;
    vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    })
    .map_err(kvm("KVM_SET_MP_STATE"))
}

/// Puts a vCPU at a 64-bit entry point, with the tables at `tables`.
fn setup_long_mode(
    vcpu: &VcpuFd,
    entry: u64,
    stack_top: u64,
    zero_page: u64,
    tables: &BootTables,
) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let gdt = boot_gdt();
    let code = segment(gdt[1], SELECTOR_CODE);
    let data = segment(gdt[2], SELECTOR_DATA);
    sregs.gdt.base = tables.gdt;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = tables.idt;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], SELECTOR_TSS);
    sregs.cr3 = tables.pml4;
    sregs.cr4 |= X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    enter_with(
        vcpu,
        kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: stack_top,
            rbp: stack_top,
            rsi: zero_page,
            ..Default::default()
        },
    )
}

/// The general registers of an entry, and the FPU at its reset state.
fn enter_with(vcpu: &VcpuFd, regs: kvm_regs) -> Result<(), RegsError> {
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

/// Wires the local APIC's LINT0 to the PIC (ExtINT) and LINT1 to NMI, as a
/// PC BIOS leaves them.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 7 << 8;
    const DELIVERY_NMI: u32 = 4 << 8;
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (offset, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
        let reg = lapic_reg(&lapic.regs, offset);
        set_lapic_reg(&mut lapic.regs, offset, (reg & !0x700) | mode);
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

/// Whether the vCPU runs user code: at CPL 3 (its code segment selector's
/// privilege level) and at a lower-half address. A host that keeps CPL 3
/// across `SYSCALL` (ENVIRONMENT.md) can be stopped at CPL 3 on the
/// kernel's entry point: that is the system call, kernel work, never a
/// user instruction.
pub fn in_user_mode(sregs: &kvm_sregs, rip: u64) -> bool {
    sregs.cs.selector & 3 == 3 && rip >> 63 == 0
}

/// Reads a 32-bit register of a `kvm_lapic_state` page.
pub fn lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

/// Writes a 32-bit register of a `kvm_lapic_state` page.
pub fn set_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode_as_flat_long_mode() {
        let gdt = boot_gdt();
        let cs = segment(gdt[1], SELECTOR_CODE);
        assert_eq!(
            (cs.base, cs.limit, cs.l, cs.db, cs.type_),
            (0, 0xffff_ffff, 1, 0, 0xb)
        );
        assert_eq!((cs.present, cs.s, cs.g, cs.dpl), (1, 1, 1, 0));
        let ds = segment(gdt[2], SELECTOR_DATA);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let tr = segment(gdt[3], SELECTOR_TSS);
        assert_eq!((tr.s, tr.type_), (0, 0xb));
    }

    #[test]
    fn lapic_registers_round_trip() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, 0x350, 0xdead_beef);
        assert_eq!(lapic_reg(&regs, 0x350), 0xdead_beef);
    }

    #[test]
    fn user_mode_is_cpl_3_at_a_user_address() {
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 0x33;
        assert!(in_user_mode(&sregs, 0x40_1000));
        assert!(
            !in_user_mode(&sregs, 0xffff_ffff_8120_0040),
            "SYSCALL kept at CPL 3"
        );
        sregs.cs.selector = 0x10;
        assert!(!in_user_mode(&sregs, 0x40_1000));
        assert!(!in_user_mode(&sregs, 0xffff_ffff_8100_0000));
    }
}
