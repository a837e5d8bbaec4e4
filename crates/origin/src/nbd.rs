//! An NBD export as the origin, over [`pmcache_nbd::Client`].
//!
//! The origin stands for remote storage that can fail. When the connection
//! drops, each call reconnects with exponential backoff for a bounded time
//! ([`NbdOriginOptions::retry_for`]) and then returns an error; the engine
//! above retries writeback for as long as it takes. Errors the server
//! replies with (the connection still up) are returned at once.
//!
//! Durability across reconnects: writes acknowledged on a connection that
//! has since been lost may not have reached stable storage (the server may
//! have restarted). A FLUSH on the new connection cannot vouch for them, so
//! such a `flush` returns an error; the caller rewrites and flushes again,
//! exactly as after any failed flush.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pmcache_nbd::{Client, ClientOptions};

use crate::Origin;

/// Reconnection and timeout settings.
#[derive(Debug, Clone)]
pub struct NbdOriginOptions {
    /// How long one call keeps trying to re-establish a lost connection.
    pub retry_for: Duration,
    /// Bound on connecting and the handshake.
    pub connect_timeout: Duration,
    /// Bound on one request; a stalled server counts as a lost connection.
    pub request_timeout: Option<Duration>,
}

impl Default for NbdOriginOptions {
    fn default() -> Self {
        Self {
            retry_for: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// First and largest pause between reconnection attempts.
const BACKOFF_START: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

struct Current {
    client: Option<Arc<Client>>,
    /// Increases with every successful (re)connection.
    generation: u64,
}

/// An NBD export (`nbd://…` or `nbd+unix://…`) as the origin.
pub struct NbdOrigin {
    uri: String,
    size: u64,
    options: NbdOriginOptions,
    current: Mutex<Current>,
    /// Serialises reconnection so concurrent callers make one attempt.
    reconnecting: Mutex<()>,
    /// Oldest connection generation with writes no FLUSH has covered yet.
    unflushed: Mutex<Option<u64>>,
}

impl std::fmt::Debug for NbdOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdOrigin")
            .field("uri", &self.uri)
            .field("size", &self.size)
            .finish()
    }
}

impl NbdOrigin {
    /// Connect to `uri` (libnbd syntax) with default options.
    pub fn connect(uri: &str) -> io::Result<Self> {
        Self::connect_with(uri, NbdOriginOptions::default())
    }

    pub fn connect_with(uri: &str, options: NbdOriginOptions) -> io::Result<Self> {
        let client = Client::connect_with(uri, &client_options(&options))
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open NBD origin: {e}")))?;
        Ok(Self {
            uri: uri.to_owned(),
            size: client.size(),
            options,
            current: Mutex::new(Current {
                client: Some(Arc::new(client)),
                generation: 1,
            }),
            reconnecting: Mutex::new(()),
            unflushed: Mutex::new(None),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// How many times the connection was re-established.
    pub fn reconnects(&self) -> u64 {
        self.current.lock().generation - 1
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

    fn reconnect(&self) -> io::Result<(Arc<Client>, u64)> {
        let _g = self.reconnecting.lock();
        if let Some(live) = self.live() {
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
        let client = Arc::new(client);
        let mut cur = self.current.lock();
        cur.generation += 1;
        cur.client = Some(client.clone());
        tracing::info!(
            "NBD origin {}: reconnected (connection #{})",
            self.uri,
            cur.generation
        );
        Ok((client, cur.generation))
    }

    /// Run `op` on a live connection, reconnecting with backoff while the
    /// connection is what fails, for at most `retry_for`.
    fn with_client<T>(
        &self,
        what: &str,
        mut op: impl FnMut(&Client, u64) -> io::Result<T>,
    ) -> io::Result<T> {
        let deadline = Instant::now() + self.options.retry_for;
        let mut backoff = BACKOFF_START;
        loop {
            let attempt = match self.live() {
                Some(live) => Ok(live),
                None => self.reconnect(),
            };
            let err = match attempt {
                Ok((client, gen)) => match op(&client, gen) {
                    Ok(v) => return Ok(v),
                    // The server answered: not a connection problem.
                    Err(e) if client.is_connected() => return Err(e),
                    Err(e) => {
                        self.invalidate(gen);
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
            tracing::warn!(
                "NBD origin {}: {what} failed ({err}); reconnecting in {backoff:?}",
                self.uri
            );
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn note_unflushed(&self, gen: u64) {
        let mut u = self.unflushed.lock();
        *u = Some(u.map_or(gen, |g| g.min(gen)));
    }
}

fn client_options(o: &NbdOriginOptions) -> ClientOptions {
    ClientOptions {
        connect_timeout: o.connect_timeout,
        request_timeout: o.request_timeout,
        structured_replies: true,
    }
}

impl Origin for NbdOrigin {
    fn size(&self) -> u64 {
        self.size
    }

    fn fingerprint(&self) -> String {
        self.uri.clone()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with_client("read", |c, _| c.read(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        // With `fua` the client uses NBD FUA, or a FLUSH after the write on
        // the same connection when the server lacks FUA.
        self.with_client("write", |c, gen| {
            c.write(buf, offset, fua)?;
            if !fua {
                self.note_unflushed(gen);
            }
            Ok(())
        })
    }

    fn read_vectored_at(&self, bufs: &mut [io::IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        self.with_client("read", |c, _| c.read_vectored(bufs, offset))
    }

    fn write_many(&self, pieces: &[(u64, &[u8])]) -> io::Result<()> {
        self.with_client("write", |c, gen| {
            c.write_many(pieces)?;
            self.note_unflushed(gen);
            Ok(())
        })
    }

    fn write_runs(&self, runs: &[(u64, &[io::IoSlice<'_>])]) -> Vec<io::Result<()>> {
        // A lost connection fails every run: reconnect and send them all
        // again (rewriting the same data is harmless). Errors the server
        // answered stay per run.
        let r = self.with_client("write", |c, gen| {
            let results = c.write_runs(runs);
            if !c.is_connected() {
                if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
                    return Err(e);
                }
                return Err(io::Error::other("connection lost during writeback"));
            }
            if results.iter().any(|r| r.is_ok()) {
                self.note_unflushed(gen);
            }
            Ok(results)
        });
        match r {
            Ok(results) => results,
            Err(e) => runs
                .iter()
                .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
                .collect(),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.with_client("write_zeroes", |c, gen| {
            c.write_zeroes(offset, len, fua)?;
            if !fua {
                self.note_unflushed(gen);
            }
            Ok(())
        })
    }

    fn flush(&self) -> io::Result<()> {
        let taken = self.unflushed.lock().take();
        match self.with_client("flush", |c, gen| c.flush().map(|()| gen)) {
            Ok(gen) => match taken {
                Some(oldest) if oldest < gen => Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!(
                        "NBD origin {}: the connection was re-established after writes that were never flushed; they may not be durable and must be written again",
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
}
