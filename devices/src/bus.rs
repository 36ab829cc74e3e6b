//! One bus for both address spaces a device can sit in: x86 port I/O
//! ([`PioBus`], `u16` ports) and MMIO ([`crate::MmioBus`], `u64`
//! guest-physical addresses). A [`Bus`] maps address ranges to devices;
//! what differs between the two spaces is only their [`Address`] type.
//!
//! Where no device is, reads float high (all ones) and writes vanish, as
//! where nothing answers on a PC; [`Bus::read`] and [`Bus::write`] then
//! return false.

use crate::sync::Recover;
use std::ops::Sub;
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

/// A device on a bus whose addresses are `A`.
///
/// `offset` is relative to the base the device was inserted at.
pub trait BusDevice<A>: Send {
    /// Fills `data` for a guest read (an `in`, or an MMIO load).
    fn read(&mut self, offset: A, data: &mut [u8]);
    /// Handles a guest write (an `out`, or an MMIO store).
    fn write(&mut self, offset: A, data: &[u8]);
}

/// An address space a [`Bus`] can map: its address type, how far a range
/// may reach and the error a bad range gives.
pub trait Address: Copy + PartialOrd + Sub<Output = Self> + Into<u128> + Send + 'static {
    /// The highest end (base + length, exclusive) a range may have.
    const END_LIMIT: u128;
    /// Why a range cannot go on the bus.
    type Error;
    /// The error for a range that is empty or ends past [`Self::END_LIMIT`].
    fn invalid_range(base: Self, len: Self) -> Self::Error;
    /// The error for a range that overlaps one already on the bus.
    fn overlap(base: Self, len: Self) -> Self::Error;
}

/// A device at `base..base + len`.
struct Entry<A> {
    base: A,
    len: A,
    device: Arc<Mutex<dyn BusDevice<A>>>,
}

impl<A: Address> Entry<A> {
    fn end(&self) -> u128 {
        self.base.into() + self.len.into()
    }
}

/// Address ranges and the devices behind them.
pub struct Bus<A: Address> {
    entries: Vec<Entry<A>>,
}

impl<A: Address> Default for Bus<A> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

impl<A: Address> Bus<A> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `base..base + len`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice<A>>>,
        base: A,
        len: A,
    ) -> Result<(), A::Error> {
        let end = base.into() + len.into();
        if len.into() == 0 || end > A::END_LIMIT {
            return Err(A::invalid_range(base, len));
        }
        if self
            .entries
            .iter()
            .any(|e| base.into() < e.end() && e.base.into() < end)
        {
            return Err(A::overlap(base, len));
        }
        self.entries.push(Entry { base, len, device });
        Ok(())
    }

    /// The device at `addr`, and `addr`'s offset in its range.
    fn find(&self, addr: A) -> Option<(&Mutex<dyn BusDevice<A> + 'static>, A)> {
        self.entries
            .iter()
            .find(|e| addr >= e.base && addr - e.base < e.len)
            .map(|e| (&*e.device, addr - e.base))
    }

    /// A guest read of `data.len()` bytes at `addr`; returns false (and
    /// fills `data` with ones) when no device is there.
    pub fn read(&self, addr: A, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// A guest write at `addr`; returns false (and drops it) when no device
    /// is there.
    pub fn write(&self, addr: A, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device. A device whose lock was poisoned by a panicking vCPU
/// thread is still usable: its state is plain data.
fn lock<'a, A: Address>(
    device: &'a Mutex<dyn BusDevice<A> + 'static>,
) -> MutexGuard<'a, dyn BusDevice<A> + 'static> {
    device.lock().recover()
}

/// The port I/O bus: `in`/`out` exits, by port.
pub type PioBus = Bus<u16>;

/// A device reachable through x86 port I/O.
pub type PioDevice = dyn BusDevice<u16>;

/// Errors building the port I/O bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("port range {base:#x}+{len} overlaps a device already on the bus")]
    Overlap { base: u16, len: u16 },
    /// The range is empty or wraps past port 0xffff.
    #[error("port range {base:#x}+{len} is empty or wraps")]
    InvalidRange { base: u16, len: u16 },
}

/// Ports: a range may end at 0x1_0000, so port 0xffff can have a device.
impl Address for u16 {
    const END_LIMIT: u128 = 0x1_0000;
    type Error = BusError;
    fn invalid_range(base: u16, len: u16) -> BusError {
        BusError::InvalidRange { base, len }
    }
    fn overlap(base: u16, len: u16) -> BusError {
        BusError::Overlap { base, len }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u16, u8)>);
    impl BusDevice<u16> for Echo {
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
        // Port 0xffff itself can have a device.
        assert!(bus.insert(dev(), 0xffff, 1).is_ok());
        assert!(matches!(
            bus.insert(dev(), 0x10, 0),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
