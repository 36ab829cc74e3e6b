//! Targets for the host-side profiler (`vmm profile`). They only
//! run when named.
//!
//! - `spin`: busy in one named function, [`hot`], under `probe.spin_depth`
//!   frames of [`descend`], for `probe.spin_ms` (or `probe.spin_iters`
//!   chunks of fixed work), `probe.spin_rounds` times; each round counts
//!   core cycles where the PMU is usable.
//! - `badstack`: stacks and page tables a frame-pointer walk must survive,
//!   one phase of `probe.spin_ms` each, spinning in [`hostile`] with RBP
//!   (and in one phase RSP) at: memory the guest does not have, an unmapped
//!   address, a non-canonical one, a misaligned one, a frame-pointer cycle,
//!   and an address only reachable through page tables of garbage (CR3
//!   switched to them for the phase).
//!
//! Parameters are `probe.spin_*` keys (README.md).

use core::arch::asm;
use core::hint::black_box;

use crate::cmdline::{numeric_params, parse_u64, Config, Test};
use crate::cpu::rdtsc;
use crate::pmu::Pmu;
use crate::serial::Hex;
use crate::{out, steal, time, MAX_CPUS};

/// Register-only iterations between two looks at the TSC (RDTSC traps to
/// the hypervisor on the development hosts).
const CHUNK: u64 = 256;

/// The `probe.spin_*` parameters.
struct Params {
    ms: u64,
    iters: Option<u64>,
    depth: u64,
    rounds: u64,
}

impl Params {
    fn parse(raw: &[u8]) -> Params {
        let mut p = Params {
            ms: 1000,
            iters: None,
            depth: 3,
            rounds: 1,
        };
        for (key, n) in numeric_params(raw) {
            match key {
                b"probe.spin_ms" => p.ms = n.max(1),
                b"probe.spin_iters" => p.iters = Some(n.max(1)),
                b"probe.spin_depth" => p.depth = n.min(200),
                b"probe.spin_rounds" => p.rounds = n.clamp(1, 1000),
                _ => {}
            }
        }
        p
    }
}

/// Whether `key` is a `probe.spin_*` parameter with a valid value.
pub fn known_key(key: &[u8], value: &[u8]) -> bool {
    matches!(
        key,
        b"probe.spin_ms" | b"probe.spin_iters" | b"probe.spin_depth" | b"probe.spin_rounds"
    ) && parse_u64(value).is_some()
}

/// Runs one profiler target on this vCPU. `usable`: the PMU passed its
/// probe (`spin` then counts cycles).
pub fn run(t: Test, cfg: &Config, cpu: u32, p: &Pmu, usable: bool) {
    let params = Params::parse(cfg.raw);
    match t {
        Test::Spin => spin(&params, cfg, cpu, p, usable),
        Test::BadStack => bad_stack(&params, cpu),
        _ => {}
    }
}

/// How much `hot` works.
#[derive(Clone, Copy)]
enum Work {
    /// Until the TSC reaches this.
    Until(u64),
    /// This many chunks.
    Chunks(u64),
}

/// The hot function: register-only work in chunks. Returns the chunks
/// done.
#[inline(never)]
fn hot(work: Work) -> u64 {
    let mut x = black_box(1u64);
    let mut chunks = 0;
    loop {
        for _ in 0..CHUNK {
            x = black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
        chunks += 1;
        match work {
            Work::Chunks(n) if chunks >= n => break,
            Work::Until(t) if rdtsc() >= t => break,
            _ => {}
        }
    }
    black_box(x);
    chunks
}

/// `depth` frames of itself, then [`hot`]: a stack of known shape.
#[inline(never)]
fn descend(depth: u64, work: Work) -> u64 {
    if depth == 0 {
        return hot(work);
    }
    // Not a tail call: the frame stays on the stack.
    black_box(descend(black_box(depth - 1), work)) + black_box(0)
}

fn spin(params: &Params, cfg: &Config, cpu: u32, p: &Pmu, usable: bool) {
    let i = cfg.counter;
    let counting = usable && i < p.num_gp;
    let sel = p.cycles_sel();
    for round in 1..=params.rounds {
        let counter = counting
            && p.setup(i, sel, 0).is_ok()
            && p.start(i, sel).is_ok();
        let s0 = steal::steal_ns();
        let t0 = rdtsc();
        let work = match params.iters {
            Some(n) => Work::Chunks(n),
            None => Work::Until(t0 + time::ms_to_tsc(params.ms)),
        };
        let chunks = descend(params.depth, work);
        let tsc = rdtsc() - t0;
        let stolen = steal::steal_ns() - s0;
        let cycles = match counter && p.stop(i, sel).is_ok() {
            true => p.read(i).ok(),
            false => None,
        };
        out!(
            "cpu=",
            cpu,
            " test=spin round=",
            round,
            " depth=",
            params.depth,
            " chunks=",
            chunks,
            " tsc=",
            tsc,
            " steal_us=",
            stolen / 1000,
            " cycles=",
            cycles
        );
    }
    let _ = p.reset();
}

/// Spins until the TSC reaches `until` with RBP = `rbp` and, if `rsp` is
/// not 0, RSP = `rsp`: registers only, interrupts off; every handler the
/// probe has (NMI included) runs on its own IST stack, so nothing uses
/// either register meanwhile.
#[inline(never)]
fn hostile(rbp: u64, rsp: u64, until: u64) {
    // SAFETY: RBP and RSP are saved in R12/R13 (declared clobbered) and
    // restored before the block ends; in between no instruction touches
    // memory through them.
    unsafe {
        asm!(
            "mov r12, rbp",
            "mov r13, rsp",
            "mov rbp, {bp}",
            "test {sp}, {sp}",
            "jz 2f",
            "mov rsp, {sp}",
            "2:",
            "rdtsc",
            "shl rdx, 32",
            "or rax, rdx",
            "cmp rax, {until}",
            "jb 2b",
            "mov rsp, r13",
            "mov rbp, r12",
            bp = in(reg) rbp,
            sp = in(reg) rsp,
            until = in(reg) until,
            out("rax") _,
            out("rdx") _,
            out("r12") _,
            out("r13") _,
        );
    }
}

/// A page-table page.
#[repr(C, align(4096))]
struct Table([u64; 512]);

/// Per vCPU: the page-map level 4 of the `garbage_tables` phase.
/// (`.bss`: written before use.)
static mut GARBAGE: [Table; MAX_CPUS] = [const { Table([0; 512]) }; MAX_CPUS];

/// Two frames pointing at each other, per vCPU.
static mut CYCLE: [[u64; 4]; MAX_CPUS] = [[0; 4]; MAX_CPUS];

fn cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// # Safety
/// `root` must map the running code, its stack and data as the current
/// tables do.
unsafe fn set_cr3(root: u64) {
    asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags));
}

