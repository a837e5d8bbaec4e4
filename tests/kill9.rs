//! kill -9 safety: clients write unique contents over NBD while the server is
//! killed with SIGKILL at random moments; after every restart each block must
//! hold, whole, its last acknowledged write, or the write that was in flight
//! to it at the kill. Then the same through `pmcache flush`: the origin file
//! must hold exactly the acknowledged data.
//!
//! Reproduce a run with PMCACHE_KILL9_SEED=<seed> (printed at the start).
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use pmcache::nbd::{Client, ClientOptions};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const BS: usize = 4096;
/// Writer threads; each owns a disjoint range of blocks.
const THREADS: usize = 4;
/// Blocks per thread.
const PER_THREAD: u64 = 512;
/// Largest write, in blocks.
const MAX_WRITE_BLOCKS: u64 = 8;
const ROUNDS: usize = 30;
const MAGIC: &[u8; 8] = b"PMK9BLK\0";

/// A write: who wrote it (thread, sequence number) and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct WriteId {
    thread: u64,
    seq: u64,
}

use pmcache_testkit::splitmix;

/// The unique content of `block` as written by `id`: a header naming both,
/// then a body derived from them (a different random body for every write).
fn content(id: WriteId, block: u64, salt: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out[16..24].copy_from_slice(&id.thread.to_le_bytes());
    out[24..32].copy_from_slice(&id.seq.to_le_bytes());
    let mut x = splitmix(salt ^ (id.thread << 48) ^ (id.seq << 8) ^ block.rotate_left(32));
    for chunk in out[32..].chunks_mut(8) {
        x = splitmix(x);
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// What a block holds: `None` for zeroes (never written), else the write.
/// A block that is neither (torn, mixed, foreign) is an error.
fn decode(block: u64, data: &[u8], salt: u64) -> Result<Option<WriteId>, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    if &data[..8] != MAGIC {
        return Err(format!(
            "block {block}: not written by this test (torn or foreign)"
        ));
    }
    let hb = u64::from_le_bytes(data[8..16].try_into().unwrap());
    let id = WriteId {
        thread: u64::from_le_bytes(data[16..24].try_into().unwrap()),
        seq: u64::from_le_bytes(data[24..32].try_into().unwrap()),
    };
    if hb != block {
        return Err(format!(
            "block {block}: holds the content written to block {hb} by {id:?}"
        ));
    }
    let mut want = vec![0u8; data.len()];
    content(id, block, salt, &mut want);
    if want != data {
        let first = want.iter().zip(data).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!(
            "block {block}: write {id:?} is torn (first wrong byte at {first})"
        ));
    }
    Ok(Some(id))
}

/// Per-thread record of what was acknowledged, and what is in flight.
#[derive(Default)]
struct Log {
    /// Last acknowledged write of each block (absent: never written).
    acked: HashMap<u64, WriteId>,
    /// The write sent and not yet acknowledged: (id, first block, blocks).
    in_flight: Option<(WriteId, u64, u64)>,
    next_seq: u64,
}

struct Model {
    logs: Vec<Mutex<Log>>,
    salt: u64,
    acked_writes: AtomicU64,
}

/// Totals over all verifications: blocks checked, in-flight writes found
/// present, found absent.
#[derive(Default)]
struct Tally {
    verified: u64,
    present: u64,
    absent: u64,
}

impl Model {
    /// Check every tracked block (read through `read`) against the model,
    /// then make what was observed the new expectation: an in-flight write
    /// that survived is durable now. Adds what it found to `tally`.
    fn verify(&self, read: &dyn Fn(&mut [u8], u64), what: &str, tally: &mut Tally) {
        let total = THREADS as u64 * PER_THREAD;
        let mut buf = vec![0u8; (PER_THREAD as usize) * BS];
        let (mut present, mut absent) = (0, 0);
        for t in 0..THREADS {
            let first = t as u64 * PER_THREAD;
            read(&mut buf, first * BS as u64);
            let mut log = self.logs[t].lock().unwrap();
            let mut seen = HashMap::new();
            for b in first..first + PER_THREAD {
                let i = (b - first) as usize;
                let got = decode(b, &buf[i * BS..(i + 1) * BS], self.salt)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let last = log.acked.get(&b).copied();
                let flying = log
                    .in_flight
                    .filter(|(_, f, n)| (*f..*f + *n).contains(&b))
                    .map(|(id, _, _)| id);
                assert!(
                    got == last || (got.is_some() && got == flying),
                    "{what}: block {b} holds {got:?}; the last acknowledged write was {last:?}, in flight {flying:?}"
                );
                seen.insert(b, got);
            }
            // A write in flight is all there or all absent (request atomicity).
            if let Some((id, f, n)) = log.in_flight.take() {
                let hits = (f..f + n).filter(|b| seen[b] == Some(id)).count() as u64;
                assert!(
                    hits == 0 || hits == n,
                    "{what}: in-flight write {id:?} of {n} blocks at block {f} is only partly there ({hits} blocks)"
                );
                if hits == n {
                    present += 1;
                    for b in f..f + n {
                        log.acked.insert(b, id);
                    }
                } else {
                    absent += 1;
                }
            }
        }
        tally.verified += total;
        tally.present += present;
        tally.absent += absent;
    }
}

