//! Minimal ACPI tables: what a Linux kernel built without MP-table support
//! (Debian's cloud kernel, for one) needs to find its CPUs and I/O APIC.
//! RSDP -> XSDT -> {FADT -> DSDT (empty), MADT}. The FADT is not
//! hardware-reduced: on a hardware-reduced platform Linux drops the legacy
//! PIC and with it the ISA IRQs, and COM1 (IRQ 4, not described in the
//! empty DSDT) would get no interrupt. Its PM1 blocks are ports nothing
//! answers (they read as all ones: SCI_EN set, so always in ACPI mode; no
//! SMI command port), and its SCI (IRQ 9, level, active high by an
//! interrupt source override) never fires.
//! With more than one vCPU the MADT also holds the multiprocessor wakeup
//! structure (ACPI 6.4, type 0x10) naming the mailbox at
//! [`MP_WAKEUP_MAILBOX`]: these hosts cannot run the real-mode INIT/SIPI
//! start-up, so the guest starts its other CPUs through it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::checksum;
use super::layout::{ACPI_START, APIC_DEFAULT_BASE, IOAPIC_DEFAULT_BASE, MP_WAKEUP_MAILBOX};

const OEM_ID: &[u8; 6] = b"VMM   ";
const OEM_TABLE_ID: &[u8; 8] = b"VPMU    ";
const HEADER_LEN: usize = 36;
const FADT_LEN: usize = 276; // revision 6
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

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut body = vec![0u8; FADT_LEN - HEADER_LEN];
    let at = |offset: usize| offset - HEADER_LEN;
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
/// first.
fn tables(num_cpus: u8, base: u64) -> Vec<(u64, Vec<u8>)> {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_at = base;
    let dsdt_at = align(rsdp_at + 36);
    let dsdt = sdt(b"DSDT", 2, &[]);
    let fadt_at = align(dsdt_at + dsdt.len() as u64);
    let fadt = fadt(dsdt_at);
    let madt_at = align(fadt_at + fadt.len() as u64);
    let madt = madt(num_cpus);
    let xsdt_at = align(madt_at + madt.len() as u64);
    let mut pointers = Vec::new();
    pointers.extend_from_slice(&fadt_at.to_le_bytes());
    pointers.extend_from_slice(&madt_at.to_le_bytes());
    let xsdt = sdt(b"XSDT", 1, &pointers);
    vec![
        (rsdp_at, rsdp(xsdt_at)),
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

    #[test]
    fn every_table_checksums_and_links() {
        let t = tables(2, 0xe0000);
        let (_, rsdp) = &t[0];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let xsdt_at = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let find = |addr: u64| t.iter().find(|(a, _)| *a == addr).map(|(_, b)| b).unwrap();
        let xsdt = find(xsdt_at);
        assert_eq!(&xsdt[..4], b"XSDT");
        let mut sigs = Vec::new();
        for (_, table) in &t[1..] {
            let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "{:?}", &table[..4]);
        }
        for p in xsdt[36..].chunks(8) {
            let table = find(u64::from_le_bytes(p.try_into().unwrap()));
            sigs.push(table[..4].to_vec());
        }
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
        let madt = find(u64::from_le_bytes(xsdt[44..52].try_into().unwrap()));
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
        assert_eq!(
            u64::from_le_bytes(wake[8..].try_into().unwrap()),
            MP_WAKEUP_MAILBOX
        );
        // One CPU: nothing to wake, no structure.
        let one = super::madt(1);
        assert_eq!(one.len(), madt.len() - 16 - 8);
    }
}
