//! Counters, in the spirit of `casadm -P` and dm-cache status.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// The engine's event counters.
#[derive(Debug, Clone, Copy)]
pub enum Ctr {
    ReadHits,
    ReadMisses,
    WriteHits,
    WriteMisses,
    Promotions,
    Evictions,
    Writebacks,
    WritebackBytes,
    OriginErrors,
    Writes,
    WriteFences,
    ReadBytes,
    WriteBytes,
    WaitsForSpace,
}

const NCTR: usize = Ctr::WaitsForSpace as usize + 1;
const STRIPES: usize = 16;

/// One thread's copy of every counter, on lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct Stripe([AtomicU64; NCTR]);

/// Counters striped by thread: hot paths on different cores never write the
/// same cache line, so counting costs no line transfer per request.
pub struct Counters {
    stripes: Box<[Stripe]>,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
        }
    }
}

/// This thread's stripe, assigned round-robin on first use.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Relaxed) % STRIPES;
    }
    MINE.with(|s| *s)
}

impl Counters {
    pub fn add(&self, c: Ctr, n: u64) {
        if n == 0 {
            return;
        }
        self.stripes[stripe()].0[c as usize].fetch_add(n, Relaxed);
    }

    pub fn get(&self, c: Ctr) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0[c as usize].load(Relaxed))
            .sum()
    }
}

/// A point-in-time copy of the counters and occupancy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub mode: String,
    pub pmem_mode: String,
    pub block_size: u32,
    pub slots: u64,
    pub occupied: u64,
    pub dirty: u64,
    pub clean: u64,
    pub free: u64,
    pub read_hits: u64,
    pub read_misses: u64,
    pub write_hits: u64,
    pub write_misses: u64,
    pub promotions: u64,
    pub evictions: u64,
    pub writebacks: u64,
    pub writeback_bytes: u64,
    pub origin_errors: u64,
    pub writes: u64,
    pub write_fences: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub waits_for_space: u64,
    pub fences: u64,
    pub watermark: u64,
}

impl StatsSnapshot {
    /// (name, value, help) for every numeric field, for text, JSON and Prometheus output.
    pub fn fields(&self) -> Vec<(&'static str, u64, &'static str)> {
        vec![
            (
                "block_size",
                self.block_size as u64,
                "cache block size in bytes",
            ),
            ("slots", self.slots, "cache slots"),
            ("occupied", self.occupied, "slots holding a cached block"),
            ("dirty", self.dirty, "blocks not yet written back"),
            ("clean", self.clean, "cached blocks identical to the origin"),
            ("free", self.free, "unused slots"),
            ("read_hits", self.read_hits, "blocks read from the cache"),
            (
                "read_misses",
                self.read_misses,
                "blocks read from the origin",
            ),
            (
                "write_hits",
                self.write_hits,
                "blocks written that were cached",
            ),
            (
                "write_misses",
                self.write_misses,
                "blocks written that were not cached",
            ),
            (
                "promotions",
                self.promotions,
                "read misses inserted into the cache",
            ),
            (
                "evictions",
                self.evictions,
                "clean blocks demoted to make room",
            ),
            ("writebacks", self.writebacks, "dirty blocks written back"),
            (
                "writeback_bytes",
                self.writeback_bytes,
                "bytes written back",
            ),
            (
                "origin_errors",
                self.origin_errors,
                "failed origin operations",
            ),
            ("writes", self.writes, "write requests acknowledged"),
            (
                "write_fences",
                self.write_fences,
                "fences issued by write requests",
            ),
            ("read_bytes", self.read_bytes, "bytes read by clients"),
            ("write_bytes", self.write_bytes, "bytes written by clients"),
            (
                "waits_for_space",
                self.waits_for_space,
                "writes that waited for writeback",
            ),
            ("fences", self.fences, "persistence fences issued in total"),
            ("watermark", self.watermark, "durable transaction watermark"),
        ]
    }
}
