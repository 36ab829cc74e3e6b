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
//! builds it (each boot hands what it booted to [`Hub::booted`]).
//!
//! The vCPU knows its sampler only as a [`crate::vcpu::GuestSampler`]
//! called before each entry: without a profile running that is one atomic
//! load.

pub mod output;
pub mod symbols;
pub mod vcpu;
pub mod walk;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
/// Frames (addresses) of distinct stacks one vCPU keeps in one profile
/// (2 MiB); samples of further new stacks are counted as dropped.
pub const MAX_VCPU_FRAMES: usize = 1 << 18;
/// Frames of distinct stacks all vCPUs together keep in one profile
/// (8 MiB), whatever the number of vCPUs.
pub const MAX_SESSION_FRAMES: usize = 1 << 20;
/// Frames in one answer: the most frequent stacks are kept, the others
/// merged into the `dropped` stack.
pub const MAX_ANSWER_FRAMES: usize = 1 << 17;
/// Bytes of one answer (its JSON, as estimated while it is named): well
/// within what `vmm profile` takes (64 MiB).
pub const MAX_ANSWER_BYTES: usize = 16 << 20;
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
    /// The client that asked went away before the end: the profile was
    /// cut short, and nobody is left to answer.
    #[error("the client went away")]
    ClientGone,
}

/// What a sample is filed under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StackKey {
    /// Guest user mode: only the page-table root.
    User { cr3: u64 },
    /// Guest kernel mode: the walk (RIP first) and how it ended.
    Kernel { frames: Box<[u64]>, end: End },
    /// Past [`MAX_STACKS`] distinct stacks, or [`MAX_VCPU_FRAMES`] or
    /// [`MAX_SESSION_FRAMES`] frames of them.
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
    /// Samples of new stacks past this vCPU's bounds ([`MAX_STACKS`],
    /// [`MAX_VCPU_FRAMES`]) or the profile's ([`MAX_SESSION_FRAMES`]).
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
    /// The length asked.
    pub seconds: f64,
    /// The length sampled: shorter when the VM ended first (0: as asked,
    /// from a VMM that did not say).
    #[serde(default)]
    pub elapsed: f64,
    pub hz: u32,
    pub vcpus: usize,
    pub samples: u64,
    /// elapsed x hz x vCPUs.
    pub expected: u64,
    /// Distinct stacks left out of the answer to keep it within
    /// [`MAX_ANSWER_FRAMES`] and [`MAX_ANSWER_BYTES`] (the least frequent),
    /// their samples counted in the `dropped` stack.
    #[serde(default)]
    pub merged_stacks: u64,
    /// The samples of those stacks.
    #[serde(default)]
    pub merged_samples: u64,
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
                StackKey::Dropped => Stack::dropped(count),
            })
            .collect();
        sort_stacks(&mut stacks);
        let vcpus = per_vcpu.len();
        Profile {
            seconds: request.seconds,
            elapsed: request.seconds,
            hz: request.hz,
            vcpus,
            samples: stacks.iter().map(|s| s.count).sum(),
            expected: (request.seconds * f64::from(request.hz) * vcpus as f64).round() as u64,
            merged_stacks: 0,
            merged_samples: 0,
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

    /// Sampling ran for `seconds` only (the VM ended first).
    fn ran_for(&mut self, seconds: f64) {
        self.elapsed = seconds.min(self.seconds);
        let per_second = f64::from(self.hz) * self.vcpus as f64;
        self.expected = (self.elapsed * per_second).round() as u64;
    }

    /// The length sampled.
    pub fn length(&self) -> f64 {
        match self.elapsed > 0.0 {
            true => self.elapsed,
            false => self.seconds,
        }
    }

    /// Samples in the `dropped` stack: past a vCPU's or the profile's
    /// bounds, or merged to keep the answer small.
    pub fn dropped(&self) -> u64 {
        self.stacks
            .iter()
            .filter(|s| s.mode == MODE_DROPPED)
            .map(|s| s.count)
            .sum()
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
        self.name_within(symbols, usize::MAX, usize::MAX);
    }

    /// [`Profile::name_frames`], keeping the most frequent stacks within
    /// `max_frames` frames and about `max_bytes` of JSON; the others are
    /// merged into the `dropped` stack ([`Profile::merged_stacks`]).
    pub fn name_within(
        &mut self,
        symbols: Result<&Symbols, String>,
        max_frames: usize,
        max_bytes: usize,
    ) {
        let (symbols, offset) = match symbols {
            Ok(symbols) => {
                let relocation = symbols::relocation(symbols, self.lstar());
                self.symbols = format!("{} symbols from {}", symbols.len(), symbols.origin());
                self.kaslr = relocation.note;
                self.kaslr_offset = Hex(relocation.offset);
                (Some(symbols), relocation.offset)
            }
            Err(why_none) => {
                self.symbols = why_none;
                self.kaslr = "no symbols: no KASLR offset".into();
                (None, 0)
            }
        };
        let name = |f: &Hex| {
            symbols
                .and_then(|s| s.lookup(f.0.wrapping_sub(offset)))
                .unwrap_or(UNKNOWN)
                .to_string()
        };
        let (mut frames, mut bytes) = (0usize, 0usize);
        for (i, stack) in self.stacks.iter_mut().enumerate() {
            stack.names = stack.frames.iter().map(name).collect();
            frames = frames.saturating_add(stack.frames.len());
            bytes = bytes.saturating_add(stack.json_estimate());
            if stack.mode != MODE_DROPPED && (frames > max_frames || bytes > max_bytes) {
                self.merge_from(i);
                return;
            }
        }
    }

    /// Merges the stacks from index `first` on into the `dropped` stack.
    fn merge_from(&mut self, first: usize) {
        let mut dropped = 0;
        for stack in self.stacks.split_off(first) {
            dropped += stack.count;
            if stack.mode != MODE_DROPPED {
                self.merged_stacks += 1;
                self.merged_samples += stack.count;
            }
        }
        match self.stacks.iter_mut().find(|s| s.mode == MODE_DROPPED) {
            Some(stack) => stack.count += dropped,
            None => self.stacks.push(Stack::dropped(dropped)),
        }
        sort_stacks(&mut self.stacks);
    }
}

