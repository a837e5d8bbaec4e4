//! WRITE: staging on the reader thread, the payload received straight into
//! the export's slices, and the commit on a worker (or, for a writethrough,
//! started here and finished by the origin's reply); or, when staging would
//! wait, a buffered write made by a worker.

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::debug;

use super::connection::{dispatch, Conn, FinishGuard};
use super::reply::ReplyError;
use super::validate::validate;
use super::Shared;
use crate::export::{PendingWrite, Staged, WriteDone, WriteOutcome};
use crate::net::Stream;
use crate::proto::*;
use crate::relay::Relayed;

/// The largest refused WRITE payload read and thrown away, so that the
/// client gets its error and keeps its connection (libnbd and qemu send up
/// to 32 MiB); beyond it the connection ends.
const MAX_SKIPPED_PAYLOAD: u32 = 64 << 20;

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
/// this one finishes; only on a connection with nothing else to do does it
/// make a commit that waits for nothing but an msync itself. A write that
/// cannot be staged without waiting (no free slot, an overlapping write in
/// progress, a partial block, a mode that writes the origin first) is
/// received into a buffer of its own and made by a worker that may wait.
/// Returns how many bytes of the next request header arrived with the
/// payload (into `next`), or `None` when the connection must end.
pub(super) fn handle_write(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    req: &Request,
    next: &mut [u8],
) -> Option<usize> {
    let len = req.length;
    if let Err(e) = validate(shared, conn, req) {
        if len > MAX_SKIPPED_PAYLOAD {
            // Not worth reading just to throw away: hang up (allowed for a
            // client that broke the advertised maximum). No reply, which
            // the client would read as the answer to something else.
            debug!(
                "nbd[{}]: {len}-byte WRITE over the maximum; closing",
                conn.id
            );
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
            conn.send_result_soon(cookie, w.commit())
                .then_some(src.extra)
        }
        (Payload::Read, Ok(Staged::Pending(w))) => {
            let mut extra = src.extra;
            let idle = extra == 0 && conn.may_commit_inline() && {
                // Nothing else in flight; is the next request here yet?
                extra = conn
                    .stream
                    .read_nowait(src.next)
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                extra == 0
            };
            if idle {
                commit_when_idle(shared, conn, cookie, w, src.next)
            } else {
                commit(shared, conn, cookie, w);
                Some(extra)
            }
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

/// Commit a received write: started here and finished by whatever it
/// waits for, or else made by a commit worker.
fn commit(shared: &Arc<Shared>, conn: &Arc<Conn>, cookie: u64, mut w: Box<dyn PendingWrite>) {
    if !start_commit(shared, conn, cookie, &mut *w, None) {
        commit_on_worker(shared, conn, cookie, w);
    }
}

/// A commit that only a thread that may wait can make.
fn commit_on_worker(shared: &Shared, conn: &Arc<Conn>, cookie: u64, w: Box<dyn PendingWrite>) {
    dispatch(&shared.commits, conn, move |c| {
        c.send_result(cookie, w.commit());
    });
}

/// Commit a received write on a connection with nothing else in flight
/// and no next request yet: the export may finish it on this thread (see
/// [`PendingWrite::commit_when_idle`]), which spares a client that keeps
/// one request in flight a wake-up per write. A request that arrived
/// meanwhile waited for that commit, so the connection then hands its
/// commits off for a while. Returns what [`handle_write`] does.
fn commit_when_idle(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    cookie: u64,
    mut w: Box<dyn PendingWrite>,
    next: &mut [u8],
) -> Option<usize> {
    let here = Arc::new(AtomicBool::new(false));
    if !start_commit(shared, conn, cookie, &mut *w, Some(&here)) {
        commit_on_worker(shared, conn, cookie, w);
        return Some(0);
    }
    if !here.load(Ordering::Relaxed) {
        return Some(0);
    }
    // Its reply is corked: whatever is here now came during the commit.
    match conn.stream.read_nowait(next) {
        Ok(Some(n)) if n > 0 => {
            conn.commit_was_overtaken();
            Some(n)
        }
        // The next read sees an end or error again.
        _ => Some(0),
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
    let len = req.length as usize;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    if !conn.stream.is_tls() && shared.export.prefers_relay(req.offset, req.length, fua) {
        if let Some(data) = Relayed::new(len) {
            return relay_write(shared, conn, req, data);
        }
    }
    let mut buf = shared.buffers.take(len);
    let extra = match conn
        .stream
        .read_exact_vectored_then(&mut [IoSliceMut::new(&mut buf[..len])], next)
    {
        Ok(n) => n,
        Err(e) => {
            debug!("nbd[{}]: client left mid-payload: {e}", conn.id);
            shared.buffers.give(buf);
            return None;
        }
    };
    let s = shared.clone();
    let req = *req;
    dispatch(&shared.pool, conn, move |c| {
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let r = s.export.write_from(req.offset, &buf[..len], fua);
        c.send_result(req.cookie, r);
        s.buffers.give(buf);
    });
    Some(extra)
}

/// A WRITE whose payload is likely to go on to the origin: spliced from
/// the socket into a relay pipe, and sent on from there by this thread
/// (answered by the origin's reader) or else written by a worker.
fn relay_write(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    req: &Request,
    mut data: Relayed,
) -> Option<usize> {
    if let Err(e) = data.receive(&conn.stream, 0, req.length as usize) {
        debug!("nbd[{}]: client left mid-payload: {e}", conn.id);
        return None;
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let Some(mut data) = start_relayed(shared, conn, req, data, fua) else {
        return Some(0);
    };
    let s = shared.clone();
    let req = *req;
    dispatch(&shared.pool, conn, move |c| {
        let r = s.export.write_relayed(req.offset, &mut data, fua);
        c.send_result(req.cookie, r);
    });
    Some(0)
}

/// Start a relayed write that the export finishes on another thread (the
/// origin's reader): no worker waits for the origin. The data back where
/// the export declined (nothing started).
fn start_relayed(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    req: &Request,
    data: Relayed,
    fua: bool,
) -> Option<Relayed> {
    conn.begin_one();
    let done = write_done(shared, conn, req.cookie, None);
    match shared
        .export
        .start_write_relayed(req.offset, data, fua, done)
    {
        Ok(()) => None,
        Err((data, _)) => {
            conn.finish_one();
            Some(data)
        }
    }
}

/// Start a staged write's commit that another thread finishes (the origin
/// connection's reader, once a writethrough's origin write is in; the
/// thread that made an msync): no worker waits for it. False if the export
/// declined (nothing started). The reply goes out from that thread if that
/// cannot block; errors and retries go to a commit worker. With `here`,
/// by [`PendingWrite::commit_when_idle`], and a success reported on this
/// (the reader) thread sets `here` and is corked, so that the reader sees
/// what arrived before the reply went out.
fn start_commit(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    cookie: u64,
    w: &mut dyn PendingWrite,
    here: Option<&Arc<AtomicBool>>,
) -> bool {
    conn.begin_one();
    let done = write_done(shared, conn, cookie, here);
    let r = if here.is_some() {
        w.commit_when_idle(done)
    } else {
        w.commit_async(done)
    };
    match r {
        Ok(()) => true,
        Err(_) => {
            conn.finish_one();
            false
        }
    }
}

/// Where a write finished on another thread reports (see
/// [`start_commit`]); the caller has counted it in flight.
fn write_done(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    cookie: u64,
    here: Option<&Arc<AtomicBool>>,
) -> WriteDone {
    let (s, c) = (shared.clone(), conn.clone());
    let reader = here.map(|h| (h.clone(), std::thread::current().id()));
    Box::new(move |outcome| {
        let _done = FinishGuard(&c);
        match outcome {
            WriteOutcome::Done(Ok(())) => {
                let ok = SimpleReply { error: 0, cookie }.encode();
                match reader {
                    Some((here, id)) if id == std::thread::current().id() => {
                        here.store(true, Ordering::Relaxed);
                        c.ack_soon(&ok);
                    }
                    _ if c.try_send(&mut [IoSlice::new(&ok)]).is_some() => {}
                    _ => dispatch(&s.commits, &c, move |c| {
                        c.send_ok(cookie);
                    }),
                }
            }
            WriteOutcome::Done(Err(e)) => dispatch(&s.commits, &c, move |c| {
                c.send_result(cookie, Err(e));
            }),
            WriteOutcome::Retry(finish) => dispatch(&s.commits, &c, move |c| {
                c.send_result(cookie, finish());
            }),
        }
    })
}

/// Payload buffers of buffered writes, kept for the next ones: a fresh
/// zeroed buffer per write cost a pass over every payload (a 1 MiB memset)
/// before the socket's. Only the first `len` bytes of a buffer taken for
/// `len` are used, and all of them are received before any is read.
#[derive(Default)]
pub(super) struct Buffers(parking_lot::Mutex<Vec<Vec<u8>>>);

/// Buffers kept, and the largest kept.
const KEEP: usize = 64;
const KEEP_LEN: usize = 4 << 20;

impl Buffers {
    /// A buffer of at least `len` bytes.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut v = self.0.lock().pop().unwrap_or_default();
        if v.len() < len {
            v.resize(len, 0);
        }
        v
    }

    fn give(&self, v: Vec<u8>) {
        if v.len() <= KEEP_LEN {
            let mut free = self.0.lock();
            if free.len() < KEEP {
                free.push(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_buffers_are_reused_and_bounded() {
        let b = Buffers::default();
        let mut v = b.take(4096);
        assert!(v.len() >= 4096);
        v[..4].copy_from_slice(b"data");
        let p = v.as_ptr();
        b.give(v);
        let v = b.take(1024);
        assert_eq!(v.as_ptr(), p, "the kept buffer comes back");
        assert!(v.len() >= 1024);
        b.give(v);
        let v = b.take(1 << 20);
        assert!(v.len() >= 1 << 20, "a kept buffer grows to what is asked");
        b.give(vec![0; KEEP_LEN + 1]);
        b.give(v);
        assert_eq!(b.0.lock().len(), 1, "an oversized buffer is not kept");
        for _ in 0..2 * KEEP {
            b.give(vec![0; 16]);
        }
        assert_eq!(b.0.lock().len(), KEEP, "at most KEEP buffers are kept");
    }
}
