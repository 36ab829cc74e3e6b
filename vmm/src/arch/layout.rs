//! The guest-physical memory map. Below 1 MiB it follows what a PC BIOS
//! leaves behind for a 64-bit boot loader; kernels load at 1 MiB or above.

/// Flat GDT the vCPUs start with.
pub const GDT_START: u64 = 0x500;
/// An empty IDT: the guest installs its own before enabling interrupts.
pub const IDT_START: u64 = 0x520;
/// Linux `struct boot_params` ("zero page"); RSI points here at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack of the boot vCPU (grows down, below the page tables).
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, then one PDPT and four page
/// directories in the pages that follow it.
pub const PML4_START: u64 = 0x9000;
/// Page directories mapping the first 4 GiB with 2 MiB pages.
pub const PD_COUNT: u64 = 4;
/// Size of one set of page tables: PML4, PDPT, page directories.
pub const PAGE_TABLES_SIZE: u64 = (2 + PD_COUNT) * 0x1000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we pass (Linux's own limit on x86 is 2048 unless the
/// setup header says more).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area: RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// The tables secondary vCPUs start with (GDT and IDT, then PML4, PDPT and
/// the page directories, as at `GDT_START`/`PML4_START`), in memory the e820
/// map reserves, so that the guest cannot have overwritten them by the time
/// it wakes a vCPU through the mailbox.
pub const AP_GDT_START: u64 = 0xa0000;
pub const AP_IDT_START: u64 = AP_GDT_START + 0x20;
pub const AP_PML4_START: u64 = 0xa1000;
/// End of the AP tables: PML4, PDPT and `PD_COUNT` page directories.
pub const AP_TABLES_END: u64 = AP_PML4_START + PAGE_TABLES_SIZE;
/// What the start-up page tables identity-map (`PD_COUNT` GiB): a wakeup
/// vector must lie below it.
pub const IDENTITY_MAPPED_END: u64 = PD_COUNT << 30;
/// ACPI tables (RSDP first), in the BIOS area Linux scans.
pub const ACPI_START: u64 = 0xe0000;
/// MP floating pointer and configuration table (in the BIOS ROM area, where
/// Linux's `smp_scan_config()` looks).
pub const MPTABLE_START: u64 = 0xf0000;
/// Start of "high" memory, where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Hole for MMIO below 4 GiB (LAPIC, IOAPIC).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Local APIC and I/O APIC default addresses.
pub const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
pub const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
/// The ACPI multiprocessor wakeup mailbox (one 4 KiB page): in the MMIO
/// gap, never RAM, so every guest access reaches the VMM.
pub const MP_WAKEUP_MAILBOX: u64 = 0xfe00_0000;
const _: () =
    assert!(MP_WAKEUP_MAILBOX >= MMIO_GAP_START && MP_WAKEUP_MAILBOX.is_multiple_of(4096));
/// The KVM TSS pages live just below the LAPIC (Intel needs them; harmless
/// elsewhere), above KVM's default identity-map page (0xfffb_c000).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Where the VMM writes its own boot structures, named for messages: no
/// kernel segment or initrd may overlap them (`loader` checks). The ACPI
/// and MP tables get their whole 64 KiB areas.
pub fn boot_structures() -> [(&'static str, u64, u64); 8] {
    [
        ("the boot GDT and IDT", GDT_START, IDT_START + 8),
        ("the zero page", ZERO_PAGE_START, ZERO_PAGE_START + 0x1000),
        ("the boot stack", ZERO_PAGE_START + 0x1000, PML4_START),
        (
            "the boot page tables",
            PML4_START,
            PML4_START + PAGE_TABLES_SIZE,
        ),
        (
            "the kernel command line",
            CMDLINE_START,
            CMDLINE_START + CMDLINE_MAX_SIZE as u64,
        ),
        (
            "the secondary vCPUs' start-up tables",
            AP_GDT_START,
            AP_TABLES_END,
        ),
        ("the ACPI tables", ACPI_START, MPTABLE_START),
        ("the MP table", MPTABLE_START, HIMEM_START),
    ]
}

/// Guest RAM ranges for `size` bytes of memory: everything from 0, split
/// around the MMIO gap.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_structures_are_in_order_and_apart() {
        let s = boot_structures();
        for pair in s.windows(2) {
            assert!(pair[0].1 < pair[0].2 && pair[0].2 <= pair[1].1, "{pair:?}");
        }
        assert!(BOOT_STACK_TOP > s[2].1 && BOOT_STACK_TOP <= s[2].2);
        assert!(s[7].2 <= HIMEM_START);
        // The AP tables are in the e820 reserved area.
        assert!(s[5].1 >= EBDA_START && s[5].2 <= ACPI_START);
    }

    #[test]
    fn ram_above_the_gap_moves_past_4g() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]
        );
    }
}
