//! An in-memory [`Export`] for tests and the example server.
//!
//! It behaves like a small, honest block device: reads hand out slices of
//! its buffer in 64 KiB pieces (so the server's vectored paths see several
//! slices), writes land only once the whole payload has arrived, and it
//! counts what it executed so tests can prove that a rejected request wrote
//! nothing. It can also delay or fail requests at chosen offsets, to test
//! out-of-order replies and error paths.

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::export::{BlockSizes, Export, ExportError, Extent, ZeroFlags};
use crate::proto::{STATE_HOLE, STATE_ZERO};

/// Size of the pieces reads and writes are split into.
const PIECE: usize = 64 * 1024;

/// Counters of executed operations.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemStats {
    pub reads: u64,
    pub writes: u64,
    pub bytes_written: u64,
    pub fua_writes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub zeroes: u64,
    pub caches: u64,
    pub block_status: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_written: AtomicU64,
    fua_writes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    zeroes: AtomicU64,
    caches: AtomicU64,
    block_status: AtomicU64,
}

/// A RAM-backed export.
pub struct MemExport {
    data: RwLock<Vec<u8>>,
    sizes: BlockSizes,
    read_only: bool,
    /// Advertise CAN_MULTI_CONN (true unless a test says otherwise).
    multi_conn: bool,
    /// Answer reads at once (`try_read`), as a cache answers hits: the
    /// server then serves them on the connection's reader thread.
    reads_at_once: bool,
    counters: Counters,
    /// Reads starting at these offsets sleep first.
    delays: Mutex<Vec<(u64, Duration)>>,
    /// Requests starting at these offsets fail with EIO.
    failures: Mutex<Vec<u64>>,
}

impl MemExport {
    /// A zero-filled export of `size` bytes, byte-granular, with a 32 MiB
    /// maximum request.
    pub fn new(size: usize) -> Self {
        Self {
            data: RwLock::new(vec![0; size]),
            sizes: BlockSizes {
                minimum: 1,
                preferred: 4096,
                maximum: 32 * 1024 * 1024,
            },
            read_only: false,
            multi_conn: true,
            reads_at_once: false,
            counters: Counters::default(),
            delays: Mutex::new(Vec::new()),
            failures: Mutex::new(Vec::new()),
        }
    }

    pub fn with_block_sizes(mut self, sizes: BlockSizes) -> Self {
        self.sizes = sizes;
        self
    }

