//! Offline inspection: `check` (a cache_check for our format) and `dump`.
//!
//! Both tell what recovery will make of each block's live versions
//! ([`crate::versions::roles`]) as it does with ordered writeback, the
//! default (recovery with `--writeback-order none` retains nothing: it
//! frees the versions shown as retained), and as if every write in flight
//! at a crash is found whole (one that is not is rolled back, and the
//! block's older versions move up).

use pmcache_pmem::PmemRegion;

use crate::format::*;
use crate::recovery::{read_superblock, view_slot, SlotView};
use crate::versions::{roles, Role, Version};

/// One live mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub slot: u64,
    pub block: u64,
    pub seq: u64,
    /// The client epoch its write committed in.
    pub epoch: u64,
    pub dirty: bool,
    pub zero: bool,
    /// Part of a write still in flight at the crash (seq above the watermark):
    /// recovery verifies it and may roll it back.
    pub pending: bool,
    /// What recovery makes of it: its block's current version, a retained
    /// one or a superseded one (see the module's notes).
    pub role: Role,
}

impl Mapping {
    /// The mapping of a live slot's entry, its role not yet assigned;
    /// `s` is the watermark.
    fn of(slot: u64, e: &Entry, dirty: bool, s: u64) -> Mapping {
        Mapping {
            slot,
            block: e.block,
            seq: e.seq,
            epoch: e.epoch,
            dirty,
            zero: e.is_zero(),
            pending: e.seq > s,
            role: Role::Current,
        }
    }

    fn version(&self) -> Version {
        Version {
            epoch: self.epoch,
            dirty: self.dirty,
        }
    }
}

/// Give each mapping its role (format rule 5, with ordered writeback and
/// W = `written`).
fn assign_roles(ms: &mut [Mapping], written: u64) {
    let mut order: Vec<(u64, u64, usize)> = (ms.iter().enumerate())
        .map(|(i, m)| (m.block, m.seq, i))
        .collect();
    order.sort_unstable();
    for run in order.chunk_by(|a, b| a.0 == b.0) {
        let versions: Vec<Version> = run.iter().map(|&(.., i)| ms[i].version()).collect();
        for (&(.., i), role) in run.iter().zip(roles(&versions, Some(written))) {
            ms[i].role = role;
        }
    }
}

/// What `check` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub superblock: Option<Superblock>,
    pub watermark: Option<u64>,
    /// W: every epoch up to this one is on the origin.
    pub written_epoch: Option<u64>,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub live: u64,
    pub dirty: u64,
    pub pending: u64,
    /// Older dirty versions recovery keeps for ordered writeback, until
    /// their epoch is on the origin (pending ones counted as if whole).
    pub retained: u64,
    /// Older versions of a block that recovery will free (likewise).
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
    /// W: every epoch up to this one is on the origin.
    pub written_epoch: u64,
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
    // S, then W: the first word that fails its checksum ends the check.
    let words = read_watermark(region).and_then(|s| {
        r.watermark = Some(s);
        read_written_epoch(region).map(|w| (s, w))
    });
    let (s, written) = match words {
        Ok(x) => x,
        Err(e) => {
            r.errors.push(e);
            r.superblock = Some(sb);
            return r;
        }
    };
    r.written_epoch = Some(written);
    SlotCheck::new(region, &sb, s, written, verify_data).run(&mut r);
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

    /// What the next open will clean up: not errors. Retained versions are
    /// not cleanup: writeback still owes them to the origin.
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
/// watermark S and the origin's size, and of each block's versions.
struct SlotCheck<'a> {
    region: &'a dyn PmemRegion,
    layout: Layout,
    s: u64,
    /// W, the newest epoch on the origin.
    written: u64,
    origin_blocks: u64,
    verify_data: bool,
    /// Every live entry, committed or pending.
    versions: Vec<Mapping>,
}

impl<'a> SlotCheck<'a> {
    fn new(
        region: &'a dyn PmemRegion,
        sb: &Superblock,
        s: u64,
        written: u64,
        verify_data: bool,
    ) -> Self {
        let layout = sb.layout;
        SlotCheck {
            region,
            layout,
            s,
            written,
            origin_blocks: sb.origin_size.div_ceil(layout.block_size as u64),
            verify_data,
            versions: Vec::new(),
        }
    }

