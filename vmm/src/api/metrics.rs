//! The export in Prometheus text exposition format (version 0.0.4).
//!
//! Metric names are stable: `vmm_vpmu_counter_*` per guest counter
//! (labels `vcpu`, `counter`, `event`), `vmm_vpmu_<statistic>_total` per
//! vCPU from the vPMU's statistics, `vmm_vpmu_msr_accesses_total` by
//! register and operation, `vmm_vpmu_pmi_deliveries_total` by how the PMI
//! went, `vmm_vpmu_events_total` (per vCPU) and `vmm_vm_vpmu_events_total`
//! (per VM) for the totals per programming id (labels `event`, `id`), and
//! `vmm_vm_*` for the VM. Counts are printed as exact integers.
//!
//! Every series name, label and label value is written out here, in the
//! tables below and [`super::documents`]' labels: none is taken from the
//! field names of the types it reports, so renaming a field renames no
//! series. The tests list every series.
//!
//! One renderer serves the VMM's own `GET /metrics` and `vmm exporter`:
//! both render [`VpmuDoc`]s (the exporter the ones it reads from each VM's
//! `GET /vpmu`), the exporter with a first label `vm`, the VM's name, on
//! every series. So a fleet's series are named, labelled and valued
//! exactly as each VM's own.

use std::fmt::{self, Display, Write};

use vpmu::{CounterSnapshot, MsrAccessCounts, VpmuStats};

use super::documents::{backing_label, counter_label, event_label, VcpuDoc, VpmuDoc};
use crate::pmu::PmiDelivery;

/// A family's Prometheus type.
#[derive(Clone, Copy)]
pub enum Kind {
    Gauge,
    Counter,
}

/// A metric family: its name, type and help.
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

impl Family {
    pub const fn gauge(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: Kind::Gauge,
            help,
        }
    }

    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: Kind::Counter,
            help,
        }
    }
}

/// A sample value: counts exactly, times as decimals.
enum Num {
    Int(u64),
    Real(f64),
}

impl Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Num::Int(n) => write!(f, "{n}"),
            Num::Real(x) => write!(f, "{x}"),
        }
    }
}

/// A guest counter's value in a family.
type CounterValue = fn(&CounterSnapshot) -> Num;
/// A count read from a `T`.
type Count<T> = fn(&T) -> u64;
/// The MSR accesses of one operation.
type Accesses = fn(&VpmuStats) -> &MsrAccessCounts;

const UPTIME: Family = Family::gauge(
    "vmm_vm_uptime_seconds",
    "Seconds since the VMM built the VM.",
);
const VPMU_ENABLED: Family =
    Family::gauge("vmm_vm_vpmu_enabled", "1 when the guest has a virtual PMU.");

/// Per vCPU (label `vcpu`).
const VIEW_AGE: Family = Family::gauge(
    "vmm_vpmu_view_age_seconds",
    "Age of the vCPU's view when its VMM answered: the vCPU's series are its counts as of \
     that long before the answer.",
);

/// Per guest counter (labels `vcpu`, `counter`, `event`): the family and
/// the counter's value in it.
const COUNTER_FAMILIES: [(Family, CounterValue); 7] = [
    (
        Family::gauge(
            "vmm_vpmu_counter_value",
            "Current value of a guest PMU counter.",
        ),
        |c| Num::Int(c.value),
    ),
    (
        Family::counter(
            "vmm_vpmu_counter_counted_total",
            "Events a guest counter counted under its current programming (guest writes of \
             the value do not change it; restarts at 0 with a new programming).",
        ),
        |c| Num::Int(c.counted),
    ),
    (
        Family::gauge(
            "vmm_vpmu_counter_running",
            "1 while the guest has the counter enabled.",
        ),
        |c| Num::Int(c.running as u64),
    ),
    (
        Family::gauge(
            "vmm_vpmu_counter_host_enabled_seconds",
            "Time the backing host event was enabled.",
        ),
        |c| Num::Real(c.host_time_enabled_ns as f64 / 1e9),
    ),
    (
        Family::gauge(
            "vmm_vpmu_counter_host_running_seconds",
            "Time the backing host event was on a counter (below enabled: multiplexed).",
        ),
        |c| Num::Real(c.host_time_running_ns as f64 / 1e9),
    ),
    (
        Family::counter(
            "vmm_vpmu_counter_overflows_total",
            "Overflows of a guest counter.",
        ),
        |c| Num::Int(c.overflows),
    ),
    (
        Family::counter(
            "vmm_vpmu_counter_pmis_total",
            "PMIs a guest counter requested.",
        ),
        |c| Num::Int(c.pmis),
    ),
];

