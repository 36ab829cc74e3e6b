//! The vPMU in the VMM: deciding the guest-visible PMU from the flags and
//! the host ([`plan`]), trapping its MSRs with KVM's MSR filter
//! ([`filter`]), and each vCPU's glue between KVM exits and its
//! [`vpmu::Vpmu`] ([`vcpu`]). Register semantics live in the `vpmu` crate;
//! this module only knows KVM.
//!
//! Owns: the plan, the MSR filter, each vCPU's [`vcpu::VcpuPmu`], PMI
//! delivery and the host export ([`export`]). May use `arch` (APIC
//! registers); knows nothing of the vCPU thread, its kicks or the API: what
//! it needs from them (the overflow signal) is handed to it.

pub mod export;
pub mod filter;
mod pmi;
#[cfg(feature = "test-seams")]
pub mod seams;
#[cfg(not(feature = "test-seams"))]
#[path = "no_seams.rs"]
pub mod seams;
pub mod vcpu;

pub use pmi::{host_tsc, DeliveredPmi, PmiDelivery};

use std::fmt;

use kvm_ioctls::{Cap, Kvm};
use vpmu::backend::perf::PerfBackend;
use vpmu::{EventPolicy, HostCpuid, HostFacts, PmuModel, Vendor};

/// Why no vPMU can be planned as asked (the VM does not start).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A counter shape was given with `--vpmu off`.
    #[error(
        "--vpmu-gp-counters, --vpmu-fixed-counters and --vpmu-version need the vPMU \
         (not --vpmu off)"
    )]
    ShapeWithoutVpmu,
    /// `--vpmu on`, but the host cannot serve a vPMU, for this reason.
    #[error("--vpmu on: {0}")]
    Unavailable(String),
    /// The asked shape breaks the vendor's rules.
    #[error("impossible vPMU: {0}")]
    Impossible(#[from] vpmu::ModelError),
}

/// `--vpmu`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VpmuMode {
    /// A vPMU wherever the host can serve the guest fully.
    #[default]
    Auto,
    /// A vPMU even where guest RDPMC cannot be served (with a warning).
    On,
    /// No PMU: CPUID advertises none.
    Off,
}

/// The vPMU flags of `vmm run`.
#[derive(Clone, Debug, Default)]
pub struct VpmuOptions {
    pub mode: VpmuMode,
    pub gp_counters: Option<u8>,
    pub fixed_counters: Option<u8>,
    pub version: Option<u8>,
    pub events: EventPolicy,
}

/// Whether guest RDPMC returns the virtual counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rdpmc {
    /// KVM's in-kernel PMU answers RDPMC; the VMM keeps its counters in step.
    Mirrored,
    /// RDPMC raises #GP in the guest, for this reason.
    Unavailable(String),
}

/// What the host offers a vPMU.
#[derive(Clone, Debug)]
pub struct HostPmu {
    /// Why KVM cannot send PMU MSRs to userspace, if it cannot.
    pub msr_exits: Result<(), String>,
    /// Whether host perf counts hardware events, and why not.
    pub hardware_events: Result<(), String>,
    /// Whether KVM's in-kernel PMU can answer guest RDPMC.
    pub rdpmc: Rdpmc,
    pub vendor: Option<Vendor>,
}

impl HostPmu {
    /// Looks at the host: KVM capabilities, perf, and KVM's module settings.
    pub fn detect(kvm: &Kvm, vendor: Option<Vendor>) -> Self {
        let msr_exits = if !kvm.check_extension(Cap::X86UserSpaceMsr) {
            Err("KVM lacks KVM_CAP_X86_USER_SPACE_MSR".to_string())
        } else if !kvm.check_extension(Cap::X86MsrFilter) {
            Err("KVM lacks KVM_CAP_X86_MSR_FILTER".to_string())
        } else {
            Ok(())
        };
        let hardware_events = PerfBackend::probe_hardware().map_err(|e| e.to_string());
        // Checked here, once, rather than on a vCPU thread (it sleeps 2 ms).
        PerfBackend::probe_schedule_epoch();
        let kvm_pmu = std::fs::read_to_string("/sys/module/kvm/parameters/enable_pmu")
            .map(|s| s.trim() == "Y")
            .unwrap_or(false);
        let rdpmc = match (&hardware_events, kvm_pmu) {
            (Ok(()), true) => Rdpmc::Mirrored,
            (_, false) => {
                Rdpmc::Unavailable("KVM's in-kernel PMU is off (kvm.enable_pmu=N)".into())
            }
            (Err(e), true) => {
                Rdpmc::Unavailable(format!("the host has no hardware PMU for KVM ({e})"))
            }
        };
        Self {
            msr_exits,
            hardware_events,
            rdpmc,
            vendor,
        }
    }
}

