//! Concurrency stress outside the simulator: many threads doing overlapping
//! reads, writes, zeroes and trims on a small cache in front of a slow,
//! sometimes failing origin, with background writeback and eviction, in
//! each cache mode. Every read, and the final content, is checked against
//! a log of the writes: a block may show only a version that was written,
//! and never one that an acknowledged write had superseded before the read
//! began (contract §2.4, §2.6).
//!
//! Every block a write covers carries a stamp (block, version) and a
//! pattern derived from it, so a read names the version it saw and a torn
//! block shows as a pattern mismatch. A test hook sleeps at random between
//! a miss's origin read and its publish, where the stale-fill race lived.
//!
//! `PMCACHE_STRESS_MS` sets the time per mode (default 1,500 ms).
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pmcache_engine::{CacheMode, Engine, EngineConfig, HookPoint};
use pmcache_origin::{MemOrigin, Origin};
use pmcache_pmem::{PmemRegion, SimRegion};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const BS: usize = 4096;
const BLOCKS: u64 = 1024;
/// Blocks the workload uses: several times the cache, so it evicts.
const HOT: u64 = 700;
const THREADS: usize = 6;
const NEVER: u64 = u64::MAX;

/// One write as the log knows it: logical times from one global clock.
#[derive(Clone, Copy)]
struct Rec {
    version: u64,
    zero: bool,
    start: u64,
    /// When it returned; `NEVER` while in flight.
    end: u64,
    /// It succeeded. A failed write may or may not have taken effect, so it
    /// may be seen, but it supersedes nothing.
    acked: bool,
}

struct Log {
    clock: AtomicU64,
    blocks: Vec<Mutex<Vec<Rec>>>,
}

impl Log {
    fn new() -> Log {
        let initial = Rec {
            version: 0,
            zero: false,
            start: 0,
            end: 0,
            acked: true,
        };
        Log {
            clock: AtomicU64::new(1),
            blocks: (0..BLOCKS).map(|_| Mutex::new(vec![initial])).collect(),
        }
    }

