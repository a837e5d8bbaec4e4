//! The engine in-process against libpmemblk and memcpy, on /dev/shm files
//! mapped with `assume_pmem` (real clwb + sfence), and libpmemblk pools with
//! `PMEM_IS_PMEM_FORCE=1` (libpmem flushes instead of msync).
//!
//! ```text
//! cargo bench -p pmcache-bench --bench engine              # everything (~30 s)
//! cargo bench -p pmcache-bench --bench engine -- small     # 1-3: writes, reads, fences
//! cargo bench -p pmcache-bench --bench engine -- big       # 4-5: DRAM per block, reopen
//! cargo bench -p pmcache-bench --bench engine -- quick     # fewer ops and rounds
//! ```
//!
//! Environment: `PMCACHE_BENCH_DIR` (default /dev/shm) for every scratch
//! file; `PMCACHE_BENCH_BIG_GIB` (default 16) for the size of the big cache
//! of sections 4-5; `PMCACHE_BENCH_ROUNDS` overrides the number of rounds.
//!
//! For `perf record`: `target/release/deps/engine-* profile OP N` runs only
//! OP (write, read, read_with, rawslot, blkwrite, blkread) N times.
//!
//! Each section runs in a child process (this binary re-executed with a
//! section name) so that anonymous memory measured in one is not disturbed
//! by another. Every figure is the median over rounds; within a round the
//! engine and its peers run back to back, so machine noise hits all alike.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use pmcache_bench::{bench_dir, median, rss_anon, PmemBlk, Rng, TempPath};
use pmcache_engine::{Engine, EngineConfig};
use pmcache_origin::{FileOrigin, Origin};
use pmcache_pmem::{MapOptions, MappedRegion, PmemRegion};

const BS: usize = 4096;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn manual() -> EngineConfig {
    EngineConfig {
        background_writeback: false,
        ..Default::default()
    }
}

/// The number in environment variable `name`, or `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rounds(default: usize) -> usize {
    env_or("PMCACHE_BENCH_ROUNDS", default)
}

/// A scratch file `pmcache-bench-PID-NAME` in `dir`, removed on drop.
fn scratch(dir: &Path, name: &str) -> TempPath {
    TempPath::new(dir, &format!("pmcache-bench-{}-{name}", std::process::id()))
}

/// A libpmemblk pool of `len` bytes in 4 KiB blocks, in a scratch file of `dir`.
fn pmemblk_pool(dir: &Path, len: u64) -> (TempPath, PmemBlk) {
    let path = scratch(dir, "pmemblk");
    let blk = PmemBlk::create(path.path(), BS, len as usize).expect("pmemblk pool");
    (path, blk)
}

/// `Engine::open` on the cache `region` for `origin`, without a writeback thread.
fn open_engine(region: &Arc<MappedRegion>, origin: &Arc<FileOrigin>) -> Arc<Engine> {
    Engine::open(
        region.clone() as Arc<dyn PmemRegion>,
        origin.clone() as Arc<dyn Origin>,
        manual(),
    )
    .expect("open")
}

/// [`open_engine`], timed, with the anonymous memory it added.
/// Returns (engine, open time, RssAnon delta in bytes).
fn open_engine_measured(
    region: &Arc<MappedRegion>,
    origin: &Arc<FileOrigin>,
) -> (Arc<Engine>, Duration, u64) {
    let before = rss_anon();
    let t = Instant::now();
    let e = open_engine(region, origin);
    let dt = t.elapsed();
    let after = rss_anon();
    (e, dt, after - before)
}

/// Run `threads` threads of `ops` operations each, all starting together;
/// `op(thread, i)` does one. Returns total operations per second.
fn run_threads<F>(threads: usize, ops: usize, op: F) -> f64
where
    F: Fn(&mut Rng, &mut Block) + Sync,
{
    let barrier = Barrier::new(threads + 1);
    let start = std::thread::scope(|s| {
        for t in 0..threads {
            let (barrier, op) = (&barrier, &op);
            s.spawn(move || {
                let mut rng = Rng::new(0x5eed ^ (t as u64) << 32 ^ rand_seed());
                let mut buf = new_block(t as u8);
                barrier.wait();
                for _ in 0..ops {
                    op(&mut rng, &mut buf);
                }
            });
        }
        barrier.wait();
        Instant::now()
    });
    (threads * ops) as f64 / start.elapsed().as_secs_f64()
}

