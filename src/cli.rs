//! The command line: argument definitions, and turning every failure into
//! one line on stderr and a non-zero exit.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use pmcache_engine::CacheMode;

use crate::commands;
use crate::size::{parse_block_size, parse_size, parse_size_or_zero};

/// Where `serve` keeps its files when run without arguments.
pub const DEFAULT_DIR: &str = "pmcache-data";
/// The default cache file (relative to the working directory).
pub const DEFAULT_CACHE: &str = "pmcache-data/cache.pmem";
/// The default origin file (relative to the working directory).
pub const DEFAULT_ORIGIN: &str = "pmcache-data/origin.img";
/// Size of the default cache when it is created.
pub const DEFAULT_CACHE_SIZE: u64 = 256 << 20;
/// Size of the default origin when it is created (sparse).
pub const DEFAULT_ORIGIN_SIZE: u64 = 1 << 30;

const MAIN_HELP: &str = "\
Examples:
  pmcache serve                     # ./pmcache-data/ (256 MiB cache, 1 GiB origin), 127.0.0.1:10809
  pmcache format --cache /dev/pmem0 --origin /dev/sdb
  pmcache serve --cache /dev/pmem0 --listen 0.0.0.0:10809
  pmcache stats --cache /dev/pmem0  # counters of the server running on that cache
  pmcache check --cache /dev/pmem0  # offline consistency check (exit 0 = consistent)
  pmcache flush --cache /dev/pmem0  # write all dirty data back to the origin

SIZE is a whole number of bytes with an optional suffix K, M, G, T or KiB, MiB, GiB, TiB (all
powers of 1024). Logging goes to stderr; set RUST_LOG (e.g. RUST_LOG=debug) to change its level.

Exit status: 0 on success, 1 on failure (and when `check` finds a problem), 2 on a bad argument.";

/// Crash-consistent block cache on persistent memory, served over NBD.
///
/// pmcache keeps a cache of a slow origin (a file, block device or NBD export) on persistent
/// memory (or a file standing in for it) and serves the cached volume over the NBD protocol.
#[derive(Debug, Parser)]
#[command(name = "pmcache", version, after_help = MAIN_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Serve(Box<ServeArgs>),
    Format(FormatArgs),
    Check(CheckArgs),
    Dump(DumpArgs),
    Stats(StatsArgs),
    Flush(FlushArgs),
}

fn parse_mode(s: &str) -> Result<CacheMode, String> {
    s.parse()
}

/// An origin whose URI is malformed is a bad argument (exit 2), found
/// before anything is opened; a path is taken as it is.
fn parse_origin(s: &str) -> Result<String, String> {
    if pmcache_origin::is_nbd_spec(s) {
        pmcache_nbd::NbdUri::parse(s).map_err(|e| e.to_string())?;
    }
    Ok(s.to_string())
}

/// HOST:PORT (HOST a name or an address, IPv6 best in brackets); the name
/// is resolved when the server binds.
fn parse_listen(s: &str) -> Result<String, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("'{s}' is not HOST:PORT"))?;
    port.parse::<u16>()
        .map_err(|_| format!("'{port}' is not a port number (0 to 65535)"))?;
    if host.is_empty() {
        return Err(format!("'{s}' is not HOST:PORT"));
    }
    Ok(s.to_string())
}

const SERVE_HELP: &str = "\
With no arguments, serve uses ./pmcache-data/: it creates a 256 MiB cache (cache.pmem) and a 1 GiB
sparse origin (origin.img) where they are missing, formats the new cache, and serves on
127.0.0.1:10809. A cache file outside /dev/shm or a DAX mount is not pmem, so it is persisted with
msync unless --assume-pmem; the persistence mode in use is logged at start-up and shown by `stats`.

SIGINT or SIGTERM shut down cleanly: no new connections, requests in flight finish, the cache is
marked clean. A second signal exits at once (the cache stays consistent, as after a crash).

