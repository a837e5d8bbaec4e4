//! Interoperability of the real `pmcache serve` with real NBD software.
//!
//! Clients: qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh (libnbd), fio's nbd
//! engine, and the kernel (ext4 on a loop device over nbdfuse). Origins: a
//! file, nbdkit's memory plugin and qemu-nbd. Each test starts and stops
//! every server it uses (by PID, bounded waits), on Unix sockets in private
//! /dev/shm directories or on a free loopback port; cache files live in
//! /dev/shm and are opened with --assume-pmem. A missing tool fails the test
//! and names the Debian package to install.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

#[path = "common/nbd.rs"]
mod nbd;

use std::path::{Path, PathBuf};
use std::time::Duration;

use nbd::*;
use pmcache::nbd::Client;
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Read `len` bytes at `offset` of the export at `uri` with our client.
fn read_export(uri: &str, offset: u64, len: usize) -> Vec<u8> {
    let c = Client::connect(uri).unwrap_or_else(|e| panic!("connect {uri}: {e}"));
    let mut b = vec![0u8; len];
    c.read(&mut b, offset)
        .unwrap_or_else(|e| panic!("read {len} at {offset} from {uri}: {e}"));
    b
}

/// `pmcache check` on a stopped server's cache must pass.
fn check_cache(cache: &Path) {
    pmcache_ok(&["check", "--cache", &s(cache)], T);
}

/// `pmcache flush` of a stopped server's cache to `origin`; afterwards the
/// cache must have no dirty block left.
/// `pmcache flush` to a file origin, then the file must hold exactly `expect`.
fn flush_and_compare_origin(cache: &Path, origin: &Path, expect: &[u8]) {
    flush_cache(cache, &s(origin));
    assert_same(
        &std::fs::read(origin).unwrap(),
        expect,
        "origin file after pmcache flush",
    );
}

fn flush_cache(cache: &Path, origin: &str) {
    pmcache_ok(
        &[
            "flush",
            "--cache",
            &s(cache),
            "--origin",
            origin,
            "--assume-pmem",
        ],
        T,
    );
    let dump = pmcache_ok(&["dump", "--cache", &s(cache), "--json"], T);
    let v: Value = serde_json::from_str(&dump).expect("dump --json is JSON");
    let dirty = v["mappings"]
        .as_array()
        .expect("dump --json has mappings")
        .iter()
        .filter(|m| m["dirty"].as_bool() == Some(true))
        .count();
    assert_eq!(dirty, 0, "dirty mappings left after flush: {dump}");
}

/// qemu-io commands against `uri`, asserting that every command (and every
/// pattern check) succeeded.
fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut args: Vec<&str> = vec!["-f", "raw", uri];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let out = run_tool("qemu-io", &args, T);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success()
            && !text.contains("Pattern verification failed")
            && !text.to_lowercase().contains("error"),
        "qemu-io {cmds:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// A sparse origin file of `len` bytes and where its cache goes.
fn sparse_origin(dir: &TempDir, len: u64) -> (PathBuf, PathBuf) {
    let origin = dir.join("origin.img");
    std::fs::File::create(&origin)
        .unwrap()
        .set_len(len)
        .unwrap();
    (origin, dir.join("cache.pmem"))
}

/// An origin file full of pattern `seed` (so bytes no client wrote are
/// recognisable), where its cache goes, and the model of its content.
fn data_origin(dir: &TempDir, seed: u64, len: usize) -> (PathBuf, PathBuf, Vec<u8>) {
    let origin = dir.join("origin.img");
    let model = pattern(seed, len);
    std::fs::write(&origin, &model).unwrap();
    (origin, dir.join("cache.pmem"), model)
}

/// A qemu-io pattern write of `len` bytes of `byte` at `off`, and the model.
fn pattern_write(model: &mut [u8], cmds: &mut Vec<String>, byte: u8, off: usize, len: usize) {
    cmds.push(format!("write -P {byte:#x} {off} {len}"));
    model[off..off + len].fill(byte);
}

// ---------------------------------------------------------------------------
// qemu-io
// ---------------------------------------------------------------------------

