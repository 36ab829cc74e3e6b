//! Command-line parsing. Grammar (see README.md):
//!
//! ```text
//! cmdline := token (' '+ token)*
//! token   := key '=' value | word
//! ```
//!
//! Only `probe.*` keys and `tsc_khz` are interpreted; every other token (e.g.
//! `console=ttyS0`) is ignored. Numbers are decimal or `0x` hexadecimal.
//! Unknown `probe.*` keys and malformed values produce `probe: warning ...`
//! lines and are otherwise ignored.

use crate::pmu::FIXED_BASE;
use crate::serial::{Hex2, Line, Put};
use crate::MAX_CPUS;

/// The tests the probe knows, in the order `probe.tests=all` runs them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Test {
    Detect,
    Cycles,
    Halt,
    Pmi,
    Gp,
    Toggle,
    Rdpmc,
    Instructions,
    Nmi,
    BenchMsr,
    BenchIo,
    BenchPmi,
    MsrStorm,
    PmiStorm,
    Edges,
    Inflight,
    Exits,
    Observe,
    Spin,
    BadStack,
}

impl Test {
    /// What `probe.tests=all` runs (every PMU test; `nmi` is a self-test
    /// of the probe's NMI path and must be named explicitly).
    pub const ALL: [Test; 7] = [
        Test::Detect,
        Test::Cycles,
        Test::Halt,
        Test::Pmi,
        Test::Gp,
        Test::Toggle,
        Test::Rdpmc,
    ];

    /// The hostile-guest tests (`storm.rs`), run only when named.
    pub const STORM: [Test; 6] = [
        Test::MsrStorm,
        Test::PmiStorm,
        Test::Edges,
        Test::Inflight,
        Test::Exits,
        Test::Observe,
    ];

    /// The targets of the host-side profiler (`profile.rs`), run only
    /// when named.
    pub const PROFILE: [Test; 2] = [Test::Spin, Test::BadStack];

    pub fn name(self) -> &'static str {
        match self {
            Test::Detect => "detect",
            Test::Cycles => "cycles",
            Test::Halt => "halt",
            Test::Pmi => "pmi",
            Test::Gp => "gp",
            Test::Toggle => "toggle",
            Test::Rdpmc => "rdpmc",
            Test::Instructions => "instructions",
            Test::Nmi => "nmi",
            Test::BenchMsr => "bench_msr",
            Test::BenchIo => "bench_io",
            Test::BenchPmi => "bench_pmi",
            Test::MsrStorm => "msrstorm",
            Test::PmiStorm => "pmistorm",
            Test::Edges => "edges",
            Test::Inflight => "inflight",
            Test::Exits => "exits",
            Test::Observe => "observe",
            Test::Spin => "spin",
            Test::BadStack => "badstack",
        }
    }

    fn from_name(s: &[u8]) -> Option<Test> {
        Test::ALL
            .iter()
            .copied()
            .chain([Test::Instructions, Test::Nmi])
            .chain([Test::BenchMsr, Test::BenchIo, Test::BenchPmi])
            .chain(Test::STORM)
            .chain(Test::PROFILE)
            .find(|t| t.name().as_bytes() == s)
    }
}

const MAX_TESTS: usize = 16;
const MAX_WARNINGS: usize = 8;

#[derive(Clone, Copy)]
pub enum WarningKind {
    UnknownKey,
    BadValue,
    UnknownTest,
    TooManyTests,
}

#[derive(Clone, Copy)]
pub struct Warning {
    pub kind: WarningKind,
    pub token: &'static [u8],
}

/// Parsed configuration; `Copy` so every vCPU can take its own copy.
#[derive(Clone, Copy)]
pub struct Config {
    pub raw: &'static [u8],
    tests: [Test; MAX_TESTS],
    ntests: usize,
    /// Bit i set: vCPU i runs the tests.
    pub cpus: u64,
    pub cpus_all: bool,
    pub cycles_tsc: Option<u64>,
    pub cycles_ms: u64,
    pub halt_ms: u64,
    pub pmi_period: Option<u64>,
    pub pmi_ms: u64,
    pub toggles: u64,
    /// instructions test: iterations of its known loop (2 instructions,
    /// 1 branch each).
    pub loops: u64,
    pub nmis: u64,
    pub rdpmc: bool,
    pub counter: u32,
    pub force: bool,
    /// gp test: reserved bits must #GP (`probe.rsvd=gp`) or be ignored.
    pub rsvd_gp: bool,
    /// Use x2APIC when CPUID offers it (`probe.apic=auto`, the default).
    pub x2apic: bool,
    pub timeout_ms: u64,
    /// After the tests, idle this long (counters disabled) before the reset.
    pub hold_ms: u64,
    pub tsc_khz: Option<u64>,
    pub warnings: [Option<Warning>; MAX_WARNINGS],
}

