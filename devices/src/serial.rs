//! The 8250/16550 UART at COM1, on `vm-superio`'s register model.
//!
//! Output goes to a sink chosen by the user (through [`crate::console`],
//! which never blocks). Input bytes from the host are queued here, up to
//! [`INPUT_BUFFER`] bytes, and fed to the guest as its receive FIFO drains:
//! nothing is lost while the guest reads, however slowly, as long as it
//! keeps within the buffer; input beyond it (the guest does not read) is
//! dropped and counted, so host input can never grow the VMM.

use std::collections::VecDeque;
use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Raises the UART's interrupt line by writing an eventfd that the VMM has
/// registered as an irqfd (IRQ 4 for COM1).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The UART's receive FIFO (16550).
const UART_FIFO: usize = 64;

/// Host input kept for the guest at most (beyond the UART's own 64-byte
/// FIFO); more is dropped.
pub const INPUT_BUFFER: usize = 64 * 1024;

/// Where the guest's serial output goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// What a snapshot keeps of the UART: its registers, its receive FIFO and
/// the host input not yet in the FIFO (nothing typed is lost).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub registers: [u8; 9],
    pub fifo: Vec<u8>,
    pub pending_input: Vec<u8>,
}

/// Why a saved UART cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum SerialSnapshotError {
    #[error("cannot restore the serial port: {0}")]
    Io(#[from] io::Error),
    #[error("the serial FIFO holds {0} bytes, more than the UART's 64")]
    FifoTooLong(usize),
    #[error("the serial input buffer holds {0} bytes, more than {INPUT_BUFFER}")]
    InputTooLong(usize),
}

/// COM1 as a port I/O device.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, SerialOutput>,
    pending_input: VecDeque<u8>,
    input_dropped: u64,
}

impl SerialDevice {
    pub fn new(irq: EventFd, output: SerialOutput) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), output),
            pending_input: VecDeque::new(),
            input_dropped: 0,
        }
    }

    /// Queues host input for the guest. It reaches the guest's FIFO as
    /// space frees up. What does not fit in [`INPUT_BUFFER`] is dropped
    /// (and counted); returns how many bytes were kept.
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        self.feed_input();
        let room = INPUT_BUFFER.saturating_sub(self.pending_input.len());
        let kept = room.min(bytes.len());
        self.pending_input.extend(&bytes[..kept]);
        self.input_dropped += (bytes.len() - kept) as u64;
        self.feed_input();
        kept
    }

    /// Whether the input buffer is full (more input would be dropped).
    pub fn input_full(&self) -> bool {
        self.pending_input.len() >= INPUT_BUFFER
    }

    /// Host input bytes dropped because the buffer was full.
    pub fn input_dropped(&self) -> u64 {
        self.input_dropped
    }

    /// Bytes of host input not yet in the guest's FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending_input.len()
    }

    /// The UART's state, for a snapshot.
    pub fn save(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            fifo: s.in_buffer,
            pending_input: self.pending_input.iter().copied().collect(),
        }
    }

    /// Puts the UART in a saved state; its output keeps going where it
    /// went, on the same interrupt. Checked first: a saved state out of
    /// bounds changes nothing. Only before the guest runs (a restore).
    pub fn restore(&mut self, saved: &SerialSnapshot) -> Result<(), SerialSnapshotError> {
        if saved.fifo.len() > UART_FIFO {
            return Err(SerialSnapshotError::FifoTooLong(saved.fifo.len()));
        }
        if saved.pending_input.len() > INPUT_BUFFER {
            return Err(SerialSnapshotError::InputTooLong(saved.pending_input.len()));
        }
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            saved.registers;
        let state = SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: saved.fifo.clone(),
        };
        let irq = &self.uart.interrupt_evt().0;
        let (for_placeholder, for_uart) = (irq.try_clone()?, irq.try_clone()?);
        // The output sink moves from the old UART to the restored one.
        let placeholder = Serial::new(IrqTrigger(for_placeholder), Box::new(io::sink()) as _);
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        self.uart = Serial::from_state(&state, IrqTrigger(for_uart), NoEvents, out)
            .map_err(|e| SerialSnapshotError::Io(io::Error::other(format!("{e:?}"))))?;
        self.pending_input = saved.pending_input.iter().copied().collect();
        Ok(())
    }

    fn feed_input(&mut self) {
        while !self.pending_input.is_empty() && self.uart.fifo_capacity() > 0 {
            let (front, _) = self.pending_input.as_slices();
            match self.uart.enqueue_raw_bytes(front) {
                Ok(n) => {
                    self.pending_input.drain(..n);
                }
                // Full FIFO or a failed interrupt: keep the bytes for later.
                Err(_) => break,
            }
        }
    }
}

