//! The origin failing under a running `pmcache serve` (contract §4): an
//! origin that fails a share of its reads and writes, and one that vanishes
//! for seconds in the middle of a copy. The client's copy must finish, the
//! server must shut down cleanly, and after `pmcache flush` the origin must
//! hold exactly what was written. The origin is nbdkit's file plugin (so its
//! data outlives a kill), with its error filter for the flaky runs.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

#[path = "common/nbd.rs"]
mod nbd;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nbd::*;

const MIB: usize = 1 << 20;
const COPY: usize = 48 * MIB;
const T: Duration = Duration::from_secs(120);

/// nbdkit serving `file` on `sock`, failing `rate` of reads and writes.
fn nbdkit_file(dir: &TempDir, sock: &Path, file: &Path, rate: Option<&str>) -> Proc {
    let mut args: Vec<String> = Vec::new();
    if rate.is_some() {
        args.push("--filter=error".into());
    }
    args.extend(["file".into(), format!("file={}", file.display())]);
    if let Some(r) = rate {
        args.extend([
            format!("error-pread-rate={r}"),
            format!("error-pwrite-rate={r}"),
        ]);
    }
    let log = dir.join(&format!("nbdkit-{}.log", rate.unwrap_or("clean")));
    nbdkit_at(sock, &args, log, Duration::from_secs(10))
}

struct Rig {
    dir: TempDir,
    origin_file: std::path::PathBuf,
    origin_sock: std::path::PathBuf,
    src: std::path::PathBuf,
    data: Vec<u8>,
}

impl Rig {
    fn new(seed: u64) -> Rig {
        let dir = TempDir::new("t");
        let origin_file = dir.join("origin.img");
        std::fs::File::create(&origin_file)
            .unwrap()
            .set_len(64 * MIB as u64)
            .unwrap();
        let data = pattern(seed, COPY);
        let src = dir.join("src.bin");
        std::fs::write(&src, &data).unwrap();
        let origin_sock = dir.join("origin.sock");
        Rig {
            dir,
            origin_file,
            origin_sock,
            src,
            data,
        }
    }

    fn origin_uri(&self) -> String {
        unix_uri(&self.origin_sock)
    }

    /// pmcache with a 16 MiB cache (a third of the copy) over the origin.
    fn serve(&self, cutoff: &str) -> ServerGuard {
        let cache = self.dir.join("cache.pmem");
        launch(&ServerKind::pmcache(
            &cache,
            "16M",
            &self.origin_uri(),
            &["--sequential-cutoff", cutoff],
        ))
    }

    /// Write everything back over a healthy origin and compare its file.
    fn flush_and_compare(&self, what: &str) {
        let clean = nbdkit_file(&self.dir, &self.origin_sock, &self.origin_file, None);
        let cache = self.dir.s("cache.pmem");
        pmcache_ok(&["flush", "--cache", &cache], T);
        drop(clean);
        let got = std::fs::read(&self.origin_file).unwrap();
        assert_same(&got[..COPY], &self.data, what);
    }
}

fn nbdcopy(src: &Path, uri: &str) -> std::process::Child {
    Command::new(require_tool("nbdcopy"))
        .args(["--flush", &src.display().to_string(), uri])
        .env("PATH", child_path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_copy(mut c: std::process::Child, what: &str) {
    let end = Instant::now() + T;
    loop {
        if let Some(status) = c.try_wait().unwrap() {
            let out = c.wait_with_output().unwrap();
            assert!(
                status.success(),
                "{what}: nbdcopy failed with {status}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        if Instant::now() > end {
            let _ = c.kill();
            panic!("{what}: nbdcopy did not finish within {T:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// 1% and 10% of origin reads and writes fail: through writeback (no
/// sequential bypass) and through the bypass, the copy finishes and nothing
/// is lost.
#[test]
fn copies_over_a_flaky_origin_finish_and_lose_nothing() {
    for (i, (rate, cutoff)) in [("1%", "0"), ("10%", "0"), ("10%", "4MiB")]
        .into_iter()
        .enumerate()
    {
        let what = format!("{rate} of origin requests failing, sequential cutoff {cutoff}");
        let rig = Rig::new(90 + i as u64);
        let flaky = nbdkit_file(&rig.dir, &rig.origin_sock, &rig.origin_file, Some(rate));
        let srv = rig.serve(cutoff);
        wait_copy(nbdcopy(&rig.src, &srv.uri()), &what);
        srv.stop();
        drop(flaky);
        rig.flush_and_compare(&what);
    }
}

/// The origin is killed in the middle of a copy and comes back 3 s later:
/// the copy finishes (writers wait for space, and a bypassed write falls
/// back to the cache), and after a flush the origin holds the copy.
#[test]
fn an_origin_that_vanishes_mid_copy_loses_nothing() {
    let rig = Rig::new(99);
    let mut origin = nbdkit_file(&rig.dir, &rig.origin_sock, &rig.origin_file, None);
    let srv = rig.serve("4MiB");
    let mut copy = nbdcopy(&rig.src, &srv.uri());
    // Early: the whole copy takes a few hundred milliseconds.
    std::thread::sleep(Duration::from_millis(20));
    origin.signal(libc::SIGKILL);
    assert!(origin.wait_exit(Duration::from_secs(10)).is_some());
    assert!(
        copy.try_wait().unwrap().is_none(),
        "the copy was over before the origin was killed"
    );
    std::thread::sleep(Duration::from_secs(3));
    let back = nbdkit_file(&rig.dir, &rig.origin_sock, &rig.origin_file, None);
    wait_copy(copy, "origin killed for 3 s");
    let st = stats(&rig.dir.join("cache.pmem"), T);
    assert!(
        counter(&st, "origin_reconnects") >= 1,
        "the outage is not in the statistics: {st}"
    );
    srv.stop();
    drop(back);
    rig.flush_and_compare("origin killed for 3 s mid-copy");
}
