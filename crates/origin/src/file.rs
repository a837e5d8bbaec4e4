//! A file or block device as the origin.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::Origin;

/// A regular file or block device, accessed with pread/pwrite/fdatasync.
pub struct FileOrigin {
    file: File,
    path: PathBuf,
    size: u64,
    block_device: bool,
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

impl FileOrigin {
    /// Open an existing file or block device read-write.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| with_path(e, "cannot open origin", path))?;
        let meta = file
            .metadata()
            .map_err(|e| with_path(e, "cannot stat origin", path))?;
        let block_device = meta.file_type().is_block_device();
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
