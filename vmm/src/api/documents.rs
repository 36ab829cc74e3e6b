//! The API's JSON documents and names, each defined once: the server builds
//! the documents with these types and its clients read them back with the
//! same ones (as [`crate::profile::Profile`] is for `GET /profile`).
//!
//! - [`VpmuDoc`]: `GET /vpmu`, the VM, each vCPU's latest view and the VM's
//!   totals per programming id; `vmm stat` reads it.
//! - [`PauseDoc`]: the answer to `PUT /vm/pause` and `PUT /vm/resume`.
//! - [`counter_label`], [`event_label`], [`backing_label`]: how a counter,
//!   its event and its host backing are named, in `GET /metrics` labels and
//!   by `vmm stat`.
//!
//! The server sends a document as a `serde_json::Value`
//! ([`super::http::Response::document`]), whose objects hold their keys in
//! order: the JSON has every object's keys sorted, whatever the order of
//! the fields here.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vpmu::{Backing, CounterKind, CounterSnapshot, EventTotals, PmuModel, VpmuSnapshot};

use super::VmName;
use crate::pmu::export::{self, Export, VcpuView, VmTotal};
use crate::pmu::{PmiDelivery, Rdpmc};

/// `GET /vpmu`: the vPMU export of a VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VpmuDoc {
    /// The VM's totals per programming id, in id order.
    pub totals: Vec<VmTotal>,
    pub vm: VmDoc,
    /// The latest view of every vCPU that published one, in index order.
    pub vcpus: Vec<VcpuDoc>,
}

impl VpmuDoc {
    /// The export of VM `name` whose vCPUs' latest views are `views`;
    /// `paused`: a VM pause is asked.
    pub fn new(name: &VmName, export: &Export, views: &[Arc<VcpuView>], paused: bool) -> Self {
        let now = Instant::now();
        Self {
            totals: export::vm_totals(views),
            vm: VmDoc::new(name, export, paused),
            vcpus: views.iter().map(|v| VcpuDoc::new(v, now)).collect(),
        }
    }
}

/// The VM and its vPMU plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDoc {
    /// Its name (`vmm run --name`; empty from a VMM older than names).
    #[serde(default)]
    pub name: String,
    /// Since the VMM built the VM.
    pub uptime_ms: u64,
    /// A VM pause is asked (`PUT /vm/pause`, no resume since).
    pub paused: bool,
    /// The guest has a virtual PMU.
    pub vpmu: bool,
    /// Its model; `None` without one.
    pub model: Option<PmuModel>,
    /// The event policy (`--vpmu-events`).
    pub events: String,
    pub rdpmc: RdpmcDoc,
    /// The start-up report's lines about the vPMU (why off, what degrades).
    pub notes: Vec<String>,
}

impl VmDoc {
    fn new(name: &VmName, export: &Export, paused: bool) -> Self {
        let plan = &export.plan;
        Self {
            name: name.to_string(),
            uptime_ms: export.started.elapsed().as_millis() as u64,
            paused,
            vpmu: plan.model.is_some(),
            model: plan.model.clone(),
            events: plan.policy.to_string(),
            rdpmc: RdpmcDoc::from(&plan.rdpmc),
            notes: plan.notes.clone(),
        }
    }
}

/// Whether guest RDPMC returns the virtual counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdpmcDoc {
    pub served: bool,
    /// Why not; only when not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl From<&Rdpmc> for RdpmcDoc {
    fn from(rdpmc: &Rdpmc) -> Self {
        match rdpmc {
            Rdpmc::Mirrored => Self {
                served: true,
                reason: None,
            },
            Rdpmc::Unavailable(why) => Self {
                served: false,
                reason: Some(why.clone()),
            },
        }
    }
}

/// One vCPU's latest view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuDoc {
    pub index: u8,
    /// The vCPU is parked by a VM pause.
    pub paused: bool,
    pub vpmu: VpmuSnapshot,
    /// How PMIs reached the guest.
    pub pmi_delivery: PmiDelivery,
    /// Counts of the vCPU's ended counter contexts, by programming id.
    pub retired: EventTotals,
    /// Age of the view when the server answered.
    pub age_ms: u64,
}

impl VcpuDoc {
    fn new(view: &VcpuView, now: Instant) -> Self {
        Self {
            index: view.index,
            paused: view.paused,
            vpmu: view.vpmu.clone(),
            pmi_delivery: view.pmi_delivery,
            retired: view.retired.clone(),
            age_ms: now.saturating_duration_since(view.taken).as_millis() as u64,
        }
    }
}

/// `PUT /vm/pause` (`paused` and whether every vCPU parked in time) and
/// `PUT /vm/resume` (`paused` only) answer this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseDoc {
    pub paused: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_vcpus_parked: Option<bool>,
}

/// `PUT /vm/snapshot`'s body: where to write the snapshot (an absolute
/// path), whether an existing file may be replaced, and whether the VM runs
/// on afterwards (else it stays paused).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub path: std::path::PathBuf,
    #[serde(default)]
    pub overwrite: bool,
    #[serde(default = "yes")]
    pub resume: bool,
}

fn yes() -> bool {
    true
}

/// `PUT /vm/snapshot`'s answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotDoc {
    pub path: std::path::PathBuf,
    /// The file's size (zero pages are holes: it takes less on disk).
    pub bytes: u64,
    /// Bytes of guest memory that hold data (written).
    pub memory_data_bytes: u64,
    /// vCPUs saved running, and parked (never started by the guest).
    pub vcpus_running: usize,
    pub vcpus_parked: usize,
    /// How long the guest was held (pause, save, write).
    pub paused_ms: f64,
    /// Whether the VM runs again (else it is paused).
    pub resumed: bool,
}

