//! COM1 (8250 UART at 0x3f8) output, one whole line at a time.
//!
//! Lines are built in a buffer first and then written under a spinlock, so
//! lines from different vCPUs never interleave. Interrupt and NMI handlers
//! never print (they could otherwise deadlock on the lock held by the code
//! they interrupted); only the fatal paths do, through [`Line::emergency`],
//! which steals the lock after a bounded wait.
//!
//! There is deliberately no `core::fmt` here: the precompiled `core`'s
//! formatting code uses SSE, and SSE instructions cannot run in guests on the
//! development hosts (see README.md). Values are appended through [`Put`].

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
#[link_section = ".data.probe_state"]
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

const LINE_MAX: usize = 1024;

/// A fixed-size line buffer; text beyond its capacity is dropped and the
/// line ends with `...`.
pub struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
    truncated: bool,
}

impl Line {
    pub const fn new() -> Self {
        Line {
            buf: [0; LINE_MAX],
            len: 0,
            truncated: false,
        }
    }

    pub fn byte(&mut self, b: u8) {
        if self.len < LINE_MAX {
            self.buf[self.len] = b;
            self.len += 1;
        } else {
            self.truncated = true;
        }
    }

    pub fn bytes(&mut self, s: &[u8]) {
        for &b in s {
            self.byte(b);
        }
    }

    pub fn put<T: Put + ?Sized>(&mut self, v: &T) -> &mut Self {
        v.put(self);
        self
    }

    fn emit(&self) {
        write_bytes(b"probe: ");
        write_bytes(&self.buf[..self.len]);
        if self.truncated {
            write_bytes(b"...");
        }
        write_bytes(b"\n");
    }

    /// Prints the line as `probe: ...`, atomically with respect to other
    /// vCPUs.
    pub fn print(&self) {
        let me = crate::percpu::this_cpu_id();
        while LOCK
            .compare_exchange_weak(0, me + 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            pause();
        }
        self.emit();
        LOCK.store(0, Ordering::Release);
    }

    /// Prints from a fatal path (panic, unexpected exception): waits a
    /// bounded time for the lock, then prints regardless.
    pub fn emergency(&self) {
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
        self.emit();
        LOCK.store(0, Ordering::Release);
    }
}

/// Something that can be appended to a [`Line`].
pub trait Put {
    fn put(&self, l: &mut Line);
}

impl Put for str {
    fn put(&self, l: &mut Line) {
        l.bytes(self.as_bytes());
    }
}

impl<T: Put + ?Sized> Put for &T {
    fn put(&self, l: &mut Line) {
        (**self).put(l);
    }
}

fn put_dec(l: &mut Line, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while n > 0 {
        n -= 1;
        l.byte(digits[n]);
    }
}

fn put_hex(l: &mut Line, v: u64, min_digits: u32) {
    let mut started = false;
    for i in (0..16).rev() {
        let d = ((v >> (4 * i)) & 0xf) as u8;
        if d != 0 || started || i < min_digits {
            started = true;
            l.byte(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
    }
}

macro_rules! put_unsigned {
    ($($t:ty),*) => {$(
        impl Put for $t {
            fn put(&self, l: &mut Line) {
                put_dec(l, *self as u64);
            }
        }
    )*};
}
put_unsigned!(u8, u16, u32, u64, usize);

impl Put for i64 {
    fn put(&self, l: &mut Line) {
        if *self < 0 {
            l.byte(b'-');
        }
        put_dec(l, self.unsigned_abs());
    }
}

impl Put for bool {
    fn put(&self, l: &mut Line) {
        l.byte(if *self { b'1' } else { b'0' });
    }
}

/// `0x...` lower-case hexadecimal.
#[derive(Clone, Copy)]
pub struct Hex(pub u64);

impl Put for Hex {
    fn put(&self, l: &mut Line) {
        l.bytes(b"0x");
        put_hex(l, self.0, 1);
    }
}

/// Two hex digits, no prefix.
pub struct Hex2(pub u8);

impl Put for Hex2 {
    fn put(&self, l: &mut Line) {
        put_hex(l, self.0 as u64, 2);
    }
}

/// `None` prints as `none`.
impl<T: Put> Put for Option<T> {
    fn put(&self, l: &mut Line) {
        match self {
            Some(v) => v.put(l),
            None => l.bytes(b"none"),
        }
    }
}

/// `out!(a, b, c)` prints one line `probe: ` followed by each argument's
/// [`Put`] rendering, e.g. `out!("cpu=", cpu, " test=cycles cycles=", v)`.
#[macro_export]
macro_rules! out {
    ($($e:expr),* $(,)?) => {{
        let mut line = $crate::serial::Line::new();
        $( line.put(&$e); )*
        line.print();
    }};
}
