//! Losing the cache for good (issue 15, ordered writeback). With
//! `--writeback-order ordered` the origin is always a state a disk could
//! have shown after a power cut, only older: a file system on the origin is
//! consistent on its own. With `none` (as dm-writecache and bcache)
//! writeback copies dirty blocks in any order, and a lost cache leaves the
//! file system on the origin corrupt; the second test shows that this test
//! sees that.
//!
//! Each round: a fresh ext4 (mkfs on the origin file, which lives on disk,
//! with a small journal so that it wraps and ext4 checkpoints within
//! seconds) is mounted through pmcache (a small cache in /dev/shm, so that
//! writeback runs during the workload) with nbdfuse, a loop device and the
//! kernel's ext4. A workload creates, appends to, renames and deletes files
//! in directories, fsyncing each step. Once writeback has copied a few MiB,
//! after a further random delay, pmcache is killed with SIGKILL. The stack
//! is torn down (its I/O fails; every step is bounded), and then:
//!
//! - control: the kept cache is flushed into a copy of the origin. That is
//!   the disk exactly as ext4 left it at the kill, so it must be clean:
//!   this checks the procedure (stack, workload, kill, e2fsck steps)
//!   whatever the writeback order;
//! - cache lost: the cache is deleted and a copy of the origin alone is
//!   checked: clean in every round (ordered), corrupt in some round (none).
//!
//! "Clean" is what e2fsck says after doing what a mount does first:
//! `e2fsck -p -E journal_only IMAGE` replays the journal and releases the
//! orphan inodes; without -f it stops there and exits 0 (with -f it would
//! go on to a full check). It must report no journal checksum error (it
//! exits 0 even then). Then `e2fsck -fn IMAGE` must exit 0: it reports but
//! does not count the superblock's free block and inode totals, which the
//! kernel does not keep up to date.
//!
//! Reproduce a run with PMCACHE_SEED=<seed> (printed at the start).
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

#[path = "common/nbd.rs"]
mod nbd;

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nbd::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const T: Duration = Duration::from_secs(90);
const ORIGIN_SIZE: u64 = 256 << 20;
/// Small enough that writeback runs flat out during the workload, with
/// more dirty blocks than one writeback batch takes.
const CACHE_SIZE: &str = "16M";
/// ext4's journal, in MiB (the smallest mkfs allows for 4 KiB blocks): it
/// wraps within seconds, so ext4 checkpoints metadata to its home places.
const JOURNAL_MIB: &str = "4";
/// The kill comes once writeback has copied this much to the origin…
const WRITTEN_BACK_BEFORE_KILL: u64 = 8 << 20;
/// …plus a random delay up to this.
const KILL_DELAY_MAX: Duration = Duration::from_millis(2500);
/// The workload must get there within this.
const WORKLOAD_WAIT: Duration = Duration::from_secs(60);
const ORDERED_ROUNDS: u64 = 5;
/// With `none`, about 4 rounds in 5 leave a corrupt origin here (24 of 30
/// with the origin on disk, 8 of 12 on tmpfs): 6 rounds miss all with odds
/// under 1 in 1000 even at 2 in 3.
const UNORDERED_ROUNDS_MAX: u64 = 6;

/// The rounds share the machine's two cores and its loop devices, and
/// their timing is what the kill moments depend on: one round at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The workload: MNT SEED. Files are created, appended to, renamed and
/// deleted in 16 directories, each step made durable (dd conv=fsync, sync
/// FILE or DIR, syncfs). It runs until it is stopped, or an I/O error stops
/// it once the server is gone; 100000 steps at most.
const WORKLOAD: &str = r#"set -u
cd "$1" || exit 2
RANDOM=$2
for ((i = 0; i < 100000; i++)); do
  d=d$((RANDOM % 16)) sub=s$((RANDOM % 4))
  mkdir -p "$d/$sub" || exit 1
  case $((RANDOM % 6)) in
    0 | 1) dd if=/dev/urandom of="$d/f$i" bs=4k count=$((1 + RANDOM % 64)) conv=fsync status=none ;;
    2) echo "step $i" >>"$d/log" && sync "$d/log" ;;
    3) for f in d$((RANDOM % 16))/[fr]*; do [ -f "$f" ] && mv "$f" "$d/r$i"; break; done && sync "$d" ;;
    4) for f in "$d"/[fr]*; do [ -f "$f" ] && rm "$f"; break; done && sync "$d" ;;
    5) touch "$d/$sub/t$i" && sync -f "$d" ;;
  esac || exit 1
  if [ $((i % 100)) -eq 0 ]; then echo "step $i"; fi
