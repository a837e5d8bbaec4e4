//! Reads that only pass through the cache (a bypassed sequential stream,
//! passthrough mode) are spliced from the origin's socket to the client's
//! without entering user memory. The bytes must be exactly the origin's,
//! whatever the mix: requests that also hit the cache, holes in the origin's
//! replies, origin errors that are retried.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

#[path = "common/nbd.rs"]
mod nbd;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use nbd::*;
use pmcache_nbd::Client;

const MIB: usize = 1 << 20;
const LEN: usize = 32 * MIB;
const T: Duration = Duration::from_secs(60);

/// Read the whole export with one client, `req` bytes per request, in order.
fn read_all(uri: &str, req: usize) -> Vec<u8> {
    let c = Client::connect(uri).unwrap_or_else(|e| panic!("connect {uri}: {e}"));
    let mut v = vec![0u8; LEN];
    for (i, chunk) in v.chunks_mut(req).enumerate() {
        c.read(chunk, (i * req) as u64)
            .unwrap_or_else(|e| panic!("read at {}: {e}", i * req));
    }
    v
}

/// [`read_all`] with `conns` clients at once, each taking every
/// `conns`-th request in order: one stream, several requests in flight.
fn read_parallel(uri: &str, req: usize, conns: usize) -> Vec<u8> {
    let mut v = vec![0u8; LEN];
    let mut parts: Vec<Vec<(usize, &mut [u8])>> = (0..conns).map(|_| Vec::new()).collect();
    for (i, chunk) in v.chunks_mut(req).enumerate() {
        parts[i % conns].push((i * req, chunk));
    }
    std::thread::scope(|s| {
        for part in parts {
            s.spawn(move || {
                let c = Client::connect(uri).unwrap_or_else(|e| panic!("connect {uri}: {e}"));
                for (at, chunk) in part {
                    c.read(chunk, at as u64)
                        .unwrap_or_else(|e| panic!("read at {at}: {e}"));
                }
            });
        }
    });
    v
}

/// Read scattered 4 KiB blocks (a random workload: promoted, not bypassed).
fn warm(uri: &str, seed: u64) {
    let c = Client::connect(uri).unwrap();
    let mut b = vec![0u8; 4096];
    for n in 0..12 {
        let block = round_seed(seed, 1, n) % (LEN as u64 / 4096);
        c.read(&mut b, block * 4096).unwrap();
    }
}

fn nbdkit_file(dir: &TempDir, file: &Path, filters: &[&str]) -> Proc {
    let mut args: Vec<String> = filters.iter().map(|f| format!("--filter={f}")).collect();
    args.extend(["file".into(), format!("file={}", file.display())]);
    if !filters.is_empty() {
        args.push("error-pread-rate=10%".into());
    }
    nbdkit_at(&dir.join("origin.sock"), &args, dir.join("nbdkit.log"), T)
}

fn pmcache_over(dir: &TempDir, extra: &[&str]) -> ServerGuard {
    let origin = unix_uri(&dir.join("origin.sock"));
    launch(&ServerKind::pmcache(
        &dir.join("cache.pmem"),
        "8M",
        &origin,
        extra,
    ))
}

/// A stream that first warms some blocks, then reads everything in order:
/// requests with hits are served as usual, the others are relayed, and
/// every byte is the origin's, read one request at a time or several at
/// once. With 10% of origin reads failing, the relay retries and the bytes
/// are still exact.
#[test]
fn a_bypassed_stream_is_relayed_exactly_around_hits_and_errors() {
    let seed = test_seed("relay");
    for (round, filters) in [&[][..], &["error"][..]].into_iter().enumerate() {
        let dir = TempDir::new("relay");
        let file = dir.join("origin.img");
        let data = random_image(&file, LEN, round_seed(seed, 2, round as u64));
        let _origin = nbdkit_file(&dir, &file, filters);
        let srv = pmcache_over(&dir, &[]);
        warm(&srv.uri(), round_seed(seed, 3, round as u64));
        let got = read_all(&srv.uri(), MIB);
        assert_same(&got, &data, &format!("relayed stream, filters {filters:?}"));
        let st = stats(&dir.join("cache.pmem"), T);
        let relayed = counter(&st, "relayed_bytes");
        assert!(
            relayed >= (LEN / 2) as u64,
            "only {relayed} bytes relayed: {st}"
        );
        assert!(
            relayed < LEN as u64,
            "requests with hits were relayed: {st}"
        );
        if !filters.is_empty() {
            assert!(
                counter(&st, "origin_errors") > 0,
                "no origin error seen: {st}"
            );
        }
        // Again with requests in flight together. The stream is not cached,
        // so it relays again, but for the blocks cached before each pass
        // reached the cutoff (4 MiB each) and the requests with a warmed
        // block (12 at most): at least 8 of the 32 MiB.
        let got = read_parallel(&srv.uri(), MIB, 4);
        assert_same(
            &got,
            &data,
            &format!("parallel stream, filters {filters:?}"),
        );
        let st = stats(&dir.join("cache.pmem"), T);
        let again = counter(&st, "relayed_bytes") - relayed;
        assert!(
            again >= (LEN / 4) as u64,
            "only {again} bytes relayed the second time: {st}"
        );
        srv.stop();
    }
}

