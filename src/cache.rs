//! Cache files as the commands see them: the per-cache lock, a read-only
//! view for inspection, what an existing file holds, and creating a cache.
//!
//! Every command that changes a cache takes an exclusive `flock` on the file
//! first and holds it until it exits; the inspection commands (`check`,
//! `dump`, offline `stats`) take a shared one. So a second server, a `flush`
//! or a `format` cannot touch a cache a server has open, and `check` never
//! reads a cache that is changing under it.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use pmcache_engine::format::{Layout, Superblock};
use pmcache_engine::{Engine, EngineError};
use pmcache_origin::Origin;
use pmcache_pmem::{MapOptions, MappedRegion, PmemError, PmemRegion};

use crate::size::human;

/// Largest request the server advertises (and the engine makes atomic).
pub const MAX_REQUEST: u32 = 1 << 20;

/// An advisory lock on a cache file, held until dropped.
#[derive(Debug)]
pub struct CacheLock {
    file: File,
    path: PathBuf,
}

impl CacheLock {
    /// Lock `path`: exclusively to change the cache, shared to read it.
    /// Fails at once (never waits) when a server or another command holds it.
    pub fn acquire(path: &Path, exclusive: bool) -> Result<CacheLock> {
        // To change a block device, claim it as mkfs does (O_EXCL): a
        // mounted one, or one another program holds so, is refused.
        let is_dev = pmcache_origin::file::is_block_device(path);
        let excl = if exclusive && is_dev { libc::O_EXCL } else { 0 };
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOCTTY | excl)
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    anyhow!(
                        "cache {} is in use: mounted, or held by another program",
                        path.display()
                    )
                } else {
                    open_error(path, e)
                }
            })?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!(
                    "cache {} is in use by another pmcache process",
                    path.display()
                );
            }
            bail!("cannot lock cache {}: {err}", path.display());
        }
        Ok(CacheLock {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Size of the locked file or block device.
    pub fn size(&self) -> Result<u64> {
        file_len(&self.file, &self.path)
    }
}

/// Is `path` locked by another process (a running server, usually)?
pub fn is_locked(path: &Path) -> Result<bool> {
    match CacheLock::acquire(path, false) {
        Ok(_) => Ok(false),
        Err(e) if e.to_string().contains("is in use by another") => Ok(true),
        Err(e) => Err(e),
    }
}

fn open_error(path: &Path, e: std::io::Error) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::NotFound => anyhow!("cache {}: no such file", path.display()),
        _ => anyhow!("cannot open cache {}: {e}", path.display()),
    }
}

/// Size of a regular file or block device.
fn file_len(file: &File, path: &Path) -> Result<u64> {
    let meta = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?;
    let ft = meta.file_type();
    if ft.is_block_device() {
        let mut f = file;
        return f
            .seek(SeekFrom::End(0))
            .with_context(|| format!("cannot size block device {}", path.display()));
    }
    if !ft.is_file() {
        bail!("{} is not a regular file or block device", path.display());
    }
    Ok(meta.len())
}

/// Map the file behind `lock` read-only, for `check`, `dump` and offline
/// `stats`: nothing can write the file through it.
pub fn map_read_only(lock: &CacheLock) -> Result<MappedRegion> {
    let path = lock.path();
    if file_len(lock.file(), path)? == 0 {
        bail!("{} is empty (0 bytes): not a pmcache cache", path.display());
    }
    MappedRegion::map_read_only(path, lock.file()).map_err(pmem_error)
}

/// True when any byte is not zero (a file that holds something).
fn has_data(region: &MappedRegion) -> bool {
    // SAFETY: a read-only mapping; nothing writes it while we hold the lock.
    let bytes = unsafe { region.slice(0, region.len()) };
    bytes
        .chunks(1 << 16)
        .any(|c| c.iter().fold(0u8, |a, &b| a | b) != 0)
}

