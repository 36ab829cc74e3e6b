//! `vmm`: a small KVM virtual machine monitor whose guests get a userspace
//! virtual PMU.
//!
//! The tree by part, imports running one way (top to bottom):
//! - [`cli`]: the command line (`vmm run`, `vmm stat`, `vmm profile`,
//!   `vmm exporter`, `vmm top`);
//!   parses flags into a [`vm::VmConfig`] and runs the clients.
//! - [`fleet`]: a host's VMMs found by their API sockets in a directory
//!   and read together within bounds (`vmm exporter`, `vmm top`).
//! - [`vm`]: building a VM from its configuration (KVM, memory, kernel
//!   loader, devices) and running it until the guest stops.
//! - [`api`]: the host-side API server, its documents and its client end.
//! - [`profile`]: the host-side profiler of the guest (`GET /profile`).
//! - [`vcpu`]: a vCPU thread, its run loop and exit handling, kicks, the
//!   start of secondary vCPUs, and what the vCPUs share ([`vcpu::control`]).
//! - [`pmu`]: the glue between KVM and each vCPU's virtual PMU (the `vpmu`
//!   crate): the plan, the MSR filter, PMI delivery, the host export.
//! - [`arch`]: x86-64 boot tables and CPUID, known to everything above.
//! - [`files`]: files a user names, opened and read so that nothing waits
//!   or grows (a leaf, like [`arch`]).
//!
//! [`bench`] (the `bench` feature) is benchmark instrumentation that
//! observes vCPUs from the side.

pub mod api;
pub mod arch;
#[cfg(feature = "bench")]
pub mod bench;
pub mod cli;
pub mod files;
pub mod fleet;
pub mod pmu;
pub mod profile;
pub mod vcpu;
pub mod vm;
