//! A synchronous, thread-safe NBD client.
//!
//! Many threads may call it at once, and each call may put several requests
//! in flight (large requests are split at the server's maximum). Requests
//! are written under one send lock; one reader thread reads every reply and
//! dispatches it by cookie. READ data goes from the socket straight into the
//! caller's buffer (the reader thread `read`s into it while the caller
//! waits), so there is no intermediate copy on the read path either.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::marker::PhantomData;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::export::BlockSizes;
use crate::net::Stream;
use crate::proto::{self, *};
use crate::tls::TlsClientConfig;

/// Default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed libnbd-style URI: `nbd://HOST[:PORT]/[EXPORT]` or
/// `nbd+unix:///[EXPORT]?socket=PATH`, and with TLS `nbds://[USER@]HOST...`
/// or `nbds+unix://[USER@]/...` with libnbd's `tls-certificates=DIR`,
/// `tls-psk-file=FILE`, `tls-username=NAME`, `tls-verify-peer=false` and
/// `tls-hostname=NAME` query parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub endpoint: Endpoint,
    pub export: String,
    /// TLS settings of an `nbds` URI.
    pub tls: Option<TlsClientConfig>,
}

fn bad_uri(uri: &str, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("invalid NBD URI {uri:?}: {why}"),
    )
}

fn percent_decode(uri: &str, s: &str) -> io::Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad_uri(uri, "bad percent-encoding"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad_uri(uri, "not UTF-8 after percent-decoding"))
}

