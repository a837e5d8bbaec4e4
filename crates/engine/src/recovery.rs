//! Format, open (recovery) and clean shutdown.
//!
//! Recovery is the same after a crash and after a clean shutdown, and it is
//! warm: every committed entry stays cached, dirty exactly when it was.
//! It reads each slot's 64-byte line once; only entries above the durable
//! watermark S (the few transactions in flight at the crash) are verified
//! against their data. Then it durably frees losers and rolled-back entries
//! *before* raising S over them, so a crash during recovery is harmless.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use pmcache_origin::Origin;
use pmcache_pmem::PmemRegion;

use crate::engine::{Engine, EngineConfig, SbCopy};
use crate::error::{EngineError, Result};
use crate::format::*;
use crate::hooks::HookPoint;
use crate::index::*;
use crate::versions::{self, Version};

/// Read the entry words and the state word of a slot.
pub(crate) fn read_meta(
    region: &dyn PmemRegion,
    layout: &Layout,
    slot: u64,
) -> ([u64; ENTRY_WORDS], u64) {
    let off = layout.meta_off(slot);
    let mut w = [0u64; ENTRY_WORDS];
    for (i, x) in w.iter_mut().enumerate() {
        *x = region.word(off + i * 8).load(Ordering::Relaxed);
    }
    (w, region.word(off + W_STATE * 8).load(Ordering::Relaxed))
}

/// What a slot holds, judged without its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotView {
    /// State word FREE (or never written).
    Free,
    /// An incarnation torn by a crash (seq > S): free, but not yet marked so.
    Torn,
    Live {
        entry: Entry,
        dirty: bool,
    },
    /// State word claims a committed entry (seq ≤ S) that fails its checksum.
    Corrupt {
        state_seq: u64,
    },
}

pub(crate) fn view_slot(region: &dyn PmemRegion, layout: &Layout, slot: u64, s: u64) -> SlotView {
    let (w, state) = read_meta(region, layout, slot);
    let (sseq, code) = split_state(state);
    if code != STATE_DIRTY && code != STATE_CLEAN {
        return SlotView::Free;
    }
    match Entry::decode(&w) {
        Some(e) if e.seq & SEQ_MASK == sseq => SlotView::Live {
            entry: e,
            dirty: code == STATE_DIRTY,
        },
        // A torn incarnation in flight at the crash: its slot was durably
        // FREE before reuse, so a valid-looking state word means either this
        // incarnation's (seq > S) or corruption.
        _ if sseq > s => SlotView::Torn,
        _ => SlotView::Corrupt { state_seq: sseq },
    }
}

/// Read both superblock copies; the valid one with the highest generation wins.
pub fn read_superblock(region: &dyn PmemRegion) -> Result<(Superblock, usize)> {
    if region.len() < META_OFF {
        return Err(EngineError::NotACache(format!(
            "{} bytes is too small to hold a superblock",
            region.len()
        )));
    }
    let mut best: Option<(Superblock, usize)> = None;
    let mut errors = Vec::new();
    let (mut version, mut versions) = (None, 0);
    for copy in 0..2 {
        // SAFETY: nothing writes the superblock while it is being opened.
        let bytes = unsafe { region.slice(copy * SB_SIZE, SB_SIZE) };
        match Superblock::decode(bytes) {
            Ok(sb) => {
                if best
                    .as_ref()
                    .is_none_or(|(b, _)| sb.generation > b.generation)
                {
                    best = Some((sb, copy));
                }
            }
            Err(e) => {
                if let SbError::Version(v) = e {
                    version = Some(v);
                    versions += 1;
                }
                errors.push(format!(
                    "superblock copy {} (offset {}): {e}",
                    copy,
                    copy * SB_SIZE
                ))
            }
        }
    }
    match best {
        Some((sb, copy)) => {
            if sb.layout.region_len != region.len() as u64 {
                return Err(EngineError::Corrupt(format!(
                    "superblock records a {}-byte cache but the file is {} bytes",
                    sb.layout.region_len,
                    region.len()
                )));
            }
            Ok((sb, copy))
        }
        None if version.is_some() && errors.len() == versions => Err(EngineError::OldFormat {
            found: version.unwrap_or_default(),
            expected: VERSION,
            hint: if version < Some(VERSION) {
                "it predates ordered writeback; write its dirty data back with the pmcache release that made it (pmcache flush), then format it again"
            } else {
                "it was made by a newer pmcache; use that release"
            },
        }),
        None if errors.iter().all(|e| e.contains("bad magic")) => {
            Err(EngineError::NotACache("no pmcache superblock found".into()))
        }
        None => Err(EngineError::Corrupt(errors.join("; "))),
    }
}