done
"#;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// What e2fsck says of an image once its journal is replayed.
struct Verdict {
    clean: bool,
    report: String,
}

/// Replay the journal of `img` and release its orphan inodes, as a mount
/// would, then check it read-only in full.
fn fsck_after_replay(img: &Path) -> Verdict {
    let img = s(img);
    let mut clean = true;
    let mut report = String::new();
    for args in [&["-p", "-E", "journal_only", &img][..], &["-fn", &img][..]] {
        let out = run_tool("e2fsck", args, T);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The replay exits 0 even where it skipped journal blocks whose
        // checksums fail ("JBD2: Invalid checksum recovering data block",
        // "Journal checksum error found"): a disk after a power cut never
        // shows a committed transaction with bad blocks, so that is corrupt.
        let lower = text.to_lowercase();
        clean &= out.status.code() == Some(0)
            && !["error", "invalid", "corrupt"]
                .iter()
                .any(|w| lower.contains(w));
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        report += &format!("$ e2fsck {}: {}\n", args.join(" "), out.status);
        for l in lines.iter().take(40) {
            report += &format!("  {l}\n");
        }
        if lines.len() > 40 {
            report += &format!("  … {} more lines\n", lines.len() - 40);
        }
    }
    Verdict { clean, report }
}

/// Panics (with its log) if the workload is no longer running.
fn assert_running(workload: &mut Proc, what: &str) {
    if let Some(st) = workload.exited() {
        panic!(
            "the workload exited ({st}) {what}; its log:\n{}",
            workload.log_text()
        );
    }
}

/// `cp --sparse=always FROM TO`.
fn copy_image(from: &Path, to: &Path) {
    run_ok("cp", &["--sparse=always", &s(from), &s(to)], T);
}

/// One round's outcome.
struct Round {
    /// The origin with the kept cache flushed into it (the disk at the kill).
    control: Verdict,
    /// The origin alone (the cache thrown away).
    lost: Verdict,
    summary: String,
}

