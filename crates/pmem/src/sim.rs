//! The crash simulator: a [`PmemRegion`] that can show, at any persistence
//! point, every state power loss could leave on media (contract §3).
//!
//! The model is x86 with ADR. The program reads and writes a *volatile*
//! image; a separate *durable* image holds what is guaranteed on media.
//! `flush` snapshots the flushed lines into the calling thread's pending set
//! and `fence` moves that thread's snapshots into the durable image; a fence
//! on another thread does nothing for them, as on real hardware. A crash
//! image is the durable image plus, for every aligned 8-byte word that may
//! have reached media, an independent random choice between the durable
//! value and the newer ones: the volatile value, or any value the word held
//! since it was last durable that the simulator saw (every snapshot a flush
//! took, including ones a later flush of the same line replaced, and what a
//! `copy_flush` or `zero_flush` overwrote), since a line can be written
//! back with any of them before the fence.
//!
//! Crash images are built by comparing the whole volatile image with the
//! durable one, so stores the simulator never saw (the kernel `recv`-ing
//! into the mapping, stores through `slice_mut` without a flush) are covered
//! too: they are "maybe on media" until flushed and fenced.
//!
//! [`enumerate`] drives it: it runs a workload once and, at each
//! persistence point, hands crash images to a check. Everything is derived
//! from a seed, and a failure names the seed and point that replay it.

use crate::{PersistMode, PmemRegion, LINE};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::panic::AssertUnwindSafe;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::thread::ThreadId;

const WORDS_PER_LINE: usize = LINE / 8;

/// Called at every persistence point, before it takes effect, with the
/// point's index. See [`SimRegion::set_hook`].
pub type Hook = Box<dyn FnMut(&SimRegion, u64) + Send>;

/// A line as it was when a thread flushed it.
#[derive(Clone, Copy)]
struct Snap {
    /// Global flush order: a fence only overwrites a durable line with a
    /// newer snapshot, since write-backs of one line reach media in order.
    seq: u64,
    words: [u64; WORDS_PER_LINE],
}

/// Line numbers are dense small integers; SipHash would dominate flushes.
#[derive(Default)]
struct LineHasher(u64);

impl Hasher for LineHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type LineMap = HashMap<usize, Snap, BuildHasherDefault<LineHasher>>;

struct State {
    /// What is guaranteed on media; padded to whole lines.
    durable: Vec<u8>,
    /// Seq of the snapshot that last made each line durable.
    line_seq: Vec<u64>,
    next_seq: u64,
    /// Flushed-but-unfenced lines, per thread: the newest snapshot of each.
    pending: HashMap<ThreadId, LineMap>,
    /// Per thread, values lines held since they were last durable that a
    /// newer snapshot replaced in `pending`: they may have landed too, and a
    /// fence makes them moot.
    older: HashMap<ThreadId, Vec<(usize, Snap)>>,
}

struct HookSlot {
    hook: Option<Hook>,
    /// Bumped by every `set_hook`, so a hook replaced while it runs is not
    /// put back afterwards.
    generation: u64,
}

/// The simulated region (mode [`PersistMode::Simulated`]).
pub struct SimRegion {
    len: usize,
    /// `len` rounded up to whole lines (at least one).
    padded: usize,
    /// The volatile image: page-aligned, never moves. It points into
    /// `volatile_buf`.
    volatile: NonNull<u8>,
    /// Storage of the volatile image, over-allocated by a page so the image
    /// can start on a page boundary. Only touched again by drop.
    volatile_buf: Vec<u8>,
    state: Mutex<State>,
    points: AtomicU64,
    fences: crate::counter::Counters<1>,
    hook: Mutex<HookSlot>,
    has_hook: AtomicBool,
    /// The thread running the hook, whose own persistence points skip it.
    hook_owner: Mutex<Option<ThreadId>>,
    /// Serialises hooked persistence points, so each crash image is taken
    /// with no other point half-applied and indices follow execution order.
    point_lock: Mutex<()>,
    /// What [`PmemRegion::mode`] says (see [`SimRegion::reporting`]).
    reported: PersistMode,
}

// SAFETY: the volatile image is heap memory owned by this value (in
// `volatile_buf`) until drop; the raw pointer is only its address. All other state is behind mutexes or
// atomics. Concurrent access to the bytes follows the `PmemRegion` contracts.
unsafe impl Send for SimRegion {}
// SAFETY: as above.
unsafe impl Sync for SimRegion {}

impl fmt::Debug for SimRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimRegion")
            .field("len", &self.len)
            .field("points", &self.persist_points())
            .field("fences", &self.fences())
            .finish_non_exhaustive()
    }
}

impl SimRegion {
    /// A zeroed region of `len` bytes (volatile = durable = zeroes).
    pub fn new(len: usize) -> Self {
        Self::build(len, None)
    }

