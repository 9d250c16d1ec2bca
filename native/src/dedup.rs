//! Bounded window of recently seen `(sender, msg_id)` pairs, so that a client's
//! resend after a reconnect is absorbed instead of delivered twice.
//!
//! The window is shared by every sender of a worker, so it is split fairly:
//! each sender's completed (`DONE`) entries form a FIFO of their own, and when
//! the window is over its entry budget the entry evicted is the oldest `DONE`
//! entry of the sender holding the most entries, in flight or not (the sender
//! inserting, on a tie). A sender that never holds more than the others
//! therefore never loses an entry to anybody else's traffic: one sender
//! flooding only evicts its own entries. In-flight (`PENDING`) entries are
//! never evicted, by the budget or by age; they are bounded by the server's
//! in-flight limits. If the largest sender holds nothing but in-flight
//! entries, the window stays over budget until they complete, rather than
//! take from a smaller sender.
//!
//! Layout (about 64-70 bytes per entry at a million, see `memory_bytes`):
//! entries live in a slab of 48-byte nodes linked into their sender's FIFO
//! and into one global FIFO (for age expiry), and an open-addressing index of
//! 8-byte slots (slab position, hash tag), at most 3/4 full, finds them by
//! key. Every operation is O(1) (amortized for index growth); the sender
//! holding the most entries is found through per-count buckets of
//! senders, which move by one step per insert or eviction.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

pub const PENDING: u8 = 1;
pub const DONE: u8 = 2;
const FREE: u8 = 0;

pub const NEW: u8 = 0;
pub const DUP_PENDING: u8 = 1;
pub const DUP_DONE: u8 = 2;

/// Longest sender the key layout can express (its length is one byte).
pub const MAX_SENDER_LEN: usize = u8::MAX as usize;

/// Bytes of one record of `DedupWindow::load`: `ts_ms u64 BE | key u128 BE |
/// sender u64 BE` (the LMDB dedup table's key followed by its value).
pub const LOAD_RECORD_LEN: usize = 32;

const NIL: u32 = u32::MAX;

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

/// xxh3_64 of the sender: who an entry belongs to, for the fair split. It is
/// persisted and replicated next to the key, which cannot be traced back to
/// its sender. A collision only makes two senders share one FIFO.
pub fn sender_hash(sender: &[u8]) -> u64 {
    xxh3_64(sender)
}

#[derive(Clone, Copy, Debug)]
struct Node {
    key: u128,
    ts_ms: u64,
    sender: u32,
    state: u8,
    /// Sender FIFO (DONE entries only); `s_next` also links free nodes.
    s_prev: u32,
    s_next: u32,
    /// Global FIFO (DONE entries only), oldest completion first.
    g_prev: u32,
    g_next: u32,
}

#[derive(Clone, Copy, Debug)]
struct Sender {
    hash: u64,
    /// Oldest and newest DONE entry.
    head: u32,
    tail: u32,
    /// DONE entries held.
    done: u32,
    /// All entries held, PENDING included: the count the fair split
    /// compares. The sender is freed at zero.
    refs: u32,
    /// Bucket list of the senders holding the same `refs` count; `b_next`
    /// also links free sender records.
    b_prev: u32,
    b_next: u32,
}

/// One index slot: a slab position and the low 32 bits of its key's hash.
#[derive(Clone, Copy, Debug)]
struct Slot {
    node: u32,
    tag: u32,
}

const EMPTY: Slot = Slot { node: NIL, tag: 0 };

/// Open-addressing (linear probing) index from key to slab position. A slot
/// holds the position and 32 bits of the hash, not the key (the slab has it):
/// probing compares tags within one cache line and touches a node only on a
/// tag match, and the tag gives every entry's home slot back without hashing
/// again (growth, deletion). Keys are hashed with a per-process random SipHash
/// key: a dedup key is an unkeyed xxh3 of client-chosen ids, so its own bits
/// could be steered into one probe run.
#[derive(Debug)]
struct Index {
    slots: Vec<Slot>,
    len: usize,
    hasher: RandomState,
}

impl Index {
    fn new() -> Self {
        Index {
            slots: Vec::new(),
            len: 0,
            hasher: RandomState::new(),
        }
    }

