//! The DRAM index of one shard: origin block → slot, slot state, the free
//! list, the replacement policy and per-block I/O locks.
//!
//! Memory per slot: key word and epoch 16 B, hash chain 4 B, bucket 4 B
//! (load factor one), LRU links 8 B: 32 B; and 16 B per entry of the owed
//! queue (at most a few per version owed to the origin). The free list threads through the chain array,
//! since a free slot is in no bucket chain.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::owed::Owed;
use crate::policy::{Lru, Policy, Verdict};

pub const NIL: u32 = u32::MAX;

/// Key word layout: block number in the low 48 bits, flags and pins above.
pub const BLOCK_MASK: u64 = (1 << 48) - 1;
pub const K_VALID: u64 = 1 << 48;
pub const K_DIRTY: u64 = 1 << 49;
pub const K_ZERO: u64 = 1 << 50;
/// A writeback of this slot is in flight.
pub const K_WB: u64 = 1 << 51;
/// Writethrough already wrote this version to the origin; writeback only
/// needs an origin flush before marking it clean.
pub const K_ON_ORIGIN: u64 = 1 << 52;
/// Read since the policy last considered it (second chance).
pub const K_REF: u64 = 1 << 53;
/// A dirty version overwritten in a later epoch, kept out of the index
/// until its own epoch is written back (format rule 5).
pub const K_RETAINED: u64 = 1 << 54;
/// Loaded by recovery and not yet checked against its entry's data hash
/// (a new incarnation of the slot drops the mark: `insert` sets the key).
pub const K_UNVERIFIED: u64 = 1 << 55;
const PIN_SHIFT: u32 = 56;
const PIN_ONE: u64 = 1 << PIN_SHIFT;
/// Readers pinning a slot, from its key word.
pub fn key_pins(k: u64) -> u64 {
    k >> PIN_SHIFT
}
pub const MAX_PINS: u64 = (1 << (64 - PIN_SHIFT)) - 1;

/// A slot's key word and the epoch of its incarnation, side by side: the
/// write path reads the one and writes the other, and apart they cost a
/// cache miss each.
#[derive(Debug, Default, Clone, Copy)]
#[repr(C, align(16))]
struct SlotWord {
    key: u64,
    epoch: u64,
}

/// Per-block coordination for requests in flight (only blocks with activity
/// have an entry, so this costs nothing per cached block).
#[derive(Debug, Default, Clone, Copy)]
pub struct BlockLock {
    /// A write request owns the block (serializes writers and seq order).
    pub writer: bool,
    /// Requests reading this block from the origin.
    pub origin_readers: u32,
    /// Someone is writing this block to the origin.
    pub origin_writer: bool,
}

impl BlockLock {
    fn idle(&self) -> bool {
        !self.writer && self.origin_readers == 0 && !self.origin_writer
    }
}

/// Block numbers are already well spread; SipHash would cost more than the
/// lock it guards.
#[derive(Default)]
pub struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
}

pub type BlockMap<V> = HashMap<u64, V, BuildHasherDefault<BlockHasher>>;

/// Where a slot leaving the index stands on its way to the free list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RState {
    /// Its entry stays live in media until the watermark covers its seq
    /// (format rule 2).
    Live,
    /// S covers it: the next reclaim stores FREE.
    Covered,
    /// FREE is durable; the slot waits only for its readers.
    Durable,
}

/// A slot that left the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retired {
    pub slot: u32,
    pub seq: u64,
    pub state: RState,
    /// `seq` is the version's own (not that of the write that superseded
    /// it): of two versions of a block retired under the same seq, this
    /// one is the newer.
    pub own: bool,
}

impl Retired {
    /// Orders a block's retired versions oldest first (format rule 7).
    pub fn age(&self) -> (u64, bool) {
        (self.seq, self.own)
    }
}

pub struct ShardIndex {
    /// Global number of local slot 0.
    pub first_slot: u64,
    keys: Vec<SlotWord>,
    chain: Vec<u32>,
    buckets: Vec<u32>,
    pub policy: Box<dyn Policy>,
    free_head: u32,
    pub free_len: u32,
    /// Superseded or dropped slots on their way to the free list.
    pub retiring: Vec<Retired>,
    /// A reclaim batch is between its FREE stores and its fence.
    pub reclaiming: bool,
    /// The durable S when a reclaim batch was last prepared: retired slots
    /// wait for S, so an early reclaim is pointless until S has moved.
    pub reclaim_durable: u64,
    pub locks: BlockMap<BlockLock>,
    pub dirty: u32,
    pub valid: u32,
    /// Retained versions (counted apart from `dirty` and `valid`).
    pub retained: u32,
    /// Versions writeback still owes the origin, current or retained, by
    /// epoch.
    pub owed: Owed,
    /// Slots whose data failed its check (K_UNVERIFIED stays on them),
    /// counted and logged once each.
    pub damaged: std::collections::HashSet<u32>,
}

fn mix(block: u64) -> u64 {
    let mut x = block.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x
}

