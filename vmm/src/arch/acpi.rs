//! Minimal ACPI tables: what a Linux kernel built without MP-table support
//! (Debian's cloud kernel, for one) needs to find its CPUs and I/O APIC.
//! RSDP -> XSDT -> {FADT -> {DSDT (no AML), FACS}, MADT}. The FADT is not
//! hardware-reduced: on a hardware-reduced platform Linux drops the legacy
//! PIC and with it the ISA IRQs, and COM1 (IRQ 4, not described in the
//! empty DSDT) would get no interrupt. A platform that is not
//! hardware-reduced must have a FACS (ACPI 6.4, 5.2.10): ACPICA takes the
//! global lock's bit from it, so it is here, though nothing takes the lock.
//! The FADT's PM1 blocks are ports nothing answers (they read as all ones:
//! SCI_EN set, so always in ACPI mode; no SMI command port), and its SCI
//! (IRQ 9, level, active high by an interrupt source override) never fires.
//! With more than one vCPU the MADT also holds the multiprocessor wakeup
//! structure (ACPI 6.4, type 0x10) naming the mailbox at
//! [`MP_WAKEUP_MAILBOX`]: these hosts cannot run the real-mode INIT/SIPI
//! start-up, so the guest starts its other CPUs through it.
//!
//! Linux loads these tables with its interpreter on and no error
//! (`tests/linux_boot.rs` holds every acceptance guest's boot log to that:
//! the `*.boot-log` rows). A DSDT without AML is a valid, empty namespace;
//! the errors Linux 6.1 used to print at every boot came from its ACPICA
//! refusing the PCI_Config space in a kernel built without PCI, before it
//! read any table (the guest kernel's patch 0005).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::checksum;
use super::layout::{ACPI_START, APIC_DEFAULT_BASE, IOAPIC_DEFAULT_BASE, MP_WAKEUP_MAILBOX};

const OEM_ID: &[u8; 6] = b"VMM   ";
const OEM_TABLE_ID: &[u8; 8] = b"VPMU    ";
const HEADER_LEN: usize = 36;
const FADT_LEN: usize = 276; // revision 6
/// FACS: 64 bytes, on a 64-byte boundary, no checksum.
const FACS_LEN: usize = 64;
const FACS_ALIGN: u64 = 64;
/// FACS version 2: ACPI 2.0 and later (64-bit waking vector field).
const FACS_VERSION: u8 = 2;
/// FADT flags: WBINVD works; no fixed power or sleep button.
const FADT_FLAGS: u32 = 1 | (1 << 4) | (1 << 5);
/// IA-PC boot architecture flags: legacy (ISA) devices present.
const FADT_BOOT_LEGACY_DEVICES: u16 = 1;
const SCI_IRQ: u8 = 9;
/// PM1a event (4 bytes) and control (2 bytes) blocks: free ports.
const PM1A_EVT_BLK: u32 = 0x600;
const PM1A_CNT_BLK: u32 = 0x604;
const MADT_INT_SRC_OVERRIDE: u8 = 2;
/// MPS INTI flags: active high (01), level triggered (11 << 2).
const INTI_LEVEL_HIGH: u16 = 0x000d;
const MADT_FLAG_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_MP_WAKEUP: u8 = 0x10;
const MADT_MP_WAKEUP_LEN: u8 = 16;

/// A system description table: header plus body, checksummed.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = (HEADER_LEN + body.len()) as u32;
    let mut t = Vec::with_capacity(len as usize);
    t.extend_from_slice(signature);
    t.extend_from_slice(&len.to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"VMM "); // creator id
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

fn madt(num_cpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    body.extend_from_slice(&MADT_FLAG_PCAT_COMPAT.to_le_bytes());
    for cpu in 0..num_cpus {
        body.extend_from_slice(&[MADT_LOCAL_APIC, 8, cpu, cpu]);
        body.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    // The I/O APIC takes the ID after the CPUs, as in the MP table.
    body.extend_from_slice(&[MADT_IO_APIC, 12, num_cpus, 0]);
    body.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    // GSI base 0.
    body.extend_from_slice(&0u32.to_le_bytes());
    // ISA IRQs map to the same I/O APIC pins; the SCI is level, active high.
    body.extend_from_slice(&[MADT_INT_SRC_OVERRIDE, 10, 0, SCI_IRQ]);
    body.extend_from_slice(&u32::from(SCI_IRQ).to_le_bytes());
    body.extend_from_slice(&INTI_LEVEL_HIGH.to_le_bytes());
    // LINT1 of every CPU is NMI.
    body.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);
    if num_cpus > 1 {
        body.extend_from_slice(&[MADT_MP_WAKEUP, MADT_MP_WAKEUP_LEN]);
        body.extend_from_slice(&devices::mp_wakeup::MAILBOX_VERSION.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes()); // reserved
        body.extend_from_slice(&MP_WAKEUP_MAILBOX.to_le_bytes());
    }
    sdt(b"APIC", 5, &body)
}

/// The firmware ACPI control structure: no waking vector (no sleep states
/// are offered), the global lock free, no flags.
fn facs() -> Vec<u8> {
    let mut f = vec![0u8; FACS_LEN];
    f[..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&(FACS_LEN as u32).to_le_bytes());
    f[32] = FACS_VERSION;
    f
}

