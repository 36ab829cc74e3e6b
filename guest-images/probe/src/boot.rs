//! From the entry stub to the tests: per-vCPU set-up, the BSP's report of
//! what the VMM gave it (command line, vCPUs, memory, TSC), the release of
//! the APs, and the final reset.

use core::sync::atomic::Ordering;

use crate::cmdline::{self, Config, Quoted, Token, WarningKind};
use crate::cpu::{self, outb};
use crate::mptable::{self, IdList};
use crate::serial::{Hex, Line, Put};
use crate::{
    apic, out, percpu, serial, smp, steal, tests, time, trap, wakeup, MAX_CPUS, PROBE_VERSION,
};

/// Offsets in Linux's `struct boot_params` (the "zero page").
const BP_EXT_CMD_LINE_PTR: u64 = 0x0c8;
const BP_E820_ENTRIES: u64 = 0x1e8;
const BP_CMD_LINE_PTR: u64 = 0x228;
const BP_CMDLINE_SIZE: u64 = 0x238;
const BP_E820_TABLE: u64 = 0x2d0;
const E820_MAX: u64 = 128;
/// Upper bound on the command line we read if the header gives no size.
const CMDLINE_MAX: usize = 4096;

fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: boot_params and what it points to are in identity-mapped
    // guest RAM prepared by the VMM; unaligned reads are fine on x86.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// The NUL-terminated command line the boot_params point to.
fn cmdline_bytes(bp: u64) -> &'static [u8] {
    if bp == 0 {
        return &[];
    }
    let ptr =
        rd::<u32>(bp + BP_CMD_LINE_PTR) as u64 | (rd::<u32>(bp + BP_EXT_CMD_LINE_PTR) as u64) << 32;
    if ptr == 0 {
        return &[];
    }
    let size = rd::<u32>(bp + BP_CMDLINE_SIZE) as usize;
    let max = if size == 0 || size > CMDLINE_MAX {
        CMDLINE_MAX
    } else {
        size
    };
    let mut len = 0;
    while len < max && rd::<u8>(ptr + len as u64) != 0 {
        len += 1;
    }
    // SAFETY: `len` bytes from `ptr` were just read; guest RAM stays mapped
    // and unmodified for the life of the probe.
    unsafe { core::slice::from_raw_parts(ptr as *const u8, len) }
}

/// (entries, usable RAM in KiB) from the e820 map.
fn e820(bp: u64) -> (u64, u64) {
    if bp == 0 {
        return (0, 0);
    }
    let n = (rd::<u8>(bp + BP_E820_ENTRIES) as u64).min(E820_MAX);
    let mut ram = 0;
    for i in 0..n {
        let e = bp + BP_E820_TABLE + 20 * i;
        let size: u64 = rd(e + 8);
        let ty: u32 = rd(e + 16);
        if ty == 1 {
            ram += size;
        }
    }
    (n, ram / 1024)
}

/// Remaps the two 8259 PICs to vectors 0x20-0x2f and masks every line, so
/// that no legacy interrupt can arrive on an exception vector.
fn mask_pic() {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, 0x20);
    outb(0xa1, 0x28);
    outb(0x21, 0x04);
    outb(0xa1, 0x02);
    outb(0x21, 0x01);
    outb(0xa1, 0x01);
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

/// Called by `_start` on every vCPU with its LAPIC ID and boot_params.
pub extern "C" fn probe_main(cpu: u32, boot_params: u64) -> ! {
    percpu::init(cpu);
    if cpu == 0 {
        bsp_main(boot_params)
    } else {
        ap_main(cpu)
    }
}

fn bsp_main(bp: u64) -> ! {
    serial::init();
    trap::build_idt();
    trap::init_cpu(0);
    mask_pic();
    let raw = cmdline_bytes(bp);
    let cfg = cmdline::parse(raw);
    apic::init(cfg.x2apic);

    out!(
        "banner version=",
        PROBE_VERSION,
        " name=probe cpu=0 apic=",
        if apic::is_x2apic() { "x2apic" } else { "xapic" },
        " apic_id=",
        apic::id(),
        " max_cpus=",
        MAX_CPUS,
        " cr0=",
        Hex(cpu::cr0()),
        " cr4=",
        Hex(cpu::cr4())
    );
    out!("cmdline=\"", Quoted(raw), "\"");
    for w in cfg.warnings.iter().flatten() {
        let kind = match w.kind {
            WarningKind::UnknownKey => "unknown_param",
            WarningKind::BadValue => "bad_value",
            WarningKind::UnknownTest => "unknown_test",
            WarningKind::TooManyTests => "too_many_tests",
        };
        out!("warning ", kind, "=", Token(w.token));
    }

    let mut ap_ids = 0u64;
    let vcpus = match mptable::find() {
        Some(mp) => {
            ap_ids = mp.apic_ids & !(1 << mp.bsp.unwrap_or(0)) & ((1 << MAX_CPUS) - 1);
            out!(
                "vcpus=",
                mp.cpus,
                " source=mptable apic_ids=",
                IdList(mp.apic_ids),
                " bsp=",
                mp.bsp,
                " disabled=",
                mp.disabled,
                " fps=",
                Hex(mp.fps)
            );
            mp.cpus.max(1)
        }
        None => {
            out!("vcpus=1 source=none");
            1
        }
    };
    let (e820_n, ram_kib) = e820(bp);
    out!("memory e820_entries=", e820_n, " ram_mib=", ram_kib / 1024);

    let (khz, src) = time::init(cfg.tsc_khz);
    let timer_khz = apic::calibrate_timer();
    let steal = steal::init(0);
    out!(
        "tsc_khz=",
        khz,
        " source=",
        src.name(),
        " apic_timer_khz=",
        timer_khz,
        " steal_time=",
        steal
    );

    let expected_aps = vcpus.min(MAX_CPUS as u32) - 1;
    if expected_aps > 0 {
        wake_aps(bp, ap_ids);
    }
    let online = smp::bsp_wait_online(expected_aps, 2000);
    if online < expected_aps {
        out!(
            "warning aps_online=",
            online,
            " aps_expected=",
            expected_aps,
            " online=",
            IdList(smp::online_mask())
        );
    }
    out!(
        "cpus_online=",
        online + 1,
        " ids=",
        IdList(smp::online_mask() | 1),
        " tests=",
        TestList(&cfg),
        " test_cpus=",
        CpuSel(&cfg)
    );
    smp::bsp_go(&cfg);

    let ran = run_tests(&cfg, 0);
    done_line(0, ran);

    let online = smp::bsp_wait_online(expected_aps, 0);
    let done = smp::bsp_wait_done(online, cfg.timeout_ms);
    if done < online {
        out!(
            "warning timeout waiting_for_aps=",
            IdList(smp::online_mask() & !smp::done_mask()),
            " done=",
            IdList(smp::done_mask())
        );
    }
    if cfg.hold_ms > 0 {
        hold(cfg.hold_ms);
    }
    out!("reset");
    cpu::reset()
}

