//! Builds the built-in probe guest (`guest-images/probe`) into
//! `$OUT_DIR/probe.elf`, which `src/probe_image.rs` embeds.
//!
//! The probe is a `#![no_std]` Rust program compiled by the same stable
//! `rustc` that builds this crate, for the host target
//! (x86_64-unknown-linux-gnu: nothing else may be installed or downloaded),
//! and linked freestanding with the system `cc` and the probe's linker script.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Size limit of the probe ELF file (it is embedded in the `vmm` binary).
const MAX_PROBE_SIZE: u64 = 1024 * 1024;

fn main() {
    if let Err(e) = build_probe() {
        eprintln!("error: building the probe guest failed: {e}");
        std::process::exit(1);
    }
}

fn build_probe() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let probe_dir = manifest_dir.join("..").join("guest-images").join("probe");
    let src_dir = probe_dir.join("src");
    let main_rs = src_dir.join("main.rs");
    let linker_script = probe_dir.join("linker.ld");
    let out = out_dir.join("probe.elf");

    println!("cargo:rerun-if-changed={}", src_dir.display());
    println!("cargo:rerun-if-changed={}", linker_script.display());
    println!("cargo:rerun-if-env-changed=RUSTC");
    println!("cargo:rerun-if-env-changed=PROBE_LINKER");

    for p in [&main_rs, &linker_script] {
        if !p.is_file() {
            return Err(format!("{} is missing", p.display()));
        }
    }

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let linker = env::var_os("PROBE_LINKER").unwrap_or_else(|| "cc".into());
    let mut cmd = Command::new(&rustc);
    cmd.arg(&main_rs)
        .args(["--crate-name", "probe", "--crate-type", "bin"])
        .args(["--edition", "2021"])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .arg("-o")
        .arg(&out)
        .args(codegen_flags())
        .arg(format!("-Clinker={}", Path::new(&linker).display()))
        .arg(format!("-Clink-arg=-Wl,-T,{}", linker_script.display()));
    // Do not let flags meant for the host crates leak into the guest build.
    cmd.env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");

    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", Path::new(&rustc).display()))?;
    if !output.status.success() {
        return Err(format!(
            "rustc exited with {}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    // Surface the probe's compiler warnings in the cargo output, except the
    // expected one about disabling SSE2 on a target whose float ABI uses it
    // (the probe has no floating point).
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        if line.starts_with("warning")
            && !line.contains("`sse2` must be enabled")
            && !line.contains("warnings emitted")
            && !line.contains("warning emitted")
        {
            println!("cargo:warning=probe: {line}");
        }
    }

    let size = std::fs::metadata(&out)
        .map_err(|e| format!("{}: {e}", out.display()))?
        .len();
    if size > MAX_PROBE_SIZE {
        return Err(format!(
            "{} is {size} bytes, more than the {MAX_PROBE_SIZE}-byte limit",
            out.display()
        ));
    }
    Ok(())
}

/// Codegen for a freestanding kernel-mode program on the host target:
/// no unwinding, absolute addresses (linked at 0x200000, small code model),
/// no red zone in the probe's own code (the precompiled `core` still uses it,
/// which is why all the probe's interrupt handlers run on IST stacks), no
/// libc, no start files, no PIE, no build-id note.
///
/// No SSE: on the development hosts (a paravirtualized nested KVM) every
/// SSE instruction in a guest ends in a KVM emulation failure, so the probe's
/// own code is compiled without SSE and avoids the parts of the precompiled
/// `core` that use it (`core::fmt`). rustc warns that the `x86_64` float ABI
/// wants SSE2; the probe has no floating point, so the warning is expected.
fn codegen_flags() -> Vec<String> {
    [
        "-Cpanic=abort",
        "-Ctarget-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2",
        "-Copt-level=2",
        "-Ccodegen-units=1",
        "-Crelocation-model=static",
        "-Ccode-model=small",
        "-Cno-redzone=yes",
        "-Cforce-frame-pointers=yes",
        "-Cdebuginfo=0",
        "-Cstrip=debuginfo",
        "-Clink-arg=-nostdlib",
        "-Clink-arg=-nostartfiles",
        "-Clink-arg=-static",
        "-Clink-arg=-no-pie",
        "-Clink-arg=-Wl,--build-id=none",
        "-Clink-arg=-Wl,--gc-sections",
        "-Clink-arg=-Wl,-z,noexecstack",
        "-Clink-arg=-Wl,-z,norelro",
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("environment variable {name} is not set"))
}