    pub fn with_read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }

    /// See [`MemExport::reads_at_once`](Self).
    pub fn with_reads_at_once(mut self, yes: bool) -> Self {
        self.reads_at_once = yes;
        self
    }

    pub fn with_multi_conn(mut self, multi: bool) -> Self {
        self.multi_conn = multi;
        self
    }

    /// Reads starting exactly at `offset` sleep `delay` first.
    pub fn delay_reads_at(&self, offset: u64, delay: Duration) {
        self.delays.lock().push((offset, delay));
    }

    /// Reads, writes, trims and zeroes starting exactly at `offset` fail
    /// with EIO (and change nothing).
    pub fn fail_at(&self, offset: u64) {
        self.failures.lock().push(offset);
    }

    pub fn stats(&self) -> MemStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        MemStats {
            reads: l(&c.reads),
            writes: l(&c.writes),
            bytes_written: l(&c.bytes_written),
            fua_writes: l(&c.fua_writes),
            flushes: l(&c.flushes),
            trims: l(&c.trims),
            zeroes: l(&c.zeroes),
            caches: l(&c.caches),
            block_status: l(&c.block_status),
        }
    }

    /// A copy of `[offset, offset + len)` (clamped to the size).
    pub fn snapshot(&self, offset: usize, len: usize) -> Vec<u8> {
        let d = self.data.read();
        let start = offset.min(d.len());
        let end = offset.saturating_add(len).min(d.len());
        d[start..end].to_vec()
    }

    /// Overwrite `[offset, ..)` directly (test setup; not counted).
    pub fn fill(&self, offset: usize, bytes: &[u8]) {
        let mut d = self.data.write();
        let start = offset.min(d.len());
        let end = offset.saturating_add(bytes.len()).min(d.len());
        d[start..end].copy_from_slice(&bytes[..end - start]);
    }

    fn range(&self, offset: u64, len: u64) -> Result<(usize, usize), ExportError> {
        let size = self.data.read().len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok((offset as usize, end as usize)),
            _ => Err(ExportError::OutOfRange),
        }
    }

    fn check_fail(&self, offset: u64) -> Result<(), ExportError> {
        if self.failures.lock().contains(&offset) {
            return Err(ExportError::Io(io::Error::other(format!(
                "injected failure at offset {offset}"
            ))));
        }
        Ok(())
    }

    fn writable(&self) -> Result<(), ExportError> {
        if self.read_only {
            Err(ExportError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn zero(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.writable()?;
        self.check_fail(offset)?;
        let (s, e) = self.range(offset, len)?;
        self.data.write()[s..e].fill(0);
        Ok(())
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.data.read().len() as u64
    }

    fn block_sizes(&self) -> BlockSizes {
        self.sizes
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn multi_conn(&self) -> bool {
        self.multi_conn
    }

    fn try_read(
        &self,
        offset: u64,
        len: u32,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Option<Result<(), ExportError>> {
        self.reads_at_once.then(|| self.read(offset, len, sink))
    }

    fn read(
        &self,
        offset: u64,
        len: u32,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Result<(), ExportError> {
        let delay = self
            .delays
            .lock()
            .iter()
            .find(|(o, _)| *o == offset)
            .map(|(_, d)| *d);
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        self.check_fail(offset)?;
        let (s, e) = self.range(offset, len.into())?;
        let d = self.data.read();
        // Hand out the buffer itself, in pieces: no copy here.
        let slices: Vec<IoSlice<'_>> = d[s..e].chunks(PIECE).map(IoSlice::new).collect();
        self.counters.reads.fetch_add(1, Ordering::SeqCst);
        sink(&slices).map_err(ExportError::Io)
    }

    fn write(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        source: &mut dyn FnMut(&mut [IoSliceMut<'_>]) -> io::Result<()>,
    ) -> Result<(), ExportError> {
        self.writable()?;
        self.check_fail(offset)?;
        let (s, e) = self.range(offset, len.into())?;
        // A test export stages the payload so a failed transfer changes
        // nothing; the real engine hands out cache slots instead.
        let mut stage = vec![0u8; e - s];
        {
            let mut slices: Vec<IoSliceMut<'_>> =
                stage.chunks_mut(PIECE).map(IoSliceMut::new).collect();
            source(&mut slices).map_err(ExportError::Transfer)?;
        }
        self.data.write()[s..e].copy_from_slice(&stage);
        self.counters.writes.fetch_add(1, Ordering::SeqCst);
        self.counters
            .bytes_written
            .fetch_add(u64::from(len), Ordering::SeqCst);
        if fua {
            self.counters.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<(), ExportError> {
        // Zeroing memory is always "fast", so FAST_ZERO never fails here.
        self.zero(offset, len)?;
        self.counters.zeroes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), ExportError> {
        // Trimmed ranges read back as zeroes (allowed: trim is a hint).
        self.zero(offset, len)?;
        self.counters.trims.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.counters.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.range(offset, len)?;
        self.counters.caches.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Zero 4 KiB pieces are reported as holes that read as zeroes.
    fn block_status(&self, offset: u64, len: u64) -> Option<Result<Vec<Extent>, ExportError>> {
        let (s, e) = match self.range(offset, len) {
            Ok(r) => r,
            Err(err) => return Some(Err(err)),
        };
        self.counters.block_status.fetch_add(1, Ordering::SeqCst);
        let d = self.data.read();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = s;
        while pos < e {
            // Pieces end on 4 KiB boundaries of the export.
            let end = ((pos / 4096 + 1) * 4096).min(e);
            let flags = if d[pos..end].iter().all(|b| *b == 0) {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            let n = (end - pos) as u32;
            match out.last_mut() {
                Some(last) if last.flags == flags && last.length.checked_add(n).is_some() => {
                    last.length += n
                }
                _ => out.push(Extent { length: n, flags }),
            }
            pos = end;
        }
        Some(Ok(out))
    }
}