/// Write the next superblock generation into the other copy.
pub(crate) fn write_superblock(region: &dyn PmemRegion, sb: &mut Superblock, copy: &mut usize) {
    sb.generation += 1;
    let target = 1 - *copy;
    let bytes = sb.encode();
    // SAFETY: superblock updates are serialized by the caller's lock.
    unsafe { region.copy_flush(target * SB_SIZE, &bytes) };
    region.fence();
    *copy = target;
}

/// Refuse an origin other than the one the cache was formatted for, unless
/// `force`; forced, the cache belongs to the new origin from now on (the
/// caller records `sb`), as when a volume moved to a new path.
fn check_origin(sb: &mut Superblock, origin: &dyn Origin, force: bool) -> Result<()> {
    let fp = origin.fingerprint();
    if !force && (sb.origin_size != origin.size() || sb.origin_fingerprint != fp) {
        return Err(EngineError::OriginMismatch {
            expected: sb.origin_fingerprint.clone(),
            expected_size: sb.origin_size,
            found: fp,
            found_size: origin.size(),
        });
    }
    if sb.origin_size != origin.size() || sb.origin_fingerprint != fp {
        // A mapping beyond a smaller origin's end fails recovery's scan.
        tracing::warn!(
            recorded = %sb.origin_fingerprint,
            recorded_size = sb.origin_size,
            origin = %fp,
            size = origin.size(),
            "attaching the cache to a different origin (forced); it is recorded as the cache's origin"
        );
        sb.origin_fingerprint = fp;
        sb.origin_size = origin.size();
    }
    Ok(())
}

/// A live entry as recovery found it in a slot's metadata.
#[derive(Debug, Clone, Copy)]
struct Found {
    slot: u64,
    entry: Entry,
    dirty: bool,
}

/// What recovery makes of the slot metadata before it rebuilds the index.
struct Scan {
    /// Entries that stay: committed (seq ≤ S), or above S and verified whole.
    trusted: Vec<Found>,
    /// Entries above S, to be verified against their data.
    unverified: Vec<Found>,
    /// Torn or rolled-back entries: freed before S is raised over them.
    to_free: Vec<u64>,
    /// The highest seq in the media (at least S).
    max_seq: u64,
}

impl Scan {
    /// Pass 1: classify every slot from its metadata alone.
    fn classify(
        region: &dyn PmemRegion,
        layout: &Layout,
        s: u64,
        origin_blocks: u64,
    ) -> Result<Scan> {
        let mut scan = Scan {
            trusted: Vec::new(),
            unverified: Vec::new(),
            to_free: Vec::new(),
            max_seq: s,
        };
        let mut torn: Vec<u64> = Vec::new();
        for slot in 0..layout.slot_count {
            match view_slot(region, layout, slot, s) {
                SlotView::Free => {}
                SlotView::Torn => {
                    scan.to_free.push(slot);
                    torn.push(slot);
                }
                SlotView::Corrupt { state_seq } => {
                    return Err(EngineError::Corrupt(format!(
                        "slot {slot} (metadata at offset {}): committed entry (seq {state_seq}) fails its checksum",
                        layout.meta_off(slot)
                    )))
                }
                SlotView::Live { entry, dirty } => {
                    scan.max_seq = scan.max_seq.max(entry.seq);
                    if entry.block >= origin_blocks {
                        // Only where the cache was forced onto a smaller
                        // origin. Dirty data there has nowhere to go (even
                        // above S: it may be acknowledged), so refuse; a
                        // clean copy is of no use.
                        if dirty {
                            return Err(EngineError::DirtyPastOrigin {
                                slot,
                                block: entry.block,
                                origin_blocks,
                            });
                        }
                        scan.to_free.push(slot);
                        continue;
                    }
                    let found = Found { slot, entry, dirty };
                    if entry.seq <= s {
                        scan.trusted.push(found);
                    } else {
                        scan.unverified.push(found);
                    }
                }
            }
        }
        if !torn.is_empty() {
            // Above S a torn entry and a damaged one look alike: say which
            // slots, so that damage does not pass unseen.
            tracing::warn!(
                count = torn.len(),
                slots = ?&torn[..torn.len().min(16)],
                "dropping entries above the watermark that fail their checksum: writes torn by the crash, or damaged metadata"
            );
        }
        Ok(scan)
    }

