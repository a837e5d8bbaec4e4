//! Counters, in the spirit of `casadm -P` and dm-cache status.

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
    BypassReads,
    BypassWrites,
    BypassBytes,
    RelayedBytes,
    CorruptBlocks,
}

const NCTR: usize = Ctr::CorruptBlocks as usize + 1;

/// The engine's counters, striped per thread (see [`pmcache_pmem::counter`]).
#[derive(Default)]
pub struct Counters(pmcache_pmem::counter::Counters<NCTR>);

impl Counters {
    pub fn add(&self, c: Ctr, n: u64) {
        if n != 0 {
            self.0.add(c as usize, n);
        }
    }

    pub fn get(&self, c: Ctr) -> u64 {
        self.0.get(c as usize)
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
    /// Lost origin connections re-established (a short outage retried
    /// within the reconnect window fails no request, so it is not an
    /// origin error).
    pub origin_reconnects: u64,
    /// Uses of a cached block whose data failed its checksum.
    pub corrupt_blocks: u64,
    pub writes: u64,
    pub write_fences: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub waits_for_space: u64,
    pub bypass_reads: u64,
    pub bypass_writes: u64,
    pub bypass_bytes: u64,
    /// Bytes spliced between clients and the origin, never in memory.
    pub relayed_bytes: u64,
    pub fences: u64,
    pub watermark: u64,
    /// `ordered` or `none` (`serve --writeback-order`).
    pub writeback_order: String,
    /// Older versions kept until their epoch is written back.
    pub retained: u64,
    /// The epoch writes commit in now.
    pub epoch: u64,
    /// W: every epoch up to this one is on the origin.
    pub written_epoch: u64,
    /// Sealed epochs not yet on the origin.
    pub epochs_pending: u64,
    /// Age of the oldest epoch not yet on the origin, in milliseconds.
    pub oldest_pending_epoch_ms: u64,
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
            (
                "origin_reconnects",
                self.origin_reconnects,
                "lost origin connections re-established",
            ),
            (
                "corrupt_blocks",
                self.corrupt_blocks,
                "cached blocks whose data failed its checksum",
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
            (
                "bypass_reads",
                self.bypass_reads,
                "read requests of sequential streams served around the cache",
            ),
            (
                "bypass_writes",
                self.bypass_writes,
                "write requests of sequential streams sent to the origin directly",
            ),
            (
                "bypass_bytes",
                self.bypass_bytes,
                "bytes of bypassed requests",
            ),
            (
                "relayed_bytes",
                self.relayed_bytes,
                "bytes spliced between clients and the origin without a copy",
            ),
            ("fences", self.fences, "persistence fences issued in total"),
            ("watermark", self.watermark, "durable transaction watermark"),
            (
                "retained",
                self.retained,
                "older dirty versions kept until their epoch is written back",
            ),
            (
                "epoch",
                self.epoch,
                "epoch of new writes (one per client FLUSH)",
            ),
            (
                "written_epoch",
                self.written_epoch,
                "newest epoch written back and flushed to the origin",
            ),
            (
                "epochs_pending",
                self.epochs_pending,
                "sealed epochs not yet on the origin",
            ),
            (
                "oldest_pending_epoch_ms",
                self.oldest_pending_epoch_ms,
                "age of the oldest epoch not yet on the origin (ms)",
            ),
        ]
    }
}
