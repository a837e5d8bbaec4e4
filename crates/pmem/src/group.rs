//! Group commit for msync mode: threads that fence at the same time share
//! persistence calls.
//!
//! A fencing thread adds its page range to the open batch and waits until
//! that batch is synced. If fewer than [`MAX_SYNCS`] syncs are running, it
//! becomes the batch's leader at once: it closes the batch, syncs the hull
//! of everything in it with one call, and wakes the batch's members when
//! that call has returned. Otherwise it waits, and members that arrive
//! meanwhile gather in the open batch, which one of them leads as soon as a
//! running sync finishes. Sharing keeps the number of syncs well below the
//! number of fences. Nobody returns before the call that covered its ranges
//! has returned.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

/// Most persistence calls in flight at once. One: while it runs, the next
/// batch gathers, so batches are as large as the disk's latency allows and
/// their shared pages (entry lines, watermark, FREE stores) are written once
/// for more writes. Measured since slot data goes in with `pwrite` (NBD 4 KiB
/// random writes at QD32, cache on ext4 on a virtio disk, two interleaved
/// rounds): 26.9-27.9 K/s with 1, 24.9-25.4 K/s with 2, 20.2-23.9 K/s with 4;
/// sectors written per write 15.6-16.0, 16.2-16.3, 17.0-17.1.
pub(crate) const MAX_SYNCS: usize = 1;

/// Shared state of one region's group commit.
#[derive(Default)]
pub(crate) struct GroupCommit {
    st: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Hull of the open batch's ranges (not yet handed to a sync).
    pending: Option<(usize, usize)>,
    /// The open batch: members wait for its `synced`.
    open: Arc<Batch>,
    /// Syncs running.
    syncing: usize,
    /// A sync failed: durability can no longer be promised to anyone.
    failed: Option<String>,
}

/// Members of a batch sleep on its own condvar, so each wakes once: when
/// its batch is synced, or (one of the open batch's members) to lead it when
/// a sync slot frees up. One condvar for all would wake every waiter at
/// every sync, a context switch each, which on a small machine costs more
/// than the syncs.
#[derive(Default)]
struct Batch {
    /// Set (under the state lock) once a sync of the whole batch returned.
    synced: AtomicBool,
    cv: Condvar,
}

impl GroupCommit {
    /// Make `range` durable: return once a `sync(start, end)` call whose
    /// `[start, end)` covers it has returned `Ok`. `sync` is called
    /// by whichever caller leads the batch, never under the state lock.
    /// After a failed sync every caller, now and later, gets the error.
    pub(crate) fn commit(
        &self,
        range: (usize, usize),
        sync: impl Fn(usize, usize) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut g = self.st.lock();
        g.pending = Some(hull(g.pending, range));
        let mine = g.open.clone();
        loop {
            if let Some(e) = &g.failed {
                return Err(e.clone());
            }
            if mine.synced.load(Ordering::Relaxed) {
                return Ok(());
            }
            // Lead while the batch is still open and a sync may start.
            if !Arc::ptr_eq(&mine, &g.open) || g.syncing >= MAX_SYNCS {
                mine.cv.wait(&mut g);
                continue;
            }
            // Close the batch and sync it without the lock, so later
            // callers gather in the next batch meanwhile.
            g.open = Arc::default();
            g.syncing += 1;
            let taken = g.pending.take();
            let r = parking_lot::MutexGuard::unlocked(&mut g, || match taken {
                Some((s, e)) => sync(s, e),
                None => Ok(()),
            });
            g.syncing -= 1;
            match r {
                Ok(()) => mine.synced.store(true, Ordering::Relaxed),
                Err(e) => {
                    g.failed = Some(e);
                    g.open.cv.notify_all();
                }
            }
            mine.cv.notify_all();
            // A sync slot is free: one member of the open batch leads it.
            g.open.cv.notify_one();
        }
    }
}

/// The smallest range covering `a` (if any) and `b`. One call over the
/// hull costs one persistence round (msync is an fdatasync of the range,
/// and clean pages inside it cost nothing), where one call per range would
/// pay a device flush for each.
fn hull(a: Option<(usize, usize)>, b: (usize, usize)) -> (usize, usize) {
    a.map_or(b, |a| (a.0.min(b.0), a.1.max(b.1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize};
    use std::time::Duration;

    /// Nobody returns before a sync that covered its ranges has returned,
    /// and concurrent committers share syncs.
    #[test]
    fn committers_return_only_after_their_sync_and_share_it() {
        // More committers than syncs may run at once, so some must share.
        // Eight per slot, started together: batches that alternate between
        // one committer and the other seven still make a quarter as many
        // syncs as commits, so the bound below holds on a busy machine.
        const THREADS: usize = 8 * MAX_SYNCS;
        const ROUNDS: usize = 10;
        let gc = Arc::new(GroupCommit::default());
        // Event clock: a sync's completion and a commit's return each take
        // a tick, so "returned after" is a comparison of ticks.
        let clock = Arc::new(AtomicU64::new(0));
        // (start, end, tick at which the sync returned)
        let log = Arc::new(Mutex::new(Vec::<(usize, usize, u64)>::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let start = std::sync::Barrier::new(THREADS);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (gc, clock, log, calls, start) = (&gc, &clock, &log, &calls, &start);
                s.spawn(move || {
                    start.wait();
                    for r in 0..ROUNDS {
                        let range = (t * 4096 + r, t * 4096 + r + 1);
                        gc.commit(range, |a, b| {
                            calls.fetch_add(1, Ordering::SeqCst);
                            // A slow device: others pile up meanwhile.
                            std::thread::sleep(Duration::from_millis(2));
                            let tick = clock.fetch_add(1, Ordering::SeqCst);
                            log.lock().push((a, b, tick));
                            Ok(())
                        })
                        .unwrap();
                        let ret = clock.fetch_add(1, Ordering::SeqCst);
                        let covered = log
                            .lock()
                            .iter()
                            .any(|&(a, b, tick)| a <= range.0 && range.1 <= b && tick < ret);
                        assert!(covered, "thread {t} round {r} returned before its sync");
                    }
                });
            }
        });
        let n = calls.load(Ordering::SeqCst);
        assert!(
            n < THREADS * ROUNDS / 2,
            "{n} syncs for {} commits: no sharing",
            THREADS * ROUNDS
        );
    }

    /// A failed sync fails its batch and every later commit.
    #[test]
    fn a_failed_sync_fails_everyone_after() {
        let gc = GroupCommit::default();
        let e = gc.commit((0, 4096), |_, _| Err("EIO".into()));
        assert_eq!(e, Err("EIO".to_string()));
        let later = gc.commit((4096, 8192), |_, _| Ok(()));
        assert_eq!(later, Err("EIO".to_string()));
    }

    #[test]
    fn hull_spans_all_ranges() {
        assert_eq!(hull(None, (8192, 12288)), (8192, 12288));
        assert_eq!(hull(Some((8192, 12288)), (0, 4096)), (0, 12288));
    }
}
