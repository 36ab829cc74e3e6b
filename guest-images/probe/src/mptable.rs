//! Intel MultiProcessor Specification 1.4 table: finds the floating pointer
//! (`_MP_`, 16-byte aligned, in the last KiB of base memory, the EBDA's first
//! KiB or the BIOS area 0xF0000..0x100000) and counts the enabled processor
//! entries of its configuration table (`PCMP`).

use crate::serial::{Line, Put};

pub(crate) fn read_u8(addr: u64) -> u8 {
    // SAFETY: low physical memory is identity-mapped guest RAM/ROM.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

pub(crate) fn read_u16(addr: u64) -> u16 {
    read_u8(addr) as u16 | (read_u8(addr + 1) as u16) << 8
}

pub(crate) fn read_u32(addr: u64) -> u32 {
    read_u16(addr) as u32 | (read_u16(addr + 2) as u32) << 16
}

pub(crate) fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(read_u8(addr + i))) == 0
}

/// What the MP table says about the processors.
pub struct MpInfo {
    /// Address of the floating pointer structure.
    pub fps: u64,
    /// Enabled processor entries.
    pub cpus: u32,
    /// Bit n: an enabled processor entry has APIC ID n (IDs < 64).
    pub apic_ids: u64,
    /// APIC ID of the entry flagged as BSP.
    pub bsp: Option<u32>,
    /// Processor entries with the enabled flag clear.
    pub disabled: u32,
}

fn scan(start: u64, len: u64) -> Option<u64> {
    let mut a = start & !0xf;
    while a + 16 <= start + len {
        if read_u32(a) == u32::from_le_bytes(*b"_MP_") {
            let flen = read_u8(a + 8) as u64 * 16;
            if flen >= 16 && checksum_ok(a, flen) {
                return Some(a);
            }
        }
        a += 16;
    }
    None
}

/// Finds and parses the MP table, if any.
pub fn find() -> Option<MpInfo> {
    let ebda = (read_u16(0x40e) as u64) << 4;
    let fps = (if (0x80000..0xa0000).contains(&ebda) {
        scan(ebda, 1024)
    } else {
        None
    })
    .or_else(|| scan(0x9fc00, 1024))
    .or_else(|| scan(0xf0000, 0x10000))?;

    let mut info = MpInfo {
        fps,
        cpus: 0,
        apic_ids: 0,
        bsp: None,
        disabled: 0,
    };
    let cfg = read_u32(fps + 4) as u64;
    if cfg == 0 || read_u32(cfg) != u32::from_le_bytes(*b"PCMP") {
        // Default configurations (no table) describe two processors.
        if read_u8(fps + 11) != 0 {
            info.cpus = 2;
            info.apic_ids = 0b11;
            info.bsp = Some(0);
        }
        return Some(info);
    }
    let base_len = read_u16(cfg + 4) as u64;
    let count = read_u16(cfg + 34) as u64;
    let end = cfg + base_len;
    let mut p = cfg + 44;
    for _ in 0..count {
        if p >= end {
            break;
        }
        match read_u8(p) {
            0 => {
                let id = read_u8(p + 1) as u32;
                let flags = read_u8(p + 3);
                if flags & 1 != 0 {
                    info.cpus += 1;
                    if id < 64 {
                        info.apic_ids |= 1 << id;
                    }
                    if flags & 2 != 0 {
                        info.bsp = Some(id);
                    }
                } else {
                    info.disabled += 1;
                }
                p += 20;
            }
            1..=4 => p += 8,
            _ => break, // unknown entry type: stop rather than misparse
        }
    }
    Some(info)
}

/// `0,1,2` style list of the set bits of a mask (`none` if empty).
pub struct IdList(pub u64);

impl Put for IdList {
    fn put(&self, l: &mut Line) {
        let mut first = true;
        for i in 0..64u64 {
            if self.0 & (1 << i) != 0 {
                if !first {
                    l.byte(b',');
                }
                first = false;
                l.put(&i);
            }
        }
        if first {
            l.bytes(b"none");
        }
    }
}