    fn build(len: usize, image: Option<&[u8]>) -> Self {
        const PAGE: usize = 4096;
        let padded = len.div_ceil(LINE).max(1) * LINE;
        let img = image.unwrap_or(&[]);
        // Each buffer is written once: image bytes, then zero padding.
        let mut volatile_buf = pool::take(padded + PAGE);
        let start = volatile_buf.as_ptr().align_offset(PAGE);
        assert!(start < PAGE, "cannot align the simulated region");
        volatile_buf.resize(start, 0);
        volatile_buf.extend_from_slice(img);
        volatile_buf.resize(padded + PAGE, 0);
        let volatile = NonNull::new(volatile_buf.as_mut_ptr().wrapping_add(start))
            .expect("Vec pointer is non-null");
        let mut durable = pool::take_copy(img);
        durable.resize(padded, 0);
        SimRegion {
            len,
            padded,
            volatile,
            volatile_buf,
            state: Mutex::new(State {
                durable,
                line_seq: vec![0; padded / LINE],
                next_seq: 1,
                pending: HashMap::new(),
                older: HashMap::new(),
            }),
            points: AtomicU64::new(0),
            fences: Default::default(),
            hook: Mutex::new(HookSlot {
                hook: None,
                generation: 0,
            }),
            has_hook: AtomicBool::new(false),
            reported: PersistMode::Simulated,
            hook_owner: Mutex::new(None),
            point_lock: Mutex::new(()),
        }
    }

    /// A region whose media holds `image` (as after a crash): volatile and
    /// durable both start as `image`. This is how a test "reboots".
    pub fn from_image(image: &[u8]) -> Self {
        Self::build(image.len(), Some(image))
    }

    /// Says it persists in `mode` (the simulation is unchanged), so that
    /// the engine takes the paths it takes on such a region: with
    /// [`PersistMode::Msync`], those of a cache file on a disk.
    pub fn reporting(mut self, mode: PersistMode) -> Self {
        self.reported = mode;
        self
    }

    /// Installs (or with `None` removes) the persistence-point hook.
    ///
    /// The hook runs on the thread that reached the point, before the point
    /// takes effect, while other hooked points wait. It is taken out of the
    /// region while it runs, so it may call [`crash_image`](Self::crash_image)
    /// or `set_hook`; persistence points it causes itself on this region do
    /// not re-enter it.
    pub fn set_hook(&self, hook: Option<Hook>) {
        let mut slot = self.hook.lock();
        slot.generation += 1;
        self.has_hook.store(hook.is_some(), Ordering::Release);
        slot.hook = hook;
    }

    /// Persistence points (flushes and fences, including those inside
    /// `copy_flush`/`zero_flush`/`persist`) so far: the next point's index.
    pub fn persist_points(&self) -> u64 {
        self.points.load(Ordering::Relaxed)
    }

    /// What is guaranteed on media right now.
    pub fn durable_image(&self) -> Vec<u8> {
        let st = self.state.lock();
        st.durable[..self.len].to_vec()
    }

    /// What the program sees right now.
    pub fn volatile_image(&self) -> Vec<u8> {
        (0..self.len)
            .step_by(8)
            .flat_map(|off| self.vword(off / 8).to_ne_bytes())
            .take(self.len)
            .collect()
    }

    /// One random image power loss could leave right now.
    pub fn crash_image(&self, rng: &mut impl Rng) -> Vec<u8> {
        self.crash_state().image(rng)
    }

    /// Everything power loss could leave right now, from which any number
    /// of images can be drawn without comparing the images again.
    pub fn crash_state(&self) -> CrashState {
        let st = self.state.lock();
        // Snapshots that could still land (newer than the durable line),
        // in line order so one pass over the image merges them in.
        let newest = st.pending.values().flat_map(|m| m.iter());
        let older = st
            .older
            .values()
            .flat_map(|v| v.iter().map(|(l, s)| (l, s)));
        let mut snaps: Vec<(usize, &[u64; WORDS_PER_LINE])> = newest
            .chain(older)
            .filter(|(&line, snap)| snap.seq > st.line_seq[line])
            .map(|(&line, snap)| (line, &snap.words))
            .collect();
        snaps.sort_unstable_by_key(|&(line, _)| line);
        let mut alts: Vec<(usize, u64)> = Vec::new();
        let mut next_snap = 0;
        for (line, dur) in st.durable.chunks_exact(LINE).enumerate() {
            let mut vol = [0u64; WORDS_PER_LINE];
            let mut diff = 0;
            for (j, v) in vol.iter_mut().enumerate() {
                *v = self.vword(line * WORDS_PER_LINE + j);
                diff |= *v ^ word_at(dur, j);
            }
            let first_snap = next_snap;
            while next_snap < snaps.len() && snaps[next_snap].0 == line {
                next_snap += 1;
            }
            if diff == 0 && first_snap == next_snap {
                continue;
            }
            for (j, &v) in vol.iter().enumerate() {
                let w = line * WORDS_PER_LINE + j;
                let d = word_at(dur, j);
                let word_start = alts.len();
                if v != d {
                    alts.push((w, v));
                }
                for (_, words) in &snaps[first_snap..next_snap] {
                    let s = words[j];
                    if s != d && !alts[word_start..].iter().any(|&(_, a)| a == s) {
                        alts.push((w, s));
                    }
                }
            }
        }
        CrashState {
            len: self.len,
            durable: pool::take_copy(&st.durable),
            alts,
        }
    }

