//! Transaction sequence numbers and the durable watermark S.
//!
//! S means "every transaction with seq ≤ S is completely durable". Recovery
//! trusts entries at or below S and verifies the few above it. S advances
//! without fences of its own: a committing writer stores the new S into its
//! own watermark line, with a streaming store just before its commit fence.
//! One shared word would need a read-modify-write and a flush of a line
//! that every writer touches, which costs more than the rest of the
//! bookkeeping of a write. A line is owned by a registry cell, so its
//! stores are ordered by the cell's hand-over, and each store is above the
//! durable S that covers the previous owner's store: no line goes down.
//!
//! To know which seqs are complete without a global lock, every transaction
//! publishes a lower bound of its seq in a registry cell *before* taking the
//! seq, and clears it after its fence. The smallest published bound, minus
//! one, is then a safe S: any seq below it has finished its fence.

use std::sync::atomic::{
    AtomicU64, AtomicUsize,
    Ordering::{Relaxed, Release, SeqCst},
};

use parking_lot::{Condvar, Mutex};
use pmcache_pmem::PmemRegion;
use std::time::Duration;

use crate::format::{
    decode_watermark, encode_watermark, wm_line_off, SEQ_MASK, WATERMARK_OFF, WM_LINES,
};

/// One cell per watermark line after the shared line 0.
const CELLS: usize = WM_LINES - 1;
/// Writers raise S in one transaction of this many.
pub const STAGE_EVERY: u64 = 16;
/// Cells owned by the threads with a counter stripe; the rest are claimed
/// per transaction.
const OWNED: usize = pmcache_pmem::counter::STRIPES;
const _: () = assert!(OWNED < CELLS);

#[repr(align(64))]
struct Cell(AtomicU64);

pub struct Sequencer {
    next: AtomicU64,
    cells: Box<[Cell]>,
    /// Cells in use are all below this mark, so the scan stays short.
    high: AtomicUsize,
    /// Highest S known to be durable in media.
    durable: AtomicU64,
    /// Takers waiting for a shared cell to free up (all were taken: more
    /// transactions in flight than cells), asleep on `freed`.
    waiting: AtomicUsize,
    wait_lock: Mutex<()>,
    freed: Condvar,
}

/// How long a taker sleeps for a shared cell before it looks again anyway
/// (a safety net; a freed cell wakes it).
const CELL_WAIT: Duration = Duration::from_millis(1);

/// A transaction between taking its seq and its fence.
pub struct Ticket {
    cell: usize,
    pub seq: u64,
}

impl Sequencer {
    /// `last` is the highest seq found in media; S is durable at `s`.
    pub fn new(last: u64, s: u64) -> Self {
        Sequencer {
            next: AtomicU64::new(last + 1),
            cells: (0..CELLS).map(|_| Cell(AtomicU64::new(0))).collect(),
            high: AtomicUsize::new(0),
            durable: AtomicU64::new(s),
            waiting: AtomicUsize::new(0),
            wait_lock: Mutex::new(()),
            freed: Condvar::new(),
        }
    }

    pub fn durable(&self) -> u64 {
        self.durable.load(SeqCst)
    }

    /// Highest seq handed out so far.
    pub fn last(&self) -> u64 {
        self.next.load(SeqCst) - 1
    }

    pub fn begin(&self) -> Ticket {
        // A thread with a counter stripe owns the cell of the same number:
        // a plain store claims it, and the seq's `fetch_add` orders that
        // store before any scan that sees the seq handed out. Only the owner
        // writes the cell, so it is busy only if this thread already holds
        // a ticket; a second one then takes a shared cell.
        if let Some(i) = pmcache_pmem::counter::thread_stripe() {
            let cell = &self.cells[i].0;
            if cell.load(Relaxed) == 0 {
                cell.store(self.next.load(SeqCst), Release);
                return self.take_seq(i);
            }
        }
        loop {
            if let Some(t) = self.claim_shared() {
                return t;
            }
            // Every shared cell is taken: sleep until one is freed rather
            // than spin (on a small machine a spinning taker starves the
            // threads whose fences would free one). Announced before the
            // last look, so that a cell freed after it wakes this taker.
            let mut g = self.wait_lock.lock();
            self.waiting.fetch_add(1, SeqCst);
            let t = self.claim_shared();
            if t.is_none() {
                self.freed.wait_for(&mut g, CELL_WAIT);
            }
            self.waiting.fetch_sub(1, SeqCst);
            if let Some(t) = t {
                return t;
            }
        }
    }

    /// A ticket in a free shared cell, if there is one.
    fn claim_shared(&self) -> Option<Ticket> {
        for i in OWNED..CELLS {
            let lb = self.next.load(SeqCst);
            if self.cells[i]
                .0
                .compare_exchange(0, lb, SeqCst, SeqCst)
                .is_ok()
            {
                return Some(self.take_seq(i));
            }
        }
        None
    }

