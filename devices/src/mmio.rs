//! Guest-physical ranges that are not RAM and have a device model behind
//! them: each access is a KVM MMIO exit the vCPU hands to [`MmioBus`], the
//! [`Bus`] over `u64` addresses.

use crate::bus::{Address, Bus, BusDevice};

/// MMIO ranges and their devices. Elsewhere reads float high (all ones) and
/// writes vanish, as where nothing answers on a PC.
pub type MmioBus = Bus<u64>;

/// A device reachable through MMIO. `offset` is relative to its base.
pub type MmioDevice = dyn BusDevice<u64>;

/// Why a range cannot go on the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("MMIO range {base:#x}+{len:#x} is empty, wraps or overlaps another")]
pub struct MmioRangeError {
    pub base: u64,
    pub len: u64,
}

/// Guest-physical addresses: `base + len` must fit in a `u64`.
impl Address for u64 {
    const END_LIMIT: u128 = u64::MAX as u128;
    type Error = MmioRangeError;
    fn invalid_range(base: u64, len: u64) -> MmioRangeError {
        MmioRangeError { base, len }
    }
    fn overlap(base: u64, len: u64) -> MmioRangeError {
        MmioRangeError { base, len }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Page([u8; 16]);
    impl BusDevice<u64> for Page {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0[offset as usize]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0[offset as usize] = data[0];
        }
    }

    #[test]
    fn routes_by_offset_floats_high_elsewhere_and_refuses_overlaps() {
        let page = Arc::new(Mutex::new(Page([0; 16])));
        let mut bus = MmioBus::new();
        bus.insert(page.clone(), 0xfe00_0000, 16).unwrap();
        assert!(bus.write(0xfe00_0003, &[7]));
        assert!(!bus.write(0xfe00_0010, &[9]));
        let mut b = [0u8; 2];
        assert!(bus.read(0xfe00_0003, &mut b));
        assert_eq!(b, [7, 7]);
        assert!(!bus.read(0xfe00_0010, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        assert_eq!(
            page.lock().unwrap().0.iter().filter(|&&x| x != 0).count(),
            1
        );
        let other = || Arc::new(Mutex::new(Page([0; 16])));
        assert!(bus.insert(other(), 0xfe00_000f, 1).is_err());
        assert!(bus.insert(other(), u64::MAX, 2).is_err());
        // `base + len` must fit in a u64: the last byte cannot be mapped.
        assert!(bus.insert(other(), u64::MAX, 1).is_err());
        assert!(bus.insert(other(), u64::MAX - 1, 1).is_ok());
        assert!(bus.insert(other(), 0, 0).is_err());
        assert!(bus.insert(other(), 0xfe00_0010, 1).is_ok());
    }
}
