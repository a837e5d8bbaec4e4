//! Reads: hits straight from pmem, misses from the origin into new slots
//! (or a bounce buffer), published clean.

use super::*;

/// Whether a read may take a cached version with key `k`. Passthrough
/// (`trusted` false) reads clean blocks from the origin (contract §5): the
/// cache may be stale, as in dm-cache's passthrough; dirty ones are the
/// newest data there is.
fn servable(trusted: bool, k: u64) -> bool {
    trusted || k & K_DIRTY != 0
}

/// What a read may do with its data.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Ask {
    /// Hand it to the sink.
    Read,
    /// Hand it to the sink, or back as a relay where it only passes through.
    ReadOrRelay,
    /// Hand it to the sink only if every block is cached and nothing waits.
    CachedOnly,
}

/// How a lookup treats blocks it cannot take at once.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Lookup {
    /// Wait for busy blocks; hits and misses both fine.
    Wait,
    /// Give up (`None`) unless every block is a hit now.
    CachedOnly,
    /// Give up (`None`) unless every block is a miss now.
    MissesOnly,
}

/// How a read ended.
pub(super) enum Served {
    Sent,
    /// `Ask::CachedOnly` declined: nothing sent, nothing held.
    NotNow,
    Relayed(Relayed),
}

impl Engine {
    /// Reads promote their misses (the mode and the configuration allow it).
    pub(super) fn promotes(&self) -> bool {
        self.cfg.promote_reads && self.mode() != CacheMode::Passthrough
    }

    /// Clean cached copies may be read (every mode but passthrough).
    pub(super) fn cache_trusted(&self) -> bool {
        self.mode() != CacheMode::Passthrough
    }