/// Per guest counter, labels `vcpu`, `counter`, `event` and `backing`.
const BACKING: Family = Family::gauge(
    "vmm_vpmu_counter_backing",
    "How a guest counter is backed on the host (1 for the current backing).",
);

/// Per vCPU (label `vcpu`), counters: the series, the statistic its help
/// names and its value, in the order of the statistics' names.
const STATISTICS: [(&str, &str, Count<VpmuStats>); 29] = [
    ("vmm_vpmu_backend_errors_total", "backend_errors", |s| {
        s.backend_errors
    }),
    ("vmm_vpmu_backing_lost_total", "backing_lost", |s| {
        s.backing_lost
    }),
    (
        "vmm_vpmu_backing_recovered_total",
        "backing_recovered",
        |s| s.backing_recovered,
    ),
    ("vmm_vpmu_clock_lead_ns_total", "clock_lead_ns", |s| {
        s.clock_lead_ns
    }),
    ("vmm_vpmu_clock_reads_total", "clock_reads", |s| {
        s.clock_reads
    }),
    (
        "vmm_vpmu_clock_reads_saved_total",
        "clock_reads_saved",
        |s| s.clock_reads_saved,
    ),
    ("vmm_vpmu_closes_total", "closes", |s| s.closes),
    ("vmm_vpmu_faults_total", "faults", |s| s.faults),
    ("vmm_vpmu_mode_samples_total", "mode_samples", |s| {
        s.mode_samples
    }),
    (
        "vmm_vpmu_mode_samples_user_total",
        "mode_samples_user",
        |s| s.mode_samples_user,
    ),
    ("vmm_vpmu_notices_dropped_total", "notices_dropped", |s| {
        s.notices_dropped
    }),
    ("vmm_vpmu_open_failures_total", "open_failures", |s| {
        s.open_failures
    }),
    ("vmm_vpmu_open_retries_total", "open_retries", |s| {
        s.open_retries
    }),
    ("vmm_vpmu_opens_total", "opens", |s| s.opens),
    ("vmm_vpmu_overflow_signals_total", "overflow_signals", |s| {
        s.overflow_signals
    }),
    ("vmm_vpmu_overflows_total", "overflows", |s| s.overflows),
    ("vmm_vpmu_period_updates_total", "period_updates", |s| {
        s.period_updates
    }),
    ("vmm_vpmu_pmis_total", "pmis", |s| s.pmis),
    ("vmm_vpmu_reads_total", "reads", |s| s.reads),
    ("vmm_vpmu_reprograms_total", "reprograms", |s| s.reprograms),
    ("vmm_vpmu_resets_total", "resets", |s| s.resets),
    ("vmm_vpmu_restores_total", "restores", |s| s.restores),
    (
        "vmm_vpmu_restores_equivalent_total",
        "restores_equivalent",
        |s| s.restores_equivalent,
    ),
    ("vmm_vpmu_retired_contexts_total", "retired_contexts", |s| {
        s.retired_contexts
    }),
    ("vmm_vpmu_retired_dropped_total", "retired_dropped", |s| {
        s.retired_dropped
    }),
    ("vmm_vpmu_saves_total", "saves", |s| s.saves),
    ("vmm_vpmu_starts_total", "starts", |s| s.starts),
    ("vmm_vpmu_stops_total", "stops", |s| s.stops),
    ("vmm_vpmu_throttles_total", "throttles", |s| s.throttles),
];