    /// A cell was freed: wake a taker waiting for one.
    fn cell_freed(&self, cell: usize) {
        if cell >= OWNED && self.waiting.load(SeqCst) > 0 {
            let _g = self.wait_lock.lock();
            self.freed.notify_one();
        }
    }

    /// With cell `i` published: make the scans cover it, then take a seq.
    fn take_seq(&self, i: usize) -> Ticket {
        // Locked instructions are dear here: raise `high` only when this
        // cell lies above it.
        if self.high.load(SeqCst) <= i {
            self.high.fetch_max(i + 1, SeqCst);
        }
        let seq = self.next.fetch_add(1, SeqCst);
        assert!(seq < SEQ_MASK, "transaction sequence exhausted");
        Ticket { cell: i, seq }
    }

    /// The S that may be stored now: one below the oldest transaction in flight.
    fn safe_s(&self) -> u64 {
        let mut min = self.next.load(SeqCst);
        let high = self.high.load(SeqCst);
        for c in self.cells[..high].iter() {
            let v = c.0.load(SeqCst);
            if v != 0 && v < min {
                min = v;
            }
        }
        min - 1
    }

    /// Raise line 0 of the watermark page to a larger S if there is one, and
    /// flush it. Call before the fence; pass the result to
    /// [`Sequencer::end`] or [`Sequencer::end_staged`].
    pub fn stage_watermark(&self, region: &dyn PmemRegion) -> u64 {
        let s = self.safe_s();
        if s <= self.durable() {
            return 0;
        }
        let word = region.word(WATERMARK_OFF);
        let mut cur = word.load(SeqCst);
        loop {
            let cur_s = decode_watermark(cur).unwrap_or(0);
            if cur_s >= s {
                break;
            }
            match word.compare_exchange(cur, encode_watermark(s), SeqCst, SeqCst) {
                Ok(_) => break,
                Err(v) => cur = v,
            }
        }
        region.flush(WATERMARK_OFF, 8);
        s
    }

    /// Store a larger S, if there is one, into the ticket's own watermark
    /// line with a streaming store (nothing to flush). Call before the
    /// fence; pass the result to [`Sequencer::end`].
    pub fn stage_watermark_own(&self, t: &Ticket, region: &dyn PmemRegion) -> u64 {
        // Only every few transactions: the scan reads every writer's cell
        // and the update writes `durable`, lines that bounce between cores
        // on every write otherwise. S then lags by a few transactions,
        // which only delays reclaim a little and leaves recovery a few more
        // entries to verify.
        if !t.seq.is_multiple_of(STAGE_EVERY) {
            return 0;
        }
        let s = self.safe_s();
        if s <= self.durable() {
            return 0;
        }
        let mut line = [0u8; 64];
        line[..8].copy_from_slice(&encode_watermark(s).to_le_bytes());
        // SAFETY: line `1 + cell` is written only by the ticket holding the
        // cell; the previous holder's store completed at its fence.
        unsafe { region.copy_flush_nt(wm_line_off(1 + t.cell), &line) };
        s
    }

    /// After the fence: `staged` (from `stage_watermark`) is durable now.
    pub fn end(&self, t: Ticket, staged: u64) {
        if staged > self.durable() {
            self.durable.fetch_max(staged, SeqCst);
        }
        // Release: the cell's next holder sees `durable` above this holder's
        // line (the cell hand-over of `stage_watermark_own`). A scan that
        // still sees the old bound only keeps S lower.
        self.cells[t.cell].0.store(0, Release);
        std::sync::atomic::fence(SeqCst);
        self.cell_freed(t.cell);
    }

    /// After a fence issued without a ticket (reclaim).
    pub fn end_staged(&self, staged: u64) {
        self.durable.fetch_max(staged, SeqCst);
    }

    /// Abandon a ticket whose transaction wrote nothing.
    pub fn cancel(&self, t: Ticket) {
        self.cells[t.cell].0.store(0, SeqCst);
        self.cell_freed(t.cell);
    }

