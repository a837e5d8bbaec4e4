//! Engine behaviour: data paths, modes, writeback, origin failures,
//! concurrency, restart and corruption handling.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pmcache_engine::{
    check, CacheMode, Engine, EngineConfig, EngineError, HookPoint, WritebackOrder,
};
use pmcache_origin::{MemOrigin, Origin};
use pmcache_pmem::{PmemRegion, SimRegion};
use pmcache_testkit::pattern;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const MIB: usize = 1 << 20;

fn manual() -> EngineConfig {
    EngineConfig {
        background_writeback: false,
        ..Default::default()
    }
}

struct Rig {
    region: Arc<SimRegion>,
    origin: Arc<MemOrigin>,
}

impl Rig {
    fn new(cache: usize, origin: usize, block: u32) -> Rig {
        let region = Arc::new(SimRegion::new(cache));
        let origin = Arc::new(MemOrigin::new(origin as u64).with_name("rig"));
        Engine::format(&*region, &*origin, block).unwrap();
        Rig { region, origin }
    }

    fn open(&self, cfg: EngineConfig) -> Arc<Engine> {
        Engine::open(
            self.region.clone() as Arc<dyn PmemRegion>,
            self.origin.clone() as Arc<dyn Origin>,
            cfg,
        )
        .unwrap()
    }
}

#[test]
fn random_ops_match_a_model_with_eviction_and_writeback() {
    let rig = Rig::new(4 * MIB, 16 * MIB, 4096);
    let e = rig.open(manual());
    let mut model = vec![0u8; 16 * MIB];
    let mut rng = SmallRng::seed_from_u64(7);
    for i in 0..3000u64 {
        let len = match rng.gen_range(0..10) {
            0..=5 => rng.gen_range(1..9000),
            6..=8 => rng.gen_range(1..100_000),
            _ => rng.gen_range(1..=MIB),
        };
        let off = rng.gen_range(0..=(16 * MIB - len)) as u64;
        match rng.gen_range(0..10) {
            0..=4 => {
                let d = pattern(i, len);
                e.write(off, &d, false).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&d);
            }
            5 => {
                e.write_zeroes(off, len as u64, false).unwrap();
                model[off as usize..off as usize + len].fill(0);
            }
            6..=8 => {
                let mut buf = vec![0u8; len];
                e.read(off, &mut buf).unwrap();
                assert!(
                    buf == model[off as usize..off as usize + len],
                    "op {i}: read {off}+{len} mismatch"
                );
            }
            _ => {
                e.writeback_step(rng.gen_range(1..500)).unwrap();
            }
        }
    }
    let s = e.stats();
    assert!(s.evictions > 0, "the workload must have evicted: {s:?}");
    assert!(s.writebacks > 0 && s.promotions > 0 && s.read_hits > 0 && s.read_misses > 0);
    e.flush_all(0, &mut |_, _| {}).unwrap();
    assert_eq!(e.dirty_blocks(), 0);
    assert!(
        rig.origin.durable() == model,
        "origin after writeback differs from what was written"
    );
    let report = check::check(&*rig.region, Some(("mem:rig", 16 * MIB as u64)), true);
    assert!(report.ok(), "{:?}", report.errors);
}

#[test]
fn one_fence_per_4k_write_at_qd1() {
    let rig = Rig::new(8 * MIB, 64 * MIB, 4096);
    let e = rig.open(manual());
    let mut rng = SmallRng::seed_from_u64(1);
    let data = pattern(1, 4096);
    // Warm up (the first writes find the free list full).
    for _ in 0..200 {
        e.write(rng.gen_range(0..1024u64) * 4096, &data, false)
            .unwrap();
    }
    let f0 = rig.region.fences();
    let n = 5000;
    for _ in 0..n {
        e.write(rng.gen_range(0..1024u64) * 4096, &data, false)
            .unwrap();
    }
    let fences = rig.region.fences() - f0;
    assert!(
        fences <= n,
        "{fences} fences for {n} writes: more than one per write"
    );
    assert!(
        fences >= n,
        "{fences} fences for {n} writes: a write went unfenced"
    );
}

#[test]
fn superseded_versions_are_freed_and_never_resurrect() {
    let rig = Rig::new(3 * MIB, 8 * MIB, 4096);
    let e = rig.open(manual());
    let v1 = pattern(1, 4096);
    let v2 = pattern(2, 4096);
    e.write(0, &v1, false).unwrap();
    e.write(0, &v2, false).unwrap();
    // Write back, then push block 0 out of the cache with other traffic.
    e.flush_all(0, &mut |_, _| {}).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    for off in (MIB as u64..8 * MIB as u64).step_by(64 * 1024) {
        e.read(off, &mut buf).unwrap();
    }
    assert!(
        check::dump(&*rig.region)
            .unwrap()
            .mappings
            .iter()
            .all(|m| m.block != 0),
        "block 0 was not evicted"
    );
    // Power loss now: only what is durable survives.
    let img = rig.region.durable_image();
    let r2 = Arc::new(SimRegion::from_image(&img));
    let o2 = Arc::new(MemOrigin::from_bytes(rig.origin.durable()).with_name("rig"));
    let e2 = Engine::open(r2, o2, manual()).unwrap();
    let mut got = vec![0u8; 4096];
    e2.read(0, &mut got).unwrap();
    assert!(got == v2, "an older version came back after the crash");
}

#[test]
fn clean_close_leaves_one_version_per_block() {
    let rig = Rig::new(8 * MIB, 8 * MIB, 4096);
    let e = rig.open(manual());
    // Overwrites leave superseded versions retiring, waiting for S.
    for round in 0..4u8 {
        for b in 0..64u64 {
            e.write(b * 4096, &pattern(round as u64, 4096), false)
                .unwrap();
        }
    }
    e.close().unwrap();
    let mut blocks: Vec<u64> = check::dump(&*rig.region)
        .unwrap()
        .mappings
        .iter()
        .map(|m| m.block)
        .collect();
    assert_eq!(blocks.len(), 64, "mappings after close: {blocks:?}");
    blocks.sort_unstable();
    blocks.dedup();
    assert_eq!(blocks.len(), 64, "a block has two versions after close");
}

