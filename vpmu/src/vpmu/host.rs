//! Host backing of virtual counters: open once per programming, then only
//! start, stop, read and re-arm; guest time for clock-backed counters.

use std::borrow::Cow;
use std::time::Instant;

use super::counter::{Armed, BackingState, Failure, HostPeriod};
use super::{ReferenceValue, Vpmu, HARDWARE_RECHECK, MAX_ESTIMATES, MAX_NOTICES};
use crate::backend::{Backend, BackendError, EventSpec};
use crate::evtsel::{self, INT, OS, RAW_CONFIG_BITS, USR};
use crate::snapshot::{BackingNotice, GuestMode};
use crate::value;
use crate::vendor;

impl<B: Backend> Vpmu<B> {
    /// Call right before `KVM_RUN` (cheap: nothing unless a clock-backed
    /// counter runs, then one host read at most; see `reference_now`).
    pub fn on_guest_entry(&mut self) {
        if self.arms_pending {
            self.arm_pending();
        }
        if !self.clock_running || self.guest_time.in_guest {
            return;
        }
        if let Some(value) = self.reference_now() {
            self.guest_time.entry_ns = value;
            self.guest_time.in_guest = true;
        }
    }

    /// Call right after `KVM_RUN` returns, whatever the reason (cheap:
    /// nothing unless the matching entry did work, then one host read at
    /// most).
    pub fn on_guest_exit(&mut self) {
        if !self.guest_time.in_guest {
            return;
        }
        self.guest_time.in_guest = false;
        if let Some(value) = self.reference_now() {
            let time = &mut self.guest_time;
            time.accumulated_ns += value.saturating_sub(time.entry_ns);
        }
    }

    /// The guest-time reference (the vCPU thread's task-clock) now. From
    /// the last value taken, plus the wall time since, when the backend's
    /// schedule epoch shows the thread kept its CPU in between (the clock
    /// then advanced exactly with the wall time); else, and at least every
    /// [`MAX_ESTIMATES`] values, one host read.
    fn reference_now(&mut self) -> Option<u64> {
        let reference = self.guest_time.reference?;
        if let Some(last) = self.guest_time.last {
            // The wall time first, then the epoch: a switch after the
            // check is missed, as it would be after a read.
            let now = Instant::now();
            if last.estimates < MAX_ESTIMATES
                && last.epoch.is_some()
                && self.backend.schedule_epoch(reference) == last.epoch
            {
                let elapsed = u64::try_from((now - last.at).as_nanos()).unwrap_or(u64::MAX);
                let value = last.value.saturating_add(elapsed);
                self.stats.clock_reads_saved += 1;
                self.guest_time.last = Some(ReferenceValue {
                    value,
                    at: now,
                    estimates: last.estimates + 1,
                    ..last
                });
                return Some(value);
            }
        }
        match self.backend.read(reference) {
            Ok(reading) => {
                self.stats.clock_reads += 1;
                // The epoch after the read, the wall time after the epoch:
                // a switch in between is not counted.
                let epoch = self.backend.schedule_epoch(reference);
                self.guest_time.last = Some(ReferenceValue {
                    value: reading.value,
                    epoch,
                    at: Instant::now(),
                    estimates: 0,
                });
                Some(reading.value)
            }
            Err(_) => {
                self.stats.backend_errors += 1;
                self.guest_time.last = None;
                None
            }
        }
    }

