//! `vmm`: a small KVM virtual machine monitor whose guests get a userspace
//! virtual PMU.
//!
//! The tree, top to bottom: [`cli`] parses flags into a [`config::VmConfig`];
//! [`vm::Vm::build`] creates the VM (memory, kernel, devices, vCPUs);
//! [`vm::Vm::run`] starts one thread per vCPU ([`vcpu`]) and runs the host
//! event loop ([`event_loop`]) until the guest stops. [`arch`] holds the
//! x86-64 boot set-up, [`loader`] the kernel formats, [`pmu`] the glue
//! between KVM and each vCPU's virtual PMU (the `vpmu` crate), [`signals`]
//! the termination signals, taken over first thing, [`profile`] the
//! host-side profiler of the guest (`vmm profile`, `GET /profile`).

pub mod ap_start;
pub mod api;
pub mod arch;
#[cfg(feature = "bench")]
pub mod bench;
pub mod cli;
pub mod config;
pub mod control;
pub mod error;
pub mod event_loop;
pub mod export;
pub mod kick;
pub mod loader;
pub mod pmu;
pub mod probe_image;
pub mod profile;
pub mod signals;
pub mod stat;
pub mod vcpu;
pub mod vcpu_types;
pub mod vm;
