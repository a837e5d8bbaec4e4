//! TLS for NBD (NBD_OPT_STARTTLS), over the system OpenSSL through the
//! `openssl` crate: X.509 certificates laid out as nbdkit and qemu lay them
//! out (`ca-cert.pem`, `server-cert.pem`, `server-key.pem` in one
//! directory), or pre-shared keys in psktool's format (`identity:hexkey`
//! per line). Both interoperate with GnuTLS-based peers (libnbd, nbdkit,
//! qemu): certificates over TLS 1.3 or 1.2, PSK as TLS 1.3 external PSK or
//! the TLS 1.2 PSK suites.
//!
//! A [`TlsStream`] is one TLS session over a non-blocking socket, shared by
//! a connection's reader and its repliers like a plain [`Stream`]: every
//! OpenSSL call is made under the session's lock, and the lock is never
//! held while waiting for the socket, so a reader waiting for the next
//! request never holds up a reply.
//!
//! No secret (key, PSK) is ever logged or shown by `Debug`.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::nid::Nid;
use openssl::ssl::{
    ErrorCode, Ssl, SslAcceptor, SslConnector, SslConnectorBuilder, SslContext, SslFiletype,
    SslMethod, SslOptions, SslStream, SslVerifyMode, SslVersion,
};
use openssl::x509::X509;
use parking_lot::Mutex;

use crate::conns::TlsSessionInfo;
use crate::net::{Readiness, Stream};

/// Whether a server offers or insists on TLS (as nbdkit's `--tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// STARTTLS is refused as unsupported.
    #[default]
    Off,
    /// Clients may use TLS or not.
    On,
    /// Every option but STARTTLS (and ABORT) is refused until TLS is up.
    Require,
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "on" => Ok(Self::On),
            "require" => Ok(Self::Require),
            _ => Err(format!("TLS mode {s:?}: expected off, on or require")),
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::On => "on",
            Self::Require => "require",
        })
    }
}

/// Where a server's credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsCredentials {
    /// A directory with `server-cert.pem`, `server-key.pem` and (needed to
    /// verify clients) `ca-cert.pem`.
    X509 { dir: PathBuf, verify_peer: bool },
    /// A psktool file: `identity:hexkey` per line.
    Psk { file: PathBuf },
}

/// Server-side TLS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsServerConfig {
    pub mode: TlsMode,
    pub credentials: TlsCredentials,
    /// When not empty, only these PSK identities, or (with verify_peer)
    /// client certificates with one of these subject common names, get in.
    pub allow: Vec<String>,
}

/// Key bytes, overwritten with zeroes when dropped. No `Debug`.
#[derive(Clone)]
struct Secret(Vec<u8>);

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: a valid, exclusively borrowed byte; volatile so that
            // the zeroing is not optimised away as a dead store.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// Pre-shared keys by identity. `Debug` shows the identities only.
#[derive(Clone, Default)]
pub struct PskKeys {
    keys: HashMap<String, Secret>,
}

impl fmt::Debug for PskKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("PskKeys")
            .field("identities", &ids)
            .finish_non_exhaustive()
    }
}

