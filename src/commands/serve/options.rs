//! The first steps of `serve`, which change nothing but the default
//! directory: resolve and check the arguments, then lock and inspect the
//! cache (or plan to create it).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use pmcache_engine::format::Superblock;
use pmcache_nbd::server::DEFAULT_TCP_ADDR;
use pmcache_nbd::tls::{TlsCredentials, TlsMode, TlsServer, TlsServerConfig};

use crate::cache::{self, CacheLock, Contents, Target};
use crate::cli::{ServeArgs, DEFAULT_CACHE, DEFAULT_CACHE_SIZE, DEFAULT_DIR};

/// The arguments, resolved and checked before anything touches the disk.
pub(super) struct Options {
    pub cache_path: PathBuf,
    /// No `--cache`: work in `./pmcache-data/` with the default files.
    pub defaults: bool,
    /// The size of a cache this start would create, if it is known.
    pub create_len: Option<u64>,
    pub listen: String,
    pub tls: Option<Arc<TlsServer>>,
}

impl Options {
    pub(super) fn resolve(a: &ServeArgs) -> Result<Options> {
        let defaults = a.cache.is_none();
        let cache_path = a
            .cache
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE));
        let create_len = a.cache_size.or(defaults.then_some(DEFAULT_CACHE_SIZE));
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
        let tls = tls_server(a)?;
        if defaults {
            std::fs::create_dir_all(DEFAULT_DIR)
                .with_context(|| format!("cannot create directory {DEFAULT_DIR}"))?;
        }
        Ok(Options {
            cache_path,
            defaults,
            create_len,
            listen,
            tls,
        })
    }
}

/// What to do with the cache file.
pub(super) enum Plan {
    Open {
        lock: CacheLock,
        sb: Box<Superblock>,
    },
    Create {
        target: Target,
        len: u64,
    },
}

impl Plan {
    /// Lock and inspect the cache, or plan to create it; a cache to be
    /// created is checked to be large enough before anything is written.
    pub(super) fn inspect(a: &ServeArgs, o: &Options) -> Result<Plan> {
        let path = &o.cache_path;
        let plan = if cache::exists(path) {
            Plan::existing(a, o, CacheLock::acquire(path, true)?)?
        } else {
            let Some(len) = o.create_len else {
                bail!(
                    "cache {}: no such file; give --cache-size SIZE to create it (or create it with `pmcache format`)",
                    path.display()
                );
            };
            Plan::Create {
                target: Target::New { len },
                len,
            }
        };
        if let Plan::Create { len, .. } = &plan {
            cache::plan_layout(path, *len, a.new_block_size())?;
        }
        Ok(plan)
    }

    /// The plan for a file that exists, by what it holds.
    fn existing(a: &ServeArgs, o: &Options, lock: CacheLock) -> Result<Plan> {
        let path = o.cache_path.display();
        match cache::classify(&lock)? {
            Contents::Cache(sb) => {
                warn_size_ignored(a, o, &sb);
                Ok(Plan::Open { lock, sb })
            }
            Contents::Damaged(why) => bail!(
                "cache {path}: {why}; run `pmcache check --cache {path}` for a report, or `pmcache format --force` to start over"
            ),
            Contents::Blank { len } => {
                let len = match (o.create_len, len) {
                    (Some(l), _) => l,
                    (None, l) if l > 0 => l,
                    (None, _) => bail!(
                        "cache {path} is empty; give --cache-size SIZE to create a cache in it"
                    ),
                };
                Ok(Plan::overwrite(lock, len))
            }
            Contents::Foreign { len } => {
                if !a.force {
                    bail!(
                        "{path} exists and is not a pmcache cache; create one with `pmcache format`, or use --force to overwrite the file"
                    );
                }
                Ok(Plan::overwrite(lock, o.create_len.unwrap_or(len)))
            }
        }
    }

    fn overwrite(lock: CacheLock, len: u64) -> Plan {
        Plan::Create {
            target: Target::Existing { lock, len },
            len,
        }
    }
}

/// An existing cache keeps its size and block size: say so when others
/// were asked for.
fn warn_size_ignored(a: &ServeArgs, o: &Options, sb: &Superblock) {
    if let Some(bs) = a.block_size.filter(|b| *b != sb.layout.block_size) {
        tracing::warn!(
            cache = %o.cache_path.display(),
            block_size = sb.layout.block_size,
            requested = bs,
            "the cache exists: --block-size is ignored (use `pmcache format --force` to change it)"
        );
    }
    if let Some(size) = a.cache_size.filter(|s| *s != sb.layout.region_len) {
        tracing::warn!(
            cache = %o.cache_path.display(),
            size = sb.layout.region_len,
            requested = size,
            "the cache exists: --cache-size is ignored (use `pmcache format --force` to resize it)"
        );
    }
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
