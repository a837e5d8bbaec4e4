//! The client's side of the handshake: option haggling, STARTTLS, and the
//! fallback to EXPORT_NAME for servers without NBD_OPT_GO.

use std::io;
use std::time::Duration;

use super::error::proto_err;
use super::ClientOptions;
use crate::export::BlockSizes;
use crate::net::Stream;
use crate::proto::*;
use crate::tls::TlsClientConfig;

/// What the handshake settled.
pub(super) struct Negotiated {
    pub(super) size: u64,
    pub(super) flags: u16,
    pub(super) sizes: Option<BlockSizes>,
    pub(super) structured: bool,
}

/// Read one option reply (header + data, bounded).
fn read_option_reply(
    stream: &Stream,
    uri: &str,
    option: u32,
) -> io::Result<(OptionReplyHeader, Vec<u8>)> {
    let mut hb = [0u8; OPTION_REPLY_HEADER_LEN];
    stream.read_exact(&mut hb)?;
    let h = OptionReplyHeader::parse(&hb).map_err(|e| proto_err(uri, "option reply", e))?;
    if h.option != option {
        return Err(proto_err(
            uri,
            "option reply",
            format!("reply to option {} while waiting for {option}", h.option),
        ));
    }
    if h.length > MAX_OPTION_LEN {
        return Err(proto_err(
            uri,
            "option reply",
            format!("{} bytes", h.length),
        ));
    }
    let mut data = vec![0u8; h.length as usize];
    stream.read_exact(&mut data)?;
    Ok((h, data))
}

fn option_error(uri: &str, what: &str, h: &OptionReplyHeader, data: &[u8]) -> io::Error {
    let msg = String::from_utf8_lossy(data);
    let kind = match h.reply_type {
        REP_ERR_UNKNOWN => io::ErrorKind::NotFound,
        REP_ERR_UNSUP | REP_ERR_TLS_REQD => io::ErrorKind::Unsupported,
        REP_ERR_POLICY => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(
        kind,
        format!(
            "{uri}: server refused {what}: {}{}{}",
            reply_type_name(h.reply_type),
            if msg.is_empty() { "" } else { ": " },
            msg
        ),
    )
}

/// Option haggling; with `tls`, STARTTLS first, and `stream` becomes the
/// TLS session.
pub(super) fn handshake(
    stream: &mut Stream,
    uri: &str,
    export: &str,
    tls: Option<&TlsClientConfig>,
    opts: &ClientOptions,
) -> io::Result<Negotiated> {
    let greeting = greet(stream, uri)?;
    if let Some(t) = tls {
        start_tls(stream, uri, t, greeting.fixed, opts.connect_timeout)?;
    }
    let stream = &*stream;

    let mut structured = false;
    if greeting.fixed {
        if opts.structured_replies {
            structured = ask_structured_replies(stream, uri)?;
        }
        if let Some(negotiated) = go(stream, uri, export, structured)? {
            return Ok(negotiated);
        }
    }
    export_name(stream, uri, export, greeting.no_zeroes, structured)
}

/// An I/O failure says it happened in the handshake: connecting can fail
/// in several places, and the message should tell which.
fn in_handshake(uri: &str) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{uri}: NBD handshake: {e}"))
}

/// What the server's greeting allows.
struct Greeting {
    /// Fixed newstyle: options can be haggled over (GO, STARTTLS).
    fixed: bool,
    /// No 124 zero bytes after the EXPORT_NAME reply.
    no_zeroes: bool,
}