impl PskKeys {
    /// Parse a psktool file. Errors name the line, never the key.
    pub fn load(path: &Path) -> io::Result<Self> {
        // The file's bytes are zeroed when dropped, like the keys.
        let raw =
            Secret(std::fs::read(path).map_err(|e| {
                io::Error::new(e.kind(), format!("PSK file {}: {e}", path.display()))
            })?);
        let text = std::str::from_utf8(&raw.0).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("PSK file {}: not text", path.display()),
            )
        })?;
        let mut keys = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "PSK file {} line {}: {why} (expected IDENTITY:HEXKEY, as psktool writes)",
                        path.display(),
                        i + 1
                    ),
                )
            };
            let (id, hex) = line.rsplit_once(':').ok_or_else(|| bad("no ':'"))?;
            if id.is_empty() || id.len() > 255 {
                return Err(bad("identity empty or longer than 255 bytes"));
            }
            let key = decode_hex(hex).ok_or_else(|| bad("key is not hexadecimal"))?;
            if key.is_empty() || key.len() > 256 {
                return Err(bad("key empty or longer than 256 bytes"));
            }
            keys.insert(id.to_string(), Secret(key));
        }
        if keys.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("PSK file {} holds no key", path.display()),
            ));
        }
        Ok(Self { keys })
    }

    pub fn get(&self, identity: &str) -> Option<&[u8]> {
        self.keys.get(identity).map(|k| &k.0[..])
    }

    /// The only identity, or the one named: what a client presents.
    pub fn pick(&self, identity: Option<&str>) -> Option<(&str, &[u8])> {
        match identity {
            Some(id) => self.keys.get_key_value(id),
            None if self.keys.len() == 1 => self.keys.iter().next(),
            None => None,
        }
        .map(|(k, v)| (k.as_str(), &v.0[..]))
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Counters of a server's TLS handshakes.
#[derive(Debug, Default)]
pub struct TlsCounters {
    /// Sessions established.
    pub handshakes: AtomicU64,
    /// TLS handshakes that failed (bad credentials, not TLS at all).
    pub failed_handshakes: AtomicU64,
    /// Options refused because TLS is required and not yet up.
    pub refused_plain: AtomicU64,
}

/// A snapshot of [`TlsCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsStats {
    pub handshakes: u64,
    pub failed_handshakes: u64,
    pub refused_plain: u64,
}

/// A server's TLS context: credentials loaded once, shared by connections.
pub struct TlsServer {
    pub mode: TlsMode,
    ctx: SslContext,
    allow: Vec<String>,
    /// Check the allow list against client certificates.
    check_cert_names: bool,
    /// Where the PSK callback leaves the identity it accepted (PSK only).
    psk_identity: Option<Index<Ssl, String>>,
    pub counters: TlsCounters,
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServer")
            .field("mode", &self.mode)
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

fn ssl_err(what: impl fmt::Display, e: ErrorStack) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("{what}: {e}"))
}

/// The session slot for the PSK identity the server accepted. OpenSSL's
/// `SSL_get_psk_identity` answers only for TLS 1.2 PSK suites, not for a
/// TLS 1.3 external PSK, so the callback records it itself. One slot per
/// process (a race at the first use at worst wastes one).
fn psk_identity_index() -> io::Result<Index<Ssl, String>> {
    static INDEX: OnceLock<Index<Ssl, String>> = OnceLock::new();
    ex_index(&INDEX)
}

/// The session slot for why the PSK callback refused the client: OpenSSL
/// itself then reports only that no cipher or signature algorithm fit.
fn psk_refusal_index() -> io::Result<Index<Ssl, String>> {
    static INDEX: OnceLock<Index<Ssl, String>> = OnceLock::new();
    ex_index(&INDEX)
}

fn ex_index(slot: &OnceLock<Index<Ssl, String>>) -> io::Result<Index<Ssl, String>> {
    if let Some(i) = slot.get() {
        return Ok(*i);
    }
    let i = Ssl::new_ex_index().map_err(|e| ssl_err("TLS", e))?;
    Ok(*slot.get_or_init(|| i))
}

fn require_file(p: &Path) -> io::Result<()> {
    if p.is_file() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("TLS credentials: {} is missing", p.display()),
        ))
    }
}

