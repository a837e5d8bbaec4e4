//! Ordered writeback seen from the origin, end to end (issue 15): the real
//! `pmcache serve` over an NBD origin served by this process, whose every
//! accepted write, write_zeroes and flush is followed by a check that the
//! origin is a state a plain disk could have shown after a power cut (some
//! epoch k such that every block holds its value at the end of epoch k-1 or
//! a value written in epoch k; an epoch is the writes between two completed
//! client FLUSHes), including whatever a power loss of the origin could
//! drop of its unflushed writes.
//!
//! The origin is a `MemOrigin` behind `OriginExport` (common/
//! origin_export.rs); its observer runs `EpochHistory::check` on the NBD
//! server's thread, under the origin's lock. One client thread issues one
//! request at a time and records each write in the history *before*
//! issuing it (pmcache may pass it on at once) and each FLUSH *after* its
//! reply (the epoch ends when the FLUSH completes), so the history the
//! check sees is exact: it holds every write the origin can have, and no
//! epoch the origin cannot have reached.
//!
//! Rounds, over a small cache in /dev/shm so that writeback runs (and
//! writers wait for it) during the workload:
//! - flush: random writes (whole and partial blocks, multi-block, zeroes,
//!   FUA) with a FLUSH every few requests, a clean stop, then `pmcache
//!   flush` writes the rest back; the origin must then be the client's
//!   image;
//! - kill: the same workload, pmcache killed with SIGKILL once writeback is
//!   under way; restarted on the same cache (recovery), it must serve the
//!   client's image (the write in flight at the kill whole or not at all;
//!   if not, it is sent again), take more writes, and write everything
//!   back: the origin must then be that image.
//!
//! With `--writeback-order ordered` no check may fail; with `none` one
//! must, in one of a few rounds (the proof that this test can fail).
//!
//! A failure prints the seed; `PMCACHE_SEED=<seed>` replays its choices.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

#[path = "common/nbd.rs"]
mod nbd;
#[path = "common/origin_export.rs"]
mod origin_export;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nbd::*;
use origin_export::OriginServer;
use pmcache::nbd::{Client, ClientOptions};
use pmcache_origin::{MemOrigin, Origin};
use pmcache_testkit::{splitmix, EpochHistory};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

const BS: u64 = 4096;
/// 1024 blocks: a check hashes at most 4 MiB.
const ORIGIN: u64 = 4 << 20;
/// The requests of a sequential stream, and the cutoff past which such a
/// stream goes around the cache.
const STREAM_REQ: u64 = 32 << 10;
const CUTOFF: &str = "128K";
/// The smallest cache pmcache takes (about 750 slots for 1024 blocks):
/// writes evict, and wait for writeback when the cache is full.
const CACHE: &str = "3M";
/// Client requests in a flush round, and after the restart in a kill round.
const OPS: u64 = 1500;
const OPS_AFTER_RESTART: u64 = 400;
/// The kill comes once the origin has seen this many operations, plus a
/// random delay up to `KILL_DELAY_MAX`.
const CHECKS_BEFORE_KILL: u64 = 200;
const KILL_DELAY_MAX: Duration = Duration::from_millis(300);
/// Fewest checks an ordered round must have made to mean something.
const MIN_CHECKS: u64 = 300;
const UNORDERED_ROUNDS_MAX: u64 = 3;
/// Bound on every wait (server start, workload, writeback, joins).
const T: Duration = Duration::from_secs(30);

/// The rounds' timing is what the kill moments depend on, and the machine
/// may have two cores: one round at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A lock that survives a panic elsewhere (the report still wants it).
fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the client did, shared with the origin's observer.
struct Watch {
    history: EpochHistory,
    /// Requests recorded so far, and the last few, for the report.
    ops: u64,
    recent: VecDeque<String>,
    /// Origin states checked, and the first that failed.
    checks: u64,
    violation: Option<String>,
}

type Shared = Arc<Mutex<Watch>>;

/// Check the origin against the history; keep the first violation.
fn observe(w: &Mutex<Watch>, durable: &[u8], pending: &[(u64, Vec<u8>)]) {
    let mut w = lock(w);
    w.checks += 1;
    if w.violation.is_some() {
        return;
    }
    if let Err(e) = w.history.check(durable, pending) {
        w.violation = Some(format!(
            "origin operation #{} (with {} unflushed writes), after client request #{} (the last ones: {:?}): {e}",
            w.checks,
            pending.len(),
            w.ops,
            w.recent
        ));
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, data: Vec<u8>, fua: bool },
    Zero { off: u64, len: u64, fua: bool },
    Flush,
}

impl Op {
    fn describe(&self) -> String {
        match self {
            Op::Write { off, data, fua } => format!("write {off}+{} fua={fua}", data.len()),
            Op::Zero { off, len, fua } => format!("zero {off}+{len} fua={fua}"),
            Op::Flush => "flush".into(),
        }
    }

