//! The guest-visible PMU model: explicit, serializable and versioned, so a
//! saved VM restores to the same PMU on another host.
//!
//! This module is the model's data and what follows from the data alone.
//! What needs a vendor's rules is written with the rules, in
//! `vendor/mod.rs`: [`PmuModel::best_for_host`], [`PmuModel::shaped`],
//! [`PmuModel::validate`], [`PmuModel::msr_ranges`] and
//! [`Vendor::masks_lvtpc_on_pmi`]; what needs an event policy is in
//! [`crate::policy`]: [`PmuModel::with_unavailable_events`].

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::x86::CpuidRegs;
pub use crate::x86::Vendor;

/// Version of the serialized [`PmuModel`] format (2: the vendor's own
/// features under `features`, keyed by `vendor`).
pub const MODEL_FORMAT: u32 = 2;

/// One guest-visible PMU.
///
/// `version` is the Intel architectural perfmon version (1 to 4) or, on AMD,
/// 1 (legacy or PerfCtrExtCore) or 2 (PerfMonV2). What only one vendor has
/// is in [`PmuModel::features`], whose variant is the vendor. In JSON:
/// `{"format": 2, "vendor": "amd", "features": {"perfctr_core": true},
/// "version": 2, "gp_counters": 6, "gp_width": 48}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmuModel {
    /// Serialized format version, [`MODEL_FORMAT`].
    pub format: u32,
    /// The vendor whose registers the guest sees, with its own features.
    #[serde(flatten)]
    pub features: VendorFeatures,
    /// Perfmon version (see the type's docs).
    pub version: u8,
    /// General-purpose counters.
    pub gp_counters: u8,
    /// Bit width of the general-purpose counters.
    pub gp_width: u8,
}

/// What only one vendor's PMU has; the variant is the vendor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "vendor", content = "features", rename_all = "lowercase")]
pub enum VendorFeatures {
    /// An AMD PMU.
    Amd(AmdFeatures),
    /// An Intel PMU.
    Intel(IntelFeatures),
}

/// AMD's own PMU features (APM vol. 2 ch. 13).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmdFeatures {
    /// PerfCtrExtCore: 6 counters at `0xC001_0200`, legacy MSRs alias 0-3.
    pub perfctr_core: bool,
}

/// Intel's own PMU features (SDM vol. 3 ch. 20).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntelFeatures {
    /// Fixed counters (version 2 and later).
    pub fixed_counters: u8,
    /// Bit width of the fixed counters (0 when there are none).
    pub fixed_width: u8,
    /// PDCM: `IA32_PERF_CAPABILITIES` exists.
    pub pdcm: bool,
    /// Full-width counter writes through `IA32_A_PMCx` (needs PDCM).
    pub full_width_writes: bool,
    /// CPUID.0AH:EBX: architectural events reported as *not* available.
    pub unavailable_events: u8,
}

impl IntelFeatures {
    /// With `count` fixed counters: width 48 unless one is set, 0 with none.
    pub fn with_fixed_counters(self, count: u8) -> Self {
        let fixed_width = match (count, self.fixed_width) {
            (0, _) => 0,
            (_, 0) => 48,
            (_, width) => width,
        };
        Self {
            fixed_counters: count,
            fixed_width,
            ..self
        }
    }
}

impl VendorFeatures {
    /// `vendor`'s features, all absent.
    pub fn none(vendor: Vendor) -> Self {
        match vendor {
            Vendor::Amd => Self::Amd(AmdFeatures::default()),
            Vendor::Intel => Self::Intel(IntelFeatures::default()),
        }
    }

    /// The vendor.
    pub fn vendor(&self) -> Vendor {
        match self {
            Self::Amd(_) => Vendor::Amd,
            Self::Intel(_) => Vendor::Intel,
        }
    }
}

impl From<AmdFeatures> for VendorFeatures {
    fn from(features: AmdFeatures) -> Self {
        Self::Amd(features)
    }
}

