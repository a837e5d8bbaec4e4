//! The `pmcache` command, end to end: argument errors, format/check/dump/
//! stats/flush, damaged caches, and `serve` (defaults, signals, locking,
//! control socket, metrics). Every server is started by these tests, on
//! loopback, and stopped by PID with bounded waits.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pmcache::engine::{Engine, EngineConfig};
use pmcache::nbd::Client;
use pmcache::origin::FileOrigin;
use pmcache::pmem::{MapOptions, MappedRegion};

const MIB: u64 = 1 << 20;

fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).expect("read file")
}

fn flip_bit(p: &Path, offset: u64, bit: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 1 << bit;
    f.write_all_at(&b, offset).unwrap();
}

/// `pmcache check` a damaged cache: it must exit with status 1.
fn check_finds_damage(cache: &str) -> std::process::Output {
    let o = run(&["check", "--cache", cache]);
    assert_eq!(o.status.code(), Some(1), "check of {cache}: {}", stdout(&o));
    o
}

/// `pmcache serve --cache CACHE --origin ORIGIN EXTRA…` on a port it never
/// gets to: for a serve that is refused before it listens.
fn run_refused_serve(cache: &str, origin: &str, extra: &[&str]) -> std::process::Output {
    let args = ["serve", "--cache", cache, "--origin", origin];
    run(&[&args[..], extra, &["--listen", "127.0.0.1:1"]].concat())
}

fn connect(port: u16) -> Client {
    Client::connect(&format!("nbd://127.0.0.1:{port}")).expect("connect NBD")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    pmcache_testkit::pattern(seed.into(), len)
}

/// A cache in `d` with blocks written through a real server and a clean
/// shutdown. Returns (cache, origin).
fn cache_with_data(d: &TempDir) -> (PathBuf, PathBuf) {
    let (cache, origin) = formatted_cache(d, 64 * MIB, "16M");
    let port = free_port();
    let mut s = serve_cache(d, port, &[], "serve.log");
    let c = connect(port);
    c.write(&pattern(1, 64 * 1024), 0, false).unwrap();
    c.write(&pattern(2, 8192), 5 * MIB, true).unwrap();
    c.flush().unwrap();
    drop(c);
    s.terminate_ok();
    (cache, origin)
}

// ----- bad arguments --------------------------------------------------------

#[test]
fn bad_sizes_are_refused_and_create_nothing() {
    let d = TempDir::new("badsize");
    sparse(&d.join("o.img"), 8 * MIB);
    for bad in [
        "12Q",
        "0",
        "0M",
        "1.5G",
        "-4K",
        "abc",
        "",
        "99999999999999999999",
        "20000000T",
    ] {
        let o = run(&[
            "format",
            "--cache",
            &d.s("c.pmem"),
            &format!("--size={bad}"),
            "--origin",
            &d.s("o.img"),
        ]);
        fails_with(&o, "--size");
        assert_eq!(o.status.code(), Some(2), "bad size {bad:?}");
        assert!(!d.join("c.pmem").exists(), "size {bad:?} created the cache");
    }
    let o = run_in(Some(d.path()), &["serve", "--cache-size", "lots"]);
    fails_with(&o, "--cache-size");
    assert!(
        !d.join("pmcache-data").exists(),
        "a refused serve created pmcache-data"
    );
    let o = run_format(
        &d.s("c.pmem"),
        "16M",
        &d.s("o.img"),
        &["--block-size", "3000"],
    );
    fails_with(&o, "power of two");
    // Too small for the engine: refused before the file is created.
    let o = run_format(&d.s("c.pmem"), "64K", &d.s("o.img"), &[]);
    fails_with(&o, "are needed");
    assert!(!d.join("c.pmem").exists());
}

#[test]
fn bad_mode_and_addresses_are_refused() {
    let d = TempDir::new("badmode");
    let o = run_in(Some(d.path()), &["serve", "--mode", "fast"]);
    fails_with(&o, "unknown cache mode 'fast'");
    assert_eq!(o.status.code(), Some(2));
    for bad in ["not-an-address", "host:99999", ":80"] {
        let o = run_in(Some(d.path()), &["serve", "--listen", bad]);
        fails_with(&o, "--listen");
        assert_eq!(o.status.code(), Some(2), "--listen {bad}");
    }
    let o = run_in(Some(d.path()), &["serve", "--origin", "nbd://[bad"]);
    fails_with(&o, "unterminated");
    assert_eq!(o.status.code(), Some(2));
    // Missing arguments are named.
    let o = run_in(Some(d.path()), &["format", "--size", "8M"]);
    fails_with(&o, "--cache <PATH>, --origin <PATH|URI>");
    assert_eq!(o.status.code(), Some(2));
    let o = run_in(
        Some(d.path()),
        &[
            "serve",
            "--listen",
            "127.0.0.1:1",
            "--socket",
            "/tmp/x.sock",
        ],
    );
    fails_with(&o, "cannot be used with");
    for n in ["0", "65", "many"] {
        let o = run_in(Some(d.path()), &["serve", "--origin-connections", n]);
        fails_with(&o, "--origin-connections");
        assert_eq!(o.status.code(), Some(2));
    }
    let o = run_in(Some(d.path()), &["frobnicate"]);
    fails_with(&o, "frobnicate");
    assert!(
        std::fs::read_dir(d.path()).unwrap().next().is_none(),
        "a refused command left files behind"
    );
}