/// What an existing file holds.
pub enum Contents {
    /// A pmcache cache with a valid superblock.
    Cache(Box<Superblock>),
    /// Looks like a pmcache cache but its superblock cannot be used.
    Damaged(String),
    /// Nothing: zero length, or only zero bytes.
    Blank { len: u64 },
    /// Something else.
    Foreign { len: u64 },
}

/// Inspect an existing, locked file without changing it.
pub fn classify(lock: &CacheLock) -> Result<Contents> {
    let len = file_len(lock.file(), lock.path())?;
    if len == 0 {
        return Ok(Contents::Blank { len });
    }
    if len < pmcache_pmem::mapped::MIN_LEN {
        // Too small to map as a cache, let alone to be one.
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut lock.file(), &mut bytes)?;
        return Ok(if bytes.iter().any(|&b| b != 0) {
            Contents::Foreign { len }
        } else {
            Contents::Blank { len }
        });
    }
    let region = map_read_only(lock)?;
    Ok(match pmcache_engine::recovery::read_superblock(&region) {
        Ok((sb, _)) => Contents::Cache(Box::new(sb)),
        Err(EngineError::NotACache(_)) => {
            if has_data(&region) {
                Contents::Foreign { len }
            } else {
                Contents::Blank { len }
            }
        }
        Err(e) => Contents::Damaged(e.to_string()),
    })
}

/// Open an origin spec, with the error naming it.
pub fn open_origin(spec: &str) -> Result<Arc<dyn Origin>> {
    open_origin_with(
        spec,
        pmcache_origin::NbdOriginOptions::default().connections,
    )
}

/// [`open_origin`] with up to `connections` connections to an NBD origin.
pub fn open_origin_with(spec: &str, connections: usize) -> Result<Arc<dyn Origin>> {
    let o = pmcache_origin::open_with(spec, connections).map_err(|e| {
        let msg = e.to_string();
        if msg.contains(spec) || msg.contains(spec.strip_prefix("file:").unwrap_or(spec)) {
            anyhow!("{msg}")
        } else {
            anyhow!("cannot open origin {spec}: {msg}")
        }
    })?;
    if o.size() == 0 {
        bail!("origin {spec} is empty (0 bytes); there is nothing to cache");
    }
    Ok(Arc::from(o))
}

/// The layout a cache of `len` bytes would get, refusing one too small for
/// the engine (it needs room for two maximum-size requests per shard).
pub fn plan_layout(path: &Path, len: u64, block_size: u32) -> Result<Layout> {
    let layout =
        Layout::compute(len, block_size).map_err(|e| anyhow!("cache {}: {e}", path.display()))?;
    let need = 2 * (MAX_REQUEST / block_size + 1) as u64;
    if layout.slot_count < need {
        let min = 12288 + need * (block_size as u64 + 64) + 2 * block_size.max(4096) as u64;
        let min = human(min.next_multiple_of(1 << 20));
        // A device's size is not the user's to choose.
        let fix = if pmcache_origin::file::is_block_device(path) {
            format!("use a device of at least {min}")
        } else {
            format!("use a size of at least {min}")
        };
        bail!(
            "cache {} of {} holds only {} blocks of {} bytes; at least {need} are needed ({fix})",
            path.display(),
            human(len),
            layout.slot_count,
            block_size,
        );
    }
    Ok(layout)
}

/// How to map a cache for the engine.
pub fn map_options(assume_pmem: bool, prefault: bool) -> MapOptions {
    MapOptions::new()
        .assume_pmem(assume_pmem)
        .prefault(prefault)
        .lock(false)
}

/// Map an existing cache read-write (the caller holds the exclusive lock).
pub fn map_cache(path: &Path, assume_pmem: bool, prefault: bool) -> Result<Arc<MappedRegion>> {
    // Mapping one for writing fails with a bare EINVAL: say what it is.
    if File::open(path).is_ok_and(|f| pmcache_origin::file::read_only_device(&f)) {
        bail!(
            "cache {} is a read-only block device (make it writable, e.g. blockdev --setrw)",
            path.display()
        );
    }
    MappedRegion::open(path, &map_options(assume_pmem, prefault))
        .map(Arc::new)
        .map_err(pmem_error)
}

