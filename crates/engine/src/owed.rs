//! The versions a shard owes the origin, by epoch: a queue of (epoch,
//! slot) in epoch order, appended on publish and never edited in place.
//! A version that stops being owed (cleaned, or superseded in its own
//! epoch) leaves a stale entry that readers skip and drop, judged by the
//! index (`valid`). The write path then pays one append to memory it just
//! touched; an ordered set cost a cache miss per tree level, and linked
//! lists one per neighbour. Stale entries are compacted away once they
//! outnumber the live ones three to one (each check a cache miss, so
//! rarely), so the queue stays within a small multiple of the dirty set.

use std::collections::VecDeque;

#[derive(Default)]
pub struct Owed {
    queue: VecDeque<(u64, u32)>,
}

/// Entries kept before a compaction is considered, whatever the live count.
const SLACK: usize = 1024;

impl Owed {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Add slot `s`, owed in `epoch`. `live` is how many versions are owed
    /// now: when stale entries outnumber them, those for which `valid`
    /// fails are dropped first.
    pub fn push(&mut self, epoch: u64, s: u32, live: usize, valid: impl Fn(u64, u32) -> bool) {
        if self.queue.len() > 4 * live + SLACK {
            self.queue.retain(|&(e, s)| valid(e, s));
        }
        // Commits of an epoch may publish just after the next epoch's
        // first ones: walk back over those few.
        let mut at = self.queue.len();
        while at > 0 && self.queue[at - 1].0 > epoch {
            at -= 1;
        }
        self.queue.insert(at, (epoch, s));
        debug_assert!(at == 0 || self.queue[at - 1].0 <= epoch);
    }

    /// The oldest epoch with an owed version (stale entries ahead of it are
    /// dropped).
    pub fn first_epoch(&mut self, valid: impl Fn(u64, u32) -> bool) -> Option<u64> {
        while let Some(&(e, s)) = self.queue.front() {
            if valid(e, s) {
                return Some(e);
            }
            self.queue.pop_front();
        }
        None
    }

    /// Up to `max` owed slots of `epoch` (of every epoch, oldest first,
    /// with `None`) for which `take` holds, in the order they were owed. A
    /// slot may appear twice if it was owed twice in one epoch.
    pub fn slots(
        &self,
        epoch: Option<u64>,
        max: usize,
        take: impl Fn(u64, u32) -> bool,
    ) -> Vec<u32> {
        self.queue
            .iter()
            .take_while(|&&(e, _)| epoch.is_none_or(|x| e <= x))
            .filter(|&&(e, s)| epoch.is_none_or(|x| e == x) && take(e, s))
            .map(|&(_, s)| s)
            .take(max)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashSet;

    #[test]
    fn owed_slots_by_epoch_skipping_stale_ones() {
        let live: RefCell<HashSet<(u64, u32)>> = RefCell::default();
        let valid = |e: u64, s: u32| live.borrow().contains(&(e, s));
        let mut o = Owed::default();
        for (e, s) in [(2, 5), (2, 1), (1, 9), (3, 0), (2, 7)] {
            live.borrow_mut().insert((e, s));
            o.push(e, s, live.borrow().len(), valid);
        }
        assert_eq!(o.first_epoch(valid), Some(1));
        assert_eq!(o.slots(Some(2), 10, valid), [5, 1, 7]);
        assert_eq!(o.slots(None, 10, valid), [9, 5, 1, 7, 0]);
        assert_eq!(o.slots(None, 2, valid), [9, 5]);
        live.borrow_mut().remove(&(2, 1));
        live.borrow_mut().remove(&(1, 9));
        assert_eq!(o.slots(Some(2), 10, valid), [5, 7]);
        assert_eq!(o.first_epoch(valid), Some(2));
        assert_eq!(o.len(), 4, "the stale head went");
        live.borrow_mut().clear();
        assert_eq!(o.first_epoch(valid), None);
    }

    #[test]
    fn stale_entries_are_compacted() {
        let mut o = Owed::default();
        // Each slot owed once and superseded at once: only the newest is live.
        for i in 0..100_000u32 {
            o.push(1, i, 1, |_, s| s + 1 == i);
        }
        assert!(o.len() <= 4 + SLACK + 1, "{} entries kept", o.len());
    }
}
