//! A vCPU's state in KVM, saved and put back (snapshot and restore): the
//! general, segment, FPU/XSAVE, XCR and debug registers, the MSRs KVM
//! lists as worth saving, the local APIC, pending events, MP state and
//! CPUID. The vPMU's registers are not among them: the vPMU keeps them
//! (`pmu::vcpu::PmuState`), and KVM never sees them.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::pmu::vcpu::PmuState;

/// IA32_TSC_DEADLINE: written after the LAPIC (its timer must be in
/// TSC-deadline mode first) and after IA32_TSC.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_IA32_TSC: u32 = 0x10;
/// Most MSRs a saved vCPU may carry (KVM lists a few hundred).
const MAX_MSRS: usize = 4096;

/// One running vCPU as a snapshot keeps it: KVM's state and its vPMU's.
#[derive(Debug, Serialize, Deserialize)]
pub struct SavedVcpu {
    pub kvm: VcpuState,
    pub pmu: Option<PmuState>,
}

/// Everything KVM holds of one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// (index, value), in the order they are put back.
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    /// The vCPU's TSC frequency, where KVM says.
    pub tsc_khz: Option<u32>,
}

/// A KVM call that failed, by name.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct StateError {
    pub what: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError { what, source }
}

impl VcpuState {
    /// Reads the vCPU's state. `msrs`: the MSR indices to save (KVM's list
    /// less those the vPMU owns); any KVM cannot read is left out.
    pub fn capture(fd: &VcpuFd, msrs: &[u32]) -> Result<Self, StateError> {
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?;
        // Events first: reading them does not change them, and KVM wants
        // pending exceptions saved before the registers they affect.
        let events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        Ok(Self {
            cpuid: cpuid.as_slice().to_vec(),
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debugregs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, msrs)?,
            events,
            mp_state,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Puts the state into a fresh vCPU, in the order KVM needs: CPUID
    /// first, the LAPIC before the MSRs that depend on it, events and MP
    /// state last.
    pub fn apply(&self, fd: &VcpuFd) -> Result<(), StateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| StateError {
            what: "KVM_SET_CPUID2 (too many entries)",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        if let Some(khz) = self
            .tsc_khz
            .filter(|&khz| fd.get_tsc_khz().ok() != Some(khz))
        {
            fd.set_tsc_khz(khz).map_err(kvm("KVM_SET_TSC_KHZ"))?;
        }
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        // SAFETY: the buffer is a whole `kvm_xsave` read from KVM.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        let (later, first): (Vec<_>, Vec<_>) = self
            .msrs
            .iter()
            .partition(|(index, _)| *index == MSR_IA32_TSC_DEADLINE);
        write_msrs(fd, &first)?;
        write_msrs(fd, &later)?;
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))
    }

    /// How far the vCPU's TSC now is past its saved value, in cycles, once
    /// [`VcpuState::apply`] has written it: about zero where KVM sets the
    /// guest's TSC; on a host that keeps the guest's TSC at the host's (it
    /// takes the write without effect), the time since the snapshot.
    pub fn tsc_past_saved(&self, fd: &VcpuFd) -> Option<u64> {
        let saved = self.msrs.iter().find(|m| m.0 == MSR_IA32_TSC)?.1;
        let now = read_msrs(fd, &[MSR_IA32_TSC]).ok()?.first()?.1;
        Some(now.saturating_sub(saved))
    }

    /// Checks what a file could make wrong before anything reaches KVM.
    pub fn check(&self) -> Result<(), String> {
        if self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(format!("{} CPUID entries", self.cpuid.len()));
        }
        if self.msrs.len() > MAX_MSRS {
            return Err(format!("{} MSRs", self.msrs.len()));
        }
        Ok(())
    }
}

/// Reads `indices`, leaving out the ones KVM refuses (it stops at the first
/// it cannot read, and says how many it read).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError {
            what: "KVM_GET_MSRS (too many)",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        // Skip the one it could not read.
        rest = rest.get(read + 1..).unwrap_or_default();
    }
    Ok(out)
}

fn write_msrs(fd: &VcpuFd, msrs: &[&(u32, u64)]) -> Result<(), StateError> {
    if msrs.is_empty() {
        return Ok(());
    }
    let entries: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|&&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let all = Msrs::from_entries(&entries).map_err(|_| StateError {
        what: "KVM_SET_MSRS (too many)",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let written = fd.set_msrs(&all).map_err(kvm("KVM_SET_MSRS"))?;
    if written < entries.len() {
        return Err(StateError {
            what: "KVM_SET_MSRS (an MSR was refused)",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    Ok(())
}
