//! The server's side of the handshake: the greeting, option haggling
//! (export names, INFO/GO, structured replies, metadata contexts) and
//! STARTTLS.

use std::io;
use std::sync::atomic::Ordering;

use tracing::debug;

use super::Shared;
use crate::net::{Readiness, Stream};
use crate::proto::*;
use crate::tls::TlsMode;

/// What option haggling settled.
pub(super) struct Negotiated {
    pub(super) structured: bool,
    /// Context id of base:allocation when the client selected it.
    pub(super) meta_context: Option<u32>,
}

/// Context id we hand out for base:allocation.
const BASE_ALLOCATION_ID: u32 = 1;

/// A reason to end the connection (logged, never sent).
#[derive(Debug)]
pub(super) struct Hangup(pub(super) String);

impl From<io::Error> for Hangup {
    fn from(e: io::Error) -> Self {
        Hangup(e.to_string())
    }
}

fn transmission_flags(shared: &Shared, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_CACHE;
    if shared.read_only {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if shared.multi_conn {
        f |= FLAG_CAN_MULTI_CONN;
    }
    if structured {
        // Every read is answered with one data chunk, so DF costs nothing.
        f |= FLAG_SEND_DF;
    }
    f
}

fn name_matches(shared: &Shared, name: &str) -> bool {
    name.is_empty() || name == shared.config.export_name
}

fn send_opt(stream: &Stream, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    stream.write_all(&encode_option_reply(option, reply, data))
}

/// Option haggling. `Ok(None)`: the client aborted or the server is
/// shutting down; `Err`: a protocol violation, the connection ends.
/// After STARTTLS, `stream` is the TLS session.
pub(super) fn handshake(
    shared: &Shared,
    stream: &mut Stream,
    id: u64,
) -> Result<Option<Negotiated>, Hangup> {
    let wake = Some(shared.shutdown.wake_fd());
    stream.write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))?;
    if stream.poll_readable(wake, None)? == Readiness::Woken {
        return Ok(None);
    }
    let mut b4 = [0u8; 4];
    stream.read_exact(&mut b4)?;
    let cflags = parse_client_flags(&b4).map_err(|e| Hangup(format!("client flags: {e}")))?;
    let mut haggle = Haggle {
        shared,
        id,
        fixed: cflags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: cflags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta_context: None,
    };
    loop {
        if stream.poll_readable(wake, None)? == Readiness::Woken {
            return Ok(None);
        }
        let Some((opt, req)) = haggle.read_option(stream)? else {
            continue;
        };
        if haggle.refuse_without_tls(stream, opt, &req)? {
            continue;
        }
        match haggle.answer(stream, opt, req)? {
            Next::Haggle => {}
            Next::Transmit(neg) => return Ok(Some(neg)),
            Next::End => return Ok(None),
        }
    }
}

/// Option haggling under way: what the client announced and what has been
/// negotiated so far.
struct Haggle<'a> {
    shared: &'a Shared,
    id: u64,
    /// Fixed newstyle: without it only EXPORT_NAME is allowed.
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    meta_context: Option<u32>,
}

/// Where an answered option leads.
enum Next {
    /// On to the next option.
    Haggle,
    /// Into the transmission phase.
    Transmit(Negotiated),
    /// The client aborted.
    End,
}

