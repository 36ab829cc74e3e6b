//! What a VM is built from: the validated form of `vmm run`'s flags.

use std::path::PathBuf;
use std::time::Duration;

use vpmu::Vendor;

use crate::api::VmName;
use crate::pmu::VpmuOptions;

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialSink {
    Stdio,
    File(PathBuf),
    None,
}

impl std::str::FromStr for SerialSink {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(SerialSink::Stdio),
            "none" => Ok(SerialSink::None),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(SerialSink::File(PathBuf::from(path))),
                _ => Err(format!("expected stdio, none or file:PATH, got {s:?}")),
            },
        }
    }
}

/// What a guest reset (i8042 reset, Linux `reboot`) does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnReset {
    /// The VMM exits with code 0.
    #[default]
    Exit,
    /// The guest boots again in a fresh VM; the API, the serial console
    /// and the per-VM counter totals carry on.
    Reboot,
}

/// `--cpu-vendor`: the CPU vendor the guest sees in CPUID, and so the
/// vendor of its vPMU model. A testing aid: it lets these AMD hosts drive
/// the Intel model through KVM (and an Intel host the AMD one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuVendor {
    /// The host's vendor.
    #[default]
    Host,
    /// AuthenticAMD.
    Amd,
    /// GenuineIntel.
    Intel,
}

impl CpuVendor {
    /// The guest's vendor on a host of `host` vendor (`None`: neither AMD
    /// nor Intel). `Err` when another vendor is asked of such a host.
    pub fn resolve(self, host: Option<Vendor>) -> Result<Option<Vendor>, String> {
        let wanted = match self {
            CpuVendor::Host => return Ok(host),
            CpuVendor::Amd => Vendor::Amd,
            CpuVendor::Intel => Vendor::Intel,
        };
        match host {
            Some(_) => Ok(Some(wanted)),
            None => Err(format!(
                "--cpu-vendor: the host CPU is neither AMD nor Intel, so it cannot be \
                 presented as {wanted:?}"
            )),
        }
    }
}

/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Smallest guest memory the boot layout fits in (the low 1 MiB holds the
/// boot structures; kernels load above it).
pub const MIN_MEMORY_MIB: u64 = 2;
/// Command line an external kernel gets when none is given.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// A VM to build.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Its name (`--name`, else from the API socket's file name).
    pub name: VmName,
    /// `None` boots the built-in probe guest.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub serial: SerialSink,
    pub timeout: Option<Duration>,
    pub vpmu: VpmuOptions,
    /// Where to serve the host-side API.
    pub api_socket: Option<PathBuf>,
    pub on_reset: OnReset,
    pub cpu_vendor: CpuVendor,
    /// Hidden benchmark instrumentation.
    #[cfg(feature = "bench")]
    pub bench: crate::bench::BenchOptions,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            name: VmName::from_socket(None),
            kernel: None,
            initrd: None,
            cmdline: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            vcpus: 1,
            serial: SerialSink::Stdio,
            timeout: None,
            vpmu: VpmuOptions::default(),
            api_socket: None,
            on_reset: OnReset::Exit,
            cpu_vendor: CpuVendor::Host,
            #[cfg(feature = "bench")]
            bench: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_sinks_parse() {
        assert_eq!("stdio".parse(), Ok(SerialSink::Stdio));
        assert_eq!("none".parse(), Ok(SerialSink::None));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(SerialSink::File(PathBuf::from("/tmp/x")))
        );
        assert!("file:".parse::<SerialSink>().is_err());
        assert!("tty".parse::<SerialSink>().is_err());
    }
}
