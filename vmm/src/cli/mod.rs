//! The command line: `vmm [run] [FLAGS]`.
//!
//! A bad flag gets one line on stderr and exit code 2, never clap's
//! multi-line usage dump or a panic.
//!
//! Owns: flags and their spelling (clap is known here only), `vmm run`'s
//! summary, and the two clients, `vmm stat` ([`stat`]) and `vmm profile`
//! ([`profile`]), which read the API's documents. The top of the tree:
//! nothing imports it.

pub mod exporter;
pub mod host;
pub mod profile;
pub mod snapshot;
pub mod stat;
pub mod top;
mod values;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::api::VmName;
use crate::pmu::{VpmuMode, VpmuOptions};
use crate::profile as profiler;
use crate::vcpu::Outcome;
use crate::vm::config::{CpuVendor, OnReset, SerialSink, VmConfig, DEFAULT_MEMORY_MIB};
use crate::vm::loader::ImageKind;
use crate::vm::StartError;
use crate::vm::Vm;
use profile::{Format, ProfileOptions};
use stat::StatOptions;

const EXIT_CODES: &str = "\
Exit codes:
  0  the guest reset the machine (i8042 reset, Linux `reboot` with reboot=k)
  1  the guest stopped abnormally: shutdown/triple fault, KVM internal error,
     failed entry or a vCPU error (the reason and guest RIP are printed)
  2  bad input, or a host that cannot run the VM (nothing was started)
  3  --timeout expired
  (v<<1)|1  a Multiboot guest wrote v to the debug-exit port 0xf4 (QEMU's
     isa-debug-exit convention: 1 when it wrote 0)
  128+N  stopped by signal N (SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1,
     SIGUSR2), also during start-up";

#[derive(Debug, Parser)]
#[command(
    name = "vmm",
    version,
    about = "A small KVM VMM whose guests get a userspace virtual PMU.",
    long_about = "A small KVM VMM whose guests get a userspace virtual PMU.\n\n\
                  With no arguments it boots the built-in probe guest.",
    args_conflicts_with_subcommands = true,
    allow_negative_numbers = true,
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a guest (the default command).
    #[command(after_help = EXIT_CODES)]
    Run(Box<RunArgs>),
    /// Watch a running VM's guest counters from the host, like `perf stat`
    /// (per vCPU and total, with rates), through its --api-socket.
    #[command(after_help = STAT_EXIT_CODES)]
    Stat(StatArgs),
    /// Sample where a running VM's guest spends its time, from the host
    /// (guest RIP and kernel stack per vCPU), through its --api-socket:
    /// folded stacks, an SVG flame graph or a table.
    #[command(after_help = PROFILE_EXIT_CODES)]
    Profile(ProfileArgs),
    /// Serve one Prometheus endpoint (GET /metrics over HTTP on TCP) for
    /// every VM whose API socket is in a directory, each series labelled
    /// with the VM's name (`vm`), plus the exporter's own series.
    #[command(after_help = EXPORTER_EXIT_CODES)]
    Exporter(ExporterArgs),
    /// A live table of every VM whose API socket is in a directory: guest
    /// cycles per second per vCPU, PMIs and PMU MSR exits per second,
    /// backing, state (q quits; n, c, p, e sort).
    Top(TopArgs),
    /// Save a running VM (guest memory, vCPUs, devices, its vPMU with every
    /// counter) to a file, through its --api-socket; `vmm run --restore
    /// FILE` continues it, here or in any number of other VMMs.
    #[command(after_help = SNAPSHOT_EXIT_CODES)]
    Snapshot(SnapshotArgs),
    /// What this host offers a vPMU (its PMU, host perf, KVM's PMU,
    /// RDPMC) and the plan `vmm run --vpmu on` would make for an AMD and
    /// an Intel guest: how counters would be backed and why. Starts no
    /// guest. `scripts/pmu-host-check` runs the checks it allows.
    Host(HostArgs),
}

#[derive(Debug, Args)]
pub struct HostArgs {
    /// Print the report as JSON (for scripts).
    #[arg(long)]
    json: bool,
}

const SNAPSHOT_EXIT_CODES: &str = "\
Exit codes:
  0  the snapshot was written (the summary is printed)
  1  the VM could not take it (stopping, between boots, a host failure)
  2  bad flags, no such socket, not a vmm API socket, or a path the VM
     refuses (exists without --force, not a regular file, no directory)";

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The API socket of the running vmm (its --api-socket).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Where to write the snapshot (a new file; the VMM writes it).
    #[arg(value_name = "FILE")]
    path: PathBuf,
    /// Replace FILE if it exists (a regular file only).
    #[arg(long)]
    force: bool,
    /// Leave the VM paused afterwards (resume it with PUT /vm/resume).
    #[arg(long)]
    stay_paused: bool,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// The directory holding the VMs' API sockets.
    #[arg(long, value_name = "DIR")]
    sockets: PathBuf,
    /// Milliseconds between refreshes.
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    interval: u64,
    /// Print one plain table (rates over one interval) and exit.
    #[arg(long)]
    once: bool,
    /// The column to sort by, largest first.
    #[arg(long, value_name = "KEY", value_enum, default_value_t = top::SortKey::Cycles)]
    sort: top::SortKey,
}

