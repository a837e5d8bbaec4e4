//! Interoperability with real NBD implementations.
//!
//! Real clients (nbdinfo, qemu-io, qemu-img, nbdcopy, nbdsh, fio) against
//! the server under test, started by `common::launch(server_under_test())`
//! (swap that one function to test another server), and our client against
//! real servers (nbdkit, qemu-nbd). A missing tool fails the test with the
//! package to install.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{launch, pattern, run_ok, run_tool, server_under_test, ServerKind, TempDir};
use pmcache_nbd::proto::*;
use pmcache_nbd::Client;

const MIB: usize = 1 << 20;
const T: Duration = Duration::from_secs(120);

/// The value text of `"key": value` in nbdinfo's JSON (no JSON crate
/// needed for these flat fields).
fn json_field(json: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":");
    let at = json.find(&pat)? + pat.len();
    let rest = json[at..].trim_start();
    let end = rest.find([',', '\n', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim().trim_matches('"').to_string())
}

/// Each `(key, value)` is a field of `json` with that value.
fn assert_json_fields(json: &str, want: &[(&str, &str)]) {
    for &(k, v) in want {
        assert_eq!(json_field(json, k).as_deref(), Some(v), "{k} in {json}");
    }
}

fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at byte {i}: {} vs {}", a[i], b[i]);
    }
}

