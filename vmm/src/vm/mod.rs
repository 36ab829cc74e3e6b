//! Building a VM from a [`VmConfig`] and running it until the guest stops.
//!
//! Build order, top to bottom: KVM and its capabilities, the vPMU plan, the
//! API socket, the serial console; then a boot: the VM with its in-kernel
//! irqchip and PIT, guest memory, the kernel and its boot data, devices,
//! vCPUs. Nothing runs until [`Vm::run`], which replaces the boot on a guest
//! reset when asked to (`--on-reset reboot`).
//!
//! Owns: the VM's configuration ([`VmConfig`]), start errors
//! ([`StartError`]), the kernel loader, the embedded probe image, the main
//! event loop, the termination signals and the host terminal while it is
//! the console. Puts the other parts together
//! (vCPUs, vPMU plan, API, profiler, devices); nothing below imports it.

pub mod config;
mod error;
pub mod event_loop;
pub mod loader;
mod multiboot;
pub mod probe_image;
mod reboot_log;
pub mod signals;
pub mod snapshot;
mod terminal;

pub use config::VmConfig;
pub use error::StartError;

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::sync::Recover;
use devices::{Console, MmioBus, MpWakeupMailbox, PioBus, SerialDevice, I8042};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{self, Api};
use crate::arch::{acpi, boot_params, cpuid, layout, mptable, regs};
use crate::pmu::export::Export;
use crate::pmu::{self, HostPmu, PmuPlan, Rdpmc};
use crate::profile::vcpu::VcpuProfiler;
use crate::profile::{Hub, KernelImage};
use crate::vcpu::ap_start::ApGate;
use crate::vcpu::control::VmControl;
use crate::vcpu::Outcome;
use crate::vcpu::VcpuReport;
use crate::vcpu::{PmuSetup, Vcpu};
use config::{OnReset, SerialSink, DEFAULT_LINUX_CMDLINE, MIN_MEMORY_MIB};
use event_loop::MainLoop;
use loader::{ImageKind, KernelSource, LoadedKernel};
use reboot_log::RebootLog;

const COM1_BASE: u16 = 0x3f8;
const COM1_IRQ: u32 = 4;
const I8042_BASE: u16 = 0x60;
/// When the VM ends, the console writer gets this long without progress...
const CONSOLE_STALL: Duration = Duration::from_secs(1);
/// ...and this long in all to write what the guest left buffered.
const CONSOLE_DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// The debug-exit port (Multiboot guests): the guest's status ends the run.
struct ExitToControl(Arc<VmControl>);

impl devices::ExitLine for ExitToControl {
    fn exit(&self, value: u32) {
        self.0.finish(Outcome::GuestExit { value });
    }
}

/// The i8042's reset line: the guest's reset ends the run.
struct ResetToControl(Arc<VmControl>);

impl devices::ResetLine for ResetToControl {
    fn pulse(&self) {
        self.0.finish(Outcome::Reset);
    }
}

/// One boot of the guest: a KVM VM, its memory and vCPUs. A guest reboot
/// (with `--on-reset reboot`) replaces it with a fresh one.
struct Boot {
    vcpus: Vec<Vcpu>,
    /// Where the secondary vCPUs wait for their wakeup.
    gate: Arc<ApGate>,
    /// `None` for a restored boot (nothing was loaded).
    kernel_kind: Option<ImageKind>,
    /// What a snapshot reads of the boot (and what keeps its memory and VM
    /// alive while the vCPUs run).
    parts: snapshot::BootParts,
}

/// A built VM, ready to run. What outlives a guest reboot lives here: the
/// serial console, the API and its export (with the per-VM totals), the
/// vPMU plan.
pub struct Vm {
    config: VmConfig,
    kvm: Kvm,
    control: Arc<VmControl>,
    /// The boot to run next.
    boot: Option<Boot>,
    serial: Arc<Mutex<SerialDevice>>,
    /// The UART's interrupt eventfd, registered as an irqfd with each boot.
    serial_irq: EventFd,
    /// The thread writing the guest's console output (none for `--serial
    /// none`).
    console: Option<Console>,
    vcpu_cpuid: CpuId,
    /// The guest's PMU, as decided at build time.
    pub pmu: Arc<PmuPlan>,
    export: Arc<Export>,
    /// The profiles the API runs (`GET /profile`), across reboots.
    profiles: Arc<Hub>,
    api_socket: Option<api::socket::BoundSocket>,
    /// Takes the API's snapshots.
    snapshots: Arc<snapshot::Snapshotter>,
}

