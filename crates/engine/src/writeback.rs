//! Writeback: dirty slots → origin, then an origin flush, then CLEAN.
//!
//! A block becomes clean only after the origin made it durable (contract
//! §4). Only published (acknowledged) versions are written back. A block is
//! never written to the origin by two parties at once (origin-writer lock),
//! nor while a reader is fetching it from the origin.
//!
//! Ordered writeback (the default) takes one epoch per batch, the oldest
//! that owes the origin anything, and only once every epoch before it is
//! closed; the batch's origin flush seals it, and W (the newest epoch on
//! the origin) rises with the fence of the batch's CLEAN states, before
//! the next epoch's first origin write. Steps never overlap, so that order
//! holds across callers (see format rule 5).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::{Engine, NewBlock};
use crate::error::{EngineError, Result};
use crate::format::{encode_watermark, wm_line_off, EPOCH_LINE};
use crate::index::*;

impl Engine {
    /// Write back up to `max` dirty blocks with one origin flush. Adjacent
    /// blocks go to the origin as one write, and every write is in flight at
    /// once. A write that fails leaves its blocks dirty for the next step
    /// and costs the others nothing: they still become clean after the
    /// flush. Returns how many became clean; an error only when none did.
    pub fn writeback_step(&self, max: usize) -> Result<usize> {
        let _step = self.wb.step.lock();
        let (batch, damaged) = self.take_pending(max);
        if batch.is_empty() {
            if let Some(e) = damaged {
                return Err(e);
            }
            if let Some(w) = self.raise_written() {
                self.region.fence();
                self.epochs.set_written(w);
            }
            return Ok(0);
        }
        let (written, err) = self.write_blocks_to_origin(&batch);
        let mut err = err.or(damaged);
        let mut cleaned = 0;
        if written.iter().any(|&w| w) {
            match self.origin.flush() {
                Ok(()) => {
                    let done: Vec<NewBlock> = batch
                        .iter()
                        .zip(&written)
                        .filter(|(_, &w)| w)
                        .map(|(nb, _)| *nb)
                        .collect();
                    self.mark_clean(&done);
                    let raised = self.raise_written();
                    // Make the CLEAN states (and W) durable so the dirty set
                    // after a crash is exact.
                    self.region.fence();
                    if let Some(w) = raised {
                        self.epochs.set_written(w);
                    }
                    cleaned = done.len();
                }
                Err(source) => {
                    self.counters.add(crate::stats::Ctr::OriginErrors, 1);
                    err = Some(EngineError::Origin {
                        offset: batch[0].block * self.bs(),
                        source,
                    });
                }
            }
        }
        self.release_writeback(&batch);
        match err {
            Some(e) if cleaned == 0 => Err(e),
            Some(e) => {
                self.log_failed_batch(&e, cleaned, batch.len());
                Ok(cleaned)
            }
            None => Ok(cleaned),
        }
    }

