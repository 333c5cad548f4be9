//! Pairs that passed the checks, known by the hashes of their bytes: what a pair's check learns
//! (its chain parsed, its key matched against the leaf, the leaf's validity) depends on nothing
//! else, and a renewal changes one pair of a thousand. Only what passed is kept; the time is
//! compared again at every check. Entries not used for a whole round (from one preflight to the
//! next) are dropped, so the launcher holds at most the pairs of two bootstraps.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

/// A pair by the content hashes of its chain and key files, and whether the bootstrap gives its
/// key a password (which decides whether an encrypted key passes).
pub type PairId = (u64, u64, bool);

/// What a pair's check learned, time aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub not_before: i64,
    pub not_after: i64,
    pub serial: String,
    pub issuer: u64,
    pub certificates: usize,
    pub key_left_to_envoy: Option<String>,
}

#[derive(Default)]
struct Rounds {
    current: HashMap<PairId, Facts>,
    previous: HashMap<PairId, Facts>,
}

static KNOWN: LazyLock<Mutex<Rounds>> = LazyLock::new(Mutex::default);

fn with<T>(f: impl FnOnce(&mut Rounds) -> T) -> T {
    f(&mut KNOWN.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
}

/// The facts of a pair checked before, if it passed then.
pub fn get(id: PairId) -> Option<Facts> {
    with(|rounds| {
        if let Some(facts) = rounds.current.get(&id) {
            return Some(facts.clone());
        }
        let facts = rounds.previous.remove(&id)?;
        rounds.current.insert(id, facts.clone());
        Some(facts)
    })
}

pub fn remember(id: PairId, facts: Facts) {
    with(|rounds| {
        rounds.current.insert(id, facts);
    });
}

/// A new round of checks begins: what the last one did not use is forgotten at the next.
pub fn new_round() {
    with(|rounds| {
        rounds.previous = std::mem::take(&mut rounds.current);
        rounds.previous.shrink_to_fit();
    });
}

/// The store is copied into this thread's heap (see `memory::apart`: the checks at start run on
/// a thread whose heap is given back).
pub fn move_here() {
    with(|rounds| {
        rounds.current = rounds.current.clone();
        rounds.previous = rounds.previous.clone();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(serial: &str) -> Facts {
        Facts {
            not_before: 0,
            not_after: 1,
            serial: serial.into(),
            issuer: 7,
            certificates: 1,
            key_left_to_envoy: None,
        }
    }

    #[test]
    fn a_pair_unused_for_a_whole_round_is_forgotten() {
        // Ids no other test uses: the store is the process's.
        let (kept, dropped) = ((u64::MAX, 1, false), (u64::MAX, 2, false));
        remember(kept, facts("a"));
        remember(dropped, facts("b"));
        new_round();
        assert_eq!(get(kept), Some(facts("a")), "used in this round");
        new_round();
        assert_eq!(get(kept), Some(facts("a")), "still known one round later");
        assert_eq!(get(dropped), None, "not used for a whole round");
    }
}
