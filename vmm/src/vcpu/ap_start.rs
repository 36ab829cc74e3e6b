//! Parked secondary vCPUs and their start: the VMM's side of the ACPI MP
//! wakeup mailbox (`devices::mp_wakeup`). Each secondary vCPU thread blocks
//! in [`ApGate::wait`] until the mailbox, on the thread of the vCPU that
//! wrote the command, calls [`ApStarter::start`] for it; the woken thread
//! then sets its own registers (`arch::regs::start_ap`) and runs.

use std::sync::{Arc, Condvar, Mutex};

use devices::sync::Recover;
use devices::{ApStartError, ApStarter};

use crate::arch::layout::IDENTITY_MAPPED_END;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Waiting for its wakeup.
    Parked,
    /// Woken: the vector its thread has not taken yet.
    Woken(u64),
    /// Running (or the boot vCPU, which is never parked).
    Running,
}

/// The parked vCPUs of one boot, by vCPU index (which is the APIC ID).
pub struct ApGate {
    state: Mutex<(Vec<Slot>, bool)>,
    changed: Condvar,
}

impl ApGate {
    /// A gate for `vcpus` vCPUs: vCPU 0 runs, the others are parked.
    pub fn new(vcpus: usize) -> Arc<Self> {
        let slots = (0..vcpus)
            .map(|i| if i == 0 { Slot::Running } else { Slot::Parked })
            .collect();
        Arc::new(Self {
            state: Mutex::new((slots, false)),
            changed: Condvar::new(),
        })
    }

    /// A restored boot's gate: the vCPUs `parked` says are parked, the others
    /// run.
    pub fn restored(parked: &[bool]) -> Arc<Self> {
        let slots = parked
            .iter()
            .map(|&p| if p { Slot::Parked } else { Slot::Running })
            .collect();
        Arc::new(Self {
            state: Mutex::new((slots, false)),
            changed: Condvar::new(),
        })
    }

    /// Whether vCPU `index` waits for its wakeup (a woken one that has not
    /// taken its vector yet is no longer parked).
    pub fn is_parked(&self, index: usize) -> bool {
        self.lock().0.get(index) == Some(&Slot::Parked)
    }

    /// The mailbox's handle on this gate.
    pub fn starter(self: &Arc<Self>) -> Box<dyn ApStarter> {
        Box::new(Starter(self.clone()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<Slot>, bool)> {
        self.state.lock().recover()
    }

    /// Blocks vCPU `index`'s thread (no spinning) until it is woken: the
    /// wakeup vector, or None when the boot stops first.
    pub fn wait(&self, index: usize) -> Option<u64> {
        let mut state = self.lock();
        loop {
            let (slots, stopped) = &mut *state;
            match slots.get(index).copied() {
                Some(Slot::Woken(vector)) => {
                    slots[index] = Slot::Running;
                    return Some(vector);
                }
                Some(Slot::Parked) if !*stopped => {}
                _ => return None,
            }
            state = self.changed.wait(state).recover();
        }
    }

    /// The boot is over: every parked thread returns from `wait`.
    pub fn stop(&self) {
        self.lock().1 = true;
        self.changed.notify_all();
    }
}

/// [`ApStarter`] for the mailbox: marks the vCPU woken, once.
struct Starter(Arc<ApGate>);

impl ApStarter for Starter {
    fn start(&self, apic_id: u32, vector: u64) -> Result<(), ApStartError> {
        if vector >= IDENTITY_MAPPED_END {
            return Err(ApStartError::VectorNotMapped(vector));
        }
        let mut state = self.0.lock();
        let slot = usize::try_from(apic_id)
            .ok()
            .and_then(|i| state.0.get_mut(i))
            .filter(|s| **s == Slot::Parked)
            .ok_or(ApStartError::NoSuchAp(apic_id))?;
        *slot = Slot::Woken(vector);
        self.0.changed.notify_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_parked_vcpu_blocks_until_its_wakeup_which_happens_once() {
        let gate = ApGate::new(3);
        let starter = gate.starter();
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.wait(2))
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished());
        assert_eq!(starter.start(2, 0x9a000), Ok(()));
        assert_eq!(waiter.join().unwrap(), Some(0x9a000));
        assert_eq!(starter.start(2, 0x9a000), Err(ApStartError::NoSuchAp(2)));
        assert_eq!(starter.start(0, 0x9a000), Err(ApStartError::NoSuchAp(0)));
        assert_eq!(starter.start(3, 0x9a000), Err(ApStartError::NoSuchAp(3)));
        assert_eq!(
            starter.start(1, IDENTITY_MAPPED_END),
            Err(ApStartError::VectorNotMapped(IDENTITY_MAPPED_END))
        );
    }

    #[test]
    fn stop_releases_parked_threads_without_a_vector() {
        let gate = ApGate::new(2);
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.wait(1))
        };
        std::thread::sleep(Duration::from_millis(20));
        gate.stop();
        assert_eq!(waiter.join().unwrap(), None);
        assert_eq!(gate.wait(1), None);
    }
}
