//! An NBD server over a RAM disk, for tests and experiments.
//!
//! ```text
//! nbd-mem-server (--socket PATH | --listen ADDR)... [--size SIZE] [--export NAME]
//!                [--read-only] [--min-block BYTES] [--max-request BYTES]
//!                [--description TEXT]
//! ```
//! SIZE accepts K, M, G suffixes (powers of 1024). It serves until killed.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

use std::process::ExitCode;
use std::sync::Arc;

use pmcache_nbd::{BlockSizes, MemExport, Server, ServerConfig};

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => {
            let m = match t[i..].to_ascii_uppercase().as_str() {
                "K" | "KIB" => 1u64 << 10,
                "M" | "MIB" => 1 << 20,
                "G" | "GIB" => 1 << 30,
                other => return Err(format!("bad size suffix {other:?} in {s:?}")),
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?}"))
}

struct Args {
    sockets: Vec<String>,
    listens: Vec<String>,
    size: u64,
    export: String,
    read_only: bool,
    min_block: u32,
    max_request: u32,
    description: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        sockets: Vec::new(),
        listens: Vec::new(),
        size: 64 << 20,
        export: String::new(),
        read_only: false,
        min_block: 1,
        max_request: 32 << 20,
        description: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--socket" => a.sockets.push(val()?),
            "--listen" => a.listens.push(val()?),
            "--size" => a.size = parse_size(&val()?)?,
            "--export" => a.export = val()?,
            "--description" => a.description = Some(val()?),
            "--read-only" => a.read_only = true,
            "--min-block" => {
                a.min_block = u32::try_from(parse_size(&val()?)?).map_err(|e| e.to_string())?
            }
            "--max-request" => {
                a.max_request = u32::try_from(parse_size(&val()?)?).map_err(|e| e.to_string())?
            }
            "-h" | "--help" => {
                return Err("usage: nbd-mem-server (--socket PATH | --listen ADDR)... [--size SIZE] [--export NAME] [--read-only] [--min-block BYTES] [--max-request BYTES] [--description TEXT]".into())
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.sockets.is_empty() && a.listens.is_empty() {
        return Err("give --socket PATH or --listen ADDR".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nbd-mem-server: {e}");
            return ExitCode::from(2);
        }
    };
    let size = match usize::try_from(args.size) {
        Ok(s) => s,
        Err(_) => {
            eprintln!("nbd-mem-server: size too large");
            return ExitCode::from(2);
        }
    };
    let export = MemExport::new(size)
        .with_read_only(args.read_only)
        .with_block_sizes(BlockSizes {
            minimum: args.min_block,
            preferred: args.min_block.max(4096),
            maximum: args.max_request,
        });
    let config = ServerConfig {
        export_name: args.export,
        description: args.description,
        ..ServerConfig::default()
    };
    let server = match Server::new(Arc::new(export), config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nbd-mem-server: {e}");
            return ExitCode::from(2);
        }
    };
    let mut threads = Vec::new();
    for path in args.sockets {
        let s = server.clone();
        threads.push(std::thread::spawn(move || {
            s.listen_unix(&path).map_err(|e| format!("{path}: {e}"))
        }));
    }
    for addr in args.listens {
        let s = server.clone();
        threads.push(std::thread::spawn(move || {
            s.listen_tcp(addr.as_str())
                .map_err(|e| format!("{addr}: {e}"))
        }));
    }
    let mut code = ExitCode::SUCCESS;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("nbd-mem-server: {e}");
                code = ExitCode::FAILURE;
            }
            Err(_) => code = ExitCode::FAILURE,
        }
    }
    code
}
