//! The cache engine: request paths over the shards.
//!
//! This file holds the engine's state and small helpers; the paths live in
//! submodules along their seams: `locks` (block locks), `alloc` (slots,
//! reclaim, eviction), `read` (hits and misses), `write` (the transaction,
//! writethrough and writearound), `staged` (a write in two halves for the
//! NBD server); writeback and recovery are sibling modules of the crate.
//!
//! Concurrency: the cache is split into shards, each owning a contiguous
//! range of slots and the origin blocks of the 1 MiB chunks that hash to it,
//! so a request touches one or two shards and there is no global lock.
//! Operations that need several shards lock them in ascending order.
//!
//! Data movement (the only copies on the request paths):
//! - write: payload → new slot (by the caller's `source`, e.g. `recv` from
//!   the socket, or a non-temporal copy from a caller buffer);
//! - read hit: slot → caller's `sink` (e.g. `writev` to the socket);
//! - read miss: origin → new slot (`read_vectored_at` into the slot), then
//!   as a hit;
//! - writeback: slot → origin;
//! - sub-block write: old slot (or origin) → new slot, then the payload.

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, MutexGuard};
use pmcache_origin::{Origin, Relayed};
use pmcache_pmem::PmemRegion;
use smallvec::SmallVec;

use crate::error::{EngineError, Result};
use crate::format::*;
use crate::hooks::{HookFn, HookPoint, Hooks};
use crate::index::*;
use crate::sequential::Streams;
use crate::stats::{Counters, Ctr, StatsSnapshot};
use crate::txn::Sequencer;

mod alloc;
mod locks;
mod read;
mod read_around;
mod read_async;
mod staged;
mod write;
mod write_around;
pub use read_around::RelayReply;
pub use read_async::ReadReply;
pub use staged::{Stage, StagedWrite, WriteReply};

/// bcache's default: a stream of 4 MiB is a scan, not a working set.
pub const DEFAULT_SEQUENTIAL_CUTOFF: u64 = 4 << 20;

/// Tunables for `open`.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Mode to run in; `None` keeps the one recorded in the superblock.
    pub mode: Option<CacheMode>,
    /// Largest request that is atomic as a whole (advertised to clients).
    pub max_request: u32,
    /// Run writeback in a background thread (tests drive it by hand).
    pub background_writeback: bool,
    /// Blocks per writeback batch (one origin flush each).
    pub writeback_batch: usize,
    /// Longest pause between batches while the dirty share is low and
    /// clients are busy (trickle); shorter the nearer the dirty mark.
    pub writeback_pause: Duration,
    /// Attach even if the origin's identity differs from the superblock.
    pub force_origin: bool,
    /// Number of shards (rounded to a power of two); `None` picks by size.
    pub shards: Option<u32>,
    /// Insert read misses into the cache. Off, reads never write the cache
    /// (used to inspect a cache without changing it).
    pub promote_reads: bool,
    /// Bytes a sequential stream moves through the cache before the rest of
    /// it bypasses the cache (bcache's `sequential_cutoff`); 0: never.
    pub sequential_cutoff: u64,
    /// Whether writeback keeps the origin crash-consistent (epoch order).
    pub writeback_order: WritebackOrder,
}

/// How writeback orders what it writes to the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WritebackOrder {
    /// Epoch by epoch (an epoch is the writes between two client FLUSHes),
    /// each sealed by an origin flush: the origin always holds a state a
    /// disk could have shown after a power cut, only older. Losing the cache
    /// loses recency, never integrity.
    #[default]
    Ordered,
    /// Any order (as dm-writecache, bcache): the origin is a mix of old and
    /// new blocks until writeback finishes, and is not usable on its own if
    /// the cache is lost.
    Unordered,
}

impl std::str::FromStr for WritebackOrder {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "ordered" | "epoch" => Ok(WritebackOrder::Ordered),
            "none" | "unordered" => Ok(WritebackOrder::Unordered),
            _ => Err(format!(
                "unknown writeback order '{s}' (expected ordered or none)"
            )),
        }
    }
}

