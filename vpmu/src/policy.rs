//! Per-VM event policy: which guest events may be backed by host events.
//!
//! A denied event is never opened on the host; its counter reads as not
//! counting, exactly like an event the hardware does not support.
//!
//! # Grammar
//!
//! ```text
//! policy = clause *( ";" clause )
//! clause = preset | "allow:" list | "deny:" list
//! preset = "all" | "none" | "arch" | "ipc"
//! list   = event *( "," event )
//! event  = number [ "/" number ]      event select [/ unit mask]
//! number = "0x" hex digits | decimal digits
//! ```
//!
//! Keywords are case-insensitive, blanks around tokens are ignored.
//! - `all`: every event (the default); `none`: no event.
//! - `arch`: the vendor's well-known events: Intel's 7 architectural
//!   events (cycles 0x3C/0x00, instructions 0xC0/0x00, ref-cycles 0x3C/0x01
//!   and the fixed-counter-2 encoding 0x00/0x03, LLC references 0x2E/0x4F,
//!   LLC misses 0x2E/0x41, branches 0xC4/0x00, branch misses 0xC5/0x00);
//!   AMD cycles 0x76, instructions 0xC0, branches 0xC2, branch misses 0xC3.
//! - `ipc`: cycles and instructions only (Intel fixed counters 0 and 1
//!   included).
//! - `allow:` adds events to the preset (a policy with only `allow:` lists
//!   starts from `none`); `deny:` removes events and always wins.
//! - An event without a unit mask matches every unit mask.
//!
//! Examples: `ipc`, `allow:0x76,0xc0`, `arch;deny:0x2e/0x41`,
//! `all;deny:0xc2/0x00,0xc3`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::evtsel::EventCode;
use crate::model::{PmuModel, VendorFeatures};
use crate::vendor;
use crate::x86::Vendor;

/// The base set of allowed events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Every event.
    #[default]
    All,
    /// No event.
    None,
    /// The vendor's well-known (architectural) events.
    Arch,
    /// Cycles and instructions.
    Ipc,
}

/// An event select with an optional unit mask (`None` matches any).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMatch {
    /// Event select (up to 12 bits).
    pub event: u16,
    /// Unit mask, or any.
    pub umask: Option<u8>,
}

impl EventMatch {
    fn matches(&self, code: EventCode) -> bool {
        self.event == code.event && self.umask.is_none_or(|u| u == code.umask)
    }
}

/// Allow and deny lists over a preset.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventPolicy {
    /// Base set.
    pub preset: Preset,
    /// Added to the preset.
    pub allow: Vec<EventMatch>,
    /// Removed; wins over everything.
    pub deny: Vec<EventMatch>,
}

/// Why a policy string does not parse.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PolicyError {
    /// Nothing was given.
    #[error("empty event policy (try \"all\", \"arch\", \"ipc\" or \"allow:0x76,0xc0\")")]
    Empty,
    /// A clause is neither a preset nor a list.
    #[error(
        "unknown policy clause {0:?} (expected all, none, arch, ipc, allow:LIST or deny:LIST)"
    )]
    UnknownClause(String),
    /// Two presets.
    #[error("more than one preset in the policy ({0:?} and {1:?})")]
    TwoPresets(String, String),
    /// An allow/deny list without events.
    #[error("{0}: list has an empty entry")]
    EmptyEntry(&'static str),
    /// Not a number.
    #[error("{0:?} is not a number (use 0x-prefixed hex or decimal)")]
    BadNumber(String),
    /// Event select above 12 bits.
    #[error("event select {0:#x} is larger than 0xfff")]
    EventTooLarge(u64),
    /// Unit mask above 8 bits.
    #[error("unit mask {0:#x} is larger than 0xff")]
    UmaskTooLarge(u64),
}

impl EventPolicy {
    /// Every event allowed.
    pub fn allow_all() -> Self {
        Self::default()
    }

    /// Whether `code` may be backed on a `vendor` host.
    pub fn allows(&self, vendor: Vendor, code: EventCode) -> bool {
        if self.deny.iter().any(|m| m.matches(code)) {
            return false;
        }
        self.preset_allows(vendor, code) || self.allow.iter().any(|m| m.matches(code))
    }

    fn preset_allows(&self, vendor: Vendor, code: EventCode) -> bool {
        let named = || {
            vendor::ops(vendor)
                .named_events()
                .iter()
                .filter(|e| e.code == code)
        };
        match self.preset {
            Preset::All => true,
            Preset::None => false,
            Preset::Arch => named().next().is_some(),
            Preset::Ipc => named().any(|e| e.ipc),
        }
    }