/// A test image: patterned data with zero gaps, `size` bytes.
fn make_image(dir: &TempDir, name: &str, size: usize, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let mut data = pattern(seed, size);
    // Leave some all-zero regions so sparse paths (zero detection, block
    // status, WRITE_ZEROES) are exercised too.
    for z in (0..size).step_by(3 * MIB) {
        let end = (z + MIB).min(size);
        data[z..end].fill(0);
    }
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

/// A round trip through the export with a copying `tool`: a new test image
/// of `size` bytes goes in (`tool INTO… IMAGE URI`), comes back out to a
/// file (`tool OUT_OF… URI FILE`), and the file must be the image. Returns
/// the directory, the image's path and its data.
fn copy_in_and_out(
    tool: &str,
    into: &[&str],
    out_of: &[&str],
    uri: &str,
    size: usize,
    seed: u64,
) -> (TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = TempDir::new("t");
    let (src, data) = make_image(&dir, "src.img", size, seed);
    run_ok(tool, &[into, &[src.to_str().unwrap(), uri]].concat(), T);
    let out = dir.join("out.img");
    run_ok(tool, &[out_of, &[uri, out.to_str().unwrap()]].concat(), T);
    assert_same(
        &std::fs::read(&out).unwrap(),
        &data,
        &format!("{tool} round trip"),
    );
    (dir, src, data)
}

/// nbdkit in the foreground on the test's socket, with `args` after those.
fn nbdkit(args: &[&str]) -> ServerKind {
    let fixed = ["--foreground", "--exit-with-parent", "--unix", "{socket}"];
    ServerKind::Command {
        program: "nbdkit".into(),
        args: fixed.iter().chain(args).map(|a| a.to_string()).collect(),
    }
}

#[test]
fn nbdinfo_reports_size_flags_and_block_sizes() {
    let srv = launch(&server_under_test("64M"));
    let uri = srv.uri();
    let json = run_ok("nbdinfo", &["--json", &uri], T);
    assert_json_fields(
        &json,
        &[
            ("export-size", "67108864"),
            ("protocol", "newstyle-fixed"),
            ("is_read_only", "false"),
            ("can_flush", "true"),
            ("can_fua", "true"),
            ("can_trim", "true"),
            ("can_zero", "true"),
            ("can_fast_zero", "true"),
            ("can_cache", "true"),
            ("can_multi_conn", "true"),
            ("structured", "true"),
        ],
    );
    let [min, pref, max] = [
        "block_size_minimum",
        "block_size_preferred",
        "block_size_maximum",
    ]
    .map(|k| -> u64 { json_field(&json, k).unwrap().parse().unwrap() });
    assert!(min.is_power_of_two() && pref >= min, "{json}");
    assert!(
        max >= MIB as u64,
        "maximum request must be at least 1 MiB: {json}"
    );
    // The plain forms agree.
    assert_eq!(run_ok("nbdinfo", &["--size", &uri], T).trim(), "67108864");
    let can = run_tool("nbdinfo", &["--can", "fua", &uri], T);
    assert!(can.status.success(), "nbdinfo --can fua");
    let ro = run_tool("nbdinfo", &["--is", "read-only", &uri], T);
    assert_eq!(
        ro.status.code(),
        Some(2),
        "--is read-only must say false (exit 2)"
    );
}

#[test]
fn nbdinfo_lists_exports_and_maps_allocation() {
    // Mem-server specific: named export, description, base:allocation.
    let srv = launch(&ServerKind::MemServer {
        size: "8M".into(),
        extra: vec![
            "--export".into(),
            "disk0".into(),
            "--description".into(),
            "ram disk".into(),
        ],
    });
    let base = srv.uri();
    let list = run_ok("nbdinfo", &["--list", "--json", &base], T);
    assert_json_fields(
        &list,
        &[("export-name", "disk0"), ("description", "ram disk")],
    );
    let uri = format!("nbd+unix:///disk0?socket={}", srv.socket.display());
    let c = Client::connect(&uri).unwrap();
    c.write(&pattern(1, 8192), 65536, false).unwrap();
    let map = run_ok("nbdinfo", &["--map", &uri], T);
    // Lines: offset length type description.
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{map}");
    assert_eq!(rows[0][..3], ["0", "65536", "3"], "{map}");
    assert_eq!(rows[1][..3], ["65536", "8192", "0"], "{map}");
    assert_eq!(rows[2][..3], ["73728", "8314880", "3"], "{map}");
}

#[test]
fn qemu_io_unaligned_and_spanning_patterns() {
    let srv = launch(&server_under_test("16M"));
    let uri = srv.uri();
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 1000 5000",
            "-c",
            "write -P 0xcd 65000 140001",
            "-c",
            "aio_write -P 0x11 1048575 3",
            "-c",
            "aio_flush",
            "-c",
            "write -z 70000 1000",
            "-c",
            "read -P 0xab 1000 5000",
            "-c",
            "read -P 0xcd 65000 5000",
            "-c",
            "read -P 0 70000 1000",
            "-c",
            "read -P 0xcd 71000 134001",
            "-c",
            "read -P 0x11 1048575 3",
            "-c",
            "read -P 0 0 1000",
            "-c",
            "flush",
        ],
        T,
    );
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("error"),
        "{out}"
    );
    assert_eq!(out.matches("read ").count(), 6, "{out}");
    // Check with our client as well.
    let c = Client::connect(&uri).unwrap();
    let mut b = vec![0u8; 210_000];
    c.read(&mut b, 0).unwrap();
    assert!(b[..1000].iter().all(|x| *x == 0));
    assert!(b[1000..6000].iter().all(|x| *x == 0xab));
    assert!(b[6000..65000].iter().all(|x| *x == 0));
    assert!(b[65000..70000].iter().all(|x| *x == 0xcd));
    assert!(b[70000..71000].iter().all(|x| *x == 0));
    assert!(b[71000..205_001].iter().all(|x| *x == 0xcd));
    let mut t = [0u8; 5];
    c.read(&mut t, 1048574).unwrap();
    assert_eq!(t, [0, 0x11, 0x11, 0x11, 0]);
}

#[test]
fn qemu_img_convert_in_and_out() {
    let srv = launch(&server_under_test("16M"));
    let uri = srv.uri();
    let (_dir, src, _) = copy_in_and_out(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw"],
        &["convert", "-f", "raw", "-O", "raw"],
        &uri,
        16 * MIB,
        7,
    );
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
        T,
    );
    let info = run_ok("qemu-img", &["info", "--output=json", &uri], T);
    assert_json_fields(&info, &[("virtual-size", "16777216")]);
}

