//! The engine as an NBD export: the adapter between the protocol and the
//! engine, which knows nothing of NBD.

use std::io::{self, IoSlice, IoSliceMut};

use pmcache_engine::{Engine, EngineError, ReadReply, RelayReply, Stage, StagedWrite, WriteReply};
use pmcache_nbd::export::{
    BlockSizes, Export, ExportError, Extent, PendingWrite, ReadReply as ExportReadReply,
    RelayReadReply, Staged, WriteDone, WriteOutcome, ZeroFlags,
};
use pmcache_nbd::proto::STATE_ZERO;
use pmcache_nbd::{PassOn, Relayed};

/// What the server's client is told for an engine error.
fn to_export(e: EngineError) -> ExportError {
    match e {
        EngineError::OutOfRange { .. } => ExportError::OutOfRange,
        EngineError::TooLarge { .. } => ExportError::OutOfRange,
        EngineError::Transfer(e) => ExportError::Transfer(e),
        EngineError::ShuttingDown => ExportError::Io(io::Error::other("shutting down")),
        other => ExportError::Io(io::Error::other(other.to_string())),
    }
}

/// Wraps an engine for the NBD server, adding read-only mode.
pub struct EngineExport {
    pub engine: std::sync::Arc<Engine>,
    pub read_only: bool,
}