#[test]
fn qemu_io_unaligned_spanning_writes_survive_restart_and_reach_the_origin_file() {
    let dir = TempDir::new("t");
    // The origin holds data: bytes no client wrote must read as the origin's.
    let (origin, cache, mut model) = data_origin(&dir, 21, 16 * MIB);

    let srv = launch(&ServerKind::pmcache(&cache, "32M", &s(&origin), &[]));
    let uri = srv.uri();
    // Unaligned, spanning many 4 KiB blocks, partial first and last blocks,
    // a write inside one block, across a block boundary, and at the end.
    let regions: [(u8, usize, usize); 7] = [
        (0xab, 1000, 70000),
        (0xcd, 5 * MIB + 4095, 2),
        (0x11, MIB - 1, 3),
        (0x5e, 3 * MIB + 17, MIB - 100),
        (0x77, 8 * MIB + 100, 200),
        (0x3c, 10 * MIB - 3, 2 * MIB + 5),
        (0xe1, 16 * MIB - 5000, 5000),
    ];
    let mut cmds = Vec::new();
    for (b, off, len) in regions {
        pattern_write(&mut model, &mut cmds, b, off, len);
    }
    // Overwrite part of the first region, asynchronously, then zero a
    // range inside another (WRITE_ZEROES).
    cmds.push("aio_write -P 0x99 2000 3000".into());
    cmds.push("aio_flush".into());
    model[2000..5000].fill(0x99);
    cmds.push(format!("write -z {} 12345", 3 * MIB + 5000));
    model[3 * MIB + 5000..3 * MIB + 5000 + 12345].fill(0);
    cmds.push("flush".into());
    let reads = |cmds: &mut Vec<String>| {
        cmds.push("read -P 0xab 1000 1000".into());
        cmds.push("read -P 0x99 2000 3000".into());
        cmds.push("read -P 0xab 5000 66000".into());
        cmds.push(format!("read -P 0 {} 12345", 3 * MIB + 5000));
        for (b, off, len) in regions.iter().skip(1) {
            if *b != 0x5e {
                cmds.push(format!("read -P {b:#x} {off} {len}"));
            }
        }
    };
    reads(&mut cmds);
    let out = qemu_io(&uri, &cmds);
    assert_eq!(out.matches("read ").count(), 9, "{out}");
    assert_same(
        &read_export(&uri, 0, 16 * MIB),
        &model,
        "export after qemu-io writes",
    );

    // Durability: a clean restart on the same cache (origin as recorded).
    srv.stop();
    check_cache(&cache);
    let srv = launch(&ServerKind::pmcache_reopen(&cache, &[]));
    let mut cmds = Vec::new();
    reads(&mut cmds);
    qemu_io(&srv.uri(), &cmds);
    assert_same(
        &read_export(&srv.uri(), 0, 16 * MIB),
        &model,
        "export after restart",
    );
    srv.stop();

    // Writeback: after `pmcache flush` the origin file holds every byte.
    flush_and_compare_origin(&cache, &origin, &model);
    check_cache(&cache);
}

// ---------------------------------------------------------------------------
// qemu-img
// ---------------------------------------------------------------------------

#[test]
fn qemu_img_convert_in_and_out_through_a_smaller_cache() {
    let dir = TempDir::new("t");
    let (origin, cache) = sparse_origin(&dir, 32 * MIB as u64);
    let src = dir.join("src.img");
    let data = random_image(&src, 32 * MIB, 7);

    // The cache (16 MiB) is half the image: writes must wait for writeback
    // and evict, reads must miss to the origin.
    let srv = launch(&ServerKind::pmcache(&cache, "16M", &s(&origin), &[]));
    let uri = srv.uri();
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", &s(&src), &uri],
        T,
    );
    let out = dir.join("out.img");
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, &s(&out)],
        T,
    );
    assert_same(&std::fs::read(&out).unwrap(), &data, "qemu-img round trip");
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &s(&src), &uri],
        T,
    );
    let info = run_ok("qemu-img", &["info", "--output=json", &uri], T);
    let v: Value = serde_json::from_str(&info).expect("qemu-img info JSON");
    assert_eq!(v["virtual-size"].as_u64(), Some(32 * MIB as u64), "{info}");
    srv.stop();

    flush_and_compare_origin(&cache, &origin, &data);
}