impl HostPmu {
    /// What this host offers a guest that sees a CPU of `guest`: all of it
    /// for the host's own vendor. For another vendor (`--cpu-vendor`) host
    /// perf cannot count the guest's events (its event codes mean other
    /// events on the host's PMU) and KVM's in-kernel PMU, which would
    /// answer RDPMC, models the host's vendor.
    pub fn for_guest_vendor(&self, guest: Vendor) -> HostPmu {
        if self.vendor == Some(guest) {
            return self.clone();
        }
        let why = format!(
            "the guest's CPU vendor ({guest:?}, --cpu-vendor) is not the host's ({})",
            self.vendor
                .map_or("neither AMD nor Intel".into(), |v| format!("{v:?}"))
        );
        HostPmu {
            msr_exits: self.msr_exits.clone(),
            hardware_events: Err(why.clone()),
            rdpmc: Rdpmc::Unavailable(why),
            vendor: self.vendor,
        }
    }
}

/// The decided vPMU of a VM.
#[derive(Clone, Debug)]
pub struct PmuPlan {
    /// `None`: the guest gets no PMU.
    pub model: Option<PmuModel>,
    pub policy: EventPolicy,
    pub rdpmc: Rdpmc,
    /// Lines for the start-up report (why off, what degrades).
    pub notes: Vec<String>,
    /// The vendor of the PMU host perf drives (the model's may differ:
    /// `--cpu-vendor`).
    pub host_vendor: Option<Vendor>,
}

impl fmt::Display for PmuPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.model {
            None => write!(f, "vPMU off"),
            Some(m) => {
                write!(
                    f,
                    "vPMU on: {:?} v{}, {} general-purpose counters ({} bits)",
                    m.vendor(),
                    m.version,
                    m.gp_counters,
                    m.gp_width
                )?;
                if m.fixed_counters() > 0 {
                    write!(
                        f,
                        ", {} fixed ({} bits)",
                        m.fixed_counters(),
                        m.fixed_width()
                    )?;
                }
                write!(f, ", events: {}", self.policy)
            }
        }
    }
}

/// The kernel parameter with which the guest kernel built for these hosts
/// (guest-images/linux/kernel) reads counters with RDMSR instead of RDPMC.
pub const LINUX_READS_COUNTERS_WITH_RDMSR: &str = "perf_read_msr";

/// Whether the guest is known to read counters with RDMSR only: the
/// built-in probe, or a kernel told so by [`LINUX_READS_COUNTERS_WITH_RDMSR`]
/// on its command line.
pub fn reads_counters_with_rdmsr(external_kernel: bool, cmdline: Option<&str>) -> bool {
    !external_kernel
        || cmdline.is_some_and(|c| {
            c.split_ascii_whitespace()
                .any(|word| word == LINUX_READS_COUNTERS_WITH_RDMSR)
        })
}

