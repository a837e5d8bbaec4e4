//! Sequential detection, as bcache's sequential cutoff: once a stream of
//! reads or writes has moved more than the cutoff, the rest of it bypasses
//! the cache, so a backup or a copy runs at the origin's speed and does not
//! push the hot set out of the cache.
//!
//! A stream is a run of requests in one direction whose offsets follow each
//! other. Requests of a deep queue start nearly, not exactly, in order, and
//! are recorded by different threads, so a request continues a stream when
//! it starts within a few of its own lengths of the stream's end (see
//! [`window`]), behind or ahead: random I/O lands there too seldom to build a
//! stream before it leaves the table.

use parking_lot::Mutex;

/// How far from a stream's end a request of `len` bytes may start and still
/// continue it: eight lengths (a queue of eight requests recorded out of
/// order), at most 8 MiB so that large random requests seldom join a stream.
fn window(len: u64) -> u64 {
    len.saturating_mul(8).min(8 << 20).max(len)
}

/// Streams followed at once (LRU-replaced), as Open CAS's stream table.
const STREAMS: usize = 16;

/// Requests recorded as bypassing by the connection's reader and handed on
/// to a worker, kept so the worker's record of the same request follows that
/// decision: a worker lagging more than a window behind the reader's end of
/// the stream would otherwise take it for a new stream and cache it.
const DECIDED: usize = 256;

#[derive(Clone, Copy, Default)]
struct Stream {
    /// Highest end offset seen.
    end: u64,
    /// Bytes moved by the stream so far.
    bytes: u64,
    write: bool,
    /// For LRU replacement.
    last_used: u64,
    live: bool,
}

pub(crate) struct Streams {
    cutoff: u64,
    table: Mutex<Table>,
}

struct Table {
    streams: [Stream; STREAMS],
    clock: u64,
    /// Requests (offset, length, write) decided to bypass, not yet seen
    /// again, oldest first (see [`DECIDED`]).
    decided: std::collections::VecDeque<(u64, u64, bool)>,
}

impl Streams {
    /// `cutoff` 0 turns detection off.
    pub(crate) fn new(cutoff: u64) -> Streams {
        Streams {
            cutoff,
            table: Mutex::new(Table {
                streams: [Stream::default(); STREAMS],
                clock: 0,
                decided: Default::default(),
            }),
        }
    }

    /// A FLUSH: every write stream starts counting again. A stream bypasses
    /// only when it moves more than the cutoff between two flushes, so a
    /// journal or a log that is flushed every few writes stays in the cache
    /// (bcache likewise never bypasses sync writes in writeback mode): its
    /// writes wait for their own durability, and the cache makes that fast,
    /// where a bypassed write would wait for the origin's.
    pub(crate) fn sync_point(&self) {
        let mut g = self.table.lock();
        for s in g.streams.iter_mut().filter(|s| s.write) {
            s.bytes = 0;
        }
    }

    /// The stream a request continues, if any: of several candidates the
    /// longest, so that a short stale entry in its path does not split it.
    fn stream_of(table: &[Stream], offset: u64, len: u64, write: bool) -> Option<usize> {
        let w = window(len);
        // Behind its end, a request is a late member only of a stream that
        // has moved at least one such request: a stray small request ahead
        // of a new stream must not swallow its first requests.
        let near = |s: &Stream| {
            s.live
                && s.write == write
                && offset <= s.end.saturating_add(w)
                && (offset >= s.end || (offset >= s.end.saturating_sub(w) && s.bytes >= len))
        };
        (0..table.len())
            .filter(|&i| near(&table[i]))
            .max_by_key(|&i| table[i].bytes)
    }

    /// Whether a request would continue a stream already followed (of any
    /// length), recording nothing.
    pub(crate) fn continues(&self, offset: u64, len: u64, write: bool) -> bool {
        self.cutoff != 0
            && Self::stream_of(&self.table.lock().streams, offset, len, write).is_some()
    }

    /// What [`bypass`](Self::bypass) would say now, recording nothing.
    pub(crate) fn would_bypass(&self, offset: u64, len: u64, write: bool, sync: bool) -> bool {
        if self.cutoff == 0 || len == 0 || sync {
            return false;
        }
        let g = self.table.lock();
        g.decided.contains(&(offset, len, write))
            || Self::stream_of(&g.streams, offset, len, write)
                .is_some_and(|i| g.streams[i].bytes >= self.cutoff)
    }

    /// [`bypass`](Self::bypass) for a request that will be seen again
    /// (recorded by a worker) if it bypasses: that record then follows this
    /// decision.
    pub(crate) fn bypass_handed_on(&self, offset: u64, len: u64, write: bool, sync: bool) -> bool {
        let by = self.bypass(offset, len, write, sync);
        if by {
            self.hand_on(offset, len, write);
        }
        by
    }

