//! NBD wire format (fixed newstyle handshake, compact transmission headers).
//!
//! Everything here is pure: parsers take byte slices and return
//! `Result<_, ProtoError>` without panicking on any input (they are fuzzed),
//! and encoders produce the exact bytes to put on the wire. The server and
//! the client share these, so a round trip through both is also a test of
//! the format.
//!
//! Integers are big-endian ("network byte order") throughout.

use crate::export::{BlockSizes, Extent};

// ---------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle greeting, and the prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Oldstyle greeting's second magic (`cliserv_magic`); recognised only to
/// report it clearly.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------
// Handshake flags
// ---------------------------------------------------------------------------

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: may omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the server must not send the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this implementation understands.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// ---------------------------------------------------------------------------
// Transmission flags
// ---------------------------------------------------------------------------

pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks an option error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// The one metadata context this implementation knows.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit 15 marks an error chunk.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

// ---------------------------------------------------------------------------
// Errors carried in replies
// ---------------------------------------------------------------------------

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Symbolic name of an NBD error value, for messages.
pub fn error_name(code: u32) -> &'static str {
    match code {
        0 => "OK",
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// Name of a command, for messages and logs.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown command",
    }
}

/// Name of an option reply type, for messages.
pub fn reply_type_name(reply: u32) -> &'static str {
    match reply {
        REP_ACK => "ACK",
        REP_SERVER => "SERVER",
        REP_INFO => "INFO",
        REP_META_CONTEXT => "META_CONTEXT",
        REP_ERR_UNSUP => "unsupported option",
        REP_ERR_POLICY => "denied by policy",
        REP_ERR_INVALID => "invalid option",
        REP_ERR_PLATFORM => "not supported on this platform",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_UNKNOWN => "unknown export",
        REP_ERR_SHUTDOWN => "server shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "block size negotiation required",
        REP_ERR_TOO_BIG => "option too big",
        _ => "unknown reply",
    }
}

// ---------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------

/// Greeting: NBDMAGIC + IHAVEOPT + 16-bit handshake flags.
pub const GREETING_LEN: usize = 18;
/// Option request header: IHAVEOPT + option + length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Option reply header: magic + option + type + length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Size + flags (+124 zeroes unless NO_ZEROES) after EXPORT_NAME.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// Longest string the spec allows (export names, messages).
pub const MAX_STRING_LEN: usize = 4096;
/// Largest option payload this implementation accepts; anything longer
/// cannot be a valid option it knows (a name is at most 4096 bytes).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

// ---------------------------------------------------------------------------
// Parse errors
// ---------------------------------------------------------------------------

/// Why bytes could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("truncated message: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("{0}")]
    Invalid(&'static str),
    #[error("trailing bytes after message: {0}")]
    Trailing(usize),
}

/// Big-endian reader over a byte slice that never panics.
#[derive(Debug, Clone, Copy)]
pub struct WireReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> WireReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let rest = self.buf.get(self.pos..).unwrap_or(&[]);
        match rest.get(..n) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(ProtoError::Truncated {
                need: self.pos.saturating_add(n),
                have: self.buf.len(),
            }),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let s = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// The rest of the input.
    pub fn rest(&mut self) -> &'a [u8] {
        let r = self.buf.get(self.pos..).unwrap_or(&[]);
        self.pos = self.buf.len();
        r
    }

    /// Error unless everything was consumed.
    pub fn finish(&self) -> Result<(), ProtoError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(ProtoError::Trailing(n)),
        }
    }
}

/// Validate an NBD string: UTF-8, no NUL, at most 4096 bytes.
pub fn parse_string(bytes: &[u8]) -> Result<String, ProtoError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(ProtoError::Invalid("string longer than 4096 bytes"));
    }
    if bytes.contains(&0) {
        return Err(ProtoError::Invalid("string contains NUL"));
    }
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| ProtoError::Invalid("string is not UTF-8"))
}

/// A `u32` length field that must fit in what is left.
fn counted_string(r: &mut WireReader<'_>) -> Result<String, ProtoError> {
    let len = r.u32()? as usize;
    if len > r.remaining() {
        return Err(ProtoError::Invalid("string length exceeds option length"));
    }
    parse_string(r.bytes(len)?)
}

fn put_u16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_be_bytes());
}
fn put_u32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_be_bytes());
}
fn put_u64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_be_bytes());
}
/// Length as a wire `u32`, saturating (encoders are only fed strings the
/// caller validated; saturation keeps them panic-free regardless).
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

