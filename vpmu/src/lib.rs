//! The virtual PMU.

pub mod backend;
pub mod clock;
pub mod context;
pub mod cpuid;
pub mod evtsel;
pub mod model;
pub mod msr;
pub mod policy;
pub mod snapshot;
pub mod stats;
mod value;
mod vendor;
mod vpmu;

pub use backend::{Backend, BackendError, EventSource, EventSpec, OverflowNotify, Reading};
pub use clock::GuestClock;
pub use context::{ContextError, VpmuContext};
pub use cpuid::CpuidRegs;
pub use model::{HostCpuid, HostFacts, ModelError, MsrRange, PmuModel, Vendor};
pub use policy::{EventPolicy, PolicyError, Preset};
pub use snapshot::{Backing, CounterKind, CounterSnapshot, VpmuSnapshot};
pub use stats::{MsrAccessCounts, RegisterKind, VpmuStats};
pub use vpmu::{Fault, Limits, Vpmu};
