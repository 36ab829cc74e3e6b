//! `vmm profile`: where the guest spends its time, seen from the host.
//!
//! For the length of a profile every vCPU thread samples itself with its
//! own host event (guest-only cycles where the host has a PMU, else its
//! task clock), whose overflow signal already brings it out of `KVM_RUN`
//! (`kick`). At each sample it reads the guest's RIP and privilege level
//! and walks the guest kernel's stack by frame pointers through guest
//! memory ([`walk`]); user-mode samples keep only the page-table root.
//! The API thread that asked ([`Hub::run`]) collects what each vCPU
//! gathered, names kernel frames ([`symbols`]) and answers `GET /profile`
//! with a [`Profile`]; `vmm profile` (`cli::profile`) turns it into folded
//! stacks, a flame graph or a table ([`output`]).
//!
//! Owns: sessions, per-vCPU sampling, guest page walks, symbols and the
//! output formats. May use `vcpu` (its control block, kicks and the
//! sampler trait); knows nothing of the API that serves it or the VM that
//! builds it (the probe's ELF is handed to [`Hub::new`]).
//!
//! The vCPU knows its sampler only as a [`crate::vcpu::GuestSampler`]
//! called before each entry: without a profile running that is one atomic
//! load.

pub mod output;
pub mod symbols;
pub mod vcpu;
pub mod walk;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use devices::sync::Recover;
use serde::{Deserialize, Serialize};

use crate::vcpu::control::VmControl;
use symbols::Symbols;
use walk::End;

/// Longest profile.
pub const MAX_SECONDS: f64 = 300.0;
/// Highest sampling frequency per vCPU.
pub const MAX_HZ: u32 = 10_000;
pub const DEFAULT_SECONDS: f64 = 5.0;
pub const DEFAULT_HZ: u32 = 999;
/// Distinct stacks one vCPU keeps in one profile; samples of further ones
/// are counted as dropped.
pub const MAX_STACKS: usize = 16_384;
/// How long, after a profile's end, the vCPUs get to hand in their samples.
const COLLECT_WAIT: Duration = Duration::from_secs(2);

/// A profile asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Request {
    pub seconds: f64,
    pub hz: u32,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            seconds: DEFAULT_SECONDS,
            hz: DEFAULT_HZ,
        }
    }
}

/// A bad profile request.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("seconds must be a number above 0 and at most {MAX_SECONDS}, got {0:?}")]
    Seconds(String),
    #[error("hz must be a whole number from 1 to {MAX_HZ}, got {0:?}")]
    Hz(String),
    #[error("unknown parameter {0:?} (expected seconds and hz)")]
    Unknown(String),
}

/// `seconds` as a duration, if it is one a profile may last.
pub fn parse_seconds(s: &str) -> Result<f64, RequestError> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= MAX_SECONDS => Ok(v),
        _ => Err(RequestError::Seconds(s.to_string())),
    }
}

/// `hz` as a sampling frequency, if it is one a profile may use.
pub fn parse_hz(s: &str) -> Result<u32, RequestError> {
    match s.parse::<u32>() {
        Ok(v) if (1..=MAX_HZ).contains(&v) => Ok(v),
        _ => Err(RequestError::Hz(s.to_string())),
    }
}

impl Request {
    /// Parses the query of `GET /profile?seconds=N&hz=F` (both optional).
    pub fn from_query(query: &str) -> Result<Request, RequestError> {
        let mut request = Request::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "seconds" => request.seconds = parse_seconds(value)?,
                "hz" => request.hz = parse_hz(value)?,
                _ => return Err(RequestError::Unknown(key.to_string())),
            }
        }
        Ok(request)
    }

    /// The query string of this request.
    pub fn query(&self) -> String {
        format!("seconds={}&hz={}", self.seconds, self.hz)
    }
}

/// Why a profile could not run.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("a profile is already running")]
    Busy,
    #[error("the VM is paused")]
    Paused,
    #[error("the VM is stopping")]
    Stopping,
}

/// What a sample is filed under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StackKey {
    /// Guest user mode: only the page-table root.
    User { cr3: u64 },
    /// Guest kernel mode: the walk (RIP first) and how it ended.
    Kernel { frames: Box<[u64]>, end: End },
    /// Past [`MAX_STACKS`] distinct stacks.
    Dropped,
}

/// What one vCPU gathered in one profile.
#[derive(Clone, Debug, Default)]
pub struct VcpuPart {
    pub stacks: HashMap<StackKey, u64>,
    pub summary: VcpuSummary,
}

