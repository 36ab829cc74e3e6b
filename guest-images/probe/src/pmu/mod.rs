//! The guest-visible PMU: detection from CPUID, the MSR layout of the
//! detected model, and counter programming helpers shared by the tests and
//! the NMI handler. Vendor specifics live in `amd.rs` and `intel.rs`.
//!
//! Every MSR access goes through the `_safe` accessors: a PMU MSR the VMM
//! does not model must give a #GP, and the probe must survive it and say so.

pub mod amd;
pub mod intel;
pub mod nmi;

use core::cell::UnsafeCell;

use crate::cpu::{cpuid, rdmsr_safe, wrmsr_safe};
use crate::serial::{Hex, Line, Put};
use crate::MAX_CPUS;

/// Event-select bits common to AMD PERF_CTL and Intel PERFEVTSEL.
pub const SEL_USR: u64 = 1 << 16;
pub const SEL_OS: u64 = 1 << 17;
pub const SEL_INT: u64 = 1 << 20;
pub const SEL_EN: u64 = 1 << 22;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    None,
    Amd,
    Intel,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::Amd => "amd",
            Kind::Intel => "intel",
        }
    }
}

/// A faulting MSR access.
#[derive(Clone, Copy)]
pub struct Fault {
    pub msr: u32,
    pub write: bool,
}

impl Put for Fault {
    fn put(&self, l: &mut Line) {
        l.put("error=gp op=")
            .put(if self.write { "wrmsr" } else { "rdmsr" })
            .put(" msr=")
            .put(&Hex(self.msr as u64));
    }
}

pub fn rd(msr: u32) -> Result<u64, Fault> {
    rdmsr_safe(msr).map_err(|_| Fault { msr, write: false })
}

pub fn wr(msr: u32, v: u64) -> Result<(), Fault> {
    wrmsr_safe(msr, v).map_err(|_| Fault { msr, write: true })
}

/// The PMU model this vCPU sees, from CPUID.
#[derive(Clone, Copy)]
pub struct Pmu {
    pub kind: Kind,
    pub vendor: [u8; 12],
    pub hypervisor: [u8; 12],
    pub family: u32,
    /// Intel: CPUID.0xA version. AMD: 2 with PerfMonV2, else 1.
    pub version: u32,
    pub num_gp: u32,
    pub gp_width: u32,
    pub num_fixed: u32,
    pub fixed_width: u32,
    /// AMD PerfCtrExtCore (CPUID 0x80000001 ECX[23]).
    pub amd_ext_core: bool,
    /// AMD PerfMonV2 (CPUID 0x80000022 EAX[0]).
    pub amd_v2: bool,
    /// Intel PDCM: IA32_PERF_CAPABILITIES exists (CPUID.1:ECX[15]).
    pub intel_pdcm: bool,
    /// Intel full-width counter writes (IA32_A_PMCx).
    pub intel_full_width: bool,
    /// Intel CPUID.0xA EBX: architectural events NOT available.
    pub intel_unavail: u32,
}

fn vendor_bytes(b: u32, c: u32, d: u32) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&b.to_le_bytes());
    v[4..8].copy_from_slice(&c.to_le_bytes());
    v[8..].copy_from_slice(&d.to_le_bytes());
    v
}

impl Pmu {
    /// Reads the PMU description from CPUID (no MSR access except Intel's
    /// IA32_PERF_CAPABILITIES when PDCM says it exists).
    pub fn detect() -> Pmu {
        let (_, b, c, d) = cpuid(0, 0);
        let vendor = vendor_bytes(b, d, c);
        let (eax1, _, ecx1, _) = cpuid(1, 0);
        let mut family = (eax1 >> 8) & 0xf;
        if family == 0xf {
            family += (eax1 >> 20) & 0xff;
        }
        let hypervisor = if ecx1 & (1 << 31) != 0 {
            let (_, b, c, d) = cpuid(0x4000_0000, 0);
            vendor_bytes(b, c, d)
        } else {
            [0; 12]
        };
        let mut p = Pmu {
            kind: Kind::None,
            vendor,
            hypervisor,
            family,
            version: 0,
            num_gp: 0,
            gp_width: 0,
            num_fixed: 0,
            fixed_width: 0,
            amd_ext_core: false,
            amd_v2: false,
            intel_pdcm: false,
            intel_full_width: false,
            intel_unavail: 0,
        };
        match &vendor {
            b"AuthenticAMD" | b"HygonGenuine" => amd::detect(&mut p),
            b"GenuineIntel" => intel::detect(&mut p, ecx1),
            _ => {}
        }
        p
    }

