//! The real region: a file or block device mapped shared into memory.
//!
//! Where the kernel grants `MAP_SYNC` (DAX on real pmem) the page tables
//! point straight at media, so CPU flushes + a fence persist data. Anywhere
//! else the page cache sits in between and only `msync` persists, unless the
//! user vouches that the memory is pmem anyway (`assume_pmem`, how a
//! /dev/shm file stands in for pmem in tests and benchmarks).

use crate::backing;
use crate::error::PmemError;
use crate::flush::{self, FlushKind};
use crate::group::GroupCommit;
use crate::{hash, PersistMode, PmemRegion, LINE};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::ThreadId;

/// The smallest region that can be mapped (one page; mmap refuses 0 bytes).
pub const MIN_LEN: u64 = 4096;

/// How to open a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapOptions {
    /// Treat a non-DAX mapping as pmem (flush + fence instead of msync).
    pub assume_pmem: bool,
    /// Fault every page in at open, so the first write to a page does not
    /// pay a page fault (first-touch faults run ~1.5 GiB/s against ~19 GiB/s
    /// for memcpy into mapped pages). Ignored in msync mode (see `map`).
    pub prefault: bool,
    /// For `open`: create the file with this length if it is missing, and
    /// require this length if it exists.
    pub create_len: Option<u64>,
    /// For `open`: require exactly this length.
    pub expect_len: Option<u64>,
    /// Take an exclusive `flock` for the region's lifetime, so a second
    /// process fails with [`PmemError::Locked`] instead of corrupting it.
    pub lock: bool,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            assume_pmem: false,
            prefault: true,
            create_len: None,
            expect_len: None,
            lock: false,
        }
    }
}

impl MapOptions {
    /// Defaults: no assume-pmem, prefault on, no create, no size check, no lock.
    pub fn new() -> Self {
        Self::default()
    }

    /// See [`MapOptions::assume_pmem`].
    pub fn assume_pmem(mut self, yes: bool) -> Self {
        self.assume_pmem = yes;
        self
    }

    /// See [`MapOptions::prefault`].
    pub fn prefault(mut self, yes: bool) -> Self {
        self.prefault = yes;
        self
    }

    /// See [`MapOptions::create_len`].
    pub fn create_len(mut self, len: Option<u64>) -> Self {
        self.create_len = len;
        self
    }

    /// See [`MapOptions::expect_len`].
    pub fn expect_len(mut self, len: Option<u64>) -> Self {
        self.expect_len = len;
        self
    }

    /// See [`MapOptions::lock`].
    pub fn lock(mut self, yes: bool) -> Self {
        self.lock = yes;
        self
    }
}

/// A file or block device mapped shared, implementing [`PmemRegion`].
///
/// In msync mode, `flush` only records the range for the calling thread and
/// `fence` msyncs (MS_SYNC) the pages that thread recorded; an msync failure
/// (an I/O error on the backing device) panics, since durability can no
/// longer be promised.
pub struct MappedRegion {
    path: PathBuf,
    file: File,
    base: *mut u8,
    len: usize,
    mode: PersistMode,
    fences: crate::counter::Counters<1>,
    /// Msync mode only: per thread, the hull of the byte ranges it flushed
    /// since its last fence. A fence msyncs one hull anyway (see
    /// [`crate::group`]), so nothing finer is kept: a reclaim batch stores
    /// thousands of scattered FREE words before one fence.
    dirty: Mutex<HashMap<ThreadId, (usize, usize)>>,
    /// Msync mode only: fences share their msyncs.
    group: GroupCommit,
    syncs: Arc<crate::counter::Counters<1>>,
    /// `msync(MS_SYNC)`; tests put a slow or failing device in its place.
    sync_fn: unsafe fn(*mut u8, usize) -> i32,
}

/// The persistence call of msync mode.
///
/// # Safety
/// `[p, p + len)` is a page-aligned part of a live shared mapping.
unsafe fn msync_sync(p: *mut u8, len: usize) -> i32 {
    // SAFETY: per this function's contract.
    unsafe { libc::msync(p.cast(), len, libc::MS_SYNC) }
}

