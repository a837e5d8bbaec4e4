//! Whole-session robustness in the normal suite (the cargo-fuzz target
//! `server_session` does the same with coverage guidance): thousands of
//! generated and mutated client byte streams go through a real server
//! connection. None may panic or hang it, and afterwards the server still
//! serves a well-behaved client correctly. Also: a panicking export only
//! ends its own connection.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

mod common;

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use common::{go_request, mem_export, pattern, serve_unix, wait_until, InProc, TempDir};
use pmcache_nbd::proto::*;
use pmcache_nbd::{
    BlockSizes, Client, Export, ExportError, Extent, MemExport, Server, ServerConfig, Stream,
    ZeroFlags,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A plausible client byte stream: flags, options, then requests, so that
/// mutations reach deep into both phases.
fn session(rng: &mut Rng, size: u64) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(rng.below(4) as u32).to_be_bytes());
    let structured = rng.below(2) == 0;
    if structured {
        v.extend(OptionRequest::StructuredReply.encode());
    }
    for _ in 0..rng.below(3) {
        let o = match rng.below(6) {
            0 => OptionRequest::List,
            1 => OptionRequest::Unknown(rng.below(64) as u32),
            2 => OptionRequest::Info {
                go: false,
                name: String::new(),
                requests: vec![rng.below(5) as u16],
            },
            3 => OptionRequest::MetaContext {
                set: rng.below(2) == 0,
                export: String::new(),
                queries: vec![META_BASE_ALLOCATION.into()],
            },
            4 => OptionRequest::StartTls,
            _ => OptionRequest::StructuredReply,
        };
        v.extend(o.encode());
    }
    if rng.below(4) == 0 {
        v.extend(OptionRequest::ExportName(String::new()).encode());
    } else {
        v.extend(go_request(""));
    }
    for i in 0..rng.below(12) {
        let command = rng.below(9) as u16;
        let offset = match rng.below(4) {
            0 => rng.below(size),
            1 => size - rng.below(64),
            2 => rng.next(),
            _ => rng.below(size / 512) * 512,
        };
        let length = match rng.below(4) {
            0 => rng.below(70_000) as u32,
            1 => rng.next() as u32,
            _ => rng.below(8192) as u32,
        };
        let flags = if rng.below(3) == 0 {
            rng.next() as u16
        } else {
            rng.below(2) as u16
        };
        v.extend(
            Request {
                flags,
                command,
                cookie: i,
                offset,
                length,
            }
            .encode(),
        );
        if command == CMD_WRITE {
            // Usually the right payload, sometimes short.
            let n = if rng.below(5) == 0 {
                rng.below(u64::from(length) + 1)
            } else {
                u64::from(length)
            };
            v.extend(pattern(i, n.min(100_000) as usize));
        }
    }
    // Mutate a few bytes, sometimes truncate.
    for _ in 0..rng.below(4) {
        if !v.is_empty() {
            let at = rng.below(v.len() as u64) as usize;
            v[at] = rng.next() as u8;
        }
    }
    if rng.below(4) == 0 {
        let cut = rng.below(v.len() as u64 + 1) as usize;
        v.truncate(cut);
    }
    v
}

/// Feed `input` to one server connection; returns once the server is done
/// with it (bounded), with everything the server sent.
fn run_session(server: &Server, input: Vec<u8>) -> Vec<u8> {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let mut reader = theirs.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let _ = theirs.write_all(&input);
        let _ = theirs.shutdown(Shutdown::Write);
    });
    let drain = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = reader.read_to_end(&mut out);
        out
    });
    let s = server.clone();
    let conn = std::thread::spawn(move || s.serve_stream(Stream::Unix(ours)));
    assert!(
        wait_until(Duration::from_secs(20), Duration::from_millis(1), || {
            conn.is_finished()
        }),
        "server connection hung"
    );
    conn.join().expect("server connection panicked");
    sender.join().unwrap();
    drain.join().unwrap()
}

#[test]
fn random_sessions_never_panic_or_hang() {
    let size = 256 * 1024;
    let export = Arc::new(mem_export(size, 1, 64 * 1024));
    let server = Server::new(
        export.clone(),
        ServerConfig {
            io_timeout: Some(Duration::from_secs(5)),
            ..ServerConfig::default()
        },
    )
    .unwrap();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut replies = 0usize;
    for _ in 0..3000 {
        let input = session(&mut rng, size as u64);
        let out = run_session(&server, input);
        // Every session starts with the server's greeting.
        assert!(out.len() >= GREETING_LEN);
        assert_eq!(&out[..8], b"NBDMAGIC");
        replies += out.len();
    }
    assert!(
        replies > 3000 * GREETING_LEN,
        "sessions got past the greeting"
    );
    assert_eq!(server.active_connections(), 0);
    // The server is still healthy for a well-behaved client.
    let handle = server.shutdown_handle();
    let (_dir, sock, t) = serve_unix(&server);
    let c = Client::connect(&common::unix_uri(&sock)).unwrap();
    let d = pattern(42, 10_000);
    c.write(&d, 1234, true).unwrap();
    let mut b = vec![0u8; d.len()];
    c.read(&mut b, 1234).unwrap();
    assert_eq!(b, d);
    drop(c);
    handle.shutdown();
    t.join().unwrap().unwrap();
}