/// The server's first message.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// Parse the server greeting; returns the handshake flags.
pub fn parse_greeting(b: &[u8]) -> Result<u16, ProtoError> {
    let mut r = WireReader::new(b);
    let m = r.u64()?;
    if m != NBDMAGIC {
        return Err(ProtoError::BadMagic(m));
    }
    let m2 = r.u64()?;
    if m2 == CLISERV_MAGIC {
        return Err(ProtoError::Invalid("oldstyle negotiation is not supported"));
    }
    if m2 != IHAVEOPT {
        return Err(ProtoError::BadMagic(m2));
    }
    let flags = r.u16()?;
    r.finish()?;
    Ok(flags)
}

/// Parse the client's 32-bit flags; unknown bits are an error (the server
/// must then drop the connection).
pub fn parse_client_flags(b: &[u8]) -> Result<u32, ProtoError> {
    let mut r = WireReader::new(b);
    let f = r.u32()?;
    r.finish()?;
    if f & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(ProtoError::Invalid("unknown client flags"));
    }
    Ok(f)
}

/// Header of an option request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub fn parse(b: &[u8]) -> Result<Self, ProtoError> {
        let mut r = WireReader::new(b);
        let m = r.u64()?;
        if m != IHAVEOPT {
            return Err(ProtoError::BadMagic(m));
        }
        let option = r.u32()?;
        let length = r.u32()?;
        r.finish()?;
        Ok(Self { option, length })
    }

    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A parsed option request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    ExportName(String),
    Abort,
    List,
    StartTls,
    /// NBD_OPT_INFO (`go == false`) or NBD_OPT_GO (`go == true`).
    Info {
        go: bool,
        name: String,
        requests: Vec<u16>,
    },
    StructuredReply,
    /// NBD_OPT_LIST_META_CONTEXT (`set == false`) or SET (`set == true`).
    MetaContext {
        set: bool,
        export: String,
        queries: Vec<String>,
    },
    /// Any option this implementation does not know, with its code.
    Unknown(u32),
}

impl OptionRequest {
    /// The option code on the wire.
    pub fn code(&self) -> u32 {
        match self {
            Self::ExportName(_) => OPT_EXPORT_NAME,
            Self::Abort => OPT_ABORT,
            Self::List => OPT_LIST,
            Self::StartTls => OPT_STARTTLS,
            Self::Info { go: false, .. } => OPT_INFO,
            Self::Info { go: true, .. } => OPT_GO,
            Self::StructuredReply => OPT_STRUCTURED_REPLY,
            Self::MetaContext { set: false, .. } => OPT_LIST_META_CONTEXT,
            Self::MetaContext { set: true, .. } => OPT_SET_META_CONTEXT,
            Self::Unknown(c) => *c,
        }
    }

    /// Parse the data of option `option`. Errors mean "syntactically
    /// invalid" (the server answers NBD_REP_ERR_INVALID).
    pub fn parse(option: u32, data: &[u8]) -> Result<Self, ProtoError> {
        let no_data = |req: Self| {
            if data.is_empty() {
                Ok(req)
            } else {
                Err(ProtoError::Invalid("option takes no data"))
            }
        };
        match option {
            OPT_EXPORT_NAME => Ok(Self::ExportName(parse_string(data)?)),
            // ABORT's data is to be ignored, not rejected: the client is leaving.
            OPT_ABORT => Ok(Self::Abort),
            OPT_LIST => no_data(Self::List),
            OPT_STARTTLS => no_data(Self::StartTls),
            OPT_STRUCTURED_REPLY => no_data(Self::StructuredReply),
            OPT_INFO | OPT_GO => {
                let mut r = WireReader::new(data);
                let name = counted_string(&mut r)?;
                let n = r.u16()? as usize;
                if r.remaining() != n * 2 {
                    return Err(ProtoError::Invalid(
                        "information request count does not match option length",
                    ));
                }
                let mut requests = Vec::with_capacity(n);
                for _ in 0..n {
                    requests.push(r.u16()?);
                }
                r.finish()?;
                Ok(Self::Info {
                    go: option == OPT_GO,
                    name,
                    requests,
                })
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let mut r = WireReader::new(data);
                let export = counted_string(&mut r)?;
                let n = r.u32()? as usize;
                // Each query needs at least its 4-byte length: bound the
                // allocation by what the input can actually hold.
                if n > r.remaining() / 4 {
                    return Err(ProtoError::Invalid("query count exceeds option length"));
                }
                let mut queries = Vec::with_capacity(n);
                for _ in 0..n {
                    queries.push(counted_string(&mut r)?);
                }
                r.finish()?;
                Ok(Self::MetaContext {
                    set: option == OPT_SET_META_CONTEXT,
                    export,
                    queries,
                })
            }
            other => Ok(Self::Unknown(other)),
        }
    }

