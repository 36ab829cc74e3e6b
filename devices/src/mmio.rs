//! Guest-physical ranges that are not RAM and have a device model behind
//! them: each access is a KVM MMIO exit the vCPU hands to [`MmioBus`].

use std::sync::{Arc, Mutex};

/// A device reachable through MMIO. `offset` is relative to its base.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a range cannot go on the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("MMIO range {base:#x}+{len:#x} is empty, wraps or overlaps another")]
pub struct MmioRangeError {
    pub base: u64,
    pub len: u64,
}

/// One device's range: base, length, device.
type Range = (u64, u64, Arc<Mutex<dyn MmioDevice>>);

/// MMIO ranges and their devices. Elsewhere reads float high (all ones) and
/// writes vanish, as where nothing answers on a PC.
#[derive(Default)]
pub struct MmioBus {
    ranges: Vec<Range>,
}

impl MmioBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `base..base + len`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn MmioDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), MmioRangeError> {
        let bad = len == 0
            || base.checked_add(len).is_none()
            || self
                .ranges
                .iter()
                .any(|&(b, l, _)| base < b + l && b < base + len);
        if bad {
            return Err(MmioRangeError { base, len });
        }
        self.ranges.push((base, len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Mutex<dyn MmioDevice>, u64)> {
        self.ranges
            .iter()
            .find(|&&(b, l, _)| addr >= b && addr - b < l)
            .map(|(b, _, d)| (&**d, addr - b))
    }

    /// A guest read of `data.len()` bytes at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((device, offset)) => lock(device).read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((device, offset)) = self.find(addr) {
            lock(device).write(offset, data);
        }
    }
}

/// A poisoned device lock still holds plain data: use it.
fn lock(device: &Mutex<dyn MmioDevice>) -> std::sync::MutexGuard<'_, dyn MmioDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Page([u8; 16]);
    impl MmioDevice for Page {
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
        bus.write(0xfe00_0003, &[7]);
        bus.write(0xfe00_0010, &[9]);
        let mut b = [0u8; 2];
        bus.read(0xfe00_0003, &mut b);
        assert_eq!(b, [7, 7]);
        bus.read(0xfe00_0010, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        assert_eq!(
            page.lock().unwrap().0.iter().filter(|&&x| x != 0).count(),
            1
        );
        let other = || Arc::new(Mutex::new(Page([0; 16])));
        assert!(bus.insert(other(), 0xfe00_000f, 1).is_err());
        assert!(bus.insert(other(), u64::MAX, 2).is_err());
        assert!(bus.insert(other(), 0, 0).is_err());
        assert!(bus.insert(other(), 0xfe00_0010, 1).is_ok());
    }
}
