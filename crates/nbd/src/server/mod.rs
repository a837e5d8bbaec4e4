//! The NBD server: fixed newstyle handshake, then the transmission phase
//! with many requests in flight per connection, answered out of order.
//!
//! # Threads
//! * One accept loop per listener (`serve_tcp` / `serve_unix`).
//! * One reader thread per connection. It parses every request and does
//!   only what needs the socket, so a request that waits never holds up the
//!   ones behind it. For a WRITE it stages the write (the export takes cache
//!   slots without waiting), receives the payload from the socket straight
//!   into them (`readv`, no intermediate buffer), and hands the commit
//!   (persistence, origin write, reply) to the commit pool, unless the
//!   export says the commit cannot wait (one CPU fence on pmem): that one
//!   it runs itself. A write the export cannot stage without waiting is
//!   received into a buffer and made by a worker that may wait.
//! * Two worker pools shared by all connections, each growing on demand up
//!   to `max_workers`: one for commits, one for everything else (reads that
//!   miss, buffered writes, FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS).
//!   Commits never wait for queued work, so they always get threads.
//!
//! Requests finish and are answered in any order, as the protocol allows.
//! Replies are written under a per-connection send lock. A READ reply is one
//! `writev` of the reply header and the slices the export passes to `sink`,
//! i.e. straight from the export's memory (the cache mapping) to the socket.
//!
//! # Bad input
//! A protocol violation ends that one connection; a bad request gets an
//! error reply and nothing is executed for it. Nothing here panics on
//! client input, and a connection never touches another one's state.

use std::io::{self, IoSlice, IoSliceMut, Write};
use std::net::{Shutdown, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tracing::{debug, info, warn};

use crate::conns::{ConnectionInfo, Connections, Phase};
use crate::export::{BlockSizes, Export, ExportError, Staged, ZeroFlags};
use crate::net::{poll_readable, Readiness, Stream};
use crate::proto::{self, *};
use crate::tls::{TlsMode, TlsServer, TlsStats};

mod handshake;
mod pool;

use handshake::{handshake, Hangup, Negotiated};
use pool::Pool;

/// Default TCP listen address (the IANA NBD port on loopback).
pub const DEFAULT_TCP_ADDR: &str = "127.0.0.1:10809";

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The one export's name. Clients may also ask for "" (the default
    /// export) and get this one.
    pub export_name: String,
    /// Refuse writes even if the export accepts them.
    pub read_only: bool,
    /// Sent with NBD_INFO_DESCRIPTION and NBD_OPT_LIST.
    pub description: Option<String>,
    /// Threads the shared worker pool keeps (it grows on demand).
    pub workers: usize,
    /// Most threads in each of the two worker pools (requests, and write
    /// commits). Enough for every request of a few busy connections to
    /// block on the origin at once.
    pub max_workers: usize,
    /// Requests one connection may have queued or executing before its
    /// reader stops reading more (back-pressure).
    pub max_in_flight: usize,
    /// Bound on a single socket read or write once a message has started
    /// (and on handing a reply to a client that does not read). Idle waits
    /// between requests are not bounded.
    pub io_timeout: Option<Duration>,
    /// NBD_OPT_STARTTLS: credentials and whether TLS is offered or required.
    /// `None` is `--tls off`.
    pub tls: Option<Arc<TlsServer>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            export_name: String::new(),
            read_only: false,
            description: None,
            workers: 8,
            max_workers: 256,
            max_in_flight: 64,
            io_timeout: Some(Duration::from_secs(60)),
            tls: None,
        }
    }
}

/// Stops a running [`Server`]: accept loops return, connections finish the
/// requests they have read, send the replies and close.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    state: Arc<ShutdownState>,
}

