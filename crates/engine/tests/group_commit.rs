//! Msync mode (a cache file on a disk): concurrent writers share msyncs.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

use std::sync::Arc;

use pmcache_engine::{Engine, EngineConfig, Stage};
use pmcache_origin::{MemOrigin, Origin};
use pmcache_pmem::{MapOptions, MappedRegion, PersistMode, PmemRegion};

const MIB: u64 = 1 << 20;

#[test]
fn concurrent_writers_share_msyncs() {
    // On the disk (not tmpfs), so an msync takes long enough for writers
    // to meet.
    let dir = pmcache_testkit::TempDir::on_disk("gc");
    let path = dir.join("cache.pmem");
    let region = Arc::new(MappedRegion::create(&path, 8 * MIB, &MapOptions::new()).unwrap());
    assert_eq!(region.mode(), PersistMode::Msync);
    let origin = Arc::new(MemOrigin::new(64 * MIB).with_name("gc"));
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
                    e.write(b * 4096, &[(b % 251) as u8 + 1; 4096], false)
                        .unwrap();
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
        assert!(b.iter().all(|&x| x == (blk % 251) as u8 + 1), "block {blk}");
    }
    // Where persistence is an msync, a payload is not received through the
    // mapping (each page would be read from disk first): staging declines,
    // and the server buffers the payload for an ordinary write.
    assert!(matches!(
        e.stage_write(0, 4096, false, &mut |_| panic!("payload taken")),
        Ok(Stage::WouldWait)
    ));
}
