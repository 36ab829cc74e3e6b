//! Instrumentation for the vPMU cost benchmark (`vmm/benches/vpmu_costs.rs`,
//! BENCHMARKS.md): hidden flags that ordinary users never need, compiled
//! only with the `bench` feature (which `cargo bench` and `cargo test`
//! turn on; see `vmm/Cargo.toml`).
//!
//! - `--bench-msr INDEX`: MSR INDEX joins the MSR filter, so that every
//!   guest access exits to userspace; the VMM answers RDMSR with 0 and
//!   ignores WRMSR of 0. This is the "null" userspace MSR exit the vPMU's
//!   own MSR exits are compared with. A WRMSR of another value is a
//!   message from the guest (see [`MARK`] and [`STAMP`]), recorded in the
//!   trace when there is one.
//! - `--bench-trace PATH`: each vCPU keeps a log, written to PATH when the
//!   VM ends: the guest's marks with the vCPU's exit counts at that point
//!   (userspace exits by reason, KVM's own per-vCPU statistics, PMIs), the
//!   guest's stamps, the host TSC at every PMI the VMM delivered, and pairs
//!   of (host TSC, guest TSC) read with `KVM_GET_MSRS(IA32_TSC)` so that
//!   guest TSC values can be put on the host's time line.
//!
//! The vCPU sees all this as its [`ExitObserver`] ([`observer`]); without
//! either flag it has none. Per exit a trace costs two TSC reads, and per
//! PMI one more.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;
use vpmu::VpmuSnapshot;

use crate::pmu::{host_tsc, DeliveredPmi};
use crate::vcpu::{ExitCounts, ExitObserver, ObserverLog, VcpuReport};

/// A guest WRMSR of `MARK | tag` to the bench MSR records a mark: the
/// vCPU's exit and PMI counts right now, under `tag` (low 32 bits).
pub const MARK: u64 = 1 << 60;
/// A guest WRMSR of `STAMP | tsc` records a guest TSC value (low 60 bits),
/// e.g. the entry of its PMI handler.
pub const STAMP: u64 = 2 << 60;
const KIND_MASK: u64 = 0xf << 60;

/// `IA32_TIME_STAMP_COUNTER`.
const MSR_IA32_TSC: u32 = 0x10;

/// Marks, stamps and PMIs a vCPU keeps (allocated once, up front; further
/// records are dropped and counted).
const MAX_MARKS: usize = 4096;
const MAX_STAMPS: usize = 32768;
const MAX_PMIS: usize = 65536;

/// The hidden benchmark flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BenchOptions {
    /// The null MSR (`--bench-msr`).
    pub msr: Option<u32>,
    /// Where the trace goes (`--bench-trace`).
    pub trace: Option<PathBuf>,
}

/// Context switches of the calling thread so far (voluntary and not).
fn context_switches() -> u64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: fills `usage`, which lives across the call.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    (usage.ru_nvcsw + usage.ru_nivcsw) as u64
}

/// KVM's per-vCPU statistics that say where exits went (binary stats fd).
const KVM_STATS: [&str; 12] = [
    "exits",
    "io_exits",
    "mmio_exits",
    "signal_exits",
    "irq_exits",
    "halt_exits",
    "irq_window_exits",
    "nmi_window_exits",
    "request_irq_exits",
    "nmi_injections",
    "irq_injections",
    "insn_emulation",
];

/// A vCPU's binary statistics file (`KVM_GET_STATS_FD`).
struct KvmStats {
    fd: OwnedFd,
    /// File offset of each of [`KVM_STATS`] (None: this KVM lacks it).
    offsets: [Option<u64>; KVM_STATS.len()],
}

vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);
vmm_sys_util::ioctl_iow_nr!(
    KVM_GET_DEVICE_ATTR,
    kvm_bindings::KVMIO,
    0xe2,
    kvm_bindings::kvm_device_attr
);

