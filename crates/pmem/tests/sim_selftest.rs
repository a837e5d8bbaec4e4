//! The crash simulator must catch the classic persistence bugs, pass the
//! correct protocol, and model per-thread fences and kernel stores.
//!
//! The protocol under test: a 4 KiB record is written to its own slot, then
//! an 8-byte commit word at offset 0 is set to the record's sequence number.
//! Recovery reads the commit word; the record it names must hold exactly
//! that record's content, and no acknowledged record may be lost.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

use pmcache_pmem::sim::{self, CrashConfig, CrashImage, CrashReport};
use pmcache_pmem::{PmemRegion, SimRegion};
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const SLOT: usize = 4096;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bug {
    None,
    /// (a) the record is stored but never flushed.
    NoDataFlush,
    /// (b) record and commit word are flushed together, one fence for both.
    NoFenceBeforeCommit,
    /// (c) the commit word is persisted before the record is written.
    CommitFirst,
}

/// Layout: word 0 = commit, word 1 = checkpoint (nested test), slot 0 =
/// header, slots 1..=slots(len) = records, the last slot = checkpoint copy.
fn slots(len: usize) -> u64 {
    (len / SLOT - 2) as u64
}

fn slot_off(len: usize, n: u64) -> usize {
    SLOT * (1 + ((n - 1) % slots(len)) as usize)
}

fn ckpt_off(len: usize) -> usize {
    len - SLOT
}

/// Record `n`'s content: every word distinct and non-zero.
fn record(n: u64) -> Vec<u8> {
    (0..SLOT as u64 / 8)
        .flat_map(|i| {
            (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93))
                .to_ne_bytes()
        })
        .collect()
}

fn word(img: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(img[off..off + 8].try_into().unwrap())
}

/// What the workload has issued and acknowledged so far (read by the check
/// while the workload is paused at the crash point).
#[derive(Default)]
struct Model {
    issued: AtomicU64,
    acked: AtomicU64,
}

fn workload(r: &Arc<SimRegion>, records: u64, bug: Bug, m: &Model) {
    let len = r.len();
    for n in 1..=records {
        m.issued.store(n, Ordering::SeqCst);
        let off = slot_off(len, n);
        let rec = record(n);
        // SAFETY: the workload thread is the only writer; slots are
        // distinct from the commit word.
        unsafe {
            match bug {
                Bug::None => {
                    r.copy_flush(off, &rec);
                    r.fence();
                    r.word(0).store(n, Ordering::Release);
                    r.persist(0, 8);
                }
                Bug::NoDataFlush => {
                    r.slice_mut(off, SLOT).copy_from_slice(&rec);
                    r.fence();
                    r.word(0).store(n, Ordering::Release);
                    r.persist(0, 8);
                }
                Bug::NoFenceBeforeCommit => {
                    r.copy_flush(off, &rec);
                    r.word(0).store(n, Ordering::Release);
                    r.flush(0, 8);
                    r.fence();
                }
                Bug::CommitFirst => {
                    r.word(0).store(n, Ordering::Release);
                    r.persist(0, 8);
                    r.copy_flush(off, &rec);
                    r.fence();
                }
            }
        }
        m.acked.store(n, Ordering::SeqCst);
    }
}

/// Recovery's view of a crash image, against what was acknowledged.
fn check_image(img: &[u8], acked: u64, issued: u64) -> Result<(), String> {
    let c = word(img, 0);
    if c < acked {
        return Err(format!(
            "acknowledged record {acked} lost: commit word says {c}"
        ));
    }
    if c > issued {
        return Err(format!(
            "commit word {c} names a record never written (issued {issued})"
        ));
    }
    if c == 0 {
        return Ok(());
    }
    let off = slot_off(img.len(), c);
    let want = record(c);
    if img[off..off + SLOT] != want[..] {
        let bad = (0..SLOT / 8)
            .filter(|&i| img[off + i * 8..off + i * 8 + 8] != want[i * 8..i * 8 + 8])
            .count();
        return Err(format!(
            "committed record {c} is torn: {bad} of {} words wrong",
            SLOT / 8
        ));
    }
    Ok(())
}

