//! Replacement policy: which clean slot to give up when a shard needs room.
//!
//! Only clean, published slots are known to the policy; dirty slots are not
//! evictable until writeback cleans them, so keeping them out of the list
//! keeps victim selection O(1). Slot numbers are shard-local.
//!
//! A hit does not call the policy at all: the index sets a reference bit in
//! the slot's key word, which the lookup has just loaded. The policy sees
//! the bit when it looks for victims (see [`Verdict::Spare`]), so hits cost
//! no list relinking and no extra cache misses.

/// What the caller says of an eviction candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Evict it.
    Take,
    /// Not now (pinned, being written back, ...).
    Skip,
    /// It was used since it was last considered: give it another round.
    Spare,
}

/// A replacement policy for one shard.
pub trait Policy: Send {
    /// `slot` became clean and evictable (most recently used).
    fn insert(&mut self, slot: u32);
    /// `slot` is no longer evictable (dirtied, invalidated or evicted).
    fn remove(&mut self, slot: u32);
    /// Up to `max` eviction candidates, least valuable first, as judged by
    /// `judge`. The caller removes the ones it takes.
    fn victims(&mut self, max: usize, judge: &mut dyn FnMut(u32) -> Verdict) -> Vec<u32>;
    /// Number of evictable slots.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const NIL: u32 = u32::MAX;

/// LRU with second chance (CLOCK order kept as a list): an intrusive doubly
/// linked list, 8 bytes per slot. Slots enter at the most recently used
/// end; a referenced slot reaching the old end moves back to the front.
pub struct Lru {
    prev: Vec<u32>,
    next: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
    len: usize,
}

impl Lru {
    pub fn new(slots: u32) -> Self {
        Lru {
            prev: vec![NIL; slots as usize],
            next: vec![NIL; slots as usize],
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    fn linked(&self, s: u32) -> bool {
        self.prev[s as usize] != NIL || self.head == s
    }

    fn unlink(&mut self, s: u32) {
        let (p, n) = (self.prev[s as usize], self.next[s as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[s as usize] = NIL;
        self.next[s as usize] = NIL;
        self.len -= 1;
    }

    fn push_front(&mut self, s: u32) {
        self.prev[s as usize] = NIL;
        self.next[s as usize] = self.head;
        if self.head != NIL {
            self.prev[self.head as usize] = s;
        } else {
            self.tail = s;
        }
        self.head = s;
        self.len += 1;
    }
}

impl Policy for Lru {
    fn insert(&mut self, slot: u32) {
        if self.linked(slot) {
            self.unlink(slot);
        }
        self.push_front(slot);
    }

    fn remove(&mut self, slot: u32) {
        if self.linked(slot) {
            self.unlink(slot);
        }
    }

    fn victims(&mut self, max: usize, judge: &mut dyn FnMut(u32) -> Verdict) -> Vec<u32> {
        let mut out = Vec::new();
        let mut s = self.tail;
        // Bound the walk so a list full of pinned slots cannot stall a writer.
        let mut budget = max.saturating_mul(4).max(64);
        while s != NIL && out.len() < max && budget > 0 {
            let older = self.prev[s as usize];
            match judge(s) {
                Verdict::Take => out.push(s),
                Verdict::Skip => {}
                Verdict::Spare => {
                    self.unlink(s);
                    self.push_front(s);
                }
            }
            s = older;
            budget -= 1;
        }
        out
    }

    fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_order_with_second_chance() {
        let mut l = Lru::new(8);
        for s in 0..5 {
            l.insert(s);
        }
        assert_eq!(l.victims(3, &mut |_| Verdict::Take), vec![0, 1, 2]);
        // Slot 0 was referenced: it moves to the front and 1 goes first.
        let mut referenced = [true, false, false, false, false];
        let v = l.victims(2, &mut |s| {
            if std::mem::take(&mut referenced[s as usize]) {
                Verdict::Spare
            } else {
                Verdict::Take
            }
        });
        assert_eq!(v, vec![1, 2]);
        assert_eq!(l.victims(5, &mut |_| Verdict::Take), vec![1, 2, 3, 4, 0]);
        l.remove(2);
        assert_eq!(l.victims(3, &mut |_| Verdict::Take), vec![1, 3, 4]);
        assert_eq!(
            l.victims(2, &mut |s| if s == 1 {
                Verdict::Skip
            } else {
                Verdict::Take
            }),
            vec![3, 4]
        );
        assert_eq!(l.len(), 4);
        l.remove(2);
        assert_eq!(l.len(), 4, "removing an unlinked slot is a no-op");
        for s in [1, 3, 4, 0] {
            l.remove(s);
        }
        assert!(l.is_empty());
        assert!(l.victims(1, &mut |_| Verdict::Take).is_empty());
    }
}
