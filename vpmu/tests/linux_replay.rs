//! Replays of what Linux guests do with the PMU, written from the perf
//! drivers (`arch/x86/events/core.c`, `amd/core.c`, `intel/core.c`). Each
//! step asserts what the guest reads. Linux reads counters with RDPMC; the
//! VMM mirrors counter values for it, so the replays read them by MSR.

mod common;

use common::*;
use vpmu::backend::fake::FakeBackend;
use vpmu::evtsel::{EN, INT, OS, USR};
use vpmu::msr::*;
use vpmu::{IntelFeatures, Vpmu};

/// A guest CPU: every access must succeed, as Linux's non-`_safe` MSR
/// accessors require.
struct Guest(Vpmu<FakeBackend>);

impl Guest {
    fn rd(&mut self, msr: u32) -> u64 {
        self.0
            .rdmsr(msr)
            .unwrap_or_else(|fault| panic!("guest RDMSR {msr:#x}: {fault}"))
    }

    fn wr(&mut self, msr: u32, value: u64) {
        self.0
            .wrmsr(msr, value)
            .unwrap_or_else(|fault| panic!("guest WRMSR {msr:#x}: {fault}"))
    }

    /// `check_hw_exists()`: no event select may be enabled by the BIOS,
    /// and a counter must keep what is written to it.
    fn check_hw_exists(
        &mut self,
        selects: &[u32],
        counters: &[u32],
        fixed_ctrl: Option<u32>,
    ) -> bool {
        let mut safe = None;
        for (i, &sel) in selects.iter().enumerate() {
            if self.rd(sel) & EN == 0 {
                safe = Some(i);
            }
        }
        if let Some(msr) = fixed_ctrl {
            assert_eq!(self.rd(msr) & 0x333, 0, "no fixed counter enabled at boot");
        }
        let Some(safe) = safe else { return false };
        let value = self.rd(counters[safe]) ^ 0xFFFF;
        self.wr(counters[safe], value);
        self.rd(counters[safe]) == value
    }

    /// The host counts `events` on every running hardware event.
    fn run(&mut self, events: u64) {
        count_hw(&mut self.0, events);
    }

    /// An overflow signal arrives; returns whether a PMI is due.
    fn signal(&mut self) -> bool {
        self.0.handle_host_overflow();
        let pmi = self.0.take_pending_pmi();
        // The VMM enters the guest to deliver the PMI: re-arms the signal
        // asked for happen right before that entry.
        if self.0.exit_hooks_needed() {
            self.0.on_guest_entry();
            self.0.on_guest_exit();
        }
        pmi
    }
}

const PERIOD: u64 = 100_000;