const EXPORTER_EXIT_CODES: &str = "\
Exit codes:
  2  bad flags, --sockets not a directory, --listen not available (one line
     on stderr); otherwise it serves until ended by a signal";

#[derive(Debug, Args)]
pub struct ExporterArgs {
    /// Address and port to serve on (loopback by default).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9477")]
    listen: std::net::SocketAddr,
    /// The directory holding the VMs' API sockets (read at every scrape).
    #[arg(long, value_name = "DIR")]
    sockets: PathBuf,
    /// Milliseconds a VM has to answer; later, it is down for that scrape.
    #[arg(long, value_name = "MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(10..=10_000))]
    vm_timeout: u64,
    /// Milliseconds a whole scrape may take (keep it under Prometheus's
    /// scrape_timeout).
    #[arg(long, value_name = "MS", default_value_t = 800,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    scrape_timeout: u64,
}

impl ExporterArgs {
    fn options(&self) -> exporter::ExporterOptions {
        exporter::ExporterOptions {
            listen: self.listen,
            sockets: self.sockets.clone(),
            per_vm: Duration::from_millis(self.vm_timeout),
            bound: Duration::from_millis(self.scrape_timeout),
        }
    }
}

const PROFILE_EXIT_CODES: &str = "\
Exit codes:
  0  the profile was written
  1  it could not be taken (another profile running, the VM paused or gone)
     or written
  2  bad flags, an unreadable --symbols file, no such socket, not a vmm API
     socket (one line on stderr)";

#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// The API socket of the running vmm (its --api-socket).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// How long to sample (up to 300).
    #[arg(long, value_name = "N", default_value_t = profiler::DEFAULT_SECONDS,
          value_parser = |s: &str| profiler::parse_seconds(s).map_err(|e| e.to_string()))]
    seconds: f64,
    /// Samples per second of each vCPU's time (1 to 10000).
    #[arg(long, value_name = "HZ", default_value_t = profiler::DEFAULT_HZ,
          value_parser = |s: &str| profiler::parse_hz(s).map_err(|e| e.to_string()))]
    frequency: u32,
    /// Name kernel frames from this vmlinux or System.map instead of the
    /// VMM's own (the --kernel ELF's symbol table, or the probe's).
    #[arg(long, value_name = "FILE")]
    symbols: Option<PathBuf>,
    /// Output: folded stacks, an SVG flame graph, or a perf-report-like
    /// table.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Write here instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
}

impl ProfileArgs {
    fn options(&self) -> ProfileOptions {
        ProfileOptions {
            socket: self.api_socket.clone(),
            request: profiler::Request {
                seconds: self.seconds,
                hz: self.frequency,
            },
            symbols: self.symbols.clone(),
            format: self.format,
            output: self.output.clone(),
        }
    }
}

const STAT_EXIT_CODES: &str = "\
Exit codes:
  0  done (--count refreshes printed, or the VM went away)
  1  the VM went away (or its API stayed busy) before --count refreshes
  2  bad flags, no such socket, not a vmm API socket, or its API busy (503)
     for 5 s at the start (one line on stderr)";

#[derive(Debug, Args)]
pub struct StatArgs {
    /// The API socket of the running vmm (its --api-socket).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Milliseconds between refreshes; rates are per second over each.
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=86_400_000))]
    interval: u64,
    /// Print this many refreshes, then exit (default: until the VM goes
    /// away). `--count 1` is one shot, after one interval.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// One JSON object per refresh, one per line, instead of a table.
    #[arg(long)]
    json: bool,
}