/// One vCPU's share of a profile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VcpuSummary {
    pub vcpu: u8,
    /// Whether the vCPU handed in its samples (a paused or stopped one may
    /// not).
    pub answered: bool,
    /// What its sampling event counted: `task-clock` or `cycles (guest
    /// only)`; empty if none could be opened.
    pub source: String,
    /// Why it could not sample, if it could not.
    pub error: Option<String>,
    pub samples: u64,
    pub user: u64,
    pub truncated: u64,
    /// Samples past [`MAX_STACKS`] distinct stacks.
    pub dropped: u64,
    /// Periods that elapsed without a sample of their own (their signals
    /// merged).
    pub missed_periods: u64,
    /// The time the event covered: task-clock time, or guest cycles at the
    /// TSC rate.
    pub run_ms: f64,
    /// Caller frames walked (the sampled RIP not counted).
    pub frames: u64,
    /// VMM time spent sampling (event read, registers, walk, filing).
    pub sample_ns: u64,
    /// Of which walking stacks.
    pub walk_ns: u64,
    pub max_sample_ns: u64,
    /// `MSR_LSTAR` as last read.
    pub lstar: Option<Hex>,
}

/// A u64 shown (and parsed) as a `0x` hex string: kernel addresses do not
/// survive a JSON number in every reader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hex(pub u64);

impl Serialize for Hex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:#x}", self.0))
    }
}

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let digits = s.strip_prefix("0x").unwrap_or(&s);
        u64::from_str_radix(digits, 16)
            .map(Hex)
            .map_err(|_| serde::de::Error::custom(format!("not a hex number: {s:?}")))
    }
}

/// One distinct stack of a profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stack {
    pub count: u64,
    /// `kernel`, `user` or `dropped`.
    pub mode: String,
    /// User mode: the page-table root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cr3: Option<Hex>,
    /// Kernel mode: the sampled RIP, then each caller (see
    /// [`walk::Stack`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<Hex>,
    /// The frames' function names (`[unknown]` where none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Why the walk stopped early, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<String>,
}

/// What `GET /profile` answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub seconds: f64,
    pub hz: u32,
    pub vcpus: usize,
    pub samples: u64,
    /// seconds x hz x vCPUs.
    pub expected: u64,
    /// Where the frames' names came from, or why there are none.
    pub symbols: String,
    /// How the KASLR offset was found (or why none was applied).
    pub kaslr: String,
    pub kaslr_offset: Hex,
    pub per_vcpu: Vec<VcpuSummary>,
    /// Most frequent first.
    pub stacks: Vec<Stack>,
}

pub const MODE_KERNEL: &str = "kernel";
pub const MODE_USER: &str = "user";
pub const MODE_DROPPED: &str = "dropped";