    fn tag(&self, key: u128) -> u32 {
        self.hasher.hash_one(key) as u32
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// (slot, node) of `key`.
    fn find(&self, nodes: &[Node], key: u128) -> Option<(usize, u32)> {
        if self.slots.is_empty() {
            return None;
        }
        let tag = self.tag(key);
        let mask = self.mask();
        let mut i = tag as usize & mask;
        loop {
            let slot = self.slots[i];
            if slot.node == NIL {
                return None;
            }
            if slot.tag == tag && nodes[slot.node as usize].key == key {
                return Some((i, slot.node));
            }
            i = (i + 1) & mask;
        }
    }

    /// Adds `node` (whose key is absent) under `key`.
    fn insert(&mut self, key: u128, node: u32) {
        // At most 3/4 full, so probe runs stay short.
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        let tag = self.tag(key);
        self.place(Slot { node, tag });
        self.len += 1;
    }

    fn place(&mut self, slot: Slot) {
        let mask = self.mask();
        let mut i = slot.tag as usize & mask;
        while self.slots[i].node != NIL {
            i = (i + 1) & mask;
        }
        self.slots[i] = slot;
    }

    fn grow(&mut self) {
        // Homes come from 32-bit tags: past 2^32 slots they would stop spreading.
        let cap = (self.slots.len() * 2).clamp(16, 1 << 32);
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; cap]);
        for slot in old.into_iter().filter(|s| s.node != NIL) {
            self.place(slot);
        }
    }

    /// Empties `hole` by backward-shift deletion (no tombstones, so lookups
    /// never slow down with churn).
    fn remove_at(&mut self, mut hole: usize) {
        let mask = self.mask();
        let mut i = hole;
        loop {
            i = (i + 1) & mask;
            let slot = self.slots[i];
            if slot.node == NIL {
                break;
            }
            // The entry at i may fill the hole if its home is not after it.
            let home = slot.tag as usize & mask;
            if (i.wrapping_sub(home) & mask) >= (i.wrapping_sub(hole) & mask) {
                self.slots[hole] = slot;
                hole = i;
            }
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
    }
}

#[derive(Debug)]
pub struct DedupWindow {
    nodes: Vec<Node>,
    free_node: u32,
    index: Index,
    senders: Vec<Sender>,
    free_sender: u32,
    sender_ix: HashMap<u64, u32>,
    /// `buckets[c]`: first of the senders holding exactly `c >= 1` entries.
    buckets: Vec<u32>,
    max_refs: usize,
    g_head: u32,
    g_tail: u32,
    len: usize,
    pending: usize,
    max_entries: usize,
    max_age_ms: u64,
    capacity_evictions: u64,
}

impl DedupWindow {
    pub fn new(max_entries: usize, max_age_ms: u64) -> Self {
        DedupWindow {
            nodes: Vec::new(),
            free_node: NIL,
            index: Index::new(),
            senders: Vec::new(),
            free_sender: NIL,
            sender_ix: HashMap::new(),
            buckets: vec![NIL],
            max_refs: 0,
            g_head: NIL,
            g_tail: NIL,
            len: 0,
            pending: 0,
            max_entries,
            max_age_ms,
            capacity_evictions: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    pub fn max_age_ms(&self) -> u64 {
        self.max_age_ms
    }

    /// Entries in flight (PENDING), which nothing evicts.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Senders holding at least one entry.
    pub fn senders(&self) -> usize {
        self.sender_ix.len()
    }

    /// DONE entries evicted by the entry budget, i.e. before their full age.
    pub fn capacity_evictions(&self) -> u64 {
        self.capacity_evictions
    }

    /// Timestamp of the oldest DONE entry still held (in completion order):
    /// now minus this is the window's real age.
    pub fn oldest_ts_ms(&self) -> Option<u64> {
        (self.g_head != NIL).then(|| self.nodes[self.g_head as usize].ts_ms)
    }

    /// Heap bytes held by the window's own structures (allocated capacity).
    pub fn memory_bytes(&self) -> usize {
        use std::mem::size_of;
        self.nodes.capacity() * size_of::<Node>()
            + self.index.slots.capacity() * size_of::<Slot>()
            + self.senders.capacity() * size_of::<Sender>()
            // hashbrown: one (u64, u32) bucket and one control byte per slot.
            + self.sender_ix.capacity() * (size_of::<(u64, u32)>() + 1)
            + self.buckets.capacity() * size_of::<u32>()
    }

    /// State of `key` (`PENDING` or `DONE`) if it is in the window.
    pub fn get(&self, key: u128) -> Option<u8> {
        self.index
            .find(&self.nodes, key)
            .map(|(_, n)| self.nodes[n as usize].state)
    }

    fn cutoff(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.max_age_ms)
    }

    // ---- senders and their count buckets ----------------------------------

    fn acquire_sender(&mut self, hash: u64) -> u32 {
        let s = match self.sender_ix.entry(hash) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(e) => {
                let rec = Sender {
                    hash,
                    head: NIL,
                    tail: NIL,
                    done: 0,
                    refs: 0,
                    b_prev: NIL,
                    b_next: NIL,
                };
                let s = if self.free_sender != NIL {
                    let s = self.free_sender;
                    self.free_sender = self.senders[s as usize].b_next;
                    self.senders[s as usize] = rec;
                    s
                } else {
                    self.senders.push(rec);
                    (self.senders.len() - 1) as u32
                };
                e.insert(s);
                s
            }
        };
        let refs = self.senders[s as usize].refs + 1;
        self.set_refs(s, refs);
        s
    }

