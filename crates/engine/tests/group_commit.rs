//! Msync mode (a cache file on a disk): concurrent writers share msyncs.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

use std::sync::Arc;

use pmcache_engine::{CacheMode, Engine, EngineConfig, Stage, WriteReply};
use pmcache_origin::{MemOrigin, Origin};
use pmcache_pmem::{MapOptions, MappedRegion, PersistMode, PmemRegion};

const MIB: u64 = 1 << 20;

/// An msync-mode engine over a cache file on the disk (not tmpfs), so an
/// msync takes long enough for writers to meet.
fn msync_engine(tag: &str) -> (pmcache_testkit::TempDir, Arc<MappedRegion>, Arc<Engine>) {
    let dir = pmcache_testkit::TempDir::on_disk(tag);
    let path = dir.join("cache.pmem");
    let region = Arc::new(MappedRegion::create(&path, 8 * MIB, &MapOptions::new()).unwrap());
    assert_eq!(region.mode(), PersistMode::Msync);
    let origin = Arc::new(MemOrigin::new(64 * MIB).with_name(tag));
    Engine::format(&*region, &*origin, 4096).unwrap();
    let e = Engine::open(
        region.clone() as Arc<dyn PmemRegion>,
        origin.clone() as Arc<dyn Origin>,
        EngineConfig {
            background_writeback: false,
            ..Default::default()
        },
    )
    .unwrap();
    (dir, region, e)
}

fn fill_of(b: u64) -> u8 {
    (b % 251) as u8 + 1
}

#[test]
fn concurrent_writers_share_msyncs() {
    let (_dir, region, e) = msync_engine("gc");
    // Far more writers than msyncs may run at once, so most must share.
    const THREADS: u64 = 32;
    const WRITES: u64 = 10;
    let before = region.syncs();
    // Started together, so they meet even where spawning is slow.
    let start = std::sync::Barrier::new(THREADS as usize);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (e, start) = (&e, &start);
            s.spawn(move || {
                start.wait();
                for i in 0..WRITES {
                    let b = t * WRITES + i;
                    e.write(b * 4096, &[fill_of(b); 4096], false).unwrap();
                }
            });
        }
    });
    let syncs = region.syncs() - before;
    let writes = THREADS * WRITES;
    assert!(
        syncs < writes / 2,
        "{syncs} msyncs for {writes} concurrent writes: writers do not share them"
    );
    let mut b = [0u8; 4096];
    for blk in 0..writes {
        e.read(blk * 4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == fill_of(blk)), "block {blk}");
    }
}

/// Reports a staged write's outcome with its block number.
struct Report(
    std::sync::mpsc::Sender<(u64, pmcache_engine::Result<()>)>,
    u64,
);

impl WriteReply for Report {
    fn reply(self: Box<Self>, r: pmcache_engine::Result<()>) {
        self.0.send((self.1, r)).unwrap();
    }
    fn retry(self: Box<Self>, finish: Box<dyn FnOnce() -> pmcache_engine::Result<()> + Send>) {
        self.0.send((self.1, finish())).unwrap();
    }
}

/// Where persistence is an msync, a staged writeback write takes its
/// payload into a buffer of its own (never through the mapping, which
/// would read each page from disk first), and commits started from one
/// thread, as a connection's reader starts them, are finished by the
/// syncer: they share msyncs, and each is answered only once durable and
/// readable.
#[test]
fn staged_writes_are_finished_by_shared_msyncs() {
    let (_dir, region, e) = msync_engine("gc-staged");
    const WRITES: u64 = 96;
    let before = region.syncs();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut on_caller = 0;
    for b in 0..WRITES {
        let mut source = |s: &mut [std::io::IoSliceMut<'_>]| {
            assert_eq!(s.len(), 1, "one buffer for the payload");
            s[0].fill(fill_of(b));
            Ok(())
        };
        let Stage::Staged(w) = e.stage_write(b * 4096, 4096, false, &mut source).unwrap() else {
            panic!("block {b}: a whole-block writeback write stages in msync mode");
        };
        // Past the in-flight bound a commit is declined, and then made
        // here, as a server's worker would.
        if let Err((w, reply)) = w.commit_async(Report(tx.clone(), b)) {
            on_caller += 1;
            Box::new(reply).reply(w.commit());
        }
    }
    let mut answered = vec![false; WRITES as usize];
    for _ in 0..WRITES {
        let (b, r) = rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap();
        r.unwrap();
        let mut got = [0u8; 4096];
        e.read(b * 4096, &mut got).unwrap();
        assert!(
            got.iter().all(|&x| x == fill_of(b)),
            "block {b} answered before it was readable"
        );
        answered[b as usize] = true;
    }
    assert!(answered.iter().all(|&a| a));
    let syncs = region.syncs() - before;
    assert!(
        syncs < WRITES / 2,
        "{syncs} msyncs for {WRITES} staged writes ({on_caller} made by the caller)"
    );
    // Writethrough waits for the origin as long as the one-call path does:
    // it is not staged.
    e.set_mode(CacheMode::Writethrough).unwrap();
    assert!(matches!(
        e.stage_write(0, 4096, false, &mut |_| panic!("payload taken")),
        Ok(Stage::WouldWait)
    ));
}

/// A staged write committed by an idle caller, with no other msync running
/// or waiting, is made durable by an msync of the caller's own and
/// answered, readable, before the call returns.
#[test]
fn an_idle_callers_staged_write_is_finished_by_its_own_msync() {
    let (_dir, region, e) = msync_engine("gc-idle");
    for b in 0..8u64 {
        let mut source = |s: &mut [std::io::IoSliceMut<'_>]| {
            s[0].fill(fill_of(b));
            Ok(())
        };
        let Stage::Staged(w) = e.stage_write(b * 4096, 4096, false, &mut source).unwrap() else {
            panic!("block {b}: a whole-block writeback write stages in msync mode");
        };
        let before = region.syncs();
        let (tx, rx) = std::sync::mpsc::channel();
        if w.commit_when_idle(Report(tx, b)).is_err() {
            panic!("block {b}: the idle commit was declined");
        }
        let (got_b, r) = rx.try_recv().expect("answered before the return");
        assert_eq!(got_b, b);
        r.unwrap();
        assert!(region.syncs() > before, "answered without an msync");
        let mut got = [0u8; 4096];
        e.read(b * 4096, &mut got).unwrap();
        assert!(got.iter().all(|&x| x == fill_of(b)), "block {b}");
    }
}