/// Read the greeting and answer it with the client flags.
fn greet(stream: &Stream, uri: &str) -> io::Result<Greeting> {
    let ctx = in_handshake(uri);
    let mut g = [0u8; GREETING_LEN];
    stream.read_exact(&mut g).map_err(&ctx)?;
    let hflags = parse_greeting(&g).map_err(|e| proto_err(uri, "greeting", e))?;
    let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let mut cflags = 0u32;
    if fixed {
        cflags |= FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    stream.write_all(&cflags.to_be_bytes()).map_err(ctx)?;
    Ok(Greeting { fixed, no_zeroes })
}

/// NBD_OPT_STARTTLS, then the TLS handshake; `stream` becomes the session.
fn start_tls(
    stream: &mut Stream,
    uri: &str,
    t: &TlsClientConfig,
    fixed: bool,
    timeout: Duration,
) -> io::Result<()> {
    let ctx = in_handshake(uri);
    if !fixed {
        return Err(ctx(io::Error::new(
            io::ErrorKind::Unsupported,
            "the server cannot do STARTTLS (no fixed newstyle negotiation)",
        )));
    }
    stream
        .write_all(&OptionRequest::StartTls.encode())
        .map_err(&ctx)?;
    let (h, data) = read_option_reply(stream, uri, OPT_STARTTLS).map_err(&ctx)?;
    if h.reply_type != REP_ACK {
        return Err(option_error(uri, "STARTTLS", &h, &data));
    }
    let session = t
        .connect(stream.try_clone().map_err(&ctx)?, Some(timeout))
        .map_err(ctx)?;
    *stream = Stream::Tls(Box::new(session));
    Ok(())
}

/// Ask for structured replies; whether the server agreed.
fn ask_structured_replies(stream: &Stream, uri: &str) -> io::Result<bool> {
    let ctx = in_handshake(uri);
    stream
        .write_all(&OptionRequest::StructuredReply.encode())
        .map_err(&ctx)?;
    let (h, _) = read_option_reply(stream, uri, OPT_STRUCTURED_REPLY).map_err(ctx)?;
    Ok(h.reply_type == REP_ACK)
}

/// NBD_OPT_GO for `export`, asking for its block sizes. `None` when the
/// server does not know GO: the caller falls back to EXPORT_NAME.
fn go(
    stream: &Stream,
    uri: &str,
    export: &str,
    structured: bool,
) -> io::Result<Option<Negotiated>> {
    let ctx = in_handshake(uri);
    let go = OptionRequest::Info {
        go: true,
        name: export.to_owned(),
        requests: vec![INFO_BLOCK_SIZE],
    };
    stream.write_all(&go.encode()).map_err(&ctx)?;
    let mut export_info = None;
    let mut sizes = None;
    loop {
        let (h, data) = read_option_reply(stream, uri, OPT_GO).map_err(&ctx)?;
        match h.reply_type {
            REP_INFO => match Info::parse(&data).map_err(|e| proto_err(uri, "info", e))? {
                Info::Export { size, flags } => export_info = Some((size, flags)),
                Info::BlockSize(bs) => sizes = Some(bs),
                _ => {}
            },
            REP_ACK => {
                let (size, flags) = export_info
                    .ok_or_else(|| proto_err(uri, "GO", "server sent no NBD_INFO_EXPORT"))?;
                return Ok(Some(Negotiated {
                    size,
                    flags,
                    sizes,
                    structured,
                }));
            }
            REP_ERR_UNSUP => return Ok(None), // old server: fall back to EXPORT_NAME
            t if t & REP_FLAG_ERROR != 0 => {
                return Err(option_error(uri, &format!("export {export:?}"), &h, &data));
            }
            _ => {} // unknown non-error replies are ignored
        }
    }
}

/// NBD_OPT_EXPORT_NAME, the way in that every server knows (no block
/// sizes, and no error reply: the server just closes the connection).
fn export_name(
    stream: &Stream,
    uri: &str,
    export: &str,
    no_zeroes: bool,
    structured: bool,
) -> io::Result<Negotiated> {
    stream
        .write_all(&OptionRequest::ExportName(export.to_owned()).encode())
        .map_err(in_handshake(uri))?;
    let mut b = [0u8; EXPORT_NAME_REPLY_LEN];
    stream.read_exact(&mut b).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{uri}: server closed the connection after EXPORT_NAME {export:?} (unknown export?): {e}"),
        )
    })?;
    let (size, flags) = parse_export_name_reply(&b).map_err(|e| proto_err(uri, "export", e))?;
    if !no_zeroes {
        stream.discard(124).map_err(in_handshake(uri))?;
    }
    Ok(Negotiated {
        size,
        flags,
        sizes: None,
        structured,
    })
}
