//! What the server serves. The engine implements [`Export`]; the server only
//! moves bytes between the socket and the slices the export hands it, so a
//! payload goes from the socket straight into a cache slot and a read hit
//! goes from the mapping straight to the socket.

use crate::client::PassOn;
use crate::relay::Relayed;
use std::io::{self, IoSlice, IoSliceMut};

/// Block-size constraints advertised with NBD_INFO_BLOCK_SIZE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// Flags of WRITE_ZEROES.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    pub fua: bool,
    /// NBD_CMD_FLAG_NO_HOLE: the client wants allocated zeroes.
    pub no_hole: bool,
    /// NBD_CMD_FLAG_FAST_ZERO: fail with [`ExportError::NotSupported`] unless zeroing is fast.
    pub fast_zero: bool,
}

/// One base:allocation extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    /// NBD_STATE_HOLE | NBD_STATE_ZERO bits.
    pub flags: u32,
}

/// Errors an export reports; each maps to an NBD error code.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("request out of range")]
    OutOfRange,
    #[error("not supported")]
    NotSupported,
    #[error("no space")]
    NoSpace,
    #[error("read-only export")]
    ReadOnly,
    /// The payload source (the client's socket) failed: nothing was written,
    /// and the connection must end.
    #[error("payload transfer failed: {0}")]
    Transfer(io::Error),
}

