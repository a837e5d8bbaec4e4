//! Replies: simple or structured, errors with their messages, and READ
//! data sent straight from the export's slices.

use std::io::{self, IoSlice};

use tracing::debug;

use super::connection::Conn;
use crate::export::ExportError;
use crate::proto::*;
use crate::relay::Relayed;

/// An NBD error to report, with a message for structured replies.
pub(super) struct ReplyError {
    errno: u32,
    message: String,
}

impl ReplyError {
    pub(super) fn new(errno: u32, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }
}

fn map_export_error(e: &ExportError) -> u32 {
    match e {
        ExportError::OutOfRange => EINVAL,
        ExportError::NotSupported => ENOTSUP,
        ExportError::NoSpace => ENOSPC,
        ExportError::ReadOnly => EPERM,
        ExportError::Transfer(_) => EIO,
        ExportError::Io(io) => match io.raw_os_error() {
            Some(libc::EPERM | libc::EACCES | libc::EROFS) => EPERM,
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ENOSPC,
            Some(libc::ENOMEM) => ENOMEM,
            Some(libc::EINVAL) => EINVAL,
            Some(libc::EOVERFLOW) => EOVERFLOW,
            Some(libc::ENOTSUP) => ENOTSUP,
            Some(libc::ESHUTDOWN) => ESHUTDOWN,
            _ => match io.kind() {
                io::ErrorKind::PermissionDenied => EPERM,
                io::ErrorKind::InvalidInput => EINVAL,
                io::ErrorKind::Unsupported => ENOTSUP,
                io::ErrorKind::OutOfMemory => ENOMEM,
                io::ErrorKind::StorageFull => ENOSPC,
                _ => EIO,
            },
        },
    }
}

impl From<ExportError> for ReplyError {
    fn from(e: ExportError) -> Self {
        Self::new(map_export_error(&e), e.to_string())
    }
}

impl Conn {
    /// [`send_result`](Self::send_result) from the reader thread, a
    /// success corked (see `Conn::ack_soon`).
    pub(super) fn send_result_soon(&self, cookie: u64, r: Result<(), ExportError>) -> bool {
        match r {
            Ok(()) => self.ack_soon(&SimpleReply { error: 0, cookie }.encode()),
            Err(e) => self.send_error(cookie, &e.into()),
        }
    }

    pub(super) fn send_ok(&self, cookie: u64) -> bool {
        self.send(&mut [IoSlice::new(&SimpleReply { error: 0, cookie }.encode())])
    }

    /// An error reply: a structured error chunk when negotiated (it carries
    /// the message), a simple reply otherwise.
    pub(super) fn send_error(&self, cookie: u64, err: &ReplyError) -> bool {
        debug!(
            "nbd[{}]: request {cookie:#x} failed: {} ({})",
            self.id,
            error_name(err.errno),
            err.message
        );
        if self.structured {
            let payload = ErrorChunk {
                error: err.errno,
                message: err.message.clone(),
                offset: None,
            }
            .encode();
            let hdr = StructuredReply {
                flags: REPLY_FLAG_DONE,
                reply_type: REPLY_TYPE_ERROR,
                cookie,
                length: payload.len() as u32,
            }
            .encode();
            self.send(&mut [IoSlice::new(&hdr), IoSlice::new(&payload)])
        } else {
            self.send(&mut [IoSlice::new(
                &SimpleReply {
                    error: err.errno,
                    cookie,
                }
                .encode(),
            )])
        }
    }

    pub(super) fn send_result(&self, cookie: u64, r: Result<(), ExportError>) -> bool {
        match r {
            Ok(()) => self.send_ok(cookie),
            Err(e) => self.send_error(cookie, &e.into()),
        }
    }