fn run(cfg: &CrashConfig, len: usize, records: u64, bug: Bug) -> CrashReport {
    let m = Model::default();
    sim::enumerate(
        cfg,
        SimRegion::new(len),
        |r| workload(r, records, bug, &m),
        |img| {
            check_image(
                &img.bytes,
                m.acked.load(Ordering::SeqCst),
                m.issued.load(Ordering::SeqCst),
            )
        },
    )
}

fn replay_one(
    seed: u64,
    point: u64,
    index: usize,
    len: usize,
    records: u64,
    bug: Bug,
) -> (CrashReport, CrashImage) {
    let m = Model::default();
    let mut seen = None;
    let report = sim::replay(
        seed,
        point,
        index,
        SimRegion::new(len),
        |r| workload(r, records, bug, &m),
        |img| {
            seen = Some(img.clone());
            check_image(
                &img.bytes,
                m.acked.load(Ordering::SeqCst),
                m.issued.load(Ordering::SeqCst),
            )
        },
    );
    (report, seen.expect("replay reached the point"))
}

#[test]
fn correct_protocol_passes_over_10k_images() {
    let len = 1 << 20;
    let cfg = CrashConfig::from_env(0x5EED_0001).images_per_point(64);
    let t = std::time::Instant::now();
    let report = run(&cfg, len, 60, Bug::None);
    eprintln!("{report} in {:?}", t.elapsed());
    assert!(report.is_ok(), "{report}");
    // 4 points per record + the final one.
    assert_eq!(report.points, 60 * 4);
    if cfg.only.is_none() {
        assert_eq!(report.crash_points, 60 * 4 + 1);
        assert!(report.images >= 10_000, "only {} images", report.images);
    }
}

/// Each bug must be reported with a seed and point that replay it.
fn assert_caught(bug: Bug, seed: u64) {
    let len = 64 << 10;
    let cfg = CrashConfig::new(seed).images_per_point(8);
    let report = run(&cfg, len, 6, bug);
    eprintln!("{bug:?}: {report}");
    assert_eq!(report.violations.len(), 1, "{bug:?} not caught: {report}");
    let v = &report.violations[0];
    let text = v.to_string();
    assert!(text.contains(&format!("PMCACHE_SEED={seed}")), "{text}");
    assert!(
        text.contains(&format!("PMCACHE_POINT={}:{}", v.point, v.image_index)),
        "{text}"
    );
    assert!(text.contains(&format!("point {}", v.point)), "{text}");

    // Replaying (seed, point, index) gives the same image and the same failure.
    let (again, img) = replay_one(seed, v.point, v.image_index, len, 6, bug);
    assert_eq!(again.images, 1);
    assert_eq!(again.violations.len(), 1, "{again}");
    assert_eq!(again.violations[0], *v);
    assert_eq!(
        (img.seed, img.point, img.index),
        (seed, v.point, v.image_index)
    );
    let (_, img2) = replay_one(seed, v.point, v.image_index, len, 6, bug);
    assert_eq!(img.bytes, img2.bytes);
}

#[test]
fn missing_data_flush_is_caught() {
    assert_caught(Bug::NoDataFlush, 11);
}

#[test]
fn missing_fence_before_commit_is_caught() {
    assert_caught(Bug::NoFenceBeforeCommit, 12);
}

#[test]
fn commit_before_data_is_caught() {
    assert_caught(Bug::CommitFirst, 13);
}

#[test]
fn every_seed_catches_every_bug() {
    for seed in 100..110 {
        for bug in [Bug::NoDataFlush, Bug::NoFenceBeforeCommit, Bug::CommitFirst] {
            let r = run(
                &CrashConfig::new(seed).images_per_point(4),
                64 << 10,
                4,
                bug,
            );
            assert!(!r.is_ok(), "seed {seed} missed {bug:?}: {r}");
        }
    }
}