// SAFETY: the mapping is plain shared memory owned by this value for its
// whole life; the raw base pointer is only an address. Every other field is
// Send + Sync. Concurrent access to the bytes is governed by the
// `PmemRegion` methods' safety contracts.
unsafe impl Send for MappedRegion {}
// SAFETY: as above.
unsafe impl Sync for MappedRegion {}

impl std::fmt::Debug for MappedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedRegion")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl MappedRegion {
    /// Opens and maps an existing file or block device (or creates a file,
    /// see [`MapOptions::create_len`]).
    pub fn open(path: impl AsRef<Path>, opts: &MapOptions) -> Result<Self, PmemError> {
        let path = path.as_ref().to_path_buf();
        let exists = match std::fs::metadata(&path) {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(PmemError::from_open(path, e)),
        };
        if !exists {
            return match opts.create_len {
                Some(len) => Self::create_inner(path, len, opts, false),
                None => Err(PmemError::NotFound { path }),
            };
        }
        let file = open_rw(&path)?;
        let actual = file_len(&path, &file)?;
        if let Some(expected) = opts.create_len.or(opts.expect_len) {
            if actual != expected {
                return Err(PmemError::WrongSize {
                    path,
                    expected,
                    actual,
                });
            }
        }
        Self::map(path, file, actual, opts)
    }

    /// Creates a file of `len` zero bytes (sparse) and maps it. Fails with
    /// [`PmemError::AlreadyExists`] if the path exists, so formatting never
    /// silently replaces a cache; callers that mean to overwrite remove the
    /// file first, or `open` a block device.
    pub fn create(path: impl AsRef<Path>, len: u64, opts: &MapOptions) -> Result<Self, PmemError> {
        Self::create_inner(path.as_ref().to_path_buf(), len, opts, true)
    }

    fn create_inner(
        path: PathBuf,
        len: u64,
        opts: &MapOptions,
        strict: bool,
    ) -> Result<Self, PmemError> {
        check_len(&path, len)?;
        let mut oo = OpenOptions::new();
        oo.read(true).write(true);
        if strict {
            oo.create_new(true);
        } else {
            oo.create(true);
        }
        let file = oo.open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => PmemError::AlreadyExists { path: path.clone() },
            _ => PmemError::from_open(path.clone(), e),
        })?;
        if !strict {
            // Lost a race with another creator: use theirs if it fits.
            let actual = file_len(&path, &file)?;
            if actual != 0 && actual != len {
                return Err(PmemError::WrongSize {
                    path,
                    expected: len,
                    actual,
                });
            }
        }
        file.set_len(len).map_err(|source| PmemError::Io {
            path: path.clone(),
            op: "set_len",
            source,
        })?;
        Self::map(path, file, len, opts)
    }

    fn map(path: PathBuf, file: File, len: u64, opts: &MapOptions) -> Result<Self, PmemError> {
        check_len(&path, len)?;
        let ulen = usize::try_from(len).map_err(|_| PmemError::TooLarge {
            path: path.clone(),
            len,
        })?;
        if opts.lock {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                return Err(match err.raw_os_error() {
                    Some(libc::EWOULDBLOCK) => PmemError::Locked { path },
                    _ => PmemError::Io {
                        path,
                        op: "flock",
                        source: err,
                    },
                });
            }
        }
        let (base, dax) = mmap_shared(&path, &file, ulen, len)?;
        let kind = FlushKind::detect();
        let mode = match (dax, opts.assume_pmem, kind) {
            (true, _, Some(k)) => PersistMode::Dax(k),
            (false, true, Some(k)) => PersistMode::AssumedPmem(k),
            _ => PersistMode::Msync,
        };
        let region = MappedRegion {
            path,
            file,
            base,
            len: ulen,
            mode,
            fences: Default::default(),
            dirty: Mutex::new(HashMap::new()),
            group: GroupCommit::default(),
            syncs: Default::default(),
            sync_fn: msync_sync,
        };
        // Not in msync mode: there a write fault on every page would dirty
        // the whole file, and the fences' msyncs then write it all out
        // (gigabytes a second in the NBD write benchmark, a tenth of the
        // writes per second). Writeback write-protects clean pages anyway,
        // so prefaulting buys nothing there.
        if opts.prefault && mode != PersistMode::Msync {
            region.prefault();
        }
        if mode == PersistMode::Msync {
            region.prepare_for_msync()?;
        }
        tracing::info!(path = %region.path.display(), len, mode = %mode, "mapped pmem region");
        Ok(region)
    }

    /// Maps an already open file `PROT_READ`, for inspecting a cache
    /// without any possibility of changing it (mode [`PersistMode::ReadOnly`]:
    /// flush and fence do nothing, stores panic, and a stray write through
    /// the pointer faults).
    pub fn map_read_only(path: impl AsRef<Path>, file: &File) -> Result<Self, PmemError> {
        let path = path.as_ref().to_path_buf();
        let len = file_len(&path, file)?;
        check_len(&path, len)?;
        let ulen = usize::try_from(len).map_err(|_| PmemError::TooLarge {
            path: path.clone(),
            len,
        })?;
        let file = file.try_clone().map_err(|source| PmemError::Io {
            path: path.clone(),
            op: "dup",
            source,
        })?;
        // SAFETY: a fresh read-only mapping chosen by the kernel of our own
        // descriptor; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ulen,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            return Err(PmemError::MapFailed { path, len, errno });
        }
        Ok(MappedRegion {
            path,
            file,
            base: p.cast(),
            len: ulen,
            mode: PersistMode::ReadOnly,
            fences: Default::default(),
            dirty: Mutex::new(HashMap::new()),
            group: GroupCommit::default(),
            syncs: Default::default(),
            sync_fn: msync_sync,
        })
    }

    fn writable(&self) {
        assert!(
            self.mode != PersistMode::ReadOnly,
            "{}: store to a read-only mapping",
            self.path.display()
        );
    }

    /// The path the region was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (for `fstat`, locks, or `fdatasync` by the caller).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Faults every page in for writing. MADV_POPULATE_WRITE does it in one
    /// call (Linux 5.14+); elsewhere touch each page.
    fn prefault(&self) {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: advice on our own live mapping; populating changes no data.
            let rc =
                unsafe { libc::madvise(self.base.cast(), self.len, libc::MADV_POPULATE_WRITE) };
            if rc == 0 {
                return;
            }
            tracing::debug!(path = %self.path.display(), err = %std::io::Error::last_os_error(),
                "MADV_POPULATE_WRITE failed; touching pages instead");
        }
        self.touch_pages();
    }

    /// Msync mode: no holes, and base-page folios (see [`crate::backing`]
    /// for why each matters). Not on a memory file system (tmpfs), whose
    /// holes cost no journal and whose pages would all be taken at once.
    /// Runs before anything is stored through the mapping; a file system
    /// that cannot allocate the file (ENOSPC) fails here, with a clear
    /// error, instead of a SIGBUS at some later store.
    fn prepare_for_msync(&self) -> Result<(), PmemError> {
        let meta = self.file.metadata().ok().filter(|m| m.is_file());
        if let Some(meta) = meta.filter(|_| !backing::in_memory(&self.file)) {
            use std::os::unix::fs::MetadataExt;
            if meta.blocks().saturating_mul(512) < self.len as u64 {
                // Say why the start waits: a large cache takes seconds.
                tracing::info!(path = %self.path.display(), len = self.len,
                    "writing zeros into the cache file's holes (once; msync mode)");
            }
            let filled = backing::fill_holes(&self.file, self.len as u64).map_err(|source| {
                PmemError::Io {
                    path: self.path.clone(),
                    op: "allocate (write zeros into holes)",
                    source,
                }
            })?;
            if filled > 0 {
                tracing::info!(path = %self.path.display(), bytes = filled,
                    "allocated the cache file's holes, so that commits need no journal");
            }
            backing::drop_page_cache(&self.file);
        }
        // SAFETY: advice on our own live mapping; it changes no data.
        let rc = unsafe { libc::madvise(self.base.cast(), self.len, libc::MADV_RANDOM) };
        if rc != 0 {
            tracing::debug!(path = %self.path.display(), err = %std::io::Error::last_os_error(),
                "MADV_RANDOM refused; commits may write whole large folios");
        }
        Ok(())
    }

    /// Write-faults every page with an atomic add of zero, which cannot
    /// change a byte even if another process is writing the same word.
    fn touch_pages(&self) {
        for off in (0..self.len).step_by(page_size()) {
            self.word(off).fetch_add(0, Ordering::Relaxed);
        }
    }

    /// Msync mode: makes every range this thread recorded since its last
    /// fence durable, in a group commit with the threads fencing at the same
    /// time (see [`crate::group`]).
    fn msync_thread(&self) {
        let Some(range) = self.take_range() else {
            return;
        };
        let call = Msync::of(self);
        let r = self.group.commit(range, &|s, e| call.sync(s, e));
        if let Err(e) = r {
            // A failed msync means the media refused the data; carrying on
            // would acknowledge writes that are not durable, and the
            // trait's fence cannot return an error. Stop, as databases do
            // on a failed fsync (every later fence fails the same way).
            panic!(
                "{}: {e}; durability can no longer be guaranteed",
                self.path.display()
            );
        }
    }

    /// Msync mode, without waiting: `done` runs once the ranges this thread
    /// recorded are durable (see [`crate::group`]).
    fn msync_thread_async(&self, done: crate::FenceDone) {
        let Some(range) = self.take_range() else {
            done(Ok(()));
            return;
        };
        self.group
            .commit_async(range, done, || Arc::new(Msync::of(self).into_fn()));
    }

    /// This thread's recorded hull, rounded out to pages, forgotten here.
    fn take_range(&self) -> Option<(usize, usize)> {
        let (s, e) = self.dirty.lock().remove(&std::thread::current().id())?;
        let page = page_size();
        Some((
            s & !(page - 1),
            e.next_multiple_of(page)
                .min(self.len.next_multiple_of(page)),
        ))
    }

    /// Msync mode: `src` into the file at `off` with `pwrite` instead of
    /// stores through the mapping, and recorded for this thread's fence.
    /// The page cache is the same either way, so the mapping sees the bytes
    /// at once; but a store into a page that is not cached makes the kernel
    /// read it from disk first, and one into a page that an msync cleaned
    /// takes a write-protect fault, where `pwrite` of whole pages does
    /// neither (measured on ext4: 135 µs per 4 KiB write and msync against
    /// 180 µs through the mapping). A system call does not keep 8-byte
    /// stores atomic, so this is only for slot data. False (nothing
    /// written) if the call failed; the caller then copies through the
    /// mapping, and the fence's msync reports a media error as before.
    fn write_call(&self, off: usize, src: &[u8]) -> bool {
        use std::os::unix::fs::FileExt;
        match self.file.write_all_at(src, off as u64) {
            Ok(()) => {
                self.record(off, src.len());
                true
            }
            Err(err) => {
                tracing::warn!(path = %self.path.display(), %err, off,
                    "pwrite to the cache file failed; storing through the mapping instead");
                false
            }
        }
    }

    /// Persistence calls (msyncs) made so far; fewer than fences when
    /// concurrent fences share them.
    pub fn syncs(&self) -> u64 {
        self.syncs.get(0)
    }

    fn check_range(&self, off: usize, len: usize) {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len),
            "pmem range [{off}, +{len}) out of bounds (len {})",
            self.len
        );
    }

    fn record(&self, off: usize, len: usize) {
        if len == 0 {
            return;
        }
        let mut dirty = self.dirty.lock();
        let hull = dirty
            .entry(std::thread::current().id())
            .or_insert((off, off + len));
        *hull = (hull.0.min(off), hull.1.max(off + len));
    }
}

