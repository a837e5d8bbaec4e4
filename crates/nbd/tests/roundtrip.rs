//! Our client against our server: data round trips, splitting, concurrency,
//! out-of-order replies, errors, URIs and graceful shutdown.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

mod common;

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::{hammer, mem_export, pattern, InProc, TempDir};
use pmcache_nbd::proto::*;
use pmcache_nbd::tls::TlsClientConfig;
use pmcache_nbd::{
    Client, ClientOptions, Endpoint, MemExport, NbdUri, Server, ServerConfig, ServerError,
};

const MIB: usize = 1 << 20;

#[test]
fn round_trip_read_write_zero_trim_flush() {
    let srv = InProc::mem(8 * MIB);
    let c = Client::connect(&srv.uri()).unwrap();
    assert_eq!(c.size(), 8 * MIB as u64);
    let f = c.flags();
    for flag in [
        FLAG_HAS_FLAGS,
        FLAG_SEND_FLUSH,
        FLAG_SEND_FUA,
        FLAG_SEND_TRIM,
        FLAG_SEND_WRITE_ZEROES,
        FLAG_SEND_FAST_ZERO,
        FLAG_SEND_CACHE,
        FLAG_CAN_MULTI_CONN,
        FLAG_SEND_DF,
    ] {
        assert_ne!(f & flag, 0, "flag {flag:#x} missing from {f:#x}");
    }
    assert_eq!(f & FLAG_READ_ONLY, 0);
    assert!(c.structured_replies());
    assert_eq!(c.block_sizes().maximum, 32 * MIB as u32);

    // Unaligned, spanning several 64 KiB export pieces.
    let data = pattern(1, 300_001);
    c.write(&data, 12_345, false).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(&mut back, 12_345).unwrap();
    assert_eq!(back, data);
    assert_eq!(srv.export.snapshot(12_345, data.len()), data);
    // The bytes around it are untouched.
    assert!(srv.export.snapshot(0, 12_345).iter().all(|b| *b == 0));

    c.write(&data[..100], 7, true).unwrap();
    assert_eq!(srv.export.stats().fua_writes, 1);

    c.write_zeroes(20_000, 5_000, false).unwrap();
    c.trim(100_000, 10_000, false).unwrap();
    c.flush().unwrap();
    c.cache(0, 4096).unwrap();
    let mut z = vec![0xffu8; 5_000];
    c.read(&mut z, 20_000).unwrap();
    assert!(z.iter().all(|b| *b == 0));
    let s = srv.export.stats();
    assert_eq!((s.zeroes, s.trims, s.flushes, s.caches), (1, 1, 1, 1));
    assert!(srv.export.snapshot(100_000, 10_000).iter().all(|b| *b == 0));
    // Data beside the zeroed range survived.
    assert_eq!(
        srv.export.snapshot(25_000, 1_000),
        data[25_000 - 12_345..26_000 - 12_345]
    );
}

#[test]
fn simple_replies_work_too() {
    let srv = InProc::mem(MIB);
    let opts = ClientOptions {
        structured_replies: false,
        ..ClientOptions::default()
    };
    let c = Client::connect_with(&srv.uri(), &opts).unwrap();
    assert!(!c.structured_replies());
    assert_eq!(c.flags() & FLAG_SEND_DF, 0, "DF needs structured replies");
    let data = pattern(2, 70_000);
    c.write(&data, 1, false).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(&mut back, 1).unwrap();
    assert_eq!(back, data);
    srv.export.fail_at(4096);
    let e = c.read(&mut back[..10], 4096).unwrap_err();
    let se = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<ServerError>())
        .unwrap();
    assert_eq!(se.errno, EIO);
    // The connection is still usable after an error reply.
    c.read(&mut back[..10], 0).unwrap();
}

#[test]
fn requests_larger_than_the_maximum_are_split() {
    let srv = InProc::start(mem_export(4 * MIB, 1, 64 * 1024), ServerConfig::default());
    let c = Client::connect(&srv.uri()).unwrap();
    assert_eq!(c.block_sizes().maximum, 64 * 1024);
    let data = pattern(3, MIB + 10);
    c.write(&data, 5, false).unwrap();
    assert_eq!(
        srv.export.stats().writes,
        17,
        "1 MiB + 10 bytes in 64 KiB pieces"
    );
    let mut back = vec![0u8; data.len()];
    c.read(&mut back, 5).unwrap();
    assert_eq!(back, data);
    assert_eq!(srv.export.stats().reads, 17);
}