impl std::fmt::Display for WritebackOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WritebackOrder::Ordered => "ordered",
            WritebackOrder::Unordered => "none",
        })
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            mode: None,
            max_request: 1 << 20,
            background_writeback: true,
            writeback_batch: 1024,
            writeback_pause: Duration::from_secs(1),
            force_origin: false,
            shards: None,
            promote_reads: true,
            sequential_cutoff: DEFAULT_SEQUENTIAL_CUTOFF,
            writeback_order: WritebackOrder::Ordered,
        }
    }
}

pub(crate) struct Shard {
    pub(crate) ix: Mutex<ShardIndex>,
    pub(crate) cv: Condvar,
    /// A writer waits for space here: writeback takes this shard's blocks
    /// first (a shard fills while others have room, as blocks hash to
    /// shards by 1 MiB chunk).
    pub(crate) starved: AtomicBool,
    /// `ShardIndex::buckets_base`, readable without the lock.
    buckets: (usize, usize),
}

impl Shard {
    /// Start loading the (likely cold) bucket of `block` before the lock,
    /// so the lookup under it does not wait for the line.
    fn prefetch_bucket(&self, block: u64) {
        let (base, n) = self.buckets;
        pmcache_pmem::flush::prefetch((base + bucket_index(block, n) * 4) as *const u8);
    }
}

pub(crate) struct WritebackCtl {
    pub(crate) kick: Mutex<bool>,
    pub(crate) cv: Condvar,
    pub(crate) stop: AtomicBool,
    pub(crate) thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub(crate) rotor: std::sync::atomic::AtomicUsize,
    /// Held by a writeback step: steps never overlap.
    pub(crate) step: Mutex<()>,
    /// A write stream waits for writeback: no trickle pause.
    pub(crate) urgent: AtomicBool,
    /// The thread that settles S once writes pause (see
    /// `writeback::settle_loop`), and where it sleeps.
    pub(crate) settler: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub(crate) settle_nap: Mutex<()>,
    pub(crate) settle_cv: Condvar,
    /// When a partly failed batch was last logged, and how many have not
    /// been since.
    pub(crate) failed_log: Mutex<(Option<std::time::Instant>, u64)>,
}

/// The cache. Cheap to share (`Arc`); every method is thread-safe.
pub struct Engine {
    pub(crate) region: Arc<dyn PmemRegion>,
    pub(crate) origin: Arc<dyn Origin>,
    pub(crate) layout: Layout,
    pub(crate) size: u64,
    pub(crate) shards: Box<[Shard]>,
    /// Global number of each shard's first slot.
    pub(crate) firsts: Box<[u64]>,
    pub(crate) shard_mask: u64,
    pub(crate) chunk_shift: u32,
    pub(crate) seq: Sequencer,
    pub(crate) counters: Counters,
    pub(crate) mode: AtomicU8,
    pub(crate) cfg: EngineConfig,
    pub(crate) zeros: Box<[u8]>,
    pub(crate) sb: Mutex<SbCopy>,
    pub(crate) wb: WritebackCtl,
    pub(crate) closed: AtomicBool,
    pub(crate) hooks: Hooks,
    pub(crate) streams: Streams,
    pub(crate) promotion: crate::promotion::Promotion,
    pub(crate) epochs: crate::epoch::Epochs,
    /// Bounce buffers of read misses, for reuse.
    bounces: Mutex<Vec<Vec<u8>>>,
    /// Set on shutdown: writes that would wait for space give up instead.
    stop_waits: AtomicBool,
    /// Commits whose fence another thread finishes, in flight: each holds
    /// a seq ticket, and tickets are few (see [`ASYNC_COMMITS`]).
    pub(crate) async_commits: AtomicUsize,
    /// This engine's own handle, for work that a fence's callback finishes
    /// on another thread (set once the engine is shared).
    pub(crate) me: std::sync::OnceLock<std::sync::Weak<Engine>>,
}

/// Where a block of a request lives while the request runs.
#[derive(Clone, Copy)]
enum Loc {
    /// A published slot, pinned.
    Hit { shard: usize, slot: u32, zero: bool },
    /// Read from the origin into a new slot (pinned) or a bounce buffer.
    Miss,
}

/// Shards of one request: one or two (requests are at most 1 MiB chunks).
pub(crate) type ShardIds = SmallVec<[usize; 4]>;
/// The blocks of one request, inline for small requests.
pub(crate) type Blocks = SmallVec<[NewBlock; 4]>;
type Batches = SmallVec<[(usize, Batch); 2]>;