impl NbdUri {
    pub fn parse(uri: &str) -> io::Result<Self> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| bad_uri(uri, "missing scheme"))?;
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, q),
            None => (rest, ""),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        let export = percent_decode(uri, path)?;
        if export.len() > MAX_STRING_LEN || export.contains('\0') {
            return Err(bad_uri(uri, "export name too long or contains NUL"));
        }
        let (scheme, tls) = match scheme {
            "nbds" => ("nbd", true),
            "nbds+tcp" => ("nbd+tcp", true),
            "nbds+unix" => ("nbd+unix", true),
            s => (s, false),
        };
        let mut socket = None;
        let mut t = TlsClientConfig {
            verify_peer: true,
            ..TlsClientConfig::default()
        };
        let mut tls_params = false;
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = || percent_decode(uri, v);
            match k {
                "socket" => socket = Some(v()?),
                "tls-certificates" => t.certificates = Some(PathBuf::from(v()?)),
                "tls-psk-file" => t.psk_file = Some(PathBuf::from(v()?)),
                "tls-username" => t.username = Some(v()?),
                "tls-hostname" => t.hostname = Some(v()?),
                "tls-verify-peer" => {
                    t.verify_peer = match v()?.as_str() {
                        "true" | "on" | "yes" | "1" => true,
                        "false" | "off" | "no" | "0" => false,
                        _ => return Err(bad_uri(uri, "tls-verify-peer must be true or false")),
                    }
                }
                _ => {}
            }
            tls_params |= k.starts_with("tls-");
        }
        if tls_params && !tls {
            return Err(bad_uri(uri, "tls-* parameters need an nbds:// URI"));
        }
        let authority = match authority.rsplit_once('@') {
            Some(_) if !tls => return Err(bad_uri(uri, "user names need an nbds:// URI")),
            Some((user, _)) if user.contains(':') => {
                return Err(bad_uri(uri, "passwords are not supported"))
            }
            Some((user, host)) => {
                t.username = Some(percent_decode(uri, user)?);
                host
            }
            None => authority,
        };
        let endpoint = match scheme {
            "nbd" | "nbd+tcp" => {
                if socket.is_some() {
                    return Err(bad_uri(uri, "socket= is only valid with nbd+unix://"));
                }
                let (host, port) = if let Some(r) = authority.strip_prefix('[') {
                    let (h, after) = r
                        .split_once(']')
                        .ok_or_else(|| bad_uri(uri, "unterminated [IPv6] host"))?;
                    match after.strip_prefix(':') {
                        Some(p) => (h, Some(p)),
                        None if after.is_empty() => (h, None),
                        None => return Err(bad_uri(uri, "garbage after [IPv6] host")),
                    }
                } else {
                    match authority.rsplit_once(':') {
                        Some((h, p)) => (h, Some(p)),
                        None => (authority, None),
                    }
                };
                let port = match port {
                    None | Some("") => DEFAULT_PORT,
                    Some(p) => p.parse().map_err(|_| bad_uri(uri, "bad port"))?,
                };
                let host = if host.is_empty() { "localhost" } else { host };
                if t.hostname.is_none() {
                    t.hostname = Some(host.to_owned());
                }
                Endpoint::Tcp {
                    host: host.to_owned(),
                    port,
                }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad_uri(uri, "nbd+unix:// takes no host (use nbd+unix:///)"));
                }
                let s = socket.ok_or_else(|| bad_uri(uri, "missing ?socket=PATH"))?;
                if s.is_empty() {
                    return Err(bad_uri(uri, "empty socket path"));
                }
                Endpoint::Unix(PathBuf::from(s))
            }
            _ => {
                return Err(bad_uri(
                    uri,
                    "scheme must be nbd://, nbd+unix://, nbds:// or nbds+unix://",
                ))
            }
        };
        Ok(Self {
            endpoint,
            export,
            tls: tls.then_some(t),
        })
    }
}

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
    fn into_io(self) -> io::Error {
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

/// The caller's buffer a READ reply is written into.
struct RawBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pointer is only dereferenced by the reader thread while the
// thread that lent the buffer is blocked in `Ticket` waiting for the op to
// complete (see `Ticket`), so the buffer is never accessed from two threads
// at once.
unsafe impl Send for RawBuf {}
// SAFETY: as above; shared references to `RawBuf` never access the memory.
unsafe impl Sync for RawBuf {}

struct OpState {
    done: bool,
    result: Option<io::Result<()>>,
    /// First error chunk of a structured reply.
    error: Option<io::Error>,
    /// READ bytes delivered so far (data and hole chunks).
    received: u64,
}

/// One request in flight.
struct Op {
    command: u16,
    offset: u64,
    length: u32,
    /// Where a READ's data goes: consecutive pieces of the caller's memory
    /// (empty for other commands).
    buf: Vec<RawBuf>,
    state: Mutex<OpState>,
    cv: Condvar,
}

impl Op {
    fn complete(&self, r: io::Result<()>) {
        let mut st = self.state.lock();
        st.result = Some(r);
        st.done = true;
        self.cv.notify_all();
    }
}

struct Pending {
    ops: HashMap<u64, Arc<Op>>,
    /// Set by the reader when it stops; no op is accepted after that.
    dead: Option<String>,
    /// Why another thread tore the connection down (for messages).
    kill_reason: Option<String>,
}

struct Inner {
    uri: String,
    stream: Stream,
    send_lock: Mutex<()>,
    pending: Mutex<Pending>,
    next_cookie: AtomicU64,
    size: u64,
    flags: u16,
    sizes: BlockSizes,
    structured: bool,
    /// Largest READ/WRITE sent in one request.
    max_request: u32,
    request_timeout: Option<Duration>,
}

/// What the handshake settled.
struct Negotiated {
    size: u64,
    flags: u16,
    sizes: Option<BlockSizes>,
    structured: bool,
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

/// Zero and trim requests are split at this size (aligned down to the
/// minimum block size): well inside the 32-bit length field.
const MAX_ZERO_REQUEST: u64 = 1 << 30;
/// Cap on any single READ/WRITE, whatever the server allows.
const MAX_IO_REQUEST: u32 = 32 * 1024 * 1024;

fn proto_err(uri: &str, what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{uri}: NBD protocol error ({what}): {e}"),
    )
}

impl Client {
    /// Connect with default options.
    pub fn connect(uri: &str) -> io::Result<Self> {
        Self::connect_with(uri, &ClientOptions::default())
    }

    pub fn connect_with(uri: &str, opts: &ClientOptions) -> io::Result<Self> {
        let parsed = NbdUri::parse(uri)?;
        let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{uri}: {e}"));
        let stream = match &parsed.endpoint {
            Endpoint::Tcp { host, port } => {
                let mut last = None;
                let mut conn = None;
                for addr in (host.as_str(), *port).to_socket_addrs().map_err(ctx)? {
                    match TcpStream::connect_timeout(&addr, opts.connect_timeout) {
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
            Endpoint::Unix(path) => Stream::Unix(UnixStream::connect(path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{uri}: connecting to {}: {e}", path.display()),
                )
            })?),
        };
        stream
            .set_timeouts(Some(opts.connect_timeout))
            .map_err(ctx)?;
        let mut stream = stream;
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
        per_run
            .into_iter()
            .zip(results)
            .map(|(tickets, err)| collect(tickets, err))
            .collect()
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

    /// Put one request in flight. For READ, `dest` is where the reply's
    /// data will be written; the returned ticket keeps it borrowed.
    fn submit<'a>(
        &'a self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
        dest: Option<&'a mut [u8]>,
    ) -> io::Result<Ticket<'a>> {
        let payload = payload.map(IoSlice::new);
        self.submit_v(
            command,
            flags,
            offset,
            length,
            payload.as_slice(),
            dest.into_iter().collect(),
        )
    }

    /// [`submit`](Self::submit) with the payload gathered from, or the
    /// reply's data scattered into, several buffers: one request however
    /// many cache slots it spans.
    fn submit_v<'a>(
        &'a self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[IoSlice<'_>],
        dest: Vec<&'a mut [u8]>,
    ) -> io::Result<Ticket<'a>> {
        let inner = &*self.inner;
        debug_assert!(
            dest.is_empty() || dest.iter().map(|d| d.len()).sum::<usize>() == length as usize
        );
        debug_assert!(
            payload.is_empty() || payload.iter().map(|p| p.len()).sum::<usize>() == length as usize
        );
        let cookie = inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let op = Arc::new(Op {
            command,
            offset,
            length,
            buf: dest
                .into_iter()
                .map(|b| RawBuf {
                    ptr: b.as_mut_ptr(),
                    len: b.len(),
                })
                .collect(),
            state: Mutex::new(OpState {
                done: false,
                result: None,
                error: None,
                received: 0,
            }),
            cv: Condvar::new(),
        });
        {
            let mut p = inner.pending.lock();
            if let Some(why) = &p.dead {
                return Err(inner.lost(why));
            }
            p.ops.insert(cookie, op.clone());
        }
        // From here on the ticket must be waited for (its Drop does that).
        let ticket = Ticket {
            inner,
            op,
            _buf: PhantomData,
        };
        let hdr = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode();
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(1 + payload.len());
        iov.push(IoSlice::new(&hdr));
        iov.extend(payload.iter().map(|p| IoSlice::new(p)));
        let sent = {
            let _g = inner.send_lock.lock();
            inner.stream.write_all_vectored(&mut iov)
        };
        if let Err(e) = sent {
            // The stream may be out of sync now: end the connection. The
            // reader fails every request in flight, this one included.
            inner.kill(format!("sending {} failed: {e}", command_name(command)));
        }
        Ok(ticket)
    }
}

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

