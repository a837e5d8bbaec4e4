//! The on-media format.
//!
//! ```text
//! offset 0       superblock copy A (4 KiB)   } updated alternately, highest valid
//! offset 4096    superblock copy B (4 KiB)   } generation wins
//! offset 8192    watermark page: lines 0..63 hold S (the largest valid
//!                word), line 63 the written-back epoch W
//! offset 12288   slot metadata: one 64-byte line per slot
//! data_offset    slot data: slot_count × block_size, aligned to max(block, 4 KiB)
//! ```
//!
//! **Slot metadata line** (little-endian u64 words):
//! `w0` origin block, `w1` seq, `w2` xxh3 of the block data (0 for a zero
//! entry), `w3` txn block count (low 32) | flags (high 32), `w4` crc32c of
//! w0..w3 and w6, `w5` the *state word*, `w6` the epoch, `w7` reserved.
//!
//! `w0..w4` and `w6` are written once per incarnation of a slot. The state word
//! `seq[0..56] | code << 56` is the only word changed in place, by single
//! failure-atomic 8-byte stores: DIRTY → CLEAN after writeback, anything →
//! FREE when the slot is retired. An entry is *live* when its crc holds, the
//! state word carries the same seq and the code is DIRTY or CLEAN.
//!
//! **Commit.** A write request is one transaction: every block gets a fresh
//! slot (copy-on-write, old versions untouched), the data and entries of all
//! blocks are flushed and then a single fence makes the request durable.
//! Nothing orders data before entries, so recovery verifies what might be
//! torn: the watermark S says "every transaction with seq ≤ S is complete",
//! and only entries above S are checked — by data hash, and for multi-block
//! transactions by finding all `count` entries. S advances by piggybacking
//! on the commit fences (see `txn.rs`), and once writes pause by a fence of
//! its own (the settle thread), so the check touches a handful of slots,
//! never the whole cache, and an acknowledged entry stays above S only
//! briefly (above S a damaged entry looks torn and is rolled back). Line 0
//! of the watermark page is raised by compare-and-swap; lines 1..64 belong
//! one each to the writers in flight, which store S with a streaming store
//! (no read, no flush of a shared line) and never lower their own line.
//! Unused lines are zero.
//!
//! **Rules that keep the promises** (enforced by the engine):
//! 1. A slot enters the free list only with a durable FREE state word, so a
//!    torn reuse can never look like an older committed entry.
//! 2. A slot's incarnation with seq `x` is overwritten or freed only once a
//!    durable S ≥ x exists, so a multi-block transaction above S is always
//!    whole in media until S covers it.
//! 3. A block's newest entry is dropped (evicted) only after every older
//!    entry of that block is durably FREE — no resurrection.
//! 4. Per block, seq order is commit order (writers of a block are
//!    serialized while they take a seq), so recovery keeps the highest seq.
//!
//! **Epochs and ordered writeback.** The client's writes between two of its
//! FLUSHes form an epoch; each entry records the epoch its write committed
//! in (per block, epochs never decrease with seq, as the writer lock orders
//! both). Ordered writeback copies epoch after epoch to the origin, each
//! sealed by an origin flush, so the origin always holds the state at the
//! end of some epoch k-1 plus part of epoch k: what a disk could show after
//! a power cut. For that, a dirty version overwritten in a *later* epoch is
//! *retained* (live in media, out of the index, never read) until its own
//! epoch is written back; one overwritten in the same epoch goes at once.
//! W, on the epoch line, says "every epoch ≤ W is on the origin, flushed";
//! it is raised with the fence that makes the CLEAN states of an epoch's
//! last batch durable, before the next epoch's first origin write. Rules:
//! 5. Recovery keeps, per block, the newest entry, and of the older dirty
//!    entries newer than its newest CLEAN one, those with an epoch above W
//!    and below the newest's: the newest per epoch, in epoch order. Every
//!    other version is a loser. An epoch at or below W is never written to
//!    the origin again, so rewriting an epoch cannot undo a later one.
//! 6. A retained version is retired (rule 2 applies) only after its epoch's
//!    origin flush.
//! 7. Per block, versions become durably FREE oldest first (one fence
//!    after another), so the live versions of a block are always its
//!    newest ones. Otherwise a dirty version superseded in its own epoch,
//!    whose FREE still waits for S, could outlive the newer version of
//!    that epoch, and rule 5 would retain it and write it back after the
//!    epoch's real last value: the origin would go back in time.

