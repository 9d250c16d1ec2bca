//! Bounded window of recently seen `(sender, msg_id)` pairs, so that a client's
//! resend after a reconnect is absorbed instead of delivered twice.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};

use xxhash_rust::xxh3::xxh3_128;

pub const PENDING: u8 = 1;
pub const DONE: u8 = 2;

pub const NEW: u8 = 0;
pub const DUP_PENDING: u8 = 1;
pub const DUP_DONE: u8 = 2;

/// Longest sender the key layout can express (its length is one byte).
pub const MAX_SENDER_LEN: usize = u8::MAX as usize;

/// xxh3_128 of `len(sender) as u8 || sender || msg_id`. The length prefix keeps
/// ("ab","c") and ("a","bc") apart. `None` if the sender is over 255 bytes.
pub fn dedup_key(sender: &[u8], msg_id: &[u8]) -> Option<u128> {
    if sender.len() > MAX_SENDER_LEN {
        return None;
    }
    let n = 1 + sender.len() + msg_id.len();
    // Ids are str8 on the wire, so the stack buffer covers every real key.
    let mut stack = [0u8; 1 + 2 * MAX_SENDER_LEN];
    let mut heap;
    let buf: &mut [u8] = if n <= stack.len() {
        &mut stack[..n]
    } else {
        heap = vec![0u8; n];
        &mut heap
    };
    buf[0] = sender.len() as u8;
    buf[1..1 + sender.len()].copy_from_slice(sender);
    buf[1 + sender.len()..].copy_from_slice(msg_id);
    Some(xxh3_128(buf))
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    state: u8,
    ts_ms: u64,
    /// Ties the slot to its own queue entry: entries left behind by a removed
    /// or reinserted key must not evict the newer slot.
    gen: u64,
}

#[derive(Debug)]
pub struct DedupWindow {
    map: HashMap<u128, Slot>,
    /// Insertion order, for O(1) amortized eviction of the oldest entries.
    order: VecDeque<(u128, u64, u64)>,
    max_entries: usize,
    max_age_ms: u64,
    next_gen: u64,
}