fn collect(tickets: Vec<Ticket<'_>>, mut err: Option<io::Error>) -> io::Result<()> {
    for t in tickets {
        if let Err(e) = t.wait() {
            err.get_or_insert(e);
        }
    }
    err.map_or(Ok(()), Err)
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
            let _ = h.join();
        }
    }
}

/// A request in flight. Waiting consumes it; dropping it without waiting
/// still blocks until the request is finished, because the reader thread
/// may be writing into the buffer it borrows.
struct Ticket<'a> {
    inner: &'a Inner,
    op: Arc<Op>,
    _buf: PhantomData<&'a mut [u8]>,
}

impl Ticket<'_> {
    /// Wait for the reply; the later Drop finds the op done.
    fn wait(self) -> io::Result<()> {
        self.wait_done()
    }

    fn wait_done(&self) -> io::Result<()> {
        let deadline = self.inner.request_timeout.map(|t| (t, Instant::now() + t));
        let mut st = self.op.state.lock();
        let mut killed = false;
        while !st.done {
            match deadline {
                Some((t, d)) if !killed => {
                    if self.op.cv.wait_until(&mut st, d).timed_out() && !st.done {
                        drop(st);
                        self.inner.kill(format!(
                            "{} at offset {} timed out after {t:?}",
                            command_name(self.op.command),
                            self.op.offset
                        ));
                        killed = true;
                        st = self.op.state.lock();
                    }
                }
                _ => self.op.cv.wait(&mut st),
            }
        }
        st.result
            .take()
            .unwrap_or_else(|| Err(io::Error::other("request result already taken")))
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let done = self.op.state.lock().done;
        if !done {
            let _ = self.wait_done();
        }
    }
}

