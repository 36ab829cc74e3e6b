//! The stderr lines of guest reboots (`--on-reset reboot`), rate-limited:
//! a guest that resets at once would otherwise write dozens of lines a
//! second for as long as it runs.
//!
//! The first [`BURST`] reboots each get a line; after that at most one
//! line per [`INTERVAL`] (a token bucket of [`BURST`] lines, refilled one
//! per interval), each saying how many reboots went unlogged before it, and
//! [`RebootLog::summary`] counts them all at the end.

use std::time::{Duration, Instant};

/// Lines written at once before the rate limit applies.
pub const BURST: u32 = 5;
/// Then one line per this interval at most.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Counts reboots and says which of them get a line.
#[derive(Debug)]
pub struct RebootLog {
    /// Boots so far, the first one included.
    boots: u32,
    /// Lines that may be written now.
    tokens: u32,
    /// When the last token was added.
    refilled: Instant,
    /// Reboots without a line since the last line.
    unlogged_since: u32,
    /// Reboots without a line of their own, in all.
    unlogged: u32,
}

impl RebootLog {
    /// The log of a run whose first boot started at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            boots: 1,
            tokens: BURST,
            refilled: now,
            unlogged_since: 0,
            unlogged: 0,
        }
    }

    /// Counts a reboot at `now`; the line to write, if it gets one.
    pub fn reboot(&mut self, now: Instant) -> Option<String> {
        self.boots = self.boots.saturating_add(1);
        let earned = now.saturating_duration_since(self.refilled).as_nanos() / INTERVAL.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(BURST);
            self.refilled = now;
        }
        if self.tokens == 0 {
            self.unlogged_since += 1;
            self.unlogged += 1;
            return None;
        }
        self.tokens -= 1;
        let boots = self.boots;
        let line = match std::mem::take(&mut self.unlogged_since) {
            0 => format!("vmm: guest reset: reboot {boots}"),
            n => format!("vmm: guest reset: reboot {boots} ({n} more since the last line)"),
        };
        Some(line)
    }

    /// The closing count, when some reboots got no line of their own.
    pub fn summary(&self) -> Option<String> {
        (self.unlogged > 0).then(|| {
            format!(
                "vmm: the guest booted {} times in all; {} reboots were not logged one by one",
                self.boots, self.unlogged
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_line_per_interval_and_a_summary() {
        let start = Instant::now();
        let mut log = RebootLog::new(start);
        // 100 reboots in the first 100 ms: BURST lines.
        let lines: Vec<String> = (0..100)
            .filter_map(|i| log.reboot(start + Duration::from_millis(i)))
            .collect();
        assert_eq!(lines.len(), BURST as usize);
        assert_eq!(lines[0], "vmm: guest reset: reboot 2");
        assert_eq!(lines[4], "vmm: guest reset: reboot 6");
        // A second later: one line, naming the reboots it stood for.
        let line = log.reboot(start + INTERVAL + Duration::from_millis(100));
        assert_eq!(
            line.as_deref(),
            Some("vmm: guest reset: reboot 102 (95 more since the last line)")
        );
        assert_eq!(
            log.reboot(start + INTERVAL + Duration::from_millis(200)),
            None
        );
        assert_eq!(
            log.summary().as_deref(),
            Some("vmm: the guest booted 103 times in all; 96 reboots were not logged one by one")
        );
    }

    #[test]
    fn slow_reboots_each_get_a_line_and_no_summary() {
        let start = Instant::now();
        let mut log = RebootLog::new(start);
        for i in 1..=20u32 {
            let at = start + INTERVAL * i;
            assert_eq!(
                log.reboot(at),
                Some(format!("vmm: guest reset: reboot {}", i + 1))
            );
        }
        assert_eq!(log.summary(), None);
    }
}