    pub fn has_counters(&self) -> bool {
        self.kind != Kind::None && self.num_gp > 0
    }

    /// Event-select MSR of general-purpose counter `i`.
    pub fn ctl_msr(&self, i: u32) -> u32 {
        match self.kind {
            Kind::Intel => intel::PERFEVTSEL0 + i,
            _ => amd::ctl_msr(self, i),
        }
    }

    /// Counter MSR of counter `i` (the full-width alias of a
    /// general-purpose counter on Intel when available).
    pub fn ctr_msr(&self, i: u32) -> u32 {
        match (self.kind, fixed_index(i)) {
            (Kind::Intel, Some(f)) => intel::FIXED_CTR0 + f,
            (Kind::Intel, None) if self.intel_full_width => intel::A_PMC0 + i,
            (Kind::Intel, None) => intel::PMC0 + i,
            _ => amd::ctr_msr(self, i),
        }
    }

    /// Whether counter `i` (general-purpose, or fixed from [`FIXED_BASE`])
    /// exists in this model.
    pub fn has_counter(&self, i: u32) -> bool {
        match fixed_index(i) {
            Some(f) => self.kind == Kind::Intel && self.version >= 2 && f < self.num_fixed,
            None => i < self.num_gp,
        }
    }

    /// Mask of the valid bits of counter `i`.
    pub fn mask(&self, i: u32) -> u64 {
        match fixed_index(i) {
            Some(_) => low_bits(self.fixed_width),
            None => low_bits(self.gp_width),
        }
    }

    /// Mask of the valid bits of a general-purpose counter.
    pub fn gp_mask(&self) -> u64 {
        low_bits(self.gp_width)
    }

    /// Largest sampling period a counter write can express.
    pub fn max_period(&self) -> u64 {
        if self.kind == Kind::Intel && !self.intel_full_width {
            // Writes to IA32_PMCx sign-extend bit 31.
            (1u64 << 31) - 1
        } else {
            self.gp_mask() >> 1
        }
    }

    /// Global control MSR, if the model has one.
    pub fn global_ctl_msr(&self) -> Option<u32> {
        match self.kind {
            Kind::Amd if self.amd_v2 => Some(amd::GLOBAL_CTL),
            Kind::Intel if self.version >= 2 => Some(intel::GLOBAL_CTRL),
            _ => None,
        }
    }

    /// Global overflow status MSR, if the model has one.
    pub fn global_status_msr(&self) -> Option<u32> {
        match self.kind {
            Kind::Amd if self.amd_v2 => Some(amd::GLOBAL_STATUS),
            Kind::Intel if self.version >= 2 => Some(intel::GLOBAL_STATUS),
            _ => None,
        }
    }

    /// MSR whose written bits clear overflow status bits, if any.
    pub fn global_ack_msr(&self) -> Option<u32> {
        match self.kind {
            Kind::Amd if self.amd_v2 => Some(amd::GLOBAL_STATUS_CLR),
            Kind::Intel if self.version >= 2 => Some(intel::GLOBAL_OVF_CTRL),
            _ => None,
        }
    }

    /// Event select (without EN) counting core cycles in user and kernel
    /// mode: AMD event 0x76, Intel architectural event 0x3C umask 0.
    pub fn cycles_sel(&self) -> u64 {
        let ev = match self.kind {
            Kind::Intel => 0x3c,
            _ => 0x76,
        };
        ev | SEL_USR | SEL_OS
    }

    /// Event select (without EN) counting retired instructions in user and
    /// kernel mode: event 0xC0 on AMD and Intel (architectural, umask 0).
    pub fn instructions_sel(&self) -> u64 {
        0xc0 | SEL_USR | SEL_OS
    }

    /// Event select (without EN) counting retired branch instructions:
    /// AMD event 0xC2, Intel architectural event 0xC4 umask 0.
    pub fn branches_sel(&self) -> u64 {
        let ev = match self.kind {
            Kind::Intel => 0xc4,
            _ => 0xc2,
        };
        ev | SEL_USR | SEL_OS
    }

