//! A connection in the transmission phase, as its reader thread and the
//! workers running its requests share it: the socket, the send lock that
//! keeps replies whole, and the count of requests in flight.

use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tracing::debug;

use super::handshake::Negotiated;
use super::pool::Pool;
use crate::net::Stream;
use crate::proto::SIMPLE_REPLY_LEN;

/// How long [`Conn::try_send`] waits for another reply to be written.
const SEND_LOCK_WAIT: Duration = Duration::from_micros(200);
/// Room [`Conn::try_send`] leaves in the socket (kernel overhead per
/// buffer counts against it too; the reply itself is counted twice).
const SEND_MARGIN: usize = 64 << 10;

/// One connection in the transmission phase, shared by its reader and the
/// workers executing its requests.
pub(super) struct Conn {
    pub(super) id: u64,
    pub(super) stream: Arc<Stream>,
    /// Serialises replies: each reply (header + payload) is written whole.
    send_lock: Mutex<()>,
    pub(super) structured: bool,
    pub(super) meta_context: Option<u32>,
    /// Requests queued or executing; the reader waits on `in_flight_cv`
    /// for room (back-pressure) and, at the end, for none.
    in_flight: Mutex<usize>,
    in_flight_cv: Condvar,
    /// A reply could not be sent: the connection is being torn down.
    broken: AtomicBool,
    /// Success replies the reader thread has yet to send (see
    /// [`Conn::ack_soon`]); only the reader touches it.
    acks: Mutex<Vec<u8>>,
    /// Writes left before the reader may again commit one itself on an
    /// idle connection (see `write::commit_when_idle`); only the reader
    /// touches it.
    inline_backoff: AtomicU32,
    /// See [`Conn::send_buffer`].
    sndbuf: OnceLock<Option<usize>>,
}

/// Writes an idle connection hands off as usual after a request arrived
/// while its reader was making a commit.
const INLINE_BACKOFF: u32 = 256;

/// Corked success replies sent at once, at most (16 bytes each).
const ACKS_MAX: usize = 32;
/// Corked replies on a TLS session are sent once they fill a record.
const TLS_CORK: usize = 16 << 10;

impl Conn {
    pub(super) fn new(id: u64, stream: Arc<Stream>, neg: &Negotiated) -> Self {
        Self {
            id,
            stream,
            send_lock: Mutex::new(()),
            structured: neg.structured,
            meta_context: neg.meta_context,
            in_flight: Mutex::new(0),
            in_flight_cv: Condvar::new(),
            broken: AtomicBool::new(false),
            acks: Mutex::new(Vec::new()),
            inline_backoff: AtomicU32::new(0),
            sndbuf: OnceLock::new(),
        }
    }

    /// A success reply from the reader thread, sent with the next ones: by
    /// [`uncork`](Self::uncork) before the reader could wait (no whole
    /// request header in hand), or once [`ACKS_MAX`] are waiting. A busy
    /// connection then pays one `writev` for many writes. False if the
    /// connection is broken.
    pub(super) fn ack_soon(&self, reply: &[u8]) -> bool {
        self.cork(&[IoSlice::new(reply)])
    }