/// The vCPU's TSC offset (guest TSC = host TSC + offset when the rates
/// match), from `KVM_VCPU_TSC_OFFSET`; None where KVM lacks it.
fn tsc_offset(vcpu: &VcpuFd) -> Option<u64> {
    let mut offset = 0u64;
    let attr = kvm_bindings::kvm_device_attr {
        group: kvm_bindings::KVM_VCPU_TSC_CTRL,
        attr: u64::from(kvm_bindings::KVM_VCPU_TSC_OFFSET),
        addr: &mut offset as *mut u64 as u64,
        flags: 0,
    };
    // SAFETY: KVM writes one u64 at `addr`, which lives across the call.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vcpu, KVM_GET_DEVICE_ATTR(), &attr) };
    (ret == 0).then_some(offset)
}

impl KvmStats {
    fn open(vcpu: &VcpuFd) -> Option<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd.
        let fd = unsafe { vmm_sys_util::ioctl::ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh fd owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let header = pread(&fd, 24, 0)?;
        let word = |i: usize| u32::from_ne_bytes(header[4 * i..4 * i + 4].try_into().unwrap());
        let (name_size, num_desc, desc_offset, data_offset) =
            (word(1) as usize, word(2) as usize, word(4), word(5));
        // struct kvm_stats_desc: flags u32, exponent i16, size u16,
        // offset u32, bucket_size u32, name[name_size].
        let desc_size = 16 + name_size;
        let descs = pread(&fd, desc_size * num_desc, u64::from(desc_offset))?;
        let mut offsets = [None; KVM_STATS.len()];
        for desc in descs.chunks_exact(desc_size) {
            let name = &desc[16..];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            let offset = u32::from_ne_bytes(desc[8..12].try_into().unwrap());
            if let Some(i) = KVM_STATS.iter().position(|s| s.as_bytes() == name) {
                offsets[i] = Some(u64::from(data_offset) + u64::from(offset));
            }
        }
        Some(Self { fd, offsets })
    }

    fn read(&self) -> [u64; KVM_STATS.len()] {
        let mut values = [0; KVM_STATS.len()];
        for (value, offset) in values.iter_mut().zip(self.offsets) {
            if let Some(bytes) = offset.and_then(|o| pread(&self.fd, 8, o)) {
                *value = u64::from_ne_bytes(bytes[..8].try_into().unwrap());
            }
        }
        values
    }
}

fn pread(fd: &OwnedFd, len: usize, offset: u64) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    // SAFETY: reads at most `len` bytes into a buffer of that size.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), len, offset as i64) };
    (n == len as isize).then_some(buf)
}

/// A host TSC value next to the guest's TSC, read on the vCPU thread.
#[derive(Clone, Copy, Debug)]
struct TscPair {
    /// Host TSC before and after `KVM_GET_MSRS`.
    host_before: u64,
    host_after: u64,
    guest: u64,
}

/// The counts at a guest mark.
#[derive(Clone, Copy, Debug)]
struct Mark {
    tag: u64,
    host_tsc: u64,
    /// Host TSC cycles the vCPU thread spent between `KVM_RUN` returning
    /// and the next `KVM_RUN`, summed: the VMM's own share of exits.
    user_tsc: u64,
    exits: ExitCounts,
    kvm: [u64; KVM_STATS.len()],
    /// PMIs the VMM delivered so far.
    pmis: u64,
}

/// One PMI the VMM delivered: host TSC when the overflow signal brought the
/// vCPU out of `KVM_RUN`, when the PMI was injected, and when the guest's
/// first PMU MSR access after it reached the VMM (0: none yet).
#[derive(Clone, Copy, Debug)]
struct PmiTimes {
    signal: u64,
    injected: u64,
    first_msr: u64,
    /// Guest cycles the counter ran past its overflow before the VMM saw it.
    overshoot: u64,
    /// The vCPU thread was switched out between the signal and the first
    /// PMU MSR access (the host ran something else).
    preempted: bool,
}