    /// Read `[offset, offset + len)` and hand the bytes to `sink` as slices
    /// that point into the cache where possible.
    pub fn read_with(
        &self,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Result<()> {
        self.read_impl(offset, len, sink, Ask::Read).map(|_| ())
    }

    /// [`read_with`](Self::read_with), except that a read that only passes
    /// through (every block missing, none to be cached: a bypassed stream,
    /// passthrough mode) may come back as a relay pipe the origin filled
    /// (`Some`; `sink` not called), for the caller to splice onwards.
    pub fn read_or_relay(
        &self,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Result<Option<Relayed>> {
        match self.read_impl(offset, len, sink, Ask::ReadOrRelay)? {
            Served::Relayed(r) => Ok(Some(r)),
            Served::Sent | Served::NotNow => Ok(None),
        }
    }

    /// [`read_with`](Self::read_with) if every block is cached and nothing
    /// must wait; `Ok(false)` (sink not called) otherwise. Lets the NBD
    /// connection thread answer hits without a hand-off.
    pub fn try_read_cached(
        &self,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Result<bool> {
        self.read_impl(offset, len, sink, Ask::CachedOnly)
            .map(|s| matches!(s, Served::Sent))
    }

    pub(super) fn read_impl(
        &self,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
        ask: Ask,
    ) -> Result<Served> {
        self.check_request(offset, len)?;
        if len == 0 {
            return sink(&[])
                .map(|()| Served::Sent)
                .map_err(EngineError::Transfer);
        }
        let bs = self.bs();
        let (b0, b1) = (offset / bs, (offset + len - 1) / bs);
        if b0 == b1 {
            if let Some(r) = self.read_block_hit(offset, len, sink) {
                return r.map(|()| Served::Sent);
            }
        }
        let ids = self.shards_of(b0, b1);
        let nblocks = (b1 - b0 + 1) as usize;

        let look = if ask == Ask::CachedOnly {
            Lookup::CachedOnly
        } else {
            Lookup::Wait
        };
        let Some(locs) = self.lookup_range(b0, b1, &ids, look)? else {
            return Ok(Served::NotNow);
        };

        let hits = locs.iter().filter(|l| matches!(l, Loc::Hit { .. })).count() as u64;
        self.counters.add(Ctr::ReadHits, hits);
        self.counters.add(Ctr::ReadMisses, nblocks as u64 - hits);
        self.counters.add(Ctr::ReadBytes, len);
        // A scan's misses go around the cache: hits are still served from it.
        let promotes = self.promotes();
        let bypass =
            promotes && hits < nblocks as u64 && self.streams.bypass(offset, len, false, false);
        if bypass {
            self.counters.add(Ctr::BypassReads, 1);
            self.counters.add(Ctr::BypassBytes, len);
        }
        if ask == Ask::ReadOrRelay && hits == 0 && (bypass || !promotes) {
            if let Some(r) = self.relay_misses(b0, nblocks, offset, len)? {
                return Ok(Served::Relayed(r));
            }
        }

        let misses = self.fetch_misses(b0, &locs, !bypass);
        let result = match misses {
            Err(e) => Err(e),
            Ok((filled, bounce)) => {
                // The client gets its data before the fills are published:
                // making them durable (an msync, where that is the fence)
                // is the cache's business, not the reader's wait.
                let in_slots: &[NewBlock] = if bounce.holds_fills { &[] } else { &filled };
                let r = self.emit(offset, len, b0, &locs, in_slots, &bounce, sink);
                self.commit_fills(filled, &bounce);
                self.recycle(bounce);
                r
            }
        };
        for l in &locs {
            if let Loc::Hit { shard, slot, .. } = *l {
                self.shards[shard].ix.lock().unpin(slot);
            }
        }
        result.map(|()| Served::Sent)
    }

    /// Read a request whose blocks are all missing, and none to be cached,
    /// into a relay pipe. `Ok(None)` if the origin cannot relay it; the
    /// blocks' origin-reader locks are then still held for the usual path,
    /// otherwise they are released.
    fn relay_misses(
        &self,
        b0: u64,
        nblocks: usize,
        offset: u64,
        len: u64,
    ) -> Result<Option<Relayed>> {
        let r = self.origin_retrying("read", offset, || {
            self.origin.read_relayed(offset, len as usize)
        });
        if matches!(r, Ok(None)) {
            return Ok(None);
        }
        self.release_origin_readers(b0..b0 + nblocks as u64);
        match r {
            Ok(relayed) => {
                self.counters.add(Ctr::RelayedBytes, len);
                Ok(relayed)
            }
            Err(source) => Err(EngineError::Origin { offset, source }),
        }
    }

    /// Every block of `[b0, b1]` looked up under all its shard locks at
    /// once, so the request sees each concurrent write either wholly or not
    /// at all: hits pinned, misses holding an origin-reader lock. Waits out
    /// blocks being written or written back, except with `Lookup::CachedOnly`
    /// or `Lookup::MissesOnly`: those return `None` (nothing held) instead of
    /// waiting or of a block of the other kind.
    pub(super) fn lookup_range(
        &self,
        b0: u64,
        b1: u64,
        ids: &[usize],
        look: Lookup,
    ) -> Result<Option<Vec<Loc>>> {
        let mut locs: Vec<Loc> = Vec::with_capacity((b1 - b0 + 1) as usize);
        let trusted = self.cache_trusted();
        loop {
            let mut g = self.lock_all(ids);
            locs.clear();
            let mut blocked = None;
            let mut damaged = None;
            for b in b0..=b1 {
                let sh = self.shard_of(b);
                let ix = &mut g[Self::guard_pos(ids, sh)];
                let cached = ix.lookup(b).filter(|&s| servable(trusted, ix.key(s)));
                match cached {
                    Some(_) if look == Lookup::MissesOnly => {
                        blocked = Some(sh);
                        break;
                    }
                    Some(s) if ix.pin(s) => {
                        if !self.verify_loaded(ix, s) {
                            // A clean copy is dropped and the lookup starts
                            // over (a miss now); a dirty one fails the read.
                            damaged = Some(self.damaged(ix, s, b));
                            break;
                        }
                        ix.touch(s);
                        locs.push(Loc::Hit {
                            shard: sh,
                            slot: s,
                            zero: ix.key(s) & K_ZERO != 0,
                        })
                    }
                    Some(_) => {
                        blocked = Some(sh);
                        break;
                    }
                    None if ix.lock_state(b).origin_writer => {
                        blocked = Some(sh);
                        break;
                    }
                    None if look == Lookup::CachedOnly => {
                        blocked = Some(sh);
                        break;
                    }
                    None => locs.push(Loc::Miss),
                }
            }
            if let Some(d) = damaged {
                Self::unpin_hits(ids, &mut g, &locs);
                match d {
                    Some(e) => return Err(e),
                    None => continue,
                }
            }
            if look != Lookup::Wait && blocked.is_some() {
                Self::unpin_hits(ids, &mut g, &locs);
                return Ok(None);
            }
            match blocked {
                None => {
                    for (i, b) in (b0..=b1).enumerate() {
                        if matches!(locs[i], Loc::Miss) {
                            g[Self::guard_pos(ids, self.shard_of(b))]
                                .update_lock(b, |l| l.origin_readers += 1);
                        }
                    }
                    break;
                }
                Some(sh) => {
                    Self::unpin_hits(ids, &mut g, &locs);
                    let pos = Self::guard_pos(ids, sh);
                    let mut mine = g.swap_remove(pos);
                    drop(g);
                    self.shards[sh]
                        .cv
                        .wait_for(&mut mine, Duration::from_millis(5));
                }
            }
        }
        Ok(Some(locs))
    }

    /// For NBD's base:allocation: runs of `(bytes, zero)` from `offset`,
    /// at most `len` bytes and 8,192 blocks in all (a client asks again for
    /// the rest). `zero` where the cache holds the block as zeroes (a trim
    /// or zeroing); everything else is data as far as the cache knows.
    pub fn zero_extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        // Any length: nothing is transferred.
        self.check_open()?;
        self.check_range(offset, len)?;
        let bs = self.bs();
        let end = (offset + len).min((offset / bs + 8192) * bs);
        let trusted = self.cache_trusted();
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        while at < end {
            let b = at / bs;
            let zero = {
                let ix = self.shards[self.shard_of(b)].ix.lock();
                ix.lookup(b).is_some_and(|s| {
                    let k = ix.key(s);
                    k & K_ZERO != 0 && servable(trusted, k)
                })
            };
            let n = ((b + 1) * bs).min(end) - at;
            match out.last_mut() {
                Some((l, z)) if *z == zero => *l += n,
                _ => out.push((n, zero)),
            }
            at += n;
        }
        Ok(out)
    }

    /// A read within one cached block, without the general path's
    /// bookkeeping (what `read_impl` does for a request that hits).
    /// `None` on a miss or a saturated pin count; the general path then
    /// takes the request.
    pub(super) fn read_block_hit(
        &self,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Option<Result<()>> {
        let bs = self.bs();
        let b = offset / bs;
        let sh = self.shard_of(b);
        let shard = &self.shards[sh];
        shard.prefetch_bucket(b);
        let mut ix = shard.ix.lock();
        let s = ix.lookup(b)?;
        if !servable(self.cache_trusted(), ix.key(s)) || !ix.pin(s) {
            return None;
        }
        if !self.verify_loaded(&mut ix, s) {
            // A clean copy is dropped: the general path reads the origin.
            return self.damaged(&mut ix, s, b).map(Err);
        }
        ix.touch(s);
        let zero = ix.key(s) & K_ZERO != 0;
        let first = ix.first_slot;
        drop(ix);
        self.counters.add(Ctr::ReadHits, 1);
        self.counters.add(Ctr::ReadBytes, len);
        let lo = (offset - b * bs) as usize;
        let bytes = if zero {
            &self.zeros[lo..lo + len as usize]
        } else {
            // SAFETY: pinned above; unpinned after the sink returns.
            unsafe { self.pinned_bytes(first, s, lo, len as usize) }
        };
        let r = sink(&[IoSlice::new(bytes)]).map_err(EngineError::Transfer);
        shard.ix.lock().unpin(s);
        Some(r)
    }

    /// Bytes of a slot's data.
    ///
    /// # Safety
    /// The caller holds a pin on the slot (or owns it, after a fill) until
    /// it drops the slice: pinned slots are never handed to writers
    /// (copy-on-write), so nobody writes the bytes meanwhile.
    pub(super) unsafe fn pinned_bytes(&self, first: u64, s: u32, lo: usize, len: usize) -> &[u8] {
        // SAFETY: as the caller guarantees.
        unsafe { self.region.slice(self.data(first, s) + lo, len) }
    }

    /// Drop the pins a lookup took, with its shard locks still held.
    pub(super) fn unpin_hits(ids: &[usize], g: &mut [MutexGuard<'_, ShardIndex>], locs: &[Loc]) {
        for l in locs {
            if let Loc::Hit { shard, slot, .. } = *l {
                g[Self::guard_pos(ids, shard)].unpin(slot);
            }
        }
    }

    /// Build the slices of a read and call the sink. Neighbouring blocks
    /// whose bytes are adjacent (consecutive slots, consecutive bounce
    /// blocks) go out as one slice: a 1 MiB read written in order is then a
    /// few slices instead of 256, which a TLS session can encrypt straight
    /// from the cache instead of gathering 4 KiB pieces into records.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn emit(
        &self,
        offset: u64,
        len: u64,
        b0: u64,
        locs: &[Loc],
        filled: &[NewBlock],
        bounce: &Bounce,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Result<()> {
        let bs = self.bs();
        let mut pieces: Vec<Piece> = Vec::with_capacity(locs.len());
        let (mut fi, mut bi) = (0, 0);
        for (i, loc) in locs.iter().enumerate() {
            let b = b0 + i as u64;
            let lo = if i == 0 { offset - b * bs } else { 0 } as usize;
            let hi = if b == (offset + len - 1) / bs {
                offset + len - b * bs
            } else {
                bs
            } as usize;
            let piece = match *loc {
                Loc::Hit { zero: true, .. } => Piece::Zero(lo, hi),
                Loc::Hit { shard, slot, .. } => self.slot_piece(shard, slot, lo, hi),
                Loc::Miss if fi < filled.len() && filled[fi].block == b => {
                    fi += 1;
                    self.slot_piece(filled[fi - 1].shard, filled[fi - 1].slot, lo, hi)
                }
                Loc::Miss => {
                    bi += 1;
                    let at = (bi - 1) * bs as usize;
                    debug_assert_eq!(bounce.blocks[bi - 1], b);
                    Piece::Bounce(at + lo, at + hi)
                }
            };
            match (pieces.last_mut(), piece) {
                (Some(Piece::Region(_, e)), Piece::Region(s, n)) if *e == s => *e = n,
                (Some(Piece::Bounce(_, e)), Piece::Bounce(s, n)) if *e == s => *e = n,
                (_, p) => pieces.push(p),
            }
        }
        let slices: Vec<IoSlice<'_>> = pieces
            .iter()
            .map(|p| match *p {
                Piece::Zero(lo, hi) => IoSlice::new(&self.zeros[lo..hi]),
                Piece::Bounce(s, e) => IoSlice::new(&bounce.buf[s..e]),
                // SAFETY: every slot in the range is a hit pinned by this
                // request or a fill it owns, until after the sink returns.
                Piece::Region(s, e) => IoSlice::new(unsafe { self.region.slice(s, e - s) }),
            })
            .collect();
        sink(&slices).map_err(EngineError::Transfer)
    }

    /// Where a slot's bytes `[lo, hi)` are in the region.
    fn slot_piece(&self, shard: usize, slot: u32, lo: usize, hi: usize) -> Piece {
        let off = self.data(self.firsts[shard], slot);
        Piece::Region(off + lo, off + hi)
    }

    /// New slots for the missed blocks (sorted) that are admitted and fit
    /// now, without waiting; the rest are read without a slot. Both lists
    /// come back in block order.
    pub(super) fn promotion_slots(&self, missing: &[u64]) -> (Vec<NewBlock>, Vec<u64>) {
        let bs = self.bs() as u32;
        let mut filled: Vec<NewBlock> = Vec::new();
        let mut unslotted: Vec<u64> = Vec::new();
        let (first, last) = (missing[0], missing[missing.len() - 1]);
        for sh in self.shards_of(first, last) {
            // The shard's room, read once for all its blocks, where the
            // promotion filter is on (msync mode; see `crate::promotion`).
            let room = self.promotion.filters().then(|| {
                let ix = self.shards[sh].ix.lock();
                (ix.free_len as u64, ix.nslots() as u64)
            });
            let (mine, passing): (Vec<u64>, Vec<u64>) = missing
                .iter()
                .copied()
                .filter(|&b| self.shard_of(b) == sh)
                .partition(|&b| room.is_none_or(|(free, n)| self.promotion.admit(b, free, n)));
            unslotted.extend(&passing);
            if mine.is_empty() {
                continue;
            }
            match self.alloc(sh, mine.len(), Space::GiveUp, None) {
                Ok(Some(slots)) => {
                    filled.extend(mine.iter().zip(&slots).map(|(&block, &slot)| NewBlock {
                        block,
                        shard: sh,
                        slot,
                        zero: false,
                        on_origin: false,
                        lo: 0,
                        hi: bs,
                    }))
                }
                _ => unslotted.extend(&mine),
            }
        }
        filled.sort_by_key(|n| n.block);
        unslotted.sort_unstable();
        (filled, unslotted)
    }

    /// Fetch the missed blocks from the origin: into new cache slots where
    /// the mode promotes and there is room, else into bounce buffers.
    /// Releases the origin-reader locks taken by the lookup.
    pub(super) fn fetch_misses(&self, b0: u64, locs: &[Loc], promote: bool) -> Result<Fetched> {
        let bs = self.bs() as usize;
        let missing: Vec<u64> = locs
            .iter()
            .enumerate()
            .filter(|(_, l)| matches!(l, Loc::Miss))
            .map(|(i, _)| b0 + i as u64)
            .collect();
        if missing.is_empty() {
            return Ok((Vec::new(), Bounce::default()));
        }
        let promote = promote && self.promotes();
        let (filled, unslotted) = if promote {
            self.promotion_slots(&missing)
        } else {
            (Vec::new(), missing.clone())
        };

        // Origin → slots (or bounce), one vectored request per contiguous run.
        // Where the fence is an msync, everything lands in the bounce buffer
        // and the fills are written into their slots with `pwrite` (see
        // `copy_flush_hash`): a store through the mapping would make the
        // kernel read each slot's page from disk first.
        let holds_fills = self.fence_is_syscall() && !filled.is_empty();
        let mut targets: Vec<(u64, IoSliceMut<'_>)> = Vec::with_capacity(missing.len());
        if !holds_fills {
            self.slot_targets(&filled, &mut targets);
        }
        let mut bounce = self.bounce(if holds_fills {
            missing.clone()
        } else {
            unslotted.clone()
        });
        bounce.holds_fills = holds_fills;
        for (b, v) in bounce.blocks.iter().zip(bounce.buf.chunks_exact_mut(bs)) {
            targets.push((*b, IoSliceMut::new(v)));
        }
        targets.sort_by_key(|t| t.0);
        let res = self.read_runs(&mut targets);
        drop(targets);
        // Bounce buffers publish nothing: their reader locks can go now. A
        // filled block keeps its lock until `commit_fill` has decided, under
        // the same shard lock, whether its data may still be published.
        self.release_origin_readers(unslotted.iter().copied());
        if let Err(source) = res {
            self.release_origin_readers(filled.iter().map(|nb| nb.block));
            self.release_slots(&filled);
            return Err(EngineError::Origin {
                offset: missing[0] * bs as u64,
                source,
            });
        }
        Ok((filled, bounce))
    }

    /// The new slots of `filled` as read targets, each with its block.
    fn slot_targets<'a>(&'a self, filled: &[NewBlock], targets: &mut Vec<(u64, IoSliceMut<'a>)>) {
        let bs = self.bs() as usize;
        for nb in filled {
            let first = self.firsts[nb.shard];
            // SAFETY: the slot was just taken from the free list and is
            // not published, so this request is its only user.
            let buf = unsafe { self.region.slice_mut(self.data(first, nb.slot), bs) };
            targets.push((nb.block, IoSliceMut::new(buf)));
        }
    }

    /// Read the `targets` (sorted by block) from the origin, one vectored
    /// request per run of consecutive blocks, in order; stops at the first
    /// run that fails.
    fn read_runs(&self, targets: &mut [(u64, IoSliceMut<'_>)]) -> io::Result<()> {
        let bs = self.bs() as usize;
        let mut res = Ok(());
        let mut i = 0;
        while i < targets.len() && res.is_ok() {
            let mut j = i + 1;
            while j < targets.len() && targets[j].0 == targets[j - 1].0 + 1 {
                j += 1;
            }
            let start = targets[i].0;
            let end = (start + (j - i) as u64) * bs as u64;
            // The last block may extend past the origin's end: zero the tail.
            let keep_last = bs - end.saturating_sub(self.size) as usize;
            let n = j - i;
            let mut run: Vec<IoSliceMut<'_>> = targets[i..j]
                .iter_mut()
                .enumerate()
                .map(|(k, t)| {
                    let sl: &mut [u8] = &mut t.1;
                    if k + 1 == n && keep_last < bs {
                        sl[keep_last..].fill(0);
                        IoSliceMut::new(&mut sl[..keep_last])
                    } else {
                        IoSliceMut::new(sl)
                    }
                })
                .collect();
            res = self.origin_read_retrying(&mut run, start * bs as u64);
            i = j;
        }
        res
    }

    /// An origin request, tried again after short pauses before the client
    /// sees an error: one failed request of a flaky origin costs a retry,
    /// not a failed client request.
    pub(super) fn origin_retrying<T>(
        &self,
        what: &str,
        offset: u64,
        mut op: impl FnMut() -> io::Result<T>,
    ) -> io::Result<T> {
        let mut pause = Duration::from_millis(1);
        let mut attempt = 1;
        loop {
            match op() {
                Ok(v) => return Ok(v),
                Err(e) => {
                    self.counters.add(Ctr::OriginErrors, 1);
                    if attempt >= ORIGIN_ATTEMPTS || self.check_open().is_err() {
                        tracing::warn!(offset, error = %e, attempt, "origin {what} failed");
                        return Err(e);
                    }
                    tracing::debug!(offset, error = %e, attempt, "origin {what} failed; retrying");
                }
            }
            std::thread::sleep(pause);
            pause *= 4;
            attempt += 1;
        }
    }

    pub(super) fn origin_read_retrying(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        offset: u64,
    ) -> io::Result<()> {
        self.origin_retrying("read", offset, || {
            self.origin.read_vectored_at(bufs, offset)
        })
    }

    pub(super) fn release_origin_readers(&self, blocks: impl Iterator<Item = u64>) {
        for b in blocks {
            let sh = self.shard_of(b);
            self.shards[sh]
                .ix
                .lock()
                .update_lock(b, |l| l.origin_readers -= 1);
            self.shards[sh].cv.notify_all();
        }
    }

    /// Publish freshly read blocks as clean cache entries. A block that a
    /// writer took meanwhile is not published: the writer's version is newer.
    ///
    /// The caller still holds each block's origin-reader lock, so since the
    /// read no origin write (writeback, writethrough, writearound) can have
    /// changed the block on the origin; a newer version can only be in the
    /// index or under a writer lock, which the check (`claim_fills`) sees.
    /// The reader lock is dropped in the same critical section as that
    /// check, and a kept block holds the writer lock from there to its
    /// publish.
    pub(super) fn commit_fill(&self, filled: &mut [NewBlock], from: Option<&Bounce>) {
        let ids = Self::fill_shards(filled);
        let keep = self.claim_fills(filled, &ids);
        if let Some((t, staged)) = self.store_fills(filled, &keep, from) {
            self.region.fence();
            self.seq.end(t, staged);
        }
        self.publish_fills(filled, &keep, &ids);
    }

    /// A miss's fills, once its client has the data: committed and
    /// unpinned, here or (where the fence is an msync) by the thread that
    /// makes the msync.
    pub(super) fn commit_fills(&self, mut filled: Vec<NewBlock>, bounce: &Bounce) {
        if filled.is_empty() {
            return;
        }
        self.test_hook(HookPoint::FillRead);
        if bounce.holds_fills {
            self.commit_fill_later(filled, bounce);
        } else {
            self.commit_fill(&mut filled, None);
            self.unpin_all(&filled);
        }
    }

    /// [`commit_fill`](Self::commit_fill) of fills held in the bounce buffer
    /// `from`, where the fence is an msync, and then the fills' pins
    /// dropped: the fence is shared with the commits around it and finished
    /// by the thread that makes it, which publishes; the caller goes on at
    /// once (it has answered its client already).
    fn commit_fill_later(&self, mut filled: Vec<NewBlock>, from: &Bounce) {
        let me = self.me.get().and_then(|w| w.upgrade());
        let Some(me) = me.filter(|_| self.begin_async_commit()) else {
            self.commit_fill(&mut filled, Some(from));
            self.unpin_all(&filled);
            return;
        };
        let ids = Self::fill_shards(&filled);
        let keep = self.claim_fills(&filled, &ids);
        let Some((t, staged)) = self.store_fills(&filled, &keep, Some(from)) else {
            self.end_async_commit();
            self.publish_fills(&filled, &keep, &ids);
            self.unpin_all(&filled);
            return;
        };
        self.region.fence_async(Box::new(move |r| {
            match r {
                Ok(()) => {
                    me.seq.end(t, staged);
                    me.publish_fills(&filled, &keep, &ids);
                }
                Err(why) => {
                    // Nothing after a failed msync is durable: the ticket
                    // stays taken and the slots stay out of use; writers
                    // of the blocks may go on (and fail at their fence).
                    tracing::error!(%why, "a read fill's fence failed; not cached");
                    me.drop_fills(&filled, &keep, &ids);
                }
            }
            me.unpin_all(&filled);
            me.end_async_commit();
        }));
    }

    /// The distinct shards of `filled`, ascending.
    fn fill_shards(filled: &[NewBlock]) -> ShardIds {
        let mut v: ShardIds = filled.iter().map(|n| n.shard).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The check of [`commit_fill`], under all the fills' shard locks at
    /// once: each block's origin-reader lock is dropped, and a block that
    /// is neither indexed nor held by a writer is kept and takes the
    /// writer lock. Returns which blocks are kept.
    fn claim_fills(&self, filled: &[NewBlock], ids: &[usize]) -> Vec<bool> {
        let mut keep = vec![false; filled.len()];
        {
            let mut g = self.lock_all(ids);
            for (i, nb) in filled.iter().enumerate() {
                let ix = &mut g[Self::guard_pos(ids, nb.shard)];
                let lock = ix.lock_state(nb.block);
                assert!(lock.origin_readers > 0 && !lock.origin_writer);
                ix.update_lock(nb.block, |l| l.origin_readers -= 1);
                if ix.lookup(nb.block).is_none() && !lock.writer {
                    ix.update_lock(nb.block, |l| l.writer = true);
                    keep[i] = true;
                }
            }
        }
        for &sh in ids {
            self.shards[sh].cv.notify_all();
        }
        keep
    }

    /// The kept fills' stores, one transaction: their data flushed (or
    /// written from the bounce buffer `from`), their CLEAN entries, the
    /// watermark. The caller fences, then ends the ticket with the staged
    /// S. `None` when nothing is kept.
    fn store_fills(
        &self,
        filled: &[NewBlock],
        keep: &[bool],
        from: Option<&Bounce>,
    ) -> Option<(crate::txn::Ticket, u64)> {
        let count = keep.iter().filter(|&&k| k).count() as u32;
        if count == 0 {
            return None;
        }
        let t = self.seq.begin();
        for (i, nb) in filled.iter().enumerate() {
            if keep[i] {
                let first = self.firsts[nb.shard];
                let data_off = self.data(first, nb.slot);
                let hash = match from {
                    // SAFETY: unpublished slot owned by this request.
                    Some(b) => unsafe { self.region.copy_flush_hash(data_off, b.block(nb.block)) },
                    None => {
                        // SAFETY: as above; read only.
                        let h =
                            data_hash(unsafe { self.region.slice(data_off, self.bs() as usize) });
                        self.region.flush(data_off, self.bs() as usize);
                        h
                    }
                };
                let e = Entry {
                    block: nb.block,
                    seq: t.seq,
                    hash,
                    count,
                    flags: 0,
                    // Clean: no epoch owes it to the origin.
                    epoch: 0,
                };
                self.write_entry(self.firsts[nb.shard], nb.slot, &e, STATE_CLEAN);
            }
        }
        let staged = self.seq.stage_watermark(&*self.region);
        Some((t, staged))
    }

    /// After a failed fence: the kept fills give back their writer locks
    /// and are never published.
    fn drop_fills(&self, filled: &[NewBlock], keep: &[bool], ids: &[usize]) {
        let mut g = self.lock_all(ids);
        for (nb, _) in filled.iter().zip(keep).filter(|(_, &k)| k) {
            let ix = &mut g[Self::guard_pos(ids, nb.shard)];
            ix.update_lock(nb.block, |l| l.writer = false);
        }
        drop(g);
        for &sh in ids {
            self.shards[sh].cv.notify_all();
        }
    }

    /// After the fence: the kept fills go into the index (clean) and give
    /// back their writer locks; the others' slots, which never got an
    /// entry, retire.
    fn publish_fills(&self, filled: &[NewBlock], keep: &[bool], ids: &[usize]) {
        let mut g = self.lock_all(ids);
        for (i, nb) in filled.iter().enumerate() {
            let ix = &mut g[Self::guard_pos(ids, nb.shard)];
            if keep[i] {
                ix.insert_version(nb.slot, nb.block, 0, 0);
                ix.policy.insert(nb.slot);
                ix.update_lock(nb.block, |l| l.writer = false);
                self.counters.add(Ctr::Promotions, 1);
            } else {
                // Never got an entry: still durably FREE. The reader keeps
                // its pin until it has sent the data.
                ix.retiring.push(Retired {
                    slot: nb.slot,
                    seq: 0,
                    state: RState::Durable,
                    own: true,
                });
            }
        }
        drop(g);
        for &sh in ids {
            self.shards[sh].cv.notify_all();
        }
    }

    /// Read into a caller buffer (a convenience over [`read_with`]).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut pos = 0;
        self.read_with(offset, buf.len() as u64, &mut |slices| {
            for s in slices {
                buf[pos..pos + s.len()].copy_from_slice(s);
                pos += s.len();
            }
            Ok(())
        })
    }

    /// Prefetch a range into the cache (NBD_CMD_CACHE).
    pub fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        let max = self.cfg.max_request as u64;
        let mut done = 0;
        while done < len {
            let n = max.min(len - done);
            self.read_with(offset + done, n, &mut |_| Ok(()))?;
            done += n;
        }
        Ok(())
    }
}