impl TlsServer {
    /// Load the credentials. Fails with a message naming the file at fault.
    pub fn new(cfg: &TlsServerConfig) -> io::Result<Self> {
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
            .map_err(|e| ssl_err("TLS", e))?;
        let mut check_cert_names = false;
        let mut psk_identity = None;
        match &cfg.credentials {
            TlsCredentials::X509 { dir, verify_peer } => {
                let cert = dir.join("server-cert.pem");
                let key = dir.join("server-key.pem");
                require_file(&cert)?;
                require_file(&key)?;
                b.set_certificate_chain_file(&cert)
                    .map_err(|e| ssl_err(cert.display(), e))?;
                b.set_private_key_file(&key, SslFiletype::PEM)
                    .map_err(|e| ssl_err(key.display(), e))?;
                b.check_private_key()
                    .map_err(|e| ssl_err(format!("{} and {}", cert.display(), key.display()), e))?;
                if *verify_peer {
                    let ca = dir.join("ca-cert.pem");
                    require_file(&ca)?;
                    b.set_ca_file(&ca).map_err(|e| ssl_err(ca.display(), e))?;
                    b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
                    check_cert_names = true;
                } else if !cfg.allow.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "a TLS allow list of certificate names needs --tls-verify-peer",
                    ));
                }
            }
            TlsCredentials::Psk { file } => {
                let keys = PskKeys::load(file)?;
                let allow = cfg.allow.clone();
                let index = psk_identity_index()?;
                let refusal = psk_refusal_index()?;
                psk_identity = Some(index);
                // The intermediate profile has no PSK suites: TLS 1.2 PSK
                // suites for older peers, TLS 1.3 external PSK otherwise.
                b.set_cipher_list(PSK_CIPHERS)
                    .map_err(|e| ssl_err("PSK cipher list", e))?;
                b.set_psk_server_callback(move |ssl, identity, out| {
                    let id = identity.map(String::from_utf8_lossy).unwrap_or_default();
                    let allowed = allow.is_empty() || allow.iter().any(|a| *a == id);
                    match keys.get(&id).filter(|_| allowed) {
                        Some(k) if k.len() <= out.len() => {
                            ssl.set_ex_data(index, id.into_owned());
                            out[..k.len()].copy_from_slice(k);
                            Ok(k.len())
                        }
                        // 0: no key; the handshake fails, and says why.
                        _ => {
                            let why = match keys.get(&id) {
                                None => format!("unknown PSK identity {id:?}"),
                                Some(_) if !allowed => {
                                    format!("PSK identity {id:?} is not in the TLS allow list")
                                }
                                Some(_) => format!("the PSK of identity {id:?} is too long"),
                            };
                            ssl.set_ex_data(refusal, why);
                            Ok(0)
                        }
                    }
                });
            }
        }
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(|e| ssl_err("TLS", e))?;
        // No session resumption: nothing to hand out tickets for.
        b.set_num_tickets(0).map_err(|e| ssl_err("TLS", e))?;
        b.set_options(SslOptions::IGNORE_UNEXPECTED_EOF);
        // One read(2) for many requests' records instead of two per record
        // (header, then body); see `TlsStream::poll_readable`.
        b.set_read_ahead(true);
        let ctx: SslContext = b.build().into_context();
        Ok(Self {
            mode: cfg.mode,
            ctx,
            allow: cfg.allow.clone(),
            check_cert_names,
            psk_identity,
            counters: TlsCounters::default(),
        })
    }

    pub fn stats(&self) -> TlsStats {
        TlsStats {
            handshakes: self.counters.handshakes.load(Ordering::Relaxed),
            failed_handshakes: self.counters.failed_handshakes.load(Ordering::Relaxed),
            refused_plain: self.counters.refused_plain.load(Ordering::Relaxed),
        }
    }

    /// The server side of a TLS handshake on `plain`, bounded by the
    /// socket's timeouts. Counts the outcome.
    pub fn accept(&self, plain: Stream, timeout: Option<Duration>) -> io::Result<TlsStream> {
        let r = self.accept_inner(plain, timeout);
        let c = if r.is_ok() {
            &self.counters.handshakes
        } else {
            &self.counters.failed_handshakes
        };
        c.fetch_add(1, Ordering::Relaxed);
        r
    }

    /// Why a PSK handshake failed, in words: the callback refused the
    /// identity, or accepted it and the client's key did not match.
    fn psk_failure(&self, s: &SslStream<Plain>) -> Option<io::Error> {
        let slot = |i: Option<Index<Ssl, String>>| i.and_then(|i| s.ssl().ex_data(i).cloned());
        let why = slot(psk_refusal_index().ok()).or_else(|| {
            slot(self.psk_identity)
                .map(|id| format!("the client's key for PSK identity {id:?} does not match"))
        })?;
        Some(io::Error::new(io::ErrorKind::PermissionDenied, why))
    }

    fn accept_inner(&self, plain: Stream, timeout: Option<Duration>) -> io::Result<TlsStream> {
        let ssl = Ssl::new(&self.ctx).map_err(io::Error::other)?;
        let mut s = SslStream::new(ssl, Plain(plain)).map_err(io::Error::other)?;
        s.get_ref().0.set_nonblocking(true)?;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            match s.accept() {
                Ok(()) => break,
                Err(e) => {
                    if let Err(err) = wait_for(&s, e, deadline, "TLS handshake") {
                        return Err(self.psk_failure(&s).unwrap_or(err));
                    }
                }
            }
        }
        let peer_name = if self.check_cert_names {
            let name = s.ssl().peer_certificate().as_ref().and_then(common_name);
            let ok = match &name {
                Some(n) => self.allow.is_empty() || self.allow.iter().any(|a| a == n),
                None => false,
            };
            if !ok {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "client certificate {:?} is not in the TLS allow list",
                        name.unwrap_or_default()
                    ),
                ));
            }
            name
        } else {
            let recorded = self.psk_identity.and_then(|i| s.ssl().ex_data(i).cloned());
            recorded.or_else(|| {
                s.ssl()
                    .psk_identity()
                    .map(|i| String::from_utf8_lossy(i).into_owned())
            })
        };
        Ok(TlsStream::new(s, timeout, peer_name))
    }
}

