//! Our client against our server over TLS (PSK, no external tools): many
//! threads with many requests in flight on one TLS session, large requests
//! in both directions, an idle TLS connection at shutdown, and a client
//! with the wrong key.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

mod common;

use std::sync::Arc;

use std::time::{Duration, Instant};

use common::{hammer, pattern, InProc, TempDir};
use pmcache_nbd::tls::{TlsCredentials, TlsMode, TlsServer, TlsServerConfig};
use pmcache_nbd::{Client, MemExport, ServerConfig};

const MIB: usize = 1 << 20;

/// A PSK server (`--tls require`) and the psktool-format key file.
fn psk_server(dir: &TempDir, size: usize) -> (InProc, std::path::PathBuf) {
    let keys = dir.join("keys.psk");
    std::fs::write(
        &keys,
        format!("alice:{}\nbob:{}\n", "a1".repeat(32), "b2".repeat(16)),
    )
    .unwrap();
    let tls = TlsServer::new(&TlsServerConfig {
        mode: TlsMode::Require,
        credentials: TlsCredentials::Psk { file: keys.clone() },
        allow: vec![],
    })
    .unwrap();
    let cfg = ServerConfig {
        tls: Some(Arc::new(tls)),
        ..ServerConfig::default()
    };
    (InProc::start(MemExport::new(size), cfg), keys)
}

fn nbds(srv: &InProc, user: &str, keys: &std::path::Path) -> String {
    format!(
        "nbds+unix://{user}@/?socket={}&tls-psk-file={}",
        srv.socket.display(),
        keys.display()
    )
}

#[test]
fn many_threads_many_requests_on_one_tls_session() {
    let dir = TempDir::new("t");
    let (srv, keys) = psk_server(&dir, 16 * MIB);
    let c = Arc::new(Client::connect(&nbds(&srv, "alice", &keys)).unwrap());
    hammer(&c, 100);
    assert_eq!(srv.export.stats().writes, 8 * 100);
    // Whole-export transfers, many records each way.
    let big = pattern(7, 16 * MIB);
    c.write(&big, 0, false).unwrap();
    let mut back = vec![0u8; 16 * MIB];
    c.read(&mut back, 0).unwrap();
    assert!(back == big, "16 MiB round trip differs");
    let stats = srv.server.tls_stats().unwrap().1;
    assert_eq!((stats.handshakes, stats.failed_handshakes), (1, 0));
}

#[test]
fn an_idle_tls_connection_does_not_hold_up_shutdown() {
    let dir = TempDir::new("t");
    let (mut srv, keys) = psk_server(&dir, MIB);
    let c = Client::connect(&nbds(&srv, "bob", &keys)).unwrap();
    c.write(&[1u8; 4096], 0, true).unwrap();
    let t = Instant::now();
    srv.stop().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn a_wrong_key_is_refused_and_counted() {
    let dir = TempDir::new("t");
    let (srv, _keys) = psk_server(&dir, MIB);
    let wrong = dir.join("wrong.psk");
    std::fs::write(&wrong, format!("alice:{}\n", "00".repeat(32))).unwrap();
    let e = Client::connect(&nbds(&srv, "alice", &wrong)).unwrap_err();
    assert!(e.to_string().contains("TLS"), "{e}");
    // A plain client gets the TLS-required error.
    let e = Client::connect(&common::unix_uri(&srv.socket)).unwrap_err();
    assert!(e.to_string().to_lowercase().contains("tls"), "{e}");
    let stats = srv.server.tls_stats().unwrap().1;
    assert_eq!(stats.handshakes, 0);
    assert_eq!(stats.failed_handshakes, 1);
    assert!(stats.refused_plain >= 1);
    assert_eq!(srv.export.stats().writes, 0);
}
