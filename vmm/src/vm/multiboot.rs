//! Multiboot (version 1) kernels: a 32-bit ELF with a Multiboot header,
//! entered in 32-bit protected mode with paging off, `EAX` = the boot
//! magic and `EBX` = the Multiboot information (memory, the command line,
//! modules, a memory map). kvm-unit-tests' `.flat` tests are such kernels;
//! so are many small test kernels. These hosts cannot run real mode, but
//! they run 32-bit protected mode, which is all a Multiboot kernel needs.
//!
//! The header is looked for in the first 8 KiB of the image, 4-byte
//! aligned: magic 0x1BADB002, flags, checksum (the three sum to zero).
//! Flags this loader honours: page-aligned modules (bit 0, modules are
//! placed page-aligned anyway) and memory information (bit 1, always
//! given). Video mode (bit 2) and the a.out address fields (bit 16) are
//! refused with a clear error; so is any other required flag (bits 3-15),
//! as the specification asks.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{CMDLINE_START, HIMEM_START, MMIO_GAP_START};

/// The header's magic number.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// What the loader leaves in `EAX`.
pub const BOOT_MAGIC: u32 = 0x2bad_b002;
/// Where the Multiboot information goes (free low memory: below the zero
/// page and the boot stack, above the GDT and IDT).
pub const INFO_ADDR: u64 = 0x6000;
const MMAP_ADDR: u64 = INFO_ADDR + 0x100;
const MODS_ADDR: u64 = INFO_ADDR + 0x200;
const MOD_STRING_ADDR: u64 = INFO_ADDR + 0x300;
/// How far into the image the header may be.
const SEARCH: usize = 8192;

const FLAG_PAGE_ALIGN: u32 = 1 << 0;
const FLAG_MEMORY_INFO: u32 = 1 << 1;
const FLAG_VIDEO: u32 = 1 << 2;
const FLAG_ADDRESSES: u32 = 1 << 16;

const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;

/// A Multiboot header found in an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub offset: usize,
    pub flags: u32,
}

/// The Multiboot header of `image`, if it has a valid one.
pub fn find_header(image: &[u8]) -> Option<Header> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?))
    };
    (0..SEARCH.min(image.len()).saturating_sub(11))
        .step_by(4)
        .find_map(|offset| {
            let (magic, flags, checksum) = (word(offset)?, word(offset + 4)?, word(offset + 8)?);
            (magic == HEADER_MAGIC && magic.wrapping_add(flags).wrapping_add(checksum) == 0)
                .then_some(Header { offset, flags })
        })
}

/// Why a Multiboot kernel cannot be booted.
pub fn unsupported(header: &Header) -> Option<String> {
    if header.flags & FLAG_VIDEO != 0 {
        return Some("it asks for a video mode (Multiboot flag 2); vmm has no display".into());
    }
    if header.flags & FLAG_ADDRESSES != 0 {
        return Some(
            "it gives load addresses in its header (Multiboot flag 16, a.out kernels); \
             vmm loads Multiboot kernels as 32-bit ELF"
                .into(),
        );
    }
    let required_unknown = header.flags & 0xffff & !(FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO);
    (required_unknown != 0).then(|| {
        format!("it requires Multiboot features vmm does not give (flags {required_unknown:#x})")
    })
}

/// A loadable segment of a 32-bit ELF.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub index: usize,
    /// Guest-physical `[start, end)`.
    pub start: u64,
    pub end: u64,
    /// Where its bytes are in the file, and how many.
    pub offset: usize,
    pub file_size: usize,
}

/// The loadable segments of a 32-bit x86 ELF. `Err` names what is wrong.
pub fn elf32_segments(image: &[u8]) -> Result<Vec<Segment>, String> {
    const ELF_CLASS_32: u8 = 1;
    const EM_386: u16 = 3;
    const PT_LOAD: u32 = 1;
    let bad = || "truncated ELF program headers".to_string();
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_le_bytes(image.get(at..at + 2)?.try_into().ok()?))
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?))
    };
    if image.get(..4) != Some(b"\x7fELF") || image.get(4) != Some(&ELF_CLASS_32) {
        return Err("a Multiboot kernel must be a 32-bit ELF image".into());
    }
    if u16_at(18) != Some(EM_386) {
        return Err("a Multiboot kernel must be an i386 ELF image".into());
    }
    let phoff = u32_at(28).ok_or_else(bad)? as usize;
    let phentsize = usize::from(u16_at(42).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(44).ok_or_else(bad)?);
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or_else(bad)?;
        if u32_at(ph).ok_or_else(bad)? != PT_LOAD {
            continue;
        }
        let offset = u32_at(ph + 4).ok_or_else(bad)? as usize;
        let paddr = u64::from(u32_at(ph + 12).ok_or_else(bad)?);
        let filesz = u32_at(ph + 16).ok_or_else(bad)? as usize;
        let memsz = u64::from(u32_at(ph + 20).ok_or_else(bad)?);
        if filesz as u64 > memsz {
            return Err(format!("ELF segment {i} has more file than memory bytes"));
        }
        if offset
            .checked_add(filesz)
            .is_none_or(|end| end > image.len())
        {
            return Err(format!("ELF segment {i} lies beyond the end of the file"));
        }
        if memsz > 0 {
            segments.push(Segment {
                index: i,
                start: paddr,
                end: paddr + memsz,
                offset,
                file_size: filesz,
            });
        }
    }
    if segments.is_empty() {
        return Err("ELF image has no loadable segment".into());
    }
    Ok(segments)
}