/// Most frequent first; ties by address.
fn sort_stacks(stacks: &mut [Stack]) {
    stacks.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.frames.cmp(&b.frames)));
}

impl Stack {
    fn dropped(count: u64) -> Stack {
        Stack {
            count,
            mode: MODE_DROPPED.into(),
            cr3: None,
            frames: Vec::new(),
            names: Vec::new(),
            truncated: None,
        }
    }

    /// About how many bytes this stack takes in the answer's (indented)
    /// JSON, at least.
    fn json_estimate(&self) -> usize {
        let text = |s: &str| {
            let escaped = s
                .bytes()
                .filter(|&b| b < 0x20 || b == b'"' || b == b'\\')
                .count();
            s.len() + 5 * escaped + 16
        };
        160 + self.frames.len() * 40 + self.names.iter().map(|n| text(n)).sum::<usize>()
    }
}

/// The name of a frame no symbol covers.
pub const UNKNOWN: &str = "[unknown]";

/// Where the server names kernel frames from: what was booted.
#[derive(Debug)]
pub enum KernelImage {
    /// The built-in probe guest: its embedded ELF.
    Probe(&'static [u8]),
    /// `--kernel` as it was booted: an ELF's symbol table (read when the
    /// first profile asks), or none in a bzImage.
    File(BootedFile),
}

/// The `--kernel` file a boot read: its descriptor, kept open, so that
/// whatever the path names later (a FIFO, a rebuilt kernel) is never read,
/// and what the file was then, so that a kernel rewritten in place is
/// noticed.
#[derive(Debug)]
pub struct BootedFile {
    path: PathBuf,
    file: File,
    stamp: Option<Stamp>,
}

/// What a file was: its identity, size and modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl Stamp {
    fn of(file: &File) -> Option<Stamp> {
        let m = file.metadata().ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }
}

impl KernelImage {
    /// `--kernel` `path`, booted from `file` (opened and read by the boot).
    pub fn booted(path: PathBuf, file: File) -> KernelImage {
        let stamp = Stamp::of(&file);
        KernelImage::File(BootedFile { path, file, stamp })
    }

    /// Whether `other` is this image again (a reboot of the same kernel).
    fn same(&self, other: &KernelImage) -> bool {
        match (self, other) {
            (KernelImage::Probe(a), KernelImage::Probe(b)) => std::ptr::eq(*a, *b),
            (KernelImage::File(a), KernelImage::File(b)) => a.stamp.is_some() && a.stamp == b.stamp,
            _ => false,
        }
    }

