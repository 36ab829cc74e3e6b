//! The test seams' stand-ins in builds without the `test-seams` feature
//! (the shipped binary): the same names, doing nothing, so that no
//! `VMM_TEST_*` variable is read and none of the seams' code is compiled.

use vpmu::backend::perf::PerfBackend;

/// The host backend of a vCPU: perf itself.
pub type HostBackend = PerfBackend;

pub fn host_backend(perf: PerfBackend) -> HostBackend {
    perf
}

/// No exit delay.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExitDelay;

impl ExitDelay {
    pub fn from_env() -> Self {
        Self
    }

    #[inline(always)]
    pub fn wait(self) {}
}
