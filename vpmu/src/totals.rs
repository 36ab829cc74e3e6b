//! Per-event totals that outlive counter contexts.
//!
//! A counter's *context* is the time it keeps one programming (one
//! generation). While it lasts, the counter's `counted` grows by every event
//! it counts, whatever the guest writes into its value (a sampling guest
//! rewrites it at every PMI). When the context ends, because the guest
//! programs the counter differently or the vPMU is reset or restored to
//! another programming, [`crate::Vpmu`] records a [`Retired`] entry: the
//! programming's id and its final count. The VMM drains them with
//! [`crate::Vpmu::take_retired`] and merges them into [`EventTotals`], the
//! way perf merges an inherited counter into its parent's when the child
//! exits: same programming id, same total; any other id is kept apart.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::evtsel::{self, DecodedSelect};
use crate::vendor;
use crate::x86::Vendor;

/// What a counter counts, as far as counting goes: the event select bits
/// that make a programming (event, unit mask, USR/OS, edge, invert, counter
/// mask); EN, INT and the other control bits are not part of it. A fixed
/// counter's id is the one of its architectural event, so a fixed and a
/// general-purpose counter counting the same event merge.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ProgrammingId(pub u64);

impl ProgrammingId {
    /// The id of an (effective) event select.
    pub fn of_select(select: u64) -> Self {
        Self(select & evtsel::PROGRAMMING_BITS)
    }

    /// The fields, decoded (enable and INT read as off).
    pub fn decoded(self) -> DecodedSelect {
        DecodedSelect::decode(self.0)
    }

    /// The well-known name of the event, if it has one.
    pub fn event_name(self, vendor: Vendor) -> Option<&'static str> {
        vendor::named_event(vendor, self.0).map(|e| e.name)
    }
}

/// A counter context that ended: what it counted under one programming.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retired {
    /// The programming.
    pub id: ProgrammingId,
    /// Its event's well-known name, if any.
    pub event_name: Option<Cow<'static, str>>,
    /// Events counted while it lasted.
    pub counted: u64,
    /// How many contexts this entry merges (entries with the same id that
    /// ended before the VMM drained them are merged).
    pub contexts: u64,
}

/// The total of one programming id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventTotal {
    /// The programming.
    pub id: ProgrammingId,
    /// Its event's well-known name, if any.
    pub event_name: Option<Cow<'static, str>>,
    /// The programming decoded.
    pub decoded: DecodedSelect,
    /// Events counted by every merged context.
    pub count: u64,
    /// Contexts merged.
    pub contexts: u64,
}

/// Counts merged by programming id, in id order. At most
/// [`EventTotals::MAX_IDS`] distinct ids are kept apart (a guest could
/// program endlessly many); counts of further ids go to `other`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventTotals {
    /// One entry per programming id.
    pub entries: Vec<EventTotal>,
    /// Counts of ids beyond the limit.
    pub other_count: u64,
    /// Contexts of ids beyond the limit.
    pub other_contexts: u64,
}

impl EventTotals {
    /// Distinct programming ids kept apart.
    pub const MAX_IDS: usize = 256;

    /// Merges `count` events of `contexts` contexts of programming `id`.
    pub fn add(
        &mut self,
        id: ProgrammingId,
        event_name: Option<Cow<'static, str>>,
        count: u64,
        contexts: u64,
    ) {
        match self.entries.binary_search_by_key(&id, |e| e.id) {
            Ok(i) => {
                let entry = &mut self.entries[i];
                entry.count = entry.count.saturating_add(count);
                entry.contexts = entry.contexts.saturating_add(contexts);
            }
            Err(_) if self.entries.len() >= Self::MAX_IDS => {
                self.other_count = self.other_count.saturating_add(count);
                self.other_contexts = self.other_contexts.saturating_add(contexts);
            }
            Err(i) => self.entries.insert(
                i,
                EventTotal {
                    id,
                    event_name,
                    decoded: id.decoded(),
                    count,
                    contexts,
                },
            ),
        }
    }

    /// Merges retired contexts.
    pub fn absorb(&mut self, retired: impl IntoIterator<Item = Retired>) {
        for r in retired {
            self.add(r.id, r.event_name, r.counted, r.contexts);
        }
    }

    /// Merges another set of totals (another vCPU's).
    pub fn merge(&mut self, other: &EventTotals) {
        for e in &other.entries {
            self.add(e.id, e.event_name.clone(), e.count, e.contexts);
        }
        self.other_count = self.other_count.saturating_add(other.other_count);
        self.other_contexts = self.other_contexts.saturating_add(other.other_contexts);
    }

    /// The entry of `id`.
    pub fn get(&self, id: ProgrammingId) -> Option<&EventTotal> {
        self.entries
            .binary_search_by_key(&id, |e| e.id)
            .ok()
            .map(|i| &self.entries[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evtsel::{EN, INT, OS, USR};

    #[test]
    fn ids_ignore_enable_and_int_and_merge_by_programming() {
        let cycles = ProgrammingId::of_select(0x76 | USR | OS | EN | INT);
        assert_eq!(cycles, ProgrammingId::of_select(0x76 | USR | OS));
        assert_ne!(cycles, ProgrammingId::of_select(0x76 | USR));
        assert_eq!(cycles.event_name(Vendor::Amd), Some("cycles"));
        let mut t = EventTotals::default();
        t.add(cycles, Some("cycles".into()), 10, 1);
        t.add(ProgrammingId::of_select(0xC0 | OS), None, 7, 1);
        t.add(cycles, Some("cycles".into()), 5, 2);
        assert_eq!(t.entries.len(), 2);
        assert_eq!(t.get(cycles).map(|e| (e.count, e.contexts)), Some((15, 3)));
        let mut sum = t.clone();
        sum.merge(&t);
        assert_eq!(sum.get(cycles).map(|e| e.count), Some(30));
        assert!(t.entries.windows(2).all(|w| w[0].id < w[1].id), "id order");
    }

    #[test]
    fn ids_beyond_the_limit_are_counted_as_other() {
        let mut t = EventTotals::default();
        for event in 0..(EventTotals::MAX_IDS as u64 + 3) {
            t.add(ProgrammingId::of_select(event | USR), None, 2, 1);
        }
        assert_eq!(t.entries.len(), EventTotals::MAX_IDS);
        assert_eq!((t.other_count, t.other_contexts), (6, 3));
        // Known ids still merge.
        t.add(ProgrammingId::of_select(USR), None, 1, 1);
        assert_eq!(t.get(ProgrammingId::of_select(USR)).unwrap().count, 3);
    }
}
