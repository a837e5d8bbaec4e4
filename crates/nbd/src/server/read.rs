//! READ: the reply goes straight from the export's slices to the socket.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tracing::debug;

use super::connection::{dispatch, Conn, FinishGuard};
use super::execute::execute;
use super::reply::ReplyError;
use super::Shared;
use crate::client::PassOn;
use crate::export::{ExportError, ReadReply, RelayReadReply};
use crate::net::Stream;
use crate::proto::*;
use crate::relay::{Passed, Relayed};

pub(super) fn execute_read(shared: &Shared, conn: &Conn, req: &Request) {
    let relayable = !conn.stream.is_tls();
    serve_read(conn, req, false, |sink| {
        Some(if relayable {
            shared.export.read_or_relay(req.offset, req.length, sink)
        } else {
            shared
                .export
                .read(req.offset, req.length, sink)
                .map(|()| None)
        })
    });
}

/// Start a read the export finishes on another thread (a miss that the
/// origin's reader answers), with no worker taken: true if started. The
/// reply goes out from the finishing thread if that need not wait for the
/// client's socket, else a worker sends a copy. An export error sends the
/// request the waiting way (`execute_read`), which retries and answers.
pub(super) fn start_read(shared: &Arc<Shared>, conn: &Arc<Conn>, req: &Request) -> bool {
    if conn.stream.is_tls() || req.length == 0 {
        return false;
    }
    conn.begin_one();
    let (s, c, r) = (shared.clone(), conn.clone(), *req);
    let reply: ReadReply = Box::new(move |res| {
        let _done = FinishGuard(&c);
        match res {
            Ok(slices) => send_soon(&s, &c, &r, slices),
            Err(_) => read_waiting_way(&s, &c, r),
        }
    });
    match shared.export.start_read(req.offset, req.length, reply) {
        Ok(()) => true,
        Err(_) => {
            conn.finish_one();
            false
        }
    }
}

/// Start a read that only passes through (see
/// [`Export::start_read_relayed`](crate::Export::start_read_relayed)), with
/// no worker taken: true if started. Where sending cannot wait, the origin's
/// reader sends the data on as it arrives ([`PassToClient`]); else it
/// splices the filled pipe on if that need not wait, or a worker does. An
/// export error sends the request the waiting way; one after part of the
/// data went on, the rest of it.
pub(super) fn start_read_relayed(shared: &Arc<Shared>, conn: &Arc<Conn>, req: &Request) -> bool {
    if conn.stream.is_tls() || req.length == 0 {
        return false;
    }
    conn.begin_one();
    let sent = Arc::new(AtomicU64::new(NOT_PASSED));
    let pass = Box::new(PassToClient {
        conn: conn.clone(),
        cookie: req.cookie,
        offset: req.offset,
        sent: sent.clone(),
    });
    let (s, c, r) = (shared.clone(), conn.clone(), *req);
    let reply: RelayReadReply = Box::new(move |res| {
        let _done = FinishGuard(&c);
        let sent = sent.load(Ordering::Acquire);
        let len = u64::from(r.length);
        match res {
            Ok(data) if sent == NOT_PASSED => send_relayed_soon(&s, &c, &r, data),
            // The last chunk went out with DONE: nothing more can be said.
            _ if sent == len => {}
            Err(_) if sent == NOT_PASSED => read_waiting_way(&s, &c, r),
            // Part of it went out, each chunk whole: the rest is read the
            // waiting way (which retries) and sent as the last chunk.
            _ => {
                let shared = s.clone();
                dispatch(&s.pool, &c, move |c| send_rest(&shared, c, &r, sent));
            }
        }
    });
    match shared
        .export
        .start_read_relayed(req.offset, req.length, pass, reply)
    {
        Ok(()) => true,
        Err(_) => {
            conn.finish_one();
            false
        }
    }
}

/// A read the export could not finish on its own thread, handed to a
/// worker to be read the waiting way (which retries).
fn read_waiting_way(shared: &Arc<Shared>, conn: &Arc<Conn>, req: Request) {
    let s = shared.clone();
    dispatch(&shared.pool, conn, move |c| execute(&s, c, &req));
}

/// The reply to a read whose relay does not hold its length.
fn wrong_relay(got: usize, req: &Request) -> ReplyError {
    let msg = format!("export relayed {got} bytes for a {}-byte read", req.length);
    ReplyError::new(EIO, msg)
}

/// Nothing of a relayed read's data went out as it arrived.
const NOT_PASSED: u64 = u64::MAX;

/// Finish a reply of which the first `sent` bytes went out in data chunks:
/// the rest as the last chunk, or an error.
fn send_rest(shared: &Shared, conn: &Conn, req: &Request, sent: u64) {
    debug_assert!(sent < u64::from(req.length));
    let (offset, len) = (req.offset + sent, req.length - sent as u32);
    let r = shared.export.read(offset, len, &mut |slices| {
        if conn.send_read_data(req.cookie, offset, len, slices) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "sending the reply failed",
            ))
        }
    });
    if let Err(e) = r {
        if !conn.is_broken() {
            conn.send_error(req.cookie, &e.into());
        }
    }
}

