//! How a guest run ended, and the exit code each ending gets.
//!
//! Exit codes (also in `vmm run --help`): 0 the guest reset the machine;
//! 1 the guest stopped abnormally (shutdown/triple fault, KVM internal error,
//! failed entry, vCPU error); 2 bad input or a host that cannot run the VM
//! ([`crate::vm::StartError`]); 3 `--timeout` expired; 128+N a termination
//! signal N (also during start-up); a Multiboot guest's write to the
//! debug-exit port: QEMU's `(value << 1) | 1`.

use std::fmt;

/// How a guest run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The guest reset the machine (i8042 0xFE, or a KVM reset event).
    Reset,
    /// Triple fault or shutdown.
    Shutdown { vcpu: u8, rip: Option<u64> },
    /// KVM could not run the guest (commonly: an instruction it cannot
    /// emulate).
    InternalError {
        vcpu: u8,
        suberror: u32,
        rip: Option<u64>,
    },
    /// The hardware refused to enter the guest.
    FailEntry {
        vcpu: u8,
        reason: u64,
        rip: Option<u64>,
    },
    /// A vCPU stopped on an exit or error the VMM cannot handle.
    VcpuError { vcpu: u8, message: String },
    /// `--timeout` expired.
    Timeout { seconds: f64 },
    /// The VMM was asked to stop (SIGINT/SIGTERM).
    Terminated { signal: i32 },
    /// A Multiboot guest wrote `value` to the debug-exit port (0xf4).
    GuestExit { value: u32 },
}

impl Outcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Reset => 0,
            Outcome::Timeout { .. } => 3,
            Outcome::Terminated { signal } => 128 + signal,
            Outcome::GuestExit { value } => devices::debug_exit::exit_code(*value),
            _ => 1,
        }
    }
}

fn rip_text(rip: &Option<u64>) -> String {
    rip.map_or_else(|| "unknown".into(), |r| format!("{r:#x}"))
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Reset => write!(f, "guest reset the machine"),
            Outcome::GuestExit { value } => write!(
                f,
                "guest wrote {value:#x} to the debug-exit port 0xf4 (exit code {})",
                devices::debug_exit::exit_code(*value)
            ),
            Outcome::Shutdown { vcpu, rip } => write!(
                f,
                "guest shut down (triple fault) on vCPU {vcpu} at RIP {}",
                rip_text(rip)
            ),
            Outcome::InternalError {
                vcpu,
                suberror,
                rip,
            } => {
                let what = match suberror {
                    1 => "instruction emulation failed",
                    2 => "exception while delivering an exception",
                    3 => "event delivery failed",
                    4 => "unexpected exit reason",
                    _ => "unknown",
                };
                write!(
                    f,
                    "KVM internal error on vCPU {vcpu} at RIP {}: suberror {suberror} ({what})",
                    rip_text(rip)
                )
            }
            Outcome::FailEntry { vcpu, reason, rip } => write!(
                f,
                "KVM failed to enter vCPU {vcpu} at RIP {}: hardware reason {reason:#x}",
                rip_text(rip)
            ),
            Outcome::VcpuError { vcpu, message } => write!(f, "vCPU {vcpu} stopped: {message}"),
            Outcome::Timeout { seconds } => write!(f, "timed out after {seconds} s (--timeout)"),
            Outcome::Terminated { signal } => write!(f, "stopped by signal {signal}"),
        }
    }
}