    /// Option data (without the header).
    pub fn encode_data(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            Self::ExportName(name) => v.extend_from_slice(name.as_bytes()),
            Self::Abort
            | Self::List
            | Self::StartTls
            | Self::StructuredReply
            | Self::Unknown(_) => {}
            Self::Info { name, requests, .. } => {
                put_u32(&mut v, len32(name.len()));
                v.extend_from_slice(name.as_bytes());
                put_u16(&mut v, u16::try_from(requests.len()).unwrap_or(u16::MAX));
                for q in requests.iter().take(u16::MAX as usize) {
                    put_u16(&mut v, *q);
                }
            }
            Self::MetaContext {
                export, queries, ..
            } => {
                put_u32(&mut v, len32(export.len()));
                v.extend_from_slice(export.as_bytes());
                put_u32(&mut v, len32(queries.len()));
                for q in queries {
                    put_u32(&mut v, len32(q.len()));
                    v.extend_from_slice(q.as_bytes());
                }
            }
        }
        v
    }

    /// Header plus data, ready to send.
    pub fn encode(&self) -> Vec<u8> {
        let data = self.encode_data();
        let mut v = OptionHeader {
            option: self.code(),
            length: len32(data.len()),
        }
        .encode()
        .to_vec();
        v.extend_from_slice(&data);
        v
    }
}

/// Header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub fn parse(b: &[u8]) -> Result<Self, ProtoError> {
        let mut r = WireReader::new(b);
        let m = r.u64()?;
        if m != OPTION_REPLY_MAGIC {
            return Err(ProtoError::BadMagic(m));
        }
        let option = r.u32()?;
        let reply_type = r.u32()?;
        let length = r.u32()?;
        r.finish()?;
        Ok(Self {
            option,
            reply_type,
            length,
        })
    }

    pub fn encode(&self) -> [u8; OPTION_REPLY_HEADER_LEN] {
        let mut b = [0u8; OPTION_REPLY_HEADER_LEN];
        b[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.reply_type.to_be_bytes());
        b[16..].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    pub fn is_error(&self) -> bool {
        self.reply_type & REP_FLAG_ERROR != 0
    }
}

/// A whole option reply (header + data), ready to send.
pub fn encode_option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut v = OptionReplyHeader {
        option,
        reply_type,
        length: len32(data.len()),
    }
    .encode()
    .to_vec();
    v.extend_from_slice(data);
    v
}

/// NBD_REP_SERVER data: a name and optional description.
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len() + description.len());
    put_u32(&mut v, len32(name.len()));
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(description.as_bytes());
    v
}

/// Parse NBD_REP_SERVER data into (name, description).
pub fn parse_rep_server(data: &[u8]) -> Result<(String, String), ProtoError> {
    let mut r = WireReader::new(data);
    let name = counted_string(&mut r)?;
    let desc = parse_string(r.rest())?;
    Ok((name, desc))
}

/// NBD_REP_META_CONTEXT data.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    put_u32(&mut v, id);
    v.extend_from_slice(name.as_bytes());
    v
}

/// Parse NBD_REP_META_CONTEXT data into (id, name).
pub fn parse_rep_meta_context(data: &[u8]) -> Result<(u32, String), ProtoError> {
    let mut r = WireReader::new(data);
    let id = r.u32()?;
    Ok((id, parse_string(r.rest())?))
}

/// An NBD_REP_INFO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize(BlockSizes),
    /// An information type this implementation does not know (clients
    /// must ignore those).
    Unknown(u16),
}

