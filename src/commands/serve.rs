//! `pmcache serve`: open (or create) a cache and serve it over NBD until
//! SIGINT or SIGTERM.
//!
//! Order of work, so that a failing start changes nothing: resolve and check
//! every argument, lock and inspect the cache, open the origin, bind every
//! socket, and only then create or open the cache.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use pmcache_engine::format::Superblock;
use pmcache_engine::{Engine, EngineConfig};

use crate::export::EngineExport;
use pmcache_nbd::server::{Server, ServerConfig, ShutdownHandle, DEFAULT_TCP_ADDR};
use pmcache_nbd::tls::{TlsCredentials, TlsMode, TlsServer, TlsServerConfig};
use pmcache_origin::FileOrigin;
use pmcache_pmem::{PersistMode, PmemRegion};
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::cache::{self, CacheLock, Contents, Target};
use crate::cli::{
    ServeArgs, DEFAULT_CACHE, DEFAULT_CACHE_SIZE, DEFAULT_DIR, DEFAULT_ORIGIN, DEFAULT_ORIGIN_SIZE,
};
use crate::commands::stats::default_control;
use crate::control::{self, bind_unix};
use crate::report::ServerInfo;
use crate::size::human;

/// Where clients connect.
enum Endpoint {
    Tcp(TcpListener, String),
    Unix(UnixListener, PathBuf),
}

impl Endpoint {
    fn describe(&self) -> String {
        match self {
            Endpoint::Tcp(_, a) => format!("nbd://{a}"),
            Endpoint::Unix(_, p) => format!("nbd+unix:///?socket={}", p.display()),
        }
    }
}

/// What to do with the cache file.
enum Plan {
    Open {
        lock: CacheLock,
        sb: Box<Superblock>,
    },
    Create {
        target: Target,
        len: u64,
    },
}

/// What the first signal does: stop the server, and stop writes waiting
/// for space (an origin that is down may never free any).
type Stop = Arc<dyn Fn() + Send + Sync>;

/// SIGINT/SIGTERM: the first asks the server to stop, a second exits at once.
struct Signals {
    requested: Arc<AtomicBool>,
    handle: Arc<Mutex<Option<Stop>>>,
}

impl Signals {
    fn install() -> Result<Signals> {
        let requested = Arc::new(AtomicBool::new(false));
        let handle: Arc<Mutex<Option<Stop>>> = Arc::new(Mutex::new(None));
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .context("cannot install signal handlers")?;
        let (r, h) = (requested.clone(), handle.clone());
        std::thread::Builder::new()
            .name("pmcache-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                    if r.swap(true, Ordering::SeqCst) {
                        tracing::warn!(
                            signal = name,
                            "second signal: exiting now (the cache stays consistent and recovers at the next start)"
                        );
                        std::process::exit(130);
                    }
                    tracing::info!(
                        signal = name,
                        "shutting down: no new connections, finishing requests in flight"
                    );
                    if let Some(stop) = h.lock().ok().and_then(|g| g.clone()) {
                        stop();
                    }
                }
            })
            .context("cannot start the signal thread")?;
        Ok(Signals { requested, handle })
    }

    /// Hand over what stops the server (run at once if a signal came first).
    fn arm(&self, h: ShutdownHandle, engine: Arc<Engine>) {
        let stop: Stop = Arc::new(move || {
            h.shutdown();
            engine.stop_waiting();
        });
        if let Ok(mut g) = self.handle.lock() {
            *g = Some(stop.clone());
        }
        if self.requested.load(Ordering::SeqCst) {
            stop();
        }
    }
}