impl From<IntelFeatures> for VendorFeatures {
    fn from(features: IntelFeatures) -> Self {
        Self::Intel(features)
    }
}

/// Why a [`PmuModel`] cannot exist.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ModelError {
    /// The serialized format is not one this crate reads.
    #[error("PMU model format {0} is not supported (expected {MODEL_FORMAT})")]
    Format(u32),
    /// A version this vendor does not have.
    #[error("{vendor:?} PMU version {version} is not supported ({supported})")]
    Version {
        /// Vendor.
        vendor: Vendor,
        /// Requested version.
        version: u8,
        /// What is supported.
        supported: &'static str,
    },
    /// A counter count the model cannot have.
    #[error("{vendor:?} PMU cannot have {count} general-purpose counters: {why}")]
    GpCounters {
        /// Vendor.
        vendor: Vendor,
        /// Requested count.
        count: u8,
        /// The rule that was broken.
        why: &'static str,
    },
    /// A fixed counter count the model cannot have.
    #[error("{vendor:?} PMU version {version} cannot have {count} fixed counters: {why}")]
    FixedCounters {
        /// Vendor.
        vendor: Vendor,
        /// Version.
        version: u8,
        /// Requested count.
        count: u8,
        /// The rule that was broken.
        why: &'static str,
    },
    /// A counter width the model cannot have.
    #[error("{what} width {width} is not supported ({supported})")]
    Width {
        /// Which counters.
        what: &'static str,
        /// Requested width.
        width: u8,
        /// What is supported.
        supported: &'static str,
    },
    /// A feature that needs another one, or has a value it cannot have.
    #[error("{feature} {why}")]
    Feature {
        /// The feature.
        feature: &'static str,
        /// The rule that was broken.
        why: &'static str,
    },
}

/// What the host offers, for [`PmuModel::best_for_host`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// perf can open hardware (`PERF_TYPE_RAW`) events on this host; see
    /// [`crate::backend::perf::PerfBackend::probe_hardware`].
    pub hardware_events: bool,
    /// The host's PMU CPUID leaves, when known.
    pub cpuid: Option<HostCpuid>,
    /// The host PMU supports full-width counter writes (`IA32_PERF_CAPABILITIES\[13\]`).
    pub intel_full_width_writes: bool,
}

/// The host CPUID values that describe its PMU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCpuid {
    /// Leaf 0xA (Intel architectural perfmon).
    pub leaf_0xa: CpuidRegs,
    /// Leaf 0x8000_0001 ECX (AMD PerfCtrExtCore is bit 23).
    pub ext_features_ecx: u32,
    /// Leaf 0x8000_0022 (AMD PerfMonV2), zero when absent.
    pub leaf_0x8000_0022: CpuidRegs,
}

impl HostCpuid {
    /// Reads the PMU leaves of the CPU this runs on.
    #[cfg(target_arch = "x86_64")]
    pub fn detect() -> Self {
        use core::arch::x86_64::__cpuid_count;
        let regs = |leaf: u32| {
            let r = __cpuid_count(leaf, 0);
            CpuidRegs {
                eax: r.eax,
                ebx: r.ebx,
                ecx: r.ecx,
                edx: r.edx,
            }
        };
        let max_basic = regs(0).eax;
        let max_ext = regs(0x8000_0000).eax;
        Self {
            leaf_0xa: if max_basic >= 0xA {
                regs(0xA)
            } else {
                CpuidRegs::default()
            },
            ext_features_ecx: if max_ext >= 0x8000_0001 {
                regs(0x8000_0001).ecx
            } else {
                0
            },
            leaf_0x8000_0022: if max_ext >= 0x8000_0022 {
                regs(0x8000_0022)
            } else {
                CpuidRegs::default()
            },
        }
    }
}