/// What a client needs for TLS: the libnbd URI's `nbds` scheme and its
/// `tls-*` query parameters. Holds paths and names only, never a key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsClientConfig {
    /// `tls-certificates=DIR`: `ca-cert.pem` to verify the server (the
    /// system's CAs otherwise), `client-cert.pem` + `client-key.pem` when
    /// the server wants a client certificate.
    pub certificates: Option<PathBuf>,
    /// `tls-psk-file=FILE` (psktool format).
    pub psk_file: Option<PathBuf>,
    /// The PSK identity: the URI's user, or `tls-username=`.
    pub username: Option<String>,
    /// `tls-verify-peer=false` skips verifying the server's certificate.
    pub verify_peer: bool,
    /// The name the server's certificate must carry: `tls-hostname=`, or
    /// the URI's host. None for a Unix socket: the chain alone is checked.
    pub hostname: Option<String>,
}

impl TlsClientConfig {
    /// The client side of a TLS handshake on `plain`, within `timeout`.
    pub fn connect(&self, plain: Stream, timeout: Option<Duration>) -> io::Result<TlsStream> {
        let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(io::Error::other)?;
        let peer_name = match &self.psk_file {
            Some(file) => Some(self.use_psk(&mut b, file)?),
            None => {
                self.use_x509(&mut b)?;
                None
            }
        };
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(|e| ssl_err("TLS", e))?;
        b.set_options(SslOptions::IGNORE_UNEXPECTED_EOF);
        b.set_read_ahead(true);
        let connector = b.build();
        let mut cfg = connector.configure().map_err(io::Error::other)?;
        let x509 = self.psk_file.is_none();
        let host = self
            .hostname
            .as_deref()
            .filter(|_| x509 && self.verify_peer);
        cfg.set_use_server_name_indication(
            host.is_some_and(|h| h.parse::<std::net::IpAddr>().is_err()),
        );
        cfg.set_verify_hostname(host.is_some());
        let ssl = cfg.into_ssl(host.unwrap_or("")).map_err(io::Error::other)?;
        let mut s = SslStream::new(ssl, Plain(plain)).map_err(io::Error::other)?;
        s.get_ref().0.set_nonblocking(true)?;
        handshake_as_client(&mut s, timeout)?;
        Ok(TlsStream::new(s, timeout, peer_name))
    }