#[test]
fn minimum_block_size_is_honoured() {
    let srv = InProc::start(mem_export(MIB, 512, 1 << 20), ServerConfig::default());
    let c = Client::connect(&srv.uri()).unwrap();
    assert_eq!(c.block_sizes().minimum, 512);
    let data = pattern(4, 4096);
    c.write(&data, 4096, false).unwrap();
    // Unaligned reads go through an aligned bounce buffer.
    let mut part = vec![0u8; 1000];
    c.read(&mut part, 4096 + 100).unwrap();
    assert_eq!(part, data[100..1100]);
    // Unaligned writes are refused before anything is sent.
    let e = c.write(&data[..100], 3, false).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(srv.export.stats().writes, 1);
}

#[test]
fn many_threads_many_requests_in_flight() {
    let srv = InProc::mem(16 * MIB);
    let c = Arc::new(Client::connect(&srv.uri()).unwrap());
    hammer(&c, 150);
    assert_eq!(srv.export.stats().writes, 8 * 150);
}

#[test]
fn replies_arrive_out_of_order() {
    let srv = InProc::mem(MIB);
    srv.export.delay_reads_at(0, Duration::from_millis(800));
    let c = Arc::new(Client::connect(&srv.uri()).unwrap());
    let c2 = c.clone();
    let start = Instant::now();
    let slow = thread::spawn(move || {
        let mut b = vec![0u8; 4096];
        c2.read(&mut b, 0).unwrap();
        start.elapsed()
    });
    thread::sleep(Duration::from_millis(100));
    // Sent after the slow read on the same connection, answered first.
    let mut b = vec![0u8; 4096];
    c.read(&mut b, 8192).unwrap();
    let fast = start.elapsed();
    let slow = slow.join().unwrap();
    assert!(
        slow >= Duration::from_millis(800),
        "slow read took {slow:?}"
    );
    // Answered in order, the fast read would end after the slow one; no
    // bound in milliseconds, which a busy machine could break.
    assert!(fast < slow, "fast read took {fast:?}, slow {slow:?}");
}

#[test]
fn errors_are_reported_with_context() {
    let srv = InProc::start(
        MemExport::new(MIB).with_read_only(true),
        ServerConfig::default(),
    );
    let c = Client::connect(&srv.uri()).unwrap();
    assert_ne!(c.flags() & FLAG_READ_ONLY, 0);
    assert_eq!(
        c.flags() & FLAG_SEND_TRIM,
        0,
        "no write features when read-only"
    );
    let e = c.write(&[1, 2, 3], 0, false).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&srv.uri()) && msg.contains("EPERM"), "{msg}");
    assert_eq!(srv.export.stats().writes, 0);

    // Client-side range check.
    let mut b = [0u8; 10];
    let e = c.read(&mut b, MIB as u64 - 5).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);

    // An export error arrives as a structured error with its message.
    srv.export.fail_at(512);
    let e = c.read(&mut b, 512).unwrap_err();
    assert!(e.to_string().contains("injected failure"), "{e}");
    c.read(&mut b, 0).unwrap();
}

#[test]
fn request_timeout_fails_instead_of_hanging() {
    let srv = InProc::mem(MIB);
    srv.export.delay_reads_at(0, Duration::from_secs(3));
    let opts = ClientOptions {
        request_timeout: Some(Duration::from_millis(200)),
        ..ClientOptions::default()
    };
    let c = Client::connect_with(&srv.uri(), &opts).unwrap();
    let start = Instant::now();
    let mut b = [0u8; 512];
    let e = c.read(&mut b, 0).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(e.to_string().contains("timed out"), "{e}");
    assert!(!c.is_connected());
    assert!(c.read(&mut b, 4096).is_err());
}

