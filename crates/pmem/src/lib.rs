//! The persistent-memory layer: a byte region that survives power loss once
//! its cache lines are flushed and fenced (x86 ADR model), the real mapping of
//! a file or device, and the crash simulator that stands in for power loss.
//!
//! Everything above this crate talks to [`PmemRegion`] only, so the same
//! engine code runs on DAX pmem, on an msync'ed file and in the simulator.
//!
//! Two modules are not persistence as such, and live here because the
//! persistence primitives need them: [`hash`] (XXH3), because a slot's
//! checksum is computed in the same pass as its streaming copy to media
//! (`copy_flush_hash`), reading the source once; and [`counter`] (per-thread
//! striped counters), because the fence path counts fences and msyncs at a
//! rate where one shared atomic would be a contention point. The engine uses
//! both too, from here, so there is one implementation of each.

use std::sync::atomic::AtomicU64;

mod backing;
pub mod counter;
pub mod error;
pub mod flush;
mod group;
pub mod hash;
pub mod mapped;
pub mod sim;

pub use backing::free_bytes;
pub use error::PmemError;
pub use mapped::{MapOptions, MappedRegion};
pub use sim::{CrashImage, SimRegion};

/// Where [`PmemRegion::fence_async`] reports: `Err` says why the flushed
/// lines could not be made durable.
pub type FenceDone = Box<dyn FnOnce(Result<(), String>) + Send>;

/// Cache-line size the persistence model works in.
pub const LINE: usize = 64;

/// How stores become durable on this region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersistMode {
    /// Real DAX mapping (MAP_SYNC): cache-line flush + fence.
    Dax(flush::FlushKind),
    /// Not DAX, but the user said to treat it as pmem (`--assume-pmem`).
    AssumedPmem(flush::FlushKind),
    /// Plain shared mapping: `msync` at every fence.
    Msync,
    /// The crash simulator.
    Simulated,
    /// Mapped read-only for inspection: nothing can be stored or persisted.
    ReadOnly,
}

impl std::fmt::Display for PersistMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PersistMode::Dax(k) => write!(f, "dax ({k})"),
            PersistMode::AssumedPmem(k) => write!(f, "assumed pmem ({k})"),
            PersistMode::Msync => write!(f, "msync"),
            PersistMode::Simulated => write!(f, "simulated"),
            PersistMode::ReadOnly => write!(f, "read-only"),
        }
    }
}

/// A byte-addressable persistent region.
///
/// Durability model (contract §3): a store is durable once its line was
/// flushed by [`flush`](Self::flush) *and* the same thread then called
/// [`fence`](Self::fence). Until then every aligned 8-byte word of a dirty
/// line may or may not reach media, independently. 8-byte aligned stores are
/// failure-atomic; nothing larger is.
///
/// Offsets are byte offsets from the start of the region. Out-of-range
/// offsets panic (they are engine bugs, never user input).
pub trait PmemRegion: Send + Sync {
    /// Length in bytes.
    fn len(&self) -> usize;

    /// True when the region has zero length.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How persistence works on this region (logged and shown in stats).
    fn mode(&self) -> PersistMode;

    /// Start writing back every line overlapping `[off, off + len)`.
    /// Counts as one persistence point.
    fn flush(&self, off: usize, len: usize);

    /// Wait until every line this thread flushed is durable.
    /// Counts as one persistence point.
    fn fence(&self);

    /// [`fence`](Self::fence) without waiting for it: `done` runs, here or
    /// on another thread, once every line this thread flushed is durable,
    /// or with the reason it cannot be. Where a fence is a CPU instruction
    /// it runs here and now; where it is a system call (msync), the calling
    /// thread goes on while the call is made.
    fn fence_async(&self, done: FenceDone) {
        self.fence();
        done(Ok(()));
    }

