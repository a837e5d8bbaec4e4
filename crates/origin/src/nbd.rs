//! An NBD export as the origin, over [`pmcache_nbd::Client`].
//!
//! The origin stands for remote storage that can fail. When a connection
//! drops, each call reconnects with exponential backoff for a bounded time
//! ([`NbdOriginOptions::retry_for`]) and then returns an error; the engine
//! above retries writeback for as long as it takes. Errors the server
//! replies with (the connection still up) are returned at once.
//!
//! Several connections: a server answers only so many requests of one
//! connection at a time (nbdkit: 16), which would cap every miss and every
//! writeback batch. When the server advertises CAN_MULTI_CONN (a FLUSH on
//! any connection covers writes completed on all of them), calls are spread
//! over [`NbdOriginOptions::connections`] connections and a batch's runs
//! go out on all of them at once. Without it, one connection, as before.
//!
//! Durability across reconnects: writes acknowledged on a connection that
//! has since been lost may not have reached stable storage (the server may
//! have restarted). Every connection carries a generation, from one
//! sequence for the whole origin: the first connections share 1, and each
//! reconnection takes the next. A connection still up has talked to one
//! server since it opened, so a FLUSH on it covers the writes of its own
//! generation and later ones (on any connection, by multi-conn), and not
//! older ones: `flush` goes to the oldest live connection and returns an
//! error when an unflushed write is older still. The caller rewrites and
//! flushes again, exactly as after any failed flush.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pmcache_nbd::proto::FLAG_CAN_MULTI_CONN;
use pmcache_nbd::{Client, ClientOptions, Completion, PassOn, RelayCompletion, Relayed};

use crate::Origin;

/// Requests one connection takes before the next is used (nbdkit serves 16
/// at a time per connection by default).
const FILL: usize = 16;

/// Reconnection and timeout settings.
#[derive(Debug, Clone)]
pub struct NbdOriginOptions {
    /// How long one call keeps trying to re-establish a lost connection.
    pub retry_for: Duration,
    /// Bound on connecting and the handshake.
    pub connect_timeout: Duration,
    /// Bound on one request; a stalled server counts as a lost connection.
    pub request_timeout: Option<Duration>,
    /// Connections to open when the server allows multi-conn (as nbdcopy's
    /// default of 4).
    pub connections: usize,
}

impl Default for NbdOriginOptions {
    fn default() -> Self {
        Self {
            retry_for: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Some(Duration::from_secs(60)),
            connections: 4,
        }
    }
}

/// Whether a failed call may log a warning at `now`, the last one having
/// been at `*last` (at most one per [`WARN_EVERY`]); takes the turn if so.
fn warn_turn(last: &Mutex<Option<Instant>>, now: Instant) -> bool {
    let mut w = last.lock();
    if w.is_some_and(|t| now.saturating_duration_since(t) < WARN_EVERY) {
        return false;
    }
    *w = Some(now);
    true
}

/// Bound on opening each connection after the first.
const EXTRA_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// First and largest pause between reconnection attempts.
const BACKOFF_START: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

struct Current {
    client: Option<Arc<Client>>,
    /// When it connected, in the origin's sequence of connections.
    generation: u64,
}

/// One connection of the origin, re-established as needed.
struct Conn {
    current: Mutex<Current>,
    /// Serialises reconnection so concurrent callers make one attempt.
    reconnecting: Mutex<()>,
}

impl Conn {
    fn new(client: Client) -> Self {
        Self {
            current: Mutex::new(Current {
                client: Some(Arc::new(client)),
                generation: 1,
            }),
            reconnecting: Mutex::new(()),
        }
    }

    /// Requests in flight on the current client (none if there is none).
    fn load(&self) -> usize {
        self.current
            .lock()
            .client
            .as_ref()
            .map_or(0, |c| c.in_flight())
    }

    fn live(&self) -> Option<(Arc<Client>, u64)> {
        let cur = self.current.lock();
        match &cur.client {
            Some(c) if c.is_connected() => Some((c.clone(), cur.generation)),
            _ => None,
        }
    }

    /// Forget the client of generation `gen` (if it is still current).
    fn invalidate(&self, gen: u64) {
        let mut cur = self.current.lock();
        if cur.generation == gen {
            cur.client = None;
        }
    }
}

