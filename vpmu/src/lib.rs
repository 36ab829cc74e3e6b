//! The virtual PMU.