/// Checks that the flags describe a VM this host can build, before anything
/// is allocated.
fn validate(config: &VmConfig, kvm: &Kvm) -> Result<(), StartError> {
    if config.memory_mib < MIN_MEMORY_MIB {
        return Err(StartError::Config(format!(
            "--memory {} MiB is too small: at least {MIN_MEMORY_MIB} MiB",
            config.memory_mib
        )));
    }
    let host_mib = host_memory_mib();
    if let Some(host) = host_mib.filter(|host| config.memory_mib > *host) {
        return Err(StartError::Config(format!(
            "--memory {} MiB is more than this host's {host} MiB",
            config.memory_mib
        )));
    }
    let max_vcpus = kvm.get_max_vcpus().min(usize::from(mptable::MAX_CPUS));
    if config.vcpus == 0 || config.vcpus as usize > max_vcpus {
        return Err(StartError::Config(format!(
            "--vcpus {} is out of range: 1 to {max_vcpus} on this host",
            config.vcpus
        )));
    }
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(StartError::KvmCapability(name));
        }
    }
    Ok(())
}

/// Total host memory in MiB, from /proc/meminfo.
fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

fn create_memory(vm_fd: &VmFd, mib: u64) -> Result<GuestMemoryMmap, StartError> {
    let size = mib << 20;
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let memory = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| StartError::Memory {
        mib,
        reason: e.to_string(),
    })?;
    register_memory(vm_fd, &memory)?;
    Ok(memory)
}