// ---------------------------------------------------------------------------
// nbdinfo
// ---------------------------------------------------------------------------

fn nbdinfo_export(uri: &str) -> (Value, String) {
    let json = run_ok("nbdinfo", &["--json", uri], T);
    let v: Value = serde_json::from_str(&json).expect("nbdinfo --json is JSON");
    let e = v["exports"][0].clone();
    assert!(e.is_object(), "no export in {json}");
    (e, json)
}

#[test]
fn nbdinfo_reports_origin_size_flags_block_sizes_and_read_only() {
    let dir = TempDir::new("t");
    let origin = dir.join("origin.img");
    let cache = dir.join("cache.pmem");
    // Not a multiple of the cache block size: the export still has exactly
    // the origin's size.
    let size = 40 * MIB as u64 + 1536;
    std::fs::File::create(&origin)
        .unwrap()
        .set_len(size)
        .unwrap();
    let srv = launch(&ServerKind::pmcache(
        &cache,
        "16M",
        &s(&origin),
        &["--block-size", "8192", "--export", "vol1"],
    ));
    let uri = srv.uri_export("vol1");
    let (e, json) = nbdinfo_export(&uri);
    assert_eq!(e["export-size"].as_u64(), Some(size), "{json}");
    assert_eq!(e["export-name"].as_str(), Some("vol1"), "{json}");
    assert_eq!(e["is_read_only"].as_bool(), Some(false), "{json}");
    for k in [
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ] {
        assert_eq!(e[k].as_bool(), Some(true), "{k} in {json}");
    }
    // What pmcache advertises: byte-granular requests, the cache block as
    // the preferred size, 1 MiB (the atomic request limit) as the maximum.
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{json}");
    assert_eq!(e["block_size_preferred"].as_u64(), Some(8192), "{json}");
    assert_eq!(e["block_size_maximum"].as_u64(), Some(1 << 20), "{json}");
    // The export list names it, and the default export is the same volume.
    let list = run_ok("nbdinfo", &["--list", "--json", &srv.uri()], T);
    let lv: Value = serde_json::from_str(&list).unwrap();
    assert!(
        lv["exports"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["export-name"] == "vol1")),
        "{list}"
    );
    assert_eq!(
        run_ok("nbdinfo", &["--size", &srv.uri()], T).trim(),
        size.to_string()
    );
    // Some data for the read-only run, including the partial last block.
    let c = Client::connect(&uri).unwrap();
    c.write(&[0x42; 5000], 4000, false).unwrap();
    c.write(&[0x43; 1000], size - 1000, false).unwrap();
    // base:allocation: blocks the cache holds as zeroes say so (nbdcopy
    // and qemu-img skip them); everything else is data.
    c.write_zeroes(16 * 8192, 4 * 8192, false).unwrap();
    drop(c);
    let map = run_ok("nbdinfo", &["--map", "--json", &uri], T);
    let m: Value = serde_json::from_str(&map).expect("nbdinfo --map --json is JSON");
    let extents: Vec<(u64, u64, u64)> = m
        .as_array()
        .expect("an array of extents")
        .iter()
        .map(|x| {
            let n = |k: &str| x[k].as_u64().unwrap();
            (n("offset"), n("length"), n("type"))
        })
        .collect();
    assert_eq!(
        extents,
        [
            (0, 16 * 8192, 0),
            (16 * 8192, 4 * 8192, 2),
            (20 * 8192, size - 20 * 8192, 0)
        ],
        "{map}"
    );
    srv.stop();

    let srv = launch(&ServerKind::pmcache_reopen(
        &cache,
        &["--read-only", "--export", "vol1"],
    ));
    let uri = srv.uri_export("vol1");
    let (e, json) = nbdinfo_export(&uri);
    assert_eq!(e["is_read_only"].as_bool(), Some(true), "{json}");
    assert_eq!(e["export-size"].as_u64(), Some(size), "{json}");
    let ro = run_tool("nbdinfo", &["--is", "read-only", &uri], T);
    assert_eq!(ro.status.code(), Some(0), "nbdinfo --is read-only");
    // The server itself refuses writes (libnbd's own check switched off).
    let script = format!(
        r#"
h.set_strict_mode(0)
assert h.is_read_only()
assert h.pread(5000, 4000) == b"\x42" * 5000
assert h.pread(1000, {last}) == b"\x43" * 1000
for f in (lambda: h.pwrite(b"x" * 4096, 0), lambda: h.zero(4096, 8192), lambda: h.trim(4096, 0)):
    try:
        f()
        raise SystemExit("a write to a read-only export succeeded")
    except nbd.Error as e:
        pass
assert h.pread(5000, 4000) == b"\x42" * 5000
print("RO-OK")
"#,
        last = size - 1000
    );
    let out = run_ok("nbdsh", &["-u", &uri, "-c", &script], T);
    assert!(out.contains("RO-OK"), "{out}");
    srv.stop();
}