#[derive(Debug)]
struct ShutdownState {
    flag: AtomicBool,
    /// Written once on shutdown and never drained: every thread polling the
    /// other end sees it readable, level-triggered, forever after.
    wake_tx: UnixStream,
    wake_rx: UnixStream,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        if !self.state.flag.swap(true, Ordering::SeqCst) {
            // One byte, never read: see `ShutdownState::wake_tx`.
            let _ = (&self.state.wake_tx).write(&[1]);
        }
    }

    pub fn is_shutdown(&self) -> bool {
        self.state.flag.load(Ordering::SeqCst)
    }

    fn wake_fd(&self) -> RawFd {
        self.state.wake_rx.as_raw_fd()
    }
}

/// An NBD server for one export.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

struct Shared {
    export: Arc<dyn Export>,
    config: ServerConfig,
    size: u64,
    sizes: BlockSizes,
    read_only: bool,
    block_status: bool,
    multi_conn: bool,
    shutdown: ShutdownHandle,
    /// Reads, buffered writes and everything else that may wait.
    pool: Pool,
    /// Second halves of staged writes. They never wait for a queued job
    /// (only for running ones, the origin and persistence), so while the
    /// staged writes they finish hold writer locks, jobs in `pool` waiting
    /// for those locks cannot starve them of threads.
    commits: Pool,
    active: AtomicUsize,
    next_conn_id: AtomicU64,
    /// Open connections and their TLS state, for `stats`.
    conns: Connections,
}