    /// Call when an overflow signal interrupted `KVM_RUN` (or to poll):
    /// brings every running counter up to date, sets the status bits of
    /// those that overflowed, and re-arms host events whose period elapsed
    /// (a clock signal can come early: the host clock also counts VMM time).
    /// Then check [`Vpmu::take_pending_pmi`].
    pub fn handle_host_overflow(&mut self) {
        self.stats.overflow_signals += 1;
        for i in 0..self.counters.len() {
            if !self.counters[i].running {
                // A stopped counter's clock event may be what fired: stop
                // it for real now.
                self.stop_host(i);
                continue;
            }
            let overflows = self.counters[i].overflows;
            self.sync(i);
            let counter = &self.counters[i];
            let rearm = match (&counter.backing, counter.armed) {
                (BackingState::Hardware(_), Some(armed)) => {
                    counter.host_count.wrapping_sub(armed.at) >= armed.period
                }
                (BackingState::Clock(_, None), Some(armed)) => {
                    // How late the clock event fired after its period, from
                    // how far the counter got: past its overflow by the
                    // signal (wrapped once), or still short of it (early:
                    // no later than the lead it was armed with, less what
                    // is left).
                    let ahead = armed.distance_ns as i64 - armed.period as i64;
                    let late = if counter.overflows == overflows + 1 {
                        Some(self.clock.cycles_to_ns(counter.value) as i64 + ahead)
                    } else if counter.overflows == overflows && ahead > 0 {
                        let left = self
                            .clock
                            .cycles_to_ns(value::distance_to_overflow(counter.value, counter.mask));
                        Some(ahead - left as i64)
                    } else {
                        None
                    };
                    if let Some(late) = late {
                        self.clock_lead.observe(late.max(0) as u64);
                        self.stats.clock_lead_ns = self.clock_lead.lead_ns();
                    }
                    true
                }
                // A count of one mode is no measure of lateness.
                (BackingState::Clock(..), _) => true,
                _ => false,
            };
            // Off the PMI's path: the VMM injects the PMI first, the
            // re-arm happens right before the next entry.
            if rearm {
                self.counters[i].arm_at_entry = true;
                self.arms_pending = true;
            }
        }
        self.refresh_hooks();
    }

    /// The re-arms [`Vpmu::handle_host_overflow`] left for the entry.
    fn arm_pending(&mut self) {
        self.arms_pending = false;
        for i in 0..self.counters.len() {
            if self.counters[i].arm_at_entry {
                self.arm(i);
            }
        }
    }

    /// Disables counter `i`'s host event if it is enabled.
    fn stop_host(&mut self, i: usize) {
        let counter = &mut self.counters[i];
        if !counter.host_enabled {
            return;
        }
        counter.host_enabled = false;
        if let Some(handle) = counter.backing.handle() {
            match self.backend.stop(handle) {
                Ok(()) => self.stats.stops += 1,
                Err(error) => self.fail(i, error),
            }
        }
    }

    /// Guest nanoseconds so far (up to now when inside the guest).
    pub(super) fn guest_ns(&mut self) -> u64 {
        let time = self.guest_time;
        if !time.in_guest {
            return time.accumulated_ns;
        }
        match self.reference_now() {
            Some(value) => time.accumulated_ns + value.saturating_sub(time.entry_ns),
            None => time.accumulated_ns,
        }
    }

    /// Starts counter `i` (it is architecturally running from now on) and
    /// backs it on the host.
    pub(super) fn start(&mut self, i: usize) {
        self.counters[i].running = true;
        self.counters[i].ran = true;
        self.back(i);
    }

    /// Gives running counter `i` its host event and starts it: opens one
    /// if this programming has none yet, or if the host refused it and the
    /// retry interval has passed.
    fn back(&mut self, i: usize) {
        if self.retry_due(i) {
            self.stats.open_retries += 1;
            self.counters[i].backing = BackingState::Idle;
        }
        if self.counters[i].backing == BackingState::Idle {
            self.open_backing(i);
        }
        let backing = &self.counters[i].backing;
        let (handle, clock) = (backing.handle(), backing.is_clock());
        if clock {
            if let Err(error) = self.ensure_reference() {
                return self.fail(i, error);
            }
            self.counters[i].clock_ns = match self.counters[i].backing {
                BackingState::Clock(_, Some(mode)) => self.start_mode_sampling(mode),
                _ => self.guest_ns(),
            };
        }
        if let Some(handle) = handle {
            if !self.counters[i].host_enabled {
                match self.backend.start(handle) {
                    Ok(()) => self.stats.starts += 1,
                    Err(error) => return self.fail(i, error),
                }
                self.counters[i].host_enabled = true;
            }
            if self.counters[i].rearm {
                self.arm(i);
            }
            // Backed outside a guest write (a retry while reading): the
            // entry/exit hooks must run from the next entry on.
            self.clock_running |= clock;
        }
    }

