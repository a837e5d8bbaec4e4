//! Ordered writeback (contract §4, issue 15): at every moment the origin is a
//! state a plain disk could have shown after a power cut — some epoch k
//! such that every block holds its value at the end of epoch k-1 or a value
//! written in epoch k (an epoch: the writes between two completed FLUSHes).
//!
//! A random client workload (whole and partial blocks, multi-block requests,
//! zeroes, sequential streams that bypass the cache, FUA, a FLUSH every few
//! writes) runs against an engine whose writeback is driven by hand in
//! small steps, interleaved with more writes. The origin's observer checks
//! it against the client's history (`EpochHistory`) after every write,
//! write_zeroes and flush it accepts, including what a power loss of the
//! origin could drop. Unordered writeback must be caught (the checker can
//! fail); ordered writeback must never be.
//!
//! A failure prints the seed; `PMCACHE_SEED=<seed>` replays it.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

use std::sync::{Arc, Mutex};

use pmcache_engine::{Engine, EngineConfig, WritebackOrder};
use pmcache_origin::{MemOrigin, Origin};
use pmcache_pmem::{PmemRegion, SimRegion};
use pmcache_testkit::EpochHistory;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const BS: u64 = 512;
const ORIGIN: u64 = 256 << 10;
/// Cache slots: fewer than the origin's blocks, so a full cache makes
/// writers wait for (inline) writeback too.
const SLOTS: usize = 300;
const OPS: usize = 400;
/// Ops at the start with no writeback: several epochs pile up dirty.
const BURST: usize = 60;
const SEEDS: [u64; 6] = [1, 2, 3, 4, 5, 6];

/// What the client did, shared with the origin's observer.
struct Client {
    history: EpochHistory,
    /// Each op as it was issued, to say where a violation happened.
    ops: Vec<String>,
    violation: Option<String>,
    checks: u64,
}

type Shared = Arc<Mutex<Client>>;

/// How a run is set up.
#[derive(Clone, Copy, Debug)]
struct Setup {
    order: WritebackOrder,
    /// Sequential writes past a short cutoff go to the origin directly.
    streams: bool,
    /// Write everything back after each FLUSH: then only the current epoch
    /// is ever dirty, so any writeback order is valid (a control: the
    /// checker raises no false alarms against the real engine).
    drain: bool,
}

/// An engine over a fresh origin whose every accepted operation is checked.
fn open(setup: Setup, seed: u64) -> (Arc<Engine>, Arc<MemOrigin>, Shared) {
    let region = Arc::new(SimRegion::new(12288 + SLOTS * 576 + 4096));
    let origin = Arc::new(MemOrigin::new(ORIGIN).with_name("ordered"));
    Engine::format(&*region, &*origin, BS as u32).unwrap();
    let client = Arc::new(Mutex::new(Client {
        history: EpochHistory::new(origin.current(), BS as usize),
        ops: Vec::new(),
        violation: None,
        checks: 0,
    }));
    let c = client.clone();
    origin.set_observer(Some(Box::new(move |durable, pending| {
        observe(&c, seed, durable, pending)
    })));
    let cfg = EngineConfig {
        background_writeback: false,
        writeback_order: setup.order,
        max_request: 16 << 10,
        // Short, so the sequential streams bypass the cache (straight to
        // the origin); or never.
        sequential_cutoff: if setup.streams { 4 * BS } else { 0 },
        ..Default::default()
    };
    let engine = Engine::open(
        region as Arc<dyn PmemRegion>,
        origin.clone() as Arc<dyn Origin>,
        cfg,
    )
    .unwrap();
    (engine, origin, client)
}

/// Check the origin against the history; keep the first violation.
fn observe(client: &Mutex<Client>, seed: u64, durable: &[u8], pending: &[(u64, Vec<u8>)]) {
    let mut c = client.lock().unwrap();
    c.checks += 1;
    if c.violation.is_some() {
        return;
    }
    if let Err(e) = c.history.check(durable, pending) {
        let n = c.ops.len();
        let before = &c.ops[n.saturating_sub(6)..n.saturating_sub(1)];
        let during = c.ops.last().map_or("open", |s| s.as_str());
        c.violation = Some(format!(
            "seed {seed}, during op #{} ({during}), after {before:?}: {e}",
            n.saturating_sub(1)
        ));
    }
}

/// A client request's range: whole aligned blocks (one to eight), or any
/// bytes over up to four blocks; or, for a stream, where the last ended.
fn range(rng: &mut SmallRng, next: &mut u64) -> (u64, u64) {
    let (off, len) = match rng.gen_range(0..10) {
        0..=3 => (
            rng.gen_range(0..ORIGIN / BS) * BS,
            rng.gen_range(1..=8) * BS,
        ),
        4..=7 => (rng.gen_range(0..ORIGIN), rng.gen_range(1..=4 * BS)),
        _ => (*next % ORIGIN, rng.gen_range(1..=4) * BS),
    };
    let len = len.min(ORIGIN - off);
    *next = off + len;
    (off, len)
}

#[derive(Debug)]
enum Op {
    Write { off: u64, data: Vec<u8>, fua: bool },
    Zero { off: u64, len: u64, fua: bool },
    Flush,
    Writeback(usize),
}

