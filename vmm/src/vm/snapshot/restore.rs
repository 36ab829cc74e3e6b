//! `vmm run --restore PATH`: a VM built from a snapshot alone.
//!
//! Everything in the file is checked before anything is built
//! ([`file::open`]); every failure after that is still a start error (exit
//! 2) before the guest runs. Guest memory is the file's memory section,
//! mapped private (copy-on-write): restoring does not read guest memory
//! beyond checking it, and several restores of one file share its pages.

use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::sync::Recover;
use devices::MpWakeupMailbox;
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::file::{self, Opened};
use super::{KernelIdentity, SavedSlot, SnapshotState};
use crate::arch::cpuid;
use crate::pmu::{self, HostPmu};
use crate::profile::KernelImage;
use crate::vcpu::ap_start::ApGate;
use crate::vm::config::CpuVendor;
use crate::vm::{
    configure_vcpu, create_bus, create_mmio, create_vcpus, create_vm, io_err, probe_image,
    register_memory, signals, snapshot, validate, Boot, BootEntry, StartError, VcpuParts, Vm,
    VmConfig,
};

impl Vm {
    /// Builds the VM saved at `path`. `host` gives only the host-side
    /// options (API socket, name, serial, timeout, what a reset does); the
    /// machine is the snapshot's.
    pub fn restore(host: &VmConfig, path: &Path) -> Result<Vm, StartError> {
        let invalid = |reason: String| StartError::Snapshot {
            path: path.display().to_string(),
            reason,
        };
        let opened = file::open(path).map_err(|e| invalid(e.to_string()))?;
        signals::check().map_err(StartError::Signalled)?;
        let saved = opened.state.config.clone();
        let config = VmConfig {
            kernel: match &saved.kernel {
                KernelIdentity::Probe { .. } => None,
                KernelIdentity::File { path, .. } => Some(path.clone()),
            },
            initrd: saved.initrd.clone(),
            cmdline: saved.cmdline.clone(),
            memory_mib: saved.memory_mib,
            vcpus: saved.vcpus,
            cpu_vendor: match saved.cpu_vendor {
                Some(vpmu::Vendor::Amd) => CpuVendor::Amd,
                Some(vpmu::Vendor::Intel) => CpuVendor::Intel,
                None => CpuVendor::Host,
            },
            ..host.clone()
        };
        let kvm = Kvm::new().map_err(StartError::KvmOpen)?;
        validate(&config, &kvm).map_err(|e| invalid(format!("this host cannot run it: {e}")))?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(StartError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let host_vendor = cpuid::vendor(supported.as_slice());
        if saved.cpu_vendor.is_some() && host_vendor.is_none() {
            return Err(invalid(
                "its guest sees an AMD or Intel CPU; this host's is neither".into(),
            ));
        }
        let host_pmu = HostPmu::detect(&kvm, host_vendor);
        let plan = pmu::plan_restored(saved.pmu_model.clone(), saved.pmu_policy.clone(), &host_pmu)
            .map_err(|e| invalid(e.to_string()))?;
        // The guest keeps the CPUID it had: its boot vCPU's (secondary vCPUs
        // get their topology from it as at boot).
        let Some(SavedSlot::Running(boot_vcpu)) = opened.state.vcpus.first() else {
            return Err(invalid("its boot vCPU is not running".into()));
        };
        let vcpu_cpuid =
            CpuId::from_entries(&boot_vcpu.kvm.cpuid).map_err(|_| StartError::CpuidTooLarge)?;
        let mut vm = Vm::assemble(&config, kvm, Arc::new(plan), vcpu_cpuid, saved)?;
        vm.serial
            .lock()
            .recover()
            .restore(&opened.state.serial)
            .map_err(|e| invalid(e.to_string()))?;
        vm.boot = Some(vm.restore_boot(&opened).map_err(|e| match e {
            StartError::Signalled(_) | StartError::Snapshot { .. } => e,
            other => invalid(other.to_string()),
        })?);
        signals::check().map_err(StartError::Signalled)?;
        Ok(vm)
    }

    /// The boot the snapshot saved: VM, memory, devices and vCPUs in their
    /// saved state.
    fn restore_boot(&self, opened: &Opened) -> Result<Boot, StartError> {
        let state = &opened.state;
        let vm_fd = Arc::new(create_vm(&self.kvm, &self.pmu, None)?);
        let memory = map_memory(opened)?;
        register_memory(&vm_fd, &memory)?;
        let num_vcpus = self.config.vcpus as u8;
        let vcpu_fds = create_vcpus(&vm_fd, num_vcpus)?;
        state
            .vm
            .apply(&vm_fd)
            .map_err(|e| StartError::Config(format!("cannot restore the VM's state: {e}")))?;
        self.profiles.booted(kernel_image(&state.config.kernel));

        let bus = create_bus(
            &vm_fd,
            &self.serial,
            &self.serial_irq,
            &self.control,
            state.config.multiboot,
        )?;
        let parked: Vec<bool> = state
            .vcpus
            .iter()
            .map(|slot| matches!(slot, SavedSlot::Parked { .. }))
            .collect();
        let gate = ApGate::restored(&parked);
        let mailbox = restore_mailbox(state, &gate)?;
        let mmio = create_mmio(mailbox.as_ref())?;

        let mut vcpus = Vec::with_capacity(vcpu_fds.len());
        for ((index, fd), slot) in (0..num_vcpus).zip(vcpu_fds).zip(&state.vcpus) {
            let (carried, restored, tsc_khz, gate) = match slot {
                SavedSlot::Running(saved) => {
                    saved.kvm.apply(&fd).map_err(|e| {
                        StartError::Config(format!("cannot restore vCPU {index}: {e}"))
                    })?;
                    let pmu = saved.pmu.clone();
                    let tsc_khz = saved.kvm.tsc_khz.or(fd.get_tsc_khz().ok());
                    report_tsc(index, saved.kvm.tsc_past_saved(&fd), tsc_khz);
                    (pmu.as_ref().map(|p| p.totals.clone()), pmu, tsc_khz, None)
                }
                SavedSlot::Parked { totals } => {
                    configure_vcpu(
                        &fd,
                        index,
                        num_vcpus,
                        &self.vcpu_cpuid,
                        BootEntry::LongMode(0),
                    )?;
                    let tsc_khz = fd.get_tsc_khz().ok();
                    (totals.clone(), None, tsc_khz, Some(gate.clone()))
                }
            };
            let parts = VcpuParts {
                vm_fd: &vm_fd,
                bus: &bus,
                mmio: &mmio,
                memory: &memory,
                tsc_khz: tsc_khz.unwrap_or(0),
            };
            vcpus.push(self.vcpu(index, fd, parts, carried, restored, gate));
        }
        Ok(Boot {
            vcpus,
            gate: gate.clone(),
            kernel_kind: None,
            parts: snapshot::BootParts {
                vm_fd,
                memory,
                gate,
                mailbox,
                multiboot: state.config.multiboot,
            },
        })
    }
}

/// Says so when the guest's TSC does not continue from its saved value:
/// some hosts (the PVM hosts of ENVIRONMENT.md) take a host-initiated
/// IA32_TSC write without effect and keep the guest's TSC at the host's, so
/// the guest sees the time it spent saved. Silent where the TSC was set.
fn report_tsc(index: u8, past: Option<u64>, tsc_khz: Option<u32>) {
    let (Some(past), Some(khz)) = (past, tsc_khz.filter(|&k| k > 0)) else {
        return;
    };
    let ms = past / u64::from(khz);
    if ms >= TSC_SLACK_MS {
        eprintln!(
            "vmm: vCPU {index}: this host does not let the VMM set the guest's TSC: it \
             continues {past} cycles ({ms} ms) past its saved value, the time the guest \
             spent saved"
        );
    }
}

/// More than this between the saved TSC and the restored one is a TSC the
/// host did not set (a restore takes a few ms).
const TSC_SLACK_MS: u64 = 100;

/// Guest memory mapped from the snapshot, private: the guest's writes stay
/// in this process, the file is never written.
fn map_memory(opened: &Opened) -> Result<GuestMemoryMmap, StartError> {
    let mut regions = Vec::new();
    for region in &opened.state.memory {
        let file = opened
            .file
            .try_clone()
            .map_err(io_err("duplicating the snapshot's descriptor"))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(file, opened.memory_offset + region.offset)),
            region.len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| StartError::Memory {
            mib: region.len >> 20,
            reason: format!("mapping the snapshot: {e}"),
        })?;
        regions.push(
            GuestRegionMmap::new(mapping, GuestAddress(region.guest_addr)).ok_or_else(|| {
                StartError::Memory {
                    mib: region.len >> 20,
                    reason: "a region beyond the guest address space".into(),
                }
            })?,
        );
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| StartError::Memory {
        mib: opened.state.config.memory_mib,
        reason: e.to_string(),
    })
}

