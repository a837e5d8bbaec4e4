//! The server's registry of open connections, for `stats` and the metrics:
//! each connection's id, peer, age, phase and TLS state (protocol version,
//! cipher suite, PSK identity or client certificate name).
//!
//! It is touched only when a connection starts, finishes its handshake
//! (STARTTLS, then the move to transmission) and ends: never per request,
//! so it costs nothing on the data path. An entry is removed by a guard's
//! `Drop`, so a connection that fails or panics does not linger in it.
//! Nothing secret is ever stored here (no key, only names).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Where a connection is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Option haggling (including STARTTLS).
    Handshake,
    /// Serving requests.
    Transmission,
}

impl Phase {
    /// The name shown by `stats`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::Transmission => "transmission",
        }
    }
}

/// The TLS session of a connection, as negotiated. Names only, no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSessionInfo {
    /// The protocol version, as OpenSSL names it (`TLSv1.3`).
    pub version: String,
    /// The cipher suite, as OpenSSL names it (`TLS_AES_256_GCM_SHA384`).
    pub cipher: String,
    /// The PSK identity, or the verified client certificate's subject
    /// common name (the names `--tls-allow` lists); `None` when the client
    /// did not identify itself (X.509 without `--tls-verify-peer`).
    pub peer_name: Option<String>,
}

/// One open connection, as seen at the time of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The id the server's log lines use (`nbd[ID]`).
    pub id: u64,
    /// The client's TCP address, or `unix:` and the server's socket path.
    pub peer: String,
    /// How long the connection has been open.
    pub open_for: Duration,
    pub phase: Phase,
    /// `None`: plain NBD (so far, if still in the handshake).
    pub tls: Option<TlsSessionInfo>,
}

/// What the registry keeps per connection (the age is computed on demand).
#[derive(Debug)]
struct Entry {
    peer: String,
    opened: Instant,
    phase: Phase,
    tls: Option<TlsSessionInfo>,
}

/// The open connections of one server. Cloning shares the registry, so the
/// control socket and the metrics can hold one without the server itself.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    inner: Arc<Mutex<BTreeMap<u64, Entry>>>,
}

impl Connections {
    /// Every open connection, oldest (lowest id) first.
    pub fn snapshot(&self) -> Vec<ConnectionInfo> {
        let now = Instant::now();
        self.inner
            .lock()
            .iter()
            .map(|(&id, e)| ConnectionInfo {
                id,
                peer: e.peer.clone(),
                open_for: now.saturating_duration_since(e.opened),
                phase: e.phase,
                tls: e.tls.clone(),
            })
            .collect()
    }

    /// Record connection `id` from `peer` as open until the guard drops
    /// (also when its handler returns early or unwinds).
    pub(crate) fn register(&self, id: u64, peer: String) -> ConnectionGuard<'_> {
        let entry = Entry {
            peer,
            opened: Instant::now(),
            phase: Phase::Handshake,
            tls: None,
        };
        self.inner.lock().insert(id, entry);
        ConnectionGuard { conns: self, id }
    }

    /// Note that connection `id` completed STARTTLS.
    pub(crate) fn set_tls(&self, id: u64, tls: TlsSessionInfo) {
        if let Some(e) = self.inner.lock().get_mut(&id) {
            e.tls = Some(tls);
        }
    }

    /// Note that connection `id` moved on to `phase`.
    pub(crate) fn set_phase(&self, id: u64, phase: Phase) {
        if let Some(e) = self.inner.lock().get_mut(&id) {
            e.phase = phase;
        }
    }
}

/// Removes its connection from the registry when dropped.
pub(crate) struct ConnectionGuard<'a> {
    conns: &'a Connections,
    id: u64,
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.conns.inner.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_lives_as_long_as_its_guard_even_through_a_panic() {
        let conns = Connections::default();
        let g = conns.register(7, "127.0.0.1:1".into());
        conns.set_phase(7, Phase::Transmission);
        let tls = TlsSessionInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS_AES_128_GCM_SHA256".into(),
            peer_name: Some("alice".into()),
        };
        conns.set_tls(7, tls.clone());
        let snap = conns.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(
            (snap[0].id, snap[0].phase, snap[0].tls.as_ref()),
            (7, Phase::Transmission, Some(&tls))
        );
        drop(g);
        assert!(conns.snapshot().is_empty());

        let c = conns.clone();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _g = c.register(8, "unix".into());
            panic!("handler panics");
        }));
        assert!(r.is_err());
        assert!(conns.snapshot().is_empty(), "{:?}", conns.snapshot());
    }

    #[test]
    fn updates_for_a_connection_that_has_ended_are_ignored() {
        let conns = Connections::default();
        conns.set_phase(1, Phase::Transmission);
        assert!(conns.snapshot().is_empty());
    }
}
