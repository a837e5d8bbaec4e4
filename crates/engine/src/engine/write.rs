//! Writes: the copy-on-write transaction, the writethrough and
//! writearound paths, and the origin writes they make.

use super::*;

impl Engine {
    /// Write a slot's whole entry line (the slot is free and owned by the
    /// caller). Streaming stores: the line is never read first.
    pub(crate) fn write_entry(&self, first: u64, s: u32, e: &Entry, code: u8) {
        let mut words = [0u64; META_SIZE / 8];
        words[..ENTRY_WORDS].copy_from_slice(&e.encode());
        words[W_STATE] = state_word(e.seq, code);
        let mut line = [0u8; META_SIZE];
        for (b, w) in line.chunks_exact_mut(8).zip(words) {
            b.copy_from_slice(&w.to_ne_bytes());
        }
        // SAFETY: a free slot's entry belongs to the request that took the
        // slot; no one reads it before it is published.
        unsafe { self.region.copy_flush_nt(self.meta(first, s), &line) };
    }

    /// Write `data` at `offset`; durable on return.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let bs = self.bs();
        // The fast path holds its shard's lock across the fence; with msync
        // that would serialize the shard's writers (see `cache_stage`).
        if data.len() as u64 == bs
            && offset.is_multiple_of(bs)
            && self.mode() == CacheMode::Writeback
            && !self.fence_is_syscall()
        {
            self.check_open()?;
            self.check_range(offset, bs)?;
            if let Some(r) = self.write_block_fast(offset / bs, data) {
                return r;
            }
        }
        self.write_src(offset, data.len() as u64, fua, Src::Buf(data))
    }

    /// The most common request, one whole block from memory in writeback
    /// mode, without the general path's bookkeeping. The shard stays locked
    /// from the slot's allocation to its publish, so no other writer can
    /// come between and the block needs no writer lock. The transaction is
    /// the one `cache_write` makes for a single block. `None` when this
    /// does not apply now (a writer holds the block, or the shard has no
    /// free slot); the general path then takes the request.
    pub(super) fn write_block_fast(&self, b: u64, data: &[u8]) -> Option<Result<()>> {
        let sh = self.shard_of(b);
        let shard = &self.shards[sh];
        shard.prefetch_bucket(b);
        let mut ix = shard.ix.lock();
        if ix.free_len == 0 || (!ix.locks.is_empty() && ix.lock_state(b).writer) {
            return None;
        }
        let slot = ix.pop_free().expect("free count");
        let batch = self.piggyback_batch(&mut ix, 1);
        let first = ix.first_slot;
        let ep = self.epochs.enter();
        let t = self.seq.begin();
        let staged = self.seq.stage_watermark_own(&t, &*self.region);
        // SAFETY: a free slot, taken under the shard lock and unpublished.
        let hash = unsafe { self.region.copy_flush_hash(self.data(first, slot), data) };
        let e = Entry {
            block: b,
            seq: t.seq,
            hash,
            count: 1,
            flags: 0,
            epoch: ep.epoch,
        };
        self.write_entry(first, slot, &e, STATE_DIRTY);
        if let Some(batch) = &batch {
            self.flush_reclaim(first, batch);
        }
        self.region.fence();
        let hit = self.publish(&mut ix, slot, b, K_DIRTY, t.seq, ep.epoch, true);
        if let Some(batch) = batch {
            self.complete_reclaim(&mut ix, batch);
        }
        self.seq.end(t, staged);
        drop(ix);
        drop(ep);
        shard.cv.notify_all();
        self.counters.add(Ctr::WriteFences, 1);
        self.counters.add(
            if hit {
                Ctr::WriteHits
            } else {
                Ctr::WriteMisses
            },
            1,
        );
        self.count_write(data.len() as u64);
        Some(Ok(()))
    }

    /// Write `[offset, offset + len)`, letting `source` fill the cache slots
    /// directly (e.g. `recv` from a socket). If `source` fails, nothing is
    /// written.
    pub fn write_with(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        source: &mut dyn FnMut(&mut [IoSliceMut<'_>]) -> io::Result<()>,
    ) -> Result<()> {
        self.write_src(offset, len, fua, Src::Fill(source))
    }

    /// Write a payload that waits in a relay pipe. Where it goes to the
    /// origin (a bypassed stream, writearound, passthrough) it is spliced
    /// there and never enters user memory; otherwise it is read out of the
    /// pipe and written as [`write`](Self::write) would.
    pub fn write_relayed(&self, offset: u64, data: &mut Relayed, fua: bool) -> Result<()> {
        self.write_src(offset, data.len() as u64, fua, Src::Relay(data))
    }

    /// Whether a write of `[offset, offset + len)` would go to the origin
    /// rather than the cache, as far as can be told before it is made (its
    /// payload is then best received into a relay pipe). A guess: the
    /// write itself decides.
    pub fn write_goes_around(&self, offset: u64, len: u64, fua: bool) -> bool {
        match self.mode() {
            CacheMode::Writearound | CacheMode::Passthrough => true,
            CacheMode::Writeback | CacheMode::Writethrough => {
                self.streams.would_bypass(offset, len, true, fua)
            }
        }
    }

    /// Zero `[offset, offset + len)`. Ranges above the maximum request size
    /// are split; each piece is atomic.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check_range(offset, len)?;
        let max = self.cfg.max_request as u64;
        let mut done = 0;
        while done < len {
            let n = max.min(len - done);
            self.write_src(offset + done, n, fua, Src::Zero)?;
            done += n;
        }
        Ok(())
    }

    /// Discard: the range reads as zeroes afterwards (so nothing older can
    /// ever reappear), and the origin is zeroed on writeback.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.write_zeroes(offset, len, fua)
    }

    /// Make acknowledged writes durable where the mode requires: in
    /// writeback mode they already are (in the cache).
    pub fn flush(&self) -> Result<()> {
        self.check_open()?;
        self.streams.sync_point();
        self.epochs.seal();
        if self.mode() == CacheMode::Writeback {
            return Ok(());
        }
        self.origin.flush().map_err(|source| {
            self.counters.add(Ctr::OriginErrors, 1);
            EngineError::Origin { offset: 0, source }
        })
    }

    pub(super) fn write_src(&self, offset: u64, len: u64, fua: bool, src: Src<'_>) -> Result<()> {
        self.check_request(offset, len)?;
        if let Src::Buf(b) = &src {
            debug_assert_eq!(b.len() as u64, len);
        }
        if len == 0 {
            if let Src::Fill(f) = src {
                f(&mut []).map_err(EngineError::Transfer)?;
            }
            return Ok(());
        }
        let bs = self.bs();
        let (b0, b1) = (offset / bs, (offset + len - 1) / bs);
        let mut held = self.lock_writers(b0, b1);
        let (mode, epoch) = self.bypass_mode(offset, len, fua, &src, &mut held);
        let fua = fua || (mode == CacheMode::Writearound && self.mode() == CacheMode::Writeback);
        let owned;
        let r = match (mode, src) {
            // Where persistence is a system call, a payload for the cache
            // is written from memory (see `cache_stage`).
            (CacheMode::Writeback | CacheMode::Writethrough, Src::Relay(rel))
                if self.fence_is_syscall() =>
            {
                match rel.take_bytes() {
                    Ok(v) => {
                        owned = v;
                        self.write_in(mode, offset, len, fua, Src::Buf(&owned), held, epoch)
                    }
                    Err(e) => Err(EngineError::Transfer(e)),
                }
            }
            (mode, src) => self.write_in(mode, offset, len, fua, src, held, epoch),
        };
        // A successful writeback-mode write released its locks on publish.
        if mode != CacheMode::Writeback || r.is_err() {
            self.unlock_writers(b0, b1);
        }
        if r.is_ok() {
            self.count_write(len);
        }
        r
    }

    /// A write of `len` bytes done (acknowledged).
    pub(super) fn count_write(&self, len: u64) {
        self.counters.add(Ctr::Writes, 1);
        self.counters.add(Ctr::WriteBytes, len);
    }

    /// A write in `mode` (the cache's, or writearound for a bypass), under
    /// the writer locks of its blocks.
    #[allow(clippy::too_many_arguments)]
    fn write_in(
        &self,
        mode: CacheMode,
        offset: u64,
        len: u64,
        fua: bool,
        src: Src<'_>,
        held: Option<MutexGuard<'_, ShardIndex>>,
        epoch: Option<crate::epoch::EpochGuard<'_>>,
    ) -> Result<()> {
        let bs = self.bs();
        let (b0, b1) = (offset / bs, (offset + len - 1) / bs);
        match mode {
            CacheMode::Writeback => self
                .cache_write(offset, len, src, b0, b1, true, held)
                .map(|_| ()),
            CacheMode::Writethrough => self
                .cache_write(offset, len, src, b0, b1, false, held)
                .and_then(|nbs| self.write_through(&nbs, fua)),
            CacheMode::Writearound | CacheMode::Passthrough => {
                drop(held);
                // A bypassed write of a writeback cache may land in the cache.
                let fallback = mode != self.mode() && self.mode() == CacheMode::Writeback;
                self.origin_write(offset, len, src, fua, (b0, b1), fallback, epoch)
            }
        }
    }

    /// The mode a write runs in: its cache's, or writearound for a write
    /// that continues a sequential stream past the cutoff. Writearound keeps
    /// every promise (cached copies are updated or dropped, dirty blocks go
    /// through the cache); in writeback mode such a write carries FUA, since
    /// an acknowledged write must be durable without a FLUSH.
    ///
    /// With ordered writeback, a write may pass the cache only when the
    /// origin is owed nothing from an earlier epoch, no earlier epoch has a
    /// commit in flight, and its own blocks are clean (its writer locks keep
    /// them so); it then holds its epoch open (the returned guard) until
    /// the origin has it, so no later epoch reaches the origin first. The
    /// check locks every shard, so the caller's kept shard lock (`held`)
    /// goes first.
    pub(super) fn bypass_mode(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        src: &Src<'_>,
        held: &mut Option<MutexGuard<'_, ShardIndex>>,
    ) -> (CacheMode, Option<crate::epoch::EpochGuard<'_>>) {
        let mode = self.mode();
        let cached = matches!(mode, CacheMode::Writeback | CacheMode::Writethrough);
        // Zeroes cost the cache no data: they are not worth a bypass.
        if !cached || matches!(src, Src::Zero) || !self.streams.bypass(offset, len, true, fua) {
            return (mode, None);
        }
        let guard = if mode == CacheMode::Writeback && self.ordered() {
            *held = None;
            let g = self.epochs.enter();
            let bs = self.bs();
            if self.earlier_epochs_open(g.epoch)
                || self.any_dirty(offset / bs, (offset + len - 1) / bs)
            {
                // The earlier epochs go first, quickly.
                self.kick_writeback_now();
                return (mode, None);
            }
            Some(g)
        } else {
            None
        };
        self.counters.add(Ctr::BypassWrites, 1);
        self.counters.add(Ctr::BypassBytes, len);
        (CacheMode::Writearound, guard)
    }

    pub(super) fn unpin_all(&self, nbs: &[NewBlock]) {
        for nb in nbs {
            self.shards[nb.shard].ix.lock().unpin(nb.slot);
        }
    }

    /// The copy-on-write transaction. The caller holds the writer locks of
    /// `[b0, b1]`. Returns the new blocks, published; with `release` their
    /// pins and the writer locks are dropped in the same critical section,
    /// otherwise they stay pinned and locked for the caller.
    /// `held` is the lock of the request's only shard, if [`lock_writers`]
    /// kept it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn cache_write(
        &self,
        offset: u64,
        len: u64,
        mut src: Src<'_>,
        b0: u64,
        b1: u64,
        release: bool,
        held: Option<MutexGuard<'_, ShardIndex>>,
    ) -> Result<Blocks> {
        let (st, kept) = self
            .cache_stage(offset, len, &mut src, b0, b1, held, Space::Wait)?
            .expect("a waiting stage returns slots");
        let data = match src {
            Src::Buf(b) => Filled::Buf(b),
            Src::Zero => Filled::Zero,
            Src::Fill(_) | Src::Relay(_) => Filled::InSlots,
        };
        Ok(self.cache_commit(st, kept, data, release))
    }

    /// The first half of [`cache_write`]: slots, old content of partial
    /// blocks, and a payload from outside, received straight into the
    /// slots. `None` with [`Space::GiveUp`] when a shard has no free slot
    /// now (nothing is then held); then every block must be whole.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cache_stage<'s>(
        &'s self,
        offset: u64,
        len: u64,
        src: &mut Src<'_>,
        b0: u64,
        b1: u64,
        held: Option<MutexGuard<'s, ShardIndex>>,
        space: Space,
    ) -> Result<Option<(Staging, Kept<'s>)>> {
        let bs = self.bs();
        let mut nbs = self.request_blocks(offset, len, b0, b1, matches!(src, Src::Zero));
        let ids = self.shards_of(b0, b1);

        // 1. Slots (pinned), shard by shard in ascending order, with a
        //    reclaim batch that rides on this request's fence where a shard
        //    runs low.
        //    A small request publishes under shard locks taken before its
        //    persistence stores: the first locked instruction after the
        //    fence waits for the stores to drain, so the index work done
        //    before it is hidden. A one-shard request of whole blocks from
        //    memory keeps the lock from its allocation on.
        // Not where a fence is a system call: a shard lock held across an
        // msync would keep every other writer of the shard from reaching
        // its own fence, and so from sharing the msync (group commit).
        let lock_early = nbs.len() <= LOCK_EARLY_BLOCKS && !self.fence_is_syscall();
        let hold = lock_early
            && !matches!(src, Src::Fill(_) | Src::Relay(_))
            && nbs.iter().all(|n| n.lo == 0 && n.hi as u64 == bs);
        let Some((batches, kept)) = self.take_slots(&mut nbs, &ids, held, space, hold)? else {
            return Ok(None);
        };

        // 2. Old content of partially covered blocks (temporal copies,
        //    flushed with the rest below).
        if let Err(e) = self.fill_partial_blocks(&nbs, space) {
            self.abandon_stage(&nbs, batches);
            return Err(e);
        }

        // 3. A payload from outside arrives straight in the slots.
        let received = match src {
            Src::Fill(f) => self.receive_into_slots(&nbs, &mut **f),
            Src::Relay(r) => self.receive_into_slots(&nbs, &mut |s| r.read_out(s)),
            Src::Buf(_) | Src::Zero => Ok(()),
        };
        if let Err(e) = received {
            self.abandon_stage(&nbs, batches);
            return Err(EngineError::Transfer(e));
        }
        let st = Staging {
            nbs,
            batches,
            ids,
            lock_early,
        };
        Ok(Some((st, kept)))
    }

    /// The blocks of a write of `[offset, offset + len)` (blocks `[b0,
    /// b1]`), each with the byte range the request covers; no slots yet.
    fn request_blocks(&self, offset: u64, len: u64, b0: u64, b1: u64, zero_src: bool) -> Blocks {
        let bs = self.bs();
        let end = offset + len;
        (b0..=b1)
            .map(|b| {
                let lo = offset.max(b * bs) - b * bs;
                let hi = end.min((b + 1) * bs) - b * bs;
                let full = lo == 0 && hi == bs;
                NewBlock {
                    block: b,
                    shard: self.shard_of(b),
                    slot: 0,
                    zero: zero_src && full,
                    on_origin: false,
                    lo: lo as u32,
                    hi: hi as u32,
                }
            })
            .collect()
    }

    /// Step 1 of [`cache_stage`]: a pinned slot for each of `nbs`, shard by
    /// shard in ascending order (`ids`), and the reclaim batches that ride
    /// on the request's fence. `held` is the first shard's lock if the
    /// caller has it; with `hold` it is kept for the commit. `None` (or an
    /// error) with nothing held when a shard has no room.
    fn take_slots<'s>(
        &'s self,
        nbs: &mut [NewBlock],
        ids: &[usize],
        mut held: Option<MutexGuard<'s, ShardIndex>>,
        space: Space,
        hold: bool,
    ) -> Result<Option<(Batches, Kept<'s>)>> {
        let count = nbs.len() as u32;
        let mut kept = None;
        let mut batches = Batches::new();
        for (k, &sh) in ids.iter().enumerate() {
            let need = nbs.iter().filter(|n| n.shard == sh).count();
            let piggy = Some((count, &mut batches));
            let was_held = held.is_some();
            let mut ix = held.take().unwrap_or_else(|| self.shards[sh].ix.lock());
            // Without waiting, only slots that are free now: no reclaim
            // (it fences) and no wait for writeback.
            let r = if space == Space::GiveUp && (ix.free_len as usize) < need {
                Ok(None)
            } else {
                self.alloc_locked(sh, &mut ix, need, space, piggy)
            };
            if hold && was_held && matches!(r, Ok(Some(_))) {
                kept = Some(ix);
            } else {
                drop(ix);
            }
            let slots = match r {
                Ok(Some(s)) => s,
                Ok(None) | Err(_) => {
                    // The blocks are in block order, not shard order: give
                    // back the slots of the shards done so far.
                    let taken: Blocks = nbs
                        .iter()
                        .filter(|n| ids[..k].contains(&n.shard))
                        .copied()
                        .collect();
                    self.abandon_stage(&taken, batches);
                    return r.map(|_| None);
                }
            };
            for (nb, s) in nbs.iter_mut().filter(|n| n.shard == sh).zip(slots) {
                nb.slot = s;
            }
        }
        Ok(Some((batches, kept)))
    }

    /// Step 2 of [`cache_stage`]: the old content of the partially covered
    /// blocks into their new slots (temporal copies, flushed by the
    /// commit).
    fn fill_partial_blocks(&self, nbs: &[NewBlock], space: Space) -> Result<()> {
        let bs = self.bs();
        for nb in nbs
            .iter()
            .filter(|n| !n.zero && (n.lo != 0 || n.hi as u64 != bs))
        {
            debug_assert!(
                space == Space::Wait,
                "staging without waiting takes whole blocks only"
            );
            self.fill_old(nb, self.firsts[nb.shard])?;
        }
        Ok(())
    }

    /// Step 3 of [`cache_stage`]: `fill` writes the payload straight into
    /// the slots' covered ranges.
    fn receive_into_slots(
        &self,
        nbs: &[NewBlock],
        fill: &mut dyn FnMut(&mut [IoSliceMut<'_>]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut slices: Vec<IoSliceMut<'_>> = nbs
            .iter()
            .map(|nb| {
                let off = self.data(self.firsts[nb.shard], nb.slot) + nb.lo as usize;
                // SAFETY: unpublished slot owned by this request; the
                // slices are disjoint (one per slot).
                IoSliceMut::new(unsafe { self.region.slice_mut(off, (nb.hi - nb.lo) as usize) })
            })
            .collect();
        fill(&mut slices)
    }

    /// A stage that fails after taking slots gives them back, and its
    /// reclaim batches.
    fn abandon_stage(&self, nbs: &[NewBlock], batches: Batches) {
        self.release_slots(nbs);
        self.abandon_batches(batches);
    }

    /// The second half of [`cache_write`]: persistence stores, one fence,
    /// publish.
    ///
    /// Ordering for speed: on x86 every locked instruction (mutex, atomic
    /// read-modify-write) waits for earlier `clwb`s and streaming stores to
    /// complete, so all of them happen before the persistence stores start,
    /// and the stretch from the first streaming store to the fence has none.
    pub(crate) fn cache_commit(
        &self,
        st: Staging,
        kept: Kept<'_>,
        data: Filled<'_>,
        release: bool,
    ) -> Blocks {
        self.test_hook(HookPoint::WriteCommit);

        // 4. The last locked instructions (shard locks, taking the seq); S
        //    goes into this writer's own watermark line with the
        //    persistence stores.
        let g = match kept {
            Some(ix) => smallvec::smallvec![ix],
            None if st.lock_early => self.lock_all(&st.ids),
            None => SmallVec::new(),
        };
        let ep = self.epochs.enter();
        let stored = self.persist_stores(st, data, ep.epoch);
        self.region.fence();
        self.publish_stored(g, stored, release)
    }

    /// [`cache_commit`](Self::cache_commit) of a writeback-mode write
    /// without waiting for its fence (an msync): the persistence stores
    /// here, and the publish (which releases the pins and writer locks of
    /// blocks `[b0, b1]`) on the thread that finishes the fence, which then
    /// calls `then`. A failed fence publishes nothing and keeps the slots.
    pub(crate) fn cache_commit_async(
        self: &Arc<Self>,
        st: Staging,
        data: Filled<'_>,
        (b0, b1): (u64, u64),
        idle: bool,
        then: Box<dyn FnOnce(Result<Blocks>) + Send>,
    ) {
        debug_assert!(!st.lock_early, "a commit finished elsewhere holds no lock");
        self.test_hook(HookPoint::WriteCommit);
        // Entered until the publish, so a FLUSH waits for this write.
        let epoch = self.epochs.enter().detach();
        let stored = self.persist_stores(st, data, epoch);
        let e = self.clone();
        let done: pmcache_pmem::FenceDone = Box::new(move |r| {
            let r = match r {
                Ok(()) => Ok(e.publish_stored(SmallVec::new(), stored, true)),
                Err(why) => {
                    // Nothing after a failed msync is durable: the ticket
                    // stays taken (S stops) and the slots stay pinned.
                    tracing::error!(%why, "a write's fence failed; not acknowledged");
                    e.abandon_batches(stored.batches);
                    e.unlock_writers(b0, b1);
                    Err(EngineError::Persist(why))
                }
            };
            e.epochs.leave(epoch);
            then(r);
        });
        if idle {
            self.region.fence_async_idle(done);
        } else {
            self.region.fence_async(done);
        }
    }

    /// Step 5 of [`cache_commit`](Self::cache_commit): the seq, then the
    /// persistence stores (data, entries, reclaim FREEs, flushes), up to
    /// the fence.
    fn persist_stores(&self, st: Staging, data: Filled<'_>, epoch: u64) -> Stored {
        let Staging {
            nbs, batches, ids, ..
        } = st;
        let count = nbs.len() as u32;
        let t = self.seq.begin();
        let staged = self.seq.stage_watermark_own(&t, &*self.region);
        let mut pos = 0usize;
        for nb in &nbs {
            self.persist_block(nb, data, pos, (t.seq, epoch), count);
            pos += (nb.hi - nb.lo) as usize;
        }
        for (sh, b) in &batches {
            self.flush_reclaim(self.firsts[*sh], b);
        }
        Stored {
            nbs,
            batches,
            ids,
            t,
            staged,
            epoch,
        }
    }

    /// Step 6 of [`cache_commit`](Self::cache_commit), after the fence:
    /// publish all blocks at once, under the shard locks `g` (taken here if
    /// empty); retire the versions they replace.
    fn publish_stored<'s>(
        &'s self,
        mut g: SmallVec<[MutexGuard<'s, ShardIndex>; 4]>,
        c: Stored,
        release: bool,
    ) -> Blocks {
        let Stored {
            nbs,
            batches,
            ids,
            t,
            staged,
            epoch,
        } = c;
        if g.is_empty() {
            g = self.lock_all(&ids);
        }
        let seq = t.seq;
        let (hits, misses) = self.publish_blocks(&mut g, &ids, &nbs, (seq, epoch), release);
        for (sh, b) in batches {
            let pos = Self::guard_pos(&ids, sh);
            self.complete_reclaim(&mut g[pos], b);
        }
        self.seq.end(t, staged);
        drop(g);
        for &sh in &ids {
            self.shards[sh].cv.notify_all();
        }
        self.counters.add(Ctr::WriteFences, 1);
        self.counters.add(Ctr::WriteHits, hits);
        self.counters.add(Ctr::WriteMisses, misses);
        // No kick here: waking the writeback thread for every write costs a
        // context switch per request. It polls, and writers short of space
        // kick it.
        nbs
    }

    /// Step 5 of [`cache_commit`] for one block: its data (what staging did
    /// not put into the slot; `pos` is where the block's part starts in a
    /// payload buffer), hashed and flushed, then its entry. No locked
    /// instruction: this runs between the first streaming store and the
    /// fence.
    #[inline]
    fn persist_block(
        &self,
        nb: &NewBlock,
        data: Filled<'_>,
        pos: usize,
        (seq, epoch): (u64, u64),
        count: u32,
    ) {
        let bs = self.bs();
        let first = self.firsts[nb.shard];
        let off = self.data(first, nb.slot);
        let n = (nb.hi - nb.lo) as usize;
        let partial = n as u64 != bs;
        let hash = match data {
            _ if nb.zero => 0,
            Filled::Buf(buf) => {
                let part = &buf[pos..pos + n];
                if partial {
                    // SAFETY: unpublished slot owned by this request.
                    unsafe { self.region.copy_flush(off + nb.lo as usize, part) };
                    // SAFETY: as above; read only.
                    data_hash(unsafe { self.region.slice(off, bs as usize) })
                } else {
                    // SAFETY: unpublished slot owned by this request.
                    unsafe { self.region.copy_flush_hash(off, part) }
                }
            }
            Filled::Zero => {
                // SAFETY: unpublished slot owned by this request.
                unsafe { self.region.zero_flush(off + nb.lo as usize, n) };
                // SAFETY: as above; read only.
                data_hash(unsafe { self.region.slice(off, bs as usize) })
            }
            Filled::InSlots => {
                // SAFETY: unpublished slot owned by this request; read only.
                data_hash(unsafe { self.region.slice(off, bs as usize) })
            }
        };
        if partial || matches!(data, Filled::InSlots) {
            // Temporal stores (old content, or the kernel's recv).
            self.region.flush(off, bs as usize);
        }
        let e = Entry {
            block: nb.block,
            seq,
            hash,
            count,
            flags: if nb.zero { FLAG_ZERO } else { 0 },
            epoch,
        };
        self.write_entry(first, nb.slot, &e, STATE_DIRTY);
    }

    /// Step 6 of [`cache_commit`]: after the fence, publish every block
    /// under its shard's lock (`g`, in the order of `ids`); with `release`
    /// drop its pin and writer lock in the same critical section. Returns
    /// the (hits, misses): blocks that replaced a version, and new ones.
    fn publish_blocks(
        &self,
        g: &mut [MutexGuard<'_, ShardIndex>],
        ids: &[usize],
        nbs: &[NewBlock],
        (seq, epoch): (u64, u64),
        release: bool,
    ) -> (u64, u64) {
        let (mut hits, mut misses) = (0, 0);
        for nb in nbs {
            let pos = Self::guard_pos(ids, nb.shard);
            let ix = &mut g[pos];
            let flags = K_DIRTY | if nb.zero { K_ZERO } else { 0 };
            // Only a writeback-mode commit (the one that releases here)
            // retains: the others put the new version on the origin.
            if self.publish(ix, nb.slot, nb.block, flags, seq, epoch, release) {
                hits += 1;
            } else {
                misses += 1;
            }
            if release {
                ix.unpin(nb.slot);
                ix.update_lock(nb.block, |l| l.writer = false);
            }
        }
        (hits, misses)
    }

    /// After a write's fence: make `slot` the current version of `block`
    /// and retire the version it replaces, or retain it for ordered
    /// writeback if it is dirty from an earlier epoch (format rule 5) and
    /// `may_retain` (a writeback-mode commit: the mode may have changed
    /// since the write chose its path). True if there was one.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn publish(
        &self,
        ix: &mut ShardIndex,
        slot: u32,
        block: u64,
        flags: u64,
        seq: u64,
        epoch: u64,
        may_retain: bool,
    ) -> bool {
        // Format rule 4: per block, seq order is commit order (debug
        // builds read the entries from media to check it).
        debug_assert_eq!(self.slot_seq(ix.first_slot, slot), seq);
        let old = ix.lookup(block);
        if let Some(old) = old {
            debug_assert!(
                self.slot_seq(ix.first_slot, old) < seq,
                "block {block}: a version published over a newer one"
            );
            // Retire under this transaction's seq rather than the old
            // version's: it is larger, so the FREE store waits at least as
            // long as rule 2 asks, and no cold entry line is read.
            let k = ix.key(old);
            ix.remove(old);
            let dirty = k & K_DIRTY != 0 && k & K_ON_ORIGIN == 0;
            if dirty && may_retain && self.retains() && ix.epoch(old) < epoch {
                ix.retain(old, k & K_ZERO != 0);
            } else {
                self.retire(ix, old, seq, false);
            }
        }
        ix.insert_version(slot, block, flags, epoch);
        old.is_some()
    }

    /// Give back reclaim batches that failed before their FREE stores: the
    /// slots wait for the next reclaim, which stores FREE for them.
    pub(super) fn abandon_batches(&self, batches: Batches) {
        for (sh, b) in batches {
            let mut ix = self.shards[sh].ix.lock();
            for Reclaimed { slot, seq, own, .. } in b {
                ix.retiring.push(Retired {
                    slot,
                    seq,
                    state: RState::Covered,
                    own,
                });
            }
            ix.reclaiming = false;
            drop(ix);
            self.shards[sh].cv.notify_all();
        }
    }

    /// Bring the old content of a partially written block into its new slot
    /// (temporal stores; the caller flushes the block).
    pub(super) fn fill_old(&self, nb: &NewBlock, first: u64) -> Result<()> {
        let bs = self.bs() as usize;
        let dst_off = self.data(first, nb.slot);
        let sh = &self.shards[nb.shard];
        let old = {
            let mut ix = sh.ix.lock();
            loop {
                match ix.lookup(nb.block) {
                    Some(s) if ix.pin(s) => {
                        if self.verify_loaded(&mut ix, s) {
                            break Some((s, ix.key(s) & K_ZERO != 0));
                        }
                        // A clean copy is dropped (the origin has the old
                        // content); a dirty one cannot be merged with.
                        if let Some(e) = self.damaged(&mut ix, s, nb.block) {
                            return Err(e);
                        }
                    }
                    Some(_) => {
                        sh.cv.wait_for(&mut ix, Duration::from_millis(1));
                    }
                    None if ix.lock_state(nb.block).origin_writer => {
                        sh.cv.wait_for(&mut ix, Duration::from_millis(5));
                    }
                    None => {
                        ix.update_lock(nb.block, |l| l.origin_readers += 1);
                        break None;
                    }
                }
            }
        };
        // SAFETY: unpublished slot owned by this request.
        let dst = unsafe { self.region.slice_mut(dst_off, bs) };
        match old {
            Some((_, true)) => {
                dst.fill(0);
                self.unpin_one(nb.shard, old);
                Ok(())
            }
            Some((s, false)) => {
                // SAFETY: the source is pinned (never written while pinned)
                // and distinct from the destination.
                dst.copy_from_slice(unsafe { self.region.slice(self.data(first, s), bs) });
                self.unpin_one(nb.shard, old);
                Ok(())
            }
            None => {
                let start = nb.block * bs as u64;
                let avail = (self.size - start).min(bs as u64) as usize;
                dst[avail..].fill(0);
                let r = self.origin_read_retrying(&mut [IoSliceMut::new(&mut dst[..avail])], start);
                sh.ix
                    .lock()
                    .update_lock(nb.block, |l| l.origin_readers -= 1);
                sh.cv.notify_all();
                r.map_err(|source| EngineError::Origin {
                    offset: start,
                    source,
                })
            }
        }
    }

    pub(super) fn unpin_one(&self, shard: usize, old: Option<(u32, bool)>) {
        if let Some((s, _)) = old {
            self.shards[shard].ix.lock().unpin(s);
        }
    }

    /// Writethrough: after the cache commit, write the blocks to the origin
    /// and mark them clean. The writer locks are held, so no newer version
    /// can race this one to the origin.
    pub(super) fn write_through(&self, nbs: &[NewBlock], fua: bool) -> Result<()> {
        let (b0, b1) = (nbs[0].block, nbs[nbs.len() - 1].block);
        self.lock_origin_writers(b0, b1);
        let failed = self.write_blocks_retrying(nbs);
        self.end_through(nbs, fua, failed)
    }

    /// The rest of [`write_through`](Self::write_through) once the origin
    /// writes are done (`failed`: why some block never made it): the FUA
    /// flush, where the blocks stand, and the origin-writer locks and pins
    /// dropped.
    pub(super) fn end_through(
        &self,
        nbs: &[NewBlock],
        fua: bool,
        failed: Option<EngineError>,
    ) -> Result<()> {
        let (b0, b1) = (nbs[0].block, nbs[nbs.len() - 1].block);
        let r = failed.map_or(Ok(()), Err).and_then(|()| {
            if fua {
                self.origin.flush().map_err(|source| {
                    self.counters.add(Ctr::OriginErrors, 1);
                    EngineError::Origin {
                        offset: b0 * self.bs(),
                        source,
                    }
                })
            } else {
                Ok(())
            }
        });
        if r.is_ok() {
            self.drop_retained(b0, b1);
            // Clean once the origin has it durably; without FUA the next
            // origin flush (writeback pass or FLUSH) does that.
            if fua {
                self.mark_clean(nbs);
            } else {
                for nb in nbs {
                    let mut ix = self.shards[nb.shard].ix.lock();
                    if ix.key(nb.slot) & (K_VALID | K_DIRTY) == K_VALID | K_DIRTY {
                        ix.set_flags(nb.slot, K_ON_ORIGIN);
                    }
                }
            }
        }
        self.unlock_origin_writers(b0..=b1);
        self.unpin_all(nbs);
        r
    }

    /// [`write_blocks_to_origin`](Self::write_blocks_to_origin) for a
    /// client that waits: the blocks that failed are sent again after short
    /// pauses, as `origin_retrying` does for reads, before the client sees
    /// an error. One failed request of a flaky origin costs a retry.
    pub(super) fn write_blocks_retrying(&self, nbs: &[NewBlock]) -> Option<EngineError> {
        let mut left: Vec<NewBlock> = nbs.to_vec();
        let mut pause = Duration::from_millis(1);
        let mut attempt = 1;
        loop {
            let (written, err) = self.write_blocks_to_origin(&left);
            let e = err?;
            if attempt >= ORIGIN_ATTEMPTS || self.check_open().is_err() {
                return Some(e);
            }
            left = left
                .iter()
                .zip(&written)
                .filter(|(_, &w)| !w)
                .map(|(nb, _)| *nb)
                .collect();
            std::thread::sleep(pause);
            pause *= 4;
            attempt += 1;
        }
    }

    /// Forget the retained versions of blocks `[b0, b1]`, whose newest
    /// versions a writethrough has just put on the origin (under the
    /// origin-writer locks, so writeback holds none of them): written back
    /// after it, they would bring old data back. Format rule 5 keeps a
    /// version only while a newer one writeback has not written follows it.
    /// A writethrough-path commit retains nothing, but a writeback-mode
    /// commit racing a switch to writethrough may have.
    fn drop_retained(&self, b0: u64, b1: u64) {
        for sh in self.shards_of(b0, b1) {
            let mut ix = self.shards[sh].ix.lock();
            if ix.retained == 0 {
                continue;
            }
            let mut old: Vec<u32> = ix.owed_slots(None, usize::MAX);
            old.retain(|&s| {
                let k = ix.key(s);
                k & K_RETAINED != 0 && (b0..=b1).contains(&(k & BLOCK_MASK))
            });
            old.sort_unstable();
            old.dedup();
            for s in old {
                self.retire_retained(&mut ix, s);
            }
        }
    }

    /// A retained version writeback no longer owes the origin: on its way
    /// to FREE, under its own seq.
    pub(crate) fn retire_retained(&self, ix: &mut ShardIndex, s: u32) {
        ix.release_retained(s);
        let seq = self.slot_seq(ix.first_slot, s);
        self.retire(ix, s, seq, true);
    }

    /// Mark versions clean after their origin copy is durable: a current
    /// one becomes CLEAN, a retained one retires.
    pub(crate) fn mark_clean(&self, nbs: &[NewBlock]) {
        for nb in nbs {
            let mut ix = self.shards[nb.shard].ix.lock();
            let k = ix.key(nb.slot);
            if k & K_RETAINED != 0 {
                self.retire_retained(&mut ix, nb.slot);
                self.counters.add(Ctr::Writebacks, 1);
                self.counters.add(Ctr::WritebackBytes, self.bs());
                continue;
            }
            // Only the current version: one superseded in its own epoch
            // is already retiring.
            if k & K_VALID != 0 && k & K_DIRTY != 0 {
                let first = ix.first_slot;
                let seq = self.slot_seq(first, nb.slot);
                self.store_state(first, nb.slot, state_word(seq, STATE_CLEAN));
                ix.mark_clean(nb.slot);
                self.counters.add(Ctr::Writebacks, 1);
                self.counters.add(Ctr::WritebackBytes, self.bs());
            }
        }
    }

    /// Writearound / passthrough: drop cached copies durably, then write the
    /// origin. Blocks with dirty data take the writethrough path instead, so
    /// the bytes of the block outside the request are not lost.
    ///
    /// With `fallback` (a bypassed write of a writeback cache), an origin
    /// that fails keeps the write in the cache as dirty data instead of
    /// failing it: a bypass is an optimisation, never a new way to fail.
    ///
    /// `epoch` holds a bypassed write's epoch open (see `bypass_mode`) until
    /// the origin has it; a fallback into the cache lets it go first, as the
    /// cache keeps its own order.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn origin_write(
        &self,
        offset: u64,
        len: u64,
        src: Src<'_>,
        fua: bool,
        (b0, b1): (u64, u64),
        fallback: bool,
        epoch: Option<crate::epoch::EpochGuard<'_>>,
    ) -> Result<()> {
        // An ordered bypass found its blocks clean under its writer locks,
        // which it still holds: no need to look again.
        debug_assert!(epoch.is_none() || !self.any_dirty(b0, b1));
        if epoch.is_none() && self.any_dirty(b0, b1) {
            let nbs = self.cache_write(offset, len, src, b0, b1, false, None)?;
            // Committed to the cache: with `fallback` that is enough, and a
            // failed origin write leaves the blocks dirty for writeback.
            return match self.write_through(&nbs, fua) {
                Err(e) if fallback => {
                    tracing::debug!(offset, error = %e, "bypassed write kept in the cache");
                    Ok(())
                }
                r => r,
            };
        }
        // The payload has to exist before the origin sees any of it; it is
        // not cached, so one received from the socket goes through a buffer.
        // Whole blocks of zeroes go as WRITE_ZEROES; smaller ones as data.
        let zero = matches!(src, Src::Zero) && len >= self.bs();
        let owned: Vec<u8>;
        let (buf, relay): (&[u8], Option<&mut Relayed>) = match src {
            Src::Buf(b) => (b, None),
            Src::Fill(f) => {
                let mut v = vec![0u8; len as usize];
                f(&mut [IoSliceMut::new(&mut v)]).map_err(EngineError::Transfer)?;
                owned = v;
                (&owned, None)
            }
            Src::Zero => {
                owned = vec![0u8; len as usize];
                (&owned, None)
            }
            Src::Relay(r) => (&[], Some(r)),
        };
        // Blocks that were cached count as write hits, as in writeback.
        let hits = self.invalidate(b0, b1)?;
        self.counters.add(Ctr::WriteHits, hits);
        self.counters.add(Ctr::WriteMisses, b1 - b0 + 1 - hits);
        self.lock_origin_writers(b0, b1);
        let r = match &relay {
            Some(rel) => self.origin_retrying("write", offset, || {
                self.origin.write_relayed(rel, offset, fua)
            }),
            None => self.origin_write_retrying(buf, offset, fua, zero),
        };
        self.unlock_origin_writers(b0..=b1);
        if relay.is_some() && r.is_ok() {
            self.counters.add(Ctr::RelayedBytes, len);
        }
        match r {
            Err(e) if fallback => {
                tracing::debug!(offset, error = %e, "bypassed write kept in the cache");
                drop(epoch);
                let src = match relay {
                    Some(rel) => Src::Relay(rel),
                    None => Src::Buf(buf),
                };
                let nbs = self.cache_write(offset, len, src, b0, b1, false, None)?;
                self.unpin_all(&nbs);
                Ok(())
            }
            r => r.map_err(|source| EngineError::Origin { offset, source }),
        }
    }

    /// Whether any of blocks `[b0, b1]` is dirty in the cache.
    fn any_dirty(&self, b0: u64, b1: u64) -> bool {
        self.any_version(b0, b1, |k| k & K_DIRTY != 0)
    }

    /// Whether the current version of any of blocks `[b0, b1]` has a key
    /// that `is` accepts.
    pub(super) fn any_version(&self, b0: u64, b1: u64, is: impl Fn(u64) -> bool) -> bool {
        let ids = self.shards_of(b0, b1);
        let g = self.lock_all(&ids);
        (b0..=b1).any(|b| {
            let ix = &g[Self::guard_pos(&ids, self.shard_of(b))];
            ix.lookup(b).is_some_and(|s| is(ix.key(s)))
        })
    }

    /// With ordered writeback, whether a write of `epoch` must not pass the
    /// cache yet: the origin is owed an earlier epoch, or one still has a
    /// commit in flight (so no later epoch reaches the origin first).
    pub(super) fn earlier_epochs_open(&self, epoch: u64) -> bool {
        self.oldest_pending().is_some_and(|p| p < epoch)
            || self.epochs.closed().is_none_or(|c| c + 1 < epoch)
    }

    pub(super) fn origin_write_retrying(
        &self,
        buf: &[u8],
        offset: u64,
        fua: bool,
        zero: bool,
    ) -> io::Result<()> {
        self.origin_retrying("write", offset, || {
            if zero {
                self.origin.write_zeroes(offset, buf.len() as u64, fua)
            } else {
                self.origin.write_at(buf, offset, fua)
            }
        })
    }

    /// Durably drop the cached copies of `[b0, b1]` (all clean); returns how
    /// many there were.
    pub(super) fn invalidate(&self, b0: u64, b1: u64) -> Result<u64> {
        let ids = self.shards_of(b0, b1);
        // Older versions first, so none can outlive the copy dropped here.
        for &sh in &ids {
            self.make_retiring_durable(sh)?;
        }
        let mut dropped = 0;
        {
            let mut g = self.lock_all(&ids);
            for b in b0..=b1 {
                let pos = Self::guard_pos(&ids, self.shard_of(b));
                let ix = &mut g[pos];
                if let Some(s) = ix.lookup(b) {
                    let first = ix.first_slot;
                    let seq = self.slot_seq(first, s);
                    debug_assert_eq!(ix.key(s) & K_DIRTY, 0, "only clean copies are dropped");
                    ix.remove(s);
                    self.retire(ix, s, seq, true);
                    dropped += 1;
                }
            }
        }
        if dropped > 0 {
            for &sh in &ids {
                self.make_retiring_durable(sh)?;
            }
        }
        Ok(dropped)
    }

    /// Make every retiring slot of a shard durably FREE now.
    pub(crate) fn make_retiring_durable(&self, sh: usize) -> Result<()> {
        let shard = &self.shards[sh];
        let mut ix = shard.ix.lock();
        loop {
            // A reclaim in flight has taken its batch off the list, and our
            // slots may be in it: their FREE is durable only after its fence.
            if !ix.reclaiming && ix.retiring.iter().all(|r| r.state == RState::Durable) {
                return Ok(());
            }
            if !ix.reclaiming {
                if self.raise_watermark(&mut ix) {
                    continue;
                }
                if self.reclaim_now(sh, &mut ix, 0) {
                    continue;
                }
            }
            self.check_open()?;
            shard.cv.wait_for(&mut ix, Duration::from_millis(1));
        }
    }
}
