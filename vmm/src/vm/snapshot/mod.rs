//! Snapshots of a running VM, with its vPMU, and restores from them.
//!
//! Taking one (`PUT /vm/snapshot`, [`Snapshotter::take`]): the VM is paused
//! (every running vCPU held off the CPU, its vPMU context switched out), each
//! held vCPU saves its own KVM state and vPMU state on its own thread
//! (`VmControl::capture`), then the VM's state (in-kernel irqchip, PIT,
//! KVM clock), the devices (UART with its buffered bytes, the MP wakeup
//! mailbox) and guest memory are written ([`mod@file`]), and the VM resumes
//! (or stays paused). Parked secondary vCPUs are saved as parked.
//!
//! What is saved is the guest's machine and nothing of the host: the
//! configuration that makes it the same machine (memory, vCPUs, CPU vendor,
//! the vPMU model and event policy, command line, which kernel), not the
//! host's perf events. A restore ([`restore`]) builds the VM from the file
//! alone, maps guest memory from it copy-on-write, puts every vCPU back, and
//! gives each vPMU its saved context: counters continue from their saved
//! values and programming on host events opened afresh on this host, backed
//! as this host can (planned and reported as at boot), with the exported
//! totals carried on.
//!
//! The guest sees nothing of the time it spent saved: the KVM clock and the
//! TSC continue from their saved values (its wall clock falls behind by as
//! much; NTP or `hwclock` in the guest puts it right).

pub mod file;
pub mod restore;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::mp_wakeup::MailboxSnapshot;
use devices::serial::SerialSnapshot;
use devices::sync::Recover;
use devices::{MpWakeupMailbox, SerialDevice};
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vpmu::{EventPolicy, EventTotals, PmuModel, Vendor};

use crate::api::documents::{SnapshotDoc, SnapshotRequest};
use crate::api::{SnapshotFailure, Snapshots};
use crate::arch::layout;
use crate::pmu::export::Export;
use crate::vcpu::ap_start::ApGate;
use crate::vcpu::control::VmControl;
use crate::vcpu::state::SavedVcpu;

/// How long a snapshot waits for the vCPUs to stop, and to save.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file is not a snapshot this VMM can restore.
    #[error("{0}")]
    Invalid(String),
    #[error("{} exists (replace it with --force, or \"overwrite\": true)", .0.display())]
    Exists(PathBuf),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Everything a restore needs besides guest memory (the file's JSON part).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    pub config: SavedConfig,
    /// By vCPU index.
    pub vcpus: Vec<SavedSlot>,
    pub vm: VmState,
    pub serial: SerialSnapshot,
    /// The MP wakeup mailbox (SMP guests only).
    pub mailbox: Option<MailboxSnapshot>,
    /// Where each guest memory region lies in the memory section.
    pub memory: Vec<MemoryRegion>,
    /// The memory section's pages that hold data (the rest are zero).
    pub data_runs: Vec<file::DataRun>,
}

/// What makes the restored VM the same machine.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedConfig {
    pub memory_mib: u64,
    pub vcpus: u32,
    /// The vendor the guest sees in CPUID.
    pub cpu_vendor: Option<Vendor>,
    /// The guest's vPMU (`None`: it has none) and which events it may count.
    pub pmu_model: Option<PmuModel>,
    pub pmu_policy: EventPolicy,
    /// `--cmdline` (the guest's command line is made from it as at boot).
    pub cmdline: Option<String>,
    pub kernel: KernelIdentity,
    /// `--initrd`, for a reboot of the restored guest.
    pub initrd: Option<PathBuf>,
    /// A Multiboot kernel: the debug-exit port is there.
    #[serde(default)]
    pub multiboot: bool,
}

/// Which kernel runs in the guest (for the profiler's symbols after a
/// restore).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KernelIdentity {
    /// The built-in probe guest, with its ELF's checksum.
    Probe { crc32: u32 },
    /// `--kernel`: its path, size and modification time when it booted.
    File {
        path: PathBuf,
        len: u64,
        mtime_ns: i128,
    },
}

impl KernelIdentity {
    /// The kernel `--kernel` names now (`None`: the probe).
    pub fn of(kernel: Option<&std::path::Path>) -> Self {
        match kernel {
            None => KernelIdentity::Probe {
                crc32: crc32fast::hash(crate::vm::probe_image::PROBE_ELF),
            },
            Some(path) => {
                let meta = std::fs::metadata(path).ok();
                KernelIdentity::File {
                    path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
                    len: meta.as_ref().map_or(0, |m| m.len()),
                    mtime_ns: meta.as_ref().map_or(0, mtime_ns),
                }
            }
        }
    }
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

/// One vCPU in a snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub enum SavedSlot {
    /// A secondary vCPU the guest never started: it parks again; its vPMU
    /// totals from earlier boots, if any, carry on.
    Parked {
        totals: Option<EventTotals>,
    },
    Running(Box<SavedVcpu>),
}

