//! Device models of the `vmm`: a port I/O bus and the legacy devices a Linux
//! guest (or the built-in probe) needs to boot and report: an 8250 UART and
//! the i8042 controller's reset line.
//!
//! Nothing here knows KVM: devices see port accesses and signal the VMM
//! through event file descriptors.

pub mod bus;
pub mod i8042;
pub mod serial;

pub use bus::{PioBus, PioDevice};
pub use i8042::{ResetLine, I8042};
pub use serial::{SerialDevice, SerialOutput};
