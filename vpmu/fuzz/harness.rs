//! The fuzz targets' entry functions, shared by the coverage-guided
//! targets (`fuzz_targets/*.rs`, cargo-fuzz on nightly) and the stable
//! smoke test (`vpmu/tests/fuzz_smoke.rs`, run by CI on the committed
//! corpus plus random inputs). Self-contained: only the `vpmu` crate.
//!
//! [`msr`] reads the input as a guest: a PMU model (either vendor, any
//! version and size, sometimes raw model fields that must then validate),
//! a host (hardware events or not, an event policy, sample period limits),
//! then a sequence of operations: guest RDMSR/WRMSR of any MSR (mostly the
//! model's and their neighbours), host counting, guest and VMM time,
//! overflow signals, PMI delivery, save/restore (also of corrupted
//! contexts), resets, host refusals and lost host events. After every
//! operation it checks the invariants and panics (a fuzzer finding) when
//! one breaks:
//! - no panic and no arithmetic overflow inside `vpmu` (overflow checks are
//!   on for `vpmu` in every profile);
//! - counter values stay within their width;
//! - global status bits are explained: a counter's bit by an overflow of
//!   that counter, a `STATUS_SET` write or a restored context; every
//!   overflow sets its bit (models with global registers);
//! - generations change exactly when the programming changes, and never go
//!   back;
//! - accesses fault like hardware: MSRs outside the model always, reads of
//!   defined registers never, AMD writes never (reserved bits are dropped);
//! - the host bookkeeping holds: open events match opens minus closes,
//!   at most one open per programming and retry, the entry/exit hooks have
//!   work exactly while a clock-backed counter runs, a denied event never
//!   reaches the host;
//! - a snapshot is always consistent with the registers;
//! - once the host allows events again, every running counter it can count
//!   is backed at the next look (with no retry interval).
//!
//! [`policy`] parses any text as an event policy: no panic, and whatever
//! parses prints back to an equal policy.

use std::time::Duration;

use vpmu::backend::fake::FakeBackend;
use vpmu::evtsel::{self, EN, INT, OS, PROGRAMMING_BITS, USR};
use vpmu::msr::*;
use vpmu::{
    AmdFeatures, Backend, BackendError, Backing, CounterKind, EventPolicy, GuestClock,
    IntelFeatures, Limits, PmuModel, Vendor, VendorFeatures, Vpmu, VpmuContext,
};

/// The input, read front to back; reads past the end give zeros.
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.u8();
        }
        out
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }

    fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.u8() as usize % items.len()]
    }
}

const POLICIES: [&str; 8] = [
    "all",
    "none",
    "ipc",
    "arch",
    "all;deny:0x76",
    "all;deny:0x3c,0xc0/0",
    "allow:0xc0,0x2e/0x4f",
    "arch;allow:0x1c2;deny:0xc2",
];

const ERRNOS: [i32; 8] = [
    2,  // ENOENT
    13, // EACCES
    24, // EMFILE
    16, // EBUSY
    22, // EINVAL
    28, // ENOSPC
    1,  // EPERM
    5,  // EIO
];

/// A model from the input: constructed from a few fields (always valid
/// after clamping), or raw fields that are used only if they validate.
fn model(input: &mut Input) -> PmuModel {
    let selector = input.u8();
    let a = input.u8();
    let b = input.u8();
    if selector & 0x80 != 0 {
        let gp_width = input.u8() & 0x3F;
        let fixed_width = input.u8() & 0x3F;
        let flags = input.u8();
        let features: VendorFeatures = if a & 1 == 0 {
            AmdFeatures {
                perfctr_core: flags & 1 != 0,
            }
            .into()
        } else {
            IntelFeatures {
                fixed_counters: (b >> 4) & 7,
                fixed_width,
                pdcm: flags & 2 != 0,
                full_width_writes: flags & 4 != 0,
                unavailable_events: flags >> 3,
            }
            .into()
        };
        let raw = PmuModel::new((a >> 1) & 7, b & 0xF, gp_width, features);
        if raw.validate().is_ok() {
            return raw;
        }
    }
    if selector & 1 == 0 {
        let legacy = PmuModel::new(1, 4, 48, AmdFeatures::default());
        let core = PmuModel::new(1, 6, 48, AmdFeatures { perfctr_core: true });
        match (selector >> 1) % 3 {
            0 => legacy,
            1 => core,
            _ => core.with_version(2).with_gp_counters(1 + a % 6),
        }
    } else {
        let version = 1 + (selector >> 1) % 4;
        let width = [32, 36, 40, 48][(a >> 3) as usize % 4];
        let features = match version {
            1 => IntelFeatures::default(),
            _ => {
                let full_width = b & 0x10 != 0;
                IntelFeatures {
                    fixed_width: [32, 40, 48][(b >> 6) as usize % 3],
                    pdcm: full_width || b & 0x20 != 0,
                    full_width_writes: full_width,
                    unavailable_events: b >> 1 & 0x7F,
                    ..IntelFeatures::default()
                }
                .with_fixed_counters(b % 4)
            }
        };
        PmuModel::new(version, 1 + a % 8, width, features)
    }
}

