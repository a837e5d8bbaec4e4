//! The reader thread: reads every reply, puts READ data straight into the
//! caller's buffers and completes the requests.

use std::io::{self, IoSliceMut};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::connection::{Inner, Op};
use super::error::{proto_err, ServerError};
use crate::net::Stream;
use crate::proto::{self, *};

/// Fill every buffer from the stream, with as few system calls as it takes.
fn read_exact_scatter(stream: &Stream, mut bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
    IoSliceMut::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match stream.read_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a reply",
                ))
            }
            Ok(n) => IoSliceMut::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Inner {
    fn server_error(&self, op: &Op, errno: u32, message: String) -> io::Error {
        ServerError {
            uri: self.uri.clone(),
            command: op.command,
            offset: op.offset,
            length: op.length,
            errno,
            message,
        }
        .into_io()
    }

    /// The op's buffer bytes `[at, at + n)`, as slices of its pieces.
    ///
    /// # Safety
    /// Only the reader thread may call this, for an op still in flight, and
    /// must drop the slices before it completes the op: `RawBuf`s describe
    /// the caller's `&mut [u8]`s, borrowed by a `Ticket` that does not let
    /// the caller continue (or the buffers be freed) until the op is
    /// completed, and no other reference to that memory is used meanwhile.
    unsafe fn op_slices<'o>(
        &self,
        op: &'o Op,
        at: u64,
        n: usize,
    ) -> io::Result<Vec<IoSliceMut<'o>>> {
        let total: usize = op.buf.iter().map(|b| b.len).sum();
        let at = usize::try_from(at).unwrap_or(usize::MAX);
        if op.buf.is_empty() || at > total || n > total - at {
            return Err(proto_err(
                &self.uri,
                "reply",
                "data outside the requested range or for a request without a buffer",
            ));
        }
        let (mut skip, mut left) = (at, n);
        let mut out = Vec::new();
        for raw in &op.buf {
            if left == 0 {
                break;
            }
            if skip >= raw.len {
                skip -= raw.len;
                continue;
            }
            let take = (raw.len - skip).min(left);
            // SAFETY: `skip + take <= raw.len`, so the slice lies in the
            // piece; exclusivity as the caller guarantees.
            let s = unsafe { std::slice::from_raw_parts_mut(raw.ptr.add(skip), take) };
            out.push(IoSliceMut::new(s));
            left -= take;
            skip = 0;
        }
        Ok(out)
    }

    /// Read `n` bytes of reply data straight into the op's buffer at `at`
    /// (or its relay pipe).
    fn read_into(&self, op: &Op, at: u64, n: usize) -> io::Result<()> {
        if let Some(r) = &op.relay {
            let mut r = r.lock();
            if at == 0 && n == r.len() {
                if let Some(p) = op.pass.lock().take() {
                    if p.pass_on(&self.stream, &mut r)? {
                        return Ok(());
                    }
                }
            }
            return r.receive(&self.stream, at as usize, n);
        }
        // SAFETY: called on the reader thread for an op in flight; the
        // slices are dropped before this returns.
        let mut dst = unsafe { self.op_slices(op, at, n)? };
        read_exact_scatter(&self.stream, &mut dst)
    }

    fn zero_into(&self, op: &Op, at: u64, n: usize) -> io::Result<()> {
        if let Some(r) = &op.relay {
            return r.lock().zero(at as usize, n);
        }
        // SAFETY: as in `read_into`.
        let dst = unsafe { self.op_slices(op, at, n)? };
        for mut d in dst {
            d.fill(0);
        }
        Ok(())
    }

    fn read_payload(&self, len: u32, limit: u32) -> io::Result<Vec<u8>> {
        if len > limit {
            return Err(proto_err(
                &self.uri,
                "reply",
                format!("chunk of {len} bytes"),
            ));
        }
        let mut v = vec![0u8; len as usize];
        self.stream.read_exact(&mut v)?;
        Ok(v)
    }

    /// Read and dispatch one reply (or one structured chunk), in as few
    /// reads as the stream allows without reading past the reply: every
    /// header is at least a simple reply long, and an OFFSET_DATA chunk's
    /// offset follows its header.
    fn read_reply(&self) -> io::Result<()> {
        let uri = &self.uri;
        let mut hb = [0u8; STRUCTURED_REPLY_LEN + 8];
        self.stream.read_exact(&mut hb[..SIMPLE_REPLY_LEN])?;
        let hlen = ReplyHeader::header_len(&hb[..4]).map_err(|e| proto_err(uri, "reply", e))?;
        let data_chunk = hlen == STRUCTURED_REPLY_LEN
            && u16::from_be_bytes([hb[6], hb[7]]) == REPLY_TYPE_OFFSET_DATA;
        let end = if data_chunk { hlen + 8 } else { hlen };
        self.stream.read_exact(&mut hb[SIMPLE_REPLY_LEN..end])?;
        let hdr = ReplyHeader::parse(&hb[..hlen]).map_err(|e| proto_err(uri, "reply", e))?;
        let offset = data_chunk.then(|| {
            let mut ob = [0u8; 8];
            ob.copy_from_slice(&hb[hlen..end]);
            u64::from_be_bytes(ob)
        });
        match hdr {
            ReplyHeader::Simple(r) => self.simple_reply(&r),
            ReplyHeader::Structured(c) => self.structured_chunk(&c, offset),
        }
    }

    /// A simple reply, which completes its request; a successful READ's
    /// data follows the header.
    fn simple_reply(&self, r: &SimpleReply) -> io::Result<()> {
        let op = self.take_op(r.cookie).ok_or_else(|| {
            proto_err(
                &self.uri,
                "reply",
                format!("unknown cookie {:#x}", r.cookie),
            )
        })?;
        if r.error == 0 && op.command == CMD_READ {
            if let Err(e) = self.read_into(&op, 0, op.length as usize) {
                op.complete(Err(self.lost(&e.to_string())));
                return Err(e);
            }
        }
        op.complete(if r.error == 0 {
            Ok(())
        } else {
            Err(self.server_error(&op, r.error, String::new()))
        });
        Ok(())
    }

    /// One chunk of a structured reply; the last one completes the request.
    /// `data_offset`: an OFFSET_DATA chunk's offset, read with its header.
    fn structured_chunk(&self, c: &StructuredReply, data_offset: Option<u64>) -> io::Result<()> {
        let uri = &self.uri;
        let op = self
            .pending
            .lock()
            .ops
            .get(&c.cookie)
            .cloned()
            .ok_or_else(|| proto_err(uri, "reply", format!("unknown cookie {:#x}", c.cookie)))?;
        if !self.structured {
            return Err(proto_err(uri, "reply", "unnegotiated structured reply"));
        }
        match c.reply_type {
            REPLY_TYPE_NONE => {
                if c.length != 0 {
                    return Err(proto_err(uri, "reply", "NONE chunk with payload"));
                }
            }
            REPLY_TYPE_OFFSET_DATA => {
                let off = data_offset.ok_or_else(|| {
                    proto_err(uri, "reply", "OFFSET_DATA read without its offset")
                })?;
                self.offset_data_chunk(&op, c.length, off)?
            }
            REPLY_TYPE_OFFSET_HOLE => self.offset_hole_chunk(&op, c.length)?,
            REPLY_TYPE_BLOCK_STATUS => {
                // Never requested by this client; skip it.
                self.stream.discard(c.length.into())?;
            }
            t if t & REPLY_TYPE_ERROR_BIT != 0 => {
                let p = self.read_payload(c.length, 64 * 1024)?;
                let ec = ErrorChunk::parse(t, &p).map_err(|e| proto_err(uri, "error chunk", e))?;
                let err = self.server_error(&op, ec.error, ec.message);
                op.state.lock().error.get_or_insert(err);
            }
            t => {
                return Err(proto_err(uri, "reply", format!("unknown chunk type {t}")));
            }
        }
        if c.is_done() {
            self.take_op(c.cookie);
            let r = self.structured_result(&op);
            op.complete(r);
        }
        Ok(())
    }

    /// READ data at offset `off`, straight into the caller's buffer.
    fn offset_data_chunk(&self, op: &Op, length: u32, off: u64) -> io::Result<()> {
        if op.command != CMD_READ || length < 9 {
            return Err(proto_err(&self.uri, "reply", "bad OFFSET_DATA chunk"));
        }
        let n = u64::from(length - 8);
        if !in_request(op, off, n) {
            return Err(proto_err(&self.uri, "reply", "data outside the request"));
        }
        self.read_into(op, off - op.offset, n as usize)?;
        op.state.lock().received += n;
        Ok(())
    }

    /// A hole in READ data: zeroes in the caller's buffer.
    fn offset_hole_chunk(&self, op: &Op, length: u32) -> io::Result<()> {
        let uri = &self.uri;
        if op.command != CMD_READ {
            return Err(proto_err(uri, "reply", "hole for a non-READ"));
        }
        let p = self.read_payload(length, 12)?;
        let (off, n) = proto::parse_offset_hole(&p).map_err(|e| proto_err(uri, "hole", e))?;
        if !in_request(op, off, n.into()) {
            return Err(proto_err(uri, "reply", "hole outside the request"));
        }
        self.zero_into(op, off - op.offset, n as usize)?;
        op.state.lock().received += u64::from(n);
        Ok(())
    }

    /// How a request whose last chunk arrived ends: with its first error
    /// chunk, or as a protocol error if a READ was not covered whole.
    fn structured_result(&self, op: &Op) -> io::Result<()> {
        let mut st = op.state.lock();
        match st.error.take() {
            Some(e) => Err(e),
            None if op.command == CMD_READ && st.received != u64::from(op.length) => {
                Err(proto_err(
                    &self.uri,
                    "reply",
                    format!("READ reply covered {} of {} bytes", st.received, op.length),
                ))
            }
            None => Ok(()),
        }
    }
}

/// Whether `[off, off + n)` lies inside the op's request.
fn in_request(op: &Op, off: u64, n: u64) -> bool {
    let req_end = op.offset + u64::from(op.length);
    off >= op.offset && off.checked_add(n).is_some_and(|e| e <= req_end)
}

pub(super) fn reader_loop(inner: &Inner) {
    let why = loop {
        if let Err(e) = inner.read_reply() {
            break e;
        }
    };
    // Nothing reads from the socket any more, and no buffer is in use by
    // this thread: fail everything in flight, refuse anything new.
    let (msg, ops): (String, Vec<Arc<Op>>) = {
        let mut p = inner.pending.lock();
        let msg = match &p.kill_reason {
            Some(k) => k.clone(),
            None => why.to_string(),
        };
        p.dead = Some(msg.clone());
        inner.in_flight.store(0, Ordering::Relaxed);
        (msg, p.ops.drain().map(|(_, op)| op).collect())
    };
    inner.stream.shutdown(Shutdown::Both);
    for op in ops {
        op.complete(Err(inner.lost(&msg)));
    }
}
