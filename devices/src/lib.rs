//! Device models of the `vmm`: one [`Bus`], for port I/O ([`PioBus`]) and
//! MMIO ([`MmioBus`]); the legacy port devices a Linux guest (or the
//! built-in probe) needs to boot and report: an 8250 UART and the i8042
//! controller's reset line; and one MMIO device, the ACPI multiprocessor
//! wakeup mailbox that starts secondary vCPUs.
//!
//! Guest console output goes through [`console`]: a bounded buffer and a
//! writer thread, so that a sink nobody reads never blocks a vCPU.
//!
//! Nothing here knows KVM: devices see port and MMIO accesses and signal the
//! VMM through event file descriptors or narrow traits ([`ResetLine`],
//! [`ApStarter`]).

pub mod bus;
pub mod console;
pub mod debug_exit;
pub mod i8042;
pub mod mmio;
pub mod mp_wakeup;
pub mod serial;
pub mod sync;

pub use bus::{Address, Bus, BusDevice, PioBus, PioDevice};
pub use console::{Console, ConsoleOutput, ConsoleStats};
pub use debug_exit::{DebugExit, ExitLine};
pub use i8042::{ResetLine, I8042};
pub use mmio::{MmioBus, MmioDevice};
pub use mp_wakeup::{ApStartError, ApStarter, MpWakeupMailbox};
pub use serial::{SerialDevice, SerialOutput, INPUT_BUFFER};

/// Helpers for this crate's unit tests.
#[cfg(test)]
mod test_util {
    use std::io::{self, Write};
    use std::sync::{Arc, Mutex};

    /// A sink whose bytes the test can read back (clones share them).
    #[derive(Clone, Default)]
    pub struct SharedSink(pub Arc<Mutex<Vec<u8>>>);

    impl Write for SharedSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