impl BusDevice<u16> for SerialDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let Ok(offset) = u8::try_from(offset) else {
            data.fill(0xff);
            return;
        };
        for byte in data.iter_mut() {
            *byte = self.uart.read(offset);
        }
        // A read of the receive buffer may have made room.
        self.feed_input();
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Ok(offset) = u8::try_from(offset) else {
            return;
        };
        for &byte in data {
            // A failed write to the sink or irqfd cannot be reported to the
            // guest (a UART has no error path); the byte is lost to the sink
            // only.
            let _ = self.uart.write(offset, byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::SharedSink as Shared;

    #[test]
    fn output_reaches_the_sink() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(out.clone()));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_beyond_the_fifo_is_kept_not_dropped() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(io::sink()));
        dev.write(1, &[0x01]); // IER: received-data interrupt on
        let input: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        dev.queue_input(&input);
        assert!(dev.pending_input() > 0, "more than a FIFO's worth queued");
        let mut received = Vec::new();
        for _ in 0..400 {
            let mut lsr = [0];
            dev.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                break;
            }
            let mut b = [0];
            dev.read(0, &mut b);
            received.push(b[0]);
        }
        assert_eq!(received, input);
        assert_eq!(irq.read().map(|n| n > 0).ok(), Some(true));
    }

    #[test]
    fn input_the_guest_does_not_read_is_bounded_and_counted() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(io::sink()));
        let chunk = vec![b'y'; 10_000];
        let mut kept = 0;
        for _ in 0..100 {
            kept += dev.queue_input(&chunk);
        }
        assert!(dev.input_full());
        // The buffer plus what the UART's FIFO took.
        assert!((INPUT_BUFFER..=INPUT_BUFFER + 64).contains(&kept), "{kept}");
        assert!(dev.pending_input() <= INPUT_BUFFER);
        assert_eq!(dev.input_dropped(), 1_000_000 - kept as u64);
        // Once the guest reads, input is taken again.
        let mut b = [0];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'y');
        assert!(!dev.input_full());
        assert_eq!(dev.queue_input(b"z"), 1);
    }

    #[test]
    fn a_restored_uart_has_the_saved_registers_fifo_and_input_and_the_same_output() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(out.clone()));
        dev.write(3, &[0x03]); // LCR: 8 bits
        dev.write(7, &[0x5a]); // scratch
        dev.queue_input(&[b'k'; 100]);
        let saved = dev.save();
        assert_eq!(saved.fifo.len(), 64);
        assert_eq!(saved.pending_input.len(), 36);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut other = SerialDevice::new(irq, Box::new(out.clone()));
        other.restore(&saved).unwrap();
        assert_eq!(other.save(), saved);
        let mut scratch = [0];
        other.read(7, &mut scratch);
        assert_eq!(scratch[0], 0x5a);
        other.write(0, b"!");
        assert_eq!(&*out.0.lock().unwrap(), b"!");
        // Out of bounds: refused, nothing changed.
        let mut bad = saved.clone();
        bad.fifo = vec![0; 65];
        assert!(other.restore(&bad).is_err());
        bad = saved.clone();
        bad.pending_input = vec![0; INPUT_BUFFER + 1];
        assert!(other.restore(&bad).is_err());
        assert_eq!(other.save(), saved);
    }
}
