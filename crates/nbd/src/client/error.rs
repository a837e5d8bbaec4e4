//! The errors of the client: what the server replied with, and replies
//! that break the protocol.

use std::io;

use crate::proto::{command_name, error_name, EINVAL, ENOMEM, ENOSPC, ENOTSUP, EPERM};

/// An error the server replied with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub uri: String,
    pub command: u16,
    pub offset: u64,
    pub length: u32,
    /// NBD error value (EIO, EINVAL, ...).
    pub errno: u32,
    pub message: String,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: NBD {} (offset {}, length {}) failed: {} ({})",
            self.uri,
            command_name(self.command),
            self.offset,
            self.length,
            error_name(self.errno),
            self.errno
        )?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

impl ServerError {
    pub(super) fn into_io(self) -> io::Error {
        let kind = match self.errno {
            EPERM => io::ErrorKind::PermissionDenied,
            EINVAL => io::ErrorKind::InvalidInput,
            ENOSPC => io::ErrorKind::StorageFull,
            ENOMEM => io::ErrorKind::OutOfMemory,
            ENOTSUP => io::ErrorKind::Unsupported,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}

pub(super) fn proto_err(uri: &str, what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{uri}: NBD protocol error ({what}): {e}"),
    )
}
