//! A vCPU's sampler: joins the [`Hub`]'s profiles, samples its own thread
//! with a host event while one runs, and hands in what it gathered.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;
use vpmu::backend::perf::{PerfBackend, PerfHandle};
use vpmu::backend::{Backend, BackendError, EventSpec, OverflowNotify};

use super::walk::{self, End, Paging, ADDR_MASK};
use super::{Hex, Hub, Params, StackKey, VcpuPart, VcpuSummary, MAX_STACKS, MAX_VCPU_FRAMES};
use crate::arch::regs::in_user_mode;
use crate::vcpu::GuestSampler;

/// The system-call entry point MSR.
const MSR_LSTAR: u32 = 0xc000_0082;
const SOURCE_CLOCK: &str = "task-clock";
const SOURCE_CYCLES: &str = "cycles (guest only)";

/// One vCPU's sampler (a [`GuestSampler`]).
pub struct VcpuProfiler {
    index: u8,
    hub: Arc<Hub>,
    memory: GuestMemoryMmap,
    /// The guest TSC rate: guest cycles per ms, for a cycles event's
    /// period (0: unknown, the task clock is used).
    tsc_khz: u32,
    /// The last session looked at (joined, or ended).
    seen: u64,
    active: Option<Active>,
}

/// The sampling event of a session this vCPU is in.
struct Active {
    params: Params,
    backend: PerfBackend,
    handle: Option<PerfHandle>,
    /// Event units per sample, and the periods sampled so far.
    period: u64,
    taken: u64,
    /// Event units per ms (for `run_ms`).
    per_ms: f64,
    stacks: HashMap<StackKey, u64>,
    /// Frames of the distinct stacks in `stacks`.
    frames: usize,
    summary: VcpuSummary,
}

impl VcpuProfiler {
    pub fn new(index: u8, hub: Arc<Hub>, memory: GuestMemoryMmap, tsc_khz: u32) -> Self {
        Self {
            index,
            hub,
            memory,
            tsc_khz,
            seen: 0,
            active: None,
        }
    }

    /// Joins session `id`: opens and starts this thread's sampling event.
    fn join(&mut self, id: u64, fd: &VcpuFd) {
        let Some(params) = self.hub.params(id) else {
            return;
        };
        let mut summary = VcpuSummary {
            vcpu: self.index,
            answered: true,
            lstar: lstar(fd),
            ..Default::default()
        };
        let mut backend = PerfBackend::new(0);
        backend.set_overflow_notify(Some(OverflowNotify {
            tid: PerfBackend::current_tid(),
            signal: crate::vcpu::kick::overflow_signal(),
        }));
        let opened = open_event(&mut backend, u64::from(params.hz), u64::from(self.tsc_khz));
        let (handle, period, per_ms) = match opened {
            Ok((handle, source, period, per_ms)) => {
                summary.source = source.into();
                (Some(handle), period.max(1), per_ms as f64)
            }
            Err(e) => {
                summary.error = Some(format!("cannot sample: {e}"));
                (None, 1, 1.0)
            }
        };
        self.active = Some(Active {
            params,
            backend,
            handle,
            period,
            taken: 0,
            per_ms,
            stacks: HashMap::new(),
            frames: 0,
            summary,
        });
    }

    /// Ends this vCPU's part of the session and hands it in.
    fn leave(&mut self, fd: &VcpuFd) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        if let Some(handle) = active.handle {
            if let Ok(reading) = active.backend.read(handle) {
                active.summary.run_ms = reading.value as f64 / active.per_ms;
            }
            active.backend.close(handle);
        }
        if let Some(l) = lstar(fd) {
            active.summary.lstar = Some(l);
        }
        let part = VcpuPart {
            stacks: active.stacks,
            summary: active.summary,
        };
        self.hub.deposit(active.params.id, self.index, part);
    }
}

impl GuestSampler for VcpuProfiler {
    fn before_entry(&mut self, kicked: bool, fd: &VcpuFd) {
        let id = self.hub.active();
        if id != self.seen {
            self.seen = id;
            self.leave(fd);
            if id != 0 {
                self.join(id, fd);
            }
        }
        let Some(active) = &mut self.active else {
            return;
        };
        if kicked {
            active.sample_if_due(fd, &self.memory, &self.hub);
        }
        if Instant::now() >= active.params.deadline {
            self.leave(fd);
        }
    }

    fn finish(&mut self, fd: &VcpuFd) {
        self.leave(fd);
    }
}

