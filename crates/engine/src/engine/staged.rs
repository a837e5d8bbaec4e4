//! Writes in two halves, so a server can receive a payload straight into
//! its cache slots on the connection's reader thread and leave the rest
//! (fence, publish, the writethrough origin write) to another thread while
//! the reader goes on with the next request. Where a fence is an msync, the
//! payload goes into a buffer instead (see `copy_flush_hash`), and the
//! commit's msync is shared with the writes around it and finished by the
//! thread that makes it, which then publishes and answers.
//!
//! The first half never waits: it takes the writer locks and free slots
//! only if they are available now, and otherwise takes nothing and says
//! [`Stage::WouldWait`]; the caller then receives the payload into a buffer
//! of its own and makes an ordinary [`Engine::write`] on a thread that may
//! wait. Between the halves the staged write holds the writer locks of its
//! blocks, so overlapping writes are ordered exactly as the one-call write
//! orders them, and nothing of it is visible or durable: dropping it
//! without a commit writes nothing.

use std::io::{self, IoSliceMut};
use std::sync::Arc;

use parking_lot::MutexGuard;

use pmcache_origin::Completion;

use super::{Blocks, Engine, Filled, NewBlock, Space, Src, Staging};
use crate::error::{EngineError, Result};
use crate::format::CacheMode;
use crate::index::ShardIndex;
use crate::stats::Ctr;

/// What [`Engine::stage_write`] did.
pub enum Stage {
    /// The payload is in the slots; [`StagedWrite::commit`] finishes it.
    Staged(Box<StagedWrite>),
    /// It would have to wait (a writer holds a block, no free slot, a
    /// partial block to merge, or a mode that writes the origin first).
    /// `source` was not called and nothing is held.
    WouldWait,
}

/// A write whose payload is in its (unpublished) slots and whose blocks'
/// writer locks are held. Dropping it without [`commit`](Self::commit)
/// gives everything back and writes nothing.
pub struct StagedWrite {
    engine: Arc<Engine>,
    /// Taken by `commit`; `Some` means the drop must give it back.
    st: Option<Staging>,
    mode: CacheMode,
    len: u64,
    fua: bool,
    b0: u64,
    b1: u64,
    /// Where a fence is an msync: the payload, written into the slots
    /// with `pwrite` by the commit. Otherwise it is in the slots already.
    buf: Option<Vec<u8>>,
}

impl Engine {
    /// The first half of a write of `[offset, offset + len)` whose payload
    /// `source` puts straight into the cache slots, without ever waiting.
    /// Errors are those of [`write_with`](Self::write_with); after
    /// [`EngineError::Transfer`] nothing is held or written.
    pub fn stage_write(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
        source: &mut dyn FnMut(&mut [IoSliceMut<'_>]) -> io::Result<()>,
    ) -> Result<Stage> {
        self.check_request(offset, len)?;
        let mode = self.mode();
        let bs = self.bs();
        // Partial blocks merge old content (maybe from the origin), and
        // writearound / passthrough write the origin before anything else:
        // both may wait, so they take the one-call path.
        let whole = len > 0 && offset.is_multiple_of(bs) && (offset + len).is_multiple_of(bs);
        if !whole || !matches!(mode, CacheMode::Writeback | CacheMode::Writethrough) {
            return Ok(Stage::WouldWait);
        }
        // Where persistence is a system call (msync), a payload received
        // through the mapping would fault each page in from disk first: it
        // goes into a buffer, which the commit writes with `pwrite` (see
        // `copy_flush_hash`). Writeback mode only; a writethrough commit
        // waits for the origin as long as the one-call path would.
        let msync = self.fence_is_syscall();
        if msync && mode != CacheMode::Writeback {
            return Ok(Stage::WouldWait);
        }
        // A sequential stream past the cutoff goes around the cache, which
        // the one-call path does. Recorded here, in the client's order; that
        // path sees the request again, on a worker maybe far behind, and
        // follows this decision.
        if self.streams.bypass_handed_on(offset, len, true, fua) {
            return Ok(Stage::WouldWait);
        }
        let (b0, b1) = (offset / bs, (offset + len - 1) / bs);
        let Some(held) = self.try_lock_writers(b0, b1) else {
            return Ok(Stage::WouldWait);
        };
        let mut src = if msync {
            // Staging reads no data; the payload is received below.
            Src::Buf(&[])
        } else {
            Src::Fill(&mut *source)
        };
        match self.cache_stage(offset, len, &mut src, b0, b1, held, Space::GiveUp) {
            Ok(Some((st, kept))) => {
                // A payload received into the slots never keeps its shard
                // locked (the lock would stall everyone during the recv).
                debug_assert!(kept.is_none());
                drop(kept);
                let mut w = Box::new(StagedWrite {
                    engine: self.clone(),
                    st: Some(st),
                    mode,
                    len,
                    fua,
                    b0,
                    b1,
                    buf: None,
                });
                if msync {
                    let mut buf = vec![0u8; len as usize];
                    // A failed receive drops `w`: nothing written.
                    source(&mut [IoSliceMut::new(&mut buf)]).map_err(EngineError::Transfer)?;
                    w.buf = Some(buf);
                }
                Ok(Stage::Staged(w))
            }
            Ok(None) => {
                self.unlock_writers(b0, b1);
                Ok(Stage::WouldWait)
            }
            Err(e) => {
                self.unlock_writers(b0, b1);
                Err(e)
            }
        }
    }

    /// [`lock_writers`](Self::lock_writers) without waiting: `None` (and
    /// nothing taken) when a writer holds one of the blocks.
    pub(super) fn try_lock_writers(
        &self,
        b0: u64,
        b1: u64,
    ) -> Option<Option<MutexGuard<'_, ShardIndex>>> {
        let ids = self.shards_of(b0, b1);
        let mut held = None;
        for (k, &sh) in ids.iter().enumerate() {
            let mut ix = self.shards[sh].ix.lock();
            let mine = |b: &u64| self.shard_of(*b) == sh;
            if (b0..=b1).filter(mine).any(|b| ix.lock_state(b).writer) {
                drop(ix);
                self.unlock_writers_in(&ids[..k], b0, b1);
                return None;
            }
            for b in (b0..=b1).filter(mine) {
                ix.update_lock(b, |l| l.writer = true);
            }
            if ids.len() == 1 {
                held = Some(ix);
            }
        }
        Some(held)
    }

    /// Drop the writer locks of the blocks of `[b0, b1]` in shards `ids`.
    fn unlock_writers_in(&self, ids: &[usize], b0: u64, b1: u64) {
        for &sh in ids {
            let mut ix = self.shards[sh].ix.lock();
            for b in (b0..=b1).filter(|&b| self.shard_of(b) == sh) {
                ix.update_lock(b, |l| l.writer = false);
            }
            drop(ix);
            self.shards[sh].cv.notify_all();
        }
    }
}

impl StagedWrite {
    /// The commit never waits: writeback mode (no origin write) with a
    /// fence that is a CPU instruction, not an msync.
    pub fn commit_is_quick(&self) -> bool {
        self.mode == CacheMode::Writeback && !self.engine.fence_is_syscall()
    }

