//! Simulated power loss at every persistence point (contract §3).
//!
//! Random workloads (writes of 1 byte to 1 MiB, overwrites, zeroes, trims,
//! reads, writeback, eviction) run against the engine on the crash
//! simulator. At each persistence point, crash images are reopened and
//! checked against a model of what was acknowledged: promises 3–6, the
//! offline check, no lost dirty data, no spurious dirty blocks; some images
//! also crash their own recovery, and some are written back in full and the
//! origin compared.
//!
//! `PMCACHE_CRASH_IMAGES=N` sets the total number of images (default
//! 20,000). A violation prints the seed; `PMCACHE_SEED=<seed>` replays it.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use pmcache_engine::check;
use pmcache_engine::{Engine, EngineConfig};
use pmcache_origin::{MemOrigin, Origin};
use pmcache_pmem::sim::{enumerate, CrashConfig, CrashImage};
use pmcache_pmem::{PmemRegion, SimRegion};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug)]
struct Variant {
    name: &'static str,
    block: u32,
    max_request: u32,
    region_len: usize,
    origin_len: usize,
    ops: usize,
    /// Crash at every `stride`-th persistence point (offset varies by seed).
    stride: u64,
    /// Workload threads, each on its own part of the device (so the model
    /// per thread is exact) but sharing shards, slots, reclaim and writeback.
    threads: usize,
}

/// Small blocks, small cache under eviction pressure: many cheap images.
const SMALL: Variant = Variant {
    name: "small",
    block: 512,
    max_request: 64 << 10,
    region_len: 12288 + 700 * 576 + 4096,
    origin_len: 640 << 10,
    ops: 80,
    stride: 3,
    threads: 1,
};
/// 4 KiB blocks and writes up to 1 MiB.
const LARGE: Variant = Variant {
    name: "large",
    block: 4096,
    max_request: 1 << 20,
    region_len: 12288 + 600 * 4160 + 8192,
    origin_len: 3 << 20,
    ops: 24,
    stride: 4,
    threads: 1,
};
/// Two threads at once: cross-thread flush and fence ordering.
const CONCURRENT: Variant = Variant {
    name: "concurrent",
    block: 512,
    max_request: 64 << 10,
    region_len: 12288 + 700 * 576 + 4096,
    origin_len: 640 << 10,
    ops: 50,
    stride: 3,
    threads: 2,
};

const ORIGIN_NAME: &str = "crash-origin";

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, data: Vec<u8> },
    Zero { off: u64, len: u64 },
    Trim { off: u64, len: u64 },
    Read { off: u64, len: u64 },
    Writeback(usize),
    Flush,
}

/// What clients were told, as seen at a crash.
#[derive(Default)]
struct Model {
    acked: Vec<u8>,
    /// Per workload thread, the request in flight: its range and new content.
    inflight: Vec<Option<(u64, Vec<u8>)>>,
    /// Blocks some acknowledged or in-flight write touched.
    written: Vec<bool>,
    ops: Vec<String>,
}

fn cfg(v: &Variant) -> EngineConfig {
    EngineConfig {
        max_request: v.max_request,
        background_writeback: false,
        writeback_batch: 64,
        ..Default::default()
    }
}

/// For inspecting a recovered cache: reads change nothing.
fn inspect_cfg(v: &Variant) -> EngineConfig {
    EngineConfig {
        promote_reads: false,
        ..cfg(v)
    }
}

/// Ops within `[base, base + size)`.
fn gen_ops(v: &Variant, rng: &mut SmallRng, base: u64, size: u64) -> Vec<Op> {
    let bs = v.block as u64;
    let len = |rng: &mut SmallRng| -> u64 {
        match rng.gen_range(0..100) {
            0..=39 => rng.gen_range(1..=2 * bs),
            40..=84 => rng.gen_range(1..=16 * bs),
            _ => rng.gen_range(1..=v.max_request as u64),
        }
    };
    (0..v.ops)
        .map(|_| {
            // One aligned whole block: what most clients send, and the
            // engine's fast path.
            let whole = rng.gen_range(0..100) < 15;
            let l = if whole { bs } else { len(rng) }.min(size);
            let off = if whole || rng.gen_bool(0.3) {
                rng.gen_range(0..size / bs) * bs
            } else {
                rng.gen_range(0..=size - l)
            };
            let l = l.min(size - off).max(1);
            let off = base + off;
            match rng.gen_range(0..100) {
                0..=54 => {
                    let mut data = vec![0u8; l as usize];
                    rng.fill(&mut data[..]);
                    Op::Write { off, data }
                }
                55..=62 => Op::Zero { off, len: l },
                63..=67 => Op::Trim { off, len: l },
                68..=82 => Op::Read { off, len: l },
                83..=97 => Op::Writeback(rng.gen_range(1..200)),
                _ => Op::Flush,
            }
        })
        .collect()
}