/// An NBD export (`nbd://…` or `nbd+unix://…`) as the origin.
pub struct NbdOrigin {
    uri: String,
    size: u64,
    options: NbdOriginOptions,
    conns: Box<[Conn]>,
    /// Round-robin over `conns` for single calls.
    next: AtomicUsize,
    /// The newest generation handed out (see the module's notes).
    generations: Mutex<u64>,
    /// Oldest generation with writes no FLUSH has covered yet.
    unflushed: Mutex<Option<u64>>,
    /// When a failed call last logged a warning (see [`WARN_EVERY`]).
    warned: Mutex<Option<Instant>>,
}

/// Failed calls log a warning at most this often: in an outage every waiting
/// request retries, and one line each said the same thing dozens of times.
const WARN_EVERY: Duration = Duration::from_secs(1);

impl std::fmt::Debug for NbdOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdOrigin")
            .field("uri", &self.uri)
            .field("size", &self.size)
            .field("connections", &self.conns.len())
            .finish()
    }
}

impl NbdOrigin {
    /// Connect to `uri` (libnbd syntax) with default options.
    pub fn connect(uri: &str) -> io::Result<Self> {
        Self::connect_with(uri, NbdOriginOptions::default())
    }

    /// Connect once, and when the server allows multi-conn, open up to
    /// `connections - 1` more; one that fails to open is left out.
    pub fn connect_with(uri: &str, options: NbdOriginOptions) -> io::Result<Self> {
        let open = |o: &NbdOriginOptions| {
            Client::connect_with(uri, &client_options(o))
                .map_err(|e| io::Error::new(e.kind(), format!("cannot open NBD origin: {e}")))
        };
        let first = open(&options)?;
        // A server that advertises multi-conn but takes one client at a time
        // (qemu-nbd's default --shared=1) leaves the next handshake hanging:
        // give the extra connections a short bound.
        let extra = NbdOriginOptions {
            connect_timeout: options.connect_timeout.min(EXTRA_CONNECT_TIMEOUT),
            ..options.clone()
        };
        let size = first.size();
        let multi = first.flags() & FLAG_CAN_MULTI_CONN != 0;
        let mut conns = vec![Conn::new(first)];
        let want = if multi { options.connections.max(1) } else { 1 };
        while conns.len() < want {
            match open(&extra) {
                Ok(c) if c.size() == size && c.flags() & FLAG_CAN_MULTI_CONN != 0 => {
                    conns.push(Conn::new(c))
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(
                        "NBD origin {uri}: extra connection refused ({e}); using {}",
                        conns.len()
                    );
                    break;
                }
            }
        }
        Ok(Self {
            uri: uri.to_owned(),
            size,
            options,
            conns: conns.into_boxed_slice(),
            next: AtomicUsize::new(0),
            generations: Mutex::new(1),
            unflushed: Mutex::new(None),
            warned: Mutex::new(None),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Connections in use (more than one only with multi-conn).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The connection for the next single call: the first with fewer than
    /// [`FILL`] requests in flight, else the least loaded. Under a light load
    /// the replies then come in batches on one connection's reader thread,
    /// not one at a time on each (a wake-up per reply costs more than the
    /// reply on a fast origin); a deep queue still spreads over all.
    fn pick(&self) -> usize {
        let n = self.conns.len();
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut least = (usize::MAX, usize::MAX, 0);
        for (i, conn) in self.conns.iter().enumerate() {
            let load = conn.load();
            if load < FILL {
                return i;
            }
            // Among equals the turn rotates, so none is always left over.
            let rank = (load, (i + n - turn) % n, i);
            least = least.min(rank);
        }
        least.2
    }

    fn reconnect(&self, conn: &Conn) -> io::Result<(Arc<Client>, u64)> {
        let _g = conn.reconnecting.lock();
        if let Some(live) = conn.live() {
            return Ok(live); // another caller already reconnected
        }
        let client = Client::connect_with(&self.uri, &client_options(&self.options))?;
        if client.size() != self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: the export's size changed from {} to {} bytes; refusing to use it as the same origin",
                    self.uri,
                    self.size,
                    client.size()
                ),
            ));
        }
        if self.conns.len() > 1 && client.flags() & FLAG_CAN_MULTI_CONN == 0 {
            // One FLUSH would no longer cover the other connections.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: the export no longer allows multi-conn, and pmcache opened {} connections to it; restart with --origin-connections 1",
                    self.uri,
                    self.conns.len()
                ),
            ));
        }
        let client = Arc::new(client);
        let mut cur = conn.current.lock();
        cur.generation = {
            let mut g = self.generations.lock();
            *g += 1;
            *g
        };
        cur.client = Some(client.clone());
        tracing::info!(
            "NBD origin {}: reconnected (connection #{})",
            self.uri,
            cur.generation
        );
        Ok((client, cur.generation))
    }

    /// The client of the next single call if it is connected now; no
    /// reconnecting (for calls that must not wait).
    fn live_client(&self) -> Option<(Arc<Client>, u64)> {
        self.conns[self.pick()].live()
    }

    /// A live client of connection `c`, reconnected if it was lost.
    fn client(&self, c: usize) -> io::Result<(Arc<Client>, u64)> {
        let conn = &self.conns[c];
        match conn.live() {
            Some(live) => Ok(live),
            None => self.reconnect(conn),
        }
    }

    fn note_unflushed(&self, gen: u64) {
        let mut u = self.unflushed.lock();
        *u = Some(u.map_or(gen, |g| g.min(gen)));
    }

    /// The live connection of the oldest generation, else the next one.
    fn oldest_live(&self) -> usize {
        (0..self.conns.len())
            .filter_map(|c| self.conns[c].live().map(|(_, gen)| (gen, c)))
            .min()
            .map_or_else(|| self.pick(), |(_, c)| c)
    }

    /// Run `op` on a live client of connection `c`, reconnecting with
    /// backoff while the connection is what fails, for at most `retry_for`.
    fn with_client<T>(
        &self,
        c: usize,
        what: &str,
        op: impl FnMut(&Client, u64) -> io::Result<T>,
    ) -> io::Result<T> {
        self.with_client_until(c, what, Instant::now() + self.options.retry_for, op)
    }

    /// [`with_client`](Self::with_client) until `deadline`, which calls
    /// made for one request share.
    fn with_client_until<T>(
        &self,
        c: usize,
        what: &str,
        deadline: Instant,
        mut op: impl FnMut(&Client, u64) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut backoff = BACKOFF_START;
        loop {
            let err = match self.client(c) {
                Ok((client, gen)) => match op(&client, gen) {
                    Ok(v) => return Ok(v),
                    // The server answered: not a connection problem.
                    Err(e) if client.is_connected() => return Err(e),
                    Err(e) => {
                        self.conns[c].invalidate(gen);
                        e
                    }
                },
                Err(e) => e,
            };
            let now = Instant::now();
            if now + backoff > deadline {
                return Err(io::Error::new(
                    err.kind(),
                    format!(
                        "NBD origin {}: {what} failed and the connection could not be re-established within {:?}: {err}",
                        self.uri, self.options.retry_for
                    ),
                ));
            }
            let msg = format!(
                "NBD origin {}: {what} failed ({err}); reconnecting in {backoff:?}",
                self.uri
            );
            if warn_turn(&self.warned, now) {
                tracing::warn!("{msg}");
            } else {
                tracing::debug!("{msg}");
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// [`Origin::write_runs`] on connection `c` alone, retrying until
    /// `deadline`. A lost connection fails every run: reconnect and send
    /// them all again (rewriting the same data is harmless). Errors the
    /// server answered stay per run.
    fn write_runs_on(
        &self,
        c: usize,
        deadline: Instant,
        runs: &[(u64, &[io::IoSlice<'_>])],
    ) -> Vec<io::Result<()>> {
        let r = self.with_client_until(c, "write", deadline, |client, gen| {
            let results = client.write_runs(runs);
            self.settle_runs(client, gen, results)
        });
        match r {
            Ok(results) => results,
            Err(e) => runs
                .iter()
                .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
                .collect(),
        }
    }

    /// Results of runs sent on a connection of generation `gen`: an error
    /// when the connection was lost under them, else one per run.
    fn settle_runs(
        &self,
        client: &Client,
        gen: u64,
        results: Vec<io::Result<()>>,
    ) -> io::Result<Vec<io::Result<()>>> {
        if !client.is_connected() {
            if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
                return Err(e);
            }
            return Err(io::Error::other("connection lost during writeback"));
        }
        if results.iter().any(|r| r.is_ok()) {
            self.note_unflushed(gen);
        }
        Ok(results)
    }
}

fn client_options(o: &NbdOriginOptions) -> ClientOptions {
    ClientOptions {
        connect_timeout: o.connect_timeout,
        request_timeout: o.request_timeout,
        structured_replies: true,
    }
}

/// Spread runs over `n` connections, each run to the one with the fewest
/// bytes so far: indexes of the runs per connection.
fn spread(runs: &[(u64, &[io::IoSlice<'_>])], n: usize) -> Vec<Vec<usize>> {
    let mut groups: Vec<(u64, Vec<usize>)> = vec![(0, Vec::new()); n];
    for (i, (_, bufs)) in runs.iter().enumerate() {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let g = groups
            .iter_mut()
            .min_by_key(|(bytes, _)| *bytes)
            .expect("at least one connection");
        g.0 += len;
        g.1.push(i);
    }
    groups.into_iter().map(|(_, idx)| idx).collect()
}

impl Origin for NbdOrigin {
    fn size(&self) -> u64 {
        self.size
    }

    fn fingerprint(&self) -> String {
        self.uri.clone()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with_client(self.pick(), "read", |c, _| c.read(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        // With `fua` the client uses NBD FUA, or a FLUSH after the write on
        // the same connection when the server lacks FUA.
        let c = self.pick();
        self.with_client(c, "write", |client, gen| {
            client.write(buf, offset, fua)?;
            if !fua {
                self.note_unflushed(gen);
            }
            Ok(())
        })
    }

    fn read_vectored_at(&self, bufs: &mut [io::IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        self.with_client(self.pick(), "read", |c, _| c.read_vectored(bufs, offset))
    }

    fn write_relayed(&self, data: &Relayed, offset: u64, fua: bool) -> io::Result<()> {
        let c = self.pick();
        self.with_client(c, "write", |client, gen| {
            // Each attempt sends a copy: `data` stays whole for the next.
            client.write_relayed(&mut data.dup()?, offset, fua)?;
            if !fua {
                self.note_unflushed(gen);
            }
            Ok(())
        })
    }

    fn read_relayed(&self, offset: u64, len: usize) -> io::Result<Option<Relayed>> {
        self.with_client(self.pick(), "read", |c, _| c.read_relayed(offset, len))
    }

    fn reconnects(&self) -> u64 {
        *self.generations.lock() - 1
    }

    fn reads_relayed_async(&self) -> bool {
        true
    }

    /// On a live connection only, as `read_raw_async`.
    fn read_relayed_async(
        &self,
        offset: u64,
        len: usize,
        pass: Option<Box<dyn PassOn>>,
        done: RelayCompletion,
    ) -> Result<(), RelayCompletion> {
        match self.live_client() {
            Some((client, _)) => client.read_relayed_async(offset, len, pass, done),
            None => Err(done),
        }
    }

    fn writes_relayed_async(&self) -> bool {
        true
    }

    /// On a live connection only, as `write_raw_async`; without FUA the
    /// connection is noted as holding unflushed writes before it is sent.
    fn write_relayed_async(
        &self,
        data: &Relayed,
        offset: u64,
        fua: bool,
        done: Completion,
    ) -> Result<(), Completion> {
        match self.live_client() {
            Some((client, gen)) => {
                if !fua {
                    self.note_unflushed(gen);
                }
                client.write_relayed_async(data, offset, fua, done)
            }
            None => Err(done),
        }
    }

    fn reads_async(&self) -> bool {
        true
    }

    fn writes_async(&self) -> bool {
        true
    }

    /// On a live connection only, as `read_raw_async`; the connection is
    /// noted as holding unflushed writes before the write is sent.
    unsafe fn write_raw_async(
        &self,
        offset: u64,
        pieces: &[(*const u8, usize)],
        done: Completion,
    ) -> Result<(), Completion> {
        match self.live_client() {
            Some((client, gen)) => {
                self.note_unflushed(gen);
                // SAFETY: the caller's promise, passed on.
                unsafe { client.write_raw_async(offset, pieces, done) }
            }
            None => Err(done),
        }
    }

    /// On a live connection only: reconnecting is left to the caller's
    /// retry, which goes through the waiting path.
    unsafe fn read_raw_async(
        &self,
        offset: u64,
        pieces: &[(*mut u8, usize)],
        done: Completion,
    ) -> Result<(), Completion> {
        match self.live_client() {
            // SAFETY: the caller's promise, passed on.
            Some((client, _)) => unsafe { client.read_raw_async(offset, pieces, done) },
            None => Err(done),
        }
    }

    fn write_many(&self, pieces: &[(u64, &[u8])]) -> io::Result<()> {
        let c = self.pick();
        self.with_client(c, "write", |client, gen| {
            client.write_many(pieces)?;
            self.note_unflushed(gen);
            Ok(())
        })
    }

    /// Runs go out on every connection at once; a connection lost under its
    /// share is re-established and that share sent again.
    fn write_runs(&self, runs: &[(u64, &[io::IoSlice<'_>])]) -> Vec<io::Result<()>> {
        let deadline = Instant::now() + self.options.retry_for;
        let n = self.conns.len().min(runs.len());
        if n <= 1 {
            return self.write_runs_on(self.pick(), deadline, runs);
        }
        let first = self.pick();
        let groups: Vec<(usize, Vec<usize>)> = spread(runs, n)
            .into_iter()
            .enumerate()
            .map(|(k, idx)| ((first + k) % self.conns.len(), idx))
            .collect();
        let subsets: Vec<Vec<(u64, &[io::IoSlice<'_>])>> = groups
            .iter()
            .map(|(_, idx)| idx.iter().map(|&i| runs[i]).collect())
            .collect();
        let clients: Vec<Option<(Arc<Client>, u64)>> =
            groups.iter().map(|(c, _)| self.conns[*c].live()).collect();
        let in_flight: Vec<_> = clients
            .iter()
            .zip(&subsets)
            .map(|(cl, sub)| cl.as_ref().map(|(client, _)| client.start_write_runs(sub)))
            .collect();
        let mut out: Vec<Option<io::Result<()>>> = runs.iter().map(|_| None).collect();
        for (k, flight) in in_flight.into_iter().enumerate() {
            let (c, idx) = &groups[k];
            let settled = match (flight, &clients[k]) {
                (Some(f), Some((client, gen))) => {
                    let r = self.settle_runs(client, *gen, f.wait());
                    if r.is_err() {
                        self.conns[*c].invalidate(*gen);
                    }
                    r.ok()
                }
                _ => None,
            };
            // Not live, or lost under this share: the retrying path.
            let results = settled.unwrap_or_else(|| self.write_runs_on(*c, deadline, &subsets[k]));
            for (&i, r) in idx.iter().zip(results) {
                out[i] = Some(r);
            }
        }
        out.into_iter()
            .map(|r| r.expect("every run is in one group"))
            .collect()
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let c = self.pick();
        self.with_client(c, "write_zeroes", |client, gen| {
            client.write_zeroes(offset, len, fua)?;
            if !fua {
                self.note_unflushed(gen);
            }
            Ok(())
        })
    }

    /// One FLUSH, on the oldest live connection: with multi-conn it covers
    /// every connection's completed writes of its generation or later.
    fn flush(&self) -> io::Result<()> {
        let taken = self.unflushed.lock().take();
        let c = self.oldest_live();
        match self.with_client(c, "flush", |client, gen| client.flush().map(|()| gen)) {
            Ok(gen) => match taken {
                Some(oldest) if oldest < gen => Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!(
                        "NBD origin {}: a connection was re-established after writes that were never flushed; they may not be durable and must be written again",
                        self.uri
                    ),
                )),
                _ => Ok(()),
            },
            Err(e) => {
                if let Some(t) = taken {
                    self.note_unflushed(t);
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_warns_once_a_second() {
        let last = Mutex::new(None);
        let t0 = Instant::now();
        assert!(warn_turn(&last, t0), "the first failure warns");
        assert!(!warn_turn(&last, t0 + Duration::from_millis(20)));
        assert!(!warn_turn(&last, t0 + Duration::from_millis(999)));
        assert!(
            warn_turn(&last, t0 + WARN_EVERY),
            "a second later it warns again"
        );
        assert!(!warn_turn(&last, t0 + Duration::from_millis(1500)));
    }
    use pmcache_nbd::{MemExport, Server, ServerConfig, ShutdownHandle};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::thread::JoinHandle;

    struct Dir(PathBuf);
    impl Dir {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = PathBuf::from(format!(
                "/tmp/pmorig-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A server over `export` on `socket`, stopped on drop.
    struct Running {
        handle: ShutdownHandle,
        thread: Option<JoinHandle<io::Result<()>>>,
    }
    impl Running {
        fn start(export: Arc<MemExport>, socket: &std::path::Path) -> Self {
            let _ = std::fs::remove_file(socket);
            let server = Server::new(export, ServerConfig::default()).unwrap();
            let handle = server.shutdown_handle();
            let l = UnixListener::bind(socket).unwrap();
            let thread = Some(std::thread::spawn(move || server.serve_unix(l)));
            Self { handle, thread }
        }
        fn stop(mut self) {
            self.handle.shutdown();
            if let Some(t) = self.thread.take() {
                t.join().unwrap().unwrap();
            }
        }
    }
    impl Drop for Running {
        fn drop(&mut self) {
            self.handle.shutdown();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn uri(dir: &Dir) -> (PathBuf, String) {
        let s = dir.0.join("o.sock");
        let u = format!("nbd+unix:///?socket={}", s.display());
        (s, u)
    }

    fn quick() -> NbdOriginOptions {
        NbdOriginOptions {
            retry_for: Duration::from_millis(1500),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Some(Duration::from_secs(10)),
            connections: 4,
        }
    }

    #[test]
    fn reads_writes_zeroes_flush_and_fua() {
        let dir = Dir::new();
        let (sock, uri) = uri(&dir);
        let export = Arc::new(MemExport::new(1 << 20));
        let _srv = Running::start(export.clone(), &sock);
        let o = NbdOrigin::connect(&uri).unwrap();
        assert_eq!(o.size(), 1 << 20);
        assert_eq!(o.fingerprint(), uri);
        o.write_at(b"hello world", 4096, false).unwrap();
        o.write_at(b"durable", 8192, true).unwrap();
        assert_eq!(export.stats().fua_writes, 1, "FUA is sent as NBD FUA");
        o.write_zeroes(4096, 5, false).unwrap();
        o.flush().unwrap();
        assert_eq!(export.stats().flushes, 1);
        let mut b = [0u8; 11];
        o.read_at(&mut b, 4096).unwrap();
        assert_eq!(&b, b"\0\0\0\0\0 world");
        // A server error is returned at once, with the URI, and the
        // connection stays up.
        export.fail_at(0);
        let e = o.read_at(&mut b, 0).unwrap_err();
        assert!(e.to_string().contains(&uri), "{e}");
        assert_eq!(o.reconnects(), 0);
        // Out of range is refused before it is sent.
        let e = o.read_at(&mut b, (1 << 20) - 3).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn batched_writes_and_scattered_reads_in_flight_together() {
        let dir = Dir::new();
        let (sock, uri) = uri(&dir);
        let export = Arc::new(MemExport::new(1 << 20));
        let _srv = Running::start(export.clone(), &sock);
        let o = NbdOrigin::connect(&uri).unwrap();
        let blocks: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i + 1; 4096]).collect();
        let pieces: Vec<(u64, &[u8])> = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| (i as u64 * 8192, &b[..]))
            .collect();
        o.write_many(&pieces).unwrap();
        for (i, b) in blocks.iter().enumerate() {
            assert_eq!(export.snapshot(i * 8192, 4096), *b);
        }
        // Three separate buffers filled from one contiguous range.
        let (mut a, mut b, mut c) = (vec![0u8; 4096], vec![0u8; 4096], vec![0u8; 8192]);
        let mut bufs = [
            io::IoSliceMut::new(&mut a),
            io::IoSliceMut::new(&mut b),
            io::IoSliceMut::new(&mut c),
        ];
        o.read_vectored_at(&mut bufs, 8192).unwrap();
        assert!(a.iter().all(|&x| x == 2) && b.iter().all(|&x| x == 0));
        assert!(c[..4096].iter().all(|&x| x == 3) && c[4096..].iter().all(|&x| x == 0));
        // An unaligned scatter still lands byte-exact.
        let (mut d, mut e) = (vec![0u8; 100], vec![0u8; 5000]);
        let mut bufs = [io::IoSliceMut::new(&mut d), io::IoSliceMut::new(&mut e)];
        o.read_vectored_at(&mut bufs, 8192 - 50).unwrap();
        assert!(d[..50].iter().all(|&x| x == 0) && d[50..].iter().all(|&x| x == 2));
        assert!(e[..4046].iter().all(|&x| x == 2) && e[4046..].iter().all(|&x| x == 0));
    }

    /// A miss over many slots is one READ, a run of adjacent slots one
    /// WRITE; a run the server rejects fails alone.
    #[test]
    fn scattered_reads_and_gathered_runs_are_one_request_each() {
        let dir = Dir::new();
        let (sock, uri) = uri(&dir);
        let export = Arc::new(MemExport::new(4 << 20));
        let _srv = Running::start(export.clone(), &sock);
        let o = NbdOrigin::connect(&uri).unwrap();
        let slots: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i ^ 0x5a; 4096]).collect();
        let run: Vec<io::IoSlice<'_>> = slots.iter().map(|b| io::IoSlice::new(b)).collect();
        let bad = [io::IoSlice::new(&slots[0])];
        let before = export.stats();
        let results = o.write_runs(&[(65536, &run[..]), (8 << 20, &bad[..]), (0, &run[..2])]);
        assert!(results[0].is_ok() && results[1].is_err() && results[2].is_ok());
        assert_eq!(
            export.stats().writes - before.writes,
            2,
            "one WRITE per run"
        );
        for (i, b) in slots.iter().enumerate() {
            assert_eq!(export.snapshot(65536 + i * 4096, 4096), *b);
        }
        let mut back: Vec<Vec<u8>> = vec![vec![0u8; 4096]; 64];
        let mut bufs: Vec<io::IoSliceMut<'_>> =
            back.iter_mut().map(|b| io::IoSliceMut::new(b)).collect();
        let before = export.stats();
        o.read_vectored_at(&mut bufs, 65536).unwrap();
        assert_eq!(
            export.stats().reads - before.reads,
            1,
            "one READ for 64 slots"
        );
        assert_eq!(back, slots);
    }

    #[test]
    fn reconnects_after_the_server_restarts() {
        let dir = Dir::new();
        let (sock, uri) = uri(&dir);
        let export = Arc::new(MemExport::new(1 << 20));
        let srv = Running::start(export.clone(), &sock);
        let o = NbdOrigin::connect_with(&uri, quick()).unwrap();
        o.write_at(b"before", 0, true).unwrap();
        srv.stop();
        // Restart after a while: the call in progress waits and succeeds.
        let export2 = export.clone();
        let sock2 = sock.clone();
        let restart = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            Running::start(export2, &sock2)
        });
        let mut b = [0u8; 6];
        o.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"before");
        assert_eq!(o.reconnects(), 1);
        let _srv2 = restart.join().unwrap();
        o.write_at(b"after", 100, true).unwrap();
        assert_eq!(export.snapshot(100, 5), b"after");
    }

    #[test]
    fn flush_fails_when_unflushed_writes_were_on_a_lost_connection() {
        let dir = Dir::new();
        let (sock, uri) = uri(&dir);
        let export = Arc::new(MemExport::new(1 << 20));
        let srv = Running::start(export.clone(), &sock);
        let o = NbdOrigin::connect_with(&uri, quick()).unwrap();
        o.write_at(b"x", 0, false).unwrap();
        srv.stop();
        let _srv2 = Running::start(export.clone(), &sock);
        let e = o.flush().unwrap_err();
        assert!(e.to_string().contains("re-established"), "{e}");
        // Written again and flushed on the new connection: fine.
        o.write_at(b"x", 0, false).unwrap();
        o.flush().unwrap();
        o.flush().unwrap();
    }

    #[test]
    fn gives_up_after_the_retry_budget() {
        let dir = Dir::new();
        let (sock, uri) = uri(&dir);
        let export = Arc::new(MemExport::new(1 << 20));
        let srv = Running::start(export, &sock);
        let o = NbdOrigin::connect_with(&uri, quick()).unwrap();
        srv.stop();
        let start = Instant::now();
        let mut b = [0u8; 4];
        let e = o.read_at(&mut b, 0).unwrap_err();
        let took = start.elapsed();
        assert!(took < Duration::from_secs(5), "took {took:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&uri) && msg.contains("re-established"),
            "{msg}"
        );
        // Connecting to nothing fails with the URI in the message.
        let e = NbdOrigin::connect_with(&uri, quick()).unwrap_err();
        assert!(e.to_string().contains(&uri), "{e}");
    }

    #[test]
    fn refuses_an_export_whose_size_changed() {
        let dir = Dir::new();
        let (sock, uri) = uri(&dir);
        let srv = Running::start(Arc::new(MemExport::new(1 << 20)), &sock);
        let o = NbdOrigin::connect_with(&uri, quick()).unwrap();
        srv.stop();
        let _srv2 = Running::start(Arc::new(MemExport::new(2 << 20)), &sock);
        let mut b = [0u8; 4];
        let e = o.read_at(&mut b, 0).unwrap_err();
        assert!(e.to_string().contains("size changed"), "{e}");
    }

    /// With multi-conn, a batch's runs go out on every connection and one
    /// FLUSH covers them all; without it, one connection.
    #[test]
    fn runs_spread_over_connections_and_one_flush_covers_them() {
        let dir = Dir::new();
        let (sock, uri) = uri(&dir);
        let export = Arc::new(MemExport::new(4 << 20));
        let _srv = Running::start(export.clone(), &sock);
        let o = NbdOrigin::connect_with(&uri, quick()).unwrap();
        assert_eq!(o.connections(), 4);
        let slots: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i + 1; 4096]).collect();
        let bufs: Vec<io::IoSlice<'_>> = slots.iter().map(|b| io::IoSlice::new(b)).collect();
        // Sixteen runs of one slot, far apart: four per connection.
        let runs: Vec<(u64, &[io::IoSlice<'_>])> = (0..16)
            .map(|i| (i as u64 * 65536, &bufs[i..i + 1]))
            .collect();
        let sent = |o: &NbdOrigin| -> Vec<u64> {
            o.conns
                .iter()
                .map(|c| c.live().unwrap().0.requests_sent())
                .collect()
        };
        let before = sent(&o);
        let results = o.write_runs(&runs);
        assert!(results.iter().all(|r| r.is_ok()));
        let per_conn: Vec<u64> = sent(&o).iter().zip(&before).map(|(a, b)| a - b).collect();
        assert_eq!(per_conn, [4; 4], "four WRITEs on each connection");
        for (i, b) in slots.iter().enumerate() {
            assert_eq!(export.snapshot(i * 65536, 4096), *b, "run {i}");
        }
        let before = export.stats().flushes;
        o.flush().unwrap();
        assert_eq!(export.stats().flushes - before, 1, "one FLUSH for all");
        assert_eq!(
            spread(&runs, 4).iter().map(Vec::len).collect::<Vec<_>>(),
            [4; 4]
        );

        let dir2 = Dir::new();
        let (sock2, uri2) = self::uri(&dir2);
        let single = Arc::new(MemExport::new(1 << 20).with_multi_conn(false));
        let _srv2 = Running::start(single, &sock2);
        let o2 = NbdOrigin::connect_with(&uri2, quick()).unwrap();
        assert_eq!(o2.connections(), 1, "no multi-conn, one connection");
        assert!(o2.write_runs(&runs[..4]).iter().all(|r| r.is_ok()));
        o2.flush().unwrap();
    }

    /// Writes on one connection, then the server restarts: the FLUSH, sent
    /// on a connection that came back (a new generation), cannot vouch for
    /// them, though their own connection is not the one that flushes.
    #[test]
    fn flush_fails_when_any_connection_lost_unflushed_writes() {
        let dir = Dir::new();
        let (sock, uri) = uri(&dir);
        let export = Arc::new(MemExport::new(1 << 20));
        let srv = Running::start(export.clone(), &sock);
        let o = NbdOrigin::connect_with(&uri, quick()).unwrap();
        o.write_at(b"y", 0, false).unwrap(); // connection 0
        srv.stop();
        let _srv2 = Running::start(export.clone(), &sock);
        let mut b = [0u8; 1];
        o.read_at(&mut b, 0).unwrap(); // connection 1 comes back
        assert_eq!(o.reconnects(), 1);
        let e = o.flush().unwrap_err();
        assert!(e.to_string().contains("re-established"), "{e}");
        // Written again on a new connection: the next flush vouches for it.
        o.write_at(b"y", 0, false).unwrap();
        o.flush().unwrap();
        o.flush().unwrap();
    }

    /// With several connections, a server that comes back without
    /// multi-conn is refused: one FLUSH would not cover them all.
    #[test]
    fn refuses_a_server_that_lost_multi_conn() {
        let dir = Dir::new();
        let (sock, uri) = uri(&dir);
        let srv = Running::start(Arc::new(MemExport::new(1 << 20)), &sock);
        let o = NbdOrigin::connect_with(&uri, quick()).unwrap();
        assert_eq!(o.connections(), 4);
        srv.stop();
        let single = MemExport::new(1 << 20).with_multi_conn(false);
        let _srv2 = Running::start(Arc::new(single), &sock);
        let mut b = [0u8; 4];
        let e = o.read_at(&mut b, 0).unwrap_err();
        assert!(e.to_string().contains("no longer allows multi-conn"), "{e}");
    }
}