Examples:
  pmcache serve
  pmcache serve --cache /dev/shm/cache.pmem --cache-size 2G --assume-pmem --origin /srv/disk.img
  pmcache serve --cache /dev/pmem0 --origin nbd://nas.example:10809/vol1 --mode writethrough
  pmcache serve --cache /dev/pmem0 --socket /run/pmcache/nbd.sock --metrics 127.0.0.1:9109

From another shell:
  nbdinfo nbd://127.0.0.1:10809
  qemu-io -f raw nbd://127.0.0.1:10809 -c 'write -P 0xab 0 64k'
  pmcache stats

TLS, with the credentials nbdkit and qemu-nbd use (README, \"TLS\", makes them with psktool,
certtool or openssl):
  psktool -u alice -p /etc/pmcache/keys.psk
  pmcache serve --tls require --tls-psk /etc/pmcache/keys.psk
  nbdinfo 'nbds://alice@127.0.0.1:10809/?tls-psk-file=/etc/pmcache/keys.psk'

  # /etc/pmcache/pki: ca-cert.pem, server-cert.pem, server-key.pem
  pmcache serve --tls require --tls-certificates /etc/pmcache/pki
  nbdinfo 'nbds://127.0.0.1:10809/?tls-certificates=/etc/pmcache/client-pki'";

/// Serve a cached origin over NBD.
#[derive(Debug, Args)]
#[command(after_help = SERVE_HELP)]
pub struct ServeArgs {
    /// Cache file or pmem device [default: ./pmcache-data/cache.pmem]
    #[arg(long, value_name = "PATH")]
    pub cache: Option<PathBuf>,

    /// Create and format the cache with this size if the file does not exist
    /// [default for the default cache: 256MiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub cache_size: Option<u64>,

    /// Origin: PATH, file:PATH, nbd://HOST[:PORT]/[EXPORT] or nbd+unix:///[EXPORT]?socket=PATH;
    /// with TLS nbds:// or nbds+unix:// and libnbd's tls-certificates=DIR, tls-psk-file=FILE
    /// (identity: nbds://NAME@...), tls-verify-peer=false, tls-hostname=NAME
    /// [default: the origin recorded in the cache; ./pmcache-data/origin.img (1 GiB, created
    /// if missing) for the default cache]
    #[arg(long, value_name = "PATH|URI", value_parser = parse_origin)]
    pub origin: Option<String>,

    /// Connections to an NBD origin that advertises multi-conn (a server answers only so
    /// many requests of one connection at a time: nbdkit 16); without multi-conn, one
    #[arg(long, value_name = "N", default_value = "4", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub origin_connections: u16,

    /// Cache mode: writeback, writethrough, writearound or passthrough
    /// [default: the mode the cache last ran in; writeback for a new cache]
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub mode: Option<CacheMode>,