    /// ECX value for RDPMC of general-purpose counter `i`.
    pub fn rdpmc_index(&self, i: u32) -> u32 {
        i
    }

    /// Puts counter `i` into a known stopped state: event select `sel`
    /// without EN (a fixed counter's control field cleared), counter value
    /// `value`.
    pub fn setup(&self, i: u32, sel: u64, value: u64) -> Result<(), Fault> {
        self.disable(i, sel)?;
        wr(self.ctr_msr(i), value & self.mask(i))
    }

    /// Starts counter `i`: its global enable bit (if any), then EN (a fixed
    /// counter: OS and USR in its control field, PMI if `sel` has INT).
    pub fn start(&self, i: u32, sel: u64) -> Result<(), Fault> {
        if let Some(g) = self.global_ctl_msr() {
            wr(g, 1 << i)?;
        }
        match fixed_index(i) {
            Some(f) => {
                let pmi = if sel & SEL_INT != 0 {
                    intel::FIXED_PMI
                } else {
                    0
                };
                let field = intel::FIXED_OS | intel::FIXED_USR | pmi;
                wr(intel::FIXED_CTR_CTRL, field << (4 * f))
            }
            None => wr(self.ctl_msr(i), sel | SEL_EN),
        }
    }

    /// Stops counter `i` without touching the global enable: clears EN (a
    /// fixed counter's control field).
    pub fn disable(&self, i: u32, sel: u64) -> Result<(), Fault> {
        match fixed_index(i) {
            Some(_) => wr(intel::FIXED_CTR_CTRL, 0),
            None => wr(self.ctl_msr(i), sel & !SEL_EN),
        }
    }

    /// Stops counter `i`: clear EN, then its global enable.
    pub fn stop(&self, i: u32, sel: u64) -> Result<(), Fault> {
        self.disable(i, sel)?;
        if let Some(g) = self.global_ctl_msr() {
            wr(g, 0)?;
        }
        Ok(())
    }

    pub fn read(&self, i: u32) -> Result<u64, Fault> {
        rd(self.ctr_msr(i))
    }

    /// Disables and zeroes every counter and clears the overflow status, as
    /// Linux does when it takes the PMU over.
    pub fn reset(&self) -> Result<(), Fault> {
        if let Some(g) = self.global_ctl_msr() {
            wr(g, 0)?;
        }
        for i in 0..self.num_gp {
            wr(self.ctl_msr(i), 0)?;
            wr(self.ctr_msr(i), 0)?;
        }
        if self.kind == Kind::Intel && self.num_fixed > 0 && self.version >= 2 {
            wr(intel::FIXED_CTR_CTRL, 0)?;
        }
        if let Some(a) = self.global_ack_msr() {
            wr(a, self.status_bits())?;
        }
        Ok(())
    }

    /// All counter bits of the global status/control registers.
    pub fn status_bits(&self) -> u64 {
        let fixed = if self.kind == Kind::Intel {
            low_bits(self.num_fixed) << 32
        } else {
            0
        };
        low_bits(self.num_gp) | fixed
    }

    /// Linux's `check_hw_exists()`: read every event select (an enabled one
    /// means firmware uses it), then flip the low 16 bits of a free counter
    /// and read it back. Emulators that accept but ignore PMU MSRs fail here.
    pub fn msr_probe(&self) -> Result<ProbeResult, ProbeFail> {
        let mut r = ProbeResult { bios_enabled: 0 };
        let mut safe = None;
        for i in 0..self.num_gp {
            let msr = self.ctl_msr(i);
            let v = rdmsr_safe(msr).map_err(|_| ProbeFail::Gp(msr))?;
            if v & SEL_EN != 0 {
                r.bios_enabled |= 1 << i;
            } else {
                safe = Some(i);
            }
        }
        if self.kind == Kind::Intel && self.num_fixed > 0 && self.version >= 2 {
            let v = rdmsr_safe(intel::FIXED_CTR_CTRL)
                .map_err(|_| ProbeFail::Gp(intel::FIXED_CTR_CTRL))?;
            for i in 0..self.num_fixed {
                if v & (0x3 << (4 * i)) != 0 {
                    r.bios_enabled |= 1 << (32 + i);
                }
            }
        }
        let i = safe.ok_or(ProbeFail::AllBusy)?;
        let msr = self.ctr_msr(i);
        let old = rdmsr_safe(msr).map_err(|_| ProbeFail::Gp(msr))?;
        let val = old ^ 0xffff;
        wrmsr_safe(msr, val).map_err(|_| ProbeFail::Gp(msr))?;
        let new = rdmsr_safe(msr).map_err(|_| ProbeFail::Gp(msr))?;
        let _ = wrmsr_safe(msr, old);
        if new != val {
            return Err(ProbeFail::Readback {
                msr,
                wrote: val,
                read: new,
            });
        }
        Ok(r)
    }
}