/// Per vCPU, operation (`op`) and register (`register`).
const MSR_ACCESSES: Family = Family::counter(
    "vmm_vpmu_msr_accesses_total",
    "Guest PMU MSR accesses handled by the VMM, by register and operation.",
);
/// `op` label values and their accesses.
const OPS: [(&str, Accesses); 2] = [("rdmsr", |s| &s.rdmsr), ("wrmsr", |s| &s.wrmsr)];
/// `register` label values and their accesses.
const REGISTERS: [(&str, Count<MsrAccessCounts>); 11] = [
    ("event_select", |a| a.event_select),
    ("fixed_counter", |a| a.fixed_counter),
    ("fixed_ctrl", |a| a.fixed_ctrl),
    ("global_ctrl", |a| a.global_ctrl),
    ("global_inuse", |a| a.global_inuse),
    ("global_status", |a| a.global_status),
    ("global_status_reset", |a| a.global_status_reset),
    ("global_status_set", |a| a.global_status_set),
    ("gp_counter", |a| a.gp_counter),
    ("perf_capabilities", |a| a.perf_capabilities),
    ("unknown", |a| a.unknown),
];

/// Per vCPU and outcome (`delivery`).
const PMI_DELIVERIES: Family = Family::counter(
    "vmm_vpmu_pmi_deliveries_total",
    "PMIs the VMM delivered through the guest's LVTPC, by outcome.",
);
/// `delivery` label values and their counts.
const DELIVERIES: [(&str, Count<PmiDelivery>); 6] = [
    ("failed", |d| d.failed),
    ("fixed", |d| d.fixed),
    ("mask_skipped", |d| d.mask_skipped),
    ("masked", |d| d.masked),
    ("nmi", |d| d.nmi),
    ("unsupported_mode", |d| d.unsupported_mode),
];

/// Per vCPU and programming id (labels `vcpu`, `event`, `id`).
const VCPU_EVENTS: Family = Family::counter(
    "vmm_vpmu_events_total",
    "Events a vCPU's counters counted per programming id (event, unit mask, ring levels, \
     edge, invert, counter mask), across reprogramming and vPMU resets.",
);
/// Per programming id (labels `event`, `id`).
const VM_EVENTS: Family = Family::counter(
    "vmm_vm_vpmu_events_total",
    "Events the VM's counters counted per programming id, every vCPU and context merged.",
);

/// Appends a label value to `text`, escaped.
fn escape_into(text: &mut String, value: &str) {
    if !value.contains(['\\', '"', '\n']) {
        text.push_str(value);
        return;
    }
    for c in value.chars() {
        match c {
            '\\' => text.push_str("\\\\"),
            '"' => text.push_str("\\\""),
            '\n' => text.push_str("\\n"),
            c => text.push(c),
        }
    }
}

/// The exposition's content type (text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One VM's export to render, and the `vm` label of its series (`None`:
/// the VMM's own `/metrics`, which has none).
pub struct Labelled<'a> {
    pub vm: Option<&'a str>,
    pub doc: &'a VpmuDoc,
}

/// The text being written; samples get the current VM's `vm` label first.
#[derive(Default)]
pub struct Exposition {
    text: String,
    vm: Option<String>,
}

impl Exposition {
    pub fn header(&mut self, family: &Family) {
        self.help(family.name, family.kind, family.help);
    }

    /// The text written.
    pub fn into_text(self) -> String {
        self.text
    }

    /// The `vm` label of the samples that follow.
    fn set_vm(&mut self, vm: Option<&str>) {
        self.vm = vm.map(String::from);
    }