/// A random client op, or with `wb` also a small writeback step.
fn gen_op(rng: &mut SmallRng, next: &mut u64, wb: bool) -> Op {
    let fua = rng.gen_bool(0.1);
    let (off, len) = range(rng, next);
    match rng.gen_range(0..100) {
        0..=54 => Op::Write {
            off,
            data: (0..len).map(|_| rng.gen()).collect(),
            fua,
        },
        55..=64 => Op::Zero { off, len, fua },
        80..=99 if wb => Op::Writeback(rng.gen_range(1..=4)),
        _ => Op::Flush,
    }
}

fn describe(op: &Op) -> String {
    match op {
        Op::Write { off, data, fua } => format!("write {off}+{} fua={fua}", data.len()),
        Op::Zero { off, len, fua } => format!("zero {off}+{len} fua={fua}"),
        Op::Flush => "flush".into(),
        Op::Writeback(n) => format!("writeback_step({n})"),
    }
}

/// Record `op` in the history (a write before it is issued: the engine may
/// pass it to the origin at once), then issue it.
fn apply(e: &Engine, client: &Shared, op: &Op, drain: bool) {
    {
        let mut c = client.lock().unwrap();
        c.ops.push(describe(op));
        match op {
            Op::Write { off, data, .. } => c.history.write(*off, data),
            Op::Zero { off, len, .. } => c.history.zero(*off, *len),
            Op::Flush | Op::Writeback(_) => {}
        }
    }
    match op {
        Op::Write { off, data, fua } => e.write(*off, data, *fua).unwrap(),
        Op::Zero { off, len, fua } => e.write_zeroes(*off, *len, *fua).unwrap(),
        Op::Flush => {
            e.flush().unwrap();
            if drain {
                e.flush_all(0, &mut |_, _| {}).unwrap();
            }
            // The epoch ends when the FLUSH completes.
            client.lock().unwrap().history.flush();
        }
        Op::Writeback(n) => {
            e.writeback_step(*n).unwrap();
        }
    }
}

/// The workload for one seed; then everything is written back. Returns the
/// first violation, if any, and how many origin states the observer saw.
fn run(setup: Setup, seed: u64) -> (Option<String>, u64) {
    let (e, origin, client) = open(setup, seed);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut next = 0;
    for i in 0..OPS {
        apply(
            &e,
            &client,
            &gen_op(&mut rng, &mut next, i >= BURST),
            setup.drain,
        );
    }
    client.lock().unwrap().ops.push("flush_all".into());
    e.flush_all(0, &mut |_, _| {}).unwrap();
    assert_eq!(e.dirty_blocks(), 0);
    let c = client.lock().unwrap();
    assert!(
        origin.current() == c.history.image(),
        "seed {seed}: the origin after writing everything back is not what the client wrote"
    );
    (c.violation.clone(), c.checks)
}

fn seeds() -> Vec<u64> {
    let mut s = SEEDS.to_vec();
    s.push(pmcache_testkit::seed());
    s
}

/// The checker can fail: writeback in any order mixes epochs on the origin.
/// (No bypassing streams here, so the violation is writeback's own.)
#[test]
fn unordered_writeback_is_caught() {
    for seed in seeds() {
        let setup = Setup {
            order: WritebackOrder::Unordered,
            streams: false,
            drain: false,
        };
        let (violation, checks) = run(setup, seed);
        assert!(checks > 0, "seed {seed}: the observer never ran");
        let v = violation.unwrap_or_else(|| {
            panic!("seed {seed}: unordered writeback passed {checks} checks (replay with PMCACHE_SEED={seed})")
        });
        assert!(
            v.contains("(writeback_step(") && v.contains("not a power-cut state"),
            "{v}"
        );
    }
}

/// The promise: ordered writeback never leaves an origin no power cut of
/// the client's disk could have produced, also when streams bypass the
/// cache.
#[test]
fn ordered_writeback_keeps_the_origin_a_power_cut_state() {
    for seed in seeds() {
        for streams in [false, true] {
            let setup = Setup {
                order: WritebackOrder::Ordered,
                streams,
                drain: false,
            };
            let (violation, checks) = run(setup, seed);
            if let Some(v) = violation {
                panic!("ordered writeback broke the origin (streams: {streams}; replay with PMCACHE_SEED={seed}): {v}");
            }
            assert!(
                checks > 100,
                "seed {seed}: only {checks} origin states seen"
            );
        }
    }
}

/// The control: with everything written back at each FLUSH, only the
/// current epoch is ever dirty, so even unordered writeback (and streams
/// straight to the origin) keeps the origin valid. A violation here is the
/// checker's or the test's fault, not the engine's.
#[test]
fn writeback_drained_at_every_flush_raises_no_alarm() {
    for seed in seeds() {
        let setup = Setup {
            order: WritebackOrder::Unordered,
            streams: true,
            drain: true,
        };
        let (violation, checks) = run(setup, seed);
        assert!(violation.is_none(), "{violation:?}");
        assert!(
            checks > 100,
            "seed {seed}: only {checks} origin states seen"
        );
    }
}