impl StatArgs {
    fn options(&self) -> StatOptions {
        StatOptions {
            socket: self.api_socket.clone(),
            interval: Duration::from_millis(self.interval),
            count: self.count,
            json: self.json,
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel to boot: an ELF vmlinux, a bzImage, or a Multiboot (v1) 32-bit
    /// ELF (entered in protected mode; --initrd is its module). Without it,
    /// the built-in probe guest boots.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for the kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line. Default for a kernel:
    /// "console=ttyS0 reboot=k panic=1 pci=off"; for the probe guest, its
    /// test selection (see guest-images/probe/README.md).
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MEMORY_MIB)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,
    /// Where the guest's serial console (COM1) goes: stdio, file:PATH or none.
    #[arg(long, value_name = "SINK", default_value = "stdio")]
    serial: SerialSink,
    /// The guest's virtual PMU: auto (on where the host can serve the guest
    /// fully; where guest RDPMC cannot be served, on only for guests that
    /// read counters with RDMSR: the built-in probe, or a kernel with
    /// "perf_read_msr" on its command line), on (forced, with a warning
    /// where RDPMC faults), off (no PMU in CPUID).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = VpmuMode::Auto)]
    vpmu: VpmuMode,
    /// General-purpose counters of the vPMU (default: the best the host backs).
    #[arg(long, value_name = "N")]
    vpmu_gp_counters: Option<u8>,
    /// Fixed counters of the vPMU (Intel only).
    #[arg(long, value_name = "N")]
    vpmu_fixed_counters: Option<u8>,
    /// Architectural PMU version (Intel 1-4; AMD 1 = legacy/PerfCtrExtCore, 2 = PerfMonV2).
    #[arg(long, value_name = "N")]
    vpmu_version: Option<u8>,
    /// Which guest events may reach host perf: a preset (all, arch, ipc,
    /// none) and/or allow:/deny: lists of EVENT[/UMASK], joined by ';'
    /// (e.g. "ipc", "arch;deny:0xc2", "allow:0x76,0xc0"). Denied events
    /// read as not counting.
    #[arg(long, value_name = "POLICY", default_value = "all")]
    vpmu_events: vpmu::EventPolicy,
    /// Serve the host-side API (GET /vpmu, GET /metrics, GET /profile,
    /// PUT /vm/pause, PUT /vm/resume, PUT /vm/snapshot) on this Unix
    /// socket, created with mode 0600.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// The VM's name, in the log, in GET /vpmu and as the `vm` label of
    /// `vmm exporter`: up to 64 letters, digits, '.', '_' or '-', starting
    /// with a letter or digit (default: the --api-socket's file name
    /// without its extension, else "vm").
    #[arg(long, value_name = "NAME")]
    name: Option<VmName>,
    /// What a guest reset does: exit (code 0), or reboot the guest in a
    /// fresh VM, keeping the API, the serial console and the per-VM counter
    /// totals.
    #[arg(long, value_name = "ACTION", value_enum, default_value_t = OnReset::Exit)]
    on_reset: OnReset,
    /// Testing aid: the CPU vendor the guest sees in CPUID (host, amd,
    /// intel), and so the vendor of its vPMU model, with every --vpmu-*
    /// flag meaning what it means for that vendor. The guest still runs on
    /// the host's CPU: under a foreign vendor host perf cannot count the
    /// guest's events, so core cycles are counted by task-clock and other
    /// events are unbacked (reported as such), and guest RDPMC faults.
    #[arg(long, value_name = "VENDOR", value_enum, default_value_t = CpuVendor::Host, hide_short_help = true)]
    cpu_vendor: CpuVendor,
    /// Continue the VM saved in this snapshot (`vmm snapshot`) instead of
    /// booting one: the machine (memory, vCPUs, CPU vendor, vPMU, kernel)
    /// is the snapshot's, so only the host-side flags may be given with it
    /// (--api-socket, --name, --serial, --timeout, --on-reset).
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "memory", "vcpus", "vpmu", "vpmu_gp_counters",
        "vpmu_fixed_counters", "vpmu_version", "vpmu_events", "cpu_vendor",
    ])]
    restore: Option<PathBuf>,
    /// Stop the guest after this many seconds, over all reboots (exit code 3).
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout, allow_negative_numbers = true)]
    timeout: Option<Duration>,
    /// Benchmarks only (BENCHMARKS.md): this MSR exits to the VMM, which
    /// answers reads with 0 (a null userspace MSR exit).
    #[cfg(feature = "bench")]
    #[arg(long, value_name = "INDEX", value_parser = parse_msr, hide = true)]
    bench_msr: Option<u32>,
    /// Benchmarks only: write each vCPU's exit counts at guest marks, PMI
    /// times and TSC pairs to this file when the VM ends.
    #[cfg(feature = "bench")]
    #[arg(long, value_name = "PATH", hide = true)]
    bench_trace: Option<PathBuf>,
}