#[test]
fn help_has_examples() {
    let o = run(&["serve", "--help"]);
    ok(&o);
    let h = stdout(&o);
    assert!(h.contains("--cache-size"), "{h}");
    assert!(h.contains("nbdinfo nbd://127.0.0.1:10809"), "{h}");
    assert!(h.contains("--writeback-order <ORDER>"), "{h}");
    assert!(h.contains("[default: ordered]"), "{h}");
    let o = run(&["format", "--help"]);
    ok(&o);
    assert!(stdout(&o).contains("Examples:"));
}

#[test]
fn missing_cache_is_reported() {
    let d = TempDir::new("missing");
    sparse(&d.join("o.img"), 8 * MIB);
    let missing = d.s("nope.pmem");
    for args in [
        vec!["check", "--cache", &missing],
        vec!["dump", "--cache", &missing],
        vec!["stats", "--cache", &missing],
        vec!["flush", "--cache", &missing, "--origin", &d.s("o.img")],
    ] {
        let o = run(&args);
        fails_with(&o, "no such file");
    }
    // serve does not create an explicitly named cache unless told its size.
    let o = run_refused_serve(&missing, &d.s("o.img"), &[]);
    fails_with(&o, "--cache-size");
    assert!(!d.join("nope.pmem").exists());
    // A missing origin.
    let o = run_format(&d.s("c.pmem"), "8M", &d.s("none.img"), &[]);
    fails_with(&o, "none.img");
    assert!(!d.join("c.pmem").exists());
}

#[test]
fn wrong_origin_is_refused_and_nothing_changes() {
    let d = TempDir::new("wrongorigin");
    let (cache, _origin) = cache_with_data(&d);
    sparse(&d.join("other.img"), 64 * MIB);
    let before = read_file(&cache);
    let port = free_port();
    let o = run_serve_cache(&d, port, &["--origin", &d.s("other.img")]);
    fails_with(&o, "use --force");
    let (c, other) = (d.s("c.pmem"), d.s("other.img"));
    let with_other = |cmd: &str| run(&[cmd, "--cache", &c, "--origin", &other]);
    fails_with(&with_other("flush"), "use --force");
    let o = with_other("check");
    assert!(!o.status.success());
    assert_stdout_has(&o, "origin identity");
    assert!(
        before == read_file(&cache),
        "a refused command modified the cache"
    );
    assert!(
        !d.join("c.pmem.sock").exists(),
        "refused serve left its control socket"
    );
    // --force attaches it anyway, and from then on it is the cache's
    // origin: no --force needed for it, and the old one is refused.
    let mut s = serve_cache(&d, port, &["--origin", &other, "--force"], "force.log");
    s.terminate_ok();
    let o = with_other("check");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let mut s = serve_cache(&d, port, &["--origin", &other], "after.log");
    s.terminate_ok();
    fails_with(
        &run(&["flush", "--cache", &c, "--origin", &d.s("o.img")]),
        "use --force",
    );
}

#[test]
fn an_existing_cache_keeps_its_size_and_block_size_and_says_so() {
    let d = TempDir::new("keeps");
    let (cache, _) = formatted_cache(&d, 16 * MIB, "8M");
    let mut s = serve_cache(
        &d,
        free_port(),
        &["--cache-size", "12M", "--block-size", "8192"],
        "keeps.log",
    );
    s.terminate_ok();
    let log = s.log_text();
    for flag in ["--cache-size is ignored", "--block-size is ignored"] {
        assert!(log.contains(flag), "no warning '{flag}' in: {log}");
    }
    let sb = &dump_json(&cache)["superblock"];
    assert_eq!(
        (sb["region_len"].as_u64(), sb["block_size"].as_u64()),
        (Some(8 * MIB), Some(4096))
    );
}