/// The same random sessions against servers that offer TLS (`on`) and
/// insist on it (`require`): option haggling around STARTTLS, plain bytes
/// where a TLS handshake should follow, options refused before TLS. No
/// panic, no hang, and under `require` nothing is written.
#[test]
fn random_sessions_around_starttls_never_panic_hang_or_write() {
    use pmcache_nbd::{TlsCredentials, TlsMode, TlsServer, TlsServerConfig};
    let dir = TempDir::new("s");
    let keys = dir.join("keys.psk");
    std::fs::write(&keys, format!("alice:{}\n", "a1".repeat(32))).unwrap();
    for (mode, seed) in [(TlsMode::On, 0x5eed_0071), (TlsMode::Require, 0x5eed_0072)] {
        let size = 256 * 1024;
        let export = Arc::new(mem_export(size, 1, 64 * 1024));
        let tls = TlsServer::new(&TlsServerConfig {
            mode,
            credentials: TlsCredentials::Psk { file: keys.clone() },
            allow: vec![],
        })
        .unwrap();
        let server = Server::new(
            export.clone(),
            ServerConfig {
                io_timeout: Some(Duration::from_secs(5)),
                tls: Some(Arc::new(tls)),
                ..ServerConfig::default()
            },
        )
        .unwrap();
        let mut rng = Rng(seed);
        for _ in 0..1500 {
            let out = run_session(&server, session(&mut rng, size as u64));
            assert!(out.len() >= GREETING_LEN && &out[..8] == b"NBDMAGIC");
        }
        assert_eq!(server.active_connections(), 0);
        if mode == TlsMode::Require {
            assert_eq!(
                export.stats().writes,
                0,
                "a plain client wrote under --tls require"
            );
        }
    }
}

/// An export that panics on writes at offset 0 and reads at offset 512.
struct Panicky(MemExport);

impl Export for Panicky {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn block_sizes(&self) -> BlockSizes {
        self.0.block_sizes()
    }
    fn read(
        &self,
        offset: u64,
        len: u32,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Result<(), ExportError> {
        assert_ne!(offset, 512, "test panic in read");
        self.0.read(offset, len, sink)
    }
    fn write(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        source: &mut dyn FnMut(&mut [IoSliceMut<'_>]) -> io::Result<()>,
    ) -> Result<(), ExportError> {
        assert_ne!(offset, 0, "test panic in write");
        self.0.write(offset, len, fua, source)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), ExportError> {
        self.0.write_zeroes(offset, len, flags)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.0.trim(offset, len, fua)
    }
    fn flush(&self) -> Result<(), ExportError> {
        self.0.flush()
    }
    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.0.cache(offset, len)
    }
    fn block_status(&self, offset: u64, len: u64) -> Option<Result<Vec<Extent>, ExportError>> {
        self.0.block_status(offset, len)
    }
}

#[test]
fn a_panicking_export_ends_only_its_connection() {
    let server = Server::new(
        Arc::new(Panicky(MemExport::new(1 << 20))),
        ServerConfig::default(),
    )
    .unwrap();
    let handle = server.shutdown_handle();
    let (_dir, sock, t) = serve_unix(&server);
    let uri = common::unix_uri(&sock);
    let bystander = Client::connect(&uri).unwrap();
    bystander.write(b"safe", 4096, false).unwrap();

    let victim = Client::connect(&uri).unwrap();
    assert!(victim.write(b"boom", 0, false).is_err(), "panic in write");
    assert!(!victim.is_connected());
    let victim = Client::connect(&uri).unwrap();
    let mut b = [0u8; 4];
    assert!(victim.read(&mut b, 512).is_err(), "panic in read");

    bystander.read(&mut b, 4096).unwrap();
    assert_eq!(&b, b"safe");
    // Workers survived: many reads still get served.
    for i in 0..64u64 {
        bystander.read(&mut b, 4096 + i).unwrap();
    }
    drop((bystander, victim));
    handle.shutdown();
    t.join().unwrap().unwrap();
    assert_eq!(server.active_connections(), 0);
}

#[test]
fn in_process_server_survives_abrupt_clients() {
    // Clients that vanish at every point of a session.
    let srv = InProc::mem(1 << 20);
    let full = {
        let mut v = 3u32.to_be_bytes().to_vec();
        v.extend(OptionRequest::StructuredReply.encode());
        v.extend(go_request(""));
        v.extend(
            Request {
                flags: 0,
                command: CMD_WRITE,
                cookie: 1,
                offset: 0,
                length: 1000,
            }
            .encode(),
        );
        v.extend(vec![7u8; 1000]);
        v
    };
    for cut in (0..full.len()).step_by(37) {
        let mut s = UnixStream::connect(&srv.socket).unwrap();
        let mut g = [0u8; GREETING_LEN];
        s.read_exact(&mut g).unwrap();
        s.write_all(&full[..cut]).unwrap();
        drop(s);
    }
    wait_until(Duration::from_secs(10), Duration::from_millis(5), || {
        srv.server.active_connections() == 0
    });
    assert_eq!(srv.server.active_connections(), 0);
    assert_eq!(
        srv.export.stats().writes,
        0,
        "no cut-off write was executed"
    );
    let c = Client::connect(&srv.uri()).unwrap();
    c.write(&[1, 2, 3], 0, false).unwrap();
    assert_eq!(srv.export.snapshot(0, 3), vec![1, 2, 3]);
}
