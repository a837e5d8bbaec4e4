//! The connection's reader thread in the transmission phase: it reads each
//! request and does only what needs the socket, handing the rest to the
//! worker pools.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use tracing::{debug, info, warn};

use super::connection::{dispatch, Conn};
use super::execute::execute;
use super::handshake::Negotiated;
use super::read::serve_read;
use super::reply::ReplyError;
use super::validate::validate;
use super::write::handle_write;
use super::Shared;
use crate::net::{Readiness, Stream};
use crate::proto::*;

pub(super) fn transmission(shared: &Arc<Shared>, stream: Arc<Stream>, neg: Negotiated, id: u64) {
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