#[test]
fn concurrent_overlapping_writes_and_reads_never_tear() {
    let rig = Rig::new(16 * MIB, 8 * MIB, 4096);
    let e = rig.open(EngineConfig {
        background_writeback: true,
        ..Default::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    // Every write fills [off, off+len) with one byte value; reads check that
    // each block they see holds a single value (whole blocks, no tearing),
    // and that a request-wide read sees one value per request.
    let mut handles = Vec::new();
    for t in 0..3u8 {
        let e = e.clone();
        handles.push(std::thread::spawn(move || {
            let mut rng = SmallRng::seed_from_u64(t as u64);
            for i in 0..1500u32 {
                let blocks = rng.gen_range(1..16u64);
                let off = rng.gen_range(0..32u64) * 4096;
                let val = (t * 80 + (i % 80) as u8).max(1);
                e.write(off, &vec![val; (blocks * 4096) as usize], false)
                    .unwrap();
            }
        }));
    }
    let reader = {
        let e = e.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rng = SmallRng::seed_from_u64(99);
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                let off = rng.gen_range(0..32u64) * 4096;
                let mut buf = vec![0u8; 4096 * 8];
                e.read(off, &mut buf).unwrap();
                for blk in buf.chunks(4096) {
                    assert!(blk.iter().all(|&b| b == blk[0]), "torn block at {off}");
                }
                reads += 1;
            }
            reads
        })
    };
    for h in handles {
        h.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    e.close().unwrap();
}