pub fn run(a: ServeArgs) -> Result<ExitCode> {
    let signals = Signals::install()?;
    let defaults = a.cache.is_none();
    let cache_path = a
        .cache
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE));
    let create_len = a.cache_size.or(if defaults {
        Some(DEFAULT_CACHE_SIZE)
    } else {
        None
    });

    // Validate the addresses before anything touches the disk.
    let listen = a
        .listen
        .clone()
        .unwrap_or_else(|| DEFAULT_TCP_ADDR.to_string());
    if a.socket.is_none() {
        check_addr(&listen, "--listen")?;
    }
    if let Some(m) = &a.metrics {
        check_addr(m, "--metrics")?;
    }
    let tls = tls_server(&a)?;
    if defaults {
        std::fs::create_dir_all(DEFAULT_DIR)
            .with_context(|| format!("cannot create directory {DEFAULT_DIR}"))?;
    }

    // The cache: lock and inspect it, or plan to create it.
    let plan = if cache::exists(&cache_path) {
        let lock = CacheLock::acquire(&cache_path, true)?;
        match cache::classify(&lock)? {
            Contents::Cache(sb) => {
                if let Some(size) = a.cache_size.filter(|s| *s != sb.layout.region_len) {
                    tracing::warn!(
                        cache = %cache_path.display(),
                        size = sb.layout.region_len,
                        requested = size,
                        "the cache exists: --cache-size is ignored (use `pmcache format --force` to resize it)"
                    );
                }
                Plan::Open { lock, sb }
            }
            Contents::Damaged(why) => bail!(
                "cache {}: {why}; run `pmcache check --cache {}` for a report, or `pmcache format --force` to start over",
                cache_path.display(),
                cache_path.display()
            ),
            Contents::Blank { len } => {
                let len = match (create_len, len) {
                    (Some(l), _) => l,
                    (None, l) if l > 0 => l,
                    (None, _) => bail!(
                        "cache {} is empty; give --cache-size SIZE to create a cache in it",
                        cache_path.display()
                    ),
                };
                Plan::Create {
                    target: Target::Existing { lock, len },
                    len,
                }
            }
            Contents::Foreign { len } => {
                if !a.force {
                    bail!(
                        "{} exists and is not a pmcache cache; create one with `pmcache format`, or use --force to overwrite the file",
                        cache_path.display()
                    );
                }
                let len = create_len.unwrap_or(len);
                Plan::Create {
                    target: Target::Existing { lock, len },
                    len,
                }
            }
        }
    } else {
        let Some(len) = create_len else {
            bail!(
                "cache {}: no such file; give --cache-size SIZE to create it (or create it with `pmcache format`)",
                cache_path.display()
            );
        };
        Plan::Create {
            target: Target::New { len },
            len,
        }
    };
    if let Plan::Create { len, .. } = &plan {
        cache::plan_layout(&cache_path, *len, a.block_size)?;
    }

    // The origin.
    let (spec, create_origin) = match (&a.origin, &plan) {
        (Some(s), _) => (s.clone(), false),
        (None, Plan::Open { sb, .. }) => (cache::recorded_origin(sb), false),
        (None, Plan::Create { .. }) if defaults => (
            DEFAULT_ORIGIN.to_string(),
            !cache::exists(Path::new(DEFAULT_ORIGIN)),
        ),
        (None, Plan::Create { .. }) => bail!(
            "--origin is required to create the new cache {}",
            cache_path.display()
        ),
    };
    let mut created_origin = false;
    let origin = if create_origin {
        let o = FileOrigin::create_sparse(DEFAULT_ORIGIN, DEFAULT_ORIGIN_SIZE)?;
        created_origin = true;
        tracing::info!(
            origin = DEFAULT_ORIGIN,
            size = DEFAULT_ORIGIN_SIZE,
            "created sparse origin"
        );
        Arc::new(o) as Arc<dyn pmcache_origin::Origin>
    } else {
        cache::open_origin(&spec)?
    };
    let undo_origin = || {
        if created_origin {
            let _ = std::fs::remove_file(DEFAULT_ORIGIN);
        }
    };

    // Sockets.
    let bound = (|| -> Result<_> {
        let control_path = a
            .control
            .clone()
            .unwrap_or_else(|| default_control(&cache_path));
        if let Some(dir) = control_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if a.control.is_none() && !dir.exists() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create directory {}", dir.display()))?;
            }
        }
        let endpoint = match &a.socket {
            Some(p) => Endpoint::Unix(bind_unix(p, "NBD socket")?, p.clone()),
            None => Endpoint::Tcp(
                TcpListener::bind(&listen).map_err(|e| {
                    anyhow!("cannot listen on {listen}: {e} (choose another address with --listen HOST:PORT)")
                })?,
                listen.clone(),
            ),
        };
        let control = bind_unix(&control_path, "control socket").inspect_err(|_| {
            if let Endpoint::Unix(_, p) = &endpoint {
                let _ = std::fs::remove_file(p);
            }
        })?;
        let metrics = match &a.metrics {
            Some(m) => Some(TcpListener::bind(m).map_err(|e| {
                let _ = std::fs::remove_file(&control_path);
                if let Endpoint::Unix(_, p) = &endpoint {
                    let _ = std::fs::remove_file(p);
                }
                anyhow!("cannot listen for metrics on {m}: {e}")
            })?),
            None => None,
        };
        Ok((endpoint, control, control_path, metrics))
    })();
    let (endpoint, control_listener, control_path, metrics_listener) = match bound {
        Ok(b) => b,
        Err(e) => {
            undo_origin();
            return Err(e);
        }
    };
    let cleanup_sockets = |endpoint: &Endpoint| {
        let _ = std::fs::remove_file(&control_path);
        if let Endpoint::Unix(_, p) = endpoint {
            let _ = std::fs::remove_file(p);
        }
    };

    // Create or map the cache, then recover it.
    let opened = (|| -> Result<_> {
        let (lock, region) = match plan {
            Plan::Open { lock, .. } => (lock, cache::map_cache(&cache_path, a.assume_pmem, true)?),
            Plan::Create { target, len } => {
                let c = cache::create_cache(
                    &cache_path,
                    target,
                    &*origin,
                    a.block_size,
                    a.assume_pmem,
                    true,
                )?;
                tracing::info!(
                    cache = %cache_path.display(),
                    size = %human(len),
                    block_size = a.block_size,
                    origin = %c.superblock.origin_fingerprint,
                    "formatted new cache"
                );
                (c.lock, c.region)
            }
        };
        let pmem = region.mode();
        tracing::info!(cache = %cache_path.display(), pmem = %pmem, "persistence mode");
        if pmem == PersistMode::Msync {
            tracing::warn!(
                cache = %cache_path.display(),
                "the cache is not mapped as pmem (no DAX): every commit waits for msync; pass --assume-pmem only if the file is on pmem (or on /dev/shm for testing)"
            );
        }
        let cfg = EngineConfig {
            mode: a.mode,
            max_request: cache::MAX_REQUEST,
            background_writeback: true,
            force_origin: a.force,
            sequential_cutoff: a.sequential_cutoff,
            ..EngineConfig::default()
        };
        let engine = Engine::open(region, origin.clone(), cfg)
            .map_err(|e| anyhow!("cannot open cache {}: {e}", cache_path.display()))?;
        Ok((lock, engine))
    })();
    let (lock, engine) = match opened {
        Ok(x) => x,
        Err(e) => {
            cleanup_sockets(&endpoint);
            undo_origin();
            return Err(e);
        }
    };

    let export = EngineExport {
        engine: engine.clone(),
        read_only: a.read_only,
    };
    let server_cfg = ServerConfig {
        export_name: a.export.clone(),
        read_only: a.read_only,
        description: Some(format!("pmcache of {}", origin.fingerprint())),
        tls: tls.clone(),
        ..ServerConfig::default()
    };
    let server = match Server::new(Arc::new(export), server_cfg) {
        Ok(s) => s,
        Err(e) => {
            let _ = engine.close();
            cleanup_sockets(&endpoint);
            bail!("cannot start the NBD server: {e}");
        }
    };
    let info = ServerInfo {
        cache: std::fs::canonicalize(&cache_path).unwrap_or_else(|_| cache_path.clone()),
        origin: origin.fingerprint(),
        origin_size: origin.size(),
        endpoint: endpoint.describe(),
        export: a.export.clone(),
        read_only: a.read_only,
        started: Instant::now(),
        tls: tls.clone(),
        connections: server.connection_registry(),
    };
    let control = control::spawn_control(
        control_listener,
        control_path.clone(),
        engine.clone(),
        info.clone(),
    )?;
    let metrics = match metrics_listener {
        Some(l) => Some(control::spawn_metrics(l, engine.clone(), info.clone())?),
        None => None,
    };
    signals.arm(server.shutdown_handle(), engine.clone());
    crate::cli::release_logs();
    tracing::info!(
        endpoint = %info.endpoint,
        export = %a.export,
        cache = %cache_path.display(),
        origin = %info.origin,
        origin_size = info.origin_size,
        mode = %engine.mode(),
        pmem = %engine.region().mode(),
        read_only = a.read_only,
        control = %control_path.display(),
        metrics = a.metrics.as_deref().unwrap_or("off"),
        tls = %a.tls,
        "serving"
    );

    let served = match &endpoint {
        Endpoint::Tcp(l, _) => l.try_clone().and_then(|l| server.serve_tcp(l)),
        Endpoint::Unix(l, _) => l.try_clone().and_then(|l| server.serve_unix(l)),
    };
    // Every connection has drained (or serving failed): close the cache.
    drop(server);
    control.stop();
    if let Some(m) = metrics {
        m.stop();
    }
    cleanup_sockets(&endpoint);
    let dirty = engine.dirty_blocks();
    let closed = engine.close();
    drop(engine);
    drop(lock);
    served.map_err(|e| anyhow!("NBD server on {} failed: {e}", info.endpoint))?;
    closed.map_err(|e| anyhow!("cannot close cache {} cleanly: {e}", cache_path.display()))?;
    tracing::info!(dirty, "cache closed cleanly; exiting");
    Ok(ExitCode::SUCCESS)
}