/// Gives KVM the guest's memory, one slot per region.
fn register_memory(vm_fd: &VmFd, memory: &GuestMemoryMmap) -> Result<(), StartError> {
    for (slot, region) in memory.iter().enumerate() {
        let mem_region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `memory`, which the
        // Vm keeps for as long as the VM fd exists.
        unsafe { vm_fd.set_user_memory_region(mem_region) }
            .map_err(StartError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// The descriptor the console writer writes the guest's output to: our own
/// copy of stdout (the writer never takes std's stdout lock, so nothing
/// else waits on a stalled stdout), or the serial file.
fn serial_sink(sink: &SerialSink) -> Result<Option<File>, StartError> {
    match sink {
        SerialSink::None => Ok(None),
        SerialSink::Stdio => match std::io::stdout().as_fd().try_clone_to_owned() {
            Ok(fd) => Ok(Some(File::from(fd))),
            // No stdout at all (closed): the output goes nowhere.
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(None),
            Err(e) => Err(io_err("duplicating stdout")(e)),
        },
        SerialSink::File(path) => open_serial_file(path).map(Some),
    }
}

/// Opens (creates, truncates) the serial file: a regular file or a
/// character device (`/dev/null`, a terminal). A FIFO, socket, directory
/// or block device is refused; the open never waits (O_NONBLOCK), and the
/// kind is checked on the opened file too.
fn open_serial_file(path: &Path) -> Result<File, StartError> {
    let refuse = |kind: &std::fs::FileType| {
        StartError::Config(format!(
            "--serial file:{} is {}; it must be a regular file or a character device",
            path.display(),
            crate::files::file_kind(kind)
        ))
    };
    let acceptable = |kind: &std::fs::FileType| kind.is_file() || kind.is_char_device();
    if let Ok(meta) = std::fs::metadata(path) {
        if !acceptable(&meta.file_type()) {
            return Err(refuse(&meta.file_type()));
        }
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o666)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| StartError::Io {
            what: format!("cannot create serial output file {}", path.display()),
            source,
        })?;
    let meta = file
        .metadata()
        .map_err(io_err("reading the serial file's metadata"))?;
    if !acceptable(&meta.file_type()) {
        return Err(refuse(&meta.file_type()));
    }
    // Writes may block now: they happen on the console thread.
    // SAFETY: F_SETFL on a descriptor this File owns; no memory is passed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) } < 0 {
        return Err(io_err("setting the serial file's flags")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file)
}

/// The command line the guest gets.
fn guest_cmdline(config: &VmConfig, tsc_khz: Option<u32>, pmu: &PmuPlan) -> String {
    match (&config.kernel, &config.cmdline) {
        (Some(_), Some(cmdline)) => cmdline.clone(),
        (Some(_), None) => DEFAULT_LINUX_CMDLINE.to_string(),
        // The probe cannot calibrate its TSC reliably on a nested host: tell it.
        (None, cmdline) => {
            let mut line = cmdline.clone().unwrap_or_default();
            let mut add = |arg: String| {
                if !line.is_empty() {
                    line.push(' ');
                }
                line.push_str(&arg);
            };
            if let Some(khz) = tsc_khz {
                add(format!("tsc_khz={khz}"));
            }
            // Its RDPMC test only runs where RDPMC can work.
            if pmu.model.is_some() && pmu.rdpmc == Rdpmc::Mirrored {
                add("probe.rdpmc=1".into());
            }
            line
        }
    }
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> StartError {
    let what = what.to_string();
    move |source| StartError::Io { what, source }
}

/// The VM with its in-kernel irqchip and PIT, and the vPMU's MSR filter.
fn create_vm(kvm: &Kvm, plan: &PmuPlan, bench_msr: Option<u32>) -> Result<VmFd, StartError> {
    let vm_fd = kvm.create_vm().map_err(StartError::kvm("KVM_CREATE_VM"))?;
    let mut ranges = plan
        .model
        .as_ref()
        .map(|model| model.msr_ranges())
        .unwrap_or_default();
    ranges.extend(bench_msr.map(|base| vpmu::MsrRange { base, count: 1 }));
    if !ranges.is_empty() {
        pmu::filter::install(&vm_fd, &ranges)?;
    }
    if plan.model.is_some() {
        no_halt_polling(&vm_fd);
    }
    vm_fd
        .set_tss_address(layout::KVM_TSS_ADDRESS)
        .map_err(StartError::kvm("KVM_SET_TSS_ADDR"))?;
    vm_fd
        .create_irq_chip()
        .map_err(StartError::kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd
        .create_pit2(pit)
        .map_err(StartError::kvm("KVM_CREATE_PIT2"))?;
    Ok(vm_fd)
}

/// Turns KVM's halt polling off for the VM (`KVM_CAP_HALT_POLL` = 0 ns):
/// a halted vCPU otherwise spins in the kernel for up to `halt_poll_ns`
/// (200 us here) after each HLT, on its thread's task clock, and a vPMU
/// backed by that clock would count idle time as cycles (an idle vCPU of an
/// SMP Linux guest counted about a fifth of its idle time). Where the kernel
/// lacks the capability the VM runs as before.
fn no_halt_polling(vm_fd: &VmFd) {
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_HALT_POLL,
        ..Default::default()
    };
    if let Err(e) = vm_fd.enable_cap(&cap) {
        eprintln!(
            "vmm: cannot turn KVM halt polling off ({e}): idle vCPU time may count as cycles"
        );
    }
}

/// Loads the kernel and initrd and writes everything the boot protocol
/// hands the kernel: command line, zero page, MP and ACPI tables, the
/// long-mode GDT and page tables.
fn load_guest(
    config: &VmConfig,
    memory: &GuestMemoryMmap,
    num_vcpus: u8,
    cmdline: &str,
) -> Result<LoadedKernel, StartError> {
    let mem_size = config.memory_mib << 20;
    let source = match &config.kernel {
        Some(path) => KernelSource::File(path),
        None => KernelSource::Embedded {
            name: "built-in probe guest",
            bytes: probe_image::PROBE_ELF,
        },
    };
    let kernel = loader::load_kernel(memory, mem_size, source)?;
    signals::check().map_err(StartError::Signalled)?;
    let initrd = match &config.initrd {
        Some(path) => Some(loader::load_initrd(memory, mem_size, path, &kernel)?),
        None => None,
    };

    let cmdline_max = kernel
        .header
        .map_or(layout::CMDLINE_MAX_SIZE, |h| h.cmdline_size as usize)
        .clamp(1, layout::CMDLINE_MAX_SIZE);
    if cmdline.len() >= cmdline_max || cmdline.contains('\0') {
        return Err(StartError::Config(format!(
            "--cmdline is {} bytes; this kernel takes at most {} (and no NUL bytes)",
            cmdline.len(),
            cmdline_max - 1
        )));
    }
    let mut cmdline_bytes = cmdline.as_bytes().to_vec();
    cmdline_bytes.push(0);
    vm_memory::Bytes::write_slice(memory, &cmdline_bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(|_| StartError::Config("command line does not fit in guest memory".into()))?;
    mptable::write(memory, num_vcpus)?;
    let rsdp = acpi::write(memory, num_vcpus).map_err(|e| StartError::GuestWrite {
        what: "ACPI tables",
        reason: e.to_string(),
    })?;
    let params = boot_params::build(kernel.header, cmdline_bytes.len(), initrd, rsdp, mem_size);
    boot_params::write(&params, memory).map_err(|e| StartError::GuestWrite {
        what: "the zero page",
        reason: e.to_string(),
    })?;
    regs::write_boot_tables(memory)?;
    if kernel.kind == ImageKind::Multiboot {
        let module = initrd.map(|i| multiboot::Module {
            start: i.address,
            end: i.address + i.size,
        });
        multiboot::write_info(memory, mem_size, module).map_err(|e| StartError::GuestWrite {
            what: "the Multiboot information",
            reason: e.to_string(),
        })?;
    }
    Ok(kernel)
}

/// COM1, with its console (output sink and writer thread) and input queue,
/// all of which outlive reboots; its interrupt eventfd is registered as
/// IRQ 4 with each boot's VM.
fn create_serial(config: &VmConfig) -> Result<Serial, StartError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(io_err("creating an eventfd"))?;
    let (console, output): (Option<Console>, devices::SerialOutput) =
        match serial_sink(&config.serial)? {
            Some(file) => {
                let (console, output) =
                    Console::spawn(Box::new(file), devices::console::OUTPUT_BUFFER)
                        .map_err(io_err("starting the console thread"))?;
                (Some(console), Box::new(output))
            }
            None => (None, Box::new(std::io::sink())),
        };
    let device = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq
            .try_clone()
            .map_err(io_err("cloning an eventfd"))?,
        output,
    )));
    Ok(Serial {
        device,
        irq: serial_irq,
        console,
    })
}

