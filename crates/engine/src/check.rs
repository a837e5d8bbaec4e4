//! Offline inspection: `check` (a cache_check for our format) and `dump`.

use std::collections::HashMap;

use pmcache_pmem::PmemRegion;

use crate::format::*;
use crate::recovery::{read_superblock, view_slot, SlotView};

/// One live mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub slot: u64,
    pub block: u64,
    pub seq: u64,
    pub dirty: bool,
    pub zero: bool,
    /// Part of a write still in flight at the crash (seq above the watermark):
    /// recovery verifies it and may roll it back.
    pub pending: bool,
}

/// What `check` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub superblock: Option<Superblock>,
    pub watermark: Option<u64>,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub live: u64,
    pub dirty: u64,
    pub pending: u64,
    /// Older versions of a block that recovery will free.
    pub superseded: u64,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Everything `dump` shows.
#[derive(Debug, Clone)]
pub struct Dump {
    pub superblock: Superblock,
    pub superblock_copy: usize,
    pub watermark: u64,
    pub mappings: Vec<Mapping>,
}

/// Validate a cache offline. `origin` is `(fingerprint, size)` of the origin
/// the operator means to use, if known. With `verify_data`, committed blocks
/// are checked against their data hashes too.
pub fn check(
    region: &dyn PmemRegion,
    origin: Option<(&str, u64)>,
    verify_data: bool,
) -> CheckReport {
    let mut r = CheckReport::default();
    let (sb, _) = match read_superblock(region) {
        Ok(x) => x,
        Err(e) => {
            r.errors.push(e.to_string());
            return r;
        }
    };
    r.check_superblock_copies(region);
    if let Some(origin) = origin {
        r.check_origin(&sb, origin);
    }
    let s = match read_watermark(region) {
        Ok(s) => s,
        Err(e) => {
            r.errors.push(e);
            r.superblock = Some(sb);
            return r;
        }
    };
    r.watermark = Some(s);
    SlotCheck::new(region, &sb, s, verify_data).run(&mut r);
    r.warn_recovery_work();
    r.superblock = Some(sb);
    r
}

impl CheckReport {
    /// A copy that does not decode is a warning: the other one is in use.
    fn check_superblock_copies(&mut self, region: &dyn PmemRegion) {
        for copy in 0..2 {
            // SAFETY: offline check; nothing else uses the region.
            if let Err(e) = Superblock::decode(unsafe { region.slice(copy * SB_SIZE, SB_SIZE) }) {
                self.warnings.push(format!(
                    "superblock copy {copy} (offset {}) is unusable ({e}); the other copy is in use",
                    copy * SB_SIZE
                ));
            }
        }
    }

    /// The cache must belong to the origin `(fingerprint, size)`.
    fn check_origin(&mut self, sb: &Superblock, (fp, size): (&str, u64)) {
        if fp != sb.origin_fingerprint || size != sb.origin_size {
            self.errors.push(format!(
                "origin identity: cache belongs to '{}' ({} bytes), given '{fp}' ({size} bytes)",
                sb.origin_fingerprint, sb.origin_size
            ));
        }
    }

    /// What the next open will clean up: not errors.
    fn warn_recovery_work(&mut self) {
        if self.superseded > 0 {
            self.warnings.push(format!(
                "{} superseded versions will be freed by recovery",
                self.superseded
            ));
        }
        if self.pending > 0 {
            self.warnings.push(format!(
                "{} entries of writes in flight at the last crash will be verified or rolled back by recovery",
                self.pending
            ));
        }
    }
}

/// The check of every slot's metadata (and, by choice, data) against the
/// watermark S and the origin's size.
struct SlotCheck<'a> {
    region: &'a dyn PmemRegion,
    layout: Layout,
    s: u64,
    origin_blocks: u64,
    verify_data: bool,
    /// Per block, the slot and seq of its newest committed entry so far.
    newest: HashMap<u64, (u64, u64)>,
}