#[test]
fn nbdcopy_round_trip_with_several_connections() {
    let srv = launch(&server_under_test("32M"));
    let uri = srv.uri();
    let (_dir, _, data) = copy_in_and_out(
        "nbdcopy",
        &["--connections=4", "--requests=16", "--flush"],
        &["--connections=4", "--requests=16"],
        &uri,
        32 * MIB,
        11,
    );
    // And through our client.
    let c = Client::connect(&uri).unwrap();
    let mut b = vec![0u8; 32 * MIB];
    c.read(&mut b, 0).unwrap();
    assert_same(&b, &data, "read back by our client");
}

#[test]
fn nbdsh_flush_fua_trim_zeroes_and_errors() {
    let srv = launch(&server_under_test("16M"));
    let uri = srv.uri();
    let script = format!(
        r#"
import errno
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri({uri:?})
assert h.get_size() == 16 * 1024 * 1024
assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
assert h.can_fast_zero() and h.can_cache() and h.can_multi_conn()
assert not h.is_read_only()
buf = b"\xab" * 65536
h.pwrite(buf, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 4096) == buf
h.flush()
h.zero(8192, 8192)
assert h.pread(8192, 8192) == bytes(8192)
h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
h.zero(4096, 16384, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 16384) == bytes(4096)
h.trim(65536, 1048576, nbd.CMD_FLAG_FUA)
h.cache(65536, 0)
assert h.pread(4096, 24576) == b"\xab" * 4096
if h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
    seen = []
    def cb(metacontext, offset, entries, err):
        seen.append((metacontext, offset, list(entries)))
        return 0
    h.block_status(65536, 0, cb)
    assert seen and seen[0][0] == nbd.CONTEXT_BASE_ALLOCATION, seen
    assert sum(seen[0][2][0::2]) <= 65536 and seen[0][2][0] > 0, seen
# Server-side checks, with libnbd's own checks off.
h.set_strict_mode(0)
for fn, want in [(lambda: h.pread(100, h.get_size() - 50), errno.EINVAL),
                 (lambda: h.pwrite(b"x" * 100, h.get_size() - 50), errno.ENOSPC)]:
    try:
        fn()
        raise SystemExit("out-of-range request succeeded")
    except nbd.Error as e:
        # libnbd versions differ: errno as a number or as its name.
        assert e.errno in (want, errno.errorcode[want]), (e.errno, want, e.string)
assert h.pread(4, 4096) == b"\xab" * 4
h.shutdown()
print("NBDSH-OK")
"#
    );
    let out = run_ok("nbdsh", &["-c", &script], T);
    assert!(out.contains("NBDSH-OK"), "{out}");
    let c = Client::connect(&uri).unwrap();
    let mut b = vec![0u8; 65536];
    c.read(&mut b, 4096).unwrap();
    assert!(b[..4096].iter().all(|x| *x == 0xab));
    assert!(b[4096..16384].iter().all(|x| *x == 0), "zeroed ranges");
    assert!(b[16384..].iter().all(|x| *x == 0xab));
}

#[test]
fn fio_nbd_engine_with_verify() {
    let engines = run_tool("fio", &["--enghelp=nbd"], T);
    assert!(
        engines.status.success() && String::from_utf8_lossy(&engines.stdout).contains("uri"),
        "fio was built without the nbd engine"
    );
    let srv = launch(&server_under_test("64M"));
    let uri = srv.uri();
    for (rw, bs) in [
        ("randwrite", "--bs=4k"),
        ("write", "--bs=64k"),
        ("randrw", "--bsrange=512-128k"),
    ] {
        let out = run_ok(
            "fio",
            &[
                "--name=nbdverify",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                &format!("--rw={rw}"),
                bs,
                "--size=32M",
                "--iodepth=32",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--randrepeat=1",
                "--verify_state_save=0",
            ],
            T,
        );
        assert!(!out.contains("verify: bad"), "{rw}: {out}");
        assert!(out.contains("err= 0"), "{rw}: {out}");
    }
}