    /// Word `w` of the volatile image, read atomically because other
    /// threads (or the kernel) may be storing to it.
    fn vword(&self, w: usize) -> u64 {
        debug_assert!(w < self.padded / 8);
        // SAFETY: `w * 8 + 8 <= padded`, the image is 8-aligned and lives as
        // long as `self`; atomic loads tolerate concurrent stores.
        unsafe {
            AtomicU64::from_ptr(self.volatile.as_ptr().add(w * 8).cast()).load(Ordering::Relaxed)
        }
    }

    fn check_range(&self, off: usize, len: usize) {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len),
            "pmem range [{off}, +{len}) out of bounds (len {})",
            self.len
        );
    }

    /// Runs the hook for a persistence point, then `effect`, under the point
    /// lock when hooked.
    fn point<R>(&self, effect: impl FnOnce() -> R) -> R {
        if !self.has_hook.load(Ordering::Acquire) {
            self.points.fetch_add(1, Ordering::Relaxed);
            return effect();
        }
        let me = std::thread::current().id();
        if *self.hook_owner.lock() == Some(me) {
            self.points.fetch_add(1, Ordering::Relaxed);
            return effect();
        }
        let _serial = self.point_lock.lock();
        let index = self.points.fetch_add(1, Ordering::Relaxed);
        let (hook, generation) = {
            let mut slot = self.hook.lock();
            (slot.hook.take(), slot.generation)
        };
        if hook.is_some() {
            *self.hook_owner.lock() = Some(me);
            let mut guard = HookGuard {
                region: self,
                hook,
                generation,
            };
            if let Some(h) = guard.hook.as_mut() {
                h(self, index);
            }
        }
        effect()
    }

    /// Snapshots every line overlapping `[off, off + len)` into this
    /// thread's pending set. A line's earlier pending snapshot with other
    /// content moves to `older`: it may have been written back already.
    fn snapshot(&self, off: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = off / LINE;
        let last = (off + len - 1) / LINE;
        let mut st = self.state.lock();
        let seq = st.next_seq;
        st.next_seq += 1;
        let me = std::thread::current().id();
        let map = st.pending.entry(me).or_default();
        map.reserve(last + 1 - first);
        let mut replaced = Vec::new();
        for line in first..=last {
            let mut words = [0u64; WORDS_PER_LINE];
            for (j, w) in words.iter_mut().enumerate() {
                *w = self.vword(line * WORDS_PER_LINE + j);
            }
            if let Some(old) = map.insert(line, Snap { seq, words }) {
                if old.words != words {
                    replaced.push((line, old));
                }
            }
        }
        if !replaced.is_empty() {
            st.older.entry(me).or_default().extend(replaced);
        }
    }

    /// Records what `[off, off + len)` holds now, before a store through
    /// the region overwrites it: lines that differ from media may already
    /// have been written back with this content.
    fn note_overwritten(&self, off: usize, len: usize) {
        if len == 0 {
            return;
        }
        let mut st = self.state.lock();
        let seq = st.next_seq;
        st.next_seq += 1;
        let mut seen = Vec::new();
        for line in off / LINE..=(off + len - 1) / LINE {
            let mut words = [0u64; WORDS_PER_LINE];
            let mut differs = false;
            for (j, w) in words.iter_mut().enumerate() {
                *w = self.vword(line * WORDS_PER_LINE + j);
                differs |= *w != word_at(&st.durable[line * LINE..], j);
            }
            if differs {
                seen.push((line, Snap { seq, words }));
            }
        }
        if !seen.is_empty() {
            st.older
                .entry(std::thread::current().id())
                .or_default()
                .extend(seen);
        }
    }

    fn fence_thread(&self) {
        let mut st = self.state.lock();
        let me = std::thread::current().id();
        st.older.remove(&me);
        let Some(map) = st.pending.remove(&me) else {
            return;
        };
        for (line, snap) in map {
            if snap.seq > st.line_seq[line] {
                st.line_seq[line] = snap.seq;
                for (j, w) in snap.words.iter().enumerate() {
                    let at = line * LINE + j * 8;
                    st.durable[at..at + 8].copy_from_slice(&w.to_ne_bytes());
                }
            }
        }
    }
}

/// Puts the hook back after it ran (even if it panicked), unless it was
/// replaced meanwhile.
struct HookGuard<'a> {
    region: &'a SimRegion,
    hook: Option<Hook>,
    generation: u64,
}

impl Drop for HookGuard<'_> {
    fn drop(&mut self) {
        *self.region.hook_owner.lock() = None;
        let mut slot = self.region.hook.lock();
        if slot.generation == self.generation && slot.hook.is_none() {
            slot.hook = self.hook.take();
        }
    }
}

impl Drop for SimRegion {
    fn drop(&mut self) {
        // No borrow of the region (so no use of `volatile`) outlives it.
        pool::give(std::mem::take(&mut self.volatile_buf));
        pool::give(std::mem::take(&mut self.state.get_mut().durable));
    }
}

