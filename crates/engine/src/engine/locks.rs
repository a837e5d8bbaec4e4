//! Block locks: one writer per block, and origin readers and writers
//! that exclude each other, all kept in the shards' indexes.

use super::*;

impl Engine {
    /// Take the writer lock of every block in `[b0, b1]`, waiting as needed.
    /// When the range lies in one shard, that shard stays locked for the
    /// caller (so the request's slots come in the same critical section).
    pub(super) fn lock_writers(&self, b0: u64, b1: u64) -> Option<MutexGuard<'_, ShardIndex>> {
        let ids = self.shards_of(b0, b1);
        // The publish looks these buckets up after the fence; start the
        // (likely cold) loads now, before the locks.
        for b in b0..=b1.min(b0 + 3) {
            self.shards[self.shard_of(b)].prefetch_bucket(b);
        }
        let mut held = None;
        for &sh in &ids {
            let shard = &self.shards[sh];
            let mut ix = shard.ix.lock();
            loop {
                let busy = (b0..=b1).any(|b| self.shard_of(b) == sh && ix.lock_state(b).writer);
                if !busy {
                    break;
                }
                shard.cv.wait_for(&mut ix, Duration::from_millis(10));
            }
            for b in (b0..=b1).filter(|&b| self.shard_of(b) == sh) {
                ix.update_lock(b, |l| l.writer = true);
            }
            if ids.len() == 1 {
                held = Some(ix);
            }
        }
        held
    }

    pub(super) fn unlock_writers(&self, b0: u64, b1: u64) {
        for sh in self.shards_of(b0, b1) {
            let mut ix = self.shards[sh].ix.lock();
            for b in (b0..=b1).filter(|&b| self.shard_of(b) == sh) {
                ix.update_lock(b, |l| l.writer = false);
            }
            drop(ix);
            self.shards[sh].cv.notify_all();
        }
    }

    /// Take the origin-writer lock of every block (no origin reader or other
    /// origin writer), all at once so that no two requests can deadlock.
    pub(crate) fn lock_origin_writers(&self, b0: u64, b1: u64) {
        let ids = self.shards_of(b0, b1);
        loop {
            let mut g = self.lock_all(&ids);
            let blocked = (b0..=b1).find(|&b| {
                let l = g[Self::guard_pos(&ids, self.shard_of(b))].lock_state(b);
                l.origin_writer || l.origin_readers > 0
            });
            match blocked {
                None => {
                    for b in b0..=b1 {
                        g[Self::guard_pos(&ids, self.shard_of(b))]
                            .update_lock(b, |l| l.origin_writer = true);
                    }
                    return;
                }
                Some(b) => {
                    let pos = Self::guard_pos(&ids, self.shard_of(b));
                    let mut mine = g.swap_remove(pos);
                    drop(g);
                    self.shards[self.shard_of(b)]
                        .cv
                        .wait_for(&mut mine, Duration::from_millis(5));
                }
            }
        }
    }

    /// [`lock_origin_writers`](Self::lock_origin_writers) without waiting:
    /// false, with nothing taken, if a block is busy.
    pub(super) fn try_lock_origin_writers(&self, b0: u64, b1: u64) -> bool {
        let ids = self.shards_of(b0, b1);
        let mut g = self.lock_all(&ids);
        let busy = (b0..=b1).any(|b| {
            let l = g[Self::guard_pos(&ids, self.shard_of(b))].lock_state(b);
            l.origin_writer || l.origin_readers > 0
        });
        if !busy {
            for b in b0..=b1 {
                g[Self::guard_pos(&ids, self.shard_of(b))]
                    .update_lock(b, |l| l.origin_writer = true);
            }
        }
        !busy
    }

    pub(crate) fn unlock_origin_writers(&self, blocks: impl Iterator<Item = u64>) {
        for b in blocks {
            let sh = self.shard_of(b);
            self.shards[sh]
                .ix
                .lock()
                .update_lock(b, |l| l.origin_writer = false);
            self.shards[sh].cv.notify_all();
        }
    }
}
