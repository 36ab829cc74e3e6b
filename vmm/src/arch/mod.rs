//! x86-64 machine set-up: where things live in guest memory, the boot
//! protocol's zero page, page tables and segments for a 64-bit entry, the MP
//! table that tells the guest its CPUs, and per-vCPU CPUID.

pub mod acpi;
pub mod boot_params;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
