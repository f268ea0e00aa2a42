//! How many DoCheckpoint calls this replica has in flight to each CTS, so that one busy or
//! slow CTS cannot take every request slot (and every connection) of the GCS, nor be sent
//! more checkpoints at once than it can take (`max_checkpoints_in_flight_per_cts`).
//!
//! Not registry state: a bound on this replica's own outgoing calls, gone with the process.
//! With N replicas a CTS gets at most N × the limit; the CTS's own `[limits]` bound it too.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

/// Calls in flight, per CTS instance name.
#[derive(Debug, Default)]
pub struct InFlight {
    calls: Mutex<HashMap<String, usize>>,
}

/// A place taken by [`InFlight::try_take`]; dropping it gives the place back.
#[derive(Debug)]
pub struct Place {
    owner: Arc<InFlight>,
    cts: String,
}

impl InFlight {
    /// A place for one more call to `cts`, or `Err(calls in flight)` when it has `limit`.
    pub fn try_take(self: &Arc<Self>, cts: &str, limit: usize) -> Result<Place, usize> {
        let mut calls = self.calls.lock();
        let n = calls.get(cts).copied().unwrap_or(0);
        if n >= limit {
            return Err(n);
        }
        *calls.entry(cts.to_string()).or_default() += 1;
        Ok(Place {
            owner: self.clone(),
            cts: cts.to_string(),
        })
    }

    /// Calls in flight to `cts` now.
    pub fn count(&self, cts: &str) -> usize {
        self.calls.lock().get(cts).copied().unwrap_or(0)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut calls = self.owner.calls.lock();
        if let Some(n) = calls.get_mut(&self.cts) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                calls.remove(&self.cts);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_counted_per_cts_and_given_back() {
        let f = Arc::new(InFlight::default());
        let a1 = f.try_take("a", 2).unwrap();
        let _a2 = f.try_take("a", 2).unwrap();
        assert_eq!(f.try_take("a", 2).unwrap_err(), 2);
        let _b = f.try_take("b", 2).expect("another CTS has its own places");
        drop(a1);
        assert_eq!(f.count("a"), 1);
        let _a3 = f.try_take("a", 2).expect("a place came back");
        assert!(
            f.try_take("c", 0).is_err(),
            "a limit of 0 refuses every call"
        );
        assert!(!f.calls.lock().contains_key("c"), "a refusal takes nothing");
    }
}
