//! Simulated power loss at every persistence point (contract §3).
//!
//! Random workloads (writes of 1 byte to 1 MiB, from memory and as the NBD
//! server makes them, staged or through `write_with`, with and without FUA;
//! overwrites, zeroes, trims, reads, writeback, eviction, mode switches) run
//! against the engine on the crash simulator. At each persistence point, crash images are reopened and
//! checked against a model of what was acknowledged: promises 3–6, the
//! offline check, no lost dirty data, no spurious dirty blocks, a warm cache
//! whose dirty set is exactly the media's, and clean blocks that the origin
//! really holds; some images also crash their own recovery, and some are
//! written back in full and the origin compared. Variants cover several
//! shards with requests across them, the background writeback thread, a
//! flaky origin, every cache mode, and crash → recover → write → crash
//! chains several generations deep.
//!
//! Ordered writeback (contract §4) is checked where each write's epoch is
//! exact, the variants with one workload thread: the client's writes and
//! FLUSHes are recorded in an `EpochHistory`, and the origin must be a
//! power-cut state of them after every operation it accepts during the
//! workload, as each crash leaves it, and after every operation while a
//! recovered image is written back in full.
//!
//! `PMCACHE_CRASH_IMAGES=N` sets the total number of images (default
//! 20,000). A violation prints the seed; `PMCACHE_SEED=<seed>` replays it.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use std::time::Duration;

use pmcache_engine::check;
use pmcache_engine::{CacheMode, Engine, EngineConfig, Stage, WritebackOrder};
use pmcache_origin::{MemOrigin, Origin};
use pmcache_pmem::sim::{enumerate, CrashConfig, CrashImage};
use pmcache_pmem::{PersistMode, PmemRegion, SimRegion};
use pmcache_testkit::EpochHistory;
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
    shards: u32,
    /// Run the background writeback thread during the workload.
    background_writeback: bool,
    /// Fail one origin request in this many (0: a healthy origin).
    origin_fail_one_in: u64,
    /// Switch among all four cache modes during the workload.
    modes: bool,
    /// The origin keeps every write it accepted (a NAS that did not lose
    /// power); otherwise unflushed origin writes may be lost as well.
    origin_survives: bool,
    /// Crash → recover → more writes → crash, this many times.
    generations: usize,
    /// The region says it persists with msync (the simulation is the same),
    /// so the engine takes the paths of a cache file on a disk: group
    /// commit, fills through the bounce buffer, the promotion filter.
    msync: bool,
    /// Check ordered writeback (contract §4): the origin stays a power-cut
    /// state of the client's epochs after every origin operation, live and
    /// while a recovered crash image is written back. Exact only with one
    /// workload thread, where each write's epoch is known (with two, a
    /// write in flight across another thread's FLUSH could be in either).
    ordered_check: bool,
}

const BASE: Variant = Variant {
    name: "",
    block: 512,
    max_request: 64 << 10,
    region_len: 12288 + 700 * 576 + 4096,
    origin_len: 640 << 10,
    ops: 80,
    stride: 3,
    threads: 1,
    shards: 1,
    background_writeback: false,
    origin_fail_one_in: 0,
    modes: false,
    origin_survives: false,
    generations: 1,
    msync: false,
    ordered_check: true,
};

/// Small blocks, small cache under eviction pressure: many cheap images.
const SMALL: Variant = Variant {
    name: "small",
    ..BASE
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
    ..BASE
};
/// Two threads at once: cross-thread flush and fence ordering.
const CONCURRENT: Variant = Variant {
    name: "concurrent",
    ops: 50,
    threads: 2,
    ordered_check: false,
    ..BASE
};
/// What production runs: four shards over a 4 MiB origin (requests cross
/// the 1 MiB chunks that map to shards), the background writeback thread,
/// a flaky origin, and three generations of crash and recovery; with the
/// engine's msync-mode paths, as `pmcache serve` runs without pmem.
const PRODUCTION: Variant = Variant {
    name: "production",
    region_len: 12288 + 1200 * 576 + 4096,
    origin_len: 4 << 20,
    ops: 20,
    threads: 2,
    stride: 5,
    shards: 4,
    background_writeback: true,
    origin_fail_one_in: 40,
    generations: 3,
    msync: true,
    ordered_check: false,
    ..BASE
};
/// Production with one client thread, where every write's epoch is exact:
/// ordered writeback checked with the background writer, a flaky origin and
/// crash chains (the client's epochs continue across each crash).
const SERIAL: Variant = Variant {
    name: "serial",
    ops: 30,
    threads: 1,
    ordered_check: true,
    ..PRODUCTION
};
/// Every cache mode, switched at random, with FUA and a flaky origin.
const MODES: Variant = Variant {
    name: "modes",
    region_len: 12288 + 1200 * 576 + 4096,
    origin_len: 2 << 20,
    ops: 24,
    stride: 9,
    threads: 2,
    shards: 4,
    background_writeback: true,
    origin_fail_one_in: 50,
    modes: true,
    origin_survives: true,
    ordered_check: false,
    ..BASE
};

