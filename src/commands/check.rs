//! `pmcache check`: validate a cache offline, without writing it.

use std::process::ExitCode;

use anyhow::Result;
use pmcache_engine::check::{check, CheckReport};
use serde_json::json;

use crate::cache::{self, CacheLock};
use crate::cli::CheckArgs;
use crate::size::human;

pub fn run(a: CheckArgs) -> Result<ExitCode> {
    let origin = match &a.origin {
        Some(spec) => {
            // Only its size and identity are needed: one connection.
            let o = cache::open_origin_with(spec, 1)?;
            Some((o.fingerprint(), o.size()))
        }
        None => None,
    };
    let lock = CacheLock::acquire(&a.cache, false)?;
    let report = match cache::map_read_only(&lock) {
        Ok(region) => check(
            &region,
            origin.as_ref().map(|(f, s)| (f.as_str(), *s)),
            !a.no_data,
        ),
        // An empty file: report it like any other inconsistency.
        Err(e) => CheckReport {
            errors: vec![e.to_string()],
            ..Default::default()
        },
    };
    if a.json {
        crate::cli::emit(&format!("{}\n", report_json(&a, &report)))?;
    } else {
        crate::cli::emit(&report_text(&a, &report))?;
    }
    if report.ok() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "pmcache: error: cache {} is not consistent: {}{}",
            a.cache.display(),
            report.errors[0],
            match report.errors.len() {
                1 => String::new(),
                2 => " (and 1 more problem; see the report)".to_string(),
                n => format!(" (and {} more problems; see the report)", n - 1),
            }
        );
        Ok(ExitCode::FAILURE)
    }
}

fn report_text(a: &CheckArgs, r: &CheckReport) -> String {
    let mut o = format!("checking {}\n", a.cache.display());
    if let Some(sb) = &r.superblock {
        o += &format!(
            "  superblock     generation {}, {} blocks of {} bytes, data at offset {}, {} in total\n",
            sb.generation,
            sb.layout.slot_count,
            sb.layout.block_size,
            sb.layout.data_offset,
            human(sb.layout.region_len)
        );
        o += &format!(
            "  origin         {} ({} bytes)\n  mode           {}\n  last shutdown  {}\n",
            sb.origin_fingerprint,
            sb.origin_size,
            sb.mode,
            if sb.clean_shutdown {
                "clean"
            } else {
                "not clean (recovery runs at the next open)"
            }
        );
    }
    if let Some(s) = r.watermark {
        o += &format!("  watermark      {s}\n");
    }
    if let Some(w) = r.written_epoch {
        o += &format!("  written epoch  {w} (every epoch up to it is on the origin)\n");
    }
    if r.superblock.is_some() {
        o += &format!(
            "  mappings       {} live, {} dirty, {} in flight at a crash; {} retained for ordered writeback, {} superseded\n",
            r.live, r.dirty, r.pending, r.retained, r.superseded
        );
        o += &format!(
            "  data           {}\n",
            if a.no_data {
                "not verified (--no-data)"
            } else {
                "verified against checksums"
            }
        );
    }
    for w in &r.warnings {
        o += &format!("warning: {w}\n");
    }
    for e in &r.errors {
        o += &format!("error: {e}\n");
    }
    if r.ok() {
        o += "result: consistent\n";
    } else {
        let n = r.errors.len();
        o += &format!(
            "result: NOT consistent ({n} problem{})\n",
            if n == 1 { "" } else { "s" }
        );
    }
    o
}

fn report_json(a: &CheckArgs, r: &CheckReport) -> serde_json::Value {
    json!({
        "cache": a.cache.display().to_string(),
        "consistent": r.ok(),
        "errors": r.errors,
        "warnings": r.warnings,
        "superblock": r.superblock.as_ref().map(super::dump::superblock_json),
        "watermark": r.watermark,
        "written_epoch": r.written_epoch,
        "live": r.live,
        "dirty": r.dirty,
        "pending": r.pending,
        "retained": r.retained,
        "superseded": r.superseded,
        "data_verified": !a.no_data,
    })
}