    fn help(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// One sample line, written straight into the text (an exporter
    /// writes thousands per scrape: no string per label or line).
    pub fn sample(&mut self, name: &str, labels: &[(&str, String)], value: impl Display) {
        let text = &mut self.text;
        text.push_str(name);
        let vm = self.vm.as_deref().map(|vm| ("vm", vm));
        let all = vm
            .into_iter()
            .chain(labels.iter().map(|(k, v)| (*k, v.as_str())));
        for (i, (key, value)) in all.enumerate() {
            text.push(if i == 0 { '{' } else { ',' });
            text.push_str(key);
            text.push_str("=\"");
            escape_into(text, value);
            text.push('"');
        }
        if self.vm.is_some() || !labels.is_empty() {
            text.push('}');
        }
        let _ = writeln!(text, " {value}");
    }

    /// Each VM's samples of one family, with its `vm` label.
    fn per_vm(&mut self, vms: &[Labelled], mut samples: impl FnMut(&mut Self, &VpmuDoc)) {
        for vm in vms {
            self.set_vm(vm.vm);
            samples(self, vm.doc);
        }
        self.set_vm(None);
    }
}

/// Renders one VM's export (its own `GET /metrics`).
pub fn render(doc: &VpmuDoc) -> String {
    let mut out = Exposition::default();
    render_into(&mut out, &[Labelled { vm: None, doc }]);
    out.into_text()
}

/// Writes the families of every VM in `vms`, each family once.
pub fn render_into(out: &mut Exposition, vms: &[Labelled]) {
    vm(out, vms);
    view_ages(out, vms);
    counters(out, vms);
    statistics(out, vms);
    msr_accesses(out, vms);
    pmi_deliveries(out, vms);
    totals(out, vms);
}

fn vm(out: &mut Exposition, vms: &[Labelled]) {
    out.header(&UPTIME);
    out.per_vm(vms, |out, doc| {
        out.sample(UPTIME.name, &[], doc.vm.uptime_ms as f64 / 1e3)
    });
    out.header(&VPMU_ENABLED);
    out.per_vm(vms, |out, doc| {
        out.sample(VPMU_ENABLED.name, &[], doc.vm.vpmu as u8)
    });
}

/// How old each vCPU's view was; without a vCPU view, no family.
fn view_ages(out: &mut Exposition, vms: &[Labelled]) {
    if vms.iter().all(|vm| vm.doc.vcpus.is_empty()) {
        return;
    }
    out.header(&VIEW_AGE);
    out.per_vm(vms, |out, doc| {
        for v in &doc.vcpus {
            let age = Num::Real(v.age_ms as f64 / 1e3);
            out.sample(VIEW_AGE.name, &[("vcpu", v.index.to_string())], age);
        }
    });
}

/// Every guest counter of every vCPU, with its vCPU.
fn every_counter(vcpus: &[VcpuDoc]) -> impl Iterator<Item = (u8, &CounterSnapshot)> {
    vcpus
        .iter()
        .flat_map(|v| v.vpmu.counters.iter().map(|c| (v.index, c)))
}

/// The labels that name a guest counter: `vcpu`, `counter`, `event`.
fn counter_labels(vcpu: u8, c: &CounterSnapshot) -> Vec<(&'static str, String)> {
    vec![
        ("vcpu", vcpu.to_string()),
        ("counter", counter_label(c)),
        ("event", event_label(c)),
    ]
}

fn counters(out: &mut Exposition, vms: &[Labelled]) {
    for (family, value) in &COUNTER_FAMILIES {
        out.header(family);
        out.per_vm(vms, |out, doc| {
            for (vcpu, c) in every_counter(&doc.vcpus) {
                out.sample(family.name, &counter_labels(vcpu, c), value(c));
            }
        });
    }
    out.header(&BACKING);
    out.per_vm(vms, |out, doc| {
        for (vcpu, c) in every_counter(&doc.vcpus) {
            let mut labels = counter_labels(vcpu, c);
            labels.push(("backing", backing_label(&c.backing).to_string()));
            out.sample(BACKING.name, &labels, 1);
        }
    });
}

/// The vPMU's statistics; without a vCPU view, not even their headers.
fn statistics(out: &mut Exposition, vms: &[Labelled]) {
    if vms.iter().all(|vm| vm.doc.vcpus.is_empty()) {
        return;
    }
    for (name, statistic, value) in &STATISTICS {
        let help = format!("vPMU statistic {statistic} of a vCPU.");
        out.help(name, Kind::Counter, &help);
        out.per_vm(vms, |out, doc| {
            for v in &doc.vcpus {
                out.sample(name, &[("vcpu", v.index.to_string())], value(&v.vpmu.stats));
            }
        });
    }
}

fn msr_accesses(out: &mut Exposition, vms: &[Labelled]) {
    out.header(&MSR_ACCESSES);
    out.per_vm(vms, |out, doc| msr_accesses_of(out, &doc.vcpus));
}

fn msr_accesses_of(out: &mut Exposition, vcpus: &[VcpuDoc]) {
    for v in vcpus {
        for (op, accesses) in &OPS {
            for (register, value) in &REGISTERS {
                let labels = [
                    ("vcpu", v.index.to_string()),
                    ("op", op.to_string()),
                    ("register", register.to_string()),
                ];
                out.sample(MSR_ACCESSES.name, &labels, value(accesses(&v.vpmu.stats)));
            }
        }
    }
}

fn pmi_deliveries(out: &mut Exposition, vms: &[Labelled]) {
    out.header(&PMI_DELIVERIES);
    out.per_vm(vms, |out, doc| {
        for v in &doc.vcpus {
            for (delivery, value) in &DELIVERIES {
                let labels = [
                    ("vcpu", v.index.to_string()),
                    ("delivery", delivery.to_string()),
                ];
                out.sample(PMI_DELIVERIES.name, &labels, value(&v.pmi_delivery));
            }
        }
    });
}

/// Events counted per programming id, over ended and live counter
/// contexts: per vCPU and for the VM.
fn totals(out: &mut Exposition, vms: &[Labelled]) {
    out.header(&VCPU_EVENTS);
    out.per_vm(vms, |out, doc| {
        for r in &doc.totals {
            for v in &r.vcpus {
                let labels = [
                    ("vcpu", v.vcpu.to_string()),
                    ("event", r.event.clone()),
                    ("id", r.id_hex.clone()),
                ];
                out.sample(VCPU_EVENTS.name, &labels, v.count);
            }
        }
    });
    out.header(&VM_EVENTS);
    out.per_vm(vms, |out, doc| {
        for r in &doc.totals {
            let labels = [("event", r.event.clone()), ("id", r.id_hex.clone())];
            out.sample(VM_EVENTS.name, &labels, r.count);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pmu::export::fixtures::{self, counter, view};
    use crate::pmu::export::{Export, VcpuView};
    use crate::pmu::PmiDelivery;
    use serde_json::Value;
    use std::sync::Arc;
    use vpmu::evtsel::{EN, INT, OS, USR};
    use vpmu::{Backing, CounterKind, VpmuStats};

    const CYCLES: u64 = 0x76 | USR | OS | EN;
    const INSTRUCTIONS: u64 = 0xc0 | USR | OS | EN | INT;

    /// Statistics whose every count is a different number (1, 2, ...).
    fn numbered_stats() -> VpmuStats {
        fn number(v: &mut Value, n: &mut u64) {
            match v {
                Value::Object(fields) => fields.values_mut().for_each(|x| number(x, n)),
                Value::Number(_) => {
                    *n += 1;
                    *v = (*n).into();
                }
                _ => {}
            }
        }
        let mut value = serde_json::to_value(VpmuStats::default()).unwrap();
        number(&mut value, &mut 0);
        serde_json::from_value(value).unwrap()
    }

    /// Two vCPUs: counters of every backing, numbered statistics and PMI
    /// deliveries, retired and live totals.
    fn views() -> Vec<Arc<VcpuView>> {
        let mut fixed = counter(1, CYCLES, 70, true);
        (fixed.kind, fixed.event_name) = (CounterKind::Fixed, Some("cycles".into()));
        let mut unbacked = counter(2, 0xd1 | USR | EN, 0, false);
        unbacked.event_name = Some("odd \"name\"\\\n".into());
        unbacked.backing = Backing::Unbacked {
            reason: "no \"such\" event\\here".into(),
        };
        let mut denied = counter(3, 0x3c | OS | EN, 0, false);
        denied.backing = Backing::Denied;
        let mut busy = counter(0, INSTRUCTIONS, 12345, true);
        (busy.backing, busy.host_time_enabled_ns) = (Backing::HardwareRaw, 1_500_000_000);
        (busy.host_time_running_ns, busy.overflows, busy.pmis) = (750_000_000, 3, 2);
        let mut first = view(0, vec![busy, fixed, unbacked, denied], &[(CYCLES, 100, 2)]);
        first.vpmu.stats = numbered_stats();
        first.pmi_delivery = PmiDelivery {
            nmi: 1,
            fixed: 2,
            masked: 3,
            unsupported_mode: 4,
            failed: 5,
            mask_skipped: 6,
        };
        let mut idle = counter(1, 0, 0, false);
        idle.backing = Backing::Idle;
        let second = view(
            1,
            vec![counter(0, CYCLES, 5, true), idle],
            &[(INSTRUCTIONS, 9, 1)],
        );
        vec![Arc::new(first), Arc::new(second)]
    }

    fn export() -> Export {
        Export::new(
            Arc::new(fixtures::plan(Some(fixtures::snapshot(vec![]).model))),
            2,
        )
    }

    /// The export of `views`, as `GET /vpmu` sends it.
    fn doc(views: &[Arc<VcpuView>]) -> VpmuDoc {
        VpmuDoc::new(&"vm".parse().unwrap(), &export(), views, false)
    }

    /// One sample line: its series, labels (values as escaped) and value.
    struct Sample {
        name: String,
        labels: Vec<(String, String)>,
        value: String,
    }

    /// The labels between `{` and `}`: `key="value",...`, values escaped.
    fn labels(mut text: &str) -> Vec<(String, String)> {
        let mut labels = Vec::new();
        while let Some((key, rest)) = text.split_once("=\"") {
            let mut escaped = false;
            let end = rest
                .char_indices()
                .find(|&(_, ch)| {
                    let end = ch == '"' && !escaped;
                    escaped = ch == '\\' && !escaped;
                    end
                })
                .expect("a closing quote")
                .0;
            labels.push((key.to_string(), rest[..end].to_string()));
            text = rest[end + 1..].trim_start_matches(',');
        }
        labels
    }

    /// The samples of an exposition; checks that each follows its family's
    /// `# HELP` and `# TYPE`.
    fn samples(text: &str) -> Vec<Sample> {
        let mut family = String::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap().to_string();
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, super::tests::labels(&rest[..rest.len() - 1])),
                None => (series, Vec::new()),
            };
            assert_eq!(name, family, "a sample in its family: {line}");
            let (name, value) = (name.to_string(), value.to_string());
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        samples
    }

    /// Series names with their label keys, in order, each once.
    fn series(samples: &[Sample]) -> Vec<(String, Vec<String>)> {
        let mut series: Vec<(String, Vec<String>)> = Vec::new();
        for s in samples {
            let keys: Vec<String> = s.labels.iter().map(|(k, _)| k.clone()).collect();
            if series.last() != Some(&(s.name.clone(), keys.clone())) {
                series.push((s.name.clone(), keys));
            }
        }
        series
    }

    #[test]
    fn every_series_has_its_name_and_labels() {
        let series = series(&samples(&render(&doc(&views()))));
        let counter = ["vcpu", "counter", "event"].as_slice();
        let vcpu = ["vcpu"].as_slice();
        let mut expected: Vec<(&str, &[&str])> = vec![
            ("vmm_vm_uptime_seconds", &[]),
            ("vmm_vm_vpmu_enabled", &[]),
            ("vmm_vpmu_view_age_seconds", vcpu),
            ("vmm_vpmu_counter_value", counter),
            ("vmm_vpmu_counter_counted_total", counter),
            ("vmm_vpmu_counter_running", counter),
            ("vmm_vpmu_counter_host_enabled_seconds", counter),
            ("vmm_vpmu_counter_host_running_seconds", counter),
            ("vmm_vpmu_counter_overflows_total", counter),
            ("vmm_vpmu_counter_pmis_total", counter),
            (
                "vmm_vpmu_counter_backing",
                &["vcpu", "counter", "event", "backing"],
            ),
        ];
        let statistics = [
            "backend_errors",
            "backing_lost",
            "backing_recovered",
            "clock_lead_ns",
            "clock_reads",
            "clock_reads_saved",
            "closes",
            "faults",
            "mode_samples",
            "mode_samples_user",
            "notices_dropped",
            "open_failures",
            "open_retries",
            "opens",
            "overflow_signals",
            "overflows",
            "period_updates",
            "pmis",
            "reads",
            "reprograms",
            "resets",
            "restores",
            "restores_equivalent",
            "retired_contexts",
            "retired_dropped",
            "saves",
            "starts",
            "stops",
            "throttles",
        ]
        .map(|s| format!("vmm_vpmu_{s}_total"));
        expected.extend(statistics.iter().map(|s| (s.as_str(), vcpu)));
        expected.extend([
            (
                "vmm_vpmu_msr_accesses_total",
                ["vcpu", "op", "register"].as_slice(),
            ),
            ("vmm_vpmu_pmi_deliveries_total", &["vcpu", "delivery"]),
            ("vmm_vpmu_events_total", &["vcpu", "event", "id"]),
            ("vmm_vm_vpmu_events_total", &["event", "id"]),
        ]);
        let names: Vec<&str> = series.iter().map(|(name, _)| name.as_str()).collect();
        let mut once = names.clone();
        once.dedup();
        assert_eq!(names, once, "each series in one run of lines");
        let series: Vec<(&str, Vec<&str>)> = series
            .iter()
            .map(|(n, keys)| (n.as_str(), keys.iter().map(String::as_str).collect()))
            .collect();
        let expected: Vec<(&str, Vec<&str>)> =
            expected.into_iter().map(|(n, k)| (n, k.to_vec())).collect();
        assert_eq!(series, expected);
    }

    /// The samples of series `name` whose labels include `labels`.
    fn values<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a str> {
        let has = |s: &Sample, (k, v): &(&str, &str)| {
            s.labels
                .iter()
                .any(|l| l == &(k.to_string(), v.to_string()))
        };
        samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|l| has(s, l)))
            .map(|s| s.value.as_str())
            .collect()
    }

