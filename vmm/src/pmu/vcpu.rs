//! One vCPU's vPMU glue, run on that vCPU's thread: MSR exits go to its
//! [`Vpmu`]; host overflows become PMIs delivered through the guest's
//! LVTPC; where KVM's in-kernel PMU answers RDPMC its counters are kept in
//! step with the virtual ones.

use kvm_bindings::{kvm_msi, Msrs};
use kvm_ioctls::{VcpuFd, VmFd};
use vpmu::backend::perf::PerfBackend;
use vpmu::{
    Backend, EventTotals, Fault, GuestClock, GuestMode, OverflowNotify, Vpmu, VpmuContext,
    VpmuSnapshot,
};

use std::time::Instant;

use super::seams::{self, ExitDelay, HostBackend};
use super::{PmuPlan, Rdpmc};
use crate::arch::layout::APIC_DEFAULT_BASE;
use crate::arch::regs::{in_user_mode, lapic_reg};
use crate::pmu::export::{Export, VcpuView};
use crate::pmu::{host_tsc, DeliveredPmi, PmiDelivery};

/// LVT performance counter register in the LAPIC page.
const APIC_LVTPC: usize = 0x340;
const LVT_MASKED: u32 = 1 << 16;
const LVT_DELIVERY_MODE: u32 = 0x700;
const LVT_DELIVERY_FIXED: u32 = 0;
const LVT_DELIVERY_NMI: u32 = 0x400;
const LVT_VECTOR: u32 = 0xff;
/// LVTPC as an x2APIC MSR (0x800 + 0x340 / 16).
const X2APIC_LVTPC_MSR: u32 = 0x834;

/// Where a PMI goes, by the guest's LVTPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmiRoute {
    /// Dropped (the status bit stays set).
    Masked,
    Nmi,
    /// A fixed-mode interrupt with this vector.
    Fixed {
        vector: u8,
    },
    /// A delivery mode a PMI cannot use (SMI, INIT, ExtINT...).
    Unsupported,
}

/// The route a PMI takes with LVTPC = `lvtpc`.
pub fn pmi_route(lvtpc: u32) -> PmiRoute {
    if lvtpc & LVT_MASKED != 0 {
        return PmiRoute::Masked;
    }
    match lvtpc & LVT_DELIVERY_MODE {
        LVT_DELIVERY_NMI => PmiRoute::Nmi,
        LVT_DELIVERY_FIXED => PmiRoute::Fixed {
            vector: (lvtpc & LVT_VECTOR) as u8,
        },
        _ => PmiRoute::Unsupported,
    }
}

/// Why a vCPU's vPMU could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VcpuPmuError {
    /// The plan has no model (the vPMU is off).
    #[error("no vPMU model")]
    NoModel,
    #[error(transparent)]
    Model(#[from] vpmu::ModelError),
}

/// What a snapshot keeps of a vCPU's vPMU: its registers and counters (the
/// context), the totals the host has exported (ended contexts and the live
/// counts), and how its PMIs were delivered. The host events behind it are
/// not kept: a restore opens its own.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PmuState {
    pub context: VpmuContext,
    pub totals: EventTotals,
    pub delivery: PmiDelivery,
    /// The vPMU's operation counts (MSR accesses, host opens, PMIs...).
    #[serde(default)]
    pub stats: vpmu::VpmuStats,
}

/// A vCPU's vPMU and how it reaches KVM.
pub struct VcpuPmu {
    vpmu: Vpmu<HostBackend>,
    apic_id: u8,
    /// Test seam: extra VMM time per PMU MSR exit (normally none).
    exit_delay: ExitDelay,
    mirror_rdpmc: bool,
    /// Intel's LAPIC masks LVTPC when it delivers a PMI; AMD's does not.
    mask_lvtpc_on_pmi: bool,
    pub delivery: PmiDelivery,
    /// Stamp each PMI for the benchmark's latency figures
    /// ([`DeliveredPmi`]'s times).
    pub trace_pmis: bool,
    /// Saved while the VMM holds the vCPU off the CPU (pause).
    switched_out: Option<VpmuContext>,
    /// Counts of this vCPU's ended counter contexts, by programming id:
    /// they outlive reprogramming and vPMU resets.
    retired: EventTotals,
    /// A context ended since the last published view: the next view is due
    /// now, so that a reader never sees a programming the guest already left.
    retired_unpublished: bool,
    /// The guest wrote a vPMU MSR since the last published view.
    written_unpublished: bool,
    /// The last exit was a vPMU MSR access, after which the guest may read
    /// counters with RDPMC: the next entry mirrors them.
    msr_exit: bool,
    /// The counter MSRs for `mirror`, allocated once.
    mirror_msrs: Option<Msrs>,
    /// The last `KVM_RUN` was interrupted by a signal: where the guest was
    /// then is a sample of its privilege level.
    interrupted_exit: bool,
}