#[test]
fn locked_cache_is_refused() {
    use std::os::unix::io::AsRawFd;
    let d = TempDir::new("locked");
    let (cache, _) = formatted_cache(&d, 16 * MIB, "8M");
    let before = read_file(&cache);
    // Hold the lock the way a server does.
    let f = std::fs::File::open(&cache).unwrap();
    // SAFETY: flock on our own descriptor.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0);
    let c = d.s("c.pmem");
    let o_ = d.s("o.img");
    let port = format!("127.0.0.1:{}", free_port());
    for args in [
        vec!["serve", "--cache", &c, "--origin", &o_, "--listen", &port],
        vec![
            "format", "--cache", &c, "--size", "8M", "--origin", &o_, "--force",
        ],
        vec!["flush", "--cache", &c, "--origin", &o_],
        vec!["check", "--cache", &c],
        vec!["dump", "--cache", &c],
    ] {
        let o = run(&args);
        fails_with(
            &o,
            &format!("cache {c} is in use by another pmcache process"),
        );
    }
    drop(f);
    assert!(before == read_file(&cache));
    check_ok(&cache);
}

#[test]
fn unreachable_nbd_origin_is_reported() {
    let d = TempDir::new("unreach");
    let port = free_port();
    let uri = format!("nbd://127.0.0.1:{port}/vol");
    let t0 = std::time::Instant::now();
    let o = run_format(&d.s("c.pmem"), "8M", &uri, &[]);
    fails_with(&o, &format!("127.0.0.1:{port}"));
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert!(
        !d.join("c.pmem").exists(),
        "failed format left a cache file"
    );
    let o = run_refused_serve(&d.s("c.pmem"), &uri, &["--cache-size", "8M"]);
    fails_with(&o, "127.0.0.1");
    assert!(!d.join("c.pmem").exists(), "failed serve left a cache file");
}

#[test]
fn format_refuses_existing_cache_and_nonempty_file() {
    let d = TempDir::new("refuse");
    let (cache, _) = formatted_cache(&d, 16 * MIB, "8M");
    let before = read_file(&cache);
    let o = run_format(&d.s("c.pmem"), "8M", &d.s("o.img"), &[]);
    fails_with(&o, "already holds a pmcache cache");
    assert!(before == read_file(&cache));

    let junk: Vec<u8> = (0..3 * MIB).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(d.join("junk.bin"), &junk).unwrap();
    let o = run_format(&d.s("junk.bin"), "8M", &d.s("o.img"), &[]);
    fails_with(&o, "not empty");
    assert!(
        junk == read_file(&d.join("junk.bin")),
        "refused format changed the file"
    );
    // serve refuses to overwrite it as well.
    let o = run_refused_serve(&d.s("junk.bin"), &d.s("o.img"), &[]);
    fails_with(&o, "not a pmcache cache");
    assert!(junk == read_file(&d.join("junk.bin")));

    // With --force both are overwritten and come out consistent.
    ok(&run_format(
        &d.s("junk.bin"),
        "8M",
        &d.s("o.img"),
        &["--force"],
    ));
    assert_eq!(
        std::fs::metadata(d.join("junk.bin")).unwrap().len(),
        8 * MIB
    );
    check_ok(&d.join("junk.bin"));
    ok(&run_format(
        &d.s("c.pmem"),
        "12M",
        &d.s("o.img"),
        &["--force"],
    ));
    assert_eq!(dump_json(&cache)["superblock"]["region_len"], 12 * MIB);
    // An empty (0-byte) file needs no --force.
    std::fs::File::create(d.join("empty.pmem")).unwrap();
    ok(&run_format(&d.s("empty.pmem"), "8M", &d.s("o.img"), &[]));
    // A cache its file system cannot hold is refused before it is made.
    let o = run_format(&d.s("huge.pmem"), "1000T", &d.s("o.img"), &[]);
    fails_with(&o, "not enough for a 1000 TiB cache");
    assert!(!d.join("huge.pmem").exists());
    // A file too small to map holds data all the same.
    std::fs::write(d.join("small"), b"hi\n").unwrap();
    fails_with(
        &run_format(&d.s("small"), "8M", &d.s("o.img"), &[]),
        "not empty",
    );
    ok(&run_format(
        &d.s("small"),
        "8M",
        &d.s("o.img"),
        &["--force"],
    ));
    check_ok(&d.join("small"));
}

