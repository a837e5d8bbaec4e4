//! Read misses where the fence is an msync (a cache file on a disk): the
//! fills go into their slots from the bounce buffer, survive a reopen, and
//! once the cache is nearly full a block must miss twice to be promoted.
#![allow(clippy::unwrap_used)] // tests may panic on failure

use std::sync::Arc;

use pmcache_engine::{Engine, EngineConfig, ReadReply};
use pmcache_origin::{MemOrigin, Origin};
use pmcache_pmem::{MapOptions, MappedRegion, PersistMode, PmemRegion};
use pmcache_testkit::{pattern, TempDir};

const BS: usize = 4096;
const MIB: u64 = 1 << 20;

fn open(path: &std::path::Path, origin: &Arc<MemOrigin>, format: bool) -> Arc<Engine> {
    let region = Arc::new(if format {
        MappedRegion::create(path, 4 * MIB, &MapOptions::new()).unwrap()
    } else {
        MappedRegion::open(path, &MapOptions::new()).unwrap()
    });
    assert_eq!(region.mode(), PersistMode::Msync);
    if format {
        Engine::format(&*region, &**origin, BS as u32).unwrap();
    }
    Engine::open(
        region as Arc<dyn PmemRegion>,
        origin.clone() as Arc<dyn Origin>,
        EngineConfig {
            background_writeback: false,
            sequential_cutoff: 0,
            shards: Some(1),
            ..Default::default()
        },
    )
    .unwrap()
}

fn read_block(e: &Engine, b: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BS];
    e.read(b * BS as u64, &mut buf).unwrap();
    buf
}

/// Read distinct blocks from 0 on until less than a fifth of the cache is
/// free; returns the first block not read.
fn fill_to_four_fifths(e: &Engine) -> u64 {
    let slots = e.stats().slots;
    let mut b = 0u64;
    while e.stats().free * 5 >= slots {
        read_block(e, b);
        b += 1;
    }
    e.quiesce();
    b
}

#[test]
fn fills_are_promoted_and_durable() {
    let dir = TempDir::on_disk("msyncreads");
    let path = dir.join("cache.pmem");
    let data = pattern(11, 64 * MIB as usize);
    let origin = Arc::new(MemOrigin::from_bytes(data.clone()).with_name("mr"));
    let e = open(&path, &origin, true);
    for b in 0..100u64 {
        let want = &data[b as usize * BS..(b as usize + 1) * BS];
        assert_eq!(read_block(&e, b), want, "miss of block {b}");
    }
    // A miss is answered before its fill's shared msync returned.
    e.quiesce();
    let s = e.stats();
    assert_eq!((s.read_misses, s.promotions), (100, 100), "{s:?}");
    for b in 0..100u64 {
        let want = &data[b as usize * BS..(b as usize + 1) * BS];
        assert_eq!(read_block(&e, b), want, "hit of block {b}");
    }
    assert_eq!(e.stats().read_hits, 100);
    e.close().unwrap();
    drop(e);

    // The fills were made durable: after a reopen they are still cached.
    let e = open(&path, &origin, false);
    assert_eq!(e.stats().occupied, 100);
    for b in 0..100u64 {
        let want = &data[b as usize * BS..(b as usize + 1) * BS];
        assert_eq!(read_block(&e, b), want, "hit of block {b} after reopen");
    }
    assert_eq!(e.stats().read_hits, 100);
}

#[test]
fn a_nearly_full_cache_promotes_on_the_second_miss() {
    let dir = TempDir::on_disk("msyncfull");
    let path = dir.join("cache.pmem");
    let data = pattern(12, 64 * MIB as usize);
    let origin = Arc::new(MemOrigin::from_bytes(data.clone()).with_name("mf"));
    let e = open(&path, &origin, true);
    let b = fill_to_four_fifths(&e);
    let before = e.stats();
    // A sweep of blocks never read passes through.
    let sweep = b..b + 50;
    for x in sweep.clone() {
        let want = &data[x as usize * BS..(x as usize + 1) * BS];
        assert_eq!(read_block(&e, x), want);
    }
    e.quiesce();
    let after = e.stats();
    assert_eq!(after.promotions, before.promotions, "first misses promoted");
    // The same blocks again: now they are promoted, and then they hit.
    for x in sweep.clone() {
        let want = &data[x as usize * BS..(x as usize + 1) * BS];
        assert_eq!(read_block(&e, x), want);
    }
    e.quiesce();
    let again = e.stats();
    assert_eq!(again.promotions, after.promotions + 50, "{again:?}");
    for x in sweep {
        let want = &data[x as usize * BS..(x as usize + 1) * BS];
        assert_eq!(read_block(&e, x), want);
    }
    assert_eq!(e.stats().read_hits, again.read_hits + 50);
}

/// What a callback read's reply saw: its data, or that it failed.
struct Seen(std::sync::mpsc::Sender<Option<Vec<u8>>>);

impl ReadReply for Seen {
    fn reply(self: Box<Self>, r: pmcache_engine::Result<&[std::io::IoSlice<'_>]>) {
        let got = r
            .ok()
            .map(|s| s.iter().flat_map(|b| b.iter().copied()).collect());
        self.0.send(got).unwrap();
    }
}

/// A callback read that fails is retried the waiting way (as the NBD
/// server does): the try and its retry are one miss, so a nearly full
/// cache does not promote the block, and only a second read's miss does.
#[test]
fn a_failed_try_and_its_retry_are_one_miss() {
    let dir = TempDir::on_disk("msynctry");
    let path = dir.join("cache.pmem");
    let data = pattern(13, 64 * MIB as usize);
    let origin = Arc::new(MemOrigin::from_bytes(data.clone()).with_name("mt"));
    let e = open(&path, &origin, true);
    let b = fill_to_four_fifths(&e);
    let before = e.stats().promotions;
    for x in b..b + 20 {
        let (tx, rx) = std::sync::mpsc::channel();
        origin.set_failing(true);
        let started = e
            .start_miss_read(x * BS as u64, BS as u64, Seen(tx))
            .is_ok();
        origin.set_failing(false);
        assert!(started, "block {x}: the callback read did not start");
        assert_eq!(rx.recv().unwrap(), None, "block {x}: the try did not fail");
        let want = &data[x as usize * BS..(x as usize + 1) * BS];
        assert_eq!(read_block(&e, x), want, "block {x}: the retry");
    }
    e.quiesce();
    assert_eq!(e.stats().promotions, before, "a retried try promoted");
    for x in b..b + 20 {
        read_block(&e, x);
    }
    e.quiesce();
    assert_eq!(
        e.stats().promotions,
        before + 20,
        "second reads not promoted"
    );
}
