//! Whole-state operations: save, restore, reset and the export snapshot.

use std::borrow::Cow;

use super::Vpmu;
use crate::backend::Backend;
use crate::context::{ContextError, VpmuContext, CONTEXT_FORMAT};
use crate::evtsel::DecodedSelect;
use crate::snapshot::{CounterKind, CounterSnapshot, VpmuSnapshot};
use crate::totals::ProgrammingId;
use crate::vendor;

impl<B: Backend> Vpmu<B> {
    /// Saves the complete state. Counters keep running on the host; the
    /// saved values are exact as of now.
    pub fn save(&mut self) -> VpmuContext {
        self.sync_running();
        self.stats.saves += 1;
        VpmuContext {
            format: CONTEXT_FORMAT,
            model: self.model.clone(),
            event_selects: self.event_selects.clone(),
            fixed_ctrl: self.fixed_ctrl,
            global_ctrl: self.global_ctrl,
            global_status: self.global_status,
            values: self.counters.iter().map(|c| c.value).collect(),
            generations: self.counters.iter().map(|c| c.generation).collect(),
            pending_pmi: self.pending_pmi,
        }
    }

    /// Restores a saved state. Counters whose programming equals the one
    /// open on the host keep their host event (nothing is reopened, only
    /// counts move); the others are released and reopened when they run.
    /// Generations never go back: each becomes the larger of the two, plus
    /// one where the programming changed.
    pub fn restore(&mut self, context: &VpmuContext) -> Result<(), ContextError> {
        self.check(context)?;
        let reprograms = self.stats.reprograms;
        self.load(context);
        self.stats.restores += 1;
        self.stats.restores_equivalent += (self.stats.reprograms == reprograms) as u64;
        Ok(())
    }

    /// Back to the power-on state (guest reset): registers and counters
    /// zero, GLOBAL_CTRL at its reset value. Every host event is closed:
    /// no programming survives a reset.
    pub fn reset(&mut self) {
        let n = self.counters.len();
        let power_on = VpmuContext {
            format: CONTEXT_FORMAT,
            model: self.model.clone(),
            event_selects: vec![0; self.event_selects.len()],
            fixed_ctrl: 0,
            global_ctrl: self.layout.global_ctrl_reset,
            global_status: 0,
            values: vec![0; n],
            generations: self.counters.iter().map(|c| c.generation).collect(),
            pending_pmi: false,
        };
        self.load(&power_on);
        // Disabled fixed counters keep their last ring levels as their
        // programming; at power-on there is none, so release those too.
        for i in 0..self.counters.len() {
            let power_on = super::programming(self.counters[i].select, 0);
            if self.counters[i].programming != power_on {
                self.retire(i);
                self.release(i);
                self.counters[i].programming = power_on;
                self.counters[i].generation += 1;
                self.stats.reprograms += 1;
            }
        }
        self.stats.resets += 1;
    }

    /// A picture of every counter for the export. Costs one host read per
    /// host event.
    pub fn snapshot(&mut self) -> VpmuSnapshot {
        self.sync_running();
        self.refresh_clock_times();
        let (ops, model) = (self.ops, &self.model);
        let counters = self
            .counters
            .iter()
            .map(|c| CounterSnapshot {
                kind: c.kind,
                index: c.index,
                msr: ops.counter_msr(model, c.kind == CounterKind::Fixed, c.index),
                control: match c.kind {
                    CounterKind::Gp => self.event_selects[c.index],
                    CounterKind::Fixed => self.fixed_field(c.index),
                },
                decoded: DecodedSelect::decode(c.select),
                event_name: vendor::named_event(model.vendor(), c.select)
                    .map(|e| Cow::Borrowed(e.name)),
                value: c.value,
                running: c.running,
                backing: c.backing.export(),
                generation: c.generation,
                host_time_enabled_ns: c.time_enabled,
                host_time_running_ns: c.time_running,
                overflows: c.overflows,
                pmis: c.pmis,
                programming_id: ProgrammingId(c.programming),
                counted: c.counted,
                ran: c.ran,
            })
            .collect();
        VpmuSnapshot {
            model: self.model.clone(),
            counters,
            global_ctrl: self.global_ctrl,
            global_status: self.global_status,
            pending_pmi: self.pending_pmi,
            guest_time_ns: self.guest_time.accumulated_ns,
            no_hardware_reason: self.no_hardware.clone(),
            stats: self.stats,
        }
    }

    fn check(&self, context: &VpmuContext) -> Result<(), ContextError> {
        if context.format != CONTEXT_FORMAT {
            return Err(ContextError::Format(context.format));
        }
        if context.model != self.model {
            return Err(ContextError::ModelMismatch);
        }
        let n = self.counters.len();
        let lengths = [
            (
                "event selects",
                self.event_selects.len(),
                context.event_selects.len(),
            ),
            ("counter values", n, context.values.len()),
            ("generations", n, context.generations.len()),
        ];
        if let Some(&(what, expected, got)) =
            lengths.iter().find(|(_, expected, got)| expected != got)
        {
            return Err(ContextError::Length {
                what,
                expected,
                got,
            });
        }
        let layout = &self.layout;
        let registers = context
            .event_selects
            .iter()
            .map(|&v| ("event select", v, layout.evtsel_valid))
            .chain([
                (
                    "fixed counter control",
                    context.fixed_ctrl,
                    layout.fixed_ctrl_valid,
                ),
                (
                    "global control",
                    context.global_ctrl,
                    layout.global_ctrl_valid,
                ),
                ("global status", context.global_status, layout.status_valid),
            ])
            .chain(
                context
                    .values
                    .iter()
                    .zip(&self.counters)
                    .map(|(&v, c)| ("counter value", v, c.mask)),
            );
        for (what, value, valid) in registers {
            if value & !valid != 0 {
                return Err(ContextError::InvalidBits {
                    what,
                    value,
                    invalid: value & !valid,
                });
            }
        }
        Ok(())
    }

    /// Loads a checked state through the same path as guest writes, so
    /// generations and host events follow the usual rules.
    fn load(&mut self, context: &VpmuContext) {
        self.sync_running();
        self.event_selects.clone_from(&context.event_selects);
        self.fixed_ctrl = context.fixed_ctrl;
        self.global_ctrl = context.global_ctrl;
        self.global_status = context.global_status;
        self.pending_pmi = context.pending_pmi;
        for i in 0..self.counters.len() {
            let before = self.counters[i].generation;
            if self.counters[i].value != context.values[i] {
                self.counters[i].value = context.values[i];
                self.counters[i].rearm = true;
            }
            self.reconcile(i);
            let counter = &mut self.counters[i];
            let moved = counter.generation != before;
            counter.generation = counter
                .generation
                .max(context.generations[i] + moved as u64);
            // The value moved: re-arm its host event (if it has one).
            if counter.running && counter.rearm {
                self.arm(i);
            }
        }
        self.refresh_hooks();
    }
}
