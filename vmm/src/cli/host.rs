//! `vmm host`: what this host offers a vPMU and the plan `vmm run` would
//! make on it, for a person (a table) or a script (`--json`, read by
//! `scripts/pmu-host-check`). Looks only; starts no guest.

use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};
use vpmu::{HostCpuid, Vendor};

use crate::arch::cpuid;
use crate::pmu::{self, HostPmu, Rdpmc, VpmuMode, VpmuOptions};

/// A yes, or a no with its reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub ok: bool,
    /// Why not (empty when `ok`), or what it is.
    pub why: String,
}

impl Offer {
    fn of(result: &Result<(), String>) -> Self {
        match result {
            Ok(()) => Offer {
                ok: true,
                why: String::new(),
            },
            Err(why) => Offer {
                ok: false,
                why: why.clone(),
            },
        }
    }
}

/// The plan `vmm run --vpmu on` would make for a guest of one vendor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GuestPlan {
    /// The guest's CPU vendor (the host's, or `--cpu-vendor`).
    pub guest: Vendor,
    /// Host perf counts this guest's events as hardware events (guest only).
    pub hardware_events: Offer,
    /// How the guest's counters are backed, in the boot log's words.
    pub backing: String,
    /// Guest RDPMC returns the virtual counters (KVM's PMU mirrors them).
    pub rdpmc: Offer,
    /// The plan's one-line summary, or why `--vpmu on` fails.
    pub plan: Result<String, String>,
    pub notes: Vec<String>,
}

/// What the host offers: the document `vmm host --json` prints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostReport {
    /// `model name` from /proc/cpuinfo.
    pub cpu: String,
    pub vendor: Option<Vendor>,
    /// The host's PMU CPUID leaves, as its vendor defines them.
    pub pmu_cpuid: String,
    /// `/proc/sys/kernel/perf_event_paranoid`.
    pub perf_event_paranoid: Option<i32>,
    /// `/dev/kvm` opens.
    pub kvm: Offer,
    /// KVM sends PMU MSR accesses to the VMM (user-space MSRs + filter).
    pub msr_exits: Offer,
    /// `/sys/module/kvm/parameters/enable_pmu` (KVM's in-kernel PMU).
    pub kvm_pmu: Option<String>,
    /// Host perf opens hardware events.
    pub hardware_events: Offer,
    /// One per vendor: the host's first, then the other (`--cpu-vendor`).
    pub plans: Vec<GuestPlan>,
}

/// Looks at this host.
pub fn report() -> HostReport {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into());
    let perf_event_paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let kvm_pmu = std::fs::read_to_string("/sys/module/kvm/parameters/enable_pmu")
        .ok()
        .map(|s| s.trim().to_string());
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"));
    // Leaf 0 as this CPU answers it: KVM reports the same (the host's), and
    // it is there without KVM too.
    let leaf0 = core::arch::x86_64::__cpuid(0);
    let vendor = cpuid::vendor_of_leaf0(leaf0.ebx, leaf0.edx, leaf0.ecx);
    let host = kvm.as_ref().ok().map(|kvm| HostPmu::detect(kvm, vendor));
    let hardware_events = match &host {
        Some(h) => Offer::of(&h.hardware_events),
        None => Offer::of(
            &vpmu::backend::perf::PerfBackend::probe_hardware().map_err(|e| e.to_string()),
        ),
    };
    let mut vendors = vec![Vendor::Amd, Vendor::Intel];
    if vendor == Some(Vendor::Intel) {
        vendors.reverse();
    }
    let plans = match &host {
        Some(h) => vendors.into_iter().map(|v| guest_plan(h, v)).collect(),
        None => Vec::new(),
    };
    HostReport {
        cpu,
        vendor,
        pmu_cpuid: HostCpuid::detect().describe(vendor),
        perf_event_paranoid,
        msr_exits: host.as_ref().map_or_else(
            || Offer::of(&Err("no KVM".into())),
            |h| Offer::of(&h.msr_exits),
        ),
        kvm: Offer::of(&kvm.as_ref().map(|_| ()).map_err(Clone::clone)),
        kvm_pmu,
        hardware_events,
        plans,
    }
}

fn guest_plan(host: &HostPmu, guest: Vendor) -> GuestPlan {
    let seen = host.for_guest_vendor(guest);
    let options = VpmuOptions {
        mode: VpmuMode::On,
        ..Default::default()
    };
    // The plan of a guest that reads counters with RDMSR (the probe, or
    // Linux with perf_read_msr), so that it shows what RDPMC alone lacks.
    let planned = pmu::plan(&options, host, Some(guest), true);
    let backing = match &seen.hardware_events {
        Ok(()) => "every event the host's PMU counts: a hardware event counting the guest only".into(),
        Err(_) => "core cycles: task-clock of the vCPU thread; other events: unbacked (read as not counting)".into(),
    };
    GuestPlan {
        guest,
        hardware_events: Offer::of(&seen.hardware_events),
        backing,
        rdpmc: match &seen.rdpmc {
            Rdpmc::Mirrored => Offer::of(&Ok(())),
            Rdpmc::Unavailable(why) => Offer::of(&Err(why.clone())),
        },
        notes: planned
            .as_ref()
            .map(|p| p.notes.clone())
            .unwrap_or_default(),
        plan: planned.map(|p| p.to_string()).map_err(|e| e.to_string()),
    }
}