    fn now(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// May a read that ran from `rs` to `re` return version `seen` of `b`?
    /// Yes if that version was started before the read ended and no write
    /// acknowledged before the read began had started after it was
    /// acknowledged (which would have superseded it).
    fn allowed(&self, b: u64, seen: Seen, rs: u64, re: u64) -> Result<(), String> {
        let recs = self.blocks[b as usize].lock().unwrap();
        let valid = |r: &Rec| {
            r.start < re
                && !recs
                    .iter()
                    .any(|w| w.acked && w.end < rs && w.start > r.end)
        };
        let ok = match seen {
            Seen::Zero => recs.iter().any(|r| r.zero && valid(r)),
            Seen::Version(v) => recs.iter().any(|r| !r.zero && r.version == v && valid(r)),
            Seen::Torn => false,
        };
        if ok {
            return Ok(());
        }
        let newest = recs
            .iter()
            .filter(|w| w.acked && w.end < rs)
            .max_by_key(|w| w.end);
        Err(format!(
            "block {b}: read [{rs}, {re}] saw {seen:?}; newest acknowledged before it \
             (version, zero, start, end): {:?}",
            newest.map(|w| (w.version, w.zero, w.start, w.end))
        ))
    }
}

#[derive(Clone, Copy, Debug)]
enum Seen {
    Zero,
    Version(u64),
    Torn,
}

fn fill_block(buf: &mut [u8], b: u64, version: u64) {
    buf[..8].copy_from_slice(&b.to_le_bytes());
    buf[8..16].copy_from_slice(&version.to_le_bytes());
    let mut x = b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.rotate_left(29) ^ 1;
    for w in buf[16..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

fn decode(buf: &[u8], b: u64) -> Seen {
    if buf.iter().all(|&x| x == 0) {
        return Seen::Zero;
    }
    let version = u64::from_le_bytes(buf[8..16].try_into().unwrap());
    let mut want = vec![0u8; BS];
    fill_block(&mut want, b, version);
    if want == buf {
        Seen::Version(version)
    } else {
        Seen::Torn
    }
}

struct Rig {
    engine: Arc<Engine>,
    origin: Arc<MemOrigin>,
    log: Log,
    versions: AtomicU64,
    stop: AtomicBool,
    failure: Mutex<Option<String>>,
}

enum Kind {
    Write,
    Zero,
    Trim,
}

impl Rig {
    fn write(&self, rng: &mut SmallRng, b0: u64, n: u64, kind: Kind) {
        let version = self.versions.fetch_add(1, Ordering::SeqCst);
        let zero = !matches!(kind, Kind::Write);
        let mut buf = vec![0u8; n as usize * BS];
        if !zero {
            for (i, chunk) in buf.chunks_exact_mut(BS).enumerate() {
                fill_block(chunk, b0 + i as u64, version);
            }
        }
        let start = self.log.now();
        let idx: Vec<usize> = (b0..b0 + n)
            .map(|b| {
                let mut recs = self.log.blocks[b as usize].lock().unwrap();
                recs.push(Rec {
                    version,
                    zero,
                    start,
                    end: NEVER,
                    acked: false,
                });
                recs.len() - 1
            })
            .collect();
        let (off, len) = (b0 * BS as u64, n * BS as u64);
        let fua = rng.gen_bool(0.1);
        let r = match kind {
            Kind::Write => self.engine.write(off, &buf, fua),
            Kind::Zero => self.engine.write_zeroes(off, len, fua),
            Kind::Trim => self.engine.trim(off, len, fua),
        };
        let end = self.log.now();
        for (b, i) in (b0..b0 + n).zip(idx) {
            let rec = &mut self.log.blocks[b as usize].lock().unwrap()[i];
            rec.end = end;
            rec.acked = r.is_ok();
        }
    }

    fn read(&self, b0: u64, n: u64) {
        let mut buf = vec![0u8; n as usize * BS];
        let rs = self.log.now();
        if self.engine.read(b0 * BS as u64, &mut buf).is_err() {
            return; // the origin failed; nothing to check
        }
        let re = self.log.now();
        for (i, chunk) in buf.chunks_exact(BS).enumerate() {
            let b = b0 + i as u64;
            if let Err(e) = self.log.allowed(b, decode(chunk, b), rs, re) {
                self.fail(e);
            }
        }
    }

    fn fail(&self, e: String) {
        self.stop.store(true, Ordering::SeqCst);
        self.failure.lock().unwrap().get_or_insert(e);
    }

    /// A sequential stream of 8-block requests, past the bypass cutoff.
    fn burst(&self, rng: &mut SmallRng, b0: u64) {
        let write = rng.gen_bool(0.5);
        for i in 0..8 {
            if write {
                self.write(rng, b0 + i * 8, 8, Kind::Write);
            } else {
                self.read(b0 + i * 8, 8);
            }
        }
    }

    fn worker(&self, seed: u64) {
        let mut rng = SmallRng::seed_from_u64(seed);
        while !self.stop.load(Ordering::Relaxed) {
            let n = if rng.gen_bool(0.7) {
                1
            } else {
                rng.gen_range(2..=8)
            };
            let b0 = rng.gen_range(0..=HOT - n);
            if rng.gen_bool(0.03) {
                self.burst(&mut rng, b0.min(HOT - 64));
                continue;
            }
            match rng.gen_range(0..100) {
                0..=39 => self.write(&mut rng, b0, n, Kind::Write),
                40..=44 => self.write(&mut rng, b0, n, Kind::Zero),
                45..=49 => self.write(&mut rng, b0, n, Kind::Trim),
                50..=98 => self.read(b0, n),
                _ => {
                    let _ = self.engine.flush();
                }
            }
        }
    }
}

fn run_mode(mode: CacheMode, ms: u64, seed: u64) -> Result<(), String> {
    let mut init = vec![0u8; BLOCKS as usize * BS];
    for (b, chunk) in init.chunks_exact_mut(BS).enumerate() {
        fill_block(chunk, b as u64, 0);
    }
    let origin = Arc::new(MemOrigin::from_bytes(init).with_name("stress"));
    // About 230 slots of 4 KiB: a third of the hot range.
    let region = Arc::new(SimRegion::new(1 << 20));
    Engine::format(&*region, &*origin, BS as u32).map_err(|e| e.to_string())?;
    let engine = Engine::open(
        region as Arc<dyn PmemRegion>,
        origin.clone() as Arc<dyn Origin>,
        EngineConfig {
            mode: Some(mode),
            max_request: 64 << 10,
            writeback_batch: 32,
            // Short, so the workers' sequential bursts bypass the cache.
            sequential_cutoff: 64 << 10,
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let jitter = AtomicU64::new(seed);
    engine.set_test_hook(Some(Arc::new(move |p| {
        if p == HookPoint::FillRead {
            let x = jitter.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
            if (x >> 40).is_multiple_of(3) {
                std::thread::sleep(Duration::from_micros(300));
            }
        }
    })));
    origin.set_delay(Duration::from_micros(30));
    origin.set_fail_one_in(40);
    let rig = Rig {
        engine,
        origin,
        log: Log::new(),
        versions: AtomicU64::new(1),
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
    };
    let t = Instant::now();
    std::thread::scope(|s| {
        for i in 0..THREADS {
            let rig = &rig;
            s.spawn(move || rig.worker(seed.wrapping_mul(31) + i as u64));
        }
        while t.elapsed() < Duration::from_millis(ms) && !rig.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        rig.stop.store(true, Ordering::SeqCst);
    });
    if let Some(e) = rig.failure.lock().unwrap().take() {
        return Err(e);
    }
    let st = rig.engine.stats();
    eprintln!(
        "{mode}: {} writes, {} reads hit / {} missed, {} promotions, {} evictions, \
         {} written back, {} origin errors, {} / {} reads / writes bypassed",
        st.writes,
        st.read_hits,
        st.read_misses,
        st.promotions,
        st.evictions,
        st.writebacks,
        st.origin_errors,
        st.bypass_reads,
        st.bypass_writes
    );
    assert!(
        st.writes > 100 && st.read_misses > 100,
        "the workload barely ran"
    );
    final_check(&rig)
}

/// With the origin healthy again: every block holds a version nothing
/// superseded, and after writing everything back the origin agrees.
fn final_check(rig: &Rig) -> Result<(), String> {
    rig.origin.set_fail_one_in(0);
    rig.origin.set_delay(Duration::ZERO);
    let e = &rig.engine;
    e.set_test_hook(None);
    let now = rig.log.now();
    let mut content = vec![0u8; BLOCKS as usize * BS];
    for (i, chunk) in content.chunks_mut(16 * BS).enumerate() {
        e.read((i * 16 * BS) as u64, chunk)
            .map_err(|e| format!("final read: {e}"))?;
    }
    for (b, chunk) in content.chunks_exact(BS).enumerate() {
        rig.log
            .allowed(b as u64, decode(chunk, b as u64), now, now)?;
    }
    e.flush_all(8, &mut |_, _| {})
        .map_err(|e| format!("flush_all: {e}"))?;
    if e.dirty_blocks() != 0 {
        return Err("dirty blocks remain after flush_all".into());
    }
    if rig.origin.current() != content {
        return Err("the origin differs from the cache after writing everything back".into());
    }
    e.close().map_err(|e| e.to_string())
}

#[test]
fn overlapping_requests_in_every_mode_match_the_write_log() {
    let ms: u64 = std::env::var("PMCACHE_STRESS_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    let seed: u64 = pmcache_testkit::seed();
    for mode in [
        CacheMode::Writeback,
        CacheMode::Writethrough,
        CacheMode::Writearound,
        CacheMode::Passthrough,
    ] {
        if let Err(e) = run_mode(mode, ms, seed) {
            panic!("{mode} (PMCACHE_SEED={seed}): {e}");
        }
    }
}