    /// A successful READ reply: header, then the export's slices, in one
    /// `writev` loop. This is the only place read data is handled, and it
    /// is not copied: the kernel reads it from the export's memory.
    pub(super) fn send_read_data(
        &self,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &[IoSlice<'_>],
    ) -> bool {
        self.send_read_reply(cookie, offset, len, data, None, How::Now)
            .unwrap_or(false)
    }

    /// [`send_read_data`](Self::send_read_data) from the reader thread: on
    /// a TLS session a reply of at most [`CORK_READ`] bytes is corked with
    /// the next replies (see [`Conn::cork`]), so that many small replies
    /// share a record and a system call; the data is copied into a record
    /// buffer under TLS anyway. Plain, it is sent now, from the slices.
    pub(super) fn read_reply_soon(
        &self,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &[IoSlice<'_>],
    ) -> bool {
        let how = if self.stream.is_tls() && len as usize <= CORK_READ {
            How::Cork
        } else {
            How::Now
        };
        self.send_read_reply(cookie, offset, len, data, None, how)
            .unwrap_or(false)
    }

    /// [`send_read_data`](Self::send_read_data) only if it need not wait
    /// (for the send lock or for room in the socket): `None`, with nothing
    /// sent, if it would.
    pub(super) fn try_send_read_data(
        &self,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &[IoSlice<'_>],
    ) -> Option<bool> {
        self.send_read_reply(cookie, offset, len, data, None, How::Try)
    }

    /// A successful READ reply whose data comes from a relay pipe: the
    /// header by `writev`, then the payload by `splice`.
    pub(super) fn send_relayed(&self, cookie: u64, offset: u64, data: &Relayed) -> bool {
        debug_assert!(!self.stream.is_tls());
        self.send_read_reply(cookie, offset, data.len() as u32, &[], Some(data), How::Now)
            .unwrap_or(false)
    }

    /// [`send_relayed`](Self::send_relayed) only if it need not wait, as
    /// [`try_send_read_data`](Self::try_send_read_data).
    pub(super) fn try_send_relayed(
        &self,
        cookie: u64,
        offset: u64,
        data: &Relayed,
    ) -> Option<bool> {
        debug_assert!(!self.stream.is_tls());
        self.send_read_reply(cookie, offset, data.len() as u32, &[], Some(data), How::Try)
    }

    /// The header of a structured OFFSET_DATA chunk of `len` bytes at
    /// `offset` (the last of its reply with `done`).
    pub(super) fn data_chunk_header(cookie: u64, offset: u64, len: usize, done: bool) -> [u8; 28] {
        let chunk = StructuredReply {
            flags: if done { REPLY_FLAG_DONE } else { 0 },
            reply_type: REPLY_TYPE_OFFSET_DATA,
            cookie,
            length: len as u32 + 8,
        };
        let mut h = [0u8; STRUCTURED_REPLY_LEN + 8];
        h[..STRUCTURED_REPLY_LEN].copy_from_slice(&chunk.encode());
        h[STRUCTURED_REPLY_LEN..].copy_from_slice(&offset.to_be_bytes());
        h
    }

    fn send_read_reply(
        &self,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &[IoSlice<'_>],
        relayed: Option<&Relayed>,
        how: How,
    ) -> Option<bool> {
        let simple;
        let structured;
        let off = offset.to_be_bytes();
        let mut bufs: Vec<IoSlice<'_>> = Vec::with_capacity(data.len() + 2);
        if self.structured {
            if len == 0 {
                structured = StructuredReply {
                    flags: REPLY_FLAG_DONE,
                    reply_type: REPLY_TYPE_NONE,
                    cookie,
                    length: 0,
                }
                .encode();
                return Some(self.send(&mut [IoSlice::new(&structured)]));
            }
            structured = StructuredReply {
                flags: REPLY_FLAG_DONE,
                reply_type: REPLY_TYPE_OFFSET_DATA,
                cookie,
                length: len.saturating_add(8),
            }
            .encode();
            bufs.push(IoSlice::new(&structured));
            bufs.push(IoSlice::new(&off));
        } else {
            simple = SimpleReply { error: 0, cookie }.encode();
            bufs.push(IoSlice::new(&simple));
        }
        bufs.extend_from_slice(data);
        match (relayed, how) {
            (Some(r), How::Try) => self.try_send_then(&mut bufs, r.len(), |s| r.send(s)),
            (Some(r), _) => Some(self.send_then(&mut bufs, |s| r.send(s))),
            (None, How::Try) => self.try_send(&mut bufs),
            (None, How::Now) => Some(self.send(&mut bufs)),
            (None, How::Cork) => Some(self.cork(&bufs)),
        }
    }
}

/// How a READ reply goes out.
#[derive(Clone, Copy)]
enum How {
    /// Now, waiting for the socket if need be.
    Now,
    /// Now if that need not wait, else not at all.
    Try,
    /// With the reader's next replies (TLS only).
    Cork,
}

/// The largest READ reply corked under TLS: what fits a record with room
/// for more.
const CORK_READ: usize = 8 << 10;