    /// Make S durable up to everything handed out so far (no transaction may
    /// be in flight). Used by recovery and clean shutdown.
    pub fn seal(&self, region: &dyn PmemRegion) {
        let s = self.last();
        region
            .word(WATERMARK_OFF)
            .store(encode_watermark(s), SeqCst);
        region.persist(WATERMARK_OFF, 8);
        self.durable.fetch_max(s, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmcache_pmem::SimRegion;

    /// With every cell taken, a taker sleeps (it does not spin) until a
    /// ticket ends, and then gets that cell.
    #[test]
    fn a_taker_waits_for_a_freed_cell() {
        let q = std::sync::Arc::new(Sequencer::new(0, 0));
        // More tickets than cells: a thread holds at most its own owned cell
        // and then shares; take every cell there is.
        let mut held: Vec<Ticket> = Vec::new();
        while let Some(t) = q.claim_shared() {
            held.push(t);
        }
        assert_eq!(held.len(), CELLS - OWNED);
        let (tx, rx) = std::sync::mpsc::channel();
        let taker = {
            let q = q.clone();
            std::thread::spawn(move || {
                // Its own cell, if it has a stripe, is busy with the first
                // ticket: the second must share.
                let own = q.begin();
                let t = q.begin();
                tx.send(t.cell).unwrap();
                q.cancel(t);
                q.cancel(own);
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            rx.try_recv().is_err(),
            "a ticket while every cell was taken"
        );
        // One freed cell wakes it; two where it had no stripe of its own.
        let mut got = None;
        while got.is_none() {
            q.cancel(held.pop().expect("freed cells never woke the taker"));
            got = rx.recv_timeout(Duration::from_secs(2)).ok();
        }
        assert!(got.unwrap() >= OWNED, "a shared cell");
        taker.join().unwrap();
        for t in held {
            q.cancel(t);
        }
    }

    #[test]
    fn watermark_never_passes_inflight() {
        let r = SimRegion::new(16384);
        let q = Sequencer::new(10, 10);
        let a = q.begin();
        let b = q.begin();
        assert_eq!((a.seq, b.seq), (11, 12));
        // b commits while a is in flight: S must stay below a.
        let staged = q.stage_watermark(&r);
        assert_eq!(staged, 0, "S cannot advance past the in-flight 11");
        r.fence();
        q.end(b, staged);
        let staged = q.stage_watermark(&r);
        assert_eq!(staged, 0);
        r.fence();
        q.end(a, staged);
        let c = q.begin();
        let staged = q.stage_watermark(&r);
        assert_eq!(staged, 12);
        r.fence();
        q.end(c, staged);
        assert_eq!(q.durable(), 12);
        assert_eq!(
            decode_watermark(r.word(WATERMARK_OFF).load(SeqCst)),
            Some(12)
        );
    }

    #[test]
    fn s_covers_only_fenced_seqs_with_more_threads_than_owned_cells() {
        use std::sync::atomic::AtomicBool;
        const THREADS: usize = OWNED + 8;
        const PER: usize = 2_000;
        let r = SimRegion::new(16384);
        let q = Sequencer::new(0, 0);
        let fenced: Vec<AtomicBool> = (0..=THREADS * PER)
            .map(|_| AtomicBool::new(false))
            .collect();
        std::thread::scope(|sc| {
            for _ in 0..THREADS {
                sc.spawn(|| {
                    for _ in 0..PER {
                        let t = q.begin();
                        let staged = q.stage_watermark_own(&t, &r);
                        // Everything S claims must have passed its fence.
                        for s in staged.saturating_sub(32).max(1)..=staged {
                            assert!(fenced[s as usize].load(SeqCst), "S {staged} covers {s}");
                        }
                        fenced[t.seq as usize].store(true, SeqCst);
                        q.end(t, staged);
                    }
                });
            }
        });
        assert_eq!(
            q.last(),
            (THREADS * PER) as u64,
            "every seq handed out once"
        );
        assert!(fenced[1..].iter().all(|f| f.load(SeqCst)));
    }

    #[test]
    fn writers_raise_s_in_their_own_lines() {
        let r = SimRegion::new(16384);
        let start = 2 * STAGE_EVERY - 2;
        r.word(WATERMARK_OFF).store(encode_watermark(start), SeqCst);
        r.persist(WATERMARK_OFF, 8);
        let q = Sequencer::new(start, start);
        let a = q.begin();
        let staged = q.stage_watermark_own(&a, &r);
        assert_eq!(staged, 0, "nothing completed above {start} yet");
        r.fence();
        q.end(a, staged);
        let b = q.begin();
        assert!(b.seq.is_multiple_of(STAGE_EVERY));
        let staged = q.stage_watermark_own(&b, &r);
        assert_eq!(staged, start + 1);
        r.fence();
        q.end(b, staged);
        assert_eq!(q.durable(), start + 1);
        let c = q.begin();
        let staged = q.stage_watermark_own(&c, &r);
        assert_eq!(
            staged, 0,
            "S could rise, but only one seq in {STAGE_EVERY} stages it"
        );
        r.fence();
        q.end(c, staged);
        assert_eq!(q.durable(), start + 1);
        let after_crash = SimRegion::from_image(&r.durable_image());
        assert_eq!(crate::format::read_watermark(&after_crash), Ok(start + 1));
        assert_eq!(
            decode_watermark(after_crash.word(WATERMARK_OFF).load(SeqCst)),
            Some(start),
            "the shared line is not touched by writers"
        );
    }
}
