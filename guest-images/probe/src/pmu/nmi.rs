//! The PMI handler (LVTPC in NMI delivery mode), modelled on Linux's
//! `x86_pmu_handle_irq` / `amd_pmu_v2_handle_irq` / `intel_pmu_handle_irq`:
//! freeze the PMU globally, read the overflow status (or, without a global
//! status register, test the counter's top bit like Linux's AMD driver),
//! acknowledge the overflow, re-arm the counter with -period, unfreeze, and
//! re-enable LVTPC (which the LAPIC may mask on delivery).
//!
//! Runs on the NMI IST stack. It never prints and never takes locks; all the
//! state it shares with the test lives in atomics of this vCPU's `PerCpu`.

use core::sync::atomic::Ordering;

use crate::apic;
use crate::cpu::{rdmsr_safe, wrmsr_safe};
use crate::percpu::{self, PMI_DISABLED, PMI_IDLE, PMI_RUNNING};

pub fn handle_nmi() {
    let pc = percpu::this_cpu();
    pc.nmis.fetch_add(1, Ordering::Relaxed);
    let phase = pc.pmi_phase.load(Ordering::Acquire);
    let pmu = match super::current() {
        Some(p) if phase != PMI_IDLE => p,
        _ => {
            pc.nmis_unexpected.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let i = pc.pmi_counter.load(Ordering::Relaxed);
    let bit = 1u64 << i;
    let mut gp = 0u64;

    let global = pmu.global_ctl_msr();
    if let Some(g) = global {
        gp += wrmsr_safe(g, 0).is_err() as u64;
    }

    let overflowed = match pmu.global_status_msr() {
        Some(st) => match rdmsr_safe(st) {
            Ok(s) => {
                if s & bit == 0 {
                    let _ = pc.pmi_first_bad_status.compare_exchange(
                        0,
                        s | (1 << 63),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                s & bit != 0
            }
            Err(_) => {
                gp += 1;
                false
            }
        },
        None => match rdmsr_safe(pmu.ctr_msr(i)) {
            // Armed at -period, the counter has its top bit set until it
            // wraps past zero.
            Ok(v) => v & !(pmu.mask(i) >> 1) & pmu.mask(i) == 0,
            Err(_) => {
                gp += 1;
                false
            }
        },
    };

    if phase == PMI_RUNNING {
        pc.pmi_count.fetch_add(1, Ordering::Relaxed);
        if overflowed {
            pc.pmi_status_ok.fetch_add(1, Ordering::Relaxed);
        }
    } else if phase == PMI_DISABLED {
        pc.pmi_after_disable.fetch_add(1, Ordering::Relaxed);
    }

    if let Some(ack) = pmu.global_ack_msr() {
        gp += wrmsr_safe(ack, bit).is_err() as u64;
    }
    if phase == PMI_RUNNING {
        let period = pc.pmi_period.load(Ordering::Relaxed);
        let v = period.wrapping_neg() & pmu.mask(i);
        gp += wrmsr_safe(pmu.ctr_msr(i), v).is_err() as u64;
        if let Some(g) = global {
            gp += wrmsr_safe(g, bit).is_err() as u64;
        }
    }
    // Intel's LAPIC masks LVTPC when it delivers a PMI; Linux's handler
    // unmasks it at the end, and so does this one.
    if apic::read(apic::REG_LVT_PC) & apic::LVT_MASKED != 0 {
        pc.pmi_lvt_masked.fetch_add(1, Ordering::Relaxed);
    }
    apic::write(apic::REG_LVT_PC, apic::LVT_DM_NMI);
    if gp != 0 {
        pc.pmi_handler_gp.fetch_add(gp, Ordering::Relaxed);
    }
}
