//! Guest RDMSR/WRMSR of the PMU registers.

use super::{Fault, Vpmu};
use crate::backend::Backend;
use crate::evtsel::INT;
use crate::snapshot::CounterKind;
use crate::value;
use crate::vendor::{CounterWrite, Register, ReservedWrites};

impl<B: Backend> Vpmu<B> {
    /// Guest RDMSR of `msr`. `Err` is a #GP for the guest.
    pub fn rdmsr(&mut self, msr: u32) -> Result<u64, Fault> {
        let reg = self.decode(msr, false)?;
        Ok(match reg {
            Register::GpCounter(i, _) => self.read_counter(i),
            Register::FixedCounter(i) => self.read_counter(self.model.gp_counters as usize + i),
            Register::EventSelect(i) => self.event_selects[i],
            Register::FixedCtrl => self.fixed_ctrl,
            Register::GlobalStatus => {
                self.sync_running();
                self.global_status
            }
            Register::GlobalCtrl => self.global_ctrl,
            // Write-only in effect: reads return 0 (as KVM does).
            Register::GlobalStatusReset | Register::GlobalStatusSet => 0,
            Register::GlobalInUse => self.in_use(),
            Register::PerfCapabilities => self.layout.perf_capabilities,
        })
    }

    /// Guest WRMSR of `value` to `msr`. `Err` is a #GP for the guest.
    pub fn wrmsr(&mut self, msr: u32, value: u64) -> Result<(), Fault> {
        let reg = self.decode(msr, true)?;
        let result = self.write(msr, reg, value);
        self.stats.faults += result.is_err() as u64;
        self.refresh_hooks();
        result
    }

    fn decode(&mut self, msr: u32, write: bool) -> Result<Register, Fault> {
        let reg = self.ops.decode(&self.model, msr);
        match write {
            true => self.stats.wrmsr.count(reg),
            false => self.stats.rdmsr.count(reg),
        }
        reg.ok_or_else(|| {
            self.stats.faults += 1;
            Fault::NotInModel(msr)
        })
    }

    fn write(&mut self, msr: u32, reg: Register, value: u64) -> Result<(), Fault> {
        let gp = self.model.gp_counters as usize;
        match reg {
            Register::GpCounter(i, mode) => {
                let mask = self.counters[i].mask;
                let new = match mode {
                    CounterWrite::SignExtend32 => value::sign_extend_32(value, mask),
                    CounterWrite::FullWidth if value & !mask != 0 => {
                        return Err(Fault::ReservedBits {
                            msr,
                            value,
                            reserved: value & !mask,
                        })
                    }
                    CounterWrite::FullWidth | CounterWrite::Truncate => value & mask,
                };
                self.write_counter(i, new);
            }
            Register::FixedCounter(i) => {
                let new = value & self.counters[gp + i].mask;
                self.write_counter(gp + i, new);
            }
            Register::EventSelect(i) => {
                let new = self.checked(msr, value, self.layout.evtsel_valid)?;
                if new != self.event_selects[i] {
                    self.event_selects[i] = new;
                    self.reconcile(i);
                }
            }
            Register::FixedCtrl => {
                let new = self.checked(msr, value, self.layout.fixed_ctrl_valid)?;
                if new != self.fixed_ctrl {
                    self.fixed_ctrl = new;
                    (gp..self.counters.len()).for_each(|i| self.reconcile(i));
                }
            }
            Register::GlobalCtrl => {
                let new = self.checked(msr, value, self.layout.global_ctrl_valid)?;
                let changed = new ^ self.global_ctrl;
                self.global_ctrl = new;
                for i in 0..self.counters.len() {
                    if changed & self.counters[i].status_bit != 0 {
                        self.reconcile(i);
                    }
                }
            }
            Register::GlobalStatusReset => {
                let bits = self.checked(msr, value, self.layout.status_valid)?;
                self.global_status &= !bits;
            }
            Register::GlobalStatusSet => {
                let bits = self.checked(msr, value, self.layout.status_valid)?;
                self.global_status |= bits;
            }
            Register::GlobalStatus | Register::GlobalInUse | Register::PerfCapabilities => {
                if self.layout.reserved_writes == ReservedWrites::Fault {
                    return Err(Fault::ReadOnly(msr));
                }
            }
        }
        Ok(())
    }

    /// `value` without reserved bits: Intel faults on them, AMD drops them.
    fn checked(&self, msr: u32, value: u64, valid: u64) -> Result<u64, Fault> {
        let reserved = value & !valid;
        match self.layout.reserved_writes {
            ReservedWrites::Fault if reserved != 0 => Err(Fault::ReservedBits {
                msr,
                value,
                reserved,
            }),
            _ => Ok(value & valid),
        }
    }

    fn read_counter(&mut self, i: usize) -> u64 {
        self.sync(i);
        self.counters[i].value
    }

    /// A guest write of counter `i`: credit what was counted, then count on
    /// from `value` and re-arm the overflow at the new distance.
    fn write_counter(&mut self, i: usize, value: u64) {
        self.sync(i);
        self.set_value(i, value);
    }

    /// Intel `IA32_PERF_GLOBAL_INUSE` (SDM 20.2.4.3): event selects with a
    /// non-zero event, fixed counters with a ring level, and PMI in use.
    fn in_use(&self) -> u64 {
        let mut bits = 0;
        let mut pmi = false;
        for (i, c) in self.counters.iter().enumerate() {
            let used = match c.kind {
                CounterKind::Gp => self.event_selects[c.index] & 0xFF != 0,
                CounterKind::Fixed => self.fixed_field(c.index) & 0b11 != 0,
            };
            if used {
                bits |= c.status_bit;
            }
            pmi |= self.effective_select(i) & INT != 0;
        }
        bits | (pmi as u64) << 63
    }
}