#[test]
fn sub_block_writes_from_threads_do_not_lose_each_other() {
    // Two requests that touch different bytes of the same block must both
    // survive, even though each is a read-modify-write of the block.
    let rig = Rig::new(8 * MIB, MIB, 4096);
    let e = rig.open(manual());
    let hs: Vec<_> = (0..4u64)
        .map(|t| {
            let e = e.clone();
            std::thread::spawn(move || {
                for i in 0..2000u64 {
                    let byte = (i % 1024) * 4 + t;
                    e.write(byte, &[(t + 1) as u8], false).unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let mut buf = vec![0u8; 4096];
    e.read(0, &mut buf).unwrap();
    for (i, &b) in buf.iter().enumerate() {
        assert_eq!(b, (i % 4 + 1) as u8, "byte {i} lost an update");
    }
}

#[test]
fn origin_failure_keeps_dirty_data_and_serves_cached_blocks() {
    let rig = Rig::new(4 * MIB, 8 * MIB, 4096);
    let e = rig.open(manual());
    let d = pattern(5, 64 * 1024);
    e.write(0, &d, false).unwrap();
    rig.origin.set_failing(true);
    // Writes still land in the cache (writeback mode).
    e.write(MIB as u64, &d, false).unwrap();
    let err = e.writeback_step(100).unwrap_err();
    assert!(matches!(err, EngineError::Origin { .. }), "{err}");
    assert_eq!(
        e.dirty_blocks(),
        32,
        "dirty data must be kept when the origin fails"
    );
    // Cached data is served; a miss fails with a clear origin error.
    let mut buf = vec![0u8; d.len()];
    e.read(0, &mut buf).unwrap();
    assert!(buf == d);
    let err = e.read(4 * MIB as u64, &mut buf).unwrap_err();
    assert!(err.to_string().contains("origin I/O failed"), "{err}");
    assert!(e.stats().origin_errors >= 2);
    assert!(
        e.flush_all(1, &mut |_, _| {}).is_err(),
        "flush must report the failing origin"
    );
    rig.origin.set_failing(false);
    e.flush_all(3, &mut |_, _| {}).unwrap();
    assert_eq!(e.dirty_blocks(), 0);
    let o = rig.origin.durable();
    assert!(o[..d.len()] == d[..] && o[MIB..MIB + d.len()] == d[..]);
}

#[test]
fn writers_wait_for_writeback_when_the_cache_is_full_of_dirty_data() {
    // Large requests, then single blocks (which take another path).
    for chunk in [256 * 1024, 4096] {
        fill_beyond_the_cache(chunk);
    }
}

fn fill_beyond_the_cache(chunk: usize) {
    let rig = Rig::new(3 * MIB, 32 * MIB, 4096);
    rig.origin.set_delay(Duration::from_micros(200));
    let e = rig.open(EngineConfig {
        background_writeback: true,
        writeback_batch: 64,
        ..Default::default()
    });
    let slots = e.layout().slot_count as usize;
    let total = slots * 4096 * 3;
    for (i, off) in (0..total).step_by(chunk).enumerate() {
        e.write(off as u64, &pattern(i as u64, chunk), false)
            .unwrap();
    }
    let s = e.stats();
    assert!(
        s.waits_for_space > 0,
        "writes of {chunk} beyond the cache size must have waited: {s:?}"
    );
    rig.origin.set_delay(Duration::ZERO);
    e.flush_all(3, &mut |_, _| {}).unwrap();
    let o = rig.origin.durable();
    for (i, off) in (0..total).step_by(chunk).enumerate() {
        assert!(
            o[off..off + chunk] == pattern(i as u64, chunk)[..],
            "chunk {i} of {chunk} lost"
        );
    }
    e.close().unwrap();
}

#[test]
fn restart_is_warm_and_keeps_dirty_state() {
    let rig = Rig::new(4 * MIB, 8 * MIB, 4096);
    let e = rig.open(manual());
    e.write(0, &pattern(1, 256 * 1024), false).unwrap();
    e.writeback_step(16).unwrap();
    let mut buf = vec![0u8; 128 * 1024];
    e.read(2 * MIB as u64, &mut buf).unwrap();
    let before = e.stats();
    e.close().unwrap();
    assert!(
        rig.region.durable_image() == rig.region.volatile_image(),
        "close left data unflushed"
    );
    let e = rig.open(manual());
    let after = e.stats();
    assert_eq!(
        (after.occupied, after.dirty),
        (before.occupied, before.dirty)
    );
    assert_eq!(after.dirty, 64 - 16);
    let mut got = vec![0u8; 256 * 1024];
    e.read(0, &mut got).unwrap();
    assert!(got == pattern(1, 256 * 1024));
    assert_eq!(
        e.stats().read_misses,
        0,
        "a warm restart serves cached blocks without the origin"
    );
}

#[test]
fn a_different_origin_is_refused_unless_forced() {
    let rig = Rig::new(3 * MIB, 8 * MIB, 4096);
    let other = Arc::new(MemOrigin::new(8 * MIB as u64).with_name("other"));
    let err = Engine::open(
        rig.region.clone() as Arc<dyn PmemRegion>,
        other.clone() as Arc<dyn Origin>,
        manual(),
    )
    .err()
    .expect("must refuse");
    assert!(matches!(err, EngineError::OriginMismatch { .. }), "{err}");
    assert!(err.to_string().contains("mem:rig") && err.to_string().contains("--force"));
    let e = Engine::open(
        rig.region.clone() as Arc<dyn PmemRegion>,
        other as Arc<dyn Origin>,
        EngineConfig {
            force_origin: true,
            ..manual()
        },
    )
    .unwrap();
    assert_eq!(e.size(), 8 * MIB as u64);
}

/// Once writes pause, the writeback thread raises S over them (writers
/// raise it only in one transaction of 16): the newest acknowledged
/// entries are then committed, so a damaged one is reported after a crash
/// rather than rolled back like a torn write.
#[test]
fn s_covers_the_last_writes_once_they_pause() {
    let rig = Rig::new(3 * MIB, 8 * MIB, 4096);
    let e = rig.open(EngineConfig::default());
    // Writeback stuck on a slow origin holds nothing up.
    rig.origin.set_delay(Duration::from_secs(3));
    for b in 0..5u64 {
        e.write(b * 4096, &pattern(b, 4096), false).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let image = loop {
        let image = rig.region.durable_image();
        let s = check::dump(&SimRegion::from_image(&image))
            .unwrap()
            .watermark;
        if s >= 5 {
            break image;
        }
        assert!(std::time::Instant::now() < deadline, "S stayed at {s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    // The crash image: a bit flip in the last write's entry is an error.
    let dump = check::dump(&SimRegion::from_image(&image)).unwrap();
    let last = dump.mappings.iter().max_by_key(|m| m.seq).unwrap();
    let mut bad = image.clone();
    bad[pmcache_engine::format::META_OFF + last.slot as usize * 64 + 3] ^= 0x10;
    let rep = check::check(&SimRegion::from_image(&bad), None, true);
    assert!(
        !rep.ok() && rep.errors[0].contains(&format!("slot {}", last.slot)),
        "{:?}",
        rep.errors
    );
    rig.origin.set_delay(Duration::ZERO);
    e.close().unwrap();
}

/// Above S a damaged entry looks like one torn by the crash: recovery
/// drops it, and `check` names its slot in a warning.
#[test]
fn a_damaged_entry_above_s_is_named_by_check() {
    let rig = Rig::new(3 * MIB, 8 * MIB, 4096);
    let e = rig.open(manual());
    e.write(0, &pattern(1, 4096), false).unwrap();
    e.write(4096, &pattern(2, 4096), false).unwrap();
    let image = rig.region.durable_image();
    let dump = check::dump(&SimRegion::from_image(&image)).unwrap();
    assert_eq!(dump.watermark, 0, "two writes leave S where it was");
    let last = dump.mappings.iter().max_by_key(|m| m.seq).unwrap();
    let mut bad = image.clone();
    bad[pmcache_engine::format::META_OFF + last.slot as usize * 64 + 3] ^= 0x10;
    let rep = check::check(&SimRegion::from_image(&bad), None, true);
    assert!(rep.ok(), "{:?}", rep.errors);
    assert!(
        rep.warnings
            .iter()
            .any(|w| w.contains("fail their checksum") && w.contains(&format!("[{}]", last.slot))),
        "{:?}",
        rep.warnings
    );
}

/// A cache forced onto a smaller origin refuses to open while it holds
/// dirty data past the new end (it has nowhere to go); once that data is
/// written back, the clean copy past the end is dropped and it opens.
#[test]
fn dirty_data_past_a_smaller_forced_origin_is_refused() {
    let rig = Rig::new(3 * MIB, 8 * MIB, 4096);
    let e = rig.open(manual());
    let last = (8 * MIB - 4096) as u64;
    e.write(last, &pattern(5, 4096), false).unwrap();
    e.close().unwrap();
    drop(e);
    let small = Arc::new(MemOrigin::new(4 * MIB as u64).with_name("smaller"));
    let forced = EngineConfig {
        force_origin: true,
        ..manual()
    };
    let err = Engine::open(
        Arc::new(SimRegion::from_image(&rig.region.durable_image())) as Arc<dyn PmemRegion>,
        small.clone() as Arc<dyn Origin>,
        forced.clone(),
    )
    .err()
    .expect("dirty data past the end must be refused");
    assert!(
        matches!(err, EngineError::DirtyPastOrigin { block, .. } if block == last / 4096),
        "{err}"
    );
    // Written back to its own origin, it opens on the smaller one.
    let e = rig.open(manual());
    e.flush_all(3, &mut |_, _| {}).unwrap();
    e.close().unwrap();
    drop(e);
    let e = Engine::open(
        rig.region.clone() as Arc<dyn PmemRegion>,
        small as Arc<dyn Origin>,
        forced,
    )
    .unwrap();
    assert_eq!(e.size(), 4 * MIB as u64);
    e.close().unwrap();
}

#[test]
fn corruption_is_detected_and_named() {
    let rig = Rig::new(3 * MIB, 8 * MIB, 4096);
    let e = rig.open(manual());
    e.write(0, &pattern(3, 8192), false).unwrap();
    e.close().unwrap();
    let clean = rig.region.durable_image();
    assert!(check::check(&SimRegion::from_image(&clean), None, true).ok());

    // A bit flip in a committed entry's metadata.
    let dump = check::dump(&*rig.region).unwrap();
    let slot = dump.mappings[0].slot;
    let meta = pmcache_engine::format::META_OFF + slot as usize * 64;
    let mut bad = clean.clone();
    bad[meta + 3] ^= 0x10;
    let rep = check::check(&SimRegion::from_image(&bad), None, true);
    assert!(
        !rep.ok() && rep.errors[0].contains(&format!("slot {slot}")),
        "{:?}",
        rep.errors
    );
    let err = Engine::open(
        Arc::new(SimRegion::from_image(&bad)) as Arc<dyn PmemRegion>,
        rig.origin.clone() as Arc<dyn Origin>,
        manual(),
    )
    .err()
    .expect("open must refuse corrupt metadata");
    assert!(
        matches!(err, EngineError::Corrupt(_)) && err.to_string().contains(&format!("slot {slot}")),
        "{err}"
    );

    // A bit flip in cached data is found by the data check.
    let mut bad = clean.clone();
    let data_off = (dump.superblock.layout.data_offset + slot * 4096) as usize;
    bad[data_off + 100] ^= 1;
    let rep = check::check(&SimRegion::from_image(&bad), None, true);
    assert!(
        rep.errors.iter().any(|e| e.contains("data checksum")),
        "{:?}",
        rep.errors
    );

    // Both superblocks damaged; a foreign file.
    let mut bad = clean.clone();
    bad[10] ^= 1;
    bad[4096 + 10] ^= 1;
    assert!(!check::check(&SimRegion::from_image(&bad), None, false).ok());
    let foreign = vec![0x5a; 3 * MIB];
    let rep = check::check(&SimRegion::from_image(&foreign), None, false);
    assert!(
        rep.errors[0].contains("not a pmcache cache"),
        "{:?}",
        rep.errors
    );
    // One superblock copy damaged: still opens, with a warning from check.
    let mut one = clean.clone();
    one[10] ^= 1;
    let rep = check::check(&SimRegion::from_image(&one), None, false);
    assert!(rep.ok() && !rep.warnings.is_empty());
    // The wrong origin is reported.
    let rep = check::check(
        &SimRegion::from_image(&clean),
        Some(("file:/elsewhere", 1)),
        false,
    );
    assert!(rep.errors.iter().any(|e| e.contains("origin identity")));
}

#[test]
fn writethrough_and_passthrough_modes() {
    let rig = Rig::new(4 * MIB, 8 * MIB, 4096);
    let e = rig.open(EngineConfig {
        mode: Some(CacheMode::Writethrough),
        ..manual()
    });
    let d = pattern(9, 12288);
    e.write(4096, &d, true).unwrap();
    assert!(
        rig.origin.durable()[4096..4096 + d.len()] == d[..],
        "FUA write-through must reach the origin durably"
    );
    assert_eq!(e.dirty_blocks(), 0);
    e.write(65536, &d, false).unwrap();
    assert!(
        rig.origin.current()[65536..65536 + d.len()] == d[..],
        "write-through must reach the origin"
    );
    e.flush().unwrap();
    assert!(
        rig.origin.durable()[65536..65536 + d.len()] == d[..],
        "FLUSH must make it durable"
    );
    // Writeback only flushes what write-through already wrote.
    assert_eq!(
        e.dirty_blocks(),
        3,
        "not clean before an origin flush made it durable"
    );
    let writes = rig.origin.write_count();
    assert_eq!(e.writeback_step(100).unwrap(), 3);
    assert_eq!(
        rig.origin.write_count(),
        writes,
        "write-through data was written twice"
    );
    assert_eq!(e.dirty_blocks(), 0);

    // Back to writeback, leave dirty data, then switch to passthrough.
    e.set_mode(CacheMode::Writeback).unwrap();
    let d2 = pattern(10, 8192);
    e.write(4096, &d2, false).unwrap();
    assert!(e.dirty_blocks() > 0);
    e.set_mode(CacheMode::Passthrough).unwrap();
    assert_eq!(
        e.dirty_blocks(),
        0,
        "switching to passthrough writes dirty data back"
    );
    assert!(rig.origin.durable()[4096..4096 + d2.len()] == d2[..]);
    let d3 = pattern(11, 100);
    e.write(4096 + 50, &d3, false).unwrap();
    let mut got = vec![0u8; 100];
    e.read(4096 + 50, &mut got).unwrap();
    assert!(got == d3, "passthrough read must see the passthrough write");
    assert!(rig.origin.current()[4146..4246] == d3[..]);
    assert_eq!(e.superblock().mode, CacheMode::Passthrough);
}

#[test]
fn unaligned_origin_end_and_range_errors() {
    let rig = Rig::new(3 * MIB, 1_000_000, 4096);
    let e = rig.open(manual());
    assert_eq!(e.size(), 1_000_000);
    let d = pattern(4, 5000);
    e.write(1_000_000 - 5000, &d, false).unwrap();
    let mut got = vec![0u8; 5000];
    e.read(1_000_000 - 5000, &mut got).unwrap();
    assert!(got == d);
    e.flush_all(0, &mut |_, _| {}).unwrap();
    assert!(rig.origin.durable()[1_000_000 - 5000..] == d[..]);
    assert!(matches!(
        e.write(999_999, &[1, 2], false),
        Err(EngineError::OutOfRange { .. })
    ));
    assert!(matches!(
        e.read(u64::MAX - 1, &mut [0u8; 4]),
        Err(EngineError::OutOfRange { .. })
    ));
}

#[test]
fn failed_payload_writes_nothing() {
    let rig = Rig::new(3 * MIB, 8 * MIB, 4096);
    let e = rig.open(manual());
    let big = vec![0u8; 2 * MIB];
    assert!(matches!(
        e.write(0, &big[..MIB + 1], false),
        Err(EngineError::TooLarge { .. })
    ));
    let before = e.stats();
    let err = e
        .write_with(0, 8192, false, &mut |slices| {
            slices[0][..10].fill(7);
            Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "client went away",
            ))
        })
        .unwrap_err();
    assert!(matches!(err, EngineError::Transfer(_)));
    let mut got = vec![1u8; 8192];
    e.read(0, &mut got).unwrap();
    assert!(
        got.iter().all(|&b| b == 0),
        "a failed payload must not be visible"
    );
    let after = e.stats();
    assert_eq!(after.writes, before.writes);
    assert_eq!(after.dirty, 0);
}

#[test]
fn try_read_cached_serves_hits_and_declines_misses() {
    let rig = Rig::new(4 * MIB, 8 * MIB, 4096);
    let e = rig.open(manual());
    let d = pattern(21, 8192);
    e.write(4096, &d, false).unwrap();
    let mut got = Vec::new();
    let served = e
        .try_read_cached(4096 + 100, 5000, &mut |slices| {
            slices.iter().for_each(|s| got.extend_from_slice(s));
            Ok(())
        })
        .unwrap();
    assert!(served && got == d[100..5100], "a hit must be served whole");
    let before = e.stats();
    let mut called = false;
    // The range spans a cached and an uncached block: declined as a whole.
    let served = e
        .try_read_cached(8192, 8192, &mut |_| {
            called = true;
            Ok(())
        })
        .unwrap();
    assert!(
        !served && !called,
        "a miss must be left to the slow path untouched"
    );
    let after = e.stats();
    assert_eq!(
        (after.read_misses, after.promotions),
        (before.read_misses, before.promotions)
    );
    assert_eq!(rig.origin.write_count() + rig.origin.flush_count(), 0);
}

/// Pauses the first read miss at [`HookPoint::FillRead`] (after its origin
/// read, before it publishes) until [`Pause::release`].
struct Pause {
    armed: AtomicBool,
    state: std::sync::Mutex<(bool, bool)>,
    cv: std::sync::Condvar,
}

impl Pause {
    fn install(e: &Engine) -> Arc<Pause> {
        let p = Arc::new(Pause {
            armed: AtomicBool::new(true),
            state: std::sync::Mutex::new((false, false)),
            cv: std::sync::Condvar::new(),
        });
        let hook = p.clone();
        e.set_test_hook(Some(Arc::new(move |point| {
            if point == HookPoint::FillRead && hook.armed.swap(false, Ordering::SeqCst) {
                let mut st = hook.state.lock().unwrap();
                st.0 = true;
                hook.cv.notify_all();
                while !st.1 {
                    st = hook.cv.wait(st).unwrap();
                }
            }
        })));
        p
    }

    fn wait_reached(&self) {
        let mut st = self.state.lock().unwrap();
        while !st.0 {
            st = self.cv.wait(st).unwrap();
        }
    }

    fn release(&self) {
        self.state.lock().unwrap().1 = true;
        self.cv.notify_all();
    }
}

/// A journal-like stream (sequential small writes, a FLUSH every few) stays
/// in the cache however long it runs; the same stream without flushes goes
/// around the cache past the cutoff.
#[test]
fn a_flushed_write_stream_is_not_bypassed() {
    let rig = Rig::new(4 * MIB, 16 * MIB, 4096);
    let e = rig.open(EngineConfig {
        max_request: 64 << 10,
        sequential_cutoff: 64 << 10,
        ..manual()
    });
    // Two blocks a write: single-block writes take the engine's fast path,
    // which the NBD server reaches only after `stage_write` saw the stream.
    let d = pattern(3, 8192);
    for i in 0..128u64 {
        e.write(i * 8192, &d, false).unwrap();
        if i % 4 == 3 {
            e.flush().unwrap();
        }
    }
    assert_eq!(e.stats().bypass_writes, 0, "a flushed stream bypassed");
    // Ordered writeback lets a write pass the cache only once the earlier
    // epochs are on the origin.
    e.flush_all(0, &mut |_, _| {}).unwrap();
    for i in 0..32u64 {
        e.write((512 + i) * 8192, &d, false).unwrap();
    }
    let s = e.stats();
    assert!(s.bypass_writes >= 16, "an unflushed stream: {s:?}");
    let mut got = vec![0u8; 8192];
    for w in [0u64, 127, 512, 543] {
        e.read(w * 8192, &mut got).unwrap();
        assert_eq!(got, d, "write {w}");
    }
}

/// A read of blocks that sit in consecutive slots goes to the sink as one
/// slice, not one per block, with the right bytes.
#[test]
fn adjacent_slots_are_read_as_one_slice() {
    let rig = Rig::new(MIB, 8 * MIB, 4096);
    let e = rig.open(EngineConfig {
        max_request: 64 << 10,
        shards: Some(1),
        sequential_cutoff: 0,
        ..manual()
    });
    let data = pattern(5, 64 << 10);
    e.write(0, &data, false).unwrap();
    let mut got = Vec::new();
    let mut slices = 0;
    e.read_with(512, (64 << 10) - 1024, &mut |s| {
        slices = s.len();
        for x in s {
            got.extend_from_slice(x);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(got, &data[512..(64 << 10) - 512]);
    assert!(
        slices < 4,
        "{slices} slices for 16 blocks in consecutive slots"
    );
}

/// A read miss answers its client before it publishes (and so before it
/// fences) the blocks it fetched: making a fill durable is the cache's
/// business, and where the fence is an msync the reader would otherwise
/// wait for the disk.
#[test]
fn a_read_miss_answers_before_it_publishes() {
    let rig = Rig::new(MIB, 8 * MIB, 4096);
    let e = rig.open(EngineConfig {
        max_request: 64 << 10,
        shards: Some(1),
        ..manual()
    });
    let sent = Arc::new(AtomicBool::new(false));
    let sent_at_publish = Arc::new(std::sync::Mutex::new(None));
    {
        let (sent, seen) = (sent.clone(), sent_at_publish.clone());
        e.set_test_hook(Some(Arc::new(move |point| {
            if point == HookPoint::FillRead {
                *seen.lock().unwrap() = Some(sent.load(Ordering::SeqCst));
            }
        })));
    }
    e.read_with(3 * 4096, 8192, &mut |_| {
        sent.store(true, Ordering::SeqCst);
        Ok(())
    })
    .unwrap();
    assert_eq!(*sent_at_publish.lock().unwrap(), Some(true));
    assert_eq!(e.stats().promotions, 2, "the fetched blocks were published");
}

/// A thread reading the block at `x` (a miss), held after its origin read
/// until the returned pause is released.
fn held_read_miss(e: &Arc<Engine>, x: u64) -> (Arc<Pause>, std::thread::JoinHandle<()>) {
    let pause = Pause::install(e);
    let reader = {
        let e = e.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            e.read(x, &mut buf).unwrap();
        })
    };
    pause.wait_reached();
    (pause, reader)
}

/// A miss that read old data from the origin must not publish it after a
/// newer write has reached the origin and left the cache (issue 11's
/// stale-fill race, writeback mode): the reader is held between its origin
/// read and its publish while a write, its writeback and an eviction run.
#[test]
fn a_read_miss_never_publishes_data_older_than_a_write_that_overtook_it() {
    let rig = Rig::new(MIB, 8 * MIB, 4096);
    let e = rig.open(EngineConfig {
        max_request: 64 << 10,
        shards: Some(1),
        ..manual()
    });
    let x = 5 * 4096u64;
    let (pause, reader) = held_read_miss(&e, x);
    let d1 = pattern(77, 4096);
    e.write(x, &d1, false).unwrap();
    // Write X back and push it out of the cache with other blocks, as far as
    // the engine lets us while the reader is held.
    let filler = {
        let e = e.clone();
        std::thread::spawn(move || {
            let slots = e.layout().slot_count;
            for i in 0..3 * slots {
                let b = 64 + i % 1500;
                e.write(b * 4096, &pattern(b, 4096), false).unwrap();
                if i % 16 == 0 {
                    e.writeback_step(64).unwrap();
                }
            }
        })
    };
    filler.join().unwrap();
    pause.release();
    reader.join().unwrap();
    let mut got = vec![0u8; 4096];
    e.read(x, &mut got).unwrap();
    assert!(
        got == d1,
        "a read returned data older than an acknowledged write"
    );
    e.flush_all(0, &mut |_, _| {}).unwrap();
    assert!(rig.origin.current()[x as usize..x as usize + 4096] == d1[..]);
}

/// The same race in writearound mode: the write goes to the origin while
/// the reader is held, and must win.
#[test]
fn a_read_miss_never_publishes_data_older_than_a_writearound_write() {
    let rig = Rig::new(MIB, 8 * MIB, 4096);
    let e = rig.open(EngineConfig {
        mode: Some(CacheMode::Writearound),
        max_request: 64 << 10,
        ..manual()
    });
    let x = 9 * 4096u64;
    let (pause, reader) = held_read_miss(&e, x);
    let d1 = pattern(78, 4096);
    let writer = {
        let (e, d1) = (e.clone(), d1.clone());
        std::thread::spawn(move || e.write(x, &d1, false).unwrap())
    };
    // Give the write every chance to finish before the reader publishes.
    std::thread::sleep(Duration::from_millis(200));
    pause.release();
    reader.join().unwrap();
    writer.join().unwrap();
    let mut got = vec![0u8; 4096];
    e.read(x, &mut got).unwrap();
    assert!(
        got == d1,
        "a read returned data older than an acknowledged write"
    );
}

/// Writeback merges adjacent dirty blocks into one origin write per run.
#[test]
fn writeback_merges_adjacent_blocks_into_one_write() {
    let rig = Rig::new(4 * MIB, 8 * MIB, 4096);
    let e = rig.open(manual());
    let d = pattern(21, 64 * 4096);
    e.write(MIB as u64, &d, false).unwrap();
    e.write(3 * MIB as u64, &d[..4096], false).unwrap();
    let (writes, flushes) = (rig.origin.write_count(), rig.origin.flush_count());
    assert_eq!(e.writeback_step(1000).unwrap(), 65);
    assert_eq!(rig.origin.write_count() - writes, 2, "one write per run");
    assert_eq!(rig.origin.flush_count() - flushes, 1, "one flush per batch");
    assert!(rig.origin.durable()[MIB..MIB + d.len()] == d[..]);
    assert_eq!(e.dirty_blocks(), 0);
}

/// A failed origin write costs only its own run: the rest of the batch
/// becomes clean, and the failed blocks stay dirty until a retry succeeds.
#[test]
fn a_failed_writeback_write_fails_only_its_run() {
    let rig = Rig::new(4 * MIB, 8 * MIB, 4096);
    let e = rig.open(manual());
    let mut model = rig.origin.current();
    for i in 0..24usize {
        let d = pattern(100 + i as u64, 4096);
        let off = i * 3 * 4096;
        e.write(off as u64, &d, false).unwrap();
        model[off..off + 4096].copy_from_slice(&d);
    }
    rig.origin.set_fail_one_in(4);
    let mut partial = false;
    for _ in 0..200 {
        if e.dirty_blocks() == 0 {
            break;
        }
        let before = e.dirty_blocks();
        if let Ok(n) = e.writeback_step(1000) {
            assert_eq!(before - e.dirty_blocks(), n as u64);
            partial |= n > 0 && (n as u64) < before;
        }
    }
    rig.origin.set_fail_one_in(0);
    assert_eq!(
        e.dirty_blocks(),
        0,
        "every block is written back in the end"
    );
    assert!(
        partial,
        "some step cleaned part of its batch despite errors"
    );
    assert!(rig.origin.durable() == model);
}

/// A failed flush leaves the whole batch dirty.
#[test]
fn a_failed_writeback_flush_cleans_nothing() {
    let rig = Rig::new(4 * MIB, 8 * MIB, 4096);
    let e = rig.open(manual());
    e.write(0, &pattern(5, 8 * 4096), false).unwrap();
    // Fail the flush only: let the writes through first.
    let o = rig.origin.clone();
    let fails_flush = std::thread::spawn(move || {
        while o.write_count() == 0 {
            std::thread::yield_now();
        }
        o.set_failing(true);
    });
    rig.origin.set_delay(Duration::from_millis(20));
    let r = e.writeback_step(1000);
    fails_flush.join().unwrap();
    rig.origin.set_failing(false);
    rig.origin.set_delay(Duration::ZERO);
    assert!(r.is_err(), "the flush failed: {r:?}");
    assert_eq!(e.dirty_blocks(), 8);
    assert_eq!(e.writeback_step(1000).unwrap(), 8);
}

/// A cold sequential scan past the cutoff is served around the cache: the
/// hot set stays cached and the scan's data is still right.
#[test]
fn a_sequential_scan_bypasses_the_cache_and_spares_the_hot_set() {
    let rig = Rig::new(8 * MIB, 64 * MIB, 4096);
    let data = pattern(31, 64 * MIB);
    rig.origin.write_at(&data, 0, true).unwrap();
    let e = rig.open(manual());
    // The hot set: 64 scattered blocks, read twice.
    let hot: Vec<u64> = (0..64u64).map(|i| (i * 97 % 1024) * 4096).collect();
    let mut buf = vec![0u8; 4096];
    for &h in hot.iter().chain(&hot) {
        e.read(h, &mut buf).unwrap();
    }
    let before = e.stats();
    let mut chunk = vec![0u8; MIB];
    for i in 8..56usize {
        e.read((i * MIB) as u64, &mut chunk).unwrap();
        assert!(
            chunk == data[i * MIB..(i + 1) * MIB],
            "scan read {i} MiB wrong"
        );
    }
    let after = e.stats();
    assert!(after.bypass_reads >= 40, "{after:?}");
    assert!(
        after.promotions - before.promotions <= 5 * 256,
        "only the scan's first cutoff's worth is promoted: {}",
        after.promotions - before.promotions
    );
    let hits = after.read_hits;
    for &h in &hot {
        e.read(h, &mut buf).unwrap();
        assert!(buf == data[h as usize..h as usize + 4096]);
    }
    assert_eq!(
        e.stats().read_hits - hits,
        64,
        "the hot set is still cached"
    );
}

/// A sequential write stream past the cutoff goes to the origin durably,
/// and leaves no older cached or dirty copy behind to resurrect. With
/// ordered writeback, a request over a dirty block stays in the cache.
#[test]
fn a_sequential_write_stream_bypasses_without_resurrecting_old_copies() {
    for order in [WritebackOrder::Unordered, WritebackOrder::Ordered] {
        sequential_write_stream_bypasses(order);
    }
}

fn sequential_write_stream_bypasses(order: WritebackOrder) {
    let rig = Rig::new(8 * MIB, 64 * MIB, 4096);
    let e = rig.open(EngineConfig {
        writeback_order: order,
        ..manual()
    });
    // Old dirty and clean copies inside the range the stream will cover.
    let old = pattern(40, 8192);
    e.write(10 * MIB as u64, &old, false).unwrap();
    e.write(12 * MIB as u64, &old, false).unwrap();
    e.writeback_step(1000).unwrap();
    e.write(12 * MIB as u64, &old[..4096], false).unwrap();
    assert!(e.dirty_blocks() > 0);
    let new = pattern(41, 16 * MIB);
    for i in 0..16usize {
        e.write(((i + 1) * MIB) as u64, &new[i * MIB..(i + 1) * MIB], false)
            .unwrap();
    }
    let st = e.stats();
    assert!(st.bypass_writes >= 10, "{order}: {st:?}");
    let durable = rig.origin.durable();
    // Ordered: the request over the dirty block at 12 MiB was cached.
    let cached = if order == WritebackOrder::Ordered {
        12
    } else {
        0
    };
    for m in 6..17 {
        assert_eq!(
            durable[m * MIB..(m + 1) * MIB] == new[(m - 1) * MIB..m * MIB],
            m != cached,
            "{order}: MiB {m}: bypassed writes in writeback mode are durable on the origin when acknowledged"
        );
    }
    let mut got = vec![0u8; 16 * MIB];
    for i in 0..16usize {
        e.read(((i + 1) * MIB) as u64, &mut got[i * MIB..(i + 1) * MIB])
            .unwrap();
    }
    assert!(got == new, "reads after the stream see only its data");
    e.flush_all(0, &mut |_, _| {}).unwrap();
    assert!(
        rig.origin.durable()[MIB..17 * MIB] == new[..],
        "writeback resurrected an old copy"
    );
}

#[test]
fn a_zero_cutoff_never_bypasses() {
    let rig = Rig::new(8 * MIB, 64 * MIB, 4096);
    let e = rig.open(EngineConfig {
        sequential_cutoff: 0,
        ..manual()
    });
    let d = pattern(50, MIB);
    for i in 0..16u64 {
        e.write(i * MIB as u64, &d, false).unwrap();
    }
    let mut buf = vec![0u8; MIB];
    for i in 16..48u64 {
        e.read(i * MIB as u64, &mut buf).unwrap();
    }
    let st = e.stats();
    assert_eq!((st.bypass_reads, st.bypass_writes), (0, 0));
}

/// Reads that need a flaky origin retry before they fail the client.
#[test]
fn reads_retry_a_flaky_origin_before_failing() {
    let rig = Rig::new(8 * MIB, 8 * MIB, 4096);
    let data = pattern(60, 8 * MIB);
    rig.origin.write_at(&data, 0, true).unwrap();
    let e = rig.open(manual());
    rig.origin.set_fail_one_in(3);
    let mut failed = 0;
    let mut buf = vec![0u8; 4096];
    for b in 0..300usize {
        // Sub-block writes read the rest of their block from the origin too.
        let r = if b % 3 == 0 {
            e.write((b * 4096 + 100) as u64, &[7u8; 10], false)
        } else {
            e.read((b * 4096) as u64, &mut buf).map(|()| {
                assert!(buf == data[b * 4096..(b + 1) * 4096]);
            })
        };
        failed += r.is_err() as u32;
    }
    rig.origin.set_fail_one_in(0);
    // One in three origin requests fails: without retries about 100 of 300
    // requests would; with four tries, about 4.
    assert!(failed <= 15, "{failed} of 300 requests failed");
    assert!(e.stats().origin_errors >= 50);
}

/// Writethrough sends the blocks an origin write failed again before the
/// client sees an error, as reads do: one failed request of a flaky origin
/// costs a retry, not a failed client write.
#[test]
fn writethrough_writes_retry_a_flaky_origin_before_failing() {
    let rig = Rig::new(8 * MIB, 8 * MIB, 4096);
    let e = rig.open(EngineConfig {
        mode: Some(CacheMode::Writethrough),
        ..manual()
    });
    rig.origin.set_fail_one_in(3);
    let mut model = vec![0u8; 8 * MIB];
    let mut failed = 0;
    for b in 0..300usize {
        // Two blocks apart, two blocks long: two origin runs now and then.
        let d = pattern(700 + b as u64, 8192);
        let off = (b * 2 % 1000) * 4096;
        match e.write(off as u64, &d, false) {
            Ok(()) => model[off..off + 8192].copy_from_slice(&d),
            Err(_) => failed += 1,
        }
    }
    rig.origin.set_fail_one_in(0);
    // Without retries about 100 of 300 writes would fail; with four tries, about 4.
    assert!(failed <= 15, "{failed} of 300 writethrough writes failed");
    assert!(e.stats().origin_errors >= 50);
    if failed == 0 {
        assert!(rig.origin.current() == model, "the origin has every write");
    }
}

/// A bypassed write whose origin fails is kept in the cache (writeback
/// mode): the client never sees an error the cache could have absorbed.
#[test]
fn a_bypassed_write_falls_back_to_the_cache_when_the_origin_fails() {
    let rig = Rig::new(32 * MIB, 64 * MIB, 4096);
    let e = rig.open(manual());
    let d = pattern(70, 16 * MIB);
    for i in 0..8usize {
        e.write((i * MIB) as u64, &d[i * MIB..(i + 1) * MIB], false)
            .unwrap();
    }
    assert!(e.stats().bypass_writes > 0);
    rig.origin.set_failing(true);
    for i in 8..12usize {
        e.write((i * MIB) as u64, &d[i * MIB..(i + 1) * MIB], false)
            .expect("absorbed by the cache");
    }
    // What the cache absorbed reads back while the origin is still down.
    let mut got = vec![0u8; MIB];
    for i in 8..12usize {
        e.read((i * MIB) as u64, &mut got).unwrap();
        assert!(got == d[i * MIB..(i + 1) * MIB], "MiB {i}");
    }
    rig.origin.set_failing(false);
    for i in 0..12usize {
        e.read((i * MIB) as u64, &mut got).unwrap();
        assert!(got == d[i * MIB..(i + 1) * MIB], "MiB {i}");
    }
    e.flush_all(0, &mut |_, _| {}).unwrap();
    assert!(rig.origin.durable()[..12 * MIB] == d[..12 * MIB]);
}

/// On shutdown, a write that waits for space behind an origin that is down
/// gives up with an error (nothing written) so the server can drain.
#[test]
fn stop_waiting_ends_writes_waiting_for_space() {
    let rig = Rig::new(MIB, 16 * MIB, 4096);
    let e = rig.open(EngineConfig {
        max_request: 64 << 10,
        sequential_cutoff: 0,
        ..Default::default()
    });
    rig.origin.set_failing(true);
    let d = pattern(80, 64 << 10);
    // Fill the cache with dirty data the origin will not take.
    let mut off = 0u64;
    let waiter = loop {
        let waits = e.stats().waits_for_space;
        let (e2, d2) = (e.clone(), d.clone());
        let h = std::thread::spawn(move || e2.write(off, &d2, false));
        // Until the write finishes or is counted as waiting for space (a
        // slow machine may take a while over either).
        while !h.is_finished() && e.stats().waits_for_space == waits {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !h.is_finished() {
            break h;
        }
        h.join().unwrap().unwrap();
        off += d.len() as u64;
        assert!(off < 16 * MIB as u64, "the cache never filled");
    };
    e.stop_waiting();
    let r = waiter.join().unwrap();
    assert!(
        matches!(r, Err(EngineError::ShuttingDown)),
        "a waiting write fails on shutdown: {r:?}"
    );
    rig.origin.set_failing(false);
    let mut got = vec![1u8; d.len()];
    e.read(off, &mut got).unwrap();
    assert!(got.iter().all(|&b| b == 0), "the failed write left nothing");
}

/// Ordered writeback: a dirty version overwritten in a later epoch is kept
/// (across a reopen too) and reaches the origin, flushed, before the newer
/// one; one overwritten in its own epoch is dropped at once. Without order,
/// only the newest version is kept.
#[test]
fn a_version_overwritten_in_a_later_epoch_is_written_back_first() {
    for order in [WritebackOrder::Ordered, WritebackOrder::Unordered] {
        let rig = Rig::new(4 * MIB, 4 * MIB, 4096);
        let cfg = EngineConfig {
            writeback_order: order,
            ..manual()
        };
        let e = rig.open(cfg.clone());
        let (v1, v2, v3) = (pattern(1, 4096), pattern(2, 4096), pattern(3, 4096));
        e.write(0, &v1, false).unwrap();
        e.write(4096, &v1, false).unwrap();
        e.write(4096, &v2, false).unwrap(); // same epoch: v1 of block 1 goes
        e.flush().unwrap();
        e.write(0, &v3, false).unwrap(); // later epoch: v1 of block 0 stays
        let ordered = order == WritebackOrder::Ordered;
        assert_eq!(e.stats().retained, ordered as u64, "{order}");
        assert_eq!(e.dirty_blocks(), 2 + ordered as u64, "{order}");
        e.close().unwrap();
        drop(e);
        let e = rig.open(cfg);
        assert_eq!(e.stats().retained, ordered as u64, "{order}: after reopen");
        let mut got = vec![0u8; 4096];
        e.read(0, &mut got).unwrap();
        assert!(got == v3, "{order}: reads see the newest version");
        e.writeback_step(1000).unwrap();
        let durable = rig.origin.durable();
        if ordered {
            assert!(durable[..4096] == v1[..], "epoch 1 first, flushed");
            assert!(durable[4096..8192] == v2[..], "epoch 1's newest version");
            assert_eq!(e.stats().written_epoch, 1);
        }
        e.flush_all(0, &mut |_, _| {}).unwrap();
        let durable = rig.origin.durable();
        assert!(
            durable[..4096] == v3[..],
            "{order}: the newest version last"
        );
        assert!(durable[4096..8192] == v2[..], "{order}");
        assert_eq!((e.dirty_blocks(), e.stats().retained), (0, 0), "{order}");
        e.close().unwrap();
    }
}

/// A cache of the format before epochs (version 2) is refused, with what to
/// do about it; nothing in it is changed.
#[test]
fn a_cache_of_the_previous_format_is_refused_with_a_clear_message() {
    let rig = Rig::new(4 * MIB, 4 * MIB, 4096);
    const SB: usize = pmcache_engine::format::SB_SIZE;
    let image = rig.region.volatile_image();
    for copy in 0..2 {
        // The superblock as version 2 wrote it: same layout, own checksum.
        let mut sb = image[copy * SB..(copy + 1) * SB].to_vec();
        sb[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c(&sb[..SB - 4]);
        sb[SB - 4..].copy_from_slice(&crc.to_le_bytes());
        // SAFETY: no engine has the region open.
        unsafe { rig.region.copy_flush(copy * SB, &sb) };
    }
    let before = rig.region.volatile_image();
    let err = Engine::open(
        rig.region.clone() as Arc<dyn PmemRegion>,
        rig.origin.clone() as Arc<dyn Origin>,
        manual(),
    )
    .err()
    .expect("an old cache is refused");
    let msg = err.to_string();
    assert!(
        matches!(err, EngineError::OldFormat { found: 2, .. }),
        "{msg}"
    );
    assert!(
        msg.contains("version 2") && msg.contains("pmcache flush"),
        "{msg}"
    );
    assert!(
        rig.region.volatile_image() == before,
        "the refused cache is unchanged"
    );
}

/// Collects what a callback read hands over.
struct Collect(std::sync::mpsc::Sender<Result<Vec<u8>, String>>);

impl pmcache_engine::ReadReply for Collect {
    fn reply(self: Box<Self>, r: pmcache_engine::Result<&[std::io::IoSlice<'_>]>) {
        let r = r
            .map(|s| s.iter().flat_map(|x| x.iter().copied()).collect())
            .map_err(|e| e.to_string());
        self.0.send(r).unwrap();
    }
}

/// `start_miss_read`'s outcome: `None` if declined, else what it replied.
fn miss_read(e: &Arc<Engine>, offset: u64, len: u64) -> Option<Result<Vec<u8>, String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    e.start_miss_read(offset, len, Collect(tx)).ok()?;
    Some(rx.recv_timeout(Duration::from_secs(5)).unwrap())
}

#[test]
fn callback_reads_take_only_whole_misses_and_promote_them() {
    let rig = Rig::new(4 * MIB, 8 * MIB, 4096);
    let d = pattern(31, 3 * 4096);
    rig.origin.write_at(&d, 8192, false).unwrap();
    let e = rig.open(manual());
    let got = miss_read(&e, 8192 + 100, 2 * 4096).expect("all missing: started");
    assert_eq!(got.unwrap(), d[100..100 + 2 * 4096]);
    let s = e.stats();
    assert_eq!((s.read_misses, s.read_hits), (3, 0));
    // Promoted: now a hit the waiting-free path serves, and declined here.
    let mut hit = Vec::new();
    let served = e
        .try_read_cached(8192, 3 * 4096, &mut |sl| {
            sl.iter().for_each(|x| hit.extend_from_slice(x));
            Ok(())
        })
        .unwrap();
    assert!(served && hit == d, "the fills were published");
    assert!(miss_read(&e, 8192, 4096).is_none(), "a hit is declined");
    // A range with one cached block is declined whole, nothing counted.
    let before = e.stats();
    assert!(miss_read(&e, 4096, 2 * 4096).is_none());
    assert_eq!(e.stats().read_misses, before.read_misses);
    // Its clean copy is what a later write replaces, and reads follow.
    e.write(8192, &pattern(32, 4096), false).unwrap();
    let mut b = vec![0u8; 4096];
    e.read(8192, &mut b).unwrap();
    assert_eq!(b, pattern(32, 4096));
}

#[test]
fn a_failed_callback_read_holds_nothing() {
    let rig = Rig::new(4 * MIB, 8 * MIB, 4096);
    let e = rig.open(manual());
    rig.origin.set_failing(true);
    let r = miss_read(&e, 0, 8192).expect("started");
    assert!(
        r.unwrap_err().contains("origin"),
        "the origin's error is handed over"
    );
    assert_eq!(
        e.stats().read_misses,
        0,
        "left to the retrying path to count"
    );
    rig.origin.set_failing(false);
    // No reader lock or slot left behind: a write and a read go through.
    e.write(0, &pattern(33, 4096), true).unwrap();
    // (Away from the failed read: a read that continues it is a stream's,
    // which goes the waiting way.)
    assert!(miss_read(&e, 4096, 4096).is_none());
    let got = miss_read(&e, 64 * 4096, 4096).expect("started").unwrap();
    assert_eq!(got, vec![0u8; 4096]);
    let mut b = vec![0u8; 8192];
    e.read(0, &mut b).unwrap();
    assert_eq!(&b[..4096], &pattern(33, 4096)[..]);
    drop(e);
    assert!(check::check(&*rig.region, None, true).ok());
}
