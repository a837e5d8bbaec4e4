//! Writes in two halves (`stage_write` + `commit`): the first half never
//! waits, holds the blocks between the halves, and writes nothing unless
//! committed; a commit is as durable as a one-call write.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

use std::io::IoSliceMut;
use std::sync::Arc;

use pmcache_engine::{CacheMode, Engine, EngineConfig, Stage, StagedWrite, WriteReply};
use pmcache_origin::{MemOrigin, Origin};
use pmcache_pmem::{PmemRegion, SimRegion};

const MIB: usize = 1 << 20;
const BS: usize = 4096;

fn manual(mode: CacheMode) -> EngineConfig {
    EngineConfig {
        background_writeback: false,
        mode: Some(mode),
        // Several shards, so requests across a chunk boundary span two.
        shards: Some(8),
        ..Default::default()
    }
}

fn rig(mode: CacheMode) -> (Arc<SimRegion>, Arc<MemOrigin>, Arc<Engine>) {
    rig_sized(mode, 3 * MIB, 8 * MIB)
}

fn rig_sized(
    mode: CacheMode,
    cache: usize,
    size: usize,
) -> (Arc<SimRegion>, Arc<MemOrigin>, Arc<Engine>) {
    let region = Arc::new(SimRegion::new(cache));
    let origin = Arc::new(MemOrigin::new(size as u64).with_name("staged"));
    Engine::format(&*region, &*origin, BS as u32).unwrap();
    let e = open(&region, &origin, mode);
    (region, origin, e)
}

fn open(region: &Arc<SimRegion>, origin: &Arc<MemOrigin>, mode: CacheMode) -> Arc<Engine> {
    Engine::open(
        region.clone() as Arc<dyn PmemRegion>,
        origin.clone() as Arc<dyn Origin>,
        manual(mode),
    )
    .unwrap()
}