    /// A counter of guest `mode` time starts: sampling starts if it was
    /// off (the guest time before is nobody's to attribute). Returns the
    /// mode's guest time so far.
    fn start_mode_sampling(&mut self, mode: GuestMode) -> u64 {
        if !self.mode_sampling {
            self.guest_time.attributed_ns = self.guest_time.accumulated_ns;
            self.mode_sampling = true;
        }
        self.guest_time.in_mode(mode)
    }

    /// Whether counter `i`'s host event was refused and may be tried again.
    fn retry_due(&self, i: usize) -> bool {
        let counter = &self.counters[i];
        matches!(counter.backing, BackingState::Refused(_))
            && counter
                .failure
                .as_ref()
                .is_none_or(|f| f.last.elapsed() >= self.retry_interval)
    }

    /// Stops counter `i`, keeping its backing open. A clock event stays
    /// enabled (see `Counter::host_enabled`): a clock-backed counter only
    /// counts while it runs whatever its event does.
    pub(super) fn stop(&mut self, i: usize) {
        if !self.counters[i].running {
            return;
        }
        self.sync(i);
        self.counters[i].running = false;
        if !self.counters[i].backing.is_clock() {
            self.stop_host(i);
        }
    }

    /// Closes counter `i`'s backing (its programming is gone).
    pub(super) fn release(&mut self, i: usize) {
        let counter = &mut self.counters[i];
        if let Some(handle) = counter.backing.handle() {
            self.backend.close(handle);
            self.stats.closes += 1;
        }
        counter.backing = BackingState::Idle;
        counter.armed = None;
        counter.rearm = false;
        counter.host_enabled = false;
        counter.arm_at_entry = false;
        counter.host_count = 0;
    }

    /// A host operation failed after open: the counter counts nothing
    /// until its event is reopened (a retry or a new programming).
    fn fail(&mut self, i: usize, error: BackendError) {
        self.stats.backend_errors += 1;
        self.release(i);
        self.refused(i, error.to_string());
        self.refresh_hooks();
    }

    /// The host refused to back counter `i`: it counts nothing, says why,
    /// and the first refusal of an episode is noticed.
    fn refused(&mut self, i: usize, reason: String) {
        let counter = &mut self.counters[i];
        let now = Instant::now();
        let first = match &mut counter.failure {
            Some(failure) => {
                failure.attempts += 1;
                failure.last = now;
                false
            }
            None => {
                counter.failure = Some(Failure {
                    attempts: 1,
                    last: now,
                });
                true
            }
        };
        let (kind, index) = (counter.kind, counter.index);
        counter.backing = BackingState::Refused(Cow::Owned(reason.clone()));
        if first {
            self.stats.backing_lost += 1;
            self.notice(BackingNotice::Lost {
                kind,
                index,
                reason,
            });
        }
    }

    /// Counter `i` got a host event: ends a refusal episode.
    fn backed(&mut self, i: usize) {
        let counter = &mut self.counters[i];
        if let Some(failure) = counter.failure.take() {
            let (kind, index) = (counter.kind, counter.index);
            self.stats.backing_recovered += 1;
            self.notice(BackingNotice::Recovered {
                kind,
                index,
                refused: failure.attempts,
            });
        }
    }

    fn notice(&mut self, notice: BackingNotice) {
        if self.notices.len() < MAX_NOTICES {
            self.notices.push(notice);
        } else {
            self.stats.notices_dropped += 1;
        }
    }

    /// Chooses and opens counter `i`'s backing: policy first, then a
    /// hardware event, then (clock events on hosts without hardware
    /// events) the host task-clock.
    fn open_backing(&mut self, i: usize) {
        let select = self.counters[i].select;
        if !self
            .policy
            .allows(self.model.vendor(), evtsel::event_code(select))
        {
            self.counters[i].backing = BackingState::Denied;
            return;
        }
        if self
            .no_hardware_since
            .is_some_and(|since| since.elapsed() >= HARDWARE_RECHECK)
        {
            self.no_hardware_since = None;
            self.no_hardware = None;
        }
        if self.no_hardware.is_none() {
            let period = self.period(i, true);
            let spec = EventSpec::hardware(
                select & RAW_CONFIG_BITS,
                select & USR != 0,
                select & OS != 0,
                period.period,
            );
            match self.open(&spec) {
                Ok(handle) => return self.opened(i, BackingState::Hardware(handle), period),
                Err(error) if error.means_no_hardware() => {
                    self.no_hardware = Some(format!("no hardware events on the host: {error}"));
                    self.no_hardware_since = Some(Instant::now());
                }
                Err(error) => return self.refused(i, error.to_string()),
            }
        }
        if !vendor::is_clock_event(self.model.vendor(), select) {
            let reason = self.no_hardware.clone().unwrap_or_default();
            self.counters[i].backing = BackingState::Unbacked(Cow::Owned(reason));
            return;
        }
        // The task clock cannot tell guest user from kernel time: a count
        // of one mode is estimated from sampled privilege levels.
        let mode = counted_mode(select);
        let period = self.period(i, false);
        match self.open(&EventSpec::clock(Some(period.period))) {
            Ok(handle) => self.opened(i, BackingState::Clock(handle, mode), period),
            Err(error) => self.refused(i, format!("host task-clock: {error}")),
        }
    }