/// Passthrough relays every read that finds nothing dirty, sequential or
/// not; qemu-nbd answers holes of a sparse origin with hole chunks, which
/// the relay turns into zeroes in place.
#[test]
fn passthrough_reads_of_a_sparse_qemu_nbd_origin_are_relayed_exactly() {
    let dir = TempDir::new("relay-sparse");
    let file = dir.join("origin.img");
    let f = std::fs::File::create(&file).unwrap();
    f.set_len(LEN as u64).unwrap();
    let mut data = vec![0u8; LEN];
    let seed = test_seed("relay-sparse");
    for k in 0..40u64 {
        // Data islands of 64 KiB .. 320 KiB between holes.
        let at = (round_seed(seed, 4, k) % (LEN as u64 / 65536 - 5)) as usize * 65536;
        let n = 65536 * (1 + (k % 5) as usize);
        let bytes = pattern(round_seed(seed, 5, k), n);
        f.write_all_at(&bytes, at as u64).unwrap();
        data[at..at + n].copy_from_slice(&bytes);
    }
    drop(f);
    let origin = launch(&ServerKind::qemu_nbd(&file));
    let cache = dir.join("cache.pmem");
    let srv = launch(&ServerKind::pmcache(
        &cache,
        "8M",
        &origin.uri(),
        &["--mode", "passthrough"],
    ));
    let got = read_all(&srv.uri(), 512 * 1024);
    assert_same(&got, &data, "passthrough over a sparse origin");
    let st = stats(&cache, T);
    assert_eq!(counter(&st, "relayed_bytes"), LEN as u64, "{st}");
    srv.stop();
}

/// A sequential write stream past the cutoff goes to the origin by splice,
/// in writeback mode (with FUA) and in writearound mode; with 10% of origin
/// writes failing, the retries and the fall-back into the cache keep every
/// byte, and after `pmcache flush` the origin file holds the stream.
#[test]
fn a_bypassed_write_stream_is_relayed_and_loses_nothing() {
    let seed = test_seed("relay-write");
    for (round, (mode, filters)) in [
        ("writeback", &[][..]),
        ("writearound", &[][..]),
        ("writeback", &["error"][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let what = format!("{mode}, filters {filters:?}");
        let dir = TempDir::new("relay-write");
        let file = dir.join("origin.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(LEN as u64)
            .unwrap();
        let mut args: Vec<String> = filters.iter().map(|f| format!("--filter={f}")).collect();
        args.extend(["file".into(), format!("file={}", file.display())]);
        if !filters.is_empty() {
            args.push("error-pwrite-rate=10%".into());
        }
        let origin = nbdkit_at(&dir.join("origin.sock"), &args, dir.join("nbdkit.log"), T);
        let srv = pmcache_over(&dir, &["--mode", mode]);
        let data = pattern(round_seed(seed, 6, round as u64), LEN);
        let c = Client::connect(&srv.uri()).unwrap();
        for (i, chunk) in data.chunks(MIB).enumerate() {
            c.write(chunk, (i * MIB) as u64, false)
                .unwrap_or_else(|e| panic!("{what}: write at {}: {e}", i * MIB));
        }
        c.flush().unwrap();
        drop(c);
        let st = stats(&dir.join("cache.pmem"), T);
        if mode == "writeback" {
            assert!(
                counter(&st, "bypass_writes") > 0,
                "{what}: nothing bypassed: {st}"
            );
        }
        let relayed = counter(&st, "relayed_bytes");
        assert!(
            relayed >= MIB as u64,
            "{what}: only {relayed} bytes relayed: {st}"
        );
        srv.stop();
        drop(origin);
        let clean = nbdkit_at(
            &dir.join("origin.sock"),
            &["file".into(), format!("file={}", file.display())],
            dir.join("nbdkit-clean.log"),
            T,
        );
        pmcache_ok(&["flush", "--cache", &dir.s("cache.pmem")], T);
        drop(clean);
        assert_same(&std::fs::read(&file).unwrap(), &data, &what);
    }
}

/// The origin is killed (and started again at once) again and again while
/// a stream is read through the cache, so that some kills land in the middle
/// of a payload that was already going on to the client: each read still
/// succeeds with the origin's bytes (the rest of a reply cut short is read
/// again and sent as its last chunk), and no read fails the client.
#[test]
fn stream_reads_survive_an_origin_killed_mid_payload() {
    let dir = TempDir::new("relay-kill");
    let file = dir.join("origin.img");
    let seed = test_seed("relay-kill");
    let data = random_image(&file, LEN, round_seed(seed, 6, 0));
    let mut origin = nbdkit_file(&dir, &file, &[]);
    let srv = pmcache_over(&dir, &["--sequential-cutoff", "1MiB"]);
    let uri = srv.uri();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut passes = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || passes == 0 {
                let got = read_parallel(&uri, MIB, 2);
                assert_same(&got, &data, &format!("pass {passes} with origin kills"));
                passes += 1;
            }
            passes
        });
        for k in 0..12u64 {
            std::thread::sleep(Duration::from_millis(20 + round_seed(seed, 7, k) % 60));
            origin.signal(libc::SIGKILL);
            assert!(origin.wait_exit(Duration::from_secs(10)).is_some());
            origin = nbdkit_file(&dir, &file, &[]);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let passes = reader.join().unwrap();
        assert!(passes >= 1);
    });
    let st = stats(&dir.join("cache.pmem"), T);
    assert!(counter(&st, "relayed_bytes") > 0, "nothing relayed: {st}");
    srv.stop();
}