    /// Log a partly failed batch, at most once a second (with how many were
    /// not logged since): an origin that fails often fails most batches.
    fn log_failed_batch(&self, e: &EngineError, cleaned: usize, of: usize) {
        let mut g = self.wb.failed_log.lock();
        let now = std::time::Instant::now();
        if g.0
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            g.1 += 1;
            return;
        }
        tracing::warn!(error = %e, cleaned, of, more_batches_since = g.1,
            "part of a writeback batch failed; those blocks stay dirty");
        *g = (Some(now), 0);
    }

    /// Up to `max` versions the origin is owed, in block order, each
    /// pinned, marked as in writeback and holding its origin-writer lock.
    /// Ordered: only the oldest epoch's, and none while an epoch before it
    /// still has a commit in flight. Otherwise the oldest of any epochs.
    /// A version whose data fails its checksum is left out, never sent: the
    /// error says which.
    fn take_pending(&self, max: usize) -> (Vec<NewBlock>, Option<EngineError>) {
        let epoch = if self.ordered() {
            // The gate before the versions: a commit that has left it has
            // published its versions, so the scan below sees them.
            let closed = self.epochs.closed();
            match self.oldest_pending() {
                Some(e) if e == 0 || closed.is_some_and(|c| c + 1 >= e) => Some(e),
                _ => return (Vec::new(), None),
            }
        } else {
            None
        };
        let mut batch: Vec<NewBlock> = Vec::new();
        let mut damaged = None;
        let n = self.shards.len();
        let start = self.wb_rotor();
        // Shards where writers wait for space first, then all in turn (a
        // second visit finds what the first took marked K_WB, and skips it).
        let starved = (0..n).filter(|&sh| self.shards[sh].starved.swap(false, Ordering::Relaxed));
        let order: Vec<usize> = starved.chain((0..n).map(|k| (start + k) % n)).collect();
        for sh in order {
            if batch.len() >= max {
                break;
            }
            let mut ix = self.shards[sh].ix.lock();
            // Drops the stale entries ahead, so the scan below is short.
            if ix.first_owed_epoch().is_none() {
                continue;
            }
            for s in ix.owed_slots(epoch, max - batch.len()) {
                if ix.pins(s) == MAX_PINS {
                    continue;
                }
                if !self.verify_loaded(&mut ix, s) {
                    let k = ix.key(s);
                    if k & K_RETAINED != 0 {
                        // A newer version follows, so the client has
                        // rewritten the block: the origin skips this one
                        // rather than wait for it forever (only this
                        // block's step of the epoch order is lost, and no
                        // data the client still reads).
                        self.retire_retained(&mut ix, s);
                        tracing::warn!(
                            block = k & BLOCK_MASK,
                            "a damaged older version was dropped"
                        );
                    } else {
                        damaged.get_or_insert(EngineError::DataCorrupt {
                            block: k & BLOCK_MASK,
                            slot: ix.first_slot + s as u64,
                        });
                    }
                    continue;
                }
                if let Some(nb) = Self::take_version(&mut ix, sh, s) {
                    batch.push(nb);
                }
            }
        }
        batch.sort_by_key(|nb| nb.block);
        // One version per block: an epoch has one, and without order only
        // current versions are owed.
        debug_assert!(batch.windows(2).all(|w| w[0].block < w[1].block));
        (batch, damaged)
    }

    /// Claim an owed version for a batch, unless its block is busy on the
    /// origin.
    fn take_version(ix: &mut ShardIndex, sh: usize, s: u32) -> Option<NewBlock> {
        let k = ix.key(s);
        debug_assert!(k & K_DIRTY != 0 || k & K_RETAINED != 0, "an owed version");
        let block = k & BLOCK_MASK;
        let l = ix.lock_state(block);
        if l.origin_writer || l.origin_readers > 0 {
            return None;
        }
        ix.update_lock(block, |l| l.origin_writer = true);
        ix.set_flags(s, K_WB);
        ix.pin(s);
        Some(NewBlock {
            block,
            shard: sh,
            slot: s,
            zero: k & K_ZERO != 0,
            on_origin: k & K_ON_ORIGIN != 0,
            lo: 0,
            hi: 0,
        })
    }

    /// The oldest epoch with a version the origin is owed.
    pub(crate) fn oldest_pending(&self) -> Option<u64> {
        self.shards
            .iter()
            .filter_map(|sh| sh.ix.lock().first_owed_epoch())
            .min()
    }

    /// With ordered writeback, store a higher W if one is due: every epoch
    /// up to it is closed and owes the origin nothing. Not without order:
    /// a dirty version superseded in a later epoch is dropped there, never
    /// written, so an epoch can owe nothing without being on the origin.
    /// The caller fences, then records it.
    fn raise_written(&self) -> Option<u64> {
        if !self.ordered() {
            return None;
        }
        let closed = self.epochs.closed()?;
        let w = match self.oldest_pending() {
            Some(e) => closed.min(e.saturating_sub(1)),
            None => closed,
        };
        if w <= self.epochs.written() {
            return None;
        }
        self.region
            .store_word_flush(wm_line_off(EPOCH_LINE), encode_watermark(w));
        Some(w)
    }

    /// Write pinned blocks, sorted by block, to the origin (no flush), for
    /// writeback and writethrough alike: runs of adjacent data blocks as
    /// single writes straight from the mapping, all in flight together; runs
    /// of zero blocks as single WRITE_ZEROES. Per block, whether the origin
    /// now has it; and the first error.
    pub(crate) fn write_blocks_to_origin(
        &self,
        batch: &[NewBlock],
    ) -> (Vec<bool>, Option<EngineError>) {
        debug_assert!(batch.windows(2).all(|w| w[0].block < w[1].block));
        let bs = self.bs();
        let mut written: Vec<bool> = batch.iter().map(|nb| nb.on_origin).collect();
        let mut err = None;
        let mut data_runs: Vec<(std::ops::Range<usize>, Vec<io::IoSlice<'_>>)> = Vec::new();
        for run in runs(batch) {
            let nb0 = &batch[run.start];
            let off = nb0.block * bs;
            let end = ((batch[run.end - 1].block + 1) * bs).min(self.size);
            if nb0.zero {
                match self.origin.write_zeroes(off, end - off, false) {
                    Ok(()) => written[run.clone()].fill(true),
                    Err(source) => {
                        err.get_or_insert(self.origin_error(off, source));
                    }
                }
                continue;
            }
            let bufs = batch[run.clone()]
                .iter()
                .map(|nb| {
                    let n = (self.size - nb.block * bs).min(bs) as usize;
                    // SAFETY: the slot is pinned, so it is not rewritten
                    // until the batch is released.
                    let data = unsafe {
                        self.region
                            .slice(self.data(self.firsts[nb.shard], nb.slot), n)
                    };
                    io::IoSlice::new(data)
                })
                .collect();
            data_runs.push((run, bufs));
        }
        let reqs: Vec<(u64, &[io::IoSlice<'_>])> = data_runs
            .iter()
            .map(|(r, bufs)| (batch[r.start].block * bs, &bufs[..]))
            .collect();
        let results = self.origin.write_runs(&reqs);
        assert_eq!(results.len(), reqs.len(), "one result per run");
        for ((run, _), r) in data_runs.iter().zip(results) {
            match r {
                Ok(()) => written[run.clone()].fill(true),
                Err(source) => {
                    err.get_or_insert(self.origin_error(batch[run.start].block * bs, source));
                }
            }
        }
        (written, err)
    }

    fn origin_error(&self, offset: u64, source: io::Error) -> EngineError {
        self.counters.add(crate::stats::Ctr::OriginErrors, 1);
        EngineError::Origin { offset, source }
    }

    fn release_writeback(&self, batch: &[NewBlock]) {
        for nb in batch {
            let mut ix = self.shards[nb.shard].ix.lock();
            ix.clear_flags(nb.slot, K_WB);
            ix.unpin(nb.slot);
            ix.update_lock(nb.block, |l| l.origin_writer = false);
        }
        for sh in self.shards.iter() {
            sh.cv.notify_all();
        }
    }

    /// Where the next batch starts, so shards take turns.
    fn wb_rotor(&self) -> usize {
        self.wb.rotor.fetch_add(1, Ordering::Relaxed)
    }

    /// Sleep up to `d`, or until a writer that waits for space kicks.
    fn wait_for_kick(&self, d: Duration) {
        let mut k = self.wb.kick.lock();
        if !*k && !self.wb.stop.load(Ordering::SeqCst) {
            self.wb.cv.wait_for(&mut k, d);
        }
        *k = false;
    }

    /// Wake the background writer for a batch without its trickle pause:
    /// a write stream waits for the earlier epochs to pass the cache.
    pub(crate) fn kick_writeback_now(&self) {
        self.wb.urgent.store(true, Ordering::Relaxed);
        self.kick_writeback();
    }

    /// Wake the background writer.
    pub fn kick_writeback(&self) {
        let mut k = self.wb.kick.lock();
        if !*k {
            *k = true;
            self.wb.cv.notify_one();
        }
    }

    /// Write back everything that is dirty now. Retries origin errors with
    /// backoff up to `max_retries` times in a row; `progress(done, total)`
    /// is called after each batch.
    pub fn flush_all(&self, max_retries: u32, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let total = self.dirty_blocks();
        let mut done = 0u64;
        let mut failures = 0u32;
        let mut backoff = BACKOFF_START;
        loop {
            if self.dirty_blocks() == 0 {
                progress(total.max(done), total.max(done));
                return Ok(());
            }
            match self.writeback_step(self.cfg.writeback_batch) {
                Ok(0) => std::thread::sleep(Duration::from_millis(1)),
                Ok(n) => {
                    done += n as u64;
                    failures = 0;
                    backoff = BACKOFF_START;
                    progress(done.min(total), total);
                }
                Err(e) => {
                    failures += 1;
                    // Damaged data stays damaged: no retry mends it.
                    if failures > max_retries || matches!(e, EngineError::DataCorrupt { .. }) {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "writeback failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Start the background writeback thread, and the one that settles S
    /// (idempotent).
    pub fn start_writeback(self: &Arc<Self>) {
        let mut t = self.wb.thread.lock();
        if t.is_some() {
            return;
        }
        let weak = Arc::downgrade(self);
        *t = Some(
            std::thread::Builder::new()
                .name("pmcache-writeback".into())
                .spawn(move || writeback_loop(weak))
                .expect("spawn writeback thread"),
        );
        let weak = Arc::downgrade(self);
        *self.wb.settler.lock() = Some(
            std::thread::Builder::new()
                .name("pmcache-settle".into())
                .spawn(move || settle_loop(weak))
                .expect("spawn settle thread"),
        );
    }

    /// Stop the background writeback thread and wait for it.
    pub fn stop_writeback(&self) {
        self.wb.stop.store(true, Ordering::SeqCst);
        {
            let mut k = self.wb.kick.lock();
            *k = true;
            self.wb.cv.notify_all();
        }
        {
            let _g = self.wb.settle_nap.lock();
            self.wb.settle_cv.notify_all();
        }
        if let Some(t) = self.wb.thread.lock().take() {
            let _ = t.join();
        }
        if let Some(t) = self.wb.settler.lock().take() {
            let _ = t.join();
        }
        self.wb.stop.store(false, Ordering::SeqCst);
    }
}

/// How often the settle thread looks whether writes have paused.
const SETTLE_EVERY: Duration = Duration::from_millis(50);

/// Raise S over the last writes once they pause (see
/// [`Engine::settle_watermark`]): writes that saw no new transaction for
/// one turn are covered at the next, with one fence. A thread of its own,
/// since writeback may be stuck on a slow or dead origin for as long as it
/// likes.
fn settle_loop(engine: std::sync::Weak<Engine>) {
    let mut last_seq = None;
    loop {
        let Some(e) = engine.upgrade() else { return };
        if e.wb.stop.load(Ordering::SeqCst) {
            return;
        }
        let last = e.seq.last();
        if last_seq == Some(last) {
            e.settle_watermark();
        }
        last_seq = Some(last);
        let mut g = e.wb.settle_nap.lock();
        if !e.wb.stop.load(Ordering::SeqCst) {
            e.wb.settle_cv.wait_for(&mut g, SETTLE_EVERY);
        }
    }
}

/// Longest run merged into one origin write, in blocks.
const MAX_RUN: usize = 256;

/// Index ranges of `batch` (sorted by block) that form runs: adjacent
/// blocks of the same kind (data or zero) that the origin does not have yet.
fn runs(batch: &[NewBlock]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, nb) in batch.iter().enumerate() {
        if nb.on_origin {
            continue;
        }
        match out.last_mut() {
            Some(r)
                if r.end == i
                    && r.len() < MAX_RUN
                    && batch[i - 1].block + 1 == nb.block
                    && batch[i - 1].zero == nb.zero =>
            {
                r.end = i + 1
            }
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// Dirty share of the cache (percent) below which writeback trickles, as
/// dm-writecache's high watermark (50%): a busy cache keeps its CPU and
/// origin bandwidth for clients, and an idle one drains.
const WRITEBACK_PERCENT: u64 = 50;

/// Writeback with exponential backoff on origin errors. Dirty data is
/// never dropped: a failing batch stays dirty and is retried.
fn writeback_loop(engine: std::sync::Weak<Engine>) {
    let mut backoff = BACKOFF_START;
    let mut seen = None;
    // Blocks cleaned since the last pause: small epochs make small batches,
    // and the trickle paces batches of the configured size, not epochs.
    let mut run = 0usize;
    loop {
        let Some(e) = engine.upgrade() else { return };
        if e.wb.stop.load(Ordering::SeqCst) {
            return;
        }
        let pause = match e.writeback_step(e.cfg.writeback_batch) {
            // Owed versions wait for an epoch's last commit: soon.
            Ok(0) if e.dirty_blocks() > 0 => Duration::from_millis(1),
            Ok(0) => Duration::from_millis(100),
            Ok(n) if run + n < e.cfg.writeback_batch => {
                backoff = BACKOFF_START;
                run += n;
                Duration::ZERO
            }
            Ok(_) => {
                backoff = BACKOFF_START;
                run = 0;
                let requests = e.client_requests();
                let (dirty, retained) = e.owed_counts();
                // Retained versions are space nothing else can free: they
                // count towards the mark as dirty blocks do. Writing them
                // back eagerly costs an origin flush per epoch while clients
                // are busy (a file system's fsyncs make an epoch each); on a
                // disk shared with the cache that halved ext4 fsync rates.
                let urgent = e.wb.urgent.swap(false, Ordering::Relaxed);
                let active = seen != Some(requests) && !urgent;
                seen = Some(requests);
                trickle_pause(
                    e.cfg.writeback_pause,
                    dirty + retained,
                    e.layout.slot_count,
                    active,
                )
            }
            Err(err) => {
                // Nothing in the batch went through: the origin is down, or
                // every write in it failed. Back off, further each time.
                tracing::warn!(error = %err, retry_in = ?backoff, "writeback failed; dirty data kept, retrying");
                let b = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                b
            }
        };
        if !pause.is_zero() {
            e.wait_for_kick(pause);
        }
    }
}

/// First and longest pause after a writeback step that cleaned nothing
/// because of origin errors. A step that cleans anything resets it, so an
/// isolated error costs one short pause.
const BACKOFF_START: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Pause after a batch. None at or above the dirty mark, and none while
/// clients are idle (no request since the previous batch), so an idle
/// cache drains at the origin's speed, as bcache does when idle. Below the
/// mark while clients are busy, the cache trickles: longer pauses the less
/// is dirty, as bcache's rate controller and Open CAS's cleaner leave a
/// busy origin to its clients. Eager writeback would cost every client
/// write a second origin write, and where cache and origin share a disk, a
/// second disk write.
fn trickle_pause(base: Duration, dirty: u64, slots: u64, active: bool) -> Duration {
    let mark = slots * WRITEBACK_PERCENT / 100;
    if dirty >= mark || mark == 0 || !active {
        return Duration::ZERO;
    }
    base.mul_f64((mark - dirty) as f64 / mark as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trickles_only_while_busy_and_below_the_mark() {
        let base = Duration::from_secs(1);
        assert_eq!(trickle_pause(base, 0, 1000, true), base);
        assert_eq!(trickle_pause(base, 250, 1000, true), base / 2);
        assert_eq!(trickle_pause(base, 500, 1000, true), Duration::ZERO);
        assert_eq!(trickle_pause(base, 0, 1000, false), Duration::ZERO);
        assert_eq!(trickle_pause(base, 1, 1, true), Duration::ZERO);
    }
}