/// The superblock as last written, and which of its two copies that was
/// (the next write goes to the other one).
pub(crate) struct SbCopy {
    pub(crate) sb: Superblock,
    pub(crate) copy: usize,
}

/// What an allocation does when no slot is free.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Space {
    /// Reclaim, evict, and wait for writeback until slots free up.
    Wait,
    /// Take only what is free now; give up otherwise.
    GiveUp,
}

/// A slot a reclaim makes FREE.
#[derive(Clone, Copy)]
struct Reclaimed {
    slot: u32,
    /// Seq of the incarnation it held.
    seq: u64,
    /// Unpinned, so it may go onto the free list once FREE is durable; a
    /// pinned one waits on the retiring list (its FREE already durable).
    may_free: bool,
    /// As [`Retired::own`].
    own: bool,
}

/// A reclaim batch.
type Batch = Vec<Reclaimed>;

/// Blocks a read fetched: into new cache slots, or into bounce buffers.
type Fetched = (Vec<NewBlock>, Bounce);

/// Where a read's bytes come from, as byte ranges: the zero block, the
/// bounce buffer, or the cache region.
#[derive(Clone, Copy)]
enum Piece {
    Zero(usize, usize),
    Bounce(usize, usize),
    Region(usize, usize),
}

/// Missed blocks read without a cache slot (not promoted, or no room), or
/// every missed block where fills are written from here into their slots
/// (`holds_fills`): one buffer, a block each, in block order.
///
/// The buffer comes from the engine's pool and goes back to it (a zeroed
/// one per miss cost a memset pass); it may be longer than the blocks, and
/// only their part is ever read, after the origin filled it.
#[derive(Default)]
struct Bounce {
    blocks: Vec<u64>,
    buf: Vec<u8>,
    bs: usize,
    holds_fills: bool,
}

impl Bounce {
    /// The bytes of block `b`, which must be one of `blocks`.
    fn block(&self, b: u64) -> &[u8] {
        let i = self
            .blocks
            .binary_search(&b)
            .expect("block in the bounce buffer");
        &self.buf[i * self.bs..(i + 1) * self.bs]
    }
}

/// Bounce buffers kept for reuse, and the largest kept.
const KEEP_BOUNCES: usize = 64;
const KEEP_BOUNCE_LEN: usize = 4 << 20;

/// What a write puts into each block.
pub(crate) enum Src<'a> {
    Buf(&'a [u8]),
    Fill(&'a mut dyn FnMut(&mut [IoSliceMut<'_>]) -> io::Result<()>),
    Zero,
    /// A payload in a relay pipe: spliced to the origin where the write
    /// goes there, read out into memory where it goes into the cache.
    Relay(&'a mut Relayed),
}

/// What a staged write's slots hold besides what staging put there.
#[derive(Clone, Copy)]
pub(crate) enum Filled<'a> {
    /// The payload, still to copy in.
    Buf(&'a [u8]),
    /// Zeroes, still to store.
    Zero,
    /// Already in the slots (received into them).
    InSlots,
}

/// A write between its two halves: slots taken, pinned and filled; the
/// writer locks of its blocks held.
pub(crate) struct Staging {
    pub(crate) nbs: Blocks,
    batches: Batches,
    ids: ShardIds,
    lock_early: bool,
}

/// Most commits in flight whose fence another thread finishes. Each holds
/// a seq ticket until then, and the sequencer has 46 cells for threads
/// without one of their own; past this, writes commit on a worker.
pub(crate) const ASYNC_COMMITS: usize = 32;

/// A commit between its persistence stores and its fence: what the publish
/// after the fence needs.
pub(crate) struct Stored {
    nbs: Blocks,
    batches: Batches,
    ids: ShardIds,
    t: crate::txn::Ticket,
    /// S staged with the stores, durable with the fence.
    staged: u64,
    epoch: u64,
}

/// The request's only shard, when a stage keeps it locked for the commit.
type Kept<'s> = Option<MutexGuard<'s, ShardIndex>>;