    /// The second half: persist and publish the slots and, in writethrough
    /// mode, write the origin. Returns once the write is durable as the
    /// mode requires (what one [`Engine::write_with`] call promises).
    pub fn commit(mut self) -> Result<()> {
        let Some(st) = self.st.take() else {
            return Ok(());
        };
        let e = &*self.engine;
        let writeback = self.mode == CacheMode::Writeback;
        let data = match &self.buf {
            Some(b) => Filled::Buf(b),
            None => Filled::InSlots,
        };
        // In writeback mode the publish releases pins and writer locks.
        let nbs = e.cache_commit(st, None, data, writeback);
        if writeback {
            e.count_write(self.len);
            return Ok(());
        }
        e.lock_origin_writers(self.b0, self.b1);
        let failed = e.write_blocks_retrying(&nbs);
        e.end_staged_through(&nbs, self.len, self.fua, failed)
    }
}

/// Where [`StagedWrite::commit_async`] reports, from the thread that
/// finishes the write: the origin connection's reader, or the thread that
/// made the msync.
pub trait WriteReply: Send + 'static {
    /// The write is done: durable as the mode requires.
    fn reply(self: Box<Self>, r: Result<()>);
    /// The origin write failed: `finish` (which may wait) tries it again
    /// and returns the write's outcome; it must run on a thread that may
    /// wait.
    fn retry(self: Box<Self>, finish: Box<dyn FnOnce() -> Result<()> + Send>);
}

impl StagedWrite {
    /// The second half without waiting here, where something else finishes
    /// it: the msync of a writeback-mode commit (the syncer thread, see
    /// [`Self::commit_synced_later`]), or a writethrough's origin write
    /// ([`Self::commit_through`]). `Err` hands both back, for
    /// [`commit`](Self::commit) on a thread that may wait.
    pub fn commit_async<R: WriteReply>(
        self: Box<Self>,
        reply: R,
    ) -> std::result::Result<(), (Box<StagedWrite>, R)> {
        self.start_commit(reply, false)
    }

    /// [`commit_async`](Self::commit_async) for a caller with nothing else
    /// to do (a connection with no other request in flight): where no other
    /// msync is running or waiting, the msync is made here and `reply` told
    /// before the return, sparing the wake-up of the thread that would
    /// make it.
    pub fn commit_when_idle<R: WriteReply>(
        self: Box<Self>,
        reply: R,
    ) -> std::result::Result<(), (Box<StagedWrite>, R)> {
        self.start_commit(reply, true)
    }

    /// [`commit_async`](Self::commit_async), with `idle` as
    /// [`commit_when_idle`](Self::commit_when_idle) has it.
    fn start_commit<R: WriteReply>(
        self: Box<Self>,
        reply: R,
        idle: bool,
    ) -> std::result::Result<(), (Box<StagedWrite>, R)> {
        if self.buf.is_some() && self.mode == CacheMode::Writeback {
            return self.commit_synced_later(reply, idle);
        }
        self.commit_through(reply)
    }

