//! Booting guests through the 64-bit entry, and Multiboot kernels through
//! 32-bit protected mode, and every way a guest can stop.

mod common;

use std::time::{Duration, Instant};

use common::{build_guest, build_guest32, run, stderr, stdout};

#[test]
fn reset_ends_the_vmm_with_exit_0() {
    require_kvm!();
    let guest = build_guest("hello");
    let o = run(&["--kernel", guest.to_str().unwrap(), "--timeout", "20"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert!(stdout(&o).contains("hello: long mode entry works"));
    assert!(stderr(&o).contains("guest reset the machine"));
}

#[test]
fn serial_goes_to_a_file_or_nowhere() {
    require_kvm!();
    let guest = build_guest("hello");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let sink = format!("file:{}", log.display());
    let o = run(&["--kernel", guest.to_str().unwrap(), "--serial", &sink]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).is_empty());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("hello: long mode entry works"), "{text}");

    let o = run(&["--kernel", guest.to_str().unwrap(), "--serial", "none"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).is_empty());
}

#[test]
fn triple_fault_is_a_shutdown_with_exit_1() {
    require_kvm!();
    let guest = build_guest("triple_fault");
    let o = run(&["--kernel", guest.to_str().unwrap(), "--timeout", "20"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("shut down (triple fault)"), "{err}");
    assert!(err.contains("RIP 0x200000"), "{err}");
}

#[test]
fn internal_error_reports_reason_and_rip() {
    require_kvm!();
    let guest = build_guest("mmio_exec");
    let o = run(&["--kernel", guest.to_str().unwrap(), "--timeout", "20"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("KVM internal error"), "{err}");
    assert!(err.contains("RIP 0xd0000000"), "{err}");
}

#[test]
fn timeout_bounds_a_silent_guest() {
    require_kvm!();
    let guest = build_guest("hang");
    let start = Instant::now();
    let o = run(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--timeout",
        "1.5",
        "--vcpus",
        "2",
    ]);
    let took = start.elapsed();
    assert_eq!(o.status.code(), Some(3), "stderr: {}", stderr(&o));
    assert!(stderr(&o).contains("timed out after 1.5 s"));
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
}

#[test]
fn sigterm_stops_the_vmm_cleanly() {
    require_kvm!();
    let guest = build_guest("hang");
    let child = common::vmm()
        .args(["--kernel", guest.to_str().unwrap(), "--timeout", "30"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY-free: plain kill(1) of our own child.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(128 + 15), "stderr: {}", stderr(&o));
    assert!(stderr(&o).contains("stopped by signal 15"));
}

#[test]
fn host_stdin_reaches_the_guest_uart() {
    require_kvm!();
    use std::io::Write;
    let guest = build_guest("echo");
    let mut child = common::vmm()
        .args(["--kernel", guest.to_str().unwrap(), "--timeout", "20"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Z").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("echo: Z"), "{}", stdout(&o));
}

#[test]
fn probe_wakes_its_aps_through_the_mp_wakeup_mailbox() {
    require_kvm!();
    let o = run(&["--vcpus", "4", "--cmdline", "probe.tests=none"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert!(
        out.contains("probe: mp_wakeup mailbox=0xfe000000 woken=1,2,3 failed=none"),
        "{out}"
    );
    assert!(out.contains("probe: cpus_online=4 ids=0,1,2,3"), "{out}");
    for cpu in 1..4 {
        assert!(out.contains(&format!("probe: done cpu={cpu} ")), "{out}");
    }
}

#[test]
fn mailbox_answers_bad_and_repeated_commands_as_the_spec_says() {
    require_kvm!();
    let guest = build_guest("mailbox");
    let o = run(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--vcpus",
        "2",
        "--timeout",
        "20",
    ]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    // Unknown APIC ID and a repeated wakeup stay pending (1), a reserved
    // command reads back as written, the good wakeup clears it, the AP
    // entered exactly once, the firmware half ignores writes.
    assert!(
        out.contains("mailbox: unknown=1 reserved=5 woke=0 repeat=1 entries=1 fw=0"),
        "{out}"
    );
    assert!(
        stderr(&o).contains("command not acted on"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_multiboot_kernel_gets_magic_command_line_memory_map_and_module_and_ends_through_port_0xf4() {
    require_kvm!();
    let kernel = build_guest32("multiboot");
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("module.txt");
    std::fs::write(&module, "hello module\nsecond line\n").unwrap();
    let o = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        module.to_str().unwrap(),
        "--cmdline",
        "test=one two",
        "--memory",
        "128",
        "--timeout",
        "20",
    ]);
    let (out, err) = (stdout(&o), stderr(&o));
    // QEMU's isa-debug-exit code for the value 0x10 the kernel writes.
    assert_eq!(o.status.code(), Some(33), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("multiboot: magic ok"), "{out}");
    assert!(out.contains("multiboot: cmdline=test=one two"), "{out}");
    // 128 MiB less the first MiB, in KiB.
    assert!(
        out.contains(&format!("mem_upper_kib={:#010x}", 127 * 1024)),
        "{out}"
    );
    assert!(
        out.contains("multiboot: mods=0x00000001 hello module"),
        "{out}"
    );
    assert!(out.contains("multiboot: mmap_entries=0x00000002"), "{out}");
    assert!(err.contains("debug-exit port 0xf4 (exit code 33)"), "{err}");

    // No module: none announced.
    let o = run(&["--kernel", kernel.to_str().unwrap(), "--timeout", "20"]);
    assert_eq!(o.status.code(), Some(33), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("multiboot: mods=0x00000000"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn multiboot_kernels_vmm_cannot_boot_are_refused_in_one_line() {
    require_kvm!();
    let kernel = std::fs::read(build_guest32("multiboot")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let at = kernel
        .windows(4)
        .position(|w| w == 0x1BAD_B002u32.to_le_bytes())
        .expect("the header");
    let with_flags = |flags: u32| {
        let mut image = kernel.clone();
        let checksum = 0u32.wrapping_sub(0x1BAD_B002).wrapping_sub(flags);
        image[at + 4..at + 8].copy_from_slice(&flags.to_le_bytes());
        image[at + 8..at + 12].copy_from_slice(&checksum.to_le_bytes());
        image
    };
    for (flags, expected) in [(4, "video mode"), (1 << 16, "flag 16"), (1 << 7, "0x80")] {
        let path = dir.path().join(format!("flags-{flags:x}.elf"));
        std::fs::write(&path, with_flags(flags)).unwrap();
        let o = run(&["--kernel", path.to_str().unwrap(), "--timeout", "20"]);
        common::assert_bad_input(&o, expected);
    }
    // A header in an image that is not a 32-bit ELF.
    let mut not_elf = kernel.clone();
    not_elf[4] = 2;
    let path = dir.path().join("elf64-class.elf");
    std::fs::write(&path, not_elf).unwrap();
    let o = run(&["--kernel", path.to_str().unwrap(), "--timeout", "20"]);
    common::assert_bad_input(&o, "32-bit ELF");
}