impl Inner {
    fn lost(&self, why: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("{}: NBD connection lost: {why}", self.uri),
        )
    }

    /// Tear the connection down from any thread. The reader notices (its
    /// read fails) and fails every request in flight; it is the only thread
    /// that completes requests, so no buffer is released while it may still
    /// be writing into it.
    fn kill(&self, why: String) {
        {
            let mut p = self.pending.lock();
            if p.kill_reason.is_none() {
                p.kill_reason = Some(why);
            }
        }
        self.stream.shutdown(Shutdown::Both);
    }

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

    /// Read `n` bytes of reply data straight into the op's buffer at `at`.
    fn read_into(&self, op: &Op, at: u64, n: usize) -> io::Result<()> {
        // SAFETY: called on the reader thread for an op in flight; the
        // slices are dropped before this returns.
        let mut dst = unsafe { self.op_slices(op, at, n)? };
        read_exact_scatter(&self.stream, &mut dst)
    }

    fn zero_into(&self, op: &Op, at: u64, n: usize) -> io::Result<()> {
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

    /// Read and dispatch one reply (or one structured chunk).
    fn read_reply(&self) -> io::Result<()> {
        let uri = &self.uri;
        let mut hb = [0u8; STRUCTURED_REPLY_LEN];
        self.stream.read_exact(&mut hb[..4])?;
        let hlen = ReplyHeader::header_len(&hb[..4]).map_err(|e| proto_err(uri, "reply", e))?;
        self.stream.read_exact(&mut hb[4..hlen])?;
        let hdr = ReplyHeader::parse(&hb[..hlen]).map_err(|e| proto_err(uri, "reply", e))?;
        match hdr {
            ReplyHeader::Simple(r) => {
                let op = self.pending.lock().ops.remove(&r.cookie).ok_or_else(|| {
                    proto_err(uri, "reply", format!("unknown cookie {:#x}", r.cookie))
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
            }
            ReplyHeader::Structured(c) => {
                let op = self
                    .pending
                    .lock()
                    .ops
                    .get(&c.cookie)
                    .cloned()
                    .ok_or_else(|| {
                        proto_err(uri, "reply", format!("unknown cookie {:#x}", c.cookie))
                    })?;
                if !self.structured {
                    return Err(proto_err(uri, "reply", "unnegotiated structured reply"));
                }
                let req_end = op.offset + u64::from(op.length);
                let in_req = |off: u64, n: u64| {
                    off >= op.offset && off.checked_add(n).is_some_and(|e| e <= req_end)
                };
                match c.reply_type {
                    REPLY_TYPE_NONE => {
                        if c.length != 0 {
                            return Err(proto_err(uri, "reply", "NONE chunk with payload"));
                        }
                    }
                    REPLY_TYPE_OFFSET_DATA => {
                        if op.command != CMD_READ || c.length < 9 {
                            return Err(proto_err(uri, "reply", "bad OFFSET_DATA chunk"));
                        }
                        let mut ob = [0u8; 8];
                        self.stream.read_exact(&mut ob)?;
                        let off = u64::from_be_bytes(ob);
                        let n = u64::from(c.length - 8);
                        if !in_req(off, n) {
                            return Err(proto_err(uri, "reply", "data outside the request"));
                        }
                        self.read_into(&op, off - op.offset, n as usize)?;
                        op.state.lock().received += n;
                    }
                    REPLY_TYPE_OFFSET_HOLE => {
                        if op.command != CMD_READ {
                            return Err(proto_err(uri, "reply", "hole for a non-READ"));
                        }
                        let p = self.read_payload(c.length, 12)?;
                        let (off, n) =
                            proto::parse_offset_hole(&p).map_err(|e| proto_err(uri, "hole", e))?;
                        if !in_req(off, n.into()) {
                            return Err(proto_err(uri, "reply", "hole outside the request"));
                        }
                        self.zero_into(&op, off - op.offset, n as usize)?;
                        op.state.lock().received += u64::from(n);
                    }
                    REPLY_TYPE_BLOCK_STATUS => {
                        // Never requested by this client; skip it.
                        self.stream.discard(c.length.into())?;
                    }
                    t if t & REPLY_TYPE_ERROR_BIT != 0 => {
                        let p = self.read_payload(c.length, 64 * 1024)?;
                        let ec = ErrorChunk::parse(t, &p)
                            .map_err(|e| proto_err(uri, "error chunk", e))?;
                        let err = self.server_error(&op, ec.error, ec.message);
                        op.state.lock().error.get_or_insert(err);
                    }
                    t => {
                        return Err(proto_err(uri, "reply", format!("unknown chunk type {t}")));
                    }
                }
                if c.is_done() {
                    self.pending.lock().ops.remove(&c.cookie);
                    let mut st = op.state.lock();
                    let r = match st.error.take() {
                        Some(e) => Err(e),
                        None if op.command == CMD_READ && st.received != u64::from(op.length) => {
                            Err(proto_err(
                                uri,
                                "reply",
                                format!(
                                    "READ reply covered {} of {} bytes",
                                    st.received, op.length
                                ),
                            ))
                        }
                        None => Ok(()),
                    };
                    drop(st);
                    op.complete(r);
                }
            }
        }
        Ok(())
    }
}

fn reader_loop(inner: &Inner) {
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
        (msg, p.ops.drain().map(|(_, op)| op).collect())
    };
    inner.stream.shutdown(Shutdown::Both);
    for op in ops {
        op.complete(Err(inner.lost(&msg)));
    }
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

/// Read one option reply (header + data, bounded).
fn read_option_reply(
    stream: &Stream,
    uri: &str,
    option: u32,
) -> io::Result<(OptionReplyHeader, Vec<u8>)> {
    let mut hb = [0u8; OPTION_REPLY_HEADER_LEN];
    stream.read_exact(&mut hb)?;
    let h = OptionReplyHeader::parse(&hb).map_err(|e| proto_err(uri, "option reply", e))?;
    if h.option != option {
        return Err(proto_err(
            uri,
            "option reply",
            format!("reply to option {} while waiting for {option}", h.option),
        ));
    }
    if h.length > MAX_OPTION_LEN {
        return Err(proto_err(
            uri,
            "option reply",
            format!("{} bytes", h.length),
        ));
    }
    let mut data = vec![0u8; h.length as usize];
    stream.read_exact(&mut data)?;
    Ok((h, data))
}

fn option_error(uri: &str, what: &str, h: &OptionReplyHeader, data: &[u8]) -> io::Error {
    let msg = String::from_utf8_lossy(data);
    let kind = match h.reply_type {
        REP_ERR_UNKNOWN => io::ErrorKind::NotFound,
        REP_ERR_UNSUP | REP_ERR_TLS_REQD => io::ErrorKind::Unsupported,
        REP_ERR_POLICY => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(
        kind,
        format!(
            "{uri}: server refused {what}: {}{}{}",
            reply_type_name(h.reply_type),
            if msg.is_empty() { "" } else { ": " },
            msg
        ),
    )
}

/// Option haggling; with `tls`, STARTTLS first, and `stream` becomes the
/// TLS session.
fn handshake(
    stream: &mut Stream,
    uri: &str,
    export: &str,
    tls: Option<&TlsClientConfig>,
    opts: &ClientOptions,
) -> io::Result<Negotiated> {
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{uri}: NBD handshake: {e}"));
    let mut g = [0u8; GREETING_LEN];
    stream.read_exact(&mut g).map_err(ctx)?;
    let hflags = parse_greeting(&g).map_err(|e| proto_err(uri, "greeting", e))?;
    let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let mut cflags = 0u32;
    if fixed {
        cflags |= FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    stream.write_all(&cflags.to_be_bytes()).map_err(ctx)?;

    if let Some(t) = tls {
        if !fixed {
            return Err(ctx(io::Error::new(
                io::ErrorKind::Unsupported,
                "the server cannot do STARTTLS (no fixed newstyle negotiation)",
            )));
        }
        stream
            .write_all(&OptionRequest::StartTls.encode())
            .map_err(ctx)?;
        let (h, data) = read_option_reply(stream, uri, OPT_STARTTLS).map_err(ctx)?;
        if h.reply_type != REP_ACK {
            return Err(option_error(uri, "STARTTLS", &h, &data));
        }
        let session = t
            .connect(stream.try_clone().map_err(ctx)?, Some(opts.connect_timeout))
            .map_err(ctx)?;
        *stream = Stream::Tls(Box::new(session));
    }
    let stream = &*stream;

    let mut structured = false;
    if fixed {
        if opts.structured_replies {
            stream
                .write_all(&OptionRequest::StructuredReply.encode())
                .map_err(ctx)?;
            let (h, _) = read_option_reply(stream, uri, OPT_STRUCTURED_REPLY).map_err(ctx)?;
            structured = h.reply_type == REP_ACK;
        }
        let go = OptionRequest::Info {
            go: true,
            name: export.to_owned(),
            requests: vec![INFO_BLOCK_SIZE],
        };
        stream.write_all(&go.encode()).map_err(ctx)?;
        let mut export_info = None;
        let mut sizes = None;
        loop {
            let (h, data) = read_option_reply(stream, uri, OPT_GO).map_err(ctx)?;
            match h.reply_type {
                REP_INFO => match Info::parse(&data).map_err(|e| proto_err(uri, "info", e))? {
                    Info::Export { size, flags } => export_info = Some((size, flags)),
                    Info::BlockSize(bs) => sizes = Some(bs),
                    _ => {}
                },
                REP_ACK => {
                    let (size, flags) = export_info
                        .ok_or_else(|| proto_err(uri, "GO", "server sent no NBD_INFO_EXPORT"))?;
                    return Ok(Negotiated {
                        size,
                        flags,
                        sizes,
                        structured,
                    });
                }
                REP_ERR_UNSUP => break, // old server: fall back to EXPORT_NAME
                t if t & REP_FLAG_ERROR != 0 => {
                    return Err(option_error(uri, &format!("export {export:?}"), &h, &data));
                }
                _ => {} // unknown non-error replies are ignored
            }
        }
    }
    stream
        .write_all(&OptionRequest::ExportName(export.to_owned()).encode())
        .map_err(ctx)?;
    let mut b = [0u8; EXPORT_NAME_REPLY_LEN];
    stream.read_exact(&mut b).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{uri}: server closed the connection after EXPORT_NAME {export:?} (unknown export?): {e}"),
        )
    })?;
    let (size, flags) = parse_export_name_reply(&b).map_err(|e| proto_err(uri, "export", e))?;
    if !no_zeroes {
        stream.discard(124).map_err(ctx)?;
    }
    Ok(Negotiated {
        size,
        flags,
        sizes: None,
        structured,
    })
}
