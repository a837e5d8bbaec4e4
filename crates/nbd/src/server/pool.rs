//! The worker pools: threads that run the requests which may wait (reads
//! that miss, buffered writes, FLUSH, ...) and the commits of staged
//! writes, so the connection's reader never waits for them.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tracing::warn;

pub(super) type Job = Box<dyn FnOnce() + Send>;

/// How long a worker above a pool's minimum stays idle before it exits.
const WORKER_IDLE: Duration = Duration::from_secs(10);

struct PoolState {
    jobs: VecDeque<Job>,
    stop: bool,
    threads: usize,
    idle: usize,
}

struct PoolQueue {
    st: Mutex<PoolState>,
    cv: Condvar,
    min: usize,
    max: usize,
    name: &'static str,
}

/// Threads running queued jobs, from `min` up to `max`: a job that finds
/// no idle worker gets a new one, so jobs that block (an origin round
/// trip, a persistence call) do not queue behind each other while the
/// pool has room. Extra workers exit after [`WORKER_IDLE`]; all stop when
/// the pool is dropped.
pub(super) struct Pool {
    queue: Arc<PoolQueue>,
}

impl Pool {
    pub(super) fn new(name: &'static str, min: usize, max: usize) -> io::Result<Self> {
        let min = min.max(1);
        let queue = Arc::new(PoolQueue {
            st: Mutex::new(PoolState {
                jobs: VecDeque::new(),
                stop: false,
                threads: min,
                idle: 0,
            }),
            cv: Condvar::new(),
            min,
            max: max.max(min),
            name,
        });
        for _ in 0..min {
            spawn_worker(&queue)?;
        }
        Ok(Self { queue })
    }

    pub(super) fn submit(&self, job: Job) {
        let q = &self.queue;
        let grow = {
            let mut g = q.st.lock();
            g.jobs.push_back(job);
            // Idle workers take queued jobs; more jobs than idle workers
            // means a new worker, while the pool has room.
            let grow = g.jobs.len() > g.idle && g.threads < q.max;
            if grow {
                g.threads += 1;
            }
            grow
        };
        q.cv.notify_one();
        if grow {
            if let Err(e) = spawn_worker(q) {
                // The queued job runs on an existing worker instead.
                warn!("nbd: cannot start a {} worker: {e}", q.name);
                q.st.lock().threads -= 1;
            }
        }
    }
}

fn spawn_worker(q: &Arc<PoolQueue>) -> io::Result<()> {
    let q = q.clone();
    thread::Builder::new()
        .name(q.name.into())
        .spawn(move || {
            while let Some(job) = next_job(&q) {
                // A panicking export must not take a worker with it; the
                // job's own guard ends the affected connection.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                    warn!("nbd: a request handler panicked");
                }
            }
        })
        .map(drop)
}

/// The next job for a worker; `None` when the worker should exit (the pool
/// stopped, or the worker idled out above the minimum).
fn next_job(q: &PoolQueue) -> Option<Job> {
    let mut g = q.st.lock();
    loop {
        if let Some(j) = g.jobs.pop_front() {
            return Some(j);
        }
        if g.stop {
            g.threads -= 1;
            return None;
        }
        g.idle += 1;
        let timed_out = q.cv.wait_for(&mut g, WORKER_IDLE).timed_out();
        g.idle -= 1;
        if timed_out && g.jobs.is_empty() && g.threads > q.min {
            g.threads -= 1;
            return None;
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.queue.st.lock().stop = true;
        self.queue.cv.notify_all();
    }
}