fn rand_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ std::process::id() as u64
}

/// A 4 KiB buffer aligned to 64 bytes.
#[repr(C, align(64))]
struct Block([u8; BS]);

fn new_block(fill: u8) -> Box<Block> {
    Box::new(Block([fill; BS]))
}

// ----- sections 1-3: writes, reads, fences ---------------------------------

struct Row {
    name: String,
    engine: f64,
    peer_name: String,
    peer: f64,
    target: String,
    pass: bool,
}

impl Row {
    /// A row whose target is `engine >= factor * peer`.
    fn at_least(name: String, engine: f64, peer_name: &str, peer: f64, factor: f64) -> Row {
        Row {
            name,
            engine,
            peer_name: peer_name.into(),
            peer,
            target: format!(">= {factor}x"),
            pass: engine >= factor * peer,
        }
    }
}

fn print_rows(title: &str, unit: &str, rows: &[Row]) {
    println!("\n{title}");
    println!("| measurement | engine | peer | ratio | target | result |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.0} {unit} | {} {:.0} {unit} | {:.2}x | {} | {} |",
            r.name,
            r.engine,
            r.peer_name,
            r.peer,
            r.engine / r.peer,
            r.target,
            if r.pass { "pass" } else { "FAIL" }
        );
    }
}

/// The engine of sections 1-3: a cache of `cache_len` bytes, a 4 GiB sparse
/// origin, no writeback thread. The files go when the first value drops.
fn small_engine(
    dir: &Path,
    cache_len: u64,
) -> ((TempPath, TempPath), Arc<MappedRegion>, Arc<Engine>) {
    let cache_path = scratch(dir, "cache");
    let origin_path = scratch(dir, "origin");
    let region = Arc::new(
        MappedRegion::create(
            cache_path.path(),
            cache_len,
            &MapOptions::new().assume_pmem(true).prefault(true),
        )
        .expect("create cache region"),
    );
    let origin =
        Arc::new(FileOrigin::create_sparse(origin_path.path(), 4 * GIB).expect("create origin"));
    Engine::format(&*region, &*origin, BS as u32).expect("format");
    let engine = open_engine(&region, &origin);
    ((cache_path, origin_path), region, engine)
}

