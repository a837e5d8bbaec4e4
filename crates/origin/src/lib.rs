//! Origins: the slow, remote, fallible storage that pmcache caches.
//!
//! The engine reads misses straight into cache slots and writes dirty slots
//! straight from the mapping, so every method takes the caller's buffer.

use std::io;

pub mod file;
pub mod mem;
pub mod nbd;

pub use file::FileOrigin;
pub use mem::MemOrigin;
pub use nbd::{NbdOrigin, NbdOriginOptions};
pub use pmcache_nbd::relay::MAX_RELAY;
pub use pmcache_nbd::{Completion, PassOn, RelayCompletion, Relayed};

/// Storage behind the cache.
///
/// Durability follows the block-device model: a write is durable only after
/// a later successful [`flush`](Origin::flush), or when written with `fua`.
pub trait Origin: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// A stable identity (canonical path or URI) recorded in the superblock.
    fn fingerprint(&self) -> String;

    /// How many times a lost connection to the origin was re-established
    /// (origins without connections: none).
    fn reconnects(&self) -> u64 {
        0
    }

    /// Fill `buf` from `offset`. Short reads past the end are errors.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Read `[offset, offset + len)` into a relay pipe, for data that only
    /// passes through to a client (see [`Relayed`]). `Ok(None)` where the
    /// origin cannot relay it; the caller then reads into memory.
    fn read_relayed(&self, offset: u64, len: usize) -> io::Result<Option<Relayed>> {
        let _ = (offset, len);
        Ok(None)
    }

    /// Whether [`read_relayed_async`](Self::read_relayed_async) can take
    /// reads.
    fn reads_relayed_async(&self) -> bool {
        false
    }

    /// [`read_relayed`](Self::read_relayed) without waiting: `done` runs,
    /// on some other thread or in this call, with the filled pipe or the
    /// error. `pass`, if the payload comes whole, may send it on as it
    /// arrives (see [`PassOn`]). `Err(done)`, with nothing started, where
    /// the origin cannot (the default, a dead connection, a read it would
    /// have to split).
    fn read_relayed_async(
        &self,
        offset: u64,
        len: usize,
        pass: Option<Box<dyn PassOn>>,
        done: RelayCompletion,
    ) -> Result<(), RelayCompletion> {
        let _ = (offset, len, pass);
        Err(done)
    }

    /// [`write_at`](Self::write_at) from a relay pipe, which stays whole
    /// (so a failed write can be tried again or kept elsewhere). Origins
    /// that cannot splice it write a copy from memory.
    fn write_relayed(&self, data: &Relayed, offset: u64, fua: bool) -> io::Result<()> {
        self.write_at(&data.to_vec()?, offset, fua)
    }

    /// Whether [`write_relayed_async`](Self::write_relayed_async) can take
    /// writes.
    fn writes_relayed_async(&self) -> bool {
        false
    }

    /// [`write_relayed`](Self::write_relayed) without waiting: `done` runs,
    /// on some other thread or in this call, with the result. `data` is
    /// consumed (send a [`Relayed::dup`] to keep it). `Err(done)`, with
    /// nothing started, where the origin cannot (the default, a dead
    /// connection, FUA without the server's support).
    fn write_relayed_async(
        &self,
        data: &Relayed,
        offset: u64,
        fua: bool,
        done: Completion,
    ) -> Result<(), Completion> {
        let _ = (data, offset, fua);
        Err(done)
    }

    /// Whether [`read_raw_async`](Self::read_raw_async) can take reads.
    fn reads_async(&self) -> bool {
        false
    }

    /// Read `[offset, offset + total)` into `pieces` in order without
    /// waiting: `done` runs, on some other thread or in this call, with the
    /// result. `Err(done)`, with nothing started, where the origin cannot
    /// (the default, a dead connection, a read it would have to split).
    ///
    /// # Safety
    /// Each piece must be valid for writes of its length, and used by
    /// nothing else, until `done` has been called.
    unsafe fn read_raw_async(
        &self,
        offset: u64,
        pieces: &[(*mut u8, usize)],
        done: Completion,
    ) -> Result<(), Completion> {
        let _ = (offset, pieces);
        Err(done)
    }

    /// Whether [`write_raw_async`](Self::write_raw_async) can take writes.
    fn writes_async(&self) -> bool {
        false
    }

    /// Write `pieces`, in order, at `offset` (no FUA: durable after a later
    /// [`flush`](Self::flush)) without waiting: `done` runs, on some other
    /// thread or in this call, with the result. `Err(done)`, with nothing
    /// started, where the origin cannot.
    ///
    /// # Safety
    /// Each piece must be valid for reads of its length and unchanged until
    /// `done` has been called.
    unsafe fn write_raw_async(
        &self,
        offset: u64,
        pieces: &[(*const u8, usize)],
        done: Completion,
    ) -> Result<(), Completion> {
        let _ = (offset, pieces);
        Err(done)
    }

    /// Fill `bufs`, in order, from the contiguous range starting at `offset`.
    /// Lets a miss land in several non-adjacent cache slots with one request.
    fn read_vectored_at(&self, bufs: &mut [io::IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for b in bufs.iter_mut() {
            self.read_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }

    /// Write all of `buf` at `offset`; with `fua` it is durable on return.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()>;

    /// Write each `(offset, data)` piece (no FUA). Origins that can have
    /// several requests in flight override this: writeback hands over a
    /// whole batch at once.
    fn write_many(&self, pieces: &[(u64, &[u8])]) -> io::Result<()> {
        for &(off, data) in pieces {
            self.write_at(data, off, false)?;
        }
        Ok(())
    }

    /// Write each run: `(offset, buffers)` whose bytes follow each other
    /// from `offset` (adjacent cache slots merged into one origin write).
    /// No FUA. One result per run, so a caller retries only what failed.
    /// Origins that can have many requests in flight override this.
    fn write_runs(&self, runs: &[(u64, &[io::IoSlice<'_>])]) -> Vec<io::Result<()>> {
        runs.iter()
            .map(|&(offset, bufs)| {
                let mut off = offset;
                for b in bufs {
                    self.write_at(b, off, false)?;
                    off += b.len() as u64;
                }
                Ok(())
            })
            .collect()
    }

    /// Make `[offset, offset + len)` read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;

    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
}

/// Whether a CLI origin spec names an NBD export (anything else is a path).
pub fn is_nbd_spec(spec: &str) -> bool {
    let nbd = ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"];
    nbd.iter().any(|p| spec.starts_with(p))
}

/// Open an origin from a CLI spec: `PATH`, `file:PATH`, `nbd://…`,
/// `nbd+unix://…`, or with TLS `nbds://…` or `nbds+unix://…`.
pub fn open(spec: &str) -> io::Result<Box<dyn Origin>> {
    open_with(spec, NbdOriginOptions::default().connections)
}

/// [`open`], with up to `connections` connections to an NBD origin that
/// allows multi-conn.
pub fn open_with(spec: &str, connections: usize) -> io::Result<Box<dyn Origin>> {
    if is_nbd_spec(spec) {
        let options = NbdOriginOptions {
            connections,
            ..NbdOriginOptions::default()
        };
        Ok(Box::new(NbdOrigin::connect_with(spec, options)?))
    } else {
        let path = spec.strip_prefix("file:").unwrap_or(spec);
        Ok(Box::new(FileOrigin::open(path)?))
    }
}