/// One vCPU's benchmark log (`--bench-trace`).
#[derive(Debug)]
pub struct BenchLog {
    marks: Vec<Mark>,
    stamps: Vec<u64>,
    pmis: Vec<PmiTimes>,
    tsc: Vec<TscPair>,
    tsc_offset: Option<u64>,
    dropped: u64,
}

/// What a traced vCPU thread keeps while it runs.
struct Tracer {
    stats: Option<KvmStats>,
    log: BenchLog,
    /// Host TSC when `KVM_RUN` last returned because of a signal, and the
    /// thread's context switches then.
    signal_at: u64,
    signal_switches: u64,
    /// Host TSC when `KVM_RUN` last returned.
    exit_at: u64,
    user_tsc: u64,
    /// The last PMI waits for the guest's first PMU MSR access.
    awaiting_first: bool,
    /// A mark wants a TSC pair, read before the next entry.
    pair_due: bool,
}

impl std::fmt::Debug for KvmStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmStats").finish_non_exhaustive()
    }
}

impl Tracer {
    /// Called on the vCPU thread before it first runs.
    fn new(fd: &VcpuFd) -> Self {
        let mut bench = Self {
            stats: KvmStats::open(fd),
            log: BenchLog {
                marks: Vec::with_capacity(MAX_MARKS),
                stamps: Vec::with_capacity(MAX_STAMPS),
                pmis: Vec::with_capacity(MAX_PMIS),
                tsc: Vec::with_capacity(MAX_MARKS + 2),
                tsc_offset: tsc_offset(fd),
                dropped: 0,
            },
            signal_at: 0,
            signal_switches: 0,
            exit_at: 0,
            user_tsc: 0,
            awaiting_first: false,
            pair_due: false,
        };
        bench.tsc_pair(fd);
        bench
    }

    fn tsc_pair(&mut self, fd: &VcpuFd) {
        let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        }]) else {
            return;
        };
        let host_before = host_tsc();
        let read = fd.get_msrs(&mut msrs);
        let host_after = host_tsc();
        if read == Ok(1) && self.log.tsc.len() < self.log.tsc.capacity() {
            self.log.tsc.push(TscPair {
                host_before,
                host_after,
                guest: msrs.as_slice()[0].data,
            });
        }
    }

    /// Right before `KVM_RUN`: first the TSC pair a mark asked for.
    fn entering(&mut self, fd: &VcpuFd) {
        if std::mem::take(&mut self.pair_due) {
            self.tsc_pair(fd);
        }
        if self.exit_at != 0 {
            self.user_tsc += host_tsc().wrapping_sub(self.exit_at);
        }
    }

    /// Right after `KVM_RUN` returned.
    fn exited(&mut self) {
        self.exit_at = host_tsc();
    }

    /// `KVM_RUN` returned because of a signal.
    fn signal(&mut self) {
        self.signal_at = self.exit_at;
        self.signal_switches = context_switches();
    }

    /// The VMM delivered a PMI; `injected`: host TSC right after.
    fn pmi_delivered(&mut self, injected: u64, overshoot: u64) {
        if self.log.pmis.len() < MAX_PMIS {
            self.log.pmis.push(PmiTimes {
                signal: self.signal_at,
                injected,
                first_msr: 0,
                overshoot,
                preempted: false,
            });
            self.awaiting_first = true;
        } else {
            self.log.dropped += 1;
        }
    }

    /// A PMU MSR exit reached the VMM.
    fn pmu_msr(&mut self) {
        if std::mem::take(&mut self.awaiting_first) {
            if let Some(last) = self.log.pmis.last_mut() {
                last.first_msr = host_tsc();
                last.preempted = context_switches() != self.signal_switches;
            }
        }
    }

    /// The guest wrote `value` (not 0) to the bench MSR.
    fn message(&mut self, value: u64, exits: ExitCounts, pmis: u64) {
        match value & KIND_MASK {
            MARK if self.log.marks.len() < MAX_MARKS => {
                let kvm = self.stats.as_ref().map(KvmStats::read).unwrap_or_default();
                self.log.marks.push(Mark {
                    tag: value & u64::from(u32::MAX),
                    host_tsc: host_tsc(),
                    user_tsc: self.user_tsc,
                    exits,
                    kvm,
                    pmis,
                });
                self.pair_due = true;
            }
            STAMP if self.log.stamps.len() < MAX_STAMPS => {
                self.log.stamps.push(value & !KIND_MASK);
            }
            _ => self.log.dropped += 1,
        }
    }

    /// The log, when the vCPU thread ends.
    fn finish(mut self, fd: &VcpuFd) -> BenchLog {
        self.tsc_pair(fd);
        self.log
    }
}

