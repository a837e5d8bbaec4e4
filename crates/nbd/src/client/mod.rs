//! A synchronous, thread-safe NBD client.
//!
//! Many threads may call it at once, and each call may put several requests
//! in flight (large requests are split at the server's maximum). Requests
//! are written under one send lock; one reader thread reads every reply and
//! dispatches it by cookie. READ data goes from the socket straight into the
//! caller's buffer (the reader thread `read`s into it while the caller
//! waits), so there is no intermediate copy on the read path either.
//!
//! This file holds the public API: connecting, and requests split at the
//! server's limits. The rest lives in submodules along its seams: `uri`
//! (libnbd URIs), `error` (server and protocol errors), `handshake` (option
//! haggling and STARTTLS), `connection` (what the callers and the reader
//! share: the socket and the table of requests in flight), `request`
//! (putting a request in flight and waiting for it) and `reply` (the reader
//! thread).

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use parking_lot::Mutex;

use crate::export::BlockSizes;
use crate::net::Stream;
use crate::proto::*;
use crate::relay::Relayed;

mod connection;
mod error;
mod handshake;
mod reply;
mod request;
mod uri;
mod watchdog;

pub use connection::{Completion, PassOn, RelayCompletion};
use connection::{Inner, Pending, RawBuf};
use handshake::handshake;
use reply::reader_loop;
use request::{collect, Ticket};

pub use error::ServerError;
pub use uri::{Endpoint, NbdUri, DEFAULT_PORT};

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bound on connecting and on the handshake.
    pub connect_timeout: Duration,
    /// Bound on each request; when it expires the connection is declared
    /// dead (every request in flight fails) because a reply can no longer
    /// be matched safely. `None` waits forever.
    pub request_timeout: Option<Duration>,
    /// Negotiate structured replies (better error messages).
    pub structured_replies: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            request_timeout: None,
            structured_replies: true,
        }
    }
}

/// A connected NBD client. Share it between threads with `Arc<Client>`.
pub struct Client {
    inner: Arc<Inner>,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("uri", &self.inner.uri)
            .field("size", &self.inner.size)
            .field("flags", &self.inner.flags)
            .finish()
    }
}

/// Runs put in flight by [`Client::start_write_runs`]. Dropping it
/// without waiting still waits for every reply.
pub struct RunsInFlight<'a> {
    runs: Vec<(Vec<Ticket<'a>>, Option<io::Error>)>,
}

impl RunsInFlight<'_> {
    /// One result per run, in the order given.
    pub fn wait(self) -> Vec<io::Result<()>> {
        self.runs
            .into_iter()
            .map(|(tickets, err)| collect(tickets, err))
            .collect()
    }
}

/// Zero and trim requests are split at this size (aligned down to the
/// minimum block size): well inside the 32-bit length field.
const MAX_ZERO_REQUEST: u64 = 1 << 30;
/// Cap on any single READ/WRITE, whatever the server allows.
const MAX_IO_REQUEST: u32 = 32 * 1024 * 1024;

impl Client {
    /// Connect with default options.
    pub fn connect(uri: &str) -> io::Result<Self> {
        Self::connect_with(uri, &ClientOptions::default())
    }