    fn open(&mut self, spec: &EventSpec) -> Result<B::Handle, BackendError> {
        let result = self.backend.open(spec);
        match result {
            Ok(_) => self.stats.opens += 1,
            Err(_) => self.stats.open_failures += 1,
        }
        result
    }

    fn opened(&mut self, i: usize, backing: BackingState<B::Handle>, period: HostPeriod) {
        let counter = &mut self.counters[i];
        counter.backing = backing;
        counter.host_count = 0;
        self.armed(i, 0, period);
        self.backed(i);
    }

    /// Counter `i`'s host event now runs with `period` from host count `at`.
    fn armed(&mut self, i: usize, at: u64, period: HostPeriod) {
        let counter = &mut self.counters[i];
        counter.armed = Some(Armed {
            at,
            period: period.period,
            distance_ns: period.distance_ns,
        });
        counter.rearm = false;
        self.stats.throttles += period.throttled as u64;
    }

    /// Opens the per-vCPU guest-time reference on first use.
    fn ensure_reference(&mut self) -> Result<(), BackendError> {
        if self.guest_time.reference.is_some() {
            return Ok(());
        }
        let handle = self.open(&EventSpec::clock(None))?;
        if let Err(error) = self.backend.start(handle) {
            self.backend.close(handle);
            return Err(error);
        }
        self.guest_time.reference = Some(handle);
        Ok(())
    }

    /// The host sample period for counter `i`'s distance to overflow, in
    /// events (`hardware`) or ns, raised to the host minimum.
    ///
    /// A clock event is armed early by the host's usual lateness (see
    /// `ClockLead`).
    fn period(&self, i: usize, hardware: bool) -> HostPeriod {
        let counter = &self.counters[i];
        let distance = value::distance_to_overflow(counter.value, counter.mask);
        let (period, min, distance_ns) = match hardware {
            true => (distance, self.limits.min_hardware_period, 0),
            false if counted_mode(counter.select).is_some() => {
                // A count of one guest mode moves only at samples of the
                // guest's mode, which its clock event's signals are: a
                // steady period whatever the distance. A shorter one would
                // only signal more while the guest is in the other mode
                // (a sampling guest's period of 1 cycle would have the
                // minimum period's storm go on through all its kernel
                // time); its overflow is seen at the first sample in its
                // mode past it.
                let ns = self.clock.cycles_to_ns(distance);
                let period = self.limits.mode_sample_ns;
                (period, period.min(self.limits.min_clock_period_ns), ns)
            }
            false => {
                let ns = self.clock.cycles_to_ns(distance);
                // Never more than half the distance: a lead that is too
                // large costs an early signal, not a late PMI.
                let lead = self.clock_lead.lead_ns().min(ns / 2);
                (ns - lead, self.limits.min_clock_period_ns, ns)
            }
        };
        // The minimum is per vCPU: the counters that can signal its thread
        // share it, so that six counters at a period of 1 raise no more
        // signals than one (each signal costs the thread an exit, which on
        // a slow host outlasts a single counter's minimum period).
        let min = min.saturating_mul(self.signalling_counters());
        HostPeriod {
            period: period.max(min),
            distance_ns,
            throttled: period < min,
        }
    }