/// A vCPU's observer for the benchmark flags, if any is set.
pub fn observer(options: &BenchOptions) -> Option<Box<dyn ExitObserver>> {
    (options.msr.is_some() || options.trace.is_some()).then(|| {
        Box::new(BenchVcpu {
            msr: options.msr,
            trace: options.trace.is_some(),
            tracer: None,
        }) as Box<dyn ExitObserver>
    })
}

/// A vCPU's benchmark instrumentation: the null MSR, and the trace.
struct BenchVcpu {
    msr: Option<u32>,
    /// `--bench-trace`: a [`Tracer`] is made on the vCPU thread.
    trace: bool,
    tracer: Option<Tracer>,
}

impl ExitObserver for BenchVcpu {
    fn start(&mut self, fd: &VcpuFd) {
        if self.trace {
            self.tracer = Some(Tracer::new(fd));
        }
    }

    fn entering(&mut self, fd: &VcpuFd) {
        if let Some(tracer) = &mut self.tracer {
            tracer.entering(fd);
        }
    }

    fn exited(&mut self, signal: bool) {
        if let Some(tracer) = &mut self.tracer {
            tracer.exited();
            if signal {
                tracer.signal();
            }
        }
    }

    fn owns_msr(&self, index: u32) -> bool {
        self.msr == Some(index)
    }

    fn msr_written(&mut self, value: u64, exits: ExitCounts, pmis: u64) {
        if let (Some(tracer), true) = (&mut self.tracer, value != 0) {
            tracer.message(value, exits, pmis);
        }
    }

    fn pmu_msr(&mut self) {
        if let Some(tracer) = &mut self.tracer {
            tracer.pmu_msr();
        }
    }

    fn traces_pmis(&self) -> bool {
        self.trace
    }

    fn pmi_delivered(&mut self, pmi: DeliveredPmi) {
        if let Some(tracer) = &mut self.tracer {
            tracer.pmi_delivered(pmi.injected_tsc, pmi.overshoot);
        }
    }

    fn finish(self: Box<Self>, fd: &VcpuFd) -> Option<ObserverLog> {
        let log: ObserverLog = Arc::new(self.tracer?.finish(fd));
        Some(log)
    }
}

/// The benchmark trace could not be written.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct TraceError {
    what: String,
    #[source]
    source: std::io::Error,
}

/// Before the VM starts: a trace that cannot be written is bad input, said
/// before the guest runs, not after.
pub fn prepare(options: &BenchOptions) -> Result<(), TraceError> {
    if let Some(path) = &options.trace {
        File::create(path).map_err(|source| TraceError {
            what: format!("cannot create the benchmark trace {}", path.display()),
            source,
        })?;
    }
    Ok(())
}

/// After the VM ended: writes the trace, if asked for.
pub fn finish(options: &BenchOptions, reports: &[VcpuReport]) -> Result<(), TraceError> {
    if let Some(path) = &options.trace {
        write_trace(path, reports).map_err(|source| TraceError {
            what: format!("writing the benchmark trace {}", path.display()),
            source,
        })?;
    }
    Ok(())
}

