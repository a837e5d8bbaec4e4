//! Slot allocation and reclaim: free lists, retiring slots whose FREE
//! waits for the watermark (format rule 2), eviction of clean blocks.

use super::*;

impl Engine {
    /// Retire a slot that left the index. Its FREE store waits until the
    /// watermark covers its seq, so a multi-block transaction stays whole in
    /// media while recovery might still need to verify it (format rule 2).
    /// The reclaim that frees the slot makes the store.
    /// `own`: `seq` is the version's own seq (see [`Retired::own`]).
    pub(crate) fn retire(&self, ix: &mut ShardIndex, s: u32, seq: u64, own: bool) {
        debug_assert!(
            ix.key(s) & K_VALID == 0,
            "a retired slot has left the index"
        );
        let state = if seq <= self.seq.durable() {
            RState::Covered
        } else {
            RState::Live
        };
        ix.retiring.push(Retired {
            slot: s,
            seq,
            state,
            own,
        });
    }

    /// Prepare a reclaim batch of up to `victims` free slots: the retiring
    /// slots the watermark now allows, then clean LRU slots for the rest.
    /// Returns the slots whose FREE [`flush_reclaim`](Self::flush_reclaim)
    /// stores before the fence and, per slot, whether it may be freed after
    /// the fence.
    pub(super) fn prepare_reclaim(&self, ix: &mut ShardIndex, victims: usize) -> Batch {
        let first = ix.first_slot;
        let durable = self.seq.durable();
        ix.reclaim_durable = durable;
        let mut out: Batch = Vec::with_capacity(ix.retiring.len() + victims);
        // A block's newest version may be evicted only once every older
        // version is durably FREE (format rule 3). Older versions made FREE
        // by this batch are not durable before its fence, and the victim's
        // FREE store could reach media first, so their blocks wait.
        let mut blocked: Vec<u64> = Vec::new();
        // Format rule 7: with ordered writeback, a block's versions become
        // durably FREE oldest first, one batch (fence) after another.
        let oldest = self.retains().then(|| Self::oldest_retiring(ix));
        // Filtered in place: the list keeps its capacity from batch to batch.
        let mut retiring = std::mem::take(&mut ix.retiring);
        retiring.retain(|r| {
            let block = ix.key(r.slot) & BLOCK_MASK;
            if r.state != RState::Durable {
                blocked.push(block);
            }
            let waits_for_older = oldest
                .as_ref()
                .is_some_and(|o| r.state != RState::Durable && o.get(&block) != Some(&r.age()));
            let keep = waits_for_older
                || match r.state {
                    RState::Live => r.seq > durable,
                    RState::Covered => false,
                    RState::Durable => ix.pins(r.slot) > 0,
                };
            if !keep {
                out.push(Reclaimed {
                    slot: r.slot,
                    seq: r.seq,
                    may_free: ix.pins(r.slot) == 0,
                    own: r.own,
                });
            }
            keep
        });
        // Retired slots count towards what is wanted: evict only the rest.
        let victims = victims.saturating_sub(out.iter().filter(|o| o.may_free).count());
        if victims > 0 {
            blocked.sort_unstable();
            let keys = ix.pick_victims(victims, |s, k| {
                k & K_VALID != 0
                    && k & (K_DIRTY | K_WB) == 0
                    && key_pins(k) == 0
                    && self.slot_seq(first, s) <= durable
                    && blocked.binary_search(&(k & BLOCK_MASK)).is_err()
            });
            for s in keys {
                let seq = self.slot_seq(first, s);
                ix.remove(s);
                out.push(Reclaimed {
                    slot: s,
                    seq,
                    may_free: true,
                    own: true,
                });
                self.counters.add(Ctr::Evictions, 1);
            }
        }
        ix.retiring = retiring;
        out
    }

    /// Per block, the seq of its oldest retiring version whose FREE is not
    /// durable yet.
    fn oldest_retiring(ix: &ShardIndex) -> BlockMap<(u64, bool)> {
        let mut oldest: BlockMap<(u64, bool)> = BlockMap::default();
        for r in ix.retiring.iter().filter(|r| r.state != RState::Durable) {
            let age = oldest.entry(ix.key(r.slot) & BLOCK_MASK).or_insert(r.age());
            *age = (*age).min(r.age());
        }
        oldest
    }

