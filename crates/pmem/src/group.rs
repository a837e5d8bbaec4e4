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
//!
//! A fence may also be asynchronous ([`GroupCommit::commit_async`]): its
//! range joins the open batch with a callback, and the caller goes on. The
//! batch's leader runs the callbacks once its sync has returned; a batch
//! with no waiting member to lead it is led by a syncer thread, started on
//! the first asynchronous fence.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::FenceDone;

/// Most persistence calls in flight at once. One: while it runs, the next
/// batch gathers, so batches are as large as the disk's latency allows and
/// their shared pages (entry lines, watermark, FREE stores) are written once
/// for more writes. Measured since slot data goes in with `pwrite` (NBD 4 KiB
/// random writes at QD32, cache on ext4 on a virtio disk, two interleaved
/// rounds): 26.9-27.9 K/s with 1, 24.9-25.4 K/s with 2, 20.2-23.9 K/s with 4;
/// sectors written per write 15.6-16.0, 16.2-16.3, 17.0-17.1.
pub(crate) const MAX_SYNCS: usize = 1;

/// The persistence call: make `[start, end)` durable.
pub(crate) type Sync<'a> =
    dyn Fn(usize, usize) -> Result<(), String> + Send + std::marker::Sync + 'a;
/// The syncer thread's own handle on it.
pub(crate) type SyncFn = Arc<Sync<'static>>;

/// Shared state of one region's group commit.
#[derive(Default)]
pub(crate) struct GroupCommit {
    inner: Arc<Inner>,
    /// The syncer thread, once an asynchronous fence started it.
    syncer: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Inner {
    st: Mutex<State>,
    /// Wakes the syncer: an open batch has no member to lead it.
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// Hull of the open batch's ranges (not yet handed to a sync).
    pending: Option<(usize, usize)>,
    /// Callbacks of the open batch's asynchronous members.
    done: Vec<FenceDone>,
    /// Waiting (blocking) members of the open batch.
    waiting: usize,
    /// The open batch: members wait for its `synced`.
    open: Arc<Batch>,
    /// Syncs running.
    syncing: usize,
    /// A sync failed: durability can no longer be promised to anyone.
    failed: Option<String>,
    /// The region is going away: the syncer ends.
    stop: bool,
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

/// A batch taken for a sync by its leader.
struct Closed {
    batch: Arc<Batch>,
    range: Option<(usize, usize)>,
    done: Vec<FenceDone>,
}

impl Inner {
    /// Close the open batch for a sync (the caller leads it).
    fn close(&self, g: &mut State) -> Closed {
        debug_assert!(g.syncing < MAX_SYNCS);
        g.syncing += 1;
        g.waiting = 0;
        Closed {
            batch: std::mem::take(&mut g.open),
            range: g.pending.take(),
            done: std::mem::take(&mut g.done),
        }
    }

    /// Sync a closed batch without the lock, tell its members, hand the
    /// next batch on to a leader, then run the callbacks (without the lock).
    fn lead(&self, g: &mut MutexGuard<'_, State>, c: Closed, sync: &Sync<'_>) {
        let r = MutexGuard::unlocked(g, || match c.range {
            Some((s, e)) => sync(s, e),
            None => Ok(()),
        });
        g.syncing -= 1;
        match &r {
            Ok(()) => c.batch.synced.store(true, Ordering::Relaxed),
            Err(e) => {
                // Everyone waiting fails, and the syncer fails the open
                // batch's callbacks.
                g.failed = Some(e.clone());
                g.open.cv.notify_all();
                self.wake.notify_one();
            }
        }
        c.batch.cv.notify_all();
        // A sync slot is free: one member of the open batch leads it, or
        // the syncer where it has none waiting.
        if g.waiting > 0 {
            g.open.cv.notify_one();
        } else if g.pending.is_some() {
            self.wake.notify_one();
        }
        if !c.done.is_empty() {
            MutexGuard::unlocked(g, || run_all(c.done, &r));
        }
    }

    /// The syncer: leads batches that have no waiting member.
    fn syncer(&self, sync: SyncFn) {
        let mut g = self.st.lock();
        loop {
            if let Some(e) = g.failed.clone() {
                let done = std::mem::take(&mut g.done);
                MutexGuard::unlocked(&mut g, || run_all(done, &Err(e)));
                if g.stop {
                    return;
                }
                if g.done.is_empty() {
                    self.wake.wait(&mut g);
                }
                continue;
            }
            if g.pending.is_some() && g.syncing < MAX_SYNCS {
                let c = self.close(&mut g);
                self.lead(&mut g, c, &*sync);
                continue;
            }
            if g.stop {
                return;
            }
            self.wake.wait(&mut g);
        }
    }
}

impl GroupCommit {
    /// Make `range` durable: return once a `sync(start, end)` call whose
    /// `[start, end)` covers it has returned `Ok`. `sync` is called
    /// by whichever caller leads the batch, never under the state lock.
    /// After a failed sync every caller, now and later, gets the error.
    pub(crate) fn commit(&self, range: (usize, usize), sync: &Sync<'_>) -> Result<(), String> {
        let inner = &*self.inner;
        let mut g = inner.st.lock();
        g.pending = Some(hull(g.pending, range));
        g.waiting += 1;
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
            let c = inner.close(&mut g);
            inner.lead(&mut g, c, sync);
        }
    }

    /// Make `range` durable without waiting: `done` runs, on the thread
    /// that leads the batch, once a sync covering it has returned (or with
    /// the error of a failed sync, now or earlier). `sync` makes the call
    /// the syncer thread makes; it is started on the first use.
    pub(crate) fn commit_async(
        &self,
        range: (usize, usize),
        done: FenceDone,
        sync: impl FnOnce() -> SyncFn,
    ) {
        if let Err(sync) = self.start_syncer(sync) {
            // No thread to finish it: finish it here, waiting.
            done(self.commit(range, &*sync));
            return;
        }
        let mut g = self.inner.st.lock();
        if let Some(e) = &g.failed {
            let e = e.clone();
            drop(g);
            done(Err(e));
            return;
        }
        g.pending = Some(hull(g.pending, range));
        g.done.push(done);
        // A running sync's leader hands the batch on (to the syncer where
        // no member waits to lead it).
        if g.syncing < MAX_SYNCS && g.waiting == 0 {
            self.inner.wake.notify_one();
        }
    }

    /// [`commit_async`](Self::commit_async) for a caller with nothing else
    /// to do: where no sync is running and no other fence waits, it makes
    /// `sync` itself, here and now (`done` runs before the return), which
    /// spares the hand-off to the syncer thread; else it joins the open
    /// batch as `commit_async` does.
    pub(crate) fn commit_async_idle(
        &self,
        range: (usize, usize),
        done: FenceDone,
        sync: &Sync<'_>,
        make: impl FnOnce() -> SyncFn,
    ) {
        let inner = &*self.inner;
        let mut g = inner.st.lock();
        let idle =
            g.syncing < MAX_SYNCS && g.pending.is_none() && g.waiting == 0 && g.failed.is_none();
        if !idle {
            drop(g);
            return self.commit_async(range, done, make);
        }
        g.pending = Some(range);
        g.done.push(done);
        let c = inner.close(&mut g);
        inner.lead(&mut g, c, sync);
    }

    /// The syncer thread, started if it is not running. `Err` (with the
    /// call) if it could not be.
    fn start_syncer(&self, sync: impl FnOnce() -> SyncFn) -> Result<(), SyncFn> {
        let mut t = self.syncer.lock();
        if t.is_none() {
            let sync = sync();
            let (inner, call) = (self.inner.clone(), sync.clone());
            match std::thread::Builder::new()
                .name("pmem-syncer".into())
                .spawn(move || inner.syncer(call))
            {
                Ok(h) => *t = Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the msync syncer thread");
                    return Err(sync);
                }
            }
        }
        Ok(())
    }

