//! What the host sees of the guest's counters while it runs.
//!
//! Each vCPU thread publishes a snapshot of its vPMU into its slot; readers
//! (the API) take the latest one. A vCPU never waits on a reader: it
//! publishes with `try_lock` and skips a round if a reader holds the slot,
//! and readers hold it only to clone an `Arc`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use vpmu::VpmuSnapshot;

use crate::pmu::vcpu::PmiDelivery;
use crate::pmu::PmuPlan;

/// How often a vCPU republishes on its own (at its next exit).
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(50);

/// One vCPU's published view.
#[derive(Clone, Debug, Serialize)]
pub struct VcpuView {
    pub index: u8,
    #[serde(skip)]
    pub taken: Instant,
    /// The vCPU is parked by a VM pause.
    pub paused: bool,
    pub vpmu: VpmuSnapshot,
    pub pmi_delivery: PmiDelivery,
}

#[derive(Default)]
struct Slot {
    latest: Mutex<Option<Arc<VcpuView>>>,
    refresh: AtomicBool,
}

/// The VM's export: the vPMU plan and a slot per vCPU.
pub struct Export {
    pub started: Instant,
    pub plan: Arc<PmuPlan>,
    slots: Vec<Slot>,
}

impl Export {
    pub fn new(plan: Arc<PmuPlan>, vcpus: usize) -> Self {
        Self {
            started: Instant::now(),
            plan,
            slots: (0..vcpus).map(|_| Slot::default()).collect(),
        }
    }

    pub fn vcpus(&self) -> usize {
        self.slots.len()
    }

    /// Called by vCPU `index`'s thread; never blocks.
    pub fn publish(&self, view: VcpuView) {
        if let Some(slot) = self.slots.get(usize::from(view.index)) {
            if let Ok(mut latest) = slot.latest.try_lock() {
                *latest = Some(Arc::new(view));
            }
        }
    }

    /// Whether a reader asked vCPU `index` for a fresh view; clears it.
    pub fn take_refresh(&self, index: u8) -> bool {
        self.slots
            .get(usize::from(index))
            .is_some_and(|s| s.refresh.swap(false, Ordering::SeqCst))
    }

    pub fn request_refresh(&self, index: u8) {
        if let Some(slot) = self.slots.get(usize::from(index)) {
            slot.refresh.store(true, Ordering::SeqCst);
        }
    }

    /// The latest view of vCPU `index`.
    pub fn latest(&self, index: u8) -> Option<Arc<VcpuView>> {
        let slot = self.slots.get(usize::from(index))?;
        let latest = slot.latest.lock().unwrap_or_else(|e| e.into_inner());
        latest.clone()
    }
}