#[test]
fn format_check_dump_stats_offline() {
    let d = TempDir::new("offline");
    sparse(&d.join("o.img"), 32 * MIB);
    let o = run_format(
        &d.s("c.pmem"),
        "16MiB",
        &d.s("o.img"),
        &["--block-size", "8K", "--assume-pmem"],
    );
    ok(&o);
    assert_stdout_has(&o, "formatted");
    assert_eq!(std::fs::metadata(d.join("c.pmem")).unwrap().len(), 16 * MIB);

    run_prints(
        &[
            "check",
            "--cache",
            &d.s("c.pmem"),
            "--origin",
            &d.s("o.img"),
        ],
        "result: consistent",
    );
    let v = run_json(&["check", "--cache", &d.s("c.pmem"), "--json", "--no-data"]);
    assert_eq!(v["consistent"], true);
    assert_eq!(
        (&v["written_epoch"], &v["retained"]),
        (&0.into(), &0.into())
    );

    let v = dump_json(&d.join("c.pmem"));
    let sb = &v["superblock"];
    assert_eq!(sb["block_size"], 8192);
    assert_eq!(sb["origin_size"], 32 * MIB);
    let canon = std::fs::canonicalize(d.join("o.img")).unwrap();
    assert_eq!(sb["origin"], format!("file:{}", canon.display()));
    assert_eq!(sb["clean_shutdown"], true);
    assert_eq!(sb["mode"], "writeback");
    assert_eq!(v["mappings"].as_array().unwrap().len(), 0);
    assert_eq!(sb["format_version"], 3);
    assert_eq!(v["written_epoch"], 0);
    run_prints(&["dump", "--cache", &d.s("c.pmem")], "clean shutdown yes");

    let v = run_json(&["stats", "--cache", &d.s("c.pmem"), "--json"]);
    assert_eq!(v["source"], "offline");
    assert_eq!(v["occupied"], 0);
    assert_eq!(v["dirty"], 0);
    assert!(v["slots"].as_u64().unwrap() > 1000);
    run_prints(&["stats", "--cache", &d.s("c.pmem")], "occupancy");
}

// ----- damaged caches ---------------------------------------------------------

#[test]
fn check_detects_bit_flip_in_slot_metadata() {
    let d = TempDir::new("flipslot");
    let (cache, _) = cache_with_data(&d);
    check_ok(&cache);
    let v = dump_json(&cache);
    let maps = v["mappings"].as_array().unwrap();
    assert!(
        maps.len() >= 18,
        "expected the written blocks to be cached: {v}"
    );
    let slot = maps[maps.len() / 2]["slot"].as_u64().unwrap();
    let meta = 12288 + slot * 64;
    assert_eq!(maps[maps.len() / 2]["meta_offset"].as_u64().unwrap(), meta);
    flip_bit(&cache, meta + 2, 3); // in the origin block number
    let before = read_file(&cache);
    let o = check_finds_damage(&d.s("c.pmem"));
    let out = stdout(&o);
    assert!(out.contains(&format!("slot {slot}")), "{out}");
    assert!(out.contains(&format!("offset {meta}")), "{out}");
    assert!(out.contains("NOT consistent"), "{out}");
    assert!(stderr(&o).contains(&format!("slot {slot}")));
    assert!(before == read_file(&cache), "check modified the cache");
    // The server refuses to serve it rather than serve wrong data.
    let o = run_serve_cache(&d, free_port(), &[]);
    fails_with(&o, &format!("slot {slot}"));
    assert!(
        before == read_file(&cache),
        "refused serve modified the cache"
    );
}

#[test]
fn check_detects_bit_flips_in_both_superblocks() {
    let d = TempDir::new("flipsb");
    let (cache, _) = cache_with_data(&d);
    flip_bit(&cache, 10, 0);
    // One copy damaged: still usable, but reported.
    let o = run(&["check", "--cache", &d.s("c.pmem")]);
    let out = stdout(&o);
    assert!(out.contains("superblock copy 0"), "{out}");
    flip_bit(&cache, 4096 + 10, 0);
    let o = check_finds_damage(&d.s("c.pmem"));
    let out = stdout(&o);
    assert!(out.contains("superblock copy 0 (offset 0)"), "{out}");
    assert!(out.contains("superblock copy 1 (offset 4096)"), "{out}");
    let o = run(&["dump", "--cache", &d.s("c.pmem")]);
    fails_with(&o, "superblock");
}

#[test]
fn check_detects_truncation_and_foreign_files() {
    let d = TempDir::new("trunc");
    let (cache, _) = cache_with_data(&d);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cache)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let o = check_finds_damage(&d.s("c.pmem"));
    assert_stdout_has(
        &o,
        &format!("{}-byte cache but the file is {} bytes", 16 * MIB, 8 * MIB),
    );

    let foreign: Vec<u8> = (0..MIB).map(|i| (i % 253) as u8 ^ 0x5a).collect();
    std::fs::write(d.join("foreign.bin"), &foreign).unwrap();
    let o = check_finds_damage(&d.s("foreign.bin"));
    assert_stdout_has(&o, "not a pmcache cache");
    assert!(foreign == read_file(&d.join("foreign.bin")));
    std::fs::File::create(d.join("empty.bin")).unwrap();
    let o = check_finds_damage(&d.s("empty.bin"));
    assert_stdout_has(&o, "empty");
}

