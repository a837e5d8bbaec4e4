//! Event counters for hot paths: one stripe of counters per thread.
//!
//! A locked add costs a hot path more than the event it counts (it also
//! waits for earlier streaming stores), and one shared line bounces between
//! cores. So each thread claims a stripe of its own for its lifetime and
//! counts with plain loads and stores. Threads beyond [`STRIPES`] share one
//! last stripe and use atomic adds there.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Stripes that a thread can own.
pub const STRIPES: usize = 16;

static CLAIMED: [AtomicBool; STRIPES] = [const { AtomicBool::new(false) }; STRIPES];

/// This thread's stripe; released when the thread exits.
struct Claim(Option<usize>);

impl Claim {
    fn take() -> Claim {
        let free = (0..STRIPES).find(|&i| {
            CLAIMED[i]
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        });
        Claim(free)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            // Release: the next owner sees this thread's last counts.
            CLAIMED[i].store(false, Ordering::Release);
        }
    }
}

thread_local! {
    static MINE: Claim = Claim::take();
}

/// The stripe (below [`STRIPES`]) this thread owns for its lifetime, or
/// `None` (it counts in the shared stripe). Other per-thread structures may
/// use it as an index: no other live thread has the same one, and a later
/// owner's claim is ordered after this thread's exit.
#[inline]
pub fn thread_stripe() -> Option<usize> {
    MINE.try_with(|c| c.0).ok().flatten()
}

#[repr(align(128))]
struct Stripe<const N: usize>([AtomicU64; N]);

/// `N` counters, striped by thread.
pub struct Counters<const N: usize> {
    /// `STRIPES` owned stripes, then the shared one.
    stripes: Box<[Stripe<N>]>,
}

impl<const N: usize> Default for Counters<N> {
    fn default() -> Self {
        Counters {
            stripes: (0..=STRIPES)
                .map(|_| Stripe(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
        }
    }
}

impl<const N: usize> Counters<N> {
    /// Add `n` to counter `c`.
    #[inline]
    pub fn add(&self, c: usize, n: u64) {
        match thread_stripe() {
            Some(i) => {
                // Only this thread writes stripe `i` while it holds the claim.
                let a = &self.stripes[i].0[c];
                a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
            }
            None => {
                self.stripes[STRIPES].0[c].fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// The sum over all threads.
    pub fn get(&self, c: usize) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0[c].load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_are_exact_with_more_threads_than_stripes() {
        let c = Arc::new(Counters::<2>::default());
        let threads: Vec<_> = (0..STRIPES + 8)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        c.add(0, 1);
                        c.add(1, 3);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = (STRIPES + 8) as u64 * 10_000;
        assert_eq!(c.get(0), n);
        assert_eq!(c.get(1), 3 * n);
    }

    #[test]
    fn a_stripe_outlives_its_thread() {
        let c = Arc::new(Counters::<1>::default());
        for _ in 0..3 * STRIPES {
            let c = c.clone();
            std::thread::spawn(move || c.add(0, 5)).join().unwrap();
        }
        assert_eq!(c.get(0), 15 * STRIPES as u64);
    }
}
