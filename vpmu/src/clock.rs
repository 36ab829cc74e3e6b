//! The guest's clock: converts host task-clock nanoseconds into guest TSC
//! cycles (and back) for counters backed by software clocks.

use serde::{Deserialize, Serialize};

const NS_PER_MS: u128 = 1_000_000;

/// The guest's TSC frequency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestClock {
    /// Guest TSC frequency in kHz (cycles per millisecond).
    pub tsc_khz: u32,
}

impl GuestClock {
    /// A clock of `tsc_khz` kHz (0 is taken as 1 kHz to keep arithmetic defined).
    pub fn new(tsc_khz: u32) -> Self {
        Self {
            tsc_khz: tsc_khz.max(1),
        }
    }

    /// Cycles in `ns` nanoseconds; `carry` keeps the sub-cycle remainder
    /// between calls so repeated conversions lose nothing.
    pub fn ns_to_cycles(&self, ns: u64, carry: &mut u64) -> u64 {
        let scaled = ns as u128 * self.khz() + *carry as u128;
        *carry = (scaled % NS_PER_MS) as u64;
        (scaled / NS_PER_MS).min(u64::MAX as u128) as u64
    }

    /// Nanoseconds needed for `cycles` cycles, rounded up.
    pub fn cycles_to_ns(&self, cycles: u64) -> u64 {
        let ns = (cycles as u128 * NS_PER_MS).div_ceil(self.khz());
        ns.min(u64::MAX as u128) as u64
    }

    fn khz(&self) -> u128 {
        self.tsc_khz.max(1) as u128
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_keep_the_remainder() {
        let clock = GuestClock::new(3_000_001);
        let mut carry = 0;
        let total: u64 = (0..1000).map(|_| clock.ns_to_cycles(1, &mut carry)).sum();
        assert_eq!(total, 3000);
        assert_eq!(clock.ns_to_cycles(1_000_000, &mut 0), 3_000_001);
        assert_eq!(clock.cycles_to_ns(3_000_001), 1_000_000);
        assert_eq!(clock.cycles_to_ns(1), 1);
    }
}
