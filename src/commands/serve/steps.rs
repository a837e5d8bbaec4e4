//! The steps of `serve` that change something, each a value whose drop
//! undoes it: a start that fails part way undoes what was done, in reverse
//! order, simply by returning.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use pmcache_engine::{Engine, EngineConfig};
use pmcache_nbd::server::Server;
use pmcache_origin::{FileOrigin, Origin};
use pmcache_pmem::{MappedRegion, PersistMode, PmemRegion};

use super::options::{Options, Plan};
use crate::cache::{self, CacheLock, Target};
use crate::cli::{ServeArgs, DEFAULT_ORIGIN, DEFAULT_ORIGIN_SIZE};
use crate::commands::stats::default_control;
use crate::control::{self, bind_unix, Background};
use crate::report::ServerInfo;
use crate::size::human;

/// The origin. A default origin file this start created is removed again
/// when this is dropped before [`keep`](Self::keep).
pub(super) struct OpenOrigin {
    pub origin: Arc<dyn Origin>,
    created: Option<PathBuf>,
}

impl OpenOrigin {
    pub(super) fn open(a: &ServeArgs, o: &Options, plan: &Plan) -> Result<OpenOrigin> {
        let (spec, create) = match (&a.origin, plan) {
            (Some(s), _) => (s.clone(), false),
            (None, Plan::Open { sb, .. }) => (cache::recorded_origin(sb), false),
            (None, Plan::Create { .. }) if o.defaults => (
                DEFAULT_ORIGIN.to_string(),
                !cache::exists(Path::new(DEFAULT_ORIGIN)),
            ),
            (None, Plan::Create { .. }) => anyhow::bail!(
                "--origin is required to create the new cache {}",
                o.cache_path.display()
            ),
        };
        if !create {
            let origin = cache::open_origin_with(&spec, a.origin_connections.into())?;
            return Ok(OpenOrigin {
                origin,
                created: None,
            });
        }
        let f = FileOrigin::create_sparse(DEFAULT_ORIGIN, DEFAULT_ORIGIN_SIZE)?;
        tracing::info!(
            origin = DEFAULT_ORIGIN,
            size = DEFAULT_ORIGIN_SIZE,
            "created sparse origin"
        );
        Ok(OpenOrigin {
            origin: Arc::new(f),
            created: Some(PathBuf::from(DEFAULT_ORIGIN)),
        })
    }

    /// The start succeeded: the origin file stays.
    pub(super) fn keep(&mut self) {
        self.created = None;
    }
}

impl Drop for OpenOrigin {
    fn drop(&mut self) {
        if let Some(p) = self.created.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Where clients connect.
pub(super) enum Endpoint {
    Tcp(TcpListener, String),
    Unix(UnixListener, PathBuf),
}

impl Endpoint {
    pub(super) fn describe(&self) -> String {
        match self {
            Endpoint::Tcp(_, a) => format!("nbd://{a}"),
            Endpoint::Unix(_, p) => format!("nbd+unix:///?socket={}", p.display()),
        }
    }

    /// Serve until shut down and every connection has drained.
    pub(super) fn serve(&self, server: &Server) -> std::io::Result<()> {
        match self {
            Endpoint::Tcp(l, _) => l.try_clone().and_then(|l| server.serve_tcp(l)),
            Endpoint::Unix(l, _) => l.try_clone().and_then(|l| server.serve_unix(l)),
        }
    }
}

/// Socket files this process bound; removed (last bound first) on drop.
#[derive(Default)]
struct SocketFiles(Vec<PathBuf>);

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Every listening socket, bound before the cache is touched so that a
/// taken address changes nothing. Dropping it removes the socket files.
pub(super) struct Sockets {
    pub endpoint: Endpoint,
    pub control_path: PathBuf,
    _files: SocketFiles,
}

/// The listeners [`Services`] take over.
pub(super) struct Listeners {
    control: UnixListener,
    metrics: Option<TcpListener>,
}

impl Sockets {
    pub(super) fn bind(a: &ServeArgs, o: &Options) -> Result<(Sockets, Listeners)> {
        let control_path = a
            .control
            .clone()
            .unwrap_or_else(|| default_control(&o.cache_path));
        if a.control.is_none() {
            create_parent(&control_path)?;
        }
        let mut files = SocketFiles::default();
        let endpoint = bind_endpoint(a, &o.listen, &mut files)?;
        let control = bind_unix(&control_path, "control socket")?;
        files.0.push(control_path.clone());
        let metrics = match &a.metrics {
            Some(m) => Some(
                TcpListener::bind(m)
                    .map_err(|e| anyhow!("cannot listen for metrics on {m}: {e}"))?,
            ),
            None => None,
        };
        let sockets = Sockets {
            endpoint,
            control_path,
            _files: files,
        };
        Ok((sockets, Listeners { control, metrics }))
    }
}

/// The default control socket's directory, made if it is missing.
fn create_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create directory {}", dir.display()))?;
        }
    }
    Ok(())
}

