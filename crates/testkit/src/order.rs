//! Checking ordered writeback: is the origin a state a plain disk could have
//! shown after a power cut?
//!
//! The client's writes between two completed FLUSHes form an epoch (epochs
//! count from 0; each completed FLUSH starts the next). The origin is valid
//! when there is an epoch k such that every block holds either its value at
//! the end of epoch k-1 (its last write in an earlier epoch, or its initial
//! content) or a value written to it during epoch k.
//!
//! [`EpochHistory`] records what the client did and answers, for an origin
//! given as its durable content plus the writes it may still lose, which k
//! fit. Values are compared by a 64-bit hash, so a check costs one pass over
//! the device and one hash per written block, cheap enough to run after
//! every origin operation.

use std::fmt;
use std::ops::RangeInclusive;

use xxhash_rust::xxh3::xxh3_64;

/// A set of epochs, kept as sorted, disjoint, non-adjacent ranges: the
/// answer is usually one range, but a value written twice (same content in
/// two epochs) is valid in two places.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochSet(Vec<RangeInclusive<u64>>);

impl EpochSet {
    /// The set `lo..=hi`.
    pub fn range(lo: u64, hi: u64) -> EpochSet {
        EpochSet(vec![lo..=hi])
    }

    /// The union of `ranges` (any order, overlaps allowed).
    pub fn union(mut ranges: Vec<RangeInclusive<u64>>) -> EpochSet {
        ranges.sort_by_key(|r| *r.start());
        let mut out: Vec<RangeInclusive<u64>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match out.last_mut() {
                Some(last) if *r.start() <= last.end().saturating_add(1) => {
                    let end = (*last.end()).max(*r.end());
                    *last = *last.start()..=end;
                }
                _ => out.push(r),
            }
        }
        EpochSet(out)
    }

    /// The epochs in both sets (a merge of two sorted lists).
    pub fn intersect(&self, other: &EpochSet) -> EpochSet {
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        while i < self.0.len() && j < other.0.len() {
            let (a, b) = (&self.0[i], &other.0[j]);
            let lo = (*a.start()).max(*b.start());
            let hi = (*a.end()).min(*b.end());
            if lo <= hi {
                out.push(lo..=hi);
            }
            if a.end() < b.end() {
                i += 1;
            } else {
                j += 1;
            }
        }
        EpochSet(out)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, k: u64) -> bool {
        self.0.iter().any(|r| r.contains(&k))
    }

    /// The ranges, sorted.
    pub fn ranges(&self) -> &[RangeInclusive<u64>] {
        &self.0
    }

    /// The newest epoch in the set: how recent the origin may be.
    pub fn max(&self) -> Option<u64> {
        self.0.last().map(|r| *r.end())
    }
}

impl fmt::Display for EpochSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("{}");
        }
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|r| match r.start() == r.end() {
                true => r.start().to_string(),
                false => format!("{}..={}", r.start(), r.end()),
            })
            .collect();
        write!(f, "{{{}}}", parts.join(", "))
    }
}

/// Where a value the origin may show came from, for the report.
#[derive(Clone, Debug)]
enum Source {
    Durable,
    /// The `n`-th pending write (from 0), at `offset`, `len` bytes.
    Pending {
        n: usize,
        offset: u64,
        len: usize,
    },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Durable => f.write_str("the origin's durable content"),
            Source::Pending { n, offset, len } => write!(
                f,
                "the origin after its pending (unflushed) write #{n} ({offset}+{len})"
            ),
        }
    }
}

/// One block's value that narrowed the valid epochs, kept to explain a
/// conflict.
struct Constraint {
    block: u64,
    source: Source,
    hash: u64,
    valid: EpochSet,
}

