//! KVM's MSR filter: the model's PMU MSRs exit to userspace
//! (`KVM_EXIT_X86_RDMSR`/`WRMSR`, reason FILTER); every other MSR stays
//! with KVM.

use kvm_bindings::{kvm_enable_cap, KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER};
use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use vpmu::MsrRange;

/// A KVM call that installing the filter needed failed.
#[derive(Debug, thiserror::Error)]
#[error("KVM {what} failed: {source}")]
pub struct FilterError {
    pub what: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> FilterError {
    move |source| FilterError { what, source }
}

/// Sends every MSR in `ranges` to userspace.
pub fn install(vm: &VmFd, ranges: &[MsrRange]) -> Result<(), FilterError> {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(kvm("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
    // A clear bit denies the access, which (with the capability above)
    // makes it exit to userspace.
    let bitmaps: Vec<Vec<u8>> = ranges
        .iter()
        .map(|r| vec![0u8; r.count.div_ceil(8) as usize])
        .collect();
    let filter: Vec<MsrFilterRange> = ranges
        .iter()
        .zip(&bitmaps)
        .map(|(r, bitmap)| MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base: r.base,
            msr_count: r.count,
            bitmap,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &filter)
        .map_err(kvm("KVM_X86_SET_MSR_FILTER"))
}
