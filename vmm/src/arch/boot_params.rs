//! The Linux boot protocol's zero page (`struct boot_params`), for a 64-bit
//! entry: setup header, command line, initrd and the e820 memory map.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::layout::*;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

/// Where the initrd was put.
#[derive(Clone, Copy, Debug)]
pub struct InitrdPlacement {
    pub address: u64,
    pub size: u64,
}

/// Builds the zero page. `header` is the kernel's own setup header when it
/// came from a bzImage; ELF kernels get a minimal valid one.
pub fn build(
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    acpi_rsdp: u64,
    mem_size: u64,
) -> boot_params {
    let mut params = boot_params {
        acpi_rsdp_addr: acpi_rsdp,
        ..Default::default()
    };
    if let Some(hdr) = header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.address as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }

    let mut e820 = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, size) in ram_ranges(mem_size) {
        // The first range starts at 0; its part below 1 MiB is listed above.
        let (start, size) = if start == 0 {
            (HIMEM_START, size - HIMEM_START)
        } else {
            (start, size)
        };
        e820.push((start, size, E820_RAM));
    }
    for (i, (addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    params
}

/// Writes the zero page into guest memory.
pub fn write(
    params: &boot_params,
    mem: &GuestMemoryMmap,
) -> Result<(), linux_loader::configurator::Error> {
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
}

/// The highest page-aligned address below which an initrd of `size` bytes
/// fits, under both the end of low RAM and the kernel's `initrd_addr_max`.
pub fn initrd_address(mem_size: u64, size: u64, initrd_addr_max: u32) -> Option<u64> {
    let low_ram_end = mem_size.min(MMIO_GAP_START);
    let limit = if initrd_addr_max == 0 {
        low_ram_end
    } else {
        low_ram_end.min(u64::from(initrd_addr_max) + 1)
    };
    let start = limit.checked_sub(size)? & !0xfff;
    (start >= HIMEM_START).then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_reserves_the_bios_area() {
        let p = build(None, 10, None, 0xe0000, 256 << 20);
        let n = p.e820_entries as usize;
        let table: Vec<_> = p.e820_table[..n]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(
            table,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM),
            ]
        );
        let (cmd_line_ptr, header) = (p.hdr.cmd_line_ptr, p.hdr.header);
        assert_eq!(cmd_line_ptr, CMDLINE_START as u32);
        assert_eq!(header, KERNEL_HDR_MAGIC);
    }

    #[test]
    fn initrd_goes_high_and_respects_the_kernel_limit() {
        assert_eq!(
            initrd_address(256 << 20, 0x1800, 0),
            Some((256 << 20) - 0x2000)
        );
        assert_eq!(
            initrd_address(8 << 30, 0x1000, 0x37ff_ffff),
            Some(0x3800_0000 - 0x1000)
        );
        assert_eq!(initrd_address(2 << 20, 4 << 20, 0), None);
    }
}