/// A source that fills the slots with `byte` and counts its calls.
fn fill(
    byte: u8,
    calls: &mut usize,
) -> impl FnMut(&mut [IoSliceMut<'_>]) -> std::io::Result<()> + '_ {
    move |slices| {
        *calls += 1;
        for s in slices.iter_mut() {
            s.fill(byte);
        }
        Ok(())
    }
}

fn stage(e: &Arc<Engine>, off: usize, len: usize, byte: u8) -> (Stage, usize) {
    let mut calls = 0;
    let st = e
        .stage_write(off as u64, len as u64, false, &mut fill(byte, &mut calls))
        .unwrap();
    (st, calls)
}

fn staged(e: &Arc<Engine>, off: usize, len: usize, byte: u8) -> StagedWrite {
    match stage(e, off, len, byte) {
        (Stage::Staged(w), 1) => *w,
        (Stage::Staged(_), n) => panic!("source called {n} times"),
        (Stage::WouldWait, _) => panic!("stage of {off}+{len} would wait"),
    }
}

fn read(e: &Engine, off: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0xeeu8; len];
    e.read(off as u64, &mut v).unwrap();
    v
}

/// What a crash now would leave: reopen the durable image.
fn after_crash(region: &SimRegion, origin: &Arc<MemOrigin>) -> Arc<Engine> {
    let img = Arc::new(SimRegion::from_image(&region.durable_image()));
    open(&img, origin, CacheMode::Writeback)
}

#[test]
fn a_staged_write_is_invisible_until_committed_and_durable_after() {
    let (region, origin, e) = rig(CacheMode::Writeback);
    let w = staged(&e, 2 * BS, 2 * BS, 0xab);
    assert!(
        w.commit_is_quick(),
        "writeback on (simulated) pmem: a fence"
    );
    assert!(read(&e, 2 * BS, 2 * BS).iter().all(|&b| b == 0));
    let crashed = after_crash(&region, &origin);
    assert!(read(&crashed, 2 * BS, 2 * BS).iter().all(|&b| b == 0));
    drop(crashed);
    w.commit().unwrap();
    assert!(read(&e, 2 * BS, 2 * BS).iter().all(|&b| b == 0xab));
    let crashed = after_crash(&region, &origin);
    assert!(
        read(&crashed, 2 * BS, 2 * BS).iter().all(|&b| b == 0xab),
        "a committed write must be durable"
    );
    assert_eq!(e.stats().writes, 1);
}

#[test]
fn overlapping_stages_wait_and_others_proceed() {
    let (_r, _o, e) = rig(CacheMode::Writeback);
    let a = staged(&e, 0, 3 * BS, 1);
    let (b, calls) = stage(&e, 2 * BS, BS, 2);
    assert!(
        matches!(b, Stage::WouldWait),
        "an overlapping stage must not take the block"
    );
    assert_eq!(calls, 0, "nothing received for a stage that would wait");
    let c = staged(&e, 3 * BS, BS, 3);
    c.commit().unwrap();
    a.commit().unwrap();
    let b = staged(&e, 2 * BS, BS, 2);
    b.commit().unwrap();
    let got = read(&e, 0, 4 * BS);
    assert!(got[..2 * BS].iter().all(|&x| x == 1));
    assert!(got[2 * BS..3 * BS].iter().all(|&x| x == 2));
    assert!(got[3 * BS..].iter().all(|&x| x == 3));
}

#[test]
fn a_dropped_stage_writes_nothing_and_gives_everything_back() {
    let (region, origin, e) = rig(CacheMode::Writeback);
    let free = e.stats();
    drop(staged(&e, 0, 4 * BS, 9));
    assert!(read(&e, 0, 4 * BS).iter().all(|&b| b == 0));
    assert!(read(&after_crash(&region, &origin), 0, 4 * BS)
        .iter()
        .all(|&b| b == 0));
    // The blocks are free for the next writer, without waiting.
    staged(&e, 0, 4 * BS, 5).commit().unwrap();
    assert!(read(&e, 0, 4 * BS).iter().all(|&b| b == 5));
    assert_eq!(e.stats().writes, free.writes + 1);
}

#[test]
fn staging_never_waits_for_space() {
    let (_r, _o, e) = rig(CacheMode::Writeback);
    let slots = e.layout().slot_count as usize;
    let mut held = Vec::new();
    let mut waited = None;
    // Holding staged writes keeps their slots; some shard runs dry before
    // every slot is taken, and that stage must say so instead of waiting.
    for i in 0..=slots {
        match stage(&e, i * BS, BS, 1) {
            (Stage::Staged(w), _) => held.push(*w),
            (Stage::WouldWait, calls) => {
                assert_eq!(calls, 0);
                waited = Some(i);
                break;
            }
        }
    }
    assert!(waited.is_some(), "{slots} slots never ran out");
    drop(held);
    e.write(0, &vec![7u8; BS], false).unwrap();
    assert!(read(&e, 0, 2 * BS)[..BS].iter().all(|&b| b == 7));
    assert!(read(&e, BS, BS).iter().all(|&b| b == 0));
}

#[test]
fn partial_blocks_and_origin_first_modes_take_the_waiting_path() {
    let (_r, _o, e) = rig(CacheMode::Writeback);
    for (off, len) in [(1, BS), (0, BS + 1), (BS, 100)] {
        let (st, calls) = stage(&e, off, len, 1);
        assert!(matches!(st, Stage::WouldWait), "{off}+{len}");
        assert_eq!(calls, 0);
    }
    for mode in [CacheMode::Writearound, CacheMode::Passthrough] {
        let (_r, _o, e) = rig(mode);
        assert!(matches!(stage(&e, 0, BS, 1).0, Stage::WouldWait));
    }
}

#[test]
fn a_failed_payload_stages_nothing() {
    let (_r, _o, e) = rig(CacheMode::Writeback);
    let r = e.stage_write(0, 2 * BS as u64, false, &mut |s| {
        s[0].fill(3);
        Err(std::io::Error::other("client left"))
    });
    assert!(matches!(r, Err(pmcache_engine::EngineError::Transfer(_))));
    assert!(read(&e, 0, 2 * BS).iter().all(|&b| b == 0));
    staged(&e, 0, 2 * BS, 4).commit().unwrap();
}

#[test]
fn a_writethrough_commit_writes_the_origin() {
    let (_r, origin, e) = rig(CacheMode::Writethrough);
    let w = staged(&e, 5 * BS, 2 * BS, 0x5a);
    assert!(
        !w.commit_is_quick(),
        "a writethrough commit waits for the origin"
    );
    let mut o = vec![0u8; 2 * BS];
    origin.read_at(&mut o, 5 * BS as u64).unwrap();
    assert!(
        o.iter().all(|&b| b == 0),
        "nothing reaches the origin before the commit"
    );
    w.commit().unwrap();
    origin.read_at(&mut o, 5 * BS as u64).unwrap();
    assert!(o.iter().all(|&b| b == 0x5a));
    assert!(read(&e, 5 * BS, 2 * BS).iter().all(|&b| b == 0x5a));
    // The writer locks are released: the blocks can be staged again.
    staged(&e, 5 * BS, BS, 1).commit().unwrap();
}

/// What `commit_through` reported.
enum Reported {
    Done(Result<(), String>),
    Retry(Box<dyn FnOnce() -> pmcache_engine::Result<()> + Send>),
}

struct Report(std::sync::mpsc::Sender<Reported>);

impl WriteReply for Report {
    fn reply(self: Box<Self>, r: pmcache_engine::Result<()>) {
        self.0
            .send(Reported::Done(r.map_err(|e| e.to_string())))
            .unwrap();
    }
    fn retry(self: Box<Self>, finish: Box<dyn FnOnce() -> pmcache_engine::Result<()> + Send>) {
        self.0.send(Reported::Retry(finish)).unwrap();
    }
}

fn commit_through(w: StagedWrite) -> Option<Reported> {
    let (tx, rx) = std::sync::mpsc::channel();
    Box::new(w).commit_through(Report(tx)).ok()?;
    Some(rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap())
}

/// A writethrough commit finished by the origin's callback: the cache and
/// the origin have the data when it reports, and its blocks are free for
/// the next write; an origin that fails asks for a retry, which (run where
/// waiting is fine) finishes the write. Writeback mode and FUA decline.
#[test]
fn a_writethrough_commit_can_finish_on_the_origins_callback() {
    let (_r, origin, e) = rig(CacheMode::Writethrough);
    let Some(Reported::Done(r)) = commit_through(staged(&e, 5 * BS, 2 * BS, 0x6b)) else {
        panic!("a plain writethrough commit reports done");
    };
    r.unwrap();
    let mut o = vec![0u8; 2 * BS];
    origin.read_at(&mut o, 5 * BS as u64).unwrap();
    assert!(o.iter().all(|&b| b == 0x6b), "the origin has it");
    assert!(read(&e, 5 * BS, 2 * BS).iter().all(|&b| b == 0x6b));
    assert_eq!(e.stats().writes, 1);

    origin.set_failing(true);
    let Some(Reported::Retry(finish)) = commit_through(staged(&e, 5 * BS, BS, 0x6c)) else {
        panic!("a failed origin write asks for a retry");
    };
    origin.set_failing(false);
    finish().unwrap();
    origin.read_at(&mut o[..BS], 5 * BS as u64).unwrap();
    assert!(
        o[..BS].iter().all(|&b| b == 0x6c),
        "the retry wrote the origin"
    );
    assert!(read(&e, 5 * BS, BS).iter().all(|&b| b == 0x6c));
    // Everything given back: the block can be staged and written again.
    staged(&e, 5 * BS, BS, 1).commit().unwrap();

    let (_r2, _o2, wb) = rig(CacheMode::Writeback);
    assert!(
        Box::new(staged(&wb, 0, BS, 2))
            .commit_through(Report(std::sync::mpsc::channel().0))
            .is_err(),
        "writeback mode has no origin write to wait for"
    );
}

/// Staged writes of many blocks, some across shards, held until a shard
/// runs dry, then dropped: a stage that gives up part-way gives back
/// exactly the slots it took (a wrong slot unpinned or freed twice would
/// trip the index's assertions or show up as wrong data below).
#[test]
fn stages_that_give_up_part_way_give_back_exactly_their_slots() {
    use rand::{Rng, SeedableRng};
    // Big enough for several shards (each needs two maximal requests).
    let (region, _o, e) = rig_sized(CacheMode::Writeback, 20 * MIB, 64 * MIB);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(13);
    let blocks = 64 * MIB / BS;
    for round in 0..6u8 {
        let mut held = Vec::new();
        let mut gave_up = 0;
        for _ in 0..2000 {
            let n = rng.gen_range(1..=256);
            let b = rng.gen_range(0..=blocks - n);
            match stage(&e, b * BS, n * BS, round + 1) {
                (Stage::Staged(w), _) => held.push(*w),
                (Stage::WouldWait, calls) => {
                    assert_eq!(calls, 0);
                    gave_up += 1;
                }
            }
        }
        assert!(gave_up > 0, "round {round}: the cache never ran dry");
        drop(held);
        assert_eq!(e.stats().free, e.stats().slots, "round {round}");
    }
    // Everything taken came back: the whole cache can be written over and
    // read back.
    let slots = e.layout().slot_count as usize;
    for i in 0..slots {
        e.write((i * BS) as u64, &[i as u8; BS], false).unwrap();
    }
    for i in 0..slots {
        assert!(
            read(&e, i * BS, BS).iter().all(|&x| x == i as u8),
            "block {i}"
        );
    }
    e.close().unwrap();
    let rep = pmcache_engine::check::check(&*region, None, true);
    assert!(rep.ok(), "{:?}", rep.errors);
}