/// Counter numbers from here on are Intel fixed counters (`FIXED_BASE + i`
/// is fixed counter i), matching their bits in the global registers.
pub const FIXED_BASE: u32 = 32;

/// The fixed counter index of counter number `i`, if it is one.
pub fn fixed_index(i: u32) -> Option<u32> {
    i.checked_sub(FIXED_BASE)
}

/// A counter number as the tests print it: `3`, or `fixed1`.
pub struct CounterName(pub u32);

impl Put for CounterName {
    fn put(&self, l: &mut Line) {
        match fixed_index(self.0) {
            Some(f) => l.put("fixed").put(&f),
            None => l.put(&self.0),
        };
    }
}

/// The low `n` bits set.
pub fn low_bits(n: u32) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

pub struct ProbeResult {
    /// Bit i (gp) / 32+i (fixed): enabled before we touched the PMU.
    pub bios_enabled: u64,
}

pub enum ProbeFail {
    Gp(u32),
    AllBusy,
    Readback { msr: u32, wrote: u64, read: u64 },
}

impl Put for ProbeFail {
    fn put(&self, l: &mut Line) {
        match self {
            ProbeFail::Gp(m) => {
                l.put("msr_probe=fail reason=gp msr=").put(&Hex(*m as u64));
            }
            ProbeFail::AllBusy => {
                l.put("msr_probe=fail reason=all_counters_enabled");
            }
            ProbeFail::Readback { msr, wrote, read } => {
                l.put("msr_probe=fail reason=readback msr=")
                    .put(&Hex(*msr as u64))
                    .put(" wrote=")
                    .put(&Hex(*wrote))
                    .put(" read=")
                    .put(&Hex(*read));
            }
        }
    }
}

/// Per-vCPU copy of the model, for the NMI handler (which must not run
/// CPUID: every CPUID is a VM exit).
struct PmuSlots(UnsafeCell<[Option<Pmu>; MAX_CPUS]>);
// SAFETY: slot i is written only by vCPU i, outside NMI-armed sections
// (see `set_current`), and read only by vCPU i.
unsafe impl Sync for PmuSlots {}
#[link_section = ".data.probe_state"]
static CURRENT: PmuSlots = PmuSlots(UnsafeCell::new([None; MAX_CPUS]));

/// Records this vCPU's model for the NMI handler. Must not be called while
/// a PMI test is armed on this vCPU.
pub fn set_current(p: &Pmu) {
    let cpu = crate::percpu::this_cpu_id() as usize;
    // SAFETY: only this vCPU accesses slot `cpu`, and its NMI handler only
    // reads it while a PMI test is armed, which is not the case here.
    unsafe { (*CURRENT.0.get())[cpu] = Some(*p) };
}

/// This vCPU's model, as recorded by `set_current`.
pub fn current() -> Option<Pmu> {
    let cpu = crate::percpu::this_cpu_id() as usize;
    // SAFETY: see `set_current`.
    unsafe { (*CURRENT.0.get())[cpu] }
}

/// Printable 12-byte vendor string (NULs and non-printables as `_`).
pub struct VendorStr<'a>(pub &'a [u8; 12]);

impl Put for VendorStr<'_> {
    fn put(&self, l: &mut Line) {
        if self.0.iter().all(|&b| b == 0) {
            l.bytes(b"none");
            return;
        }
        for &b in self.0.iter() {
            l.byte(if b.is_ascii_graphic() { b } else { b'_' });
        }
    }
}