fn describe(op: &Op) -> String {
    match op {
        Op::Write { off, data } => format!("write {off}+{}", data.len()),
        Op::Zero { off, len } => format!("zero {off}+{len}"),
        Op::Trim { off, len } => format!("trim {off}+{len}"),
        Op::Read { off, len } => format!("read {off}+{len}"),
        Op::Writeback(n) => format!("writeback {n}"),
        Op::Flush => "flush".into(),
    }
}

fn run_workload(engine: &Engine, ops: &[Op], model: &Mutex<Model>, bs: u64, me: usize) {
    for op in ops {
        let (range, new) = match op {
            Op::Write { off, data } => (Some(*off), Some(data.clone())),
            Op::Zero { off, len } | Op::Trim { off, len } => {
                (Some(*off), Some(vec![0u8; *len as usize]))
            }
            _ => (None, None),
        };
        {
            let mut m = model.lock().unwrap();
            m.ops.push(describe(op));
            if let (Some(off), Some(new)) = (range, &new) {
                for b in off / bs..=(off + new.len() as u64 - 1) / bs {
                    m.written[b as usize] = true;
                }
                m.inflight[me] = Some((off, new.clone()));
            }
        }
        match op {
            Op::Write { off, data } => engine.write(*off, data, false).expect("write"),
            Op::Zero { off, len } => engine.write_zeroes(*off, *len, false).expect("zero"),
            Op::Trim { off, len } => engine.trim(*off, *len, false).expect("trim"),
            Op::Read { off, len } => {
                let mut buf = vec![0u8; *len as usize];
                engine.read(*off, &mut buf).expect("read");
                let m = model.lock().unwrap();
                assert!(
                    buf == m.acked[*off as usize..(*off + *len) as usize],
                    "read {off}+{len} returned stale data"
                );
            }
            Op::Writeback(n) => {
                engine.writeback_step(*n).expect("writeback");
            }
            Op::Flush => engine.flush().expect("flush"),
        }
        let mut m = model.lock().unwrap();
        if let Some((off, new)) = m.inflight[me].take() {
            m.acked[off as usize..off as usize + new.len()].copy_from_slice(&new);
        }
    }
}

/// Contract promises 3–6 on a recovered engine.
fn verify_content(
    engine: &Engine,
    acked: &[u8],
    inflight: &[Option<(u64, Vec<u8>)>],
) -> Result<Vec<u8>, String> {
    let mut got = vec![0u8; acked.len()];
    let step = engine.max_request() as usize;
    for off in (0..acked.len()).step_by(step) {
        let n = step.min(acked.len() - off);
        engine
            .read(off as u64, &mut got[off..off + n])
            .map_err(|e| format!("read after recovery: {e}"))?;
    }
    // Outside the requests in flight, exactly what was acknowledged.
    let mut ranges: Vec<(usize, usize, &Vec<u8>)> = inflight
        .iter()
        .flatten()
        .map(|(off, new)| (*off as usize, *off as usize + new.len(), new))
        .collect();
    ranges.sort_by_key(|r| r.0);
    let mut pos = 0;
    for &(lo, hi, _) in
        ranges
            .iter()
            .chain(std::iter::once(&(acked.len(), acked.len(), &Vec::new())))
    {
        if got[pos..lo] != acked[pos..lo] {
            let i = (pos..lo).find(|&i| got[i] != acked[i]).unwrap_or(pos);
            return Err(format!(
                "byte {i} outside the in-flight requests is {} but {} was acknowledged",
                got[i], acked[i]
            ));
        }
        pos = hi;
    }
    // Each request in flight: all old or all new.
    for (lo, hi, new) in ranges {
        let now = &got[lo..hi];
        if now != &acked[lo..hi] && now != &new[..] {
            let torn = (lo..hi).find(|&i| got[i] != acked[i] && got[i] != new[i - lo]);
            return Err(format!(
                "in-flight request {lo}+{} is torn: neither all old nor all new (first foreign byte: {torn:?})",
                hi - lo
            ));
        }
    }
    Ok(got)
}

struct Ctx {
    v: Variant,
    origin: Arc<MemOrigin>,
    model: Arc<Mutex<Model>>,
}

