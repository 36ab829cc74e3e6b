//! x86-64 machine set-up: where things live in guest memory, the boot
//! protocol's zero page, page tables and segments for a 64-bit entry, the MP
//! table that tells the guest its CPUs, and per-vCPU CPUID.
//!
//! A leaf: it imports nothing of the crate, and knows no KVM object beyond
//! the vCPU file descriptor it programs.

pub mod acpi;
pub mod boot_params;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;

/// Sum of `data`'s bytes, modulo 256. Firmware tables (MP, ACPI) are valid
/// when their bytes sum to zero.
pub fn byte_sum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// The checksum byte that makes `data` (with the checksum byte zero) sum to
/// zero.
pub fn checksum(data: &[u8]) -> u8 {
    0u8.wrapping_sub(byte_sum(data))
}