/// A counter's name: `gp0`, `fixed1`.
pub fn counter_label(c: &CounterSnapshot) -> String {
    match c.kind {
        CounterKind::Gp => format!("gp{}", c.index),
        CounterKind::Fixed => format!("fixed{}", c.index),
    }
}

/// The event a counter counts: its architectural name or its raw code.
pub fn event_label(c: &CounterSnapshot) -> String {
    export::event_label(c.event_name.as_deref(), &c.decoded)
}

/// How a counter is backed on the host.
pub fn backing_label(b: &Backing) -> &'static str {
    match b {
        Backing::Idle => "idle",
        Backing::HardwareRaw => "hardware_raw",
        Backing::SoftwareClock => "software_clock",
        Backing::SoftwareClockEstimate { .. } => "software_clock_estimate",
        Backing::Unbacked { .. } => "unbacked",
        Backing::Denied => "denied",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pmu::export::fixtures::{self, counter, view};
    use serde_json::{json, Value};

    const CYCLES: u64 = 0x76 | vpmu::evtsel::USR | vpmu::evtsel::OS | vpmu::evtsel::EN;

    fn keys(v: &Value) -> Vec<&str> {
        let object = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {v}"));
        object.keys().map(String::as_str).collect()
    }

    fn doc() -> VpmuDoc {
        let export = Export::new(
            Arc::new(fixtures::plan(Some(fixtures::snapshot(vec![]).model))),
            1,
        );
        let views = [view(
            0,
            vec![counter(0, CYCLES, 5, true)],
            &[(CYCLES, 7, 1)],
        )];
        VpmuDoc::new(
            &"web-1".parse().unwrap(),
            &export,
            &views.map(Arc::new),
            true,
        )
    }

    #[test]
    fn the_vpmu_document_has_its_keys_and_reads_back_as_sent() {
        let doc = doc();
        let value = serde_json::to_value(&doc).unwrap();
        assert_eq!(keys(&value), ["totals", "vcpus", "vm"]);
        let vm = [
            "events",
            "model",
            "name",
            "notes",
            "paused",
            "rdpmc",
            "uptime_ms",
            "vpmu",
        ];
        assert_eq!(keys(&value["vm"]), vm);
        assert_eq!(value["vm"]["name"], "web-1");
        assert_eq!(
            value["vm"]["rdpmc"],
            json!({ "served": false, "reason": "test" })
        );
        let vcpu = [
            "age_ms",
            "index",
            "paused",
            "pmi_delivery",
            "retired",
            "vpmu",
        ];
        assert_eq!(keys(&value["vcpus"][0]), vcpu);
        let total = [
            "contexts",
            "count",
            "decoded",
            "event",
            "id",
            "id_hex",
            "live",
            "live_counters",
            "retired",
            "vcpus",
        ];
        assert_eq!(keys(&value["totals"][0]), total);
        assert_eq!(keys(&value["totals"][0]["vcpus"][0]), ["count", "vcpu"]);
        assert_eq!(value["totals"][0]["count"], 12);
        let back: VpmuDoc = serde_json::from_value(value).unwrap();
        assert_eq!(back, doc, "what the server sends, a client reads");
    }

    #[test]
    fn rdpmc_has_a_reason_only_when_not_served() {
        let served = serde_json::to_value(RdpmcDoc::from(&Rdpmc::Mirrored)).unwrap();
        assert_eq!(served, json!({ "served": true }));
        let not = RdpmcDoc::from(&Rdpmc::Unavailable("why".into()));
        assert_eq!(
            serde_json::to_value(not).unwrap(),
            json!({ "served": false, "reason": "why" })
        );
    }

    #[test]
    fn pause_answers_say_whether_every_vcpu_parked_only_for_a_pause() {
        let paused = PauseDoc {
            paused: true,
            all_vcpus_parked: Some(false),
        };
        let json = json!({ "paused": true, "all_vcpus_parked": false });
        assert_eq!(serde_json::to_value(paused).unwrap(), json);
        let resumed = PauseDoc {
            paused: false,
            all_vcpus_parked: None,
        };
        assert_eq!(
            serde_json::to_value(resumed).unwrap(),
            json!({ "paused": false })
        );
        assert_eq!(serde_json::from_value::<PauseDoc>(json).unwrap(), paused);
    }

    #[test]
    fn counters_events_and_backings_have_their_names() {
        let mut c = counter(2, CYCLES, 0, false);
        assert_eq!(
            (counter_label(&c), event_label(&c)),
            ("gp2".into(), "raw:0x76/0x00".into())
        );
        (c.kind, c.event_name) = (CounterKind::Fixed, Some("cycles".into()));
        assert_eq!(
            (counter_label(&c), event_label(&c)),
            ("fixed2".into(), "cycles".into())
        );
        let backings = [
            Backing::Idle,
            Backing::HardwareRaw,
            Backing::SoftwareClock,
            Backing::Unbacked { reason: "".into() },
            Backing::Denied,
        ];
        assert_eq!(
            backings.iter().map(backing_label).collect::<Vec<_>>(),
            [
                "idle",
                "hardware_raw",
                "software_clock",
                "unbacked",
                "denied"
            ]
        );
    }
}