#[test]
fn many_connections_at_once() {
    let srv = InProc::mem(4 * MIB);
    let threads: Vec<_> = (0..12u64)
        .map(|t| {
            let uri = srv.uri();
            thread::spawn(move || {
                let c = Client::connect(&uri).unwrap();
                let data = pattern(t, 100_000);
                c.write(&data, t * 200_000, false).unwrap();
                c.flush().unwrap();
                let mut back = vec![0u8; data.len()];
                c.read(&mut back, t * 200_000).unwrap();
                assert_eq!(back, data);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Multi-conn: a new connection sees every write.
    let c = Client::connect(&srv.uri()).unwrap();
    for t in 0..12u64 {
        let mut back = vec![0u8; 100_000];
        c.read(&mut back, t * 200_000).unwrap();
        assert_eq!(back, pattern(t, 100_000));
    }
}

#[test]
fn graceful_shutdown_finishes_in_flight_requests() {
    let mut srv = InProc::mem(MIB);
    srv.export.fill(0, &pattern(9, 4096));
    srv.export.delay_reads_at(0, Duration::from_millis(500));
    let c = Arc::new(Client::connect(&srv.uri()).unwrap());
    let idle = Client::connect(&srv.uri()).unwrap();
    let c2 = c.clone();
    let reader = thread::spawn(move || {
        let mut b = vec![0u8; 4096];
        c2.read(&mut b, 0).map(|_| b)
    });
    thread::sleep(Duration::from_millis(150));
    assert_eq!(srv.server.active_connections(), 2);
    let start = Instant::now();
    srv.stop().unwrap();
    // The read in flight completed with its data before the server left.
    let data = reader
        .join()
        .unwrap()
        .expect("in-flight read must complete");
    assert_eq!(data, pattern(9, 4096));
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(srv.server.active_connections(), 0);
    // Both connections are closed now, and nothing accepts new ones.
    let mut b = [0u8; 1];
    assert!(c.read(&mut b, 0).is_err());
    assert!(idle.read(&mut b, 0).is_err());
    assert!(Client::connect(&srv.uri()).is_err());
}

#[test]
fn tcp_and_named_exports() {
    let export = Arc::new(MemExport::new(MIB));
    let server = Server::new(
        export.clone(),
        ServerConfig {
            export_name: "disk".into(),
            description: Some("test disk".into()),
            ..ServerConfig::default()
        },
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = server.shutdown_handle();
    let s = server.clone();
    let t = thread::spawn(move || s.serve_tcp(listener));

    let c = Client::connect(&format!("nbd://127.0.0.1:{port}/disk")).unwrap();
    c.write(b"hello", 10, false).unwrap();
    assert_eq!(export.snapshot(10, 5), b"hello");
    // "" names the default (only) export.
    let d = Client::connect(&format!("nbd://127.0.0.1:{port}")).unwrap();
    let mut b = [0u8; 5];
    d.read(&mut b, 10).unwrap();
    assert_eq!(&b, b"hello");
    let e = Client::connect(&format!("nbd://127.0.0.1:{port}/other")).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("other"), "{e}");
    drop((c, d));
    handle.shutdown();
    t.join().unwrap().unwrap();
}

#[test]
fn uri_parsing() {
    let u = NbdUri::parse("nbd://example.com:1234/my%20disk").unwrap();
    assert_eq!(
        u,
        NbdUri {
            endpoint: Endpoint::Tcp {
                host: "example.com".into(),
                port: 1234
            },
            export: "my disk".into(),
            tls: None,
        }
    );
    let u = NbdUri::parse("nbd://[::1]/").unwrap();
    assert_eq!(
        u.endpoint,
        Endpoint::Tcp {
            host: "::1".into(),
            port: 10809
        }
    );
    assert_eq!(u.export, "");
    let u = NbdUri::parse("nbd://h").unwrap();
    assert_eq!(u.export, "");
    let u = NbdUri::parse("nbd+unix:///exp?socket=/tmp/a%2Cb.sock").unwrap();
    assert_eq!(u.endpoint, Endpoint::Unix("/tmp/a,b.sock".into()));
    assert_eq!(u.export, "exp");
    assert_eq!(u.tls, None);
    // TLS: libnbd's query parameters; the user part is the PSK identity.
    let u = NbdUri::parse("nbds://alice@nas:10810/vol?tls-psk-file=/k%20s.psk").unwrap();
    assert_eq!(
        u.endpoint,
        Endpoint::Tcp {
            host: "nas".into(),
            port: 10810
        }
    );
    assert_eq!(
        u.tls,
        Some(TlsClientConfig {
            certificates: None,
            psk_file: Some("/k s.psk".into()),
            username: Some("alice".into()),
            verify_peer: true,
            hostname: Some("nas".into()),
        })
    );
    let u = NbdUri::parse(
        "nbds+unix:///e?socket=/s&tls-certificates=/pki&tls-verify-peer=false&tls-hostname=x",
    )
    .unwrap();
    assert_eq!(u.endpoint, Endpoint::Unix("/s".into()));
    assert_eq!(
        u.tls,
        Some(TlsClientConfig {
            certificates: Some("/pki".into()),
            psk_file: None,
            username: None,
            verify_peer: false,
            hostname: Some("x".into()),
        })
    );
    for bad in [
        "nbd+unix:///",
        "nbd+unix://host/?socket=/x",
        "nbd://alice@h/",
        "nbd://h/?tls-certificates=/x",
        "nbds://alice:secret@h/",
        "nbds://h/?tls-verify-peer=maybe",
        "http://h/",
        "nbd://h:99999/",
        "nbd://h:x/",
        "nbd://h/%zz",
        "nbd://[::1/",
        "nbd://h/?socket=/x",
        "just-a-path",
    ] {
        let e = NbdUri::parse(bad).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}");
        assert!(e.to_string().contains(bad), "{e}");
    }
}

/// A minimal old server: no GO, no structured replies, 124 zero bytes
/// after EXPORT_NAME. The client must fall back and still work.
#[test]
fn client_falls_back_to_export_name() {
    let dir = TempDir::new("t");
    let sock = dir.join("old.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let served = Arc::new(AtomicBool::new(false));
    let served2 = served.clone();
    let t = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = encode_greeting(FLAG_FIXED_NEWSTYLE).to_vec();
        s.write_all(&g).unwrap();
        let mut f = [0u8; 4];
        s.read_exact(&mut f).unwrap();
        assert_eq!(
            u32::from_be_bytes(f),
            FLAG_C_FIXED_NEWSTYLE,
            "no NO_ZEROES offered"
        );
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let h = OptionHeader::parse(&h).unwrap();
            let mut d = vec![0u8; h.length as usize];
            s.read_exact(&mut d).unwrap();
            if h.option == OPT_EXPORT_NAME {
                assert_eq!(d, b"");
                s.write_all(&encode_export_name_reply(8192, FLAG_HAS_FLAGS, false))
                    .unwrap();
                break;
            }
            s.write_all(&encode_option_reply(h.option, REP_ERR_UNSUP, &[]))
                .unwrap();
        }
        // One READ, answered with a simple reply.
        let mut r = [0u8; REQUEST_LEN];
        s.read_exact(&mut r).unwrap();
        let r = Request::parse(&r).unwrap();
        assert_eq!((r.command, r.offset, r.length), (CMD_READ, 100, 3));
        g = SimpleReply {
            error: 0,
            cookie: r.cookie,
        }
        .encode()
        .to_vec();
        g.extend_from_slice(b"abc");
        s.write_all(&g).unwrap();
        served2.store(true, Ordering::SeqCst);
        // Then DISC when the client is dropped.
        let mut r = [0u8; REQUEST_LEN];
        s.read_exact(&mut r).unwrap();
        assert_eq!(Request::parse(&r).unwrap().command, CMD_DISC);
    });
    let c = Client::connect(&common::unix_uri(&sock)).unwrap();
    assert_eq!(c.size(), 8192);
    assert!(!c.structured_replies());
    // No FLUSH/FUA advertised: flush is a no-op, FUA writes are refused by
    // nothing here because we do not write.
    c.flush().unwrap();
    let mut b = [0u8; 3];
    c.read(&mut b, 100).unwrap();
    assert_eq!(&b, b"abc");
    drop(c);
    t.join().unwrap();
    assert!(served.load(Ordering::SeqCst));
}

/// On the wire: a slow READ sent first is answered after a fast one.
#[test]
fn raw_replies_are_sent_out_of_order() {
    let srv = InProc::mem(MIB);
    srv.export.delay_reads_at(0, Duration::from_millis(500));
    srv.export.fill(4096, b"fast");
    let mut r = common::Raw::connect(&srv.socket);
    r.handshake(false);
    r.request(CMD_READ, 0, 1, 0, 4);
    r.request(CMD_READ, 0, 2, 4096, 4);
    let first = r.simple_reply();
    assert_eq!(
        (first.cookie, first.error),
        (2, 0),
        "fast read answered first"
    );
    assert_eq!(r.recv(4), b"fast");
    let second = r.simple_reply();
    assert_eq!((second.cookie, second.error), (1, 0));
    assert_eq!(r.recv(4), vec![0u8; 4]);
}

/// A shutdown while a WRITE payload is still arriving lets that write
/// finish and be acknowledged before the connection closes.
#[test]
fn shutdown_waits_for_a_write_in_progress() {
    let mut srv = InProc::mem(MIB);
    let mut r = common::Raw::connect(&srv.socket);
    r.handshake(false);
    r.request(CMD_WRITE, 0, 7, 1000, 8);
    r.send(b"half");
    std::thread::sleep(Duration::from_millis(100));
    let handle = srv.handle.clone();
    let stopper = thread::spawn(move || {
        handle.shutdown();
    });
    stopper.join().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    r.send(b"done");
    let rep = r.simple_reply();
    assert_eq!((rep.cookie, rep.error), (7, 0));
    assert!(r.closed(), "connection closes after the in-flight write");
    srv.stop().unwrap();
    assert_eq!(srv.export.snapshot(1000, 8), b"halfdone");
}

/// WRITEs whose payloads and next headers share packets, with a header
/// split across two sends, are each applied and answered: the server reads
/// the next header together with a payload.
#[test]
fn pipelined_writes_with_headers_in_the_payload_packets() {
    let srv = InProc::mem(MIB);
    let mut r = common::Raw::connect(&srv.socket);
    r.handshake(false);
    let req = |command, cookie, offset, length| {
        Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        }
        .encode()
    };
    let mut wire = Vec::new();
    wire.extend_from_slice(&req(CMD_WRITE, 1, 0, 5));
    wire.extend_from_slice(b"hello");
    wire.extend_from_slice(&req(CMD_WRITE, 2, 4096, 4));
    wire.extend_from_slice(b"abcd");
    let third = req(CMD_WRITE, 3, 8000, 3);
    wire.extend_from_slice(&third[..10]);
    r.send(&wire);
    std::thread::sleep(Duration::from_millis(50));
    let mut wire = third[10..].to_vec();
    wire.extend_from_slice(b"xyz");
    r.send(&wire);
    let mut cookies = Vec::new();
    for _ in 0..3 {
        let rep = r.simple_reply();
        assert_eq!(rep.error, 0, "write {} failed", rep.cookie);
        cookies.push(rep.cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, [1, 2, 3]);
    // Requests in flight together may be answered in any order (and a read
    // beside a write may see either version), so the read goes after the
    // writes are acknowledged.
    r.send(&req(CMD_READ, 4, 0, 5));
    let rep = r.simple_reply();
    assert_eq!((rep.cookie, rep.error), (4, 0));
    assert_eq!(r.recv(5), b"hello");
    assert_eq!(srv.export.snapshot(4096, 4), b"abcd");
    assert_eq!(srv.export.snapshot(8000, 3), b"xyz");
}

/// A read with a callback: `done` gets the result on the reader thread.
fn read_with_callback(c: &Client, buf: &mut [u8], offset: u64) -> mpsc::Receiver<io::Result<()>> {
    let (tx, rx) = mpsc::channel();
    let done: pmcache_nbd::Completion = Box::new(move |r| tx.send(r).unwrap());
    let half = buf.len() / 2;
    let (a, b) = buf.split_at_mut(half);
    let pieces = [(a.as_mut_ptr(), a.len()), (b.as_mut_ptr(), b.len())];
    // SAFETY: the caller keeps `buf` alive and untouched until the
    // receiver has the result.
    let started = unsafe { c.read_raw_async(offset, &pieces, done) };
    assert!(started.is_ok(), "a plain one-request read must start");
    rx
}

#[test]
fn callback_reads_land_in_their_pieces_and_fail_cleanly() {
    let srv = InProc::mem(MIB);
    let c = Client::connect(&srv.uri()).unwrap();
    let d = pattern(7, 8192);
    c.write(&d, 4096, false).unwrap();
    let mut buf = vec![0u8; 8192];
    let rx = read_with_callback(&c, &mut buf, 4096);
    rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(buf, d, "both pieces filled in order");

    // Refused up front, with nothing sent: past the end, and too long.
    let refused = |offset: u64, len: usize| {
        let mut b = vec![0u8; len];
        let done: pmcache_nbd::Completion =
            Box::new(|_| panic!("a refused read must not call back"));
        // SAFETY: refused reads never touch the buffer.
        unsafe { c.read_raw_async(offset, &[(b.as_mut_ptr(), b.len())], done) }.is_err()
    };
    assert!(refused(MIB as u64 - 512, 4096));
    assert!(refused(0, 64 << 20));

    // A server error arrives as the callback's error.
    srv.export.fail_at(0);
    let rx = read_with_callback(&c, &mut buf, 0);
    let e = rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("injected failure"), "{e}");
}

#[test]
fn a_callback_read_nobody_answers_times_out() {
    let srv = InProc::mem(MIB);
    srv.export.delay_reads_at(0, Duration::from_secs(3));
    let opts = ClientOptions {
        request_timeout: Some(Duration::from_millis(300)),
        ..ClientOptions::default()
    };
    let c = Client::connect_with(&srv.uri(), &opts).unwrap();
    let start = Instant::now();
    let mut buf = vec![0u8; 4096];
    let rx = read_with_callback(&c, &mut buf, 0);
    // No caller waits on it: the watchdog (checking every second) ends it.
    let e = rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_millis(2500),
        "{:?}",
        start.elapsed()
    );
    assert!(e.to_string().contains("timed out"), "{e}");
    assert!(!c.is_connected());
}
