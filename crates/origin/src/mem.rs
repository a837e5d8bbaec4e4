//! An in-memory origin with a disk's durability model and fault injection,
//! for crash tests and origin-failure tests.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::{Completion, Origin};

/// A test's look at the origin after each operation it accepted: its
/// durable content and the writes since its last flush, in order.
pub type Observer = Box<dyn Fn(&[u8], &[(u64, Vec<u8>)]) + Send + Sync>;

struct State {
    /// What reads see.
    current: Vec<u8>,
    /// What survives a crash for sure.
    durable: Vec<u8>,
    /// Writes since the last flush, in order: (offset, data).
    pending: Vec<(u64, Vec<u8>)>,
    /// Kept under the state lock so it sees every change, in order.
    observer: Option<Observer>,
}

impl State {
    fn notify(&self) {
        if let Some(f) = &self.observer {
            f(&self.durable, &self.pending);
        }
    }
}

/// A RAM-backed origin. Writes become durable only at `flush` or with FUA,
/// like a disk with a volatile write cache.
pub struct MemOrigin {
    state: Mutex<State>,
    fail: AtomicBool,
    /// Fail one operation in this many at random (0: never).
    fail_one_in: AtomicU64,
    ops: AtomicU64,
    delay_us: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    name: String,
}

impl MemOrigin {
    pub fn new(size: u64) -> Self {
        Self::from_bytes(vec![0; size as usize])
    }