/// The TLS settings, with their credentials loaded (so that a missing or bad
/// file is refused before anything is changed).
fn tls_server(a: &ServeArgs) -> Result<Option<Arc<TlsServer>>> {
    let credentials = match (&a.tls_certificates, &a.tls_psk) {
        (Some(dir), None) => Some(TlsCredentials::X509 {
            dir: dir.clone(),
            verify_peer: a.tls_verify_peer,
        }),
        (None, Some(file)) => Some(TlsCredentials::Psk { file: file.clone() }),
        (None, None) => None,
        (Some(_), Some(_)) => bail!("--tls-certificates and --tls-psk exclude each other"),
    };
    let Some(credentials) = credentials else {
        if a.tls != TlsMode::Off {
            bail!(
                "--tls {} needs --tls-certificates DIR or --tls-psk FILE",
                a.tls
            );
        }
        if !a.tls_allow.is_empty() {
            bail!("--tls-allow needs --tls-psk or --tls-certificates with --tls-verify-peer");
        }
        return Ok(None);
    };
    if a.tls == TlsMode::Off {
        bail!("TLS credentials are given but --tls is off: add --tls on or --tls require");
    }
    let cfg = TlsServerConfig {
        mode: a.tls,
        credentials,
        allow: a.tls_allow.clone(),
    };
    let server = TlsServer::new(&cfg).map_err(|e| anyhow!("TLS: {e}"))?;
    Ok(Some(Arc::new(server)))
}

/// Refuse an address that cannot be bound before anything is changed.
fn check_addr(addr: &str, what: &str) -> Result<()> {
    use std::net::ToSocketAddrs;
    match addr.to_socket_addrs() {
        Ok(mut it) => {
            if it.next().is_some() {
                return Ok(());
            }
            bail!("{what} {addr}: the name resolves to no address")
        }
        Err(e) => bail!("{what} '{addr}' is not a HOST:PORT address ({e})"),
    }
}