/// Every MSR the model traps, and their neighbours.
fn interesting_msrs(model: &PmuModel) -> Vec<u32> {
    let mut msrs: Vec<u32> = model
        .msr_ranges()
        .iter()
        .flat_map(|r| (r.base.saturating_sub(1))..=r.base.saturating_add(r.count))
        .collect();
    msrs.extend([
        AMD_K7_PERF_CTL0,
        AMD_PERF_CTL0 + 12,
        AMD_GLOBAL_STATUS,
        AMD_GLOBAL_STATUS_SET,
        INTEL_PMC0 + 7,
        INTEL_PERFEVTSEL0 + 7,
        INTEL_FIXED_CTR0 + 3,
        INTEL_GLOBAL_STATUS_SET,
        INTEL_GLOBAL_INUSE,
        INTEL_PERF_CAPABILITIES,
        INTEL_A_PMC0,
        INTEL_A_PMC0 + 8,
        0,
        u32::MAX,
    ]);
    msrs
}

fn pick_msr(input: &mut Input, msrs: &[u32]) -> u32 {
    match input.u8() {
        0..=239 => input.pick(msrs),
        _ => input.u32(),
    }
}

fn value(input: &mut Input) -> u64 {
    let kind = input.u8();
    match kind % 10 {
        0 | 1 => input.u64(),
        // An event select: event, unit mask, ring levels, INT/EN and a few
        // rarer bits.
        2..=5 => {
            let event = input.pick(&[0x76u64, 0x3C, 0xC0, 0x2E, 0xC2, 0xC4, 0x1C2, 0x00]);
            let umask = input.pick(&[0u64, 0, 1, 3, 0x41, 0x4F]) << 8;
            let flags = input.u8() as u64;
            let levels = (flags & 3) << 16;
            let int = (flags >> 2 & 1) << 20;
            let en = ((flags >> 3 & 1) | (flags >> 4 & 1)) << 22;
            let rare = match flags >> 5 {
                0 => evtsel::EDGE,
                1 => evtsel::INV | 1 << 24,
                2 => evtsel::ANY,
                3 => evtsel::GUEST_ONLY,
                _ => 0,
            };
            event | umask | levels | int | en | rare
        }
        6 => (1u64 << 48).wrapping_sub(1 + input.u16() as u64),
        7 => 1u64 << (input.u8() % 64),
        8 => [0, u64::MAX, 0xF, 0x3F, 0x7_0000_000F, 0xBBB][input.u8() as usize % 6],
        _ => input.u32() as u64,
    }
}

/// What the harness knows about the last operation, for the invariants.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Other,
    Write { msr: u32, value: u64, ok: bool },
    Reset,
    Restore,
}

struct Checker {
    model: PmuModel,
    masks: Vec<u64>,
    status_bits: Vec<u64>,
    counter_bits: u64,
    programmings: Vec<u64>,
    generations: Vec<u64>,
    overflows: Vec<u64>,
    status: u64,
    /// Status bits explained by overflows, STATUS_SET or restores.
    may_be_set: u64,
    /// Host events the harness closed behind the vPMU's back.
    lost: u64,
    denied_opened: bool,
}

/// The programming rule, restated: event bits plus the last ring levels
/// selected (selecting none only disables).
fn programming(select: u64, previous: u64) -> u64 {
    let levels = match select & (USR | OS) {
        0 => previous & (USR | OS),
        levels => levels,
    };
    (select & PROGRAMMING_BITS & !(USR | OS)) | levels
}

fn mask(width: u8) -> u64 {
    if width >= 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    }
}