    /// Store FREE into a prepared batch's state words (before a fence), by
    /// the thread that fences. Streaming stores: a retired slot's entry line
    /// is cold, and a temporal store would read it from media first.
    pub(super) fn flush_reclaim(&self, first: u64, batch: &[Reclaimed]) {
        for &Reclaimed { slot: s, .. } in batch {
            self.region
                .store_word_flush(self.state_off(first, s), STATE_FREE);
        }
    }

    /// After a fence: free what the batch made durable.
    pub(super) fn complete_reclaim(&self, ix: &mut ShardIndex, mut batch: Batch) {
        // Highest slot first onto the LIFO free list, so that writers take
        // the batch in ascending order and neighbouring slots share their
        // index lines and page-table entries instead of each missing alone.
        // A small early batch is warm already and not worth sorting.
        if batch.len() > 2 * RECLAIM_EARLY {
            batch.sort_unstable_by_key(|b| std::cmp::Reverse(b.slot));
        }
        for Reclaimed {
            slot,
            seq,
            may_free,
            own,
        } in batch
        {
            if may_free {
                // Format rule 1: a slot is free only with FREE in its state
                // word (made durable by the fence the caller just issued).
                debug_assert_eq!(
                    self.region
                        .word(self.state_off(ix.first_slot, slot))
                        .load(Ordering::Relaxed),
                    STATE_FREE,
                    "slot {slot} freed without FREE in its state word"
                );
                ix.push_free(slot);
            } else {
                ix.retiring.push(Retired {
                    slot,
                    seq,
                    state: RState::Durable,
                    own,
                });
            }
        }
        ix.reclaiming = false;
    }

    /// Reclaim with a fence of our own. `ix` is re-locked on return.
    /// False when nothing could be reclaimed or another reclaim runs.
    pub(super) fn reclaim_now(
        &self,
        shard: usize,
        ix: &mut MutexGuard<'_, ShardIndex>,
        victims: usize,
    ) -> bool {
        if ix.reclaiming {
            return false;
        }
        let batch = self.prepare_reclaim(ix, victims);
        if batch.is_empty() {
            return self.raise_watermark(ix);
        }
        ix.reclaiming = true;
        let first = ix.first_slot;
        MutexGuard::unlocked(ix, || {
            self.flush_reclaim(first, &batch);
            // Include S so slots of recent transactions become reusable too.
            let staged = self.seq.stage_watermark(&*self.region);
            self.region.fence();
            self.seq.end_staged(staged);
        });
        self.complete_reclaim(ix, batch);
        self.shards[shard].cv.notify_all();
        true
    }

    /// A fence that only raises S, when S lags the seqs handed out. Retired
    /// slots wait for S to cover their seq, and so do eviction victims;
    /// writers raise S only now and then (see `Sequencer::
    /// stage_watermark_own`), so with no later writer a waiting allocator
    /// must issue that fence itself. `ix` is re-locked on return. True if
    /// S rose.
    pub(super) fn raise_watermark(&self, ix: &mut MutexGuard<'_, ShardIndex>) -> bool {
        if self.seq.last() <= self.seq.durable() {
            return false;
        }
        MutexGuard::unlocked(ix, || self.settle_watermark())
    }

    /// Raise S to cover every finished transaction, with a fence of its
    /// own, if it lags. True if it rose. Writers raise S only in one
    /// transaction of 16, so after the last write of a burst the newest
    /// acknowledged entries stay above S, where recovery can only verify
    /// them (a damaged one would be taken for a torn write and rolled
    /// back); the writeback thread settles S once writes pause.
    pub(crate) fn settle_watermark(&self) -> bool {
        if self.seq.last() <= self.seq.durable() {
            return false;
        }
        let staged = self.seq.stage_watermark(&*self.region);
        if staged > 0 {
            self.region.fence();
            self.seq.end_staged(staged);
        }
        staged > 0
    }