/// COM1 and what serves it on the host.
struct Serial {
    device: Arc<Mutex<SerialDevice>>,
    irq: EventFd,
    console: Option<Console>,
}

/// A boot's port I/O bus: COM1 on its irqfd and an i8042; for a
/// Multiboot guest (`debug_exit`), QEMU's debug-exit port too.
fn create_bus(
    vm_fd: &VmFd,
    serial: &Arc<Mutex<SerialDevice>>,
    serial_irq: &EventFd,
    control: &Arc<VmControl>,
    debug_exit: bool,
) -> Result<Arc<PioBus>, StartError> {
    vm_fd
        .register_irqfd(serial_irq, COM1_IRQ)
        .map_err(StartError::kvm("KVM_IRQFD"))?;
    // The reset line stops the VM right on the vCPU that pulled it, so the
    // guest runs no further than the reset instruction.
    let i8042 = Arc::new(Mutex::new(I8042::new(Box::new(ResetToControl(
        control.clone(),
    )))));
    let mut bus = PioBus::new();
    bus.insert(serial.clone(), COM1_BASE, 8)
        .and_then(|_| bus.insert(i8042, I8042_BASE, 5))?;
    if debug_exit {
        let port = devices::DebugExit::new(Box::new(ExitToControl(control.clone())));
        bus.insert(
            Arc::new(Mutex::new(port)),
            devices::debug_exit::DEBUG_EXIT_PORT,
            devices::debug_exit::DEBUG_EXIT_LEN,
        )?;
    }
    Ok(Arc::new(bus))
}

/// Gives each vCPU its CPUID (topology, PMU leaves) and LAPIC wiring, and
/// puts the boot vCPU at the kernel's entry. The others wait, parked, for
/// the guest to wake them through the MP wakeup mailbox (these hosts cannot
/// run the real-mode INIT/SIPI start-up).
fn configure_vcpu(
    fd: &VcpuFd,
    index: u8,
    num_vcpus: u8,
    cpuid: &CpuId,
    entry: BootEntry,
) -> Result<(), StartError> {
    let mut cpuid = cpuid.clone();
    cpuid::apply_topology(cpuid.as_mut_slice(), index, num_vcpus);
    fd.set_cpuid2(&cpuid)
        .map_err(StartError::kvm("KVM_SET_CPUID2"))?;
    regs::setup_lint(fd)?;
    if index == 0 {
        match entry {
            BootEntry::LongMode(entry) => regs::setup_boot_cpu(fd, entry)?,
            BootEntry::Multiboot(entry) => {
                regs::setup_multiboot_cpu(fd, entry, multiboot::INFO_ADDR, multiboot::BOOT_MAGIC)?
            }
        }
    }
    Ok(())
}

/// Where and how the boot vCPU enters the kernel.
#[derive(Clone, Copy)]
enum BootEntry {
    /// The 64-bit boot protocol (Linux, the probe).
    LongMode(u64),
    /// A Multiboot kernel, in 32-bit protected mode.
    Multiboot(u64),
}

