//! Event-select fields shared by AMD `PERF_CTLn` and Intel `IA32_PERFEVTSELx`.
//!
//! Fixed counters (Intel) are expressed as a synthesized event select, so the
//! generic core handles every counter the same way.

use serde::{Deserialize, Serialize};

/// Event select bits \[7:0\].
pub const EVENT_LOW: u64 = 0xFF;
/// Unit mask \[15:8\].
pub const UMASK: u64 = 0xFF << 8;
/// Count in user mode (CPL > 0).
pub const USR: u64 = 1 << 16;
/// Count in kernel mode (CPL 0).
pub const OS: u64 = 1 << 17;
/// Edge detect.
pub const EDGE: u64 = 1 << 18;
/// Intel pin control (ignored for counting).
pub const PC: u64 = 1 << 19;
/// Raise a PMI on overflow.
pub const INT: u64 = 1 << 20;
/// Intel AnyThread (v3+).
pub const ANY: u64 = 1 << 21;
/// Enable.
pub const EN: u64 = 1 << 22;
/// Invert counter mask.
pub const INV: u64 = 1 << 23;
/// Counter mask \[31:24\].
pub const CMASK: u64 = 0xFF << 24;
/// AMD event select bits \[11:8\], at \[35:32\].
pub const EVENT_HIGH: u64 = 0xF << 32;
/// AMD GuestOnly.
pub const GUEST_ONLY: u64 = 1 << 40;
/// AMD HostOnly.
pub const HOST_ONLY: u64 = 1 << 41;

/// Bits that decide what a host event must count: a change in any of them
/// is a new programming (new generation); EN, INT, PC, ANY and the AMD
/// Guest/HostOnly bits are not.
pub const PROGRAMMING_BITS: u64 = EVENT_LOW | UMASK | USR | OS | EDGE | INV | CMASK | EVENT_HIGH;

/// Bits passed to the host as the `PERF_TYPE_RAW` config (USR/OS become
/// `exclude_user`/`exclude_kernel`, the host owns EN and INT).
pub const RAW_CONFIG_BITS: u64 = EVENT_LOW | UMASK | EDGE | INV | CMASK | EVENT_HIGH;

/// An event code and unit mask: what an event select asks to count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EventCode {
    /// Event select, up to 12 bits (AMD uses bits \[11:8\]).
    pub event: u16,
    /// Unit mask.
    pub umask: u8,
}

impl EventCode {
    /// Builds an event code.
    pub const fn new(event: u16, umask: u8) -> Self {
        Self { event, umask }
    }

    /// The event select bits that encode this code.
    pub const fn to_select(self) -> u64 {
        let event = self.event as u64;
        (event & 0xFF) | (((event >> 8) & 0xF) << 32) | ((self.umask as u64) << 8)
    }
}

/// One event select, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodedSelect {
    /// Event select (12 bits on AMD).
    pub event: u16,
    /// Unit mask.
    pub umask: u8,
    /// Counts user mode.
    pub usr: bool,
    /// Counts kernel mode.
    pub os: bool,
    /// Edge detect.
    pub edge: bool,
    /// PMI on overflow.
    pub int: bool,
    /// Enabled.
    pub en: bool,
    /// Inverted counter mask.
    pub inv: bool,
    /// Counter mask.
    pub cmask: u8,
    /// Intel AnyThread.
    pub any: bool,
}

impl DecodedSelect {
    /// Decodes the fields of `select`.
    pub fn decode(select: u64) -> Self {
        Self {
            event: event_code(select).event,
            umask: event_code(select).umask,
            usr: select & USR != 0,
            os: select & OS != 0,
            edge: select & EDGE != 0,
            int: select & INT != 0,
            en: select & EN != 0,
            inv: select & INV != 0,
            cmask: ((select & CMASK) >> 24) as u8,
            any: select & ANY != 0,
        }
    }
}

impl DecodedSelect {
    /// The event select these fields encode.
    pub fn to_select(&self) -> u64 {
        let flags = [
            (self.usr, USR),
            (self.os, OS),
            (self.edge, EDGE),
            (self.int, INT),
            (self.en, EN),
            (self.inv, INV),
            (self.any, ANY),
        ];
        let bits = flags
            .iter()
            .filter(|(on, _)| *on)
            .fold(0, |acc, (_, bit)| acc | bit);
        EventCode::new(self.event, self.umask).to_select() | bits | (self.cmask as u64) << 24
    }
}

/// The event code of `select`.
pub fn event_code(select: u64) -> EventCode {
    EventCode {
        event: ((select & EVENT_LOW) | ((select & EVENT_HIGH) >> 24)) as u16,
        umask: ((select & UMASK) >> 8) as u8,
    }
}

/// True when `select` counts plainly: no edge, invert or counter mask.
pub fn is_plain(select: u64) -> bool {
    select & (EDGE | INV | CMASK) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_code_round_trips_through_select_bits() {
        let code = EventCode::new(0x1C0, 0x5A);
        assert_eq!(event_code(code.to_select()), code);
        assert_eq!(code.to_select(), 0x1_0000_5AC0);
    }

    #[test]
    fn decode_reads_every_field() {
        let d = DecodedSelect::decode(0x0253_00C0 | USR | OS | EDGE | INT | EN | INV | ANY);
        assert_eq!((d.event, d.umask, d.cmask), (0xC0, 0x00, 0x02));
        assert!(d.usr && d.os && d.edge && d.int && d.en && d.inv && d.any);
    }
}
