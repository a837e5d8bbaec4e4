//! Preparing a page-cache-backed file for msync mode.
//!
//! In msync mode every commit is an msync, which the kernel turns into an
//! fdatasync of the range. Two properties of the file decide what that call
//! costs, and neither is visible to the engine:
//!
//! - **Holes.** The first store into a hole makes the file system allocate a
//!   block, and the fdatasync must then commit the journal too: measured on
//!   ext4 here, four device writes per commit instead of two. A new cache is
//!   sparse, and copy-on-write sends every write to a slot not written
//!   since, so without help a cache pays allocation for a whole pass over
//!   its slots. So holes are written with zeros once (they already read as
//!   zeros, so no byte changes), as databases pre-write their logs.
//! - **Folio size.** Kernels since 6.16 keep ext4 files in large folios (up
//!   to 2 MiB) when they are read ahead or written in large chunks, and a
//!   4 KiB store into such a folio makes the whole folio dirty: each commit
//!   then writes up to 2 MiB (measured: 1.8 MiB per 4 KiB write, a third of
//!   the write rate). So the page cache of the file is dropped after
//!   filling, and the mapping is advised `MADV_RANDOM`, which turns off
//!   fault read-ahead, so the pages come back one base page at a time.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Size of one zero write while filling holes.
const FILL_CHUNK: usize = 1 << 20;

/// Writes zeros into every hole of the regular file `file` (`len` bytes)
/// and makes them durable. Returns how many bytes were filled. Contents do
/// not change: a hole reads as zeros. Not for files others write at the
/// same time (the cache file is locked or just created).
pub(crate) fn fill_holes(file: &File, len: u64) -> std::io::Result<u64> {
    let zeros = vec![0u8; FILL_CHUNK];
    let mut filled = 0u64;
    let mut pos = 0u64;
    while pos < len {
        let hole = match seek(file, pos, libc::SEEK_HOLE) {
            Ok(Some(h)) => h,
            Ok(None) => break,
            // A file system that cannot say where its holes are: leave it
            // as it is (slower commits while holes last, nothing worse).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => break,
            Err(e) => return Err(e),
        };
        if hole >= len {
            break;
        }
        let end = seek(file, hole, libc::SEEK_DATA)?.unwrap_or(len).min(len);
        debug_assert!(end > hole, "SEEK_DATA from a hole went backwards");
        let mut at = hole;
        while at < end {
            let n = (end - at).min(FILL_CHUNK as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        filled += end - hole;
        pos = end;
    }
    if filled > 0 {
        file.sync_data()?;
    }
    Ok(filled)
}

/// `lseek(fd, from, whence)`; `None` where the file system says there is no
/// such offset (ENXIO: no data, or no hole, at or after `from`).
fn seek(file: &File, from: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let from = libc::off_t::try_from(from)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek on a descriptor we own; no memory is involved.
    let r = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(err),
    }
}

/// Whether `file` lives in memory (tmpfs, ramfs): there a hole costs no
/// journal commit and msync writes nothing, and filling holes would only
/// take the whole cache's memory at once.
pub(crate) fn in_memory(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let Some(st) = statfs(file) else {
        return false;
    };
    // `f_type`'s width differs between targets; the magics fit any of them.
    #[allow(clippy::unnecessary_cast)]
    let f_type = st.f_type as i64;
    f_type == TMPFS_MAGIC || f_type == RAMFS_MAGIC
}

/// Bytes an unprivileged writer may still allocate on `file`'s file system
/// (for a tmpfs: what is left of its size limit), if the kernel says.
pub fn free_bytes(file: &File) -> Option<u64> {
    let st = statfs(file)?;
    #[allow(clippy::unnecessary_cast)] // field widths differ between targets
    Some((st.f_bavail as u64).saturating_mul(st.f_bsize as u64))
}

fn statfs(file: &File) -> Option<libc::statfs> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes a statfs into the buffer we own, which is
    // zero-initialized, so it is fully initialized either way.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    // SAFETY: zero-initialized above and filled by fstatfs.
    (rc == 0).then(|| unsafe { st.assume_init() })
}

/// Drops the file's clean cached pages (advice; failure changes nothing
/// but speed), so that they are faulted back in as base pages.
pub(crate) fn drop_page_cache(file: &File) {
    // SAFETY: advice on a descriptor we own; no memory is involved.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn temp_file(len: u64) -> (pmcache_testkit::TempDir, File) {
        let dir = pmcache_testkit::TempDir::on_disk("backing");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("f"))
            .unwrap();
        f.set_len(len).unwrap();
        (dir, f)
    }

    #[test]
    fn tells_memory_file_systems_apart() {
        let (_d, f) = temp_file(4096);
        assert!(
            !in_memory(&f),
            "TempDir::on_disk gave a directory in memory"
        );
        let shm = pmcache_testkit::TempDir::new("backing");
        let g = std::fs::File::create(shm.join("f")).unwrap();
        assert_eq!(in_memory(&g), shm.path().starts_with("/dev/shm"));
    }

    /// Holes become allocated zeros; data around them is untouched.
    #[test]
    fn fills_holes_and_keeps_data() {
        let len = 8 << 20;
        let (_d, f) = temp_file(len);
        f.write_all_at(&[7u8; 4096], 3 << 20).unwrap();
        f.sync_all().unwrap();
        let filled = fill_holes(&f, len).unwrap();
        // Some file systems (tmpfs) report no holes at all; then nothing is
        // filled, and everything still reads the same.
        if filled > 0 {
            assert!(filled <= len - 4096, "filled {filled} of {len}");
            assert!(f.metadata().unwrap().blocks() * 512 >= len);
        }
        let mut buf = vec![1u8; 4096];
        f.read_exact_at(&mut buf, 3 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        f.read_exact_at(&mut buf, len - 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // A second pass finds nothing left to fill.
        assert_eq!(fill_holes(&f, len).unwrap(), 0);
    }
}
