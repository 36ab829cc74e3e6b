//! COM1 (8250 UART at 0x3f8) output, one whole line at a time.
//!
//! Lines are formatted into a buffer first and then written under a spinlock,
//! so lines from different vCPUs never interleave. Interrupt and NMI handlers
//! never print (they could otherwise deadlock on the lock held by the code
//! they interrupted); only the fatal paths do, through [`emergency_line`],
//! which steals the lock if this vCPU is the one holding it.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, Ordering};

use crate::cpu::{inb, outb, pause};

const COM1: u16 = 0x3f8;
const THR: u16 = COM1;
const IER: u16 = COM1 + 1;
const FCR: u16 = COM1 + 2;
const LCR: u16 = COM1 + 3;
const MCR: u16 = COM1 + 4;
const LSR: u16 = COM1 + 5;
const LSR_THRE: u8 = 1 << 5;

/// 0 = free, otherwise holder's cpu id + 1.
static LOCK: AtomicU32 = AtomicU32::new(0);

/// Programs 115200 8N1, FIFOs on, interrupts off (BSP, before any output).
pub fn init() {
    outb(IER, 0x00);
    outb(LCR, 0x80); // DLAB
    outb(COM1, 0x01); // divisor 1 = 115200
    outb(COM1 + 1, 0x00);
    outb(LCR, 0x03); // 8N1
    outb(FCR, 0xc7);
    outb(MCR, 0x03); // DTR | RTS, OUT2 off: no IRQs
}

fn putc(c: u8) {
    // Bounded wait: a UART that never drains must not hang the probe.
    for _ in 0..100_000 {
        if inb(LSR) & LSR_THRE != 0 {
            break;
        }
        pause();
    }
    outb(THR, c);
}

fn write_bytes(b: &[u8]) {
    for &c in b {
        if c == b'\n' {
            putc(b'\r');
        }
        putc(c);
    }
}

/// A fixed-size line buffer; text beyond its capacity is dropped and the
/// line ends with `...`.
pub struct Line {
    buf: [u8; 1024],
    len: usize,
    truncated: bool,
}

impl Line {
    pub const fn new() -> Self {
        Line {
            buf: [0; 1024],
            len: 0,
            truncated: false,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - 4 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        if n < s.len() {
            self.truncated = true;
        }
        Ok(())
    }
}

fn lock(me: u32) {
    while LOCK
        .compare_exchange_weak(0, me + 1, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        pause();
    }
}

fn unlock() {
    LOCK.store(0, Ordering::Release);
}

fn emit(line: &Line) {
    write_bytes(b"probe: ");
    write_bytes(line.as_bytes());
    if line.truncated {
        write_bytes(b"...");
    }
    write_bytes(b"\n");
}

/// Prints one `probe: ...` line atomically with respect to other vCPUs.
pub fn print_line(args: fmt::Arguments) {
    let mut line = Line::new();
    let _ = line.write_fmt(args);
    lock(crate::percpu::this_cpu_id());
    emit(&line);
    unlock();
}

/// Prints a line from a fatal path (panic, unexpected exception). Waits a
/// bounded time for the lock and then takes it regardless.
pub fn emergency_line(args: fmt::Arguments) {
    let mut line = Line::new();
    let _ = line.write_fmt(args);
    let me = crate::percpu::try_this_cpu_id();
    for _ in 0..10_000_000u32 {
        if LOCK.load(Ordering::Relaxed) == me + 1 {
            break; // we hold it ourselves (fault while printing)
        }
        if LOCK
            .compare_exchange(0, u32::MAX, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            break;
        }
        pause();
    }
    emit(&line);
    LOCK.store(0, Ordering::Release);
}

/// `out!("key={} ...", v)` prints `probe: key=... ...`.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::serial::print_line(format_args!($($arg)*))
    };
}