fn bind_endpoint(a: &ServeArgs, listen: &str, files: &mut SocketFiles) -> Result<Endpoint> {
    if let Some(p) = &a.socket {
        let l = bind_unix(p, "NBD socket")?;
        files.0.push(p.clone());
        return Ok(Endpoint::Unix(l, p.clone()));
    }
    let l = TcpListener::bind(listen).map_err(|e| {
        anyhow!("cannot listen on {listen}: {e} (choose another address with --listen HOST:PORT)")
    })?;
    Ok(Endpoint::Tcp(l, listen.to_string()))
}

/// The cache, mapped and recovered, and its lock. Dropped (on a failed
/// start, or after [`close`](Self::close)) it closes the engine cleanly
/// before the lock is released; a cache file this start created is removed
/// again unless [`keep`](Self::keep) was called.
pub(super) struct OpenCache {
    pub engine: Arc<Engine>,
    created: Option<PathBuf>,
    _lock: CacheLock,
}

impl OpenCache {
    pub(super) fn open(
        a: &ServeArgs,
        plan: Plan,
        origin: &Arc<dyn Origin>,
        path: &Path,
    ) -> Result<OpenCache> {
        let created = matches!(
            plan,
            Plan::Create {
                target: Target::New { .. },
                ..
            }
        );
        let (lock, region) = map_or_create(a, plan, &**origin, path)?;
        log_persist_mode(path, region.mode());
        let cfg = EngineConfig {
            mode: a.mode,
            max_request: cache::MAX_REQUEST,
            background_writeback: true,
            force_origin: a.force,
            sequential_cutoff: a.sequential_cutoff,
            writeback_order: a.writeback_order,
            ..EngineConfig::default()
        };
        let engine = Engine::open(region, origin.clone(), cfg)
            .map_err(|e| anyhow!("cannot open cache {}: {e}", path.display()))?;
        Ok(OpenCache {
            engine,
            created: created.then(|| path.to_path_buf()),
            _lock: lock,
        })
    }

    /// The start succeeded: a cache file it created stays.
    pub(super) fn keep(&mut self) {
        self.created = None;
    }

    /// Close the engine (marking the cache clean) and release the lock;
    /// returns the blocks still dirty and how the close went.
    pub(super) fn close(self) -> (u64, pmcache_engine::Result<()>) {
        // After the close, which stops writeback: the count it logged too.
        let closed = self.engine.close();
        (self.engine.dirty_blocks(), closed)
    }
}

impl Drop for OpenCache {
    fn drop(&mut self) {
        // A second close is a no-op.
        let _ = self.engine.close();
        if let Some(p) = self.created.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Map the existing cache, or create and format the planned one.
fn map_or_create(
    a: &ServeArgs,
    plan: Plan,
    origin: &dyn Origin,
    path: &Path,
) -> Result<(CacheLock, Arc<MappedRegion>)> {
    let (target, len) = match plan {
        Plan::Open { lock, .. } => return Ok((lock, cache::map_cache(path, a.assume_pmem, true)?)),
        Plan::Create { target, len } => (target, len),
    };
    let c = cache::create_cache(
        path,
        target,
        origin,
        a.new_block_size(),
        a.assume_pmem,
        true,
    )?;
    tracing::info!(
        cache = %path.display(),
        size = %human(len),
        block_size = a.new_block_size(),
        origin = %c.superblock.origin_fingerprint,
        "formatted new cache"
    );
    Ok((c.lock, c.region))
}

fn log_persist_mode(path: &Path, pmem: PersistMode) {
    tracing::info!(cache = %path.display(), pmem = %pmem, "persistence mode");
    if pmem == PersistMode::Msync {
        tracing::warn!(
            cache = %path.display(),
            "the cache is not mapped as pmem (no DAX): every commit waits for msync; pass --assume-pmem only if the file is on pmem (or on /dev/shm for testing)"
        );
    }
}

/// The control socket and metrics threads; dropping them stops them.
pub(super) struct Services {
    control: Background,
    metrics: Option<Background>,
}

impl Services {
    pub(super) fn spawn(
        l: Listeners,
        control_path: &Path,
        engine: &Arc<Engine>,
        info: &ServerInfo,
    ) -> Result<Services> {
        let control = control::spawn_control(
            l.control,
            control_path.to_path_buf(),
            engine.clone(),
            info.clone(),
        )?;
        let metrics = match l.metrics {
            Some(l) => Some(control::spawn_metrics(l, engine.clone(), info.clone())?),
            None => None,
        };
        Ok(Services { control, metrics })
    }

    /// Stop the control thread, then the metrics thread.
    pub(super) fn stop(self) {
        self.control.stop();
        if let Some(m) = self.metrics {
            m.stop();
        }
    }
}