    /// Take `need` free slots from a shard, pinned, reclaiming or waiting
    /// for writeback as needed. With [`Space::GiveUp`], gives up instead of
    /// waiting. With `piggy`, a shard running low also prepares a reclaim
    /// batch for the caller's next fence (`(request blocks, batches)`).
    #[allow(clippy::type_complexity)]
    pub(super) fn alloc(
        &self,
        shard: usize,
        need: usize,
        space: Space,
        piggy: Option<(u32, &mut Batches)>,
    ) -> Result<Option<SmallVec<[u32; 4]>>> {
        self.alloc_locked(shard, &mut self.shards[shard].ix.lock(), need, space, piggy)
    }

    /// [`alloc`](Self::alloc) with the shard's lock already taken.
    #[allow(clippy::type_complexity)]
    pub(super) fn alloc_locked(
        &self,
        shard: usize,
        ix: &mut MutexGuard<'_, ShardIndex>,
        need: usize,
        space: Space,
        piggy: Option<(u32, &mut Batches)>,
    ) -> Result<Option<SmallVec<[u32; 4]>>> {
        let sh = &self.shards[shard];
        let mut waited = false;
        loop {
            if ix.free_len as usize >= need {
                let v: SmallVec<[u32; 4]> = (0..need)
                    .map(|_| {
                        let s = ix.pop_free().expect("free count");
                        ix.pin(s);
                        s
                    })
                    .collect();
                if let Some((count, batches)) = piggy {
                    if let Some(b) = self.piggyback_batch(ix, count) {
                        batches.push((shard, b));
                    }
                }
                return Ok(Some(v));
            }
            let want = need - ix.free_len as usize + low_water(ix.nslots(), 0) as usize;
            if self.reclaim_now(shard, ix, want) {
                continue;
            }
            if space == Space::GiveUp {
                return Ok(None);
            }
            self.check_open()?;
            if self.stop_waits.load(Ordering::SeqCst) {
                return Err(EngineError::ShuttingDown);
            }
            if !waited {
                self.counters.add(Ctr::WaitsForSpace, 1);
                waited = true;
            }
            sh.starved.store(true, Ordering::Relaxed);
            if self.wb.thread.lock().is_some() {
                // Without the trickle pause: the cache as a whole may be
                // far below its dirty mark while this shard is full.
                self.kick_writeback_now();
                sh.cv.wait_for(ix, Duration::from_millis(10));
            } else {
                // No writeback thread (tools, tests): clean a batch ourselves.
                let r = MutexGuard::unlocked(ix, || self.writeback_step(self.cfg.writeback_batch));
                match r {
                    Ok(0) => {
                        sh.cv.wait_for(ix, Duration::from_millis(1));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "writeback for space failed; retrying");
                        sh.cv.wait_for(ix, Duration::from_millis(50));
                    }
                }
            }
        }
    }

    /// A reclaim batch to ride on the caller's next fence, when the shard
    /// runs low or has enough retired slots (`count`: the request's blocks).
    pub(super) fn piggyback_batch(&self, ix: &mut ShardIndex, count: u32) -> Option<Batch> {
        let lw = low_water(ix.nslots(), count);
        // While a slow or preempted transaction holds S back, nothing new
        // can be freed; rescanning the growing list on every write would
        // make each write cost as much as the list is long.
        //
        // Where the fence is an msync, retired slots wait for the low-water
        // mark instead: their FREE stores land in random entry pages, and
        // one big batch dirties each page once for many slots (32 slots of
        // a 16K-slot shard touch 30 pages, 1,000 touch 250), where small
        // early batches would write a page per slot.
        let early = !self.fence_is_syscall()
            && ix.retiring.len() >= RECLAIM_EARLY
            && self.seq.durable() > ix.reclaim_durable;
        if ix.reclaiming || (ix.free_len >= lw && !early) {
            return None;
        }
        let want = lw.saturating_sub(ix.free_len) as usize;
        let b = self.prepare_reclaim(ix, want);
        if b.is_empty() {
            return None;
        }
        ix.reclaiming = true;
        Some(b)
    }

    pub(super) fn release_slots(&self, blocks: &[NewBlock]) {
        for nb in blocks {
            let mut ix = self.shards[nb.shard].ix.lock();
            ix.unpin(nb.slot);
            ix.push_free(nb.slot);
        }
    }
}