impl Config {
    /// Defaults for an empty command line.
    pub const fn default() -> Config {
        Config {
            raw: &[],
            tests: [Test::Detect; MAX_TESTS],
            ntests: 0,
            cpus: 1,
            cpus_all: false,
            cycles_tsc: None,
            cycles_ms: 100,
            halt_ms: 100,
            pmi_period: None,
            pmi_ms: 200,
            toggles: 1000,
            loops: 100_000,
            nmis: 10,
            rdpmc: false,
            counter: 0,
            force: false,
            x2apic: true,
            rsvd_gp: true,
            timeout_ms: 10_000,
            hold_ms: 0,
            tsc_khz: None,
            warnings: [None; MAX_WARNINGS],
        }
    }

    pub fn tests(&self) -> &[Test] {
        &self.tests[..self.ntests]
    }

    /// Does vCPU `cpu` run the tests?
    pub fn runs_on(&self, cpu: u32) -> bool {
        self.cpus_all || (cpu < 64 && self.cpus & (1 << cpu) != 0)
    }

    fn warn(&mut self, kind: WarningKind, token: &'static [u8]) {
        if let Some(slot) = self.warnings.iter_mut().find(|w| w.is_none()) {
            *slot = Some(Warning { kind, token });
        }
    }

    fn push_test(&mut self, t: Test, tok: &'static [u8]) {
        if self.ntests < MAX_TESTS {
            self.tests[self.ntests] = t;
            self.ntests += 1;
        } else {
            self.warn(WarningKind::TooManyTests, tok);
        }
    }
}

/// The `key=N` parameters of the command line `raw` whose value is a
/// number, in order (malformed ones are left out: the parser warns).
pub fn numeric_params(raw: &[u8]) -> impl Iterator<Item = (&[u8], u64)> {
    raw.split(|b| b.is_ascii_whitespace()).filter_map(|tok| {
        let i = tok.iter().position(|&b| b == b'=')?;
        Some((&tok[..i], parse_u64(&tok[i + 1..])?))
    })
}

/// Parses a decimal or `0x` hexadecimal number.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(v)
}

fn parse_bool(s: &[u8]) -> Option<bool> {
    match s {
        b"1" | b"yes" | b"on" | b"true" => Some(true),
        b"0" | b"no" | b"off" | b"false" => Some(false),
        _ => None,
    }
}

