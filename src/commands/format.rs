//! `pmcache format`: create a cache for an origin.

use std::os::unix::fs::FileTypeExt;
use std::process::ExitCode;

use anyhow::{bail, Result};
use pmcache_pmem::PmemRegion;

use crate::cache::{self, CacheLock, Contents, Target};
use crate::cli::FormatArgs;
use crate::size::human;

pub fn run(a: FormatArgs) -> Result<ExitCode> {
    // Nothing is changed until every check below has passed.
    // Only its size and identity are needed: one connection.
    let origin = cache::open_origin_with(&a.origin, 1)?;
    let target = if cache::exists(&a.cache) {
        let lock = CacheLock::acquire(&a.cache, true)?;
        let contents = cache::classify(&lock)?;
        let is_dev = lock.file().metadata()?.file_type().is_block_device();
        let current = lock.size()?;
        if !a.force {
            match &contents {
                Contents::Cache(sb) => {
                    bail!(
                        "{} already holds a pmcache cache (for origin '{}'); use --force to overwrite it and lose what it caches, including data not yet written back",
                        a.cache.display(),
                        sb.origin_fingerprint
                    )
                }
                Contents::Damaged(why) => bail!(
                    "{} holds a damaged pmcache cache ({why}); use --force to overwrite it",
                    a.cache.display()
                ),
                Contents::Foreign { len } => bail!(
                    "{} is not empty ({} of data that is not a pmcache cache); use --force to overwrite it",
                    a.cache.display(),
                    human(*len)
                ),
                Contents::Blank { .. } => {}
            }
        }
        let len = if is_dev {
            if let Some(size) = a.size.filter(|s| *s != current) {
                bail!(
                    "{} is a block device of {current} bytes; --size {size} does not match (omit --size)",
                    a.cache.display()
                );
            }
            current
        } else {
            match (a.size, current) {
                (Some(s), _) => s,
                (None, c) if c > 0 => c,
                (None, _) => bail!("--size is required: {} is empty", a.cache.display()),
            }
        };
        Target::Existing { lock, len }
    } else {
        let Some(len) = a.size else {
            bail!("--size is required to create {}", a.cache.display());
        };
        Target::New { len }
    };
    let len = match &target {
        Target::New { len } | Target::Existing { len, .. } => *len,
    };
    let layout = cache::plan_layout(&a.cache, len, a.block_size)?;
    let created = cache::create_cache(
        &a.cache,
        target,
        &*origin,
        a.block_size,
        a.assume_pmem,
        false,
    )?;
    crate::cli::emit(&format!(
        "formatted {}: {} cache, {} blocks of {} bytes ({} of cache data), for origin {} ({}); pmem mode {}\n",
        a.cache.display(),
        human(len),
        layout.slot_count,
        a.block_size,
        human(layout.slot_count * a.block_size as u64),
        created.superblock.origin_fingerprint,
        human(created.superblock.origin_size),
        created.region.mode()
    ))?;
    Ok(ExitCode::SUCCESS)
}
