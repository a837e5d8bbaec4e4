//! TLS (NBD_OPT_STARTTLS) of the real `pmcache serve` with GnuTLS-based
//! clients (libnbd's nbdinfo, nbdcopy and Python binding): X.509 and PSK
//! credentials made here with certtool and psktool, `--tls require`, and
//! each way a client can be refused. A refused client ends only its own
//! connection (a TLS client connected meanwhile keeps working) and writes
//! nothing (the export is unchanged afterwards).
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

#[path = "common/nbd.rs"]
mod nbd;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nbd::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A certtool template file.
fn template(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

fn certtool(args: &[&str]) {
    run_ok("certtool", args, T);
}

/// A CA in `dir` (ca-key.pem, ca-cert.pem).
fn make_ca(dir: &Path, cn: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let t = template(
        dir,
        "ca.info",
        &format!("cn = {cn}\nca\ncert_signing_key\n"),
    );
    certtool(&[
        "--generate-privkey",
        "--outfile",
        &s(&dir.join("ca-key.pem")),
    ]);
    certtool(&[
        "--generate-self-signed",
        "--load-privkey",
        &s(&dir.join("ca-key.pem")),
        "--template",
        &s(&t),
        "--outfile",
        &s(&dir.join("ca-cert.pem")),
    ]);
}

/// A key and a certificate signed by the CA in `ca` (`{role}-key.pem`,
/// `{role}-cert.pem` in `out`), with `ca-cert.pem` copied beside them: the
/// layout nbdkit, qemu and libnbd read.
fn make_cert(ca: &Path, out: &Path, role: &str, cn: &str) {
    std::fs::create_dir_all(out).unwrap();
    let usage = if role == "server" {
        "dns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\n"
    } else {
        "tls_www_client\n"
    };
    let t = template(
        out,
        &format!("{role}.info"),
        &format!("organization = pmcache test\ncn = {cn}\n{usage}encryption_key\nsigning_key\n"),
    );
    let key = out.join(format!("{role}-key.pem"));
    certtool(&["--generate-privkey", "--outfile", &s(&key)]);
    certtool(&[
        "--generate-certificate",
        "--load-ca-certificate",
        &s(&ca.join("ca-cert.pem")),
        "--load-ca-privkey",
        &s(&ca.join("ca-key.pem")),
        "--load-privkey",
        &s(&key),
        "--template",
        &s(&t),
        "--outfile",
        &s(&out.join(format!("{role}-cert.pem"))),
    ]);
    std::fs::copy(ca.join("ca-cert.pem"), out.join("ca-cert.pem")).unwrap();
}

/// A CA (`ca/`), a server certificate for localhost (`pki/`) and a client
/// certificate for `client` (`cli/`), all in `dir`.
fn x509_pki(dir: &TempDir, client: &str) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, pki, cli) = (dir.join("ca"), dir.join("pki"), dir.join("cli"));
    make_ca(&ca, "pmcache test CA");
    make_cert(&ca, &pki, "server", "localhost");
    make_cert(&ca, &cli, "client", client);
    (ca, pki, cli)
}

/// A psktool key file for `user`.
fn make_psk(file: &Path, user: &str) {
    run_ok("psktool", &["-u", user, "-p", &s(file)], T);
}

/// A pmcache server over a sparse origin with these TLS arguments.
fn tls_server(dir: &TempDir, listen: Listen, tls: &[&str]) -> ServerGuard {
    let origin = dir.join("origin.img");
    std::fs::File::create(&origin)
        .unwrap()
        .set_len(16 * MIB as u64)
        .unwrap();
    launch(&ServerKind::Pmcache {
        cache: dir.join("cache.pmem"),
        cache_size: Some("32M".into()),
        origin: Some(s(&origin)),
        listen,
        extra: tls.iter().map(|a| a.to_string()).collect(),
    })
}

/// The `nbds` URI of a server with TLS query parameters appended; `user`
/// is the PSK identity (libnbd takes it from the URI's user part).
fn nbds_user(srv: &ServerGuard, user: &str, query: &str) -> String {
    let at = if user.is_empty() {
        String::new()
    } else {
        format!("{user}@")
    };
    match &srv.endpoint {
        Endpoint::Unix(p) => format!("nbds+unix://{at}/?socket={}&{query}", p.display()),
        Endpoint::Tcp(port) => format!("nbds://{at}127.0.0.1:{port}/?{query}"),
    }
}

fn nbds(srv: &ServerGuard, query: &str) -> String {
    nbds_user(srv, "", query)
}

fn nbdinfo_json(uri: &str) -> Value {
    let out = run_ok("nbdinfo", &["--json", uri], T);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --json: {e}: {out}"))
}

/// Copy `data` into the export and back out with nbdcopy; both must match.
fn nbdcopy_round_trip(dir: &TempDir, uri: &str, data: &[u8]) {
    let src = dir.join("src.img");
    std::fs::write(&src, data).unwrap();
    run_ok("nbdcopy", &["--flush", &s(&src), uri], T);
    let out = dir.join("out.img");
    run_ok("nbdcopy", &[uri, &s(&out)], T);
    assert_same(
        &std::fs::read(&out).unwrap(),
        data,
        "nbdcopy round trip over TLS",
    );
}