    /// The newest epoch of any entry that stays.
    fn max_epoch(&self) -> u64 {
        self.trusted
            .iter()
            .map(|f| f.entry.epoch)
            .max()
            .unwrap_or(0)
    }

    /// Pass 2: verify what might be torn. A transaction above S stays only
    /// when all `count` of its entries are there and each one's data matches
    /// its hash; otherwise all of it is rolled back.
    fn verify_pending(&mut self, region: &dyn PmemRegion, layout: &Layout) {
        let ok_data = |slot: u64, e: &Entry| -> bool {
            e.is_zero() || {
                // SAFETY: no other user of the region during recovery.
                let data =
                    unsafe { region.slice(layout.data_off(slot), layout.block_size as usize) };
                data_hash(data) == e.hash
            }
        };
        let kept_before = self.trusted.len() + self.to_free.len();
        let npending = self.unverified.len();
        self.unverified.sort_by_key(|f| f.entry.seq);
        for group in self.unverified.chunk_by(|a, b| a.entry.seq == b.entry.seq) {
            let first = group[0].entry;
            let whole = group.len() == first.count as usize
                && group
                    .iter()
                    .all(|f| f.entry.count == first.count && ok_data(f.slot, &f.entry));
            if whole {
                self.trusted.extend_from_slice(group);
            } else {
                // Torn by the crash, or (for a write acknowledged just
                // before it, whose seq S did not cover yet) damaged: say so.
                tracing::warn!(
                    seq = first.seq,
                    found = group.len(),
                    of = first.count,
                    slot = group[0].slot,
                    "rolling back a write that was in flight at the crash (torn, or its data damaged)"
                );
                self.to_free.extend(group.iter().map(|f| f.slot));
            }
        }
        // Every pending entry is now either trusted or to be freed.
        debug_assert_eq!(
            self.trusted.len() + self.to_free.len(),
            kept_before + npending
        );
    }
}

/// Flags of a [`Record`]'s `block_flags`.
const R_DIRTY: u64 = 1 << 63;
const R_ZERO: u64 = 1 << 62;

/// A trusted entry as pass 3 sorts it: compact, so the sorts stay in cache.
#[derive(Debug, Clone, Copy)]
struct Record {
    seq: u64,
    epoch: u64,
    slot: u64,
    /// `block | R_DIRTY | R_ZERO`; blocks are below 2^48 (BLOCK_MASK).
    block_flags: u64,
}

/// Apply one shard's run of records, sorted by seq, to its index (format
/// rule 5): the newest entry of each block is current; with ordered
/// writeback (`written`: W), an older dirty version that the origin still
/// needs is retained; every other version is a loser.
fn apply_run(
    ix: &mut ShardIndex,
    run: &[Record],
    losers: &mut Vec<u64>,
    written: Option<u64>,
) -> Result<()> {
    let first = ix.first_slot;
    let mut retained: BlockMap<Vec<u32>> = BlockMap::default();
    for r in run {
        let (slot, bf) = (r.slot, r.block_flags);
        let (block, dirty) = (bf & !(R_DIRTY | R_ZERO), bf & R_DIRTY != 0);
        if slot < first || slot >= first + ix.nslots() as u64 {
            // The block hashes to a shard that does not own this slot
            // (shard count changed): treat the copy as not cached.
            if dirty {
                return Err(EngineError::Corrupt(format!(
                    "slot {slot} holds dirty block {block} outside its shard; open with the shard count it was created with"
                )));
            }
            losers.push(slot);
            continue;
        }
        let local = (slot - first) as u32;
        if let Some(old) = ix.lookup(block) {
            supersede(ix, old, r, written, &mut retained, losers);
        }
        let mut flags = if dirty { K_DIRTY } else { 0 };
        // Data is checked on first use (`verify_loaded`), not all at open.
        flags |= if bf & R_ZERO != 0 {
            K_ZERO
        } else {
            K_UNVERIFIED
        };
        ix.insert_version(local, block, flags, r.epoch);
        if !dirty {
            ix.policy.insert(local);
        }
    }
    Ok(())
}

