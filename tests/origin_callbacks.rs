//! Requests that the origin connection's reader finishes (no worker waits
//! for the origin): read misses, and writethrough writes. With many in
//! flight on one client connection, over an origin that fails some
//! requests, every byte read must be the origin's and every acknowledged
//! write must be on the origin; promoted blocks are served from the cache
//! afterwards, and the statistics count each request once.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

#[path = "common/nbd.rs"]
mod nbd;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nbd::*;
use pmcache_nbd::Client;

const MIB: usize = 1 << 20;
const LEN: usize = 16 * MIB;
const T: Duration = Duration::from_secs(60);
const THREADS: u64 = 8;
const READS: u64 = 300;

/// `op`, tried again by the client if pmcache gave up on it: pmcache tries
/// the origin five times, so at 10% failures about one request in 100,000
/// fails, which a client that retries never sees twice.
fn again(mut op: impl FnMut() -> std::io::Result<()>, what: &str) {
    if let Err(first) = op() {
        op().unwrap_or_else(|e| panic!("{what}: {first}, then {e}"));
    }
}

/// `THREADS` threads sharing one connection, each reading `READS` random
/// 4 KiB blocks (some sub-block, some two blocks long) and checking them.
fn random_reads(uri: &str, data: &Arc<Vec<u8>>, seed: u64) {
    let c = Arc::new(Client::connect(uri).unwrap());
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (c, data) = (c.clone(), data.clone());
            std::thread::spawn(move || {
                for n in 0..READS {
                    let r = round_seed(seed, t, n);
                    let block = r % (LEN as u64 / 4096 - 1);
                    let (skip, len) = match r % 3 {
                        0 => (0, 4096),
                        1 => (512, 1024),
                        _ => (0, 8192),
                    };
                    let off = (block * 4096 + skip) as usize;
                    let mut b = vec![0u8; len];
                    again(|| c.read(&mut b, off as u64), &format!("read at {off}"));
                    assert_same(&b, &data[off..off + len], &format!("read at {off}"));
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
}

/// nbdkit's file plugin over `file`, failing `rate` of `what` ("pread" or
/// "pwrite") requests if given.
fn nbdkit_file(dir: &TempDir, file: &Path, errors: Option<(&str, &str)>) -> Proc {
    let mut args = Vec::new();
    if errors.is_some() {
        args.push("--filter=error".to_string());
    }
    args.extend(["file".into(), format!("file={}", file.display())]);
    if let Some((what, rate)) = errors {
        args.push(format!("error-{what}-rate={rate}"));
    }
    nbdkit_at(&dir.join("origin.sock"), &args, dir.join("nbdkit.log"), T)
}

#[test]
fn concurrent_misses_over_a_flaky_origin_are_exact_and_promoted() {
    let seed = test_seed("miss_reads");
    for (round, errors) in [None, Some("10%")].into_iter().enumerate() {
        let dir = TempDir::new("miss-reads");
        let file = dir.join("origin.img");
        let data = Arc::new(random_image(&file, LEN, round_seed(seed, 9, round as u64)));
        let _origin = nbdkit_file(&dir, &file, errors.map(|r| ("pread", r)));
        let origin = unix_uri(&dir.join("origin.sock"));
        let srv = launch(&ServerKind::pmcache(
            &dir.join("cache.pmem"),
            "64M",
            &origin,
            &[],
        ));
        random_reads(&srv.uri(), &data, round_seed(seed, 10, round as u64));
        let st = stats(&dir.join("cache.pmem"), T);
        let (misses, hits) = (counter(&st, "read_misses"), counter(&st, "read_hits"));
        // Each read touches one or two blocks: counted once, however it went.
        let blocks = misses + hits;
        let reads = THREADS * READS;
        assert!(
            blocks >= reads && blocks <= 2 * reads,
            "{blocks} blocks counted for {reads} reads (errors {errors:?})"
        );
        if errors.is_some() {
            assert!(
                counter(&st, "origin_errors") > 0,
                "the error filter did fail reads"
            );
        }
        // The same reads again: now from the cache, still exact.
        random_reads(&srv.uri(), &data, round_seed(seed, 10, round as u64));
        let st2 = stats(&dir.join("cache.pmem"), T);
        assert_eq!(
            counter(&st2, "read_misses"),
            misses,
            "promoted blocks are hits the second time"
        );
    }
}

/// Writethrough writes of whole blocks (staged, committed, then finished by
/// the origin's reply) from threads sharing one connection, each thread on
/// blocks of its own, several rounds over the same blocks: after a FLUSH
/// the origin file holds exactly the last write of each block, also when
/// 10% of origin writes fail and are retried.
#[test]
fn writethrough_writes_over_a_flaky_origin_all_reach_it() {
    let seed = test_seed("wt_callbacks");
    for (round, errors) in [None, Some("10%")].into_iter().enumerate() {
        let dir = TempDir::new("wt-callbacks");
        let file = dir.join("origin.img");
        write_file(&file, &[], LEN);
        let _origin = nbdkit_file(&dir, &file, errors.map(|r| ("pwrite", r)));
        let origin = unix_uri(&dir.join("origin.sock"));
        let srv = launch(&ServerKind::pmcache(
            &dir.join("cache.pmem"),
            "64M",
            &origin,
            &["--mode", "writethrough"],
        ));
        let c = Arc::new(Client::connect(&srv.uri()).unwrap());
        let blocks = LEN as u64 / 4096;
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut last = std::collections::HashMap::new();
                    for n in 0..READS {
                        // Blocks of this thread only: t, t + THREADS, ...
                        let r = round_seed(seed, 20 + round as u64, t * READS + n);
                        let block = (r % (blocks / THREADS)) * THREADS + t;
                        let data = pattern(r, 4096);
                        again(
                            || c.write(&data, block * 4096, false),
                            &format!("write of block {block}"),
                        );
                        last.insert(block, data);
                    }
                    last
                })
            })
            .collect();
        let written: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        c.flush().unwrap();
        let image = std::fs::read(&file).unwrap();
        for (block, data) in written.iter().flatten() {
            let at = (*block * 4096) as usize;
            assert_same(
                &image[at..at + 4096],
                data,
                &format!("block {block} on the origin"),
            );
        }
        let st = stats(&dir.join("cache.pmem"), T);
        assert_eq!(
            counter(&st, "writes"),
            THREADS * READS,
            "each write counted once"
        );
        if errors.is_some() {
            assert!(
                counter(&st, "origin_errors") > 0,
                "the error filter did fail writes"
            );
        }
    }
}
