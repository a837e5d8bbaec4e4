//! The engine as an NBD export.

use std::io::{self, IoSlice, IoSliceMut};

use pmcache_nbd::export::{
    BlockSizes, Export, ExportError, Extent, PendingWrite, Staged, ZeroFlags,
};

use crate::engine::{Engine, Stage, StagedWrite};
use crate::error::EngineError;

impl From<EngineError> for ExportError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::OutOfRange { .. } => ExportError::OutOfRange,
            EngineError::TooLarge { .. } => ExportError::OutOfRange,
            EngineError::Transfer(e) => ExportError::Transfer(e),
            EngineError::ShuttingDown => ExportError::Io(io::Error::other("shutting down")),
            other => ExportError::Io(io::Error::other(other.to_string())),
        }
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
        Ok(self.engine.read_with(offset, len as u64, sink)?)
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
            Err(e) => Some(Err(e.into())),
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
        Ok(self.engine.write_with(offset, len as u64, fua, source)?)
    }

    fn write_from(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        Ok(self.engine.write(offset, data, fua)?)
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
        Ok(
            match self.engine.stage_write(offset, len as u64, fua, source)? {
                Stage::Staged(w) => Staged::Pending(w),
                Stage::WouldWait => Staged::WouldWait,
            },
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        // Zeroing is a metadata-only write in the cache: always fast.
        Ok(self.engine.write_zeroes(offset, len, flags.fua)?)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        Ok(self.engine.trim(offset, len, fua)?)
    }

    fn flush(&self) -> Result<(), ExportError> {
        Ok(self.engine.flush()?)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        Ok(self.engine.prefetch(offset, len)?)
    }

    fn block_status(&self, offset: u64, len: u64) -> Option<Result<Vec<Extent>, ExportError>> {
        let _ = (offset, len);
        None
    }
}

impl PendingWrite for StagedWrite {
    fn commit(self: Box<Self>) -> Result<(), ExportError> {
        Ok(StagedWrite::commit(*self)?)
    }

    fn commit_is_quick(&self) -> bool {
        StagedWrite::commit_is_quick(self)
    }
}