/// For `perf record`: only the engine, one kind of operation, many times.
/// `profile write|coldwrite|read|read_with|rawwrite|rawslot|blkwrite|coldblkwrite|blkread N`.
fn section_profile(what: &str, ops: usize) {
    let ws_blocks: u64 = 64 * 1024;
    // `cold*`: rounds of 40,000 operations, each after a 256 MiB sweep that
    // evicts the CPU caches, as the read rounds of `-- small` do.
    let cold = |f: &(dyn Fn(&mut Rng, &mut Block) + Sync)| -> f64 {
        let sweep_buf = vec![1u8; 256 * MIB as usize];
        let (mut done, mut secs) = (0usize, 0f64);
        while done < ops {
            black_box(sweep_buf.iter().step_by(64).map(|&x| x as u64).sum::<u64>());
            let n = (ops - done).min(40_000);
            secs += n as f64 / run_threads(1, n, f);
            done += n;
        }
        ops as f64 / secs
    };
    if what == "blkwrite" || what == "blkread" || what == "coldblkwrite" {
        let (_pool_path, blk) = pmemblk_pool(&bench_dir(), GIB);
        let buf = new_block(0xa5);
        for b in 0..ws_blocks {
            blk.write(&buf.0, b);
        }
        let write = |rng: &mut Rng, b: &mut Block| {
            b.0[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
            blk.write(&b.0, rng.below(ws_blocks));
        };
        let r = match what {
            "coldblkwrite" => cold(&write),
            "blkwrite" => run_threads(1, ops, write),
            _ => run_threads(1, ops, |rng, b| blk.read(&mut b.0, rng.below(ws_blocks))),
        };
        println!("{what}: {r:.0} op/s");
        return;
    }
    let (_files, _region, engine) = small_engine(&bench_dir(), GIB);
    let buf = new_block(0xa5);
    for b in 0..ws_blocks {
        engine.write(b * BS as u64, &buf.0, false).unwrap();
    }
    let write = |rng: &mut Rng, b: &mut Block| {
        b.0[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
        engine
            .write(rng.below(ws_blocks) * BS as u64, &b.0, false)
            .unwrap();
    };
    let slots = engine.layout().slot_count;
    let data0 = engine.layout().data_offset as usize;
    let region = engine.region().clone();
    let r = match what {
        // Copy out of a random slot of the cache mapping, bypassing the engine.
        "rawslot" => run_threads(1, ops, |rng, b| {
            let off = data0 + rng.below(slots) as usize * BS;
            // SAFETY: no writer runs meanwhile.
            b.0.copy_from_slice(unsafe { region.slice(off, BS) });
            black_box(&*b);
        }),
        // The persistence floor of a write: what a slot's data and entry
        // cost with no engine around them (fused copy + hash, a streaming
        // 64-byte entry, one fence), into random free slots.
        "rawwrite" => {
            let layout = engine.layout();
            let free0 = ws_blocks as usize + 1;
            run_threads(1, ops, |rng, b| {
                b.0[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
                let s = free0 + rng.below(slots - free0 as u64) as usize;
                // SAFETY: slots past the working set are free and unused by
                // the engine meanwhile; only this thread writes them.
                unsafe {
                    let h = region.copy_flush_hash(data0 + s * BS, &b.0);
                    let mut line = [0u8; 64];
                    line[..8].copy_from_slice(&h.to_le_bytes());
                    region.copy_flush_nt(layout.meta_off(s as u64), &line);
                }
                region.fence();
            })
        }
        "coldwrite" => cold(&write),
        // PMCACHE_PROFILE_THREADS=3 on 2 cores: writers preempted
        // mid-transaction, as on a busy host.
        "write" => run_threads(env_or("PMCACHE_PROFILE_THREADS", 1), ops, write),
        "read" => run_threads(1, ops, |rng, b| {
            engine
                .read(rng.below(ws_blocks) * BS as u64, &mut b.0)
                .unwrap();
        }),
        _ => run_threads(1, ops, |rng, _| {
            engine
                .read_with(rng.below(ws_blocks) * BS as u64, BS as u64, &mut |s| {
                    black_box(s);
                    Ok(())
                })
                .unwrap();
        }),
    };
    println!("{what}: {r:.0} op/s");
}

fn section_small(quick: bool) {
    let dir = bench_dir();
    let cache_len = GIB;
    let ws_blocks: u64 = 64 * 1024; // 256 MiB working set, a quarter of the cache
    let nrounds = rounds(if quick { 3 } else { 7 });
    let wops = if quick { 10_000 } else { 40_000 };
    let rops = if quick { 50_000 } else { 200_000 };

    let (_files, region, engine) = small_engine(&dir, cache_len);

    // The peer: a libpmemblk pool of the same size.
    let (_pool_path, blk) = pmemblk_pool(&dir, cache_len);
    assert!(blk.nblock() as u64 >= ws_blocks, "pool too small");

    // memcpy: a plain mapping of the cache's size.
    let plain_path = scratch(&dir, "plain");
    let plain = MappedRegion::create(
        plain_path.path(),
        cache_len,
        &MapOptions::new().prefault(true),
    )
    .expect("create plain mapping");
    // SAFETY: nobody else uses this mapping.
    unsafe { plain.slice_mut(0, cache_len as usize).fill(0x5a) };

    println!(
        "engine: {} MiB cache ({}, {} slots), working set {} MiB; pmemblk pool {} MiB ({} blocks); {} rounds",
        cache_len / MIB,
        region.mode(),
        engine.layout().slot_count,
        ws_blocks * BS as u64 / MIB,
        cache_len / MIB,
        blk.nblock(),
        nrounds
    );

    // Warm up: write every working-set block once (faults pages in, fills the cache).
    let mut rng = Rng::new(1);
    let buf = new_block(0xa5);
    for b in 0..ws_blocks {
        engine.write(b * BS as u64, &buf.0, false).unwrap();
        blk.write(&buf.0, b);
    }
    for _ in 0..ws_blocks {
        let b = rng.below(ws_blocks);
        engine.write(b * BS as u64, &buf.0, false).unwrap();
        blk.write(&buf.0, b);
    }

    let engine_write = |threads: usize| -> (f64, f64) {
        let f0 = region.fences();
        let w0 = engine.stats().writes;
        let r = run_threads(threads, wops, |rng, b| {
            let blk_no = rng.below(ws_blocks);
            b.0[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
            engine.write(blk_no * BS as u64, &b.0, false).unwrap();
        });
        let writes = engine.stats().writes - w0;
        (r, (region.fences() - f0) as f64 / writes as f64)
    };
    let blk_write = |threads: usize| -> f64 {
        run_threads(threads, wops, |rng, b| {
            let blk_no = rng.below(ws_blocks);
            b.0[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
            blk.write(&b.0, blk_no);
        })
    };
    let engine_read = |threads: usize| -> f64 {
        run_threads(threads, rops, |rng, b| {
            engine
                .read(rng.below(ws_blocks) * BS as u64, &mut b.0)
                .unwrap();
            black_box(&*b);
        })
    };
    let engine_read_with_sum = |threads: usize| -> f64 {
        run_threads(threads, rops, |rng, _| {
            let mut acc = 0u64;
            engine
                .read_with(rng.below(ws_blocks) * BS as u64, BS as u64, &mut |slices| {
                    for s in slices {
                        for c in s.chunks_exact(8) {
                            acc = acc.wrapping_add(u64::from_ne_bytes(c.try_into().unwrap()));
                        }
                    }
                    Ok(())
                })
                .unwrap();
            black_box(acc);
        })
    };
    let engine_read_with_nop = |threads: usize| -> f64 {
        run_threads(threads, rops, |rng, _| {
            engine
                .read_with(rng.below(ws_blocks) * BS as u64, BS as u64, &mut |slices| {
                    black_box(slices);
                    Ok(())
                })
                .unwrap();
        })
    };
    let blk_read = |threads: usize| -> f64 {
        run_threads(threads, rops, |rng, b| {
            blk.read(&mut b.0, rng.below(ws_blocks));
            black_box(&*b);
        })
    };
    let slots = cache_len / BS as u64;
    let memcpy_read = |threads: usize| -> f64 {
        run_threads(threads, rops, |rng, b| {
            let off = (rng.below(slots) * BS as u64) as usize;
            // SAFETY: nobody writes the plain mapping now.
            b.0.copy_from_slice(unsafe { plain.slice(off, BS) });
            black_box(&*b);
        })
    };

    let tcounts = [1usize, 2];
    // [threads] -> samples
    let mut ew = vec![Vec::new(); 2];
    let mut ef = vec![Vec::new(); 2];
    let mut bw = vec![Vec::new(); 2];
    let mut er = vec![Vec::new(); 2];
    let mut es = vec![Vec::new(); 2];
    let mut en = vec![Vec::new(); 2];
    let mut br = vec![Vec::new(); 2];
    let mut mr = vec![Vec::new(); 2];
    for round in 0..nrounds {
        for (i, &t) in tcounts.iter().enumerate() {
            // Alternate which side goes first.
            if round % 2 == 0 {
                let (r, f) = engine_write(t);
                ew[i].push(r);
                ef[i].push(f);
                bw[i].push(blk_write(t));
            } else {
                bw[i].push(blk_write(t));
                let (r, f) = engine_write(t);
                ew[i].push(r);
                ef[i].push(f);
            }
            er[i].push(engine_read(t));
            es[i].push(engine_read_with_sum(t));
            en[i].push(engine_read_with_nop(t));
            br[i].push(blk_read(t));
            mr[i].push(memcpy_read(t));
        }
        eprintln!(
            "round {round}: write 1t engine {:.0}/s pmemblk {:.0}/s, 2t engine {:.0}/s pmemblk {:.0}/s; read 1t engine {:.0}/s pmemblk {:.0}/s memcpy {:.0}/s",
            ew[0][round], bw[0][round], ew[1][round], bw[1][round], er[0][round], br[0][round], mr[0][round]
        );
    }

    let st = engine.stats();
    println!(
        "engine stats: writes {} write_fences {} fences {} evictions {} waits_for_space {} read_hits {} read_misses {}",
        st.writes, st.write_fences, st.fences, st.evictions, st.waits_for_space, st.read_hits, st.read_misses
    );

    let mut rows = Vec::new();
    for (i, &t) in tcounts.iter().enumerate() {
        let (e, p) = (median(&ew[i]), median(&bw[i]));
        rows.push(Row::at_least(
            format!("durable 4 KiB random write, {t} thread(s), QD1 each"),
            e,
            "pmemblk_write",
            p,
            2.0,
        ));
    }
    print_rows("## writes (operations/s, all threads)", "op/s", &rows);

    let mut rows = Vec::new();
    for (i, &t) in tcounts.iter().enumerate() {
        let (b, m) = (median(&br[i]), median(&mr[i]));
        for (name, v) in [
            ("read (copy)", &er[i]),
            ("read_with (sum sink)", &es[i]),
            ("read_with (no-op sink)", &en[i]),
        ] {
            let e = median(v);
            let row = format!("4 KiB random read hit, {name}, {t} thread(s)");
            rows.push(Row::at_least(row.clone(), e, "pmemblk_read", b, 3.0));
            rows.push(Row::at_least(row, e, "memcpy", m, 0.5));
        }
    }
    print_rows("## reads (operations/s, all threads)", "op/s", &rows);

    println!("\n## fences per acknowledged write");
    for (i, &t) in tcounts.iter().enumerate() {
        let f = median(&ef[i]);
        println!(
            "{t} thread(s): {f:.3} fences/write (median; rounds {:?}) target <= 1: {}",
            ef[i].iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>(),
            if f <= 1.0 { "pass" } else { "FAIL" }
        );
    }
    for (i, &t) in tcounts.iter().enumerate() {
        println!(
            "per-op latency {t}t (median): engine write {:.0} ns, pmemblk write {:.0} ns, engine read {:.0} ns, read_with sum {:.0} ns, read_with nop {:.0} ns, pmemblk read {:.0} ns, memcpy {:.0} ns",
            1e9 * t as f64 / median(&ew[i]),
            1e9 * t as f64 / median(&bw[i]),
            1e9 * t as f64 / median(&er[i]),
            1e9 * t as f64 / median(&es[i]),
            1e9 * t as f64 / median(&en[i]),
            1e9 * t as f64 / median(&br[i]),
            1e9 * t as f64 / median(&mr[i]),
        );
    }
    engine.close().unwrap();
}

// ----- sections 4-5: DRAM per block, reopen after a crash ------------------

fn open_region(path: &Path) -> Arc<MappedRegion> {
    Arc::new(
        MappedRegion::open(path, &MapOptions::new().assume_pmem(true).prefault(false))
            .expect("open cache region"),
    )
}

fn open_origin(path: &Path) -> Arc<FileOrigin> {
    Arc::new(FileOrigin::open(path).expect("open origin"))
}

/// Child: format the big cache and measure the anonymous memory that
/// `Engine::open` adds for an empty cache.
fn section_big_format(cache: &Path, origin: &Path) {
    let region = open_region(cache);
    let origin = open_origin(origin);
    Engine::format(&*region, &*origin, BS as u32).expect("format");
    let (e, dt, rss) = open_engine_measured(&region, &origin);
    let slots = e.layout().slot_count;
    println!(
        "RESULT empty_open slots={slots} rss_anon_delta={} bytes_per_slot={:.2} open_s={:.3}",
        rss,
        rss as f64 / slots as f64,
        dt.as_secs_f64()
    );
    e.close().unwrap();
}

/// Child: write every origin block once (random order), a 16th of them
/// with data and the rest as zero blocks (metadata-only entries), then
/// "crash": drop the engine without `close`.
fn section_big_fill(cache: &Path, origin: &Path) {
    let region = open_region(cache);
    let origin = open_origin(origin);
    let e = open_engine(&region, &origin);
    let nblocks = e.size() / BS as u64;
    // A random permutation of the origin's blocks.
    let mut order: Vec<u32> = (0..nblocks as u32).collect();
    let mut rng = Rng::new(42);
    for i in (1..order.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let mut buf = new_block(0x3c);
    let t = Instant::now();
    for (i, &b) in order.iter().enumerate() {
        let off = b as u64 * BS as u64;
        if i % 16 == 0 {
            buf.0[..8].copy_from_slice(&(i as u64).to_le_bytes());
            e.write(off, &buf.0, false).unwrap();
        } else {
            e.write_zeroes(off, BS as u64, false).unwrap();
        }
    }
    let dt = t.elapsed();
    let st = e.stats();
    println!(
        "RESULT fill writes={} seconds={:.1} occupied={} dirty={} slots={} writebacks={} evictions={}",
        order.len(),
        dt.as_secs_f64(),
        st.occupied,
        st.dirty,
        st.slots,
        st.writebacks,
        st.evictions
    );
    // Crash: no close; nothing else holds the engine (no writeback thread).
    drop(e);
}

/// Child: time `Engine::open` (recovery) after a crash and measure the
/// anonymous memory it keeps for a full cache; then crash again after a few
/// writes so the next round also recovers from a crash.
fn section_big_reopen(cache: &Path, origin: &Path) {
    let t0 = Instant::now();
    let region = open_region(cache);
    let origin = open_origin(origin);
    let map_s = t0.elapsed().as_secs_f64();
    let (e, dt, rss) = open_engine_measured(&region, &origin);
    let st = e.stats();
    println!(
        "RESULT reopen open_s={:.4} map_s={map_s:.4} slots={} occupied={} dirty={} rss_anon_delta={} bytes_per_slot={:.2}",
        dt.as_secs_f64(),
        st.slots,
        st.occupied,
        st.dirty,
        rss,
        rss as f64 / st.slots as f64
    );
    let mut rng = Rng::new(rand_seed());
    let buf = new_block(0x77);
    for _ in 0..1000 {
        let b = rng.below(e.size() / BS as u64);
        e.write(b * BS as u64, &buf.0, false).unwrap();
    }
    drop(e);
}

fn parse_result(out: &str, key: &str) -> Vec<(String, f64)> {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("RESULT {key} ")))
        .unwrap_or_else(|| {
            panic!("child printed no RESULT {key}:\n{out}");
        });
    line.split_whitespace()
        .skip(2)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(f64::NAN)))
        .collect()
}

fn field(kv: &[(String, f64)], k: &str) -> f64 {
    kv.iter()
        .find(|(n, _)| n == k)
        .map(|x| x.1)
        .unwrap_or(f64::NAN)
}

/// Run this binary as a child for one section; returns its stdout.
fn child(section: &str, args: &[&Path]) -> String {
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .arg(section)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        panic!(
            "section {section} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
}

fn shm_free(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: zeroed statvfs is a valid out-parameter; valid C string.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return 0;
        }
        s.f_bavail * s.f_frsize
    }
}

fn section_big(quick: bool) {
    let dir = bench_dir();
    let gib: u64 = env_or("PMCACHE_BENCH_BIG_GIB", 16);
    let len = gib * GIB;
    // Touched: metadata (1/64 of the file) + a 16th of the blocks with data
    // in the cache, plus what writeback puts into the origin.
    let need = len / 64 + len / 16 + len / 32;
    let free = shm_free(&dir);
    if free < need {
        println!("big: {} has {} MiB free, {} MiB needed for a {gib} GiB cache; skipped (set PMCACHE_BENCH_BIG_GIB)", dir.display(), free / MIB, need / MIB);
        return;
    }
    let cache = scratch(&dir, "big-cache");
    let origin = scratch(&dir, "big-origin");
    // Sparse files: the cache file is mapped without prefault.
    std::fs::File::create(cache.path())
        .unwrap()
        .set_len(len)
        .unwrap();
    drop(FileOrigin::create_sparse(origin.path(), len).expect("origin"));
    let paths = [cache.path(), origin.path()];

    let mut empty = Vec::new();
    let nempty = if quick { 1 } else { 3 };
    for _ in 0..nempty {
        empty.push(parse_result(&child("big-format", &paths), "empty_open"));
    }
    let out = child("big-fill", &paths);
    let fill = parse_result(&out, "fill");
    let nreopen = rounds(if quick { 3 } else { 5 });
    let mut reopen = Vec::new();
    for _ in 0..nreopen {
        let r = parse_result(&child("big-reopen", &paths), "reopen");
        eprintln!(
            "reopen: {:.3} s, {:.2} B/slot",
            field(&r, "open_s"),
            field(&r, "bytes_per_slot")
        );
        reopen.push(r);
    }
    drop(cache);
    drop(origin);

    let slots = field(&empty[0], "slots");
    let col = |v: &[Vec<(String, f64)>], k: &str| v.iter().map(|r| field(r, k)).collect::<Vec<_>>();
    println!(
        "\n## big cache: {gib} GiB on {}, {slots} slots of 4 KiB",
        dir.display()
    );
    println!(
        "fill: {} writes in {:.1} s; occupied {} of {} slots, dirty {}, {} written back, {} evicted",
        field(&fill, "writes"),
        field(&fill, "seconds"),
        field(&fill, "occupied"),
        field(&fill, "slots"),
        field(&fill, "dirty"),
        field(&fill, "writebacks"),
        field(&fill, "evictions")
    );
    let computed = 8 + 4 + 4 + 4 + 4; // keys, chain, buckets (load factor 1), LRU prev, LRU next
    println!("DRAM per slot computed from index.rs/policy.rs: {computed} B (target <= 24)");
    let e_bps = median(&col(&empty, "bytes_per_slot"));
    println!(
        "DRAM per slot measured, empty cache (RssAnon delta of Engine::open): {e_bps:.2} B (runs {:?}), open {:.3} s",
        col(&empty, "bytes_per_slot"),
        median(&col(&empty, "open_s"))
    );
    let f_bps = median(&col(&reopen, "bytes_per_slot"));
    println!(
        "DRAM per slot measured, full cache after recovery: {f_bps:.2} B (runs {:?}) target <= 24: {}",
        col(&reopen, "bytes_per_slot"),
        if f_bps <= 24.0 { "pass" } else { "FAIL" }
    );
    let open_s = median(&col(&reopen, "open_s"));
    println!(
        "reopen after crash (Engine::open, {} of {slots} slots mapped): {open_s:.3} s median (runs {:?}; mmap {:.4} s) target <= 0.5 s{}: {}",
        field(&reopen[0], "occupied"),
        col(&reopen, "open_s"),
        median(&col(&reopen, "map_s")),
        if gib == 16 { String::new() } else { format!(" (scaled to 16 GiB: {:.3} s)", open_s * 16.0 / gib as f64) },
        if open_s * 16.0 / gib as f64 <= 0.5 { "pass" } else { "FAIL" }
    );
}

fn main() {
    // libpmem reads this when it first checks a mapping; set it before any
    // pool exists (children inherit it).
    std::env::set_var("PMEM_IS_PMEM_FORCE", "1");
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let quick = args.iter().any(|a| a == "quick");
    let path = |i: usize| PathBuf::from(&args[i]);
    match args.first().map(String::as_str) {
        Some("small-child") => section_small(quick),
        Some("profile") => section_profile(&args[1], args[2].parse().expect("ops")),
        Some("big-format") => section_big_format(&path(1), &path(2)),
        Some("big-fill") => section_big_fill(&path(1), &path(2)),
        Some("big-reopen") => section_big_reopen(&path(1), &path(2)),
        _ => {
            let load = || {
                std::fs::read_to_string("/proc/loadavg")
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            };
            println!("load average at start: {}", load());
            let all = !args.iter().any(|a| a == "small" || a == "big");
            if all || args.iter().any(|a| a == "small") {
                let q = if quick { "quick" } else { "full" };
                print!("{}", child("small-child", &[Path::new(q)]));
            }
            if all || args.iter().any(|a| a == "big") {
                section_big(quick);
            }
            println!("load average at end: {}", load());
        }
    }
}
