//! What the test suites share: private temporary directories, deterministic
//! pseudo-random data and seeds that a failure names for its replay.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

pub mod order;
pub use order::{EpochHistory, EpochSet};

/// A private directory in /dev/shm (cache files there stand in for pmem;
/// elsewhere the system temp dir), removed on drop. Its path stays short:
/// Unix socket paths are limited to 107 bytes.
pub struct TempDir(PathBuf);

impl TempDir {
    /// `tag` names the suite in the path, so leftovers say whose they are.
    pub fn new(tag: &str) -> TempDir {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        Self::under(&base, tag)
    }

    /// A private directory on a disk file system, for files whose holes and
    /// page-cache behaviour matter: the system temp dir, or where that is in
    /// memory (a tmpfs /tmp), the workspace's `target` directory.
    pub fn on_disk(tag: &str) -> TempDir {
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/pmtest");
        let _ = std::fs::create_dir_all(&target);
        let base = [std::env::temp_dir(), target]
            .into_iter()
            .find(|d| d.is_dir() && !in_memory_fs(d))
            .expect("no directory on a disk file system for this test (temp dir and target/ are both in memory)");
        Self::under(&base, tag)
    }

    fn under(base: &Path, tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = base.join(format!(
            "pm{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// `join` as a string, for command lines.
    pub fn s(&self, name: &str) -> String {
        self.join(name).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), different per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// splitmix64's output function: a well-spread value from any counter.
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The run's seed: `PMCACHE_SEED` if set (a replay), else the clock.
pub fn seed() -> u64 {
    std::env::var("PMCACHE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1)
        })
}

/// Run a prepared command (stdin closed, stdout and stderr collected) and
/// wait at most `timeout`: past it the child is killed and the test fails.
/// Returns its output, whatever its exit status.
pub fn run_bounded(
    mut cmd: std::process::Command,
    timeout: std::time::Duration,
) -> std::process::Output {
    use std::io::Read;
    use std::process::Stdio;
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let t_out = drain(Box::new(child.stdout.take().expect("stdout")));
    let t_err = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Whether `dir` lies on a file system in memory (tmpfs, ramfs), from the
/// mount table: the longest mount point that contains it decides.
pub fn in_memory_fs(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, fs) = (f.next()?, f.next()?, f.next()?);
            // Spaces in mount points are written as \040.
            Some((PathBuf::from(at.replace("\\040", " ")), fs))
        })
        .filter(|(at, _)| dir.starts_with(at))
        .max_by_key(|(at, _)| at.as_os_str().len())
        .is_some_and(|(_, fs)| fs == "tmpfs" || fs == "ramfs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_by_seed_and_repeat_by_seed() {
        assert_eq!(pattern(1, 64), pattern(1, 64));
        assert_ne!(pattern(1, 64), pattern(2, 64));
        assert_ne!(splitmix(1), splitmix(2));
        let d = TempDir::new("tk");
        let p = d.path().to_path_buf();
        assert!(p.is_dir() && d.join("x").starts_with(&p));
        drop(d);
        assert!(!p.exists(), "removed on drop");
    }

    #[test]
    fn tells_where_files_live() {
        let shm = TempDir::new("tk");
        if shm.path().starts_with("/dev/shm") {
            assert!(in_memory_fs(shm.path()), "/dev/shm is a tmpfs");
        }
        let disk = TempDir::on_disk("tk");
        assert!(!in_memory_fs(disk.path()));
    }
}