/// Writes every vCPU's log to `path`, one record per line:
///
/// ```text
/// tsc_offset vcpu=V offset=O   (KVM_VCPU_TSC_OFFSET: guest = host + O)
/// tsc vcpu=V host_before=H host_after=H guest=G
/// mark vcpu=V tag=T host_tsc=H user_tsc=U pmis=P exits=N msr_read=.. msr_write=.. io=.. mmio=.. signal=.. other=.. kvm_exits=.. kvm_io_exits=.. ...
/// stamp vcpu=V guest_tsc=G
/// pmi vcpu=V signal=H injected=H first_msr=H overshoot=CYCLES preempted=0|1
/// vpmu vcpu=V opens=.. closes=.. starts=.. stops=.. reprograms=.. contexts_ran=.. ...
/// dropped vcpu=V n=N
/// ```
fn write_trace(path: &Path, reports: &[VcpuReport]) -> std::io::Result<()> {
    let mut out = BufWriter::new(File::create(path)?);
    for report in reports {
        let v = report.index;
        if let Some((snapshot, _)) = &report.vpmu {
            write_vpmu_stats(&mut out, v, snapshot)?;
        }
        let log = report
            .observer_log
            .as_ref()
            .and_then(|log| log.downcast_ref::<BenchLog>());
        if let Some(log) = log {
            write_log(&mut out, v, log)?;
        }
    }
    out.flush()
}

/// The `vpmu` line of vCPU `v`.
fn write_vpmu_stats(out: &mut impl Write, v: u8, snapshot: &VpmuSnapshot) -> std::io::Result<()> {
    let s = &snapshot.stats;
    // Counter contexts that ran: ended ones plus live ones.
    let live = snapshot.counters.iter().filter(|c| c.ran).count() as u64;
    writeln!(
        out,
        "vpmu vcpu={v} opens={} open_failures={} closes={} starts={} stops={} \
         reprograms={} contexts_ran={} reads={} clock_reads={} clock_reads_saved={} \
         period_updates={} clock_lead_ns={} overflow_signals={} pmis={} throttles={}",
        s.opens,
        s.open_failures,
        s.closes,
        s.starts,
        s.stops,
        s.reprograms,
        s.retired_contexts + live,
        s.reads,
        s.clock_reads,
        s.clock_reads_saved,
        s.period_updates,
        s.clock_lead_ns,
        s.overflow_signals,
        s.pmis,
        s.throttles
    )
}

/// The `tsc_offset`, `tsc`, `mark`, `stamp`, `pmi` and `dropped` lines of
/// vCPU `v`.
fn write_log(out: &mut impl Write, v: u8, log: &BenchLog) -> std::io::Result<()> {
    if let Some(offset) = log.tsc_offset {
        writeln!(out, "tsc_offset vcpu={v} offset={}", offset as i64)?;
    }
    for t in &log.tsc {
        writeln!(
            out,
            "tsc vcpu={v} host_before={} host_after={} guest={}",
            t.host_before, t.host_after, t.guest
        )?;
    }
    for m in &log.marks {
        let e = &m.exits;
        write!(
            out,
            "mark vcpu={v} tag={} host_tsc={} user_tsc={} pmis={} exits={} msr_read={} \
             msr_write={} io={} mmio={} signal={} other={}",
            m.tag,
            m.host_tsc,
            m.user_tsc,
            m.pmis,
            e.total(),
            e.msr_read,
            e.msr_write,
            e.io,
            e.mmio,
            e.signal,
            e.other
        )?;
        for (name, value) in KVM_STATS.iter().zip(m.kvm) {
            write!(out, " kvm_{name}={value}")?;
        }
        writeln!(out)?;
    }
    for s in &log.stamps {
        writeln!(out, "stamp vcpu={v} guest_tsc={s}")?;
    }
    for p in &log.pmis {
        writeln!(
            out,
            "pmi vcpu={v} signal={} injected={} first_msr={} overshoot={} preempted={}",
            p.signal, p.injected, p.first_msr, p.overshoot, p.preempted as u8
        )?;
    }
    writeln!(out, "dropped vcpu={v} n={}", log.dropped)
}
