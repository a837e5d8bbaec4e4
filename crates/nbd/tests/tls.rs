//! Our client against our server over TLS (PSK, no external tools): many
//! threads with many requests in flight on one TLS session, large requests
//! in both directions, an idle TLS connection at shutdown, a client with
//! the wrong key, and the per-connection TLS state the server reports.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

mod common;

use std::sync::Arc;

use std::time::{Duration, Instant};

use common::{hammer, pattern, wait_until, InProc, Raw, TempDir};
use pmcache_nbd::tls::{TlsCredentials, TlsMode, TlsServer, TlsServerConfig};
use pmcache_nbd::{Client, ConnectionInfo, MemExport, Phase, ServerConfig};

const MIB: usize = 1 << 20;

/// A PSK server (`--tls require`) and the psktool-format key file.
fn psk_server(dir: &TempDir, size: usize) -> (InProc, std::path::PathBuf) {
    psk_server_in(dir, size, TlsMode::Require)
}

/// A PSK server in TLS `mode` and the psktool-format key file.
fn psk_server_in(dir: &TempDir, size: usize, mode: TlsMode) -> (InProc, std::path::PathBuf) {
    psk_server_of(dir, MemExport::new(size), mode)
}

/// A PSK server of `export` in TLS `mode` and the psktool-format key file.
fn psk_server_of(dir: &TempDir, export: MemExport, mode: TlsMode) -> (InProc, std::path::PathBuf) {
    let keys = dir.join("keys.psk");
    std::fs::write(
        &keys,
        format!("alice:{}\nbob:{}\n", "a1".repeat(32), "b2".repeat(16)),
    )
    .unwrap();
    let tls = TlsServer::new(&TlsServerConfig {
        mode,
        credentials: TlsCredentials::Psk { file: keys.clone() },
        allow: vec![],
    })
    .unwrap();
    let cfg = ServerConfig {
        tls: Some(Arc::new(tls)),
        ..ServerConfig::default()
    };
    (InProc::start(export, cfg), keys)
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
    wait_failed_handshakes(&srv, 1);
    let stats = srv.server.tls_stats().unwrap().1;
    assert_eq!(stats.handshakes, 0);
    assert_eq!(stats.failed_handshakes, 1);
    assert!(stats.refused_plain >= 1);
    assert_eq!(srv.export.stats().writes, 0);
}

