//! Every bad input gets one line on stderr and exit code 2, and nothing runs.

mod common;

use common::{assert_bad_input, run};

#[test]
fn unknown_flags_and_bad_values_are_one_line_errors() {
    assert_bad_input(&run(&["--bogus"]), "unexpected argument '--bogus'");
    assert_bad_input(&run(&["run", "--bogus"]), "unexpected argument '--bogus'");
    assert_bad_input(
        &run(&["--serial", "tty"]),
        "expected stdio, none or file:PATH",
    );
    assert_bad_input(
        &run(&["--serial", "file:"]),
        "expected stdio, none or file:PATH",
    );
    assert_bad_input(&run(&["--timeout", "-1"]), "positive number of seconds");
    assert_bad_input(&run(&["--timeout", "soon"]), "expected a number of seconds");
    assert_bad_input(&run(&["--memory", "lots"]), "invalid value 'lots'");
    assert_bad_input(&run(&["--vcpus", "-3"]), "--vcpus");
    assert_bad_input(&run(&["--initrd", "/etc/hostname"]), "--kernel");
    assert_bad_input(&run(&["host", "--bogus"]), "unexpected argument '--bogus'");
}

#[test]
fn vmm_host_tells_what_the_host_offers_and_the_plan_for_each_vendor() {
    let o = run(&["host"]);
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    let table = common::stdout(&o);
    for row in [
        "host CPU",
        "host PMU (CPUID)",
        "host perf hardware events",
        "/dev/kvm",
        "KVM's in-kernel PMU",
    ] {
        assert!(table.contains(row), "no '{row}' row:\n{table}");
    }
    // With KVM, a plan per vendor; without, the reason KVM is missing.
    let kvm = std::path::Path::new("/dev/kvm").exists();
    for vendor in ["Amd", "Intel"] {
        assert_eq!(
            table.contains(&format!("{vendor} guest: plan")),
            kvm,
            "{table}"
        );
    }
    if kvm {
        // The hardware answer and the backing rows agree: hardware events
        // back the host's own vendor only; the other is always the task clock's.
        let hardware = !table.contains("host perf hardware events  no:");
        let backed = "a hardware event counting the guest only";
        assert_eq!(
            table.matches(backed).count(),
            usize::from(hardware),
            "{table}"
        );
        assert!(table.contains("task-clock of the vCPU thread"), "{table}");
    }
}

#[test]
fn help_tells_the_flags_and_exit_codes() {
    let o = run(&["run", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = common::stdout(&o);
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--memory",
        "--vcpus",
        "--serial",
        "--timeout",
        "Exit codes",
    ] {
        assert!(help.contains(flag), "help lacks {flag}: {help}");
    }
    // The testing aid is in the long help only.
    assert!(help.contains("--cpu-vendor"), "{help}");
    let short = common::stdout(&run(&["run", "-h"]));
    assert!(
        short.contains("--kernel") && !short.contains("--cpu-vendor"),
        "{short}"
    );
}

#[test]
fn unusable_images_are_refused() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    let junk = junk.to_str().unwrap();

    assert_bad_input(
        &run(&["--kernel", "/nonexistent/vmlinux"]),
        "cannot read kernel /nonexistent/vmlinux",
    );
    assert_bad_input(
        &run(&["--kernel", dir.path().to_str().unwrap()]),
        "is a directory, not a regular file",
    );
    assert_bad_input(
        &run(&["--kernel", junk]),
        "neither an x86-64 ELF kernel nor a bzImage",
    );

    let hello = common::build_guest("hello");
    let hello = hello.to_str().unwrap();
    assert_bad_input(
        &run(&["--kernel", hello, "--initrd", "/nonexistent/initrd"]),
        "cannot read initrd /nonexistent/initrd",
    );
    let long = "a".repeat(5000);
    assert_bad_input(
        &run(&["--kernel", hello, "--cmdline", &long]),
        "--cmdline is 5000 bytes",
    );
}

#[test]
fn impossible_machine_sizes_are_refused() {
    require_kvm!();
    assert_bad_input(&run(&["--memory", "1"]), "--memory 1 MiB is too small");
    assert_bad_input(&run(&["--memory", "100000000"]), "more than this host's");
    assert_bad_input(&run(&["--vcpus", "0"]), "--vcpus 0 is out of range");
    assert_bad_input(&run(&["--vcpus", "1000"]), "--vcpus 1000 is out of range");
    // The probe is linked at 2 MiB: 2 MiB of RAM cannot hold it.
    assert_bad_input(&run(&["--memory", "2"]), "needs");
    let hello = common::build_guest("hello");
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("initrd");
    std::fs::write(&big, vec![0u8; 5 << 20]).unwrap();
    assert_bad_input(
        &run(&[
            "--kernel",
            hello.to_str().unwrap(),
            "--initrd",
            big.to_str().unwrap(),
            "--memory",
            "4",
        ]),
        "does not fit",
    );
}