/// `pmcache stats --json` of the running server whose cache is in `dir`.
fn dir_stats(dir: &TempDir) -> Value {
    stats(&dir.join("cache.pmem"), T)
}

/// GET /metrics from the server's metrics port.
fn metrics(port: u16) -> String {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn x509_require_nbdinfo_and_nbdcopy_over_tcp() {
    let dir = TempDir::new("t");
    let (_, pki, cli) = x509_pki(&dir, "alice");
    let srv = tls_server(
        &dir,
        Listen::Tcp,
        &["--tls", "require", "--tls-certificates", &s(&pki)],
    );
    let uri = nbds(&srv, &format!("tls-certificates={}", s(&cli)));
    let info = nbdinfo_json(&uri);
    assert_eq!(info["TLS"], Value::Bool(true), "{info}");
    assert_eq!(info["exports"][0]["export-size"], 16 * MIB, "{info}");
    nbdcopy_round_trip(&dir, &uri, &pattern(3, 16 * MIB));
    srv.stop();
}

#[test]
fn psk_require_nbdinfo_and_nbdcopy_over_a_unix_socket() {
    let dir = TempDir::new("t");
    let keys = dir.join("keys.psk");
    make_psk(&keys, "alice");
    let srv = tls_server(
        &dir,
        Listen::Unix,
        &["--tls", "require", "--tls-psk", &s(&keys)],
    );
    let uri = nbds_user(&srv, "alice", &format!("tls-psk-file={}", s(&keys)));
    let info = nbdinfo_json(&uri);
    assert_eq!(info["TLS"], Value::Bool(true), "{info}");
    nbdcopy_round_trip(&dir, &uri, &pattern(4, 16 * MIB));
    srv.stop();
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

/// A libnbd (Python) client that stays connected across a refusal: it
/// writes 1 MiB of 0x5a at 0, says so, waits for `go`, then must still read
/// it back and write 4 KiB of 0xa5 after it. Prints OK when all of that
/// worked on its one connection.
const STAYER: &str = r#"
import nbd, os, sys, time
uri, ready, go = sys.argv[1:4]
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
buf = b"\x5a" * 1048576
h.pwrite(buf, 0)
h.flush()
open(ready, "w").close()
t = time.time()
while not os.path.exists(go):
    if time.time() - t > 60:
        sys.exit("no go")
    time.sleep(0.02)
assert h.pread(1048576, 0) == buf
h.pwrite(b"\xa5" * 4096, 1048576)
h.flush()
h.shutdown()
print("OK")
"#;

/// Start a libnbd Python client `script` (its arguments: the URI, a file
/// it creates once connected, a file it waits for before it finishes) and
/// wait, bounded by `T`, until it is connected. Returns it and the file
/// that lets it go.
fn start_client(dir: &TempDir, name: &str, script: &str, uri: &str) -> (Proc, PathBuf) {
    let path = dir.join(&format!("{name}.py"));
    std::fs::write(&path, script).unwrap();
    let (ready, go) = (
        dir.join(&format!("{name}.ready")),
        dir.join(&format!("{name}.go")),
    );
    let mut client = Proc::spawn(
        &require_tool("python3"),
        &[s(&path), uri.to_string(), s(&ready), s(&go)],
        dir.join(&format!("{name}.log")),
        &[],
    );
    let start = std::time::Instant::now();
    while !ready.exists() {
        assert!(
            client.exited().is_none() && start.elapsed() < T,
            "the {name} client did not connect: {}",
            client.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (client, go)
}

/// Run `refused` (which must fail) while a good TLS client (`good_uri`) is
/// connected; then that client must finish its work, and the whole export
/// must hold exactly what it wrote: the refused client wrote nothing.
fn refusal(dir: &TempDir, srv: &ServerGuard, good_uri: &str, refused: impl FnOnce()) {
    let (mut stayer, go) = start_client(dir, "stayer", STAYER, good_uri);
    refused();
    std::fs::write(&go, b"").unwrap();
    let status = stayer.wait_exit(T).expect("the good client finishes");
    assert!(
        status.success() && stayer.log_text().contains("OK"),
        "the good client's connection did not survive the refusal ({status}): {}\nserver log:\n{}",
        stayer.log_text(),
        srv.log_text()
    );
    let out = dir.join("after.img");
    run_ok("nbdcopy", &[good_uri, &s(&out)], T);
    let mut want = vec![0u8; 16 * MIB];
    want[..MIB].fill(0x5a);
    want[MIB..MIB + 4096].fill(0xa5);
    assert_same(
        &std::fs::read(&out).unwrap(),
        &want,
        "export after a refusal",
    );
}

/// nbdcopy of a 0xee image into `uri`, which must fail.
fn refused_copy(dir: &TempDir, uri: &str) -> String {
    let src = dir.join("evil.img");
    std::fs::write(&src, vec![0xeeu8; 16 * MIB]).unwrap();
    let out = run_tool("nbdcopy", &[&s(&src), uri], T);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "nbdcopy into {uri} was let in: {err}"
    );
    err
}

/// A PSK server (`--tls require`, identities alice and carol, only `allow`
/// let in when given) and the good client's URI.
fn psk_setup(dir: &TempDir, allow: &[&str], extra: &[&str]) -> (ServerGuard, String) {
    let keys = dir.join("keys.psk");
    make_psk(&keys, "alice");
    make_psk(&keys, "carol");
    let mut args = vec!["--tls", "require", "--tls-psk", keys.to_str().unwrap()];
    for a in allow {
        args.extend(["--tls-allow", a]);
    }
    args.extend(extra);
    let srv = tls_server(dir, Listen::Unix, &args);
    let good = nbds_user(&srv, "alice", &format!("tls-psk-file={}", s(&keys)));
    (srv, good)
}

fn assert_logged(srv: &ServerGuard, what: &str) {
    let log = srv.log_text();
    assert!(log.contains(what), "server log lacks {what:?}:\n{log}");
}

/// The greeting, then the client flags (fixed newstyle, no zeroes).
fn raw_start(sock: &Path) -> UnixStream {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c
}

fn raw_option(c: &mut UnixStream, opt: u32, data: &[u8]) -> (u32, Vec<u8>) {
    let mut m = b"IHAVEOPT".to_vec();
    m.extend(opt.to_be_bytes());
    m.extend((data.len() as u32).to_be_bytes());
    m.extend(data);
    c.write_all(&m).unwrap();
    let mut h = [0u8; 20];
    c.read_exact(&mut h).unwrap();
    assert_eq!(
        u64::from_be_bytes(h[..8].try_into().unwrap()),
        0x3e889045565a9
    );
    assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), opt);
    let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    c.read_exact(&mut d).unwrap();
    (ty, d)
}

const REP_ACK: u32 = 1;
const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
const OPT_GO: u32 = 7;
const OPT_STARTTLS: u32 = 5;

/// The stream ends (EOF or reset) within the read timeout.
fn assert_ends(c: &mut UnixStream) {
    let mut b = [0u8; 4096];
    loop {
        match c.read(&mut b) {
            Ok(0) => return,
            Ok(_) => {} // a TLS alert
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the connection did not end: {e}"),
        }
    }
}

#[test]
fn refused_plain_client_against_require_gets_tls_required() {
    let dir = TempDir::new("t");
    let (srv, good) = psk_setup(&dir, &[], &[]);
    refusal(&dir, &srv, &good, || {
        // libnbd without TLS: refused.
        let err = refused_copy(&dir, &srv.uri());
        assert!(!err.is_empty());
        // On the wire: GO and INFO get the TLS-required error, and the
        // connection stays usable for STARTTLS.
        let mut c = raw_start(srv.socket());
        let go = [0u8, 0, 0, 0, 0, 0];
        assert_eq!(raw_option(&mut c, OPT_GO, &go).0, REP_ERR_TLS_REQD);
        assert_eq!(raw_option(&mut c, 6, &go).0, REP_ERR_TLS_REQD);
        assert_eq!(raw_option(&mut c, 3, &[]).0, REP_ERR_TLS_REQD);
        assert_eq!(raw_option(&mut c, OPT_STARTTLS, &[]).0, REP_ACK);
    });
    let st = dir_stats(&dir);
    assert_eq!(st["tls"], "require", "{st}");
    assert!(counter(&st, "tls_refused_plain") >= 3, "{st}");
    srv.stop();
}

#[test]
fn refused_wrong_psk() {
    let dir = TempDir::new("t");
    let port = free_port();
    let m = format!("127.0.0.1:{port}");
    let (srv, good) = psk_setup(&dir, &[], &["--metrics", &m]);
    refusal(&dir, &srv, &good, || {
        let wrong = dir.join("wrong.psk");
        std::fs::write(&wrong, format!("alice:{}\n", "0f".repeat(32))).unwrap();
        refused_copy(
            &dir,
            &nbds_user(&srv, "alice", &format!("tls-psk-file={}", s(&wrong))),
        );
    });
    assert_logged(&srv, "handshake failed");
    assert_logged(
        &srv,
        "the client's key for PSK identity \"alice\" does not match",
    );
    // The stayer and the nbdcopy after the refusal got in; nbdcopy's
    // attempts with the wrong key did not.
    let st = dir_stats(&dir);
    assert!(counter(&st, "tls_handshakes") >= 2, "{st}");
    assert!(counter(&st, "tls_failed_handshakes") >= 1, "{st}");
    let text = pmcache_ok(&["stats", "--cache", &s(&dir.join("cache.pmem"))], T);
    assert!(text.contains("TLS              require"), "{text}");
    let prom = metrics(port);
    assert!(
        prom.contains("pmcache_tls_info{mode=\"require\"} 1"),
        "{prom}"
    );
    let failed = prom
        .lines()
        .find_map(|l| l.strip_prefix("pmcache_tls_failed_handshakes "))
        .unwrap_or_else(|| panic!("{prom}"));
    assert!(failed.trim().parse::<u64>().unwrap() >= 1, "{prom}");
    srv.stop();
}

#[test]
fn refused_unknown_psk_identity_and_one_not_allowed() {
    let dir = TempDir::new("t");
    let (srv, good) = psk_setup(&dir, &["alice"], &[]);
    refusal(&dir, &srv, &good, || {
        let other = dir.join("bob.psk");
        make_psk(&other, "bob");
        refused_copy(
            &dir,
            &nbds_user(&srv, "bob", &format!("tls-psk-file={}", s(&other))),
        );
        // carol is in the key file but not in the allow list.
        let keys = dir.join("keys.psk");
        refused_copy(
            &dir,
            &nbds_user(&srv, "carol", &format!("tls-psk-file={}", s(&keys))),
        );
    });
    assert_logged(&srv, "handshake failed");
    assert_logged(&srv, "unknown PSK identity \"bob\"");
    assert_logged(&srv, "PSK identity \"carol\" is not in the TLS allow list");
    srv.stop();
}

#[test]
fn refused_client_certificate_from_another_ca() {
    let dir = TempDir::new("t");
    let (ca, pki, cli) = x509_pki(&dir, "alice");
    // A client certificate of another CA (the client trusts the real one).
    let evil_ca = dir.join("evil-ca");
    make_ca(&evil_ca, "another CA");
    let evil = dir.join("evil");
    make_cert(&evil_ca, &evil, "client", "alice");
    std::fs::copy(ca.join("ca-cert.pem"), evil.join("ca-cert.pem")).unwrap();
    // bob's certificate is from the right CA but not in the allow list.
    let bob = dir.join("bob");
    make_cert(&ca, &bob, "client", "bob");
    let srv = tls_server(
        &dir,
        Listen::Unix,
        &[
            "--tls",
            "require",
            "--tls-certificates",
            &s(&pki),
            "--tls-verify-peer",
            "--tls-allow",
            "alice",
        ],
    );
    let good = nbds(&srv, &format!("tls-certificates={}", s(&cli)));
    refusal(&dir, &srv, &good, || {
        refused_copy(&dir, &nbds(&srv, &format!("tls-certificates={}", s(&evil))));
        refused_copy(&dir, &nbds(&srv, &format!("tls-certificates={}", s(&bob))));
        // No client certificate at all.
        let none = dir.join("none");
        std::fs::create_dir_all(&none).unwrap();
        std::fs::copy(ca.join("ca-cert.pem"), none.join("ca-cert.pem")).unwrap();
        refused_copy(&dir, &nbds(&srv, &format!("tls-certificates={}", s(&none))));
        // The good client, still connected, is listed by its certificate's
        // name; none of the refused ones is.
        // (A refused connection leaves just after its client sees the end.)
        let st = stats_until(&dir, "only the good client", |st| {
            open_connections(st).len() == 1
        });
        let conns = open_connections(&st);
        assert_eq!(conns[0]["tls"], true, "{st}");
        assert_eq!(conns[0]["tls_identity"], "alice", "{st}");
    });
    assert_logged(&srv, "handshake failed");
    assert_logged(&srv, "not in the TLS allow list");
    srv.stop();
}

#[test]
fn refused_garbage_after_starttls() {
    let dir = TempDir::new("t");
    let (srv, good) = psk_setup(&dir, &[], &[]);
    refusal(&dir, &srv, &good, || {
        let mut c = raw_start(srv.socket());
        assert_eq!(raw_option(&mut c, OPT_STARTTLS, &[]).0, REP_ACK);
        // Not a TLS ClientHello: an NBD option, then junk.
        let mut junk = b"IHAVEOPT\0\0\0\x07\0\0\0\x06\0\0\0\0\0\0".to_vec();
        junk.extend(std::iter::repeat_n(0x41u8, 600));
        let _ = c.write_all(&junk);
        assert_ends(&mut c);
    });
    assert_logged(&srv, "handshake failed");
    srv.stop();
}

#[test]
fn tls_on_lets_plain_and_tls_clients_in() {
    let dir = TempDir::new("t");
    let keys = dir.join("keys.psk");
    make_psk(&keys, "alice");
    let srv = tls_server(&dir, Listen::Unix, &["--tls", "on", "--tls-psk", &s(&keys)]);
    let tls = nbdinfo_json(&nbds_user(
        &srv,
        "alice",
        &format!("tls-psk-file={}", s(&keys)),
    ));
    assert_eq!(tls["TLS"], Value::Bool(true), "{tls}");
    let plain = nbdinfo_json(&srv.uri());
    assert_eq!(plain["TLS"], Value::Bool(false), "{plain}");
    srv.stop();
}

/// A libnbd (GnuTLS) client that connects, says so, and holds its
/// connection open until told to go.
const HOLDER: &str = r#"
import nbd, os, sys, time
uri, ready, go = sys.argv[1:4]
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
h.pread(4096, 0)
open(ready, "w").close()
t = time.time()
while not os.path.exists(go) and time.time() - t < 60:
    time.sleep(0.02)
h.shutdown()
"#;

/// Poll `pmcache stats --json` until `done` holds for it (bounded by `T`).
fn stats_until(dir: &TempDir, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = std::time::Instant::now();
    loop {
        let st = dir_stats(dir);
        if done(&st) {
            return st;
        }
        assert!(start.elapsed() < T, "stats never showed {what}: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn open_connections(st: &Value) -> Vec<Value> {
    st["connections"]
        .as_array()
        .unwrap_or_else(|| panic!("stats lack connections: {st}"))
        .clone()
}

#[test]
fn stats_and_metrics_show_each_connection_with_its_tls_state() {
    let dir = TempDir::new("t");
    let keys = dir.join("keys.psk");
    make_psk(&keys, "alice");
    let port = free_port();
    let m = format!("127.0.0.1:{port}");
    let srv = tls_server(
        &dir,
        Listen::Unix,
        &["--tls", "on", "--tls-psk", &s(&keys), "--metrics", &m],
    );
    // A TLS client (libnbd, GnuTLS, PSK identity alice) and a plain one.
    let uri = nbds_user(&srv, "alice", &format!("tls-psk-file={}", s(&keys)));
    let plain = pmcache_nbd::Client::connect(&srv.uri()).unwrap();
    let (mut holder, go) = start_client(&dir, "holder", HOLDER, &uri);

    let st = stats_until(&dir, "two connections in transmission", |st| {
        let c = open_connections(st);
        c.len() == 2 && c.iter().all(|c| c["phase"] == "transmission")
    });
    let conns = open_connections(&st);
    let sock = srv
        .socket()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    for c in &conns {
        let peer = c["peer"].as_str().unwrap();
        assert!(peer.starts_with("unix:") && peer.ends_with(&sock), "{c}");
        assert!(
            c["id"].as_u64().is_some() && c["open_seconds"].as_u64().is_some(),
            "{c}"
        );
    }
    let tls = conns
        .iter()
        .find(|c| c["tls"] == true)
        .unwrap_or_else(|| panic!("{st}"));
    assert_eq!(tls["tls_identity"], "alice", "{tls}");
    assert!(
        tls["tls_version"].as_str().unwrap().starts_with("TLSv1."),
        "{tls}"
    );
    assert!(!tls["tls_cipher"].as_str().unwrap().is_empty(), "{tls}");
    let plain_c = conns
        .iter()
        .find(|c| c["tls"] == false)
        .unwrap_or_else(|| panic!("{st}"));
    assert_eq!(plain_c["tls_identity"], Value::Null, "{plain_c}");

    let text = pmcache_ok(&["stats", "--cache", &s(&dir.join("cache.pmem"))], T);
    assert!(
        text.contains("Connections      2 open (1 over TLS)"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains(" TLS TLSv1.") && l.contains(" as alice, open ")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.contains("  plain, open ")), "{text}");
    let prom = metrics(port);
    assert!(
        prom.contains("pmcache_connections{tls=\"yes\"} 1\n"),
        "{prom}"
    );
    assert!(
        prom.contains("pmcache_connections{tls=\"no\"} 1\n"),
        "{prom}"
    );
    // The key itself appears nowhere.
    let key = std::fs::read_to_string(&keys).unwrap();
    let key = key.trim().rsplit_once(':').unwrap().1;
    for out in [&st.to_string(), &text, &prom] {
        assert!(!out.contains(key), "the PSK leaked: {out}");
    }

    // Both leave: the list empties and the gauges drop to 0.
    std::fs::write(&go, b"").unwrap();
    assert!(holder.wait_exit(T).expect("the TLS client exits").success());
    drop(plain);
    stats_until(&dir, "no connection", |st| open_connections(st).is_empty());
    let prom = metrics(port);
    assert!(
        prom.contains("pmcache_connections{tls=\"yes\"} 0\n"),
        "{prom}"
    );
    assert!(
        prom.contains("pmcache_connections{tls=\"no\"} 0\n"),
        "{prom}"
    );
    srv.stop();
}

#[test]
fn bad_tls_arguments_are_refused_before_anything_is_created() {
    let dir = TempDir::new("t");
    let cache = dir.join("cache.pmem");
    let origin = dir.join("origin.img");
    std::fs::write(&origin, vec![0u8; MIB]).unwrap();
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let bad_psk = dir.join("bad.psk");
    std::fs::write(&bad_psk, "alice:nothex\n").unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--tls", "require"],
            "needs --tls-certificates DIR or --tls-psk FILE",
        ),
        (
            &["--tls", "on", "--tls-certificates", &s(&pki)],
            "server-cert.pem is missing",
        ),
        (
            &["--tls", "on", "--tls-psk", &s(&bad_psk)],
            "line 1: key is not hexadecimal",
        ),
        (&["--tls-psk", &s(&bad_psk)], "--tls is off"),
    ];
    for (extra, want) in cases {
        let mut args = vec![
            "serve",
            "--cache",
            cache.to_str().unwrap(),
            "--cache-size",
            "8M",
            "--origin",
            origin.to_str().unwrap(),
            "--socket",
            "/nonexistent/x.sock",
        ];
        args.extend(extra);
        let out = pmcache(&args, T);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{extra:?}: {err}"
        );
        assert!(!err.contains("nothex"), "the key is echoed: {err}");
        assert!(!cache.exists(), "{extra:?} created the cache");
    }
}