/// The client's history of a device, by block: what each write left in each
/// block and in which epoch. See the module documentation for the promise
/// checked.
#[derive(Clone)]
pub struct EpochHistory {
    block: usize,
    /// What the client reads now: each write's effect on a block is known
    /// in full even when it covered only part of it.
    image: Vec<u8>,
    initial: Vec<u8>,
    /// Per block, the hash of its initial content.
    initial_hash: Vec<u64>,
    /// Per block, each write's (epoch, hash of the block after it), oldest
    /// first; a repeat of the last entry is not stored (same valid epochs).
    writes: Vec<Vec<(u64, u64)>>,
    epoch: u64,
}

impl EpochHistory {
    /// A device whose content is `initial`, in blocks of `block` bytes (the
    /// last one may be short).
    pub fn new(initial: Vec<u8>, block: usize) -> EpochHistory {
        assert!(block > 0, "block size must be positive");
        let blocks = initial.len().div_ceil(block);
        let initial_hash = initial.chunks(block).map(xxh3_64).collect();
        EpochHistory {
            block,
            image: initial.clone(),
            initial,
            initial_hash,
            writes: vec![Vec::new(); blocks],
            epoch: 0,
        }
    }

    /// The epoch that writes go to now (the number of completed flushes).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The content the client sees now.
    pub fn image(&self) -> &[u8] {
        &self.image
    }

