//! Errors from opening or creating a mapped region.
//!
//! Every variant names the path, because the user usually has several files
//! (cache, origin, sockets) and "permission denied" alone does not say which.

use std::path::PathBuf;

/// Why a region could not be opened, created or mapped.
#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    /// The file does not exist (and creating it was not asked for).
    #[error("{}: no such file", path.display())]
    NotFound { path: PathBuf },

    /// `create` was asked to make a file that already exists.
    #[error("{}: already exists", path.display())]
    AlreadyExists { path: PathBuf },

    /// The file exists but is not something that can be mapped as a cache.
    #[error("{}: not a regular file or block device", path.display())]
    NotMappable { path: PathBuf },

    /// The file cannot be written: no write permission bits, a read-only
    /// file system, or the open was refused.
    #[error("{}: read-only ({reason})", path.display())]
    ReadOnly { path: PathBuf, reason: String },

    /// The file does not have the size the caller expected.
    #[error("{}: size is {actual} bytes, expected {expected}", path.display())]
    WrongSize {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    /// The file is smaller than the smallest region that can be mapped.
    #[error("{}: size {len} bytes is too small (minimum {min})", path.display())]
    TooSmall { path: PathBuf, len: u64, min: u64 },

    /// The file is larger than this process can address.
    #[error("{}: size {len} bytes does not fit in the address space", path.display())]
    TooLarge { path: PathBuf, len: u64 },

    /// Another process holds the region's lock.
    #[error("{}: locked by another process", path.display())]
    Locked { path: PathBuf },

    /// `mmap` refused the file.
    #[error("{}: mmap of {len} bytes failed: {} (errno {errno})", path.display(), std::io::Error::from_raw_os_error(*errno))]
    MapFailed { path: PathBuf, len: u64, errno: i32 },

    /// Any other I/O failure, with the operation that failed.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl PmemError {
    /// The path the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            PmemError::NotFound { path }
            | PmemError::AlreadyExists { path }
            | PmemError::NotMappable { path }
            | PmemError::ReadOnly { path, .. }
            | PmemError::WrongSize { path, .. }
            | PmemError::TooSmall { path, .. }
            | PmemError::TooLarge { path, .. }
            | PmemError::Locked { path }
            | PmemError::MapFailed { path, .. }
            | PmemError::Io { path, .. } => path,
        }
    }

    /// Classifies an `open(2)` failure: ENOENT and the permission errors get
    /// their own variants so callers (and users) can tell them apart.
    pub(crate) fn from_open(path: PathBuf, err: std::io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::ENOENT) => PmemError::NotFound { path },
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::ETXTBSY) => {
                PmemError::ReadOnly {
                    path,
                    reason: err.to_string(),
                }
            }
            Some(libc::EISDIR) => PmemError::NotMappable { path },
            _ => PmemError::Io {
                path,
                op: "open",
                source: err,
            },
        }
    }
}
