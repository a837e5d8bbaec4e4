//! Test hooks: named points on the request paths where a test can pause a
//! thread, to force one exact interleaving of two requests. A hook costs one
//! relaxed load when none is set.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// Where a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HookPoint {
    /// A read miss has read its blocks from the origin, handed them to its
    /// client, and is about to publish them (`commit_fill`).
    FillRead,
    /// A write has filled its new slots and is about to commit them
    /// (`cache_commit`), on the path (mode) it chose at its start.
    WriteCommit,
    /// `set_mode` has written back what the new mode does not keep dirty
    /// and is about to switch.
    ModeSwitch,
}

/// What a test installs: called on the thread that reaches the point.
pub type HookFn = Arc<dyn Fn(HookPoint) + Send + Sync>;

#[derive(Default)]
pub(crate) struct Hooks {
    set: AtomicBool,
    f: Mutex<Option<HookFn>>,
}

impl Hooks {
    pub(crate) fn install(&self, f: Option<HookFn>) {
        let mut slot = self.f.lock();
        self.set.store(f.is_some(), Ordering::Release);
        *slot = f;
    }

    pub(crate) fn run(&self, point: HookPoint) {
        if !self.set.load(Ordering::Relaxed) {
            return;
        }
        let f = self.f.lock().clone();
        if let Some(f) = f {
            f(point);
        }
    }
}