/// One round with `--writeback-order order`, its choices drawn from `seed`.
fn round(order: &str, seed: u64) -> Round {
    for tool in ["mkfs.ext4", "e2fsck", "bash", "dd", "sync", "cp"] {
        require_tool(tool);
    }
    let mut rng = SmallRng::seed_from_u64(seed);
    // The origin on a disk file system, as a real origin: its flushes take
    // time, as they would. The cache, the FUSE file, the mount point and
    // the copies go in /dev/shm.
    let disk = TempDir::on_disk("cl");
    let shm = TempDir::new("cl");
    let origin = disk.join("origin.img");
    std::fs::File::create(&origin)
        .unwrap()
        .set_len(ORIGIN_SIZE)
        .unwrap();
    run_ok(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-J",
            &format!("size={JOURNAL_MIB}"),
            &s(&origin),
        ],
        T,
    );

    let cache = shm.join("cache.pmem");
    let mut srv = launch(&ServerKind::pmcache(
        &cache,
        CACHE_SIZE,
        &s(&origin),
        &["--writeback-order", order],
    ));
    let mut fs = FsStack::attach(shm.path(), "fuse", &srv.uri());
    let mnt = shm.join("mnt");
    fs.mount(&mnt);
    let script = shm.join("workload.sh");
    std::fs::write(&script, WORKLOAD).unwrap();
    let workload_seed = rng.gen_range(1..32768u32).to_string();
    let mut workload = Proc::spawn(
        &require_tool("bash"),
        &[s(&script), s(&mnt), workload_seed],
        shm.join("workload.log"),
        &[],
    );

    // Wait for writeback to have copied enough, then a random delay more.
    let start = Instant::now();
    loop {
        assert_running(&mut workload, "before the kill");
        let wb = counter(&stats(&cache, T), "writeback_bytes");
        if wb >= WRITTEN_BACK_BEFORE_KILL {
            break;
        }
        assert!(
            start.elapsed() < WORKLOAD_WAIT,
            "writeback copied only {wb} bytes in {WORKLOAD_WAIT:?}; workload log:\n{}",
            workload.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let delay = KILL_DELAY_MAX.mul_f64(rng.gen_range(0.0..1.0));
    std::thread::sleep(delay);
    let at_kill = stats(&cache, T);
    assert_running(&mut workload, "before the kill");
    let ran = start.elapsed();
    srv.proc.signal(libc::SIGKILL);
    assert!(
        srv.proc.wait_exit(Duration::from_secs(10)).is_some(),
        "pmcache survived SIGKILL"
    );

    // Tear down: nbdfuse goes, so the workload's I/O fails and it exits.
    fs.cut_off();
    if workload.wait_exit(Duration::from_secs(20)).is_none() {
        workload.signal(libc::SIGKILL);
        assert!(
            workload.wait_exit(Duration::from_secs(10)).is_some(),
            "the workload is stuck after the server died"
        );
    }
    let steps = workload
        .log_text()
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("step ").map(str::to_string))
        .unwrap_or_else(|| "0".into());
    let teardown = fs.detach_after_crash();
    drop(fs);

    // Copies of the origin as the kill left it, before anything else runs.
    let (control, lost) = (shm.join("control.img"), shm.join("lost.img"));
    copy_image(&origin, &control);
    copy_image(&origin, &lost);
    // Control: the kept cache flushed into one copy.
    pmcache_ok(
        &[
            "flush",
            "--cache",
            &s(&cache),
            "--origin",
            &s(&control),
            "--force",
            "--assume-pmem",
        ],
        T,
    );
    let control = fsck_after_replay(&control);
    // The cache lost for good: the origin alone.
    std::fs::remove_file(&cache).unwrap();
    let lost = fsck_after_replay(&lost);

    let summary = format!(
        "order {order}, seed {seed:#x}: killed {:.1} s into the workload (step {steps}+, \
         {delay:.1?} after {} MiB were written back); at the kill {} MiB written by the \
         client, {} MiB written back, {} of {} blocks dirty; teardown: {teardown}; \
         control {}, origin alone {}",
        ran.as_secs_f64(),
        WRITTEN_BACK_BEFORE_KILL >> 20,
        counter(&at_kill, "write_bytes") >> 20,
        counter(&at_kill, "writeback_bytes") >> 20,
        counter(&at_kill, "dirty"),
        counter(&at_kill, "slots"),
        if control.clean { "clean" } else { "CORRUPT" },
        if lost.clean { "clean" } else { "CORRUPT" },
    );
    eprintln!("{summary}");
    Round {
        control,
        lost,
        summary,
    }
}

/// The control must be clean whatever the writeback order: otherwise the
/// procedure, not the ordering, is at fault.
fn assert_control_clean(r: &Round, n: u64, seed: u64) {
    assert!(
        r.control.clean,
        "round {n} (PMCACHE_SEED={seed}): the origin with the kept cache flushed into it \
         (the disk as ext4 left it at the kill) is not clean, so the test procedure is at \
         fault, not the writeback order: {}\n{}",
        r.summary, r.control.report
    );
}

#[test]
fn ordered_writeback_leaves_a_consistent_origin_when_the_cache_is_lost() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let seed = test_seed("ordered");
    for n in 0..ORDERED_ROUNDS {
        let r = round("ordered", round_seed(seed, 1, n));
        assert_control_clean(&r, n, seed);
        assert!(
            r.lost.clean,
            "round {n} (PMCACHE_SEED={seed}): with ordered writeback, ext4 on the origin \
             alone is corrupt after the cache was lost: {}\n{}",
            r.summary, r.lost.report
        );
    }
}

#[test]
fn unordered_writeback_corrupts_the_origin_when_the_cache_is_lost() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let seed = test_seed("none");
    let mut summaries = Vec::new();
    for n in 0..UNORDERED_ROUNDS_MAX {
        let r = round("none", round_seed(seed, 2, n));
        assert_control_clean(&r, n, seed);
        if !r.lost.clean {
            eprintln!(
                "round {n}: the origin alone is corrupt, as expected:\n{}",
                r.lost.report
            );
            return;
        }
        summaries.push(r.summary);
    }
    panic!(
        "with --writeback-order none, no round out of {UNORDERED_ROUNDS_MAX} left a corrupt \
         file system on the origin alone (PMCACHE_SEED={seed}), so this test cannot tell \
         ordered writeback from unordered:\n{}",
        summaries.join("\n")
    );
}