impl HostCpuid {
    /// What these leaves say of the host's PMU, read as `vendor` defines
    /// them (a hypervisor may advertise what host perf cannot use: compare
    /// with [`crate::backend::perf::PerfBackend::probe_hardware`]).
    pub fn describe(&self, vendor: Option<Vendor>) -> String {
        match vendor {
            Some(Vendor::Intel) => {
                let a = self.leaf_0xa.eax;
                let (version, gp, gp_width) = (a & 0xff, (a >> 8) & 0xff, (a >> 16) & 0xff);
                if version == 0 {
                    return "CPUID 0xA: no architectural perfmon (version 0)".into();
                }
                let d = self.leaf_0xa.edx;
                let (fixed, fixed_width) = (d & 0x1f, (d >> 5) & 0xff);
                format!(
                    "CPUID 0xA: Intel architectural perfmon v{version}, {gp} general-purpose \
                     counters ({gp_width} bits), {fixed} fixed ({fixed_width} bits)"
                )
            }
            Some(Vendor::Amd) => {
                let core = if self.ext_features_ecx & (1 << 23) != 0 {
                    "6 core counters (PerfCtrExtCore)"
                } else {
                    "4 legacy counters (no PerfCtrExtCore)"
                };
                let v2 = &self.leaf_0x8000_0022;
                let perfmon_v2 = if v2.eax & 1 != 0 {
                    format!("PerfMonV2 with {} counters", v2.ebx & 0xf)
                } else {
                    "no PerfMonV2".into()
                };
                format!("CPUID 0x80000001/0x80000022: AMD, {core}, {perfmon_v2}")
            }
            None => "neither AMD nor Intel: no PMU leaves read".into(),
        }
    }
}

impl PmuModel {
    /// A model of the vendor of `features`; check it with
    /// [`PmuModel::validate`].
    pub fn new(
        version: u8,
        gp_counters: u8,
        gp_width: u8,
        features: impl Into<VendorFeatures>,
    ) -> Self {
        Self {
            format: MODEL_FORMAT,
            features: features.into(),
            version,
            gp_counters,
            gp_width,
        }
    }

    /// The vendor whose registers the guest sees.
    pub fn vendor(&self) -> Vendor {
        self.features.vendor()
    }

    /// The AMD features, on an AMD model.
    pub fn amd(&self) -> Option<&AmdFeatures> {
        match &self.features {
            VendorFeatures::Amd(features) => Some(features),
            VendorFeatures::Intel(_) => None,
        }
    }

    /// The Intel features, on an Intel model.
    pub fn intel(&self) -> Option<&IntelFeatures> {
        match &self.features {
            VendorFeatures::Intel(features) => Some(features),
            VendorFeatures::Amd(_) => None,
        }
    }

    /// Fixed counters (Intel; 0 on AMD, which has none).
    pub fn fixed_counters(&self) -> u8 {
        self.intel().map_or(0, |f| f.fixed_counters)
    }

    /// Bit width of the fixed counters (0 when there are none).
    pub fn fixed_width(&self) -> u8 {
        self.intel().map_or(0, |f| f.fixed_width)
    }

    /// Overrides the number of general-purpose counters.
    pub fn with_gp_counters(mut self, count: u8) -> Self {
        self.gp_counters = count;
        self
    }

    /// Overrides the perfmon version.
    pub fn with_version(mut self, version: u8) -> Self {
        self.version = version;
        self
    }

    /// AMD PerfMonV2 (global control and status registers).
    pub fn has_amd_perfmon_v2(&self) -> bool {
        self.amd().is_some() && self.version >= 2
    }

    /// Whether the model has global control/status registers (Intel v2+,
    /// AMD PerfMonV2).
    pub fn has_global_registers(&self) -> bool {
        self.version >= 2
    }

    /// Total number of counters (general-purpose, then fixed).
    pub fn counters(&self) -> usize {
        self.gp_counters as usize + self.fixed_counters() as usize
    }
}

