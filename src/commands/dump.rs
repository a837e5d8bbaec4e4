//! `pmcache dump`: superblock, watermark, mappings and dirty state.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{anyhow, Result};
use pmcache_engine::check::{dump, Dump};
use pmcache_engine::format::{Superblock, VERSION};
use pmcache_engine::versions::Role;
use serde_json::{json, Value};

use crate::cache::{self, CacheLock};
use crate::cli::DumpArgs;
use crate::size::human;

pub fn run(a: DumpArgs) -> Result<ExitCode> {
    let lock = CacheLock::acquire(&a.cache, false)?;
    let region = cache::map_read_only(&lock)?;
    let d = dump(&region).map_err(|e| anyhow!("cache {}: {e}", a.cache.display()))?;
    if a.json {
        crate::cli::emit(&format!("{}\n", dump_json(&d)))?;
    } else {
        crate::cli::emit(&dump_text(&a, &d))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The superblock as JSON (shared with `check --json`).
pub fn superblock_json(sb: &Superblock) -> Value {
    json!({
        "format_version": VERSION,
        "generation": sb.generation,
        "uuid": format!("{:016x}", sb.uuid),
        "block_size": sb.layout.block_size,
        "slots": sb.layout.slot_count,
        "data_offset": sb.layout.data_offset,
        "region_len": sb.layout.region_len,
        "origin": sb.origin_fingerprint,
        "origin_size": sb.origin_size,
        "mode": sb.mode.to_string(),
        "clean_shutdown": sb.clean_shutdown,
    })
}

fn count_role(d: &Dump, role: Role) -> usize {
    d.mappings.iter().filter(|m| m.role == role).count()
}

fn dump_json(d: &Dump) -> Value {
    let l = d.superblock.layout;
    let bs = l.block_size as u64;
    let mappings: Vec<Value> = d
        .mappings
        .iter()
        .map(|m| {
            json!({
                "slot": m.slot,
                "block": m.block,
                "origin_offset": m.block * bs,
                "seq": m.seq,
                "epoch": m.epoch,
                "role": m.role.as_str(),
                "dirty": m.dirty,
                "zero": m.zero,
                "pending": m.pending,
                "meta_offset": l.meta_off(m.slot),
                "data_offset": l.data_off(m.slot),
            })
        })
        .collect();
    let dirty = d.mappings.iter().filter(|m| m.dirty).count();
    json!({
        "superblock": superblock_json(&d.superblock),
        "superblock_copy": d.superblock_copy,
        "watermark": d.watermark,
        "written_epoch": d.written_epoch,
        "mapped": d.mappings.len(),
        "dirty": dirty,
        "clean": d.mappings.len() - dirty,
        "retained": count_role(d, Role::Retained),
        "superseded": count_role(d, Role::Superseded),
        "mappings": mappings,
    })
}

fn dump_text(a: &DumpArgs, d: &Dump) -> String {
    let sb = &d.superblock;
    let l = sb.layout;
    let mut o = String::new();
    let _ = writeln!(o, "cache {}", a.cache.display());
    let _ = writeln!(
        o,
        "superblock (copy {} at offset {})",
        d.superblock_copy,
        d.superblock_copy * 4096
    );
    let _ = writeln!(o, "  format version {VERSION}");
    let _ = writeln!(o, "  generation     {}", sb.generation);
    let _ = writeln!(o, "  uuid           {:016x}", sb.uuid);
    let _ = writeln!(
        o,
        "  size           {} ({} bytes)",
        human(l.region_len),
        l.region_len
    );
    let _ = writeln!(o, "  block size     {} bytes", l.block_size);
    let _ = writeln!(o, "  slots          {}", l.slot_count);
    let _ = writeln!(o, "  data offset    {}", l.data_offset);
    let _ = writeln!(o, "  origin         {}", sb.origin_fingerprint);
    let _ = writeln!(
        o,
        "  origin size    {} ({} bytes)",
        human(sb.origin_size),
        sb.origin_size
    );
    let _ = writeln!(o, "  mode           {}", sb.mode);
    let _ = writeln!(
        o,
        "  clean shutdown {}",
        if sb.clean_shutdown { "yes" } else { "no" }
    );
    let _ = writeln!(o, "watermark        {}", d.watermark);
    let _ = writeln!(
        o,
        "written epoch    {} (every epoch up to it is on the origin)",
        d.written_epoch
    );
    let dirty = d.mappings.iter().filter(|m| m.dirty).count();
    let _ = writeln!(
        o,
        "mappings         {} ({} dirty, {} clean; {} retained, {} superseded)",
        d.mappings.len(),
        dirty,
        d.mappings.len() - dirty,
        count_role(d, Role::Retained),
        count_role(d, Role::Superseded)
    );
    if !d.mappings.is_empty() {
        let _ = writeln!(
            o,
            "{:>10} {:>12} {:>16} {:>12} {:>8}  {:<10}  state",
            "slot", "block", "origin offset", "seq", "epoch", "role"
        );
        for m in &d.mappings {
            let mut state = String::from(if m.dirty { "dirty" } else { "clean" });
            if m.zero {
                state += ",zero";
            }
            if m.pending {
                state += ",in-flight";
            }
            let _ = writeln!(
                o,
                "{:>10} {:>12} {:>16} {:>12} {:>8}  {:<10}  {state}",
                m.slot,
                m.block,
                m.block * l.block_size as u64,
                m.seq,
                m.epoch,
                m.role.as_str()
            );
        }
    }
    o
}