#[test]
fn amd_perfmon_v2_probe_program_pmi_and_disable() {
    let mut g = Guest(vpmu(amd_v2(6), true));
    // amd_pmu_cpu_reset(): stop everything, clear stale status (with the
    // LBR freeze bit 58, a reserved bit here, that must not fault).
    g.wr(AMD_GLOBAL_CTL, 0);
    g.wr(AMD_GLOBAL_STATUS_CLR, 0x0400_0000_0000_003F);
    let selects: Vec<u32> = (0..6).map(amd_ctl).collect();
    let counters: Vec<u32> = (0..6).map(amd_ctr).collect();
    assert!(g.check_hw_exists(&selects, &counters, None));
    assert_eq!(g.rd(amd_ctr(5)), 0xFFFF);

    // perf record -e cycles -c PERIOD: counter 0, then enable_all.
    let config = 0x76 | USR | OS | INT;
    g.wr(amd_ctr(0), (-(PERIOD as i64)) as u64 & M48);
    g.wr(amd_ctl(0), config | EN);
    g.wr(AMD_GLOBAL_CTL, 0x3F);
    g.run(PERIOD - 1);
    assert!(!g.signal());
    assert_eq!(g.rd(amd_ctr(0)), M48);
    g.run(1);
    assert!(g.signal(), "the counter wrapped with INT set");

    // amd_pmu_v2_handle_irq()
    g.wr(AMD_GLOBAL_CTL, 0);
    let status = g.rd(AMD_GLOBAL_STATUS);
    assert_eq!(status, 1);
    assert_eq!(g.rd(amd_ctr(0)), 0, "wrapped to zero");
    g.wr(amd_ctr(0), (-(PERIOD as i64)) as u64 & M48);
    g.wr(AMD_GLOBAL_STATUS_CLR, !0u64); // ~status after handling every bit
    assert_eq!(g.rd(AMD_GLOBAL_STATUS), 0);
    g.wr(AMD_GLOBAL_CTL, 0x3F);
    g.run(10);
    assert_eq!(g.rd(amd_ctr(0)), M48 - PERIOD + 11);

    // Disable: global off, event select without EN, final read.
    g.wr(AMD_GLOBAL_CTL, 0);
    g.wr(amd_ctl(0), config);
    g.run(1000);
    assert_eq!(g.rd(amd_ctr(0)), M48 - PERIOD + 11);

    let stats = *g.0.stats();
    assert_eq!(stats.opens, 1, "one host event for the one programming");
    assert_eq!(stats.closes, 0);
    assert_eq!(stats.reprograms, 1);
    assert_eq!((stats.starts, stats.stops), (2, 2));
    assert_eq!(stats.faults, 0);
}

#[test]
fn amd_legacy_probe_and_overflow_detection_by_bit_47() {
    let mut g = Guest(vpmu(amd_legacy(), true));
    let selects: Vec<u32> = (0..4).map(|n| AMD_K7_PERF_CTL0 + n).collect();
    let counters: Vec<u32> = (0..4).map(|n| AMD_K7_PERF_CTR0 + n).collect();
    assert!(g.check_hw_exists(&selects, &counters, None));

    let config = 0xC0 | USR | OS | INT;
    g.wr(AMD_K7_PERF_CTR0 + 1, (-(PERIOD as i64)) as u64 & M48);
    g.wr(AMD_K7_PERF_CTL0 + 1, config | EN);
    g.run(PERIOD + 5);
    assert!(g.signal());
    // x86_pmu_handle_irq(): a counter whose bit 47 is clear overflowed.
    let value = g.rd(AMD_K7_PERF_CTR0 + 1);
    assert_eq!(value & (1 << 47), 0);
    assert_eq!(value, 5);
    g.wr(AMD_K7_PERF_CTR0 + 1, (-(PERIOD as i64)) as u64 & M48);
    // x86_pmu_disable_all(): read-modify-write every enabled select.
    let sel = g.rd(AMD_K7_PERF_CTL0 + 1);
    assert_ne!(sel & EN, 0);
    g.wr(AMD_K7_PERF_CTL0 + 1, sel & !EN);
    assert_eq!(g.0.stats().opens, 1);
    // Re-armed when the signal was handled, and by the handler's write.
    assert_eq!(g.0.stats().period_updates, 2);
}