/// Prints the report; returns the exit code (0; 1 if it cannot print JSON).
pub fn run(json: bool) -> i32 {
    let report = report();
    if json {
        return match serde_json::to_string_pretty(&report) {
            Ok(text) => {
                println!("{text}");
                0
            }
            Err(e) => {
                eprintln!("vmm host: {e}");
                1
            }
        };
    }
    print!("{}", table(&report));
    0
}

/// The report as a two-column table.
pub fn table(r: &HostReport) -> String {
    let offer = |o: &Offer, yes: &str| match o.ok {
        true => yes.to_string(),
        false => format!("no: {}", o.why),
    };
    let mut rows: Vec<(String, String)> = vec![
        ("host CPU".into(), r.cpu.clone()),
        ("host PMU (CPUID)".into(), r.pmu_cpuid.clone()),
        (
            "host perf hardware events".into(),
            offer(&r.hardware_events, "yes"),
        ),
        (
            "perf_event_paranoid".into(),
            r.perf_event_paranoid
                .map_or("unknown".into(), |p| p.to_string()),
        ),
        ("/dev/kvm".into(), offer(&r.kvm, "yes")),
        (
            "PMU MSR exits to the VMM".into(),
            offer(&r.msr_exits, "yes"),
        ),
        (
            "KVM's in-kernel PMU".into(),
            match r.kvm_pmu.as_deref() {
                Some("Y") => "on (kvm.enable_pmu=Y)".into(),
                Some("N") => "off (kvm.enable_pmu=N)".into(),
                Some(other) => format!("kvm.enable_pmu={other}"),
                None => "unknown (no /sys/module/kvm/parameters/enable_pmu)".into(),
            },
        ),
    ];
    for p in &r.plans {
        let who = format!("{:?} guest", p.guest);
        rows.push((
            format!("{who}: plan"),
            p.plan
                .clone()
                .unwrap_or_else(|e| format!("--vpmu on fails: {e}")),
        ));
        rows.push((format!("{who}: backing"), p.backing.clone()));
        rows.push((
            format!("{who}: RDPMC"),
            offer(&p.rdpmc, "served by KVM's PMU, kept in step"),
        ));
        for note in &p.notes {
            rows.push((format!("{who}: note"), note.clone()));
        }
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(hardware: Result<(), String>, rdpmc: Rdpmc) -> HostPmu {
        HostPmu {
            msr_exits: Ok(()),
            hardware_events: hardware,
            rdpmc,
            vendor: Some(Vendor::Amd),
        }
    }

    #[test]
    fn a_host_without_hardware_events_backs_cycles_by_the_task_clock_and_says_why() {
        let h = host(
            Err("perf_event_open: ENOENT".into()),
            Rdpmc::Unavailable("KVM's in-kernel PMU is off".into()),
        );
        let p = guest_plan(&h, Vendor::Amd);
        assert!(!p.hardware_events.ok);
        assert!(p.backing.contains("task-clock"), "{}", p.backing);
        assert!(!p.rdpmc.ok && p.rdpmc.why.contains("in-kernel PMU is off"));
        assert!(
            p.plan.as_ref().unwrap().starts_with("vPMU on: Amd"),
            "{:?}",
            p.plan
        );
        assert!(
            p.notes.iter().any(|n| n.contains("ENOENT")),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn hardware_serves_only_the_hosts_own_vendor() {
        let h = host(Ok(()), Rdpmc::Mirrored);
        let own = guest_plan(&h, Vendor::Amd);
        assert!(own.hardware_events.ok && own.rdpmc.ok);
        assert!(own.backing.contains("hardware event"), "{}", own.backing);
        let foreign = guest_plan(&h, Vendor::Intel);
        assert!(!foreign.hardware_events.ok && !foreign.rdpmc.ok);
        assert!(
            foreign.hardware_events.why.contains("not the host's"),
            "{:?}",
            foreign
        );
    }

    #[test]
    fn the_table_names_every_fact_and_round_trips_as_json() {
        let h = host(Err("ENOENT".into()), Rdpmc::Unavailable("off".into()));
        let r = HostReport {
            cpu: "Test CPU".into(),
            vendor: Some(Vendor::Amd),
            pmu_cpuid: "CPUID: test".into(),
            perf_event_paranoid: Some(2),
            kvm: Offer::of(&Ok(())),
            msr_exits: Offer::of(&Ok(())),
            kvm_pmu: Some("N".into()),
            hardware_events: Offer::of(&Err("ENOENT".into())),
            plans: vec![guest_plan(&h, Vendor::Amd), guest_plan(&h, Vendor::Intel)],
        };
        let t = table(&r);
        for needle in [
            "Test CPU",
            "no: ENOENT",
            "off (kvm.enable_pmu=N)",
            "Amd guest: plan",
            "Intel guest: backing",
        ] {
            assert!(t.contains(needle), "{needle} missing:\n{t}");
        }
        let back: HostReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.plans.len(), 2);
        assert_eq!(back.hardware_events, r.hardware_events);
    }
}