impl DedupWindow {
    pub fn new(max_entries: usize, max_age_ms: u64) -> Self {
        DedupWindow {
            map: HashMap::new(),
            order: VecDeque::new(),
            max_entries,
            max_age_ms,
            next_gen: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    pub fn max_age_ms(&self) -> u64 {
        self.max_age_ms
    }

    /// State of `key` (`PENDING` or `DONE`) if it is in the window.
    pub fn get(&self, key: u128) -> Option<u8> {
        self.map.get(&key).map(|s| s.state)
    }

    fn cutoff(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.max_age_ms)
    }

    fn next_gen(&mut self) -> u64 {
        self.next_gen += 1;
        self.next_gen
    }

    fn push(&mut self, key: u128, state: u8, ts_ms: u64) {
        let gen = self.next_gen();
        self.map.insert(key, Slot { state, ts_ms, gen });
        self.order.push_back((key, ts_ms, gen));
    }

    /// Evicts from the front while over capacity or older than the cutoff.
    /// The decision uses only the queue entry, so the common no-eviction case
    /// costs no map probe (a cache miss on a large window).
    fn evict(&mut self, cutoff: u64) {
        while let Some(&(key, ts, gen)) = self.order.front() {
            if self.map.len() <= self.max_entries && ts >= cutoff {
                break;
            }
            self.order.pop_front();
            if let Entry::Occupied(e) = self.map.entry(key) {
                if e.get().gen == gen {
                    e.remove();
                }
            }
        }
        // Removed or overwritten keys leave dead entries in the queue; compact
        // once they outnumber the live ones so it stays O(len) (amortized O(1)).
        if self.order.len() > 2 * self.map.len() + 16 {
            let map = &self.map;
            self.order
                .retain(|(k, _, g)| map.get(k).is_some_and(|s| s.gen == *g));
        }
    }

    /// Returns `NEW` (and records the key as pending), `DUP_PENDING` or `DUP_DONE`.
    pub fn check_and_insert(&mut self, key: u128, now_ms: u64) -> u8 {
        let cutoff = self.cutoff(now_ms);
        self.evict(cutoff);
        let gen = self.next_gen();
        let fresh = Slot {
            state: PENDING,
            ts_ms: now_ms,
            gen,
        };
        match self.map.entry(key) {
            // Entries reloaded out of order can sit behind a younger front; the
            // age bound still applies to them.
            Entry::Occupied(e) if e.get().ts_ms >= cutoff => return e.get().state,
            Entry::Occupied(mut e) => {
                e.insert(fresh);
            }
            Entry::Vacant(e) => {
                e.insert(fresh);
            }
        }
        self.order.push_back((key, now_ms, gen));
        self.evict(cutoff);
        NEW
    }

    /// Marks a pending key done; false if the key is not in the window.
    pub fn mark_done(&mut self, key: u128) -> bool {
        match self.map.get_mut(&key) {
            Some(s) => {
                s.state = DONE;
                true
            }
            None => false,
        }
    }

    /// Forgets a key, e.g. when storing its message failed and a resend must
    /// be accepted as new.
    pub fn remove(&mut self, key: u128) -> bool {
        let removed = self.map.remove(&key).is_some();
        if removed {
            self.evict(0);
        }
        removed
    }

    /// Inserts or overwrites a key with an explicit state and timestamp (reload
    /// from storage). Only the entry bound is enforced here; age is enforced
    /// by the next `check_and_insert`, which knows the current time.
    pub fn insert(&mut self, key: u128, state: u8, ts_ms: u64) {
        self.push(key, state, ts_ms);
        self.evict(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u32) -> u128 {
        dedup_key(b"alice", i.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn key_is_stable_and_length_prefixed() {
        assert_eq!(dedup_key(b"a", b"b"), dedup_key(b"a", b"b"));
        assert_ne!(dedup_key(b"ab", b"c"), dedup_key(b"a", b"bc"));
        let mut buf = vec![5u8];
        buf.extend_from_slice(b"alicem1");
        assert_eq!(dedup_key(b"alice", b"m1"), Some(xxh3_128(&buf)));
        assert!(dedup_key(&[b'x'; 256], b"m").is_none());
        assert!(dedup_key(&[b'x'; 255], &[b'y'; 1000]).is_some());
    }

    #[test]
    fn new_pending_done() {
        let mut w = DedupWindow::new(10, 1000);
        assert_eq!(w.check_and_insert(k(1), 0), NEW);
        assert_eq!(w.check_and_insert(k(1), 1), DUP_PENDING);
        assert!(w.mark_done(k(1)));
        assert_eq!(w.check_and_insert(k(1), 2), DUP_DONE);
        assert!(!w.mark_done(k(2)));
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn max_entries_evicts_oldest() {
        let mut w = DedupWindow::new(3, u64::MAX);
        for i in 0..5 {
            assert_eq!(w.check_and_insert(k(i), i as u64), NEW);
        }
        assert_eq!(w.len(), 3);
        assert_eq!(w.get(k(0)), None);
        assert_eq!(w.get(k(1)), None);
        assert_eq!(w.get(k(4)), Some(PENDING));
        assert_eq!(w.check_and_insert(k(0), 10), NEW);
        assert_eq!(w.get(k(2)), None);
    }

    #[test]
    fn age_evicts() {
        let mut w = DedupWindow::new(100, 1000);
        w.check_and_insert(k(1), 0);
        w.check_and_insert(k(2), 500);
        assert_eq!(w.check_and_insert(k(1), 1000), DUP_PENDING);
        assert_eq!(w.check_and_insert(k(3), 1001), NEW);
        assert_eq!(w.get(k(1)), None);
        assert_eq!(w.len(), 2);
        assert_eq!(w.check_and_insert(k(1), 1002), NEW);
    }

    #[test]
    fn remove_and_reinsert() {
        let mut w = DedupWindow::new(2, u64::MAX);
        w.check_and_insert(k(1), 0);
        assert!(w.remove(k(1)));
        assert!(!w.remove(k(1)));
        assert_eq!(w.len(), 0);
        assert_eq!(w.check_and_insert(k(1), 1), NEW);
        assert_eq!(w.check_and_insert(k(1), 2), DUP_PENDING);
    }

    #[test]
    fn stale_queue_entry_does_not_evict_newer_entry() {
        // k1's first queue entry (ts 0) is stale after the remove; with the
        // window at capacity, evicting must drop k2 (the oldest live), not k1.
        let mut w = DedupWindow::new(2, 1000);
        w.check_and_insert(k(1), 0);
        w.remove(k(1));
        w.check_and_insert(k(2), 0);
        w.check_and_insert(k(1), 0);
        w.check_and_insert(k(3), 1);
        assert_eq!(w.get(k(2)), None);
        assert_eq!(w.get(k(1)), Some(PENDING));
        assert_eq!(w.get(k(3)), Some(PENDING));
        // Same for age: the stale ts-0 entry must not expire the reinsert.
        let mut w = DedupWindow::new(10, 1000);
        w.check_and_insert(k(1), 0);
        w.remove(k(1));
        w.check_and_insert(k(1), 900);
        assert_eq!(w.check_and_insert(k(1), 1500), DUP_PENDING);
    }

    #[test]
    fn insert_for_reload() {
        let mut w = DedupWindow::new(2, 1000);
        w.insert(k(1), DONE, 100);
        w.insert(k(2), PENDING, 100);
        assert_eq!(w.check_and_insert(k(1), 200), DUP_DONE);
        assert_eq!(w.check_and_insert(k(2), 200), DUP_PENDING);
        w.insert(k(3), DONE, 150);
        assert_eq!(w.len(), 2);
        assert_eq!(w.get(k(1)), None);
        // Overwrite keeps one live slot.
        w.insert(k(3), PENDING, 160);
        assert_eq!(w.len(), 2);
        assert_eq!(w.get(k(3)), Some(PENDING));
    }

    #[test]
    fn queue_stays_bounded_under_remove_churn() {
        let mut w = DedupWindow::new(4, u64::MAX);
        for i in 0..10_000u64 {
            w.check_and_insert(k(1), i);
            w.remove(k(1));
        }
        assert!(w.order.len() <= 2 * w.len() + 17);
        assert!(w.is_empty());
    }
}