    #[test]
    fn statistics_registers_and_deliveries_report_what_they_name() {
        let views = views();
        let samples = samples(&render(&doc(&views)));
        // Their serde names only check the tables: every numeric field
        // has its series or label value, with its own value.
        let stats = serde_json::to_value(views[0].vpmu.stats).unwrap();
        let mut statistics = 0;
        for (field, value) in stats.as_object().unwrap() {
            if let Some(n) = value.as_u64() {
                let name = format!("vmm_vpmu_{field}_total");
                let n = n.to_string();
                assert_eq!(
                    values(&samples, &name, &[("vcpu", "0")]),
                    [n.as_str()],
                    "{field}"
                );
                statistics += 1;
                continue;
            }
            for (register, n) in value.as_object().unwrap() {
                let labels = [
                    ("vcpu", "0"),
                    ("op", field.as_str()),
                    ("register", register),
                ];
                let n = n.to_string();
                let got = values(&samples, "vmm_vpmu_msr_accesses_total", &labels);
                assert_eq!(got, [n.as_str()], "{field} {register}");
            }
        }
        assert_eq!(statistics, STATISTICS.len(), "no other statistic series");
        let msr_samples = values(&samples, "vmm_vpmu_msr_accesses_total", &[("vcpu", "0")]);
        assert_eq!(msr_samples.len(), 2 * REGISTERS.len());
        let deliveries = serde_json::to_value(views[0].pmi_delivery).unwrap();
        for (delivery, n) in deliveries.as_object().unwrap() {
            let labels = [("vcpu", "0"), ("delivery", delivery.as_str())];
            let n = n.to_string();
            let got = values(&samples, "vmm_vpmu_pmi_deliveries_total", &labels);
            assert_eq!(got, [n.as_str()], "{delivery}");
        }
        assert_eq!(deliveries.as_object().unwrap().len(), DELIVERIES.len());
    }