use pmcache_pmem::PmemRegion;

// The layout relations the offsets above rely on.
const _: () = {
    assert!(META_SIZE == 64, "one slot entry is one cache line");
    assert!(
        W_STATE * 8 + 8 <= META_SIZE,
        "the state word lies in the entry line"
    );
    assert!(WATERMARK_OFF == 2 * SB_SIZE && META_OFF == WATERMARK_OFF + SB_SIZE);
    assert!(
        (WM_LINES + 1) * 64 == SB_SIZE,
        "one watermark line per 64 bytes of its page, the last one W's"
    );
    assert!(
        SEQ_MASK == (1 << 56) - 1,
        "the state word keeps its code in the top byte"
    );
};

/// Superblock magic.
pub const MAGIC: [u8; 8] = *b"PMCACHE\x01";
/// On-media format version. 3: entries carry their epoch and the
/// watermark page's last line holds W (ordered writeback).
pub const VERSION: u32 = 3;
/// Size of one superblock copy.
pub const SB_SIZE: usize = 4096;
/// Offset of the watermark page; line 0's first word is the shared word.
pub const WATERMARK_OFF: usize = 2 * SB_SIZE;
/// Lines in the watermark page that hold S.
pub const WM_LINES: usize = SB_SIZE / 64 - 1;
/// The page's last line: W, the newest epoch written back to the origin.
pub const EPOCH_LINE: usize = WM_LINES;
/// Offset of slot metadata.
pub const META_OFF: usize = 3 * SB_SIZE;
/// Bytes of metadata per slot (one cache line).
pub const META_SIZE: usize = 64;
/// Longest origin fingerprint stored.
pub const MAX_FINGERPRINT: usize = 1024;
/// Smallest and largest supported block sizes.
pub const MIN_BLOCK: u32 = 512;
pub const MAX_BLOCK: u32 = 65536;
/// Seqs live in 56 bits of the state word.
pub const SEQ_MASK: u64 = (1 << 56) - 1;

/// State codes in the top byte of the state word. Anything else is FREE.
pub const STATE_DIRTY: u8 = 0xD7;
pub const STATE_CLEAN: u8 = 0xC3;
pub const STATE_FREE: u64 = 0;

/// Entry flag: the block reads as zeroes; the data area is unused.
pub const FLAG_ZERO: u32 = 1;

/// Cache modes (contract §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    #[default]
    Writeback,
    Writethrough,
    Writearound,
    Passthrough,
}

impl CacheMode {
    pub fn as_u8(self) -> u8 {
        match self {
            CacheMode::Writeback => 0,
            CacheMode::Writethrough => 1,
            CacheMode::Writearound => 2,
            CacheMode::Passthrough => 3,
        }
    }

    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => CacheMode::Writeback,
            1 => CacheMode::Writethrough,
            2 => CacheMode::Writearound,
            3 => CacheMode::Passthrough,
            _ => return None,
        })
    }

    /// Modes that leave dirty data in the cache.
    pub fn keeps_dirty(self) -> bool {
        matches!(self, CacheMode::Writeback)
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::Writearound => "writearound",
            CacheMode::Passthrough => "passthrough",
        })
    }
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "writeback" | "wb" => CacheMode::Writeback,
            "writethrough" | "wt" => CacheMode::Writethrough,
            "writearound" | "wa" => CacheMode::Writearound,
            "passthrough" | "pt" => CacheMode::Passthrough,
            _ => {
                return Err(format!(
                    "unknown cache mode '{s}' (expected writeback, writethrough, writearound or passthrough)"
                ))
            }
        })
    }
}

