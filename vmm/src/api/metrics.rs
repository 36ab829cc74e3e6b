//! The export in Prometheus text exposition format (version 0.0.4).
//!
//! Metric names are stable: `vmm_vpmu_counter_*` per guest counter
//! (labels `vcpu`, `counter`, `event`), `vmm_vpmu_<statistic>_total` per
//! vCPU from the vPMU's statistics, `vmm_vpmu_msr_accesses_total` by
//! register and operation, `vmm_vpmu_pmi_deliveries_total` by how the PMI
//! went, `vmm_vpmu_events_total` (per vCPU) and `vmm_vm_vpmu_events_total`
//! (per VM) for the totals per programming id (labels `event`, `id`), and
//! `vmm_vm_*` for the VM. Counts are printed as exact integers.

use std::fmt::Write;
use std::sync::Arc;

use vpmu::{Backing, CounterKind, CounterSnapshot};

use crate::pmu::export::{self, Export, VcpuView};

/// Escapes a label value.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The labels that name a guest counter: `vcpu`, `counter`, `event`.
fn counter_labels(view: &VcpuView, c: &CounterSnapshot) -> [(&'static str, String); 3] {
    [
        ("vcpu", view.index.to_string()),
        ("counter", counter_label(c)),
        ("event", event_label(c)),
    ]
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

/// A sample value: counts exactly, times as decimals.
enum Num {
    Int(u64),
    Real(f64),
}

impl std::fmt::Display for Num {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Num::Int(n) => write!(f, "{n}"),
            Num::Real(x) => write!(f, "{x}"),
        }
    }
}

pub fn backing_label(b: &Backing) -> &'static str {
    match b {
        Backing::Idle => "idle",
        Backing::HardwareRaw => "hardware_raw",
        Backing::SoftwareClock => "software_clock",
        Backing::Unbacked { .. } => "unbacked",
        Backing::Denied => "denied",
    }
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, String)], value: impl std::fmt::Display) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{}}} {value}", labels.join(","));
        }
    }
}

type CounterField = fn(&CounterSnapshot) -> Num;

