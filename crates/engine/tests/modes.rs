//! Cache modes (contract §5). Passthrough trusts only dirty data in the
//! cache. A mode switch racing a write: whatever path the write took, no
//! older version of a block may reach the origin after a newer one that was
//! acknowledged, so after writeback the origin holds the newest.
//!
//! Ordered writeback retains a block's older dirty version until its epoch
//! is written back. A writethrough puts the newest version on the origin at
//! once; a retained version written back after it would bring old data back
//! while the cache calls the newest clean. Each test forces one interleaving
//! with the engine's test hooks.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use pmcache_engine::{CacheMode, Engine, EngineConfig, HookPoint};
use pmcache_origin::{MemOrigin, Origin};
use pmcache_pmem::{PmemRegion, SimRegion};

const BS: usize = 4096;

fn engine(mode: CacheMode) -> (Arc<Engine>, Arc<MemOrigin>) {
    let region = Arc::new(SimRegion::new(4 << 20));
    let origin = Arc::new(MemOrigin::new(4 << 20).with_name("switch"));
    Engine::format(&*region, &*origin, BS as u32).unwrap();
    let e = Engine::open(
        region as Arc<dyn PmemRegion>,
        origin.clone() as Arc<dyn Origin>,
        EngineConfig {
            background_writeback: false,
            mode: Some(mode),
            sequential_cutoff: 0,
            ..Default::default()
        },
    )
    .unwrap();
    (e, origin)
}

/// Run `f` once, the first time a thread reaches `point`.
fn once_at(e: &Arc<Engine>, point: HookPoint, f: impl Fn(&Engine) + Send + Sync + 'static) {
    let weak: Weak<Engine> = Arc::downgrade(e);
    let done = AtomicBool::new(false);
    e.set_test_hook(Some(Arc::new(move |p| {
        if p == point && !done.swap(true, Ordering::SeqCst) {
            f(&weak.upgrade().unwrap());
        }
    })));
}

/// After writeback of everything, block 0 holds `byte` in the cache and on
/// the origin: no older version reached the origin after it.
fn assert_written_back(e: &Engine, origin: &MemOrigin, byte: u8) {
    e.flush_all(0, &mut |_, _| {}).unwrap();
    assert_eq!(e.dirty_blocks(), 0);
    let mut cached = vec![0u8; BS];
    e.read(0, &mut cached).unwrap();
    assert_eq!(cached, [byte; BS]);
    assert_eq!(
        origin.current()[..BS],
        [byte; BS],
        "an older version reached the origin last"
    );
}

/// A writethrough whose commit comes after a switch to writeback: its
/// older dirty version (from a writethrough the origin refused, an epoch
/// earlier) must not be retained and written back over it.
#[test]
fn writethrough_commit_after_a_switch_to_writeback() {
    let (e, origin) = engine(CacheMode::Writethrough);
    origin.set_failing(true);
    assert!(
        e.write(0, &[0x11; BS], false).is_err(),
        "the origin refused it"
    );
    origin.set_failing(false);
    e.flush().unwrap();
    assert_eq!(e.dirty_blocks(), 1, "the refused write stays dirty");

    once_at(&e, HookPoint::WriteCommit, |e| {
        e.set_mode(CacheMode::Writeback).unwrap();
    });
    e.write(0, &[0x22; BS], false).unwrap();
    e.set_test_hook(None);
    assert_eq!(e.mode(), CacheMode::Writeback);

    assert_written_back(&e, &origin, 0x22);
}

/// A writeback commit that lands while a switch to writethrough has just
/// written back everything: the version it retains must not follow a
/// later writethrough of the same block to the origin.
#[test]
fn writeback_commit_during_a_switch_to_writethrough() {
    let (e, origin) = engine(CacheMode::Writeback);
    once_at(&e, HookPoint::ModeSwitch, |e| {
        // Still writeback: v1 in one epoch, v2 in the next retains v1.
        e.write(0, &[0x11; BS], false).unwrap();
        e.flush().unwrap();
        e.write(0, &[0x22; BS], false).unwrap();
    });
    e.set_mode(CacheMode::Writethrough).unwrap();
    e.set_test_hook(None);
    assert_eq!(
        e.dirty_blocks(),
        2,
        "v2 landed after the switch's writeback and retains v1"
    );

    e.write(0, &[0x33; BS], false).unwrap();
    e.flush().unwrap();
    assert_written_back(&e, &origin, 0x33);
}

/// Passthrough reads come from the origin, except for dirty blocks not yet
/// written back: a clean cached copy may be stale (the origin changed while
/// the cache was not in front of it).
#[test]
fn passthrough_reads_clean_blocks_from_the_origin() {
    let (e, origin) = engine(CacheMode::Writeback);
    e.write(0, &[0x11; 3 * BS], false).unwrap();
    // The switch writes the blocks back; they stay cached, clean.
    e.set_mode(CacheMode::Passthrough).unwrap();
    assert_eq!((e.dirty_blocks(), e.stats().occupied), (0, 3));
    // The origin changes behind the clean copies.
    origin.write_at(&[0x33; 3 * BS], 0, false).unwrap();
    let hits = e.stats().read_hits;
    let mut one = vec![0u8; 100];
    e.read(10, &mut one).unwrap();
    assert_eq!(
        one, [0x33; 100],
        "a one-block read served the clean cached copy"
    );
    let mut all = vec![0u8; 3 * BS];
    e.read(0, &mut all).unwrap();
    assert_eq!(
        all,
        [0x33; 3 * BS],
        "a multi-block read served clean cached copies"
    );
    assert_eq!(e.stats().read_hits, hits, "counted as hits");
    assert_eq!(e.stats().promotions, 0, "nothing promoted in passthrough");
}

/// Writes that go around the cache still count as hits (a cached copy was
/// dropped) or misses, per block.
#[test]
fn writearound_counts_write_hits_and_misses() {
    let (e, origin) = engine(CacheMode::Writeback);
    e.write(0, &[0x11; BS], false).unwrap();
    e.set_mode(CacheMode::Writearound).unwrap();
    let before = e.stats();
    e.write(0, &[0x22; 2 * BS], false).unwrap();
    let after = e.stats();
    assert_eq!(after.write_hits - before.write_hits, 1);
    assert_eq!(after.write_misses - before.write_misses, 1);
    assert_eq!(origin.current()[..2 * BS], [0x22; 2 * BS]);
    assert_eq!(after.occupied, 0, "the cached copy was dropped");
}

/// Block status says zero only where a read returns the cache's zeroes:
/// not in passthrough, where clean blocks come from the origin.
#[test]
fn zero_extents_follow_what_reads_return() {
    let (e, origin) = engine(CacheMode::Writeback);
    e.write(0, &[0x11; 2 * BS], false).unwrap();
    e.write_zeroes(BS as u64, 2 * BS as u64, false).unwrap();
    let bs = BS as u64;
    assert_eq!(
        e.zero_extents(100, 4 * bs).unwrap(),
        [(bs - 100, false), (2 * bs, true), (bs + 100, false)]
    );
    e.set_mode(CacheMode::Passthrough).unwrap();
    origin.write_at(&[0x33; BS], bs, false).unwrap();
    assert_eq!(e.zero_extents(0, 4 * bs).unwrap(), [(4 * bs, false)]);
}