    /// Its symbols, or why there are none.
    fn symbols(&self) -> Result<Symbols, String> {
        const FOR_SYMBOLS: &str = "vmm profile --symbols takes a vmlinux or System.map";
        let booted = match self {
            KernelImage::Probe(elf) => {
                return Symbols::from_elf(elf, "the built-in probe guest")
                    .map_err(|e| format!("no symbols: {e}"))
            }
            KernelImage::File(booted) => booted,
        };
        let path = booted.path.display();
        let changed = || Stamp::of(&booted.file) != booted.stamp;
        if changed() {
            return Err(format!(
                "no symbols: --kernel {path} was changed after it was booted ({FOR_SYMBOLS})"
            ));
        }
        let mut magic = [0u8; 4];
        let elf = booted.file.read_exact_at(&mut magic, 0).is_ok() && &magic == symbols::ELF_MAGIC;
        if !elf {
            return Err(format!(
                "no symbols: --kernel {path} is a bzImage, which has no symbol table \
                 ({FOR_SYMBOLS})"
            ));
        }
        let read = Symbols::from_file(&booted.file, &path.to_string());
        match read {
            _ if changed() => Err(format!(
                "no symbols: --kernel {path} was changed after it was booted ({FOR_SYMBOLS})"
            )),
            Ok(symbols) => Ok(symbols),
            Err(e) => Err(format!("no symbols: {e} ({FOR_SYMBOLS})")),
        }
    }
}

/// The booted kernel, and its symbols once read.
struct Kernel {
    image: Arc<KernelImage>,
    symbols: Option<Result<Arc<Symbols>, String>>,
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
    /// Frames the running session's vCPUs may still keep in new stacks
    /// (of [`MAX_SESSION_FRAMES`]).
    frames_left: AtomicUsize,
    kernel: Mutex<Option<Kernel>>,
}

impl Hub {
    /// The profiles of a VM of `vcpus` vCPUs; each boot says what it booted
    /// ([`Hub::booted`]).
    pub fn new(vcpus: usize) -> Self {
        Self {
            vcpus,
            active: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            session: Mutex::new(None),
            frames_left: AtomicUsize::new(0),
            kernel: Mutex::new(None),
        }
    }

    /// A boot loaded `image`: frames are named from it from now on (its
    /// symbols read again only if it is another file than before).
    pub fn booted(&self, image: KernelImage) {
        let mut kernel = self.kernel.lock().recover();
        if kernel.as_ref().is_some_and(|k| k.image.same(&image)) {
            return;
        }
        *kernel = Some(Kernel {
            image: Arc::new(image),
            symbols: None,
        });
    }

