//! An Intel MultiProcessor Specification 1.4 table: the CPUs (one local
//! APIC each, IDs 0..n), the ISA bus, the I/O APIC and how ISA IRQs reach
//! it. Linux finds it in the BIOS area and brings up every CPU listed; the
//! probe guest counts the CPU entries.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::checksum;
use super::layout::{APIC_DEFAULT_BASE, IOAPIC_DEFAULT_BASE, MPTABLE_START};

/// The most CPUs an MP table can describe here (APIC IDs are 8 bits and the
/// I/O APIC takes the ID after the last CPU).
pub const MAX_CPUS: u8 = 254;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
const ISA_IRQS: u8 = 16;

/// Errors writing the table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in an MP table (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    #[error("the MP table does not fit in guest memory")]
    NoRoom,
}

/// Serializes the table for `num_cpus` CPUs, to be placed at `base`.
fn encode(num_cpus: u8, base: u32) -> Vec<u8> {
    let ioapic_id = num_cpus;
    let mut entries = Vec::new();
    let mut entry_count = 0u16;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU | APIC
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    entry_count += 1;
    for irq in 0..ISA_IRQS {
        // KVM's default routing sends ISA IRQ n to I/O APIC pin n.
        entries.extend_from_slice(&[ENTRY_INTSRC, INT_TYPE_INT, 0, 0, ISA_BUS_ID, irq]);
        entries.extend_from_slice(&[ioapic_id, irq]);
        entry_count += 1;
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LINTSRC, kind, 0, 0, ISA_BUS_ID, 0, 0xff, lint]);
        entry_count += 1;
    }

    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_addr = base + FLOATING_LEN as u32;
    let table_len = (HEADER_LEN + entries.len()) as u16;

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&table_len.to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"VMM     "); // OEM id
    header.extend_from_slice(b"VPMU        "); // product id
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes()); // extended table
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(4); // spec revision
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // no default configuration
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    floating
}

/// Writes the MP table for `num_cpus` CPUs into guest memory.
pub fn write(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let bytes = encode(num_cpus, MPTABLE_START as u32);
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| MptableError::NoRoom)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::byte_sum as sum;

    #[test]
    fn checksums_and_cpu_entries_are_right() {
        let bytes = encode(3, 0xf0000);
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(sum(&bytes[..16]), 0);
        let table_addr = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
        assert_eq!(table_addr, 0xf0010);
        let table = &bytes[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        // Walk the entries and collect processor APIC IDs and flags.
        let mut cpus = Vec::new();
        let mut at = 44;
        while at < len {
            let size = if table[at] == ENTRY_PROCESSOR { 20 } else { 8 };
            if table[at] == ENTRY_PROCESSOR {
                cpus.push((table[at + 1], table[at + 3]));
            }
            at += size;
        }
        assert_eq!(at, len);
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1)]);
    }
}
