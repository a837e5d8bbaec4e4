//! READ: the reply goes straight from the export's slices to the socket.

use std::io::{self, IoSlice};

use super::connection::Conn;
use super::reply::ReplyError;
use super::Shared;
use crate::export::ExportError;
use crate::proto::*;
use crate::relay::Relayed;

pub(super) fn execute_read(shared: &Shared, conn: &Conn, req: &Request) {
    let relayable = !conn.stream.is_tls();
    serve_read(conn, req, |sink| {
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
/// nothing was sent.
pub(super) fn serve_read(
    conn: &Conn,
    req: &Request,
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
        (Sink::NotCalled, Ok(Some(relayed))) if relayed.len() == req.length as usize => {
            conn.send_relayed(req.cookie, req.offset, &relayed);
        }
        (_, Ok(Some(relayed))) => {
            let msg = format!(
                "export relayed {} bytes for a {}-byte read",
                relayed.len(),
                req.length
            );
            conn.send_error(req.cookie, &ReplyError::new(EIO, msg));
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