/// Renders every vCPU's view.
pub fn render(views: &[Arc<VcpuView>], export: &Export) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };

    f.header(
        "vmm_vm_uptime_seconds",
        "gauge",
        "Seconds since the VMM built the VM.",
    );
    f.sample(
        "vmm_vm_uptime_seconds",
        &[],
        export.started.elapsed().as_secs_f64(),
    );
    f.header(
        "vmm_vm_vpmu_enabled",
        "gauge",
        "1 when the guest has a virtual PMU.",
    );
    f.sample(
        "vmm_vm_vpmu_enabled",
        &[],
        export.plan.model.is_some() as u8,
    );

    let per_counter: [(&str, &str, &str, CounterField); 7] = [
        (
            "vmm_vpmu_counter_value",
            "gauge",
            "Current value of a guest PMU counter.",
            |c| Num::Int(c.value),
        ),
        (
            "vmm_vpmu_counter_counted_total",
            "counter",
            "Events a guest counter counted under its current programming (guest writes of \
             the value do not change it; restarts at 0 with a new programming).",
            |c| Num::Int(c.counted),
        ),
        (
            "vmm_vpmu_counter_running",
            "gauge",
            "1 while the guest has the counter enabled.",
            |c| Num::Int(c.running as u64),
        ),
        (
            "vmm_vpmu_counter_host_enabled_seconds",
            "gauge",
            "Time the backing host event was enabled.",
            |c| Num::Real(c.host_time_enabled_ns as f64 / 1e9),
        ),
        (
            "vmm_vpmu_counter_host_running_seconds",
            "gauge",
            "Time the backing host event was on a counter (below enabled: multiplexed).",
            |c| Num::Real(c.host_time_running_ns as f64 / 1e9),
        ),
        (
            "vmm_vpmu_counter_overflows_total",
            "counter",
            "Overflows of a guest counter.",
            |c| Num::Int(c.overflows),
        ),
        (
            "vmm_vpmu_counter_pmis_total",
            "counter",
            "PMIs a guest counter requested.",
            |c| Num::Int(c.pmis),
        ),
    ];
    for (name, kind, help, value) in per_counter {
        f.header(name, kind, help);
        for view in views {
            for c in &view.vpmu.counters {
                f.sample(name, &counter_labels(view, c), value(c));
            }
        }
    }
    f.header(
        "vmm_vpmu_counter_backing",
        "gauge",
        "How a guest counter is backed on the host (1 for the current backing).",
    );
    for view in views {
        for c in &view.vpmu.counters {
            let mut labels = counter_labels(view, c).to_vec();
            labels.push(("backing", backing_label(&c.backing).to_string()));
            f.sample("vmm_vpmu_counter_backing", &labels, 1);
        }
    }

    // Per-vCPU statistics: every numeric field of the vPMU's statistics,
    // MSR accesses by register and operation.
    let stats: Vec<(u8, serde_json::Value)> = views
        .iter()
        .map(|v| {
            (
                v.index,
                serde_json::to_value(v.vpmu.stats).unwrap_or_default(),
            )
        })
        .collect();
    let names: Vec<String> = stats
        .first()
        .and_then(|(_, s)| s.as_object())
        .map(|o| {
            o.iter()
                .filter(|(_, v)| v.is_u64())
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    for name in names {
        let metric = format!("vmm_vpmu_{name}_total");
        f.header(
            &metric,
            "counter",
            &format!("vPMU statistic {name} of a vCPU."),
        );
        for (vcpu, s) in &stats {
            let value = s[&name].as_u64().unwrap_or(0);
            f.sample(&metric, &[("vcpu", vcpu.to_string())], value);
        }
    }
    f.header(
        "vmm_vpmu_msr_accesses_total",
        "counter",
        "Guest PMU MSR accesses handled by the VMM, by register and operation.",
    );
    for (vcpu, s) in &stats {
        for op in ["rdmsr", "wrmsr"] {
            let Some(regs) = s[op].as_object() else {
                continue;
            };
            for (register, n) in regs {
                let labels = [
                    ("vcpu", vcpu.to_string()),
                    ("op", op.to_string()),
                    ("register", register.clone()),
                ];
                f.sample(
                    "vmm_vpmu_msr_accesses_total",
                    &labels,
                    n.as_u64().unwrap_or(0),
                );
            }
        }
    }
    f.header(
        "vmm_vpmu_pmi_deliveries_total",
        "counter",
        "PMIs the VMM delivered through the guest's LVTPC, by outcome.",
    );
    for view in views {
        let d = serde_json::to_value(view.pmi_delivery).unwrap_or_default();
        if let Some(d) = d.as_object() {
            for (how, n) in d {
                let labels = [("vcpu", view.index.to_string()), ("delivery", how.clone())];
                f.sample(
                    "vmm_vpmu_pmi_deliveries_total",
                    &labels,
                    n.as_u64().unwrap_or(0),
                );
            }
        }
    }
    totals(&mut f, views);
    out
}

/// Events counted per programming id, over ended and live counter
/// contexts: per vCPU and for the VM.
fn totals(f: &mut Family, views: &[Arc<VcpuView>]) {
    f.header(
        "vmm_vpmu_events_total",
        "counter",
        "Events a vCPU's counters counted per programming id (event, unit mask, ring levels, \
         edge, invert, counter mask), across reprogramming and vPMU resets.",
    );
    let rows = export::vm_totals(views);
    for r in &rows {
        for v in &r.vcpus {
            let labels = [
                ("vcpu", v.vcpu.to_string()),
                ("event", r.event.clone()),
                ("id", r.id_hex.clone()),
            ];
            f.sample("vmm_vpmu_events_total", &labels, v.count);
        }
    }
    f.header(
        "vmm_vm_vpmu_events_total",
        "counter",
        "Events the VM's counters counted per programming id, every vCPU and context merged.",
    );
    for r in &rows {
        let labels = [("event", r.event.clone()), ("id", r.id_hex.clone())];
        f.sample("vmm_vm_vpmu_events_total", &labels, r.count);
    }
}