impl Info {
    pub fn parse(data: &[u8]) -> Result<Self, ProtoError> {
        let mut r = WireReader::new(data);
        let kind = r.u16()?;
        let info = match kind {
            INFO_EXPORT => {
                let size = r.u64()?;
                let flags = r.u16()?;
                Self::Export { size, flags }
            }
            INFO_NAME => Self::Name(parse_string(r.rest())?),
            INFO_DESCRIPTION => Self::Description(parse_string(r.rest())?),
            INFO_BLOCK_SIZE => {
                let minimum = r.u32()?;
                let preferred = r.u32()?;
                let maximum = r.u32()?;
                let bs = BlockSizes {
                    minimum,
                    preferred,
                    maximum,
                };
                validate_block_sizes(&bs)?;
                Self::BlockSize(bs)
            }
            other => {
                r.rest();
                Self::Unknown(other)
            }
        };
        r.finish()?;
        Ok(info)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            Self::Export { size, flags } => {
                put_u16(&mut v, INFO_EXPORT);
                put_u64(&mut v, *size);
                put_u16(&mut v, *flags);
            }
            Self::Name(s) => {
                put_u16(&mut v, INFO_NAME);
                v.extend_from_slice(s.as_bytes());
            }
            Self::Description(s) => {
                put_u16(&mut v, INFO_DESCRIPTION);
                v.extend_from_slice(s.as_bytes());
            }
            Self::BlockSize(bs) => {
                put_u16(&mut v, INFO_BLOCK_SIZE);
                put_u32(&mut v, bs.minimum);
                put_u32(&mut v, bs.preferred);
                put_u32(&mut v, bs.maximum);
            }
            Self::Unknown(k) => put_u16(&mut v, *k),
        }
        v
    }
}

/// The spec's rules for block sizes: minimum a power of two in 1..=64 KiB,
/// preferred a power of two at least the minimum (and at least 512 in the
/// spec, relaxed here to the minimum), maximum a multiple of the minimum.
pub fn validate_block_sizes(bs: &BlockSizes) -> Result<(), ProtoError> {
    if !bs.minimum.is_power_of_two() || bs.minimum > 64 * 1024 {
        return Err(ProtoError::Invalid(
            "minimum block size is not a power of two <= 64 KiB",
        ));
    }
    if !bs.preferred.is_power_of_two() || bs.preferred < bs.minimum {
        return Err(ProtoError::Invalid("preferred block size is invalid"));
    }
    if bs.maximum < bs.minimum || !bs.maximum.is_multiple_of(bs.minimum) {
        return Err(ProtoError::Invalid(
            "maximum block size is not a multiple of the minimum",
        ));
    }
    Ok(())
}

/// What the server sends after a successful NBD_OPT_EXPORT_NAME.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(EXPORT_NAME_REPLY_LEN + 124);
    put_u64(&mut v, size);
    put_u16(&mut v, flags);
    if !no_zeroes {
        v.resize(EXPORT_NAME_REPLY_LEN + 124, 0);
    }
    v
}

/// Parse the 10 bytes of size and flags after EXPORT_NAME.
pub fn parse_export_name_reply(b: &[u8]) -> Result<(u64, u16), ProtoError> {
    let mut r = WireReader::new(b);
    let size = r.u64()?;
    let flags = r.u16()?;
    r.finish()?;
    Ok((size, flags))
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// A transmission request header. The payload of a WRITE follows it on the
/// wire and is not part of this struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    /// The client's opaque 64-bit cookie ("handle"), echoed in the reply.
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn parse(b: &[u8]) -> Result<Self, ProtoError> {
        let mut r = WireReader::new(b);
        let m = r.u32()?;
        if m != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic(m.into()));
        }
        let flags = r.u16()?;
        let command = r.u16()?;
        let cookie = r.u64()?;
        let offset = r.u64()?;
        let length = r.u32()?;
        r.finish()?;
        Ok(Self {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// `offset + length` without overflow; `None` when it overflows u64.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.length))
    }
}

/// A simple reply header (READ data, if any, follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub fn parse(b: &[u8]) -> Result<Self, ProtoError> {
        let mut r = WireReader::new(b);
        let m = r.u32()?;
        if m != SIMPLE_REPLY_MAGIC {
            return Err(ProtoError::BadMagic(m.into()));
        }
        let error = r.u32()?;
        let cookie = r.u64()?;
        r.finish()?;
        Ok(Self { error, cookie })
    }

    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }
}

/// A structured reply chunk header (its payload follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructuredReply {
    pub flags: u16,
    pub reply_type: u16,
    pub cookie: u64,
    pub length: u32,
}

impl StructuredReply {
    pub fn parse(b: &[u8]) -> Result<Self, ProtoError> {
        let mut r = WireReader::new(b);
        let m = r.u32()?;
        if m != STRUCTURED_REPLY_MAGIC {
            return Err(ProtoError::BadMagic(m.into()));
        }
        let flags = r.u16()?;
        let reply_type = r.u16()?;
        let cookie = r.u64()?;
        let length = r.u32()?;
        r.finish()?;
        Ok(Self {
            flags,
            reply_type,
            cookie,
            length,
        })
    }

