//! Persistence primitives against plain memcpy, on a /dev/shm file mapped
//! with `assume_pmem` (so flushes are real clwb/clflushopt instructions).
//!
//! `cargo bench -p pmcache-pmem --bench persist` (add `-- quick` for a
//! short run, `-- hash` for the block-hash section alone).
//! `PMCACHE_BENCH_DIR` overrides /dev/shm.
//!
//! Two destinations: "cold" walks a 256 MiB region (larger than any LLC), as
//! cache data writes do; "hot" rewrites the same place, as metadata does.
//! The source is always hot. Each figure is the median of many short rounds
//! (about 2 MiB copied each), the variants interleaved within a round so
//! machine noise hits all alike.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

use pmcache_pmem::flush::{self, FlushKind, NtIsa, NT_THRESHOLD};
use pmcache_pmem::hash;
use pmcache_pmem::sim::image_rng;
use pmcache_pmem::{MapOptions, MappedRegion, PersistMode, PmemRegion, SimRegion};
use std::hint::black_box;
use std::time::{Duration, Instant};

const REGION: usize = 256 << 20;
const KIB: usize = 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Memcpy,
    TemporalFlush(FlushKind),
    Nt(NtIsa),
    /// `xxhash_rust::xxh3::xxh3_64` of the source alone (no copy).
    HashRef,
    /// `hash::xxh3_64` of the source alone (no copy).
    HashOurs,
    /// Selected streaming copy + sfence, then `xxhash_rust` of the source.
    NtThenHashRef,
    /// `hash::copy_nt_hash` (fused) + sfence.
    NtHash,
}

impl Variant {
    fn name(self) -> String {
        match self {
            Variant::Memcpy => "memcpy".into(),
            Variant::TemporalFlush(k) => format!("copy+{k}+sfence"),
            Variant::Nt(i) => format!("nt-{i}+sfence"),
            Variant::HashRef => "xxhash-rust xxh3".into(),
            Variant::HashOurs => "hash::xxh3_64".into(),
            Variant::NtThenHashRef => "nt+sfence, xxhash-rust".into(),
            Variant::NtHash => "copy_nt_hash+sfence".into(),
        }
    }
}

struct Bench {
    region: MappedRegion,
    src: Vec<u8>,
    kind: FlushKind,
    cursor: usize,
}

impl Bench {
    /// ns per operation of `v` copying `size` bytes, `ops` times.
    fn run(&mut self, v: Variant, size: usize, ops: usize, cold: bool, misalign: usize) -> f64 {
        // SAFETY: `misalign` < 64 and every offset below leaves 64 bytes of
        // slack before the end of the mapping.
        let base = unsafe { self.region.as_ptr().add(misalign) };
        let step = size.next_multiple_of(64) + 64;
        let t = Instant::now();
        for _ in 0..ops {
            let off = if cold {
                if self.cursor + step + 64 > REGION {
                    self.cursor = 0;
                }
                let o = self.cursor;
                self.cursor += step;
                o
            } else {
                0
            };
            // SAFETY: `off + size <= REGION`, the mapping's length; this
            // thread is the only user of the mapping.
            unsafe { self.op(v, base.add(off), size) };
            black_box(base);
        }
        t.elapsed().as_nanos() as f64 / ops as f64
    }

    /// As [`run`](Self::run) (cold, aligned), but with `gap` of idle
    /// spinning before each operation and each timed alone, so streaming
    /// stores of the previous one have drained: the latency of one isolated
    /// write rather than the throughput of back-to-back ones. The clock's
    /// own cost (`Instant` pair, measured alike) is subtracted.
    fn run_spaced(&mut self, v: Option<Variant>, size: usize, ops: usize, gap: Duration) -> f64 {
        let step = size.next_multiple_of(64) + 64;
        let mut total = Duration::ZERO;
        for _ in 0..ops {
            if self.cursor + step + 64 > REGION {
                self.cursor = 0;
            }
            let off = self.cursor;
            self.cursor += step;
            let idle = Instant::now();
            while idle.elapsed() < gap {
                std::hint::spin_loop();
            }
            let t = Instant::now();
            if let Some(v) = v {
                // SAFETY: as in `run`.
                unsafe { self.op(v, self.region.as_ptr().add(off), size) };
            }
            total += t.elapsed();
        }
        total.as_nanos() as f64 / ops as f64
    }