/// The VM's own state in KVM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// A guest memory region: its guest address, and where it lies in the
/// file's memory section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    pub guest_addr: u64,
    pub offset: u64,
    pub len: u64,
}

const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl VmState {
    fn capture(vm: &VmFd) -> Result<Self, String> {
        let mut irqchips = Vec::new();
        for chip_id in IRQCHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(|e| format!("KVM_GET_IRQCHIP: {e}"))?;
            irqchips.push(chip);
        }
        Ok(Self {
            irqchips,
            pit: vm.get_pit2().map_err(|e| format!("KVM_GET_PIT2: {e}"))?,
            clock: vm.get_clock().map_err(|e| format!("KVM_GET_CLOCK: {e}"))?,
        })
    }

    /// Puts the state into a fresh VM; the clock continues from its saved
    /// value.
    fn apply(&self, vm: &VmFd) -> Result<(), String> {
        for chip in &self.irqchips {
            vm.set_irqchip(chip)
                .map_err(|e| format!("KVM_SET_IRQCHIP: {e}"))?;
        }
        vm.set_pit2(&self.pit)
            .map_err(|e| format!("KVM_SET_PIT2: {e}"))?;
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(|e| format!("KVM_SET_CLOCK: {e}"))
    }
}

impl SnapshotState {
    /// Checks what a file could make inconsistent, before anything is
    /// built from it: `memory_len` is the file's memory section.
    pub fn check(&self, memory_len: u64) -> Result<(), SnapshotError> {
        let bad = |why: String| Err(SnapshotError::Invalid(why));
        let c = &self.config;
        if c.vcpus == 0 || c.vcpus > u32::from(crate::arch::mptable::MAX_CPUS) {
            return bad(format!("it has {} vCPUs", c.vcpus));
        }
        if self.vcpus.len() != c.vcpus as usize {
            return bad(format!(
                "it saves {} vCPUs of {}",
                self.vcpus.len(),
                c.vcpus
            ));
        }
        if !matches!(self.vcpus.first(), Some(SavedSlot::Running(_))) {
            return bad("its boot vCPU is not running".into());
        }
        for (i, slot) in self.vcpus.iter().enumerate() {
            if let SavedSlot::Running(saved) = slot {
                saved
                    .kvm
                    .check()
                    .map_err(|e| SnapshotError::Invalid(format!("vCPU {i}: {e}")))?;
                if saved.pmu.is_some() != c.pmu_model.is_some() {
                    return bad(format!("vCPU {i}'s vPMU does not match the VM's"));
                }
            }
        }
        if self.mailbox.is_some() != (c.vcpus > 1) {
            return bad("its MP wakeup mailbox does not match its vCPUs".into());
        }
        let chips: Vec<u32> = self.vm.irqchips.iter().map(|c| c.chip_id).collect();
        if chips != IRQCHIPS {
            return bad("its interrupt controllers are not PIC, PIC, IOAPIC".into());
        }
        let mut offset = 0;
        let ranges = layout::ram_ranges(c.memory_mib.checked_mul(1 << 20).unwrap_or(0));
        if self.memory.len() != ranges.len() {
            return bad("its memory regions do not match its memory size".into());
        }
        for (region, (start, len)) in self.memory.iter().zip(ranges) {
            if *region
                != (MemoryRegion {
                    guest_addr: start,
                    offset,
                    len,
                })
            {
                return bad("its memory regions do not match its memory size".into());
            }
            offset += len.div_ceil(4096) * 4096;
        }
        if offset != memory_len {
            return bad("its memory section does not match its memory size".into());
        }
        let mut end = 0;
        for &(at, len) in &self.data_runs {
            if at < end
                || at % 4096 != 0
                || len == 0
                || at.checked_add(len).is_none_or(|e| e > memory_len)
            {
                return bad("its memory map is inconsistent".into());
            }
            end = at + len;
        }
        Ok(())
    }
}

/// What one boot gives the snapshotter (replaced at each reboot).
pub struct BootParts {
    pub vm_fd: Arc<VmFd>,
    pub memory: GuestMemoryMmap,
    pub gate: Arc<ApGate>,
    pub mailbox: Option<Arc<Mutex<MpWakeupMailbox>>>,
    /// The boot's kernel is a Multiboot one.
    pub multiboot: bool,
}

/// Takes snapshots of one VM, across its boots (the API's [`Snapshots`]).
pub struct Snapshotter {
    pub config: SavedConfig,
    control: Arc<VmControl>,
    export: Arc<Export>,
    serial: Arc<Mutex<SerialDevice>>,
    /// The MSRs each vCPU saves: KVM's list less those the vPMU owns.
    msrs: Vec<u32>,
    boot: Mutex<Option<BootParts>>,
    /// One snapshot at a time.
    busy: Mutex<()>,
}