// ---------------------------------------------------------------------------
// A TLS origin: nbdkit --tls=require
// ---------------------------------------------------------------------------

/// nbdkit serving `file` with these TLS arguments on the Unix socket `sock`
/// (a fixed path, so that a restarted nbdkit is the same origin URI).
fn nbdkit_tls(dir: &TempDir, sock: &Path, file: &Path, tls: &[&str], log: &str) -> Proc {
    let mut args: Vec<String> = vec!["--tls=require".into()];
    args.extend(tls.iter().map(|a| a.to_string()));
    args.extend(["file".into(), s(file)]);
    nbdkit_at(sock, &args, dir.join(log), T)
}

/// `serve` over an origin it must refuse: it fails and creates no cache.
/// Returns its error output.
fn serve_refused(dir: &TempDir, origin_uri: &str) -> String {
    let cache = dir.join("cache.pmem");
    let out = pmcache(
        &[
            "serve",
            "--cache",
            &s(&cache),
            "--cache-size",
            "8M",
            "--origin",
            origin_uri,
            "--socket",
            &s(&dir.join("never.sock")),
        ],
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "served over {origin_uri}: {err}");
    assert!(!cache.exists(), "a refused origin left a cache");
    err
}

fn pmcache_over(dir: &TempDir, origin_uri: &str, extra: &[&str]) -> ServerGuard {
    launch(&ServerKind::pmcache(
        &dir.join("cache.pmem"),
        "8M",
        origin_uri,
        extra,
    ))
}

