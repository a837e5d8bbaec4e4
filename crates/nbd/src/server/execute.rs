//! Running a validated request other than WRITE on a worker: READ that
//! missed, FLUSH, TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS.

use std::io::IoSlice;

use super::connection::Conn;
use super::read::execute_read;
use super::reply::ReplyError;
use super::Shared;
use crate::export::ZeroFlags;
use crate::proto::*;

/// Run a validated non-WRITE request on a worker and reply.
pub(super) fn execute(shared: &Shared, conn: &Conn, req: &Request) {
    if conn.is_broken() {
        return;
    }
    let ex = &shared.export;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len64 = u64::from(req.length);
    let cookie = req.cookie;
    match req.command {
        CMD_READ => execute_read(shared, conn, req),
        CMD_FLUSH => {
            conn.send_result(cookie, ex.flush());
        }
        CMD_TRIM => {
            let r = if len64 == 0 {
                Ok(())
            } else {
                ex.trim(req.offset, len64, fua)
            };
            conn.send_result(cookie, r);
        }
        CMD_WRITE_ZEROES => {
            let flags = ZeroFlags {
                fua,
                no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
                fast_zero: req.flags & CMD_FLAG_FAST_ZERO != 0,
            };
            let r = if len64 == 0 {
                Ok(())
            } else {
                ex.write_zeroes(req.offset, len64, flags)
            };
            conn.send_result(cookie, r);
        }
        CMD_CACHE => {
            let r = if len64 == 0 {
                Ok(())
            } else {
                ex.cache(req.offset, len64)
            };
            conn.send_result(cookie, r);
        }
        CMD_BLOCK_STATUS => execute_block_status(shared, conn, req),
        _ => {
            conn.send_error(cookie, &ReplyError::new(EINVAL, "unknown command"));
        }
    }
}

/// Most descriptors sent in one BLOCK_STATUS reply (the spec lets a server
/// describe less than asked; this bounds the reply's size).
const MAX_EXTENTS: usize = 64 * 1024;

fn execute_block_status(shared: &Shared, conn: &Conn, req: &Request) {
    let Some(id) = conn.meta_context else {
        conn.send_error(req.cookie, &ReplyError::new(EINVAL, "no metadata context"));
        return;
    };
    let len64 = u64::from(req.length);
    let extents = match shared.export.block_status(req.offset, len64) {
        Some(Ok(e)) => e,
        Some(Err(e)) => {
            conn.send_error(req.cookie, &e.into());
            return;
        }
        // Status 0 ("allocated, contents unknown") is always a safe answer.
        None => Vec::new(),
    };
    // Keep what the spec allows: non-empty extents whose sum stays within
    // the request, at most one with REQ_ONE, and at least one in total.
    let mut out = Vec::new();
    let mut left = req.length;
    for mut e in extents {
        if e.length == 0 {
            continue;
        }
        if left == 0 {
            break;
        }
        e.length = e.length.min(left);
        left -= e.length;
        out.push(e);
        if req.flags & CMD_FLAG_REQ_ONE != 0 || out.len() >= MAX_EXTENTS {
            break;
        }
    }
    if out.is_empty() {
        out.push(crate::export::Extent {
            length: req.length,
            flags: 0,
        });
    }
    let payload = encode_block_status(id, &out);
    let hdr = StructuredReply {
        flags: REPLY_FLAG_DONE,
        reply_type: REPLY_TYPE_BLOCK_STATUS,
        cookie: req.cookie,
        length: payload.len() as u32,
    }
    .encode();
    conn.send(&mut [IoSlice::new(&hdr), IoSlice::new(&payload)]);
}