/// Turn a pmem error into one line that names the file.
pub fn pmem_error(e: PmemError) -> anyhow::Error {
    match e {
        PmemError::Locked { path } => anyhow!(
            "cache {} is in use by another pmcache process",
            path.display()
        ),
        other => anyhow!("cache {other}"),
    }
}

/// What [`create_cache`] should do with the file at `path`.
pub enum Target {
    /// The file does not exist: create it with `len` bytes.
    New { len: u64 },
    /// Reuse the locked file, resized to `len` bytes (a no-op for a device
    /// or a file of that size already).
    Existing { lock: CacheLock, len: u64 },
}

/// A created, formatted cache and the lock that protects it.
pub struct Created {
    pub lock: CacheLock,
    pub region: Arc<MappedRegion>,
    pub superblock: Superblock,
}

/// Create (or overwrite) a cache for `origin`. Everything that can fail
/// without changing the file (layout, size) must have been checked by the
/// caller; a file this function created is removed again on failure.
pub fn create_cache(
    path: &Path,
    target: Target,
    origin: &dyn Origin,
    block_size: u32,
    assume_pmem: bool,
    prefault: bool,
) -> Result<Created> {
    let (lock, len, created) = match target {
        Target::New { len } => {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| anyhow!("cannot create cache {}: {e}", path.display()))?;
            match CacheLock::acquire(path, true) {
                Ok(lock) => (lock, len, true),
                Err(e) => {
                    let _ = std::fs::remove_file(path);
                    return Err(e);
                }
            }
        }
        Target::Existing { lock, len } => (lock, len, false),
    };
    let result = (|| -> Result<(Arc<MappedRegion>, Superblock)> {
        let meta = lock.file().metadata()?;
        if meta.is_file() {
            // A cache the file system cannot hold would fail at some later
            // store (a SIGBUS, or EFAULT in a receive): refuse it now.
            use std::os::unix::fs::MetadataExt;
            let have = meta.blocks().saturating_mul(512);
            if let Some(free) = pmcache_pmem::free_bytes(lock.file()) {
                if len > have.saturating_add(free) {
                    bail!(
                        "cache {}: its file system has {} free, not enough for a {} cache (on tmpfs that is memory); choose a smaller --size or another place",
                        path.display(),
                        crate::size::human(free),
                        crate::size::human(len)
                    );
                }
            }
        }
        if meta.is_file() && meta.len() != len {
            OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(len))
                .map_err(|e| anyhow!("cannot size cache {} to {len} bytes: {e}", path.display()))?;
        }
        let region = map_cache(path, assume_pmem, prefault)?;
        let superblock = Engine::format(&*region, origin, block_size)
            .map_err(|e| anyhow!("cannot format cache {}: {e}", path.display()))?;
        // The superblock is durable through the region; make the file's
        // size and existence durable too (a no-op on tmpfs).
        let _ = region.file().sync_all();
        Ok((region, superblock))
    })();
    match result {
        Ok((region, superblock)) => Ok(Created {
            lock,
            region,
            superblock,
        }),
        Err(e) => {
            if created {
                let _ = std::fs::remove_file(path);
            }
            Err(e)
        }
    }
}

/// Whether `path` exists (anything that is not ENOENT counts as existing, so
/// a permission problem is reported by the open that follows).
pub fn exists(path: &Path) -> bool {
    !matches!(std::fs::metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

/// The origin spec a cache recorded (its fingerprint), usable with
/// `pmcache_origin::open`.
pub fn recorded_origin(sb: &Superblock) -> String {
    sb.origin_fingerprint.clone()
}
