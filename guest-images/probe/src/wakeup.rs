//! Starts the secondary vCPUs the way an OS does on a platform without
//! INIT/SIPI: through the ACPI multiprocessor wakeup mailbox (ACPI 6.4, MADT
//! structure type 0x10). RSDP (from `boot_params.acpi_rsdp_addr`, else the
//! BIOS area scan) -> XSDT -> MADT -> the mailbox's address; then, per AP:
//! APIC ID, wakeup vector (`_start`), command Wakeup, and wait (bounded) for
//! the command to read back as Noop.

use crate::cpu::{pause, rdtsc};
use crate::mptable::{checksum_ok, read_u32, read_u8};
use crate::time;

const BP_ACPI_RSDP_ADDR: u64 = 0x070;
const MADT_MP_WAKEUP: u8 = 0x10;
const COMMAND_WAKEUP: u16 = 1;

fn read_u64(addr: u64) -> u64 {
    read_u32(addr) as u64 | (read_u32(addr + 4) as u64) << 32
}

fn signature(addr: u64) -> [u8; 4] {
    read_u32(addr).to_le_bytes()
}

fn rsdp(boot_params: u64) -> Option<u64> {
    let valid = |a: u64| {
        a != 0 && read_u64(a) == u64::from_le_bytes(*b"RSD PTR ") && checksum_ok(a, 20)
    };
    let given = if boot_params == 0 {
        0
    } else {
        read_u64(boot_params + BP_ACPI_RSDP_ADDR)
    };
    if valid(given) {
        return Some(given);
    }
    (0xe0000..0x100000u64).step_by(16).find(|&a| valid(a))
}

/// The mailbox address the MADT's MP wakeup structure names, if any.
pub fn find_mailbox(boot_params: u64) -> Option<u64> {
    let rsdp = rsdp(boot_params)?;
    if read_u8(rsdp + 15) < 2 {
        return None; // no XSDT
    }
    let xsdt = read_u64(rsdp + 24);
    if signature(xsdt) != *b"XSDT" {
        return None;
    }
    let xsdt_len = read_u32(xsdt + 4) as u64;
    let madt = (36..xsdt_len)
        .step_by(8)
        .map(|off| read_u64(xsdt + off))
        .find(|&t| signature(t) == *b"APIC")?;
    let end = madt + read_u32(madt + 4) as u64;
    let mut p = madt + 44;
    while p + 2 <= end {
        let (kind, len) = (read_u8(p), read_u8(p + 1) as u64);
        if len < 2 {
            return None; // malformed: stop rather than loop
        }
        if kind == MADT_MP_WAKEUP && len >= 16 {
            return Some(read_u64(p + 8));
        }
        p += len;
    }
    None
}

/// Wakes the AP with `apic_id` at `vector`; true once the mailbox
/// acknowledged (command back to 0) within `timeout_ms`.
pub fn wake(mailbox: u64, apic_id: u32, vector: u64, timeout_ms: u64) -> bool {
    let command = mailbox as *mut u16;
    // SAFETY: the mailbox is the 4 KiB page the firmware (the VMM) named in
    // the MADT, identity-mapped; the fields are at the ACPI 6.4 offsets.
    unsafe {
        core::ptr::write_volatile((mailbox + 4) as *mut u32, apic_id);
        core::ptr::write_volatile((mailbox + 8) as *mut u64, vector);
        core::ptr::write_volatile(command, COMMAND_WAKEUP);
    }
    let limit = time::ms_to_tsc(timeout_ms);
    let t0 = rdtsc();
    loop {
        // SAFETY: as above.
        if unsafe { core::ptr::read_volatile(command) } == 0 {
            return true;
        }
        if rdtsc().wrapping_sub(t0) >= limit {
            return false;
        }
        pause();
    }
}
