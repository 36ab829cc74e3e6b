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

use devices::sync::Recover;
use serde::{Deserialize, Serialize};
use vpmu::evtsel::DecodedSelect;
use vpmu::{EventTotals, ProgrammingId, VpmuSnapshot};

use crate::pmu::PmiDelivery;
use crate::pmu::PmuPlan;

/// How often a vCPU republishes on its own (at its next exit).
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(50);

/// One vCPU's published view (`GET /vpmu` sends it as
/// `api::documents::VcpuDoc`).
#[derive(Clone, Debug)]
pub struct VcpuView {
    pub index: u8,
    pub taken: Instant,
    /// The vCPU is held off the CPU by a VM pause.
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The guest changed its vPMU after `latest` was taken.
    outdated: AtomicBool,
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
                slot.outdated.store(false, Ordering::Release);
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

    /// Marks vCPU `index`'s latest view outdated: a reader then asks for a
    /// fresh one however young it is. A plain load first, as in
    /// [`Export::take_refresh`].
    pub fn mark_outdated(&self, index: u8) {
        if let Some(s) = self.slots.get(usize::from(index)) {
            if !s.outdated.load(Ordering::Relaxed) {
                s.outdated.store(true, Ordering::Release);
            }
        }
    }

    /// Whether the guest changed vCPU `index`'s vPMU after its latest view.
    pub fn outdated(&self, index: u8) -> bool {
        self.slots
            .get(usize::from(index))
            .is_some_and(|s| s.outdated.load(Ordering::Acquire))
    }

    pub fn request_refresh(&self, index: u8) {
        if let Some(slot) = self.slots.get(usize::from(index)) {
            slot.refresh.store(true, Ordering::SeqCst);
        }
    }

    /// The latest view of vCPU `index`.
    pub fn latest(&self, index: u8) -> Option<Arc<VcpuView>> {
        let slot = self.slots.get(usize::from(index))?;
        let latest = slot.latest.lock().recover();
        latest.clone()
    }
}

