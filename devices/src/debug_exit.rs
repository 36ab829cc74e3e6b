//! QEMU's `isa-debug-exit` device at port 0xf4: a test guest ends the VM
//! with a status by writing it there (kvm-unit-tests does; its run scripts
//! read QEMU's exit code, `(value << 1) | 1`). Only Multiboot guests get it.
//! Reads float high.

use crate::BusDevice;

/// The port test guests use.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Its width: writes of 1 to 4 bytes at the port.
pub const DEBUG_EXIT_LEN: u16 = 4;

/// What the port is wired to.
pub trait ExitLine: Send {
    /// The guest wrote `value` (little-endian, 1 to 4 bytes).
    fn exit(&self, value: u32);
}

/// The debug-exit port.
pub struct DebugExit {
    line: Box<dyn ExitLine>,
}

impl DebugExit {
    pub fn new(line: Box<dyn ExitLine>) -> Self {
        Self { line }
    }
}

/// The process exit code QEMU gives for `value`, as its scripts expect.
pub fn exit_code(value: u32) -> i32 {
    ((value << 1) | 1) as i32 & 0xff
}

impl BusDevice<u16> for DebugExit {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset != 0 || data.is_empty() || data.len() > 4 {
            return;
        }
        let mut bytes = [0u8; 4];
        bytes[..data.len()].copy_from_slice(data);
        self.line.exit(u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Seen(Arc<Mutex<Vec<u32>>>);
    impl ExitLine for Seen {
        fn exit(&self, value: u32) {
            self.0.lock().unwrap().push(value);
        }
    }

    #[test]
    fn writes_at_the_port_end_the_vm_with_qemu_s_exit_code() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut dev = DebugExit::new(Box::new(Seen(seen.clone())));
        dev.write(0, &[0]);
        dev.write(0, &0x0102u16.to_le_bytes());
        dev.write(0, &7u32.to_le_bytes());
        dev.write(1, &[9]);
        dev.write(0, &[]);
        assert_eq!(*seen.lock().unwrap(), vec![0, 0x102, 7]);
        assert_eq!(exit_code(0), 1);
        assert_eq!(exit_code(1), 3);
        assert_eq!(exit_code(0x10), 33);
        let mut b = [0u8; 2];
        dev.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }
}
