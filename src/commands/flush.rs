//! `pmcache flush`: write every dirty block back and close the cache cleanly.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pmcache_engine::{Engine, EngineConfig, EngineError};

use crate::cache::{self, CacheLock, Contents};
use crate::cli::FlushArgs;
use crate::size::human;

pub fn run(a: FlushArgs) -> Result<ExitCode> {
    let lock = CacheLock::acquire(&a.cache, true)?;
    let sb = match cache::classify(&lock)? {
        Contents::Cache(sb) => sb,
        Contents::Damaged(why) => bail!("cache {}: {why}", a.cache.display()),
        Contents::Blank { .. } | Contents::Foreign { .. } => {
            bail!("{} is not a pmcache cache", a.cache.display())
        }
    };
    let spec = a
        .origin
        .clone()
        .unwrap_or_else(|| cache::recorded_origin(&sb));
    let origin = cache::open_origin(&spec)?;
    let region = cache::map_cache(&a.cache, a.assume_pmem, false)?;
    let cfg = EngineConfig {
        max_request: cache::MAX_REQUEST,
        background_writeback: false,
        force_origin: a.force,
        ..EngineConfig::default()
    };
    let engine = Engine::open(region, origin, cfg)
        .map_err(|e| anyhow!("cannot open cache {}: {e}", a.cache.display()))?;
    let total = engine.dirty_blocks();
    let bs = engine.block_size() as u64;
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} writeback [{bar:40}] {pos}/{len} blocks ({percent}%) {elapsed_precise} eta {eta}",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // Off a terminal (a script, a log), a line every 10 s instead of the bar.
    let quiet = bar.is_hidden();
    let mut last = std::time::Instant::now();
    let result = engine.flush_all(a.retries, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
        if quiet && last.elapsed() >= std::time::Duration::from_secs(10) {
            last = std::time::Instant::now();
            use std::io::Write;
            let line = format!("pmcache flush: {done} of {total} dirty blocks written back\n");
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    });
    bar.finish_and_clear();
    let remaining = engine.dirty_blocks();
    let closed = engine.close();
    drop(engine);
    drop(lock);
    if let Err(e) = result {
        if matches!(e, EngineError::DataCorrupt { .. }) {
            bail!("writeback to {spec} stopped: {e}; {remaining} dirty blocks stay in the cache");
        }
        bail!(
            "writeback to {spec} failed after {} retries: {e}; {remaining} dirty blocks stay in the cache (nothing is lost); run flush again once the origin works",
            a.retries
        );
    }
    closed.map_err(|e| anyhow!("cannot close cache {} cleanly: {e}", a.cache.display()))?;
    crate::cli::emit(&format!(
        "flushed {} dirty blocks ({}) from {} to {}; {} dirty blocks remain\n",
        total,
        human(total * bs),
        a.cache.display(),
        spec,
        remaining
    ))?;
    Ok(ExitCode::SUCCESS)
}