/// The entry point of a 32-bit ELF image.
pub fn elf32_entry(image: &[u8]) -> u64 {
    image
        .get(24..28)
        .and_then(|b| b.try_into().ok())
        .map_or(0, |b| u64::from(u32::from_le_bytes(b)))
}

/// Copies the segments into guest memory (zeroing what the file does not
/// hold). The placement was checked by the caller.
pub fn load_segments(
    mem: &GuestMemoryMmap,
    image: &[u8],
    segments: &[Segment],
) -> Result<(), String> {
    for s in segments {
        let zeros = vec![0u8; (s.end - s.start) as usize];
        let bytes = &image[s.offset..s.offset + s.file_size];
        mem.write_slice(&zeros, GuestAddress(s.start))
            .and_then(|_| mem.write_slice(bytes, GuestAddress(s.start)))
            .map_err(|e| format!("ELF segment {}: {e}", s.index))?;
    }
    Ok(())
}

/// A module for the kernel (the `--initrd`): where it is in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct Module {
    pub start: u64,
    pub end: u64,
}

/// Writes the Multiboot information at [`INFO_ADDR`]: memory (lower and
/// upper, and a map), the command line (already at `CMDLINE_START`) and the
/// module, if any. Returns its address, for `EBX`.
pub fn write_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    module: Option<Module>,
) -> Result<u64, vm_memory::GuestMemoryError> {
    let low_top = mem_size.min(MMIO_GAP_START);
    let mut mmap = Vec::new();
    let mut entry = |base: u64, len: u64, kind: u32| {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&kind.to_le_bytes());
    };
    entry(0, 0x9fc00, 1);
    entry(HIMEM_START, low_top - HIMEM_START, 1);
    if mem_size > MMIO_GAP_START {
        entry(1 << 32, mem_size - MMIO_GAP_START, 1);
    }
    mem.write_slice(&mmap, GuestAddress(MMAP_ADDR))?;

    let mut flags = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP;
    let (mods_count, mods_addr) = match module {
        Some(m) => {
            flags |= INFO_MODS;
            let mut list = Vec::new();
            for word in [m.start as u32, m.end as u32, MOD_STRING_ADDR as u32, 0] {
                list.extend_from_slice(&word.to_le_bytes());
            }
            mem.write_slice(&list, GuestAddress(MODS_ADDR))?;
            mem.write_slice(b"initrd\0", GuestAddress(MOD_STRING_ADDR))?;
            (1u32, MODS_ADDR as u32)
        }
        None => (0, 0),
    };
    let mut info = [0u32; 13];
    info[0] = flags;
    info[1] = 639; // mem_lower, KiB
    info[2] = ((low_top - HIMEM_START) >> 10) as u32; // mem_upper, KiB from 1 MiB
    info[4] = CMDLINE_START as u32;
    info[5] = mods_count;
    info[6] = mods_addr;
    info[11] = mmap.len() as u32; // mmap_length
    info[12] = MMAP_ADDR as u32; // mmap_addr
    let bytes: Vec<u8> = info.iter().flat_map(|w| w.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(INFO_ADDR))?;
    Ok(INFO_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u32) -> Vec<u8> {
        let mut image = vec![0u8; 64];
        let checksum = 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags);
        for (i, w) in [HEADER_MAGIC, flags, checksum].iter().enumerate() {
            image[16 + 4 * i..20 + 4 * i].copy_from_slice(&w.to_le_bytes());
        }
        image
    }

    #[test]
    fn a_header_is_found_only_aligned_with_a_good_checksum() {
        assert_eq!(
            find_header(&header(3)),
            Some(Header {
                offset: 16,
                flags: 3
            })
        );
        let mut bad = header(3);
        bad[24] ^= 1;
        assert_eq!(find_header(&bad), None);
        let mut shifted = vec![0u8; 2];
        shifted.extend(header(3));
        assert_eq!(find_header(&shifted), None, "not 4-byte aligned");
        assert_eq!(find_header(&[]), None);
        assert_eq!(find_header(&HEADER_MAGIC.to_le_bytes()), None);
    }

    #[test]
    fn flags_vmm_cannot_honour_are_refused() {
        let found = |flags| find_header(&header(flags)).unwrap();
        assert_eq!(
            unsupported(&found(FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO)),
            None
        );
        assert!(unsupported(&found(FLAG_VIDEO)).unwrap().contains("video"));
        assert!(unsupported(&found(FLAG_ADDRESSES))
            .unwrap()
            .contains("flag 16"));
        assert!(unsupported(&found(1 << 5)).unwrap().contains("0x20"));
        // Optional flags (bits 17-31) are ignored.
        assert_eq!(unsupported(&found(1 << 20)), None);
    }
}