/// Parses the command line. `raw` must stay valid for the program's life
/// (it lives in guest memory set up by the VMM).
pub fn parse(raw: &'static [u8]) -> Config {
    let mut c = Config::default();
    c.raw = raw;
    let mut tests_given = false;
    for tok in raw.split(|b| b.is_ascii_whitespace()) {
        if tok.is_empty() {
            continue;
        }
        let (key, val) = match tok.iter().position(|&b| b == b'=') {
            Some(i) => (&tok[..i], &tok[i + 1..]),
            None => (tok, &b""[..]),
        };
        let num = parse_u64(val);
        let ok = match key {
            b"tsc_khz" => num
                .filter(|&v| v > 0)
                .map(|v| c.tsc_khz = Some(v))
                .is_some(),
            b"probe.tests" => {
                tests_given = true;
                c.ntests = 0;
                for name in val.split(|&b| b == b',') {
                    match name {
                        b"" | b"none" => {}
                        b"all" => Test::ALL.iter().for_each(|&t| c.push_test(t, tok)),
                        _ => match Test::from_name(name) {
                            Some(t) => c.push_test(t, tok),
                            None => c.warn(WarningKind::UnknownTest, name),
                        },
                    }
                }
                true
            }
            b"probe.cpus" => parse_cpus(&mut c, val),
            b"probe.cycles_tsc" => num.map(|v| c.cycles_tsc = Some(v)).is_some(),
            b"probe.cycles_ms" => num.map(|v| c.cycles_ms = v).is_some(),
            b"probe.halt_ms" => num.map(|v| c.halt_ms = v).is_some(),
            b"probe.pmi_period" => num
                .filter(|&v| v > 0)
                .map(|v| c.pmi_period = Some(v))
                .is_some(),
            b"probe.pmi_ms" => num.map(|v| c.pmi_ms = v).is_some(),
            b"probe.toggles" => num.map(|v| c.toggles = v).is_some(),
            b"probe.loops" => num.filter(|&v| v > 0).map(|v| c.loops = v).is_some(),
            b"probe.nmis" => num.map(|v| c.nmis = v).is_some(),
            b"probe.counter" => num
                .filter(|&v| v < u64::from(FIXED_BASE))
                .map(|v| c.counter = v as u32)
                .is_some(),
            // Intel fixed counter N instead of a general-purpose one.
            b"probe.fixed" => num
                .filter(|&v| v < 32)
                .map(|v| c.counter = FIXED_BASE + v as u32)
                .is_some(),
            b"probe.timeout_ms" => num.map(|v| c.timeout_ms = v).is_some(),
            b"probe.hold_ms" => num.map(|v| c.hold_ms = v).is_some(),
            b"probe.rdpmc" => parse_bool(val).map(|v| c.rdpmc = v).is_some(),
            b"probe.force" => parse_bool(val).map(|v| c.force = v).is_some(),
            b"probe.rsvd" => match val {
                b"gp" => {
                    c.rsvd_gp = true;
                    true
                }
                b"ignore" => {
                    c.rsvd_gp = false;
                    true
                }
                _ => false,
            },
            b"probe.apic" => match val {
                b"auto" | b"x2apic" => {
                    c.x2apic = true;
                    true
                }
                b"xapic" => {
                    c.x2apic = false;
                    true
                }
                _ => false,
            },
            k if k.starts_with(b"probe.bench_") => crate::bench::known_key(k, val),
            k if k.starts_with(b"probe.storm_") => crate::storm::known_key(k, val),
            k if k.starts_with(b"probe.spin_") => crate::profile::known_key(k, val),
            k if k.starts_with(b"probe.") => {
                c.warn(WarningKind::UnknownKey, tok);
                true
            }
            _ => true, // not ours (console=..., etc.)
        };
        if !ok {
            c.warn(WarningKind::BadValue, tok);
        }
    }
    if !tests_given {
        for t in [Test::Detect, Test::Cycles, Test::Pmi] {
            c.push_test(t, b"");
        }
        if c.rdpmc {
            c.push_test(Test::Rdpmc, b"");
        }
    }
    c
}

fn parse_cpus(c: &mut Config, val: &[u8]) -> bool {
    match val {
        b"all" => {
            c.cpus_all = true;
            true
        }
        b"bsp" => {
            c.cpus_all = false;
            c.cpus = 1;
            true
        }
        _ => {
            let mut mask = 0u64;
            for part in val.split(|&b| b == b',') {
                match parse_u64(part) {
                    Some(n) if (n as usize) < MAX_CPUS => mask |= 1 << n,
                    _ => return false,
                }
            }
            c.cpus_all = false;
            c.cpus = mask;
            true
        }
    }
}

/// Command-line bytes for a `key="..."` value: printable ASCII as is, `"`
/// and `\` escaped, everything else as `\xNN`.
pub struct Quoted<'a>(pub &'a [u8]);

impl Put for Quoted<'_> {
    fn put(&self, l: &mut Line) {
        for &b in self.0 {
            match b {
                b'"' => l.bytes(b"\\\""),
                b'\\' => l.bytes(b"\\\\"),
                0x20..=0x7e => l.byte(b),
                _ => {
                    l.bytes(b"\\x");
                    l.put(&Hex2(b));
                }
            }
        }
    }
}

/// Bytes that are expected to be a plain token (no quotes needed):
/// non-graphic bytes as `\xNN`.
pub struct Token<'a>(pub &'a [u8]);

impl Put for Token<'_> {
    fn put(&self, l: &mut Line) {
        for &b in self.0 {
            if b.is_ascii_graphic() {
                l.byte(b);
            } else {
                l.bytes(b"\\x");
                l.put(&Hex2(b));
            }
        }
    }
}