#[test]
fn nbdkit_psk_origin_reconnects_flushes_and_keeps_the_key_secret() {
    let dir = TempDir::new("t");
    let keys = dir.join("keys.psk");
    make_psk(&keys, "alice");
    let key_hex = std::fs::read_to_string(&keys).unwrap()[6..]
        .trim()
        .to_string();
    let file = dir.join("origin.img");
    let mut model = pattern(21, 16 * MIB);
    std::fs::write(&file, &model).unwrap();
    let sock = dir.join("k.sock");
    let tls = format!("--tls-psk={}", s(&keys));
    let mut k = nbdkit_tls(&dir, &sock, &file, &[&tls], "nbdkit.log");
    let origin_uri = format!(
        "nbds+unix://alice@/?socket={}&tls-psk-file={}",
        s(&sock),
        s(&keys)
    );

    // Writeback: misses come over TLS, dirty data goes back with flush.
    let srv = pmcache_over(&dir, &origin_uri, &[]);
    assert_same(
        &run_export_bytes(&dir, &srv.uri()),
        &model,
        "TLS origin read through pmcache",
    );
    let a = pattern(22, 3 * MIB);
    write_export(&srv.uri(), &a, 5 * MIB + 7);
    model[5 * MIB + 7..8 * MIB + 7].copy_from_slice(&a);
    let log = srv.log_text();
    srv.stop();
    pmcache_ok(
        &[
            "flush",
            "--cache",
            &s(&dir.join("cache.pmem")),
            "--origin",
            &origin_uri,
            "--assume-pmem",
        ],
        T,
    );
    assert_same(&std::fs::read(&file).unwrap(), &model, "origin after flush");

    // Writethrough, reopening the cache with the origin it recorded; the
    // origin restarts underneath and pmcache reconnects over TLS.
    let srv = launch(&ServerKind::pmcache_reopen(
        &dir.join("cache.pmem"),
        &["--mode", "writethrough"],
    ));
    // nbdkit waits for its TLS clients on SIGTERM: the origin dies instead.
    k.signal(libc::SIGKILL);
    let _ = k.wait_exit(T);
    k = nbdkit_tls(&dir, &sock, &file, &[&tls], "nbdkit2.log");
    let b = pattern(23, MIB);
    write_export(&srv.uri(), &b, 12 * MIB);
    model[12 * MIB..13 * MIB].copy_from_slice(&b);
    assert_same(
        &std::fs::read(&file).unwrap(),
        &model,
        "origin right after writethrough writes across an origin restart",
    );
    let log = log + &srv.log_text();
    srv.stop();
    k.signal(libc::SIGKILL);
    let _ = k.wait_exit(T);

    // No secret in the cache or the logs.
    let key = decode(&key_hex);
    let cache = std::fs::read(dir.join("cache.pmem")).unwrap();
    for (what, hay) in [("cache", &cache[..]), ("server log", log.as_bytes())] {
        assert!(
            !contains(hay, key_hex.as_bytes()),
            "the PSK (hex) is in the {what}"
        );
        assert!(!contains(hay, &key), "the PSK is in the {what}");
    }
    assert!(
        contains(&cache, b"tls-psk-file="),
        "the TLS settings are recorded"
    );
}

