//! The host terminal while it is the guest's serial console: the guest's
//! own line discipline (its shell's line editing, its echo) serves the user,
//! so the host's must stand aside.
//!
//! Left as it is (canonical mode, echo on), the host terminal echoed what
//! it sent the guest itself and held input back until a newline: a guest
//! shell's cursor-position query (`ESC [ 6 n`, which busybox's line editor
//! sends at every prompt) was answered by the terminal emulator, and that
//! answer, echoed by the host, showed as `^[[50;8R` at every prompt, while
//! typed text appeared twice (the host's echo, then the guest's).
//!
//! [`RawInput::enter`] turns off canonical mode, echo and input translation
//! on standard input when it is a terminal, and puts back exactly the
//! settings it found when dropped. Signal keys stay on: Ctrl-C still ends
//! the VMM (exit code 130, as the README promises) instead of reaching the
//! guest. Output processing is left alone.

use std::io;
use std::os::fd::RawFd;

/// Standard input in raw mode until dropped.
pub struct RawInput {
    fd: RawFd,
    saved: libc::termios,
}

/// `settings` with canonical mode, echo and input translation off, and
/// reads returning as soon as one byte is there; signal keys and output
/// processing as they were.
fn raw(settings: &libc::termios) -> libc::termios {
    let mut t = *settings;
    t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ECHOE | libc::ECHOK | libc::ECHONL);
    t.c_lflag &= !libc::IEXTEN;
    // Bytes reach the guest as typed: no CR/NL translation, no flow control
    // keys taken by the host, no stripping of the eighth bit.
    t.c_iflag &= !(libc::ICRNL
        | libc::INLCR
        | libc::IGNCR
        | libc::IXON
        | libc::IXOFF
        | libc::ISTRIP
        | libc::INPCK);
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    t
}

impl RawInput {
    /// Raw mode on standard input if it is a terminal; `None` when it is
    /// not (a file, a pipe, /dev/null) or its settings cannot be changed.
    pub fn enter() -> Option<Self> {
        Self::enter_fd(libc::STDIN_FILENO).ok()
    }

    /// Raw mode on `fd`, which must be a terminal.
    pub fn enter_fd(fd: RawFd) -> io::Result<Self> {
        let saved = get(fd)?;
        set(fd, &raw(&saved))?;
        Ok(Self { fd, saved })
    }
}

impl Drop for RawInput {
    fn drop(&mut self) {
        // Nothing more can be done if the terminal has gone away.
        let _ = set(self.fd, &self.saved);
    }
}

/// The terminal settings of `fd`; an error when it is not a terminal.
fn get(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: termios is plain data, so all zeroes is a valid value.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes only into `t`, a termios we own; an invalid
    // or non-terminal descriptor makes it fail (EBADF, ENOTTY), nothing else.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(t)
}

/// Applies `settings` to terminal `fd` now.
fn set(fd: RawFd, settings: &libc::termios) -> io::Result<()> {
    // SAFETY: tcsetattr only reads `settings`, a valid termios; on a
    // descriptor that is not a terminal it fails without effect.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, settings) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A pseudo-terminal pair: (controller, terminal).
    fn pty() -> (OwnedFd, OwnedFd) {
        let (mut controller, mut terminal) = (-1, -1);
        // SAFETY: openpty writes two descriptors into the integers given;
        // the name, settings and window size pointers may be null.
        let rc = unsafe {
            libc::openpty(
                &mut controller,
                &mut terminal,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and are owned by nothing
        // else.
        unsafe {
            (
                OwnedFd::from_raw_fd(controller),
                OwnedFd::from_raw_fd(terminal),
            )
        }
    }

    #[test]
    fn raw_mode_stops_echo_and_line_buffering_and_drop_restores_every_setting() {
        let (_controller, terminal) = pty();
        let fd = terminal.as_raw_fd();
        let before = get(fd).unwrap();
        // A fresh pty starts cooked, with echo and signal keys.
        assert_ne!(before.c_lflag & libc::ICANON, 0);
        assert_ne!(before.c_lflag & libc::ECHO, 0);
        assert_ne!(before.c_lflag & libc::ISIG, 0);
        {
            let _raw = RawInput::enter_fd(fd).unwrap();
            let now = get(fd).unwrap();
            assert_eq!(now.c_lflag & (libc::ICANON | libc::ECHO | libc::ECHONL), 0);
            assert_eq!(now.c_iflag & (libc::ICRNL | libc::IXON), 0);
            assert_ne!(now.c_lflag & libc::ISIG, 0, "Ctrl-C must still end the VMM");
            assert_eq!(
                now.c_oflag, before.c_oflag,
                "output processing is untouched"
            );
            assert_eq!((now.c_cc[libc::VMIN], now.c_cc[libc::VTIME]), (1, 0));
        }
        let after = get(fd).unwrap();
        assert_eq!(
            (after.c_iflag, after.c_oflag, after.c_cflag, after.c_lflag),
            (
                before.c_iflag,
                before.c_oflag,
                before.c_cflag,
                before.c_lflag
            )
        );
        assert_eq!(after.c_cc, before.c_cc);
    }

    /// Makes reads of `fd` return at once when nothing is there.
    fn nonblocking(fd: &impl AsRawFd) {
        // SAFETY: fcntl on a descriptor the caller owns; F_SETFL with
        // O_NONBLOCK changes only its blocking mode.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        assert_eq!(rc, 0);
    }

    /// What `file` holds to be read within `wait`.
    fn read_for(file: &mut std::fs::File, wait: std::time::Duration) -> Vec<u8> {
        use std::io::Read;
        let start = std::time::Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while start.elapsed() < wait {
            match file.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("reading: {e}"),
            }
        }
        got
    }

    #[test]
    fn typed_bytes_reach_the_reader_at_once_and_are_not_echoed_in_raw_mode() {
        use std::io::Write;
        let (controller, terminal) = pty();
        let _raw = RawInput::enter_fd(terminal.as_raw_fd()).unwrap();
        nonblocking(&controller);
        nonblocking(&terminal);
        let mut controller = std::fs::File::from(controller);
        let mut terminal = std::fs::File::from(terminal);
        // A terminal emulator's answer to a cursor-position query: no
        // newline follows (in canonical mode the reader would get nothing).
        controller.write_all(b"\x1b[50;8R").unwrap();
        let wait = std::time::Duration::from_millis(300);
        assert_eq!(read_for(&mut terminal, wait), b"\x1b[50;8R");
        // Nothing came back to the screen side: no echo (cooked mode would
        // show "^[[50;8R" there).
        assert_eq!(read_for(&mut controller, wait), b"");
    }

    #[test]
    fn not_a_terminal_is_left_alone() {
        let file = tempfile::tempfile().unwrap();
        assert!(RawInput::enter_fd(file.as_raw_fd()).is_err());
    }
}