    /// A writeback-mode commit whose fence is an msync: the persistence
    /// stores here, and `reply` told by the thread that made the msync, once
    /// the write is durable and published (this one if `idle`, see
    /// [`Self::commit_when_idle`]). `Err` when too many are in flight
    /// already.
    fn commit_synced_later<R: WriteReply>(
        mut self: Box<Self>,
        reply: R,
        idle: bool,
    ) -> std::result::Result<(), (Box<StagedWrite>, R)> {
        let e = self.engine.clone();
        let (st, buf) = match (self.st.take(), self.buf.take()) {
            (Some(st), Some(buf)) if e.begin_async_commit() => (st, buf),
            (st, buf) => {
                (self.st, self.buf) = (st, buf);
                return Err((self, reply));
            }
        };
        let (len, eng) = (self.len, e.clone());
        let then = Box::new(move |r: Result<Blocks>| {
            eng.end_async_commit();
            if r.is_ok() {
                eng.count_write(len);
            }
            Box::new(reply).reply(r.map(|_| ()));
        });
        e.cache_commit_async(st, Filled::Buf(&buf), (self.b0, self.b1), idle, then);
        Ok(())
    }

    /// The second half of a writethrough without waiting for the origin:
    /// the cache commit here (a fence on pmem), the origin write put in
    /// flight, and `reply` told once the origin has it. `Err` hands both
    /// back, for [`commit`](Self::commit) on a thread that may wait, where
    /// that cannot be: another mode, FUA, msync mode, an origin without
    /// callback writes, a block whose origin lock is taken.
    pub fn commit_through<R: WriteReply>(
        mut self: Box<Self>,
        reply: R,
    ) -> std::result::Result<(), (Box<StagedWrite>, R)> {
        let e = self.engine.clone();
        let (b0, b1) = (self.b0, self.b1);
        let applies = self.mode == CacheMode::Writethrough
            && !self.fua
            && !e.fence_is_syscall()
            && e.origin.writes_async()
            && self.st.is_some();
        if !applies || !e.try_lock_origin_writers(b0, b1) {
            return Err((self, reply));
        }
        let st = self.st.take().expect("checked above");
        // Published, still pinned and writer-locked: nothing changes the
        // slots until the origin write is done.
        let nbs = e.cache_commit(st, None, Filled::InSlots, false);
        let pieces = e.through_pieces(&nbs);
        let (len, eng) = (self.len, e.clone());
        let reply: Box<dyn WriteReply> = Box::new(reply);
        let done: Completion = Box::new(move |r| eng.through_written(nbs, len, r, reply));
        // SAFETY: the pieces are the write's pinned slots, whose blocks'
        // writer locks it holds: no one writes them until `done` has run.
        if let Err(done) = unsafe { e.origin.write_raw_async(b0 * e.bs(), &pieces, done) } {
            done(Err(io::Error::other(
                "the origin cannot take the write now",
            )));
        }
        Ok(())
    }
}

impl Engine {
    /// A staged write's slots as the origin write's payload, in block order;
    /// the last block only up to the origin's end.
    fn through_pieces(&self, nbs: &[NewBlock]) -> Vec<(*const u8, usize)> {
        let bs = self.bs();
        debug_assert!(nbs.windows(2).all(|w| w[1].block == w[0].block + 1));
        nbs.iter()
            .map(|nb| {
                debug_assert!(
                    nb.lo == 0 && u64::from(nb.hi) == bs,
                    "staged blocks are whole"
                );
                let keep = (self.size - nb.block * bs).min(bs) as usize;
                let off = self.data(self.firsts[nb.shard], nb.slot);
                // SAFETY: a pinned, published slot; read only.
                (unsafe { self.region.slice(off, keep) }.as_ptr(), keep)
            })
            .collect()
    }

    /// The origin write of [`StagedWrite::commit_through`] is done.
    fn through_written(
        self: &Arc<Self>,
        nbs: Blocks,
        len: u64,
        r: io::Result<()>,
        reply: Box<dyn WriteReply>,
    ) {
        if r.is_ok() {
            reply.reply(self.end_staged_through(&nbs, len, false, None));
            return;
        }
        self.counters.add(Ctr::OriginErrors, 1);
        let e = self.clone();
        reply.retry(Box::new(move || {
            let failed = e.write_blocks_retrying(&nbs);
            e.end_staged_through(&nbs, len, false, failed)
        }));
    }

    /// A staged writethrough's end: `end_through`, then the writer locks
    /// dropped and the write counted.
    fn end_staged_through(
        &self,
        nbs: &[NewBlock],
        len: u64,
        fua: bool,
        failed: Option<EngineError>,
    ) -> Result<()> {
        let r = self.end_through(nbs, fua, failed);
        self.unlock_writers(nbs[0].block, nbs[nbs.len() - 1].block);
        if r.is_ok() {
            self.count_write(len);
        }
        r
    }
}

impl Drop for StagedWrite {
    fn drop(&mut self) {
        if let Some(st) = self.st.take() {
            self.engine.release_slots(&st.nbs);
            self.engine.abandon_batches(st.batches);
            self.engine.unlock_writers(self.b0, self.b1);
        }
    }
}
