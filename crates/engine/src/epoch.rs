//! Client epochs: the writes between two client FLUSHes.
//!
//! A write takes the current epoch when it commits and holds the epoch's
//! gate until it is published, so writeback can tell when an epoch is
//! *closed*: sealed by a FLUSH and with no commit of it still in flight.
//! Only then can no new version of it appear, and the next epoch may start
//! on the origin. Writes take the epoch after their writer locks, so per
//! block the epoch never decreases with seq (format rule 4 carries over).
//!
//! The gate is two counters, by epoch parity: a seal waits until the epoch
//! before the one it ends has drained, so a counter only ever holds
//! commits of one epoch (plus transient registrations that see the epoch
//! move on and retry elsewhere, which only make a closed epoch look busy
//! for a moment).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Yields a seal spends waiting for an epoch to drain before it sleeps
/// [`SEAL_NAP`] between looks.
const SEAL_SPINS: u32 = 100;
const SEAL_NAP: Duration = Duration::from_micros(100);

pub(crate) struct Epochs {
    current: AtomicU64,
    active: [AtomicU64; 2],
    /// W: every epoch up to this one is on the origin (durable in media).
    written: AtomicU64,
    /// Start time of each epoch above W (for the oldest pending's age).
    /// Without ordered writeback nothing raises W, so only the first is
    /// kept: one entry per FLUSH would pile up for ever.
    starts: Mutex<VecDeque<(u64, Instant)>>,
    ordered: bool,
    /// Serializes seals, so concurrent FLUSHes share one.
    seal: Mutex<()>,
}

/// A commit's hold on its epoch, from taking it until it is published.
#[must_use = "an epoch stays open until its commits exit"]
pub(crate) struct EpochGuard<'a> {
    epochs: &'a Epochs,
    pub(crate) epoch: u64,
}

impl EpochGuard<'_> {
    /// Keep the epoch entered past this guard, for a commit finished on
    /// another thread; [`Epochs::leave`] ends it.
    pub(crate) fn detach(self) -> u64 {
        let e = self.epoch;
        std::mem::forget(self);
        e
    }
}

impl Drop for EpochGuard<'_> {
    fn drop(&mut self) {
        self.epochs.active[(self.epoch & 1) as usize].fetch_sub(1, SeqCst);
    }
}

impl Epochs {
    /// After recovery: `current` is above every epoch in media; `written`
    /// is W as read from media; `ordered`: whether writeback raises W.
    pub(crate) fn new(current: u64, written: u64, ordered: bool) -> Epochs {
        debug_assert!(written < current, "W is below the current epoch");
        Epochs {
            current: AtomicU64::new(current),
            active: Default::default(),
            written: AtomicU64::new(written),
            starts: Mutex::new(VecDeque::from([(current, Instant::now())])),
            seal: Mutex::new(()),
            ordered,
        }
    }

    pub(crate) fn current(&self) -> u64 {
        self.current.load(SeqCst)
    }

