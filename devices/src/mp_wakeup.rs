//! The ACPI multiprocessor wakeup mailbox (ACPI 6.4, MADT structure type
//! 0x10): how an OS starts secondary CPUs on a platform without INIT/SIPI.
//!
//! The firmware parks every application processor (AP) and publishes one
//! 4 KiB mailbox. The OS writes an AP's APIC ID and a 64-bit wakeup vector,
//! then the command `Wakeup` (1), and waits for the command to read back as
//! `Noop` (0): the AP with that APIC ID clears it as it leaves for the
//! vector. Here the mailbox is not RAM: each guest access is an MMIO exit,
//! so the VMM sees the command as it is written and starts the parked vCPU
//! itself (through [`ApStarter`]), with no firmware spinning on a CPU.
//!
//! What a command gets, as the spec has it (only the matching AP ever acts):
//! - `Wakeup` for a parked AP: the AP starts at the vector, exactly once,
//!   and the command reads back as 0.
//! - `Wakeup` for an APIC ID that matches no parked AP (unknown, the boot
//!   CPU, or an AP already woken, which no longer reads the mailbox):
//!   nothing acts, so the command stays set. Rewriting the command after
//!   fixing the APIC ID retries.
//! - A reserved command (2..=0xffff) is left as written; nothing acts.
//! - `Noop`: nothing.
//!
//! Accesses of any size and alignment inside the page are plain memory for
//! the OS section (bytes 0..2048); the firmware section (2048..4096) reads
//! as zero and ignores writes. Nothing a guest writes can make this panic.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::BusDevice;

/// Size of the mailbox, and its required alignment.
pub const MAILBOX_SIZE: u64 = 4096;
/// The mailbox version this device implements (ACPI 6.4: 0).
pub const MAILBOX_VERSION: u16 = 0;
/// Command: no operation (and the AP's acknowledgement).
pub const COMMAND_NOOP: u16 = 0;
/// Command: the AP named by the APIC ID field jumps to the wakeup vector.
pub const COMMAND_WAKEUP: u16 = 1;

/// Byte offsets of the OS section's fields.
pub const OFFSET_COMMAND: usize = 0;
pub const OFFSET_APIC_ID: usize = 4;
pub const OFFSET_WAKEUP_VECTOR: usize = 8;
/// The OS section ends here; the firmware section follows.
const OS_SECTION_END: usize = 2048;

/// Starts a parked application processor: what the VMM gives the mailbox.
pub trait ApStarter: Send + Sync {
    /// Starts the AP with local APIC ID `apic_id` in 64-bit mode at
    /// `vector` (identity-mapped paging, interrupts off). Called at most
    /// once per AP.
    fn start(&self, apic_id: u32, vector: u64) -> Result<(), ApStartError>;
}

/// Why an AP could not be started.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum ApStartError {
    /// The vector lies outside what the start-up page tables map.
    #[error("wakeup vector {0:#x} is not identity-mapped")]
    VectorNotMapped(u64),
    /// No vCPU has this APIC ID, or it has already been started.
    #[error("no parked vCPU has APIC ID {0}")]
    NoSuchAp(u32),
}

/// What the last command write did (for the VMM's log and the tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandOutcome {
    /// No command was written (only other fields), or `Noop`.
    None,
    /// The AP was started and the command cleared.
    Started { apic_id: u32, vector: u64 },
    /// `Wakeup` for an APIC ID no parked AP has: the command stays set.
    NoParkedAp { apic_id: u32 },
    /// The starter refused: the command stays set.
    Refused(ApStartError),
    /// A reserved command value: left as written.
    Reserved(u16),
}

/// What a snapshot keeps of the mailbox: the OS section as the guest left
/// it, the APs still parked and the counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxSnapshot {
    pub os_section: Vec<u8>,
    pub parked: Vec<u32>,
    pub started: u32,
    pub rejected: u32,
}