/// Where things are in the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub block_size: u32,
    pub slot_count: u64,
    pub data_offset: u64,
    pub region_len: u64,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Layout {
    /// The largest layout that fits `region_len` bytes.
    pub fn compute(region_len: u64, block_size: u32) -> Result<Layout, String> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
            return Err(format!(
                "block size {block_size} must be a power of two from {MIN_BLOCK} to {MAX_BLOCK}"
            ));
        }
        let bs = block_size as u64;
        let align = bs.max(4096);
        let avail = region_len.saturating_sub(META_OFF as u64 + align);
        let mut slots = avail / (bs + META_SIZE as u64);
        loop {
            let data_offset = align_up(META_OFF as u64 + slots * META_SIZE as u64, align);
            if data_offset + slots * bs <= region_len || slots == 0 {
                if slots == 0 {
                    return Err(format!(
                        "cache of {region_len} bytes is too small for even one {block_size}-byte block"
                    ));
                }
                return Ok(Layout {
                    block_size,
                    slot_count: slots,
                    data_offset,
                    region_len,
                });
            }
            slots -= 1;
        }
    }

    pub fn meta_off(&self, slot: u64) -> usize {
        META_OFF + slot as usize * META_SIZE
    }

    pub fn data_off(&self, slot: u64) -> usize {
        (self.data_offset + slot * self.block_size as u64) as usize
    }

    /// Check a layout read from media against the region it lives in.
    pub fn validate(&self) -> Result<(), String> {
        let expect = Layout::compute(self.region_len, self.block_size)?;
        if expect.data_offset != self.data_offset || expect.slot_count != self.slot_count {
            return Err(format!(
                "layout mismatch: superblock says {} slots at {}, region of {} bytes gives {} slots at {}",
                self.slot_count, self.data_offset, self.region_len, expect.slot_count, expect.data_offset
            ));
        }
        Ok(())
    }
}

/// The superblock, one logical copy (stored twice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub layout: Layout,
    pub origin_size: u64,
    pub origin_fingerprint: String,
    pub generation: u64,
    pub clean_shutdown: bool,
    pub mode: CacheMode,
    pub uuid: u64,
}

/// Why a superblock copy was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SbError {
    #[error("bad magic (not a pmcache cache)")]
    Magic,
    #[error("unsupported format version {0}")]
    Version(u32),
    #[error("checksum mismatch")]
    Checksum,
    #[error("invalid field: {0}")]
    Field(String),
}

impl Superblock {
    pub fn encode(&self) -> [u8; SB_SIZE] {
        let mut b = [0u8; SB_SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.layout.block_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.layout.slot_count.to_le_bytes());
        b[24..32].copy_from_slice(&self.layout.data_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.layout.region_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.origin_size.to_le_bytes());
        b[48..56].copy_from_slice(&self.generation.to_le_bytes());
        b[56..60].copy_from_slice(&(self.clean_shutdown as u32).to_le_bytes());
        b[60] = self.mode.as_u8();
        b[64..72].copy_from_slice(&self.uuid.to_le_bytes());
        let fp = self.origin_fingerprint.as_bytes();
        let n = fp.len().min(MAX_FINGERPRINT);
        b[72..74].copy_from_slice(&(n as u16).to_le_bytes());
        b[80..80 + n].copy_from_slice(&fp[..n]);
        let crc = crc32c::crc32c(&b[..SB_SIZE - 4]);
        b[SB_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Superblock, SbError> {
        if b.len() < SB_SIZE || b[0..8] != MAGIC {
            return Err(SbError::Magic);
        }
        // In bounds: `b` holds at least SB_SIZE bytes (checked above).
        let u32at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64at = |o: usize| u64::from_le_bytes(std::array::from_fn(|i| b[o + i]));
        // The checksum first: a flipped bit in the version is damage, not
        // another release's cache.
        if crc32c::crc32c(&b[..SB_SIZE - 4]) != u32at(SB_SIZE - 4) {
            return Err(SbError::Checksum);
        }
        let version = u32at(8);
        if version != VERSION {
            return Err(SbError::Version(version));
        }
        let layout = Layout {
            block_size: u32at(12),
            slot_count: u64at(16),
            data_offset: u64at(24),
            region_len: u64at(32),
        };
        layout.validate().map_err(SbError::Field)?;
        let n = u16::from_le_bytes([b[72], b[73]]) as usize;
        if n > MAX_FINGERPRINT {
            return Err(SbError::Field(format!("fingerprint length {n}")));
        }
        let origin_fingerprint = String::from_utf8(b[80..80 + n].to_vec())
            .map_err(|_| SbError::Field("fingerprint is not UTF-8".into()))?;
        let mode =
            CacheMode::from_u8(b[60]).ok_or_else(|| SbError::Field(format!("mode {}", b[60])))?;
        Ok(Superblock {
            layout,
            origin_size: u64at(40),
            origin_fingerprint,
            generation: u64at(48),
            clean_shutdown: u32at(56) == 1,
            mode,
            uuid: u64at(64),
        })
    }
}

/// The immutable part of a slot's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub block: u64,
    pub seq: u64,
    pub hash: u64,
    /// Number of blocks in the transaction that wrote this entry.
    pub count: u32,
    pub flags: u32,
    /// The client epoch the write committed in.
    pub epoch: u64,
}

impl Entry {
    pub fn is_zero(&self) -> bool {
        self.flags & FLAG_ZERO != 0
    }