    /// Take back a decision handed on by [`bypass_handed_on`]
    /// (Self::bypass_handed_on): its request will not be seen again.
    pub(crate) fn take_handed_on(&self, offset: u64, len: u64, write: bool) {
        take_decided(&mut self.table.lock().decided, (offset, len, write));
    }

    /// Hand on again a decision taken back by [`take_handed_on`]
    /// (Self::take_handed_on): its request will be seen again after all.
    pub(crate) fn hand_on(&self, offset: u64, len: u64, write: bool) {
        let mut g = self.table.lock();
        if g.decided.len() == DECIDED {
            g.decided.pop_front();
        }
        g.decided.push_back((offset, len, write));
    }

    /// Record a request; true if it belongs to a stream that has already
    /// moved more than the cutoff, so it should bypass the cache. A `sync`
    /// request (a write with FUA) is a sync point of its stream and never
    /// bypasses.
    pub(crate) fn bypass(&self, offset: u64, len: u64, write: bool, sync: bool) -> bool {
        if self.cutoff == 0 || len == 0 {
            return false;
        }
        let mut g = self.table.lock();
        let Table {
            streams: table,
            clock,
            decided,
        } = &mut *g;
        if take_decided(decided, (offset, len, write)) {
            return true;
        }
        *clock += 1;
        let now = *clock;
        if let Some(i) = Self::stream_of(table, offset, len, write) {
            let s = &mut table[i];
            let before = s.bytes;
            // Only a request that moves the stream forward counts; one
            // behind it is a late member, not progress.
            if offset >= s.end {
                s.bytes = s.bytes.saturating_add(len);
                s.end = offset.saturating_add(len);
            }
            s.last_used = now;
            if sync {
                s.bytes = 0;
                return false;
            }
            return before >= self.cutoff;
        }
        let victim = table
            .iter_mut()
            .min_by_key(|s| (s.live, s.last_used))
            .expect("the stream table is not empty");
        *victim = Stream {
            end: offset.saturating_add(len),
            bytes: if sync { 0 } else { len },
            write,
            last_used: now,
            live: true,
        };
        false
    }
}