#[test]
fn nbdkit_x509_origin_with_a_client_certificate() {
    let dir = TempDir::new("t");
    let (ca, pki, cli) = x509_pki(&dir, "pmcache");
    let file = dir.join("origin.img");
    let mut model = pattern(24, 16 * MIB);
    std::fs::write(&file, &model).unwrap();
    let sock = dir.join("k.sock");
    let pki_arg = format!("--tls-certificates={}", s(&pki));
    let mut k = nbdkit_tls(
        &dir,
        &sock,
        &file,
        &[&pki_arg, "--tls-verify-peer"],
        "k.log",
    );
    // A client certificate of another CA is refused by nbdkit, and pmcache
    // says why and creates nothing.
    let evil_ca = dir.join("evil-ca");
    make_ca(&evil_ca, "another CA");
    let evil = dir.join("evil");
    make_cert(&evil_ca, &evil, "client", "pmcache");
    std::fs::copy(ca.join("ca-cert.pem"), evil.join("ca-cert.pem")).unwrap();
    let bad_uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        s(&sock),
        s(&evil)
    );
    serve_refused(&dir, &bad_uri);

    let origin_uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        s(&cli),
        s(&cli)
    );
    let origin_uri = origin_uri.replacen(&s(&cli), &s(&sock), 1);
    let srv = pmcache_over(&dir, &origin_uri, &["--mode", "writethrough"]);
    let a = pattern(25, 2 * MIB);
    write_export(&srv.uri(), &a, MIB);
    model[MIB..3 * MIB].copy_from_slice(&a);
    assert_same(
        &run_export_bytes(&dir, &srv.uri()),
        &model,
        "export over an X.509 origin",
    );
    assert_same(&std::fs::read(&file).unwrap(), &model, "origin file");
    srv.stop();
    k.terminate(T);
}

