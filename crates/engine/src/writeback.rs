//! Writeback: dirty slots → origin, then an origin flush, then CLEAN.
//!
//! A block becomes clean only after the origin made it durable (contract
//! §4). Only published (acknowledged) versions are written back. A block is
//! never written to the origin by two parties at once (origin-writer lock),
//! nor while a reader is fetching it from the origin.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::{Engine, NewBlock};
use crate::error::{EngineError, Result};
use crate::index::*;

impl Engine {
    /// Write back up to `max` dirty blocks with one origin flush. Returns how
    /// many became clean. On an origin error nothing is marked clean and the
    /// blocks stay dirty for the next attempt.
    pub fn writeback_step(&self, max: usize) -> Result<usize> {
        let mut batch: Vec<NewBlock> = Vec::new();
        let n = self.shards.len();
        let start = self.wb_rotor();
        for k in 0..n {
            if batch.len() >= max {
                break;
            }
            let sh = (start + k) % n;
            let mut ix = self.shards[sh].ix.lock();
            if ix.dirty == 0 {
                continue;
            }
            let nslots = ix.nslots();
            let mut scanned = 0;
            while scanned < nslots && batch.len() < max {
                let s = ix.wb_cursor % nslots;
                ix.wb_cursor = ix.wb_cursor.wrapping_add(1);
                scanned += 1;
                let k = ix.key(s);
                if k & (K_VALID | K_DIRTY) != (K_VALID | K_DIRTY)
                    || k & K_WB != 0
                    || ix.pins(s) >= MAX_PINS
                {
                    continue;
                }
                let block = k & BLOCK_MASK;
                let l = ix.lock_state(block);
                if l.origin_writer || l.origin_readers > 0 {
                    continue;
                }
                ix.update_lock(block, |l| l.origin_writer = true);
                ix.set_flags(s, K_WB);
                ix.pin(s);
                batch.push(NewBlock {
                    block,
                    shard: sh,
                    slot: s,
                    zero: k & K_ZERO != 0,
                    on_origin: k & K_ON_ORIGIN != 0,
                    lo: 0,
                    hi: 0,
                });
            }
        }
        if batch.is_empty() {
            return Ok(0);
        }
        batch.sort_by_key(|nb| nb.block);
        let r = self.write_blocks_to_origin(&batch).and_then(|()| {
            self.origin.flush().map_err(|source| {
                self.counters.add(crate::stats::Ctr::OriginErrors, 1);
                EngineError::Origin {
                    offset: batch[0].block * self.bs(),
                    source,
                }
            })
        });
        if r.is_ok() {
            self.mark_clean(&batch);
            // Make the CLEAN states durable so the dirty set after a crash is exact.
            self.region.fence();
        }
        for nb in &batch {
            let mut ix = self.shards[nb.shard].ix.lock();
            ix.clear_flags(nb.slot, K_WB);
            ix.unpin(nb.slot);
            ix.update_lock(nb.block, |l| l.origin_writer = false);
        }
        for sh in self.shards.iter() {
            sh.cv.notify_all();
        }
        r.map(|()| batch.len())
    }

    /// Where the next batch starts, so shards take turns.
    fn wb_rotor(&self) -> usize {
        self.wb.rotor.fetch_add(1, Ordering::Relaxed)
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
        let mut backoff = Duration::from_millis(10);
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
                    backoff = Duration::from_millis(10);
                    progress(done.min(total), total);
                }
                Err(e) => {
                    failures += 1;
                    if failures > max_retries {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "writeback failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Start the background writeback thread (idempotent).
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
    }

    /// Stop the background writeback thread and wait for it.
    pub fn stop_writeback(&self) {
        self.wb.stop.store(true, Ordering::SeqCst);
        {
            let mut k = self.wb.kick.lock();
            *k = true;
            self.wb.cv.notify_all();
        }
        if let Some(t) = self.wb.thread.lock().take() {
            let _ = t.join();
        }
        self.wb.stop.store(false, Ordering::SeqCst);
    }
}

/// Dirty share of the cache (percent) below which writeback trickles, as
/// dm-writecache's high watermark (50%): an idle cache still drains, but a
/// busy one keeps its CPU and origin bandwidth for clients.
const WRITEBACK_PERCENT: u64 = 50;

/// Writeback with exponential backoff on origin errors. Dirty data is
/// never dropped: a failing batch stays dirty and is retried.
fn writeback_loop(engine: std::sync::Weak<Engine>) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let Some(e) = engine.upgrade() else { return };
        if e.wb.stop.load(Ordering::SeqCst) {
            return;
        }
        match e.writeback_step(e.cfg.writeback_batch) {
            Ok(0) => {
                let mut k = e.wb.kick.lock();
                if !*k {
                    e.wb.cv.wait_for(&mut k, Duration::from_millis(100));
                }
                *k = false;
            }
            Ok(_) => {
                backoff = Duration::from_millis(10);
                // Below the mark write back at a trickle; above it (or when
                // writers wait for space and kick), at full speed.
                let dirty = e.dirty_blocks();
                if dirty * 100 < e.layout.slot_count * WRITEBACK_PERCENT {
                    let pause = e.cfg.writeback_pause;
                    drop(e);
                    std::thread::sleep(pause);
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?backoff, "writeback failed; dirty data kept, retrying");
                let mut k = e.wb.kick.lock();
                if !e.wb.stop.load(Ordering::SeqCst) {
                    e.wb.cv.wait_for(&mut k, backoff);
                }
                *k = false;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
