//! A port I/O bus: maps port ranges to devices.

use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device reachable through x86 port I/O.
///
/// `offset` is relative to the base port the device was inserted at.
pub trait PioDevice: Send {
    /// Fills `data` for an `in` instruction.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Handles an `out` instruction.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// Errors building the bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("port range {base:#x}+{len} overlaps a device already on the bus")]
    Overlap { base: u16, len: u16 },
    /// The range is empty or wraps past port 0xffff.
    #[error("port range {base:#x}+{len} is empty or wraps")]
    InvalidRange { base: u16, len: u16 },
}

struct Entry {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

/// Port ranges and the devices behind them. Accesses to ports with no device
/// read as all ones and writes are dropped, as on a PC with nothing there.
#[derive(Default)]
pub struct PioBus {
    entries: Vec<Entry>,
}

impl PioBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at ports `base..base + len`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn PioDevice>>,
        base: u16,
        len: u16,
    ) -> Result<(), BusError> {
        let end = u32::from(base) + u32::from(len);
        if len == 0 || end > 0x1_0000 {
            return Err(BusError::InvalidRange { base, len });
        }
        let overlaps = self.entries.iter().any(|e| {
            u32::from(base) < u32::from(e.base) + u32::from(e.len) && u32::from(e.base) < end
        });
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.entries.push(Entry { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Entry, u16)> {
        self.entries
            .iter()
            .find(|e| port >= e.base && u32::from(port) < u32::from(e.base) + u32::from(e.len))
            .map(|e| (e, port - e.base))
    }

    /// Handles an `in`; returns false when no device is at `port`.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Handles an `out`; returns false when no device is at `port`.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some((entry, offset)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device. A device whose lock was poisoned by a panicking vCPU
/// thread is still usable: its state is plain data.
fn lock(device: &Mutex<dyn PioDevice>) -> std::sync::MutexGuard<'_, dyn PioDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u16, u8)>);
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn routes_by_offset_and_reads_ones_where_empty() {
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut bus = PioBus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x3ff, &[9]));
        assert!(!bus.write(0x3f7, &[9]));
        assert_eq!(dev.lock().unwrap().0, vec![(7, 9)]);
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = PioBus::new();
        let dev = || Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(dev(), 0x60, 5).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x64, 1),
            Err(BusError::Overlap { base: 0x64, len: 1 })
        );
        assert!(bus.insert(dev(), 0x65, 1).is_ok());
        assert!(matches!(
            bus.insert(dev(), 0xffff, 2),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0x10, 0),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