    /// An origin whose current and durable content is `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemOrigin {
            state: Mutex::new(State {
                current: bytes.clone(),
                durable: bytes,
                pending: Vec::new(),
                observer: None,
            }),
            fail: AtomicBool::new(false),
            fail_one_in: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            delay_us: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            name: "mem:".into(),
        }
    }

    /// Give the origin a distinct identity (the fingerprint).
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = format!("mem:{name}");
        self
    }

    /// Make every operation fail (origin down) until switched back.
    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    /// Fail about one operation in `n` (a flaky origin); 0 turns it off.
    /// Which ones fail follows a fixed sequence, so runs are repeatable.
    pub fn set_fail_one_in(&self, n: u64) {
        self.fail_one_in.store(n, Ordering::SeqCst);
    }

    /// Add latency to every operation (a slow NAS).
    pub fn set_delay(&self, d: Duration) {
        self.delay_us.store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// Call `f` after every write, write_zeroes and flush the origin accepts
    /// (not after failed ones), with what a power loss could leave: the
    /// durable content and the pending writes. Lets a test check a property
    /// of the origin at every step, e.g. ordered writeback. `f` runs with
    /// the origin's lock held, on the thread of the operation: it must not
    /// call back into this origin (that deadlocks). `None` removes it.
    pub fn set_observer(&self, f: Option<Observer>) {
        self.state.lock().observer = f;
    }

    /// What an observer would see now: `f(durable, pending)`, under the
    /// origin's lock (so `f` must not call back into the origin either).
    pub fn inspect<R>(&self, f: impl FnOnce(&[u8], &[(u64, Vec<u8>)]) -> R) -> R {
        let st = self.state.lock();
        f(&st.durable, &st.pending)
    }

    /// Content as reads see it now.
    pub fn current(&self) -> Vec<u8> {
        self.state.lock().current.clone()
    }

    /// Content guaranteed to survive a crash.
    pub fn durable(&self) -> Vec<u8> {
        self.state.lock().durable.clone()
    }

    /// Content after a power loss: the durable image plus the writes since the
    /// last flush for which `keep(i)` says they reached media, in order.
    pub fn crash_image(&self, mut keep: impl FnMut(usize) -> bool) -> Vec<u8> {
        let st = self.state.lock();
        let mut img = st.durable.clone();
        for (i, (off, data)) in st.pending.iter().enumerate() {
            if keep(i) {
                img[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
        }
        img
    }

    pub fn write_count(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    fn gate(&self) -> io::Result<()> {
        let d = self.delay_us.load(Ordering::Relaxed);
        if d > 0 {
            std::thread::sleep(Duration::from_micros(d));
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected origin failure"));
        }
        let n = self.fail_one_in.load(Ordering::Relaxed);
        // A strong mix of the operation number: a retry loop that issues the
        // same number of operations each round must not land on the same
        // outcome each time (Fibonacci hashing did, at some strides).
        let mut z = self.ops.fetch_add(1, Ordering::Relaxed);
        for k in [0xBF58_476D_1CE4_E5B9u64, 0x94D0_49BB_1331_11EB] {
            z = (z ^ (z >> 31)).wrapping_mul(k);
        }
        if n > 0 && (z >> 32).is_multiple_of(n) {
            return Err(io::Error::other("injected intermittent origin failure"));
        }
        Ok(())
    }

    fn range(&self, st: &State, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= st.current.len() as u64);
        match end {
            Some(end) => Ok(offset as usize..end as usize),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "mem origin access beyond end",
            )),
        }
    }

    fn store(&self, data: Vec<u8>, offset: u64, fua: bool) -> io::Result<()> {
        self.gate()?;
        let mut st = self.state.lock();
        let r = self.range(&st, offset, data.len())?;
        st.current[r.clone()].copy_from_slice(&data);
        if fua {
            st.durable[r].copy_from_slice(&data);
        } else {
            st.pending.push((offset, data));
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        st.notify();
        Ok(())
    }
}

impl Origin for MemOrigin {
    fn size(&self) -> u64 {
        self.state.lock().current.len() as u64
    }

    fn fingerprint(&self) -> String {
        self.name.clone()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.gate()?;
        let st = self.state.lock();
        let r = self.range(&st, offset, buf.len())?;
        buf.copy_from_slice(&st.current[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.store(buf.to_vec(), offset, fua)
    }

    fn reads_async(&self) -> bool {
        true
    }

    fn writes_async(&self) -> bool {
        true
    }

    /// Completes in the call, as `read_raw_async` does.
    unsafe fn write_raw_async(
        &self,
        offset: u64,
        pieces: &[(*const u8, usize)],
        done: Completion,
    ) -> Result<(), Completion> {
        let mut data = Vec::with_capacity(pieces.iter().map(|p| p.1).sum());
        for &(ptr, len) in pieces {
            // SAFETY: the caller's promise: readable for `len`, unchanging.
            data.extend_from_slice(unsafe { std::slice::from_raw_parts(ptr, len) });
        }
        done(self.store(data, offset, false));
        Ok(())
    }

    /// Completes in the call, so tests see the callback path's outcomes
    /// (faults included) deterministically.
    unsafe fn read_raw_async(
        &self,
        offset: u64,
        pieces: &[(*mut u8, usize)],
        done: Completion,
    ) -> Result<(), Completion> {
        let mut bufs: Vec<io::IoSliceMut<'_>> = pieces
            .iter()
            .map(|&(ptr, len)| {
                // SAFETY: the caller's promise: valid for `len` writes, unshared.
                io::IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
            })
            .collect();
        done(self.read_vectored_at(&mut bufs, offset));
        Ok(())
    }

    /// One store (and one chance to fail) per run, as one request would be.
    fn write_runs(&self, runs: &[(u64, &[io::IoSlice<'_>])]) -> Vec<io::Result<()>> {
        runs.iter()
            .map(|&(offset, bufs)| {
                let data: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
                self.store(data, offset, false)
            })
            .collect()
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("zero range too large"))?;
        self.store(vec![0; len], offset, fua)
    }

    fn flush(&self) -> io::Result<()> {
        self.gate()?;
        let mut st = self.state.lock();
        let st = &mut *st;
        st.durable.copy_from_slice(&st.current);
        st.pending.clear();
        self.flushes.fetch_add(1, Ordering::Relaxed);
        st.notify();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// (durable, pending) as the observer saw them, one entry per call.
    type Seen = Arc<Mutex<Vec<(Vec<u8>, Vec<(u64, Vec<u8>)>)>>>;

    fn watched(o: &MemOrigin) -> Seen {
        let seen: Seen = Default::default();
        let s = seen.clone();
        o.set_observer(Some(Box::new(move |d, p| {
            s.lock().push((d.to_vec(), p.to_vec()));
        })));
        seen
    }

    #[test]
    fn observer_sees_every_accepted_operation_in_order() {
        let o = MemOrigin::new(8);
        let seen = watched(&o);
        o.write_at(&[1, 2], 0, false).unwrap();
        o.write_at(&[5], 4, true).unwrap();
        o.write_zeroes(1, 1, false).unwrap();
        o.flush().unwrap();
        let runs = [(6, &[std::io::IoSlice::new(&[7])][..])];
        assert!(o.write_runs(&runs).iter().all(|r| r.is_ok()));
        let seen = seen.lock().clone();
        let mut pend = vec![(0u64, vec![1u8, 2])];
        assert_eq!(seen[0], (vec![0; 8], pend.clone()));
        let fua = vec![0, 0, 0, 0, 5, 0, 0, 0];
        assert_eq!(seen[1], (fua.clone(), pend.clone()), "FUA: durable at once");
        pend.push((1, vec![0]));
        assert_eq!(seen[2], (fua, pend));
        assert_eq!(seen[3], (vec![1, 0, 0, 0, 5, 0, 0, 0], vec![]));
        assert_eq!(seen[4].1, vec![(6, vec![7])]);
        assert_eq!(seen.len(), 5);
        let now = o.inspect(|d, p| (d.to_vec(), p.to_vec()));
        assert_eq!(now, seen[4]);
    }

    #[test]
    fn failed_operations_are_not_observed_and_none_removes_the_observer() {
        let o = MemOrigin::new(8);
        let seen = watched(&o);
        o.set_failing(true);
        assert!(o.write_at(&[1], 0, false).is_err() && o.flush().is_err());
        o.set_failing(false);
        assert!(o.write_at(&[1], 8, false).is_err(), "past the end");
        assert!(seen.lock().is_empty());
        o.set_observer(None);
        o.write_at(&[1], 0, false).unwrap();
        assert!(seen.lock().is_empty());
        assert_eq!(o.current()[0], 1);
    }
}