impl Export for EngineExport {
    fn size(&self) -> u64 {
        self.engine.size()
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            minimum: 1,
            preferred: self.engine.block_size(),
            maximum: self.engine.max_request(),
        }
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(
        &self,
        offset: u64,
        len: u32,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Result<(), ExportError> {
        self.engine
            .read_with(offset, len as u64, sink)
            .map_err(to_export)
    }

    fn read_or_relay(
        &self,
        offset: u64,
        len: u32,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Result<Option<Relayed>, ExportError> {
        self.engine
            .read_or_relay(offset, len as u64, sink)
            .map_err(to_export)
    }

    fn start_read(
        &self,
        offset: u64,
        len: u32,
        reply: ExportReadReply,
    ) -> Result<(), ExportReadReply> {
        self.engine
            .start_miss_read(offset, len as u64, ToExport(reply))
            .map_err(|r| r.0)
    }

    fn start_read_relayed(
        &self,
        offset: u64,
        len: u32,
        pass: Box<dyn PassOn>,
        reply: RelayReadReply,
    ) -> Result<(), RelayReadReply> {
        self.engine
            .start_read_relayed(offset, len as u64, pass, ToExportRelay(reply))
            .map_err(|r| r.0)
    }

    fn try_read(
        &self,
        offset: u64,
        len: u32,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Option<Result<(), ExportError>> {
        match self.engine.try_read_cached(offset, len as u64, sink) {
            Ok(true) => Some(Ok(())),
            Ok(false) => None,
            Err(e) => Some(Err(to_export(e))),
        }
    }

    fn write(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        source: &mut dyn FnMut(&mut [IoSliceMut<'_>]) -> io::Result<()>,
    ) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        self.engine
            .write_with(offset, len as u64, fua, source)
            .map_err(to_export)
    }

    fn write_from(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        self.engine.write(offset, data, fua).map_err(to_export)
    }

    fn prefers_relay(&self, offset: u64, len: u32, fua: bool) -> bool {
        !self.read_only && self.engine.write_goes_around(offset, len as u64, fua)
    }

    fn write_relayed(&self, offset: u64, data: &mut Relayed, fua: bool) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        self.engine
            .write_relayed(offset, data, fua)
            .map_err(to_export)
    }

    fn start_write_relayed(
        &self,
        offset: u64,
        data: Relayed,
        fua: bool,
        done: WriteDone,
    ) -> Result<(), (Relayed, WriteDone)> {
        if self.read_only {
            return Err((data, done));
        }
        self.engine
            .start_write_relayed(offset, data, fua, ToExportWrite(done))
            .map_err(|(data, r)| (data, r.0))
    }

    fn stage_write(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        source: &mut dyn FnMut(&mut [IoSliceMut<'_>]) -> io::Result<()>,
    ) -> Result<Staged, ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        let stage = self
            .engine
            .stage_write(offset, len as u64, fua, source)
            .map_err(to_export)?;
        Ok(match stage {
            Stage::Staged(w) => Staged::Pending(Box::new(Pending(Some(w)))),
            Stage::WouldWait => Staged::WouldWait,
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        // Zeroing is a metadata-only write in the cache: always fast.
        self.engine
            .write_zeroes(offset, len, flags.fua)
            .map_err(to_export)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        self.engine.trim(offset, len, fua).map_err(to_export)
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.engine.flush().map_err(to_export)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.engine.prefetch(offset, len).map_err(to_export)
    }

    fn block_status(&self, offset: u64, len: u64) -> Option<Result<Vec<Extent>, ExportError>> {
        let extents = self.engine.zero_extents(offset, len).map(|runs| {
            runs.into_iter()
                .map(|(n, zero)| Extent {
                    // At most 8,192 blocks of 64 KiB: fits.
                    length: n as u32,
                    flags: if zero { STATE_ZERO } else { 0 },
                })
                .collect()
        });
        Some(extents.map_err(to_export))
    }
}

/// A staged engine write, as the server's pending write.
/// A staged write; `None` once handed to `commit_async`.
struct Pending(Option<Box<StagedWrite>>);

impl PendingWrite for Pending {
    fn commit(self: Box<Self>) -> Result<(), ExportError> {
        match self.0 {
            Some(w) => StagedWrite::commit(*w).map_err(to_export),
            None => Ok(()),
        }
    }

    fn commit_is_quick(&self) -> bool {
        self.0.as_ref().is_some_and(|w| w.commit_is_quick())
    }

    fn commit_async(&mut self, done: WriteDone) -> Result<(), WriteDone> {
        self.start(done, StagedWrite::commit_async)
    }

    fn commit_when_idle(&mut self, done: WriteDone) -> Result<(), WriteDone> {
        self.start(done, StagedWrite::commit_when_idle)
    }
}

/// How a staged write's commit is started (see [`StagedWrite::commit_async`]).
type Start = fn(
    Box<StagedWrite>,
    ToExportWrite,
) -> std::result::Result<(), (Box<StagedWrite>, ToExportWrite)>;

impl Pending {
    /// Start the commit with `start`; where it declines, the write stays
    /// pending and `done` comes back.
    fn start(&mut self, done: WriteDone, start: Start) -> Result<(), WriteDone> {
        let Some(w) = self.0.take() else {
            return Err(done);
        };
        match start(w, ToExportWrite(done)) {
            Ok(()) => Ok(()),
            Err((w, reply)) => {
                self.0 = Some(w);
                Err(reply.0)
            }
        }
    }
}

/// An engine write's report in the export's terms.
struct ToExportWrite(WriteDone);

impl WriteReply for ToExportWrite {
    fn reply(self: Box<Self>, r: pmcache_engine::Result<()>) {
        (self.0)(WriteOutcome::Done(r.map_err(to_export)))
    }

    fn retry(self: Box<Self>, finish: Box<dyn FnOnce() -> pmcache_engine::Result<()> + Send>) {
        (self.0)(WriteOutcome::Retry(Box::new(move || {
            finish().map_err(to_export)
        })))
    }
}

/// An engine relayed read's reply in the export's terms.
struct ToExportRelay(RelayReadReply);

impl RelayReply for ToExportRelay {
    fn reply(self: Box<Self>, r: pmcache_engine::Result<Relayed>) {
        (self.0)(r.map_err(to_export))
    }
}

/// An engine read's reply in the export's terms.
struct ToExport(ExportReadReply);

impl ReadReply for ToExport {
    fn reply(self: Box<Self>, r: pmcache_engine::Result<&[IoSlice<'_>]>) {
        (self.0)(r.map_err(to_export))
    }
}