impl Server {
    /// A server for `export`. Fails if the export's block sizes break the
    /// protocol's rules (clients would reject them).
    pub fn new(export: Arc<dyn Export>, config: ServerConfig) -> io::Result<Self> {
        let sizes = export.block_sizes();
        proto::validate_block_sizes(&sizes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("export block sizes {sizes:?}: {e}"),
            )
        })?;
        if config.export_name.len() > MAX_STRING_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "export name longer than 4096 bytes",
            ));
        }
        let size = export.size();
        // Probe once whether the export tracks allocation; only then is the
        // base:allocation context offered.
        let block_status = size > 0 && export.block_status(0, size.min(512)).is_some();
        let read_only = config.read_only || export.read_only();
        let multi_conn = export.multi_conn();
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        let pool = Pool::new("nbd-worker", config.workers, config.max_workers)?;
        let commits = Pool::new("nbd-commit", 2, config.max_workers)?;
        Ok(Self {
            shared: Arc::new(Shared {
                export,
                size,
                sizes,
                read_only,
                block_status,
                multi_conn,
                shutdown: ShutdownHandle {
                    state: Arc::new(ShutdownState {
                        flag: AtomicBool::new(false),
                        wake_tx,
                        wake_rx,
                    }),
                },
                pool,
                commits,
                active: AtomicUsize::new(0),
                next_conn_id: AtomicU64::new(1),
                conns: Connections::default(),
                config,
            }),
        })
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shared.shutdown.clone()
    }

    /// The TLS mode and handshake counters (`None` when TLS is off).
    pub fn tls_stats(&self) -> Option<(TlsMode, TlsStats)> {
        self.shared.config.tls.as_ref().map(|t| (t.mode, t.stats()))
    }

    /// Connections currently open (handshaking or transmitting).
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Every open connection: its peer, age, phase and TLS state.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.shared.conns.snapshot()
    }

    /// The live registry behind [`connections`](Self::connections), for a
    /// reporter that must not keep the server (and its export) alive.
    pub fn connection_registry(&self) -> Connections {
        self.shared.conns.clone()
    }

    /// Bind `addr` and serve until shut down.
    pub fn listen_tcp(&self, addr: impl ToSocketAddrs) -> io::Result<()> {
        self.serve_tcp(TcpListener::bind(addr)?)
    }

    /// Bind a Unix socket at `path` (replacing a stale socket file) and
    /// serve until shut down; the socket file is removed afterwards.
    pub fn listen_unix(&self, path: impl AsRef<Path>) -> io::Result<()> {
        let path = path.as_ref();
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() && UnixStream::connect(path).is_err() {
                std::fs::remove_file(path)?;
            }
        }
        let listener = UnixListener::bind(path)?;
        let r = self.serve_unix(listener);
        let _ = std::fs::remove_file(path);
        r
    }

    /// Serve connections from `listener` until shut down; returns once every
    /// connection accepted here has finished.
    pub fn serve_tcp(&self, listener: TcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let fd = listener.as_raw_fd();
        self.accept_loop(fd, || {
            let (s, _) = listener.accept()?;
            let _ = s.set_nodelay(true);
            Ok(Stream::Tcp(s))
        })
    }

    /// As [`serve_tcp`](Self::serve_tcp), for a Unix socket.
    pub fn serve_unix(&self, listener: UnixListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let fd = listener.as_raw_fd();
        self.accept_loop(fd, || Ok(Stream::Unix(listener.accept()?.0)))
    }

    /// Serve one already-connected stream on the calling thread (handshake
    /// and transmission). Returns when the connection ends.
    pub fn serve_stream(&self, stream: Stream) {
        let _ = stream.set_nonblocking(false);
        self.shared.active.fetch_add(1, Ordering::SeqCst);
        let id = self.shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let peer = stream.peer();
        // Dropped on every way out, a panic included.
        let _listed = self.shared.conns.register(id, peer.clone());
        // A panic (in the export, say) ends this connection only.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            connection(&self.shared, stream, id, &peer)
        }));
        if r.is_err() {
            warn!("nbd[{id}]: connection handler panicked; connection closed");
        }
        self.shared.active.fetch_sub(1, Ordering::SeqCst);
    }

    fn accept_loop(
        &self,
        listen_fd: RawFd,
        accept: impl Fn() -> io::Result<Stream>,
    ) -> io::Result<()> {
        let sd = &self.shared.shutdown;
        let mut conns: Vec<JoinHandle<()>> = Vec::new();
        let result = loop {
            if sd.is_shutdown() {
                break Ok(());
            }
            match poll_readable(listen_fd, Some(sd.wake_fd()), None) {
                Ok(Readiness::Woken) => break Ok(()),
                Ok(_) => {}
                Err(e) => break Err(e),
            }
            match accept() {
                Ok(stream) => {
                    let server = self.clone();
                    match thread::Builder::new()
                        .name("nbd-conn".into())
                        .spawn(move || server.serve_stream(stream))
                    {
                        Ok(h) => conns.push(h),
                        Err(e) => warn!("nbd: cannot spawn connection thread: {e}"),
                    }
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock
                    | io::ErrorKind::Interrupted
                    | io::ErrorKind::ConnectionAborted => {}
                    _ => {
                        // EMFILE and friends: back off instead of spinning;
                        // existing connections keep being served.
                        warn!("nbd: accept failed: {e}");
                        thread::sleep(Duration::from_millis(100));
                    }
                },
            }
            conns.retain(|h| !h.is_finished());
        };
        for h in conns {
            let _ = h.join();
        }
        result
    }
}

