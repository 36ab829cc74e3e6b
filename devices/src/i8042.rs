//! The part of the i8042 keyboard controller a VMM needs: the CPU reset line.
//!
//! Linux (`reboot=k`) and the probe guest reset the machine by writing the
//! "pulse reset" command 0xFE to the command port 0x64. Everything else reads
//! as an idle controller with nothing attached.

use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// What the i8042's CPU reset output is wired to.
pub trait ResetLine: Send {
    /// The guest pulsed the reset line.
    fn pulse(&self);
}

/// An eventfd as the reset line: the VMM's event loop sees it.
impl ResetLine for EventFd {
    fn pulse(&self) {
        // A write fails only if the counter would overflow, which means a
        // reset is already pending.
        let _ = self.write(1);
    }
}

/// Offset of the command/status port (0x64) from the data port (0x60).
pub const COMMAND_OFFSET: u16 = 4;
/// Command byte that pulses the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// i8042 at ports 0x60..=0x64.
pub struct I8042 {
    reset: Box<dyn ResetLine>,
}

impl I8042 {
    /// `reset` is pulsed, on the vCPU thread that wrote the command, when
    /// the guest resets the machine.
    pub fn new(reset: Box<dyn ResetLine>) -> Self {
        Self { reset }
    }
}

impl BusDevice<u16> for I8042 {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; data reads 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.reset.pulse();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_and_nothing_else_does() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(Box::new(evt.try_clone().unwrap()));
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xd1]);
        assert!(evt.read().is_err(), "no reset expected yet");
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
        let mut status = [0xaa];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}