/// A block of a write in flight: its new slot.
#[derive(Clone, Copy)]
pub(crate) struct NewBlock {
    pub(crate) block: u64,
    pub(crate) shard: usize,
    pub(crate) slot: u32,
    pub(crate) zero: bool,
    /// Already written to the origin (by writethrough): flush only.
    pub(crate) on_origin: bool,
    /// Byte range of the block the request covers.
    pub(crate) lo: u32,
    pub(crate) hi: u32,
}

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Requests up to this many blocks take their shard locks before their
/// persistence stores (see `cache_write`). Larger ones would hold readers
/// of those shards off for the whole copy.
const LOCK_EARLY_BLOCKS: usize = 8;

/// Retired slots that make a writer reclaim even with free slots to spare.
/// Slots then come back while their index lines are still in the CPU
/// caches, and the free list's top stays a small, hot set.
const RECLAIM_EARLY: usize = 32;

/// Tries of an origin read (or a writearound write) before the request
/// fails (pauses of 1, 4, 16 ms).
const ORIGIN_ATTEMPTS: u32 = 4;

/// How many free slots a shard tries to keep, so writers rarely wait.
/// What an asynchronous origin call that the origin declined (a dead
/// connection, a request it would split) completes with: `WouldBlock`, which
/// the waiting path retries and no statistic counts as an origin error.
fn origin_declined(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        format!("the origin cannot take the {what} now"),
    )
}

fn low_water(nslots: u32, max_blocks: u32) -> u32 {
    (nslots / 16).max(max_blocks).min(nslots / 2)
}

impl Engine {
    pub(crate) fn build(
        region: Arc<dyn PmemRegion>,
        origin: Arc<dyn Origin>,
        sb: Superblock,
        sb_copy: usize,
        cfg: EngineConfig,
        (last_seq, watermark): (u64, u64),
        (epoch, written): (u64, u64),
    ) -> Result<Engine> {
        let layout = sb.layout;
        let bs = layout.block_size;
        let msync = region.mode() == pmcache_pmem::PersistMode::Msync;
        if cfg.max_request < bs || !cfg.max_request.is_multiple_of(bs) {
            return Err(EngineError::Config(format!(
                "maximum request {} must be a multiple of the block size {bs}",
                cfg.max_request
            )));
        }
        let max_blocks = cfg.max_request / bs + 1;
        let slots = layout.slot_count;
        let mut n = match cfg.shards {
            Some(n) => n.max(1).next_power_of_two() as u64,
            // Where a fence is an msync, one shard: its free list hands
            // concurrent writers neighbouring slots, so a group commit
            // writes their entries in one page and their data as one run,
            // where a shard each cost a page of entries per write (NBD 4 KiB
            // random writes at QD32 on ext4: 12.4 sectors written per write
            // against 17, and 1.1-1.25x the writes per second). A lock taken
            // per request is far cheaper than the msync it waits for.
            None if msync => 1,
            None => (slots / (8 * max_blocks as u64))
                .clamp(1, 64)
                .next_power_of_two(),
        };
        while n > 1 && slots / n < 2 * max_blocks as u64 {
            n /= 2;
        }
        if slots / n < 2 * max_blocks as u64 {
            return Err(EngineError::Config(format!(
                "cache has {slots} slots; at least {} are needed for requests of {} bytes",
                2 * max_blocks,
                cfg.max_request
            )));
        }
        let per = slots / n;
        let firsts: Box<[u64]> = (0..n).map(|i| i * per).collect();
        let shards = (0..n)
            .map(|i| {
                let first = i * per;
                let count = if i == n - 1 { slots - first } else { per };
                let ix = ShardIndex::new(first, count as u32);
                Shard {
                    buckets: ix.buckets_base(),
                    ix: Mutex::new(ix),
                    cv: Condvar::new(),
                    starved: AtomicBool::new(false),
                }
            })
            .collect();
        let chunk_shift = (20u32).saturating_sub(bs.trailing_zeros());
        let mode = cfg.mode.unwrap_or(sb.mode);
        Ok(Engine {
            region,
            size: origin.size(),
            origin,
            layout,
            shards,
            firsts,
            shard_mask: n - 1,
            chunk_shift,
            seq: Sequencer::new(last_seq, watermark),
            counters: Counters::default(),
            mode: AtomicU8::new(mode.as_u8()),
            zeros: vec![0u8; bs as usize].into_boxed_slice(),
            sb: Mutex::new(SbCopy { sb, copy: sb_copy }),
            wb: WritebackCtl {
                kick: Mutex::new(false),
                cv: Condvar::new(),
                stop: AtomicBool::new(false),
                thread: Mutex::new(None),
                rotor: Default::default(),
                step: Mutex::new(()),
                urgent: AtomicBool::new(false),
                settler: Mutex::new(None),
                settle_nap: Mutex::new(()),
                settle_cv: Condvar::new(),
                failed_log: Mutex::new((None, 0)),
            },
            closed: AtomicBool::new(false),
            hooks: Hooks::default(),
            streams: Streams::new(cfg.sequential_cutoff),
            promotion: crate::promotion::Promotion::new(layout.slot_count, msync),
            epochs: crate::epoch::Epochs::new(
                epoch,
                written,
                cfg.writeback_order == WritebackOrder::Ordered,
            ),
            bounces: Mutex::new(Vec::new()),
            stop_waits: AtomicBool::new(false),
            async_commits: AtomicUsize::new(0),
            me: std::sync::OnceLock::new(),
            cfg,
        })
    }