/// A connection's life: the handshake, then the transmission phase if the
/// handshake settles one; the socket is closed on every way out.
fn connection(shared: &Arc<Shared>, stream: Stream, id: u64, peer: &str) {
    if let Err(e) = stream.set_timeouts(shared.config.io_timeout) {
        warn!("nbd[{id}] {peer}: cannot set socket timeouts: {e}");
    }
    let mut stream = stream;
    let r = handshake(shared, &mut stream, id);
    let stream = Arc::new(stream);
    match r {
        Ok(Some(neg)) => {
            shared.conns.set_phase(id, Phase::Transmission);
            debug!(
                "nbd[{id}] {peer}: transmission (structured replies: {})",
                neg.structured
            );
            transmission(shared, stream.clone(), neg, id);
        }
        Ok(None) => debug!("nbd[{id}] {peer}: ended during handshake"),
        Err(Hangup(why)) => info!("nbd[{id}] {peer}: handshake failed: {why}"),
    }
    stream.close();
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// One connection in the transmission phase, shared by its reader and the
/// workers executing its requests.
struct Conn {
    id: u64,
    stream: Arc<Stream>,
    /// Serialises replies: each reply (header + payload) is written whole.
    send_lock: Mutex<()>,
    structured: bool,
    meta_context: Option<u32>,
    in_flight: Mutex<usize>,
    in_flight_cv: Condvar,
    /// A reply could not be sent: the connection is being torn down.
    broken: AtomicBool,
}

/// An NBD error to report, with a message for structured replies.
struct ReplyError {
    errno: u32,
    message: String,
}

impl ReplyError {
    fn new(errno: u32, message: impl Into<String>) -> Self {
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
    /// Write one whole reply; on failure the connection is torn down (the
    /// reader wakes up from the shutdown and stops).
    fn send(&self, bufs: &mut [IoSlice<'_>]) -> bool {
        if self.broken.load(Ordering::SeqCst) {
            return false;
        }
        let _g = self.send_lock.lock();
        match self.stream.write_all_vectored(bufs) {
            Ok(()) => true,
            Err(e) => {
                debug!("nbd[{}]: sending a reply failed: {e}", self.id);
                self.break_conn();
                false
            }
        }
    }

    fn break_conn(&self) {
        self.broken.store(true, Ordering::SeqCst);
        self.stream.shutdown(Shutdown::Both);
    }

    fn send_ok(&self, cookie: u64) -> bool {
        self.send(&mut [IoSlice::new(&SimpleReply { error: 0, cookie }.encode())])
    }

    /// An error reply: a structured error chunk when negotiated (it carries
    /// the message), a simple reply otherwise.
    fn send_error(&self, cookie: u64, err: &ReplyError) -> bool {
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

    fn send_result(&self, cookie: u64, r: Result<(), ExportError>) -> bool {
        match r {
            Ok(()) => self.send_ok(cookie),
            Err(e) => self.send_error(cookie, &e.into()),
        }
    }

    /// A successful READ reply: header, then the export's slices, in one
    /// `writev` loop. This is the only place read data is handled, and it
    /// is not copied: the kernel reads it from the export's memory.
    fn send_read_data(&self, cookie: u64, offset: u64, len: u32, data: &[IoSlice<'_>]) -> bool {
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
                return self.send(&mut [IoSlice::new(&structured)]);
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
        self.send(&mut bufs)
    }

    fn finish_one(&self) {
        let mut n = self.in_flight.lock();
        *n = n.saturating_sub(1);
        self.in_flight_cv.notify_all();
    }
}

/// Marks a dispatched request finished, even if executing it panicked (then
/// its reply is lost, so the connection is ended rather than left waiting).
struct FinishGuard<'a>(&'a Conn);

impl Drop for FinishGuard<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.break_conn();
        }
        self.0.finish_one();
    }
}

/// Flags each command accepts. FUA is accepted on every command (the spec
/// requires that once SEND_FUA is advertised).
fn allowed_flags(cmd: u16, structured: bool) -> u16 {
    match cmd {
        CMD_READ if structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => CMD_FLAG_FUA,
    }
}

/// Check a request against the export. `Err` is the error to reply with;
/// nothing is executed for it.
fn validate(shared: &Shared, conn: &Conn, req: &Request) -> Result<(), ReplyError> {
    let cmd = req.command;
    let name = command_name(cmd);
    if req.flags & !allowed_flags(cmd, conn.structured) != 0 {
        return Err(ReplyError::new(
            EINVAL,
            format!("{name}: unsupported command flags {:#x}", req.flags),
        ));
    }
    let writes = matches!(cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && shared.read_only {
        return Err(ReplyError::new(
            EPERM,
            format!("{name}: export is read-only"),
        ));
    }
    if cmd == CMD_FLUSH {
        return Ok(());
    }
    if cmd == CMD_BLOCK_STATUS && conn.meta_context.is_none() {
        return Err(ReplyError::new(
            EINVAL,
            "BLOCK_STATUS without a negotiated metadata context",
        ));
    }
    let in_range = req.end().is_some_and(|end| end <= shared.size);
    if !in_range {
        // Writes beyond the end get ENOSPC, everything else EINVAL (spec).
        let errno = if writes { ENOSPC } else { EINVAL };
        return Err(ReplyError::new(
            errno,
            format!(
                "{name}: offset {} + length {} is beyond the export size {}",
                req.offset, req.length, shared.size
            ),
        ));
    }
    if matches!(cmd, CMD_READ | CMD_WRITE) && req.length > shared.sizes.maximum {
        return Err(ReplyError::new(
            EOVERFLOW,
            format!(
                "{name}: length {} exceeds the maximum request size {}",
                req.length, shared.sizes.maximum
            ),
        ));
    }
    let min = u64::from(shared.sizes.minimum);
    if min > 1
        && matches!(cmd, CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES)
        && (!req.offset.is_multiple_of(min) || u64::from(req.length) % min != 0)
    {
        return Err(ReplyError::new(
            EINVAL,
            format!("{name}: request not aligned to the minimum block size {min}"),
        ));
    }
    if cmd == CMD_BLOCK_STATUS && req.length == 0 {
        return Err(ReplyError::new(EINVAL, "BLOCK_STATUS of zero length"));
    }
    Ok(())
}

fn transmission(shared: &Arc<Shared>, stream: Arc<Stream>, neg: Negotiated, id: u64) {
    let conn = Arc::new(Conn {
        id,
        stream,
        send_lock: Mutex::new(()),
        structured: neg.structured,
        meta_context: neg.meta_context,
        in_flight: Mutex::new(0),
        in_flight_cv: Condvar::new(),
        broken: AtomicBool::new(false),
    });
    let wake = Some(shared.shutdown.wake_fd());
    let max_in_flight = shared.config.max_in_flight.max(1);
    let mut hb = [0u8; REQUEST_LEN];
    // Bytes of the next request header already in `hb`.
    let mut have = 0;
    loop {
        if conn.broken.load(Ordering::SeqCst) {
            break;
        }
        // Back-pressure: do not read more than the connection may queue.
        {
            let mut n = conn.in_flight.lock();
            while *n >= max_in_flight {
                conn.in_flight_cv.wait(&mut n);
            }
        }
        // The next header may have arrived with the last WRITE's payload;
        // otherwise take what is there, and only poll when nothing is.
        if have == 0 {
            if shared.shutdown.is_shutdown() {
                break;
            }
            match conn.stream.read_nowait(&mut hb) {
                Ok(Some(0)) => {
                    debug!("nbd[{id}]: client closed the connection");
                    break;
                }
                Ok(Some(n)) => have = n,
                Ok(None) => match conn.stream.poll_readable(wake, None) {
                    // Readable: the blocking read below takes the header.
                    Ok(Readiness::Ready) => {}
                    Ok(_) => break, // shutting down: stop reading requests
                    Err(e) => {
                        warn!("nbd[{id}]: poll failed: {e}");
                        break;
                    }
                },
                Err(e) => {
                    debug!("nbd[{id}]: read failed: {e}");
                    break;
                }
            }
        }
        if let Err(e) = conn.stream.read_exact(&mut hb[have..]) {
            debug!("nbd[{id}]: connection ended before a whole request header: {e}");
            break;
        }
        have = 0;
        let req = match Request::parse(&hb) {
            Ok(r) => r,
            Err(e) => {
                info!("nbd[{id}]: bad request header ({e}); closing");
                break;
            }
        };
        match req.command {
            CMD_DISC => {
                debug!("nbd[{id}]: DISC");
                break;
            }
            CMD_WRITE => match handle_write(shared, &conn, &req, &mut hb) {
                Some(n) => have = n,
                None => break,
            },
            CMD_READ | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS => {
                if let Err(e) = validate(shared, &conn, &req) {
                    conn.send_error(req.cookie, &e);
                    continue;
                }
                // A read the export can answer at once (a cache hit) is
                // answered here: a hand-off to a worker costs more than it.
                if req.command == CMD_READ
                    && serve_read(&conn, &req, |sink| {
                        shared.export.try_read(req.offset, req.length, sink)
                    })
                {
                    continue;
                }
                let s = shared.clone();
                dispatch(&shared.pool, &conn, move |c| execute(&s, c, &req));
            }
            other => {
                conn.send_error(
                    req.cookie,
                    &ReplyError::new(EINVAL, format!("unknown command {other}")),
                );
            }
        }
    }
    // Let queued and executing requests finish and their replies go out
    // before the socket is closed.
    let mut n = conn.in_flight.lock();
    while *n > 0 {
        conn.in_flight_cv.wait(&mut n);
    }
    drop(n);
    conn.stream.close();
}

/// Run `job` on a worker of `pool`, counted in the connection's in-flight
/// requests until it has finished.
fn dispatch(pool: &Pool, conn: &Arc<Conn>, job: impl FnOnce(&Conn) + Send + 'static) {
    *conn.in_flight.lock() += 1;
    let c = conn.clone();
    pool.submit(Box::new(move || {
        let _done = FinishGuard(&c);
        job(&c);
    }));
}

/// What happened to a WRITE payload.
#[derive(PartialEq, Eq, Clone, Copy)]
enum Payload {
    /// Still in the socket.
    Unread,
    /// Read completely into the export's slices.
    Read,
    /// Reading it failed part-way: the stream is out of sync.
    Failed,
}

/// The `source` of a write whose payload is still in the socket: the
/// payload's only copy, socket -> export slices (`readv`), which also picks
/// up the next request header if it is already there.
struct SocketSource<'a> {
    stream: &'a Stream,
    len: u32,
    next: &'a mut [u8],
    state: Payload,
    /// Bytes of the next header read with the payload.
    extra: usize,
}

impl SocketSource<'_> {
    fn fill(&mut self, slices: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        if self.state != Payload::Unread {
            return Err(io::Error::other("payload source called more than once"));
        }
        let total: usize = slices.iter().map(|s| s.len()).sum();
        if total != self.len as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("export offered {total} bytes for a {}-byte write", self.len),
            ));
        }
        match self.stream.read_exact_vectored_then(slices, self.next) {
            Ok(n) => {
                self.state = Payload::Read;
                self.extra = n;
                Ok(())
            }
            Err(e) => {
                self.state = Payload::Failed;
                Err(e)
            }
        }
    }
}