    /// Serve NBD on this TCP address [default: 127.0.0.1:10809]
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "socket", value_parser = parse_listen)]
    pub listen: Option<String>,

    /// Serve NBD on this Unix socket instead of TCP
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// NBD export name (clients may also ask for the default export "")
    #[arg(long, value_name = "NAME", default_value = "pmcache")]
    pub export: String,

    /// Refuse client writes
    #[arg(long)]
    pub read_only: bool,

    /// Treat the cache mapping as persistent memory even where the kernel cannot
    /// map it with MAP_SYNC (DAX): persist with CPU cache flushes instead of msync.
    /// Only safe on pmem (or for tests, on /dev/shm)
    #[arg(long)]
    pub assume_pmem: bool,

    /// Cache block size when a new cache is created (power of two, 512 to 64K)
    /// [default: 4096]
    #[arg(long, value_name = "BYTES", value_parser = parse_block_size)]
    pub block_size: Option<u32>,

    /// Attach the cache to an origin other than the one it was formatted for,
    /// and overwrite a --cache file that is not a pmcache cache
    #[arg(long)]
    pub force: bool,

    /// Control socket for `pmcache stats` [default: <cache path>.sock]
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Serve Prometheus metrics at http://HOST:PORT/metrics
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,

    /// A sequential stream of reads or writes that has moved this much goes
    /// around the cache from then on (as bcache's sequential_cutoff): its
    /// misses are not cached and its writes go to the origin. A write stream
    /// counts from its last FLUSH or FUA write, so a journal or log flushed
    /// more often than this stays cached. 0 turns it off
    #[arg(long, value_name = "SIZE", value_parser = parse_size_or_zero, default_value = "4MiB")]
    pub sequential_cutoff: u64,

    /// Writeback order, ordered or none. ordered: dirty data goes to the origin epoch by
    /// epoch (an epoch is the writes between two client FLUSHes), each sealed by an origin
    /// flush, so the origin always holds a state a disk could have shown after a power cut:
    /// losing the cache loses recent writes, never the consistency of the file system on
    /// the origin. none: any order, as dm-writecache, bcache and Open CAS; less to write
    /// back when clients overwrite blocks between FLUSHes, but until writeback has finished
    /// the origin mixes old and new blocks, and a file system on it may be corrupt if the
    /// cache is lost
    #[arg(long, value_name = "ORDER", default_value = "ordered")]
    pub writeback_order: pmcache_engine::WritebackOrder,

    /// TLS (NBD_OPT_STARTTLS), as nbdkit: off; on (clients choose); require (every
    /// option but STARTTLS is refused before TLS). on and require need --tls-certificates
    /// or --tls-psk
    #[arg(long, value_name = "MODE", default_value = "off")]
    pub tls: pmcache_nbd::TlsMode,

    /// X.509 credentials directory: server-cert.pem, server-key.pem, and ca-cert.pem
    /// (for --tls-verify-peer)
    #[arg(long, value_name = "DIR", conflicts_with = "tls_psk")]
    pub tls_certificates: Option<PathBuf>,

    /// Pre-shared keys in psktool's format (IDENTITY:HEXKEY per line)
    #[arg(long, value_name = "FILE")]
    pub tls_psk: Option<PathBuf>,

    /// Require a client certificate signed by the CA in --tls-certificates
    #[arg(long, requires = "tls_certificates")]
    pub tls_verify_peer: bool,

    /// Let in only this PSK identity, or (with --tls-verify-peer) client certificates
    /// with this subject common name. Repeat for more
    #[arg(long, value_name = "NAME")]
    pub tls_allow: Vec<String>,
}

impl ServeArgs {
    /// The block size of a cache `serve` creates.
    pub fn new_block_size(&self) -> u32 {
        self.block_size.unwrap_or(4096)
    }
}

const FORMAT_HELP: &str = "\
The cache records the origin's identity (its canonical path or URI, and its size); `serve` and
`flush` refuse to attach it to another origin unless --force.

format refuses to overwrite an existing pmcache cache (its dirty data would be lost) or a file
that holds any data, unless --force. A block device keeps its size (omit --size or give its
size).

Examples:
  pmcache format --cache /dev/shm/cache.pmem --size 1G --origin /srv/disk.img --assume-pmem
  pmcache format --cache /dev/pmem0 --origin nbd://nas.example/vol1 --block-size 64K
  pmcache format --cache cache.pmem --size 256MiB --origin file:disk.img --force";

/// Create a cache for an origin.
#[derive(Debug, Args)]
#[command(after_help = FORMAT_HELP)]
pub struct FormatArgs {
    /// Cache file to create (or pmem device to use)
    #[arg(long, value_name = "PATH")]
    pub cache: PathBuf,

    /// Cache size (required unless --cache is a block device)
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Origin: PATH, file:PATH, nbd://HOST[:PORT]/[EXPORT] or nbd+unix:///[EXPORT]?socket=PATH;
    /// with TLS nbds:// or nbds+unix:// and libnbd's tls-certificates=DIR, tls-psk-file=FILE
    /// (identity: nbds://NAME@...), tls-verify-peer=false, tls-hostname=NAME
    #[arg(long, value_name = "PATH|URI", value_parser = parse_origin)]
    pub origin: String,