    /// Add a whole reply to the corked ones (reader thread only), sending
    /// them all once they fill a TLS record, or 32 success replies on a
    /// plain socket. False if the connection is broken.
    pub(super) fn cork(&self, reply: &[IoSlice<'_>]) -> bool {
        let limit = if self.stream.is_tls() {
            TLS_CORK
        } else {
            ACKS_MAX * SIMPLE_REPLY_LEN
        };
        let full = {
            let mut a = self.acks.lock();
            for s in reply {
                a.extend_from_slice(s);
            }
            a.len() >= limit
        };
        if full {
            return self.uncork();
        }
        !self.is_broken()
    }

    /// Send the corked replies now. False if the connection is broken.
    pub(super) fn uncork(&self) -> bool {
        let mut a = self.acks.lock();
        if a.is_empty() {
            return !self.is_broken();
        }
        let sent = self.send(&mut [IoSlice::new(&a)]);
        a.clear();
        sent
    }

    /// A reply could not be sent: the connection is being torn down.
    pub(super) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Wait until the connection may queue one more request (fewer than
    /// `max` in flight), sending corked replies before waiting.
    pub(super) fn wait_for_room(&self, max: usize) {
        if *self.in_flight.lock() >= max {
            self.uncork();
        }
        let mut n = self.in_flight.lock();
        while *n >= max {
            self.in_flight_cv.wait(&mut n);
        }
    }

    /// The reader may make a commit itself: nothing of this connection is
    /// queued or executing, and no request arrived during such a commit
    /// lately (see [`Conn::commit_was_overtaken`]).
    pub(super) fn may_commit_inline(&self) -> bool {
        let b = self.inline_backoff.load(Ordering::Relaxed);
        if b > 0 {
            self.inline_backoff.store(b - 1, Ordering::Relaxed);
            return false;
        }
        *self.in_flight.lock() == 0
    }

    /// A request arrived while the reader made a commit: this client keeps
    /// several in flight, so for a while its commits are handed off and
    /// its requests are read while the commits wait.
    pub(super) fn commit_was_overtaken(&self) {
        self.inline_backoff.store(INLINE_BACKOFF, Ordering::Relaxed);
    }

    /// Wait until every queued and executing request has finished.
    pub(super) fn wait_idle(&self) {
        let mut n = self.in_flight.lock();
        while *n > 0 {
            self.in_flight_cv.wait(&mut n);
        }
    }

    /// Write one whole reply; on failure the connection is torn down (the
    /// reader wakes up from the shutdown and stops).
    pub(super) fn send(&self, bufs: &mut [IoSlice<'_>]) -> bool {
        self.send_then(bufs, |_| Ok(()))
    }

    /// `send`, then `more` writes the rest of the reply, under the same lock.
    pub(super) fn send_then(
        &self,
        bufs: &mut [IoSlice<'_>],
        more: impl FnOnce(&Stream) -> io::Result<()>,
    ) -> bool {
        if self.broken.load(Ordering::SeqCst) {
            return false;
        }
        let _g = self.send_lock.lock();
        self.write_reply(bufs, more)
    }

    /// [`send`](Self::send) if it need not wait: the send lock is free
    /// (or soon), and the socket has room for the whole reply with margin,
    /// so the write cannot block. `None`, with nothing sent, otherwise. For
    /// threads that must not wait on a client (an origin's reader).
    pub(super) fn try_send(&self, bufs: &mut [IoSlice<'_>]) -> Option<bool> {
        self.try_send_then(bufs, 0, |_| Ok(()))
    }

    /// [`try_send`](Self::try_send), then `more` writes the rest of the
    /// reply, `more_len` bytes, under the same lock.
    pub(super) fn try_send_then(
        &self,
        bufs: &mut [IoSlice<'_>],
        more_len: usize,
        more: impl FnOnce(&Stream) -> io::Result<()>,
    ) -> Option<bool> {
        if self.broken.load(Ordering::SeqCst) {
            return Some(false);
        }
        let len = bufs.iter().map(|b| b.len()).sum::<usize>() + more_len;
        let _g = self.send_lock.try_lock_for(SEND_LOCK_WAIT)?;
        self.has_room(len)?;
        Some(self.write_reply(bufs, more))
    }

    /// Write a reply, `bufs` then what `more` writes, under the send lock
    /// the caller holds; on failure the connection is torn down.
    fn write_reply(
        &self,
        bufs: &mut [IoSlice<'_>],
        more: impl FnOnce(&Stream) -> io::Result<()>,
    ) -> bool {
        match self
            .stream
            .write_all_vectored(bufs)
            .and_then(|()| more(&self.stream))
        {
            Ok(()) => true,
            Err(e) => {
                debug!("nbd[{}]: sending a reply failed: {e}", self.id);
                self.break_conn();
                false
            }
        }
    }

    /// Cut-through of a relayed read (see `Relayed::pass`), on a connection
    /// with structured replies: if sending need not wait (as
    /// [`try_send_read_data`](Self::try_send_read_data)), `pass` sends the
    /// reply's data chunks under the send lock. `None`, with nothing sent
    /// and `pass` not run, otherwise.
    pub(super) fn try_pass_relayed<T>(
        &self,
        len: u32,
        pass: impl FnOnce(&Stream) -> T,
    ) -> Option<T> {
        if !self.structured || self.stream.is_tls() || self.is_broken() {
            return None;
        }
        let _g = self.send_lock.try_lock_for(SEND_LOCK_WAIT)?;
        self.has_room(len as usize)?;
        Some(pass(&self.stream))
    }

    /// `Some` if the socket has room for `len` more bytes with margin, so
    /// that writing them cannot block (the caller holds the send lock).
    fn has_room(&self, len: usize) -> Option<()> {
        let room = self
            .send_buffer()?
            .saturating_sub(self.stream.send_queued()?);
        (room >= 2 * len + SEND_MARGIN).then_some(())
    }

    /// The socket's send buffer size, asked once: it is set when the
    /// connection starts (or grows, over TCP, which only leaves more room
    /// than this counts).
    fn send_buffer(&self) -> Option<usize> {
        *self.sndbuf.get_or_init(|| self.stream.send_buffer())
    }

    pub(super) fn break_conn(&self) {
        self.broken.store(true, Ordering::SeqCst);
        self.stream.shutdown(Shutdown::Both);
    }

    /// Count a request in flight that is not dispatched to a pool (one the
    /// export finishes on its own thread); [`FinishGuard`] ends it.
    pub(super) fn begin_one(&self) {
        *self.in_flight.lock() += 1;
    }

    pub(super) fn finish_one(&self) {
        let mut n = self.in_flight.lock();
        *n = n.saturating_sub(1);
        self.in_flight_cv.notify_all();
    }
}

/// Marks a dispatched request finished, even if executing it panicked (then
/// its reply is lost, so the connection is ended rather than left waiting).
pub(super) struct FinishGuard<'a>(pub(super) &'a Conn);

impl Drop for FinishGuard<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.break_conn();
        }
        self.0.finish_one();
    }
}

/// Run `job` on a worker of `pool`, counted in the connection's in-flight
/// requests until it has finished.
pub(super) fn dispatch(pool: &Pool, conn: &Arc<Conn>, job: impl FnOnce(&Conn) + Send + 'static) {
    *conn.in_flight.lock() += 1;
    let c = conn.clone();
    pool.submit(Box::new(move || {
        let _done = FinishGuard(&c);
        job(&c);
    }));
}