fn check_image(
    ctx: &Ctx,
    img: &CrashImage,
    deep: bool,
    nested: bool,
    images: &mut u64,
) -> Result<(), String> {
    // The workload is paused inside a persistence point while we look.
    let m = ctx.model.lock().unwrap();
    let (acked, inflight, written, ops) = (&m.acked, &m.inflight, &m.written, &m.ops);
    let ctx_msg = |e: String| format!("{e}; last ops: {:?}", &ops[ops.len().saturating_sub(4)..]);
    let mut orng = SmallRng::seed_from_u64(img.child_seed());
    let oimg = ctx.origin.crash_image(|_| orng.gen_bool(0.5));

    let region = SimRegion::from_image(&img.bytes);
    let report = check::check(
        &region,
        Some(("mem:crash-origin", ctx.v.origin_len as u64)),
        true,
    );
    if !report.ok() {
        return Err(ctx_msg(format!(
            "offline check failed on the crash image: {:?}",
            report.errors
        )));
    }

    if nested {
        // Crash the recovery itself, at every one of its persistence points.
        let ccfg = CrashConfig::new(img.child_seed()).images_per_point(2);
        let oimg2 = oimg.clone();
        let v = ctx.v;
        let rep = enumerate(
            &ccfg,
            SimRegion::from_image(&img.bytes),
            move |r| {
                let o = Arc::new(MemOrigin::from_bytes(oimg2).with_name(ORIGIN_NAME));
                let e =
                    Engine::open(r.clone() as Arc<dyn PmemRegion>, o, cfg(&v)).expect("recovery");
                e.close().expect("close");
            },
            |inner| {
                let r2 = Arc::new(SimRegion::from_image(&inner.bytes));
                let o = Arc::new(MemOrigin::from_bytes(oimg.clone()).with_name(ORIGIN_NAME));
                let e = Engine::open(r2, o, inspect_cfg(&ctx.v))
                    .map_err(|e| format!("second recovery: {e}"))?;
                verify_content(&e, acked, inflight).map(|_| ())
            },
        );
        *images += rep.images;
        if !rep.is_ok() {
            return Err(ctx_msg(format!("crash during recovery: {rep}")));
        }
    }

    // Where a wrong byte's block stood in the crash image, for the report.
    let pre_dump = check::dump(&region).map_err(|e| e.to_string())?;
    let oimg_copy = oimg.clone();
    let bsz = ctx.v.block as usize;
    let explain = move |msg: String| -> String {
        let Some(byte) = msg
            .strip_prefix("byte ")
            .and_then(|r| r.split(' ').next())
            .and_then(|b| b.parse::<usize>().ok())
        else {
            return msg;
        };
        let block = (byte / bsz) as u64;
        let maps: Vec<_> = pre_dump
            .mappings
            .iter()
            .filter(|m| m.block == block)
            .collect();
        format!(
            "{msg} [block {block}: crash-image mappings {maps:?}, watermark {}, origin byte {}]",
            pre_dump.watermark, oimg_copy[byte]
        )
    };
    let region = Arc::new(region);
    let origin = Arc::new(MemOrigin::from_bytes(oimg).with_name(ORIGIN_NAME));
    let engine = Engine::open(
        region.clone() as Arc<dyn PmemRegion>,
        origin.clone(),
        inspect_cfg(&ctx.v),
    )
    .map_err(|e| ctx_msg(format!("recovery failed: {e}")))?;
    // No block is dirty unless a write made it so.
    let dump = check::dump(&*region).map_err(|e| e.to_string())?;
    if let Some(m) = dump
        .mappings
        .iter()
        .find(|m| m.dirty && !written[m.block as usize])
    {
        return Err(ctx_msg(format!(
            "block {} is dirty but no write touched it",
            m.block
        )));
    }
    let got = verify_content(&engine, acked, inflight).map_err(|e| ctx_msg(explain(e)))?;
    if deep {
        // No dirty data lost: write everything back and compare the origin.
        engine
            .flush_all(0, &mut |_, _| {})
            .map_err(|e| ctx_msg(format!("flush_all: {e}")))?;
        if engine.dirty_blocks() != 0 {
            return Err(ctx_msg("dirty blocks remain after flush_all".into()));
        }
        if origin.current() != got {
            return Err(ctx_msg(
                "origin differs from the cache after writing everything back".into(),
            ));
        }
        // Clean restart stays warm and identical.
        let cached = engine.stats().occupied;
        engine.close().map_err(|e| e.to_string())?;
        let e2 = Engine::open(region.clone() as Arc<dyn PmemRegion>, origin, cfg(&ctx.v))
            .map_err(|e| e.to_string())?;
        if e2.stats().occupied != cached {
            return Err(ctx_msg(format!(
                "restart was not warm: {} cached before, {} after",
                cached,
                e2.stats().occupied
            )));
        }
        verify_content(&e2, &got, &[]).map_err(ctx_msg)?;
    }
    Ok(())
}

