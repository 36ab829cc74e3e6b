//! Shared helpers for the end-to-end tests: the `vmm` binary, a KVM check
//! that skips with a reason, and small assembly guests built with `cc`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The `vmm` binary under test.
pub fn vmm() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.stdin(Stdio::null());
    cmd
}

/// Whether /dev/kvm can be used; prints why a test skips when not.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped {test}: /dev/kvm is not usable here ({e})");
            false
        }
    }
}

/// Skips the calling test (returns early) when KVM is unavailable.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !common::kvm_available(module_path!()) {
            return;
        }
    };
}

/// Builds `tests/guests/<name>.S` into an ELF linked at 2 MiB.
pub fn build_guest(name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/guests")
        .join(format!("{name}.S"));
    let dir = std::env::temp_dir().join(format!("vmm-test-guests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let obj = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    let status = Command::new("cc")
        .args(["-c", "-o"])
        .arg(&obj)
        .arg(&src)
        .status()
        .expect("running cc");
    assert!(status.success(), "assembling {}", src.display());
    let status = Command::new("ld")
        .args([
            "-static",
            "-nostdlib",
            "-Ttext=0x200000",
            "-e",
            "_start",
            "-o",
        ])
        .arg(&elf)
        .arg(&obj)
        .status()
        .expect("running ld");
    assert!(status.success(), "linking {}", obj.display());
    elf
}

/// Runs `vmm` with `args` and returns its output.
pub fn run(args: &[&str]) -> Output {
    vmm().args(args).output().expect("running vmm")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a one-line error on stderr and exit code 2.
pub fn assert_bad_input(o: &Output, expected: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "exit code; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected, got: {err:?}");
    assert!(
        err.contains(expected),
        "stderr {err:?} should contain {expected:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