/// A contiguous range of MSR indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrRange {
    /// First MSR index.
    pub base: u32,
    /// Number of MSRs.
    pub count: u32,
}

impl MsrRange {
    /// Whether `index` is in the range.
    pub fn contains(&self, index: u32) -> bool {
        index.wrapping_sub(self.base) < self.count
    }
}

/// Sorts ranges and joins the ones that touch.
pub(crate) fn merge_ranges(mut ranges: Vec<MsrRange>) -> Vec<MsrRange> {
    ranges.retain(|r| r.count > 0);
    ranges.sort_by_key(|r| r.base);
    let mut merged: Vec<MsrRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if last.base + last.count >= r.base => {
                last.count = last.count.max(r.base + r.count - last.base);
            }
            _ => merged.push(r),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_pmu_leaves_are_read_as_their_vendor_defines_them() {
        let regs = |eax, ebx, edx| CpuidRegs {
            eax,
            ebx,
            ecx: 0,
            edx,
        };
        let intel = HostCpuid {
            // v4, 8 counters of 48 bits; 3 fixed of 48 bits.
            leaf_0xa: regs(0x0730_0804, 0, (48 << 5) | 3),
            ..Default::default()
        };
        assert_eq!(
            intel.describe(Some(Vendor::Intel)),
            "CPUID 0xA: Intel architectural perfmon v4, 8 general-purpose counters (48 bits), \
             3 fixed (48 bits)"
        );
        assert!(HostCpuid::default()
            .describe(Some(Vendor::Intel))
            .contains("no architectural perfmon"));
        let amd = HostCpuid {
            ext_features_ecx: 1 << 23,
            leaf_0x8000_0022: regs(1, 6, 0),
            ..Default::default()
        };
        assert_eq!(
            amd.describe(Some(Vendor::Amd)),
            "CPUID 0x80000001/0x80000022: AMD, 6 core counters (PerfCtrExtCore), PerfMonV2 with \
             6 counters"
        );
        assert!(HostCpuid::default()
            .describe(Some(Vendor::Amd))
            .ends_with("4 legacy counters (no PerfCtrExtCore), no PerfMonV2"));
    }

    #[test]
    fn the_vendor_is_the_variant_of_its_features() {
        let amd = PmuModel::new(1, 4, 48, AmdFeatures::default());
        assert_eq!(
            (amd.vendor(), amd.intel(), amd.fixed_counters()),
            (Vendor::Amd, None, 0)
        );
        let intel = PmuModel::new(2, 4, 48, IntelFeatures::default().with_fixed_counters(2));
        assert_eq!((intel.vendor(), intel.amd()), (Vendor::Intel, None));
        assert_eq!((intel.fixed_counters(), intel.fixed_width()), (2, 48));
        assert_eq!(
            VendorFeatures::none(Vendor::Amd),
            AmdFeatures::default().into()
        );
        assert_eq!(VendorFeatures::none(Vendor::Intel).vendor(), Vendor::Intel);
        let none = IntelFeatures {
            fixed_width: 40,
            ..Default::default()
        };
        assert_eq!(
            none.with_fixed_counters(3).fixed_width,
            40,
            "a set width stays"
        );
        assert_eq!(none.with_fixed_counters(0).fixed_width, 0);
    }

    #[test]
    fn adjacent_ranges_merge() {
        let merged = merge_ranges(vec![
            MsrRange {
                base: 0x390,
                count: 1,
            },
            MsrRange {
                base: 0x38D,
                count: 3,
            },
            MsrRange {
                base: 0xC1,
                count: 4,
            },
            MsrRange {
                base: 0x500,
                count: 0,
            },
        ]);
        assert_eq!(
            merged,
            vec![
                MsrRange {
                    base: 0xC1,
                    count: 4
                },
                MsrRange {
                    base: 0x38D,
                    count: 4
                }
            ]
        );
    }
}