    /// One operation of `v` on `size` bytes of the source to `dst`.
    ///
    /// # Safety
    /// `dst` is in the mapping with `size` bytes after it, and this thread is
    /// its only user (`src` is a separate heap buffer).
    unsafe fn op(&self, v: Variant, dst: *mut u8, size: usize) {
        let src = &self.src[..size];
        // SAFETY: per the contract.
        unsafe {
            match v {
                Variant::Memcpy => std::ptr::copy_nonoverlapping(src.as_ptr(), dst, size),
                Variant::TemporalFlush(k) => {
                    flush::copy_temporal_flush(k, dst, src);
                    flush::sfence();
                }
                Variant::Nt(isa) => {
                    flush::copy_nt(self.kind, isa, dst, src);
                    flush::sfence();
                }
                Variant::HashRef => {
                    black_box(xxhash_rust::xxh3::xxh3_64(black_box(src)));
                }
                Variant::HashOurs => {
                    black_box(hash::xxh3_64(black_box(src)));
                }
                Variant::NtThenHashRef => {
                    flush::copy_nt(self.kind, NtIsa::detect(), dst, src);
                    flush::sfence();
                    black_box(xxhash_rust::xxh3::xxh3_64(src));
                }
                Variant::NtHash => {
                    let h = hash::copy_nt_hash(dst, src).expect("fast case");
                    flush::sfence();
                    black_box(h);
                }
            }
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn gibs(size: usize, ns: f64) -> f64 {
    size as f64 / ns * 1e9 / (1u64 << 30) as f64
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 10_000.0 {
        format!("{:.1} us", ns / 1000.0)
    } else {
        format!("{ns:.0} ns")
    }
}

fn fmt_size(s: usize) -> String {
    if s >= KIB * KIB {
        format!("{} MiB", s / KIB / KIB)
    } else if s >= KIB {
        format!("{} KiB", s / KIB)
    } else {
        format!("{s} B")
    }
}

/// Medians per variant for one size.
fn measure(
    b: &mut Bench,
    variants: &[Variant],
    size: usize,
    cold: bool,
    mis: usize,
    rounds: usize,
    bytes: usize,
) -> Vec<f64> {
    let ops = (bytes / size).clamp(16, 1 << 16);
    let mut samples = vec![Vec::new(); variants.len()];
    // Warm-up: one untimed pass of everything.
    for &v in variants {
        b.run(v, size, ops.min(1024), cold, mis);
    }
    for _ in 0..rounds {
        for (i, &v) in variants.iter().enumerate() {
            samples[i].push(b.run(v, size, ops, cold, mis));
        }
    }
    samples.into_iter().map(median).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "quick");
    let only_hash = args.iter().any(|a| a == "hash");
    // `cargo bench` passes `--bench`; anything else (`cargo test --benches`,
    // a bare run) only checks that the bench works.
    let smoke = !args.iter().any(|a| a == "--bench") && !quick;
    // Many short interleaved samples and their median: on a shared 2-core
    // machine, a neighbour's burst spoils a few samples, not the figure.
    let (rounds, bytes) = if smoke {
        (1, 256 << 10)
    } else if quick {
        (11, 1 << 20)
    } else {
        (101, 2 << 20)
    };

    let dir = std::env::var("PMCACHE_BENCH_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let path = std::path::Path::new(&dir).join(format!("pmcache-bench-{}", std::process::id()));
    let opts = MapOptions::new().assume_pmem(true).prefault(true);
    let region = match MappedRegion::create(&path, REGION as u64, &opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot create the bench region: {e}");
            std::process::exit(1);
        }
    };
    // The mapping stays valid after unlinking; nothing is left behind.
    let _ = std::fs::remove_file(&path);
    let kind = match region.mode() {
        PersistMode::AssumedPmem(k) | PersistMode::Dax(k) => k,
        m => {
            eprintln!("region mode is {m}: no CPU flush on this machine, nothing to measure");
            return;
        }
    };
    let src: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut b = Bench {
        region,
        src,
        kind,
        cursor: 0,
    };

    let isas: Vec<NtIsa> = [NtIsa::Avx2, NtIsa::Sse2]
        .into_iter()
        .filter(|i| i.available())
        .collect();
    println!(
        "pmem persist bench: {} (mode {}), flush {kind}, streaming isa {} (selected), NT_THRESHOLD {} B, {} rounds",
        path.display(),
        b.region.mode(),
        NtIsa::detect(),
        NT_THRESHOLD,
        rounds
    );

    // Warm up clocks, TLBs and the code paths before anything is timed.
    for v in [
        Variant::Memcpy,
        Variant::TemporalFlush(kind),
        Variant::Nt(NtIsa::detect()),
    ] {
        for cold in [true, false] {
            b.run(v, 64 * KIB, 1024, cold, 0);
        }
    }

    if only_hash {
        hash_section(&mut b, rounds, bytes);
        return;
    }

    // 1. The three headline sizes: memcpy vs copy+flush vs streaming.
    let mut main_vars = vec![Variant::Memcpy, Variant::TemporalFlush(kind)];
    main_vars.extend(isas.iter().map(|&i| Variant::Nt(i)));
    for cold in [true, false] {
        println!(
            "\n## {} destination",
            if cold {
                "cold (256 MiB walk)"
            } else {
                "hot (same address)"
            }
        );
        println!(
            "{:<8} {:<22} {:>10} {:>10} {:>10}",
            "size", "variant", "per op", "GiB/s", "x memcpy"
        );
        for size in [64, 4 * KIB, KIB * KIB] {
            let r = measure(&mut b, &main_vars, size, cold, 0, rounds, bytes);
            for (v, ns) in main_vars.iter().zip(&r) {
                println!(
                    "{:<8} {:<22} {:>10} {:>10.2} {:>10.2}",
                    fmt_size(size),
                    v.name(),
                    fmt_ns(*ns),
                    gibs(size, *ns),
                    ns / r[0]
                );
            }
        }
    }

    // 2. The threshold sweep: copy+flush against the selected streaming
    // ISA, line-aligned and 8 bytes off (partial first and last lines).
    let sweep_vars = [Variant::TemporalFlush(kind), Variant::Nt(NtIsa::detect())];
    let sizes = [
        64,
        128,
        256,
        512,
        KIB,
        2 * KIB,
        4 * KIB,
        8 * KIB,
        16 * KIB,
        64 * KIB,
        256 * KIB,
        KIB * KIB,
    ];
    let mut wins_from = Vec::new();
    // Streaming evicts the written lines, so a later read of them misses;
    // the bench does not charge that, so demand a clear margin.
    const MARGIN: f64 = 0.90;
    let mut clear_from: Vec<Option<usize>> = Vec::new();
    for (cold, mis) in [(true, 0), (true, 8), (false, 0), (false, 8)] {
        let label = format!(
            "{}, {}",
            if cold { "cold" } else { "hot" },
            if mis == 0 { "aligned" } else { "dst+8" }
        );
        println!(
            "\n## threshold sweep ({label}): {} vs {}",
            sweep_vars[0].name(),
            sweep_vars[1].name()
        );
        println!(
            "{:<8} {:>12} {:>12} {:>8}",
            "size", "copy+flush", "streaming", "nt/tf"
        );
        let mut crossover = None;
        let mut clear = None;
        for &size in &sizes {
            let r = measure(&mut b, &sweep_vars, size, cold, mis, rounds, bytes);
            println!(
                "{:<8} {:>12} {:>12} {:>8.2}",
                fmt_size(size),
                fmt_ns(r[0]),
                fmt_ns(r[1]),
                r[1] / r[0]
            );
            if r[1] < r[0] {
                crossover.get_or_insert(size);
            } else {
                crossover = None;
            }
            if r[1] <= r[0] * MARGIN {
                clear.get_or_insert(size);
            } else {
                clear = None;
            }
        }
        clear_from.push(clear);
        match crossover {
            Some(s) => println!("streaming wins from {} up", fmt_size(s)),
            None => println!("streaming does not win at the largest size"),
        }
        wins_from.push((label, crossover));
    }
    println!("\n## summary");
    for (label, c) in &wins_from {
        println!(
            "{label}: streaming wins from {}",
            c.map_or("never".to_string(), fmt_size)
        );
    }
    let all = wins_from
        .iter()
        .map(|(_, c)| c.unwrap_or(usize::MAX))
        .max()
        .unwrap_or(usize::MAX);
    let clear = clear_from
        .iter()
        .map(|c| c.unwrap_or(usize::MAX))
        .max()
        .unwrap_or(usize::MAX);
    let show = |s: usize| {
        if s == usize::MAX {
            "none".to_string()
        } else {
            fmt_size(s)
        }
    };
    println!(
        "smallest size from which streaming wins in every case: {}",
        show(all)
    );
    println!(
        "smallest size from which streaming is >= {:.0}% faster in every case: {} (NT_THRESHOLD is {})",
        (1.0 - MARGIN) * 100.0,
        show(clear),
        fmt_size(NT_THRESHOLD)
    );
    hash_section(&mut b, rounds, bytes);
    drop(b);
    prefault_section(&dir);
    sim_section(if smoke { 2 } else { 200 });
}

/// The block hash of a 4 KiB data write: xxhash-rust (SSE2 as built)
/// against `hash::xxh3_64` (runtime dispatch), alone and after / fused with
/// the streaming copy to a cold destination.
fn hash_section(b: &mut Bench, rounds: usize, bytes: usize) {
    const SIZE: usize = 4 * KIB;
    // The section is cheap (well under a second at 101 rounds); more rounds
    // than `quick` gives steady the spaced figures, which vary most.
    let rounds = if rounds > 1 { rounds.max(41) } else { rounds };
    let vars = [
        Variant::HashRef,
        Variant::HashOurs,
        Variant::NtThenHashRef,
        Variant::NtHash,
    ];
    // SAFETY: a probe into the bench mapping (page-aligned base, 4 KiB in
    // bounds), overwritten by the runs below.
    if unsafe { hash::copy_nt_hash(b.region.as_ptr(), &b.src[..SIZE]) }.is_none() {
        println!("\n## block hash: copy_nt_hash declines on this CPU (no AVX2), skipped");
        return;
    }
    flush::sfence();
    println!(
        "\n## block hash ({}), 4 KiB, cold destination (256 MiB walk), source hot",
        hash::implementation()
    );
    let r = measure(b, &vars, SIZE, true, 0, rounds, bytes);
    // Back to back, a cold streaming copy runs at memory write bandwidth
    // and the hashes hide behind it; an engine write does other work in
    // between, so also time each operation alone after an idle gap.
    const GAP: Duration = Duration::from_micros(1);
    let ops = (bytes / SIZE).clamp(16, 1024);
    let mut spaced = vec![Vec::new(); vars.len()];
    let mut clock = Vec::new();
    for _ in 0..rounds {
        clock.push(b.run_spaced(None, SIZE, ops, GAP));
        for (i, &v) in vars.iter().enumerate() {
            spaced[i].push(b.run_spaced(Some(v), SIZE, ops, GAP));
        }
    }
    let clock = median(clock);
    let spaced: Vec<f64> = spaced.into_iter().map(|s| median(s) - clock).collect();
    println!(
        "{:<26} {:>13} {:>13}   (spaced: {} idle before each op; clock cost {} subtracted)",
        "variant",
        "back-to-back",
        "spaced",
        fmt_ns(GAP.as_nanos() as f64),
        fmt_ns(clock)
    );
    for (((label, v), ns), sp) in ["(a)", "(b)", "(c)", "(d)"]
        .iter()
        .zip(&vars)
        .zip(&r)
        .zip(&spaced)
    {
        println!(
            "{label} {:<22} {:>13} {:>13}",
            v.name(),
            fmt_ns(*ns),
            fmt_ns(*sp)
        );
    }
}

/// First-touch page faults against a prefaulted mapping.
fn prefault_section(dir: &str) {
    const LEN: usize = 256 << 20;
    println!("\n## prefault (256 MiB file in {dir}, one memcpy pass of 1 MiB chunks)");
    let src = vec![0x5Au8; 1 << 20];
    for prefault in [false, true] {
        let path =
            std::path::Path::new(dir).join(format!("pmcache-bench-pf-{}", std::process::id()));
        let t = Instant::now();
        let r = MappedRegion::create(&path, LEN as u64, &MapOptions::new().prefault(prefault))
            .expect("bench file");
        let open = t.elapsed();
        let _ = std::fs::remove_file(&path);
        let mut passes = Vec::new();
        for _ in 0..2 {
            let t = Instant::now();
            for off in (0..LEN).step_by(src.len()) {
                // SAFETY: in bounds; this thread is the only user.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), r.as_ptr().add(off), src.len())
                };
            }
            black_box(r.as_ptr());
            passes.push(gibs(LEN, t.elapsed().as_nanos() as f64));
        }
        println!(
            "prefault {:<5}: open {:>7.1} ms, first pass {:>6.2} GiB/s, second pass {:>6.2} GiB/s",
            prefault,
            open.as_secs_f64() * 1e3,
            passes[0],
            passes[1]
        );
    }
}

/// What a crash image costs: the per-point comparison and the per-image
/// copy, for the region sizes the engine's crash tests use.
fn sim_section(reps: usize) {
    println!("\n## crash simulator ({reps} images per size, 64 KiB unflushed + 64 KiB flushed-unfenced pending)");
    println!(
        "{:<8} {:>14} {:>12} {:>14} {:>22}",
        "region", "crash_state", "image", "from_image", "1M images, 1 core"
    );
    for len in [512 << 10, 4 << 20] {
        let r = SimRegion::new(len);
        // SAFETY: single-threaded; in bounds.
        unsafe {
            r.slice_mut(4096, 64 << 10).fill(0xA5);
            r.slice_mut(len / 2, 64 << 10).fill(0x3C);
        }
        r.flush(len / 2, 64 << 10);
        let n_states = reps.min(50);
        let t = Instant::now();
        for _ in 1..n_states {
            black_box(r.crash_state());
        }
        let st = r.crash_state();
        let state_ns = t.elapsed().as_nanos() as f64 / n_states as f64;
        let t = Instant::now();
        let mut img = Vec::new();
        for i in 0..reps {
            img = st.image(&mut image_rng(1, 0, i));
            black_box(&img);
        }
        let image_ns = t.elapsed().as_nanos() as f64 / reps as f64;
        let t = Instant::now();
        for _ in 0..reps {
            black_box(SimRegion::from_image(&img));
        }
        let reopen_ns = t.elapsed().as_nanos() as f64 / reps as f64;
        // A crash point per 8 images is typical (images_per_point 8).
        let per_image = image_ns + reopen_ns + state_ns / 8.0;
        println!(
            "{:<8} {:>11.1} us {:>9.1} us {:>11.1} us {:>20.0} s",
            fmt_size(len),
            state_ns / 1e3,
            image_ns / 1e3,
            reopen_ns / 1e3,
            per_image * 1e6 / 1e9
        );
    }
}