// ---------------------------------------------------------------------------
// nbdcopy
// ---------------------------------------------------------------------------

#[test]
fn nbdcopy_round_trip_with_four_connections_over_tcp() {
    let dir = TempDir::new("t");
    let (origin, cache) = sparse_origin(&dir, 32 * MIB as u64);
    let src = dir.join("src.img");
    let data = random_image(&src, 32 * MIB, 11);
    let srv = launch(&ServerKind::Pmcache {
        cache: cache.clone(),
        cache_size: Some("48M".into()),
        origin: Some(s(&origin)),
        listen: Listen::Tcp,
        extra: vec![],
    });
    let uri = srv.uri();
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            "--flush",
            &s(&src),
            &uri,
        ],
        T,
    );
    let out = dir.join("out.img");
    run_ok(
        "nbdcopy",
        &["--connections=4", "--requests=16", &uri, &s(&out)],
        T,
    );
    assert_same(&std::fs::read(&out).unwrap(), &data, "nbdcopy round trip");
    srv.stop();
    flush_and_compare_origin(&cache, &origin, &data);
}

// ---------------------------------------------------------------------------
// nbdsh (libnbd from Python)
// ---------------------------------------------------------------------------

#[test]
fn nbdsh_flush_fua_trim_and_zeroes_reach_the_origin() {
    let dir = TempDir::new("t");
    // A non-zero origin: zeroes read back can only come from the zeroing.
    let (origin, cache, mut model) = data_origin(&dir, 5, 16 * MIB);
    let srv = launch(&ServerKind::pmcache(&cache, "32M", &s(&origin), &[]));
    let uri = srv.uri();
    let m = MIB;
    let script = format!(
        r#"
M = {m}
def rd(hh, n, off):
    # Reads of at most the advertised maximum request (1 MiB).
    return b"".join(hh.pread(min(M, n - i), off + i) for i in range(0, n, M))
assert h.get_size() == 16 * M
assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_multi_conn()
assert not h.is_read_only()
buf = b"\xab" * 65536
h.pwrite(buf, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 4096) == buf
h.pwrite(b"\xcd" * 100, 70000)
h.flush()
# zeroes: aligned; unaligned over many blocks with FUA; more than 1 MiB with NO_HOLE
h.zero(8192, 8192)
h.zero(300001, 1000000, nbd.CMD_FLAG_FUA)
h.zero(2 * M + 7, M, nbd.CMD_FLAG_NO_HOLE)
# trims: unaligned and long; with FUA
h.trim(5 * M + 1000, M + 12345)
h.trim(512 * 1024, 10 * M, nbd.CMD_FLAG_FUA)
h.flush()
assert rd(h, 8192, 8192) == bytes(8192)
assert rd(h, 300001, 1000000) == bytes(300001)
assert rd(h, 2 * M + 7, M) == bytes(2 * M + 7)
assert rd(h, 5 * M + 1000, M + 12345) == bytes(5 * M + 1000)
assert rd(h, 512 * 1024, 10 * M) == bytes(512 * 1024)
assert h.pread(4096, 4096) == b"\xab" * 4096
assert h.pread(100, 70000) == b"\xcd" * 100
# a second connection sees the same (multi-conn)
h2 = nbd.NBD()
h2.connect_uri({uri:?})
assert rd(h2, 5 * M + 1000, M + 12345) == bytes(5 * M + 1000)
assert h2.pread(4096, 4096) == b"\xab" * 4096
h2.shutdown()
print("NBDSH-OK")
"#
    );
    let out = run_ok("nbdsh", &["-u", &uri, "-c", &script], T);
    assert!(out.contains("NBDSH-OK"), "{out}");
    model[4096..4096 + 65536].fill(0xab);
    model[70000..70100].fill(0xcd);
    model[8192..16384].fill(0);
    model[1_000_000..1_300_001].fill(0);
    model[m..3 * m + 7].fill(0);
    model[m + 12345..6 * m + 13345].fill(0);
    model[10 * m..10 * m + 512 * 1024].fill(0);
    assert_same(&read_export(&uri, 0, 16 * m), &model, "export after nbdsh");
    srv.stop();
    // Zeroes and trims are written back: the origin shows zeroes there, so
    // nothing older can reappear once the cache lets go of those blocks.
    flush_and_compare_origin(&cache, &origin, &model);
}