#[test]
fn same_seed_same_images_other_seed_other_images() {
    let digest = |seed: u64| {
        let mut all = Vec::new();
        let m = Model::default();
        let cfg = CrashConfig::new(seed).images_per_point(3);
        let rep = sim::enumerate(
            &cfg,
            SimRegion::new(64 << 10),
            |r| workload(r, 3, Bug::NoDataFlush, &m),
            |img| {
                all.push((img.point, img.index, img.bytes.clone()));
                Ok(())
            },
        );
        assert!(rep.is_ok());
        all
    };
    let a = digest(7);
    assert!(a.len() > 10);
    assert_eq!(a, digest(7));
    assert_ne!(a, digest(8));
}

#[test]
fn stride_and_max_points_limit_crashes() {
    let m = Model::default();
    let cfg = CrashConfig::new(3)
        .stride(5)
        .max_points(Some(3))
        .images_per_point(2);
    let mut points = Vec::new();
    let rep = sim::enumerate(
        &cfg,
        SimRegion::new(64 << 10),
        |r| workload(r, 6, Bug::None, &m),
        |img| {
            points.push(img.point);
            Ok(())
        },
    );
    assert_eq!(rep.points, 24);
    assert_eq!(rep.crash_points, 3);
    points.dedup();
    assert_eq!(points, vec![3, 8, 13]);
}

#[test]
fn panicking_check_is_a_violation_not_an_abort() {
    let cfg = CrashConfig::new(1);
    let rep = sim::enumerate(
        &cfg,
        SimRegion::new(4096),
        |r| r.persist(0, 8),
        |img| {
            assert!(img.point > 0, "boom at {}", img.point);
            Ok(())
        },
    );
    assert_eq!(rep.violations.len(), 1);
    assert!(rep.violations[0].message.contains("boom at 0"), "{rep}");
}

/// A fence only completes the calling thread's flushes (x86 semantics).
#[test]
fn fence_on_another_thread_does_not_persist_our_flushes() {
    let r = Arc::new(SimRegion::new(4096));
    // SAFETY: single writer.
    unsafe { r.slice_mut(128, 64).fill(0x5A) };
    r.flush(128, 64);
    let r2 = Arc::clone(&r);
    std::thread::spawn(move || r2.fence()).join().unwrap();
    assert_eq!(r.fences(), 1);
    assert!(
        r.durable_image()[128..192].iter().all(|&b| b == 0),
        "B's fence persisted A's flush"
    );
    let st = r.crash_state();
    assert_eq!(st.pending_words(), 8);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let missing = (0..64)
        .filter(|_| st.image(&mut rng)[128..192].contains(&0))
        .count();
    assert!(missing > 0, "no crash image lost the unfenced line");
    r.fence();
    assert!(r.durable_image()[128..192].iter().all(|&b| b == 0x5A));
    assert_eq!(r.crash_state().pending_words(), 0);
}