/// Remove the decision for `req` (offset, length, write) from `decided`;
/// true if there was one.
fn take_decided(
    decided: &mut std::collections::VecDeque<(u64, u64, bool)>,
    req: (u64, u64, bool),
) -> bool {
    match decided.iter().position(|&d| d == req) {
        Some(i) => {
            decided.remove(i);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reader records a deep queue's requests in order and hands the
    /// bypassed ones on; a worker recording them again far behind the
    /// stream's end still bypasses each, and records nothing new. Reads
    /// and writes keep their own decisions.
    #[test]
    fn a_lagging_worker_follows_the_readers_decisions() {
        for write in [true, false] {
            let s = Streams::new(4 << 20);
            let len = 256u64 << 10;
            let decided: Vec<bool> = (0..64)
                .map(|i| s.bypass_handed_on(i * len, len, write, false))
                .collect();
            assert_eq!(
                decided.iter().filter(|&&d| !d).count(),
                16,
                "the cutoff's 4 MiB"
            );
            assert!(
                !s.bypass(16 * len, len, !write, false),
                "the other direction follows no decision of this one"
            );
            for i in 16..64u64 {
                assert!(
                    s.bypass(i * len, len, write, false),
                    "request {i} cached by the worker"
                );
            }
            assert!(
                s.table.lock().decided.is_empty(),
                "every decision was used once"
            );
            // Without a decision, a request that far behind is a new stream.
            assert!(!s.bypass(16 * len, len, write, false));
        }
    }

    #[test]
    fn a_stream_bypasses_after_the_cutoff_and_random_io_never_does() {
        let s = Streams::new(4 << 20);
        let mib = 1u64 << 20;
        let decisions: Vec<bool> = (0..8)
            .map(|i| s.bypass(i * mib, mib, false, false))
            .collect();
        assert_eq!(
            decisions,
            [false, false, false, false, true, true, true, true]
        );
        // Writes are a different stream.
        assert!(!s.bypass(8 * mib, mib, true, false));
        // Out of order within the window still counts.
        let t = Streams::new(2 * mib);
        for i in [0u64, 2, 1, 3, 4] {
            t.bypass(100 * mib + i * mib, mib, false, false);
        }
        assert!(t.bypass(105 * mib, mib, false, false));
        // Random requests over 1 GiB: small ones never make a stream; large
        // ones (only 1,024 places to land, so often near a recent one)
        // seldom do.
        for (len, most) in [(4096u64, 0), (mib, 200)] {
            let r = Streams::new(4 << 20);
            let mut x = 12345u64;
            let mut bypassed = 0;
            for _ in 0..100_000 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let off = (x >> 34) % (1 << 30) / len * len;
                bypassed += usize::from(r.bypass(off, len, false, false));
            }
            assert!(
                bypassed <= most,
                "{bypassed} random {len}-byte requests of 100,000 bypassed"
            );
        }
    }

    /// A write stream flushed more often than every cutoff (a journal)
    /// never bypasses; one flushed rarely (a copy) does, between flushes.
    #[test]
    fn a_flushed_stream_stays_in_the_cache() {
        let kib = 1u64 << 10;
        let s = Streams::new(64 * kib);
        for i in 0..1000u64 {
            assert!(!s.bypass(i * 4 * kib, 4 * kib, true, false), "write {i}");
            if i % 8 == 7 {
                s.sync_point();
            }
        }
        // FUA writes are sync points of their own stream.
        let f = Streams::new(64 * kib);
        for i in 0..1000u64 {
            let fua = i % 8 == 7;
            assert!(!f.bypass(i * 4 * kib, 4 * kib, true, fua), "write {i}");
        }
        // Unflushed, the same stream bypasses past the cutoff, and counts
        // again from zero after a flush.
        let u = Streams::new(64 * kib);
        let n = (0..32u64)
            .filter(|&i| u.bypass(i * 4 * kib, 4 * kib, true, false))
            .count();
        assert_eq!(n, 16);
        u.sync_point();
        assert!(!u.bypass(32 * 4 * kib, 4 * kib, true, false));
        // Reads are not reset by a flush.
        let r = Streams::new(64 * kib);
        for i in 0..20u64 {
            r.bypass(i * 4 * kib, 4 * kib, false, false);
        }
        r.sync_point();
        assert!(r.bypass(20 * 4 * kib, 4 * kib, false, false));
    }

    /// A deep queue's requests, recorded by several threads, arrive up to a
    /// queue's depth out of order: the stream still forms and bypasses soon
    /// after the cutoff, and its requests do not scatter into new streams.
    #[test]
    fn a_stream_recorded_out_of_order_still_bypasses() {
        let mib = 1u64 << 20;
        let s = Streams::new(4 * mib);
        let mut order: Vec<u64> = Vec::new();
        for batch in 0..32u64 {
            // Each batch of eight in reverse: the worst order a QD8 gives.
            order.extend((0..8).rev().map(|i| batch * 8 + i));
        }
        let bypassed: Vec<bool> = order
            .iter()
            .map(|&i| s.bypass(i * mib, mib, true, false))
            .collect();
        let first = bypassed
            .iter()
            .position(|&b| b)
            .expect("the stream bypasses");
        assert!(first <= 64, "first bypass only at request {first}");
        assert!(bypassed[first..].iter().filter(|&&b| !b).count() <= 8);
    }

    /// Small random reads first (a warm-up), then a stream of large ones
    /// through them: the stream bypasses as soon as it has moved the
    /// cutoff, whatever strays lie ahead of its first requests.
    #[test]
    fn stray_requests_do_not_delay_a_stream() {
        let mib = 1u64 << 20;
        for seed in 0..500u64 {
            let s = Streams::new(4 * mib);
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for _ in 0..12 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                s.bypass(x % 8192 * 4096, 4096, false, false);
            }
            let d: Vec<bool> = (0..32)
                .map(|i| s.bypass(i * mib, mib, false, false))
                .collect();
            let first = d.iter().position(|&b| b);
            assert!(
                first.is_some_and(|f| f <= 5 && d[f..].iter().all(|&b| b)),
                "seed {seed}: {d:?}"
            );
        }
    }

    #[test]
    fn off_means_never() {
        let s = Streams::new(0);
        assert!((0..100u64).all(|i| !s.bypass(i << 20, 1 << 20, true, false)));
    }

    /// A decision taken back is not followed; handed on again, it is.
    #[test]
    fn a_decision_taken_back_and_handed_on_again() {
        let s = Streams::new(4 << 20);
        let len = 256 << 10;
        let mut off = 0;
        while !s.bypass_handed_on(off, len, true, false) {
            off += len;
        }
        s.take_handed_on(off, len, true);
        assert!(!s.table.lock().decided.contains(&(off, len, true)));
        s.hand_on(off, len, true);
        // The worker's record follows the decision, though behind the end.
        assert!(s.bypass(off, len, true, false));
        assert!(
            !s.table.lock().decided.contains(&(off, len, true)),
            "used once"
        );
    }
}