impl VcpuPmu {
    /// Builds the vPMU of vCPU `apic_id`. Must run on the vCPU's thread:
    /// host events are opened for the calling thread, and overflow signals
    /// come back to it.
    /// `carried`: counts of a previous boot of this vCPU, kept in its totals.
    pub fn new(
        plan: &PmuPlan,
        apic_id: u8,
        tsc_khz: u32,
        carried: Option<EventTotals>,
        overflow_signal: libc::c_int,
    ) -> Result<Self, VcpuPmuError> {
        let model = plan.model.clone().ok_or(VcpuPmuError::NoModel)?;
        let vendor = model.vendor();
        let mut backend = seams::host_backend(PerfBackend::new(0));
        backend.set_overflow_notify(Some(OverflowNotify {
            tid: PerfBackend::current_tid(),
            signal: overflow_signal,
        }));
        let vpmu = Vpmu::new(
            model,
            plan.policy.clone(),
            backend,
            GuestClock::new(tsc_khz),
        )?
        .with_host_vendor(plan.host_vendor);
        Ok(Self {
            vpmu,
            apic_id,
            exit_delay: ExitDelay::from_env(),
            mirror_rdpmc: plan.rdpmc == Rdpmc::Mirrored,
            mask_lvtpc_on_pmi: vendor.masks_lvtpc_on_pmi(),
            delivery: PmiDelivery::default(),
            trace_pmis: false,
            switched_out: None,
            retired: carried.unwrap_or_default(),
            retired_unpublished: false,
            written_unpublished: false,
            msr_exit: false,
            mirror_msrs: None,
            interrupted_exit: false,
        })
    }

    pub fn rdmsr(&mut self, index: u32) -> Result<u64, Fault> {
        let result = self.vpmu.rdmsr(index);
        self.msr_exit = true;
        self.exit_delay.wait();
        result
    }

    pub fn wrmsr(&mut self, index: u32, value: u64) -> Result<(), Fault> {
        let result = self.vpmu.wrmsr(index, value);
        self.msr_exit = true;
        self.written_unpublished = true;
        self.take_retired();
        self.exit_delay.wait();
        result
    }

    /// Merges the counter contexts that ended into this vCPU's totals.
    fn take_retired(&mut self) {
        if self.vpmu.has_retired() {
            self.retired.absorb(self.vpmu.take_retired());
            self.retired_unpublished = true;
        }
    }

    /// Whether a counter context ended since the last published view.
    pub fn publish_due(&self) -> bool {
        self.retired_unpublished
    }

    /// Whether the guest wrote a vPMU MSR since the last published view
    /// (the view may show a value the guest already replaced).
    pub fn written_since_publish(&self) -> bool {
        self.written_unpublished
    }

    /// Right before `KVM_RUN`: turns host overflows into PMIs, keeps KVM's
    /// RDPMC view in step, and starts the guest-time window of clock-backed
    /// counters. `kicked`: a signal (overflow or kick) arrived. Returns the PMI it sent the
    /// guest, if it sent one (as an NMI or a fixed interrupt; a masked
    /// LVTPC drops it).
    pub fn before_entry(&mut self, kicked: bool, vcpu: &VcpuFd, vm: &VmFd) -> Option<DeliveredPmi> {
        let pmu_msr = std::mem::take(&mut self.msr_exit);
        let interrupted = std::mem::take(&mut self.interrupted_exit);
        if kicked {
            if interrupted && self.vpmu.samples_guest_mode() {
                self.sample_guest_mode(vcpu);
            }
            self.vpmu.handle_host_overflow();
        }
        let pmi = self.vpmu.take_pending_pmi();
        // The guest may read counters with RDPMC after any PMU MSR exit,
        // in its PMI handler, or at any time while counters run.
        if self.mirror_rdpmc && (pmi || pmu_msr || self.vpmu.any_running()) {
            self.mirror(vcpu);
        }
        let delivered = pmi.then(|| self.pmi(vcpu, vm)).flatten();
        if self.vpmu.exit_hooks_needed() {
            self.vpmu.on_guest_entry();
        }
        delivered
    }

    /// PMIs sent to the guest so far.
    pub fn pmis_delivered(&self) -> u64 {
        self.delivery.nmi + self.delivery.fixed
    }

