//! SIGINT/SIGTERM for `serve`: the first asks the server to stop, a second
//! exits at once (safe: every acknowledged write is already durable).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use pmcache_engine::Engine;
use pmcache_nbd::server::ShutdownHandle;
use signal_hook::consts::{SIGINT, SIGTERM};

/// What the first signal does: stop the server, and stop writes waiting
/// for space (an origin that is down may never free any).
type Stop = Arc<dyn Fn() + Send + Sync>;

/// The signal thread's state, installed before anything else so that a
/// signal during start-up is not lost.
pub(super) struct Signals {
    requested: Arc<AtomicBool>,
    handle: Arc<Mutex<Option<Stop>>>,
}

impl Signals {
    pub(super) fn install() -> Result<Signals> {
        let requested = Arc::new(AtomicBool::new(false));
        let handle: Arc<Mutex<Option<Stop>>> = Arc::new(Mutex::new(None));
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .context("cannot install signal handlers")?;
        let (r, h) = (requested.clone(), handle.clone());
        std::thread::Builder::new()
            .name("pmcache-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    on_signal(sig, &r, &h);
                }
            })
            .context("cannot start the signal thread")?;
        Ok(Signals { requested, handle })
    }

    /// Hand over what stops the server (run at once if a signal came first).
    pub(super) fn arm(&self, h: ShutdownHandle, engine: Arc<Engine>) {
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

fn on_signal(sig: i32, requested: &AtomicBool, handle: &Mutex<Option<Stop>>) {
    let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
    if requested.swap(true, Ordering::SeqCst) {
        tracing::warn!(
            signal = name,
            "second signal: exiting now (the cache stays consistent and recovers at the next start)"
        );
        // The shell's code for death by this signal: 130 (SIGINT) or 143.
        std::process::exit(128 + sig);
    }
    tracing::info!(
        signal = name,
        "shutting down: no new connections, finishing requests in flight"
    );
    if let Some(stop) = handle.lock().ok().and_then(|g| g.clone()) {
        stop();
    }
}