/// The FADT; `facs` must lie below 4 GiB (FIRMWARE_CTRL is 32 bits, and
/// X_FIRMWARE_CTRL stays 0 as ACPI requires when FIRMWARE_CTRL is set).
fn fadt(dsdt: u64, facs: u32) -> Vec<u8> {
    let mut body = vec![0u8; FADT_LEN - HEADER_LEN];
    let at = |offset: usize| offset - HEADER_LEN;
    body[at(36)..at(40)].copy_from_slice(&facs.to_le_bytes());
    body[at(40)..at(44)].copy_from_slice(&(dsdt as u32).to_le_bytes());
    body[at(46)..at(48)].copy_from_slice(&u16::from(SCI_IRQ).to_le_bytes());
    body[at(56)..at(60)].copy_from_slice(&PM1A_EVT_BLK.to_le_bytes());
    body[at(64)..at(68)].copy_from_slice(&PM1A_CNT_BLK.to_le_bytes());
    body[at(88)] = 4; // PM1_EVT_LEN
    body[at(89)] = 2; // PM1_CNT_LEN
    body[at(109)..at(111)].copy_from_slice(&FADT_BOOT_LEGACY_DEVICES.to_le_bytes());
    body[at(112)..at(116)].copy_from_slice(&FADT_FLAGS.to_le_bytes());
    body[at(131)] = 3; // FADT minor version (6.3)
    body[at(140)..at(148)].copy_from_slice(&dsdt.to_le_bytes());
    body[at(268)..at(276)].copy_from_slice(b"VMMVPMU ");
    sdt(b"FACP", 6, &body)
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes, below
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+, has an XSDT
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt.to_le_bytes());
    r.push(0); // extended checksum, below
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// Lays the tables out from `base`; returns (address, bytes) pairs, RSDP
/// first. Everything lies within the 64 KiB from `base`.
fn tables(num_cpus: u8, base: u64) -> Vec<(u64, Vec<u8>)> {
    let align = |a: u64, to: u64| a.div_ceil(to) * to;
    let rsdp_at = base;
    let facs_at = align(rsdp_at + 36, FACS_ALIGN);
    let dsdt_at = align(facs_at + FACS_LEN as u64, 16);
    let dsdt = sdt(b"DSDT", 2, &[]);
    let fadt_at = align(dsdt_at + dsdt.len() as u64, 16);
    let fadt = fadt(dsdt_at, facs_at as u32);
    let madt_at = align(fadt_at + fadt.len() as u64, 16);
    let madt = madt(num_cpus);
    let xsdt_at = align(madt_at + madt.len() as u64, 16);
    let mut pointers = Vec::new();
    pointers.extend_from_slice(&fadt_at.to_le_bytes());
    pointers.extend_from_slice(&madt_at.to_le_bytes());
    let xsdt = sdt(b"XSDT", 1, &pointers);
    vec![
        (rsdp_at, rsdp(xsdt_at)),
        (facs_at, facs()),
        (dsdt_at, dsdt),
        (fadt_at, fadt),
        (madt_at, madt),
        (xsdt_at, xsdt),
    ]
}