/// Recycles the big buffers (volatile and durable images, crash images).
/// Crash tests create and drop them by the million; fresh multi-MiB
/// allocations come from mmap and pay a page fault per 4 KiB on first touch
/// (about 1.5 GiB/s), several times the cost of the copy itself.
mod pool {
    use parking_lot::Mutex;

    static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    /// Smaller buffers are cheap to allocate; leave them to malloc.
    const MIN_POOLED: usize = 64 << 10;
    const MAX_POOLED_BYTES: usize = 512 << 20;

    pub(super) fn take(len: usize) -> Vec<u8> {
        if len >= MIN_POOLED {
            let mut free = FREE.lock();
            if let Some(i) = free
                .iter()
                .position(|v| v.capacity() >= len && v.capacity() / 2 <= len)
            {
                let mut v = free.swap_remove(i);
                v.clear();
                return v;
            }
        }
        Vec::with_capacity(len)
    }

    pub(super) fn take_copy(src: &[u8]) -> Vec<u8> {
        let mut v = take(src.len());
        v.extend_from_slice(src);
        v
    }

    pub(super) fn give(v: Vec<u8>) {
        if v.capacity() < MIN_POOLED {
            return;
        }
        let mut free = FREE.lock();
        let held: usize = free.iter().map(Vec::capacity).sum();
        if held + v.capacity() <= MAX_POOLED_BYTES {
            free.push(v);
        }
    }
}

fn word_at(line: &[u8], j: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&line[j * 8..j * 8 + 8]);
    u64::from_ne_bytes(b)
}

impl PmemRegion for SimRegion {
    fn len(&self) -> usize {
        self.len
    }

    fn mode(&self) -> PersistMode {
        self.reported
    }

    fn flush(&self, off: usize, len: usize) {
        self.check_range(off, len);
        self.point(|| self.snapshot(off, len));
    }

    fn fence(&self) {
        self.point(|| self.fence_thread());
        self.fences.add(0, 1);
    }

    fn as_ptr(&self) -> *mut u8 {
        self.volatile.as_ptr()
    }

    unsafe fn copy_flush(&self, off: usize, src: &[u8]) {
        self.check_range(off, src.len());
        self.point(|| {
            self.note_overwritten(off, src.len());
            // SAFETY: in bounds (checked); exclusivity is the caller's contract.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.as_ptr(),
                    self.volatile.as_ptr().add(off),
                    src.len(),
                )
            };
            self.snapshot(off, src.len());
        });
    }

    unsafe fn zero_flush(&self, off: usize, len: usize) {
        self.check_range(off, len);
        self.point(|| {
            self.note_overwritten(off, len);
            // SAFETY: in bounds (checked); exclusivity is the caller's contract.
            unsafe { std::ptr::write_bytes(self.volatile.as_ptr().add(off), 0, len) };
            self.snapshot(off, len);
        });
    }

    fn fences(&self) -> u64 {
        self.fences.get(0)
    }
}

/// Everything a crash could leave at one moment: the durable image and, per
/// word that may differ from it, the newer values it may hold.
#[derive(Clone)]
pub struct CrashState {
    len: usize,
    durable: Vec<u8>,
    /// (word index, candidate value), sorted by word.
    alts: Vec<(usize, u64)>,
}

impl fmt::Debug for CrashState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrashState")
            .field("len", &self.len)
            .field("pending_words", &self.pending_words())
            .finish_non_exhaustive()
    }
}

impl Drop for CrashState {
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.durable));
    }
}

impl CrashState {
    /// Words whose value on media is uncertain (0: every image is the
    /// durable image).
    pub fn pending_words(&self) -> usize {
        let mut n = 0;
        let mut last = usize::MAX;
        for &(w, _) in &self.alts {
            if w != last {
                n += 1;
                last = w;
            }
        }
        n
    }

    /// Whether byte offset `off` lies in a word that may differ from the
    /// durable image.
    pub fn is_pending(&self, off: usize) -> bool {
        let w = off / 8;
        self.alts.binary_search_by_key(&w, |&(x, _)| x).is_ok()
    }

    /// The guaranteed part: the image with no pending word landed.
    pub fn durable(&self) -> &[u8] {
        &self.durable[..self.len]
    }

    /// Draws one image. Each uncertain word independently keeps its durable
    /// value or takes one of its newer values. The chance of "newer" is
    /// drawn per image (1/2 usually, sometimes 1/16 or 15/16), so both
    /// "almost nothing landed" and "all but a word or two landed" occur.
    pub fn image(&self, rng: &mut impl Rng) -> Vec<u8> {
        let mut img = pool::take_copy(&self.durable);
        // "Newer" when 1 random bit is set (1/2), when 4 are all set
        // (1/16), or when any of 4 is set (15/16): a u64 of randomness
        // decides 16 to 64 words.
        match rng.gen_range(0..4u32) {
            0 => self.land(&mut img, rng, 4, |b| b == 0xF),
            1 => self.land(&mut img, rng, 4, |b| b != 0),
            _ => self.land(&mut img, rng, 1, |b| b == 1),
        }
        img.truncate(self.len);
        img
    }

