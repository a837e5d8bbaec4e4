//! Deadlines for reads nobody waits for. A waiting caller times its own
//! request out (`Ticket`), but a read with a callback has no caller, so one
//! thread per process looks at those every second and ends a connection
//! whose read is overdue; its reader then fails every request in flight, so
//! a hung server fails the read instead of keeping it forever.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Once, Weak};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::connection::Inner;
use crate::proto::command_name;

static WATCHED: Mutex<Vec<Weak<Inner>>> = Mutex::new(Vec::new());
static START: Once = Once::new();
const EVERY: Duration = Duration::from_secs(1);

/// Make sure `inner`'s callback reads are checked (cheap after the first).
pub(super) fn watch(inner: &Arc<Inner>) {
    if inner.watched.swap(true, Ordering::Relaxed) {
        return;
    }
    WATCHED.lock().push(Arc::downgrade(inner));
    START.call_once(|| {
        let spawned = thread::Builder::new()
            .name("nbd-client-watch".into())
            .spawn(watch_loop);
        if let Err(e) = spawned {
            tracing::warn!(
                "cannot start the NBD client watchdog ({e}): callback reads never time out"
            );
        }
    });
}

fn watch_loop() {
    loop {
        thread::sleep(EVERY);
        let live: Vec<Arc<Inner>> = {
            let mut w = WATCHED.lock();
            w.retain(|i| i.strong_count() > 0);
            w.iter().filter_map(Weak::upgrade).collect()
        };
        for inner in live {
            check(&inner);
        }
    }
}

/// End `inner`'s connection if one of its callback reads is overdue.
fn check(inner: &Inner) {
    let now = Instant::now();
    let overdue = {
        let p = inner.pending.lock();
        p.ops
            .values()
            .find(|op| op.deadline.is_some_and(|d| d <= now))
            .map(|op| (op.command, op.offset))
    };
    if let (Some((command, offset)), Some(t)) = (overdue, inner.request_timeout) {
        let why = format!(
            "{} at offset {offset} timed out after {t:?}",
            command_name(command)
        );
        tracing::warn!("{}: {why}; ending the connection", inner.uri);
        inner.kill(why);
    }
}
