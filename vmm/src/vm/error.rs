//! What can stop a VM from starting ([`StartError`], exit code 2, or 128+N
//! for a termination signal). How a started guest ends is the vCPUs'
//! [`crate::vcpu::Outcome`].

use super::loader::LoadError;
use crate::arch::mptable::MptableError;
use crate::arch::regs::RegsError;
use crate::pmu::filter::FilterError;
use crate::pmu::PlanError;

/// Errors before the guest runs. All exit with code 2 (nothing was
/// started), but a termination signal, which exits with 128+N.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("stopped by signal {0} during start-up")]
    Signalled(i32),
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible to this user?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM lacks a capability this VMM needs: {0}")]
    KvmCapability(&'static str),
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The flags describe a VM that cannot be built (a bad value, a path
    /// of the wrong kind, a shape the host refuses).
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    ApiSocket(#[from] crate::api::socket::SocketError),
    /// Two devices claim the same ports or guest-physical range.
    #[error(transparent)]
    PortBus(#[from] devices::bus::BusError),
    #[error(transparent)]
    MmioBus(#[from] devices::mmio::MmioRangeError),
    /// A boot structure could not be written into guest memory.
    #[error("writing {what}: {reason}")]
    GuestWrite { what: &'static str, reason: String },
    /// More CPUID entries than KVM takes.
    #[error("too many CPUID entries for KVM")]
    CpuidTooLarge,
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    MsrFilter(#[from] FilterError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[cfg(feature = "bench")]
    #[error(transparent)]
    BenchTrace(#[from] crate::bench::TraceError),
    #[error("setting up a vCPU: {0}")]
    Regs(#[from] RegsError),
    #[error(transparent)]
    Mptable(#[from] MptableError),
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory { mib: u64, reason: String },
    /// `--restore`: a snapshot that cannot be restored here (exit 2, before
    /// the guest runs).
    #[error("--restore {path}: {reason}")]
    Snapshot { path: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl StartError {
    /// The termination signal that stopped the start, if that is what
    /// stopped it.
    pub fn signal(&self) -> Option<i32> {
        match self {
            StartError::Signalled(signal) | StartError::Load(LoadError::Signalled(signal)) => {
                Some(*signal)
            }
            _ => None,
        }
    }

    /// 128+N for a termination signal, else 2.
    pub fn exit_code(&self) -> i32 {
        self.signal().map_or(2, |signal| 128 + signal)
    }

    pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StartError {
        move |source| StartError::Kvm { what, source }
    }
}