    fn run(mut self, r: &mut CheckReport) {
        let layout = self.layout;
        let mut torn: Vec<u64> = Vec::new();
        for slot in 0..layout.slot_count {
            match view_slot(self.region, &layout, slot, self.s) {
                SlotView::Free => {}
                SlotView::Torn => torn.push(slot),
                SlotView::Corrupt { state_seq } => r.errors.push(format!(
                    "slot {slot} (metadata at offset {}): committed entry seq {state_seq} fails its checksum",
                    layout.meta_off(slot)
                )),
                SlotView::Live { entry: e, dirty } => {
                    let pending = e.seq > self.s;
                    if pending {
                        // Recovery verifies it and may roll it back.
                        r.pending += 1;
                    } else {
                        r.live += 1;
                        r.dirty += dirty as u64;
                        self.check_entry(r, slot, &e);
                    }
                    self.versions.push(Mapping::of(slot, &e, dirty, self.s));
                }
            }
        }
        if !torn.is_empty() {
            r.warnings.push(format!(
                "{} entries above the watermark fail their checksum (slots {:?}{}): writes torn by a crash, or damaged metadata; recovery drops them",
                torn.len(),
                &torn[..torn.len().min(16)],
                if torn.len() > 16 { ", ..." } else { "" }
            ));
        }
        self.check_versions(r);
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

    /// The committed versions of each block have distinct seqs (format
    /// rule 4) and, among the dirty ones, epochs that never decrease with
    /// seq (the writer lock orders both; recovery and ordered writeback
    /// rely on it). Counts what recovery keeps and frees (rule 5).
    fn check_versions(&mut self, r: &mut CheckReport) {
        let ms = &mut self.versions;
        ms.sort_unstable_by_key(|m| (m.block, m.seq));
        assign_roles(ms, self.written);
        for run in ms.chunk_by(|a, b| a.block == b.block) {
            let run: Vec<&Mapping> = run.iter().filter(|m| !m.pending).collect();
            for p in run.windows(2).filter(|p| p[0].seq == p[1].seq) {
                r.errors.push(format!(
                    "slots {} and {} both map block {} with the same seq {}",
                    p[0].slot, p[1].slot, p[0].block, p[0].seq
                ));
            }
            let mut newest_dirty: Option<&Mapping> = None;
            for &m in run.iter().filter(|m| m.dirty) {
                match newest_dirty {
                    Some(n) if n.epoch > m.epoch => r.errors.push(format!(
                        "block {}: dirty versions out of epoch order: slot {} (seq {}) is in epoch {}, the older slot {} (seq {}) in epoch {}",
                        m.block, m.slot, m.seq, m.epoch, n.slot, n.seq, n.epoch
                    )),
                    _ => newest_dirty = Some(m),
                }
            }
        }
        for m in ms.iter() {
            match m.role {
                Role::Retained => r.retained += 1,
                Role::Superseded => r.superseded += 1,
                Role::Current => {}
            }
        }
    }
}

/// Superblock, watermark, W and every live mapping, with its role.
pub fn dump(region: &dyn PmemRegion) -> crate::Result<Dump> {
    let (sb, copy) = read_superblock(region)?;
    let layout = sb.layout;
    let s = read_watermark(region).map_err(crate::EngineError::Corrupt)?;
    let written = read_written_epoch(region).map_err(crate::EngineError::Corrupt)?;
    let mut mappings = Vec::new();
    for slot in 0..layout.slot_count {
        if let SlotView::Live { entry: e, dirty } = view_slot(region, &layout, slot, s) {
            mappings.push(Mapping::of(slot, &e, dirty, s));
        }
    }
    assign_roles(&mut mappings, written);
    Ok(Dump {
        superblock: sb,
        superblock_copy: copy,
        watermark: s,
        written_epoch: written,
        mappings,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use pmcache_origin::{MemOrigin, Origin};
    use pmcache_pmem::SimRegion;
    use pmcache_testkit::pattern;

    use super::*;
    use crate::{Engine, EngineConfig};

    const MIB: usize = 1 << 20;

    fn manual() -> EngineConfig {
        EngineConfig {
            background_writeback: false,
            ..Default::default()
        }
    }

    fn open(region: &Arc<SimRegion>, origin: &Arc<MemOrigin>) -> Arc<Engine> {
        Engine::open(
            region.clone() as Arc<dyn PmemRegion>,
            origin.clone() as Arc<dyn Origin>,
            manual(),
        )
        .unwrap()
    }

    /// Block 0 written in epoch 1 and again in epoch 2 (after a client
    /// FLUSH): its first version is retained. Block 1 written twice in
    /// epoch 1: its first version is superseded. Returns the image before
    /// close (the superseded version still in media) and the cache closed.
    fn two_epochs() -> (Vec<u8>, Arc<SimRegion>, Arc<MemOrigin>) {
        let region = Arc::new(SimRegion::new(4 * MIB));
        let origin = Arc::new(MemOrigin::new(4 * MIB as u64).with_name("t"));
        Engine::format(&*region, &*origin, 4096).unwrap();
        let e = open(&region, &origin);
        e.write(4096, &pattern(1, 4096), false).unwrap();
        e.write(4096, &pattern(2, 4096), false).unwrap();
        e.write(0, &pattern(3, 4096), false).unwrap();
        e.flush().unwrap();
        e.write(0, &pattern(4, 4096), false).unwrap();
        assert_eq!(e.stats().retained, 1);
        let crashed = region.durable_image();
        e.close().unwrap();
        (crashed, region, origin)
    }

    fn roles_of(d: &Dump, block: u64) -> Vec<(u64, Role)> {
        let mut ms: Vec<&Mapping> = d.mappings.iter().filter(|m| m.block == block).collect();
        ms.sort_by_key(|m| m.seq);
        ms.iter().map(|m| (m.epoch, m.role)).collect()
    }

    #[test]
    fn retained_versions_are_counted_apart_from_superseded_ones() {
        let (crashed, region, origin) = two_epochs();
        use Role::*;

        // Crashed: block 1's first version is not yet FREE in media (and
        // every entry is above S, verified at the next open).
        let img = SimRegion::from_image(&crashed);
        let r = check(&img, None, true);
        assert!(r.ok(), "{:?}", r.errors);
        assert_eq!((r.written_epoch, r.retained, r.superseded), (Some(0), 1, 1));
        assert!(
            r.warnings
                .contains(&"1 superseded versions will be freed by recovery".to_string()),
            "the retained version is not among them: {:?}",
            r.warnings
        );
        let d = dump(&img).unwrap();
        assert_eq!(d.written_epoch, 0);
        assert_eq!(roles_of(&d, 0), [(1, Retained), (2, Current)]);
        assert_eq!(roles_of(&d, 1), [(1, Superseded), (1, Current)]);
        // Recovery agrees.
        let e = open(&Arc::new(SimRegion::from_image(&crashed)), &origin);
        assert_eq!(e.stats().retained, r.retained);
        drop(e);

        // Closed: the superseded version is freed, the retained one stays.
        let r = check(&*region, None, true);
        assert!(r.ok() && r.warnings.is_empty(), "{r:?}");
        assert_eq!((r.live, r.dirty, r.retained, r.superseded), (3, 3, 1, 0));

        // Epoch 1 written back: W is 1, nothing is retained any more.
        let e = open(&region, &origin);
        e.writeback_step(1000).unwrap();
        assert_eq!(e.stats().written_epoch, 1);
        e.close().unwrap();
        let r = check(&*region, None, true);
        assert!(r.ok(), "{:?}", r.errors);
        assert_eq!((r.written_epoch, r.retained), (Some(1), 0));
        assert_eq!(dump(&*region).unwrap().written_epoch, 1);
    }

    /// Change slot `slot`'s entry by `f`, with a valid checksum (the state
    /// word as it was).
    fn rewrite_entry(region: &SimRegion, slot: u64, f: impl FnOnce(&mut Entry)) {
        let layout = read_superblock(region).unwrap().0.layout;
        let (words, _) = crate::recovery::read_meta(region, &layout, slot);
        let mut e = Entry::decode(&words).unwrap();
        f(&mut e);
        for (i, w) in e.encode().into_iter().enumerate() {
            if i == W_STATE {
                continue;
            }
            region
                .word(layout.meta_off(slot) + i * 8)
                .store(w, Ordering::SeqCst);
        }
    }

    #[test]
    fn w_above_every_epoch_is_valid_dirty_epochs_out_of_order_are_not() {
        let (_, region, _) = two_epochs();
        let image = region.durable_image();
        let d = dump(&*region).unwrap();
        let older = d
            .mappings
            .iter()
            .find(|m| m.block == 0 && m.epoch == 1)
            .unwrap()
            .slot;

        // W above every epoch: nothing is owed to the origin any more, so
        // the older version is superseded, not an error.
        let img = SimRegion::from_image(&image);
        img.word(wm_line_off(EPOCH_LINE))
            .store(encode_watermark(100), Ordering::SeqCst);
        let r = check(&img, None, true);
        assert!(r.ok(), "{:?}", r.errors);
        assert_eq!(
            (r.written_epoch, r.retained, r.superseded),
            (Some(100), 0, 1)
        );

        // The older dirty version of block 0 in a later epoch than the
        // newer one: the writer lock makes that impossible.
        let img = SimRegion::from_image(&image);
        rewrite_entry(&img, older, |e| e.epoch = 3);
        let r = check(&img, None, true);
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(
            r.errors[0].contains("block 0: dirty versions out of epoch order")
                && r.errors[0].contains(&format!("older slot {older} ")),
            "{}",
            r.errors[0]
        );
    }

    #[test]
    fn a_damaged_w_word_is_an_error_that_names_its_offset() {
        let (_, region, _) = two_epochs();
        let img = SimRegion::from_image(&region.durable_image());
        let off = wm_line_off(EPOCH_LINE);
        let w = img.word(off).load(Ordering::SeqCst);
        img.word(off).store(w ^ 1 << 3, Ordering::SeqCst);
        let r = check(&img, None, false);
        assert!(!r.ok());
        assert!(
            r.errors[0].contains("written-back epoch")
                && r.errors[0].contains(&format!("offset {off}")),
            "{:?}",
            r.errors
        );
        assert_eq!(r.written_epoch, None);
        let err = dump(&img).unwrap_err().to_string();
        assert!(err.contains(&format!("offset {off}")), "{err}");
    }
}