#[cfg(feature = "bench")]
fn parse_msr(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("expected an MSR index (decimal or 0x hex), got {s:?}"))
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("expected a number of seconds, got {s:?}"))?;
    if !(secs > 0.0 && secs < 1e9) {
        return Err(format!("must be a positive number of seconds, got {s}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl RunArgs {
    fn config(&self) -> VmConfig {
        VmConfig {
            name: self
                .name
                .clone()
                .unwrap_or_else(|| VmName::from_socket(self.api_socket.as_deref())),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            memory_mib: self.memory,
            vcpus: self.vcpus,
            serial: self.serial.clone(),
            timeout: self.timeout,
            vpmu: VpmuOptions {
                mode: self.vpmu,
                gp_counters: self.vpmu_gp_counters,
                fixed_counters: self.vpmu_fixed_counters,
                version: self.vpmu_version,
                events: self.vpmu_events.clone(),
            },
            api_socket: self.api_socket.clone(),
            on_reset: self.on_reset,
            cpu_vendor: self.cpu_vendor,
            #[cfg(feature = "bench")]
            bench: crate::bench::BenchOptions {
                msr: self.bench_msr,
                trace: self.bench_trace.clone(),
            },
        }
    }
}

/// Prints one line for a flag error; clap's own help and version output are
/// printed as they are.
fn report_parse_error(err: clap::Error) -> i32 {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            0
        }
        _ => {
            let rendered = err.render().to_string();
            let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
            let first = lines.next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            // Some messages put their subject on the next line.
            let detail = match first.ends_with(':') {
                true => format!(" {}", lines.next().unwrap_or_default()),
                false => String::new(),
            };
            eprintln!("vmm: {first}{detail} (see vmm --help)");
            2
        }
    }
}

/// Runs `vmm` with `args`; returns the process exit code.
pub fn main_with_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => return report_parse_error(e),
    };
    let run = match &cli.command {
        Some(Command::Run(run)) => run,
        Some(Command::Stat(stat)) => return stat::run(&stat.options()),
        Some(Command::Profile(args)) => return profile::run(&args.options()),
        Some(Command::Exporter(args)) => return exporter::run(&args.options()),
        Some(Command::Snapshot(args)) => {
            return snapshot::run(&args.api_socket, &args.path, args.force, !args.stay_paused)
        }
        Some(Command::Host(args)) => return host::run(args.json),
        Some(Command::Top(args)) => {
            return top::run(&top::TopOptions {
                sockets: args.sockets.clone(),
                interval: Duration::from_millis(args.interval),
                once: args.once,
                sort: args.sort,
            })
        }
        None => &cli.run,
    };
    // First thing: from here on every termination signal ends the VMM
    // cleanly (128+N, socket removed), also while it starts.
    if let Err(e) = crate::vm::signals::install() {
        eprintln!("vmm: installing the signal handlers: {e}");
        return 2;
    }
    match run_vm(run) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmm: {e}");
            e.exit_code()
        }
    }
}

fn run_vm(args: &RunArgs) -> Result<i32, StartError> {
    let started = std::time::Instant::now();
    let config = args.config();
    #[cfg(feature = "bench")]
    crate::bench::prepare(&config.bench)?;
    let vm = match &args.restore {
        Some(path) => {
            #[cfg(feature = "bench")]
            if config.bench.msr.is_some() || config.bench.trace.is_some() {
                return Err(StartError::Config(
                    "--restore takes no benchmark flags".into(),
                ));
            }
            Vm::restore(&config, path)?
        }
        None => Vm::build(&config)?,
    };
    eprintln!("vmm: VM {}", config.name);
    for note in &vm.pmu.notes {
        eprintln!("vmm: {note}");
    }
    eprintln!("vmm: {}", vm.pmu);
    if vm.kernel_kind() == Some(ImageKind::BzImage) {
        eprintln!(
            "vmm: bzImage payload is in a format this VMM does not unpack; entering its own \
             decompressor (slow on nested hosts)"
        );
    }
    if let Some(path) = &args.restore {
        // What the user waits for: the file checked, the VM built, the
        // vCPUs about to enter the guest.
        eprintln!(
            "vmm: restored from {} in {:.1} ms",
            path.display(),
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    let (outcome, reports) = vm.run()?;
    for report in &reports {
        if let Some((snapshot, delivery)) = &report.vpmu {
            let s = &snapshot.stats;
            eprintln!(
                "vmm: vCPU {} vPMU: {} MSR reads, {} writes, {} #GP, {} perf_event_open, \
                 {} PMIs ({} NMI, {} fixed, {} masked), {} throttled, {} exits to the VMM \
                 ({} MSR, {} port I/O, {} signal)",
                report.index,
                s.rdmsr.total(),
                s.wrmsr.total(),
                s.faults,
                s.opens,
                s.pmis,
                delivery.nmi,
                delivery.fixed,
                delivery.masked,
                s.throttles,
                report.exits.total(),
                report.exits.msr_read + report.exits.msr_write,
                report.exits.io,
                report.exits.signal
            );
        }
    }
    if matches!(
        outcome,
        Outcome::Timeout { .. } | Outcome::Terminated { .. }
    ) {
        // Where a guest that did not stop by itself was (a hang's address).
        for report in &reports {
            if let Some(rip) = report.rip {
                eprintln!("vmm: vCPU {} was at RIP {rip:#x}", report.index);
            }
        }
    }
    #[cfg(feature = "bench")]
    crate::bench::finish(&config.bench, &reports)?;
    eprintln!("vmm: {outcome}");
    Ok(outcome.exit_code())
}