    /// Decides every uncertain word of `img`, branch-free for the common
    /// case of one newer value (a coin flip per word would mispredict half
    /// the time).
    #[inline(always)]
    fn land<R: Rng + ?Sized>(
        &self,
        img: &mut [u8],
        rng: &mut R,
        bits: u32,
        newer: impl Fn(u64) -> bool,
    ) {
        let mask = (1u64 << bits) - 1;
        let (mut random, mut left) = (0u64, 0u32);
        let mut i = 0;
        while i < self.alts.len() {
            let (w, alt) = self.alts[i];
            let mut j = i + 1;
            while j < self.alts.len() && self.alts[j].0 == w {
                j += 1;
            }
            if left < bits {
                random = rng.next_u64();
                left = 64;
            }
            let take = newer(random & mask);
            random >>= bits;
            left -= bits;
            let v = if j - i == 1 {
                let m = u64::from(take).wrapping_neg();
                (alt & m) | (word_at(&self.durable, w) & !m)
            } else if take {
                self.alts[rng.gen_range(i..j)].1
            } else {
                word_at(&self.durable, w)
            };
            img[w * 8..w * 8 + 8].copy_from_slice(&v.to_ne_bytes());
            i = j;
        }
    }
}

/// One simulated crash, as handed to a check.
#[derive(Clone, PartialEq, Eq)]
pub struct CrashImage {
    /// What media holds after the crash.
    pub bytes: Vec<u8>,
    /// The persistence point the crash happened at (before it took effect);
    /// the point after the workload's last one means "after it finished".
    pub point: u64,
    /// Which image at that point.
    pub index: usize,
    /// The enumeration's seed.
    pub seed: u64,
}

impl fmt::Debug for CrashImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrashImage")
            .field("len", &self.bytes.len())
            .field("point", &self.point)
            .field("index", &self.index)
            .field("seed", &self.seed)
            .finish()
    }
}

impl CrashImage {
    /// A seed for an enumeration nested inside this image's check (crash
    /// during recovery): deterministic, so replaying this image replays the
    /// nested run too.
    pub fn child_seed(&self) -> u64 {
        mix(
            mix(self.seed ^ 0xC4A5_11DE_5EED_0001, self.point),
            self.index as u64,
        )
    }
}

/// How [`enumerate`] picks crash points and images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashConfig {
    /// Root of every random choice; the same seed and workload give the
    /// same images.
    pub seed: u64,
    /// Images drawn at each crash point (one when nothing is uncertain
    /// there, since every image would be the same).
    pub images_per_point: usize,
    /// Crash only at every `stride`-th point (offset derived from the seed,
    /// so different seeds cover different points).
    pub stride: u64,
    /// Stop crashing after this many crash points (the workload still runs
    /// to its end).
    pub max_points: Option<u64>,
    /// Check only this (point, image index): replay of one failure.
    pub only: Option<(u64, usize)>,
    /// Stop crashing once this many violations were found.
    pub max_violations: usize,
}

impl CrashConfig {
    /// Every point, 4 images per point, stop at the first violation.
    pub fn new(seed: u64) -> Self {
        CrashConfig {
            seed,
            images_per_point: 4,
            stride: 1,
            max_points: None,
            only: None,
            max_violations: 1,
        }
    }

    /// [`new`](Self::new) with `default_seed`, unless the environment says
    /// otherwise: `PMCACHE_SEED=<n>` (decimal or 0x-hex) sets the seed and
    /// `PMCACHE_POINT=<point>[:<index>]` restricts to one point or image.
    /// Use it at the top level of a test; nested runs use
    /// [`CrashImage::child_seed`]. Panics on a malformed value, since a
    /// replay that silently ran something else would mislead.
    pub fn from_env(default_seed: u64) -> Self {
        Self::from_lookup(default_seed, |k| std::env::var(k).ok())
    }

    fn from_lookup(default_seed: u64, var: impl Fn(&str) -> Option<String>) -> Self {
        let mut cfg = CrashConfig::new(default_seed);
        if let Some(s) = var("PMCACHE_SEED") {
            cfg.seed =
                parse_u64(&s).unwrap_or_else(|| panic!("PMCACHE_SEED={s:?} is not a number"));
        }
        if let Some(s) = var("PMCACHE_POINT") {
            let parsed = match s.split_once(':') {
                Some((p, i)) => {
                    parse_u64(p).zip(parse_u64(i).and_then(|i| usize::try_from(i).ok()))
                }
                None => parse_u64(&s).map(|p| (p, usize::MAX)),
            };
            let (p, i) =
                parsed.unwrap_or_else(|| panic!("PMCACHE_POINT={s:?} is not <point>[:<index>]"));
            cfg.only = Some((p, i));
        }
        cfg
    }

    /// See [`CrashConfig::images_per_point`].
    pub fn images_per_point(mut self, n: usize) -> Self {
        self.images_per_point = n.max(1);
        self
    }