impl<'a> SlotCheck<'a> {
    fn new(region: &'a dyn PmemRegion, sb: &Superblock, s: u64, verify_data: bool) -> Self {
        let layout = sb.layout;
        SlotCheck {
            region,
            layout,
            s,
            origin_blocks: sb.origin_size.div_ceil(layout.block_size as u64),
            verify_data,
            newest: HashMap::new(),
        }
    }

    fn run(mut self, r: &mut CheckReport) {
        let layout = self.layout;
        for slot in 0..layout.slot_count {
            match view_slot(self.region, &layout, slot, self.s) {
                SlotView::Free | SlotView::Torn => {}
                SlotView::Corrupt { state_seq } => r.errors.push(format!(
                    "slot {slot} (metadata at offset {}): committed entry seq {state_seq} fails its checksum",
                    layout.meta_off(slot)
                )),
                // Above S: recovery verifies it and may roll it back.
                SlotView::Live { entry: e, .. } if e.seq > self.s => r.pending += 1,
                SlotView::Live { entry: e, dirty } => {
                    r.live += 1;
                    if dirty {
                        r.dirty += 1;
                    }
                    self.check_entry(r, slot, &e);
                    self.note_version(r, slot, &e);
                }
            }
        }
        // Each committed entry is its block's newest, superseded, or a
        // same-seq duplicate (an error).
        debug_assert!(self.newest.len() as u64 + r.superseded <= r.live);
    }

    /// A committed entry must map a block of the origin, belong to a
    /// transaction of at least one block and (with `verify_data`) match its
    /// data hash.
    fn check_entry(&self, r: &mut CheckReport, slot: u64, e: &Entry) {
        let layout = &self.layout;
        if e.block >= self.origin_blocks {
            r.errors.push(format!(
                "slot {slot}: maps block {} beyond the origin's {} blocks",
                e.block, self.origin_blocks
            ));
        }
        if e.count == 0 {
            r.errors
                .push(format!("slot {slot}: entry has a transaction count of 0"));
        }
        if self.verify_data && !e.is_zero() {
            // SAFETY: offline check; nothing else uses the region.
            let data = unsafe {
                self.region
                    .slice(layout.data_off(slot), layout.block_size as usize)
            };
            if data_hash(data) != e.hash {
                r.errors.push(format!(
                    "slot {slot} (block {}, data at offset {}): data checksum mismatch",
                    e.block,
                    layout.data_off(slot)
                ));
            }
        }
    }

    /// Per block, only the newest version survives recovery; the versions
    /// of one block have distinct seqs (format rule 4).
    fn note_version(&mut self, r: &mut CheckReport, slot: u64, e: &Entry) {
        match self.newest.get(&e.block) {
            Some(&(other, seq)) if seq == e.seq => r.errors.push(format!(
                "slots {other} and {slot} both map block {} with the same seq {seq}",
                e.block
            )),
            Some(&(_, seq)) => {
                r.superseded += 1;
                if e.seq > seq {
                    self.newest.insert(e.block, (slot, e.seq));
                }
            }
            None => {
                self.newest.insert(e.block, (slot, e.seq));
            }
        }
    }
}

/// Superblock, watermark and every live mapping.
pub fn dump(region: &dyn PmemRegion) -> crate::Result<Dump> {
    let (sb, copy) = read_superblock(region)?;
    let layout = sb.layout;
    let s = read_watermark(region).map_err(crate::EngineError::Corrupt)?;
    let mut mappings = Vec::new();
    for slot in 0..layout.slot_count {
        if let SlotView::Live { entry: e, dirty } = view_slot(region, &layout, slot, s) {
            mappings.push(Mapping {
                slot,
                block: e.block,
                seq: e.seq,
                dirty,
                zero: e.is_zero(),
                pending: e.seq > s,
            });
        }
    }
    Ok(Dump {
        superblock: sb,
        superblock_copy: copy,
        watermark: s,
        mappings,
    })
}
