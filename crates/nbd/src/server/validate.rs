//! Checking a request before anything is executed for it.

use super::connection::Conn;
use super::reply::ReplyError;
use super::Shared;
use crate::proto::*;

/// Flags each command accepts. FUA is accepted on every command (the spec
/// requires that once SEND_FUA is advertised).
fn allowed_flags(cmd: u16, structured: bool) -> u16 {
    match cmd {
        CMD_READ if structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => CMD_FLAG_FUA,
    }
}

/// Check a request against the export. `Err` is the error to reply with;
/// nothing is executed for it.
pub(super) fn validate(shared: &Shared, conn: &Conn, req: &Request) -> Result<(), ReplyError> {
    let cmd = req.command;
    let name = command_name(cmd);
    if req.flags & !allowed_flags(cmd, conn.structured) != 0 {
        return Err(ReplyError::new(
            EINVAL,
            format!("{name}: unsupported command flags {:#x}", req.flags),
        ));
    }
    let writes = matches!(cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && shared.read_only {
        return Err(ReplyError::new(
            EPERM,
            format!("{name}: export is read-only"),
        ));
    }
    if cmd == CMD_FLUSH {
        return Ok(());
    }
    if cmd == CMD_BLOCK_STATUS && conn.meta_context.is_none() {
        return Err(ReplyError::new(
            EINVAL,
            "BLOCK_STATUS without a negotiated metadata context",
        ));
    }
    let in_range = req.end().is_some_and(|end| end <= shared.size);
    if !in_range {
        // Writes beyond the end get ENOSPC, everything else EINVAL (spec).
        let errno = if writes { ENOSPC } else { EINVAL };
        return Err(ReplyError::new(
            errno,
            format!(
                "{name}: offset {} + length {} is beyond the export size {}",
                req.offset, req.length, shared.size
            ),
        ));
    }
    if matches!(cmd, CMD_READ | CMD_WRITE) && req.length > shared.sizes.maximum {
        return Err(ReplyError::new(
            EOVERFLOW,
            format!(
                "{name}: length {} exceeds the maximum request size {}",
                req.length, shared.sizes.maximum
            ),
        ));
    }
    let min = u64::from(shared.sizes.minimum);
    if min > 1
        && matches!(cmd, CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES)
        && (!req.offset.is_multiple_of(min) || u64::from(req.length) % min != 0)
    {
        return Err(ReplyError::new(
            EINVAL,
            format!("{name}: request not aligned to the minimum block size {min}"),
        ));
    }
    if cmd == CMD_BLOCK_STATUS && req.length == 0 {
        return Err(ReplyError::new(EINVAL, "BLOCK_STATUS of zero length"));
    }
    Ok(())
}