/// Decides the PMU of a guest that sees a CPU of `guest_vendor`.
/// `rdmsr_guest` is true for guests known to read counters with RDMSR only
/// ([`reads_counters_with_rdmsr`]), which `auto` serves even where RDPMC
/// cannot be.
pub fn plan(
    opts: &VpmuOptions,
    host: &HostPmu,
    guest_vendor: Option<Vendor>,
    rdmsr_guest: bool,
) -> Result<PmuPlan, PlanError> {
    let shaped =
        opts.gp_counters.is_some() || opts.fixed_counters.is_some() || opts.version.is_some();
    let off = |note: String| PmuPlan {
        model: None,
        policy: opts.events.clone(),
        rdpmc: host.rdpmc.clone(),
        notes: vec![note],
        host_vendor: host.vendor,
    };
    if opts.mode == VpmuMode::Off {
        if shaped {
            return Err(PlanError::ShapeWithoutVpmu);
        }
        return Ok(off("vPMU off (--vpmu off): the guest sees no PMU".into()));
    }
    let cannot = |why: String| -> Result<PmuPlan, PlanError> {
        match opts.mode {
            VpmuMode::On => Err(PlanError::Unavailable(why)),
            _ => Ok(off(format!("vPMU off: {why}"))),
        }
    };
    let Some(vendor) = guest_vendor else {
        return cannot("the host CPU is neither AMD nor Intel".into());
    };
    if let Err(why) = &host.msr_exits {
        return cannot(why.clone());
    }
    let host = &host.for_guest_vendor(vendor);

    let mut notes = Vec::new();
    if let Rdpmc::Unavailable(why) = &host.rdpmc {
        match (opts.mode, rdmsr_guest) {
            (VpmuMode::Auto, false) => {
                return Ok(off(format!(
                    "vPMU off: guest RDPMC cannot be served ({why}), so a Linux guest's perf \
                     would fault; a kernel that reads counters with RDMSR says so with \
                     '{LINUX_READS_COUNTERS_WITH_RDMSR}' on its command line (--vpmu on forces it)"
                )))
            }
            (VpmuMode::On, false) => notes.push(format!(
                "warning: --vpmu on, but guest RDPMC raises #GP: {why}; counters read with \
                 RDMSR work"
            )),
            _ => notes.push(format!(
                "guest RDPMC raises #GP: {why}; this guest reads counters with RDMSR"
            )),
        }
    }
    if let Err(why) = &host.hardware_events {
        notes.push(no_hardware_note(why));
    }

    let facts = HostFacts {
        hardware_events: host.hardware_events.is_ok(),
        // The host's PMU leaves describe a model of the guest's vendor only.
        cpuid: (host.vendor == Some(vendor)).then(HostCpuid::detect),
        intel_full_width_writes: false,
    };
    let model = PmuModel::best_for_host(vendor, &facts)
        .shaped(opts.version, opts.gp_counters, opts.fixed_counters)?
        .with_unavailable_events(&opts.events, host.hardware_events.is_ok());
    model.validate()?;
    Ok(PmuPlan {
        model: Some(model),
        policy: opts.events.clone(),
        rdpmc: host.rdpmc.clone(),
        notes,
        host_vendor: host.vendor,
    })
}

/// What the vPMU does without host hardware events.
fn no_hardware_note(why: &str) -> String {
    format!(
        "host perf cannot count the guest's events ({why}): core cycles are backed by task-clock \
         (a user-only or kernel-only count is an estimate from the guest's privilege level sampled \
         every millisecond), other events are unbacked and read as not counting"
    )
}