    /// Words w0..w6 (w4 carries the crc; w5, the state word, is 0 here
    /// and not covered).
    pub fn encode(&self) -> [u64; ENTRY_WORDS] {
        let w3 = self.count as u64 | (self.flags as u64) << 32;
        let mut w = [self.block, self.seq, self.hash, w3, 0, 0, self.epoch];
        w[4] = entry_crc(&w) as u64;
        w
    }

    /// `None` when the checksum does not hold (w5 is ignored).
    pub fn decode(w: &[u64; ENTRY_WORDS]) -> Option<Entry> {
        if w[4] != entry_crc(w) as u64 {
            return None;
        }
        Some(Entry {
            block: w[0],
            seq: w[1],
            hash: w[2],
            count: w[3] as u32,
            flags: (w[3] >> 32) as u32,
            epoch: w[6],
        })
    }
}

/// Words of an entry line that `Entry` encodes (w0..w6, w5 aside).
pub const ENTRY_WORDS: usize = 7;

fn entry_crc(w: &[u64; ENTRY_WORDS]) -> u32 {
    let mut bytes = [0u8; 40];
    for (i, wi) in [0, 1, 2, 3, 6].into_iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&w[wi].to_le_bytes());
    }
    crc32c::crc32c(&bytes)
}

/// Word indexes inside a metadata line.
pub const W_STATE: usize = 5;
/// Index of the data hash in an entry.
pub const W_HASH: usize = 2;

pub fn state_word(seq: u64, code: u8) -> u64 {
    (seq & SEQ_MASK) | (code as u64) << 56
}

/// `(seq, code)` of a state word.
pub fn split_state(w: u64) -> (u64, u8) {
    (w & SEQ_MASK, (w >> 56) as u8)
}

/// Hash that detects a torn block: XXH3-64, with the CPU's widest vectors.
pub fn data_hash(data: &[u8]) -> u64 {
    pmcache_pmem::hash::xxh3_64(data)
}

/// The watermark word: seq in the low 56 bits, crc8 of it in the top byte.
pub fn encode_watermark(s: u64) -> u64 {
    let s = s & SEQ_MASK;
    s | ((crc32c::crc32c(&s.to_le_bytes()) & 0xff) as u64) << 56
}

pub fn decode_watermark(w: u64) -> Option<u64> {
    let s = w & SEQ_MASK;
    (encode_watermark(s) == w).then_some(s)
}

/// Offset of watermark line `i`.
pub fn wm_line_off(i: usize) -> usize {
    WATERMARK_OFF + i * 64
}