/// A WRITE: the reader thread does only what needs the socket. It stages
/// the write (the export takes slots without waiting), receives the payload
/// straight into them, and leaves the commit (persistence, the origin
/// write, the reply) to a commit worker, so the next request is read while
/// this one finishes. A write that cannot be staged without waiting (no free
/// slot, an overlapping write in progress, a partial block, a mode that
/// writes the origin first) is received into a buffer of its own and made
/// by a worker that may wait. Returns how many bytes of the next request
/// header arrived with the payload (into `next`), or `None` when the
/// connection must end.
fn handle_write(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    req: &Request,
    next: &mut [u8],
) -> Option<usize> {
    let len = req.length;
    if let Err(e) = validate(shared, conn, req) {
        if len > shared.sizes.maximum {
            // We will not read an arbitrarily large payload just to throw
            // it away: answer, then hang up (allowed for a client that
            // broke the advertised maximum).
            conn.send_error(req.cookie, &e);
            return None;
        }
        // Skip the payload so the stream stays in sync; nothing is written.
        return skip_payload(conn, req, &e);
    }
    if len == 0 {
        return conn.send_ok(req.cookie).then_some(0);
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let mut src = SocketSource {
        stream: &conn.stream,
        len,
        next,
        state: Payload::Unread,
        extra: 0,
    };
    let staged = shared
        .export
        .stage_write(req.offset, len, fua, &mut |slices| src.fill(slices));
    let cookie = req.cookie;
    match (src.state, staged) {
        (Payload::Failed, _) => {
            debug!(
                "nbd[{}]: client disconnected during a {len}-byte write payload",
                conn.id
            );
            None
        }
        (Payload::Read, Ok(Staged::Pending(w))) if w.commit_is_quick() => {
            // Nothing to wait for (a fence on pmem): cheaper here than a
            // hand-off, and it blocks nothing behind it.
            conn.send_result(cookie, w.commit()).then_some(src.extra)
        }
        (Payload::Read, Ok(Staged::Pending(w))) => {
            dispatch(&shared.commits, conn, move |c| {
                c.send_result(cookie, w.commit());
            });
            Some(src.extra)
        }
        (Payload::Unread, Ok(Staged::WouldWait)) => buffer_write(shared, conn, req, src.next),
        (Payload::Read, r) => {
            // Received, but the export failed (or broke its contract by
            // declining after taking the payload): nothing is written.
            let err = match r {
                Err(e) => e.into(),
                Ok(_) => ReplyError::new(EIO, "export declined a received write"),
            };
            conn.send_error(cookie, &err).then_some(src.extra)
        }
        (Payload::Unread, r) => {
            // Nothing received, so nothing can have been written (a pending
            // write without its payload is dropped unwritten).
            let err = match r {
                Err(e) => e.into(),
                Ok(_) => ReplyError::new(EIO, "export did not take the write payload"),
            };
            skip_payload(conn, req, &err)
        }
    }
}

/// Skip a rejected WRITE's payload and answer `err`.
fn skip_payload(conn: &Conn, req: &Request, err: &ReplyError) -> Option<usize> {
    if let Err(e) = conn.stream.discard(req.length.into()) {
        debug!("nbd[{}]: client left mid-payload: {e}", conn.id);
        return None;
    }
    conn.send_error(req.cookie, err).then_some(0)
}

/// A WRITE that would wait to be staged: receive the payload into a buffer
/// (the reader must not wait) and let a worker make the write, waiting as
/// long as it must. The buffer is this request's one extra copy; at most
/// `max_in_flight` of them exist per connection (back-pressure).
fn buffer_write(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    req: &Request,
    next: &mut [u8],
) -> Option<usize> {
    let mut buf = vec![0u8; req.length as usize];
    let extra = match conn
        .stream
        .read_exact_vectored_then(&mut [IoSliceMut::new(&mut buf)], next)
    {
        Ok(n) => n,
        Err(e) => {
            debug!("nbd[{}]: client left mid-payload: {e}", conn.id);
            return None;
        }
    };
    let s = shared.clone();
    let req = *req;
    dispatch(&shared.pool, conn, move |c| {
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let r = s.export.write_from(req.offset, &buf, fua);
        c.send_result(req.cookie, r);
    });
    Some(extra)
}

/// Run a validated non-WRITE request on a worker and reply.
fn execute(shared: &Shared, conn: &Conn, req: &Request) {
    if conn.broken.load(Ordering::SeqCst) {
        return;
    }
    let ex = &shared.export;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len64 = u64::from(req.length);
    let cookie = req.cookie;
    match req.command {
        CMD_READ => execute_read(shared, conn, req),
        CMD_FLUSH => {
            conn.send_result(cookie, ex.flush());
        }
        CMD_TRIM => {
            let r = if len64 == 0 {
                Ok(())
            } else {
                ex.trim(req.offset, len64, fua)
            };
            conn.send_result(cookie, r);
        }
        CMD_WRITE_ZEROES => {
            let flags = ZeroFlags {
                fua,
                no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
                fast_zero: req.flags & CMD_FLAG_FAST_ZERO != 0,
            };
            let r = if len64 == 0 {
                Ok(())
            } else {
                ex.write_zeroes(req.offset, len64, flags)
            };
            conn.send_result(cookie, r);
        }
        CMD_CACHE => {
            let r = if len64 == 0 {
                Ok(())
            } else {
                ex.cache(req.offset, len64)
            };
            conn.send_result(cookie, r);
        }
        CMD_BLOCK_STATUS => execute_block_status(shared, conn, req),
        _ => {
            conn.send_error(cookie, &ReplyError::new(EINVAL, "unknown command"));
        }
    }
}

fn execute_read(shared: &Shared, conn: &Conn, req: &Request) {
    serve_read(conn, req, |sink| {
        Some(shared.export.read(req.offset, req.length, sink))
    });
}

/// Run `read` with a sink that sends the reply straight from the export's
/// slices (`writev`), and answer errors. False when `read` declined
/// (returned `None`); then nothing was sent.
fn serve_read(
    conn: &Conn,
    req: &Request,
    read: impl FnOnce(
        &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Option<Result<(), ExportError>>,
) -> bool {
    #[derive(PartialEq, Eq)]
    enum Sink {
        NotCalled,
        Rejected,
        Sent,
        SendFailed,
    }
    if req.length == 0 {
        conn.send_read_data(req.cookie, req.offset, 0, &[]);
        return true;
    }
    let mut sink_state = Sink::NotCalled;
    let r = read(&mut |slices| {
        if sink_state != Sink::NotCalled {
            return Err(io::Error::other("read sink called more than once"));
        }
        let total: usize = slices.iter().map(|s| s.len()).sum();
        if total != req.length as usize {
            sink_state = Sink::Rejected;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "export returned {total} bytes for a {}-byte read",
                    req.length
                ),
            ));
        }
        if conn.send_read_data(req.cookie, req.offset, req.length, slices) {
            sink_state = Sink::Sent;
            Ok(())
        } else {
            sink_state = Sink::SendFailed;
            Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "sending the reply failed",
            ))
        }
    });
    let Some(r) = r else {
        return false;
    };
    match (sink_state, r) {
        (Sink::Sent | Sink::SendFailed, _) => {}
        (_, Err(e)) => {
            conn.send_error(req.cookie, &e.into());
        }
        (_, Ok(())) => {
            conn.send_error(
                req.cookie,
                &ReplyError::new(EIO, "export returned no data for the read"),
            );
        }
    }
    true
}

