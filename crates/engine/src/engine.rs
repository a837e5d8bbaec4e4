//! The cache engine: request paths over the shards.
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
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, MutexGuard};
use pmcache_origin::Origin;
use pmcache_pmem::PmemRegion;
use smallvec::SmallVec;

use crate::error::{EngineError, Result};
use crate::format::*;
use crate::hooks::{HookFn, HookPoint, Hooks};
use crate::index::*;
use crate::sequential::Streams;
use crate::stats::{Counters, Ctr, StatsSnapshot};
use crate::txn::Sequencer;

mod staged;
pub use staged::{Stage, StagedWrite};

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
    /// Pause between batches while the dirty share is low (trickle).
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            mode: None,
            max_request: 1 << 20,
            background_writeback: true,
            writeback_batch: 1024,
            writeback_pause: Duration::from_millis(100),
            force_origin: false,
            shards: None,
            promote_reads: true,
            sequential_cutoff: DEFAULT_SEQUENTIAL_CUTOFF,
        }
    }
}

pub(crate) struct Shard {
    pub(crate) ix: Mutex<ShardIndex>,
    pub(crate) cv: Condvar,
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
    pub(crate) sb: Mutex<(Superblock, usize)>,
    pub(crate) wb: WritebackCtl,
    pub(crate) closed: AtomicBool,
    pub(crate) hooks: Hooks,
    pub(crate) streams: Streams,
    /// Set on shutdown: writes that would wait for space give up instead.
    stop_waits: AtomicBool,
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

/// A reclaim batch: `(slot, seq of its old incarnation, may be freed)`.
type Batch = Vec<(u32, u64, bool)>;

/// Blocks a read fetched: into new cache slots, or into bounce buffers.
type Fetched = (Vec<NewBlock>, Bounce);

/// Missed blocks read without a cache slot (not promoted, or no room): one
/// buffer for all of them, a block each, in block order.
#[derive(Default)]
struct Bounce {
    blocks: Vec<u64>,
    buf: Vec<u8>,
}

impl Bounce {
    fn new(blocks: Vec<u64>, bs: usize) -> Bounce {
        let buf = vec![0u8; blocks.len() * bs];
        Bounce { blocks, buf }
    }
}

/// What a write puts into each block.
pub(crate) enum Src<'a> {
    Buf(&'a [u8]),
    Fill(&'a mut dyn FnMut(&mut [IoSliceMut<'_>]) -> io::Result<()>),
    Zero,
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
        last_seq: u64,
        watermark: u64,
    ) -> Result<Engine> {
        let layout = sb.layout;
        let bs = layout.block_size;
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
            sb: Mutex::new((sb, sb_copy)),
            wb: WritebackCtl {
                kick: Mutex::new(false),
                cv: Condvar::new(),
                stop: AtomicBool::new(false),
                thread: Mutex::new(None),
                rotor: Default::default(),
            },
            closed: AtomicBool::new(false),
            hooks: Hooks::default(),
            streams: Streams::new(cfg.sequential_cutoff),
            stop_waits: AtomicBool::new(false),
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

    fn test_hook(&self, point: HookPoint) {
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

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
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

    fn check_open(&self) -> Result<()> {
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

    // ----- block locks ---------------------------------------------------

    /// Take the writer lock of every block in `[b0, b1]`, waiting as needed.
    /// When the range lies in one shard, that shard stays locked for the
    /// caller (so the request's slots come in the same critical section).
    fn lock_writers(&self, b0: u64, b1: u64) -> Option<MutexGuard<'_, ShardIndex>> {
        let ids = self.shards_of(b0, b1);
        // The publish looks these buckets up after the fence; start the
        // (likely cold) loads now, before the locks.
        for b in b0..=b1.min(b0 + 3) {
            self.shards[self.shard_of(b)].prefetch_bucket(b);
        }
        let mut held = None;
        for &sh in &ids {
            let shard = &self.shards[sh];
            let mut ix = shard.ix.lock();
            loop {
                let busy = (b0..=b1).any(|b| self.shard_of(b) == sh && ix.lock_state(b).writer);
                if !busy {
                    break;
                }
                shard.cv.wait_for(&mut ix, Duration::from_millis(10));
            }
            for b in (b0..=b1).filter(|&b| self.shard_of(b) == sh) {
                ix.update_lock(b, |l| l.writer = true);
            }
            if ids.len() == 1 {
                held = Some(ix);
            }
        }
        held
    }

    fn unlock_writers(&self, b0: u64, b1: u64) {
        for sh in self.shards_of(b0, b1) {
            let mut ix = self.shards[sh].ix.lock();
            for b in (b0..=b1).filter(|&b| self.shard_of(b) == sh) {
                ix.update_lock(b, |l| l.writer = false);
            }
            drop(ix);
            self.shards[sh].cv.notify_all();
        }
    }

    /// Take the origin-writer lock of every block (no origin reader or other
    /// origin writer), all at once so that no two requests can deadlock.
    pub(crate) fn lock_origin_writers(&self, b0: u64, b1: u64) {
        let ids = self.shards_of(b0, b1);
        loop {
            let mut g = self.lock_all(&ids);
            let blocked = (b0..=b1).find(|&b| {
                let l = g[Self::guard_pos(&ids, self.shard_of(b))].lock_state(b);
                l.origin_writer || l.origin_readers > 0
            });
            match blocked {
                None => {
                    for b in b0..=b1 {
                        g[Self::guard_pos(&ids, self.shard_of(b))]
                            .update_lock(b, |l| l.origin_writer = true);
                    }
                    return;
                }
                Some(b) => {
                    let pos = Self::guard_pos(&ids, self.shard_of(b));
                    let mut mine = g.swap_remove(pos);
                    drop(g);
                    self.shards[self.shard_of(b)]
                        .cv
                        .wait_for(&mut mine, Duration::from_millis(5));
                }
            }
        }
    }

    pub(crate) fn unlock_origin_writers(&self, blocks: impl Iterator<Item = u64>) {
        for b in blocks {
            let sh = self.shard_of(b);
            self.shards[sh]
                .ix
                .lock()
                .update_lock(b, |l| l.origin_writer = false);
            self.shards[sh].cv.notify_all();
        }
    }

    // ----- slot allocation and reclaim ------------------------------------

    /// Retire a slot that left the index. Its FREE store waits until the
    /// watermark covers its seq, so a multi-block transaction stays whole in
    /// media while recovery might still need to verify it (format rule 2).
    /// The reclaim that frees the slot makes the store.
    pub(crate) fn retire(&self, ix: &mut ShardIndex, s: u32, seq: u64) {
        let state = if seq <= self.seq.durable() {
            RState::Covered
        } else {
            RState::Live
        };
        ix.retiring.push(Retired {
            slot: s,
            seq,
            state,
        });
    }

    /// Prepare a reclaim batch of up to `victims` free slots: the retiring
    /// slots the watermark now allows, then clean LRU slots for the rest.
    /// Returns the slots whose FREE [`flush_reclaim`](Self::flush_reclaim)
    /// stores before the fence and, per slot, whether it may be freed after
    /// the fence.
    fn prepare_reclaim(&self, ix: &mut ShardIndex, victims: usize) -> Batch {
        let first = ix.first_slot;
        let durable = self.seq.durable();
        ix.reclaim_durable = durable;
        let mut out: Vec<(u32, u64, bool)> = Vec::with_capacity(ix.retiring.len() + victims);
        // A block's newest version may be evicted only once every older
        // version is durably FREE (format rule 3). Older versions made FREE
        // by this batch are not durable before its fence, and the victim's
        // FREE store could reach media first, so their blocks wait.
        let mut blocked: Vec<u64> = Vec::new();
        // Filtered in place: the list keeps its capacity from batch to batch.
        let mut retiring = std::mem::take(&mut ix.retiring);
        retiring.retain(|r| {
            if r.state != RState::Durable {
                blocked.push(ix.key(r.slot) & BLOCK_MASK);
            }
            let keep = match r.state {
                RState::Live => r.seq > durable,
                RState::Covered => false,
                RState::Durable => ix.pins(r.slot) > 0,
            };
            if !keep {
                out.push((r.slot, r.seq, ix.pins(r.slot) == 0));
            }
            keep
        });
        // Retired slots count towards what is wanted: evict only the rest.
        let victims = victims.saturating_sub(out.iter().filter(|o| o.2).count());
        if victims > 0 {
            blocked.sort_unstable();
            let keys = ix.pick_victims(victims, |s, k| {
                k & K_VALID != 0
                    && k & (K_DIRTY | K_WB) == 0
                    && key_pins(k) == 0
                    && self.slot_seq(first, s) <= durable
                    && blocked.binary_search(&(k & BLOCK_MASK)).is_err()
            });
            for s in keys {
                let seq = self.slot_seq(first, s);
                ix.remove(s);
                out.push((s, seq, true));
                self.counters.add(Ctr::Evictions, 1);
            }
        }
        ix.retiring = retiring;
        out
    }

    /// Store FREE into a prepared batch's state words (before a fence), by
    /// the thread that fences. Streaming stores: a retired slot's entry line
    /// is cold, and a temporal store would read it from media first.
    fn flush_reclaim(&self, first: u64, batch: &[(u32, u64, bool)]) {
        for &(s, _, _) in batch {
            self.region
                .store_word_flush(self.state_off(first, s), STATE_FREE);
        }
    }

    /// After a fence: free what the batch made durable.
    fn complete_reclaim(&self, ix: &mut ShardIndex, mut batch: Batch) {
        // Highest slot first onto the LIFO free list, so that writers take
        // the batch in ascending order and neighbouring slots share their
        // index lines and page-table entries instead of each missing alone.
        // A small early batch is warm already and not worth sorting.
        if batch.len() > 2 * RECLAIM_EARLY {
            batch.sort_unstable_by_key(|b| std::cmp::Reverse(b.0));
        }
        for (slot, seq, may_free) in batch {
            if may_free {
                ix.push_free(slot);
            } else {
                ix.retiring.push(Retired {
                    slot,
                    seq,
                    state: RState::Durable,
                });
            }
        }
        ix.reclaiming = false;
    }

    /// Reclaim with a fence of our own. `ix` is re-locked on return.
    /// False when nothing could be reclaimed or another reclaim runs.
    fn reclaim_now(
        &self,
        shard: usize,
        ix: &mut MutexGuard<'_, ShardIndex>,
        victims: usize,
    ) -> bool {
        if ix.reclaiming {
            return false;
        }
        let batch = self.prepare_reclaim(ix, victims);
        if batch.is_empty() {
            return self.raise_watermark(ix);
        }
        ix.reclaiming = true;
        let first = ix.first_slot;
        MutexGuard::unlocked(ix, || {
            self.flush_reclaim(first, &batch);
            // Include S so slots of recent transactions become reusable too.
            let staged = self.seq.stage_watermark(&*self.region);
            self.region.fence();
            self.seq.end_staged(staged);
        });
        self.complete_reclaim(ix, batch);
        self.shards[shard].cv.notify_all();
        true
    }

    /// A fence that only raises S, when S lags the seqs handed out. Retired
    /// slots wait for S to cover their seq, and so do eviction victims;
    /// writers raise S only now and then (see `Sequencer::
    /// stage_watermark_own`), so with no later writer a waiting allocator
    /// must issue that fence itself. `ix` is re-locked on return. True if
    /// S rose.
    fn raise_watermark(&self, ix: &mut MutexGuard<'_, ShardIndex>) -> bool {
        if self.seq.last() <= self.seq.durable() {
            return false;
        }
        let staged = MutexGuard::unlocked(ix, || {
            let staged = self.seq.stage_watermark(&*self.region);
            if staged > 0 {
                self.region.fence();
                self.seq.end_staged(staged);
            }
            staged
        });
        staged > 0
    }

    /// Take `need` free slots from a shard, pinned, reclaiming or waiting
    /// for writeback as needed. With `wait == false`, gives up instead of
    /// waiting. With `piggy`, a shard running low also prepares a reclaim
    /// batch for the caller's next fence (`(request blocks, batches)`).
    #[allow(clippy::type_complexity)]
    fn alloc(
        &self,
        shard: usize,
        need: usize,
        wait: bool,
        piggy: Option<(u32, &mut Batches)>,
    ) -> Result<Option<SmallVec<[u32; 4]>>> {
        self.alloc_locked(shard, &mut self.shards[shard].ix.lock(), need, wait, piggy)
    }

    /// [`alloc`](Self::alloc) with the shard's lock already taken.
    #[allow(clippy::type_complexity)]
    fn alloc_locked(
        &self,
        shard: usize,
        ix: &mut MutexGuard<'_, ShardIndex>,
        need: usize,
        wait: bool,
        piggy: Option<(u32, &mut Batches)>,
    ) -> Result<Option<SmallVec<[u32; 4]>>> {
        let sh = &self.shards[shard];
        let mut waited = false;
        loop {
            if ix.free_len as usize >= need {
                let v: SmallVec<[u32; 4]> = (0..need)
                    .map(|_| {
                        let s = ix.pop_free().expect("free count");
                        ix.pin(s);
                        s
                    })
                    .collect();
                if let Some((count, batches)) = piggy {
                    if let Some(b) = self.piggyback_batch(ix, count) {
                        batches.push((shard, b));
                    }
                }
                return Ok(Some(v));
            }
            let want = need - ix.free_len as usize + low_water(ix.nslots(), 0) as usize;
            if self.reclaim_now(shard, ix, want) {
                continue;
            }
            if !wait {
                return Ok(None);
            }
            self.check_open()?;
            if self.stop_waits.load(Ordering::SeqCst) {
                return Err(EngineError::ShuttingDown);
            }
            if !waited {
                self.counters.add(Ctr::WaitsForSpace, 1);
                waited = true;
            }
            if self.wb.thread.lock().is_some() {
                self.kick_writeback();
                sh.cv.wait_for(ix, Duration::from_millis(10));
            } else {
                // No writeback thread (tools, tests): clean a batch ourselves.
                let r = MutexGuard::unlocked(ix, || self.writeback_step(self.cfg.writeback_batch));
                match r {
                    Ok(0) => {
                        sh.cv.wait_for(ix, Duration::from_millis(1));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "writeback for space failed; retrying");
                        sh.cv.wait_for(ix, Duration::from_millis(50));
                    }
                }
            }
        }
    }

    /// A reclaim batch to ride on the caller's next fence, when the shard
    /// runs low or has enough retired slots (`count`: the request's blocks).
    fn piggyback_batch(&self, ix: &mut ShardIndex, count: u32) -> Option<Batch> {
        let lw = low_water(ix.nslots(), count);
        // While a slow or preempted transaction holds S back, nothing new
        // can be freed; rescanning the growing list on every write would
        // make each write cost as much as the list is long.
        let early = ix.retiring.len() >= RECLAIM_EARLY && self.seq.durable() > ix.reclaim_durable;
        if ix.reclaiming || (ix.free_len >= lw && !early) {
            return None;
        }
        let want = lw.saturating_sub(ix.free_len) as usize;
        let b = self.prepare_reclaim(ix, want);
        if b.is_empty() {
            return None;
        }
        ix.reclaiming = true;
        Some(b)
    }

    fn release_slots(&self, blocks: &[NewBlock]) {
        for nb in blocks {
            let mut ix = self.shards[nb.shard].ix.lock();
            ix.unpin(nb.slot);
            ix.push_free(nb.slot);
        }
    }

    // ----- reads ----------------------------------------------------------

    /// Read `[offset, offset + len)` and hand the bytes to `sink` as slices
    /// that point into the cache where possible.
    pub fn read_with(
        &self,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Result<()> {
        self.read_impl(offset, len, sink, false).map(|_| ())
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
        self.read_impl(offset, len, sink, true)
    }

    fn read_impl(
        &self,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
        cached_only: bool,
    ) -> Result<bool> {
        self.check_request(offset, len)?;
        if len == 0 {
            return sink(&[]).map(|()| true).map_err(EngineError::Transfer);
        }
        let bs = self.bs();
        let (b0, b1) = (offset / bs, (offset + len - 1) / bs);
        if b0 == b1 {
            if let Some(r) = self.read_block_hit(offset, len, sink) {
                return r.map(|()| true);
            }
        }
        let ids = self.shards_of(b0, b1);
        let nblocks = (b1 - b0 + 1) as usize;

        // Look every block up under all shard locks at once, so the request
        // sees each concurrent write either wholly or not at all.
        let mut locs: Vec<Loc> = Vec::with_capacity(nblocks);
        loop {
            let mut g = self.lock_all(&ids);
            locs.clear();
            let mut blocked = None;
            for b in b0..=b1 {
                let sh = self.shard_of(b);
                let ix = &mut g[Self::guard_pos(&ids, sh)];
                match ix.lookup(b) {
                    Some(s) if ix.pin(s) => {
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
                    None if cached_only => {
                        blocked = Some(sh);
                        break;
                    }
                    None => locs.push(Loc::Miss),
                }
            }
            if cached_only && blocked.is_some() {
                Self::unpin_hits(&ids, &mut g, &locs);
                return Ok(false);
            }
            match blocked {
                None => {
                    for (i, b) in (b0..=b1).enumerate() {
                        if matches!(locs[i], Loc::Miss) {
                            g[Self::guard_pos(&ids, self.shard_of(b))]
                                .update_lock(b, |l| l.origin_readers += 1);
                        }
                    }
                    break;
                }
                Some(sh) => {
                    Self::unpin_hits(&ids, &mut g, &locs);
                    let pos = Self::guard_pos(&ids, sh);
                    let mut mine = g.swap_remove(pos);
                    drop(g);
                    self.shards[sh]
                        .cv
                        .wait_for(&mut mine, Duration::from_millis(5));
                }
            }
        }

        let hits = locs.iter().filter(|l| matches!(l, Loc::Hit { .. })).count() as u64;
        self.counters.add(Ctr::ReadHits, hits);
        self.counters.add(Ctr::ReadMisses, nblocks as u64 - hits);
        self.counters.add(Ctr::ReadBytes, len);
        // A scan's misses go around the cache: hits are still served from it.
        let promotes = self.cfg.promote_reads && self.mode() != CacheMode::Passthrough;
        let bypass = promotes && hits < nblocks as u64 && self.streams.bypass(offset, len, false);
        if bypass {
            self.counters.add(Ctr::BypassReads, 1);
            self.counters.add(Ctr::BypassBytes, len);
        }

        let misses = self.fetch_misses(b0, &locs, !bypass);
        let result = match misses {
            Err(e) => Err(e),
            Ok((filled, bounce)) => {
                let r = self.emit(offset, len, b0, &locs, &filled, &bounce, sink);
                self.unpin_all(&filled);
                r
            }
        };
        for l in &locs {
            if let Loc::Hit { shard, slot, .. } = *l {
                self.shards[shard].ix.lock().unpin(slot);
            }
        }
        result.map(|()| true)
    }

    /// A read within one cached block, without the general path's
    /// bookkeeping (what `read_impl` does for a request that hits).
    /// `None` on a miss or a saturated pin count; the general path then
    /// takes the request.
    fn read_block_hit(
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
        if !ix.pin(s) {
            return None;
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
    unsafe fn pinned_bytes(&self, first: u64, s: u32, lo: usize, len: usize) -> &[u8] {
        // SAFETY: as the caller guarantees.
        unsafe { self.region.slice(self.data(first, s) + lo, len) }
    }

    /// Drop the pins a lookup took, with its shard locks still held.
    fn unpin_hits(ids: &[usize], g: &mut [MutexGuard<'_, ShardIndex>], locs: &[Loc]) {
        for l in locs {
            if let Loc::Hit { shard, slot, .. } = *l {
                g[Self::guard_pos(ids, shard)].unpin(slot);
            }
        }
    }

    /// Build the slices of a read and call the sink.
    #[allow(clippy::too_many_arguments)]
    fn emit(
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
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(locs.len());
        let (mut fi, mut bi) = (0, 0);
        for (i, loc) in locs.iter().enumerate() {
            let b = b0 + i as u64;
            let lo = if i == 0 { offset - b * bs } else { 0 } as usize;
            let hi = if b == (offset + len - 1) / bs {
                offset + len - b * bs
            } else {
                bs
            } as usize;
            let slot = match *loc {
                Loc::Hit { zero: true, .. } => None,
                Loc::Hit { shard, slot, .. } => Some((shard, slot)),
                Loc::Miss => {
                    if fi < filled.len() && filled[fi].block == b {
                        fi += 1;
                        Some((filled[fi - 1].shard, filled[fi - 1].slot))
                    } else {
                        bi += 1;
                        let at = (bi - 1) * bs as usize;
                        debug_assert_eq!(bounce.blocks[bi - 1], b);
                        slices.push(IoSlice::new(&bounce.buf[at + lo..at + hi]));
                        continue;
                    }
                }
            };
            match slot {
                None => slices.push(IoSlice::new(&self.zeros[lo..hi])),
                Some((shard, s)) => {
                    // SAFETY: hits are pinned and filled slots owned by
                    // this request until after the sink returns.
                    let bytes = unsafe { self.pinned_bytes(self.firsts[shard], s, lo, hi - lo) };
                    slices.push(IoSlice::new(bytes));
                }
            }
        }
        sink(&slices).map_err(EngineError::Transfer)
    }

    /// Fetch the missed blocks from the origin: into new cache slots where
    /// the mode promotes and there is room, else into bounce buffers.
    /// Releases the origin-reader locks taken by the lookup.
    fn fetch_misses(&self, b0: u64, locs: &[Loc], promote: bool) -> Result<Fetched> {
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
        let promote = promote && self.cfg.promote_reads && self.mode() != CacheMode::Passthrough;
        let mut filled: Vec<NewBlock> = Vec::new();
        let mut unslotted: Vec<u64> = Vec::new();
        if promote {
            let (first, last) = (missing[0], missing[missing.len() - 1]);
            for sh in self.shards_of(first, last) {
                let mine: Vec<u64> = missing
                    .iter()
                    .copied()
                    .filter(|&b| self.shard_of(b) == sh)
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                match self.alloc(sh, mine.len(), false, None) {
                    Ok(Some(slots)) => {
                        for (&b, &s) in mine.iter().zip(&slots) {
                            filled.push(NewBlock {
                                block: b,
                                shard: sh,
                                slot: s,
                                zero: false,
                                on_origin: false,
                                lo: 0,
                                hi: bs as u32,
                            });
                        }
                    }
                    _ => unslotted.extend(&mine),
                }
            }
            filled.sort_by_key(|n| n.block);
            unslotted.sort_unstable();
        } else {
            unslotted.extend(&missing);
        }

        // Origin → slots (or bounce), one vectored request per contiguous run.
        let mut targets: Vec<(u64, IoSliceMut<'_>)> = Vec::with_capacity(missing.len());
        let firsts: Vec<u64> = filled.iter().map(|nb| self.firsts[nb.shard]).collect();
        for (nb, &first) in filled.iter().zip(&firsts) {
            // SAFETY: the slot was just taken from the free list and is not
            // published, so this request is its only user.
            let buf = unsafe { self.region.slice_mut(self.data(first, nb.slot), bs) };
            targets.push((nb.block, IoSliceMut::new(buf)));
        }
        let mut bounce = Bounce::new(unslotted, bs);
        for (b, v) in bounce.blocks.iter().zip(bounce.buf.chunks_exact_mut(bs)) {
            targets.push((*b, IoSliceMut::new(v)));
        }
        targets.sort_by_key(|t| t.0);
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
        drop(targets);
        // Bounce buffers publish nothing: their reader locks can go now. A
        // filled block keeps its lock until `commit_fill` has decided, under
        // the same shard lock, whether its data may still be published.
        self.release_origin_readers(bounce.blocks.iter().copied());
        if let Err(source) = res {
            self.release_origin_readers(filled.iter().map(|nb| nb.block));
            self.release_slots(&filled);
            return Err(EngineError::Origin {
                offset: missing[0] * bs as u64,
                source,
            });
        }
        if !filled.is_empty() {
            self.test_hook(HookPoint::FillRead);
            self.commit_fill(&mut filled, &firsts);
        }
        Ok((filled, bounce))
    }

    /// An origin request, tried again after short pauses before the client
    /// sees an error: one failed request of a flaky origin costs a retry,
    /// not a failed client request.
    fn origin_retrying<T>(
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

    fn origin_read_retrying(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        self.origin_retrying("read", offset, || {
            self.origin.read_vectored_at(bufs, offset)
        })
    }

    fn release_origin_readers(&self, blocks: impl Iterator<Item = u64>) {
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
    /// index or under a writer lock, which the check below sees. The reader
    /// lock is dropped in the same critical section as that check, and a
    /// kept block holds the writer lock from there to its publish.
    fn commit_fill(&self, filled: &mut [NewBlock], firsts: &[u64]) {
        let ids: ShardIds = {
            let mut v: ShardIds = filled.iter().map(|n| n.shard).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let mut keep = vec![false; filled.len()];
        {
            let mut g = self.lock_all(&ids);
            for (i, nb) in filled.iter().enumerate() {
                let ix = &mut g[Self::guard_pos(&ids, nb.shard)];
                let lock = ix.lock_state(nb.block);
                assert!(lock.origin_readers > 0 && !lock.origin_writer);
                ix.update_lock(nb.block, |l| l.origin_readers -= 1);
                if ix.lookup(nb.block).is_none() && !lock.writer {
                    ix.update_lock(nb.block, |l| l.writer = true);
                    keep[i] = true;
                }
            }
        }
        for &sh in &ids {
            self.shards[sh].cv.notify_all();
        }
        let count = keep.iter().filter(|&&k| k).count() as u32;
        if count > 0 {
            let t = self.seq.begin();
            for (i, nb) in filled.iter().enumerate() {
                if keep[i] {
                    let data_off = self.data(firsts[i], nb.slot);
                    // SAFETY: unpublished slot owned by this request; read only.
                    let hash =
                        data_hash(unsafe { self.region.slice(data_off, self.bs() as usize) });
                    self.region.flush(data_off, self.bs() as usize);
                    let e = Entry {
                        block: nb.block,
                        seq: t.seq,
                        hash,
                        count,
                        flags: 0,
                    };
                    self.write_entry(firsts[i], nb.slot, &e, STATE_CLEAN);
                }
            }
            let staged = self.seq.stage_watermark(&*self.region);
            self.region.fence();
            self.seq.end(t, staged);
        }
        let mut g = self.lock_all(&ids);
        for (i, nb) in filled.iter().enumerate() {
            let ix = &mut g[Self::guard_pos(&ids, nb.shard)];
            if keep[i] {
                ix.insert(nb.slot, nb.block, 0);
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
                });
            }
        }
        drop(g);
        for &sh in &ids {
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

    /// Write a slot's whole entry line (the slot is free and owned by the
    /// caller). Streaming stores: the line is never read first.
    pub(crate) fn write_entry(&self, first: u64, s: u32, e: &Entry, code: u8) {
        let mut words = [0u64; META_SIZE / 8];
        words[..5].copy_from_slice(&e.encode());
        words[W_STATE] = state_word(e.seq, code);
        let mut line = [0u8; META_SIZE];
        for (b, w) in line.chunks_exact_mut(8).zip(words) {
            b.copy_from_slice(&w.to_ne_bytes());
        }
        // SAFETY: a free slot's entry belongs to the request that took the
        // slot; no one reads it before it is published.
        unsafe { self.region.copy_flush_nt(self.meta(first, s), &line) };
    }

    // ----- writes ---------------------------------------------------------

    /// Write `data` at `offset`; durable on return.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let bs = self.bs();
        // The fast path holds its shard's lock across the fence; with msync
        // that would serialize the shard's writers (see `cache_stage`).
        if data.len() as u64 == bs
            && offset.is_multiple_of(bs)
            && self.mode() == CacheMode::Writeback
            && !self.fence_is_syscall()
        {
            self.check_open()?;
            self.check_range(offset, bs)?;
            if let Some(r) = self.write_block_fast(offset / bs, data) {
                return r;
            }
        }
        self.write_src(offset, data.len() as u64, fua, Src::Buf(data))
    }

    /// The most common request, one whole block from memory in writeback
    /// mode, without the general path's bookkeeping. The shard stays locked
    /// from the slot's allocation to its publish, so no other writer can
    /// come between and the block needs no writer lock. The transaction is
    /// the one `cache_write` makes for a single block. `None` when this
    /// does not apply now (a writer holds the block, or the shard has no
    /// free slot); the general path then takes the request.
    fn write_block_fast(&self, b: u64, data: &[u8]) -> Option<Result<()>> {
        let sh = self.shard_of(b);
        let shard = &self.shards[sh];
        shard.prefetch_bucket(b);
        let mut ix = shard.ix.lock();
        if ix.free_len == 0 || (!ix.locks.is_empty() && ix.lock_state(b).writer) {
            return None;
        }
        let slot = ix.pop_free().expect("free count");
        let batch = self.piggyback_batch(&mut ix, 1);
        let first = ix.first_slot;
        let t = self.seq.begin();
        let staged = self.seq.stage_watermark_own(&t, &*self.region);
        // SAFETY: a free slot, taken under the shard lock and unpublished.
        let hash = unsafe { self.region.copy_flush_hash(self.data(first, slot), data) };
        let e = Entry {
            block: b,
            seq: t.seq,
            hash,
            count: 1,
            flags: 0,
        };
        self.write_entry(first, slot, &e, STATE_DIRTY);
        if let Some(batch) = &batch {
            self.flush_reclaim(first, batch);
        }
        self.region.fence();
        let hit = self.publish(&mut ix, slot, b, K_DIRTY, t.seq);
        if let Some(batch) = batch {
            self.complete_reclaim(&mut ix, batch);
        }
        self.seq.end(t, staged);
        drop(ix);
        shard.cv.notify_all();
        self.counters.add(Ctr::WriteFences, 1);
        self.counters.add(
            if hit {
                Ctr::WriteHits
            } else {
                Ctr::WriteMisses
            },
            1,
        );
        self.counters.add(Ctr::Writes, 1);
        self.counters.add(Ctr::WriteBytes, data.len() as u64);
        Some(Ok(()))
    }

    /// Write `[offset, offset + len)`, letting `source` fill the cache slots
    /// directly (e.g. `recv` from a socket). If `source` fails, nothing is
    /// written.
    pub fn write_with(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        source: &mut dyn FnMut(&mut [IoSliceMut<'_>]) -> io::Result<()>,
    ) -> Result<()> {
        self.write_src(offset, len, fua, Src::Fill(source))
    }

    /// Zero `[offset, offset + len)`. Ranges above the maximum request size
    /// are split; each piece is atomic.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check_range(offset, len)?;
        let max = self.cfg.max_request as u64;
        let mut done = 0;
        while done < len {
            let n = max.min(len - done);
            self.write_src(offset + done, n, fua, Src::Zero)?;
            done += n;
        }
        Ok(())
    }

    /// Discard: the range reads as zeroes afterwards (so nothing older can
    /// ever reappear), and the origin is zeroed on writeback.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.write_zeroes(offset, len, fua)
    }

    /// Make acknowledged writes durable where the mode requires: in
    /// writeback mode they already are (in the cache).
    pub fn flush(&self) -> Result<()> {
        self.check_open()?;
        if self.mode() == CacheMode::Writeback {
            return Ok(());
        }
        self.origin.flush().map_err(|source| {
            self.counters.add(Ctr::OriginErrors, 1);
            EngineError::Origin { offset: 0, source }
        })
    }

    fn write_src(&self, offset: u64, len: u64, fua: bool, src: Src<'_>) -> Result<()> {
        self.check_request(offset, len)?;
        if let Src::Buf(b) = &src {
            debug_assert_eq!(b.len() as u64, len);
        }
        if len == 0 {
            if let Src::Fill(f) = src {
                f(&mut []).map_err(EngineError::Transfer)?;
            }
            return Ok(());
        }
        let bs = self.bs();
        let (b0, b1) = (offset / bs, (offset + len - 1) / bs);
        let held = self.lock_writers(b0, b1);
        let mode = self.bypass_mode(offset, len, &src);
        let fua = fua || (mode == CacheMode::Writearound && self.mode() == CacheMode::Writeback);
        let r = match mode {
            CacheMode::Writeback => self
                .cache_write(offset, len, src, b0, b1, true, held)
                .map(|_| ()),
            CacheMode::Writethrough => self
                .cache_write(offset, len, src, b0, b1, false, held)
                .and_then(|nbs| self.write_through(&nbs, fua)),
            CacheMode::Writearound | CacheMode::Passthrough => {
                drop(held);
                // A bypassed write of a writeback cache may land in the cache.
                let fallback = mode != self.mode() && self.mode() == CacheMode::Writeback;
                self.origin_write(offset, len, src, fua, b0, b1, fallback)
            }
        };
        // A successful writeback-mode write released its locks on publish.
        if mode != CacheMode::Writeback || r.is_err() {
            self.unlock_writers(b0, b1);
        }
        if r.is_ok() {
            self.counters.add(Ctr::Writes, 1);
            self.counters.add(Ctr::WriteBytes, len);
        }
        r
    }

    /// The mode a write runs in: its cache's, or writearound for a write
    /// that continues a sequential stream past the cutoff. Writearound keeps
    /// every promise (cached copies are updated or dropped, dirty blocks go
    /// through the cache); in writeback mode such a write carries FUA, since
    /// an acknowledged write must be durable without a FLUSH.
    fn bypass_mode(&self, offset: u64, len: u64, src: &Src<'_>) -> CacheMode {
        let mode = self.mode();
        let cached = matches!(mode, CacheMode::Writeback | CacheMode::Writethrough);
        // Zeroes cost the cache no data: they are not worth a bypass.
        if cached && !matches!(src, Src::Zero) && self.streams.bypass(offset, len, true) {
            self.counters.add(Ctr::BypassWrites, 1);
            self.counters.add(Ctr::BypassBytes, len);
            return CacheMode::Writearound;
        }
        mode
    }

    fn unpin_all(&self, nbs: &[NewBlock]) {
        for nb in nbs {
            self.shards[nb.shard].ix.lock().unpin(nb.slot);
        }
    }

    /// The copy-on-write transaction. The caller holds the writer locks of
    /// `[b0, b1]`. Returns the new blocks, published; with `release` their
    /// pins and the writer locks are dropped in the same critical section,
    /// otherwise they stay pinned and locked for the caller.
    ///
    /// Ordering for speed: on x86 every locked instruction (mutex, atomic
    /// read-modify-write) waits for earlier `clwb`s and streaming stores to
    /// complete, so all of them happen before the persistence stores start,
    /// and the stretch from the first streaming store to the fence has none.
    /// `held` is the lock of the request's only shard, if [`lock_writers`]
    /// kept it.
    /// The copy-on-write transaction. The caller holds the writer locks of
    /// `[b0, b1]`. Returns the new blocks, published; with `release` their
    /// pins and the writer locks are dropped in the same critical section,
    /// otherwise they stay pinned and locked for the caller.
    /// `held` is the lock of the request's only shard, if [`lock_writers`]
    /// kept it.
    #[allow(clippy::too_many_arguments)]
    fn cache_write(
        &self,
        offset: u64,
        len: u64,
        mut src: Src<'_>,
        b0: u64,
        b1: u64,
        release: bool,
        held: Option<MutexGuard<'_, ShardIndex>>,
    ) -> Result<Blocks> {
        let (st, kept) = self
            .cache_stage(offset, len, &mut src, b0, b1, held, true)?
            .expect("a waiting stage returns slots");
        let data = match src {
            Src::Buf(b) => Filled::Buf(b),
            Src::Zero => Filled::Zero,
            Src::Fill(_) => Filled::InSlots,
        };
        Ok(self.cache_commit(st, kept, data, release))
    }

    /// The first half of [`cache_write`]: slots, old content of partial
    /// blocks, and a payload from outside, received straight into the
    /// slots. `None` when `wait` is false and a shard has no free slot now
    /// (nothing is then held). Without `wait` every block must be whole.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cache_stage<'s>(
        &'s self,
        offset: u64,
        len: u64,
        src: &mut Src<'_>,
        b0: u64,
        b1: u64,
        mut held: Option<MutexGuard<'s, ShardIndex>>,
        wait: bool,
    ) -> Result<Option<(Staging, Kept<'s>)>> {
        let bs = self.bs();
        let end = offset + len;
        let zero_src = matches!(src, Src::Zero);
        let src_fill = matches!(src, Src::Fill(_));
        let mut nbs: Blocks = (b0..=b1)
            .map(|b| {
                let lo = offset.max(b * bs) - b * bs;
                let hi = end.min((b + 1) * bs) - b * bs;
                let full = lo == 0 && hi == bs;
                NewBlock {
                    block: b,
                    shard: self.shard_of(b),
                    slot: 0,
                    zero: zero_src && full,
                    on_origin: false,
                    lo: lo as u32,
                    hi: hi as u32,
                }
            })
            .collect();
        let count = nbs.len() as u32;
        let ids = self.shards_of(b0, b1);

        // 1. Slots (pinned), shard by shard in ascending order, with a
        //    reclaim batch that rides on this request's fence where a shard
        //    runs low.
        //    A small request publishes under shard locks taken before its
        //    persistence stores: the first locked instruction after the
        //    fence waits for the stores to drain, so the index work done
        //    before it is hidden. A one-shard request of whole blocks from
        //    memory keeps the lock from its allocation on.
        // Not where a fence is a system call: a shard lock held across an
        // msync would keep every other writer of the shard from reaching
        // its own fence, and so from sharing the msync (group commit).
        let lock_early = nbs.len() <= LOCK_EARLY_BLOCKS && !self.fence_is_syscall();
        let hold = lock_early && !src_fill && nbs.iter().all(|n| n.lo == 0 && n.hi as u64 == bs);
        let mut kept = None;
        let mut batches = Batches::new();
        for (k, &sh) in ids.iter().enumerate() {
            let need = nbs.iter().filter(|n| n.shard == sh).count();
            let piggy = Some((count, &mut batches));
            let was_held = held.is_some();
            let mut ix = held.take().unwrap_or_else(|| self.shards[sh].ix.lock());
            // Without waiting, only slots that are free now: no reclaim
            // (it fences) and no wait for writeback.
            let r = if !wait && (ix.free_len as usize) < need {
                Ok(None)
            } else {
                self.alloc_locked(sh, &mut ix, need, wait, piggy)
            };
            if hold && was_held && matches!(r, Ok(Some(_))) {
                kept = Some(ix);
            } else {
                drop(ix);
            }
            let slots = match r {
                Ok(Some(s)) => s,
                Ok(None) | Err(_) => {
                    // The blocks are in block order, not shard order: give
                    // back the slots of the shards done so far.
                    let taken: Blocks = nbs
                        .iter()
                        .filter(|n| ids[..k].contains(&n.shard))
                        .copied()
                        .collect();
                    self.release_slots(&taken);
                    self.abandon_batches(batches);
                    return r.map(|_| None);
                }
            };
            for (nb, s) in nbs.iter_mut().filter(|n| n.shard == sh).zip(slots) {
                nb.slot = s;
            }
        }
        let first_of = |sh: usize| self.firsts[sh];
        let fail = |e: EngineError, nbs: &[NewBlock], batches: Batches| {
            self.release_slots(nbs);
            self.abandon_batches(batches);
            Err(e)
        };

        // 2. Old content of partially covered blocks (temporal copies,
        //    flushed with the rest below).
        for nb in nbs
            .iter()
            .filter(|n| !n.zero && (n.lo != 0 || n.hi as u64 != bs))
        {
            debug_assert!(wait, "staging without waiting takes whole blocks only");
            if let Err(e) = self.fill_old(nb, first_of(nb.shard)) {
                return fail(e, &nbs, batches);
            }
        }

        // 3. A payload from outside arrives straight in the slots.
        if let Src::Fill(f) = src {
            let mut slices: Vec<IoSliceMut<'_>> = nbs
                .iter()
                .map(|nb| {
                    let off = self.data(first_of(nb.shard), nb.slot) + nb.lo as usize;
                    // SAFETY: unpublished slot owned by this request; the
                    // slices are disjoint (one per slot).
                    IoSliceMut::new(unsafe { self.region.slice_mut(off, (nb.hi - nb.lo) as usize) })
                })
                .collect();
            if let Err(e) = f(&mut slices) {
                drop(slices);
                return fail(EngineError::Transfer(e), &nbs, batches);
            }
        }
        let st = Staging {
            nbs,
            batches,
            ids,
            lock_early,
        };
        Ok(Some((st, kept)))
    }

    /// The second half of [`cache_write`]: persistence stores, one fence,
    /// publish.
    ///
    /// Ordering for speed: on x86 every locked instruction (mutex, atomic
    /// read-modify-write) waits for earlier `clwb`s and streaming stores to
    /// complete, so all of them happen before the persistence stores start,
    /// and the stretch from the first streaming store to the fence has none.
    pub(crate) fn cache_commit(
        &self,
        st: Staging,
        kept: Kept<'_>,
        data: Filled<'_>,
        release: bool,
    ) -> Blocks {
        let Staging {
            nbs,
            batches,
            ids,
            lock_early,
        } = st;
        let bs = self.bs();
        let count = nbs.len() as u32;
        let first_of = |sh: usize| self.firsts[sh];

        // 4. The last locked instructions (shard locks, taking the seq); S
        //    goes into this writer's own watermark line with the
        //    persistence stores.
        let mut g = match kept {
            Some(ix) => smallvec::smallvec![ix],
            None if lock_early => self.lock_all(&ids),
            None => SmallVec::new(),
        };
        let t = self.seq.begin();
        let seq = t.seq;
        let staged = self.seq.stage_watermark_own(&t, &*self.region);

        // 5. Persistence stores: data, entries, reclaim FREEs, then flushes.
        let mut pos = 0usize;
        for nb in &nbs {
            let first = first_of(nb.shard);
            let off = self.data(first, nb.slot);
            let n = (nb.hi - nb.lo) as usize;
            let partial = n as u64 != bs;
            let hash = match data {
                _ if nb.zero => 0,
                Filled::Buf(buf) => {
                    let part = &buf[pos..pos + n];
                    if partial {
                        // SAFETY: unpublished slot owned by this request.
                        unsafe { self.region.copy_flush(off + nb.lo as usize, part) };
                        // SAFETY: as above; read only.
                        data_hash(unsafe { self.region.slice(off, bs as usize) })
                    } else {
                        // SAFETY: unpublished slot owned by this request.
                        unsafe { self.region.copy_flush_hash(off, part) }
                    }
                }
                Filled::Zero => {
                    // SAFETY: unpublished slot owned by this request.
                    unsafe { self.region.zero_flush(off + nb.lo as usize, n) };
                    // SAFETY: as above; read only.
                    data_hash(unsafe { self.region.slice(off, bs as usize) })
                }
                Filled::InSlots => {
                    // SAFETY: unpublished slot owned by this request; read only.
                    data_hash(unsafe { self.region.slice(off, bs as usize) })
                }
            };
            pos += n;
            if partial || matches!(data, Filled::InSlots) {
                // Temporal stores (old content, or the kernel's recv).
                self.region.flush(off, bs as usize);
            }
            let e = Entry {
                block: nb.block,
                seq: t.seq,
                hash,
                count,
                flags: if nb.zero { FLAG_ZERO } else { 0 },
            };
            self.write_entry(first, nb.slot, &e, STATE_DIRTY);
        }
        for (sh, b) in &batches {
            self.flush_reclaim(first_of(*sh), b);
        }
        self.region.fence();

        // 6. Publish all blocks at once; retire the versions they replace.
        if g.is_empty() {
            g = self.lock_all(&ids);
        }
        let (mut hits, mut misses) = (0, 0);
        for nb in &nbs {
            let pos = Self::guard_pos(&ids, nb.shard);
            let ix = &mut g[pos];
            let flags = K_DIRTY | if nb.zero { K_ZERO } else { 0 };
            if self.publish(ix, nb.slot, nb.block, flags, seq) {
                hits += 1;
            } else {
                misses += 1;
            }
            if release {
                ix.unpin(nb.slot);
                ix.update_lock(nb.block, |l| l.writer = false);
            }
        }
        for (sh, b) in batches {
            let pos = Self::guard_pos(&ids, sh);
            self.complete_reclaim(&mut g[pos], b);
        }
        self.seq.end(t, staged);
        drop(g);
        for &sh in &ids {
            self.shards[sh].cv.notify_all();
        }
        self.counters.add(Ctr::WriteFences, 1);
        self.counters.add(Ctr::WriteHits, hits);
        self.counters.add(Ctr::WriteMisses, misses);
        // No kick here: waking the writeback thread for every write costs a
        // context switch per request. It polls, and writers short of space
        // kick it.
        nbs
    }

    /// After a write's fence: make `slot` the current version of `block`
    /// and retire the version it replaces. True if there was one.
    fn publish(&self, ix: &mut ShardIndex, slot: u32, block: u64, flags: u64, seq: u64) -> bool {
        let old = ix.lookup(block);
        if let Some(old) = old {
            // Retire under this transaction's seq rather than the old
            // version's: it is larger, so the FREE store waits at least as
            // long as rule 2 asks, and no cold entry line is read.
            ix.remove(old);
            self.retire(ix, old, seq);
        }
        ix.insert(slot, block, flags);
        old.is_some()
    }

    /// Give back reclaim batches that failed before their FREE stores: the
    /// slots wait for the next reclaim, which stores FREE for them.
    fn abandon_batches(&self, batches: Batches) {
        for (sh, b) in batches {
            let mut ix = self.shards[sh].ix.lock();
            for (slot, seq, _) in b {
                ix.retiring.push(Retired {
                    slot,
                    seq,
                    state: RState::Covered,
                });
            }
            ix.reclaiming = false;
            drop(ix);
            self.shards[sh].cv.notify_all();
        }
    }

    /// Bring the old content of a partially written block into its new slot
    /// (temporal stores; the caller flushes the block).
    fn fill_old(&self, nb: &NewBlock, first: u64) -> Result<()> {
        let bs = self.bs() as usize;
        let dst_off = self.data(first, nb.slot);
        let sh = &self.shards[nb.shard];
        let old = {
            let mut ix = sh.ix.lock();
            loop {
                match ix.lookup(nb.block) {
                    Some(s) if ix.pin(s) => break Some((s, ix.key(s) & K_ZERO != 0)),
                    Some(_) => {
                        sh.cv.wait_for(&mut ix, Duration::from_millis(1));
                    }
                    None if ix.lock_state(nb.block).origin_writer => {
                        sh.cv.wait_for(&mut ix, Duration::from_millis(5));
                    }
                    None => {
                        ix.update_lock(nb.block, |l| l.origin_readers += 1);
                        break None;
                    }
                }
            }
        };
        // SAFETY: unpublished slot owned by this request.
        let dst = unsafe { self.region.slice_mut(dst_off, bs) };
        match old {
            Some((_, true)) => {
                dst.fill(0);
                self.unpin_one(nb.shard, old);
                Ok(())
            }
            Some((s, false)) => {
                // SAFETY: the source is pinned (never written while pinned)
                // and distinct from the destination.
                dst.copy_from_slice(unsafe { self.region.slice(self.data(first, s), bs) });
                self.unpin_one(nb.shard, old);
                Ok(())
            }
            None => {
                let start = nb.block * bs as u64;
                let avail = (self.size - start).min(bs as u64) as usize;
                dst[avail..].fill(0);
                let r = self.origin_read_retrying(&mut [IoSliceMut::new(&mut dst[..avail])], start);
                sh.ix
                    .lock()
                    .update_lock(nb.block, |l| l.origin_readers -= 1);
                sh.cv.notify_all();
                r.map_err(|source| EngineError::Origin {
                    offset: start,
                    source,
                })
            }
        }
    }

    fn unpin_one(&self, shard: usize, old: Option<(u32, bool)>) {
        if let Some((s, _)) = old {
            self.shards[shard].ix.lock().unpin(s);
        }
    }

    /// Writethrough: after the cache commit, write the blocks to the origin
    /// and mark them clean. The writer locks are held, so no newer version
    /// can race this one to the origin.
    fn write_through(&self, nbs: &[NewBlock], fua: bool) -> Result<()> {
        let (b0, b1) = (nbs[0].block, nbs[nbs.len() - 1].block);
        self.lock_origin_writers(b0, b1);
        let r = self.write_blocks_to_origin(nbs).and_then(|()| {
            if fua {
                self.origin.flush().map_err(|source| {
                    self.counters.add(Ctr::OriginErrors, 1);
                    EngineError::Origin {
                        offset: b0 * self.bs(),
                        source,
                    }
                })
            } else {
                Ok(())
            }
        });
        if r.is_ok() {
            // Clean once the origin has it durably; without FUA the next
            // origin flush (writeback pass or FLUSH) does that.
            if fua {
                self.mark_clean(nbs);
            } else {
                for nb in nbs {
                    let mut ix = self.shards[nb.shard].ix.lock();
                    if ix.key(nb.slot) & (K_VALID | K_DIRTY) == K_VALID | K_DIRTY {
                        ix.set_flags(nb.slot, K_ON_ORIGIN);
                    }
                }
            }
        }
        self.unlock_origin_writers(b0..=b1);
        self.unpin_all(nbs);
        r
    }

    /// Write pinned slots to the origin (no flush), straight from the
    /// mapping, as one batch so origins can keep many requests in flight.
    pub(crate) fn write_blocks_to_origin(&self, nbs: &[NewBlock]) -> Result<()> {
        let bs = self.bs();
        let mut pieces: Vec<(u64, &[u8])> = Vec::with_capacity(nbs.len());
        for nb in nbs.iter().filter(|nb| !nb.on_origin) {
            let off = nb.block * bs;
            let n = (self.size - off).min(bs);
            if nb.zero {
                self.origin.write_zeroes(off, n, false).map_err(|source| {
                    self.counters.add(Ctr::OriginErrors, 1);
                    EngineError::Origin {
                        offset: off,
                        source,
                    }
                })?;
            } else {
                // SAFETY: the slot is pinned, so it is not rewritten meanwhile.
                let data = unsafe {
                    self.region
                        .slice(self.data(self.firsts[nb.shard], nb.slot), n as usize)
                };
                pieces.push((off, data));
            }
        }
        self.origin.write_many(&pieces).map_err(|source| {
            self.counters.add(Ctr::OriginErrors, 1);
            EngineError::Origin {
                offset: pieces.first().map_or(0, |p| p.0),
                source,
            }
        })
    }

    /// Mark published slots clean after their origin copy is durable.
    pub(crate) fn mark_clean(&self, nbs: &[NewBlock]) {
        for nb in nbs {
            let mut ix = self.shards[nb.shard].ix.lock();
            let k = ix.key(nb.slot);
            // Only the current version: a superseded slot already has FREE.
            if k & K_VALID != 0 && k & K_DIRTY != 0 {
                let first = ix.first_slot;
                let seq = self.slot_seq(first, nb.slot);
                self.store_state(first, nb.slot, state_word(seq, STATE_CLEAN));
                ix.mark_clean(nb.slot);
                self.counters.add(Ctr::Writebacks, 1);
                self.counters.add(Ctr::WritebackBytes, self.bs());
            }
        }
    }

    /// Writearound / passthrough: drop cached copies durably, then write the
    /// origin. Blocks with dirty data take the writethrough path instead, so
    /// the bytes of the block outside the request are not lost.
    ///
    /// With `fallback` (a bypassed write of a writeback cache), an origin
    /// that fails keeps the write in the cache as dirty data instead of
    /// failing it: a bypass is an optimisation, never a new way to fail.
    #[allow(clippy::too_many_arguments)]
    fn origin_write(
        &self,
        offset: u64,
        len: u64,
        src: Src<'_>,
        fua: bool,
        b0: u64,
        b1: u64,
        fallback: bool,
    ) -> Result<()> {
        let ids = self.shards_of(b0, b1);
        let any_dirty = {
            let g = self.lock_all(&ids);
            (b0..=b1).any(|b| {
                let ix = &g[Self::guard_pos(&ids, self.shard_of(b))];
                ix.lookup(b).is_some_and(|s| ix.key(s) & K_DIRTY != 0)
            })
        };
        if any_dirty {
            let nbs = self.cache_write(offset, len, src, b0, b1, false, None)?;
            // Committed to the cache: with `fallback` that is enough, and a
            // failed origin write leaves the blocks dirty for writeback.
            return match self.write_through(&nbs, fua) {
                Err(e) if fallback => {
                    tracing::debug!(offset, error = %e, "bypassed write kept in the cache");
                    Ok(())
                }
                r => r,
            };
        }
        // The payload has to exist before the origin sees any of it; it is
        // not cached, so one received from the socket goes through a buffer.
        // Whole blocks of zeroes go as WRITE_ZEROES; smaller ones as data.
        let zero = matches!(src, Src::Zero) && len >= self.bs();
        let owned: Vec<u8>;
        let buf: &[u8] = match src {
            Src::Buf(b) => b,
            Src::Fill(f) => {
                let mut v = vec![0u8; len as usize];
                f(&mut [IoSliceMut::new(&mut v)]).map_err(EngineError::Transfer)?;
                owned = v;
                &owned
            }
            Src::Zero => {
                owned = vec![0u8; len as usize];
                &owned
            }
        };
        self.invalidate(b0, b1)?;
        self.lock_origin_writers(b0, b1);
        let r = self.origin_write_retrying(buf, offset, fua, zero);
        self.unlock_origin_writers(b0..=b1);
        match r {
            Err(e) if fallback => {
                tracing::debug!(offset, error = %e, "bypassed write kept in the cache");
                let nbs = self.cache_write(offset, len, Src::Buf(buf), b0, b1, false, None)?;
                self.unpin_all(&nbs);
                Ok(())
            }
            r => r.map_err(|source| EngineError::Origin { offset, source }),
        }
    }

    fn origin_write_retrying(
        &self,
        buf: &[u8],
        offset: u64,
        fua: bool,
        zero: bool,
    ) -> io::Result<()> {
        self.origin_retrying("write", offset, || {
            if zero {
                self.origin.write_zeroes(offset, buf.len() as u64, fua)
            } else {
                self.origin.write_at(buf, offset, fua)
            }
        })
    }

    /// Durably drop the cached copies of `[b0, b1]` (all clean).
    fn invalidate(&self, b0: u64, b1: u64) -> Result<()> {
        let ids = self.shards_of(b0, b1);
        // Older versions first, so none can outlive the copy dropped here.
        for &sh in &ids {
            self.make_retiring_durable(sh)?;
        }
        let mut any = false;
        {
            let mut g = self.lock_all(&ids);
            for b in b0..=b1 {
                let pos = Self::guard_pos(&ids, self.shard_of(b));
                let ix = &mut g[pos];
                if let Some(s) = ix.lookup(b) {
                    let first = ix.first_slot;
                    let seq = self.slot_seq(first, s);
                    ix.remove(s);
                    self.retire(ix, s, seq);
                    any = true;
                }
            }
        }
        if any {
            for &sh in &ids {
                self.make_retiring_durable(sh)?;
            }
        }
        Ok(())
    }

    /// Make every retiring slot of a shard durably FREE now.
    pub(crate) fn make_retiring_durable(&self, sh: usize) -> Result<()> {
        let shard = &self.shards[sh];
        let mut ix = shard.ix.lock();
        loop {
            // A reclaim in flight has taken its batch off the list, and our
            // slots may be in it: their FREE is durable only after its fence.
            if !ix.reclaiming && ix.retiring.iter().all(|r| r.state == RState::Durable) {
                return Ok(());
            }
            if !ix.reclaiming {
                if self.raise_watermark(&mut ix) {
                    continue;
                }
                if self.reclaim_now(sh, &mut ix, 0) {
                    continue;
                }
            }
            self.check_open()?;
            shard.cv.wait_for(&mut ix, Duration::from_millis(1));
        }
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

    // ----- statistics -----------------------------------------------------

    pub fn stats(&self) -> StatsSnapshot {
        let c = &self.counters;
        let (mut occupied, mut dirty, mut free) = (0u64, 0u64, 0u64);
        for sh in self.shards.iter() {
            let ix = sh.ix.lock();
            occupied += ix.valid as u64;
            dirty += ix.dirty as u64;
            free += ix.free_len as u64 + ix.retiring.len() as u64;
        }
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
            writes: c.get(Ctr::Writes),
            write_fences: c.get(Ctr::WriteFences),
            read_bytes: c.get(Ctr::ReadBytes),
            write_bytes: c.get(Ctr::WriteBytes),
            waits_for_space: c.get(Ctr::WaitsForSpace),
            bypass_reads: c.get(Ctr::BypassReads),
            bypass_writes: c.get(Ctr::BypassWrites),
            bypass_bytes: c.get(Ctr::BypassBytes),
            fences: self.region.fences(),
            watermark: self.seq.durable(),
        }
    }

    /// Number of dirty blocks now.
    pub fn dirty_blocks(&self) -> u64 {
        self.shards.iter().map(|s| s.ix.lock().dirty as u64).sum()
    }
}