/// A relayed read's reply, sent as its data arrives at the origin's reader
/// (see `Relayed::pass`): the second hop overlaps the first rather than
/// following it. Each piece goes as a structured data chunk of its own, so
/// that an origin failing midway leaves whole chunks, and the reply can be
/// finished from a retry.
struct PassToClient {
    conn: Arc<Conn>,
    cookie: u64,
    offset: u64,
    /// Bytes sent in whole chunks, for the read's completion.
    sent: Arc<AtomicU64>,
}

impl PassOn for PassToClient {
    fn pass_on(self: Box<Self>, src: &Stream, relay: &mut Relayed) -> io::Result<bool> {
        let len = relay.len();
        let (cookie, offset) = (self.cookie, self.offset);
        let passed = self.conn.try_pass_relayed(len as u32, |dst| {
            relay.pass(src, dst, &mut |at, n| {
                let h = Conn::data_chunk_header(cookie, offset + at as u64, n, at + n == len);
                dst.write_all(&h)
            })
        });
        let (sent, err) = match passed {
            None => return Ok(false),
            Some(Passed::Whole) => (len, None),
            Some(Passed::DestFailed(e)) => {
                debug!("nbd[{}]: sending a reply failed: {e}", self.conn.id);
                self.conn.break_conn();
                (len, None)
            }
            Some(Passed::SourceFailed { err, sent }) => (sent, Some(err)),
        };
        self.sent.store(sent as u64, Ordering::Release);
        err.map_or(Ok(true), Err)
    }
}

/// Splice a relayed read's pipe to the client now if that cannot block,
/// else from a worker.
fn send_relayed_soon(shared: &Shared, conn: &Arc<Conn>, req: &Request, data: Relayed) {
    if data.len() != req.length as usize {
        conn.send_error(req.cookie, &wrong_relay(data.len(), req));
        return;
    }
    let (cookie, offset) = (req.cookie, req.offset);
    if conn.try_send_relayed(cookie, offset, &data).is_some() {
        return;
    }
    dispatch(&shared.pool, conn, move |c| {
        c.send_relayed(cookie, offset, &data);
    });
}

/// Send a read's data now if that cannot block, else from a copy on a
/// worker: the caller must not wait on a slow client.
fn send_soon(shared: &Shared, conn: &Arc<Conn>, req: &Request, slices: &[IoSlice<'_>]) {
    let total: usize = slices.iter().map(|s| s.len()).sum();
    if total != req.length as usize {
        let msg = format!(
            "export returned {total} bytes for a {}-byte read",
            req.length
        );
        conn.send_error(req.cookie, &ReplyError::new(EIO, msg));
        return;
    }
    let (cookie, offset, len) = (req.cookie, req.offset, req.length);
    if conn
        .try_send_read_data(cookie, offset, len, slices)
        .is_some()
    {
        return;
    }
    let mut copy = Vec::with_capacity(total);
    for s in slices {
        copy.extend_from_slice(s);
    }
    dispatch(&shared.pool, conn, move |c| {
        c.send_read_data(cookie, offset, len, &[IoSlice::new(&copy)]);
    });
}

/// A try-read (see [`Export::try_read`](crate::Export::try_read)) in the
/// shape `serve_read` takes.
pub(super) fn try_read(
    shared: &Shared,
    req: &Request,
    sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
) -> Option<Result<Option<Relayed>, ExportError>> {
    shared
        .export
        .try_read(req.offset, req.length, sink)
        .map(|r| r.map(|()| None))
}

/// Run `read` with a sink that sends the reply straight from the export's
/// slices (`writev`), or send the relay it hands back (`splice`), and
/// answer errors. False when `read` declined (returned `None`); then
/// nothing was sent. `on_reader`: this is the connection's reader thread,
/// which may cork the reply (see [`Conn::read_reply_soon`]).
pub(super) fn serve_read(
    conn: &Conn,
    req: &Request,
    on_reader: bool,
    read: impl FnOnce(
        &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Option<Result<Option<Relayed>, ExportError>>,
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
        let sent = if on_reader {
            conn.read_reply_soon(req.cookie, req.offset, req.length, slices)
        } else {
            conn.send_read_data(req.cookie, req.offset, req.length, slices)
        };
        if sent {
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
        (Sink::NotCalled, Ok(Some(relayed))) if relayed.len() == req.length as usize => {
            conn.send_relayed(req.cookie, req.offset, &relayed);
        }
        (_, Ok(Some(relayed))) => {
            conn.send_error(req.cookie, &wrong_relay(relayed.len(), req));
        }
        (_, Ok(None)) => {
            conn.send_error(
                req.cookie,
                &ReplyError::new(EIO, "export returned no data for the read"),
            );
        }
    }
    true
}