    /// Offer the key `file` holds for our identity; returns the identity.
    fn use_psk(&self, b: &mut SslConnectorBuilder, file: &Path) -> io::Result<String> {
        let keys = PskKeys::load(file)?;
        let (id, key) = keys.pick(self.username.as_deref()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "PSK file {}: no key for {}",
                    file.display(),
                    match &self.username {
                        Some(u) => format!("identity {u:?}"),
                        None => "an unnamed identity (name it: nbds://NAME@...)".into(),
                    }
                ),
            )
        })?;
        let (id, key) = (id.to_string(), Secret(key.to_vec()));
        let name = id.clone();
        b.set_cipher_list(PSK_CIPHERS)
            .map_err(|e| ssl_err("PSK cipher list", e))?;
        b.set_psk_client_callback(move |_ssl, _hint, id_out, key_out| {
            let key = &key.0;
            if id.len() >= id_out.len() || key.len() > key_out.len() {
                return Ok(0);
            }
            id_out[..id.len()].copy_from_slice(id.as_bytes());
            id_out[id.len()] = 0;
            key_out[..key.len()].copy_from_slice(key);
            Ok(key.len())
        });
        b.set_verify(SslVerifyMode::NONE);
        Ok(name)
    }

    /// Trust the directory's CA (or the system's), present its client
    /// certificate if it has one, and verify the server as configured.
    fn use_x509(&self, b: &mut SslConnectorBuilder) -> io::Result<()> {
        let dir = self.certificates.as_deref();
        let ca = dir.map(|d| d.join("ca-cert.pem")).filter(|p| p.is_file());
        match &ca {
            Some(ca) => b.set_ca_file(ca).map_err(|e| ssl_err(ca.display(), e))?,
            None => b
                .set_default_verify_paths()
                .map_err(|e| ssl_err("system CA certificates", e))?,
        }
        if let Some(d) = dir {
            let (cert, key) = (d.join("client-cert.pem"), d.join("client-key.pem"));
            if cert.is_file() {
                require_file(&key)?;
                b.set_certificate_chain_file(&cert)
                    .map_err(|e| ssl_err(cert.display(), e))?;
                b.set_private_key_file(&key, SslFiletype::PEM)
                    .map_err(|e| ssl_err(key.display(), e))?;
            }
        }
        b.set_verify(if self.verify_peer {
            SslVerifyMode::PEER
        } else {
            SslVerifyMode::NONE
        });
        Ok(())
    }
}

/// Run the client handshake to its end within `timeout`. A refused server
/// certificate says why (expired, unknown CA, wrong name), not only that it
/// was refused.
fn handshake_as_client(s: &mut SslStream<Plain>, timeout: Option<Duration>) -> io::Result<()> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        match s.connect() {
            Ok(()) => return Ok(()),
            Err(e) => wait_for(s, e, deadline, "TLS handshake").map_err(|e| {
                let v = s.ssl().verify_result();
                if v == openssl::x509::X509VerifyResult::OK {
                    e
                } else {
                    io::Error::new(
                        e.kind(),
                        format!("{e} (server certificate: {})", v.error_string()),
                    )
                }
            })?,
        }
    }
}

/// The TLS 1.2 PSK suites offered and accepted (TLS 1.3 external PSK needs
/// none of them).
const PSK_CIPHERS: &str = "ECDHE-PSK-AES256-GCM-SHA384:ECDHE-PSK-AES128-GCM-SHA256:\
DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256:ECDHE-PSK-CHACHA20-POLY1305:\
DHE-PSK-CHACHA20-POLY1305:PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256";

fn common_name(cert: &X509) -> Option<String> {
    let e = cert.subject_name().entries_by_nid(Nid::COMMONNAME).next()?;
    e.data().to_string().ok()
}

/// Wait for what a non-blocking OpenSSL call needs, or fail with its error.
fn wait_for(
    s: &SslStream<Plain>,
    e: openssl::ssl::Error,
    deadline: Option<Instant>,
    what: &str,
) -> io::Result<()> {
    wait_code(s.get_ref().0.as_raw_fd(), e, deadline, what)
}

fn wait_code(
    fd: RawFd,
    e: openssl::ssl::Error,
    deadline: Option<Instant>,
    what: &str,
) -> io::Result<()> {
    let events = match e.code() {
        ErrorCode::WANT_READ => libc::POLLIN,
        ErrorCode::WANT_WRITE => libc::POLLOUT,
        _ => return Err(tls_error(e, what)),
    };
    let left = match deadline {
        None => None,
        Some(d) => Some(
            d.checked_duration_since(Instant::now())
                .ok_or_else(|| timed_out(what))?,
        ),
    };
    if poll_one(fd, events, left)? {
        Ok(())
    } else {
        Err(timed_out(what))
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what}: timed out"))
}