    fn release_sender(&mut self, s: u32) {
        let refs = self.senders[s as usize].refs - 1;
        self.set_refs(s, refs);
        let rec = &mut self.senders[s as usize];
        if refs == 0 {
            debug_assert_eq!(rec.done, 0);
            let hash = rec.hash;
            rec.b_next = self.free_sender;
            self.free_sender = s;
            self.sender_ix.remove(&hash);
        }
    }

    fn bucket_unlink(&mut self, s: u32) {
        let Sender {
            refs,
            b_prev,
            b_next,
            ..
        } = self.senders[s as usize];
        if refs == 0 {
            return;
        }
        if b_prev != NIL {
            self.senders[b_prev as usize].b_next = b_next;
        } else {
            self.buckets[refs as usize] = b_next;
        }
        if b_next != NIL {
            self.senders[b_next as usize].b_prev = b_prev;
        }
    }

    fn bucket_link(&mut self, s: u32) {
        let refs = self.senders[s as usize].refs as usize;
        if refs == 0 {
            return;
        }
        if self.buckets.len() <= refs {
            self.buckets.resize(refs + 1, NIL);
        }
        let first = self.buckets[refs];
        let rec = &mut self.senders[s as usize];
        rec.b_prev = NIL;
        rec.b_next = first;
        if first != NIL {
            self.senders[first as usize].b_prev = s;
        }
        self.buckets[refs] = s;
        self.max_refs = self.max_refs.max(refs);
    }

    fn set_refs(&mut self, s: u32, refs: u32) {
        self.bucket_unlink(s);
        self.senders[s as usize].refs = refs;
        self.bucket_link(s);
        // Counts move by one, so the maximum drops by at most one step.
        while self.max_refs > 0 && self.buckets[self.max_refs] == NIL {
            self.max_refs -= 1;
        }
    }

    // ---- entries -------------------------------------------------------------

    /// Appends a DONE entry to its sender's FIFO and to the global FIFO.
    fn link_done(&mut self, n: u32) {
        let s = self.nodes[n as usize].sender;
        let tail = self.senders[s as usize].tail;
        let g_tail = self.g_tail;
        let node = &mut self.nodes[n as usize];
        node.s_prev = tail;
        node.s_next = NIL;
        node.g_prev = g_tail;
        node.g_next = NIL;
        if tail != NIL {
            self.nodes[tail as usize].s_next = n;
        } else {
            self.senders[s as usize].head = n;
        }
        self.senders[s as usize].tail = n;
        if g_tail != NIL {
            self.nodes[g_tail as usize].g_next = n;
        } else {
            self.g_head = n;
        }
        self.g_tail = n;
        self.senders[s as usize].done += 1;
    }