    /// The bytes it changes, if any.
    fn range(&self) -> Option<std::ops::Range<usize>> {
        match self {
            Op::Write { off, data, .. } => Some(*off as usize..*off as usize + data.len()),
            Op::Zero { off, len, .. } => Some(*off as usize..(off + len) as usize),
            Op::Flush => None,
        }
    }
}

/// A random request: a FLUSH one time in five; else a write of one to
/// eight whole blocks, of any bytes over up to three blocks, or zeroes.
fn gen_op(rng: &mut SmallRng) -> Op {
    if rng.gen_ratio(1, 5) {
        return Op::Flush;
    }
    let (off, len) = if rng.gen_bool(0.5) {
        let n = rng.gen_range(1..=8);
        (rng.gen_range(0..=ORIGIN / BS - n) * BS, n * BS)
    } else {
        let len = rng.gen_range(1..=3 * BS);
        (rng.gen_range(0..=ORIGIN - len), len)
    };
    let fua = rng.gen_ratio(1, 10);
    if rng.gen_ratio(1, 8) {
        return Op::Zero { off, len, fua };
    }
    let mut data = vec![0; len as usize];
    rng.fill_bytes(&mut data);
    Op::Write { off, data, fua }
}

/// The request that was sent and never answered, and what its range held
/// before it.
struct InFlight {
    op: Op,
    old: Vec<u8>,
}

/// Record `op` in the history (a write before it is sent), send it, and
/// record a FLUSH once answered. On an error, returns what was in flight.
fn apply(c: &Client, w: &Mutex<Watch>, op: Op) -> Result<(), InFlight> {
    let old = {
        let mut w = lock(w);
        w.ops += 1;
        if w.recent.len() == 6 {
            w.recent.pop_front();
        }
        w.recent.push_back(op.describe());
        let old = op
            .range()
            .map_or_else(Vec::new, |r| w.history.image()[r].to_vec());
        match &op {
            Op::Write { off, data, .. } => w.history.write(*off, data),
            Op::Zero { off, len, .. } => w.history.zero(*off, *len),
            Op::Flush => {}
        }
        old
    };
    let r = match &op {
        Op::Write { off, data, fua } => c.write(data, *off, *fua),
        Op::Zero { off, len, fua } => c.write_zeroes(*off, *len, *fua),
        Op::Flush => c.flush(),
    };
    match r {
        Ok(()) => {
            if matches!(op, Op::Flush) {
                lock(w).history.flush();
            }
            Ok(())
        }
        Err(_) => Err(InFlight { op, old }),
    }
}

/// Up to `ops` random requests, one at a time, until one fails (the server
/// died) or `stop`. Ends with a FLUSH when all went through.
fn workload(
    c: &Client,
    w: &Mutex<Watch>,
    seed: u64,
    ops: u64,
    stop: &AtomicBool,
) -> Result<u64, InFlight> {
    let mut rng = SmallRng::seed_from_u64(seed);
    // A sequential stream now and then, past the cutoff (see `Rig::serve`),
    // so that some writes go around the cache to the origin.
    let mut stream: Option<(u64, u32)> = None;
    for n in 0..ops {
        if stop.load(Ordering::Relaxed) {
            return Ok(n);
        }
        let op = match stream {
            Some((off, left)) => {
                stream = (left > 1 && off + 2 * STREAM_REQ < ORIGIN)
                    .then_some((off + STREAM_REQ, left - 1));
                let mut data = vec![0; STREAM_REQ as usize];
                rng.fill_bytes(&mut data);
                Op::Write {
                    off,
                    data,
                    fua: false,
                }
            }
            None if rng.gen_ratio(1, 40) => {
                let off = rng.gen_range(0..ORIGIN / 2 / STREAM_REQ) * STREAM_REQ;
                stream = Some((off, 16));
                continue;
            }
            None => gen_op(&mut rng),
        };
        apply(c, w, op)?;
    }
    apply(c, w, Op::Flush)?;
    Ok(ops)
}

/// [`workload`] to the end: every request must go through.
fn workload_ok(c: &Client, w: &Mutex<Watch>, seed: u64, ops: u64, srv: &ServerGuard) {
    let never = AtomicBool::new(false);
    if let Err(f) = workload(c, w, seed, ops, &never) {
        panic!(
            "{} failed; pmcache log:\n{}",
            f.op.describe(),
            srv.log_text()
        );
    }
}

fn connect(uri: &str) -> Client {
    let opts = ClientOptions {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Some(T),
        ..ClientOptions::default()
    };
    Client::connect_with(uri, &opts).unwrap_or_else(|e| panic!("connect to {uri}: {e}"))
}