/// The mailbox page and the APs still parked on it.
pub struct MpWakeupMailbox {
    os: [u8; OS_SECTION_END],
    parked: BTreeSet<u32>,
    starter: Box<dyn ApStarter>,
    started: u32,
    rejected: u32,
}

impl MpWakeupMailbox {
    /// A mailbox on which the APs with `parked` APIC IDs wait.
    pub fn new(parked: impl IntoIterator<Item = u32>, starter: Box<dyn ApStarter>) -> Self {
        Self {
            os: [0; OS_SECTION_END],
            parked: parked.into_iter().collect(),
            starter,
            started: 0,
            rejected: 0,
        }
    }

    /// The mailbox's state, for a snapshot.
    pub fn save(&self) -> MailboxSnapshot {
        MailboxSnapshot {
            os_section: self.os.to_vec(),
            parked: self.parked.iter().copied().collect(),
            started: self.started,
            rejected: self.rejected,
        }
    }

    /// A mailbox in a saved state, whose parked APs must be among
    /// `apic_ids`; `None` for a state no mailbox of these APs can have.
    pub fn restored(
        saved: &MailboxSnapshot,
        apic_ids: &[u32],
        starter: Box<dyn ApStarter>,
    ) -> Option<Self> {
        let os = <[u8; OS_SECTION_END]>::try_from(saved.os_section.as_slice()).ok()?;
        if !saved.parked.iter().all(|id| apic_ids.contains(id)) {
            return None;
        }
        Some(Self {
            os,
            parked: saved.parked.iter().copied().collect(),
            starter,
            started: saved.started,
            rejected: saved.rejected,
        })
    }

    /// APs started so far.
    pub fn started(&self) -> u32 {
        self.started
    }

    /// `Wakeup` or reserved commands that nothing acted on.
    pub fn rejected(&self) -> u32 {
        self.rejected
    }

    /// APs still waiting for their wakeup.
    pub fn parked(&self) -> impl Iterator<Item = u32> + '_ {
        self.parked.iter().copied()
    }

    /// A guest read at `offset` in the page.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| self.os.get(at).copied())
                .unwrap_or(0);
        }
    }

    /// A guest write at `offset` in the page. A write that reaches the
    /// command field runs the command.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> CommandOutcome {
        let mut command_written = false;
        for (i, byte) in data.iter().enumerate() {
            let Some(at) = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) else {
                break;
            };
            if let Some(slot) = self.os.get_mut(at) {
                *slot = *byte;
                command_written |= at < OFFSET_COMMAND + 2;
            }
        }
        if command_written {
            self.run_command()
        } else {
            CommandOutcome::None
        }
    }

    fn field<const N: usize>(&self, at: usize) -> [u8; N] {
        std::array::from_fn(|i| self.os[at + i])
    }

    fn run_command(&mut self) -> CommandOutcome {
        let command = u16::from_le_bytes(self.field(OFFSET_COMMAND));
        let apic_id = u32::from_le_bytes(self.field(OFFSET_APIC_ID));
        let vector = u64::from_le_bytes(self.field(OFFSET_WAKEUP_VECTOR));
        let outcome = match command {
            COMMAND_NOOP => return CommandOutcome::None,
            COMMAND_WAKEUP if !self.parked.contains(&apic_id) => {
                CommandOutcome::NoParkedAp { apic_id }
            }
            COMMAND_WAKEUP => match self.starter.start(apic_id, vector) {
                Ok(()) => {
                    self.parked.remove(&apic_id);
                    self.started += 1;
                    self.os[OFFSET_COMMAND..OFFSET_COMMAND + 2].fill(0);
                    return CommandOutcome::Started { apic_id, vector };
                }
                Err(e) => CommandOutcome::Refused(e),
            },
            reserved => CommandOutcome::Reserved(reserved),
        };
        self.rejected += 1;
        outcome
    }
}

/// Commands nothing acted on that are logged; later ones are only counted
/// (a hostile guest must not flood the VMM's log).
const LOGGED_REJECTIONS: u32 = 8;