    fn unlink_done(&mut self, n: u32) {
        let Node {
            sender: s,
            s_prev,
            s_next,
            g_prev,
            g_next,
            ..
        } = self.nodes[n as usize];
        if s_prev != NIL {
            self.nodes[s_prev as usize].s_next = s_next;
        } else {
            self.senders[s as usize].head = s_next;
        }
        if s_next != NIL {
            self.nodes[s_next as usize].s_prev = s_prev;
        } else {
            self.senders[s as usize].tail = s_prev;
        }
        if g_prev != NIL {
            self.nodes[g_prev as usize].g_next = g_next;
        } else {
            self.g_head = g_next;
        }
        if g_next != NIL {
            self.nodes[g_next as usize].g_prev = g_prev;
        } else {
            self.g_tail = g_prev;
        }
        self.senders[s as usize].done -= 1;
    }

    /// Adds an entry for an absent key.
    fn add(&mut self, key: u128, state: u8, ts_ms: u64, sender: u64) -> u32 {
        let s = self.acquire_sender(sender);
        let node = Node {
            key,
            ts_ms,
            sender: s,
            state,
            s_prev: NIL,
            s_next: NIL,
            g_prev: NIL,
            g_next: NIL,
        };
        let n = if self.free_node != NIL {
            let n = self.free_node;
            self.free_node = self.nodes[n as usize].s_next;
            self.nodes[n as usize] = node;
            n
        } else {
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        };
        self.index.insert(key, n);
        self.len += 1;
        if state == DONE {
            self.link_done(n);
        } else {
            self.pending += 1;
        }
        n
    }

    /// Drops node `n`, held in index slot `slot` (looked up when `None`).
    fn drop_node(&mut self, n: u32, slot: Option<usize>) {
        let node = self.nodes[n as usize];
        if node.state == DONE {
            self.unlink_done(n);
        } else {
            self.pending -= 1;
        }
        let slot = match slot {
            Some(slot) => slot,
            None => {
                self.index
                    .find(&self.nodes, node.key)
                    .expect("a live node is indexed")
                    .0
            }
        };
        self.index.remove_at(slot);
        self.release_sender(node.sender);
        let rec = &mut self.nodes[n as usize];
        rec.state = FREE;
        rec.s_next = self.free_node;
        self.free_node = n;
        self.len -= 1;
    }

    /// Drops DONE entries older than the cutoff from the global front.
    fn expire(&mut self, cutoff: u64) {
        while self.g_head != NIL && self.nodes[self.g_head as usize].ts_ms < cutoff {
            self.drop_node(self.g_head, None);
        }
    }

    /// While over the entry budget, evicts the oldest DONE entry of the sender
    /// holding the most entries; `by` (the sender adding an entry) goes first
    /// on a tie (`NIL`: nobody). PENDING entries are never evicted: when the
    /// largest sender has only those, the window stays over budget until they
    /// complete.
    fn enforce_budget(&mut self, by: u32) {
        while self.len > self.max_entries && self.max_refs > 0 {
            let mine = (by != NIL).then(|| self.senders[by as usize]);
            let victim = if mine.is_some_and(|me| me.refs as usize == self.max_refs && me.done > 0)
            {
                by
            } else {
                self.buckets[self.max_refs]
            };
            let oldest = self.senders[victim as usize].head;
            if oldest == NIL {
                break;
            }
            self.drop_node(oldest, None);
            self.capacity_evictions += 1;
        }
    }

    /// Returns `NEW` (and records the key as pending), `DUP_PENDING` or `DUP_DONE`.
    pub fn check_and_insert(&mut self, key: u128, sender: u64, now_ms: u64) -> u8 {
        let cutoff = self.cutoff(now_ms);
        self.expire(cutoff);
        if let Some((slot, n)) = self.index.find(&self.nodes, key) {
            let node = &self.nodes[n as usize];
            if node.state == PENDING {
                return DUP_PENDING;
            }
            // Entries completed or reloaded out of order can sit behind a
            // younger front; the age bound still applies to them.
            if node.ts_ms >= cutoff {
                return DUP_DONE;
            }
            self.drop_node(n, Some(slot));
        }
        let n = self.add(key, PENDING, now_ms, sender);
        self.enforce_budget(self.nodes[n as usize].sender);
        NEW
    }

    /// Marks a pending key done; false if the key is not in the window.
    pub fn mark_done(&mut self, key: u128) -> bool {
        let Some((_, n)) = self.index.find(&self.nodes, key) else {
            return false;
        };
        if self.nodes[n as usize].state == PENDING {
            self.nodes[n as usize].state = DONE;
            self.pending -= 1;
            self.link_done(n);
            // Entries that completed while the window was over budget with
            // nothing evictable become evictable now.
            self.enforce_budget(self.nodes[n as usize].sender);
        }
        true
    }