    /// Take the current epoch for a commit.
    pub(crate) fn enter(&self) -> EpochGuard<'_> {
        loop {
            let e = self.current.load(SeqCst);
            self.active[(e & 1) as usize].fetch_add(1, SeqCst);
            if self.current.load(SeqCst) == e {
                return EpochGuard {
                    epochs: self,
                    epoch: e,
                };
            }
            self.active[(e & 1) as usize].fetch_sub(1, SeqCst);
        }
    }

    /// End an epoch entered by a guard that was detached.
    pub(crate) fn leave(&self, epoch: u64) {
        self.active[(epoch & 1) as usize].fetch_sub(1, SeqCst);
    }

    /// A client FLUSH: every write acknowledged before it is in an epoch
    /// below the current one on return.
    pub(crate) fn seal(&self) {
        let arrived = self.current();
        let _g = self.seal.lock();
        let e = self.current();
        if e > arrived {
            // Another FLUSH sealed after this one arrived.
            return;
        }
        // The epoch before `e` must drain before its parity is reused. A
        // commit drains in microseconds, but a bypassed write holds its
        // epoch through its origin write: then sleep, not spin.
        let mut waited = 0u32;
        while e > 0 && self.active[((e - 1) & 1) as usize].load(SeqCst) != 0 {
            waited += 1;
            if waited < SEAL_SPINS {
                std::thread::yield_now();
            } else {
                std::thread::sleep(SEAL_NAP);
            }
        }
        self.current.store(e + 1, SeqCst);
        if self.ordered {
            self.starts.lock().push_back((e + 1, Instant::now()));
        }
    }

    /// The newest closed epoch (`None` before any): every epoch up to it is
    /// sealed and has no commit in flight.
    pub(crate) fn closed(&self) -> Option<u64> {
        let e = self.current();
        if e == 0 {
            return None;
        }
        if self.active[((e - 1) & 1) as usize].load(SeqCst) == 0 {
            Some(e - 1)
        } else {
            e.checked_sub(2)
        }
    }

    pub(crate) fn written(&self) -> u64 {
        self.written.load(SeqCst)
    }

    /// Record a new W (already durable in media).
    pub(crate) fn set_written(&self, w: u64) {
        debug_assert!(w >= self.written(), "W never goes down");
        self.written.store(w, SeqCst);
        let mut starts = self.starts.lock();
        while starts.len() > 1 && starts[1].0 <= w + 1 {
            starts.pop_front();
        }
    }

    /// Sealed epochs not yet on the origin, and how long ago the oldest
    /// epoch not on the origin began.
    pub(crate) fn pending(&self) -> (u64, Duration) {
        let w = self.written();
        let sealed = self.current().saturating_sub(w + 1);
        let starts = self.starts.lock();
        let age = starts
            .iter()
            .find(|(e, _)| *e > w)
            .map_or(Duration::ZERO, |(_, t)| t.elapsed());
        (sealed, age)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_closes_when_sealed_and_drained() {
        let ep = Epochs::new(1, 0, true);
        assert_eq!(ep.closed(), Some(0));
        let g = ep.enter();
        assert_eq!(g.epoch, 1);
        ep.seal();
        assert_eq!(ep.current(), 2);
        assert_eq!(ep.closed(), Some(0), "a commit of epoch 1 is in flight");
        drop(g);
        assert_eq!(ep.closed(), Some(1));
        assert_eq!(ep.pending().0, 1, "epoch 1 is sealed, W is 0");
        ep.set_written(1);
        assert_eq!(ep.pending().0, 0);
    }

    /// Without ordered writeback W stays put, and the start times do not
    /// grow with every FLUSH.
    #[test]
    fn unordered_epochs_keep_one_start_time() {
        let ep = Epochs::new(1, 0, false);
        for _ in 0..1000 {
            ep.seal();
        }
        assert_eq!(ep.current(), 1001);
        assert_eq!(ep.starts.lock().len(), 1);
        assert_eq!(ep.pending().0, 1000, "sealed epochs above W, as before");
    }

    /// A seal waits for the epoch before to drain, however long a commit
    /// of it takes.
    #[test]
    fn a_seal_waits_for_a_slow_commit() {
        let ep = Epochs::new(1, 0, true);
        let g = ep.enter();
        ep.seal(); // 1 -> 2: waits only for epoch 0
        std::thread::scope(|s| {
            let t = s.spawn(|| ep.seal()); // 2 -> 3: waits for epoch 1
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(ep.current(), 2, "sealed while epoch 1 had a commit");
            drop(g);
            t.join().unwrap();
        });
        assert_eq!(ep.current(), 3);
    }

    #[test]
    fn concurrent_seals_and_commits_keep_epochs_ordered() {
        let ep = std::sync::Arc::new(Epochs::new(1, 0, true));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let ep = ep.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        if i == 0 {
                            ep.seal();
                        } else {
                            let g = ep.enter();
                            // A commit's epoch stays open while it runs.
                            assert!(ep.closed().is_none_or(|c| c < g.epoch));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ep.closed(), Some(ep.current() - 1));
    }
}