/// Recovery's publish: `old`, the current version of `r`'s block, makes
/// way for `r`, and is retained or a loser by [`versions::retained`].
/// A clean `r` makes every retained version of the block a loser: its
/// epoch was written back after theirs (so [`versions::roles`] is
/// what this leaves of a block's versions).
fn supersede(
    ix: &mut ShardIndex,
    old: u32,
    r: &Record,
    written: Option<u64>,
    retained: &mut BlockMap<Vec<u32>>,
    losers: &mut Vec<u64>,
) {
    let first = ix.first_slot;
    let block = r.block_flags & BLOCK_MASK;
    let new_dirty = r.block_flags & R_DIRTY != 0;
    let old_key = ix.key(old);
    let old_dirty = old_key & K_DIRTY != 0;
    let old_epoch = ix.epoch(old);
    ix.remove(old);
    debug_assert!(
        old_epoch <= r.epoch || !old_dirty || !new_dirty,
        "epochs never decrease"
    );
    let older = Version {
        epoch: old_epoch,
        dirty: old_dirty,
    };
    let newer = Version {
        epoch: r.epoch,
        dirty: new_dirty,
    };
    if versions::retained(older, newer, written) {
        ix.retain(old, old_key & K_ZERO != 0);
        retained.entry(block).or_default().push(old);
    } else {
        losers.push(first + old as u64);
    }
    if !new_dirty {
        for s in retained.remove(&block).unwrap_or_default() {
            ix.release_retained(s);
            losers.push(first + s as u64);
        }
    }
}

impl Engine {
    /// Lay out a new cache for `origin` on `region`. Existing content is lost.
    pub fn format(
        region: &dyn PmemRegion,
        origin: &dyn Origin,
        block_size: u32,
    ) -> Result<Superblock> {
        let layout =
            Layout::compute(region.len() as u64, block_size).map_err(EngineError::Config)?;
        let fp = origin.fingerprint();
        if fp.len() > MAX_FINGERPRINT {
            return Err(EngineError::Config(format!(
                "origin name longer than {MAX_FINGERPRINT} bytes"
            )));
        }
        let meta_len = layout.slot_count as usize * META_SIZE;
        // SAFETY: formatting owns the whole region.
        unsafe { region.zero_flush(META_OFF, meta_len) };
        // SAFETY: formatting owns the whole region.
        unsafe { region.zero_flush(WATERMARK_OFF, SB_SIZE) };
        for off in [WATERMARK_OFF, wm_line_off(EPOCH_LINE)] {
            region
                .word(off)
                .store(encode_watermark(0), Ordering::SeqCst);
            region.flush(off, 8);
        }
        let mut sb = Superblock {
            layout,
            origin_size: origin.size(),
            origin_fingerprint: fp,
            generation: 0,
            clean_shutdown: true,
            mode: CacheMode::Writeback,
            uuid: rand::random(),
        };
        let bytes = sb.encode();
        // SAFETY: formatting owns the whole region.
        unsafe { region.copy_flush(SB_SIZE, &bytes) };
        sb.generation = 1;
        let bytes = sb.encode();
        // SAFETY: as above.
        unsafe { region.copy_flush(0, &bytes) };
        region.fence();
        Ok(sb)
    }

    /// Open a cache: check the origin's identity, recover, and (by config)
    /// start background writeback.
    pub fn open(
        region: Arc<dyn PmemRegion>,
        origin: Arc<dyn Origin>,
        cfg: EngineConfig,
    ) -> Result<Arc<Engine>> {
        let (mut sb, copy) = read_superblock(&*region)?;
        check_origin(&mut sb, &*origin, cfg.force_origin)?;
        let layout = sb.layout;
        let s = read_watermark(&*region).map_err(EngineError::Corrupt)?;
        let origin_blocks = origin.size().div_ceil(layout.block_size as u64);

        // Passes 1 to 3 only read the media (pass 3 rebuilds the index in
        // DRAM); the first store to it is in `free_and_seal`.
        let written = read_written_epoch(&*region).map_err(EngineError::Corrupt)?;
        let mut scan = Scan::classify(&*region, &layout, s, origin_blocks)?;
        scan.verify_pending(&*region, &layout);
        let epoch = scan.max_epoch().max(written) + 1;
        let engine = Engine::build(
            region.clone(),
            origin,
            sb.clone(),
            copy,
            cfg,
            (scan.max_seq, s),
            (epoch, written),
        )?;
        let ntrusted = scan.trusted.len();
        let losers = engine.rebuild_index(scan.trusted)?;

        engine.free_and_seal(&scan.to_free, &losers);
        engine.write_back_for_mode(sb.mode)?;
        engine.record_open(sb, copy);
        let engine = Arc::new(engine);
        let _ = engine.me.set(Arc::downgrade(&engine));
        tracing::info!(
            pmem = %engine.region.mode(),
            mode = %engine.mode(),
            slots = layout.slot_count,
            cached = ntrusted - losers.len().min(ntrusted),
            dirty = engine.dirty_blocks(),
            "cache opened"
        );
        if engine.cfg.background_writeback {
            engine.start_writeback();
        }
        Ok(engine)
    }