/// Stores the simulator never saw (the kernel writing into the mapping)
/// are uncertain until flushed and fenced.
#[test]
fn kernel_writes_without_flush_may_be_missing() {
    let r = SimRegion::new(16 << 10);
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: writing from / reading into buffers of the given lengths; the
    // region's bytes [8192, 12288) are in bounds and used by no one else.
    unsafe {
        assert_eq!(libc::write(fds[1], data.as_ptr().cast(), data.len()), 4096);
        assert_eq!(libc::read(fds[0], r.as_ptr().add(8192).cast(), 4096), 4096);
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    assert_eq!(&r.volatile_image()[8192..12288], &data[..]);
    assert!(r.durable_image()[8192..12288].iter().all(|&b| b == 0));
    let st = r.crash_state();
    assert_eq!(st.pending_words(), 512);
    assert!(st.is_pending(8192) && st.is_pending(12287) && !st.is_pending(12288));
    let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
    let (mut full, mut partial) = (0, 0);
    for _ in 0..32 {
        let img = r.crash_image(&mut rng);
        let landed = (0..512)
            .filter(|w| img[8192 + w * 8..8192 + w * 8 + 8] == data[w * 8..w * 8 + 8])
            .count();
        if landed == 512 {
            full += 1;
        } else {
            partial += 1;
        }
    }
    assert!(partial > 0, "kernel-written data was treated as durable");
    assert!(full < 32);
    r.persist(8192, 4096);
    assert_eq!(&r.durable_image()[8192..12288], &data[..]);
}

/// What a random workload has done, word by word, kept independently of
/// the simulator: every value each word ever held, and the value a word is
/// guaranteed to hold because its line was flushed and fenced since its
/// last store.
struct Shadow {
    bytes: Vec<u8>,
    history: Vec<Vec<u64>>,
    stable: Vec<Option<u64>>,
    pending: Vec<(usize, u64)>,
}

impl Shadow {
    fn new(len: usize) -> Self {
        Shadow {
            bytes: vec![0; len],
            history: vec![vec![0]; len / 8],
            stable: vec![Some(0); len / 8],
            pending: vec![],
        }
    }

    fn store(&mut self, off: usize, data: &[u8]) {
        self.bytes[off..off + data.len()].copy_from_slice(data);
        for w in off / 8..(off + data.len()).div_ceil(8) {
            let v = word(&self.bytes, w * 8);
            if !self.history[w].contains(&v) {
                self.history[w].push(v);
            }
            self.stable[w] = None;
        }
    }

    /// Flush works on whole lines: every word of every touched line.
    fn flush(&mut self, off: usize, len: usize) {
        for w in (off / 64 * 8)..(off + len).div_ceil(64) * 8 {
            self.pending.push((w, word(&self.bytes, w * 8)));
        }
    }

    fn fence(&mut self) {
        for (w, v) in std::mem::take(&mut self.pending) {
            if word(&self.bytes, w * 8) == v {
                self.stable[w] = Some(v);
            }
        }
    }

    fn check(&self, img: &[u8]) -> Result<(), String> {
        for w in 0..img.len() / 8 {
            let v = word(img, w * 8);
            if !self.history[w].contains(&v) {
                return Err(format!(
                    "word {w} = {v:#x} was never stored there (torn or invented)"
                ));
            }
            if let Some(s) = self.stable[w] {
                if v != s {
                    return Err(format!(
                        "word {w} = {v:#x}, but {s:#x} was flushed and fenced"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Random stores, flushes and fences at random offsets: every crash image
/// must hold, per 8-byte word, a value the program once stored there (never
/// a torn word), and exactly the fenced value where nothing changed since.
#[test]
fn random_workloads_match_an_independent_model() {
    let len = 16 << 10;
    for seed in 0..4u64 {
        let shadow = parking_lot::Mutex::new(Shadow::new(len));
        let cfg = CrashConfig::new(seed).images_per_point(4);
        let rep = sim::enumerate(
            &cfg,
            SimRegion::new(len),
            |r| {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
                for _ in 0..60 {
                    let off = rng.gen_range(0..len - 700);
                    let n = rng.gen_range(1..700usize);
                    let data: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                    // SAFETY: single writer; off + n < len.
                    unsafe {
                        match rng.gen_range(0..5) {
                            0 => {
                                r.copy_flush(off, &data);
                                let mut s = shadow.lock();
                                s.store(off, &data);
                                s.flush(off, n);
                            }
                            1 => {
                                r.zero_flush(off, n);
                                let mut s = shadow.lock();
                                s.store(off, &vec![0; n]);
                                s.flush(off, n);
                            }
                            2 => {
                                r.slice_mut(off, n).copy_from_slice(&data);
                                shadow.lock().store(off, &data);
                            }
                            3 => {
                                r.flush(off, n);
                                shadow.lock().flush(off, n);
                            }
                            _ => {
                                r.fence();
                                shadow.lock().fence();
                            }
                        }
                    }
                }
            },
            |img| shadow.lock().check(&img.bytes),
        );
        assert!(rep.is_ok(), "{rep}");
        assert!(rep.images > 100, "{rep}");
    }
}

/// The same model must notice a simulator that made unfenced data durable
/// or dropped fenced data: feed it images the model forbids.
#[test]
fn the_model_itself_rejects_wrong_images() {
    let mut s = Shadow::new(128);
    s.store(0, &[1; 16]);
    s.flush(0, 16);
    s.fence();
    s.store(64, &[2; 8]);
    let mut img = vec![0u8; 128];
    img[..16].fill(1);
    assert!(s.check(&img).is_ok());
    img[64..72].fill(2);
    assert!(s.check(&img).is_ok(), "an unflushed store may land");
    img[0] = 0;
    assert!(s.check(&img).is_err(), "fenced data lost");
    img[0] = 1;
    img[64..68].fill(9);
    assert!(s.check(&img).is_err(), "torn word");
}

/// Nested crashes: crash the workload, run recovery on the crash image
/// under its own enumeration (crashing recovery too), then check again.
/// Recovery copies the committed record to a checkpoint slot and records it
/// in word 1; the buggy recovery sets word 1 before copying.
fn nested(buggy_recovery: bool) -> CrashReport {
    let len = 64 << 10;
    let outer_cfg = CrashConfig::new(21).images_per_point(2);
    let m = Model::default();
    sim::enumerate(
        &outer_cfg,
        SimRegion::new(len),
        |r| workload(r, 4, Bug::None, &m),
        |outer| {
            let acked = m.acked.load(Ordering::SeqCst);
            let issued = m.issued.load(Ordering::SeqCst);
            check_image(&outer.bytes, acked, issued)?;
            let c = word(&outer.bytes, 0);
            let recover = |r: &Arc<SimRegion>| {
                let rec = record(c);
                // SAFETY: recovery is the only user of the region.
                unsafe {
                    if buggy_recovery {
                        r.word(8).store(c, Ordering::Release);
                        r.persist(8, 8);
                        r.copy_flush(ckpt_off(len), &rec);
                        r.fence();
                    } else {
                        r.copy_flush(ckpt_off(len), &rec);
                        r.fence();
                        r.word(8).store(c, Ordering::Release);
                        r.persist(8, 8);
                    }
                }
            };
            let inner_cfg = CrashConfig::new(outer.child_seed()).images_per_point(4);
            sim::enumerate(
                &inner_cfg,
                SimRegion::from_image(&outer.bytes),
                recover,
                |inner| {
                    check_image(&inner.bytes, acked, issued)?;
                    let k = word(&inner.bytes, 8);
                    if k != 0 && inner.bytes[ckpt_off(len)..] != record(k)[..] {
                        return Err(format!(
                            "checkpoint word says {k} but the checkpoint copy is torn"
                        ));
                    }
                    Ok(())
                },
            )
            .into_result()
            .map(|_| ())
        },
    )
}

#[test]
fn nested_recovery_crashes_pass_when_correct() {
    let rep = nested(false);
    eprintln!("{rep}");
    assert!(rep.is_ok(), "{rep}");
    assert!(rep.images > 20);
}

#[test]
fn nested_recovery_crashes_catch_buggy_recovery() {
    let rep = nested(true);
    eprintln!("{rep}");
    assert_eq!(rep.violations.len(), 1, "{rep}");
    let msg = rep.to_string();
    // Both the outer and the inner crash are named, so both replay.
    assert!(msg.matches("PMCACHE_SEED=").count() >= 2, "{msg}");
    assert!(msg.contains("checkpoint copy is torn"), "{msg}");
}