#[test]
fn intel_probe_program_fixed_and_gp_pmi_and_disable() {
    let mut g = Guest(vpmu(intel(4), true));
    let selects: Vec<u32> = (0..4).map(|n| INTEL_PERFEVTSEL0 + n).collect();
    // With full-width writes Linux uses IA32_A_PMCx as its counter base.
    assert_ne!(g.rd(INTEL_PERF_CAPABILITIES) & PERF_CAP_FULL_WIDTH_WRITE, 0);
    let counters: Vec<u32> = (0..4).map(|n| INTEL_A_PMC0 + n).collect();
    assert!(g.check_hw_exists(&selects, &counters, Some(INTEL_FIXED_CTR_CTRL)));

    // perf stat -e cycles,instructions,branches with sampling on cycles:
    // cycles on fixed counter 1 (PMI), instructions on fixed 0, branches on PMC0.
    g.wr(INTEL_GLOBAL_CTRL, 0);
    g.wr(INTEL_FIXED_CTR0 + 1, (-(PERIOD as i64)) as u64 & M48);
    g.wr(INTEL_FIXED_CTR_CTRL, 0b1011 << 4);
    g.wr(INTEL_FIXED_CTR0, 0);
    let fixed = g.rd(INTEL_FIXED_CTR_CTRL);
    g.wr(INTEL_FIXED_CTR_CTRL, fixed | 0b0011);
    g.wr(INTEL_A_PMC0, 0);
    g.wr(INTEL_PERFEVTSEL0, 0xC4 | USR | OS | EN);
    let all = 0xF | 0x7 << 32;
    g.wr(INTEL_GLOBAL_CTRL, all);
    g.run(PERIOD + 7);
    assert!(g.signal());

    // intel_pmu_handle_irq()
    g.wr(INTEL_GLOBAL_CTRL, 0);
    let status = g.rd(INTEL_GLOBAL_STATUS);
    assert_eq!(status, 1 << 33);
    g.wr(INTEL_GLOBAL_OVF_CTRL, status);
    assert_eq!(g.rd(INTEL_FIXED_CTR0 + 1), 7);
    g.wr(INTEL_FIXED_CTR0 + 1, (-(PERIOD as i64)) as u64 & M48);
    assert_eq!(g.rd(INTEL_GLOBAL_STATUS), 0, "nothing more to handle");
    g.wr(INTEL_GLOBAL_CTRL, all);
    assert_eq!(g.rd(INTEL_FIXED_CTR0), PERIOD + 7);
    assert_eq!(g.rd(INTEL_PMC0), PERIOD + 7);

    // Disable every event.
    g.wr(INTEL_GLOBAL_CTRL, 0);
    g.wr(INTEL_FIXED_CTR_CTRL, 0);
    g.wr(INTEL_PERFEVTSEL0, 0xC4 | USR | OS);
    g.run(50);
    assert_eq!(g.rd(INTEL_PMC0), PERIOD + 7);

    let stats = *g.0.stats();
    assert_eq!(stats.opens, 3);
    assert_eq!(stats.faults, 0);
    let generations: Vec<u64> = (0..7).filter_map(|i| g.0.generation(i)).collect();
    // Clearing a fixed counter's ring levels disables it: no new programming.
    assert_eq!(generations, [1, 0, 0, 0, 1, 1, 0]);
    assert_eq!(stats.closes, 0);
}

#[test]
fn intel_legacy_pmc_writes_program_a_period_below_2_pow_31() {
    let mut g = Guest(vpmu(
        intel_with(2, IntelFeatures::default().with_fixed_counters(3)),
        true,
    ));
    // Without full-width writes Linux caps periods at 2^31 - 1 and writes
    // -left through IA32_PMCx, relying on the sign extension.
    let left: u64 = (1 << 31) - 1;
    g.wr(INTEL_PMC0 + 2, (-(left as i64)) as u64 & M48);
    assert_eq!(g.rd(INTEL_PMC0 + 2), (M48 + 1) - left);
    g.wr(INTEL_PERFEVTSEL0 + 2, 0x3C | USR | OS | INT | EN);
    g.run(left);
    assert!(g.signal());
    assert_eq!(g.rd(INTEL_GLOBAL_STATUS), 0b100);
}

#[test]
fn probe_fails_when_every_select_is_enabled() {
    let mut g = Guest(vpmu(amd_legacy(), true));
    let selects: Vec<u32> = (0..4).map(|n| AMD_K7_PERF_CTL0 + n).collect();
    let counters: Vec<u32> = (0..4).map(|n| AMD_K7_PERF_CTR0 + n).collect();
    for &sel in &selects {
        g.wr(sel, 0x76 | OS | EN);
    }
    assert!(!g.check_hw_exists(&selects, &counters, None));
}