#[test]
fn missing_dev_kvm_is_reported() {
    // Hide /dev/kvm in a private mount namespace (needs root and unshare).
    let probe = std::process::Command::new("unshare")
        .args(["-m", "true"])
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        eprintln!("skipped: cannot create a mount namespace to hide /dev/kvm");
        return;
    }
    let script = format!(
        "mount -t tmpfs none /dev && exec {} --timeout 5",
        env!("CARGO_BIN_EXE_vmm")
    );
    let o = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_bad_input(&o, "cannot open /dev/kvm");
}

#[test]
fn impossible_vpmu_flags_are_refused() {
    assert_bad_input(
        &run(&["--vpmu", "maybe"]),
        "invalid value 'maybe' for '--vpmu",
    );
    assert_bad_input(&run(&["--vpmu-events", "bogus"]), "unknown policy clause");
    assert_bad_input(
        &run(&["--vpmu-events", "allow:0x1234"]),
        "larger than 0xfff",
    );
    assert_bad_input(&run(&["--vpmu-gp-counters", "300"]), "--vpmu-gp-counters");
    require_kvm!();
    assert_bad_input(
        &run(&["--vpmu", "off", "--vpmu-gp-counters", "2"]),
        "need the vPMU",
    );
    assert_bad_input(&run(&["--vpmu-version", "9"]), "impossible vPMU");
    assert_bad_input(&run(&["--vpmu-gp-counters", "0"]), "impossible vPMU");
    assert_bad_input(&run(&["--vpmu-gp-counters", "40"]), "impossible vPMU");
    // AMD has no fixed counters, Intel has at most a few.
    assert_bad_input(&run(&["--vpmu-fixed-counters", "9"]), "impossible vPMU");
    // Flags mean what they mean for the vendor the guest sees.
    assert_bad_input(
        &run(&["--cpu-vendor", "amd", "--vpmu-fixed-counters", "1"]),
        "impossible vPMU",
    );
    assert_bad_input(
        &run(&["--cpu-vendor", "intel", "--vpmu-version", "5"]),
        "Intel PMU version 5",
    );
    assert_bad_input(
        &run(&[
            "--cpu-vendor",
            "intel",
            "--vpmu-version",
            "1",
            "--vpmu-fixed-counters",
            "2",
        ]),
        "fixed counters need version 2",
    );
    assert_bad_input(&run(&["--cpu-vendor", "via"]), "invalid value 'via'");
}

#[test]
fn vcpus_at_every_edge_are_one_line_errors() {
    // Class 6: below, at and past the host's bound, the u32 limit and past
    // it, signs and junk.
    for bad in ["-1", "4294967296", "99999999999999999999", "2.5", "", "0x4"] {
        assert_bad_input(&run(&["--vcpus", bad]), "--vcpus");
    }
    require_kvm!();
    assert_bad_input(&run(&["--vcpus", "4294967295"]), "out of range");
    // The bound the VMM names is itself the edge: one past it is refused.
    let o = run(&["--vcpus", "0"]);
    let err = common::stderr(&o);
    let max: u32 = err
        .rsplit("1 to ")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no bound in {err:?}"));
    let past = (max + 1).to_string();
    assert_bad_input(
        &run(&["--vcpus", &past]),
        &format!("--vcpus {past} is out of range: 1 to {max}"),
    );
}

#[test]
fn every_vpmu_flag_with_each_cpu_vendor_is_checked_for_that_vendor() {
    // Class 8: each --vpmu-* flag, given an impossible value, under each
    // --cpu-vendor: a one-line error, exit 2, before any guest runs.
    for vendor in ["host", "amd", "intel"] {
        let v = ["--cpu-vendor", vendor];
        assert_bad_input(
            &run(&[&v[..], &["--vpmu", "maybe"]].concat()),
            "invalid value 'maybe'",
        );
        assert_bad_input(
            &run(&[&v[..], &["--vpmu-events", "bogus"]].concat()),
            "unknown policy clause",
        );
        assert_bad_input(
            &run(&[&v[..], &["--vpmu-gp-counters", "300"]].concat()),
            "--vpmu-gp-counters",
        );
    }
    require_kvm!();
    for vendor in ["host", "amd", "intel"] {
        let v = ["--cpu-vendor", vendor];
        for flags in [
            &["--vpmu-gp-counters", "0"][..],
            &["--vpmu-gp-counters", "40"],
            &["--vpmu-version", "9"],
            &["--vpmu-version", "0"],
            &["--vpmu-fixed-counters", "9"],
        ] {
            let o = run(&[&v[..], flags].concat());
            let err = common::stderr(&o);
            assert_bad_input(&o, "vPMU");
            assert!(!err.contains("probe:"), "{vendor} {flags:?}: {err}");
        }
        for flag in [
            "--vpmu-gp-counters",
            "--vpmu-fixed-counters",
            "--vpmu-version",
        ] {
            assert_bad_input(
                &run(&[&v[..], &["--vpmu", "off", flag, "1"]].concat()),
                "need the vPMU",
            );
        }
    }
}
