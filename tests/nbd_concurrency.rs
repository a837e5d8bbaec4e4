//! The engine behind the NBD server with many overlapping requests in
//! flight on one connection: staged writes (payload into the slots, commit
//! on the connection thread or on the commit pool), buffered writes
//! (partial blocks), and reads, in writeback mode on (simulated) pmem, in
//! msync mode, and in writethrough mode. Every request stays atomic, and
//! what each thread wrote last to its own blocks is what is read back.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

use std::sync::Arc;

use pmcache::export::EngineExport;
use pmcache_engine::{CacheMode, Engine, EngineConfig};
use pmcache_nbd::{Client, Server, ServerConfig};
use pmcache_origin::{MemOrigin, Origin};
use pmcache_pmem::{MapOptions, MappedRegion, PmemRegion, SimRegion};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;
const BS: u64 = 4096;
/// Blocks every thread writes (overlapping the others').
const SHARED: u64 = 16;
const THREADS: u64 = 6;
/// Blocks of each thread's own, after the shared ones.
const OWN: u64 = 8;

/// A block's payload: every 8-byte word carries the writer's id and the
/// block, so a torn block shows two ids.
fn payload(id: u64, first: u64, blocks: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity((blocks * BS) as usize);
    for b in first..first + blocks {
        for _ in 0..BS / 8 {
            v.extend_from_slice(&(id << 24 | b).to_le_bytes());
        }
    }
    v
}

/// The writer id of a block, if the block is whole (one id, its own block).
fn whole(block: u64, data: &[u8]) -> Option<u64> {
    let w0 = u64::from_le_bytes(data[..8].try_into().unwrap());
    let same = data
        .chunks(8)
        .all(|w| u64::from_le_bytes(w.try_into().unwrap()) == w0);
    (same && (w0 == 0 || w0 & 0xff_ffff == block)).then_some(w0 >> 24)
}

fn run(region: Arc<dyn PmemRegion>, mode: CacheMode) {
    let origin = Arc::new(MemOrigin::new(64 * MIB).with_name("nbdc"));
    Engine::format(&*region, &*origin, BS as u32).unwrap();
    let engine = Engine::open(
        region,
        origin.clone() as Arc<dyn Origin>,
        EngineConfig {
            mode: Some(mode),
            ..Default::default()
        },
    )
    .unwrap();
    let export = Arc::new(EngineExport {
        engine: engine.clone(),
        read_only: false,
    });
    let server = Server::new(export, ServerConfig::default()).unwrap();
    let dir = std::env::temp_dir().join(format!("pmnbdc-{}-{mode:?}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("s.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let s = server.clone();
    let serving = std::thread::spawn(move || s.serve_unix(listener));
    let client = Client::connect(&format!("nbd+unix:///?socket={}", socket.display())).unwrap();

    let last_own: Vec<Vec<u64>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let client = &client;
                sc.spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(t);
                    let own0 = SHARED + t * OWN;
                    let mut last = vec![0u64; OWN as usize];
                    for i in 1..=60u64 {
                        let id = t * 1000 + i;
                        // Shared blocks: 1-4 whole blocks, overlapping others.
                        let n = rng.gen_range(1..=4);
                        let b = rng.gen_range(0..=SHARED - n);
                        client.write(&payload(id, b, n), b * BS, false).unwrap();
                        // Own blocks: whole (staged) or one partial block
                        // rewritten whole in two pieces (buffered).
                        let o = rng.gen_range(0..OWN);
                        let p = payload(id, own0 + o, 1);
                        if rng.gen_bool(0.3) {
                            let half = (BS / 2) as usize;
                            client.write(&p[..half], (own0 + o) * BS, false).unwrap();
                            client
                                .write(&p[half..], (own0 + o) * BS + BS / 2, false)
                                .unwrap();
                        } else {
                            client.write(&p, (own0 + o) * BS, false).unwrap();
                        }
                        last[o as usize] = id;
                        // A read of shared blocks sees each block whole.
                        let mut r = vec![0u8; (4 * BS) as usize];
                        let rb = rng.gen_range(0..=SHARED - 4);
                        client.read(&mut r, rb * BS).unwrap();
                        for (k, blk) in r.chunks(BS as usize).enumerate() {
                            assert!(
                                whole(rb + k as u64, blk).is_some(),
                                "{mode:?}: block {} torn in a read",
                                rb + k as u64
                            );
                        }
                    }
                    last
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let mut all = vec![0u8; ((SHARED + THREADS * OWN) * BS) as usize];
    client.read(&mut all, 0).unwrap();
    for (b, blk) in all.chunks(BS as usize).enumerate() {
        let b = b as u64;
        let id = whole(b, blk).unwrap_or_else(|| panic!("{mode:?}: block {b} torn"));
        if b >= SHARED {
            let (t, o) = ((b - SHARED) / OWN, (b - SHARED) % OWN);
            assert_eq!(
                id, last_own[t as usize][o as usize],
                "{mode:?}: block {b} is not its last write"
            );
        }
    }
    if mode == CacheMode::Writethrough {
        // Writethrough: the origin has every acknowledged write too.
        let mut o = vec![0u8; all.len()];
        origin.read_at(&mut o, 0).unwrap();
        assert!(o == all, "{mode:?}: the origin differs from the export");
    }
    drop(client);
    server.shutdown_handle().shutdown();
    serving.join().unwrap().unwrap();
    engine.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn overlapping_requests_on_one_connection_writeback_pmem() {
    run(
        Arc::new(SimRegion::new(8 * MIB as usize)),
        CacheMode::Writeback,
    );
}

#[test]
fn overlapping_requests_on_one_connection_writethrough() {
    run(
        Arc::new(SimRegion::new(8 * MIB as usize)),
        CacheMode::Writethrough,
    );
}

#[test]
fn overlapping_requests_on_one_connection_msync() {
    let path = std::path::PathBuf::from(format!(
        "/dev/shm/pmcache-nbdc-msync-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let region = MappedRegion::create(&path, 8 * MIB, &MapOptions::new()).unwrap();
    let _ = std::fs::remove_file(&path);
    run(Arc::new(region), CacheMode::Writeback);
}