    pub fn connect_with(uri: &str, opts: &ClientOptions) -> io::Result<Self> {
        let parsed = NbdUri::parse(uri)?;
        let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{uri}: {e}"));
        let mut stream = dial(uri, &parsed.endpoint, opts.connect_timeout)?;
        stream
            .set_timeouts(Some(opts.connect_timeout))
            .map_err(ctx)?;
        let neg = handshake(&mut stream, uri, &parsed.export, parsed.tls.as_ref(), opts)?;
        // The reader blocks between replies for as long as it takes; the
        // per-request timeout is enforced by the waiting callers instead.
        stream.set_timeouts(None).map_err(ctx)?;
        if let Some(t) = opts.request_timeout {
            stream.set_write_timeout(Some(t)).map_err(ctx)?;
        }
        let sizes = neg.sizes.unwrap_or(BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: MAX_IO_REQUEST,
        });
        let max_request = {
            let m = sizes.maximum.min(MAX_IO_REQUEST);
            // Keep requests aligned: round down to the minimum block size.
            (m / sizes.minimum).max(1) * sizes.minimum
        };
        let inner = Arc::new(Inner {
            uri: uri.to_owned(),
            stream,
            send_lock: Mutex::new(()),
            pending: Mutex::new(Pending {
                ops: HashMap::new(),
                dead: None,
                kill_reason: None,
            }),
            next_cookie: AtomicU64::new(1),
            size: neg.size,
            flags: neg.flags,
            sizes,
            structured: neg.structured,
            max_request,
            request_timeout: opts.request_timeout,
            watched: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
        });
        let r = inner.clone();
        let reader = thread::Builder::new()
            .name("nbd-client-reader".into())
            .spawn(move || reader_loop(&r))
            .map_err(ctx)?;
        Ok(Self {
            inner,
            reader: Some(reader),
        })
    }

    pub fn uri(&self) -> &str {
        &self.inner.uri
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// Transmission flags (`proto::FLAG_*`).
    pub fn flags(&self) -> u16 {
        self.inner.flags
    }

    /// Block-size constraints (defaults when the server sent none).
    pub fn block_sizes(&self) -> BlockSizes {
        self.inner.sizes
    }

    /// Whether structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.inner.structured
    }

    /// Requests put in flight on this connection so far.
    pub fn requests_sent(&self) -> u64 {
        self.inner
            .next_cookie
            .load(std::sync::atomic::Ordering::Relaxed)
            - 1
    }

    /// Requests in flight on this connection.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// False once the connection is gone; every call then fails.
    pub fn is_connected(&self) -> bool {
        let p = self.inner.pending.lock();
        p.dead.is_none() && p.kill_reason.is_none()
    }

    fn has(&self, flag: u16) -> bool {
        self.inner.flags & flag != 0
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: {what} at offset {offset} length {len} is beyond the export size {}",
                    self.inner.uri, self.inner.size
                ),
            )),
        }
    }

    fn check_aligned(&self, what: &str, offset: u64, len: u64) -> io::Result<()> {
        let min = u64::from(self.inner.sizes.minimum);
        if !offset.is_multiple_of(min) || !len.is_multiple_of(min) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: {what} at offset {offset} length {len} is not aligned to the server's minimum block size {min}",
                    self.inner.uri
                ),
            ));
        }
        Ok(())
    }

    /// Fill `buf` from `offset`. Unaligned reads (when the server has a
    /// minimum block size) go through an aligned bounce buffer.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(());
        }
        self.check_range("read", offset, len)?;
        let min = u64::from(self.inner.sizes.minimum);
        if !offset.is_multiple_of(min) || !len.is_multiple_of(min) {
            let start = offset / min * min;
            let end = offset
                .saturating_add(len)
                .div_ceil(min)
                .saturating_mul(min)
                .min(self.inner.size);
            let mut bounce = vec![0u8; (end - start) as usize];
            self.read_aligned(&mut bounce, start)?;
            let skip = (offset - start) as usize;
            buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
            return Ok(());
        }
        self.read_aligned(buf, offset)
    }

    /// Fill `bufs` from consecutive bytes at `offset`, with every request
    /// in flight at once and each reply landing in its own buffer (a cache
    /// miss spread over non-adjacent slots costs one round trip, not one
    /// per slot).
    pub fn read_vectored(&self, bufs: &mut [io::IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let min = u64::from(self.inner.sizes.minimum);
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range("read", offset, total)?;
        if !offset.is_multiple_of(min) || bufs.iter().any(|b| !(b.len() as u64).is_multiple_of(min))
        {
            let mut off = offset;
            for b in bufs.iter_mut() {
                self.read(b, off)?;
                off += b.len() as u64;
            }
            return Ok(());
        }
        // Consecutive buffers share a request up to the server's maximum:
        // one round trip for a miss however many slots it lands in.
        let max = self.inner.max_request as usize;
        let mut groups: Vec<(u64, usize, Vec<&mut [u8]>)> = Vec::new();
        let mut off = offset;
        for b in bufs.iter_mut() {
            for chunk in b.chunks_mut(max) {
                let n = chunk.len();
                match groups.last_mut() {
                    Some((_, len, g)) if *len + n <= max => {
                        *len += n;
                        g.push(chunk);
                    }
                    _ => groups.push((off, n, vec![chunk])),
                }
                off += n as u64;
            }
        }
        let mut tickets = Vec::with_capacity(groups.len());
        let mut err = None;
        for (off, len, g) in groups {
            match self.submit_v(CMD_READ, 0, off, len as u32, &[], g) {
                Ok(t) => tickets.push(t),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        collect(tickets, err)
    }

    /// Write each run: `(offset, buffers)` whose bytes follow each other on
    /// the export from `offset`, gathered into as few requests as the
    /// server's maximum allows, all in flight at once. Not durable until a
    /// FLUSH. One result per run, so a caller can retry only what failed.
    pub fn write_runs(&self, runs: &[(u64, &[IoSlice<'_>])]) -> Vec<io::Result<()>> {
        self.start_write_runs(runs).wait()
    }

    /// [`write_runs`](Self::write_runs) in two halves: put every run in
    /// flight now, wait for the replies with [`RunsInFlight::wait`], so a
    /// caller can fill several connections before it waits on any.
    pub fn start_write_runs(&self, runs: &[(u64, &[IoSlice<'_>])]) -> RunsInFlight<'_> {
        let max = self.inner.max_request as usize;
        let mut per_run: Vec<Vec<Ticket<'_>>> = Vec::with_capacity(runs.len());
        let mut results: Vec<Option<io::Error>> = Vec::with_capacity(runs.len());
        for &(offset, bufs) in runs {
            let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
            let mut tickets = Vec::new();
            let checked = self
                .check_range("write", offset, len)
                .and_then(|()| self.check_aligned("write", offset, len));
            let err = match checked {
                Err(e) => Some(e),
                Ok(()) => self.submit_run(offset, bufs, max, &mut tickets).err(),
            };
            per_run.push(tickets);
            results.push(err);
        }
        RunsInFlight {
            runs: per_run.into_iter().zip(results).collect(),
        }
    }

    /// Submit one run as requests of at most `max` bytes.
    fn submit_run<'a>(
        &'a self,
        offset: u64,
        bufs: &[IoSlice<'_>],
        max: usize,
        tickets: &mut Vec<Ticket<'a>>,
    ) -> io::Result<()> {
        let mut off = offset;
        let mut part: Vec<IoSlice<'_>> = Vec::new();
        let mut part_len = 0;
        let pieces = bufs.iter().flat_map(|b| b.chunks(max));
        for piece in pieces.map(Some).chain(std::iter::once(None)) {
            let full = piece.is_none_or(|p| part_len + p.len() > max);
            if full && part_len > 0 {
                tickets.push(self.submit_v(
                    CMD_WRITE,
                    0,
                    off,
                    part_len as u32,
                    &part,
                    Vec::new(),
                )?);
                off += part_len as u64;
                part.clear();
                part_len = 0;
            }
            if let Some(p) = piece {
                part.push(IoSlice::new(p));
                part_len += p.len();
            }
        }
        Ok(())
    }

    /// Write every `(offset, data)` piece, with all requests in flight at
    /// once. Not durable until a FLUSH.
    pub fn write_many(&self, pieces: &[(u64, &[u8])]) -> io::Result<()> {
        for &(off, data) in pieces {
            self.check_range("write", off, data.len() as u64)?;
            self.check_aligned("write", off, data.len() as u64)?;
        }
        let max = self.inner.max_request as usize;
        let mut tickets = Vec::new();
        let mut err = None;
        'submit: for &(offset, data) in pieces {
            let mut off = offset;
            for chunk in data.chunks(max) {
                match self.submit(CMD_WRITE, 0, off, chunk.len() as u32, Some(chunk), None) {
                    Ok(t) => tickets.push(t),
                    Err(e) => {
                        err = Some(e);
                        break 'submit;
                    }
                }
                off += chunk.len() as u64;
            }
        }
        collect(tickets, err)
    }

    /// Read `[offset, offset + len)` into a relay pipe (see
    /// [`crate::relay`]), for data that only passes through. `Ok(None)`
    /// where relaying does not apply: TLS, a request the server would need
    /// split or aligned, or no pipe to be had; the caller reads as usual.
    pub fn read_relayed(&self, offset: u64, len: usize) -> io::Result<Option<Relayed>> {
        if !self.relays(offset, len) {
            return Ok(None);
        }
        self.check_range("read", offset, len as u64)?;
        let Some(relay) = Relayed::new(len) else {
            return Ok(None);
        };
        let (ticket, op) = self.submit_relayed(offset, relay)?;
        ticket.wait()?;
        // The op is complete: the reader thread is done with it.
        Ok(op
            .relay
            .as_ref()
            .map(|m| std::mem::replace(&mut *m.lock(), Relayed::spent())))
    }

    /// [`read_relayed`](Self::read_relayed) without waiting: `done` runs on
    /// the connection's reader thread with the filled pipe once the reply
    /// is in (or with the error, as for
    /// [`read_raw_async`](Self::read_raw_async)). Where the payload arrives
    /// whole, `pass` is offered it first, to send on as it arrives; `done`
    /// then gets a pipe that [`Relayed::was_passed`]. `Err(done)`, with
    /// nothing sent, where relaying does not apply, the read cannot go as
    /// one request, no pipe is to be had or the connection is dead.
    pub fn read_relayed_async(
        &self,
        offset: u64,
        len: usize,
        pass: Option<Box<dyn PassOn>>,
        done: RelayCompletion,
    ) -> Result<(), RelayCompletion> {
        if !self.relays(offset, len) || !self.one_async_request("read", offset, len) {
            return Err(done);
        }
        let Some(relay) = Relayed::new(len) else {
            return Err(done);
        };
        self.submit_relayed_async(offset, relay, pass, done)
    }

    /// Whether a request's payload may be spliced: a plain socket, and one
    /// request the server takes as it is (no split, no alignment bounce).
    fn relays(&self, offset: u64, len: usize) -> bool {
        !self.inner.stream.is_tls() && self.takes_as_is(offset, len)
    }

    /// Whether the server takes `[offset, offset + len)` as one request,
    /// as it is: no split, no alignment bounce.
    fn takes_as_is(&self, offset: u64, len: usize) -> bool {
        let min = u64::from(self.inner.sizes.minimum);
        len <= self.inner.max_request as usize
            && offset.is_multiple_of(min)
            && (len as u64).is_multiple_of(min)
    }

    /// [`takes_as_is`](Self::takes_as_is) for a request nobody waits on:
    /// also not empty and inside the export.
    fn one_async_request(&self, what: &str, offset: u64, len: usize) -> bool {
        len > 0
            && self.takes_as_is(offset, len)
            && self.check_range(what, offset, len as u64).is_ok()
    }

    /// Read `[offset, offset + len)`, where `len` is the pieces' total, into
    /// `pieces` in order, without waiting: `done` runs on the connection's
    /// reader thread with the result once the reply is in (or the
    /// connection failed, or the read outlived the request timeout).
    /// `Err(done)`, with nothing sent, if the read cannot go as one request
    /// (too long, unaligned, out of range) or the connection is dead.
    ///
    /// # Safety
    /// Each piece must be valid for writes of its length, and used by
    /// nothing else, until `done` has been called.
    pub unsafe fn read_raw_async(
        &self,
        offset: u64,
        pieces: &[(*mut u8, usize)],
        done: Completion,
    ) -> Result<(), Completion> {
        let len: usize = pieces.iter().map(|p| p.1).sum();
        if !self.one_async_request("read", offset, len) {
            return Err(done);
        }
        let buf = pieces
            .iter()
            .map(|&(ptr, len)| RawBuf { ptr, len })
            .collect();
        self.submit_async(CMD_READ, offset, len as u32, (buf, &[]), done)
    }

    /// Write `pieces`, in order, at `offset` (no FUA) without waiting:
    /// `done` runs on the connection's reader thread with the result, as
    /// for [`read_raw_async`](Self::read_raw_async). `Err(done)`, with
    /// nothing sent, if the write cannot go as one request or the
    /// connection is dead. Not durable until a FLUSH.
    ///
    /// # Safety
    /// Each piece must be valid for reads of its length and not written by
    /// anyone until `done` has been called.
    pub unsafe fn write_raw_async(
        &self,
        offset: u64,
        pieces: &[(*const u8, usize)],
        done: Completion,
    ) -> Result<(), Completion> {
        let len: usize = pieces.iter().map(|p| p.1).sum();
        if !self.one_async_request("write", offset, len) {
            return Err(done);
        }
        let payload: Vec<IoSlice<'_>> = pieces
            .iter()
            // SAFETY: the caller's promise: readable for `len`, unchanging.
            .map(|&(ptr, len)| IoSlice::new(unsafe { std::slice::from_raw_parts(ptr, len) }))
            .collect();
        self.submit_async(CMD_WRITE, offset, len as u32, (Vec::new(), &payload), done)
    }

    /// Write the bytes waiting in `data` at `offset` without waiting,
    /// spliced from its pipe (which this consumes): `done` runs on the
    /// connection's reader thread once the reply is in. With `fua` the
    /// request carries NBD FUA. `Err(done)`, with nothing sent, where it
    /// cannot go as one spliced request, `fua` is asked of a server without
    /// FUA, or the connection is dead.
    pub fn write_relayed_async(
        &self,
        data: &Relayed,
        offset: u64,
        fua: bool,
        done: Completion,
    ) -> Result<(), Completion> {
        let len = data.len();
        if !self.relays(offset, len)
            || !self.one_async_request("write", offset, len)
            || (fua && !self.has(FLAG_SEND_FUA))
        {
            return Err(done);
        }
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let out = request::Out::Relay(data);
        self.submit_async_out(
            CMD_WRITE,
            flags,
            offset,
            len as u32,
            (Vec::new(), out),
            done,
        )
    }

    fn read_aligned(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let max = self.inner.max_request as usize;
        let mut tickets = Vec::new();
        let mut err = None;
        let mut off = offset;
        for chunk in buf.chunks_mut(max) {
            let n = chunk.len();
            match self.submit(CMD_READ, 0, off, n as u32, None, Some(chunk)) {
                Ok(t) => tickets.push(t),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
            off += n as u64;
        }
        collect(tickets, err)
    }

    /// Write `buf` at `offset`; with `fua` it is durable when this returns
    /// (NBD FUA if the server supports it, else a FLUSH after the write).
    pub fn write(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(());
        }
        self.check_range("write", offset, len)?;
        self.check_aligned("write", offset, len)?;
        let native_fua = fua && self.has(FLAG_SEND_FUA);
        let flags = if native_fua { CMD_FLAG_FUA } else { 0 };
        let max = self.inner.max_request as usize;
        let mut tickets = Vec::new();
        let mut err = None;
        let mut off = offset;
        for chunk in buf.chunks(max) {
            match self.submit(CMD_WRITE, flags, off, chunk.len() as u32, Some(chunk), None) {
                Ok(t) => tickets.push(t),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
            off += chunk.len() as u64;
        }
        collect(tickets, err)?;
        if fua && !native_fua {
            self.flush()?;
        }
        Ok(())
    }

    /// [`write`](Self::write) with the payload spliced from `data`'s pipe,
    /// which this consumes (send a [`Relayed::dup`] to keep the original).
    /// Over TLS, or beyond the server's limits, the bytes go through memory.
    pub fn write_relayed(&self, data: &mut Relayed, offset: u64, fua: bool) -> io::Result<()> {
        let len = data.len() as u64;
        if !self.relays(offset, data.len()) {
            return self.write(&data.take_bytes()?, offset, fua);
        }
        self.check_range("write", offset, len)?;
        let native_fua = fua && self.has(FLAG_SEND_FUA);
        let flags = if native_fua { CMD_FLAG_FUA } else { 0 };
        self.submit_relayed_write(flags, offset, data)?.wait()?;
        if fua && !native_fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Make `[offset, offset + len)` read as zeroes. Without server support
    /// for WRITE_ZEROES, zero buffers are written instead.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_range("write_zeroes", offset, len)?;
        self.check_aligned("write_zeroes", offset, len)?;
        if !self.has(FLAG_SEND_WRITE_ZEROES) {
            let zeroes = vec![0u8; len.min(u64::from(self.inner.max_request)) as usize];
            let mut off = offset;
            while off < offset + len {
                let n = (offset + len - off).min(zeroes.len() as u64) as usize;
                self.write(&zeroes[..n], off, false)?;
                off += n as u64;
            }
            if fua {
                self.flush()?;
            }
            return Ok(());
        }
        let native_fua = fua && self.has(FLAG_SEND_FUA);
        let flags = if native_fua { CMD_FLAG_FUA } else { 0 };
        self.ranged(CMD_WRITE_ZEROES, flags, offset, len)?;
        if fua && !native_fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Tell the server `[offset, offset + len)` is no longer needed. A no-op
    /// when the server does not support TRIM (it is only a hint).
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        if len == 0 || !self.has(FLAG_SEND_TRIM) {
            return Ok(());
        }
        self.check_range("trim", offset, len)?;
        self.check_aligned("trim", offset, len)?;
        let flags = if fua && self.has(FLAG_SEND_FUA) {
            CMD_FLAG_FUA
        } else {
            0
        };
        self.ranged(CMD_TRIM, flags, offset, len)
    }

    /// Ask the server to prefetch a range. A no-op without server support.
    pub fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 || !self.has(FLAG_SEND_CACHE) {
            return Ok(());
        }
        self.check_range("cache", offset, len)?;
        self.ranged(CMD_CACHE, 0, offset, len)
    }

    /// Make every completed write durable. Servers that do not advertise
    /// FLUSH have nothing to flush.
    pub fn flush(&self) -> io::Result<()> {
        if !self.has(FLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.submit(CMD_FLUSH, 0, 0, 0, None, None)?.wait()
    }

    /// Send a request with no payload over a long range, split into pieces.
    fn ranged(&self, cmd: u16, flags: u16, offset: u64, len: u64) -> io::Result<()> {
        let min = u64::from(self.inner.sizes.minimum);
        let step = (MAX_ZERO_REQUEST / min).max(1) * min;
        let mut tickets = Vec::new();
        let mut err = None;
        let mut off = offset;
        let end = offset + len;
        while off < end {
            let n = (end - off).min(step);
            match self.submit(cmd, flags, off, n as u32, None, None) {
                Ok(t) => tickets.push(t),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
            off += n;
        }
        collect(tickets, err)
    }
}

/// Open the connection to the server, trying each address of a host name
/// in turn.
fn dial(uri: &str, endpoint: &Endpoint, timeout: Duration) -> io::Result<Stream> {
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{uri}: {e}"));
    Ok(match endpoint {
        Endpoint::Tcp { host, port } => {
            let mut last = None;
            let mut conn = None;
            for addr in (host.as_str(), *port).to_socket_addrs().map_err(ctx)? {
                match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(s) => {
                        conn = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let s = match conn {
                Some(s) => s,
                None => {
                    return Err(ctx(last.unwrap_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, "host has no address")
                    })))
                }
            };
            let _ = s.set_nodelay(true);
            Stream::Tcp(s)
        }
        Endpoint::Unix(path) => Stream::unix(UnixStream::connect(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{uri}: connecting to {}: {e}", path.display()),
            )
        })?),
    })
}

impl Drop for Client {
    fn drop(&mut self) {
        let inner = &self.inner;
        let alive = inner.pending.lock().dead.is_none();
        if alive {
            // Soft disconnect; nobody else can be sending (we are dropped).
            let disc = Request {
                flags: 0,
                command: CMD_DISC,
                cookie: 0,
                offset: 0,
                length: 0,
            }
            .encode();
            let _g = inner.send_lock.lock();
            let _ = inner.stream.write_all(&disc);
            // Under TLS, end the session properly (close_notify) too.
            inner.stream.close_notify();
        }
        inner.kill("client closed".into());
        if let Some(h) = self.reader.take() {
            // The last reference can go in a read's callback, on the reader
            // itself, which then ends on its own.
            if h.thread().id() != thread::current().id() {
                let _ = h.join();
            }
        }
    }
}