    /// The Intel CPUID.0AH:EBX mask ("event not available") for
    /// [`crate::IntelFeatures::unavailable_events`] (see
    /// [`crate::PmuModel::with_unavailable_events`]): the events this
    /// policy denies and, on a host without hardware events, the events
    /// the task-clock cannot stand in for. Linux's perf then reports them
    /// as not supported instead of counting nothing.
    pub fn intel_unavailable_events(&self, hardware_events: bool) -> u8 {
        let events = vendor::ops(Vendor::Intel).named_events();
        (0..7)
            .filter(|&bit| {
                !self.allows(Vendor::Intel, events[bit].code)
                    || !(hardware_events || events[bit].clock)
            })
            .fold(0, |mask, bit| mask | 1 << bit)
    }
}

impl PmuModel {
    /// The model telling the guest, where the vendor has a way (Intel's
    /// CPUID.0AH:EBX; AMD has none), which architectural events it cannot
    /// count: those `policy` denies and, without `hardware_events` on the
    /// host, those the task clock cannot stand in for.
    pub fn with_unavailable_events(mut self, policy: &EventPolicy, hardware_events: bool) -> Self {
        if let VendorFeatures::Intel(features) = &mut self.features {
            features.unavailable_events = policy.intel_unavailable_events(hardware_events);
        }
        self
    }
}

fn parse_number(text: &str) -> Result<u64, PolicyError> {
    let text = text.trim();
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| PolicyError::BadNumber(text.to_string()))
}

fn parse_event(text: &str) -> Result<EventMatch, PolicyError> {
    let (event, umask) = match text.split_once('/') {
        Some((event, umask)) => (event, Some(umask)),
        None => (text, None),
    };
    let event = parse_number(event)?;
    if event > 0xFFF {
        return Err(PolicyError::EventTooLarge(event));
    }
    let umask = umask.map(parse_number).transpose()?;
    if let Some(umask) = umask.filter(|&u| u > 0xFF) {
        return Err(PolicyError::UmaskTooLarge(umask));
    }
    Ok(EventMatch {
        event: event as u16,
        umask: umask.map(|u| u as u8),
    })
}

fn parse_list(name: &'static str, list: &str) -> Result<Vec<EventMatch>, PolicyError> {
    list.split(',')
        .map(|entry| match entry.trim() {
            "" => Err(PolicyError::EmptyEntry(name)),
            entry => parse_event(entry),
        })
        .collect()
}

impl FromStr for EventPolicy {
    type Err = PolicyError;

    fn from_str(text: &str) -> Result<Self, PolicyError> {
        if text.trim().is_empty() {
            return Err(PolicyError::Empty);
        }
        let mut preset: Option<(Preset, String)> = None;
        let mut policy = EventPolicy::default();
        for clause in text.split(';').map(str::trim) {
            let lower = clause.to_ascii_lowercase();
            let named = match lower.as_str() {
                "all" => Some(Preset::All),
                "none" => Some(Preset::None),
                "arch" => Some(Preset::Arch),
                "ipc" => Some(Preset::Ipc),
                _ => None,
            };
            if let Some(named) = named {
                if let Some((_, first)) = &preset {
                    return Err(PolicyError::TwoPresets(first.clone(), clause.to_string()));
                }
                preset = Some((named, clause.to_string()));
            } else if let Some(list) = lower.strip_prefix("allow:") {
                policy.allow.extend(parse_list("allow", list)?);
            } else if let Some(list) = lower.strip_prefix("deny:") {
                policy.deny.extend(parse_list("deny", list)?);
            } else {
                return Err(PolicyError::UnknownClause(clause.to_string()));
            }
        }
        policy.preset = match preset {
            Some((preset, _)) => preset,
            None if !policy.allow.is_empty() => Preset::None,
            None => Preset::All,
        };
        Ok(policy)
    }
}

