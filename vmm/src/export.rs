//! What the host sees of the guest's counters while it runs.
//!
//! Each vCPU thread publishes a snapshot of its vPMU into its slot; readers
//! (the API) take the latest one. A vCPU never waits on a reader: it
//! publishes with `try_lock` and skips a round if a reader holds the slot,
//! and readers hold it only to clone an `Arc`.
//!
//! Per-VM totals ([`vm_totals`]) are computed by readers from the views:
//! each vCPU publishes the counts of its ended counter contexts merged by
//! programming id (`retired`), and its live counters' `counted`; a
//! programming id's total is the sum of both over every vCPU. Nothing is
//! lost when a counter is reprogrammed or its vPMU reset, and a vCPU's last
//! view stays in its slot after its thread ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use serde::Serialize;
use vpmu::evtsel::DecodedSelect;
use vpmu::{EventTotals, ProgrammingId, VpmuSnapshot};

use crate::pmu::PmuPlan;
use crate::vcpu_types::PmiDelivery;

/// How often a vCPU republishes on its own (at its next exit).
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(50);

/// One vCPU's published view.
#[derive(Clone, Debug, Serialize)]
pub struct VcpuView {
    pub index: u8,
    #[serde(skip)]
    pub taken: Instant,
    /// The vCPU is parked by a VM pause.
    pub paused: bool,
    pub vpmu: VpmuSnapshot,
    pub pmi_delivery: PmiDelivery,
    /// Counts of this vCPU's ended counter contexts, by programming id.
    pub retired: EventTotals,
}

impl VcpuView {
    /// Counters whose current programming counted (or ran): their counts
    /// are live, not yet retired.
    pub fn live_counters(&self) -> impl Iterator<Item = &vpmu::CounterSnapshot> {
        self.vpmu.counters.iter().filter(|c| c.ran || c.counted > 0)
    }

    /// This vCPU's totals: ended contexts plus the live ones (counters that
    /// ran with their current programming).
    pub fn totals(&self) -> EventTotals {
        let mut totals = self.retired.clone();
        for c in self.live_counters() {
            totals.add(c.programming_id, c.event_name.clone(), c.counted, 0);
        }
        totals
    }
}

/// The event a programming counts: its well-known name, else its raw
/// event code and unit mask (`raw:0xc0/0x00`).
pub fn event_label(name: Option<&str>, decoded: &DecodedSelect) -> String {
    match name {
        Some(name) => name.to_string(),
        None => format!("raw:{:#x}/{:#04x}", decoded.event, decoded.umask),
    }
}

/// The total of one programming id over the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmTotal {
    /// The programming id (the event select bits that decide counting).
    pub id: ProgrammingId,
    /// The id in hexadecimal, as in the metrics' `id` label.
    pub id_hex: String,
    /// Name or raw code of the event.
    pub event: String,
    pub decoded: DecodedSelect,
    /// Events counted under this programming: `retired` + `live`.
    pub count: u64,
    /// By counter contexts that ended.
    pub retired: u64,
    /// By counters programmed so now.
    pub live: u64,
    /// Ended contexts merged.
    pub contexts: u64,
    /// Counters programmed so now.
    pub live_counters: u64,
    /// `count` per vCPU that counted it.
    pub vcpus: Vec<VcpuCount>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VcpuCount {
    pub vcpu: u8,
    pub count: u64,
}

fn row<'a>(
    rows: &'a mut BTreeMap<ProgrammingId, VmTotal>,
    id: ProgrammingId,
    name: Option<&str>,
) -> &'a mut VmTotal {
    rows.entry(id).or_insert_with(|| {
        let decoded = id.decoded();
        VmTotal {
            id,
            id_hex: format!("{:#x}", id.0),
            event: event_label(name, &decoded),
            decoded,
            count: 0,
            retired: 0,
            live: 0,
            contexts: 0,
            live_counters: 0,
            vcpus: Vec::new(),
        }
    })
}

/// The VM's totals per programming id, in id order.
pub fn vm_totals(views: &[Arc<VcpuView>]) -> Vec<VmTotal> {
    let mut rows = BTreeMap::new();
    for view in views {
        for e in &view.retired.entries {
            let r = row(&mut rows, e.id, e.event_name.as_deref());
            r.retired = r.retired.saturating_add(e.count);
            r.contexts += e.contexts;
        }
        for c in view.live_counters() {
            let r = row(&mut rows, c.programming_id, c.event_name.as_deref());
            r.live = r.live.saturating_add(c.counted);
            r.live_counters += 1;
        }
        for e in view.totals().entries {
            row(&mut rows, e.id, None).vcpus.push(VcpuCount {
                vcpu: view.index,
                count: e.count,
            });
        }
    }
    rows.into_values()
        .map(|mut r| {
            r.count = r.retired.saturating_add(r.live);
            r
        })
        .collect()
}

#[derive(Default)]
struct Slot {
    latest: Mutex<Option<Arc<VcpuView>>>,
    refresh: AtomicBool,
}

/// The VM's export: the vPMU plan and a slot per vCPU.
pub struct Export {
    pub started: Instant,
    pub plan: Arc<PmuPlan>,
    slots: Vec<Slot>,
}

impl Export {
    pub fn new(plan: Arc<PmuPlan>, vcpus: usize) -> Self {
        Self {
            started: Instant::now(),
            plan,
            slots: (0..vcpus).map(|_| Slot::default()).collect(),
        }
    }

    pub fn vcpus(&self) -> usize {
        self.slots.len()
    }

    /// Called by vCPU `index`'s thread; never blocks.
    pub fn publish(&self, view: VcpuView) {
        if let Some(slot) = self.slots.get(usize::from(view.index)) {
            if let Ok(mut latest) = slot.latest.try_lock() {
                *latest = Some(Arc::new(view));
            }
        }
    }

    /// Whether a reader asked vCPU `index` for a fresh view; clears it.
    /// Called at every exit: a plain load first, so that the cache line
    /// (shared with other vCPUs' slots) is only written when asked.
    pub fn take_refresh(&self, index: u8) -> bool {
        self.slots.get(usize::from(index)).is_some_and(|s| {
            s.refresh.load(Ordering::Relaxed) && s.refresh.swap(false, Ordering::SeqCst)
        })
    }

    pub fn request_refresh(&self, index: u8) {
        if let Some(slot) = self.slots.get(usize::from(index)) {
            slot.refresh.store(true, Ordering::SeqCst);
        }
    }

    /// The latest view of vCPU `index`.
    pub fn latest(&self, index: u8) -> Option<Arc<VcpuView>> {
        let slot = self.slots.get(usize::from(index))?;
        let latest = slot.latest.lock().unwrap_or_else(|e| e.into_inner());
        latest.clone()
    }
}