/// The whole export, read with nbdcopy.
fn run_export_bytes(dir: &TempDir, uri: &str) -> Vec<u8> {
    let out = dir.join("export.img");
    run_ok("nbdcopy", &[uri, &s(&out)], T);
    std::fs::read(&out).unwrap()
}

/// Write `data` at `offset` of the export (with our client: plain NBD).
fn write_export(uri: &str, data: &[u8], offset: usize) {
    let c = pmcache::nbd::Client::connect(uri).unwrap();
    c.write(data, offset as u64, false).unwrap();
    c.flush().unwrap();
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn decode(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// qemu-img convert in and out of the export with a qemu TLS object.
fn qemu_img_round_trip(dir: &TempDir, port: u16, object: &str, data: &[u8]) {
    let src = dir.join("q-src.img");
    std::fs::write(&src, data).unwrap();
    let target = format!("driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "--object",
            object,
            &s(&src),
            "--target-image-opts",
            &target,
        ],
        T,
    );
    let out = dir.join("q-out.img");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            object,
            "--image-opts",
            &target,
            "-O",
            "raw",
            &s(&out),
        ],
        T,
    );
    assert_same(&std::fs::read(&out).unwrap(), data, "qemu-img round trip");
}

#[test]
fn qemu_img_with_tls_creds_x509_and_tls_creds_psk() {
    let dir = TempDir::new("t");
    let (_, pki, cli) = x509_pki(&dir, "qemu");
    let srv = tls_server(
        &dir,
        Listen::Tcp,
        &[
            "--tls",
            "require",
            "--tls-certificates",
            &s(&pki),
            "--tls-verify-peer",
        ],
    );
    let Endpoint::Tcp(port) = srv.endpoint else {
        unreachable!()
    };
    let x509 = format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", s(&cli));
    qemu_img_round_trip(&dir, port, &x509, &pattern(26, 16 * MIB));
    srv.stop();

    // qemu reads the key from DIR/keys.psk.
    let dir = TempDir::new("t");
    let psk_dir = dir.join("psk");
    std::fs::create_dir_all(&psk_dir).unwrap();
    make_psk(&psk_dir.join("keys.psk"), "qemu");
    let srv = tls_server(
        &dir,
        Listen::Tcp,
        &[
            "--tls",
            "require",
            "--tls-psk",
            &s(&psk_dir.join("keys.psk")),
        ],
    );
    let Endpoint::Tcp(port) = srv.endpoint else {
        unreachable!()
    };
    let psk = format!(
        "tls-creds-psk,id=tls0,endpoint=client,dir={},username=qemu",
        s(&psk_dir)
    );
    qemu_img_round_trip(&dir, port, &psk, &pattern(27, 16 * MIB));
    srv.stop();
}