/// Wait (bounded) until the server has counted `n` failed handshakes. The
/// client sees the failure (the server's alert) before the server's
/// handshake call returns and counts it, so the count may trail a little.
fn wait_failed_handshakes(srv: &InProc, n: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = srv.server.tls_stats().unwrap().1.failed_handshakes;
        if got == n {
            return;
        }
        assert!(got < n, "{got} failed handshakes counted, {n} expected");
        assert!(
            std::time::Instant::now() < deadline,
            "still {got} failed handshakes counted after 10 s, {n} expected"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Wait (bounded) until the server lists exactly `n` connections, all past
/// their handshake but `handshaking` of them; returns them.
fn wait_for_connections(srv: &InProc, n: usize, handshaking: usize) -> Vec<ConnectionInfo> {
    let settled = |c: &[ConnectionInfo]| {
        c.len() == n && c.iter().filter(|c| c.phase == Phase::Handshake).count() == handshaking
    };
    let ok = wait_until(Duration::from_secs(20), Duration::from_millis(10), || {
        settled(&srv.server.connections())
    });
    let conns = srv.server.connections();
    assert!(
        ok,
        "wanted {n} connections ({handshaking} in the handshake): {conns:#?}"
    );
    conns
}

#[test]
fn connections_show_their_tls_state_and_leave_when_they_end() {
    let dir = TempDir::new("t");
    let (srv, keys) = psk_server_in(&dir, MIB, TlsMode::On);
    let tls = Client::connect(&nbds(&srv, "alice", &keys)).unwrap();
    let plain = Client::connect(&common::unix_uri(&srv.socket)).unwrap();
    // A third client that stops after the greeting: still handshaking.
    let mut raw = Raw::connect(&srv.socket);
    raw.greet();
    let conns = wait_for_connections(&srv, 3, 1);
    let socket = format!("unix:{}", srv.socket.display());
    for c in &conns {
        assert_eq!(c.peer, socket, "{c:?}");
        assert!(c.open_for < Duration::from_secs(60), "{c:?}");
    }
    // Distinct, oldest first.
    let ids: Vec<u64> = conns.iter().map(|c| c.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let with_tls: Vec<&ConnectionInfo> = conns.iter().filter(|c| c.tls.is_some()).collect();
    assert_eq!(with_tls.len(), 1, "{conns:#?}");
    let (c, s) = (with_tls[0], with_tls[0].tls.as_ref().unwrap());
    assert_eq!(c.phase, Phase::Transmission);
    assert_eq!(s.peer_name.as_deref(), Some("alice"), "{s:?}");
    assert!(s.version.starts_with("TLSv1."), "{s:?}");
    assert!(
        s.cipher.contains("GCM") || s.cipher.contains("CHACHA"),
        "{s:?}"
    );
    let plain_phases: Vec<Phase> = conns
        .iter()
        .filter(|c| c.tls.is_none())
        .map(|c| c.phase)
        .collect();
    assert!(plain_phases.contains(&Phase::Transmission), "{conns:#?}");
    assert!(plain_phases.contains(&Phase::Handshake), "{conns:#?}");

    // A refused handshake (wrong key) is counted, and never listed.
    let wrong = dir.join("wrong.psk");
    std::fs::write(&wrong, format!("alice:{}\n", "00".repeat(32))).unwrap();
    Client::connect(&nbds(&srv, "alice", &wrong)).unwrap_err();
    wait_failed_handshakes(&srv, 1);
    let after: Vec<u64> = wait_for_connections(&srv, 3, 1)
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(after, ids, "the refused connection is still listed");

    drop(tls);
    drop(plain);
    drop(raw);
    wait_for_connections(&srv, 0, 0);
}

/// Options sent back to back after STARTTLS, each in a TLS record of its
/// own, are all answered: the server reads ahead, so the second record may
/// already sit in the session when the first has been answered, where
/// waiting on the socket would wait forever.
#[test]
fn options_pipelined_after_starttls_are_all_answered() {
    use pmcache_nbd::proto::*;
    use pmcache_nbd::tls::TlsClientConfig;
    let dir = TempDir::new("t");
    let (srv, keys) = psk_server(&dir, MIB);
    let mut raw = Raw::connect(&srv.socket);
    raw.greet();
    raw.send(&OptionRequest::StartTls.encode());
    assert_eq!(raw.option_reply().0.reply_type, REP_ACK);
    let client = TlsClientConfig {
        certificates: None,
        psk_file: Some(keys),
        username: Some("alice".into()),
        verify_peer: true,
        hostname: None,
    };
    let plain = pmcache_nbd::Stream::unix(raw.s.try_clone().unwrap());
    let tls = client
        .connect(plain, Some(Duration::from_secs(10)))
        .unwrap();
    tls.set_timeouts(Some(Duration::from_secs(10)));
    let structured = OptionRequest::StructuredReply.encode();
    for _ in 0..3 {
        tls.write_all_vectored(&[std::io::IoSlice::new(&structured)])
            .unwrap();
    }
    for i in 0..3 {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        let mut got = 0;
        while got < h.len() {
            let n = tls.read(&mut h[got..]).unwrap();
            assert!(n > 0, "option {i}: the server hung up");
            got += n;
        }
        let h = OptionReplyHeader::parse(&h).unwrap();
        assert_eq!((h.option, h.reply_type), (OPT_STRUCTURED_REPLY, REP_ACK));
    }
}

/// Reads answered on the reader thread are corked under TLS, several to a
/// record, but never held back: each of a series of lone reads is answered
/// without a next request, and a burst of them comes back whole.
#[test]
fn corked_tls_read_replies_are_never_held_back() {
    let dir = TempDir::new("t");
    let export = MemExport::new(4 * MIB).with_reads_at_once(true);
    let (srv, keys) = psk_server_of(&dir, export, TlsMode::Require);
    let data = pattern(77, 4 * MIB);
    srv.export.fill(0, &data);
    let c = Arc::new(Client::connect(&nbds(&srv, "alice", &keys)).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let lone = {
        let c = c.clone();
        std::thread::spawn(move || {
            for i in 0..50u64 {
                let mut b = vec![0u8; 4096];
                c.read(&mut b, i * 8192).unwrap();
                tx.send((i, b)).unwrap();
            }
        })
    };
    for _ in 0..50 {
        let (i, b) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a lone read's reply was held back");
        let at = (i * 8192) as usize;
        assert!(b == data[at..at + 4096], "read {i}");
    }
    lone.join().unwrap();
    let before = srv.export.stats().reads;
    hammer_reads(&c, &data);
    assert!(srv.export.stats().reads >= before + 8 * 64);
}

/// Eight threads, 64 reads of 1 to 8 KiB each, all in flight together.
fn hammer_reads(c: &Arc<Client>, data: &[u8]) {
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (c, data) = (c.clone(), data.to_vec());
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    let len = 1 + ((t * 64 + i) * 977 % 8192) as usize;
                    let off = ((t * 64 + i) * 40_961 % (data.len() as u64 - 8192)) as usize;
                    let mut b = vec![0u8; len];
                    c.read(&mut b, off as u64).unwrap();
                    assert!(b == data[off..off + len], "thread {t} read {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
