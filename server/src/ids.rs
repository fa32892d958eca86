//! Random ids and seeds: the one source of the request ids (`chatcmpl-…`, `resp_…`), the item and
//! tool-call ids, and the seed of a request that gives none. Random, not secret: std's
//! `RandomState` (SipHash keyed from the OS once per thread) over a process-wide counter.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh random 64-bit value; no two calls in a process hash the same counter value.
pub fn random_u64() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(CALLS.fetch_add(1, Ordering::Relaxed))
}

/// `prefix` followed by 32 random hex digits (128 bits), e.g. `chatcmpl-3f…`.
pub fn random_id(prefix: &str) -> String {
    format!("{prefix}{:016x}{:016x}", random_u64(), random_u64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_distinct_and_well_formed() {
        let ids: HashSet<String> = (0..10_000).map(|_| random_id("call_")).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            assert_eq!(id.len(), "call_".len() + 32);
            assert!(id["call_".len()..].chars().all(|c| c.is_ascii_hexdigit()));
        }
    }
}
