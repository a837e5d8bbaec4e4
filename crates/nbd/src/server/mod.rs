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
//!
//! # Files
//! * `mod.rs`: the public API: [`Server`], [`ServerConfig`], the
//!   [`ShutdownHandle`], the accept loops, and a connection's life.
//! * `pool.rs`: the worker pools.
//! * `handshake.rs`: option haggling and STARTTLS.
//! * `transmission.rs`: the reader loop, reading requests and starting them.
//! * `connection.rs`: what a connection's reader and workers share (the
//!   socket, the send lock, the requests in flight), and dispatch to a pool.
//! * `validate.rs`: the checks a request passes before anything is executed.
//! * `write.rs`: WRITE, staged or buffered.
//! * `read.rs`: READ replies straight from the export's slices.
//! * `execute.rs`: the other commands, run on a worker.
//! * `reply.rs`: replies and the errors they carry.

use std::io::{self, Write};
use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::conns::{ConnectionInfo, Connections, Phase};
use crate::export::{BlockSizes, Export};
use crate::net::{poll_readable, Readiness, Stream};
use crate::proto::{self, *};
use crate::tls::{TlsMode, TlsServer, TlsStats};

mod connection;
mod execute;
mod handshake;
mod pool;
mod read;
mod reply;
mod transmission;
mod validate;
mod write;

use handshake::{handshake, Hangup};
use pool::Pool;
use transmission::transmission;

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
    /// Payload buffers of buffered writes, for reuse.
    buffers: write::Buffers,
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
                buffers: write::Buffers::default(),
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
        self.accept_loop(fd, || Ok(Stream::unix(listener.accept()?.0)))
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