#[test]
fn psk_over_tls_1_2_with_a_gnutls_client() {
    // GnuTLS's system configuration can turn TLS 1.3 off for one process:
    // then the PSK must be used by a TLS 1.2 PSK cipher suite.
    let dir = TempDir::new("t");
    let keys = dir.join("keys.psk");
    make_psk(&keys, "alice");
    let cfg = dir.join("gnutls.cfg");
    std::fs::write(&cfg, "[overrides]\ndisabled-version = tls1.3\n").unwrap();
    let srv = tls_server(
        &dir,
        Listen::Unix,
        &["--tls", "require", "--tls-psk", &s(&keys)],
    );
    let uri = nbds_user(&srv, "alice", &format!("tls-psk-file={}", s(&keys)));
    let out = std::process::Command::new(require_tool("nbdinfo"))
        .args(["--json", &uri])
        .env("GNUTLS_SYSTEM_PRIORITY_FILE", &cfg)
        .env("GNUTLS_DEBUG_LEVEL", "4")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["TLS"], Value::Bool(true), "{info}");
    assert!(err.contains("disabling version tls1.3"), "{err}");
    let suite = err
        .lines()
        .find_map(|l| l.split("Selected cipher suite: ").nth(1))
        .unwrap_or_else(|| panic!("no cipher suite in the GnuTLS log: {err}"));
    assert!(suite.contains("_PSK_"), "{suite}");
    srv.stop();
}

