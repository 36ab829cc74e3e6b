//! The vCPU's two hooks for work that observes it from the side: the
//! benchmark trace ([`ExitObserver`], `bench` feature) and the host-side
//! profiler ([`GuestSampler`]). The run loop calls them; it knows neither
//! implementation.

use kvm_ioctls::VcpuFd;

use super::report::ExitCounts;
use crate::pmu::DeliveredPmi;

/// An observer of one vCPU's exits: the vCPU's single optional hook for
/// instrumentation (the benchmark trace of the `bench` module, built with
/// the `bench` feature). Every method runs on the vCPU thread; without an
/// observer each call site costs one branch.
pub trait ExitObserver: Send {
    /// Before the first entry.
    fn start(&mut self, fd: &VcpuFd);
    /// Right before `KVM_RUN`.
    fn entering(&mut self, fd: &VcpuFd);
    /// Right after `KVM_RUN` returned; `signal`: it returned because of a
    /// signal.
    fn exited(&mut self, signal: bool);
    /// Whether MSR `index` is the observer's own (not the vPMU's): it reads
    /// as 0 and its writes go to [`ExitObserver::msr_written`].
    fn owns_msr(&self, index: u32) -> bool;
    /// The guest wrote `value` to the observer's MSR. `exits` and `pmis`:
    /// the vCPU's counts so far. (The vCPU's fd is busy with the exit: work
    /// that needs it waits for [`ExitObserver::entering`].)
    fn msr_written(&mut self, value: u64, exits: ExitCounts, pmis: u64);
    /// A vPMU MSR exit reached the VMM.
    fn pmu_msr(&mut self);
    /// Whether PMIs should carry their times ([`DeliveredPmi`]).
    fn traces_pmis(&self) -> bool;
    /// The VMM delivered a PMI.
    fn pmi_delivered(&mut self, pmi: DeliveredPmi);
    /// The vCPU thread ends: what the observer leaves in the vCPU's report.
    fn finish(self: Box<Self>, fd: &VcpuFd) -> Option<ObserverLog>;
}

/// A sampler of the guest's state: the vCPU's hook for the host-side
/// profiler (`profile`), present in every build. Both methods run on the
/// vCPU thread, between an exit and the next entry.
pub trait GuestSampler: Send {
    /// Before an entry. `kicked`: a signal brought the vCPU out since the
    /// last entry (a sampling event's overflow, among others).
    fn before_entry(&mut self, kicked: bool, fd: &VcpuFd);
    /// The vCPU thread ends: hand in whatever is in progress.
    fn finish(&mut self, fd: &VcpuFd);
}

/// What an observer leaves behind, for whoever created it to downcast.
pub type ObserverLog = std::sync::Arc<dyn std::any::Any + Send + Sync>;