    /// Delivers a pending PMI; stamps it when traced.
    fn pmi(&mut self, vcpu: &VcpuFd, vm: &VmFd) -> Option<DeliveredPmi> {
        let overshoot = if self.trace_pmis { self.overshoot() } else { 0 };
        self.deliver_pmi(vcpu, vm)?;
        Some(DeliveredPmi {
            injected_tsc: if self.trace_pmis { host_tsc() } else { 0 },
            overshoot,
        })
    }

    /// The largest value below a quarter of its range of any counter: for
    /// a sampling counter (armed at minus its period, so its top bits are
    /// set until it wraps) that just overflowed, the events it counted past
    /// the overflow before the VMM noticed. Called between exit and entry,
    /// when reading values costs no host read.
    fn overshoot(&mut self) -> u64 {
        let quarter = 1u64 << (self.vpmu.model().gp_width.saturating_sub(2));
        self.vpmu
            .counter_values()
            .map(|(_, value)| value)
            .filter(|&value| value < quarter)
            .max()
            .unwrap_or(0)
    }

    /// Right after `KVM_RUN` returns; `interrupted`: by a signal.
    pub fn after_exit(&mut self, interrupted: bool) {
        if self.vpmu.exit_hooks_needed() {
            self.vpmu.on_guest_exit();
        }
        self.interrupted_exit = interrupted;
    }

    /// The guest's privilege level where a signal interrupted it, for the
    /// vPMU's user-only and kernel-only counts on the task clock.
    fn sample_guest_mode(&mut self, vcpu: &VcpuFd) {
        if let (Ok(regs), Ok(sregs)) = (vcpu.get_regs(), vcpu.get_sregs()) {
            let mode = match in_user_mode(&sregs, regs.rip) {
                true => GuestMode::User,
                false => GuestMode::Kernel,
            };
            self.vpmu.observe_guest_mode(mode);
        }
    }