/// Whether slot `s` owes the origin the version it holds from `epoch`: a
/// dirty current version or a retained one, of that epoch (a stale entry
/// of the owed queue fails this).
fn owed(keys: &[SlotWord], epoch: u64, s: u32) -> bool {
    let k = keys[s as usize].key;
    (k & (K_VALID | K_DIRTY) == K_VALID | K_DIRTY || k & K_RETAINED != 0)
        && keys[s as usize].epoch == epoch
}

/// The bucket of `block` among `n`.
pub fn bucket_index(block: u64, n: usize) -> usize {
    (((mix(block) >> 32) * n as u64) >> 32) as usize
}

impl ShardIndex {
    pub fn new(first_slot: u64, nslots: u32) -> Self {
        let n = nslots as usize;
        ShardIndex {
            first_slot,
            keys: vec![SlotWord::default(); n],
            chain: vec![NIL; n],
            buckets: vec![NIL; n.max(1)],
            policy: Box::new(Lru::new(nslots)),
            free_head: NIL,
            free_len: 0,
            retiring: Vec::new(),
            reclaiming: false,
            reclaim_durable: 0,
            locks: BlockMap::default(),
            dirty: 0,
            valid: 0,
            retained: 0,
            owed: Owed::default(),
            damaged: Default::default(),
        }
    }

    pub fn nslots(&self) -> u32 {
        self.keys.len() as u32
    }

    fn bucket(&self, block: u64) -> usize {
        bucket_index(block, self.buckets.len())
    }

    /// Address of bucket 0 and the bucket count, so that a request can
    /// prefetch its bucket before it takes the lock (the bucket array never
    /// moves after construction).
    pub fn buckets_base(&self) -> (usize, usize) {
        (self.buckets.as_ptr() as usize, self.buckets.len())
    }

    pub fn key(&self, s: u32) -> u64 {
        self.keys[s as usize].key
    }

    pub fn set_flags(&mut self, s: u32, flags: u64) {
        self.keys[s as usize].key |= flags;
    }

    pub fn clear_flags(&mut self, s: u32, flags: u64) {
        self.keys[s as usize].key &= !flags;
    }

    pub fn lookup(&self, block: u64) -> Option<u32> {
        let mut s = self.buckets[self.bucket(block)];
        while s != NIL {
            let k = self.keys[s as usize].key;
            if k & K_VALID != 0 && k & BLOCK_MASK == block {
                return Some(s);
            }
            s = self.chain[s as usize];
        }
        None
    }

    pub fn epoch(&self, s: u32) -> u64 {
        self.keys[s as usize].epoch
    }

    /// Publish `s`, written in `epoch`, as the current slot of `block`; a
    /// dirty one joins the versions writeback owes the origin.
    pub fn insert_version(&mut self, s: u32, block: u64, flags: u64, epoch: u64) {
        self.keys[s as usize].epoch = epoch;
        self.insert(s, block, flags);
        if flags & K_DIRTY != 0 {
            let live = (self.dirty + self.retained) as usize;
            let keys = &self.keys;
            self.owed.push(epoch, s, live, |e, s| owed(keys, e, s));
        }
    }

    /// Keep an unpublished dirty version (just `remove`d, `zero` as it
    /// was) for writeback.
    pub fn retain(&mut self, s: u32, zero: bool) {
        debug_assert!(
            self.keys[s as usize].key & K_DIRTY == 0,
            "removed from the index"
        );
        debug_assert!(self.keys[s as usize].key & K_VALID == 0);
        self.keys[s as usize].key |= K_RETAINED | if zero { K_ZERO } else { 0 };
        self.retained += 1;
    }

    /// A retained version that writeback no longer needs.
    pub fn release_retained(&mut self, s: u32) {
        debug_assert!(self.keys[s as usize].key & K_RETAINED != 0);
        self.keys[s as usize].key &= !(K_RETAINED | K_ZERO);
        self.retained -= 1;
    }

    /// Publish `s` as the current slot of `block`. The caller has removed
    /// any previous slot of the block.
    fn insert(&mut self, s: u32, block: u64, flags: u64) {
        debug_assert!(self.lookup(block).is_none());
        let b = self.bucket(block);
        let pins = self.keys[s as usize].key & !(PIN_ONE - 1);
        self.keys[s as usize].key = block | K_VALID | flags | pins;
        self.chain[s as usize] = self.buckets[b];
        self.buckets[b] = s;
        self.valid += 1;
        if flags & K_DIRTY != 0 {
            self.dirty += 1;
        }
    }

    /// Unpublish `s` (it stays pinned if it was). A dirty one is no longer
    /// owed to the origin unless the caller retains it.
    pub fn remove(&mut self, s: u32) {
        let k = self.keys[s as usize].key;
        debug_assert!(k & K_VALID != 0);
        let b = self.bucket(k & BLOCK_MASK);
        let next = self.chain[s as usize];
        if self.buckets[b] == s {
            self.buckets[b] = next;
        } else {
            let mut p = self.buckets[b];
            while self.chain[p as usize] != s {
                p = self.chain[p as usize];
            }
            self.chain[p as usize] = next;
        }
        self.chain[s as usize] = NIL;
        if k & K_DIRTY != 0 {
            self.dirty -= 1;
        }
        self.valid -= 1;
        self.keys[s as usize].key &= !(K_VALID | K_DIRTY | K_ZERO | K_ON_ORIGIN | K_REF);
        // Only clean slots are in the policy; skipping dirty ones spares a
        // cold line of its links on every overwrite of a dirty block.
        if k & K_DIRTY == 0 {
            self.policy.remove(s);
        }
    }