// ---------------------------------------------------------------------------
// fio
// ---------------------------------------------------------------------------

fn fio_json(args: &[&str]) -> Value {
    let out = run_ok("fio", args, T);
    let at = out
        .find('{')
        .unwrap_or_else(|| panic!("no JSON from fio: {out}"));
    serde_json::from_str(&out[at..]).unwrap_or_else(|e| panic!("fio JSON ({e}): {out}"))
}

#[test]
fn fio_randwrite_verify_then_verify_only_after_restart() {
    let engines = run_tool("fio", &["--enghelp=nbd"], T);
    assert!(
        engines.status.success() && String::from_utf8_lossy(&engines.stdout).contains("uri"),
        "fio was built without the nbd engine (apt-get install -y fio)"
    );
    let dir = TempDir::new("t");
    let (origin, cache) = sparse_origin(&dir, 64 * MIB as u64);
    let srv = launch(&ServerKind::pmcache(&cache, "48M", &s(&origin), &[]));
    let job = |uri: &str, extra: &[&str]| {
        let uri_arg = format!("--uri={uri}");
        let mut a = vec![
            "--name=pmverify",
            "--ioengine=nbd",
            uri_arg.as_str(),
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--offset=8M",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--randrepeat=1",
            "--verify_state_save=0",
            "--output-format=json",
        ];
        a.extend_from_slice(extra);
        fio_json(&a)
    };
    // randwrite, then fio reads every block back and checks its checksum.
    let v = job(&srv.uri(), &["--do_verify=1"]);
    let j = &v["jobs"][0];
    assert_eq!(j["error"].as_i64(), Some(0), "{v}");
    assert_eq!(
        j["write"]["io_bytes"].as_u64(),
        Some(32 * MIB as u64),
        "{v}"
    );
    assert_eq!(
        j["read"]["io_bytes"].as_u64(),
        Some(32 * MIB as u64),
        "verify pass: {v}"
    );
    srv.stop();
    check_cache(&cache);

    // The same blocks, verified (read only) by a new fio after a restart.
    let srv = launch(&ServerKind::pmcache_reopen(&cache, &[]));
    let v = job(&srv.uri(), &["--verify_only"]);
    let j = &v["jobs"][0];
    assert_eq!(j["error"].as_i64(), Some(0), "{v}");
    assert_eq!(
        j["read"]["io_bytes"].as_u64(),
        Some(32 * MIB as u64),
        "verify after restart: {v}"
    );
    // And a mixed job with odd sizes (bsrange), verified as it goes.
    let uri_arg = format!("--uri={}", srv.uri());
    let v = fio_json(&[
        "--name=pmmixed",
        "--ioengine=nbd",
        &uri_arg,
        "--rw=randrw",
        "--bsrange=512-128k",
        "--size=16M",
        "--offset=40M",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]);
    assert_eq!(v["jobs"][0]["error"].as_i64(), Some(0), "{v}");
    srv.stop();
}

// ---------------------------------------------------------------------------
// ext4 on the export: nbdfuse + loop device + the kernel's ext4
// ---------------------------------------------------------------------------