    /// Takes `frames` of the running session's [`MAX_SESSION_FRAMES`] for a
    /// new stack; false when too few are left.
    pub fn take_frames(&self, frames: usize) -> bool {
        self.frames_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(frames)
            })
            .is_ok()
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
    /// until the deadline (or the VM's end), then hands in its samples
    /// (waiting at most 2 s more for them). Blocks the calling (API)
    /// thread. `gone` says whether the client that asked has gone away,
    /// which ends the profile at once.
    pub fn run(
        &self,
        request: Request,
        control: &VmControl,
        gone: &dyn Fn() -> bool,
    ) -> Result<Profile, ProfileError> {
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
            self.frames_left
                .store(MAX_SESSION_FRAMES, Ordering::Relaxed);
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
        let started = Instant::now();
        let deadline = started + length;
        let mut left_early = false;
        while Instant::now() < deadline && !control.stopping() {
            if gone() {
                left_early = true;
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
        let elapsed = started.elapsed().as_secs_f64();
        self.active.store(0, Ordering::Release);
        control.kick_all();
        if left_early {
            self.lock().take();
            return Err(ProfileError::ClientGone);
        }
        let collect_until = Instant::now() + COLLECT_WAIT;
        while Instant::now() < collect_until && !self.all_handed_in() {
            std::thread::sleep(Duration::from_millis(2));
        }
        let parts = self.lock().take().map(|s| s.parts).unwrap_or_default();
        let mut profile = Profile::from_parts(request, parts);
        profile.ran_for(elapsed);
        let symbols = self.kernel_symbols();
        let symbols = symbols.as_deref().map_err(Clone::clone);
        profile.name_within(symbols, MAX_ANSWER_FRAMES, MAX_ANSWER_BYTES);
        Ok(profile)
    }

    fn all_handed_in(&self) -> bool {
        self.lock()
            .as_ref()
            .is_none_or(|s| s.parts.iter().all(Option::is_some))
    }

    /// The booted kernel's symbols, read once per kernel (not under the
    /// lock: a reboot never waits for them).
    fn kernel_symbols(&self) -> Result<Arc<Symbols>, String> {
        let image = match &*self.kernel.lock().recover() {
            None => return Err("no symbols: no kernel booted".into()),
            Some(Kernel {
                symbols: Some(symbols),
                ..
            }) => return symbols.clone(),
            Some(kernel) => kernel.image.clone(),
        };
        let symbols = image.symbols().map(Arc::new);
        if let Some(kernel) = &mut *self.kernel.lock().recover() {
            if Arc::ptr_eq(&kernel.image, &image) {
                kernel.symbols = Some(symbols.clone());
            }
        }
        symbols
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

    const PROBE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"));

    #[test]
    fn a_client_that_goes_away_ends_the_profile_and_frees_the_hub() {
        let hub = Hub::new(1);
        let control = VmControl::new(1).unwrap();
        let asked = Instant::now();
        let long = Request {
            seconds: 30.0,
            hz: 10,
        };
        let gone = || asked.elapsed() > Duration::from_millis(200);
        assert_eq!(
            hub.run(long, &control, &gone),
            Err(ProfileError::ClientGone)
        );
        assert!(asked.elapsed() < Duration::from_secs(5));
        assert_eq!(hub.active(), 0);
        let short = Request {
            seconds: 0.1,
            hz: 10,
        };
        let p = hub.run(short, &control, &|| false).unwrap();
        assert!(p.symbols.contains("no kernel booted"), "{}", p.symbols);
    }

    #[test]
    fn answers_keep_the_most_frequent_stacks_within_their_bounds() {
        let req = Request {
            seconds: 1.0,
            hz: 100,
        };
        // 100 distinct 64-frame stacks, stack i sampled i + 1 times, and 3
        // samples already dropped by a vCPU.
        let mut stacks: Vec<(StackKey, u64)> = (0..100u64)
            .map(|i| (kernel(&[i + 1; 64], End::Depth), i + 1))
            .collect();
        stacks.push((StackKey::Dropped, 3));
        let whole = Profile::from_parts(req, vec![Some(part(0, &stacks))]);
        let mut p = whole.clone();
        p.name_within(Err("none".into()), 10 * 64, usize::MAX);
        assert_eq!((p.merged_stacks, p.merged_samples), (90, (1..=90).sum()));
        assert_eq!(p.dropped(), 3 + p.merged_samples);
        assert_eq!(p.stacks.iter().map(|s| s.count).sum::<u64>(), p.samples);
        let kept: Vec<u64> = p
            .stacks
            .iter()
            .filter(|s| s.mode == MODE_KERNEL)
            .map(|s| s.count)
            .collect();
        assert_eq!(kept, (91..=100).rev().collect::<Vec<_>>());
        assert_eq!(p.stacks[0].mode, MODE_DROPPED);
        // By bytes: about 2.7 KiB per stack of 64 unnamed frames.
        let mut p = whole.clone();
        p.name_within(Err("none".into()), usize::MAX, 30_000);
        assert!((85..95).contains(&p.merged_stacks), "{}", p.merged_stacks);
        let json = serde_json::to_string_pretty(&p).unwrap();
        assert!(json.len() < 30_000, "{}", json.len());
        // Within the bounds nothing is merged.
        let mut p = whole;
        p.name_within(Err("none".into()), MAX_ANSWER_FRAMES, MAX_ANSWER_BYTES);
        assert_eq!((p.merged_stacks, p.stacks.len()), (0, 101));
    }

    #[test]
    fn a_session_bounds_the_frames_all_vcpus_keep() {
        let hub = Hub::new(1);
        hub.frames_left.store(100, Ordering::Relaxed);
        assert!(hub.take_frames(64));
        assert!(!hub.take_frames(64));
        assert!(hub.take_frames(36));
        assert!(!hub.take_frames(1));
    }

    #[test]
    fn symbols_come_from_the_kernel_as_booted_whatever_its_path_names_later() {
        let dir = std::env::temp_dir().join(format!("vmm-hub-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kernel");
        std::fs::write(&path, PROBE).unwrap();
        let hub = Hub::new(1);
        let booted = |hub: &Hub| {
            let file = crate::files::open_regular(&path).unwrap();
            hub.booted(KernelImage::booted(path.clone(), file));
        };
        booted(&hub);
        // The path now names a FIFO: never opened.
        std::fs::remove_file(&path).unwrap();
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let symbols = hub.kernel_symbols().unwrap();
        assert!(symbols.address_of("_start").is_some());
        // Another kernel (here: not an ELF) booted from the path: that one
        // is read.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"not an ELF").unwrap();
        booted(&hub);
        let e = hub.kernel_symbols().unwrap_err();
        assert!(e.contains("no symbol table"), "{e}");
        // Rewritten in place after the boot: refused, not misnamed.
        std::fs::write(&path, PROBE).unwrap();
        let hub = Hub::new(1);
        booted(&hub);
        std::fs::write(&path, [PROBE, b"x"].concat()).unwrap();
        let e = hub.kernel_symbols().unwrap_err();
        assert!(e.contains("was changed after it was booted"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_hub_takes_one_profile_at_a_time_and_merges_late_parts() {
        let hub = Hub::new(2);
        hub.booted(KernelImage::Probe(PROBE));
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
                    &|| false,
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
                &control,
                &|| false,
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
