//! NBD URIs as libnbd spells them: where the server is, which export, and
//! the TLS settings of an `nbds` URI.

use std::io;
use std::path::PathBuf;

use crate::proto::MAX_STRING_LEN;
use crate::tls::TlsClientConfig;

/// Default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed libnbd-style URI: `nbd://HOST[:PORT]/[EXPORT]` or
/// `nbd+unix:///[EXPORT]?socket=PATH`, and with TLS `nbds://[USER@]HOST...`
/// or `nbds+unix://[USER@]/...` with libnbd's `tls-certificates=DIR`,
/// `tls-psk-file=FILE`, `tls-username=NAME`, `tls-verify-peer=false` and
/// `tls-hostname=NAME` query parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub endpoint: Endpoint,
    pub export: String,
    /// TLS settings of an `nbds` URI.
    pub tls: Option<TlsClientConfig>,
}

fn bad_uri(uri: &str, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("invalid NBD URI {uri:?}: {why}"),
    )
}

fn percent_decode(uri: &str, s: &str) -> io::Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad_uri(uri, "bad percent-encoding"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad_uri(uri, "not UTF-8 after percent-decoding"))
}

impl NbdUri {
    pub fn parse(uri: &str) -> io::Result<Self> {
        let parts = split_uri(uri)?;
        let export = percent_decode(uri, parts.path)?;
        if export.len() > MAX_STRING_LEN || export.contains('\0') {
            return Err(bad_uri(uri, "export name too long or contains NUL"));
        }
        let (scheme, tls) = match parts.scheme {
            "nbds" => ("nbd", true),
            "nbds+tcp" => ("nbd+tcp", true),
            "nbds+unix" => ("nbd+unix", true),
            s => (s, false),
        };
        let mut t = TlsClientConfig {
            verify_peer: true,
            ..TlsClientConfig::default()
        };
        let query = parse_query(uri, parts.query, &mut t)?;
        if query.tls_params && !tls {
            return Err(bad_uri(uri, "tls-* parameters need an nbds:// URI"));
        }
        let authority = strip_user(uri, parts.authority, tls, &mut t)?;
        let endpoint = match scheme {
            "nbd" | "nbd+tcp" => tcp_endpoint(uri, authority, query.socket.is_some(), &mut t)?,
            "nbd+unix" => unix_endpoint(uri, authority, query.socket)?,
            _ => {
                return Err(bad_uri(
                    uri,
                    "scheme must be nbd://, nbd+unix://, nbds:// or nbds+unix://",
                ))
            }
        };
        Ok(Self {
            endpoint,
            export,
            tls: tls.then_some(t),
        })
    }
}

/// A URI cut at its delimiters, nothing decoded yet.
struct Parts<'a> {
    scheme: &'a str,
    authority: &'a str,
    path: &'a str,
    query: &'a str,
}

fn split_uri(uri: &str) -> io::Result<Parts<'_>> {
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| bad_uri(uri, "missing scheme"))?;
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, q),
        None => (rest, ""),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], &before_query[i + 1..]),
        None => (before_query, ""),
    };
    Ok(Parts {
        scheme,
        authority,
        path,
        query,
    })
}

/// What the query string held besides the TLS settings.
struct Query {
    /// `socket=`, the path of an `nbd+unix` server.
    socket: Option<String>,
    /// Whether any `tls-*` parameter was given (only valid with `nbds`).
    tls_params: bool,
}

/// Read the query parameters into `t`; unknown ones are ignored.
fn parse_query(uri: &str, query: &str, t: &mut TlsClientConfig) -> io::Result<Query> {
    let mut socket = None;
    let mut tls_params = false;
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = || percent_decode(uri, v);
        match k {
            "socket" => socket = Some(v()?),
            "tls-certificates" => t.certificates = Some(PathBuf::from(v()?)),
            "tls-psk-file" => t.psk_file = Some(PathBuf::from(v()?)),
            "tls-username" => t.username = Some(v()?),
            "tls-hostname" => t.hostname = Some(v()?),
            "tls-verify-peer" => {
                t.verify_peer = match v()?.as_str() {
                    "true" | "on" | "yes" | "1" => true,
                    "false" | "off" | "no" | "0" => false,
                    _ => return Err(bad_uri(uri, "tls-verify-peer must be true or false")),
                }
            }
            _ => {}
        }
        tls_params |= k.starts_with("tls-");
    }
    Ok(Query { socket, tls_params })
}

/// The authority without its `USER@`; the user name (only valid with
/// `nbds`) goes into `t`, over any `tls-username=`.
fn strip_user<'a>(
    uri: &str,
    authority: &'a str,
    tls: bool,
    t: &mut TlsClientConfig,
) -> io::Result<&'a str> {
    match authority.rsplit_once('@') {
        Some(_) if !tls => Err(bad_uri(uri, "user names need an nbds:// URI")),
        Some((user, _)) if user.contains(':') => Err(bad_uri(uri, "passwords are not supported")),
        Some((user, host)) => {
            t.username = Some(percent_decode(uri, user)?);
            Ok(host)
        }
        None => Ok(authority),
    }
}

/// The endpoint of an `nbd://` URI; the host is also the name TLS
/// verifies unless `tls-hostname=` gave another.
fn tcp_endpoint(
    uri: &str,
    authority: &str,
    has_socket: bool,
    t: &mut TlsClientConfig,
) -> io::Result<Endpoint> {
    if has_socket {
        return Err(bad_uri(uri, "socket= is only valid with nbd+unix://"));
    }
    let (host, port) = split_host_port(uri, authority)?;
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p.parse().map_err(|_| bad_uri(uri, "bad port"))?,
    };
    let host = if host.is_empty() { "localhost" } else { host };
    if t.hostname.is_none() {
        t.hostname = Some(host.to_owned());
    }
    Ok(Endpoint::Tcp {
        host: host.to_owned(),
        port,
    })
}

/// `HOST[:PORT]` or `[IPv6][:PORT]`.
fn split_host_port<'a>(uri: &str, authority: &'a str) -> io::Result<(&'a str, Option<&'a str>)> {
    if let Some(r) = authority.strip_prefix('[') {
        let (h, after) = r
            .split_once(']')
            .ok_or_else(|| bad_uri(uri, "unterminated [IPv6] host"))?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((h, Some(p))),
            None if after.is_empty() => Ok((h, None)),
            None => Err(bad_uri(uri, "garbage after [IPv6] host")),
        };
    }
    Ok(match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    })
}

/// The endpoint of an `nbd+unix:///?socket=PATH` URI.
fn unix_endpoint(uri: &str, authority: &str, socket: Option<String>) -> io::Result<Endpoint> {
    if !authority.is_empty() {
        return Err(bad_uri(uri, "nbd+unix:// takes no host (use nbd+unix:///)"));
    }
    let s = socket.ok_or_else(|| bad_uri(uri, "missing ?socket=PATH"))?;
    if s.is_empty() {
        return Err(bad_uri(uri, "empty socket path"));
    }
    Ok(Endpoint::Unix(PathBuf::from(s)))
}
