//! A file or block device as the origin.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, Ordering};

use crate::{Completion, Origin};

/// A regular file or block device, accessed with pread/pwrite/fdatasync.
pub struct FileOrigin {
    file: File,
    path: PathBuf,
    size: u64,
    block_device: bool,
    /// `preadv2(RWF_NOWAIT)` is refused here (an old kernel, a file system
    /// without it): no read is served in the call.
    no_nowait: AtomicBool,
    /// How often reads in the call were declined lately (see
    /// [`NowaitScore`]).
    nowait: NowaitScore,
}

/// Whether reads in the call are worth trying: a declined one costs its
/// caller a second start on the waiting way, so where the page cache holds
/// little of the origin (a cold disk) they are tried only now and then,
/// to notice when it warms up.
#[derive(Default)]
struct NowaitScore {
    /// Recent declines, less four per success, at most [`SCORE_MAX`].
    declines: std::sync::atomic::AtomicU32,
    /// Calls while declining, for the probes.
    calls: std::sync::atomic::AtomicU32,
}

const SCORE_MAX: u32 = 256;
/// Past this many recent declines, only one read in [`PROBE_EVERY`] tries.
const SCORE_OFF: u32 = 16;
const PROBE_EVERY: u32 = 32;

impl NowaitScore {
    fn worth_trying(&self) -> bool {
        self.declines.load(Ordering::Relaxed) < SCORE_OFF
            || self
                .calls
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(PROBE_EVERY)
    }

    fn record(&self, served: bool) {
        let _ = self
            .declines
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                Some(if served {
                    d.saturating_sub(4)
                } else {
                    (d + 1).min(SCORE_MAX)
                })
            });
    }
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Whether `path` is a block device (false if it cannot be looked at).
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// BLKROGET: whether the kernel marks a block device read-only (false for
/// anything else, where the ioctl fails).
pub fn read_only_device(file: &File) -> bool {
    const BLKROGET: libc::c_ulong = 0x125e;
    let mut ro: libc::c_int = 0;
    // SAFETY: BLKROGET writes one int through the pointer, to a local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKROGET as _, &mut ro) };
    rc == 0 && ro != 0
}

impl FileOrigin {
    /// Open an existing file or block device read-write.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        // A block device is claimed as mkfs does (O_EXCL): one that is
        // mounted, or that another cache or program holds so, is refused.
        let is_dev = is_block_device(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(if is_dev { libc::O_EXCL } else { 0 })
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    io::Error::new(
                        io::ErrorKind::ResourceBusy,
                        format!(
                            "origin {} is in use: mounted, or held by another cache or program",
                            path.display()
                        ),
                    )
                } else {
                    with_path(e, "cannot open origin", path)
                }
            })?;
        let meta = file
            .metadata()
            .map_err(|e| with_path(e, "cannot stat origin", path))?;
        let block_device = meta.file_type().is_block_device();
        if read_only_device(&file) {
            // It opens for writing, and then every write fails (EPERM):
            // writeback would retry forever.
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "origin {} is a read-only block device; pmcache writes its origin (make it writable, e.g. blockdev --setrw)",
                    path.display()
                ),
            ));
        }
        let size = if block_device {
            let mut f = &file;
            io::Seek::seek(&mut f, io::SeekFrom::End(0))
                .map_err(|e| with_path(e, "cannot size origin", path))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "origin {} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        };
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(FileOrigin {
            file,
            path,
            size,
            block_device,
            no_nowait: AtomicBool::new(false),
            nowait: NowaitScore::default(),
        })
    }

    /// Create a sparse file of `size` bytes (fails if it exists) and open it.
    pub fn create_sparse(path: impl AsRef<Path>, size: u64) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| with_path(e, "cannot create origin", path))?;
        file.set_len(size)
            .map_err(|e| with_path(e, "cannot size origin", path))?;
        drop(file);
        Self::open(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All of `bufs` at `offset`, with as few `pwritev` calls as it takes.
    fn pwritev_all(&self, bufs: &[io::IoSlice<'_>], offset: u64) -> io::Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, len)?;
        let mut owned: Vec<io::IoSlice<'_>> = bufs.to_vec();
        let (mut bufs, mut off) = (&mut owned[..], offset);
        io::IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            // SAFETY: `bufs` are valid `iovec`s (IoSlice is ABI-compatible
            // with iovec), at most IOV_MAX of them; pwritev only reads them.
            let rc = unsafe {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    bufs.as_ptr().cast(),
                    iov_count(bufs.len()),
                    off as libc::off_t,
                )
            };
            if let Some(n) = moved(rc, io::ErrorKind::WriteZero)? {
                io::IoSlice::advance_slices(&mut bufs, n);
                off += n as u64;
            }
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("origin access {offset}+{len} beyond end {}", self.size),
            )),
        }
    }
}

