//! An NBD server in the test process over any [`Origin`]: puts an origin
//! the test can watch (a `MemOrigin` with an observer) behind the real
//! `pmcache serve`, as `--origin nbd+unix:///?socket=PATH`. NBD requests
//! map one to one onto the origin's calls (FUA onto `fua`, FLUSH onto
//! `flush`, TRIM onto `write_zeroes`), so the origin sees exactly what
//! pmcache sends. Include with `#[path = "common/origin_export.rs"]`.

#![allow(dead_code)]

use std::io::{self, IoSlice, IoSliceMut};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pmcache_nbd::{
    BlockSizes, Export, ExportError, Server, ServerConfig, ShutdownHandle, ZeroFlags,
};
use pmcache_origin::Origin;
use pmcache_testkit::TempDir;

/// An [`Export`] that passes every request to an [`Origin`].
pub struct OriginExport(pub Arc<dyn Origin>);

impl Export for OriginExport {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
        }
    }

    fn read(
        &self,
        offset: u64,
        len: u32,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Result<(), ExportError> {
        let mut buf = vec![0; len as usize];
        self.0.read_at(&mut buf, offset)?;
        sink(&[IoSlice::new(&buf)]).map_err(ExportError::Io)
    }

    fn write(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        source: &mut dyn FnMut(&mut [IoSliceMut<'_>]) -> io::Result<()>,
    ) -> Result<(), ExportError> {
        // The whole payload first: a failed transfer writes nothing.
        let mut buf = vec![0; len as usize];
        source(&mut [IoSliceMut::new(&mut buf)]).map_err(ExportError::Transfer)?;
        Ok(self.0.write_at(&buf, offset, fua)?)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), ExportError> {
        Ok(self.0.write_zeroes(offset, len, flags.fua)?)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        Ok(self.0.write_zeroes(offset, len, fua)?)
    }

    fn flush(&self) -> Result<(), ExportError> {
        Ok(self.0.flush()?)
    }

    fn cache(&self, _offset: u64, _len: u64) -> Result<(), ExportError> {
        Ok(())
    }
}

/// [`OriginExport`] served on a Unix socket (a fixed path, so a restarted
/// pmcache finds the origin it recorded) by a thread of this process. Shut
/// down, with a bounded wait, by [`stop`](Self::stop) or on drop.
pub struct OriginServer {
    pub socket: PathBuf,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<io::Result<()>>>,
    _dir: TempDir,
}

impl OriginServer {
    pub fn start(origin: Arc<dyn Origin>) -> OriginServer {
        let server = Server::new(Arc::new(OriginExport(origin)), ServerConfig::default())
            .expect("NBD server over the origin");
        let dir = TempDir::new("oe");
        let socket = dir.join("origin.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind origin socket");
        let handle = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.serve_unix(listener));
        OriginServer {
            socket,
            handle,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// `nbd+unix:///?socket=PATH`.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Shut down and wait (at most 20 s) for the serving thread, which
    /// must end without error.
    pub fn stop(mut self) {
        match self.shutdown() {
            Some(Ok(r)) => r.expect("origin server failed"),
            Some(Err(_)) => panic!("origin server thread panicked"),
            None => panic!("origin server did not shut down within 20 s"),
        }
    }

    /// The thread's outcome, or `None` if it did not end within 20 s.
    #[allow(clippy::type_complexity)]
    fn shutdown(&mut self) -> Option<std::thread::Result<io::Result<()>>> {
        self.handle.shutdown();
        let t = self.thread.take()?;
        let end = Instant::now() + Duration::from_secs(20);
        while !t.is_finished() {
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(t.join())
    }
}

impl Drop for OriginServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