/// The cache at `cache` opened in process over the file `origin`, with no
/// writeback thread, so the blocks a test writes stay dirty.
fn open_engine(cache: &Path, origin: &Path) -> Arc<Engine> {
    let region = Arc::new(MappedRegion::open(cache, &MapOptions::new().assume_pmem(true)).unwrap());
    let o = Arc::new(FileOrigin::open(origin).unwrap());
    let cfg = EngineConfig {
        background_writeback: false,
        ..EngineConfig::default()
    };
    Engine::open(region, o, cfg).unwrap()
}

/// A block written, FLUSHed by the client and written again: its first
/// version is retained for ordered writeback. check, dump and offline
/// stats say so; a damaged W word is found and named.
#[test]
fn retained_versions_and_w_in_check_dump_and_stats() {
    let d = TempDir::new("retained");
    let (cache, origin) = formatted_cache(&d, 32 * MIB, "16M");
    {
        let e = open_engine(&cache, &origin);
        e.write(0, &pattern(1, 4096), false).unwrap();
        e.flush().unwrap();
        e.write(0, &pattern(2, 4096), false).unwrap();
        e.write(4096, &pattern(3, 4096), false).unwrap();
        e.close().unwrap();
    }
    let c = cache.display().to_string();
    let v = run_json(&["check", "--cache", &c, "--json"]);
    assert_eq!(v["consistent"], true, "{v}");
    assert_eq!(
        (&v["retained"], &v["superseded"]),
        (&1.into(), &0.into()),
        "{v}"
    );
    assert_eq!(v["written_epoch"], 0);
    assert_eq!(v["warnings"].as_array().unwrap().len(), 0, "{v}");
    let o = run_prints(
        &["check", "--cache", &c],
        "1 retained for ordered writeback",
    );
    assert_stdout_has(
        &o,
        "written epoch  0 (every epoch up to it is on the origin)",
    );

    let v = dump_json(&cache);
    assert_eq!(
        (&v["written_epoch"], &v["retained"]),
        (&0.into(), &1.into())
    );
    let mut block0: Vec<(u64, u64, String)> = (v["mappings"].as_array().unwrap().iter())
        .filter(|m| m["block"] == 0)
        .map(|m| {
            let n = |k: &str| m[k].as_u64().unwrap();
            (
                n("seq"),
                n("epoch"),
                m["role"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    block0.sort();
    let roles: Vec<(u64, &str)> = block0.iter().map(|(_, e, r)| (*e, r.as_str())).collect();
    assert_eq!(roles, [(1, "retained"), (2, "current")]);
    let o = run_prints(&["dump", "--cache", &c], "written epoch    0");
    assert_stdout_has(&o, "1 retained, 0 superseded");
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.contains(" retained ") && l.ends_with("dirty")),
        "{}",
        stdout(&o)
    );

    let v = run_json(&["stats", "--cache", &c, "--json"]);
    assert_eq!(
        (&v["retained"], &v["written_epoch"]),
        (&1.into(), &0.into())
    );
    assert_eq!((&v["occupied"], &v["dirty"]), (&2.into(), &2.into()), "{v}");
    run_prints(
        &["stats", "--cache", &c],
        "retained       1 older version, kept until their epoch is on the origin",
    );

    // W's word is the last line of the watermark page.
    let w_off = 2 * 4096 + 63 * 64;
    flip_bit(&cache, w_off + 2, 5);
    let o = check_finds_damage(&c);
    assert_stdout_has(
        &o,
        &format!("error: written-back epoch word at offset {w_off} fails its checksum"),
    );
    fails_with(&run(&["dump", "--cache", &c]), &format!("offset {w_off}"));
}

#[test]
fn check_detects_damaged_block_data() {
    let d = TempDir::new("flipdata");
    let (cache, _) = cache_with_data(&d);
    let v = dump_json(&cache);
    let m = &v["mappings"].as_array().unwrap()[0];
    let data = m["data_offset"].as_u64().unwrap();
    flip_bit(&cache, data + 100, 6);
    let o = check_finds_damage(&d.s("c.pmem"));
    assert_stdout_has(&o, "data checksum mismatch");
    // --no-data skips exactly that verification.
    ok(&run(&["check", "--cache", &d.s("c.pmem"), "--no-data"]));
}

// ----- serve ------------------------------------------------------------------

#[test]
fn serve_defaults_in_a_temp_cwd() {
    let d = TempDir::new("defaults");
    let port = free_port();
    let mut s = Server::start(
        d.path(),
        &["--listen", &format!("127.0.0.1:{port}")],
        d.join("serve.log"),
    );
    s.wait_ready(Duration::from_secs(30));
    let cache = d.join("pmcache-data/cache.pmem");
    let origin = d.join("pmcache-data/origin.img");
    assert_eq!(std::fs::metadata(&cache).unwrap().len(), 256 * MIB);
    assert_eq!(std::fs::metadata(&origin).unwrap().len(), 1 << 30);
    let log = s.log_text();
    assert!(log.contains("pmem=msync"), "pmem mode not logged: {log}");
    let c = connect(port);
    assert_eq!(c.size(), 1 << 30);
    let data = pattern(9, 65536);
    c.write(&data, 3 * MIB, false).unwrap();
    let mut back = vec![0u8; 65536];
    c.read(&mut back, 3 * MIB).unwrap();
    assert!(back == data);
    drop(c);
    s.terminate_ok();
    assert!(
        !d.join("pmcache-data/cache.pmem.sock").exists(),
        "control socket left behind"
    );
    let v = dump_json(&cache);
    assert_eq!(v["superblock"]["clean_shutdown"], true);
    // It restarts warm on the same files and still has the data.
    let mut s = Server::start(
        d.path(),
        &["--listen", &format!("127.0.0.1:{port}")],
        d.join("serve2.log"),
    );
    s.wait_ready(Duration::from_secs(30));
    let c = connect(port);
    let mut back = vec![0u8; 65536];
    c.read(&mut back, 3 * MIB).unwrap();
    assert!(back == data);
    drop(c);
    s.terminate_ok();
}

#[test]
fn serve_with_no_arguments_listens_on_10809() {
    assert!(
        TcpStream::connect_timeout(
            &"127.0.0.1:10809".parse().unwrap(),
            Duration::from_millis(500)
        )
        .is_err(),
        "port 10809 is already in use by another program; this test needs it free"
    );
    let d = TempDir::new("noargs");
    let mut s = Server::start_port(d.path(), &[], d.join("serve.log"), Some(10809));
    s.wait_ready(Duration::from_secs(30));
    let c = connect(10809);
    assert_eq!(c.size(), 1 << 30);
    c.write(b"hello, pmcache", 0, true).unwrap();
    drop(c);
    assert!(d.join("pmcache-data/cache.pmem").exists());
    assert!(d.join("pmcache-data/origin.img").exists());
    s.signal(libc::SIGINT);
    let st = s
        .wait_exit(Duration::from_secs(20))
        .expect("SIGINT ends the server");
    assert_eq!(st.code(), Some(0), "log: {}", s.log_text());
    assert_eq!(
        dump_json(&d.join("pmcache-data/cache.pmem"))["superblock"]["clean_shutdown"],
        true
    );
}

#[test]
fn sigterm_drains_and_marks_clean_shutdown() {
    let d = TempDir::new("sigterm");
    let (cache, _) = formatted_cache(&d, 64 * MIB, "16M");
    let port = free_port();
    let mut s = serve_cache(&d, port, &[], "serve.log");
    // Clients writing while the signal arrives get either a reply or a closed connection.
    let c = Arc::new(connect(port));
    let writer = {
        let c = c.clone();
        std::thread::spawn(move || {
            let mut acked = 0u64;
            for i in 0..2000u64 {
                if c.write(&pattern(i as u8, 4096), (i % 512) * 4096, false)
                    .is_err()
                {
                    break;
                }
                acked += 1;
            }
            acked
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let st = s.terminate();
    let acked = writer.join().unwrap();
    assert_eq!(st.code(), Some(0), "log: {}", s.log_text());
    assert!(acked > 0);
    assert!(s.log_text().contains("SIGTERM"));
    let v = dump_json(&cache);
    assert_eq!(v["superblock"]["clean_shutdown"], true);
    check_ok(&cache);
}

#[test]
fn second_serve_on_the_same_cache_is_refused() {
    let d = TempDir::new("second");
    formatted_cache(&d, 64 * MIB, "16M");
    let port = free_port();
    let mut s = serve_cache(&d, port, &[], "serve.log");
    let port2 = free_port();
    let o = run_serve_cache(&d, port2, &["--control", &d.s("other.sock")]);
    fails_with(
        &o,
        &format!(
            "cache {} is in use by another pmcache process",
            d.s("c.pmem")
        ),
    );
    assert!(!d.join("other.sock").exists());
    // The first one is unaffected.
    let c = connect(port);
    c.write(&[7u8; 4096], 0, true).unwrap();
    drop(c);
    s.terminate_ok();
}

#[test]
fn stats_over_the_control_socket_shows_writes() {
    let d = TempDir::new("stats");
    formatted_cache(&d, 64 * MIB, "16M");
    let port = free_port();
    let mut s = serve_cache(&d, port, &["--mode", "writethrough"], "serve.log");
    let c = connect(port);
    for i in 0..10u64 {
        c.write(&pattern(i as u8, 8192), i * 8192, false).unwrap();
    }
    let mut buf = vec![0u8; 8192];
    c.read(&mut buf, 0).unwrap();
    // Found through the cache's lock, without naming the socket.
    let v = run_json(&["stats", "--cache", &d.s("c.pmem"), "--json"]);
    assert_eq!(v["source"], "server");
    assert_eq!(v["pid"], s.pid());
    assert_eq!(v["writes"], 10);
    assert_eq!(v["write_bytes"], 10 * 8192);
    assert!(v["occupied"].as_u64().unwrap() >= 20);
    assert!(v["read_hits"].as_u64().unwrap() >= 2);
    assert_eq!(v["mode"], "writethrough");
    assert!(
        v["pmem_mode"].as_str().unwrap().starts_with("assumed pmem"),
        "{v}"
    );
    assert_eq!(v["writeback_order"], "ordered", "the default");
    assert!(v["epoch"].as_u64().unwrap() >= 1, "{v}");
    for k in [
        "retained",
        "written_epoch",
        "epochs_pending",
        "oldest_pending_epoch_ms",
    ] {
        assert!(v[k].is_u64(), "stats lacks {k}: {v}");
    }
    // And by naming it; human output.
    let o = run(&["stats", "--control", &d.s("c.pmem.sock")]);
    ok(&o);
    let out = stdout(&o);
    for want in [
        "occupancy",
        "dirty",
        "read hits",
        "write misses",
        "evictions",
        "written back",
        "origin errors",
        "writethrough",
        "assumed pmem",
        "order          ordered",
        "on the origin up to",
        "sealed epochs not yet on the origin",
    ] {
        assert!(out.contains(want), "stats lacks {want:?}: {out}");
    }
    drop(c);
    s.terminate_ok();
    // A dead control socket is a clear error.
    let o = run(&["stats", "--control", &d.s("c.pmem.sock")]);
    fails_with(&o, "control socket");
}

#[test]
fn metrics_are_served_in_prometheus_format() {
    let d = TempDir::new("metrics");
    formatted_cache(&d, 64 * MIB, "16M");
    let (port, mport) = (free_port(), free_port());
    let metrics = format!("127.0.0.1:{mport}");
    let mut s = serve_cache(
        &d,
        port,
        &["--metrics", &metrics, "--writeback-order", "none"],
        "serve.log",
    );
    let c = connect(port);
    c.write(&[1u8; 4096 * 3], 0, false).unwrap();
    c.flush().unwrap();
    drop(c);
    // Clients that connect and say nothing hold up only themselves: a
    // scrape and `stats` behind them are answered at once, not after each
    // idle one's 5 s timeout (the scrape's own timeout is 10 s).
    let idle: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(("127.0.0.1", mport)).unwrap())
        .collect();
    let idle_ctl: Vec<std::os::unix::net::UnixStream> = (0..2)
        .map(|_| std::os::unix::net::UnixStream::connect(d.join("c.pmem.sock")).unwrap())
        .collect();
    ok(&run(&["stats", "--cache", &d.s("c.pmem")]));
    let get = |path: &str| -> String {
        let mut t = TcpStream::connect(("127.0.0.1", mport)).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(t, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut r = String::new();
        t.read_to_string(&mut r).unwrap();
        r
    };
    let r = get("/metrics");
    assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
    assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
    assert!(
        r.contains("# HELP pmcache_writes write requests acknowledged"),
        "{r}"
    );
    assert!(r.contains("# TYPE pmcache_writes counter"), "{r}");
    assert!(r.contains("\npmcache_writes 1\n"), "{r}");
    assert!(r.contains("\npmcache_write_bytes 12288\n"), "{r}");
    assert!(r.contains("# TYPE pmcache_dirty gauge"), "{r}");
    assert!(r.contains("pmcache_info{mode=\"writeback\""), "{r}");
    assert!(r.contains(",writeback_order=\"none\","), "{r}");
    assert!(r.contains("# TYPE pmcache_epochs_pending gauge"), "{r}");
    // Unordered writeback keeps no epochs: none is reported pending.
    assert!(r.contains("\npmcache_epochs_pending 0\n"), "{r}");
    assert!(r.contains("\npmcache_retained 0\n"), "{r}");
    // Every sample line is NAME[{labels}] VALUE.
    let body = r.split("\r\n\r\n").nth(1).unwrap();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(name.starts_with("pmcache_"), "{line}");
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    assert!(get("/nope").starts_with("HTTP/1.1 404"));
    drop((idle, idle_ctl));
    s.terminate_ok();
}

#[test]
fn serve_on_a_unix_socket() {
    let d = TempDir::new("unix");
    formatted_cache(&d, 64 * MIB, "16M");
    let sock = d.s("nbd.sock");
    let mut s = Server::start_port(
        d.path(),
        &[
            "--cache",
            &d.s("c.pmem"),
            "--assume-pmem",
            "--socket",
            &sock,
            "--read-only",
            "--export",
            "vol",
        ],
        d.join("serve.log"),
        None,
    );
    let t0 = std::time::Instant::now();
    let c = loop {
        if let Ok(c) = Client::connect(&format!("nbd+unix:///vol?socket={sock}")) {
            break c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no unix socket: {}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(c.size(), 64 * MIB);
    assert!(
        c.write(&[1u8; 512], 0, false).is_err(),
        "read-only export accepted a write"
    );
    drop(c);
    s.terminate_ok();
    assert!(!d.join("nbd.sock").exists(), "NBD socket left behind");
}

// ----- flush ------------------------------------------------------------------

#[test]
fn flush_writes_everything_back_and_leaves_the_cache_clean() {
    let d = TempDir::new("flush");
    let (cache, origin) = formatted_cache(&d, 32 * MIB, "16M");
    // Make dirty blocks with the engine directly and no writeback thread.
    let mut expect = vec![0u8; 32 * MIB as usize];
    {
        let e = open_engine(&cache, &origin);
        for i in 0..300u64 {
            let off = (i * 7919 % 8000) * 4096;
            let data = pattern(i as u8, 4096 * ((i % 3) + 1) as usize);
            e.write(off, &data, false).unwrap();
            expect[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        assert!(e.dirty_blocks() > 100);
        e.close().unwrap();
    }
    let before = dump_json(&cache);
    let dirty_before = before["dirty"].as_u64().unwrap();
    assert!(dirty_before > 100, "{dirty_before}");
    assert!(read_file(&origin) != expect, "origin already held the data");

    let o = flush_ok(&cache, &origin);
    assert_stdout_has(&o, "0 dirty blocks remain");
    assert!(
        stderr(&o).is_empty(),
        "progress bar drawn without a TTY: {}",
        stderr(&o)
    );
    let after = dump_json(&cache);
    assert_eq!(after["dirty"], 0);
    assert_eq!(after["superblock"]["clean_shutdown"], true);
    assert!(
        read_file(&origin) == expect,
        "origin does not hold the written data"
    );
    check_ok(&cache);
    let v = run_json(&["stats", "--cache", &d.s("c.pmem"), "--json"]);
    assert_eq!(v["dirty"], 0);
    assert!(
        v["clean"].as_u64().unwrap() > 0,
        "the cache should stay warm: {v}"
    );
}

/// `losetup ARGS`, asserting success; its output, trimmed.
fn losetup(args: &[&str]) -> String {
    let o = std::process::Command::new("losetup").args(args).output();
    let o = o.expect("losetup (package mount) is installed");
    assert!(o.status.success(), "losetup {args:?}: {o:?}");
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

/// A block device the kernel keeps read-only opens for writing, and then
/// every write fails (a mapping of it fails with a bare EINVAL): refused as
/// an origin and as a cache at once, with what to do.
#[test]
fn a_read_only_block_device_is_refused() {
    let d = TempDir::new("rodev");
    sparse(&d.join("o.img"), 16 * MIB);
    let dev = losetup(&["-r", "-f", "--show", &d.s("o.img")]);
    let as_origin = run_format(&d.s("c.pmem"), "8M", &dev, &[]);
    let as_cache = run(&["format", "--cache", &dev, "--origin", &d.s("o.img")]);
    losetup(&["-d", &dev]);
    fails_with(&as_origin, "read-only block device");
    assert!(!d.join("c.pmem").exists());
    fails_with(&as_cache, "is a read-only block device");
}

/// Block devices are claimed as mkfs claims them (O_EXCL): one that another
/// program holds so (or that is mounted) is refused as a cache, even with
/// --force, and as an origin.
#[test]
fn a_block_device_held_elsewhere_is_refused() {
    use std::os::unix::fs::OpenOptionsExt;
    let d = TempDir::new("heldev");
    sparse(&d.join("o.img"), 16 * MIB);
    sparse(&d.join("c.img"), 16 * MIB);
    let (origin, cache) = (
        losetup(&["-f", "--show", &d.s("o.img")]),
        losetup(&["-f", "--show", &d.s("c.img")]),
    );
    let hold = |dev: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(dev)
            .unwrap()
    };
    let held = hold(&cache);
    let as_cache = run(&[
        "format",
        "--cache",
        &cache,
        "--origin",
        &d.s("o.img"),
        "--force",
    ]);
    drop(held);
    let held = hold(&origin);
    let as_origin = run_format(&d.s("c.pmem"), "8M", &origin, &[]);
    drop(held);
    // Free again, both work.
    let free = run(&["format", "--cache", &cache, "--origin", &origin, "--force"]);
    losetup(&["-d", &origin]);
    losetup(&["-d", &cache]);
    fails_with(&as_cache, "is in use: mounted, or held by another program");
    fails_with(&as_origin, "is in use: mounted, or held by another");
    ok(&free);
}