    /// Cache block size (power of two, 512 to 64K)
    #[arg(long, value_name = "BYTES", value_parser = parse_block_size, default_value = "4096")]
    pub block_size: u32,

    /// Overwrite an existing cache or a file that holds data
    #[arg(long)]
    pub force: bool,

    /// Persist with CPU cache flushes even without DAX (see `serve --help`)
    #[arg(long)]
    pub assume_pmem: bool,
}

const CHECK_HELP: &str = "\
check reads the cache and never writes it. It verifies both superblock copies, the watermark and
the written-back epoch W, every slot's checksummed metadata, that no block is mapped twice or
beyond the origin, that a block's dirty versions are in epoch order, and (unless --no-data) every
cached block's data against its checksum. It counts older versions kept for ordered writeback
(retained) apart from those the next open frees (superseded). It cannot run while a server has
the cache open (stop the server, or use `pmcache stats`).

Exit status: 0 when the cache is consistent, 1 when it is not (the report says what and where)
or cannot be read.

Examples:
  pmcache check --cache /dev/pmem0
  pmcache check --cache cache.pmem --origin /srv/disk.img --no-data";

/// Check a cache offline (read-only).
#[derive(Debug, Args)]
#[command(after_help = CHECK_HELP)]
pub struct CheckArgs {
    /// Cache file or pmem device
    #[arg(long, value_name = "PATH")]
    pub cache: PathBuf,

    /// Also check that the cache belongs to this origin
    #[arg(long, value_name = "PATH|URI", value_parser = parse_origin)]
    pub origin: Option<String>,

    /// Skip verifying cached data against its checksums (faster)
    #[arg(long)]
    pub no_data: bool,

    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

const DUMP_HELP: &str = "\
Prints the superblock, the durable watermark, the written-back epoch W and every live mapping
(slot → origin block, with its sequence number, epoch, role and dirty state). The role is what
the next open makes of it: current (what reads return), retained (an older dirty version ordered
writeback still owes the origin) or superseded (freed). Reads the cache and never writes it.

Examples:
  pmcache dump --cache cache.pmem
  pmcache dump --cache cache.pmem --json | jq '.mappings[] | select(.dirty)'";

/// Show a cache's metadata: superblock, watermark, mappings and dirty state.
#[derive(Debug, Args)]
#[command(after_help = DUMP_HELP)]
pub struct DumpArgs {
    /// Cache file or pmem device
    #[arg(long, value_name = "PATH")]
    pub cache: PathBuf,

    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

const STATS_HELP: &str = "\
When a server has the cache open, stats asks it over its control socket (<cache>.sock, or
--control) and shows occupancy, dirty and clean blocks, read and write hits and misses, promotions
and evictions, writeback progress and order (the current epoch, the newest on the origin, sealed
epochs still owed and the oldest one's age, retained versions), origin errors, and the cache and
pmem modes. When no server runs, it reads occupancy, dirty state, retained versions and the
written-back epoch from the cache file (counters exist only in a server).

Examples:
  pmcache stats                                   # the default cache ./pmcache-data/cache.pmem
  pmcache stats --cache /dev/pmem0 --json
  pmcache stats --control /run/pmcache/control.sock";

/// Show cache statistics (of a running server, or of a cache file offline).
#[derive(Debug, Args)]
#[command(after_help = STATS_HELP)]
pub struct StatsArgs {
    /// Cache file [default: ./pmcache-data/cache.pmem]
    #[arg(long, value_name = "PATH", conflicts_with = "control")]
    pub cache: Option<PathBuf>,

    /// Control socket of a running server
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

const FLUSH_HELP: &str = "\
flush opens the cache (recovering it if it was not shut down cleanly), writes every dirty block to
the origin, makes the origin durable, and closes the cache cleanly. Afterwards the origin holds all
acknowledged data and the cache has no dirty blocks. Origin errors are retried with backoff.
Interrupting flush is safe: what was written back stays clean, the rest stays dirty.

Examples:
  pmcache flush --cache /dev/pmem0 --origin /dev/sdb
  pmcache flush --cache cache.pmem                 # the origin recorded in the cache";

/// Write all dirty data back to the origin (with progress) and close the cache cleanly.
#[derive(Debug, Args)]
#[command(after_help = FLUSH_HELP)]
pub struct FlushArgs {
    /// Cache file or pmem device
    #[arg(long, value_name = "PATH")]
    pub cache: PathBuf,

    /// Origin [default: the origin recorded in the cache]
    #[arg(long, value_name = "PATH|URI", value_parser = parse_origin)]
    pub origin: Option<String>,

    /// Flush to an origin other than the one the cache was formatted for
    #[arg(long)]
    pub force: bool,

    /// Consecutive origin failures to retry before giving up
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub retries: u32,

    /// Persist with CPU cache flushes even without DAX (see `serve --help`)
    #[arg(long)]
    pub assume_pmem: bool,
}

/// Parse the arguments, run the command and map the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return clap_error(e),
    };
    let serve = matches!(cli.command, Command::Serve(_));
    init_logging(if serve { "info" } else { "warn" }, serve);
    let result = match cli.command {
        Command::Serve(a) => commands::serve::run(*a),
        Command::Format(a) => commands::format::run(a),
        Command::Check(a) => commands::check::run(a),
        Command::Dump(a) => commands::dump::run(a),
        Command::Stats(a) => commands::stats::run(a),
        Command::Flush(a) => commands::flush::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            error_line(&format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Write command output to stdout. A closed pipe (`pmcache dump | head`) is
/// not an error: the reader has what it wanted.
pub fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::anyhow!("cannot write output: {e}"))
        }
        _ => Ok(()),
    }
}

