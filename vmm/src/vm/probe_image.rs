//! The built-in probe guest.
//!
//! `build.rs` compiles `guest-images/probe` (a freestanding x86-64 Rust
//! program) into an ELF linked at 0x200000 with a 64-bit entry point that
//! follows the Linux 64-bit boot protocol (long mode, RSI = `boot_params`).
//! `vmm run` boots it when no `--kernel` is given. Every vCPU is started at
//! the same entry; the probe finds the vCPU count in the MP table, reads its
//! command line from `boot_params`, prints `probe: key=value` lines on COM1
//! and resets through the i8042. See `guest-images/probe/README.md` for the
//! command-line grammar and the output lines.

/// The probe guest's ELF image.
pub static PROBE_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"));