/// A PML4 whose entry 0 is the live one (the low 512 GiB, where the probe
/// runs) and whose other 511 entries are garbage that claims to be
/// present: addresses far outside memory, this very table (a loop through
/// the levels), and random bits.
fn garbage_tables(cpu: u32) -> u64 {
    let live = (cr3() & 0x000f_ffff_ffff_f000) as *const u64;
    // SAFETY: this vCPU's own table (indexed by its id), written only
    // here; the live PML4 is identity-mapped guest RAM.
    let (table, root) = unsafe {
        let t = &mut *core::ptr::addr_of_mut!(GARBAGE[cpu as usize]);
        t.0[0] = core::ptr::read_volatile(live);
        (t, core::ptr::addr_of!(GARBAGE[cpu as usize]) as u64)
    };
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for (i, entry) in table.0.iter_mut().enumerate().skip(1) {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        *entry = 1 | match i % 3 {
            0 => (x & 0x000f_ff00_0000_0000) | (1 << 51),
            1 => root | 3,
            _ => x,
        };
    }
    root
}

fn bad_stack(params: &Params, cpu: u32) {
    let i = (cpu as usize).min(MAX_CPUS - 1);
    // SAFETY: this vCPU's own pair of frames.
    let cycle = unsafe {
        let f = &mut *core::ptr::addr_of_mut!(CYCLE[i]);
        let base = f.as_ptr() as u64;
        f[0] = base + 16;
        let text = hostile as fn(u64, u64, u64) as usize as u64;
        f[1] = text + 1;
        f[2] = base;
        f[3] = text + 2;
        base
    };
    let ms = time::ms_to_tsc(params.ms);
    // (name, rbp, rsp): 3 GiB is mapped (identity) but not guest memory,
    // 1 TiB is not mapped at all.
    let phases: [(&str, u64, u64); 6] = [
        ("outside_memory", 0xc000_0000, 0),
        ("rsp_outside_memory", 0xc000_1000, 0xc000_2000),
        ("unmapped", 0x100_0000_0000, 0),
        ("non_canonical", 0x8000_0000_0000_1000, 0),
        ("misaligned", cycle + 2, 0),
        ("cycle", cycle, 0),
    ];
    for (name, rbp, rsp) in phases {
        out!("cpu=", cpu, " test=badstack phase=", name, " rbp=", Hex(rbp));
        hostile(rbp, rsp, rdtsc() + ms);
    }
    let saved = cr3();
    let root = garbage_tables(i as u32);
    let rbp = 0x80_0000_0000 + 0x1230;
    out!("cpu=", cpu, " test=badstack phase=garbage_tables rbp=", Hex(rbp), " cr3=", Hex(root));
    // SAFETY: entry 0 of the new root is the live one, which maps
    // everything the probe touches (low 512 GiB); the old root comes back
    // right after.
    unsafe {
        set_cr3(root);
        hostile(rbp, 0, rdtsc() + ms);
        set_cr3(saved);
    }
    out!("cpu=", cpu, " test=badstack phases=7 ms=", params.ms, " done=1");
}
