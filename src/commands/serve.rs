//! `pmcache serve`: open (or create) a cache and serve it over NBD until
//! SIGINT or SIGTERM.
//!
//! Order of work, so that a failing start changes nothing: resolve and check
//! every argument, lock and inspect the cache, open the origin, bind every
//! socket, and only then create or open the cache. Each step that changes
//! something returns a value whose drop undoes it (`steps.rs`), so an error
//! anywhere undoes what was done, in reverse order.

mod options;
mod signals;
mod steps;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use pmcache_engine::Engine;
use pmcache_nbd::server::{Server, ServerConfig};
use pmcache_origin::Origin;

use self::options::{Options, Plan};
use self::signals::Signals;
use self::steps::{Endpoint, OpenCache, OpenOrigin, Services, Sockets};
use crate::cli::ServeArgs;
use crate::export::EngineExport;
use crate::report::ServerInfo;

pub fn run(a: ServeArgs) -> Result<ExitCode> {
    let signals = Signals::install()?;
    let opts = Options::resolve(&a)?;
    let plan = Plan::inspect(&a, &opts)?;
    let mut origin = OpenOrigin::open(&a, &opts, &plan)?;
    let (sockets, listeners) = Sockets::bind(&a, &opts)?;
    let mut cache = OpenCache::open(&a, plan, &origin.origin, &opts.cache_path)?;
    let server = start_server(&a, &opts, &cache.engine, &*origin.origin)?;
    let info = server_info(&a, &opts, &*origin.origin, &sockets.endpoint, &server);
    let services = Services::spawn(listeners, &sockets.control_path, &cache.engine, &info)?;
    signals.arm(server.shutdown_handle(), cache.engine.clone());
    origin.keep();
    cache.keep();
    announce(&a, &opts, &info, &cache.engine, &sockets);
    let served = sockets.endpoint.serve(&server);
    shut_down(server, services, sockets, cache, served, &opts)
}

fn start_server(
    a: &ServeArgs,
    o: &Options,
    engine: &Arc<Engine>,
    origin: &dyn Origin,
) -> Result<Server> {
    let export = EngineExport {
        engine: engine.clone(),
        read_only: a.read_only,
    };
    let cfg = ServerConfig {
        export_name: a.export.clone(),
        read_only: a.read_only,
        description: Some(format!("pmcache of {}", origin.fingerprint())),
        tls: o.tls.clone(),
        ..ServerConfig::default()
    };
    Server::new(Arc::new(export), cfg).map_err(|e| anyhow!("cannot start the NBD server: {e}"))
}

/// What `stats` and the metrics report about this server.
fn server_info(
    a: &ServeArgs,
    o: &Options,
    origin: &dyn Origin,
    endpoint: &Endpoint,
    server: &Server,
) -> ServerInfo {
    let path = &o.cache_path;
    ServerInfo {
        cache: std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()),
        origin: origin.fingerprint(),
        origin_size: origin.size(),
        endpoint: endpoint.describe(),
        export: a.export.clone(),
        read_only: a.read_only,
        started: Instant::now(),
        tls: o.tls.clone(),
        connections: server.connection_registry(),
    }
}

/// Print the start-up log held back so far, then the line that says the
/// server is up (tests and scripts wait for "serving").
fn announce(a: &ServeArgs, o: &Options, info: &ServerInfo, engine: &Engine, s: &Sockets) {
    crate::cli::release_logs();
    tracing::info!(
        endpoint = %info.endpoint,
        export = %a.export,
        cache = %o.cache_path.display(),
        origin = %info.origin,
        origin_size = info.origin_size,
        mode = %engine.mode(),
        pmem = %engine.region().mode(),
        read_only = a.read_only,
        control = %s.control_path.display(),
        metrics = a.metrics.as_deref().unwrap_or("off"),
        tls = %a.tls,
        "serving"
    );
}

/// Every connection has drained (or serving failed): stop the services,
/// remove the socket files, and close the cache last, marking it clean.
fn shut_down(
    server: Server,
    services: Services,
    sockets: Sockets,
    cache: OpenCache,
    served: std::io::Result<()>,
    o: &Options,
) -> Result<ExitCode> {
    drop(server);
    services.stop();
    let endpoint = sockets.endpoint.describe();
    drop(sockets);
    let (dirty, closed) = cache.close();
    served.map_err(|e| anyhow!("NBD server on {endpoint} failed: {e}"))?;
    closed.map_err(|e| anyhow!("cannot close cache {} cleanly: {e}", o.cache_path.display()))?;
    tracing::info!(dirty, "cache closed cleanly; exiting");
    Ok(ExitCode::SUCCESS)
}