/// The persistence call of msync mode, with what it needs of the region,
/// so that the syncer thread can make it.
struct Msync {
    /// The mapping's base address.
    base: usize,
    sync_fn: unsafe fn(*mut u8, usize) -> i32,
    path: PathBuf,
    syncs: Arc<crate::counter::Counters<1>>,
}

impl Msync {
    fn of(r: &MappedRegion) -> Msync {
        Msync {
            base: r.base as usize,
            sync_fn: r.sync_fn,
            path: r.path.clone(),
            syncs: r.syncs.clone(),
        }
    }

    fn into_fn(self) -> impl Fn(usize, usize) -> Result<(), String> + Send + Sync {
        move |s, e| self.sync(s, e)
    }

    /// `msync` of `[s, e)`, a page-aligned range of the mapping.
    fn sync(&self, s: usize, e: usize) -> Result<(), String> {
        self.syncs.add(0, 1);
        // SAFETY: [s, e) is page-aligned and inside the mapping (offsets
        // were bounds-checked when recorded; the end is rounded within the
        // mapping's last page), which outlives every call: the region's
        // drop ends the syncer thread before it unmaps.
        let rc = unsafe { (self.sync_fn)((self.base as *mut u8).add(s), e - s) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        tracing::error!(path = %self.path.display(), %err, "msync failed");
        Err(format!("msync of [{s}, {e}) failed: {err}"))
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        self.group.shutdown();
        // SAFETY: base/len are the mapping we created; nothing can use it
        // after drop (every borrow of the region has ended).
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}

impl PmemRegion for MappedRegion {
    fn len(&self) -> usize {
        self.len
    }

    fn mode(&self) -> PersistMode {
        self.mode
    }

    fn flush(&self, off: usize, len: usize) {
        self.check_range(off, len);
        match self.mode {
            PersistMode::ReadOnly => {}
            // SAFETY: in bounds (checked); the kind was detected on this CPU.
            PersistMode::Dax(k) | PersistMode::AssumedPmem(k) => unsafe {
                flush::flush(k, self.base.add(off), len)
            },
            _ => self.record(off, len),
        }
    }

    fn fence(&self) {
        match self.mode {
            PersistMode::ReadOnly => return,
            PersistMode::Dax(_) | PersistMode::AssumedPmem(_) => flush::sfence(),
            _ => self.msync_thread(),
        }
        self.fences.add(0, 1);
    }

    fn fence_async(&self, done: crate::FenceDone) {
        if self.mode != PersistMode::Msync {
            self.fence();
            done(Ok(()));
            return;
        }
        self.fences.add(0, 1);
        self.msync_thread_async(done);
    }

    fn fence_async_idle(&self, done: crate::FenceDone) {
        if self.mode != PersistMode::Msync {
            return self.fence_async(done);
        }
        self.fences.add(0, 1);
        let Some(range) = self.take_range() else {
            done(Ok(()));
            return;
        };
        let call = Msync::of(self);
        self.group
            .commit_async_idle(range, done, &|s, e| call.sync(s, e), || {
                Arc::new(Msync::of(self).into_fn())
            });
    }

    fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    unsafe fn copy_flush(&self, off: usize, src: &[u8]) {
        self.check_range(off, src.len());
        self.writable();
        // SAFETY: in bounds (checked); exclusivity is the caller's contract;
        // `src` cannot overlap the range it must not concurrently access.
        unsafe {
            match self.mode {
                PersistMode::Dax(k) | PersistMode::AssumedPmem(k) => {
                    flush::copy_flush(k, self.base.add(off), src)
                }
                _ => {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.add(off), src.len());
                    self.record(off, src.len());
                }
            }
        }
    }

    unsafe fn copy_flush_nt(&self, off: usize, src: &[u8]) {
        match self.mode {
            PersistMode::Dax(k) | PersistMode::AssumedPmem(k) => {
                self.check_range(off, src.len());
                self.writable();
                // SAFETY: in bounds (checked); exclusivity is the caller's
                // contract; `src` cannot overlap the range it must not
                // concurrently access.
                unsafe { flush::copy_nt(k, flush::NtIsa::detect(), self.base.add(off), src) }
            }
            // SAFETY: forwarded from the caller.
            _ => unsafe { self.copy_flush(off, src) },
        }
    }

    fn store_word_flush(&self, off: usize, v: u64) {
        let w = self.word(off);
        match self.mode {
            PersistMode::Dax(_) | PersistMode::AssumedPmem(_) => {
                self.writable();
                flush::store_word_nt(w, v);
            }
            _ => {
                w.store(v, Ordering::SeqCst);
                self.flush(off, 8);
            }
        }
    }

    unsafe fn copy_flush_hash(&self, off: usize, src: &[u8]) -> u64 {
        self.check_range(off, src.len());
        self.writable();
        if let PersistMode::Dax(_) | PersistMode::AssumedPmem(_) = self.mode {
            // Where `copy_flush` would stream, stream and hash in one pass;
            // `copy_nt_hash` declines what it does not handle.
            if src.len() >= flush::NT_THRESHOLD {
                // SAFETY: in bounds (checked); exclusivity is the caller's
                // contract; `src` cannot overlap the range it must not
                // concurrently access. Streaming stores need no flush.
                if let Some(h) = unsafe { hash::copy_nt_hash(self.base.add(off), src) } {
                    return h;
                }
            }
        }
        if self.mode == PersistMode::Msync && self.write_call(off, src) {
            return hash::xxh3_64(src);
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.copy_flush(off, src) };
        hash::xxh3_64(src)
    }

    unsafe fn zero_flush(&self, off: usize, len: usize) {
        self.check_range(off, len);
        self.writable();
        // SAFETY: in bounds (checked); exclusivity is the caller's contract.
        unsafe {
            match self.mode {
                PersistMode::Dax(k) | PersistMode::AssumedPmem(k) => {
                    flush::zero_flush(k, self.base.add(off), len)
                }
                _ => {
                    std::ptr::write_bytes(self.base.add(off), 0, len);
                    self.record(off, len);
                }
            }
        }
    }

    fn fences(&self) -> u64 {
        self.fences.get(0)
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

fn check_len(path: &Path, len: u64) -> Result<(), PmemError> {
    if len < MIN_LEN {
        return Err(PmemError::TooSmall {
            path: path.to_path_buf(),
            len,
            min: MIN_LEN,
        });
    }
    Ok(())
}

/// Opens read-write, refusing files without any write permission bit even
/// for root: a user who made the cache read-only does not want it written.
fn open_rw(path: &Path) -> Result<File, PmemError> {
    let meta = std::fs::metadata(path).map_err(|e| PmemError::from_open(path.to_path_buf(), e))?;
    let ft = meta.file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(PmemError::NotMappable {
            path: path.to_path_buf(),
        });
    }
    if meta.permissions().mode() & 0o222 == 0 {
        return Err(PmemError::ReadOnly {
            path: path.to_path_buf(),
            reason: "no write permission bits".into(),
        });
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| PmemError::from_open(path.to_path_buf(), e))
}

/// Length of a regular file or block device (st_size is 0 for devices, so
/// seek to the end instead).
fn file_len(path: &Path, mut file: &File) -> Result<u64, PmemError> {
    file.seek(SeekFrom::End(0)).map_err(|source| PmemError::Io {
        path: path.to_path_buf(),
        op: "seek",
        source,
    })
}

/// Maps `file` shared: first with MAP_SYNC (DAX only), then plainly.
/// Returns the base and whether MAP_SYNC was granted.
fn mmap_shared(
    path: &Path,
    file: &File,
    ulen: usize,
    len: u64,
) -> Result<(*mut u8, bool), PmemError> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let fd = file.as_raw_fd();
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a fresh mapping chosen by the kernel (addr = null) of our
        // own descriptor; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ulen,
                prot,
                libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC,
                fd,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return Ok((p.cast(), true));
        }
        // EOPNOTSUPP: not DAX (tmpfs, page-cache file systems); EINVAL on
        // kernels without MAP_SHARED_VALIDATE. Either way, map plainly.
        tracing::debug!(path = %path.display(), err = %std::io::Error::last_os_error(),
            "MAP_SYNC refused; using a plain shared mapping");
    }
    // SAFETY: as above.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), ulen, prot, libc::MAP_SHARED, fd, 0) };
    if p == libc::MAP_FAILED {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(PmemError::MapFailed {
            path: path.to_path_buf(),
            len,
            errno,
        });
    }
    debug_assert_eq!(p as usize % LINE, 0);
    Ok((p.cast(), false))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In msync mode a fence syncs only what its own thread flushed.
    #[test]
    fn msync_ranges_are_per_thread() {
        let path = PathBuf::from(format!("/dev/shm/pmcache-pmem-unit-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let r = MappedRegion::create(&path, 1 << 16, &MapOptions::new()).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(r.mode(), PersistMode::Msync);
        r.flush(5000, 10);
        r.flush(100, 10);
        let me = std::thread::current().id();
        assert_eq!(r.dirty.lock()[&me], (100, 5010), "one hull per thread");
        std::thread::scope(|s| {
            s.spawn(|| {
                r.flush(9000, 1);
                r.fence();
            });
        });
        assert_eq!(
            r.dirty.lock().len(),
            1,
            "the other thread's fence left ours alone"
        );
        assert!(r.dirty.lock().contains_key(&me));
        r.fence();
        assert!(r.dirty.lock().is_empty());
        assert_eq!(r.fences(), 2);
    }

    /// A streamed word lands whole and leaves its neighbours alone, in
    /// both the streaming and the msync mode.
    #[test]
    fn store_word_flush_writes_one_word() {
        for assume in [true, false] {
            let path = PathBuf::from(format!(
                "/dev/shm/pmcache-pmem-unit-word-{}-{assume}",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&path);
            let opts = MapOptions::new().assume_pmem(assume);
            let r = MappedRegion::create(&path, 1 << 16, &opts).unwrap();
            let _ = std::fs::remove_file(&path);
            r.word(4096).store(u64::MAX, Ordering::SeqCst);
            r.word(4112).store(u64::MAX, Ordering::SeqCst);
            r.store_word_flush(4104, 0x0123_4567_89ab_cdef);
            r.fence();
            assert_eq!(r.word(4104).load(Ordering::SeqCst), 0x0123_4567_89ab_cdef);
            assert_eq!(r.word(4096).load(Ordering::SeqCst), u64::MAX);
            assert_eq!(r.word(4112).load(Ordering::SeqCst), u64::MAX);
        }
    }

    /// The fallback prefault path must leave the contents alone.
    #[test]
    fn touch_pages_keeps_data() {
        let path = PathBuf::from(format!(
            "/dev/shm/pmcache-pmem-unit-touch-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let data: Vec<u8> = (0..5 * 4096u32).map(|i| (i % 241) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let r = MappedRegion::open(&path, &MapOptions::new().prefault(false)).unwrap();
        let _ = std::fs::remove_file(&path);
        r.touch_pages();
        // SAFETY: no writer.
        assert_eq!(unsafe { r.slice(0, data.len()) }, &data[..]);
    }

    /// Both persistence modes, streamed (fused) and not, aligned and not,
    /// through `copy_flush_hash` and `copy_flush_nt`: the bytes land exactly
    /// and the hash is xxhash-rust's.
    #[test]
    fn copy_flush_hash_and_nt_copy_exactly() {
        let src: Vec<u8> = (0..20_000u32).map(|i| (i * 31 + 7) as u8).collect();
        for assume_pmem in [true, false] {
            let path = PathBuf::from(format!(
                "/dev/shm/pmcache-pmem-unit-cfh-{}-{assume_pmem}",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&path);
            let opts = MapOptions::new().assume_pmem(assume_pmem);
            let r = MappedRegion::create(&path, 1 << 16, &opts).unwrap();
            let _ = std::fs::remove_file(&path);
            let cases = [0usize, 8, 64, 4096]
                .into_iter()
                .flat_map(|off| [(off, false), (off, true)]);
            for (off, nt) in cases {
                for &len in &[0usize, 64, 100, 241, 2047, 2048, 4096, 4160, 8000, 16384] {
                    let data = &src[len % 7..len % 7 + len];
                    // SAFETY: in bounds; this thread is the only user.
                    unsafe {
                        r.zero_flush(0, r.len());
                        r.fence();
                        if nt {
                            r.copy_flush_nt(off, data);
                        } else {
                            let h = r.copy_flush_hash(off, data);
                            assert_eq!(h, xxhash_rust::xxh3::xxh3_64(data), "off {off} len {len}");
                        }
                        r.fence();
                        assert_eq!(r.slice(off, len), data, "off {off} len {len}");
                        assert!(r.slice(0, off).iter().all(|&b| b == 0));
                        assert!(r
                            .slice(off + len, r.len() - off - len)
                            .iter()
                            .all(|&b| b == 0));
                    }
                }
            }
            if !assume_pmem {
                assert!(r.dirty.lock().is_empty(), "msync mode recorded and synced");
            }
        }
    }

    /// A slow msync, so that concurrent fences pile up behind it.
    unsafe fn slow_msync(p: *mut u8, len: usize) -> i32 {
        std::thread::sleep(std::time::Duration::from_millis(1));
        // SAFETY: forwarded from the caller's contract.
        unsafe { msync_sync(p, len) }
    }

    fn msync_region(tag: &str) -> MappedRegion {
        let path = PathBuf::from(format!(
            "/dev/shm/pmcache-pmem-unit-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let r = MappedRegion::create(&path, 1 << 20, &MapOptions::new()).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(r.mode(), PersistMode::Msync);
        r
    }

    /// Ranges the recording msync below was called with, as (address, len).
    static SYNCED: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

    unsafe fn recording_msync(p: *mut u8, len: usize) -> i32 {
        SYNCED.lock().push((p as usize, len));
        // SAFETY: forwarded from the caller's contract.
        unsafe { msync_sync(p, len) }
    }

    /// Msync mode writes slot data with `pwrite`: the file and the mapping
    /// hold it at once, and the writer's next fence msyncs a range that
    /// covers it, so nothing is acknowledged before the call that made it
    /// durable returned.
    #[test]
    fn written_data_is_in_the_file_and_covered_by_the_fence() {
        use std::os::unix::fs::FileExt;
        let mut r = msync_region("pwrite");
        r.sync_fn = recording_msync;
        let data = vec![0xa5u8; 8192];
        // SAFETY: nobody else uses the region.
        let h = unsafe { r.copy_flush_hash(40960, &data) };
        assert_eq!(h, xxhash_rust::xxh3::xxh3_64(&data));
        let mut f = vec![0u8; 8192];
        r.file.read_exact_at(&mut f, 40960).unwrap();
        assert_eq!(f, data, "the bytes went to the file");
        // SAFETY: as above; read only.
        let mapped = unsafe { r.slice(40960, 8192) };
        assert_eq!(mapped, &data[..], "the mapping sees them");
        let me = std::thread::current().id();
        assert_eq!(r.dirty.lock()[&me], (40960, 40960 + 8192));
        r.fence();
        let base = r.base as usize;
        let covered = SYNCED
            .lock()
            .iter()
            .any(|&(p, n)| p <= base + 40960 && base + 40960 + 8192 <= p + n);
        assert!(covered, "no msync covered the written range");
        assert!(r.dirty.lock().is_empty());
    }

    /// One fence of several far-apart ranges is one msync, not one per range.
    #[test]
    fn one_fence_is_one_msync() {
        let r = msync_region("one");
        r.flush(0, 64);
        r.flush(300_000, 64);
        r.flush(900_000, 4096);
        r.fence();
        assert_eq!(r.syncs(), 1);
        r.fence();
        assert_eq!(r.syncs(), 1, "a fence with nothing flushed syncs nothing");
    }

    /// Concurrent fences share msyncs (group commit).
    #[test]
    fn concurrent_fences_share_msyncs() {
        let mut r = msync_region("group");
        r.sync_fn = slow_msync;
        // Eight per sync slot, started together: even if the batches
        // alternate between one thread and the other seven, that is two
        // syncs per eight fences, well under the bound below. With four,
        // alternating {1},{3} is exactly half, so a busy machine failed it.
        const THREADS: usize = 8 * crate::group::MAX_SYNCS;
        const ROUNDS: usize = 8;
        let start = std::sync::Barrier::new(THREADS);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (r, start) = (&r, &start);
                s.spawn(move || {
                    start.wait();
                    for i in 0..ROUNDS {
                        r.store_word_flush((t * ROUNDS + i) * 4096, 1 + i as u64);
                        r.fence();
                    }
                });
            }
        });
        let fences = (THREADS * ROUNDS) as u64;
        assert_eq!(r.fences(), fences);
        assert!(
            r.syncs() < fences / 2,
            "{} msyncs for {fences} fences",
            r.syncs()
        );
        assert!(r.dirty.lock().is_empty());
    }
}