const ORIGIN_NAME: &str = "crash-origin";

#[derive(Clone, Debug)]
enum Op {
    /// `recv`: through `write_with`, as the NBD server receives a payload.
    Write {
        off: u64,
        data: Vec<u8>,
        fua: bool,
        recv: bool,
    },
    Zero {
        off: u64,
        len: u64,
        fua: bool,
    },
    Trim {
        off: u64,
        len: u64,
        fua: bool,
    },
    Read {
        off: u64,
        len: u64,
    },
    Writeback(usize),
    Flush,
    SetMode(CacheMode),
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
    /// With `ordered_check`: the client's writes by epoch, the one in flight
    /// included (the engine may pass it to the origin before it returns).
    history: Option<EpochHistory>,
    /// The first ordered-writeback violation the live origin showed.
    order_violation: Option<String>,
    /// Requests finished so far: a check's origin copy and its model are one
    /// cut only if none finished in between.
    finished: u64,
}

/// For opening crash images: no background thread, so every persistence
/// point comes from the thread being checked.
fn cfg(v: &Variant) -> EngineConfig {
    EngineConfig {
        max_request: v.max_request,
        background_writeback: false,
        writeback_batch: 64,
        shards: Some(v.shards),
        // Short, so the workloads' sequential runs bypass the cache even
        // though FLUSH and FUA restart a write stream's count (3 blocks:
        // about as many bypassed writes as 8 gave before that rule).
        sequential_cutoff: 3 * v.block as u64,
        writeback_order: WritebackOrder::Ordered,
        ..Default::default()
    }
}

/// For the workload.
fn workload_cfg(v: &Variant) -> EngineConfig {
    EngineConfig {
        background_writeback: v.background_writeback,
        writeback_pause: Duration::from_micros(200),
        writeback_batch: 16,
        ..cfg(v)
    }
}