/// The saved mailbox, its parked vCPUs the gate's.
fn restore_mailbox(
    state: &SnapshotState,
    gate: &Arc<ApGate>,
) -> Result<Option<Arc<Mutex<MpWakeupMailbox>>>, StartError> {
    let Some(saved) = &state.mailbox else {
        return Ok(None);
    };
    let parked: Vec<u32> = (0..state.vcpus.len() as u32)
        .filter(|&i| gate.is_parked(i as usize))
        .collect();
    let mailbox = MpWakeupMailbox::restored(saved, &parked, gate.starter()).ok_or_else(|| {
        StartError::Config("its MP wakeup mailbox does not match its vCPUs".into())
    })?;
    Ok(Some(Arc::new(Mutex::new(mailbox))))
}

/// What the profiler names frames from: the probe, or the kernel file if it
/// is still the one that booted (else a warning: symbols may not match).
fn kernel_image(kernel: &KernelIdentity) -> KernelImage {
    match kernel {
        KernelIdentity::Probe { crc32 } => {
            if *crc32 != crc32fast::hash(probe_image::PROBE_ELF) {
                eprintln!(
                    "vmm: the snapshot's probe guest is another build's: profiles may name \
                     its frames wrongly"
                );
            }
            KernelImage::Probe(probe_image::PROBE_ELF)
        }
        KernelIdentity::File { path, .. } => {
            if KernelIdentity::of(Some(path)) != *kernel {
                eprintln!(
                    "vmm: {} changed since the snapshot's guest booted it: profiles may name \
                     its frames wrongly",
                    path.display()
                );
            }
            match crate::files::open_regular(path) {
                Ok(file) => KernelImage::booted(path.clone(), file),
                Err(_) => KernelImage::Probe(&[]),
            }
        }
    }
}