    /// Pass 3: newest entry per block wins, applied in seq order. The
    /// entries are first bucketed by shard (compact records), then each
    /// shard's run is sorted by seq and applied under one lock: the sorts
    /// and the index updates stay in cache, where one global sort and a
    /// lock plus a few cache misses per entry took most of the open time.
    ///
    /// Returns the losers, the superseded versions: they are freed only
    /// after S covers them, since they may belong to multi-block
    /// transactions above the old S whose other blocks are still current
    /// (format rule 2).
    fn rebuild_index(&self, trusted: Vec<Found>) -> Result<Vec<u64>> {
        let ntrusted = trusted.len();
        let (starts, mut recs) = self.bucket_by_shard(trusted);
        let mut losers: Vec<u64> = Vec::new();
        for sh in 0..self.shards.len() {
            let run = &mut recs[starts[sh]..starts[sh + 1]];
            run.sort_unstable_by_key(|r| r.seq);
            let mut ix = self.shards[sh].ix.lock();
            let written = self.ordered().then(|| self.epochs.written());
            apply_run(&mut ix, run, &mut losers, written)?;
        }
        // Every trusted entry is now either indexed, retained or a loser.
        debug_assert_eq!(
            self.shards
                .iter()
                .map(|sh| {
                    let ix = sh.ix.lock();
                    (ix.valid + ix.retained) as usize
                })
                .sum::<usize>(),
            ntrusted - losers.len()
        );
        Ok(losers)
    }

    /// The trusted entries as records, grouped by shard: shard `sh`'s run
    /// is `recs[starts[sh]..starts[sh + 1]]`.
    fn bucket_by_shard(&self, trusted: Vec<Found>) -> (Vec<usize>, Vec<Record>) {
        let nshards = self.shards.len();
        let mut starts = vec![0usize; nshards + 1];
        for f in &trusted {
            starts[self.shard_of(f.entry.block) + 1] += 1;
        }
        for i in 0..nshards {
            starts[i + 1] += starts[i];
        }
        let empty = Record {
            seq: 0,
            epoch: 0,
            slot: 0,
            block_flags: 0,
        };
        let mut recs: Vec<Record> = vec![empty; trusted.len()];
        let mut next = starts.clone();
        for f in &trusted {
            let (slot, e) = (f.slot, &f.entry);
            let sh = self.shard_of(e.block);
            let flags = if f.dirty { R_DIRTY } else { 0 } | if e.is_zero() { R_ZERO } else { 0 };
            recs[next[sh]] = Record {
                seq: e.seq,
                epoch: e.epoch,
                slot,
                block_flags: e.block | flags,
            };
            next[sh] += 1;
        }
        // Each shard's run is filled exactly.
        debug_assert_eq!(next[..nshards], starts[1..]);
        (starts, recs)
    }

    /// Durably free rolled-back entries, then raise S, then free losers;
    /// then every slot not in the index goes on its shard's free list.
    fn free_and_seal(&self, to_free: &[u64], losers: &[u64]) {
        self.free_slots(to_free);
        self.seq.seal(&*self.region);
        self.free_oldest_first(losers);
        for sh in self.shards.iter() {
            let mut ix = sh.ix.lock();
            for local in (0..ix.nslots()).rev() {
                if ix.key(local) & (K_VALID | K_RETAINED) == 0 {
                    ix.push_free(local);
                }
            }
            // Every slot is either indexed, retained or free.
            debug_assert_eq!(ix.free_len + ix.valid + ix.retained, ix.nslots());
        }
    }

    /// Store FREE in the state word of each slot and flush its line, then
    /// fence once.
    fn free_slots(&self, slots: &[u64]) {
        let region = &*self.region;
        for &slot in slots {
            let off = self.layout.meta_off(slot);
            region
                .word(off + W_STATE * 8)
                .store(STATE_FREE, Ordering::SeqCst);
            region.flush(off, META_SIZE);
        }
        region.fence();
    }