    /// Running counters with a host event, each of which may raise
    /// overflow signals (at least 1).
    fn signalling_counters(&self) -> u64 {
        let n = self
            .counters
            .iter()
            .filter(|c| c.running && c.backing.handle().is_some())
            .count();
        n.max(1) as u64
    }

    /// Re-arms counter `i`'s host event at its current distance to overflow.
    pub(super) fn arm(&mut self, i: usize) {
        let Some(handle) = self.counters[i].backing.handle() else {
            return;
        };
        let hardware = matches!(self.counters[i].backing, BackingState::Hardware(_));
        let period = self.period(i, hardware);
        match self.backend.set_period(handle, period.period) {
            Ok(()) => {
                self.stats.period_updates += 1;
                self.armed(i, self.counters[i].host_count, period);
                self.counters[i].arm_at_entry = false;
            }
            Err(error) => self.fail(i, error),
        }
    }

    /// Sets counter `i` (already synced) to `value`; re-arms now if it
    /// runs on a host event, else when it starts.
    pub(super) fn set_value(&mut self, i: usize, value: u64) {
        self.counters[i].value = value;
        self.counters[i].rearm = true;
        if self.counters[i].running {
            self.arm(i);
        }
    }

    /// Brings every running counter up to date.
    pub(super) fn sync_running(&mut self) {
        for i in 0..self.counters.len() {
            self.sync(i);
        }
    }

    /// Adds what counter `i`'s backing counted since the last sync.
    pub(super) fn sync(&mut self, i: usize) {
        if !self.counters[i].running {
            return;
        }
        let delta = match self.counters[i].backing {
            BackingState::Hardware(handle) => match self.backend.read(handle) {
                Ok(reading) => {
                    self.stats.reads += 1;
                    let counter = &mut self.counters[i];
                    let delta = reading.value.wrapping_sub(counter.host_count);
                    counter.host_count = reading.value;
                    counter.time_enabled = reading.time_enabled;
                    counter.time_running = reading.time_running;
                    delta
                }
                Err(error) => return self.fail(i, error),
            },
            BackingState::Clock(_, mode) => {
                let now = match mode {
                    None => self.guest_ns(),
                    Some(mode) => self.guest_time.in_mode(mode),
                };
                let counter = &mut self.counters[i];
                let ns = now.saturating_sub(counter.clock_ns);
                counter.clock_ns = now;
                self.clock.ns_to_cycles(ns, &mut counter.carry)
            }
            // A refused counter that runs is tried again when read (the
            // VMM reads every counter when it publishes), not only when
            // the guest restarts it.
            BackingState::Refused(_) if self.retry_due(i) => return self.back(i),
            _ => return,
        };
        self.advance(i, delta);
    }

    /// Counts `delta` events on counter `i`, wrapping like hardware: each
    /// wrap is an overflow, sets the status bit and, with INT, a PMI.
    fn advance(&mut self, i: usize, delta: u64) {
        let counter = &mut self.counters[i];
        let (new, overflows) = value::advance(counter.value, delta, counter.mask);
        counter.value = new;
        counter.counted = counter.counted.saturating_add(delta);
        if overflows == 0 {
            return;
        }
        counter.overflows += overflows;
        self.stats.overflows += overflows;
        self.global_status |= counter.status_bit & self.layout.global_ctrl_valid;
        if counter.select & INT != 0 {
            counter.pmis += 1;
            self.pending_pmi = true;
        }
    }

    /// Refreshes the host times of clock-backed counters (hardware ones
    /// get them from every sync).
    pub(super) fn refresh_clock_times(&mut self) {
        for i in 0..self.counters.len() {
            let BackingState::Clock(handle, _) = self.counters[i].backing else {
                continue;
            };
            match self.backend.read(handle) {
                Ok(reading) => {
                    self.stats.reads += 1;
                    self.counters[i].time_enabled = reading.time_enabled;
                    self.counters[i].time_running = reading.time_running;
                }
                Err(error) => self.fail(i, error),
            }
        }
    }
}

/// The one guest mode an event select counts, if it counts only one.
fn counted_mode(select: u64) -> Option<GuestMode> {
    match (select & USR != 0, select & OS != 0) {
        (true, false) => Some(GuestMode::User),
        (false, true) => Some(GuestMode::Kernel),
        _ => None,
    }
}