    pub fn encode(&self) -> [u8; STRUCTURED_REPLY_LEN] {
        let mut b = [0u8; STRUCTURED_REPLY_LEN];
        b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.reply_type.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Either kind of reply header, told apart by its magic. The first four
/// bytes decide how many header bytes there are: 16 for a simple reply, 20
/// for a structured one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple(SimpleReply),
    Structured(StructuredReply),
}

impl ReplyHeader {
    /// Total header length implied by the magic in the first 4 bytes.
    pub fn header_len(magic: &[u8]) -> Result<usize, ProtoError> {
        let m = WireReader::new(magic).u32()?;
        match m {
            SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN),
            other => Err(ProtoError::BadMagic(other.into())),
        }
    }

    pub fn parse(b: &[u8]) -> Result<Self, ProtoError> {
        match Self::header_len(b)? {
            SIMPLE_REPLY_LEN => Ok(Self::Simple(SimpleReply::parse(b)?)),
            _ => Ok(Self::Structured(StructuredReply::parse(b)?)),
        }
    }
}

/// An error chunk's payload (NBD_REPLY_TYPE_ERROR / ERROR_OFFSET).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    pub error: u32,
    pub message: String,
    /// Present for NBD_REPLY_TYPE_ERROR_OFFSET.
    pub offset: Option<u64>,
}

impl ErrorChunk {
    /// Parse the payload of a chunk of type `reply_type` (bit 15 set).
    /// Unknown error types are accepted (the client must treat them as
    /// errors), with any fields after the message ignored.
    pub fn parse(reply_type: u16, payload: &[u8]) -> Result<Self, ProtoError> {
        let mut r = WireReader::new(payload);
        let error = r.u32()?;
        let mlen = r.u16()? as usize;
        if mlen > r.remaining() {
            return Err(ProtoError::Invalid("error message longer than chunk"));
        }
        // Messages are for humans: be lenient about their encoding.
        let message = String::from_utf8_lossy(r.bytes(mlen)?).into_owned();
        let offset = if reply_type == REPLY_TYPE_ERROR_OFFSET {
            Some(r.u64()?)
        } else {
            r.rest();
            None
        };
        r.finish()?;
        if error == 0 {
            return Err(ProtoError::Invalid("error chunk with error 0"));
        }
        Ok(Self {
            error,
            message,
            offset,
        })
    }

    /// The payload; the message is cut to fit its 16-bit length (on a
    /// character boundary).
    pub fn encode(&self) -> Vec<u8> {
        let mut msg = self.message.as_str();
        let mut cut = msg.len().min(MAX_STRING_LEN);
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg = &msg[..cut];
        let mut v = Vec::with_capacity(6 + msg.len() + 8);
        put_u32(&mut v, self.error);
        put_u16(&mut v, msg.len() as u16);
        v.extend_from_slice(msg.as_bytes());
        if let Some(off) = self.offset {
            put_u64(&mut v, off);
        }
        v
    }

    pub fn reply_type(&self) -> u16 {
        if self.offset.is_some() {
            REPLY_TYPE_ERROR_OFFSET
        } else {
            REPLY_TYPE_ERROR
        }
    }
}

/// Parse an NBD_REPLY_TYPE_OFFSET_HOLE payload into (offset, length).
pub fn parse_offset_hole(payload: &[u8]) -> Result<(u64, u32), ProtoError> {
    let mut r = WireReader::new(payload);
    let off = r.u64()?;
    let len = r.u32()?;
    r.finish()?;
    if len == 0 {
        return Err(ProtoError::Invalid("zero-length hole"));
    }
    Ok((off, len))
}

/// An NBD_REPLY_TYPE_BLOCK_STATUS payload.
pub fn encode_block_status(context_id: u32, extents: &[Extent]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + 8 * extents.len());
    put_u32(&mut v, context_id);
    for e in extents {
        put_u32(&mut v, e.length);
        put_u32(&mut v, e.flags);
    }
    v
}

/// Parse an NBD_REPLY_TYPE_BLOCK_STATUS payload into (context id, extents).
pub fn parse_block_status(payload: &[u8]) -> Result<(u32, Vec<Extent>), ProtoError> {
    let mut r = WireReader::new(payload);
    let id = r.u32()?;
    if r.remaining() == 0 || !r.remaining().is_multiple_of(8) {
        return Err(ProtoError::Invalid(
            "block status payload is not 4 + a positive multiple of 8 bytes",
        ));
    }
    let mut extents = Vec::with_capacity(r.remaining() / 8);
    while r.remaining() > 0 {
        let length = r.u32()?;
        let flags = r.u32()?;
        if length == 0 {
            return Err(ProtoError::Invalid("zero-length extent"));
        }
        extents.push(Extent { length, flags });
    }
    Ok((id, extents))
}