fn tls_error(e: openssl::ssl::Error, what: &str) -> io::Error {
    if e.code() == ErrorCode::ZERO_RETURN {
        return io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{what}: peer closed TLS"),
        );
    }
    match e.into_io_error() {
        Ok(io) => io,
        Err(e) => io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}")),
    }
}

/// poll(2) one descriptor; false on timeout.
fn poll_one(fd: RawFd, events: libc::c_short, timeout: Option<Duration>) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    loop {
        // SAFETY: one valid pollfd that lives across the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(r > 0);
    }
}

/// The socket under a TLS session.
#[derive(Debug)]
pub(crate) struct Plain(pub(crate) Stream);

impl Read for Plain {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Plain {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_vectored(&[IoSlice::new(buf)])
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `TCP_CORK` for the life of a value: a reply of many records goes out in
/// full segments rather than a segment, and a wake-up of the peer, per
/// record (64 for a 1 MiB READ); clearing it sends the rest. Nothing on a
/// socket that is not TCP.
struct Cork(Option<RawFd>);

impl Cork {
    fn on(fd: RawFd) -> Self {
        Self(set_cork(fd, true).then_some(fd))
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        if let Some(fd) = self.0 {
            set_cork(fd, false);
        }
    }
}

/// Set or clear `TCP_CORK`; false where the socket refused (not TCP).
fn set_cork(fd: RawFd, on: bool) -> bool {
    let v = libc::c_int::from(on);
    // SAFETY: setsockopt on a descriptor the session owns, with a valid
    // pointer to an int and its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Plaintext gathered into one record before `SSL_write`: small pieces (a
/// reply header) are copied so that they do not each cost a record.
const RECORD: usize = 16 * 1024;

/// One TLS session over a non-blocking socket (see the module doc).
pub struct TlsStream {
    ssl: Mutex<SslStream<Plain>>,
    fd: RawFd,
    /// Bounds on waiting for the socket once a message has started:
    /// (reading, writing).
    timeouts: Mutex<(Option<Duration>, Option<Duration>)>,
    /// The PSK identity or the client certificate's common name.
    peer_name: Option<String>,
    /// What was negotiated, kept from the handshake so that `stats` never
    /// takes the session's lock.
    version: &'static str,
    cipher: &'static str,
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("fd", &self.fd)
            .field("peer_name", &self.peer_name)
            .finish_non_exhaustive()
    }
}

impl TlsStream {
    fn new(s: SslStream<Plain>, timeout: Option<Duration>, peer_name: Option<String>) -> Self {
        let fd = s.get_ref().0.as_raw_fd();
        let version = s.ssl().version_str();
        let cipher = s.ssl().current_cipher().map_or("unknown", |c| c.name());
        Self {
            ssl: Mutex::new(s),
            fd,
            timeouts: Mutex::new((timeout, timeout)),
            peer_name,
            version,
            cipher,
        }
    }

    pub fn peer_name(&self) -> Option<&str> {
        self.peer_name.as_deref()
    }

    /// The negotiated version, cipher suite and peer name, for `stats`.
    pub fn session_info(&self) -> TlsSessionInfo {
        TlsSessionInfo {
            version: self.version.to_string(),
            cipher: self.cipher.to_string(),
            peer_name: self.peer_name.clone(),
        }
    }

    pub fn peer(&self) -> String {
        self.ssl.lock().get_ref().0.peer()
    }

    fn read_deadline(&self) -> Option<Instant> {
        self.timeouts.lock().0.map(|t| Instant::now() + t)
    }

    fn write_deadline(&self) -> Option<Instant> {
        self.timeouts.lock().1.map(|t| Instant::now() + t)
    }

    pub fn set_timeouts(&self, t: Option<Duration>) {
        *self.timeouts.lock() = (t, t);
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) {
        self.timeouts.lock().1 = t;
    }

    /// Decrypt into `buf` (at most one record's worth); waits for data.
    /// 0 at the end of the stream.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = self.read_deadline();
        loop {
            let r = self.ssl.lock().ssl_read(buf);
            match r {
                Ok(n) => return Ok(n),
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => return Ok(0),
                Err(e) => wait_code(self.fd, e, deadline, "TLS read")?,
            }
        }
    }