    #[test]
    fn counters_are_labelled_and_valued() {
        let samples = samples(&render(&doc(&views())));
        let busy = [
            ("vcpu", "0"),
            ("counter", "gp0"),
            ("event", "raw:0xc0/0x00"),
        ];
        let of = |name| values(&samples, name, &busy);
        assert_eq!(of("vmm_vpmu_counter_value"), ["12345"]);
        assert_eq!(of("vmm_vpmu_counter_host_enabled_seconds"), ["1.5"]);
        assert_eq!(of("vmm_vpmu_counter_host_running_seconds"), ["0.75"]);
        assert_eq!(of("vmm_vpmu_counter_overflows_total"), ["3"]);
        let backings: Vec<&str> = samples
            .iter()
            .filter(|s| s.name == "vmm_vpmu_counter_backing")
            .map(|s| s.labels[3].1.as_str())
            .collect();
        let all = ["hardware_raw", "software_clock", "unbacked", "denied"];
        assert_eq!(
            backings,
            [all.as_slice(), &["software_clock", "idle"]].concat()
        );
        let odd = [("counter", "gp2"), ("event", r#"odd \"name\"\\\n"#)];
        assert_eq!(
            values(&samples, "vmm_vpmu_counter_running", &odd),
            ["0"],
            "escaped"
        );
        let vm = [("event", "raw:0x76/0x00"), ("id", "0x30076")];
        assert_eq!(values(&samples, "vmm_vm_vpmu_events_total", &vm), ["175"]);
    }

    /// A sample as name, labels and value.
    type Flat = (String, Vec<(String, String)>, String);

    #[test]
    fn a_fleet_has_each_vms_own_series_with_a_vm_label_first() {
        let (a, b) = (doc(&views()), doc(&views()[1..]));
        let mut out = Exposition::default();
        let vms = [
            Labelled {
                vm: Some("web-1"),
                doc: &a,
            },
            Labelled {
                vm: Some("db"),
                doc: &b,
            },
        ];
        render_into(&mut out, &vms);
        let fleet = samples(&out.into_text());
        let names: Vec<&str> = fleet.iter().map(|s| s.name.as_str()).collect();
        let mut once = names.clone();
        once.dedup();
        let own = series(&samples(&render(&a)));
        assert_eq!(once.len(), own.len(), "each family once, all of them");
        for (vm, doc) in [("web-1", &a), ("db", &b)] {
            let mine: Vec<Flat> = fleet
                .iter()
                .filter(|s| s.labels[0] == ("vm".to_string(), vm.to_string()))
                .map(|s| (s.name.clone(), s.labels[1..].to_vec(), s.value.clone()))
                .collect();
            let alone: Vec<Flat> = samples(&render(doc))
                .into_iter()
                .map(|s| (s.name, s.labels, s.value))
                .collect();
            assert_eq!(mine, alone, "{vm}: its own names, labels and values");
        }
        assert!(fleet.iter().all(|s| s.labels[0].0 == "vm"));
    }

    #[test]
    fn without_a_view_the_statistics_have_no_family() {
        let text = render(&doc(&[]));
        assert!(text.contains("vmm_vm_vpmu_enabled 1\n"), "{text}");
        assert!(
            text.contains("# TYPE vmm_vpmu_counter_value gauge\n"),
            "{text}"
        );
        assert!(!text.contains("vmm_vpmu_opens_total"), "{text}");
        assert_eq!(samples(&text).len(), 2, "only the VM's: {text}");
    }
}