/// The plan of a restored guest: the model it had (`None`: no PMU), which
/// it keeps whatever this host is, backed as this host can (the same notes
/// as at boot).
pub fn plan_restored(
    model: Option<PmuModel>,
    policy: EventPolicy,
    host: &HostPmu,
) -> Result<PmuPlan, PlanError> {
    let Some(model) = model else {
        return Ok(PmuPlan {
            model: None,
            policy,
            rdpmc: host.rdpmc.clone(),
            notes: vec!["vPMU off, as in the snapshot: the guest sees no PMU".into()],
            host_vendor: host.vendor,
        });
    };
    if let Err(why) = &host.msr_exits {
        return Err(PlanError::Unavailable(format!(
            "the snapshot's guest has a vPMU, but {why}"
        )));
    }
    model.validate()?;
    let host = host.for_guest_vendor(model.vendor());
    let mut notes = Vec::new();
    if let Rdpmc::Unavailable(why) = &host.rdpmc {
        notes.push(format!("guest RDPMC raises #GP: {why}"));
    }
    if let Err(why) = &host.hardware_events {
        notes.push(no_hardware_note(why));
    }
    Ok(PmuPlan {
        model: Some(model),
        policy,
        rdpmc: host.rdpmc.clone(),
        notes,
        host_vendor: host.vendor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(rdpmc: Rdpmc) -> HostPmu {
        HostPmu {
            msr_exits: Ok(()),
            hardware_events: Err("ENOENT".into()),
            rdpmc,
            vendor: Some(Vendor::Amd),
        }
    }

    fn opts(mode: VpmuMode) -> VpmuOptions {
        VpmuOptions {
            mode,
            ..Default::default()
        }
    }

    #[test]
    fn auto_serves_the_probe_but_not_linux_without_rdpmc() {
        let h = host(Rdpmc::Unavailable("off".into()));
        assert!(plan(&opts(VpmuMode::Auto), &h, Some(Vendor::Amd), true)
            .unwrap()
            .model
            .is_some());
        let p = plan(&opts(VpmuMode::Auto), &h, Some(Vendor::Amd), false).unwrap();
        assert!(p.model.is_none());
        assert!(p.notes[0].contains("RDPMC"));
        let p = plan(&opts(VpmuMode::On), &h, Some(Vendor::Amd), false).unwrap();
        assert!(p.model.is_some());
        assert!(p.notes.iter().any(|n| n.starts_with("warning")));
        let h = host(Rdpmc::Mirrored);
        assert!(plan(&opts(VpmuMode::Auto), &h, Some(Vendor::Amd), false)
            .unwrap()
            .model
            .is_some());
    }

    #[test]
    fn the_probe_and_kernels_told_to_read_msrs_are_rdmsr_guests() {
        assert!(reads_counters_with_rdmsr(false, None));
        assert!(reads_counters_with_rdmsr(false, Some("probe.tests=cycles")));
        assert!(!reads_counters_with_rdmsr(true, None));
        assert!(!reads_counters_with_rdmsr(true, Some("console=ttyS0")));
        assert!(reads_counters_with_rdmsr(
            true,
            Some("console=ttyS0 perf_read_msr panic=-1")
        ));
        // Only the parameter itself, not a word that contains it.
        assert!(!reads_counters_with_rdmsr(true, Some("noperf_read_msr")));
        assert!(!reads_counters_with_rdmsr(true, Some("perf_read_msr=0")));
    }

    #[test]
    fn a_foreign_vendor_gets_its_own_model_emulated_and_no_rdpmc() {
        let mut h = host(Rdpmc::Mirrored);
        h.hardware_events = Ok(());
        let p = plan(&opts(VpmuMode::Auto), &h, Some(Vendor::Intel), true).unwrap();
        let model = p.model.as_ref().expect("the probe is served");
        assert_eq!(model.vendor(), Vendor::Intel);
        assert!(model.fixed_counters() > 0, "{model:?}");
        assert_eq!(p.host_vendor, Some(Vendor::Amd));
        assert!(matches!(&p.rdpmc, Rdpmc::Unavailable(why) if why.contains("--cpu-vendor")));
        assert!(p
            .notes
            .iter()
            .any(|n| n.contains("cannot count the guest's events")));
        // Linux would use RDPMC: auto leaves it without a PMU.
        let p = plan(&opts(VpmuMode::Auto), &h, Some(Vendor::Intel), false).unwrap();
        assert!(p.model.is_none());
        // The host's own vendor keeps what the host offers.
        let p = plan(&opts(VpmuMode::Auto), &h, Some(Vendor::Amd), false).unwrap();
        assert_eq!(p.rdpmc, Rdpmc::Mirrored);
        // Vendor rules follow the guest's vendor: fixed counters on Intel only.
        let mut o = opts(VpmuMode::On);
        o.fixed_counters = Some(3);
        o.version = Some(2);
        assert!(plan(&o, &h, Some(Vendor::Intel), true).is_ok());
        assert!(plan(&o, &h, Some(Vendor::Amd), true).is_err());
    }

    #[test]
    fn impossible_shapes_and_missing_caps_are_refused() {
        let h = host(Rdpmc::Mirrored);
        let mut o = opts(VpmuMode::On);
        o.fixed_counters = Some(3);
        let error = plan(&o, &h, Some(Vendor::Amd), true)
            .unwrap_err()
            .to_string();
        assert!(error.contains("AMD has no fixed counters"), "{error}");
        o.fixed_counters = Some(0);
        let model = plan(&o, &h, Some(Vendor::Amd), true)
            .unwrap()
            .model
            .unwrap();
        assert_eq!(model.fixed_counters(), 0, "0 fixed counters is no override");
        let mut o = opts(VpmuMode::Off);
        o.gp_counters = Some(2);
        assert!(plan(&o, &h, Some(Vendor::Amd), true).is_err());
        let mut h = host(Rdpmc::Mirrored);
        h.msr_exits = Err("no filter".into());
        assert!(plan(&opts(VpmuMode::On), &h, Some(Vendor::Amd), true).is_err());
        assert!(plan(&opts(VpmuMode::Auto), &h, Some(Vendor::Amd), true)
            .unwrap()
            .model
            .is_none());
    }
}