    /// The oldest epoch with a version owed to the origin.
    pub fn first_owed_epoch(&mut self) -> Option<u64> {
        let keys = &self.keys;
        self.owed.first_epoch(|e, s| owed(keys, e, s))
    }

    /// Up to `max` owed versions of `epoch` (any, oldest first, with
    /// `None`) that no writeback has taken yet.
    pub fn owed_slots(&self, epoch: Option<u64>, max: usize) -> Vec<u32> {
        self.owed.slots(epoch, max, |e, s| {
            owed(&self.keys, e, s) && self.keys[s as usize].key & K_WB == 0
        })
    }

    pub fn mark_clean(&mut self, s: u32) {
        if self.keys[s as usize].key & K_DIRTY != 0 {
            self.keys[s as usize].key &= !K_DIRTY;
            self.dirty -= 1;
            self.policy.insert(s);
        }
    }

    /// A read hit: one bit in the key word the lookup just loaded.
    pub fn touch(&mut self, s: u32) {
        self.keys[s as usize].key |= K_REF;
    }

    /// Up to `max` clean slots to evict, for which `usable(slot, key)` holds;
    /// referenced ones get a second chance instead.
    pub fn pick_victims(&mut self, max: usize, usable: impl Fn(u32, u64) -> bool) -> Vec<u32> {
        let keys = &mut self.keys;
        self.policy.victims(max, &mut |s| {
            let k = keys[s as usize].key;
            if !usable(s, k) {
                Verdict::Skip
            } else if k & K_REF != 0 {
                keys[s as usize].key &= !K_REF;
                Verdict::Spare
            } else {
                Verdict::Take
            }
        })
    }

    pub fn pins(&self, s: u32) -> u64 {
        key_pins(self.keys[s as usize].key)
    }

    /// False when the pin counter is saturated; the caller waits and retries.
    pub fn pin(&mut self, s: u32) -> bool {
        if self.pins(s) == MAX_PINS {
            return false;
        }
        self.keys[s as usize].key += PIN_ONE;
        true
    }

    pub fn unpin(&mut self, s: u32) {
        debug_assert!(self.pins(s) > 0);
        self.keys[s as usize].key -= PIN_ONE;
    }

    pub fn push_free(&mut self, s: u32) {
        debug_assert!(self.keys[s as usize].key & K_VALID == 0);
        self.chain[s as usize] = self.free_head;
        self.free_head = s;
        self.free_len += 1;
    }

    pub fn pop_free(&mut self) -> Option<u32> {
        let s = self.free_head;
        if s == NIL {
            return None;
        }
        self.free_head = self.chain[s as usize];
        self.chain[s as usize] = NIL;
        self.free_len -= 1;
        Some(s)
    }

    pub fn lock_state(&self, block: u64) -> BlockLock {
        self.locks.get(&block).copied().unwrap_or_default()
    }

    pub fn update_lock(&mut self, block: u64, f: impl FnOnce(&mut BlockLock)) {
        let e = self.locks.entry(block).or_default();
        f(e);
        if e.idle() {
            self.locks.remove(&block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_insert_lookup_remove_free() {
        let mut ix = ShardIndex::new(0, 16);
        for s in 0..16 {
            ix.push_free(s);
        }
        let mut used = Vec::new();
        for b in 0..10u64 {
            let s = ix.pop_free().unwrap();
            ix.insert_version(s, b * 1000, if b % 2 == 0 { K_DIRTY } else { 0 }, 1);
            used.push((b * 1000, s));
        }
        assert_eq!(ix.free_len, 6);
        assert_eq!(ix.dirty, 5);
        for &(b, s) in &used {
            assert_eq!(ix.lookup(b), Some(s));
        }
        assert_eq!(ix.lookup(1), None);
        let (b, s) = used[4];
        assert!(ix.pin(s));
        ix.remove(s);
        assert_eq!(ix.lookup(b), None);
        assert_eq!(ix.pins(s), 1, "pins survive unpublishing");
        ix.unpin(s);
        assert_eq!(ix.dirty, 4);
        for &(b, s) in used.iter().filter(|(b2, _)| *b2 != b) {
            assert_eq!(ix.lookup(b), Some(s));
        }
        ix.mark_clean(used[0].1);
        assert_eq!(ix.dirty, 3);
        assert_eq!(ix.policy.len(), 1);
    }

    #[test]
    fn block_locks_vanish_when_idle() {
        let mut ix = ShardIndex::new(0, 4);
        ix.update_lock(7, |l| l.writer = true);
        assert!(ix.lock_state(7).writer);
        ix.update_lock(7, |l| l.writer = false);
        assert!(ix.locks.is_empty());
    }
}