    /// Forgets a key, e.g. when storing its message failed and a resend must
    /// be accepted as new.
    pub fn remove(&mut self, key: u128) -> bool {
        match self.index.find(&self.nodes, key) {
            Some((slot, n)) => {
                self.drop_node(n, Some(slot));
                // Another sender may now be the largest, with entries to evict.
                self.enforce_budget(NIL);
                true
            }
            None => false,
        }
    }

    /// Inserts or overwrites a key with an explicit state, timestamp and
    /// sender hash (reload from storage, a replicated entry). Only the entry
    /// budget is enforced here; age is enforced by the next `check_and_insert`,
    /// which knows the current time.
    pub fn insert(&mut self, key: u128, state: u8, ts_ms: u64, sender: u64) {
        if let Some((slot, n)) = self.index.find(&self.nodes, key) {
            self.drop_node(n, Some(slot));
        }
        let n = self.add(key, state, ts_ms, sender);
        self.enforce_budget(self.nodes[n as usize].sender);
    }

    /// Inserts DONE entries from `records`, a run of `LOAD_RECORD_LEN`-byte
    /// records in ascending time, skipping those older than the age bound at
    /// `now_ms`. Returns how many were inserted; `None` if the length is not a
    /// multiple of the record size.
    pub fn load(&mut self, records: &[u8], now_ms: u64) -> Option<usize> {
        if !records.len().is_multiple_of(LOAD_RECORD_LEN) {
            return None;
        }
        let cutoff = self.cutoff(now_ms);
        let mut n = 0;
        for r in records.chunks_exact(LOAD_RECORD_LEN) {
            let ts = u64::from_be_bytes(r[0..8].try_into().expect("8 bytes"));
            if ts < cutoff {
                continue;
            }
            let key = u128::from_be_bytes(r[8..24].try_into().expect("16 bytes"));
            let sender = u64::from_be_bytes(r[24..32].try_into().expect("8 bytes"));
            self.insert(key, DONE, ts, sender);
            n += 1;
        }
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALICE: u64 = 1;
    const BOB: u64 = 2;

    fn k(i: u32) -> u128 {
        dedup_key(b"alice", i.to_string().as_bytes()).unwrap()
    }

    fn kb(i: u32) -> u128 {
        dedup_key(b"bob", i.to_string().as_bytes()).unwrap()
    }

    impl DedupWindow {
        /// Walks every structure and checks it against the counters.
        fn check(&self) {
            let live: Vec<u32> = (0..self.nodes.len() as u32)
                .filter(|&n| self.nodes[n as usize].state != FREE)
                .collect();
            assert_eq!(live.len(), self.len);
            assert_eq!(self.index.len, self.len);
            for &n in &live {
                let node = &self.nodes[n as usize];
                assert_eq!(
                    self.index.find(&self.nodes, node.key),
                    Some((
                        self.index.slots.iter().position(|x| x.node == n).unwrap(),
                        n
                    ))
                );
            }
            let pending = live
                .iter()
                .filter(|&&n| self.nodes[n as usize].state == PENDING)
                .count();
            assert_eq!(pending, self.pending);
            let mut g = 0;
            let mut n = self.g_head;
            let mut prev = NIL;
            while n != NIL {
                assert_eq!(self.nodes[n as usize].state, DONE);
                assert_eq!(self.nodes[n as usize].g_prev, prev);
                prev = n;
                n = self.nodes[n as usize].g_next;
                g += 1;
            }
            assert_eq!(prev, self.g_tail);
            assert_eq!(g, self.len - self.pending);
            let mut max = 0;
            for (&hash, &s) in &self.sender_ix {
                let rec = self.senders[s as usize];
                assert_eq!(rec.hash, hash);
                let refs = live
                    .iter()
                    .filter(|&&n| self.nodes[n as usize].sender == s)
                    .count();
                assert_eq!(rec.refs as usize, refs);
                let mut c = 0;
                let mut n = rec.head;
                while n != NIL {
                    assert_eq!(self.nodes[n as usize].sender, s);
                    n = self.nodes[n as usize].s_next;
                    c += 1;
                }
                assert_eq!(rec.done, c);
                let mut b = self.buckets[refs];
                while b != s {
                    assert_ne!(b, NIL, "sender missing from its bucket");
                    b = self.senders[b as usize].b_next;
                }
                max = max.max(refs);
            }
            assert_eq!(self.max_refs, max);
            // Over budget only while the first of the largest senders has
            // nothing to evict.
            if self.len > self.max_entries {
                assert_eq!(self.senders[self.buckets[max] as usize].done, 0);
            }
        }
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
        assert_eq!(sender_hash(b"alice"), xxh3_64(b"alice"));
    }

    #[test]
    fn new_pending_done() {
        let mut w = DedupWindow::new(10, 1000);
        assert_eq!(w.check_and_insert(k(1), ALICE, 0), NEW);
        assert_eq!(w.check_and_insert(k(1), ALICE, 1), DUP_PENDING);
        assert!(w.mark_done(k(1)));
        assert_eq!(w.check_and_insert(k(1), ALICE, 2), DUP_DONE);
        assert!(!w.mark_done(k(2)));
        assert_eq!(w.len(), 1);
        w.check();
    }

    #[test]
    fn budget_evicts_oldest_done_of_one_sender() {
        let mut w = DedupWindow::new(3, u64::MAX);
        for i in 0..5 {
            assert_eq!(w.check_and_insert(k(i), ALICE, i as u64), NEW);
            w.mark_done(k(i));
        }
        assert_eq!(w.len(), 3);
        assert_eq!(w.get(k(0)), None);
        assert_eq!(w.get(k(1)), None);
        assert_eq!(w.get(k(4)), Some(DONE));
        assert_eq!(w.capacity_evictions(), 2);
        assert_eq!(w.oldest_ts_ms(), Some(2));
        assert_eq!(w.check_and_insert(k(0), ALICE, 10), NEW);
        assert_eq!(w.get(k(2)), None);
        w.check();
    }

    #[test]
    fn pending_entries_are_never_evicted() {
        // Budget 4; 10 in flight at once: all stay, the window runs over.
        let mut w = DedupWindow::new(4, 1000);
        for i in 0..10 {
            assert_eq!(w.check_and_insert(k(i), ALICE, 0), NEW);
        }
        assert_eq!(w.len(), 10);
        assert_eq!(w.capacity_evictions(), 0);
        // A flood of completed entries from another sender cannot touch them,
        // nor can age (the clock is far past max_age).
        for i in 0..100 {
            w.check_and_insert(kb(i), BOB, 5000 + i as u64);
            w.mark_done(kb(i));
        }
        for i in 0..10 {
            assert_eq!(
                w.check_and_insert(k(i), ALICE, 9000),
                DUP_PENDING,
                "entry {i}"
            );
        }
        assert_eq!(w.pending(), 10);
        w.check();
        // Completing them brings the window back within budget.
        for i in 0..10 {
            w.mark_done(k(i));
        }
        assert_eq!(w.len(), 4);
        w.check();
    }

    #[test]
    fn a_flooding_sender_evicts_only_its_own_entries() {
        let mut w = DedupWindow::new(100, u64::MAX);
        for i in 0..10 {
            w.check_and_insert(k(i), ALICE, i as u64);
            w.mark_done(k(i));
        }
        for i in 0..10_000 {
            assert_eq!(w.check_and_insert(kb(i), BOB, 100 + i as u64), NEW);
            w.mark_done(kb(i));
        }
        for i in 0..10 {
            assert_eq!(
                w.check_and_insert(k(i), ALICE, 20_000),
                DUP_DONE,
                "alice {i}"
            );
        }
        // Bob keeps the rest of the budget: his newest 90.
        assert_eq!(w.len(), 100);
        assert_eq!(w.get(kb(9_999)), Some(DONE));
        assert_eq!(w.get(kb(9_910)), Some(DONE));
        assert_eq!(w.get(kb(9_909)), None);
        assert_eq!(w.capacity_evictions(), 10_000 - 90);
        w.check();
    }

    #[test]
    fn a_flood_still_in_flight_does_not_evict_another_senders_entry() {
        // Bob's 400 SENDs arrive before any completes: over budget with only
        // Alice's entry completed, which must not be taken.
        let mut w = DedupWindow::new(50, u64::MAX);
        w.check_and_insert(k(1), ALICE, 0);
        w.mark_done(k(1));
        for i in 0..400 {
            assert_eq!(w.check_and_insert(kb(i), BOB, 1), NEW);
        }
        assert_eq!(w.get(k(1)), Some(DONE));
        assert_eq!(w.len(), 401);
        w.check();
        for i in 0..400 {
            w.mark_done(kb(i));
        }
        assert_eq!(w.get(k(1)), Some(DONE));
        assert_eq!(w.len(), 50);
        assert_eq!(w.get(kb(399)), Some(DONE));
        assert_eq!(w.get(kb(349)), None);
        w.check();
    }

    #[test]
    fn the_largest_sender_pays_and_the_inserter_on_a_tie() {
        let mut w = DedupWindow::new(4, u64::MAX);
        for i in 0..2 {
            w.check_and_insert(k(i), ALICE, 0);
            w.mark_done(k(i));
            w.check_and_insert(kb(i), BOB, 0);
            w.mark_done(kb(i));
        }
        // 2 + 2; Bob's fifth entry ties at the top: Bob pays.
        w.check_and_insert(kb(2), BOB, 1);
        assert_eq!(w.get(kb(0)), None);
        assert_eq!(w.get(k(0)), Some(DONE));
        w.mark_done(kb(2));
        // Alice (2) adds while Bob holds 2: tie, Alice pays.
        w.check_and_insert(k(2), ALICE, 2);
        assert_eq!(w.get(k(0)), None);
        assert_eq!(w.get(kb(1)), Some(DONE));
        w.check();
    }

    #[test]
    fn many_small_senders_keep_everything_while_one_floods() {
        // 50 senders with 2 entries each, one sender floods: the flooder
        // ends with the budget left over (1000 - 100).
        let mut w = DedupWindow::new(1000, u64::MAX);
        for s in 0..50u32 {
            for i in 0..2u32 {
                let key = dedup_key(s.to_string().as_bytes(), i.to_string().as_bytes()).unwrap();
                w.check_and_insert(key, 100 + s as u64, 0);
                w.mark_done(key);
            }
        }
        for i in 0..50_000 {
            w.check_and_insert(kb(i), BOB, 1);
            w.mark_done(kb(i));
        }
        for s in 0..50u32 {
            for i in 0..2u32 {
                let key = dedup_key(s.to_string().as_bytes(), i.to_string().as_bytes()).unwrap();
                assert_eq!(w.get(key), Some(DONE));
            }
        }
        assert_eq!(w.senders(), 51);
        assert_eq!(w.len(), 1000);
        w.check();
    }

    #[test]
    fn age_expires_done_entries() {
        let mut w = DedupWindow::new(100, 1000);
        w.check_and_insert(k(1), ALICE, 0);
        w.mark_done(k(1));
        w.check_and_insert(k(2), ALICE, 500);
        w.mark_done(k(2));
        assert_eq!(w.check_and_insert(k(1), ALICE, 1000), DUP_DONE);
        assert_eq!(w.check_and_insert(k(3), ALICE, 1001), NEW);
        assert_eq!(w.get(k(1)), None);
        assert_eq!(w.len(), 2);
        assert_eq!(w.oldest_ts_ms(), Some(500));
        assert_eq!(w.check_and_insert(k(1), ALICE, 1002), NEW);
        // Age is not a capacity eviction.
        assert_eq!(w.capacity_evictions(), 0);
        w.check();
    }

    #[test]
    fn an_out_of_order_old_entry_is_not_a_duplicate() {
        let mut w = DedupWindow::new(100, 1000);
        w.insert(k(1), DONE, 900, ALICE);
        w.insert(k(2), DONE, 100, ALICE); // older, behind a younger front
        assert_eq!(w.check_and_insert(k(2), ALICE, 1500), NEW);
        assert_eq!(w.check_and_insert(k(1), ALICE, 1500), DUP_DONE);
        w.check();
    }

    #[test]
    fn remove_and_reinsert() {
        let mut w = DedupWindow::new(2, u64::MAX);
        w.check_and_insert(k(1), ALICE, 0);
        assert!(w.remove(k(1)));
        assert!(!w.remove(k(1)));
        assert_eq!(w.len(), 0);
        assert_eq!(w.senders(), 0);
        assert_eq!(w.check_and_insert(k(1), ALICE, 1), NEW);
        assert_eq!(w.check_and_insert(k(1), ALICE, 2), DUP_PENDING);
        w.mark_done(k(1));
        assert!(w.remove(k(1)));
        assert!(w.is_empty());
        w.check();
    }

    #[test]
    fn insert_for_reload_and_load_records() {
        let mut w = DedupWindow::new(2, 1000);
        w.insert(k(1), DONE, 100, ALICE);
        w.insert(k(2), PENDING, 100, ALICE);
        assert_eq!(w.check_and_insert(k(1), ALICE, 200), DUP_DONE);
        assert_eq!(w.check_and_insert(k(2), ALICE, 200), DUP_PENDING);
        w.insert(k(3), DONE, 150, ALICE);
        assert_eq!(w.len(), 2);
        assert_eq!(w.get(k(1)), None);
        // Overwrite keeps one live entry.
        w.insert(k(3), DONE, 160, ALICE);
        assert_eq!(w.len(), 2);
        w.check();

        let mut buf = Vec::new();
        for (ts, key, s) in [
            (10u64, k(1), ALICE),
            (2000, k(2), ALICE),
            (2500, kb(1), BOB),
        ] {
            buf.extend_from_slice(&ts.to_be_bytes());
            buf.extend_from_slice(&key.to_be_bytes());
            buf.extend_from_slice(&s.to_be_bytes());
        }
        let mut w = DedupWindow::new(10, 1000);
        assert_eq!(w.load(&buf, 2600), Some(2));
        assert_eq!(w.get(k(1)), None);
        assert_eq!(w.get(k(2)), Some(DONE));
        assert_eq!(w.senders(), 2);
        assert_eq!(w.load(&buf[..31], 2600), None);
        w.check();
    }

    #[test]
    fn structures_stay_bounded_under_churn() {
        let mut w = DedupWindow::new(4, u64::MAX);
        for i in 0..10_000u64 {
            w.check_and_insert(k(1), ALICE, i);
            w.remove(k(1));
        }
        assert!(w.is_empty());
        assert!(w.nodes.len() <= 1);
        for i in 0..10_000u32 {
            w.check_and_insert(k(i), ALICE, 0);
            w.mark_done(k(i));
        }
        assert_eq!(w.len(), 4);
        assert!(w.nodes.len() <= 5);
        assert!(w.index.slots.len() <= 16);
        w.check();
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8, u8),
        Done(u8, u8),
        Remove(u8, u8),
        Tick,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..6, 0u8..40).prop_map(|(s, m)| Op::Insert(s, m)),
            3 => (0u8..6, 0u8..40).prop_map(|(s, m)| Op::Done(s, m)),
            1 => (0u8..6, 0u8..40).prop_map(|(s, m)| Op::Remove(s, m)),
            1 => Just(Op::Tick),
        ]
    }

    proptest! {
        /// Random operations keep every structure consistent, never lose a
        /// PENDING entry and never leave the window over budget while its
        /// largest sender holds a completed entry.
        #[test]
        fn random_ops_keep_the_invariants(ops in proptest::collection::vec(op(), 1..400)) {
            let mut w = DedupWindow::new(24, 50);
            let mut now = 0u64;
            let key = |s: u8, m: u8| dedup_key(&[s], &[m]).unwrap();
            for op in ops {
                let pending_before: Vec<u128> = (0..6u8)
                    .flat_map(|s| (0..40u8).map(move |m| (s, m)))
                    .map(|(s, m)| key(s, m))
                    .filter(|&x| w.get(x) == Some(PENDING))
                    .collect();
                // The entry this op completes or removes leaves the PENDING set.
                let mut left = None;
                match op {
                    Op::Insert(s, m) => {
                        w.check_and_insert(key(s, m), s as u64, now);
                    }
                    Op::Done(s, m) => {
                        w.mark_done(key(s, m));
                        left = Some(key(s, m));
                    }
                    Op::Remove(s, m) => {
                        w.remove(key(s, m));
                        left = Some(key(s, m));
                    }
                    Op::Tick => now += 7,
                }
                for p in pending_before {
                    if Some(p) != left {
                        prop_assert_eq!(w.get(p), Some(PENDING), "a pending entry was evicted");
                    }
                }
                w.check();
            }
        }
    }
}
