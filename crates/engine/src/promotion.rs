//! Which read misses enter the cache once it is nearly full.
//!
//! Where the fence is a system call (msync mode), promoting a missed block
//! costs a disk write and a share of a device flush; a cache on the same
//! disk as its origin then made uniformly random cold reads three times
//! slower than the origin alone. Open CAS's "nhit" promotion policy and
//! dm-cache's SMQ hotspot queue answer this the same way: while the cache has
//! room every miss is promoted, and once it is nearly full a block must
//! miss twice (within a window) before it takes a slot from something that
//! was used. A one-time scan or random sweep then passes through.
//!
//! The window is a direct-mapped table of recently missed block numbers,
//! lock-free: two blocks that share a cell push each other out, which only
//! delays a promotion.

use std::sync::atomic::{AtomicU64, Ordering};

/// Free share of a shard (percent) at or above which every miss is
/// promoted (Open CAS nhit's default trigger is 80% occupancy).
const ROOM_PERCENT: u64 = 20;

/// Cells per cache slot: the window remembers misses of about as many
/// blocks as the cache holds, up to [`MAX_CELLS`].
const CELLS_PER_SLOT: u64 = 1;

/// At most 8 MiB of window, whatever the cache size: the index and policy
/// cost 24 bytes per block, and this must not add a third to that.
const MAX_CELLS: u64 = 1 << 20;

/// A cell that holds no block (block numbers are far below it).
const EMPTY: u64 = u64::MAX;

pub(crate) struct Promotion {
    seen: Box<[AtomicU64]>,
}

impl Promotion {
    /// A window for a cache of `slots` blocks; none at all (every miss is
    /// admitted) where promotions are cheap (`filter` false).
    pub(crate) fn new(slots: u64, filter: bool) -> Promotion {
        let n = if filter {
            (slots * CELLS_PER_SLOT)
                .clamp(1024, MAX_CELLS)
                .next_power_of_two()
        } else {
            0
        };
        Promotion {
            seen: (0..n).map(|_| AtomicU64::new(EMPTY)).collect(),
        }
    }

    /// Whether misses are filtered at all (false: every one is admitted).
    pub(crate) fn filters(&self) -> bool {
        !self.seen.is_empty()
    }

    /// Whether a missed `block` should take a slot, given the free and
    /// total slots of its shard.
    pub(crate) fn admit(&self, block: u64, free: u64, slots: u64) -> bool {
        debug_assert!(block != EMPTY && free <= slots);
        if self.seen.is_empty() || free * 100 >= slots * ROOM_PERCENT {
            return true;
        }
        let cell = &self.seen[self.cell(block)];
        if cell.load(Ordering::Relaxed) == block {
            cell.store(EMPTY, Ordering::Relaxed);
            return true;
        }
        cell.store(block, Ordering::Relaxed);
        false
    }

    /// Forget the misses of `blocks` that [`admit`](Self::admit) recorded,
    /// where the read that missed them was not done after all and will
    /// miss them again: a try and its retry are one miss, not two.
    pub(crate) fn unsee(&self, blocks: &[u64]) {
        if self.seen.is_empty() {
            return;
        }
        for &b in blocks {
            let _ = self.seen[self.cell(b)].compare_exchange(
                b,
                EMPTY,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn cell(&self, block: u64) -> usize {
        // Fibonacci hashing: neighbouring blocks land in different cells.
        let h = block.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> (64 - self.seen.len().trailing_zeros())) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_room_every_miss_is_promoted() {
        let p = Promotion::new(1000, true);
        assert!(p.admit(7, 200, 1000));
        assert!(p.admit(7, 1000, 1000));
    }

    #[test]
    fn nearly_full_a_block_must_miss_twice() {
        let p = Promotion::new(1000, true);
        assert!(!p.admit(7, 10, 1000), "first miss passes through");
        assert!(p.admit(7, 10, 1000), "second miss is promoted");
        assert!(!p.admit(7, 10, 1000), "the window forgets a promoted block");
    }

    #[test]
    fn a_try_that_is_retried_is_one_miss() {
        let p = Promotion::new(1000, true);
        assert!(!p.admit(7, 10, 1000), "the try's miss");
        p.unsee(&[7]);
        assert!(!p.admit(7, 10, 1000), "the retry is still a first miss");
        assert!(p.admit(7, 10, 1000), "a second read's miss is promoted");
        assert!(!p.admit(8, 10, 1000));
        p.unsee(&[9]);
        assert!(p.admit(8, 10, 1000), "another block's record is kept");
    }

    #[test]
    fn without_a_filter_every_miss_is_promoted() {
        let p = Promotion::new(1 << 30, false);
        assert!(!p.filters(), "no window is allocated");
        assert!(p.admit(7, 0, 1000));
    }

    #[test]
    fn the_window_is_bounded() {
        assert_eq!(Promotion::new(1 << 30, true).seen.len() as u64, MAX_CELLS);
    }

    #[test]
    fn a_sweep_promotes_nothing() {
        let p = Promotion::new(4096, true);
        let promoted = (0..100_000u64).filter(|&b| p.admit(b, 0, 4096)).count();
        assert_eq!(promoted, 0);
    }
}
