//! Reads whose blocks are all missing, finished by the origin's callback.
//! The caller (the NBD connection's reader) starts the origin read and goes
//! on to its next request; the thread that receives the origin's reply
//! answers the client and publishes the fills. On a fast origin the two
//! hand-offs of the waiting path (to a worker, and back from the origin's
//! reader) cost more than the read itself. A file origin answers in the
//! call when its page cache holds the data, so the whole miss is served on
//! the connection's reader.
//!
//! Where the fence is an msync, the origin reads into a bounce buffer (a
//! store through the mapping would read each slot's page from disk first),
//! the fills are written from it with `pwrite`, and their msync is shared
//! and finished by the thread that makes it.

use super::read::Lookup;
use super::*;
use pmcache_origin::Completion;

/// Longer reads go the waiting way: the callback runs on an origin
/// connection's only reader thread, which must not linger.
const MAX_ASYNC_READ: u64 = 256 << 10;
/// A read that would be relayed (it only passes through) from this size on
/// goes the waiting way too: there a splice beats a copy.
const RELAY_FROM: u64 = 64 << 10;

/// Where a callback read's data goes: every slice of the request in order,
/// or why it failed. Called exactly once; nothing is held by then, so an
/// error may simply be answered by reading the waiting way.
pub trait ReadReply: Send + 'static {
    fn reply(self: Box<Self>, r: Result<&[IoSlice<'_>]>);
}

/// A read in flight at the origin, with everything it holds.
struct Fill {
    engine: Arc<Engine>,
    offset: u64,
    len: u64,
    b0: u64,
    locs: Vec<Loc>,
    /// Blocks promoted into new slots (pinned, holding origin-reader locks).
    filled: Vec<NewBlock>,
    /// Blocks read into the bounce buffer (holding origin-reader locks);
    /// where it holds the fills, every block of the read.
    bounce: Bounce,
    /// Blocks not promoted (their origin-reader locks go with the reply).
    unslotted: Vec<u64>,
    /// The read belongs to a stream past the cutoff (not promoted).
    bypass: bool,
    reply: Box<dyn ReadReply>,
}

impl Engine {
    /// Start a read whose blocks are all missing, without waiting for
    /// anything. `Ok` if started: `reply` is called once, maybe before this
    /// returns, maybe on the origin's thread. `Err(reply)`, with nothing
    /// done, where the read does not qualify now (a block cached or busy,
    /// msync mode, an origin without callback reads, a read to relay).
    pub fn start_miss_read<R: ReadReply>(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        reply: R,
    ) -> std::result::Result<(), R> {
        if !self.callback_read_applies(offset, len) {
            return Err(reply);
        }
        let bs = self.bs();
        let (b0, b1) = (offset / bs, (offset + len - 1) / bs);
        let ids = self.shards_of(b0, b1);
        let Ok(Some(locs)) = self.lookup_range(b0, b1, &ids, Lookup::MissesOnly) else {
            return Err(reply);
        };
        debug_assert!(locs.iter().all(|l| matches!(l, Loc::Miss)));
        let missing: Vec<u64> = (b0..=b1).collect();
        // Entered in the stream table now (it starts no stream, see
        // `callback_read_applies`). A read that fails and goes the waiting
        // way is entered again there, on the stream it started, behind its
        // end, which counts for nothing.
        let bypass = self.promotes() && self.streams.bypass(offset, len, false, false);
        let (filled, unslotted) = if self.promotes() && !bypass {
            self.promotion_slots(&missing)
        } else {
            (Vec::new(), missing.clone())
        };
        let holds_fills = self.fence_is_syscall() && !filled.is_empty();
        let mut bounce = self.bounce(if holds_fills {
            missing
        } else {
            unslotted.clone()
        });
        bounce.holds_fills = holds_fills;
        let mut fill = Fill {
            engine: self.clone(),
            offset,
            len,
            b0,
            locs,
            filled,
            bounce,
            unslotted,
            bypass,
            reply: Box::new(reply),
        };
        let pieces = fill.pieces();
        let from = b0 * bs;
        let done: Completion = Box::new(move |r| fill.finish(r));
        // SAFETY: each piece is a slot just taken from the free list and not
        // published, or a part of the bounce buffer, whose heap memory moved
        // into `done` with it and does not move; nothing but the origin
        // touches either until `done` runs.
        if let Err(done) = unsafe { self.origin.read_raw_async(from, &pieces, done) } {
            done(Err(origin_declined("read")));
        }
        Ok(())
    }

    /// The cheap checks of [`start_miss_read`](Self::start_miss_read). A
    /// read that continues a stream goes the waiting way: there the stream
    /// table sees all of the stream's requests in one place (the callback
    /// path enters a read when it starts, the waiting path when a worker
    /// takes it), so a stream is never split in two and cached twice.
    /// (A read that continues no stream is past no cutoff, so it would be
    /// relayed only where reads are not promoted.)
    fn callback_read_applies(&self, offset: u64, len: u64) -> bool {
        len > 0
            && len <= MAX_ASYNC_READ
            && (len < RELAY_FROM || self.promotes())
            && !self.streams.continues(offset, len, false)
            && self.origin.reads_async()
            && self.check_request(offset, len).is_ok()
    }
}

impl Fill {
    /// Where the origin puts each block, in block order: its new slot or
    /// its part of the bounce buffer; the last block only up to the
    /// origin's end (the rest of it zeroed here).
    fn pieces(&mut self) -> Vec<(*mut u8, usize)> {
        let e = &*self.engine;
        let bs = e.bs() as usize;
        let mut out = Vec::with_capacity(self.locs.len());
        let (mut fi, mut bi) = (0, 0);
        let in_slots = if self.bounce.holds_fills {
            &[][..]
        } else {
            &self.filled[..]
        };
        let mut chunks = self.bounce.buf.chunks_exact_mut(bs);
        for b in self.b0..self.b0 + self.locs.len() as u64 {
            let piece: &mut [u8] = if fi < in_slots.len() && in_slots[fi].block == b {
                let nb = &in_slots[fi];
                fi += 1;
                // SAFETY: a fresh slot this read owns (see `start_miss_read`).
                unsafe { e.region.slice_mut(e.data(e.firsts[nb.shard], nb.slot), bs) }
            } else {
                debug_assert_eq!(self.bounce.blocks[bi], b);
                bi += 1;
                chunks.next().expect("a bounce block per unslotted miss")
            };
            let keep = (e.size - b * bs as u64).min(bs as u64) as usize;
            piece[keep..].fill(0);
            out.push((piece.as_mut_ptr(), keep));
        }
        debug_assert_eq!((fi, bi), (in_slots.len(), self.bounce.blocks.len()));
        out
    }

    /// The origin's reply is in (or the read failed): answer, then publish
    /// the fills as the waiting path does.
    fn finish(self, r: io::Result<()>) {
        let Fill {
            engine: e,
            offset,
            len,
            b0,
            locs,
            filled,
            bounce,
            unslotted,
            bypass,
            reply,
        } = self;
        if let Err(source) = &r {
            // The waiting path sees these misses again: this try must not
            // count as a first miss that makes that one a second.
            e.promotion.unsee(&unslotted);
            // This try's error is counted here (a read the origin declined
            // is none); the read itself is counted, retried and answered by
            // the waiting path.
            if source.kind() != io::ErrorKind::WouldBlock {
                e.counters.add(Ctr::OriginErrors, 1);
            }
        }
        e.release_origin_readers(unslotted.into_iter());
        if let Err(source) = r {
            e.release_origin_readers(filled.iter().map(|nb| nb.block));
            e.release_slots(&filled);
            e.recycle(bounce);
            reply.reply(Err(EngineError::Origin {
                offset: b0 * e.bs(),
                source,
            }));
            return;
        }
        e.count_miss_read(len, locs.len() as u64, bypass);
        let mut reply = Some(reply);
        let in_slots: &[NewBlock] = if bounce.holds_fills { &[] } else { &filled };
        let sent = e.emit(offset, len, b0, &locs, in_slots, &bounce, &mut |s| {
            if let Some(f) = reply.take() {
                f.reply(Ok(s));
            }
            Ok(())
        });
        if let (Err(x), Some(f)) = (sent, reply.take()) {
            f.reply(Err(x));
        }
        e.commit_fills(filled, &bounce);
        e.recycle(bounce);
    }
}

impl Engine {
    /// The statistics of a read that missed every block, counted once it
    /// succeeded (a failed one is counted by the waiting path that retries
    /// it).
    pub(super) fn count_miss_read(&self, len: u64, nblocks: u64, bypass: bool) {
        self.counters.add(Ctr::ReadMisses, nblocks);
        self.counters.add(Ctr::ReadBytes, len);
        if bypass {
            self.counters.add(Ctr::BypassReads, 1);
            self.counters.add(Ctr::BypassBytes, len);
        }
    }
}