#[test]
fn nbds_tcp_origin_checks_the_server_certificate_names_the_host() {
    let dir = TempDir::new("t");
    let ca = dir.join("ca");
    make_ca(&ca, "pmcache test CA");
    let pki = dir.join("pki");
    make_cert(&ca, &pki, "server", "localhost"); // names localhost and 127.0.0.1
    let cli = dir.join("cli");
    std::fs::create_dir_all(&cli).unwrap();
    std::fs::copy(ca.join("ca-cert.pem"), cli.join("ca-cert.pem")).unwrap();
    let file = dir.join("origin.img");
    let model = pattern(28, 4 * MIB);
    std::fs::write(&file, &model).unwrap();
    let port = free_port();
    let mut k = Proc::spawn(
        &require_tool("nbdkit"),
        &[
            "--foreground".into(),
            "--exit-with-parent".into(),
            "-i".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "--tls=require".into(),
            format!("--tls-certificates={}", s(&pki)),
            "file".into(),
            s(&file),
        ],
        dir.join("k.log"),
        &[],
    );
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            k.exited().is_none() && start.elapsed() < T,
            "{}",
            k.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let certs = format!("tls-certificates={}", s(&cli));
    for host in ["127.0.0.1", "localhost"] {
        let uri = format!("nbds://{host}:{port}/?{certs}");
        let c = pmcache::nbd::Client::connect(&uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
        let mut b = vec![0u8; MIB];
        c.read(&mut b, MIB as u64).unwrap();
        assert!(b[..] == model[MIB..2 * MIB], "{uri}");
    }
    // A name the certificate does not carry is refused...
    let wrong = format!("nbds://127.0.0.1:{port}/?{certs}&tls-hostname=nas.example");
    let e = pmcache::nbd::Client::connect(&wrong).unwrap_err();
    assert!(e.to_string().contains("certificate verify failed"), "{e}");
    // ...unless verification is turned off, as libnbd allows.
    let off = format!("{wrong}&tls-verify-peer=false");
    pmcache::nbd::Client::connect(&off).unwrap();
    k.signal(libc::SIGKILL);
    let _ = k.wait_exit(T);
}

/// An origin whose server certificate has expired is refused: `serve`
/// fails, says it is the origin's certificate, and creates no cache.
#[test]
fn an_expired_origin_certificate_is_refused() {
    let dir = TempDir::new("t");
    let (ca, pki, cli) = x509_pki(&dir, "pmcache");
    // Replace the server certificate with one that expired years ago.
    let t = template(
        &pki,
        "expired.info",
        "organization = pmcache test\ncn = localhost\ndns_name = localhost\n\
         activation_date = \"2015-01-01 00:00:00 UTC\"\n\
         expiration_date = \"2016-01-01 00:00:00 UTC\"\n\
         tls_www_server\nencryption_key\nsigning_key\n",
    );
    certtool(&[
        "--generate-certificate",
        "--load-ca-certificate",
        &s(&ca.join("ca-cert.pem")),
        "--load-ca-privkey",
        &s(&ca.join("ca-key.pem")),
        "--load-privkey",
        &s(&pki.join("server-key.pem")),
        "--template",
        &s(&t),
        "--outfile",
        &s(&pki.join("server-cert.pem")),
    ]);
    let file = dir.join("origin.img");
    std::fs::write(&file, vec![0u8; MIB]).unwrap();
    let sock = dir.join("k.sock");
    let pki_arg = format!("--tls-certificates={}", s(&pki));
    let _k = nbdkit_tls(&dir, &sock, &file, &[&pki_arg], "k.log");
    let uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        s(&sock),
        s(&cli)
    );
    let err = serve_refused(&dir, &uri);
    assert!(
        err.contains("certificate has expired"),
        "the error says the origin's certificate expired: {err}"
    );
}
