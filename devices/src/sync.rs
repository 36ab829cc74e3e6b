//! Locks that survive a panicking holder.
//!
//! The VMM's threads (vCPUs, the API, the console writer) share a few
//! mutexes. A panic on one thread already ends the VMM through its panic
//! hook with one line; the others must still be able to stop the guest,
//! drain the console and answer the API meanwhile, so a poisoned lock is
//! used as it is rather than turned into a second panic. Every data the
//! VMM keeps under a lock stays consistent between statements, which is
//! what makes that sound.

use std::sync::LockResult;

/// `lock()`, `wait()` and friends, taking the guard of a poisoned lock.
pub trait Recover<G> {
    /// The guard, whether or not another thread panicked holding the lock.
    fn recover(self) -> G;
}

impl<G> Recover<G> for LockResult<G> {
    fn recover(self) -> G {
        self.unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::Recover;

    #[test]
    fn a_lock_poisoned_by_a_panic_still_gives_its_data() {
        let shared = Arc::new(Mutex::new(41));
        let holder = shared.clone();
        let panicked = std::thread::spawn(move || {
            let mut value = holder.lock().unwrap();
            *value += 1;
            panic!("poison it");
        })
        .join();
        assert!(panicked.is_err());
        assert!(shared.lock().is_err(), "the lock is poisoned");
        assert_eq!(*shared.lock().recover(), 42);
    }
}