/// The whole device, read through pmcache.
fn read_all(c: &Client) -> Vec<u8> {
    let mut buf = vec![0; ORIGIN as usize];
    for (i, chunk) in buf.chunks_mut(1 << 20).enumerate() {
        c.read(chunk, (i << 20) as u64).expect("read back");
    }
    buf
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A checked origin served over NBD, and a cache directory for pmcache.
struct Rig {
    origin: Arc<MemOrigin>,
    watch: Shared,
    server: OriginServer,
    dir: TempDir,
    order: &'static str,
}

impl Rig {
    fn new(order: &'static str) -> Rig {
        let origin = Arc::new(MemOrigin::new(ORIGIN).with_name("ordered-origin"));
        let watch = Arc::new(Mutex::new(Watch {
            history: EpochHistory::new(origin.current(), BS as usize),
            ops: 0,
            recent: VecDeque::new(),
            checks: 0,
            violation: None,
        }));
        let w = watch.clone();
        origin.set_observer(Some(Box::new(move |durable, pending| {
            observe(&w, durable, pending)
        })));
        let server = OriginServer::start(origin.clone() as Arc<dyn Origin>);
        Rig {
            origin,
            watch,
            server,
            dir: TempDir::new("oo"),
            order,
        }
    }

    fn cache(&self) -> std::path::PathBuf {
        self.dir.join("cache.pmem")
    }

    /// pmcache over the origin: a new cache, or (`reopen`) the one there.
    fn serve(&self, reopen: bool) -> ServerGuard {
        let extra = [
            "--writeback-order",
            self.order,
            "--sequential-cutoff",
            CUTOFF,
        ];
        launch(&match reopen {
            false => ServerKind::pmcache(&self.cache(), CACHE, &self.server.uri(), &extra),
            true => ServerKind::pmcache_reopen(&self.cache(), &extra),
        })
    }

    fn checks(&self) -> u64 {
        lock(&self.watch).checks
    }

    /// The client's image now.
    fn image(&self) -> Vec<u8> {
        lock(&self.watch).history.image().to_vec()
    }

    /// The origin must be durably the client's image.
    fn assert_origin_is_image(&self, what: &str) {
        // Not under the watch lock: the observer takes it under the
        // origin's.
        let image = self.image();
        assert_same(&self.origin.durable(), &image, what);
        assert_same(&self.origin.current(), &image, what);
    }

    /// Wait until a running pmcache has written everything back.
    fn wait_written_back(&self, srv: &ServerGuard) {
        let start = Instant::now();
        loop {
            let v = stats(&self.cache(), T);
            if v["dirty"] == 0 && v["retained"] == 0 {
                return;
            }
            assert!(
                start.elapsed() < T,
                "writeback did not finish within {T:?}: {v}; log:\n{}",
                srv.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the round found: the first violation, and how many checks.
    fn verdict(&self) -> (Option<String>, u64) {
        let w = lock(&self.watch);
        (w.violation.clone(), w.checks)
    }
}

/// Workload, clean stop, `pmcache flush`: the origin must then be the
/// client's image. Returns the first violation and the number of checks.
fn flush_round(order: &'static str, seed: u64) -> (Option<String>, u64) {
    let rig = Rig::new(order);
    let srv = rig.serve(false);
    let c = connect(&srv.uri());
    workload_ok(&c, &rig.watch, seed, OPS, &srv);
    drop(c);
    let during = rig.checks();
    let st = stats(&rig.cache(), T);
    assert!(
        counter(&st, "bypass_writes") > 0,
        "no write went around the cache: {st}"
    );
    srv.stop();
    pmcache_ok(&["flush", "--cache", &s(&rig.cache()), "--assume-pmem"], T);
    rig.assert_origin_is_image(&format!("{order}: the origin after pmcache flush"));
    let (violation, checks) = rig.verdict();
    eprintln!(
        "flush round, order {order}, seed {seed:#x}: {checks} origin operations observed ({during} while serving, the rest by pmcache flush), violation: {}",
        violation.is_some()
    );
    rig.server.stop();
    (violation, checks)
}

/// Workload, SIGKILL, restart (recovery), more workload, writeback to the
/// end: the origin must then be the image pmcache serves, which must be
/// the client's.
fn kill_round(order: &'static str, seed: u64) -> (Option<String>, u64) {
    let rig = Rig::new(order);
    let mut srv = rig.serve(false);
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (uri, w, stop) = (srv.uri(), rig.watch.clone(), stop.clone());
        std::thread::spawn(move || workload(&connect(&uri), &w, seed, u64::MAX, &stop))
    };
    // Stop the client however this ends (it stops by itself once pmcache
    // is gone).
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop = StopOnDrop(stop);

    // Kill once writeback is under way, after a random delay more.
    let start = Instant::now();
    while rig.checks() < CHECKS_BEFORE_KILL {
        assert!(
            !client.is_finished(),
            "the client stopped before the kill; pmcache log:\n{}",
            srv.log_text()
        );
        assert!(
            start.elapsed() < T,
            "the origin saw only {} operations in {T:?}; pmcache log:\n{}",
            rig.checks(),
            srv.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut rng = SmallRng::seed_from_u64(splitmix(seed));
    std::thread::sleep(KILL_DELAY_MAX.mul_f64(rng.gen_range(0.0..1.0)));
    assert!(!client.is_finished(), "the client stopped before the kill");
    let ran = start.elapsed();
    srv.proc.signal(libc::SIGKILL);
    assert!(
        srv.proc.wait_exit(Duration::from_secs(10)).is_some(),
        "pmcache survived SIGKILL"
    );
    let at_kill = rig.checks();
    let end = Instant::now() + T;
    while !client.is_finished() {
        assert!(Instant::now() < end, "the client hangs after the kill");
        std::thread::sleep(Duration::from_millis(5));
    }
    let in_flight = match client.join().expect("client thread panicked") {
        Ok(n) => panic!("the client sent {n} requests and never saw the kill"),
        Err(f) => f,
    };
    let ops_before = lock(&rig.watch).ops;

    // Recovery must serve the client's image, the request in flight at
    // the kill whole or not at all.
    let srv = rig.serve(true);
    let c = connect(&srv.uri());
    let got = read_all(&c);
    let image = rig.image();
    let range = in_flight.op.range().unwrap_or(0..0);
    let what = format!(
        "{order}: after recovery (in flight: {})",
        in_flight.op.describe()
    );
    assert_same(&got[..range.start], &image[..range.start], &what);
    assert_same(&got[range.end..], &image[range.end..], &what);
    let survived = got[range.clone()] == image[range.clone()];
    if !survived {
        assert_same(&got[range], &in_flight.old, &what);
        // Lost: send it again (the history holds it already, in the same
        // epoch, so recording it again changes nothing).
        if apply(&c, &rig.watch, in_flight.op.clone()).is_err() {
            panic!("resending the lost write failed; log:\n{}", srv.log_text());
        }
    }
    assert_same(&read_all(&c), &rig.image(), &format!("{what}, resent"));

    // More epochs over the recovered ones, then writeback to the end.
    workload_ok(&c, &rig.watch, splitmix(seed ^ 1), OPS_AFTER_RESTART, &srv);
    rig.wait_written_back(&srv);
    let served = read_all(&c);
    assert_same(
        &served,
        &rig.image(),
        &format!("{order}: served at the end"),
    );
    rig.assert_origin_is_image(&format!("{order}: the origin once written back"));
    drop(c);
    srv.stop();
    let (violation, checks) = rig.verdict();
    eprintln!(
        "kill round, order {order}, seed {seed:#x}: killed after {ops_before} requests and {at_kill} origin operations ({ran:.1?} in); the write in flight {}; {checks} origin operations observed in all; violation: {}",
        if survived { "survived" } else { "was lost (resent)" },
        violation.is_some()
    );
    rig.server.stop();
    (violation, checks)
}

fn assert_ordered(round: &str, seed: u64, (violation, checks): (Option<String>, u64)) {
    if let Some(v) = violation {
        panic!("{round} round (PMCACHE_SEED={seed}): ordered writeback left an origin no power cut could have: {v}");
    }
    assert!(
        checks > MIN_CHECKS,
        "{round} round (PMCACHE_SEED={seed}): only {checks} origin states checked"
    );
}

#[test]
fn ordered_writeback_keeps_the_nbd_origin_a_power_cut_state() {
    let _serial = lock(&SERIAL);
    let seed = test_seed("ordered");
    assert_ordered(
        "flush",
        seed,
        flush_round("ordered", round_seed(seed, 1, 0)),
    );
    assert_ordered("kill", seed, kill_round("ordered", round_seed(seed, 2, 0)));
}

/// The proof that the check can fail: writeback in slot order mixes epochs
/// on the origin.
#[test]
fn unordered_writeback_is_caught_on_the_nbd_origin() {
    let _serial = lock(&SERIAL);
    let seed = test_seed("none");
    for n in 0..UNORDERED_ROUNDS_MAX {
        let (violation, checks) = flush_round("none", round_seed(seed, 3, n));
        if let Some(v) = violation {
            assert!(v.contains("not a power-cut state"), "{v}");
            eprintln!("round {n}: caught after {checks} checks, as expected: {v}");
            return;
        }
    }
    panic!(
        "with --writeback-order none, no round out of {UNORDERED_ROUNDS_MAX} left an origin that \
         is not a power-cut state (PMCACHE_SEED={seed}), so this test cannot tell ordered \
         writeback from unordered"
    );
}