    /// A client write (any alignment), in the current epoch.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let lo = usize::try_from(offset).expect("offset fits usize");
        let hi = lo + data.len();
        assert!(
            hi <= self.image.len(),
            "write {offset}+{} past the end",
            data.len()
        );
        if data.is_empty() {
            return;
        }
        self.image[lo..hi].copy_from_slice(data);
        for b in (lo / self.block) as u64..=((hi - 1) / self.block) as u64 {
            let entry = (self.epoch, xxh3_64(&self.image[self.span(b)]));
            let w = &mut self.writes[b as usize];
            if w.last() != Some(&entry) {
                w.push(entry);
            }
        }
    }

    /// A client WRITE_ZEROES (or a TRIM that reads back as zeroes).
    pub fn zero(&mut self, offset: u64, len: u64) {
        let len = usize::try_from(len).expect("length fits usize");
        self.write(offset, &vec![0; len]);
    }

    /// A completed client FLUSH: the current epoch ends.
    pub fn flush(&mut self) {
        self.epoch += 1;
    }

    /// The epochs k for which the origin is a valid power-cut state, for
    /// every content it may show: `durable`, and after each of `pending`
    /// (writes since its last flush, applied in order). One k must fit all
    /// of them at once, so an origin that is valid now stays valid whichever
    /// pending writes a power loss drops. (That is slightly stronger than a
    /// k per outcome; and only the in-order prefixes of partial-block
    /// pending writes are considered, not every subset.)
    ///
    /// An error names a block, the value it may show, the epochs that value
    /// allows, and the block whose value excludes them.
    pub fn check(&self, durable: &[u8], pending: &[(u64, Vec<u8>)]) -> Result<EpochSet, String> {
        assert_eq!(durable.len(), self.image.len(), "origin size differs");
        let mut acc = Acc::new(self.epoch);
        for b in 0..self.writes.len() as u64 {
            self.observe(&mut acc, b, &durable[self.span(b)], Source::Durable)?;
        }
        self.check_pending(&mut acc, durable, pending)?;
        Ok(acc.valid)
    }

    /// Apply `pending` in order over copies of the blocks they touch and
    /// check each block's value after each write.
    fn check_pending(
        &self,
        acc: &mut Acc,
        durable: &[u8],
        pending: &[(u64, Vec<u8>)],
    ) -> Result<(), String> {
        let mut blocks: std::collections::HashMap<u64, Vec<u8>> = Default::default();
        for (n, (offset, data)) in pending.iter().enumerate() {
            let lo = *offset as usize;
            let hi = lo + data.len();
            assert!(hi <= durable.len(), "pending write {n} past the end");
            if data.is_empty() {
                continue;
            }
            for b in (lo / self.block) as u64..=((hi - 1) / self.block) as u64 {
                let span = self.span(b);
                let val = blocks
                    .entry(b)
                    .or_insert_with(|| durable[span.clone()].to_vec());
                let (s, e) = (lo.max(span.start), hi.min(span.end));
                val[s - span.start..e - span.start].copy_from_slice(&data[s - lo..e - lo]);
                let source = Source::Pending {
                    n,
                    offset: *offset,
                    len: data.len(),
                };
                self.observe(acc, b, val, source)?;
            }
        }
        Ok(())
    }

    /// Narrow `acc` by block `b` showing `val`.
    fn observe(&self, acc: &mut Acc, b: u64, val: &[u8], source: Source) -> Result<(), String> {
        let span = self.span(b);
        if self.writes[b as usize].is_empty() {
            if val == &self.initial[span.clone()] {
                return Ok(());
            }
            return Err(format!(
                "block {b} (bytes {}..{}) in {source} differs from its initial content, but the client never wrote it",
                span.start, span.end
            ));
        }
        let hash = xxh3_64(val);
        let valid = self.valid_epochs(b, hash);
        if valid.is_empty() {
            return Err(format!(
                "block {b} (bytes {}..{}) in {source} holds a value the client never wrote to it (nor was it the initial content); the client's writes to it: {}",
                span.start,
                span.end,
                self.list_writes(b)
            ));
        }
        let c = Constraint {
            block: b,
            source,
            hash,
            valid,
        };
        acc.narrow(c).map_err(|c| self.conflict(acc, &c))
    }

    /// Explain why `c` fits none of the epochs `acc` has left: name a block
    /// it contradicts directly, or else every block that narrowed them.
    fn conflict(&self, acc: &Acc, c: &Constraint) -> String {
        let say = |o: &Constraint| {
            format!(
                "block {} in {} holds {}, valid for epochs {}",
                o.block,
                o.source,
                self.describe(o.block, o.hash),
                o.valid
            )
        };
        let head = format!(
            "origin is not a power-cut state of the client's writes (current epoch {}): {}",
            self.epoch,
            say(c)
        );
        let by = &acc.narrowed_by;
        match by.iter().find(|o| o.valid.intersect(&c.valid).is_empty()) {
            Some(o) => format!("{head}; but {}", say(o)),
            None => {
                let all: Vec<String> = by.iter().map(say).collect();
                format!("{head}; but together {}", all.join("; "))
            }
        }
    }

    /// The epochs in which block `b` may hold the value hashed `h`.
    fn valid_epochs(&self, b: u64, h: u64) -> EpochSet {
        let w = &self.writes[b as usize];
        let mut ranges = Vec::new();
        if self.initial_hash[b as usize] == h {
            ranges.push(0..=w.first().map_or(self.epoch, |e| e.0));
        }
        for (i, &(e, hash)) in w.iter().enumerate() {
            if hash != h {
                continue;
            }
            match w.get(i + 1) {
                // Overwritten in its own epoch: only a mid-epoch state.
                Some(&(next, _)) if next == e => ranges.push(e..=e),
                // The last of its epoch: also the state at the end of it,
                // until the epoch that overwrote it.
                Some(&(next, _)) => ranges.push(e..=next),
                None => ranges.push(e..=self.epoch),
            }
        }
        EpochSet::union(ranges)
    }

    /// Which writes left the value hashed `h` in block `b`, in words.
    fn describe(&self, b: u64, h: u64) -> String {
        let w = &self.writes[b as usize];
        let mut parts = Vec::new();
        if self.initial_hash[b as usize] == h {
            parts.push("its initial content".to_string());
        }
        for (i, &(e, hash)) in w.iter().enumerate() {
            if hash == h {
                parts.push(match w.get(i + 1) {
                    Some(&(next, _)) => {
                        format!("write #{i} (epoch {e}, overwritten in epoch {next})")
                    }
                    None => format!("write #{i} (epoch {e}, its newest value)"),
                });
            }
        }
        parts.join(" = ")
    }

    /// Every write of block `b` as `#i@epoch`.
    fn list_writes(&self, b: u64) -> String {
        let w = &self.writes[b as usize];
        let list: Vec<String> = w
            .iter()
            .enumerate()
            .map(|(i, (e, h))| format!("#{i}@epoch {e} (hash {h:016x})"))
            .collect();
        list.join(", ")
    }

    fn span(&self, b: u64) -> std::ops::Range<usize> {
        let lo = b as usize * self.block;
        lo..(lo + self.block).min(self.image.len())
    }
}