/// `sha256sum` lines for `files`, as printed (hash and absolute path).
fn sha256sums(files: &[PathBuf]) -> String {
    let args: Vec<String> = files.iter().map(|f| s(f)).collect();
    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    run_ok("sha256sum", &args, T)
}

#[test]
fn ext4_on_the_export_survives_a_restart() {
    require_tool("mkfs.ext4");
    require_tool("fsck.ext4");
    let dir = TempDir::new("t");
    let (origin, cache) = sparse_origin(&dir, 128 * MIB as u64);
    let mnt = dir.join("mnt");
    let srv = launch(&ServerKind::pmcache(&cache, "64M", &s(&origin), &[]));

    // mkfs (which also discards the whole device: a 128 MiB TRIM), mount,
    // write files, record their checksums.
    let mut fs = FsStack::attach(dir.path(), "fuse1", &srv.uri());
    run_ok("mkfs.ext4", &["-q", fs.dev()], T);
    fs.mount(&mnt);
    let contents: Vec<(&str, Vec<u8>)> = vec![
        ("small.bin", pattern(61, 1000)),
        ("odd.bin", pattern(62, 300 * 1024 + 7)),
        ("big.bin", pattern(63, 6 * MIB + 4095)),
        ("sub/dir/notes.txt", b"pmcache ext4 interop\n".repeat(1000)),
    ];
    let files: Vec<PathBuf> = contents.iter().map(|(n, _)| mnt.join(n)).collect();
    for ((_, data), path) in contents.iter().zip(&files) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    let sums = sha256sums(&files);
    assert_eq!(sums.lines().count(), files.len(), "{sums}");
    fs.umount();
    run_ok("fsck.ext4", &["-fn", fs.dev()], T);
    fs.detach();
    drop(fs);
    srv.stop();
    check_cache(&cache);

    // Restart on the same cache, fsck and mount again, same checksums.
    let srv = launch(&ServerKind::pmcache_reopen(&cache, &[]));
    let mut fs = FsStack::attach(dir.path(), "fuse2", &srv.uri());
    run_ok("fsck.ext4", &["-fn", fs.dev()], T);
    fs.mount(&mnt);
    assert_eq!(sha256sums(&files), sums, "checksums after restart");
    for ((name, data), path) in contents.iter().zip(&files) {
        assert_same(&std::fs::read(path).unwrap(), data, name);
    }
    fs.detach();
    drop(fs);
    srv.stop();

    // After writeback the origin file itself is the same, clean filesystem.
    flush_cache(&cache, &s(&origin));
    run_ok("fsck.ext4", &["-fn", &s(&origin)], T);
    let list = run_ok("debugfs", &["-R", "ls -l /sub/dir", &s(&origin)], T);
    assert!(list.contains("notes.txt"), "{list}");
    let out = dir.join("big.out");
    run_ok(
        "debugfs",
        &["-R", &format!("dump /big.bin {}", s(&out)), &s(&origin)],
        T,
    );
    assert_same(
        &std::fs::read(&out).unwrap(),
        &contents[2].1,
        "big.bin in the origin",
    );
}

// ---------------------------------------------------------------------------
// NBD origins: nbdkit and qemu-nbd
// ---------------------------------------------------------------------------