impl Profile {
    /// Builds the answer from what each vCPU handed in (`None`: nothing).
    pub fn from_parts(request: Request, parts: Vec<Option<VcpuPart>>) -> Profile {
        let mut merged: HashMap<StackKey, u64> = HashMap::new();
        let mut per_vcpu = Vec::with_capacity(parts.len());
        for (index, part) in parts.into_iter().enumerate() {
            match part {
                Some(part) => {
                    for (key, count) in part.stacks {
                        *merged.entry(key).or_default() += count;
                    }
                    per_vcpu.push(part.summary);
                }
                None => per_vcpu.push(VcpuSummary {
                    vcpu: index as u8,
                    ..Default::default()
                }),
            }
        }
        let mut stacks: Vec<Stack> = merged
            .into_iter()
            .map(|(key, count)| match key {
                StackKey::User { cr3 } => Stack {
                    count,
                    mode: MODE_USER.into(),
                    cr3: Some(Hex(cr3)),
                    frames: Vec::new(),
                    names: Vec::new(),
                    truncated: None,
                },
                StackKey::Kernel { frames, end } => Stack {
                    count,
                    mode: MODE_KERNEL.into(),
                    cr3: None,
                    frames: frames.iter().map(|&f| Hex(f)).collect(),
                    names: Vec::new(),
                    truncated: end.truncation().map(String::from),
                },
                StackKey::Dropped => Stack {
                    count,
                    mode: MODE_DROPPED.into(),
                    cr3: None,
                    frames: Vec::new(),
                    names: Vec::new(),
                    truncated: None,
                },
            })
            .collect();
        stacks.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.frames.cmp(&b.frames)));
        let vcpus = per_vcpu.len();
        Profile {
            seconds: request.seconds,
            hz: request.hz,
            vcpus,
            samples: stacks.iter().map(|s| s.count).sum(),
            expected: (request.seconds * f64::from(request.hz) * vcpus as f64).round() as u64,
            symbols: String::new(),
            kaslr: String::new(),
            kaslr_offset: Hex(0),
            per_vcpu,
            stacks,
        }
    }

    /// The first non-zero `MSR_LSTAR` a vCPU reported.
    pub fn lstar(&self) -> Option<u64> {
        self.per_vcpu
            .iter()
            .filter_map(|v| v.lstar)
            .map(|h| h.0)
            .find(|&l| l != 0)
    }

    /// Passes every text of the profile (what the sampling was, why not,
    /// names, modes, truncation reasons) through `f`: a client makes what a
    /// server sent safe to print with it.
    pub fn map_text(&mut self, f: impl Fn(&str) -> String) {
        self.symbols = f(&self.symbols);
        self.kaslr = f(&self.kaslr);
        for v in &mut self.per_vcpu {
            v.source = f(&v.source);
            v.error = v.error.as_deref().map(&f);
        }
        for stack in &mut self.stacks {
            stack.mode = f(&stack.mode);
            stack.truncated = stack.truncated.as_deref().map(&f);
            stack.names.iter_mut().for_each(|n| *n = f(n));
        }
    }

    /// Names every kernel frame with `symbols` (moved by the KASLR offset
    /// `MSR_LSTAR` shows), or says why frames have no names (`why_none`).
    pub fn name_frames(&mut self, symbols: Result<&Symbols, String>) {
        let symbols = match symbols {
            Ok(symbols) => symbols,
            Err(why_none) => {
                self.symbols = why_none;
                self.kaslr = "no symbols: no KASLR offset".into();
                for stack in &mut self.stacks {
                    stack.names = stack.frames.iter().map(|_| UNKNOWN.to_string()).collect();
                }
                return;
            }
        };
        let relocation = symbols::relocation(symbols, self.lstar());
        self.symbols = format!("{} symbols from {}", symbols.len(), symbols.origin());
        self.kaslr = relocation.note;
        self.kaslr_offset = Hex(relocation.offset);
        for stack in &mut self.stacks {
            stack.names = stack
                .frames
                .iter()
                .map(|f| {
                    symbols
                        .lookup(f.0.wrapping_sub(relocation.offset))
                        .unwrap_or(UNKNOWN)
                        .to_string()
                })
                .collect();
        }
    }
}

/// The name of a frame no symbol covers.
pub const UNKNOWN: &str = "[unknown]";

/// Where the server names kernel frames from.
#[derive(Clone, Debug)]
pub enum KernelImage {
    /// The built-in probe guest: its embedded ELF.
    Probe(&'static [u8]),
    /// `--kernel`: an ELF's symbol table (read when the first profile
    /// asks), or none in a bzImage.
    File(PathBuf),
}

/// A profile in progress: what the vCPUs read when they join, and where
/// they hand in their samples.
struct Session {
    id: u64,
    hz: u32,
    deadline: Instant,
    parts: Vec<Option<VcpuPart>>,
}

/// What a vCPU needs to sample for session `id`.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub id: u64,
    pub hz: u32,
    pub deadline: Instant,
}

/// The profiles of one VM: shared by the API, which runs them, and every
/// vCPU's sampler, across guest reboots.
pub struct Hub {
    vcpus: usize,
    /// Id of the running session; 0: none. What a vCPU checks per entry.
    active: AtomicU64,
    next_id: AtomicU64,
    session: Mutex<Option<Session>>,
    kernel: KernelImage,
    symbols: OnceLock<Result<Arc<Symbols>, String>>,
}