    /// End the syncer thread, if any, once it is idle. Before the mapping
    /// goes: asynchronous members hold the region, so none is pending.
    pub(crate) fn shutdown(&self) {
        self.inner.st.lock().stop = true;
        self.inner.wake.notify_all();
        if let Some(t) = self.syncer.lock().take() {
            let _ = t.join();
        }
    }
}

/// Run callbacks with a sync's result. One that panics (a bug) is logged
/// and does not take the others, or the thread, with it.
fn run_all(done: Vec<FenceDone>, r: &Result<(), String>) {
    for d in done {
        let r = r.clone();
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d(r))).is_err() {
            tracing::error!("a fence callback panicked");
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
                        gc.commit(range, &|a, b| {
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

    /// Asynchronous commits: each callback runs only after a sync that
    /// covered its range returned, from a thread other than the caller's
    /// (the syncer, or a blocking leader), and they share syncs.
    #[test]
    fn async_commits_report_only_after_their_sync_and_share_it() {
        const COMMITS: usize = 64;
        let gc = GroupCommit::default();
        let clock = Arc::new(AtomicU64::new(0));
        let log = Arc::new(Mutex::new(Vec::<(usize, usize, u64)>::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let make = {
            let (clock, log, calls) = (clock.clone(), log.clone(), calls.clone());
            move || -> SyncFn {
                Arc::new(move |a, b| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(2));
                    log.lock()
                        .push((a, b, clock.fetch_add(1, Ordering::SeqCst)));
                    Ok(())
                })
            }
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let me = std::thread::current().id();
        for i in 0..COMMITS {
            let range = (i * 4096, i * 4096 + 4096);
            let (tx, clock, log) = (tx.clone(), clock.clone(), log.clone());
            let done: FenceDone = Box::new(move |r| {
                let ret = clock.fetch_add(1, Ordering::SeqCst);
                let covered = log
                    .lock()
                    .iter()
                    .any(|&(a, b, tick)| a <= range.0 && range.1 <= b && tick < ret);
                tx.send((i, r, covered, std::thread::current().id()))
                    .unwrap();
            });
            gc.commit_async(range, done, make.clone());
        }
        for _ in 0..COMMITS {
            let (i, r, covered, thread) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(r, Ok(()));
            assert!(covered, "commit {i} reported before its sync returned");
            assert_ne!(thread, me, "commit {i} was synced by its caller");
        }
        let n = calls.load(Ordering::SeqCst);
        assert!(
            n < COMMITS / 2,
            "{n} syncs for {COMMITS} commits: no sharing"
        );
        gc.shutdown();
    }

    /// The first asynchronous commit, arriving while a blocking commit's
    /// sync runs and with nobody else to come, is still finished: the
    /// blocking leader hands its batch on to the syncer.
    #[test]
    fn an_async_commit_behind_a_blocking_sync_is_finished() {
        let gc = Arc::new(GroupCommit::default());
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let blocking = {
            let gc = gc.clone();
            std::thread::spawn(move || {
                gc.commit((0, 4096), &|_, _| {
                    started_tx.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(50));
                    Ok(())
                })
            })
        };
        started_rx.recv().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let make = || -> SyncFn { Arc::new(|_, _| Ok(())) };
        gc.commit_async((4096, 8192), Box::new(move |r| tx.send(r).unwrap()), make);
        assert_eq!(blocking.join().unwrap(), Ok(()));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(Ok(())));
        gc.shutdown();
    }

    /// An idle caller's commit is synced by the caller, before the return;
    /// behind a running sync it joins the next batch instead, finished by
    /// another thread once a sync covering it has returned.
    #[test]
    fn an_idle_commit_is_synced_by_its_caller_else_joins_the_batch() {
        let gc = Arc::new(GroupCommit::default());
        let me = std::thread::current().id();
        let make = || -> SyncFn { Arc::new(|_, _| Ok(())) };
        let ran = Arc::new(Mutex::new(None));
        let synced_by = Arc::new(Mutex::new(Vec::new()));
        let (r, s) = (ran.clone(), synced_by.clone());
        gc.commit_async_idle(
            (0, 4096),
            Box::new(move |res| *r.lock() = Some((res, std::thread::current().id()))),
            &|a, b| {
                s.lock().push((a, b, std::thread::current().id()));
                Ok(())
            },
            make,
        );
        assert_eq!(*ran.lock(), Some((Ok(()), me)), "not finished here");
        assert_eq!(*synced_by.lock(), [(0, 4096, me)]);

        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let blocking = {
            let gc = gc.clone();
            std::thread::spawn(move || {
                gc.commit((8192, 12288), &|_, _| {
                    started_tx.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(50));
                    Ok(())
                })
            })
        };
        started_rx.recv().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        gc.commit_async_idle(
            (4096, 8192),
            Box::new(move |res| tx.send((res, std::thread::current().id())).unwrap()),
            &|_, _| panic!("an idle commit synced behind a running sync"),
            make,
        );
        assert!(rx.try_recv().is_err(), "reported before a sync covered it");
        assert_eq!(blocking.join().unwrap(), Ok(()));
        let (res, thread) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(res, Ok(()));
        assert_ne!(thread, me);
        gc.shutdown();
    }

    /// A failed sync fails the asynchronous commits in its batch, those
    /// waiting in the next, and every later one.
    #[test]
    fn a_failed_sync_fails_async_commits() {
        let gc = GroupCommit::default();
        let make = || -> SyncFn {
            Arc::new(|_, _| {
                std::thread::sleep(Duration::from_millis(5));
                Err("EIO".to_string())
            })
        };
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..8 {
            let tx = tx.clone();
            gc.commit_async(
                (i * 4096, i * 4096 + 1),
                Box::new(move |r| tx.send(r).unwrap()),
                make,
            );
        }
        for _ in 0..8 {
            let r = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(r, Err("EIO".to_string()));
        }
        assert_eq!(
            gc.commit((0, 1), &|_, _| Ok(())),
            Err("EIO".to_string()),
            "later blocking commits fail too"
        );
        gc.shutdown();
    }

    /// A failed sync fails its batch and every later commit.
    #[test]
    fn a_failed_sync_fails_everyone_after() {
        let gc = GroupCommit::default();
        let e = gc.commit((0, 4096), &|_, _| Err("EIO".into()));
        assert_eq!(e, Err("EIO".to_string()));
        let later = gc.commit((4096, 8192), &|_, _| Ok(()));
        assert_eq!(later, Err("EIO".to_string()));
    }

    #[test]
    fn hull_spans_all_ranges() {
        assert_eq!(hull(None, (8192, 12288)), (8192, 12288));
        assert_eq!(hull(Some((8192, 12288)), (0, 4096)), (0, 12288));
    }
}