    /// Store FREE for committed versions so that, per block, an older
    /// version's FREE is durable before a newer one's (format rule 7): in
    /// waves, each a fence, the k-th wave freeing each block's k-th oldest.
    /// A crash in between then leaves a block's newest versions, never an
    /// older dirty one without the newer ones of its epoch.
    pub(crate) fn free_oldest_first(&self, slots: &[u64]) {
        let mut by_block: Vec<(u64, u64, u64)> = slots
            .iter()
            .map(|&slot| {
                let (w, _) = read_meta(&*self.region, &self.layout, slot);
                (w[0], w[1], slot)
            })
            .collect();
        by_block.sort_unstable();
        let mut waves: Vec<Vec<u64>> = Vec::new();
        let mut rank = 0;
        for (i, &(block, _, slot)) in by_block.iter().enumerate() {
            rank = if i > 0 && by_block[i - 1].0 == block {
                rank + 1
            } else {
                0
            };
            if waves.len() <= rank {
                waves.push(Vec::new());
            }
            waves[rank].push(slot);
        }
        for wave in &waves {
            self.free_slots(wave);
        }
    }

    /// Write every dirty block back if the cache opens in a mode that keeps
    /// no dirty data after running in `recorded`.
    fn write_back_for_mode(&self, recorded: CacheMode) -> Result<()> {
        if self.mode() != recorded && !self.mode().keeps_dirty() && self.dirty_blocks() > 0 {
            // Switching to a mode without dirty data: write it all back first.
            tracing::info!(from = %recorded, to = %self.mode(), dirty = self.dirty_blocks(), "writing back before mode switch; clients are served once it is done");
            // A large cache in front of a slow origin takes a while: say so.
            let mut last = std::time::Instant::now();
            self.flush_all(5, &mut |done, total| {
                if last.elapsed() >= std::time::Duration::from_secs(2) {
                    last = std::time::Instant::now();
                    tracing::info!(done, total, "writing back before mode switch");
                }
            })
            .map_err(|e| match e {
                EngineError::DataCorrupt { .. } => EngineError::Config(format!(
                    "cannot switch to {} mode: {e}; serve it in {recorded} mode and write the block again first",
                    self.mode()
                )),
                e => e,
            })?;
        }
        Ok(())
    }

    /// Write the next superblock generation: not shut down cleanly (until
    /// `close`), in the mode the cache now runs in.
    fn record_open(&self, mut sb: Superblock, mut copy: usize) {
        sb.clean_shutdown = false;
        sb.mode = self.mode();
        write_superblock(&*self.region, &mut sb, &mut copy);
        *self.sb.lock() = SbCopy { sb, copy };
    }

    /// Switch cache mode. Modes that keep no dirty data first write every
    /// dirty block back.
    pub fn set_mode(&self, mode: CacheMode) -> Result<()> {
        if !mode.keeps_dirty() {
            self.flush_all(u32::MAX, &mut |_, _| {})?;
        }
        // A commit may still land here, in the old mode (see `drop_retained`).
        self.test_hook(HookPoint::ModeSwitch);
        self.mode.store(mode.as_u8(), Ordering::SeqCst);
        let mut g = self.sb.lock();
        let SbCopy { sb, copy } = &mut *g;
        sb.mode = mode;
        write_superblock(&*self.region, sb, copy);
        Ok(())
    }

    /// Clean shutdown: no request may be in flight. Stops writeback, makes S
    /// cover everything and records the clean shutdown.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.quiesce();
        self.stop_writeback();
        // S covers every transaction once sealed, so every superseded
        // version may then be durably FREE: the media keeps one version per
        // block and the next open has nothing to clean up.
        self.region.fence();
        self.seq.seal(&*self.region);
        let mut retired: Vec<u64> = Vec::new();
        for sh in 0..self.shards.len() {
            let mut ix = self.shards[sh].ix.lock();
            let first = ix.first_slot;
            retired.extend(
                ix.retiring
                    .iter()
                    .filter(|r| r.state != RState::Durable)
                    .map(|r| first + r.slot as u64),
            );
            ix.retiring.clear();
        }
        self.free_oldest_first(&retired);
        let mut g = self.sb.lock();
        let SbCopy { sb, copy } = &mut *g;
        sb.clean_shutdown = true;
        write_superblock(&*self.region, sb, copy);
        tracing::info!(dirty = self.dirty_blocks(), "cache closed cleanly");
        Ok(())
    }

    /// The superblock as last written (mode, generation, clean-shutdown flag).
    pub fn superblock(&self) -> Superblock {
        self.sb.lock().sb.clone()
    }
}