impl Hub {
    pub fn new(vcpus: usize, kernel: KernelImage) -> Self {
        Self {
            vcpus,
            active: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            session: Mutex::new(None),
            kernel,
            symbols: OnceLock::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Session>> {
        self.session.lock().recover()
    }

    /// The running session's id (0: none): one atomic load.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Acquire)
    }

    /// What session `id` asks, if it is still the running one.
    pub fn params(&self, id: u64) -> Option<Params> {
        let session = self.lock();
        let s = session.as_ref().filter(|s| s.id == id)?;
        Some(Params {
            id,
            hz: s.hz,
            deadline: s.deadline,
        })
    }

    /// vCPU `vcpu` hands in what it gathered for session `id` (dropped if
    /// that session is over). A vCPU rebuilt by a guest reboot may hand in
    /// twice: the parts merge.
    pub fn deposit(&self, id: u64, vcpu: u8, part: VcpuPart) {
        let mut session = self.lock();
        let Some(slot) = session
            .as_mut()
            .filter(|s| s.id == id)
            .and_then(|s| s.parts.get_mut(usize::from(vcpu)))
        else {
            return;
        };
        match slot {
            None => *slot = Some(part),
            Some(have) => {
                for (key, count) in part.stacks {
                    *have.stacks.entry(key).or_default() += count;
                }
                have.summary.absorb(&part.summary);
            }
        }
    }

    /// Runs a profile of `request` and returns it: every vCPU samples
    /// until the deadline, then hands in its samples (waiting at most
    /// 2 s more for them). Blocks the calling (API) thread.
    pub fn run(&self, request: Request, control: &VmControl) -> Result<Profile, ProfileError> {
        if control.stopping() {
            return Err(ProfileError::Stopping);
        }
        if control.pause_requested() {
            return Err(ProfileError::Paused);
        }
        let length = Duration::from_secs_f64(request.seconds);
        {
            let mut session = self.lock();
            if session.is_some() {
                return Err(ProfileError::Busy);
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            *session = Some(Session {
                id,
                hz: request.hz,
                deadline: Instant::now() + length,
                parts: vec![None; self.vcpus],
            });
            self.active.store(id, Ordering::Release);
        }
        // Every vCPU joins at its next exit; this makes that now.
        control.kick_all();
        let deadline = Instant::now() + length;
        while Instant::now() < deadline && !control.stopping() {
            let left = deadline.saturating_duration_since(Instant::now());
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
        self.active.store(0, Ordering::Release);
        control.kick_all();
        let collect_until = Instant::now() + COLLECT_WAIT;
        while Instant::now() < collect_until && !self.all_handed_in() {
            std::thread::sleep(Duration::from_millis(2));
        }
        let parts = self.lock().take().map(|s| s.parts).unwrap_or_default();
        let mut profile = Profile::from_parts(request, parts);
        profile.name_frames(self.kernel_symbols().as_deref().map_err(Clone::clone));
        Ok(profile)
    }

    fn all_handed_in(&self) -> bool {
        self.lock()
            .as_ref()
            .is_none_or(|s| s.parts.iter().all(Option::is_some))
    }

    /// The kernel's symbols, read once.
    fn kernel_symbols(&self) -> &Result<Arc<Symbols>, String> {
        self.symbols.get_or_init(|| {
            let symbols = match &self.kernel {
                KernelImage::Probe(elf) => Symbols::from_elf(elf, "the built-in probe guest"),
                KernelImage::File(path) if symbols::is_elf(path) => Symbols::load(path),
                KernelImage::File(path) => {
                    return Err(format!(
                        "no symbols: --kernel {} is a bzImage, which has no symbol table \
                         (vmm profile --symbols takes its vmlinux or System.map)",
                        path.display()
                    ))
                }
            };
            symbols.map(Arc::new).map_err(|e| {
                format!("no symbols: {e} (vmm profile --symbols takes a vmlinux or System.map)")
            })
        })
    }
}

impl VcpuSummary {
    /// Adds a later part of the same vCPU (after a guest reboot).
    fn absorb(&mut self, other: &VcpuSummary) {
        self.samples += other.samples;
        self.user += other.user;
        self.truncated += other.truncated;
        self.dropped += other.dropped;
        self.missed_periods += other.missed_periods;
        self.run_ms += other.run_ms;
        self.frames += other.frames;
        self.sample_ns += other.sample_ns;
        self.walk_ns += other.walk_ns;
        self.max_sample_ns = self.max_sample_ns.max(other.max_sample_ns);
        self.lstar = other.lstar.or(self.lstar);
        if self.error.is_none() {
            self.error = other.error.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_bounded_and_checked() {
        assert_eq!(Request::from_query(""), Ok(Request::default()));
        assert_eq!(
            Request::from_query("seconds=2.5&hz=99"),
            Ok(Request {
                seconds: 2.5,
                hz: 99
            })
        );
        for bad in [
            "seconds=0",
            "seconds=-1",
            "seconds=301",
            "seconds=NaN",
            "seconds=inf",
            "seconds=",
            "seconds=abc",
        ] {
            assert!(
                matches!(Request::from_query(bad), Err(RequestError::Seconds(_))),
                "{bad}"
            );
        }
        for bad in ["hz=0", "hz=10001", "hz=1.5", "hz=-3", "hz"] {
            assert!(
                matches!(Request::from_query(bad), Err(RequestError::Hz(_))),
                "{bad}"
            );
        }
        assert_eq!(
            Request::from_query("seconds=1&frequency=9"),
            Err(RequestError::Unknown("frequency".into()))
        );
        let r = Request {
            seconds: 0.5,
            hz: 4999,
        };
        assert_eq!(Request::from_query(&r.query()), Ok(r));
    }

    fn part(vcpu: u8, stacks: &[(StackKey, u64)]) -> VcpuPart {
        VcpuPart {
            stacks: stacks.iter().cloned().collect(),
            summary: VcpuSummary {
                vcpu,
                answered: true,
                samples: stacks.iter().map(|s| s.1).sum(),
                lstar: Some(Hex(0)),
                ..Default::default()
            },
        }
    }

    fn kernel(frames: &[u64], end: End) -> StackKey {
        StackKey::Kernel {
            frames: frames.into(),
            end,
        }
    }

    #[test]
    fn parts_merge_into_one_profile_most_frequent_first() {
        let req = Request {
            seconds: 2.0,
            hz: 100,
        };
        let p = Profile::from_parts(
            req,
            vec![
                Some(part(
                    0,
                    &[
                        (kernel(&[0x10, 0x20], End::Complete), 5),
                        (StackKey::User { cr3: 0x9000 }, 2),
                    ],
                )),
                Some(part(
                    1,
                    &[
                        (kernel(&[0x10, 0x20], End::Complete), 7),
                        (kernel(&[0x30], End::Cycle), 1),
                    ],
                )),
                None,
            ],
        );
        assert_eq!((p.samples, p.expected, p.vcpus), (15, 600, 3));
        assert_eq!(p.stacks[0].count, 12);
        assert_eq!(p.stacks[0].frames, vec![Hex(0x10), Hex(0x20)]);
        assert_eq!(p.stacks[1].mode, MODE_USER);
        assert_eq!(
            p.stacks[2].truncated.as_deref(),
            Some("frame-pointer cycle")
        );
        assert!(!p.per_vcpu[2].answered);
        // Through JSON and back: hex addresses, nothing lost.
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains("\"0x10\""), "{json}");
        assert_eq!(serde_json::from_str::<Profile>(&json).unwrap(), p);
    }

    #[test]
    fn frames_are_named_or_marked_unknown() {
        let map = "0000000000001000 T hot\n0000000000002000 T caller\n";
        let symbols = Symbols::from_system_map(map, "m").unwrap();
        let req = Request {
            seconds: 1.0,
            hz: 1,
        };
        let mut p = Profile::from_parts(
            req,
            vec![Some(part(
                0,
                &[(kernel(&[0x1004, 0x2010, 0x10], End::Complete), 1)],
            ))],
        );
        p.name_frames(Ok(&symbols));
        assert_eq!(p.stacks[0].names, vec!["hot", "caller", UNKNOWN]);
        assert!(p.symbols.contains("2 symbols"), "{}", p.symbols);
        assert!(p.kaslr.contains("MSR_LSTAR is 0"), "{}", p.kaslr);
        p.name_frames(Err("no symbols: a bzImage".into()));
        assert_eq!(p.stacks[0].names, vec![UNKNOWN; 3]);
        assert_eq!(p.symbols, "no symbols: a bzImage");
    }

    #[test]
    fn a_hub_takes_one_profile_at_a_time_and_merges_late_parts() {
        let hub = Hub::new(
            2,
            KernelImage::Probe(include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"))),
        );
        let control = VmControl::new(2).unwrap();
        assert_eq!(hub.active(), 0);
        let hub = Arc::new(hub);
        let runner = {
            let hub = hub.clone();
            std::thread::spawn(move || {
                let control = VmControl::new(2).unwrap();
                hub.run(
                    Request {
                        seconds: 0.3,
                        hz: 10,
                    },
                    &control,
                )
            })
        };
        while hub.active() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            hub.run(
                Request {
                    seconds: 0.1,
                    hz: 10
                },
                &control
            ),
            Err(ProfileError::Busy)
        );
        let id = hub.active();
        let params = hub.params(id).unwrap();
        assert_eq!(params.hz, 10);
        let key = kernel(&[0x201000], End::Complete);
        hub.deposit(id, 0, part(0, &[(key.clone(), 2)]));
        hub.deposit(id, 0, part(0, &[(key, 3)]));
        hub.deposit(id + 1, 1, part(1, &[(StackKey::Dropped, 1)]));
        let p = runner.join().unwrap().unwrap();
        assert_eq!(p.samples, 5);
        assert_eq!(p.per_vcpu[0].samples, 5);
        assert!(
            !p.per_vcpu[1].answered,
            "a part of another session is dropped"
        );
        assert!(p.symbols.contains("probe"), "{}", p.symbols);
        assert_eq!(hub.active(), 0);
        assert!(hub.params(id).is_none());
    }
}