impl Haggle<'_> {
    /// Read and parse the next option. `None`: it was answered with an
    /// error already (too long, malformed) and haggling goes on.
    fn read_option(&self, stream: &Stream) -> Result<Option<(u32, OptionRequest)>, Hangup> {
        let mut hb = [0u8; OPTION_HEADER_LEN];
        stream.read_exact(&mut hb)?;
        let hdr = OptionHeader::parse(&hb).map_err(|e| Hangup(format!("option header: {e}")))?;
        let opt = hdr.option;
        if !self.fixed && opt != OPT_EXPORT_NAME {
            return Err(Hangup(format!(
                "option {opt} without fixed newstyle negotiation"
            )));
        }
        if hdr.length > MAX_OPTION_LEN {
            skip_long_option(stream, opt, hdr.length)?;
            return Ok(None);
        }
        let mut data = vec![0u8; hdr.length as usize];
        stream.read_exact(&mut data)?;
        match OptionRequest::parse(opt, &data) {
            Ok(r) => Ok(Some((opt, r))),
            Err(e) => {
                if opt == OPT_EXPORT_NAME {
                    return Err(Hangup(format!("EXPORT_NAME: {e}")));
                }
                send_opt(stream, opt, REP_ERR_INVALID, e.to_string().as_bytes())?;
                Ok(None)
            }
        }
    }

    /// When TLS is required and not up yet, refuse every option but
    /// STARTTLS and ABORT. True when `req` was refused.
    fn refuse_without_tls(
        &self,
        stream: &Stream,
        opt: u32,
        req: &OptionRequest,
    ) -> Result<bool, Hangup> {
        let tls = self.shared.config.tls.as_deref();
        let tls_required = tls.is_some_and(|t| t.mode == TlsMode::Require) && !stream.is_tls();
        if !tls_required || matches!(req, OptionRequest::StartTls | OptionRequest::Abort) {
            return Ok(false);
        }
        if let Some(t) = tls {
            t.counters.refused_plain.fetch_add(1, Ordering::Relaxed);
        }
        if opt == OPT_EXPORT_NAME {
            // It cannot carry an error: hang up, as nbdkit does.
            return Err(Hangup("EXPORT_NAME without TLS, which is required".into()));
        }
        send_opt(stream, opt, REP_ERR_TLS_REQD, b"TLS is required")?;
        Ok(true)
    }

    fn answer(
        &mut self,
        stream: &mut Stream,
        opt: u32,
        req: OptionRequest,
    ) -> Result<Next, Hangup> {
        Ok(match req {
            OptionRequest::ExportName(name) => self.export_name(stream, &name)?,
            OptionRequest::Abort => {
                let _ = send_opt(stream, opt, REP_ACK, &[]);
                Next::End
            }
            OptionRequest::List => {
                let desc = self.shared.config.description.as_deref().unwrap_or("");
                let server = encode_rep_server(&self.shared.config.export_name, desc);
                send_opt(stream, opt, REP_SERVER, &server)?;
                send_opt(stream, opt, REP_ACK, &[])?;
                Next::Haggle
            }
            OptionRequest::StartTls => {
                self.start_tls(stream, opt)?;
                Next::Haggle
            }
            OptionRequest::Info { go, name, requests } => {
                self.info(stream, opt, go, &name, &requests)?
            }
            OptionRequest::StructuredReply => {
                self.structured = true;
                send_opt(stream, opt, REP_ACK, &[])?;
                Next::Haggle
            }
            OptionRequest::MetaContext {
                set,
                export,
                queries,
            } => {
                self.meta_context(stream, opt, set, &export, &queries)?;
                Next::Haggle
            }
            OptionRequest::Unknown(code) => {
                let msg = format!("option {code} is not supported");
                send_opt(stream, opt, REP_ERR_UNSUP, msg.as_bytes())?;
                Next::Haggle
            }
        })
    }

    fn negotiated(&self) -> Negotiated {
        Negotiated {
            structured: self.structured,
            meta_context: self.meta_context,
        }
    }

    fn export_name(&self, stream: &Stream, name: &str) -> Result<Next, Hangup> {
        if !name_matches(self.shared, name) {
            // EXPORT_NAME cannot carry an error: the spec says hang up.
            return Err(Hangup(format!("unknown export {name:?}")));
        }
        let flags = transmission_flags(self.shared, self.structured);
        stream.write_all(&encode_export_name_reply(
            self.shared.size,
            flags,
            self.no_zeroes,
        ))?;
        Ok(Next::Transmit(self.negotiated()))
    }

    /// After STARTTLS, `stream` is the TLS session.
    fn start_tls(&mut self, stream: &mut Stream, opt: u32) -> Result<(), Hangup> {
        let tls = self.shared.config.tls.as_deref();
        let Some(t) = tls.filter(|t| t.mode != TlsMode::Off) else {
            send_opt(stream, opt, REP_ERR_UNSUP, b"TLS is not supported")?;
            return Ok(());
        };
        if stream.is_tls() {
            send_opt(stream, opt, REP_ERR_INVALID, b"TLS is already up")?;
            return Ok(());
        }
        send_opt(stream, opt, REP_ACK, &[])?;
        let plain = stream.try_clone()?;
        let session = t
            .accept(plain, self.shared.config.io_timeout)
            .map_err(|e| Hangup(e.to_string()))?;
        debug!(
            "nbd[{}]: TLS session up (peer name {:?})",
            self.id,
            session.peer_name().unwrap_or("")
        );
        self.shared.conns.set_tls(self.id, session.session_info());
        *stream = Stream::Tls(Box::new(session));
        // The spec: what was negotiated before TLS is forgotten.
        self.structured = false;
        self.meta_context = None;
        Ok(())
    }

    /// NBD_OPT_INFO, or NBD_OPT_GO (`go`), which ends haggling.
    fn info(
        &self,
        stream: &Stream,
        opt: u32,
        go: bool,
        name: &str,
        requests: &[u16],
    ) -> Result<Next, Hangup> {
        let shared = self.shared;
        if !name_matches(shared, name) {
            let msg = format!("no export named {name:?}");
            send_opt(stream, opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
            return Ok(Next::Haggle);
        }
        let flags = transmission_flags(shared, self.structured);
        let mut infos = vec![
            Info::Export {
                size: shared.size,
                flags,
            },
            // Always sent: the maximum matters to every client.
            Info::BlockSize(shared.sizes),
        ];
        if requests.contains(&INFO_NAME) {
            infos.push(Info::Name(shared.config.export_name.clone()));
        }
        if requests.contains(&INFO_DESCRIPTION) {
            if let Some(d) = &shared.config.description {
                infos.push(Info::Description(d.clone()));
            }
        }
        for i in infos {
            send_opt(stream, opt, REP_INFO, &i.encode())?;
        }
        send_opt(stream, opt, REP_ACK, &[])?;
        Ok(if go {
            Next::Transmit(self.negotiated())
        } else {
            Next::Haggle
        })
    }

    /// NBD_OPT_LIST_META_CONTEXT, or NBD_OPT_SET_META_CONTEXT (`set`).
    fn meta_context(
        &mut self,
        stream: &Stream,
        opt: u32,
        set: bool,
        export: &str,
        queries: &[String],
    ) -> Result<(), Hangup> {
        if !self.structured {
            let msg = b"structured replies must be negotiated first";
            send_opt(stream, opt, REP_ERR_INVALID, msg)?;
            return Ok(());
        }
        if !name_matches(self.shared, export) {
            let msg = format!("no export named {export:?}");
            send_opt(stream, opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
            return Ok(());
        }
        // base:allocation is selected by its exact name; a LIST may
        // also ask for everything (no query) or the whole namespace.
        let wanted = if queries.is_empty() {
            !set
        } else {
            queries
                .iter()
                .any(|q| q == META_BASE_ALLOCATION || (!set && q == "base:"))
        };
        let selected = wanted && self.shared.block_status;
        if selected {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let context = encode_rep_meta_context(id, META_BASE_ALLOCATION);
            send_opt(stream, opt, REP_META_CONTEXT, &context)?;
        }
        if set {
            self.meta_context = selected.then_some(BASE_ALLOCATION_ID);
        }
        send_opt(stream, opt, REP_ACK, &[])?;
        Ok(())
    }
}

/// Answer an option longer than any valid one: no valid option is this
/// long. Skip a moderately long one and say so; a huge one is treated as
/// abuse.
fn skip_long_option(stream: &Stream, opt: u32, length: u32) -> Result<(), Hangup> {
    if length > 16 * MAX_OPTION_LEN || opt == OPT_EXPORT_NAME {
        return Err(Hangup(format!("option {opt} of {length} bytes")));
    }
    stream.discard(length.into())?;
    let known = matches!(
        opt,
        OPT_ABORT
            | OPT_LIST
            | OPT_STARTTLS
            | OPT_INFO
            | OPT_GO
            | OPT_STRUCTURED_REPLY
            | OPT_LIST_META_CONTEXT
            | OPT_SET_META_CONTEXT
    );
    let rep = if known {
        REP_ERR_TOO_BIG
    } else {
        REP_ERR_UNSUP
    };
    send_opt(stream, opt, rep, b"option data too long")?;
    Ok(())
}