impl Active {
    /// Takes a sample if the event crossed a period boundary since the
    /// last one (the kick may have been another: a vPMU overflow, the API).
    fn sample_if_due(&mut self, fd: &VcpuFd, memory: &GuestMemoryMmap, hub: &Hub) {
        let Some(handle) = self.handle else {
            return;
        };
        let started = Instant::now();
        let Ok(reading) = self.backend.read(handle) else {
            return;
        };
        // A timer-driven overflow may read a hair short of the boundary.
        let reached = reading.value.saturating_add(self.period / 8) / self.period;
        if reached <= self.taken {
            return;
        }
        self.summary.missed_periods += reached - self.taken - 1;
        self.taken = reached;
        let (key, walk_ns) = sample(fd, memory);
        self.file(key, hub);
        self.summary.walk_ns += walk_ns;
        let took = started.elapsed().as_nanos() as u64;
        self.summary.sample_ns += took;
        self.summary.max_sample_ns = self.summary.max_sample_ns.max(took);
    }

    /// Counts a sample under `key`: a stack seen before, or a new one
    /// within this vCPU's bounds and the session's (`hub`); else under
    /// [`StackKey::Dropped`].
    fn file(&mut self, key: StackKey, hub: &Hub) {
        let s = &mut self.summary;
        s.samples += 1;
        let frames = match &key {
            StackKey::User { .. } => {
                s.user += 1;
                1
            }
            StackKey::Kernel { frames, end } => {
                s.frames += frames.len().saturating_sub(1) as u64;
                s.truncated += u64::from(end.truncation().is_some());
                frames.len().max(1)
            }
            StackKey::Dropped => 0,
        };
        let keep = self.stacks.contains_key(&key)
            || (self.stacks.len() < MAX_STACKS
                && self.frames + frames <= MAX_VCPU_FRAMES
                && hub.take_frames(frames));
        let key = match keep {
            true => key,
            false => {
                s.dropped += 1;
                StackKey::Dropped
            }
        };
        if !self.stacks.contains_key(&key) {
            self.frames += frames;
        }
        *self.stacks.entry(key).or_default() += 1;
    }
}

/// The event that samples this thread `hz` times per second of guest
/// time, started: guest-only cycles (`tsc_khz` of them per ms) where the
/// host counts them, else its task clock. With its source's name, units
/// per sample and units per ms.
fn open_event(
    backend: &mut PerfBackend,
    hz: u64,
    tsc_khz: u64,
) -> Result<(PerfHandle, &'static str, u64, u64), BackendError> {
    let cycles = (tsc_khz * 1000 / hz).max(1);
    let opened = match tsc_khz {
        0 => None,
        _ => match backend.open(&EventSpec::guest_cycles(cycles)) {
            Err(e) if e.means_no_hardware() => None,
            other => Some(other.map(|h| (h, SOURCE_CYCLES, cycles, tsc_khz))),
        },
    };
    let ns = 1_000_000_000 / hz;
    let opened = opened.unwrap_or_else(|| {
        backend
            .open(&EventSpec::clock(Some(ns)))
            .map(|h| (h, SOURCE_CLOCK, ns, 1_000_000))
    })?;
    backend.start(opened.0)?;
    Ok(opened)
}

/// Where the vCPU is: user mode (its page-table root), or the kernel
/// stack; and the ns the walk took.
fn sample(fd: &VcpuFd, memory: &GuestMemoryMmap) -> (StackKey, u64) {
    let (Ok(regs), Ok(sregs)) = (fd.get_regs(), fd.get_sregs()) else {
        let key = StackKey::Kernel {
            frames: Box::new([]),
            end: End::NoRegisters,
        };
        return (key, 0);
    };
    if in_user_mode(&sregs, regs.rip) {
        return (
            StackKey::User {
                cr3: sregs.cr3 & ADDR_MASK,
            },
            0,
        );
    }
    let paging = Paging::from_registers(sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer);
    let started = Instant::now();
    let stack = walk::walk(memory, paging, regs.rip, regs.rbp);
    let walk_ns = started.elapsed().as_nanos() as u64;
    let key = StackKey::Kernel {
        frames: stack.frames.into_boxed_slice(),
        end: stack.end,
    };
    (key, walk_ns)
}

/// The guest's `MSR_LSTAR`.
fn lstar(fd: &VcpuFd) -> Option<Hex> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_LSTAR,
        ..Default::default()
    }])
    .ok()?;
    match fd.get_msrs(&mut msrs) {
        Ok(1) => Some(Hex(msrs.as_slice()[0].data)),
        _ => None,
    }
}
