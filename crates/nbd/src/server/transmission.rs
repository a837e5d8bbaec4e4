//! The connection's reader thread in the transmission phase: it reads each
//! request and does only what needs the socket, handing the rest to the
//! worker pools.

use std::sync::Arc;

use tracing::{debug, info, warn};

use super::connection::{dispatch, Conn};
use super::execute::execute;
use super::handshake::Negotiated;
use super::read::{serve_read, start_read, start_read_relayed, try_read};
use super::reply::ReplyError;
use super::validate::validate;
use super::write::handle_write;
use super::Shared;
use crate::net::{Readiness, Stream};
use crate::proto::*;

/// The reader loop of one connection. Returns when the connection has ended
/// and every request read from it has finished.
pub(super) fn transmission(shared: &Arc<Shared>, stream: Arc<Stream>, neg: Negotiated, id: u64) {
    let conn = Arc::new(Conn::new(id, stream, &neg));
    let max_in_flight = shared.config.max_in_flight.max(1);
    let mut hb = [0u8; REQUEST_LEN];
    // Bytes of the next request header already in `hb`.
    let mut have = 0;
    while !conn.is_broken() {
        // Back-pressure: do not read more than the connection may queue.
        conn.wait_for_room(max_in_flight);
        let Some(req) = read_request(shared, &conn, &mut hb, have) else {
            break;
        };
        match handle_request(shared, &conn, &req, &mut hb) {
            Some(n) => have = n,
            None => break,
        }
    }
    // Let queued and executing requests finish and their replies go out
    // before the socket is closed.
    conn.uncork();
    conn.wait_idle();
    conn.stream.close();
}

/// Read the next request header, of which `have` bytes are already in
/// `hb`. `None` when the connection ends: closed, shut down, broken, or a
/// header that is not one.
fn read_request(
    shared: &Shared,
    conn: &Conn,
    hb: &mut [u8; REQUEST_LEN],
    have: usize,
) -> Option<Request> {
    let id = conn.id;
    // The next header may have arrived with the last WRITE's payload;
    // otherwise take what is there, and only poll when nothing is.
    let have = if have == 0 {
        await_header(shared, conn, hb)?
    } else {
        have
    };
    // Corked replies go out before the reader could wait for the client,
    // which may be waiting for them.
    if have < REQUEST_LEN && !conn.uncork() {
        return None;
    }
    if let Err(e) = conn.stream.read_exact(&mut hb[have..]) {
        debug!("nbd[{id}]: connection ended before a whole request header: {e}");
        return None;
    }
    match Request::parse(hb) {
        Ok(r) => Some(r),
        Err(e) => {
            info!("nbd[{id}]: bad request header ({e}); closing");
            None
        }
    }
}

/// Wait, without holding up a shutdown, until a request header starts to
/// arrive; returns how many of its bytes were read into `hb` (perhaps none
/// yet), or `None` when the connection ends.
fn await_header(shared: &Shared, conn: &Conn, hb: &mut [u8]) -> Option<usize> {
    let id = conn.id;
    if shared.shutdown.is_shutdown() {
        return None;
    }
    match conn.stream.read_nowait(hb) {
        Ok(Some(0)) => {
            debug!("nbd[{id}]: client closed the connection");
            None
        }
        Ok(Some(n)) => Some(n),
        // Nothing yet: corked replies go out before the wait.
        Ok(None) if !conn.uncork() => None,
        Ok(None) => match conn
            .stream
            .poll_readable(Some(shared.shutdown.wake_fd()), None)
        {
            // Readable: the blocking read that follows takes the header.
            Ok(Readiness::Ready) => Some(0),
            Ok(_) => None, // shutting down: stop reading requests
            Err(e) => {
                warn!("nbd[{id}]: poll failed: {e}");
                None
            }
        },
        Err(e) => {
            debug!("nbd[{id}]: read failed: {e}");
            None
        }
    }
}

/// Start one request. Returns how many bytes of the next request header
/// arrived with a WRITE's payload (into `next`), or `None` when the
/// connection must end.
fn handle_request(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    req: &Request,
    next: &mut [u8],
) -> Option<usize> {
    match req.command {
        CMD_DISC => {
            debug!("nbd[{}]: DISC", conn.id);
            None
        }
        CMD_WRITE => handle_write(shared, conn, req, next),
        CMD_READ | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS => {
            answer_or_dispatch(shared, conn, req);
            Some(0)
        }
        other => {
            conn.send_error(
                req.cookie,
                &ReplyError::new(EINVAL, format!("unknown command {other}")),
            );
            Some(0)
        }
    }
}

/// A request without a payload: refused, answered here, or handed to a
/// worker.
fn answer_or_dispatch(shared: &Arc<Shared>, conn: &Arc<Conn>, req: &Request) {
    if let Err(e) = validate(shared, conn, req) {
        conn.send_error(req.cookie, &e);
        return;
    }
    // A read the export can answer at once (a cache hit) is answered here:
    // a hand-off to a worker costs more than it.
    if req.command == CMD_READ && serve_read(conn, req, true, |sink| try_read(shared, req, sink)) {
        return;
    }
    // A miss the origin's reader can finish costs no worker either.
    if req.command == CMD_READ && start_read(shared, conn, req) {
        return;
    }
    // Nor one that only passes through: the origin's reader splices it on.
    if req.command == CMD_READ && start_read_relayed(shared, conn, req) {
        return;
    }
    // The writes a FLUSH follows are answered first, as a client expects.
    if req.command == CMD_FLUSH && !conn.uncork() {
        return;
    }
    let s = shared.clone();
    let req = *req;
    dispatch(&shared.pool, conn, move |c| execute(&s, c, &req));
}