    /// See [`CrashConfig::stride`].
    pub fn stride(mut self, n: u64) -> Self {
        self.stride = n.max(1);
        self
    }

    /// See [`CrashConfig::max_points`].
    pub fn max_points(mut self, n: Option<u64>) -> Self {
        self.max_points = n;
        self
    }

    /// See [`CrashConfig::only`]; `index == usize::MAX` means every image
    /// at that point.
    pub fn only(mut self, point: u64, index: usize) -> Self {
        self.only = Some((point, index));
        self
    }

    /// See [`CrashConfig::max_violations`].
    pub fn max_violations(mut self, n: usize) -> Self {
        self.max_violations = n.max(1);
        self
    }

    fn wants_point(&self, point: u64) -> bool {
        match self.only {
            Some((p, _)) => p == point,
            None => point % self.stride == self.seed % self.stride,
        }
    }

    fn wants_index(&self, index: usize) -> bool {
        match self.only {
            Some((_, i)) => i == usize::MAX || i == index,
            None => true,
        }
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A check that failed on one crash image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub seed: u64,
    pub point: u64,
    pub image_index: usize,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "crash at seed {} point {} image {}: {} (replay: PMCACHE_SEED={} PMCACHE_POINT={}:{})",
            self.seed,
            self.point,
            self.image_index,
            self.message,
            self.seed,
            self.point,
            self.image_index
        )
    }
}

/// What an enumeration did and found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashReport {
    pub seed: u64,
    /// Persistence points the workload went through.
    pub points: u64,
    /// Points at which crashes were simulated (including the final one).
    pub crash_points: u64,
    /// Crash images checked.
    pub images: u64,
    pub violations: Vec<Violation>,
}

impl CrashReport {
    /// No violation found.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// `Err` with every violation (seed and point included) if any; handy
    /// as the return value of an outer check when enumerations nest.
    pub fn into_result(self) -> Result<CrashReport, String> {
        if self.is_ok() {
            Ok(self)
        } else {
            Err(self.to_string())
        }
    }
}

impl fmt::Display for CrashReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: {} persistence points, {} crash points, {} images, {} violations",
            self.seed,
            self.points,
            self.crash_points,
            self.images,
            self.violations.len()
        )?;
        for v in &self.violations {
            write!(f, "\n  {v}")?;
        }
        Ok(())
    }
}

/// splitmix64 finaliser over `a` and `b`: the per-image RNG seed must not
/// correlate with neighbouring points or indices.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x6A09_E667_F3BC_C909);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The RNG for image `index` at `point` of a run seeded `seed`.
pub fn image_rng(seed: u64, point: u64, index: usize) -> SmallRng {
    SmallRng::seed_from_u64(mix(mix(seed, point), index as u64))
}

/// Runs `workload` once on `region` and checks crash images at its
/// persistence points (and once more after it returns).
///
/// The workload runs on its own (scoped) thread and is paused inside each
/// persistence point while `check` runs on the caller's thread, so `check`
/// may read state the workload shares (e.g. a `Mutex` of what was
/// acknowledged) and may itself reopen `SimRegion::from_image(&img.bytes)`
/// and call `enumerate` again to crash the recovery. A panic in `check` is
/// caught and reported as a violation; a panic in the workload propagates.
///
/// `check` must not cause persistence points on the region under test (the
/// workload is paused inside one). Values a word held only in between (a
/// store overwritten before the crash, or an older flush of a line flushed
/// again) are not offered: each word lands as durable, latest snapshot or
/// latest volatile value.
///
/// Crash images are a pure function of (seed, point, index) given the same
/// workload, so a violation is replayed by running the same test with
/// `PMCACHE_SEED`/`PMCACHE_POINT` set (see [`CrashConfig::from_env`]) or by
/// [`replay`].
pub fn enumerate<W, C>(
    cfg: &CrashConfig,
    region: SimRegion,
    workload: W,
    mut check: C,
) -> CrashReport
where
    W: FnOnce(&Arc<SimRegion>) + Send,
    C: FnMut(&CrashImage) -> Result<(), String>,
{
    let region = Arc::new(region);
    let mut report = CrashReport {
        seed: cfg.seed,
        points: 0,
        crash_points: 0,
        images: 0,
        violations: Vec::new(),
    };

    // Rendezvous channels: the hook sends the point and waits for the
    // verdict "keep crashing?".
    let (point_tx, point_rx) = sync_channel::<u64>(0);
    let (go_tx, go_rx) = sync_channel::<bool>(0);
    let hook_cfg = cfg.clone();
    let mut sent = 0u64;
    let mut stopped = false;
    region.set_hook(Some(Box::new(move |_, point| {
        if stopped || !hook_cfg.wants_point(point) {
            return;
        }
        if hook_cfg.max_points.is_some_and(|m| sent >= m) || point_tx.send(point).is_err() {
            stopped = true;
            return;
        }
        sent += 1;
        stopped = !go_rx.recv().unwrap_or(false);
    })));

    std::thread::scope(|scope| {
        let worker_region = Arc::clone(&region);
        let worker = scope.spawn(move || {
            // Unhooking drops the hook's sender, which ends the loop below,
            // also when the workload panics.
            struct Unhook(Arc<SimRegion>);
            impl Drop for Unhook {
                fn drop(&mut self) {
                    self.0.set_hook(None);
                }
            }
            let unhook = Unhook(worker_region);
            workload(&unhook.0);
        });
        while let Ok(point) = point_rx.recv() {
            crash_at(cfg, &region, point, &mut check, &mut report);
            let more = report.violations.len() < cfg.max_violations;
            if go_tx.send(more).is_err() {
                break;
            }
        }
        if let Err(panic) = worker.join() {
            std::panic::resume_unwind(panic);
        }
    });

    report.points = region.persist_points();
    let final_point = report.points;
    if report.violations.len() < cfg.max_violations
        && (cfg.only.is_none_or(|(p, _)| p == final_point))
        && cfg.max_points.is_none_or(|m| report.crash_points < m)
    {
        crash_at(cfg, &region, final_point, &mut check, &mut report);
    }
    report
}