/// One writer: random whole-block writes of 1..=8 blocks inside its range,
/// one at a time, until the connection dies or `stop`.
fn writer(c: Arc<Client>, model: Arc<Model>, t: usize, seed: u64, stop: Arc<AtomicBool>) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let first = t as u64 * PER_THREAD;
    let mut buf = vec![0u8; MAX_WRITE_BLOCKS as usize * BS];
    while !stop.load(Ordering::Relaxed) {
        let n = rng.gen_range(1..=MAX_WRITE_BLOCKS);
        let start = first + rng.gen_range(0..=PER_THREAD - n);
        let id = {
            let mut log = model.logs[t].lock().unwrap();
            let id = WriteId {
                thread: t as u64,
                seq: log.next_seq,
            };
            log.next_seq += 1;
            log.in_flight = Some((id, start, n));
            id
        };
        for k in 0..n {
            content(
                id,
                start + k,
                model.salt,
                &mut buf[k as usize * BS..(k as usize + 1) * BS],
            );
        }
        let fua = rng.gen_ratio(1, 8);
        match c.write(&buf[..n as usize * BS], start * BS as u64, fua) {
            Ok(()) => {
                let mut log = model.logs[t].lock().unwrap();
                for b in start..start + n {
                    log.acked.insert(b, id);
                }
                log.in_flight = None;
                model.acked_writes.fetch_add(1, Ordering::Relaxed);
            }
            // The server died: this write stays "in flight".
            Err(_) => return,
        }
    }
}

fn client_opts() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Some(Duration::from_secs(20)),
        ..ClientOptions::default()
    }
}

fn start(d: &TempDir, round: usize) -> (Server, u16) {
    let port = free_port();
    let s = serve_cache(
        d,
        port,
        &["--origin", &d.s("o.img")],
        &format!("serve-{round}.log"),
    );
    (s, port)
}

/// An NBD connection to the server on `port`, with bounded timeouts.
fn connect(port: u16, what: &str) -> Client {
    Client::connect_with(&format!("nbd://127.0.0.1:{port}"), &client_opts())
        .unwrap_or_else(|e| panic!("{what}: {e:?}"))
}

/// Write under load and SIGKILL the server after a random pause.
fn load_and_kill(s: &mut Server, port: u16, model: &Arc<Model>, rng: &mut SmallRng) {
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let c = Arc::new(connect(port, "connect"));
            let (m, st, seed) = (model.clone(), stop.clone(), rng.gen());
            std::thread::spawn(move || writer(c, m, t, seed, st))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(rng.gen_range(30..400)));
    s.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("writer thread");
    }
}

fn read_via_nbd(port: u16) -> impl Fn(&mut [u8], u64) {
    let c = connect(port, "connect for verification");
    move |buf, off| c.read(buf, off).expect("read for verification")
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let seed: u64 = std::env::var("PMCACHE_KILL9_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("kill9: seed {seed} (PMCACHE_KILL9_SEED={seed} reproduces the schedule)");
    let mut rng = SmallRng::seed_from_u64(seed);
    let t0 = Instant::now();
    let d = TempDir::new("kill9");
    // An 8 MiB cache (about 1,900 slots) for 8 MiB of hot blocks: writes also
    // wait for writeback and evict, so the kills land in every path.
    let (cache, origin_path) = formatted_cache(&d, 64 << 20, "8M");
    let model = Arc::new(Model {
        logs: (0..THREADS).map(|_| Mutex::new(Log::default())).collect(),
        salt: seed,
        acked_writes: AtomicU64::new(0),
    });
    let mut tally = Tally::default();

    for round in 0..ROUNDS {
        let (mut s, port) = start(&d, round);
        let what = format!("round {round} (seed {seed})");
        model.verify(&read_via_nbd(port), &what, &mut tally);
        load_and_kill(&mut s, port, &model, &mut rng);
    }

    // Through flush: kill once more under load, write back offline, and
    // compare the origin file itself.
    let (mut s, port) = start(&d, ROUNDS);
    model.verify(&read_via_nbd(port), "before the final kill", &mut tally);
    load_and_kill(&mut s, port, &model, &mut rng);
    flush_ok(&cache, &origin_path);
    assert_eq!(dump_json(&cache)["dirty"], 0, "flush left dirty blocks");
    let origin = std::fs::read(&origin_path).expect("read origin");
    let read_origin = |buf: &mut [u8], off: u64| {
        buf.copy_from_slice(&origin[off as usize..off as usize + buf.len()]);
    };
    model.verify(&read_origin, "origin file after flush", &mut tally);
    let Tally {
        verified,
        present,
        absent,
    } = tally;
    // Nothing outside the tracked blocks was written.
    let tracked = THREADS * PER_THREAD as usize * BS;
    assert!(
        origin[tracked..].iter().all(|&b| b == 0),
        "origin written outside the test's blocks"
    );
    check_ok(&cache);

    let acked = model.acked_writes.load(Ordering::Relaxed);
    eprintln!(
        "kill9: {} kills, {acked} writes acknowledged, {verified} block checks passed, in-flight writes at kills: {present} present, {absent} absent, {:.1} s",
        ROUNDS + 1,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        acked > 200 * ROUNDS as u64 / 10,
        "too few writes acknowledged ({acked}) for the test to mean much"
    );
}