/// At most IOV_MAX iovecs per call.
fn iov_count(n: usize) -> libc::c_int {
    n.min(1024) as libc::c_int
}

/// What one `preadv`/`pwritev` did: the bytes moved, `None` if a signal
/// interrupted it, or the error (`at_zero` when it moved nothing).
fn moved(rc: isize, at_zero: io::ErrorKind) -> io::Result<Option<usize>> {
    match rc {
        0 => Err(at_zero.into()),
        n if n > 0 => Ok(Some(n as usize)),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

impl Origin for FileOrigin {
    fn size(&self) -> u64 {
        self.size
    }

    fn fingerprint(&self) -> String {
        format!("file:{}", self.path.display())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn read_vectored_at(&self, bufs: &mut [io::IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, len)?;
        let (mut bufs, mut off) = (bufs, offset);
        io::IoSliceMut::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            // SAFETY: `bufs` are valid, writable `iovec`s (IoSliceMut is
            // ABI-compatible with iovec), at most IOV_MAX of them.
            let rc = unsafe {
                libc::preadv(
                    self.file.as_raw_fd(),
                    bufs.as_ptr().cast(),
                    iov_count(bufs.len()),
                    off as libc::off_t,
                )
            };
            if let Some(n) = moved(rc, io::ErrorKind::UnexpectedEof)? {
                io::IoSliceMut::advance_slices(&mut bufs, n);
                off += n as u64;
            }
        }
        Ok(())
    }

    /// Served in the call where the page cache holds all of it: a read
    /// that would wait for the disk (`RWF_NOWAIT`) is declined, and the
    /// caller reads the waiting way.
    fn reads_async(&self) -> bool {
        !self.no_nowait.load(Ordering::Relaxed) && self.nowait.worth_trying()
    }

    unsafe fn read_raw_async(
        &self,
        offset: u64,
        pieces: &[(*mut u8, usize)],
        done: Completion,
    ) -> Result<(), Completion> {
        let total: usize = pieces.iter().map(|p| p.1).sum();
        if pieces.len() > 1024 || self.check_range(offset, total as u64).is_err() {
            return Err(done);
        }
        let iov: Vec<libc::iovec> = pieces
            .iter()
            .map(|&(p, n)| libc::iovec {
                iov_base: p.cast(),
                iov_len: n,
            })
            .collect();
        // SAFETY: the caller guarantees each piece is valid for writes of
        // its length and used by nothing else; at most IOV_MAX iovecs.
        let rc = unsafe {
            libc::preadv2(
                self.file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        let served = rc >= 0 && rc as usize == total;
        self.nowait.record(served);
        if served {
            done(Ok(()));
            return Ok(());
        }
        if rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
            self.no_nowait.store(true, Ordering::Relaxed);
        }
        // Not all cached (EAGAIN, or a short read), interrupted, or failed:
        // the waiting way reads it again and reports a real error.
        Err(done)
    }

    fn write_runs(&self, runs: &[(u64, &[io::IoSlice<'_>])]) -> Vec<io::Result<()>> {
        runs.iter()
            .map(|&(offset, bufs)| self.pwritev_all(bufs, offset))
            .collect()
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let fd = self.file.as_raw_fd();
        let punched = if self.block_device {
            false
        } else {
            // SAFETY: plain syscall on an fd we own; no memory is passed.
            let rc = unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            rc == 0
        };
        if !punched {
            const CHUNK: u64 = 1 << 20;
            let zeros = vec![0u8; CHUNK.min(len) as usize];
            let mut done = 0;
            while done < len {
                let n = CHUNK.min(len - done) as usize;
                self.file.write_all_at(&zeros[..n], offset + done)?;
                done += n as u64;
            }
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_runs_and_scattered_reads_round_trip() {
        let path = std::env::temp_dir().join(format!("pmcache-origin-{}.img", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let o = FileOrigin::create_sparse(&path, 1 << 20).unwrap();
        let slots: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i + 1; 4096]).collect();
        let run: Vec<io::IoSlice<'_>> = slots.iter().map(|b| io::IoSlice::new(b)).collect();
        let results = o.write_runs(&[(8192, &run[..]), (1 << 20, &run[..1])]);
        assert!(results[0].is_ok(), "{:?}", results[0]);
        assert!(results[1].is_err(), "a run past the end fails alone");
        let mut back = vec![vec![0u8; 4096]; 5];
        let mut bufs: Vec<io::IoSliceMut<'_>> =
            back.iter_mut().map(|b| io::IoSliceMut::new(b)).collect();
        o.read_vectored_at(&mut bufs, 8192).unwrap();
        assert_eq!(back, slots);
        let mut head = vec![9u8; 8192];
        o.read_at(&mut head, 0).unwrap();
        assert!(
            head.iter().all(|&b| b == 0),
            "nothing written before the run"
        );
        std::fs::remove_file(&path).unwrap();
    }

    /// Data in the page cache is read in the call, into every piece in
    /// order; a range past the end is declined with nothing read.
    #[test]
    fn cached_data_is_read_in_the_call() {
        let path = std::env::temp_dir().join(format!("pmcache-nowait-{}.img", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let o = FileOrigin::create_sparse(&path, 1 << 20).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        o.write_at(&data, 4096, false).unwrap();
        assert!(o.reads_async());
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        let pieces = [(a.as_mut_ptr(), 4096), (b.as_mut_ptr(), 4096)];
        let (tx, rx) = std::sync::mpsc::channel();
        // SAFETY: the pieces are our own buffers, untouched until `done`.
        let r = unsafe {
            o.read_raw_async(
                4096,
                &pieces,
                Box::new(move |r| tx.send(r.is_ok()).unwrap()),
            )
        };
        assert!(r.is_ok(), "written data is in the page cache");
        assert_eq!(rx.try_recv(), Ok(true), "answered in the call");
        assert_eq!([a, b].concat(), data);
        let mut c = vec![0u8; 4096];
        let past = [(c.as_mut_ptr(), 4096)];
        // SAFETY: as above.
        let r = unsafe { o.read_raw_async(1 << 20, &past, Box::new(|_| panic!("called"))) };
        assert!(r.is_err(), "a read past the end is declined");
        std::fs::remove_file(&path).unwrap();
    }

    /// After a run of declines only one read in PROBE_EVERY is tried, and
    /// served reads bring the rest back.
    #[test]
    fn declines_make_reads_in_the_call_rare_until_they_are_served() {
        let s = NowaitScore::default();
        assert!(
            (0..100).all(|_| s.worth_trying()),
            "tried while nothing failed"
        );
        for _ in 0..SCORE_OFF {
            s.record(false);
        }
        let tried = (0..PROBE_EVERY * 4).filter(|_| s.worth_trying()).count();
        assert_eq!(tried, 4, "one probe in {PROBE_EVERY}");
        for _ in 0..SCORE_OFF / 4 + 1 {
            s.record(true);
        }
        assert!(
            (0..100).all(|_| s.worth_trying()),
            "tried again once served"
        );
        for _ in 0..10 * SCORE_MAX {
            s.record(false);
        }
        assert_eq!(s.declines.load(Ordering::Relaxed), SCORE_MAX, "bounded");
    }
}