/// Where a read started with [`Export::start_read`] sends its data.
pub type ReadReply = Box<dyn FnOnce(Result<&[IoSlice<'_>], ExportError>) + Send>;

/// Where a read started with [`Export::start_read_relayed`] sends its pipe.
pub type RelayReadReply = Box<dyn FnOnce(Result<Relayed, ExportError>) + Send>;

/// How a write finished by another thread ends (see
/// [`PendingWrite::commit_async`]).
pub enum WriteOutcome {
    /// Done (durable as the mode requires), or failed for good.
    Done(Result<(), ExportError>),
    /// Not yet: this, run on a thread that may wait, finishes it.
    Retry(Box<dyn FnOnce() -> Result<(), ExportError> + Send>),
}

/// Where a write started with [`PendingWrite::commit_async`] reports.
pub type WriteDone = Box<dyn FnOnce(WriteOutcome) + Send>;

/// A write whose payload the export holds, not yet acknowledged. Until
/// committed it is neither visible nor durable; dropping it writes nothing.
pub trait PendingWrite: Send {
    /// Finish the write; returns once it is durable (what
    /// [`Export::write`] promises on return).
    fn commit(self: Box<Self>) -> Result<(), ExportError>;

    /// Start the commit so that another thread finishes it, reporting to
    /// `done`, without waiting here. `Err(done)`, with nothing done and the
    /// write still pending, where it cannot.
    fn commit_async(&mut self, done: WriteDone) -> Result<(), WriteDone> {
        Err(done)
    }

    /// True when the commit never waits: no system call, no origin I/O,
    /// nothing another request holds for long (say, a CPU fence on pmem).
    /// The server then commits on the connection's thread, where a hand-off
    /// to a worker would cost more than the commit.
    fn commit_is_quick(&self) -> bool {
        false
    }

    /// [`commit_async`](Self::commit_async) when the connection has no
    /// other request in flight and none waiting to be read: the export may
    /// then finish the commit on the calling thread (reporting to `done`
    /// before it returns) where waking another thread would cost more, as
    /// long as it waits for nothing but its own persistence call.
    fn commit_when_idle(&mut self, done: WriteDone) -> Result<(), WriteDone> {
        self.commit_async(done)
    }
}

/// What [`Export::stage_write`] did.
pub enum Staged {
    /// The payload is in; commit it.
    Pending(Box<dyn PendingWrite>),
    /// Staging would wait: nothing received, nothing held.
    WouldWait,
}

/// A block device as the NBD server sees it. Must be safe to call from many
/// connections and threads at once.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    fn block_sizes(&self) -> BlockSizes;

    fn read_only(&self) -> bool {
        false
    }

    /// True when concurrent connections see one consistent device, so the
    /// server may advertise CAN_MULTI_CONN.
    fn multi_conn(&self) -> bool {
        true
    }

    /// Read `[offset, offset + len)`. The export calls `sink` exactly once on
    /// success, with slices that cover the range in order and stay valid for
    /// the call; the server writes them to the socket from there.
    /// On `Err`, `sink` was not called.
    fn read(
        &self,
        offset: u64,
        len: u32,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Result<(), ExportError>;

    /// [`read`](Self::read), or the data handed back in a relay pipe
    /// (`Some`; `sink` not called) where it only passes through, for the
    /// server to splice to the socket. Called only for plain (non-TLS)
    /// connections.
    fn read_or_relay(
        &self,
        offset: u64,
        len: u32,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Result<Option<Relayed>, ExportError> {
        self.read(offset, len, sink).map(|()| None)
    }

    /// Start a read that another thread finishes: `Ok` if started, and
    /// then `reply` is called exactly once (maybe before this returns);
    /// `Err(reply)` where the export would rather be read the waiting way.
    /// Never blocks. An error handed to `reply` leaves nothing held, and the
    /// server answers it by reading the waiting way (which retries).
    fn start_read(&self, offset: u64, len: u32, reply: ReadReply) -> Result<(), ReadReply> {
        let _ = (offset, len);
        Err(reply)
    }

    /// [`start_read`](Self::start_read) for a read that only passes
    /// through, answered with a relay pipe (see
    /// [`read_or_relay`](Self::read_or_relay)) that `pass` may have sent
    /// on as the data arrived. Called only for plain (non-TLS) connections.
    fn start_read_relayed(
        &self,
        offset: u64,
        len: u32,
        pass: Box<dyn PassOn>,
        reply: RelayReadReply,
    ) -> Result<(), RelayReadReply> {
        let _ = (offset, len, pass);
        Err(reply)
    }

    /// Serve a read at once if that needs no slow I/O (say, a cache hit),
    /// so the connection thread can answer it without a hand-off to a worker.
    /// `None` means "not now": `sink` was not called and the server sends
    /// the request to [`read`](Self::read) on a worker.
    fn try_read(
        &self,
        offset: u64,
        len: u32,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Option<Result<(), ExportError>> {
        let _ = (offset, len, sink);
        None
    }

    /// Write `[offset, offset + len)`. The export calls `source` exactly once
    /// with writable slices that cover the range in order; the server fills
    /// them from the socket. If `source` fails the export writes nothing and
    /// returns [`ExportError::Transfer`]. Returns once the write is durable.
    fn write(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        source: &mut dyn FnMut(&mut [IoSliceMut<'_>]) -> io::Result<()>,
    ) -> Result<(), ExportError>;

    /// [`write`](Self::write) of a payload the server already holds in
    /// memory (it could not be staged). Exports that can use the bytes in
    /// place override this; the default copies them into `write`'s slices.
    fn write_from(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        let len = u32::try_from(data.len())
            .map_err(|_| ExportError::Io(io::Error::other("write payload over 4 GiB")))?;
        self.write(offset, len, fua, &mut |slices| {
            let mut pos = 0;
            for s in slices.iter_mut() {
                let n = s.len().min(data.len() - pos);
                s[..n].copy_from_slice(&data[pos..pos + n]);
                pos += n;
            }
            if pos == data.len() {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "slices shorter than the payload",
                ))
            }
        })
    }

    /// Whether a write the server must buffer (it could not be staged)
    /// would rather have its payload in a relay pipe: it is likely to go
    /// straight on to another socket (see [`write_relayed`](Self::write_relayed)).
    /// Asked only for plain (non-TLS) connections.
    fn prefers_relay(&self, offset: u64, len: u32, fua: bool) -> bool {
        let _ = (offset, len, fua);
        false
    }

    /// [`write_from`](Self::write_from) of a payload the server received
    /// into a relay pipe (because [`prefers_relay`](Self::prefers_relay)
    /// said so). The default reads it into memory.
    fn write_relayed(&self, offset: u64, data: &mut Relayed, fua: bool) -> Result<(), ExportError> {
        let v = data.take_bytes().map_err(ExportError::Transfer)?;
        self.write_from(offset, &v, fua)
    }

    /// [`write_relayed`](Self::write_relayed) started without waiting, for
    /// the connection's reader: `done` is told once the write is done (on
    /// whatever thread finishes it), or gets the rest to run where waiting
    /// is fine. `Err`, with nothing done and `data` whole, where it cannot
    /// start so (the default).
    fn start_write_relayed(
        &self,
        offset: u64,
        data: Relayed,
        fua: bool,
        done: WriteDone,
    ) -> Result<(), (Relayed, WriteDone)> {
        let _ = (offset, fua);
        Err((data, done))
    }

    /// The first half of a write, for a server that receives payloads on
    /// one thread and finishes writes on others: take what the write needs
    /// *without waiting* and let `source` fill it, as [`write`](Self::write)
    /// does; [`PendingWrite::commit`] does the rest. [`Staged::WouldWait`]
    /// means that taking it would wait (say, for free space or an
    /// overlapping write): `source` was not called, nothing is held, and
    /// the server should buffer the payload and call `write` where waiting
    /// is fine. The default never stages.
    fn stage_write(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        source: &mut dyn FnMut(&mut [IoSliceMut<'_>]) -> io::Result<()>,
    ) -> Result<Staged, ExportError> {
        let _ = (offset, len, fua, source);
        Ok(Staged::WouldWait)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), ExportError>;

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError>;

    fn flush(&self) -> Result<(), ExportError>;

    /// Prefetch (NBD_CMD_CACHE).
    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError>;

    /// base:allocation extents from `offset`, covering at least one byte and
    /// at most `len`. `None` means the export does not track allocation.
    fn block_status(&self, offset: u64, len: u64) -> Option<Result<Vec<Extent>, ExportError>> {
        let _ = (offset, len);
        None
    }
}