/// One line on stderr, never panicking if stderr is gone.
pub fn error_line(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "pmcache: error: {msg}");
}

/// clap's message on one line: its first line, and when that ends in a
/// colon, the indented list under it ("required arguments were not
/// provided: --cache <PATH>, --origin <PATH|URI>").
fn one_line(rendered: &str) -> String {
    let mut lines = rendered.lines().skip_while(|l| l.trim().is_empty());
    let first = lines.next().unwrap_or("invalid arguments").trim();
    let first = first.trim_start_matches("error: ");
    if !first.ends_with(':') {
        return first.to_string();
    }
    let list: Vec<&str> = lines
        .take_while(|l| l.starts_with(' ') && !l.trim().is_empty())
        .map(str::trim)
        .collect();
    format!("{first} {}", list.join(", "))
}

fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            let rendered = e.render().to_string();
            error_line(&format!("{} (see --help)", one_line(&rendered)));
            ExitCode::from(2)
        }
    }
}

/// Log lines held back while `serve` starts (None once released).
static HELD_LOGS: std::sync::Mutex<Option<Vec<u8>>> = std::sync::Mutex::new(None);

/// Where log lines go: stderr, or the held-back buffer while a server starts.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut held) = HELD_LOGS.lock() {
            if let Some(b) = held.as_mut() {
                b.extend_from_slice(buf);
                return Ok(buf.len());
            }
        }
        std::io::stderr().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Print the log lines held back during start-up and log directly from now
/// on. `serve` calls it once it is up; a start that fails prints only its
/// one error line (run with RUST_LOG=info to see everything as it happens).
pub fn release_logs() {
    use std::io::Write;
    if let Ok(mut held) = HELD_LOGS.lock() {
        if let Some(b) = held.take() {
            let _ = std::io::stderr().write_all(&b);
        }
    }
}

fn init_logging(default_level: &str, hold: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => {
            EnvFilter::try_new(v).unwrap_or_else(|_| EnvFilter::new(default_level))
        }
        _ => {
            if hold {
                if let Ok(mut held) = HELD_LOGS.lock() {
                    *held = Some(Vec::new());
                }
            }
            EnvFilter::new(default_level)
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
