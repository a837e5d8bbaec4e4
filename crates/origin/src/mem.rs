//! An in-memory origin with a disk's durability model and fault injection,
//! for crash tests and origin-failure tests.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::Origin;

struct State {
    /// What reads see.
    current: Vec<u8>,
    /// What survives a crash for sure.
    durable: Vec<u8>,
    /// Writes since the last flush, in order: (offset, data).
    pending: Vec<(u64, Vec<u8>)>,
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
        Ok(())
    }
}