    /// Host-initiated `KVM_SET_MSRS` of every counter: bypasses the MSR
    /// filter and programs none of KVM's own events, so guest RDPMC returns
    /// the virtual value.
    fn mirror(&mut self, vcpu: &VcpuFd) {
        if self.mirror_msrs.is_none() {
            let counters = self.vpmu.counter_values().count();
            self.mirror_msrs = Msrs::new(counters).ok();
        }
        let Some(msrs) = &mut self.mirror_msrs else {
            return;
        };
        let values = self.vpmu.counter_values();
        for (entry, (index, data)) in msrs.as_mut_slice().iter_mut().zip(values) {
            *entry = kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            };
        }
        let _ = vcpu.set_msrs(msrs);
    }

    /// Delivers one PMI the way the guest's LVTPC asks. Some when it was
    /// sent as an NMI or a fixed interrupt (whether or not KVM took it).
    fn deliver_pmi(&mut self, vcpu: &VcpuFd, vm: &VmFd) -> Option<()> {
        let Ok(lapic) = vcpu.get_lapic() else {
            self.delivery.failed += 1;
            return None;
        };
        let lvtpc = lapic_reg(&lapic.regs, APIC_LVTPC);
        // An MSI to this vCPU's own APIC: edge, physical.
        let msi = |data| kvm_msi {
            address_lo: APIC_DEFAULT_BASE | (u32::from(self.apic_id) << 12),
            data,
            ..Default::default()
        };
        let delivered = match pmi_route(lvtpc) {
            PmiRoute::Masked => {
                self.delivery.masked += 1;
                return None;
            }
            PmiRoute::Unsupported => {
                self.delivery.unsupported_mode += 1;
                return None;
            }
            PmiRoute::Nmi => {
                self.delivery.nmi += 1;
                // NMI mode: a VM ioctl, a fraction of the cost of KVM_NMI,
                // which loads the vCPU (BENCHMARKS.md, vPMU costs). Where no
                // APIC takes it (APIC disabled, ID changed), KVM_NMI as
                // before.
                match vm.signal_msi(msi(LVT_DELIVERY_NMI)) {
                    Ok(accepted) if accepted > 0 => true,
                    _ => vcpu.nmi().is_ok(),
                }
            }
            PmiRoute::Fixed { vector } => {
                self.delivery.fixed += 1;
                vm.signal_msi(msi(u32::from(vector))).is_ok()
            }
        };
        if !delivered {
            self.delivery.failed += 1;
        } else if self.mask_lvtpc_on_pmi {
            self.mask_lvtpc(vcpu, lvtpc);
        }
        Some(())
    }

    /// Sets LVTPC's mask bit, as Intel's LAPIC does when it delivers a PMI.
    /// Only through the x2APIC register (a host-initiated MSR write of that
    /// one register): rewriting the whole LAPIC page with KVM_SET_LAPIC
    /// could drop an interrupt another vCPU sends meanwhile. In xAPIC mode
    /// the mask is left clear (Linux's handler rewrites LVTPC anyway, and
    /// NMIs stay blocked until the handler returns); counted as skipped.
    fn mask_lvtpc(&mut self, vcpu: &VcpuFd, lvtpc: u32) {
        let entry = kvm_bindings::kvm_msr_entry {
            index: X2APIC_LVTPC_MSR,
            data: u64::from(lvtpc | LVT_MASKED),
            ..Default::default()
        };
        let written = Msrs::from_entries(&[entry])
            .ok()
            .and_then(|msrs| vcpu.set_msrs(&msrs).ok());
        if written != Some(1) {
            self.delivery.mask_skipped += 1;
        }
    }

    /// The VMM takes the vCPU off the CPU (pause): save the context.
    pub fn switch_out(&mut self) {
        self.switched_out = Some(self.vpmu.save());
    }

    /// The vCPU runs again: restore what was saved. An unchanged context
    /// reprograms nothing on the host.
    pub fn switch_in(&mut self) {
        if let Some(context) = self.switched_out.take() {
            // The context came from this vPMU: it always matches its model.
            let _ = self.vpmu.restore(&context);
            self.take_retired();
        }
    }

    /// The vPMU's state for a snapshot: the context saved when the vCPU was
    /// taken off the CPU (else now), the totals as the export has them.
    pub fn save_state(&mut self) -> PmuState {
        let context = match &self.switched_out {
            Some(context) => context.clone(),
            None => self.vpmu.save(),
        };
        PmuState {
            context,
            totals: self.view(true).totals(),
            delivery: self.delivery,
            stats: *self.vpmu.stats(),
        }
    }

    /// Continues from a saved state, on a vPMU built with the same model
    /// and its totals as `carried`: counters resume from their saved values
    /// and programming, on host events opened here as they run.
    pub fn restore_state(&mut self, state: &PmuState) -> Result<(), vpmu::ContextError> {
        self.vpmu.restore(&state.context)?;
        let mut stats = state.stats;
        stats.restores += 1;
        stats.opens += self.vpmu.stats().opens;
        self.vpmu.carry_stats(stats);
        self.delivery = state.delivery;
        // What the restore closed is already in the carried totals.
        let _ = self.vpmu.take_retired();
        Ok(())
    }

    /// Everything the export shows of this vPMU.
    pub fn snapshot(&mut self) -> VpmuSnapshot {
        self.vpmu.snapshot()
    }

    /// Publishes a fresh view for the host.
    pub fn publish(&mut self, export: &Export, paused: bool) {
        self.retired_unpublished = false;
        self.written_unpublished = false;
        let vpmu = self.vpmu.snapshot();
        // Host backing lost or regained: one line per change, never one
        // per attempt (the vPMU retries refused events by itself).
        for notice in self.vpmu.take_notices() {
            eprintln!("vmm: vCPU {}: {notice}", self.apic_id);
        }
        export.publish(self.view_of(vpmu, paused));
    }

    fn view(&mut self, paused: bool) -> VcpuView {
        let vpmu = self.vpmu.snapshot();
        self.view_of(vpmu, paused)
    }

    fn view_of(&self, vpmu: VpmuSnapshot, paused: bool) -> VcpuView {
        VcpuView {
            index: self.apic_id,
            taken: Instant::now(),
            paused,
            vpmu,
            pmi_delivery: self.delivery,
            retired: self.retired.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pmi_takes_the_route_lvtpc_asks_for() {
        // Fixed mode (000), vector 0xfe: Linux's LOCAL_PERF_VECTOR-style.
        assert_eq!(pmi_route(0xfe), PmiRoute::Fixed { vector: 0xfe });
        assert_eq!(pmi_route(0x20), PmiRoute::Fixed { vector: 0x20 });
        // NMI mode (100): the vector is ignored.
        assert_eq!(pmi_route(0x400), PmiRoute::Nmi);
        assert_eq!(pmi_route(0x4fe), PmiRoute::Nmi);
        // The delivery-status and other high bits do not matter.
        assert_eq!(pmi_route(0x400 | 1 << 12), PmiRoute::Nmi);
        // Masked wins over every mode.
        assert_eq!(pmi_route(LVT_MASKED), PmiRoute::Masked);
        assert_eq!(pmi_route(LVT_MASKED | 0x400), PmiRoute::Masked);
        assert_eq!(pmi_route(LVT_MASKED | 0xfe), PmiRoute::Masked);
        // SMI (010), INIT (101), ExtINT (111) and the reserved modes.
        for mode in [0x100, 0x200, 0x300, 0x500, 0x600, 0x700] {
            assert_eq!(pmi_route(mode | 0xfe), PmiRoute::Unsupported, "{mode:#x}");
        }
    }
}
