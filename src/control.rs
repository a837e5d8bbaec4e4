//! The control socket of a running server and the metrics endpoint.
//!
//! Control protocol (a Unix stream socket, one request per connection): the
//! client sends one line, the server answers one line and closes.
//! - `stats` → the statistics as one JSON object
//! - `ping`  → `pong`
//! - anything else → `{"error": "..."}`
//!
//! Metrics: minimal HTTP/1.x on TCP; `GET /metrics` answers the Prometheus
//! text format, anything else 404 (or 405 for other methods).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use pmcache_engine::Engine;
use serde_json::Value;

use crate::report::{live_json, prometheus, ServerInfo};

/// How long one control or metrics client may take to send its request or
/// read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Wait until `fd` is readable or `timeout` passes; true when readable.
fn readable(fd: i32, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack.
    let rc = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    rc > 0
}

/// A background accept loop that stops when `stop` is set.
pub struct Background {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    socket_file: Option<PathBuf>,
}

impl Background {
    /// Stop the loop, wait for it, and remove its socket file (if any).
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = self.socket_file.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Bind a Unix socket at `path` (`what` names it in errors), replacing a
/// stale socket file left by a process that died, but never a live socket or
/// a file of another kind.
pub fn bind_unix(path: &Path, what: &str) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "{what} {} exists and is not a socket; remove it or choose another path",
                path.display()
            );
        }
        if UnixStream::connect(path).is_ok() {
            bail!(
                "{what} {} is in use by another process; choose another path",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale {what} {}", path.display()))?;
    }
    UnixListener::bind(path).map_err(|e| anyhow!("cannot create {what} {}: {e}", path.display()))
}

/// Clients of one service served at once; more are turned away (closed).
/// Each has [`CLIENT_TIMEOUT`] in all to send its request, so a few that
/// connect and say nothing (or trickle) cannot hold every place for long.
const MAX_CLIENTS: usize = 64;

/// A stream read against one deadline for the whole request, where a read
/// timeout alone restarts at every byte (a client sending one byte every
/// few seconds would keep its place for good).
struct Deadline<S> {
    stream: S,
    until: std::time::Instant,
}

/// The read timeout a stream takes.
trait ReadTimeout {
    fn set_timeout(&self, t: Duration) -> std::io::Result<()>;
}

impl ReadTimeout for &UnixStream {
    fn set_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))
    }
}

impl ReadTimeout for &TcpStream {
    fn set_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))
    }
}

impl<S: Read + ReadTimeout> Read for Deadline<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self
            .until
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_timeout(left)?;
        self.stream.read(buf)
    }
}

/// `conn` for reading a request, within [`CLIENT_TIMEOUT`] from now.
fn within_timeout<S: Read + ReadTimeout>(conn: S) -> Deadline<S> {
    Deadline {
        stream: conn,
        until: std::time::Instant::now() + CLIENT_TIMEOUT,
    }
}

/// Accept connections on a non-blocking listener until stopped, each
/// handled on a thread of its own: a client that connects and says nothing
/// holds up only itself (for at most [`CLIENT_TIMEOUT`]), not the next
/// scrape or `stats`, nor the shutdown.
fn spawn_acceptor<C: Send + 'static>(
    name: &str,
    fd: std::os::unix::io::RawFd,
    mut accept: impl FnMut() -> std::io::Result<C> + Send + 'static,
    handle: impl Fn(C) -> std::io::Result<()> + Send + Sync + 'static,
    socket_file: Option<PathBuf>,
) -> Result<Background> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let what = name.to_string();
    let handle = Arc::new(handle);
    let busy = Arc::new(AtomicUsize::new(0));
    let thread = std::thread::Builder::new()
        .name(format!("pmcache-{name}"))
        .spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if !readable(fd, Duration::from_millis(100)) {
                    continue;
                }
                let Ok(conn) = accept() else {
                    continue;
                };
                if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    tracing::debug!("{what}: {MAX_CLIENTS} clients already; one turned away");
                    continue;
                }
                let (h, b, w) = (handle.clone(), busy.clone(), what.clone());
                let client = move || {
                    if let Err(e) = h(conn) {
                        tracing::debug!(error = %e, "{w} client");
                    }
                    b.fetch_sub(1, Ordering::SeqCst);
                };
                let thread = std::thread::Builder::new().name(format!("pmcache-{what}-client"));
                if thread.spawn(client).is_err() {
                    // The closure, and the connection with it, is dropped.
                    busy.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })?;
    Ok(Background {
        stop,
        thread: Some(thread),
        socket_file,
    })
}

