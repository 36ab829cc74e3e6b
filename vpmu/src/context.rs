//! The complete, plain state of one vCPU's vPMU, for pause, snapshot,
//! migration and handing a vCPU to another thread.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::PmuModel;

/// Version of the serialized [`VpmuContext`] format (2: its model is
/// [`crate::model::MODEL_FORMAT`] 2).
pub const CONTEXT_FORMAT: u32 = 2;

/// Every virtual MSR, every counter value and every generation.
///
/// Generations identify programmings: restoring a context whose counter
/// programmings equal the ones open on the host reopens nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpmuContext {
    /// Format version, [`CONTEXT_FORMAT`].
    pub format: u32,
    /// The model the state belongs to.
    pub model: PmuModel,
    /// Event selects, one per general-purpose counter.
    pub event_selects: Vec<u64>,
    /// `IA32_FIXED_CTR_CTRL` (0 on AMD).
    pub fixed_ctrl: u64,
    /// Global control (0 without global registers).
    pub global_ctrl: u64,
    /// Global status (0 without global registers).
    pub global_status: u64,
    /// Counter values, general-purpose first.
    pub values: Vec<u64>,
    /// Counter generations, same order.
    pub generations: Vec<u64>,
    /// A PMI waits for delivery.
    pub pending_pmi: bool,
}

/// Why a context cannot be restored.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ContextError {
    /// Unknown format.
    #[error("vPMU context format {0} is not supported (expected {CONTEXT_FORMAT})")]
    Format(u32),
    /// Saved for another model.
    #[error("vPMU context is for another PMU model")]
    ModelMismatch,
    /// A list has the wrong length.
    #[error("vPMU context has {got} {what}, the model needs {expected}")]
    Length {
        /// Which list.
        what: &'static str,
        /// Needed.
        expected: usize,
        /// Found.
        got: usize,
    },
    /// A value or register has bits the model does not have.
    #[error("vPMU context {what} {value:#x} has bits outside the model ({invalid:#x})")]
    InvalidBits {
        /// Which register.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The offending bits.
        invalid: u64,
    },
}
