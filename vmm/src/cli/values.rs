//! The flag values that name a setting of another part (`--vpmu`,
//! `--on-reset`, `--cpu-vendor`): how clap spells and explains them. The
//! parts own the types; only the command line knows clap.

use clap::builder::PossibleValue;
use clap::ValueEnum;

use crate::pmu::VpmuMode;
use crate::vm::config::{CpuVendor, OnReset};

/// Implements [`ValueEnum`] for a unit-variant enum: each variant, its
/// spelling on the command line and its help line.
macro_rules! flag_values {
    ($type:ty { $($variant:ident => $name:literal: $help:literal,)+ }) => {
        impl ValueEnum for $type {
            fn value_variants<'a>() -> &'a [Self] {
                &[$(<$type>::$variant),+]
            }

            fn to_possible_value(&self) -> Option<PossibleValue> {
                Some(match self {
                    $(<$type>::$variant => PossibleValue::new($name).help($help),)+
                })
            }
        }
    };
}

flag_values!(VpmuMode {
    Auto => "auto": "A vPMU wherever the host can serve the guest fully",
    On => "on": "A vPMU even where guest RDPMC cannot be served (with a warning)",
    Off => "off": "No PMU: CPUID advertises none",
});

flag_values!(OnReset {
    Exit => "exit": "The VMM exits with code 0",
    Reboot => "reboot": "The guest boots again in a fresh VM; the API, the serial console and the per-VM counter totals carry on",
});

flag_values!(CpuVendor {
    Host => "host": "The host's vendor",
    Amd => "amd": "AuthenticAMD",
    Intel => "intel": "GenuineIntel",
});