impl Checker {
    fn new(pmu: &mut Vpmu<FakeBackend>) -> Self {
        let model = pmu.model().clone();
        let snapshot = pmu.snapshot();
        let masks = snapshot
            .counters
            .iter()
            .map(|c| match c.kind {
                CounterKind::Gp => mask(model.gp_width),
                CounterKind::Fixed => mask(model.fixed_width()),
            })
            .collect();
        let status_bits: Vec<u64> = snapshot
            .counters
            .iter()
            .map(|c| match c.kind {
                CounterKind::Gp => 1 << c.index,
                CounterKind::Fixed => 1 << (32 + c.index),
            })
            .collect();
        Self {
            counter_bits: status_bits.iter().fold(0, |a, b| a | b),
            status_bits,
            programmings: snapshot
                .counters
                .iter()
                .map(|c| programming(c.decoded.to_select(), 0))
                .collect(),
            generations: snapshot.counters.iter().map(|c| c.generation).collect(),
            overflows: vec![0; snapshot.counters.len()],
            status: snapshot.global_status,
            may_be_set: 0,
            lost: 0,
            denied_opened: false,
            masks,
            model,
        }
    }

    fn check(&mut self, pmu: &mut Vpmu<FakeBackend>, kind: Kind) {
        let s = pmu.snapshot();
        let model = &self.model;
        assert_eq!(s.counters.len(), model.counters());
        match kind {
            Kind::Reset | Kind::Restore => self.may_be_set = s.global_status,
            Kind::Write {
                value, ok: true, ..
            } if s.global_status & !self.status != 0 => self.may_be_set |= value,
            _ => {}
        }
        for (i, c) in s.counters.iter().enumerate() {
            assert!(
                c.value <= self.masks[i],
                "counter {i} beyond its width: {c:?}"
            );
            if c.overflows > self.overflows[i] {
                self.may_be_set |= self.status_bits[i];
                if model.has_global_registers() && !matches!(kind, Kind::Reset | Kind::Restore) {
                    assert!(
                        s.global_status & self.status_bits[i] != 0,
                        "counter {i} overflowed without its status bit: {s:?}"
                    );
                }
            }
            assert!(c.overflows >= self.overflows[i], "overflows went back");
            self.overflows[i] = c.overflows;

            // Generations move exactly with the programming (reset and
            // restore: only forward).
            let now = programming(c.decoded.to_select(), self.programmings[i]);
            assert!(c.generation >= self.generations[i], "generation went back");
            if !matches!(kind, Kind::Reset | Kind::Restore) {
                assert_eq!(
                    c.generation != self.generations[i],
                    now != self.programmings[i],
                    "counter {i}: generation {} -> {} for programming {:#x} -> {now:#x}",
                    self.generations[i],
                    c.generation,
                    self.programmings[i]
                );
            }
            self.programmings[i] = match kind {
                Kind::Reset => programming(c.decoded.to_select(), 0),
                _ => now,
            };
            self.generations[i] = c.generation;
            assert_eq!(c.programming_id.0 & !PROGRAMMING_BITS, 0);
            let host = c.backing == Backing::HardwareRaw || c.backing.is_clock();
            if host
                && !pmu
                    .policy()
                    .allows(model.vendor(), evtsel::event_code(c.decoded.to_select()))
            {
                self.denied_opened = true;
            }
        }
        assert!(!self.denied_opened, "a denied event was opened on the host");
        assert_eq!(
            s.global_status & !self.may_be_set,
            0,
            "unexplained status bits {:#x} (explained {:#x})",
            s.global_status,
            self.may_be_set
        );
        if !model.has_global_registers() {
            assert_eq!((s.global_status, s.global_ctrl), (0, 0));
        } else {
            assert_eq!(s.global_ctrl & !self.counter_bits, 0);
        }
        self.status = s.global_status;

        let stats = s.stats;
        let open = pmu.backend().open_events().count() as u64;
        let held = stats.opens - stats.closes;
        assert!(
            held >= open && held <= open + self.lost,
            "vPMU holds {held} events, the host has {open} open ({} lost): {stats:?}",
            self.lost
        );
        let attempts = stats.opens + stats.open_failures;
        let allowed = 2 * (stats.reprograms + stats.open_retries + model.counters() as u64) + 1;
        assert!(
            attempts <= allowed,
            "{attempts} opens for {allowed}: {stats:?}"
        );
        let running =
            |b: fn(&Backing) -> bool| s.counters.iter().any(|c| c.running && b(&c.backing));
        assert_eq!(pmu.exit_hooks_needed(), running(Backing::is_clock));
        if running(|b| matches!(b, Backing::SoftwareClockEstimate { .. })) {
            assert!(pmu.samples_guest_mode(), "a mode estimate runs unsampled");
        }
        let policy = pmu.policy();
        for event in &pmu.backend().events {
            if let vpmu::EventSource::HardwareRaw { config } = event.spec.source {
                let code = evtsel::event_code(config);
                assert!(
                    policy.allows(model.vendor(), code),
                    "denied {code:?} opened"
                );
            }
        }
        assert!(pmu.take_retired().len() <= vpmu::MAX_RETIRED);
        assert!(pmu.take_notices().len() <= vpmu::MAX_NOTICES);
    }
}

