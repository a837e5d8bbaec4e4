//! `pmcache stats`: counters of a running server (over its control socket),
//! or occupancy and dirty state of a cache file no server has open.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use pmcache_engine::check::dump;

use crate::cache::{self, CacheLock};
use crate::cli::{StatsArgs, DEFAULT_CACHE};
use crate::control::{query_stats, NotAnswering};
use crate::report::{offline_json, render_text};

/// The control socket a server uses by default for `cache`: `<cache>.sock`
/// beside a cache file, `/run/pmcache/<name>.sock` for a block device (whose
/// directory, /dev, is no place for sockets).
pub fn default_control(cache: &Path) -> PathBuf {
    let is_dev = pmcache_origin::file::is_block_device(cache);
    match cache.file_name() {
        Some(name) if is_dev => {
            let mut n = name.to_owned();
            n.push(".sock");
            Path::new("/run/pmcache").join(n)
        }
        _ => {
            let mut s = cache.as_os_str().to_owned();
            s.push(".sock");
            PathBuf::from(s)
        }
    }
}

pub fn run(a: StatsArgs) -> Result<ExitCode> {
    let v = if let Some(control) = &a.control {
        query_stats(control)?
    } else {
        let given = a.cache.is_some();
        let cache = a
            .cache
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE));
        if !cache::exists(&cache) {
            if given {
                bail!("cache {}: no such file", cache.display());
            }
            bail!(
                "cache {}: no such file (run `pmcache serve` to create it, or give --cache or --control)",
                cache.display()
            );
        }
        if cache::is_locked(&cache)? {
            let control = default_control(&cache);
            query_stats(&control).map_err(|e| {
                // A socket that is there but slow is the right one.
                let hint = if e.is::<NotAnswering>() {
                    ""
                } else {
                    "; if that server was started with --control, pass the same --control here"
                };
                anyhow!(
                    "cache {} is open in a running pmcache process, but {e:#}{hint}",
                    cache.display()
                )
            })?
        } else {
            let lock = CacheLock::acquire(&cache, false)?;
            let region = cache::map_read_only(&lock)?;
            let d = dump(&region).map_err(|e| anyhow!("cache {}: {e}", cache.display()))?;
            offline_json(&cache, &d)
        }
    };
    if a.json {
        crate::cli::emit(&format!("{v}\n"))?;
    } else {
        crate::cli::emit(&render_text(&v))?;
    }
    Ok(ExitCode::SUCCESS)
}