/// Views of a VM's vCPUs, for tests of what readers make of them (the
/// totals here, `GET /vpmu`, `GET /metrics`, `vmm stat`).
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use vpmu::{Backing, CounterKind, CounterSnapshot};

    /// A fresh snapshot of an AMD v1 vPMU (4 counters, 48 bits) with these
    /// counters.
    pub(crate) fn snapshot(counters: Vec<CounterSnapshot>) -> VpmuSnapshot {
        VpmuSnapshot {
            model: vpmu::PmuModel::new(1, 4, 48, vpmu::AmdFeatures::default()),
            counters,
            global_ctrl: 0,
            global_status: 0,
            pending_pmi: false,
            guest_time_ns: 0,
            no_hardware_reason: None,
            stats: Default::default(),
        }
    }

    /// General-purpose counter `index` of that vPMU, programmed with
    /// `select`, that counted `counted` (and is running if it `ran`).
    pub(crate) fn counter(index: usize, select: u64, counted: u64, ran: bool) -> CounterSnapshot {
        CounterSnapshot {
            kind: CounterKind::Gp,
            index,
            msr: 0xC001_0004 + 2 * index as u32,
            control: select,
            decoded: DecodedSelect::decode(select),
            event_name: None,
            value: counted,
            running: ran,
            backing: Backing::SoftwareClock,
            generation: 1,
            host_time_enabled_ns: 0,
            host_time_running_ns: 0,
            overflows: 0,
            pmis: 0,
            programming_id: ProgrammingId::of_select(select),
            counted,
            ran,
        }
    }

    /// vCPU `index` with these live counters and retired `(select, count,
    /// contexts)`.
    pub(crate) fn view(
        index: u8,
        counters: Vec<CounterSnapshot>,
        retired: &[(u64, u64, u64)],
    ) -> VcpuView {
        let mut totals = EventTotals::default();
        for &(select, count, contexts) in retired {
            totals.add(ProgrammingId::of_select(select), None, count, contexts);
        }
        VcpuView {
            index,
            taken: Instant::now(),
            paused: false,
            vpmu: snapshot(counters),
            pmi_delivery: PmiDelivery::default(),
            retired: totals,
        }
    }

    /// A plan with this model (`None`: no vPMU), RDPMC unavailable.
    pub(crate) fn plan(model: Option<vpmu::PmuModel>) -> PmuPlan {
        PmuPlan {
            model,
            policy: vpmu::EventPolicy::default(),
            rdpmc: crate::pmu::Rdpmc::Unavailable("test".into()),
            notes: Vec::new(),
            host_vendor: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{counter, view};
    use super::*;
    use vpmu::evtsel::{EN, OS, USR};

    const CYCLES: u64 = 0x76 | USR | OS | EN;
    const INSTRUCTIONS: u64 = 0xc0 | USR | OS | EN;

    fn total(totals: &[VmTotal], select: u64) -> &VmTotal {
        let id = ProgrammingId::of_select(select);
        totals
            .iter()
            .find(|t| t.id == id)
            .expect("a row for the id")
    }

    #[test]
    fn vm_totals_add_retired_and_live_counts_of_every_vcpu_per_programming() {
        let views = [
            view(
                0,
                vec![
                    counter(0, CYCLES, 50, true),
                    counter(1, INSTRUCTIONS, 7, true),
                ],
                &[(CYCLES, 100, 2)],
            ),
            view(
                1,
                // An idle counter that never ran is not a live context.
                vec![counter(0, CYCLES, 5, true), counter(1, 0, 0, false)],
                &[(INSTRUCTIONS, 30, 1)],
            ),
        ]
        .map(Arc::new);
        let totals = vm_totals(&views);
        assert_eq!(totals.len(), 2, "{totals:#?}");
        assert!(totals.windows(2).all(|w| w[0].id < w[1].id), "in id order");

        let cycles = total(&totals, CYCLES);
        assert_eq!((cycles.count, cycles.retired, cycles.live), (155, 100, 55));
        assert_eq!((cycles.contexts, cycles.live_counters), (2, 2));
        assert_eq!(
            cycles.vcpus,
            [
                VcpuCount {
                    vcpu: 0,
                    count: 150
                },
                VcpuCount { vcpu: 1, count: 5 }
            ]
        );
        assert_eq!(
            cycles.id_hex,
            format!("{:#x}", ProgrammingId::of_select(CYCLES).0)
        );
        assert_eq!(cycles.event, "raw:0x76/0x00", "no name: the raw code");

        let instructions = total(&totals, INSTRUCTIONS);
        assert_eq!(
            (instructions.count, instructions.retired, instructions.live),
            (37, 30, 7)
        );
        assert_eq!((instructions.contexts, instructions.live_counters), (1, 1));
        assert_eq!(
            instructions.vcpus,
            [
                VcpuCount { vcpu: 0, count: 7 },
                VcpuCount { vcpu: 1, count: 30 }
            ]
        );
        assert!(vm_totals(&[]).is_empty());
    }

    #[test]
    fn vm_totals_carry_a_vcpus_counts_over_a_reboot_once() {
        // Boot 1 ends with a retired and a live context.
        let boot1 = view(0, vec![counter(0, CYCLES, 40, true)], &[(CYCLES, 60, 1)]);
        let carried = boot1.totals();
        assert_eq!(
            carried.get(ProgrammingId::of_select(CYCLES)).unwrap().count,
            100
        );
        // Boot 2's fresh vPMU starts from the carried totals (`VcpuPmu::new`)
        // and counts 25 more with the same programming.
        let mut boot2 = view(0, vec![counter(0, CYCLES, 25, true)], &[]);
        boot2.retired = carried;
        let totals = vm_totals(&[Arc::new(boot2)]);
        let cycles = total(&totals, CYCLES);
        assert_eq!((cycles.count, cycles.retired, cycles.live), (125, 100, 25));
        assert_eq!(
            cycles.vcpus,
            [VcpuCount {
                vcpu: 0,
                count: 125
            }]
        );
    }

    #[test]
    fn event_labels_prefer_the_name() {
        let decoded = DecodedSelect::decode(0xc0 | (0x01 << 8));
        assert_eq!(event_label(Some("instructions"), &decoded), "instructions");
        assert_eq!(event_label(None, &decoded), "raw:0xc0/0x01");
    }

    #[test]
    fn a_view_older_than_a_guest_write_reads_outdated_until_the_next_publish() {
        let export = Export::new(Arc::new(fixtures::plan(None)), 2);
        export.publish(view(1, vec![counter(0, CYCLES, 5, true)], &[]));
        assert!(!export.outdated(1));
        export.mark_outdated(1);
        assert!(
            export.outdated(1) && !export.outdated(0),
            "only vCPU 1's view"
        );
        export.mark_outdated(1);
        export.publish(view(1, vec![counter(0, CYCLES, 0, false)], &[]));
        assert!(
            !export.outdated(1),
            "a new view is as new as the guest's writes"
        );
        export.mark_outdated(7);
        assert!(
            !export.outdated(7),
            "no such vCPU: nothing marked, no panic"
        );
    }
}
