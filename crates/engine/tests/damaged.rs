//! Cached data damaged while the cache was closed (contract §7: never serve
//! wrong data silently). Each slot's entry holds a hash of its data; the
//! first use after an open checks it. A damaged clean copy is dropped and
//! read from the origin again; a damaged dirty one is the only copy, so
//! reads of it fail, writeback never sends it, and a flush says which block.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

use std::sync::Arc;

use pmcache_engine::{check, Engine, EngineConfig, EngineError};
use pmcache_origin::{MemOrigin, Origin};
use pmcache_pmem::{PmemRegion, SimRegion};

const BS: usize = 4096;

fn open(region: &Arc<SimRegion>, origin: &Arc<MemOrigin>) -> Arc<Engine> {
    Engine::open(
        region.clone() as Arc<dyn PmemRegion>,
        origin.clone() as Arc<dyn Origin>,
        EngineConfig {
            background_writeback: false,
            sequential_cutoff: 0,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Flip a word in the data of `block`'s current version, as media damage
/// while the cache is closed would.
fn damage(region: &SimRegion, block: u64) {
    let d = check::dump(region).unwrap();
    let m = d
        .mappings
        .iter()
        .filter(|m| m.block == block)
        .max_by_key(|m| m.seq)
        .unwrap();
    let off = d.superblock.layout.data_off(m.slot) + 64;
    let w = region.word(off).load(std::sync::atomic::Ordering::Relaxed);
    region.store_word_flush(off, !w);
    region.fence();
}

fn read(e: &Engine, block: u64, len: usize) -> Result<Vec<u8>, EngineError> {
    let mut buf = vec![0u8; len];
    e.read(block * BS as u64, &mut buf).map(|()| buf)
}

/// Blocks 0..4 clean (0x11), block 5 dirty (0x55); then 1 and 5 damaged.
fn damaged_cache() -> (Arc<SimRegion>, Arc<MemOrigin>) {
    let region = Arc::new(SimRegion::new(4 << 20));
    let origin = Arc::new(MemOrigin::new(4 << 20).with_name("damaged"));
    Engine::format(&*region, &*origin, BS as u32).unwrap();
    let e = open(&region, &origin);
    e.write(0, &[0x11; 4 * BS], false).unwrap();
    e.flush_all(0, &mut |_, _| {}).unwrap();
    e.write(5 * BS as u64, &[0x55; BS], false).unwrap();
    e.close().unwrap();
    drop(e);
    damage(&region, 1);
    damage(&region, 5);
    let report = check::check(&*region, None, true);
    assert!(!report.ok(), "check finds the damage");
    (region, origin)
}

#[test]
fn a_damaged_clean_copy_is_read_from_the_origin() {
    let (region, origin) = damaged_cache();
    let e = open(&region, &origin);
    assert_eq!(read(&e, 0, BS).unwrap(), [0x11; BS], "an intact block");
    // One block, then a range across the damaged one.
    assert_eq!(read(&e, 1, 100).unwrap(), [0x11; 100]);
    assert_eq!(e.stats().corrupt_blocks, 1);
    assert_eq!(read(&e, 0, 4 * BS).unwrap(), [0x11; 4 * BS]);
    assert_eq!(e.stats().corrupt_blocks, 1, "the damaged copy is gone");
}

#[test]
fn a_damaged_range_read_drops_the_clean_copy() {
    let (region, origin) = damaged_cache();
    let e = open(&region, &origin);
    assert_eq!(read(&e, 0, 4 * BS).unwrap(), [0x11; 4 * BS]);
    assert_eq!(e.stats().corrupt_blocks, 1);
}

#[test]
fn a_damaged_dirty_block_fails_its_reads_and_its_writeback() {
    let (region, origin) = damaged_cache();
    let e = open(&region, &origin);
    for (what, r) in [
        ("one block", read(&e, 5, BS)),
        ("a range", read(&e, 4, 2 * BS)),
    ] {
        assert!(
            matches!(r, Err(EngineError::DataCorrupt { block: 5, .. })),
            "{what}: {r:?}"
        );
    }
    // A partial write would merge with the damaged data.
    let r = e.write(5 * BS as u64 + 10, &[0x66; 10], false);
    assert!(
        matches!(r, Err(EngineError::DataCorrupt { block: 5, .. })),
        "{r:?}"
    );
    // Writeback never sends it, and says so at once rather than retrying.
    let r = e.flush_all(u32::MAX, &mut |_, _| {});
    assert!(
        matches!(r, Err(EngineError::DataCorrupt { block: 5, .. })),
        "{r:?}"
    );
    assert_eq!(origin.current()[5 * BS..6 * BS], [0; BS]);
    assert_eq!(e.dirty_blocks(), 1);
    // Five uses of the one damaged block: counted once.
    assert_eq!(e.stats().corrupt_blocks, 1);

    // Written again whole, the block is good: the damaged version is
    // dropped on its way to the origin.
    e.write(5 * BS as u64, &[0x77; BS], false).unwrap();
    e.flush().unwrap();
    assert_eq!(read(&e, 5, BS).unwrap(), [0x77; BS]);
    e.flush_all(0, &mut |_, _| {}).unwrap();
    assert_eq!(e.dirty_blocks(), 0);
    assert_eq!(origin.current()[5 * BS..6 * BS], [0x77; BS]);
}

#[test]
fn blocks_written_since_the_open_are_not_checked() {
    let (region, origin) = damaged_cache();
    let e = open(&region, &origin);
    // Rewritten whole before any use: the new version is trusted.
    e.write(BS as u64, &[0x22; BS], false).unwrap();
    assert_eq!(read(&e, 1, BS).unwrap(), [0x22; BS]);
    assert_eq!(e.stats().corrupt_blocks, 0);
}

#[test]
fn a_switch_that_must_write_a_damaged_block_back_is_refused_with_the_way_out() {
    let (region, origin) = damaged_cache();
    let r = Engine::open(
        region.clone() as Arc<dyn PmemRegion>,
        origin.clone() as Arc<dyn Origin>,
        EngineConfig {
            background_writeback: false,
            mode: Some(pmcache_engine::CacheMode::Writethrough),
            ..Default::default()
        },
    );
    let msg = r
        .err()
        .expect("the switch needs block 5 written back")
        .to_string();
    assert!(
        msg.contains("block 5") && msg.contains("serve it in writeback mode"),
        "{msg}"
    );
    // The way out works: in writeback mode, write the block again.
    let e = open(&region, &origin);
    e.write(5 * BS as u64, &[0x77; BS], false).unwrap();
    e.set_mode(pmcache_engine::CacheMode::Writethrough).unwrap();
    assert_eq!(origin.current()[5 * BS..6 * BS], [0x77; BS]);
}