    // ----- small helpers -------------------------------------------------

    /// Install (or remove) a test hook; see [`HookPoint`]. For tests that
    /// must force one interleaving of concurrent requests.
    #[doc(hidden)]
    pub fn set_test_hook(&self, f: Option<HookFn>) {
        self.hooks.install(f);
    }

    pub(crate) fn test_hook(&self, point: HookPoint) {
        self.hooks.run(point);
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn block_size(&self) -> u32 {
        self.layout.block_size
    }

    pub fn max_request(&self) -> u32 {
        self.cfg.max_request
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn mode(&self) -> CacheMode {
        CacheMode::from_u8(self.mode.load(Ordering::SeqCst)).unwrap_or_default()
    }

    pub fn region(&self) -> &Arc<dyn PmemRegion> {
        &self.region
    }

    /// Writeback keeps the origin crash-consistent (epoch order).
    pub(crate) fn ordered(&self) -> bool {
        self.cfg.writeback_order == WritebackOrder::Ordered
    }

    /// A dirty version overwritten in a later epoch is retained: ordered
    /// writeback in writeback mode. Writethrough writes the origin in the
    /// client's own order, so an older version written back after a newer
    /// one would undo it.
    pub(crate) fn retains(&self) -> bool {
        self.ordered() && self.mode() == CacheMode::Writeback
    }

    pub(crate) fn bs(&self) -> u64 {
        self.layout.block_size as u64
    }

    pub(crate) fn shard_of(&self, block: u64) -> usize {
        (mix(block >> self.chunk_shift) & self.shard_mask) as usize
    }

    pub(crate) fn meta(&self, first: u64, s: u32) -> usize {
        self.layout.meta_off(first + s as u64)
    }

    pub(crate) fn data(&self, first: u64, s: u32) -> usize {
        self.layout.data_off(first + s as u64)
    }

    /// Seq of the incarnation in a slot's metadata.
    pub(crate) fn slot_seq(&self, first: u64, s: u32) -> u64 {
        self.region
            .word(self.meta(first, s) + 8)
            .load(Ordering::Relaxed)
    }

    /// Whether slot `s` (pinned, or owed to the origin with its shard
    /// locked) holds the data its entry's hash describes. Recovery marks
    /// what it loads K_UNVERIFIED, and the first use of such a slot checks
    /// it, so data damaged while the cache was closed reaches neither a
    /// client nor the origin; slots written since are trusted. A mismatch
    /// is counted and logged once, and the mark stays: every later use fails
    /// the same way.
    pub(crate) fn verify_loaded(&self, ix: &mut ShardIndex, s: u32) -> bool {
        let k = ix.key(s);
        if k & K_UNVERIFIED == 0 {
            return true;
        }
        let first = ix.first_slot;
        let ok = k & K_ZERO != 0 || {
            // SAFETY: the slot is pinned, or owed and its shard locked (so
            // not freed); writers only ever write free slots (copy-on-write),
            // so nobody writes its data meanwhile.
            let data = unsafe { self.region.slice(self.data(first, s), self.bs() as usize) };
            data_hash(data)
                == self
                    .region
                    .word(self.meta(first, s) + W_HASH * 8)
                    .load(Ordering::Relaxed)
        };
        if ok {
            ix.clear_flags(s, K_UNVERIFIED);
        } else if ix.damaged.insert(s) {
            // Once per slot: every later use (a read, each writeback retry)
            // fails the same way.
            self.counters.add(Ctr::CorruptBlocks, 1);
            tracing::error!(
                block = k & BLOCK_MASK,
                slot = first + s as u64,
                dirty = k & (K_DIRTY | K_RETAINED) != 0,
                "cached data failed its checksum"
            );
        }
        ok
    }

    /// After [`verify_loaded`](Self::verify_loaded) failed for the current
    /// version `s` of `block`, which the caller pinned: unpins it; a clean
    /// copy is dropped, so the block is read from the origin again (`None`);
    /// a dirty one is the only copy, and its users get the error.
    pub(crate) fn damaged(&self, ix: &mut ShardIndex, s: u32, block: u64) -> Option<EngineError> {
        ix.unpin(s);
        let first = ix.first_slot;
        if ix.key(s) & K_DIRTY != 0 {
            return Some(EngineError::DataCorrupt {
                block,
                slot: first + s as u64,
            });
        }
        ix.remove(s);
        let seq = self.slot_seq(first, s);
        self.retire(ix, s, seq, true);
        None
    }

    /// Offset of a slot's state word.
    fn state_off(&self, first: u64, s: u32) -> usize {
        self.meta(first, s) + W_STATE * 8
    }

    /// Store a state word and flush its line.
    pub(crate) fn store_state(&self, first: u64, s: u32, word: u64) {
        self.region
            .word(self.state_off(first, s))
            .store(word, Ordering::Release);
        self.region.flush(self.meta(first, s), META_SIZE);
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(EngineError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Persistence is a system call (msync mode), not a CPU fence: worth
    /// sharing between writers, and never worth holding a lock across.
    pub(crate) fn fence_is_syscall(&self) -> bool {
        self.region.mode() == pmcache_pmem::PersistMode::Msync
    }

    /// Shutting down: writes waiting for space (which a failing origin may
    /// never give) fail from now on, with nothing written, so the requests
    /// in flight can drain. Everything else still completes.
    pub fn stop_waiting(&self) {
        self.stop_waits.store(true, Ordering::SeqCst);
        for sh in self.shards.iter() {
            sh.cv.notify_all();
        }
    }

    /// An open cache, a range inside the origin, at most one atomic request.
    fn check_request(&self, offset: u64, len: u64) -> Result<()> {
        self.check_open()?;
        self.check_range(offset, len)?;
        if len > self.cfg.max_request as u64 {
            return Err(EngineError::TooLarge {
                len,
                max: self.cfg.max_request as u64,
            });
        }
        Ok(())
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        Ok(())
    }

    /// Distinct shards of a block range, ascending.
    pub(crate) fn shards_of(&self, b0: u64, b1: u64) -> ShardIds {
        if b0 >> self.chunk_shift == b1 >> self.chunk_shift {
            return smallvec::smallvec![self.shard_of(b0)];
        }
        let mut v = ShardIds::new();
        let mut c = b0 >> self.chunk_shift;
        while c <= b1 >> self.chunk_shift {
            v.push((mix(c) & self.shard_mask) as usize);
            c += 1;
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    pub(crate) fn lock_all(&self, ids: &[usize]) -> SmallVec<[MutexGuard<'_, ShardIndex>; 4]> {
        ids.iter().map(|&i| self.shards[i].ix.lock()).collect()
    }

    fn guard_pos(ids: &[usize], shard: usize) -> usize {
        ids.iter().position(|&i| i == shard).expect("shard locked")
    }

    /// A bounce buffer for `blocks` (ascending), from the pool.
    fn bounce(&self, blocks: Vec<u64>) -> Bounce {
        debug_assert!(blocks.windows(2).all(|w| w[0] < w[1]));
        let bs = self.bs() as usize;
        let mut buf = self.bounces.lock().pop().unwrap_or_default();
        if buf.len() < blocks.len() * bs {
            buf.resize(blocks.len() * bs, 0);
        }
        Bounce {
            blocks,
            buf,
            bs,
            holds_fills: false,
        }
    }

    /// Give a bounce buffer back to the pool.
    fn recycle(&self, bounce: Bounce) {
        let buf = bounce.buf;
        if buf.capacity() > 0 && buf.len() <= KEEP_BOUNCE_LEN {
            let mut pool = self.bounces.lock();
            if pool.len() < KEEP_BOUNCES {
                pool.push(buf);
            }
        }
    }

    // ----- statistics -----------------------------------------------------

    /// Wait until the commits and read fills that another thread finishes
    /// (the thread that makes their shared msync) are published: a read
    /// answers its client before its fill is durable, so its promotion
    /// shows a moment later. Each waits for one msync at most.
    pub fn quiesce(&self) {
        while self.async_commits.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// One more commit finished by another thread, if fewer than
    /// [`ASYNC_COMMITS`] are in flight; its finisher calls
    /// [`end_async_commit`](Self::end_async_commit).
    pub(crate) fn begin_async_commit(&self) -> bool {
        let n = self.async_commits.fetch_add(1, Ordering::Relaxed);
        if n >= ASYNC_COMMITS {
            self.async_commits.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub(crate) fn end_async_commit(&self) {
        self.async_commits.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> StatsSnapshot {
        let c = &self.counters;
        let (mut occupied, mut dirty, mut free, mut retained) = (0u64, 0u64, 0u64, 0u64);
        for sh in self.shards.iter() {
            let ix = sh.ix.lock();
            occupied += ix.valid as u64;
            dirty += ix.dirty as u64;
            free += ix.free_len as u64 + ix.retiring.len() as u64;
            retained += ix.retained as u64;
        }
        // Without order, W never moves and epochs are not owed as such.
        let (epochs_pending, oldest) = if self.ordered() {
            self.epochs.pending()
        } else {
            (0, Duration::ZERO)
        };
        StatsSnapshot {
            mode: self.mode().to_string(),
            pmem_mode: self.region.mode().to_string(),
            block_size: self.layout.block_size,
            slots: self.layout.slot_count,
            occupied,
            dirty,
            clean: occupied - dirty,
            free,
            read_hits: c.get(Ctr::ReadHits),
            read_misses: c.get(Ctr::ReadMisses),
            write_hits: c.get(Ctr::WriteHits),
            write_misses: c.get(Ctr::WriteMisses),
            promotions: c.get(Ctr::Promotions),
            evictions: c.get(Ctr::Evictions),
            writebacks: c.get(Ctr::Writebacks),
            writeback_bytes: c.get(Ctr::WritebackBytes),
            origin_errors: c.get(Ctr::OriginErrors),
            origin_reconnects: self.origin.reconnects(),
            corrupt_blocks: c.get(Ctr::CorruptBlocks),
            writes: c.get(Ctr::Writes),
            write_fences: c.get(Ctr::WriteFences),
            read_bytes: c.get(Ctr::ReadBytes),
            write_bytes: c.get(Ctr::WriteBytes),
            waits_for_space: c.get(Ctr::WaitsForSpace),
            bypass_reads: c.get(Ctr::BypassReads),
            bypass_writes: c.get(Ctr::BypassWrites),
            bypass_bytes: c.get(Ctr::BypassBytes),
            relayed_bytes: c.get(Ctr::RelayedBytes),
            fences: self.region.fences(),
            watermark: self.seq.durable(),
            writeback_order: self.cfg.writeback_order.to_string(),
            retained,
            epoch: self.epochs.current(),
            written_epoch: self.epochs.written(),
            epochs_pending,
            oldest_pending_epoch_ms: if dirty + retained == 0 {
                0
            } else {
                oldest.as_millis() as u64
            },
        }
    }

    /// A count that moves whenever a client reads or writes (for telling a
    /// busy cache from an idle one, not for statistics).
    pub(crate) fn client_requests(&self) -> u64 {
        use crate::stats::Ctr;
        [
            Ctr::Writes,
            Ctr::ReadHits,
            Ctr::ReadMisses,
            Ctr::BypassReads,
            Ctr::BypassWrites,
        ]
        .into_iter()
        .map(|c| self.counters.get(c))
        .sum()
    }

    /// Dirty blocks, and the older versions ordered writeback retains,
    /// now (one pass over the shards).
    pub(crate) fn owed_counts(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(d, r), s| {
            let ix = s.ix.lock();
            (d + ix.dirty as u64, r + ix.retained as u64)
        })
    }

    /// Versions the origin is owed now: dirty blocks, and the older
    /// versions ordered writeback retains.
    pub fn dirty_blocks(&self) -> u64 {
        let (dirty, retained) = self.owed_counts();
        dirty + retained
    }
}