/// Most descriptors sent in one BLOCK_STATUS reply (the spec lets a server
/// describe less than asked; this bounds the reply's size).
const MAX_EXTENTS: usize = 64 * 1024;

fn execute_block_status(shared: &Shared, conn: &Conn, req: &Request) {
    let Some(id) = conn.meta_context else {
        conn.send_error(req.cookie, &ReplyError::new(EINVAL, "no metadata context"));
        return;
    };
    let len64 = u64::from(req.length);
    let extents = match shared.export.block_status(req.offset, len64) {
        Some(Ok(e)) => e,
        Some(Err(e)) => {
            conn.send_error(req.cookie, &e.into());
            return;
        }
        // Status 0 ("allocated, contents unknown") is always a safe answer.
        None => Vec::new(),
    };
    // Keep what the spec allows: non-empty extents whose sum stays within
    // the request, at most one with REQ_ONE, and at least one in total.
    let mut out = Vec::new();
    let mut left = req.length;
    for mut e in extents {
        if e.length == 0 {
            continue;
        }
        if left == 0 {
            break;
        }
        e.length = e.length.min(left);
        left -= e.length;
        out.push(e);
        if req.flags & CMD_FLAG_REQ_ONE != 0 || out.len() >= MAX_EXTENTS {
            break;
        }
    }
    if out.is_empty() {
        out.push(crate::export::Extent {
            length: req.length,
            flags: 0,
        });
    }
    let payload = encode_block_status(id, &out);
    let hdr = StructuredReply {
        flags: REPLY_FLAG_DONE,
        reply_type: REPLY_TYPE_BLOCK_STATUS,
        cookie: req.cookie,
        length: payload.len() as u32,
    }
    .encode();
    conn.send(&mut [IoSlice::new(&hdr), IoSlice::new(&payload)]);
}