impl Snapshotter {
    pub fn new(
        config: SavedConfig,
        control: Arc<VmControl>,
        export: Arc<Export>,
        serial: Arc<Mutex<SerialDevice>>,
        msrs: Vec<u32>,
    ) -> Self {
        Self {
            config,
            control,
            export,
            serial,
            msrs,
            boot: Mutex::new(None),
            busy: Mutex::new(()),
        }
    }

    /// The boot now running (none between boots).
    pub fn set_boot(&self, parts: Option<BootParts>) {
        *self.boot.lock().recover() = parts;
    }

    /// Pauses, saves and writes; resumes unless asked not to (or the VM was
    /// paused already).
    fn take_paused(&self, request: &SnapshotRequest) -> Result<Written, SnapshotFailure> {
        let host = |e: String| SnapshotFailure::Host(e);
        let boot = self.boot.lock().recover();
        let Some(boot) = boot.as_ref() else {
            return Err(SnapshotFailure::Conflict(
                "the VM is between boots; try again".into(),
            ));
        };
        let running: Vec<usize> = (0..self.config.vcpus as usize)
            .filter(|&i| !boot.gate.is_parked(i))
            .collect();
        let saved = self
            .control
            .capture(&running, self.msrs.clone(), STOP_WAIT)
            .map_err(host)?;
        let vm = VmState::capture(&boot.vm_fd).map_err(host)?;
        let mut vcpus: Vec<SavedSlot> = (0..self.config.vcpus)
            .map(|i| SavedSlot::Parked {
                totals: self.export.latest(i as u8).map(|v| v.totals()),
            })
            .collect();
        let running_count = saved.len();
        for (index, state) in saved {
            vcpus[index] = SavedSlot::Running(Box::new(state));
        }
        let mut state = SnapshotState {
            config: SavedConfig {
                multiboot: boot.multiboot,
                ..self.config.clone()
            },
            vcpus,
            vm,
            serial: self.serial.lock().recover().save(),
            mailbox: boot.mailbox.as_ref().map(|m| m.lock().recover().save()),
            memory: Vec::new(),
            data_runs: Vec::new(),
        };
        let parts: file::MemoryParts<'_> = boot
            .memory
            .iter()
            .map(|region| {
                // SAFETY: the region is a live mapping of `len` bytes owned by
                // the boot's memory, which `boot` keeps; every vCPU is held,
                // so nothing writes it while it is read.
                let bytes = unsafe {
                    std::slice::from_raw_parts(region.as_ptr() as *const u8, region.len() as usize)
                };
                (region.start_addr().0, bytes)
            })
            .collect();
        let bytes = file::write(&request.path, &mut state, &parts, request.overwrite).map_err(
            |e| match e {
                SnapshotError::Exists(_) | SnapshotError::Invalid(_) => {
                    SnapshotFailure::Request(e.to_string())
                }
                SnapshotError::Io { .. } => SnapshotFailure::Host(e.to_string()),
            },
        )?;
        Ok(Written {
            bytes,
            data: state.data_runs.iter().map(|r| r.1).sum(),
            running: running_count,
            parked: self.config.vcpus as usize - running_count,
        })
    }
}

/// What a snapshot wrote: the file's size, guest memory's data in it, and
/// the vCPUs saved running and parked.
struct Written {
    bytes: u64,
    data: u64,
    running: usize,
    parked: usize,
}

impl Snapshots for Snapshotter {
    fn take(&self, request: &SnapshotRequest) -> Result<SnapshotDoc, SnapshotFailure> {
        if !request.path.is_absolute() {
            return Err(SnapshotFailure::Request(format!(
                "{}: the path must be absolute",
                request.path.display()
            )));
        }
        let Ok(_one) = self.busy.try_lock() else {
            return Err(SnapshotFailure::Conflict(
                "another snapshot is being taken".into(),
            ));
        };
        if self.control.ending() {
            return Err(SnapshotFailure::Conflict("the VM is stopping".into()));
        }
        let was_paused = self.control.pause_requested();
        let start = Instant::now();
        let result = if self.control.pause(STOP_WAIT) {
            self.take_paused(request)
        } else {
            Err(SnapshotFailure::Host(
                "the vCPUs did not stop in time".into(),
            ))
        };
        let resumed = !was_paused && (request.resume || result.is_err());
        if resumed {
            self.control.resume();
        }
        let written = result?;
        Ok(SnapshotDoc {
            path: request.path.clone(),
            bytes: written.bytes,
            memory_data_bytes: written.data,
            vcpus_running: written.running,
            vcpus_parked: written.parked,
            paused_ms: start.elapsed().as_secs_f64() * 1e3,
            resumed,
        })
    }
}