/// Whether `msr` is one of the model's registers (not a fault on read).
fn in_model(pmu: &mut Vpmu<FakeBackend>, msr: u32) -> bool {
    pmu.rdmsr(msr).is_ok()
}

/// A context damaged by the input: restoring it must fail or keep the
/// invariants.
fn corrupt(input: &mut Input, mut context: VpmuContext) -> VpmuContext {
    match input.u8() % 8 {
        0 => context.format = input.u32(),
        1 => context.model.gp_counters = input.u8(),
        2 => context.event_selects.push(input.u64()),
        3 => {
            context.values.pop();
        }
        4 => {
            if let Some(v) = context.values.first_mut() {
                *v = input.u64();
            }
        }
        5 => context.global_status = input.u64(),
        6 => {
            if let Some(g) = context.generations.last_mut() {
                *g = input.u64() >> 8;
            }
        }
        _ => {
            if let Some(s) = context.event_selects.last_mut() {
                *s = value(input);
            }
            context.fixed_ctrl = input.u64() & 0xBBB;
            context.global_ctrl = input.u64() & 0x7_0000_00FF;
        }
    }
    context
}

/// One fuzz case of the MSR interface. Panics when an invariant breaks.
pub fn msr(data: &[u8]) {
    let mut input = Input { data, pos: 0 };
    let model = model(&mut input);
    let setup = input.u8();
    let hardware = setup & 1 != 0;
    let policy: EventPolicy = POLICIES[(setup >> 1) as usize % POLICIES.len()]
        .parse()
        .expect("valid policy");
    let limits = match setup >> 4 & 3 {
        0 => Limits::default(),
        1 => Limits {
            min_hardware_period: 1,
            min_clock_period_ns: 1,
            ..Limits::default()
        },
        _ => Limits {
            min_hardware_period: 100,
            min_clock_period_ns: 1000,
            ..Limits::default()
        },
    };
    let retry = match setup >> 6 {
        0 => vpmu::DEFAULT_RETRY_INTERVAL,
        _ => Duration::ZERO,
    };
    let clock = GuestClock::new(input.pick(&[3_000_000u32, 1, 2_100_000, u32::MAX]));
    let mut pmu = Vpmu::new(model.clone(), policy, FakeBackend::new(hardware), clock)
        .expect("validated model")
        .with_limits(limits)
        .with_retry_interval(retry);
    let msrs = interesting_msrs(&model);
    let mut checker = Checker::new(&mut pmu);
    let mut steps = 0;
    while !input.done() && steps < 4096 {
        steps += 1;
        let kind = step(&mut input, &mut pmu, &msrs, &mut checker);
        checker.check(&mut pmu, kind);
    }
    if retry == Duration::ZERO {
        recovers(&mut pmu, hardware);
    }
}

/// The host allows events again: with no retry interval, the next look at
/// the counters backs every running counter the host can count.
fn recovers(pmu: &mut Vpmu<FakeBackend>, hardware: bool) {
    let backend = pmu.backend_mut();
    backend.fail_opens = None;
    backend.fail_next_open = None;
    let s = pmu.snapshot();
    // A host that said "no hardware events" is believed for a while.
    let hardware = hardware && s.no_hardware_reason.is_none();
    for c in s.counters.iter().filter(|c| c.running) {
        let allowed = pmu
            .policy()
            .allows(s.model.vendor(), evtsel::event_code(c.decoded.to_select()));
        // The task clock backs plain cycle events counting both user and
        // kernel time; a privilege filter needs hardware events.
        let select = c.decoded.to_select();
        let clock = matches!(c.event_name.as_deref(), Some("cycles" | "ref-cycles"))
            && evtsel::is_plain(select)
            && select & evtsel::USR != 0
            && select & evtsel::OS != 0;
        if allowed && (hardware || clock) {
            assert!(
                matches!(c.backing, Backing::HardwareRaw | Backing::SoftwareClock),
                "not backed again once the host allows it: {c:?}"
            );
        }
    }
}