/// Starts each AP in `ap_ids` through the ACPI MP wakeup mailbox at
/// `_start`: `probe: mp_wakeup mailbox=ADDR woken=IDS failed=IDS`.
fn wake_aps(bp: u64, ap_ids: u64) {
    extern "C" {
        fn _start();
    }
    let Some(mailbox) = wakeup::find_mailbox(bp) else {
        out!("warning mp_wakeup mailbox=none aps=", IdList(ap_ids));
        return;
    };
    let (mut woken, mut failed) = (0u64, 0u64);
    for id in (0..64u32).filter(|&i| ap_ids & (1 << i) != 0) {
        if wakeup::wake(mailbox, id, _start as *const () as u64, 1000) {
            woken |= 1 << id;
        } else {
            failed |= 1 << id;
        }
    }
    out!(
        "mp_wakeup mailbox=",
        Hex(mailbox),
        " woken=",
        IdList(woken),
        " failed=",
        IdList(failed)
    );
}

/// `probe.hold_ms`: idles in HLT (woken by the LAPIC timer) with every
/// counter disabled, so that the host can read the final counts before
/// the reset ends the VMM.
fn hold(ms: u64) {
    out!("hold ms=", ms);
    let end = cpu::rdtsc().saturating_add(time::ms_to_tsc(ms));
    loop {
        let now = cpu::rdtsc();
        if now >= end {
            break;
        }
        let left_ms = time::tsc_to_us(end - now) / 1000 + 1;
        if apic::arm_oneshot_ms(left_ms.min(1000)) {
            cpu::sti_hlt_cli();
        } else {
            time::spin_tsc(time::ms_to_tsc(1));
        }
    }
    apic::disarm_timer();
}

fn ap_main(cpu: u32) -> ! {
    trap::init_cpu(cpu);
    smp::ap_online(cpu);
    let cfg = smp::ap_wait_go();
    apic::init(cfg.x2apic);
    steal::init(cpu);
    let ran = run_tests(&cfg, cpu);
    done_line(cpu, ran);
    smp::ap_done(cpu);
    cpu::park()
}

fn run_tests(cfg: &Config, cpu: u32) -> usize {
    if !cfg.runs_on(cpu) {
        return 0;
    }
    tests::run_all(cfg, cpu)
}

/// `probe: done cpu=N tests=K ...` with this vCPU's trap counters.
fn done_line(cpu: u32, ran: usize) {
    let pc = percpu::this_cpu();
    out!(
        "done cpu=",
        cpu,
        " tests=",
        ran,
        " gp_fixups=",
        pc.gp_fixups.load(Ordering::Relaxed),
        " nmis=",
        pc.nmis.load(Ordering::Relaxed),
        " unexpected_nmis=",
        pc.nmis_unexpected.load(Ordering::Relaxed),
        " timer_irqs=",
        pc.timer_irqs.load(Ordering::Relaxed),
        " other_irqs=",
        pc.other_irqs.load(Ordering::Relaxed)
    );
}

struct TestList<'a>(&'a Config);

impl Put for TestList<'_> {
    fn put(&self, l: &mut Line) {
        let t = self.0.tests();
        if t.is_empty() {
            l.bytes(b"none");
        }
        for (i, t) in t.iter().enumerate() {
            if i > 0 {
                l.byte(b',');
            }
            l.put(t.name());
        }
    }
}

struct CpuSel<'a>(&'a Config);

impl Put for CpuSel<'_> {
    fn put(&self, l: &mut Line) {
        if self.0.cpus_all {
            l.bytes(b"all");
        } else {
            l.put(&IdList(self.0.cpus));
        }
    }
}