/// W, the newest epoch on the origin: its line must hold a valid word.
pub fn read_written_epoch(region: &dyn PmemRegion) -> Result<u64, String> {
    let off = wm_line_off(EPOCH_LINE);
    let w = region.word(off).load(std::sync::atomic::Ordering::SeqCst);
    decode_watermark(w).ok_or_else(|| {
        format!("written-back epoch word at offset {off} fails its checksum ({w:#018x})")
    })
}

/// S: the largest valid word of the watermark page. Line 0 must be valid;
/// other lines are zero or valid.
pub fn read_watermark(region: &dyn PmemRegion) -> Result<u64, String> {
    let mut s = None;
    for i in 0..WM_LINES {
        let w = region
            .word(wm_line_off(i))
            .load(std::sync::atomic::Ordering::SeqCst);
        match decode_watermark(w) {
            Some(v) => s = Some(s.unwrap_or(0).max(v)),
            None if w == 0 && i > 0 => {}
            None => {
                return Err(format!(
                    "watermark word at offset {} fails its checksum ({w:#018x})",
                    wm_line_off(i)
                ))
            }
        }
    }
    s.ok_or_else(|| "no watermark".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trip_and_corruption() {
        let layout = Layout::compute(64 << 20, 4096).unwrap();
        let sb = Superblock {
            layout,
            origin_size: 1 << 30,
            origin_fingerprint: "file:/tmp/x".into(),
            generation: 7,
            clean_shutdown: true,
            mode: CacheMode::Writethrough,
            uuid: 42,
        };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
        b[100] ^= 1;
        assert_eq!(Superblock::decode(&b), Err(SbError::Checksum));
        b[0] = b'X';
        assert_eq!(Superblock::decode(&b), Err(SbError::Magic));
    }

    #[test]
    fn layout_fits_region() {
        for bs in [512u32, 4096, 65536] {
            for len in [1u64 << 20, 3 << 20, 256 << 20] {
                let l = Layout::compute(len, bs).unwrap();
                assert!(l.data_offset + l.slot_count * bs as u64 <= len);
                assert!(l.data_offset >= META_OFF as u64 + l.slot_count * META_SIZE as u64);
                assert_eq!(l.data_offset % bs.max(4096) as u64, 0);
                l.validate().unwrap();
            }
        }
        assert!(Layout::compute(4096, 4096).is_err());
        assert!(Layout::compute(1 << 20, 1000).is_err());
    }

    #[test]
    fn watermark_is_the_largest_valid_line() {
        let r = pmcache_pmem::SimRegion::new(3 * SB_SIZE);
        assert!(read_watermark(&r).is_err(), "line 0 must be valid");
        let set = |i: usize, w: u64| {
            r.word(wm_line_off(i))
                .store(w, std::sync::atomic::Ordering::SeqCst)
        };
        set(0, encode_watermark(5));
        assert_eq!(read_watermark(&r), Ok(5));
        set(7, encode_watermark(9));
        set(WM_LINES - 1, encode_watermark(8));
        assert_eq!(read_watermark(&r), Ok(9));
        set(3, encode_watermark(4) ^ 1);
        let e = read_watermark(&r).unwrap_err();
        assert!(e.contains(&wm_line_off(3).to_string()), "{e}");
    }

    #[test]
    fn entry_and_words() {
        let e = Entry {
            block: 9,
            seq: 77,
            hash: 0xdead,
            count: 3,
            flags: FLAG_ZERO,
            epoch: 5,
        };
        let mut w = e.encode();
        assert_eq!(Entry::decode(&w), Some(e));
        w[2] ^= 1 << 40;
        assert_eq!(Entry::decode(&w), None);
        assert_eq!(split_state(state_word(77, STATE_DIRTY)), (77, STATE_DIRTY));
        assert_eq!(decode_watermark(encode_watermark(12345)), Some(12345));
        assert_eq!(decode_watermark(encode_watermark(12345) ^ 4), None);
        assert_eq!(decode_watermark(0), None, "a zeroed watermark is not valid");
    }
}