/// Exercise our client against a real server: patterns, zeroes, trims,
/// flushes, many threads.
fn exercise_client(uri: &str) {
    let c = Arc::new(Client::connect(uri).unwrap());
    let size = c.size() as usize;
    assert!(size >= 16 * MIB);
    let min = c.block_sizes().minimum as usize;
    let data = pattern(5, 3 * MIB);
    c.write(&data, (MIB / min * min) as u64, true).unwrap();
    let mut b = vec![0u8; data.len()];
    c.read(&mut b, (MIB / min * min) as u64).unwrap();
    assert_same(&b, &data, "read back");
    // Unaligned read (bounced when the server has a minimum block size).
    let mut u = vec![0u8; 1001];
    c.read(&mut u, MIB as u64 + 7).unwrap();
    assert_same(&u, &data[7..1008], "unaligned read");
    c.write_zeroes(MIB as u64, 64 * 1024, false).unwrap();
    c.read(&mut b[..64 * 1024], MIB as u64).unwrap();
    assert!(b[..64 * 1024].iter().all(|x| *x == 0));
    c.trim(8 * MIB as u64, MIB as u64, false).unwrap();
    c.flush().unwrap();
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..20u64 {
                    let d = pattern(t * 100 + i, 128 * 1024);
                    let off = 10 * MIB as u64 + t * MIB as u64;
                    c.write(&d, off, false).unwrap();
                    let mut r = vec![0u8; d.len()];
                    c.read(&mut r, off).unwrap();
                    assert!(r == d, "thread {t} iteration {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn our_client_against_nbdkit_memory() {
    let srv = launch(&nbdkit(&["memory", "32M"]));
    exercise_client(&srv.uri());
}

#[test]
fn our_client_honours_nbdkit_block_size_policy() {
    // nbdkit fails every misaligned or oversized request here, so this
    // passes only if the client aligns and splits correctly.
    let srv = launch(&nbdkit(&[
        "--filter=blocksize-policy",
        "memory",
        "32M",
        "blocksize-minimum=512",
        "blocksize-preferred=4096",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
    ]));
    let c = Client::connect(&srv.uri()).unwrap();
    let bs = c.block_sizes();
    assert_eq!((bs.minimum, bs.maximum), (512, 65536));
    drop(c);
    exercise_client(&srv.uri());
    let c = Client::connect(&srv.uri()).unwrap();
    let e = c.write(&[1, 2, 3], 1, false).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
}

#[test]
fn our_client_against_qemu_nbd() {
    let dir = TempDir::new("t");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 32 * MIB]).unwrap();
    let srv = launch(&ServerKind::Command {
        program: "qemu-nbd".into(),
        args: vec![
            "--persistent".into(),
            "--shared=8".into(),
            "--format=raw".into(),
            "--socket={socket}".into(),
            img.to_str().unwrap().into(),
        ],
    });
    exercise_client(&srv.uri());
    let c = Client::connect(&srv.uri()).unwrap();
    assert_ne!(c.flags() & FLAG_SEND_FLUSH, 0);
    c.write(b"qemu-nbd", 12345, true).unwrap();
    c.flush().unwrap();
    drop(c);
    drop(srv);
    // The data reached the file behind qemu-nbd.
    let file = std::fs::read(&img).unwrap();
    assert_eq!(&file[12345..12353], b"qemu-nbd");
    assert_same(
        &file[MIB + 64 * 1024..4 * MIB],
        &pattern(5, 3 * MIB)[64 * 1024..],
        "file",
    );
}