    /// [`fence_async`](Self::fence_async) for a caller with nothing else to
    /// do: where no other fence's system call is running or waiting, the
    /// call is made here (and `done` runs before the return), which costs
    /// less than waking the thread that would make it.
    fn fence_async_idle(&self, done: FenceDone) {
        self.fence_async(done);
    }

    /// `flush` then `fence`.
    fn persist(&self, off: usize, len: usize) {
        self.flush(off, len);
        self.fence();
    }

    /// Base pointer of the mapping. Stays valid and fixed for the region's life.
    fn as_ptr(&self) -> *mut u8;

    /// Copy `src` to `off` and leave the range flushed (a fence is still
    /// needed). Uses non-temporal stores above the measured threshold.
    ///
    /// # Safety
    /// No other thread may access `[off, off + src.len())` concurrently.
    unsafe fn copy_flush(&self, off: usize, src: &[u8]);

    /// [`copy_flush`](Self::copy_flush) with streaming stores at any size
    /// where the mode has them. For a small record that fills whole lines
    /// (a slot entry), this spares the read-for-ownership of a cold line,
    /// which a temporal store and its flush would wait for.
    ///
    /// # Safety
    /// As [`copy_flush`](Self::copy_flush).
    unsafe fn copy_flush_nt(&self, off: usize, src: &[u8]) {
        // SAFETY: forwarded from the caller.
        unsafe { self.copy_flush(off, src) }
    }

    /// [`copy_flush`](Self::copy_flush), returning [`hash::xxh3_64`] of
    /// `src`. Regions with streaming stores override it to hash while
    /// copying, reading `src` once. Only for slot data, whose words nobody
    /// trusts before a fence made them durable: an msync-mode region may
    /// write it with a system call, which does not keep 8-byte stores
    /// failure-atomic.
    ///
    /// # Safety
    /// As [`copy_flush`](Self::copy_flush).
    unsafe fn copy_flush_hash(&self, off: usize, src: &[u8]) -> u64 {
        // SAFETY: forwarded from the caller.
        unsafe { self.copy_flush(off, src) };
        hash::xxh3_64(src)
    }

    /// Zero `[off, off + len)` and leave it flushed (a fence is still needed).
    ///
    /// # Safety
    /// No other thread may access the range concurrently.
    unsafe fn zero_flush(&self, off: usize, len: usize);

    /// The bytes at `[off, off + len)`.
    ///
    /// # Safety
    /// No thread may write the range while the slice lives.
    unsafe fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len()),
            "pmem range out of bounds"
        );
        // SAFETY: in bounds (checked above); the caller guarantees no concurrent writer.
        unsafe { std::slice::from_raw_parts(self.as_ptr().add(off), len) }
    }

    /// The bytes at `[off, off + len)`, writable (e.g. as a `recv` target).
    ///
    /// # Safety
    /// No other thread may access the range while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len()),
            "pmem range out of bounds"
        );
        // SAFETY: in bounds (checked above); the caller guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr().add(off), len) }
    }

    /// The aligned 8-byte word at `off`, for failure-atomic metadata stores.
    fn word(&self, off: usize) -> &AtomicU64 {
        assert!(
            off.is_multiple_of(8) && off + 8 <= self.len(),
            "pmem word {off} misaligned or out of bounds"
        );
        // SAFETY: in bounds and 8-aligned (the mapping base is page-aligned);
        // AtomicU64 permits shared concurrent access.
        unsafe { &*(self.as_ptr().add(off) as *const AtomicU64) }
    }

    /// Store `v` into the word at `off` and leave it flushed (a fence is
    /// still needed). Regions with streaming stores use one, which spares
    /// the read-for-ownership of a cold line (a FREE state word).
    fn store_word_flush(&self, off: usize, v: u64) {
        self.word(off).store(v, std::sync::atomic::Ordering::SeqCst);
        self.flush(off, 8);
    }

    /// Number of fences issued so far (statistics: fences per write).
    fn fences(&self) -> u64;
}
