//! Helpers for the engine benchmarks (`benches/engine.rs`): a thin safe
//! wrapper over libpmemblk (the peer), memory accounting from `/proc`, a
//! small RNG, medians and scratch files that remove themselves.

use std::ffi::{c_char, c_int, c_longlong, c_void, CStr, CString};
use std::path::{Path, PathBuf};

#[repr(C)]
struct PmemBlkPool {
    _opaque: [u8; 0],
}

extern "C" {
    fn pmemblk_create(
        path: *const c_char,
        bsize: usize,
        poolsize: usize,
        mode: libc::mode_t,
    ) -> *mut PmemBlkPool;
    fn pmemblk_close(pbp: *mut PmemBlkPool);
    fn pmemblk_nblock(pbp: *mut PmemBlkPool) -> usize;
    fn pmemblk_read(pbp: *mut PmemBlkPool, buf: *mut c_void, blockno: c_longlong) -> c_int;
    fn pmemblk_write(pbp: *mut PmemBlkPool, buf: *const c_void, blockno: c_longlong) -> c_int;
    fn pmemblk_errormsg() -> *const c_char;
}

fn pmemblk_error() -> String {
    // SAFETY: libpmemblk returns a thread-local NUL-terminated string.
    unsafe {
        CStr::from_ptr(pmemblk_errormsg())
            .to_string_lossy()
            .into_owned()
    }
}

/// A libpmemblk pool (an atomic block array, BTT on pmem).
pub struct PmemBlk {
    pool: *mut PmemBlkPool,
    bsize: usize,
    nblock: usize,
}

// SAFETY: libpmemblk pools are thread-safe (per-lane locking inside the
// library); the pointer is only handed to its functions.
unsafe impl Send for PmemBlk {}
// SAFETY: as above.
unsafe impl Sync for PmemBlk {}

impl PmemBlk {
    /// `pmemblk_create(path, bsize, poolsize, 0o666)`. Set
    /// `PMEM_IS_PMEM_FORCE=1` in the environment first so that libpmem
    /// flushes with clwb + sfence instead of msync on a non-DAX file.
    pub fn create(path: &Path, bsize: usize, poolsize: usize) -> Result<PmemBlk, String> {
        let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: valid C string; libpmemblk creates and maps the file.
        let pool = unsafe { pmemblk_create(c.as_ptr(), bsize, poolsize, 0o666) };
        if pool.is_null() {
            return Err(format!(
                "pmemblk_create {}: {}",
                path.display(),
                pmemblk_error()
            ));
        }
        // SAFETY: live pool.
        let nblock = unsafe { pmemblk_nblock(pool) };
        Ok(PmemBlk {
            pool,
            bsize,
            nblock,
        })
    }

    pub fn nblock(&self) -> usize {
        self.nblock
    }

    /// Durable (atomic) write of one block.
    pub fn write(&self, buf: &[u8], block: u64) {
        assert_eq!(buf.len(), self.bsize);
        // SAFETY: live pool; `buf` holds one block.
        let rc = unsafe { pmemblk_write(self.pool, buf.as_ptr().cast(), block as c_longlong) };
        assert_eq!(rc, 0, "pmemblk_write: {}", pmemblk_error());
    }

    pub fn read(&self, buf: &mut [u8], block: u64) {
        assert_eq!(buf.len(), self.bsize);
        // SAFETY: live pool; `buf` holds one block.
        let rc = unsafe { pmemblk_read(self.pool, buf.as_mut_ptr().cast(), block as c_longlong) };
        assert_eq!(rc, 0, "pmemblk_read: {}", pmemblk_error());
    }
}

impl Drop for PmemBlk {
    fn drop(&mut self) {
        // SAFETY: live pool, closed once.
        unsafe { pmemblk_close(self.pool) };
    }
}

/// A field of `/proc/self/status` in KiB (e.g. `RssAnon`, `VmHWM`).
pub fn proc_status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            return rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .expect("status field");
        }
    }
    panic!("/proc/self/status has no {field}");
}

/// Anonymous resident memory of this process in bytes (excludes the shared
/// file mappings, so a /dev/shm cache file does not count).
pub fn rss_anon() -> u64 {
    proc_status_kib("RssAnon") * 1024
}

/// splitmix64: a tiny, fast, seedable generator for offsets.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// Median of a non-empty list.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    assert!(n > 0, "median of nothing");
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// A scratch file path that is removed when dropped (and before use).
pub struct TempPath(PathBuf);

impl TempPath {
    pub fn new(dir: &Path, name: &str) -> TempPath {
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        TempPath(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where scratch files go: `PMCACHE_BENCH_DIR`, default /dev/shm.
pub fn bench_dir() -> PathBuf {
    std::env::var_os("PMCACHE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let mut r = Rng::new(1);
        assert!((0..1000).all(|_| r.below(10) < 10));
        assert!(rss_anon() > 0);
    }
}