    /// What has already arrived, without waiting; `None` when nothing has.
    pub fn read_nowait(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if buf.is_empty() {
            return Ok(Some(0));
        }
        match self.ssl.lock().ssl_read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => Ok(Some(0)),
            Err(e) if e.code() == ErrorCode::WANT_READ => Ok(None),
            Err(e) if e.code() == ErrorCode::WANT_WRITE => Ok(None),
            Err(e) => Err(tls_error(e, "TLS read")),
        }
    }

    /// Decrypted bytes buffered in the session (readable without the socket).
    pub fn pending(&self) -> usize {
        self.ssl.lock().ssl().pending()
    }

    /// Fill every slice completely, decrypting straight into it, then take
    /// up to `extra.len()` more bytes if they are already decrypted.
    pub fn read_exact_vectored_then(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        extra: &mut [u8],
    ) -> io::Result<usize> {
        for b in bufs.iter_mut() {
            let mut done = 0;
            while done < b.len() {
                match self.read(&mut b[done..])? {
                    0 => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "TLS connection closed mid-payload",
                        ))
                    }
                    n => done += n,
                }
            }
        }
        let pending = self.pending().min(extra.len());
        if pending == 0 {
            return Ok(0);
        }
        Ok(self.read_nowait(&mut extra[..pending])?.unwrap_or(0))
    }

    /// Encrypt and send every slice, in order, in full records: slices are
    /// gathered into a record-sized buffer (4 KiB cache slots would each
    /// cost a record and a system call of their own), except whole records'
    /// worth of a large slice, which are encrypted straight from its memory.
    pub fn write_all_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let deadline = self.write_deadline();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let _cork = (total > RECORD).then(|| Cork::on(self.fd));
        let mut staged: Vec<u8> = Vec::with_capacity(RECORD);
        for b in bufs {
            let mut b: &[u8] = b;
            while !b.is_empty() {
                // Also after a reply header filled the first record.
                if staged.is_empty() && b.len() >= RECORD {
                    let whole = b.len() / RECORD * RECORD;
                    self.write_all(&b[..whole], deadline)?;
                    b = &b[whole..];
                    continue;
                }
                let take = (RECORD - staged.len()).min(b.len());
                staged.extend_from_slice(&b[..take]);
                b = &b[take..];
                if staged.len() == RECORD {
                    self.write_all(&staged, deadline)?;
                    staged.clear();
                }
            }
        }
        if !staged.is_empty() {
            self.write_all(&staged, deadline)?;
        }
        Ok(())
    }

    fn write_all(&self, mut buf: &[u8], deadline: Option<Instant>) -> io::Result<()> {
        while !buf.is_empty() {
            let r = self.ssl.lock().ssl_write(buf);
            match r {
                Ok(n) => buf = &buf[n..],
                Err(e) => wait_code(self.fd, e, deadline, "TLS write")?,
            }
        }
        Ok(())
    }

    /// Send close_notify if the socket takes it at once; never waits.
    pub fn close_notify(&self) {
        let _ = self.ssl.lock().shutdown();
    }

    /// Shut the socket down (wakes a reader waiting on it).
    pub fn shutdown(&self, how: Shutdown) {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown(2) on a descriptor this session owns.
        unsafe { libc::shutdown(self.fd, how) };
    }

    /// Wait until a read would make progress, or `wake` fires.
    pub fn poll_readable(
        &self,
        wake: Option<RawFd>,
        timeout: Option<Duration>,
    ) -> io::Result<Readiness> {
        if self.has_pending() {
            return Ok(Readiness::Ready);
        }
        crate::net::poll_readable(self.fd, wake, timeout)
    }

    /// Whether a read can make progress without the socket: decrypted bytes,
    /// or (read ahead) whole records already taken from the socket, which
    /// `poll` would not see. A peek decrypts the next record if one is
    /// whole; `WANT_READ` means the session needs the socket.
    fn has_pending(&self) -> bool {
        let mut ssl = self.ssl.lock();
        if ssl.ssl().pending() > 0 {
            return true;
        }
        match ssl.ssl_peek(&mut [0u8; 1]) {
            Ok(_) => true,
            Err(e) => e.code() != ErrorCode::WANT_READ,
        }
    }
}

impl AsRawFd for TlsStream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}