fn step(
    input: &mut Input,
    pmu: &mut Vpmu<FakeBackend>,
    msrs: &[u32],
    checker: &mut Checker,
) -> Kind {
    let vendor = pmu.model().vendor();
    match input.u8() % 16 {
        0 | 1 => {
            let m = pick_msr(input, msrs);
            let result = pmu.rdmsr(m);
            let inside = pmu.model().msr_ranges().iter().any(|r| r.contains(m));
            if !inside {
                assert_eq!(result, Err(vpmu::Fault::NotInModel(m)));
            }
        }
        2..=5 => {
            let (m, v) = (pick_msr(input, msrs), value(input));
            let defined = in_model(pmu, m);
            let result = pmu.wrmsr(m, v);
            if !defined {
                assert_eq!(result, Err(vpmu::Fault::NotInModel(m)), "{m:#x}");
            } else if vendor == Vendor::Amd {
                assert_eq!(result, Ok(()), "AMD drops reserved bits: {m:#x} <- {v:#x}");
            }
            return Kind::Write {
                msr: m,
                value: v,
                ok: result.is_ok(),
            };
        }
        6 => drop(
            pmu.backend_mut()
                .advance(true, (input.u32() as u64) << (input.u8() % 16)),
        ),
        7 => {
            pmu.on_guest_entry();
            pmu.backend_mut().advance(false, input.u32() as u64);
            pmu.on_guest_exit();
        }
        8 => drop(pmu.backend_mut().advance(false, input.u32() as u64)),
        9 => {
            // As the VMM does after a signal: the guest's mode first.
            if pmu.samples_guest_mode() {
                let mode = match input.bool() {
                    true => vpmu::GuestMode::User,
                    false => vpmu::GuestMode::Kernel,
                };
                pmu.observe_guest_mode(mode);
            }
            for _ in 0..=input.u8() % 4 {
                pmu.handle_host_overflow();
            }
            let _ = pmu.take_pending_pmi();
            // As the VMM does before the next KVM_RUN: the re-arms the
            // signals asked for happen at the entry.
            if pmu.exit_hooks_needed() {
                pmu.on_guest_entry();
                pmu.on_guest_exit();
            }
        }
        10 => {
            let context = pmu.save();
            if input.bool() {
                pmu.restore(&context).expect("own context restores");
            } else {
                let damaged = corrupt(input, context);
                let _ = pmu.restore(&damaged);
            }
            return Kind::Restore;
        }
        11 => {
            pmu.reset();
            return Kind::Reset;
        }
        12 => {
            // Arm a counter close to overflow: select, then value.
            let (sel, ctr) = (pick_msr(input, msrs), pick_msr(input, msrs));
            let select = value(input) | EN | INT | USR;
            let ok = pmu.wrmsr(sel, select).is_ok();
            checker.check(
                pmu,
                Kind::Write {
                    msr: sel,
                    value: select,
                    ok,
                },
            );
            let near = (1u64 << 48).wrapping_sub(1 + input.u8() as u64);
            return Kind::Write {
                msr: ctr,
                value: near,
                ok: pmu.wrmsr(ctr, near).is_ok(),
            };
        }
        13 => {
            // The host: refuses the next open, refuses for a while, stops
            // refusing, or loses an open event.
            let backend = pmu.backend_mut();
            let error = BackendError::from_errno("perf_event_open", input.pick(&ERRNOS));
            match input.u8() % 4 {
                0 => backend.fail_next_open = Some(error),
                1 => backend.fail_opens = Some(error),
                2 => backend.fail_opens = None,
                _ => {
                    let open: Vec<u32> = (0..backend.events.len() as u32)
                        .filter(|&h| !backend.events[h as usize].closed)
                        .collect();
                    if !open.is_empty() {
                        let h = open[input.u8() as usize % open.len()];
                        backend.close(h);
                        checker.lost += 1;
                    }
                }
            }
        }
        14 => {
            let values: Vec<(u32, u64)> = pmu.counter_values().collect();
            assert_eq!(values.len(), pmu.model().counters());
        }
        _ => {
            let mut cpuid = vpmu::CpuidRegs {
                eax: input.u32(),
                ebx: input.u32(),
                ecx: input.u32(),
                edx: input.u32(),
            };
            let leaf = input.pick(&[0u32, 1, 0xA, 0x8000_0000, 0x8000_0001, 0x8000_0022]);
            vpmu::cpuid::apply(Some(pmu.model()), leaf, 0, &mut cpuid);
            vpmu::cpuid::apply(None, leaf, 0, &mut cpuid);
        }
    }
    Kind::Other
}

/// One fuzz case of the event policy parser.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(policy) = text.parse::<EventPolicy>() {
        let printed = policy.to_string();
        let again: EventPolicy = printed.parse().expect("a printed policy parses");
        assert_eq!(again, policy, "{text:?} -> {printed:?}");
        for vendor in [Vendor::Amd, Vendor::Intel] {
            for event in [0x76u16, 0x3C, 0xC0, 0xFFF] {
                let _ = policy.allows(vendor, evtsel::EventCode::new(event, 0));
            }
        }
        let _ = policy.intel_unavailable_events(true);
        let _ = policy.intel_unavailable_events(false);
    }
}