/// Writes the tables; returns the RSDP's address for the zero page.
pub fn write(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<u64, vm_memory::GuestMemoryError> {
    for (addr, bytes) in tables(num_cpus, ACPI_START) {
        mem.write_slice(&bytes, GuestAddress(addr))?;
    }
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::byte_sum as sum;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The table at `addr` among `t`.
    fn find(t: &[(u64, Vec<u8>)], addr: u64) -> &[u8] {
        t.iter()
            .find(|(a, _)| *a == addr)
            .map(|(_, b)| b.as_slice())
            .unwrap_or_else(|| panic!("no table at {addr:#x}"))
    }

    #[test]
    fn every_table_checksums_and_links() {
        let t = tables(2, 0xe0000);
        let (_, rsdp) = &t[0];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp.len(), 36);
        assert_eq!(rsdp[15], 2, "revision 2: the XSDT is used");
        assert_eq!(u32_at(rsdp, 20), 36, "RSDP length");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let xsdt = find(&t, u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        // Every system description table: its length field is its length
        // and its bytes sum to 0 (the FACS has neither a header nor a
        // checksum).
        for (_, table) in &t[1..] {
            if &table[..4] == b"FACS" {
                continue;
            }
            assert!(table.len() >= HEADER_LEN);
            assert_eq!(u32_at(table, 4) as usize, table.len(), "{:?}", &table[..4]);
            assert_eq!(sum(table), 0, "{:?}", &table[..4]);
        }
        let sigs: Vec<&[u8]> = xsdt[36..]
            .chunks(8)
            .map(|p| &find(&t, u64::from_le_bytes(p.try_into().unwrap()))[..4])
            .collect();
        assert_eq!(sigs, vec![b"FACP", b"APIC"]);
        let madt = find(&t, u64_at(xsdt, 44));
        // Two local APIC entries with IDs 0 and 1.
        let cpus: Vec<u8> = madt[44..]
            .chunks(8)
            .take(2)
            .map(|e| {
                assert_eq!(e[0], MADT_LOCAL_APIC);
                e[3]
            })
            .collect();
        assert_eq!(cpus, vec![0, 1]);
        // The last entry is the MP wakeup structure naming the mailbox.
        let wake = &madt[madt.len() - 16..];
        assert_eq!((wake[0], wake[1]), (MADT_MP_WAKEUP, 16));
        assert_eq!(u64_at(wake, 8), MP_WAKEUP_MAILBOX);
        // One CPU: nothing to wake, no structure.
        let one = super::madt(1);
        assert_eq!(one.len(), madt.len() - 16 - 8);
    }

    #[test]
    fn the_fadt_points_at_the_dsdt_and_facs_and_is_not_hardware_reduced() {
        let t = tables(1, 0xe0000);
        let xsdt = find(&t, u64_at(&t[0].1, 24));
        let fadt = find(&t, u64_at(xsdt, 36));
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(fadt.len(), FADT_LEN);
        assert_eq!((fadt[8], fadt[131]), (6, 3), "FADT revision 6.3");
        // FIRMWARE_CTRL names the FACS; X_FIRMWARE_CTRL must then be 0.
        let facs = find(&t, u64::from(u32_at(fadt, 36)));
        assert_eq!(u64_at(fadt, 132), 0);
        assert_eq!(&facs[..4], b"FACS");
        // DSDT and X_DSDT name the same table.
        let dsdt_at = u64_at(fadt, 140);
        assert_eq!(u64::from(u32_at(fadt, 40)), dsdt_at);
        assert_eq!(&find(&t, dsdt_at)[..4], b"DSDT");
        // The SCI and the PM1 blocks ACPICA requires of a platform that is
        // not hardware-reduced; no SMI command port (always in ACPI mode).
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), u16::from(SCI_IRQ));
        assert_eq!(u32_at(fadt, 48), 0, "SMI_CMD");
        assert_eq!(u32_at(fadt, 56), PM1A_EVT_BLK);
        assert_eq!(u32_at(fadt, 64), PM1A_CNT_BLK);
        assert_eq!(
            (fadt[88], fadt[89]),
            (4, 2),
            "PM1 event and control lengths"
        );
        assert_eq!(u32_at(fadt, 76), 0, "no PM timer");
        let flags = u32_at(fadt, 112);
        assert_eq!(flags & (1 << 20), 0, "HW_REDUCED_ACPI must be clear");
        assert_eq!(flags, FADT_FLAGS);
        assert_eq!(
            u16::from_le_bytes([fadt[109], fadt[110]]),
            1,
            "legacy devices"
        );
        assert_eq!(&fadt[268..276], b"VMMVPMU ", "hypervisor vendor identity");
    }

    #[test]
    fn the_facs_is_64_aligned_bytes_of_version_2_and_the_dsdt_holds_no_aml() {
        let t = tables(4, 0xe0000);
        let (facs_at, facs) = t.iter().find(|(_, b)| &b[..4] == b"FACS").unwrap();
        assert_eq!(facs_at % 64, 0, "the FACS must be 64-byte aligned");
        assert_eq!(facs.len(), 64);
        assert_eq!(u32_at(facs, 4), 64);
        assert_eq!(facs[32], FACS_VERSION);
        // Hardware signature, waking vectors, global lock and flags: 0.
        assert!(facs[8..32].iter().chain(&facs[33..]).all(|&b| b == 0));
        let (_, dsdt) = t.iter().find(|(_, b)| &b[..4] == b"DSDT").unwrap();
        assert_eq!(dsdt.len(), HEADER_LEN, "header only: an empty namespace");
        assert_eq!(u32_at(dsdt, 4) as usize, HEADER_LEN);
        assert_eq!(dsdt[8], 2, "revision 2: 64-bit AML integers");
        assert_eq!(sum(dsdt), 0);
    }

    #[test]
    fn the_tables_never_overlap_and_fit_below_the_mp_table_for_255_cpus() {
        for cpus in [1, 2, 64, 255] {
            let mut t = tables(cpus, ACPI_START);
            assert_eq!(t[0].0, ACPI_START, "the RSDP comes first");
            t.sort_by_key(|(a, _)| *a);
            for pair in t.windows(2) {
                let (a, ta) = &pair[0];
                assert!(
                    a + ta.len() as u64 <= pair[1].0,
                    "{cpus} CPUs: overlap at {a:#x}"
                );
            }
            let (last, bytes) = t.last().unwrap();
            assert!(last + bytes.len() as u64 <= crate::arch::layout::MPTABLE_START);
            let madt = t.iter().find(|(_, b)| &b[..4] == b"APIC").unwrap();
            let wakeup = if cpus > 1 { 16 } else { 0 };
            // Header, LAPIC address and flags, one LAPIC entry per CPU, the
            // I/O APIC, one override, the LINT1 NMI, the wakeup structure.
            assert_eq!(
                madt.1.len(),
                HEADER_LEN + 8 + 8 * usize::from(cpus) + 12 + 10 + 6 + wakeup
            );
        }
    }
}