/// The epochs still possible while blocks are checked one by one, and the
/// blocks that narrowed them.
struct Acc {
    valid: EpochSet,
    narrowed_by: Vec<Constraint>,
}

impl Acc {
    fn new(current: u64) -> Acc {
        Acc {
            valid: EpochSet::range(0, current),
            narrowed_by: Vec::new(),
        }
    }

    /// Keep only the epochs `c` allows; if none would be left, hand `c`
    /// back to be explained.
    fn narrow(&mut self, c: Constraint) -> Result<(), Constraint> {
        let next = self.valid.intersect(&c.valid);
        if next.is_empty() {
            return Err(c);
        }
        if next != self.valid {
            self.valid = next;
            self.narrowed_by.push(c);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: usize = 8;

    fn blk(v: u8) -> Vec<u8> {
        vec![v; B]
    }

    /// A device of `n` blocks of zeroes.
    fn dev(n: usize) -> EpochHistory {
        EpochHistory::new(vec![0; n * B], B)
    }

    /// `h`'s image with block `b` replaced by `v`.
    fn with(img: &[u8], b: usize, v: &[u8]) -> Vec<u8> {
        let mut out = img.to_vec();
        out[b * B..b * B + v.len()].copy_from_slice(v);
        out
    }

    #[test]
    fn epoch_sets_merge_and_intersect() {
        let u = EpochSet::union(vec![5..=6, 0..=1, 2..=3, 9..=9]);
        assert_eq!(u.ranges(), &[0..=3, 5..=6, 9..=9]);
        let i = u.intersect(&EpochSet::range(3, 9));
        assert_eq!(i.ranges(), &[3..=3, 5..=6, 9..=9]);
        assert!(u.intersect(&EpochSet::range(7, 8)).is_empty());
        assert_eq!(i.to_string(), "{3, 5..=6, 9}");
        assert!(i.contains(6) && !i.contains(4));
        assert_eq!(i.max(), Some(9));
    }

    #[test]
    fn untouched_origin_is_valid_for_every_epoch_up_to_the_first_write() {
        let mut h = dev(4);
        h.flush();
        h.flush();
        assert_eq!(h.check(&[0; 4 * B], &[]).unwrap(), EpochSet::range(0, 2));
        h.write(0, &blk(1));
        // Block 0's initial content is its value until epoch 2 wrote it.
        assert_eq!(h.check(&[0; 4 * B], &[]).unwrap(), EpochSet::range(0, 2));
    }

    #[test]
    fn partial_writeback_of_one_epoch_is_valid() {
        let mut h = dev(4);
        h.write(0, &blk(1));
        h.write(B as u64, &blk(2));
        h.flush();
        h.write(2 * B as u64, &blk(3));
        h.write(3 * B as u64, &blk(4));
        // Epoch 0 complete, half of epoch 1.
        let img = with(&with(&[0; 4 * B], 0, &blk(1)), 1, &blk(2));
        let img = with(&img, 2, &blk(3));
        assert_eq!(h.check(&img, &[]).unwrap(), EpochSet::range(1, 1));
        // Half of epoch 0 only.
        let half = with(&[0; 4 * B], 1, &blk(2));
        assert_eq!(h.check(&half, &[]).unwrap(), EpochSet::range(0, 0));
        // Everything.
        assert_eq!(h.check(h.image(), &[]).unwrap(), EpochSet::range(1, 1));
    }

    #[test]
    fn later_epoch_present_while_earlier_epoch_missing_fails() {
        let mut h = dev(4);
        h.write(0, &blk(1));
        h.flush();
        h.write(B as u64, &blk(2));
        let err = h.check(&with(&[0; 4 * B], 1, &blk(2)), &[]).unwrap_err();
        assert!(
            err.contains("block 1") && err.contains("block 0") && err.contains("epochs {1}"),
            "{err}"
        );
        assert!(
            err.contains("its initial content") && err.contains("{0}"),
            "{err}"
        );
    }

    #[test]
    fn a_value_overwritten_in_its_epoch_is_valid_only_in_that_epoch() {
        let mut h = dev(2);
        h.write(0, &blk(1));
        h.write(0, &blk(2));
        h.flush();
        h.write(B as u64, &blk(3));
        h.flush();
        let mid = with(&[0; 2 * B], 0, &blk(1));
        assert_eq!(h.check(&mid, &[]).unwrap(), EpochSet::range(0, 0));
        // Block 1 from epoch 1 needs block 0 at its end-of-epoch-0 value.
        let bad = with(&mid, 1, &blk(3));
        let err = h.check(&bad, &[]).unwrap_err();
        assert!(err.contains("overwritten in epoch 0"), "{err}");
        let good = with(&with(&[0; 2 * B], 0, &blk(2)), 1, &blk(3));
        assert_eq!(h.check(&good, &[]).unwrap(), EpochSet::range(1, 2));
    }

    #[test]
    fn pending_writes_that_may_be_lost_count() {
        let mut h = dev(2);
        h.write(0, &blk(1));
        h.flush();
        h.write(B as u64, &blk(2));
        let zero = [0; 2 * B];
        // Epoch 0's block still pending, epoch 1's too, after it: a power
        // loss may keep the second and drop the first.
        let pending = vec![(0, blk(1)), (B as u64, blk(2))];
        let err = h.check(&zero, &pending).unwrap_err();
        assert!(err.contains("pending (unflushed) write #1"), "{err}");
        // Epoch 0 durable, epoch 1 pending: fine whatever is lost.
        let durable = with(&zero, 0, &blk(1));
        let ok = h.check(&durable, &[(B as u64, blk(2))]).unwrap();
        assert_eq!(ok, EpochSet::range(1, 1));
        // Only epoch 0 pending: if it is lost the origin is epoch 0's
        // start, so only k = 0 fits every outcome.
        assert_eq!(
            h.check(&zero, &[(0, blk(1))]).unwrap(),
            EpochSet::range(0, 0)
        );
    }

    #[test]
    fn partial_block_writes_are_tracked_by_their_whole_block() {
        let mut h = dev(2);
        h.write(4, &[7; 8]); // the end of block 0, the start of block 1
        h.flush();
        h.write(0, &[9; 2]);
        let mut e0 = vec![0; 2 * B];
        e0[4..12].fill(7);
        assert_eq!(h.check(&e0, &[]).unwrap(), EpochSet::range(0, 1));
        // Only half of the epoch-0 request on the origin: still epoch 0.
        let mut half = vec![0; 2 * B];
        half[4..8].fill(7);
        assert_eq!(h.check(&half, &[]).unwrap(), EpochSet::range(0, 0));
        // A block holding bytes of epoch 1 but not epoch 0's: never written.
        let mut wrong = vec![0; 2 * B];
        wrong[0..2].fill(9);
        let err = h.check(&wrong, &[]).unwrap_err();
        assert!(err.contains("never wrote"), "{err}");
        // Partial pending writes are applied over the durable block: epoch
        // 1's two bytes over epoch 0's block.
        assert_eq!(
            h.check(&e0, &[(0, vec![9; 2])]).unwrap(),
            EpochSet::range(1, 1)
        );
        // Over the initial block instead, the same two bytes make a value
        // the client never wrote.
        let err = h.check(&[0; 2 * B], &[(4, vec![7; 8]), (0, vec![9; 2])]);
        assert!(err.unwrap_err().contains("pending (unflushed) write #1"));
    }

    #[test]
    fn same_content_written_twice_is_valid_in_both_places() {
        let mut h = dev(2);
        h.write(0, &blk(1)); // epoch 0
        h.flush();
        h.write(0, &blk(2)); // epoch 1
        h.write(B as u64, &blk(5));
        h.flush();
        h.flush();
        h.write(0, &blk(1)); // epoch 3, the same content as in epoch 0
        h.flush();
        let v1 = xxh3_64(&blk(1));
        assert_eq!(h.valid_epochs(0, v1).ranges(), &[0..=1, 3..=4]);
        // With block 1 at its epoch-1 value: epoch 1 (block 0 from epoch 0
        // at its end) or from epoch 3 on.
        let both = with(&with(&[0; 2 * B], 0, &blk(1)), 1, &blk(5));
        assert_eq!(h.check(&both, &[]).unwrap().ranges(), &[1..=1, 3..=4]);
        let between = with(&both, 0, &blk(2));
        assert_eq!(h.check(&between, &[]).unwrap(), EpochSet::range(1, 3));
        // Written twice in a row in one epoch: stored once, valid as one.
        h.write(0, &blk(1));
        h.write(0, &blk(1));
        assert_eq!(h.writes[0].len(), 4);
        assert_eq!(h.valid_epochs(0, v1).ranges(), &[0..=1, 3..=4]);
    }

    #[test]
    fn never_written_block_must_keep_its_initial_content() {
        let h = EpochHistory::new(vec![3; 3 * B], B);
        let err = h.check(&with(&[3; 3 * B], 2, &blk(0)), &[]).unwrap_err();
        assert!(
            err.contains("block 2") && err.contains("never wrote"),
            "{err}"
        );
        let err = h.check(&[3; 3 * B], &[(1, vec![4])]).unwrap_err();
        assert!(err.contains("block 0") && err.contains("pending"), "{err}");
    }

    #[test]
    fn zeroes_and_a_short_last_block() {
        let mut h = EpochHistory::new(vec![1; 2 * B + 3], B);
        h.zero(B as u64, B as u64 + 3);
        assert_eq!(h.image()[B..], vec![0; B + 3]);
        assert_eq!(h.check(h.image(), &[]).unwrap(), EpochSet::range(0, 0));
        h.flush();
        let mut stale = h.image().to_vec();
        stale[2 * B] = 1;
        let err = h.check(&stale, &[]).unwrap_err();
        assert!(err.contains("block 2 (bytes 16..19)"), "{err}");
    }

    /// The definition, naively: replay the log for each k and test every
    /// value each block may show against the values allowed at k.
    struct Oracle {
        log: Vec<Option<(usize, Vec<u8>)>>, // None: a flush
        size: usize,
    }

    impl Oracle {
        /// Per block, the values allowed at `k`.
        fn allowed(&self, k: u64) -> Vec<Vec<Vec<u8>>> {
            let mut img = vec![0u8; self.size];
            let mut allowed = vec![Vec::new(); self.size.div_ceil(B)];
            let mut epoch = 0;
            let snap = |img: &[u8], allowed: &mut Vec<Vec<Vec<u8>>>, b: usize| {
                allowed[b].push(img[b * B..(b * B + B).min(img.len())].to_vec())
            };
            for b in 0..allowed.len() {
                if k == 0 {
                    snap(&img, &mut allowed, b);
                }
            }
            for op in &self.log {
                match op {
                    None => {
                        epoch += 1;
                        if epoch == k {
                            (0..allowed.len()).for_each(|b| snap(&img, &mut allowed, b));
                        }
                    }
                    Some((off, data)) => {
                        img[*off..off + data.len()].copy_from_slice(data);
                        if epoch == k {
                            for b in off / B..=(off + data.len() - 1) / B {
                                snap(&img, &mut allowed, b);
                            }
                        }
                    }
                }
            }
            allowed
        }

        fn valid(&self, shown: &[Vec<Vec<u8>>], current: u64) -> Vec<u64> {
            (0..=current)
                .filter(|&k| {
                    let allowed = self.allowed(k);
                    shown
                        .iter()
                        .zip(&allowed)
                        .all(|(vals, ok)| vals.iter().all(|v| ok.contains(v)))
                })
                .collect()
        }
    }

    /// Per block, every value an origin (durable, pending) may show.
    fn shown(durable: &[u8], pending: &[(u64, Vec<u8>)]) -> Vec<Vec<Vec<u8>>> {
        let mut img = durable.to_vec();
        let block = |img: &[u8], b: usize| img[b * B..(b * B + B).min(img.len())].to_vec();
        let mut out: Vec<Vec<Vec<u8>>> = (0..img.len().div_ceil(B))
            .map(|b| vec![block(&img, b)])
            .collect();
        for (off, data) in pending {
            let off = *off as usize;
            img[off..off + data.len()].copy_from_slice(data);
            let touched = off / B..=(off + data.len() - 1) / B;
            for (b, vals) in out.iter_mut().enumerate() {
                if touched.contains(&b) {
                    vals.push(block(&img, b));
                }
            }
        }
        out
    }

    #[test]
    fn agrees_with_the_definition_on_random_histories() {
        let mut rnd = 0u64;
        let mut next = |n: u64| {
            rnd += 1;
            crate::splitmix(rnd) % n
        };
        let (mut oks, mut errs) = (0, 0);
        for _case in 0..400 {
            let size = 3 * B - next(3) as usize;
            let mut h = EpochHistory::new(vec![0; size], B);
            let mut oracle = Oracle {
                log: Vec::new(),
                size,
            };
            // A few values only, so contents repeat across writes.
            let mut images = vec![h.image().to_vec()];
            for _ in 0..next(12) {
                if next(4) == 0 {
                    h.flush();
                    oracle.log.push(None);
                    continue;
                }
                let off = next(size as u64) as usize;
                let len = 1 + next((size - off) as u64) as usize;
                let data = vec![next(3) as u8; len];
                h.write(off as u64, &data);
                oracle.log.push(Some((off, data)));
                images.push(h.image().to_vec());
            }
            // An origin made of blocks of the images the client saw (often
            // valid, often not), and a pending write or two.
            let mut durable = vec![0u8; size];
            for b in 0..size.div_ceil(B) {
                let src = &images[next(images.len() as u64) as usize];
                let span = b * B..(b * B + B).min(size);
                durable[span.clone()].copy_from_slice(&src[span]);
            }
            let pending: Vec<(u64, Vec<u8>)> = (0..next(3))
                .map(|_| {
                    let src = &images[next(images.len() as u64) as usize];
                    let off = next(size as u64) as usize;
                    let len = 1 + next((size - off) as u64) as usize;
                    (off as u64, src[off..off + len].to_vec())
                })
                .collect();
            let want = oracle.valid(&shown(&durable, &pending), h.epoch());
            match h.check(&durable, &pending) {
                Ok(set) => {
                    let got: Vec<u64> = (0..=h.epoch()).filter(|&k| set.contains(k)).collect();
                    assert_eq!(
                        got, want,
                        "history {:?}, origin {durable:?} + {pending:?}",
                        oracle.log
                    );
                    oks += 1;
                }
                Err(e) => {
                    assert!(want.is_empty(), "{e}; the definition allows {want:?}");
                    errs += 1;
                }
            }
        }
        assert!(
            oks > 50 && errs > 50,
            "both outcomes exercised: {oks} ok, {errs} errors"
        );
    }
}