/// The VM's `count` vCPUs, by index (which is the APIC ID).
fn create_vcpus(vm_fd: &VmFd, count: u8) -> Result<Vec<VcpuFd>, StartError> {
    (0..count)
        .map(|id| vm_fd.create_vcpu(u64::from(id)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(StartError::kvm("KVM_CREATE_VCPU"))
}

/// What every vCPU of a boot shares.
struct VcpuParts<'a> {
    vm_fd: &'a Arc<VmFd>,
    bus: &'a Arc<PioBus>,
    mmio: &'a Arc<MmioBus>,
    memory: &'a GuestMemoryMmap,
    tsc_khz: u32,
}

/// The MSRs a snapshot saves of each vCPU: those KVM lists as worth saving,
/// less the vPMU's (the vPMU saves its own; KVM never sees them).
fn saved_msrs(kvm: &Kvm, plan: &PmuPlan) -> Vec<u32> {
    let ranges = plan
        .model
        .as_ref()
        .map(|m| m.msr_ranges())
        .unwrap_or_default();
    let owned = |index: u32| {
        ranges
            .iter()
            .any(|r| index >= r.base && index - r.base < r.count)
    };
    kvm.get_msr_index_list()
        .map(|list| {
            list.as_slice()
                .iter()
                .copied()
                .filter(|&i| !owned(i))
                .collect()
        })
        .unwrap_or_default()
}

/// The MMIO devices of a boot: the MP wakeup mailbox, through which the
/// guest starts the secondary vCPUs parked at `gate`.
/// `mailbox`: the mailbox of an SMP guest (else none).
fn create_mmio(mailbox: Option<&Arc<Mutex<MpWakeupMailbox>>>) -> Result<Arc<MmioBus>, StartError> {
    let mut mmio = MmioBus::new();
    if let Some(mailbox) = mailbox {
        mmio.insert(
            mailbox.clone(),
            layout::MP_WAKEUP_MAILBOX,
            devices::mp_wakeup::MAILBOX_SIZE,
        )?;
    }
    Ok(Arc::new(mmio))
}

/// A fresh boot's mailbox, on which the secondary vCPUs of `gate` wait.
fn new_mailbox(num_vcpus: u8, gate: &Arc<ApGate>) -> Option<Arc<Mutex<MpWakeupMailbox>>> {
    (num_vcpus > 1).then(|| {
        Arc::new(Mutex::new(MpWakeupMailbox::new(
            (1..u32::from(num_vcpus)).collect::<Vec<_>>(),
            gate.starter(),
        )))
    })
}

impl Vm {
    /// Builds the VM described by `config`.
    pub fn build(config: &VmConfig) -> Result<Vm, StartError> {
        let stage = || signals::check().map_err(StartError::Signalled);
        let kvm = Kvm::new().map_err(StartError::KvmOpen)?;
        validate(config, &kvm)?;
        stage()?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(StartError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let host_vendor = cpuid::vendor(supported.as_slice());
        let guest_vendor = config
            .cpu_vendor
            .resolve(host_vendor)
            .map_err(StartError::Config)?;
        let mut supported = supported;
        if let Some(vendor) = guest_vendor.filter(|&v| Some(v) != host_vendor) {
            cpuid::set_vendor(supported.as_mut_slice(), vendor);
        }
        let host_pmu = HostPmu::detect(&kvm, host_vendor);
        let rdmsr_guest =
            pmu::reads_counters_with_rdmsr(config.kernel.is_some(), config.cmdline.as_deref());
        let plan = Arc::new(pmu::plan(
            &config.vpmu,
            &host_pmu,
            guest_vendor,
            rdmsr_guest,
        )?);
        cpuid::hide_kvm_hypercalls(supported.as_mut_slice());
        let vcpu_cpuid = pmu_cpuid(&supported, &plan)?;
        let saved = snapshot::SavedConfig {
            memory_mib: config.memory_mib,
            vcpus: config.vcpus,
            cpu_vendor: guest_vendor,
            pmu_model: plan.model.clone(),
            pmu_policy: plan.policy.clone(),
            cmdline: config.cmdline.clone(),
            kernel: snapshot::KernelIdentity::of(config.kernel.as_deref()),
            initrd: config.initrd.clone(),
            // Known once a boot loaded the kernel (`BootParts`).
            multiboot: false,
        };
        let mut vm = Vm::assemble(config, kvm, plan, vcpu_cpuid, saved)?;
        vm.boot = Some(vm.build_boot()?);
        stage()?;
        Ok(vm)
    }

    /// What outlives a boot: the API socket (bound now, while
    /// single-threaded, mode 0600 via the umask, so that a bad path fails
    /// before anything runs), the export, the control, the console, the
    /// profiler's hub and the snapshotter.
    fn assemble(
        config: &VmConfig,
        kvm: Kvm,
        plan: Arc<PmuPlan>,
        vcpu_cpuid: CpuId,
        saved: snapshot::SavedConfig,
    ) -> Result<Vm, StartError> {
        let api_socket = match &config.api_socket {
            Some(path) => Some(api::bind(path)?),
            None => None,
        };
        signals::check().map_err(StartError::Signalled)?;
        // `validate` bounded the count by the MP table's limit.
        let num_vcpus = config.vcpus as usize;
        let export = Arc::new(Export::new(plan.clone(), num_vcpus));
        let control = VmControl::new(num_vcpus)
            .map_err(io_err("creating an eventfd"))?
            .rebooting_on_reset(config.on_reset == OnReset::Reboot);
        let control = Arc::new(control);
        let serial = create_serial(config)?;
        let profiles = Arc::new(Hub::new(num_vcpus));
        let msrs = saved_msrs(&kvm, &plan);
        let snapshots = Arc::new(snapshot::Snapshotter::new(
            saved,
            control.clone(),
            export.clone(),
            serial.device.clone(),
            msrs,
        ));
        Ok(Vm {
            config: config.clone(),
            kvm,
            control,
            boot: None,
            serial: serial.device,
            serial_irq: serial.irq,
            console: serial.console,
            vcpu_cpuid,
            pmu: plan,
            export,
            profiles,
            api_socket,
            snapshots,
        })
    }

    /// How the kernel was loaded, for the start-up report (`None` for a
    /// restore).
    pub fn kernel_kind(&self) -> Option<ImageKind> {
        self.boot.as_ref().and_then(|b| b.kernel_kind)
    }

    /// A fresh boot: VM, memory, kernel and boot data, vCPUs. Each vCPU's
    /// vPMU starts at power-on, carrying the counts of the previous boot
    /// into its totals.
    fn build_boot(&self) -> Result<Boot, StartError> {
        let config = &self.config;
        let plan = &self.pmu;
        #[cfg(feature = "bench")]
        let bench_msr = config.bench.msr;
        #[cfg(not(feature = "bench"))]
        let bench_msr = None;
        let vm_fd = Arc::new(create_vm(&self.kvm, plan, bench_msr)?);
        let memory = create_memory(&vm_fd, config.memory_mib)?;
        let num_vcpus = config.vcpus as u8;
        let vcpu_fds = create_vcpus(&vm_fd, num_vcpus)?;
        let tsc_khz = vcpu_fds[0].get_tsc_khz().ok();
        let cmdline = guest_cmdline(config, tsc_khz, plan);
        let mut kernel = load_guest(config, &memory, num_vcpus, &cmdline)?;
        // Frames are named from what this boot loaded, never from what the
        // path names later.
        self.profiles
            .booted(match (kernel.file.take(), &config.kernel) {
                (Some(file), Some(path)) => KernelImage::booted(path.clone(), file),
                _ => KernelImage::Probe(probe_image::PROBE_ELF),
            });
        let multiboot = kernel.kind == ImageKind::Multiboot;
        let bus = create_bus(
            &vm_fd,
            &self.serial,
            &self.serial_irq,
            &self.control,
            multiboot,
        )?;
        let gate = ApGate::new(usize::from(num_vcpus));
        let mailbox = new_mailbox(num_vcpus, &gate);
        let mmio = create_mmio(mailbox.as_ref())?;

        let mut vcpus = Vec::with_capacity(vcpu_fds.len());
        for (index, fd) in (0..num_vcpus).zip(vcpu_fds) {
            let entry = match multiboot {
                true => BootEntry::Multiboot(kernel.entry),
                false => BootEntry::LongMode(kernel.entry),
            };
            configure_vcpu(&fd, index, num_vcpus, &self.vcpu_cpuid, entry)?;
            let carried = self.export.latest(index).map(|view| view.totals());
            let parts = VcpuParts {
                vm_fd: &vm_fd,
                bus: &bus,
                mmio: &mmio,
                memory: &memory,
                tsc_khz: tsc_khz.unwrap_or(0),
            };
            let gate = (index != 0).then(|| gate.clone());
            vcpus.push(self.vcpu(index, fd, parts, carried, None, gate));
        }
        Ok(Boot {
            vcpus,
            gate: gate.clone(),
            kernel_kind: Some(kernel.kind),
            parts: snapshot::BootParts {
                vm_fd,
                memory,
                gate,
                mailbox,
                multiboot,
            },
        })
    }

    /// A vCPU of this VM, with its vPMU (`carried`: its totals so far;
    /// `restored`: the vPMU state it continues from), sampler and observer;
    /// parked at `gate` if it has one.
    fn vcpu(
        &self,
        index: u8,
        fd: VcpuFd,
        parts: VcpuParts<'_>,
        carried: Option<vpmu::EventTotals>,
        restored: Option<crate::pmu::vcpu::PmuState>,
        gate: Option<Arc<ApGate>>,
    ) -> Vcpu {
        let pmu_setup = self.pmu.model.as_ref().map(|_| PmuSetup {
            plan: self.pmu.clone(),
            tsc_khz: parts.tsc_khz,
            export: self.export.clone(),
            carried,
            restored,
        });
        let sampler = VcpuProfiler::new(
            index,
            self.profiles.clone(),
            parts.memory.clone(),
            parts.tsc_khz,
        );
        let vcpu = Vcpu::new(
            index,
            fd,
            parts.vm_fd.clone(),
            parts.bus.clone(),
            self.control.clone(),
            pmu_setup,
        )
        .with_mmio(parts.mmio.clone())
        .with_sampler(Some(Box::new(sampler)));
        let vcpu = match gate {
            Some(gate) => vcpu.parked(gate),
            None => vcpu,
        };
        #[cfg(feature = "bench")]
        let vcpu = vcpu.with_observer(crate::bench::observer(&self.config.bench));
        vcpu
    }

    /// Runs the guest until it stops, the timeout expires or the VMM is
    /// signalled; returns why it stopped and what each vCPU left behind.
    /// With `--on-reset reboot` a guest reset starts a new boot instead.
    /// Every vCPU thread has ended when this returns.
    pub fn run(mut self) -> Result<(Outcome, Vec<VcpuReport>), StartError> {
        crate::vcpu::kick::install().map_err(|e| StartError::Io {
            what: "installing the vCPU kick signal handler".into(),
            source: e.into(),
        })?;
        let mut main_loop = MainLoop::new(self.control.clone(), self.serial.clone())
            .map_err(io_err("setting up the event loop"))?;
        // The guest's console is this terminal: its line discipline, not
        // the host's, echoes and edits (restored when the run ends).
        let _raw_input = match self.config.serial {
            SerialSink::Stdio => terminal::RawInput::enter(),
            _ => None,
        };

        let api_server = match &self.api_socket {
            Some(socket) => {
                let api = Api::new(
                    self.config.name.clone(),
                    self.export.clone(),
                    self.control.clone(),
                    self.profiles.clone(),
                )
                .with_snapshots(self.snapshots.clone());
                let listener = socket
                    .listener
                    .try_clone()
                    .map_err(io_err("cloning the API socket"))?;
                Some(
                    api::http::Server::start(
                        listener,
                        Arc::new(move |r, peer| api.handle_for(r, Some(peer))),
                    )
                    .map_err(io_err("starting the API thread"))?,
                )
            }
            None => None,
        };

        // The timeout bounds the whole run, over every boot.
        let deadline = self.config.timeout.map(|t| Instant::now() + t);
        let mut reboots = RebootLog::new(Instant::now());
        let outcome = loop {
            let Some(boot) = self.boot.take() else {
                break Outcome::Reset;
            };
            let outcome = self.run_boot(boot, deadline, &mut main_loop);
            if outcome != Outcome::Reset || self.config.on_reset != OnReset::Reboot {
                break outcome;
            }
            if let Err(end) = self.reboot(deadline, &mut reboots) {
                // Stopping for good now, not for a reboot (the API's pause
                // answers say so).
                self.control.end_instead(end.clone());
                break end;
            }
        };
        drop(api_server);
        if let Some(summary) = reboots.summary() {
            eprintln!("{summary}");
        }
        self.finish_console();
        Ok((outcome, self.control.reports()))
    }

    /// After a guest reset: the next boot, unless the timeout expired (it
    /// holds over every boot) or the boot cannot be built; then the
    /// outcome that ends the run.
    fn reboot(&mut self, deadline: Option<Instant>, log: &mut RebootLog) -> Result<(), Outcome> {
        if let Some(timeout) = self.expired(deadline) {
            return Err(timeout);
        }
        if let Some(line) = log.reboot(Instant::now()) {
            eprintln!("{line}");
        }
        self.control.reset_for_reboot();
        match self.build_boot() {
            Ok(boot) => {
                self.boot = Some(boot);
                Ok(())
            }
            Err(e) => Err(match e.signal() {
                Some(signal) => Outcome::Terminated { signal },
                None => Outcome::VcpuError {
                    vcpu: 0,
                    message: format!("reboot failed: {e}"),
                },
            }),
        }
    }

    /// The timeout's outcome, once `deadline` has passed.
    fn expired(&self, deadline: Option<Instant>) -> Option<Outcome> {
        let seconds = self.config.timeout.unwrap_or_default().as_secs_f64();
        deadline
            .filter(|&d| Instant::now() >= d)
            .map(|_| Outcome::Timeout { seconds })
    }

    /// Gives the console writer a bounded time to write what the guest left
    /// in its buffer (it must not hold up the exit when nobody reads), and
    /// reports what was dropped.
    fn finish_console(&mut self) {
        if let Some(console) = self.console.take() {
            let stats = console.finish(CONSOLE_STALL, CONSOLE_DRAIN_LIMIT);
            if stats.dropped > 0 {
                eprintln!(
                    "vmm: console: {} bytes of guest output dropped (its sink was not being read)",
                    stats.dropped
                );
            }
        }
        let input_dropped = self.serial.lock().recover().input_dropped();
        if input_dropped > 0 {
            eprintln!(
                "vmm: console: {input_dropped} bytes of host input dropped (the guest did not read them)"
            );
        }
    }

    /// Runs one boot until something stops it; every vCPU thread of the
    /// boot has ended when this returns.
    fn run_boot(&self, boot: Boot, deadline: Option<Instant>, main_loop: &mut MainLoop) -> Outcome {
        // A signal during start-up: not one guest instruction runs.
        if let Some(signal) = signals::pending() {
            self.control.finish(Outcome::Terminated { signal });
        }
        let gate = boot.gate;
        self.snapshots.set_boot(Some(boot.parts));
        let mut threads = Vec::with_capacity(boot.vcpus.len());
        for vcpu in boot.vcpus {
            // A guest may reset while its vCPU threads start, boot after
            // boot: the deadline is checked here too.
            if let Some(timeout) = self.expired(deadline) {
                self.control.finish(timeout);
            }
            if self.control.stopping() {
                break;
            }
            match vcpu.spawn() {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    self.control.finish(Outcome::VcpuError {
                        vcpu: threads.len() as u8,
                        message: format!("cannot start its thread: {e}"),
                    });
                    break;
                }
            }
        }

        while self.control.outcome().is_none() {
            if let Some(timeout) = self.expired(deadline) {
                self.control.finish(timeout);
                break;
            }
            let wait = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            // A vCPU thread records why it stops before it ends; one that
            // ended without a word panicked (a VMM bug, reported by the
            // panic hook): stop the VM instead of waiting for it.
            if let Some(vcpu) = threads.iter().position(|t| t.is_finished()) {
                self.control.finish(Outcome::VcpuError {
                    vcpu: vcpu as u8,
                    message: "its thread panicked (a bug in the VMM)".into(),
                });
                break;
            }
            main_loop.run_once(wait.map_or(event_loop::MAX_WAIT, |w| w.min(event_loop::MAX_WAIT)));
        }

        // Every vCPU sees the stop flag at its next exit; the kick makes that
        // exit happen now. Parked vCPUs leave their gate.
        self.control.kick_all();
        gate.stop();
        for handle in threads {
            let _ = handle.join();
        }
        self.snapshots.set_boot(None);
        self.control.outcome().unwrap_or(Outcome::Reset)
    }
}

/// KVM's supported CPUID with the PMU leaves saying exactly the plan's
/// model (or no PMU), adding the leaves the model needs where KVM has none
/// (`vpmu::cpuid::apply` raises the maximum leaf to reach them).
fn pmu_cpuid(supported: &CpuId, plan: &PmuPlan) -> Result<CpuId, StartError> {
    let mut entries = supported.as_slice().to_vec();
    for &(function, index) in vpmu::cpuid::leaves_required(plan.model.as_ref()) {
        if !entries
            .iter()
            .any(|e| e.function == function && e.index == index)
        {
            entries.push(kvm_cpuid_entry2 {
                function,
                index,
                ..Default::default()
            });
        }
    }
    for e in &mut entries {
        let mut regs = vpmu::CpuidRegs {
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        };
        vpmu::cpuid::apply(plan.model.as_ref(), e.function, e.index, &mut regs);
        (e.eax, e.ebx, e.ecx, e.edx) = (regs.eax, regs.ebx, regs.ecx, regs.edx);
    }
    CpuId::from_entries(&entries).map_err(|_| StartError::CpuidTooLarge)
}