/// For inspecting a recovered cache: reads change nothing, and reads of
/// clean blocks come from the cache whatever mode it was left in.
fn inspect_cfg(v: &Variant) -> EngineConfig {
    EngineConfig {
        promote_reads: false,
        mode: Some(CacheMode::Writeback),
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
    let mut next = 0u64;
    (0..v.ops)
        .map(|_| {
            // Whole aligned blocks, one to four: what most clients send,
            // the engine's fast path, and the server's staged writes.
            let whole = rng.gen_range(0..100) < 25;
            let l = if whole {
                bs * rng.gen_range(1..=4)
            } else {
                len(rng)
            }
            .min(size);
            let off = if next + l <= size && rng.gen_bool(0.3) {
                // Where the last op ended: sequential streams, which bypass
                // the cache past the cutoff (whole blocks stay aligned).
                if whole {
                    next / bs * bs
                } else {
                    next
                }
            } else if whole || rng.gen_bool(0.3) {
                rng.gen_range(0..size / bs) * bs
            } else {
                rng.gen_range(0..=size - l)
            };
            next = off + l;
            // Across a 1 MiB chunk boundary (two shards) where there is one.
            let chunks = (base + size) >> 20;
            let off = if chunks > base >> 20 && rng.gen_bool(0.3) {
                let edge = rng.gen_range((base >> 20) + 1..=chunks) << 20;
                (edge - base)
                    .saturating_sub(rng.gen_range(1..=l))
                    .min(size - 1)
            } else {
                off
            };
            let l = l.min(size - off).max(1);
            let off = base + off;
            let fua = rng.gen_bool(0.15);
            match rng.gen_range(0..100) {
                0..=54 => {
                    let mut data = vec![0u8; l as usize];
                    rng.fill(&mut data[..]);
                    let recv = rng.gen_bool(0.5);
                    Op::Write {
                        off,
                        data,
                        fua,
                        recv,
                    }
                }
                55..=62 => Op::Zero { off, len: l, fua },
                63..=67 => Op::Trim { off, len: l, fua },
                68..=82 => Op::Read { off, len: l },
                83..=93 => Op::Writeback(rng.gen_range(1..200)),
                94..=96 if v.modes => Op::SetMode(
                    [
                        CacheMode::Writeback,
                        CacheMode::Writethrough,
                        CacheMode::Writearound,
                        CacheMode::Passthrough,
                    ][rng.gen_range(0..4)],
                ),
                _ => Op::Flush,
            }
        })
        .collect()
}

fn describe(op: &Op) -> String {
    match op {
        Op::Write {
            off,
            data,
            fua,
            recv,
        } => format!("write {off}+{} fua={fua} recv={recv}", data.len()),
        Op::Zero { off, len, fua } => format!("zero {off}+{len} fua={fua}"),
        Op::Trim { off, len, fua } => format!("trim {off}+{len} fua={fua}"),
        Op::Read { off, len } => format!("read {off}+{len}"),
        Op::Writeback(n) => format!("writeback {n}"),
        Op::Flush => "flush".into(),
        Op::SetMode(m) => format!("mode {m}"),
    }
}

/// Retry what a flaky origin failed, as a client would; an error that
/// persists is a bug.
fn retry<T>(what: &str, mut f: impl FnMut() -> pmcache_engine::Result<T>) -> T {
    let mut last = None;
    for _ in 0..5000 {
        match f() {
            Ok(t) => return t,
            Err(e) => last = Some(e),
        }
    }
    panic!("{what} kept failing: {last:?}");
}

/// A write as the NBD server makes it: staged (slots taken without waiting,
/// the payload received into them), then committed; a write that cannot be
/// staged goes the one-call way (`write_with`), as the server's does.
fn write_staged(
    engine: &Arc<Engine>,
    off: u64,
    data: &[u8],
    fua: bool,
) -> pmcache_engine::Result<()> {
    let len = data.len() as u64;
    match engine.stage_write(off, len, fua, &mut |s| receive(data, s))? {
        Stage::Staged(w) => w.commit(),
        Stage::WouldWait => engine.write_with(off, len, fua, &mut |s| receive(data, s)),
    }
}

/// What the server's `recv` does: fill the engine's slices from the payload.
fn receive(data: &[u8], slices: &mut [std::io::IoSliceMut<'_>]) -> std::io::Result<()> {
    let mut pos = 0;
    for s in slices.iter_mut() {
        let n = s.len();
        s.copy_from_slice(&data[pos..pos + n]);
        pos += n;
    }
    assert_eq!(pos, data.len(), "slices cover the payload");
    Ok(())
}

fn run_workload(engine: &Arc<Engine>, ops: &[Op], model: &Mutex<Model>, bs: u64, me: usize) {
    for op in ops {
        let (range, new) = match op {
            Op::Write { off, data, .. } => (Some(*off), Some(data.clone())),
            Op::Zero { off, len, .. } | Op::Trim { off, len, .. } => {
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
                if let Some(h) = &mut m.history {
                    h.write(off, new);
                }
                m.inflight[me] = Some((off, new.clone()));
            }
        }
        match op {
            Op::Write {
                off,
                data,
                fua,
                recv: true,
            } => retry("write", || write_staged(engine, *off, data, *fua)),
            Op::Write { off, data, fua, .. } => retry("write", || engine.write(*off, data, *fua)),
            Op::Zero { off, len, fua } => retry("zero", || engine.write_zeroes(*off, *len, *fua)),
            Op::Trim { off, len, fua } => retry("trim", || engine.trim(*off, *len, *fua)),
            Op::Read { off, len } => {
                let mut buf = vec![0u8; *len as usize];
                retry("read", || engine.read(*off, &mut buf));
                let m = model.lock().unwrap();
                assert!(
                    buf == m.acked[*off as usize..(*off + *len) as usize],
                    "read {off}+{len} returned stale data"
                );
            }
            // A failed writeback or flush keeps everything dirty: nothing
            // for the model to learn.
            Op::Writeback(n) => {
                let _ = engine.writeback_step(*n);
            }
            // A FLUSH that completes ends the client's epoch.
            Op::Flush => {
                if engine.flush().is_ok() {
                    if let Some(h) = &mut model.lock().unwrap().history {
                        h.flush();
                    }
                }
            }
            Op::SetMode(m) => retry("mode switch", || engine.set_mode(*m)),
        }
        let mut m = model.lock().unwrap();
        if let Some((off, new)) = m.inflight[me].take() {
            m.acked[off as usize..off as usize + new.len()].copy_from_slice(&new);
        }
        m.finished += 1;
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

/// Ordered writeback, as far as a crash image shows it: the live origin
/// stayed valid up to now, and the origin as the crash left it is valid.
fn check_order_at_crash(m: &Model, oimg: &[u8]) -> Result<(), String> {
    if let Some(v) = &m.order_violation {
        return Err(format!("ordered writeback: {v}"));
    }
    match &m.history {
        Some(h) => h
            .check(oimg, &[])
            .map(|_| ())
            .map_err(|e| format!("ordered writeback: the origin as the crash left it: {e}")),
        None => Ok(()),
    }
}

/// Check the live origin after every operation it accepts against the
/// model's history; the first violation is kept in the model, with the op
/// it happened in.
fn watch_live_origin(origin: &MemOrigin, model: &Arc<Mutex<Model>>) {
    let model = model.clone();
    origin.set_observer(Some(Box::new(move |durable, pending| {
        let mut m = model.lock().unwrap();
        let (Some(h), None) = (&m.history, &m.order_violation) else {
            return;
        };
        let Err(e) = h.check(durable, pending) else {
            return;
        };
        let during = m.ops.last().cloned().unwrap_or_default();
        m.order_violation = Some(format!("the live origin, during '{during}': {e}"));
    })));
}

/// Check `origin` against a fixed `history` after every operation it
/// accepts; the first violation lands in the returned slot.
fn watch_origin(origin: &MemOrigin, history: EpochHistory) -> Arc<Mutex<Option<String>>> {
    let seen = Arc::new(Mutex::new(None));
    let slot = seen.clone();
    origin.set_observer(Some(Box::new(move |durable, pending| {
        let mut slot = slot.lock().unwrap();
        if slot.is_none() {
            *slot = history.check(durable, pending).err();
        }
    })));
    seen
}

struct Ctx {
    v: Variant,
    origin: Arc<MemOrigin>,
    model: Arc<Mutex<Model>>,
}

/// What the origin holds after the crash.
/// The origin and the model as one cut. Only the thread at the persistence
/// point is paused: another may finish a request that touched only the
/// origin (writearound) between the two reads, and a model read after it
/// would count that write acknowledged while the origin copy lacks it.
/// `widen` waits between the two reads, so that the suite keeps proving the
/// cut (a bare model read failed within a few seeds of `modes` that way).
fn origin_and_model<'a>(
    ctx: &'a Ctx,
    img: &CrashImage,
    widen: bool,
) -> (MutexGuard<'a, Model>, Vec<u8>) {
    loop {
        // Not nested: the live-origin watch takes the model lock under the
        // origin's.
        let before = ctx.model.lock().unwrap().finished;
        let oimg = origin_image(ctx, img);
        if widen {
            std::thread::sleep(Duration::from_millis(1));
        }
        let m = ctx.model.lock().unwrap();
        if m.finished == before {
            return (m, oimg);
        }
    }
}

fn origin_image(ctx: &Ctx, img: &CrashImage) -> Vec<u8> {
    if ctx.v.origin_survives {
        return ctx.origin.current();
    }
    let mut orng = SmallRng::seed_from_u64(img.child_seed());
    ctx.origin.crash_image(|_| orng.gen_bool(0.5))
}

/// Recovery keeps the cache warm and its dirty set exact: every block whose
/// newest version in the crash image is committed is still cached, as dirty
/// as it was; a block with newer versions still in flight ends up on one of
/// those or on the committed one. And a block recovered clean is what the
/// origin holds.
fn check_warm_and_exact(
    engine: &Engine,
    before: &check::Dump,
    after: &check::Dump,
    content: &[u8],
    origin: &[u8],
    bs: usize,
) -> Result<(), String> {
    use std::collections::HashMap;
    let mut cands: HashMap<u64, Vec<&check::Mapping>> = HashMap::new();
    for m in &before.mappings {
        cands.entry(m.block).or_default().push(m);
    }
    let mut now: HashMap<u64, &check::Mapping> = HashMap::new();
    for m in &after.mappings {
        let e = now.entry(m.block).or_insert(m);
        if m.seq > e.seq {
            *e = m;
        }
    }
    for (block, vs) in &cands {
        let committed = vs.iter().filter(|m| !m.pending).max_by_key(|m| m.seq);
        let floor = committed.map_or(0, |m| m.seq);
        let allowed: Vec<&&check::Mapping> = vs.iter().filter(|m| m.seq >= floor).collect();
        match now.get(block) {
            None if committed.is_some() => {
                return Err(format!(
                    "block {block} was cached ({committed:?}) but recovery dropped it"
                ))
            }
            Some(m)
                if !allowed
                    .iter()
                    .any(|c| c.seq == m.seq && c.dirty == m.dirty && c.zero == m.zero) =>
            {
                return Err(format!(
                    "block {block} recovered as {m:?}; the crash image allowed {allowed:?}"
                ))
            }
            _ => {}
        }
    }
    if let Some(m) = now.values().find(|m| !cands.contains_key(&m.block)) {
        return Err(format!("recovery produced a mapping from nothing: {m:?}"));
    }
    // The engine's own view (DRAM) agrees with the media it recovered.
    let st = engine.stats();
    let dirty = now.values().filter(|m| m.dirty).count() as u64;
    if (st.occupied, st.dirty) != (now.len() as u64, dirty) {
        return Err(format!(
            "recovered engine has {} cached / {} dirty blocks; its media maps {} / {}",
            st.occupied,
            st.dirty,
            now.len(),
            dirty
        ));
    }
    for m in now.values().filter(|m| !m.dirty) {
        let lo = m.block as usize * bs;
        let hi = (lo + bs).min(content.len());
        if content[lo..hi] != origin[lo..hi] {
            return Err(format!(
                "block {} is clean in the cache but the origin holds other data",
                m.block
            ));
        }
    }
    Ok(())
}

fn check_image(
    ctx: &Ctx,
    img: &CrashImage,
    (m, oimg): (MutexGuard<'_, Model>, Vec<u8>),
    deep: bool,
    nested: bool,
    images: &mut u64,
) -> Result<(), String> {
    let (acked, inflight, written, ops) = (&m.acked, &m.inflight, &m.written, &m.ops);
    let ctx_msg = |e: String| format!("{e}; last ops: {:?}", &ops[ops.len().saturating_sub(8)..]);
    check_order_at_crash(&m, &oimg).map_err(ctx_msg)?;

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
    // The origin as recovery found it: an inspecting open writes nothing to it.
    let oimg_kept = oimg.clone();
    let bsz = ctx.v.block as usize;
    let explain = |msg: String| -> String {
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
            pre_dump.watermark, oimg_kept[byte]
        )
    };
    let region = Arc::new(region);
    let origin = Arc::new(MemOrigin::from_bytes(oimg).with_name(ORIGIN_NAME));
    // Writing a recovered image back keeps the origin ordered too.
    let order = match (&m.history, deep) {
        (Some(h), true) => Some(watch_origin(&origin, h.clone())),
        _ => None,
    };
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
    check_warm_and_exact(&engine, &pre_dump, &dump, &got, &oimg_kept, bsz).map_err(ctx_msg)?;
    if deep {
        // No dirty data lost: write everything back and compare the origin.
        engine
            .flush_all(0, &mut |_, _| {})
            .map_err(|e| ctx_msg(format!("flush_all: {e}")))?;
        if engine.dirty_blocks() != 0 {
            return Err(ctx_msg("dirty blocks remain after flush_all".into()));
        }
        if let Some(v) = order.and_then(|o| o.lock().unwrap().take()) {
            return Err(ctx_msg(format!(
                "ordered writeback: while a recovered crash image was written back: {v}"
            )));
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

/// Where a generation starts: a cache image, the origin's content, and
/// what the model knows.
struct Start {
    cache: Vec<u8>,
    origin: Vec<u8>,
    /// Content as the previous generation's recovery showed it.
    content: Vec<u8>,
    written: Vec<bool>,
    /// With `ordered_check`: the client's history so far; epochs continue
    /// across a crash of the cache.
    history: Option<EpochHistory>,
}

/// One seed of one variant, every generation; returns images checked.
fn run_seed(v: Variant, seed: u64) -> u64 {
    let origin = MemOrigin::new(v.origin_len as u64).with_name(ORIGIN_NAME);
    // Format outside the enumeration: crashes inside `format` are not a promise.
    let base = SimRegion::new(v.region_len);
    Engine::format(&base, &origin, v.block).expect("format");
    let mut start = Start {
        cache: base.durable_image(),
        origin: origin.current(),
        content: vec![0; v.origin_len],
        written: vec![false; v.origin_len.div_ceil(v.block as usize)],
        history: v
            .ordered_check
            .then(|| EpochHistory::new(origin.current(), v.block as usize)),
    };
    let mut images = 0;
    for generation in 0..v.generations {
        let chain = generation + 1 < v.generations;
        let (n, next) = run_generation(v, seed, generation, &start, chain);
        images += n;
        let Some(next) = next else { break };
        start = next;
    }
    images
}

/// The cache a crash image recovers to, as the next generation's start.
fn recovered(
    v: &Variant,
    cache: Vec<u8>,
    origin: Vec<u8>,
    written: Vec<bool>,
    history: Option<EpochHistory>,
) -> Start {
    let region = Arc::new(SimRegion::from_image(&cache));
    let o = Arc::new(MemOrigin::from_bytes(origin.clone()).with_name(ORIGIN_NAME));
    let e = Engine::open(region.clone() as Arc<dyn PmemRegion>, o, inspect_cfg(v))
        .expect("recovery of the chosen image");
    let content = read_all(&e, v.origin_len);
    let history = history.map(|h| resync(h, &content));
    Start {
        cache,
        origin,
        content,
        written,
        history,
    }
}

/// The history recorded the write in flight at the crash; if recovery
/// dropped it (which `verify_content` allowed), what the client reads now
/// is its old content: record that as a write in the same epoch, so later
/// partial writes merge with the right bytes. (The dropped value itself
/// stays valid for that epoch: a slight leniency, never a false alarm.)
fn resync(mut h: EpochHistory, content: &[u8]) -> EpochHistory {
    let image = h.image();
    if let Some(lo) = (0..content.len()).find(|&i| content[i] != image[i]) {
        let hi = (lo..content.len())
            .rfind(|&i| content[i] != image[i])
            .unwrap_or(lo);
        h.write(lo as u64, &content[lo..=hi]);
    }
    h
}

fn read_all(e: &Engine, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    let step = e.max_request() as usize;
    for off in (0..len).step_by(step) {
        let n = step.min(len - off);
        e.read(off as u64, &mut got[off..off + n]).expect("read");
    }
    got
}

/// One enumeration from `start`. With `chain`, also picks one crash image
/// at random to start the next generation from.
fn run_generation(
    v: Variant,
    base_seed: u64,
    generation: usize,
    start: &Start,
    chain: bool,
) -> (u64, Option<Start>) {
    let seed = base_seed ^ (generation as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut rng = SmallRng::seed_from_u64(seed);
    let part = (v.origin_len / v.threads) as u64 / v.block as u64 * v.block as u64;
    let ops: Vec<Vec<Op>> = (0..v.threads)
        .map(|t| gen_ops(&v, &mut rng, t as u64 * part, part))
        .collect();
    let origin = Arc::new(MemOrigin::from_bytes(start.origin.clone()).with_name(ORIGIN_NAME));
    let model = Arc::new(Mutex::new(Model {
        acked: start.content.clone(),
        written: start.written.clone(),
        inflight: vec![None; v.threads],
        history: start.history.clone(),
        ..Default::default()
    }));
    assert!(
        !v.ordered_check || v.threads == 1,
        "the ordered check is exact only with one workload thread"
    );
    if v.ordered_check {
        watch_live_origin(&origin, &model);
    }
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
    type Chosen = (Vec<u8>, Vec<u8>, Vec<bool>, Option<EpochHistory>);
    let mut chosen: Option<Chosen> = None;
    let mut pick = SmallRng::seed_from_u64(seed ^ 0xC4A1);
    let report = enumerate(
        &ccfg,
        SimRegion::from_image(&start.cache).reporting(if v.msync {
            PersistMode::Msync
        } else {
            PersistMode::Simulated
        }),
        |r| {
            let e = Engine::open(
                r.clone() as Arc<dyn PmemRegion>,
                origin.clone() as Arc<dyn Origin>,
                workload_cfg(&v),
            )
            .expect("open");
            origin.set_fail_one_in(v.origin_fail_one_in);
            std::thread::scope(|sc| {
                for (t, ops) in ops.iter().enumerate() {
                    let (e, model) = (&e, &model);
                    sc.spawn(move || run_workload(e, ops, model, v.block as u64, t));
                }
            });
            e.stop_writeback();
            origin.set_fail_one_in(0);
        },
        |img| {
            n += 1;
            // The workload is paused inside a persistence point while we look.
            let widen = ctx.v.threads > 1 && n.is_multiple_of(16);
            let (m, oimg) = origin_and_model(&ctx, img, widen);
            // Reservoir sampling: each image is equally likely to be chosen.
            if chain && pick.gen_range(0..n) == 0 {
                let (written, history) = (m.written.clone(), m.history.clone());
                chosen = Some((img.bytes.clone(), oimg.clone(), written, history));
            }
            check_image(
                &ctx,
                img,
                (m, oimg),
                n.is_multiple_of(29),
                n.is_multiple_of(97),
                &mut extra,
            )
        },
    );
    assert!(
        report.is_ok(),
        "crash violation in variant {}, generation {} (replay with PMCACHE_SEED={base_seed}): {report}",
        v.name,
        generation + 1
    );
    if let Some(violation) = model.lock().unwrap().order_violation.take() {
        panic!(
            "ordered writeback violation in variant {}, generation {} (replay with PMCACHE_SEED={base_seed}): {violation}",
            v.name,
            generation + 1
        );
    }
    let next = chosen
        .map(|(cache, origin, written, history)| recovered(&v, cache, origin, written, history));
    (report.images + extra, next)
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
    let base_seed: u64 = pmcache_testkit::seed();
    eprintln!("crash suite: base seed {base_seed} (replay with PMCACHE_SEED={base_seed})");
    let t = Instant::now();
    // Share of the images per variant (percent), and one thread per pair of
    // variants keeps both cores busy to the end.
    let plan = [
        (SMALL, 25),
        (PRODUCTION, 10),
        (LARGE, 10),
        (SERIAL, 10),
        (CONCURRENT, 25),
        (MODES, 20),
    ];
    let only = std::env::var("PMCACHE_CRASH_VARIANTS").ok();
    let run = move |vs: &[(Variant, u64)]| -> Vec<(Variant, u64, u64, f64)> {
        vs.iter()
            .filter(|(v, _)| {
                only.as_ref()
                    .is_none_or(|o| o.split(',').any(|n| n == v.name))
            })
            .map(|&(v, pct)| {
                let t = Instant::now();
                let (images, seeds) = run_variant(v, target * pct / 100, base_seed);
                (v, images, seeds, t.elapsed().as_secs_f64())
            })
            .collect()
    };
    let (first, second) = plan.split_at(4);
    let second = second.to_vec();
    let run2 = run.clone();
    let other = std::thread::spawn(move || run2(&second));
    let mut results = run(first);
    results.extend(other.join().expect("variants"));
    let mut total = 0;
    for (v, images, seeds, secs) in &results {
        eprintln!("{}: {images} images / {seeds} seeds in {secs:.1}s", v.name);
        total += images;
    }
    eprintln!("{:.1}s", t.elapsed().as_secs_f64());
    println!("crash images: {total}, violations: 0");
    assert!(total >= target || std::env::var("PMCACHE_CRASH_VARIANTS").is_ok());
}