impl fmt::Display for EventPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let preset = match self.preset {
            Preset::All => "all",
            Preset::None => "none",
            Preset::Arch => "arch",
            Preset::Ipc => "ipc",
        };
        write!(f, "{preset}")?;
        for (name, list) in [("allow", &self.allow), ("deny", &self.deny)] {
            if list.is_empty() {
                continue;
            }
            write!(f, ";{name}:")?;
            for (i, m) in list.iter().enumerate() {
                let sep = if i == 0 { "" } else { "," };
                match m.umask {
                    Some(umask) => write!(f, "{sep}{:#x}/{umask:#04x}", m.event)?,
                    None => write!(f, "{sep}{:#x}", m.event)?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AmdFeatures, IntelFeatures};

    const CYCLES_AMD: EventCode = EventCode::new(0x76, 0);
    const INSNS: EventCode = EventCode::new(0xC0, 0);
    const BRANCHES_AMD: EventCode = EventCode::new(0xC2, 0);

    fn parse(text: &str) -> EventPolicy {
        text.parse().unwrap()
    }

    #[test]
    fn presets_select_vendor_events() {
        let ipc = parse("ipc");
        assert!(ipc.allows(Vendor::Amd, CYCLES_AMD) && ipc.allows(Vendor::Amd, INSNS));
        assert!(!ipc.allows(Vendor::Amd, BRANCHES_AMD));
        assert!(ipc.allows(Vendor::Intel, EventCode::new(0x3C, 0)));
        assert!(!ipc.allows(Vendor::Intel, EventCode::new(0x3C, 1)));
        let arch = parse(" ARCH ");
        assert!(arch.allows(Vendor::Intel, EventCode::new(0x2E, 0x41)));
        assert!(arch.allows(Vendor::Intel, EventCode::new(0x00, 0x03)));
        assert!(!arch.allows(Vendor::Intel, EventCode::new(0x2E, 0x42)));
        assert!(parse("all").allows(Vendor::Amd, EventCode::new(0x123, 7)));
        assert!(!parse("none").allows(Vendor::Amd, CYCLES_AMD));
    }

    #[test]
    fn allow_lists_start_from_none_and_deny_wins() {
        let policy = parse("allow:0x76,192");
        assert_eq!(policy.preset, Preset::None);
        assert!(policy.allows(Vendor::Amd, CYCLES_AMD) && policy.allows(Vendor::Amd, INSNS));
        assert!(!policy.allows(Vendor::Amd, BRANCHES_AMD));
        let policy = parse("all;deny:0xc2/0x00");
        assert!(!policy.allows(Vendor::Amd, BRANCHES_AMD));
        assert!(policy.allows(Vendor::Amd, EventCode::new(0xC2, 1)));
        let policy = parse("ipc;allow:0xc2;deny:0xc0");
        assert!(policy.allows(Vendor::Amd, BRANCHES_AMD) && !policy.allows(Vendor::Amd, INSNS));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let err = |text: &str| text.parse::<EventPolicy>().unwrap_err();
        assert_eq!(err(""), PolicyError::Empty);
        assert_eq!(err("fast"), PolicyError::UnknownClause("fast".into()));
        assert_eq!(
            err("ipc;arch"),
            PolicyError::TwoPresets("ipc".into(), "arch".into())
        );
        assert_eq!(err("allow:"), PolicyError::EmptyEntry("allow"));
        assert_eq!(err("deny:0x76,,1"), PolicyError::EmptyEntry("deny"));
        assert_eq!(err("allow:0xzz"), PolicyError::BadNumber("0xzz".into()));
        assert_eq!(err("allow:0x1000"), PolicyError::EventTooLarge(0x1000));
        assert_eq!(err("deny:0xc0/0x100"), PolicyError::UmaskTooLarge(0x100));
        assert!(err("allow:0x1000").to_string().contains("0x1000"));
    }

    #[test]
    fn display_parses_back() {
        for text in ["all", "ipc;deny:0xc0/0x01", "none;allow:0x76,0x2e/0x4f"] {
            let policy = parse(text);
            assert_eq!(parse(&policy.to_string()), policy);
        }
    }

    #[test]
    fn intel_cpuid_mask_follows_the_policy() {
        assert_eq!(parse("all").intel_unavailable_events(true), 0);
        assert_eq!(parse("ipc").intel_unavailable_events(true), 0b111_1100);
        assert_eq!(parse("none").intel_unavailable_events(true), 0b111_1111);
    }

    #[test]
    fn intel_cpuid_mask_hides_what_the_task_clock_cannot_back() {
        // Only core cycles (bit 0) and reference cycles (bit 2) can be
        // backed by the task clock.
        assert_eq!(parse("all").intel_unavailable_events(false), 0b111_1010);
        assert_eq!(
            parse("deny:0x3c/0x01").intel_unavailable_events(false),
            0b111_1110
        );
    }

    #[test]
    fn only_intel_can_tell_the_guest_what_it_cannot_count() {
        let policy: EventPolicy = "all".parse().unwrap();
        let intel = PmuModel::new(2, 4, 48, IntelFeatures::default())
            .with_unavailable_events(&policy, false);
        assert_eq!(intel.intel().unwrap().unavailable_events, 0b111_1010);
        let amd = PmuModel::new(2, 6, 48, AmdFeatures { perfctr_core: true });
        assert_eq!(
            amd.clone().with_unavailable_events(&policy, false),
            amd,
            "AMD has no such field"
        );
        assert!(Vendor::Intel.masks_lvtpc_on_pmi());
        assert!(!Vendor::Amd.masks_lvtpc_on_pmi());
    }
}