/// One seed of one variant; returns images checked.
fn run_seed(v: Variant, seed: u64) -> u64 {
    let mut rng = SmallRng::seed_from_u64(seed);
    let part = (v.origin_len / v.threads) as u64 / v.block as u64 * v.block as u64;
    let ops: Vec<Vec<Op>> = (0..v.threads)
        .map(|t| gen_ops(&v, &mut rng, t as u64 * part, part))
        .collect();
    let origin = Arc::new(MemOrigin::new(v.origin_len as u64).with_name(ORIGIN_NAME));
    // Format outside the enumeration: crashes inside `format` are not a promise.
    let base = SimRegion::new(v.region_len);
    Engine::format(&base, &*origin, v.block).expect("format");
    let formatted = base.durable_image();
    let model = Arc::new(Mutex::new(Model {
        acked: vec![0; v.origin_len],
        written: vec![false; v.origin_len.div_ceil(v.block as usize)],
        inflight: vec![None; v.threads],
        ..Default::default()
    }));
    let ctx = Ctx {
        v,
        origin: origin.clone(),
        model: model.clone(),
    };
    let ccfg = CrashConfig::new(seed)
        .images_per_point(3)
        .stride(v.stride)
        .max_violations(1);
    let mut extra = 0u64;
    let mut n = 0u64;
    let report = enumerate(
        &ccfg,
        SimRegion::from_image(&formatted),
        |r| {
            let e = Engine::open(
                r.clone() as Arc<dyn PmemRegion>,
                origin.clone() as Arc<dyn Origin>,
                cfg(&v),
            )
            .expect("open");
            std::thread::scope(|sc| {
                for (t, ops) in ops.iter().enumerate() {
                    let (e, model) = (&e, &model);
                    sc.spawn(move || run_workload(e, ops, model, v.block as u64, t));
                }
            });
        },
        |img| {
            n += 1;
            check_image(
                &ctx,
                img,
                n.is_multiple_of(29),
                n.is_multiple_of(97),
                &mut extra,
            )
        },
    );
    assert!(
        report.is_ok(),
        "crash violation in variant {} (replay with PMCACHE_SEED={seed}): {report}",
        v.name
    );
    report.images + extra
}

fn run_variant(v: Variant, target: u64, first_seed: u64) -> (u64, u64) {
    let mut images = 0;
    let mut seeds = 0;
    let mut seed = first_seed;
    while images < target {
        images += run_seed(v, seed);
        seed += 1;
        seeds += 1;
    }
    (images, seeds)
}

/// Keep large buffers on the heap: every image allocates several
/// region-sized buffers, and mmap/munmap for each would dominate the run.
fn tune_malloc() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only adjusts glibc allocator thresholds.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 256 << 20);
        mallopt(M_TRIM_THRESHOLD, 512 << 20);
    }
}

#[test]
fn crash_suite() {
    tune_malloc();
    let target: u64 = std::env::var("PMCACHE_CRASH_IMAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let base_seed: u64 = std::env::var("PMCACHE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        });
    eprintln!("crash suite: base seed {base_seed} (replay with PMCACHE_SEED={base_seed})");
    let t = Instant::now();
    let small_target = target * 3 / 5;
    let conc_target = target / 5;
    let large_target = target - small_target - conc_target;
    // One thread per variant keeps both cores busy to the end.
    let large = std::thread::spawn(move || run_variant(LARGE, large_target, base_seed));
    let conc = std::thread::spawn(move || run_variant(CONCURRENT, conc_target, base_seed));
    let (small_images, small_seeds) = run_variant(SMALL, small_target, base_seed);
    let (conc_images, conc_seeds) = conc.join().expect("concurrent variant");
    let (large_images, large_seeds) = large.join().expect("large variant");
    let total = small_images + large_images + conc_images;
    eprintln!(
        "small: {small_images} images/{small_seeds} seeds; concurrent: {conc_images}/{conc_seeds}; large: {large_images}/{large_seeds}; {:.1}s",
        t.elapsed().as_secs_f64()
    );
    println!("crash images: {total}, violations: 0");
    assert!(total >= target);
}