fn crash_at<C>(
    cfg: &CrashConfig,
    region: &SimRegion,
    point: u64,
    check: &mut C,
    report: &mut CrashReport,
) where
    C: FnMut(&CrashImage) -> Result<(), String>,
{
    report.crash_points += 1;
    let state = region.crash_state();
    let images = if state.alts.is_empty() && cfg.only.is_none() {
        1
    } else {
        cfg.images_per_point
    };
    for index in (0..images).filter(|&i| cfg.wants_index(i)) {
        if report.violations.len() >= cfg.max_violations {
            return;
        }
        let bytes = state.image(&mut image_rng(cfg.seed, point, index));
        let img = CrashImage {
            bytes,
            point,
            index,
            seed: cfg.seed,
        };
        report.images += 1;
        let verdict = match std::panic::catch_unwind(AssertUnwindSafe(|| check(&img))) {
            Ok(v) => v,
            Err(panic) => Err(format!("check panicked: {}", panic_message(&*panic))),
        };
        if let Err(message) = verdict {
            report.violations.push(Violation {
                seed: cfg.seed,
                point,
                image_index: index,
                message,
            });
        }
        pool::give(img.bytes);
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Re-runs one reported crash: the workload again (on a fresh `region`
/// built as before), and `check` on image `index` at `point` only, exactly
/// as the enumeration seeded `seed` produced it. The report's `images` is 0
/// if the workload never reached `point`.
pub fn replay<W, C>(
    seed: u64,
    point: u64,
    index: usize,
    region: SimRegion,
    workload: W,
    check: C,
) -> CrashReport
where
    W: FnOnce(&Arc<SimRegion>) + Send,
    C: FnMut(&CrashImage) -> Result<(), String>,
{
    let cfg = CrashConfig::new(seed)
        .only(point, index)
        .images_per_point(index.saturating_add(1));
    enumerate(&cfg, region, workload, check)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_without_fence_is_not_durable_and_fence_makes_it_so() {
        let r = SimRegion::new(256);
        r.word(64).store(7, Ordering::Relaxed);
        r.flush(64, 8);
        assert_eq!(&r.durable_image()[64..72], &[0; 8]);
        let st = r.crash_state();
        assert_eq!(st.pending_words(), 1);
        assert!(st.is_pending(64) && !st.is_pending(72));
        r.fence();
        assert_eq!(r.durable_image()[64..72], 7u64.to_ne_bytes());
        assert_eq!(r.crash_state().pending_words(), 0);
        assert_eq!(r.fences(), 1);
        assert_eq!(r.persist_points(), 2);
    }

    /// A word flushed as 1, then stored and flushed as 2 and 3 before the
    /// fence, may land as any of them (or stay 0); after the fence only 3.
    #[test]
    fn every_value_since_the_last_fence_may_land() {
        let r = SimRegion::new(64);
        for v in 1..=3u64 {
            r.word(8).store(v, Ordering::Relaxed);
            r.flush(8, 8);
        }
        let st = r.crash_state();
        let mut rng = image_rng(2, 0, 0);
        let seen: std::collections::HashSet<u8> = (0..400).map(|_| st.image(&mut rng)[8]).collect();
        assert_eq!(seen, [0u8, 1, 2, 3].into_iter().collect());
        r.fence();
        assert_eq!(r.crash_state().pending_words(), 0);
        assert_eq!(r.durable_image()[8], 3);
    }

    /// What a `copy_flush` overwrote may have reached media before it: a
    /// store that was never flushed is uncertain until the fence.
    #[test]
    fn an_overwritten_unflushed_value_may_land() {
        let r = SimRegion::new(64);
        r.word(16).store(9, Ordering::Relaxed);
        // SAFETY: single-threaded test, in bounds.
        unsafe { r.copy_flush(16, &4u64.to_ne_bytes()) };
        let st = r.crash_state();
        let mut rng = image_rng(3, 0, 0);
        let seen: std::collections::HashSet<u8> =
            (0..400).map(|_| st.image(&mut rng)[16]).collect();
        assert_eq!(seen, [0u8, 4, 9].into_iter().collect());
        r.fence();
        assert_eq!(r.crash_state().pending_words(), 0);
    }

    #[test]
    fn flushed_then_reverted_word_is_still_uncertain() {
        let r = SimRegion::new(64);
        r.word(0).store(5, Ordering::Relaxed);
        r.flush(0, 8);
        r.word(0).store(0, Ordering::Relaxed);
        // Volatile == durable, but the write-back of 5 may be in flight.
        let st = r.crash_state();
        assert_eq!(st.pending_words(), 1);
        let mut rng = image_rng(1, 0, 0);
        let seen: std::collections::HashSet<u8> = (0..200).map(|_| st.image(&mut rng)[0]).collect();
        assert_eq!(seen, [0u8, 5].into_iter().collect());
    }

    #[test]
    fn older_snapshot_does_not_overwrite_newer_durable_line() {
        let r = Arc::new(SimRegion::new(64));
        r.word(0).store(1, Ordering::Relaxed);
        r.flush(0, 8); // this thread: snapshot 1, unfenced
        let r2 = Arc::clone(&r);
        std::thread::spawn(move || {
            r2.word(0).store(2, Ordering::Relaxed);
            r2.persist(0, 8);
        })
        .join()
        .unwrap();
        assert_eq!(r.durable_image()[..8], 2u64.to_ne_bytes());
        r.fence(); // our older write-back cannot land after the newer one
        assert_eq!(r.durable_image()[..8], 2u64.to_ne_bytes());
    }

    #[test]
    fn images_are_deterministic_per_seed_point_index() {
        let r = SimRegion::new(4096);
        // SAFETY: single-threaded test.
        unsafe { r.slice_mut(0, 4096).fill(0xEE) };
        let st = r.crash_state();
        assert_eq!(st.pending_words(), 512);
        let a = st.image(&mut image_rng(9, 3, 1));
        let b = st.image(&mut image_rng(9, 3, 1));
        let c = st.image(&mut image_rng(9, 3, 2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Words are all-or-nothing: never a torn 8-byte word.
        for w in a.chunks_exact(8) {
            assert!(w == [0; 8] || w == [0xEE; 8]);
        }
    }

    #[test]
    fn hook_sees_state_before_the_point_and_is_not_reentered() {
        let r = SimRegion::new(128);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = Arc::clone(&seen);
        r.set_hook(Some(Box::new(move |reg: &SimRegion, idx| {
            // A flush inside the hook must not recurse into the hook.
            reg.flush(64, 8);
            s2.lock().push((idx, reg.durable_image()[0]));
        })));
        r.word(0).store(9, Ordering::Relaxed);
        r.persist(0, 8);
        r.set_hook(None);
        r.fence();
        // Point 0 (flush) and point 2 (fence; point 1 was the hook's own
        // flush): both saw the durable byte before the fence took effect.
        assert_eq!(*seen.lock(), vec![(0, 0), (2, 0)]);
        assert_eq!(r.durable_image()[0], 9);
        assert_eq!(r.persist_points(), 5);
    }

    #[test]
    fn unaligned_lengths_work() {
        let r = SimRegion::from_image(&[1, 2, 3, 4, 5]);
        assert_eq!(r.len(), 5);
        assert_eq!(r.durable_image(), vec![1, 2, 3, 4, 5]);
        assert_eq!(r.volatile_image(), vec![1, 2, 3, 4, 5]);
        // SAFETY: single-threaded test.
        unsafe { r.copy_flush(3, &[9, 9]) };
        r.fence();
        assert_eq!(r.durable_image(), vec![1, 2, 3, 9, 9]);
        assert_eq!(r.crash_image(&mut image_rng(0, 0, 0)).len(), 5);
    }

    #[test]
    fn env_parsing() {
        assert_eq!(parse_u64("0x10"), Some(16));
        assert_eq!(parse_u64(" 42 "), Some(42));
        assert_eq!(parse_u64("x"), None);
        let env = |seed: Option<&'static str>, point: Option<&'static str>| {
            move |k: &str| match k {
                "PMCACHE_SEED" => seed.map(String::from),
                "PMCACHE_POINT" => point.map(String::from),
                _ => None,
            }
        };
        assert_eq!(
            CrashConfig::from_lookup(5, env(None, None)),
            CrashConfig::new(5)
        );
        let c = CrashConfig::from_lookup(5, env(Some("0x2a"), Some("17:3")));
        assert_eq!((c.seed, c.only), (42, Some((17, 3))));
        let c = CrashConfig::from_lookup(5, env(Some("7"), Some("17")));
        assert_eq!((c.seed, c.only), (7, Some((17, usize::MAX))));
        assert!(
            std::panic::catch_unwind(|| CrashConfig::from_lookup(5, env(Some("nope"), None)))
                .is_err()
        );
        assert!(
            std::panic::catch_unwind(|| CrashConfig::from_lookup(5, env(None, Some("1:x"))))
                .is_err()
        );
    }
}