impl BusDevice<u64> for MpWakeupMailbox {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MpWakeupMailbox::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let outcome = MpWakeupMailbox::write(self, offset, data);
        let rejected = !matches!(
            outcome,
            CommandOutcome::None | CommandOutcome::Started { .. }
        );
        if rejected && self.rejected <= LOGGED_REJECTIONS {
            eprintln!("vmm: MP wakeup mailbox: command not acted on (left pending): {outcome:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records starts; refuses vectors at or above `limit`.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(u32, u64)>>>);

    impl ApStarter for Recorder {
        fn start(&self, apic_id: u32, vector: u64) -> Result<(), ApStartError> {
            if vector >= 1 << 32 {
                return Err(ApStartError::VectorNotMapped(vector));
            }
            self.0.lock().unwrap().push((apic_id, vector));
            Ok(())
        }
    }

    fn mailbox(parked: &[u32]) -> (MpWakeupMailbox, Recorder) {
        let rec = Recorder::default();
        (
            MpWakeupMailbox::new(parked.iter().copied(), Box::new(rec.clone())),
            rec,
        )
    }

    /// What Linux's `acpi_wakeup_cpu` does: APIC ID, vector, command.
    fn wake(m: &mut MpWakeupMailbox, apic_id: u32, vector: u64) -> CommandOutcome {
        m.write(OFFSET_APIC_ID as u64, &apic_id.to_le_bytes());
        m.write(OFFSET_WAKEUP_VECTOR as u64, &vector.to_le_bytes());
        m.write(OFFSET_COMMAND as u64, &COMMAND_WAKEUP.to_le_bytes())
    }

    fn command(m: &MpWakeupMailbox) -> u16 {
        let mut b = [0u8; 2];
        m.read(OFFSET_COMMAND as u64, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn wakeup_starts_the_ap_once_and_clears_the_command() {
        let (mut m, rec) = mailbox(&[1, 2, 3]);
        assert_eq!(
            wake(&mut m, 2, 0x9a000),
            CommandOutcome::Started {
                apic_id: 2,
                vector: 0x9a000
            }
        );
        assert_eq!(command(&m), COMMAND_NOOP);
        assert_eq!(*rec.0.lock().unwrap(), vec![(2, 0x9a000)]);
        assert_eq!(m.parked().collect::<Vec<_>>(), vec![1, 3]);
        // The fields the OS wrote read back.
        let mut v = [0u8; 8];
        m.read(OFFSET_WAKEUP_VECTOR as u64, &mut v);
        assert_eq!(u64::from_le_bytes(v), 0x9a000);
        assert_eq!((m.started(), m.rejected()), (1, 0));
    }

    #[test]
    fn repeated_wakeup_starts_nothing_and_leaves_the_command_set() {
        let (mut m, rec) = mailbox(&[1]);
        wake(&mut m, 1, 0x1000);
        assert_eq!(
            wake(&mut m, 1, 0x2000),
            CommandOutcome::NoParkedAp { apic_id: 1 }
        );
        assert_eq!(command(&m), COMMAND_WAKEUP);
        assert_eq!(rec.0.lock().unwrap().len(), 1);
        assert_eq!((m.started(), m.rejected()), (1, 1));
    }

    #[test]
    fn unknown_apic_id_leaves_the_command_set_until_a_good_retry() {
        let (mut m, rec) = mailbox(&[1]);
        for id in [0, 7, u32::MAX] {
            assert_eq!(
                wake(&mut m, id, 0x1000),
                CommandOutcome::NoParkedAp { apic_id: id }
            );
            assert_eq!(command(&m), COMMAND_WAKEUP);
        }
        assert!(rec.0.lock().unwrap().is_empty());
        // Fixing the APIC ID alone does not act; rewriting the command does.
        m.write(OFFSET_APIC_ID as u64, &1u32.to_le_bytes());
        assert!(rec.0.lock().unwrap().is_empty());
        assert!(matches!(
            m.write(0, &COMMAND_WAKEUP.to_le_bytes()),
            CommandOutcome::Started { apic_id: 1, .. }
        ));
        assert_eq!(command(&m), COMMAND_NOOP);
    }

    #[test]
    fn refused_and_reserved_commands_are_left_pending() {
        let (mut m, rec) = mailbox(&[1]);
        assert_eq!(
            wake(&mut m, 1, 1 << 40),
            CommandOutcome::Refused(ApStartError::VectorNotMapped(1 << 40))
        );
        assert_eq!(command(&m), COMMAND_WAKEUP);
        assert_eq!(m.parked().collect::<Vec<_>>(), vec![1]);
        assert_eq!(m.write(0, &[2, 0]), CommandOutcome::Reserved(2));
        assert_eq!(command(&m), 2);
        assert_eq!(m.write(0, &[0, 0]), CommandOutcome::None);
        assert!(rec.0.lock().unwrap().is_empty());
        assert_eq!(m.rejected(), 2);
    }

    #[test]
    fn any_size_or_offset_is_safe_and_the_firmware_half_reads_zero() {
        let (mut m, rec) = mailbox(&[1]);
        // One 8-byte store over command + reserved + APIC ID 1: a wakeup
        // with the vector that was there (0).
        let mut word = [0u8; 8];
        word[..2].copy_from_slice(&COMMAND_WAKEUP.to_le_bytes());
        word[4..].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            m.write(0, &word),
            CommandOutcome::Started { apic_id: 1, .. }
        ));
        assert_eq!(*rec.0.lock().unwrap(), vec![(1, 0)]);
        // Odd byte of the command alone: 0x100 is reserved.
        assert_eq!(m.write(1, &[1]), CommandOutcome::Reserved(0x100));
        for offset in [2047, 2048, 4095, 4096, u64::MAX - 3, u64::MAX] {
            assert_eq!(m.write(offset, &[0xaa; 8]), CommandOutcome::None);
            let mut b = [0x55u8; 8];
            m.read(offset, &mut b);
            let expect_first = if offset == 2047 { 0xaa } else { 0 };
            assert_eq!(b[0], expect_first, "offset {offset}");
            assert_eq!(&b[1..], &[0; 7], "offset {offset}");
        }
        m.write(0, &[]);
        m.read(0, &mut []);
    }

    #[test]
    fn a_restored_mailbox_keeps_the_guest_s_fields_and_who_is_parked() {
        let (mut m, _) = mailbox(&[1, 2, 3]);
        assert!(matches!(
            wake(&mut m, 2, 0x9000),
            CommandOutcome::Started { .. }
        ));
        m.write(OFFSET_APIC_ID as u64, &7u32.to_le_bytes());
        let saved = m.save();
        let rec = Recorder::default();
        let mut back = MpWakeupMailbox::restored(&saved, &[1, 3], Box::new(rec.clone())).unwrap();
        assert_eq!(back.save(), saved);
        assert_eq!(back.parked().collect::<Vec<_>>(), vec![1, 3]);
        let mut id = [0u8; 4];
        back.read(OFFSET_APIC_ID as u64, &mut id);
        assert_eq!(u32::from_le_bytes(id), 7);
        // The one woken before the snapshot stays woken; the others wake.
        assert!(matches!(
            wake(&mut back, 2, 0x9000),
            CommandOutcome::NoParkedAp { .. }
        ));
        assert!(matches!(
            wake(&mut back, 3, 0x9000),
            CommandOutcome::Started { .. }
        ));
        assert_eq!(*rec.0.lock().unwrap(), vec![(3, 0x9000)]);
        // A state no mailbox of these APs can have is refused.
        assert!(MpWakeupMailbox::restored(&saved, &[1], Box::new(rec.clone())).is_none());
        let mut short = saved.clone();
        short.os_section.pop();
        assert!(MpWakeupMailbox::restored(&short, &[1, 3], Box::new(rec)).is_none());
    }
}