#[test]
fn nbdkit_memory_origin_writeback_flush_and_writethrough() {
    let k = launch(&ServerKind::nbdkit(&["memory", "64M"]));
    let origin_uri = k.uri();
    let mut model = vec![0u8; 64 * MIB];
    {
        let o = Client::connect(&origin_uri).unwrap();
        let a = pattern(31, 6 * MIB);
        let b = pattern(32, 3 * MIB);
        o.write(&a, 0, false).unwrap();
        o.write(&b, 40 * MIB as u64 + 5, false).unwrap();
        o.flush().unwrap();
        model[..6 * MIB].copy_from_slice(&a);
        model[40 * MIB + 5..43 * MIB + 5].copy_from_slice(&b);
    }
    let dir = TempDir::new("t");
    let cache = dir.join("cache.pmem");
    // A cache a quarter of the origin's size.
    let srv = launch(&ServerKind::pmcache(&cache, "16M", &origin_uri, &[]));
    let uri = srv.uri();
    assert_same(
        &read_export(&uri, 0, 64 * MIB),
        &model,
        "origin data read through pmcache",
    );
    let mut cmds = Vec::new();
    pattern_write(&mut model, &mut cmds, 0x3c, 12345, 2_000_000);
    pattern_write(&mut model, &mut cmds, 0x4d, 40 * MIB + 1, 10);
    cmds.push(format!("write -z {} {}", 50 * MIB - 3, MIB + 3));
    model[50 * MIB - 3..51 * MIB].fill(0);
    cmds.push("read -P 0x3c 12345 2000000".into());
    qemu_io(&uri, &cmds);
    {
        let c = Client::connect(&uri).unwrap();
        let d = pattern(33, 5 * MIB);
        c.write(&d, 20 * MIB as u64 + 777, true).unwrap();
        model[20 * MIB + 777..25 * MIB + 777].copy_from_slice(&d);
    }
    assert_same(
        &read_export(&uri, 0, 64 * MIB),
        &model,
        "export after writes",
    );
    srv.stop();
    check_cache(&cache);
    flush_cache(&cache, &origin_uri);
    assert_same(
        &read_export(&origin_uri, 0, 64 * MIB),
        &model,
        "nbdkit memory after pmcache flush",
    );

    // Writethrough: an acknowledged write is in the origin at once.
    let srv = launch(&ServerKind::pmcache_reopen(
        &cache,
        &["--mode", "writethrough"],
    ));
    let uri = srv.uri();
    let d = pattern(34, 256 * 1024 + 3);
    Client::connect(&uri)
        .unwrap()
        .write(&d, 30 * MIB as u64 + 1, false)
        .unwrap();
    assert_same(
        &read_export(&origin_uri, 30 * MIB as u64 + 1, d.len()),
        &d,
        "nbdkit memory right after a writethrough write",
    );
    qemu_io(&uri, &[format!("write -P 0x99 {} 4096", 33 * MIB)]);
    assert!(read_export(&origin_uri, 33 * MIB as u64, 4096)
        .iter()
        .all(|b| *b == 0x99));
    srv.stop();
    k.stop();
}

#[test]
fn qemu_nbd_file_origin_gets_the_data_after_flush() {
    let dir = TempDir::new("t");
    let file = dir.join("backing.img");
    let mut model = pattern(41, 32 * MIB);
    std::fs::write(&file, &model).unwrap();
    let q = launch(&ServerKind::qemu_nbd(&file));
    let origin_uri = q.uri();
    let cache = dir.join("cache.pmem");
    let srv = launch(&ServerKind::pmcache(&cache, "16M", &origin_uri, &[]));
    let uri = srv.uri();
    let mut cmds = Vec::new();
    pattern_write(&mut model, &mut cmds, 0x61, 100, 3 * MIB);
    pattern_write(&mut model, &mut cmds, 0x62, 31 * MIB, MIB);
    cmds.push(format!("write -z {} 700000", 10 * MIB + 5));
    model[10 * MIB + 5..10 * MIB + 700_005].fill(0);
    cmds.push("flush".into());
    qemu_io(&uri, &cmds);
    {
        let c = Client::connect(&uri).unwrap();
        let d = pattern(42, 7 * MIB);
        c.write(&d, 15 * MIB as u64 + 3, true).unwrap();
        c.trim(24 * MIB as u64, MIB as u64, false).unwrap();
        model[15 * MIB + 3..22 * MIB + 3].copy_from_slice(&d);
        model[24 * MIB..25 * MIB].fill(0);
    }
    assert_same(
        &read_export(&uri, 0, 32 * MIB),
        &model,
        "export after writes",
    );
    // Stop pmcache (writeback may or may not have finished), write back
    // explicitly through qemu-nbd, then stop qemu-nbd and read its file.
    srv.stop();
    check_cache(&cache);
    flush_cache(&cache, &origin_uri);
    q.stop();
    assert_same(
        &std::fs::read(&file).unwrap(),
        &model,
        "qemu-nbd's file after pmcache flush",
    );
}