/// Serve control requests until stopped.
pub fn spawn_control(
    listener: UnixListener,
    path: PathBuf,
    engine: Arc<Engine>,
    info: ServerInfo,
) -> Result<Background> {
    listener.set_nonblocking(true)?;
    let fd = listener.as_raw_fd();
    spawn_acceptor(
        "control",
        fd,
        move || listener.accept().map(|(c, _)| c),
        move |conn| control_conn(conn, &engine, &info),
        Some(path),
    )
}

fn control_conn(conn: UnixStream, engine: &Engine, info: &ServerInfo) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    conn.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(within_timeout(&conn).take(4096)).read_line(&mut line)?;
    let answer = match line.trim() {
        "stats" => live_json(&engine.stats(), info).to_string(),
        "ping" => "pong".to_string(),
        other => serde_json::json!({ "error": format!("unknown request '{other}' (expected stats or ping)") })
            .to_string(),
    };
    (&conn).write_all(answer.as_bytes())?;
    (&conn).write_all(b"\n")
}

/// A control socket that accepted the request but gave no answer in time:
/// the right server, still busy starting up.
#[derive(Debug, thiserror::Error)]
#[error("the server behind control socket {} did not answer within {} s: it may still be starting up (switching to a mode without dirty data writes it all back first; its log shows the progress)", .0.display(), CLIENT_TIMEOUT.as_secs())]
pub struct NotAnswering(PathBuf);

/// Ask a running server for its statistics over its control socket.
pub fn query_stats(path: &Path) -> Result<Value> {
    let conn = UnixStream::connect(path).map_err(|e| {
        anyhow!(
            "cannot reach the server's control socket {}: {e}",
            path.display()
        )
    })?;
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    conn.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    (&conn)
        .write_all(b"stats\n")
        .with_context(|| format!("control socket {}", path.display()))?;
    let mut answer = String::new();
    if let Err(e) = (&conn).take(16 << 20).read_to_string(&mut answer) {
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            return Err(NotAnswering(path.to_path_buf()).into());
        }
        return Err(e).with_context(|| format!("control socket {}", path.display()));
    }
    let v: Value = serde_json::from_str(answer.trim()).map_err(|e| {
        anyhow!(
            "control socket {} answered something that is not pmcache statistics ({e})",
            path.display()
        )
    })?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        bail!("control socket {}: {err}", path.display());
    }
    Ok(v)
}

/// Serve `GET /metrics` until stopped.
pub fn spawn_metrics(
    listener: TcpListener,
    engine: Arc<Engine>,
    info: ServerInfo,
) -> Result<Background> {
    listener.set_nonblocking(true)?;
    let fd = listener.as_raw_fd();
    spawn_acceptor(
        "metrics",
        fd,
        move || listener.accept().map(|(c, _)| c),
        move |conn| http_conn(conn, &engine, &info),
        None,
    )
}

fn http_conn(conn: TcpStream, engine: &Engine, info: &ServerInfo) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    conn.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut reader = BufReader::new(within_timeout(&conn).take(16 << 10));
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // Consume the headers up to the blank line.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
    }
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            prometheus(engine, info),
        ),
        ("GET", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "pmcache: metrics are at /metrics\n".to_string(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; metrics are at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET is supported\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    (&conn).write_all(head.as_bytes())?;
    (&conn).write_all(body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that trickles its request a byte at a time is cut off at
    /// the deadline, though no single read waits that long.
    #[test]
    fn a_trickling_request_ends_at_its_deadline() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let trickle = std::thread::spawn(move || {
            for _ in 0..40 {
                if (&theirs).write_all(b"s").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let start = std::time::Instant::now();
        let conn = Deadline {
            stream: &ours,
            until: start + Duration::from_millis(300),
        };
        let mut line = String::new();
        let r = BufReader::new(conn).read_line(&mut line);
        let took = start.elapsed();
        assert!(r.is_err(), "read {line:?} without an end");
        assert!(took < Duration::from_millis(1500), "took {took:?}");
        drop(ours);
        trickle.join().unwrap();
    }
}
