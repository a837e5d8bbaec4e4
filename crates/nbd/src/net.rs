//! Socket plumbing shared by the server and the client: one stream type
//! over TCP and Unix sockets, exact vectored reads and writes that loop on
//! partial I/O, and `poll` for "readable or woken up".
//!
//! Both `&TcpStream` and `&UnixStream` implement `Read` and `Write`, so one
//! stream can be read by one thread while others write replies to it (under
//! the caller's send lock) without cloning the descriptor. A TLS session
//! ([`TlsStream`]) is shared the same way; the plain variants never touch it.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::tls::TlsStream;

/// A connected NBD socket.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A TLS session over one of the others (after NBD_OPT_STARTTLS).
    Tls(Box<TlsStream>),
}

/// Send buffer asked for on Unix sockets: a 1 MiB reply or request fits
/// whole, so its writer hands it over in one go instead of waking up every
/// ~200 KiB (the default) as the peer drains it. TCP tunes its own.
const UNIX_SNDBUF: libc::c_int = 4 << 20;

impl Stream {
    /// A Unix stream with a send buffer large enough for a whole request
    /// (the kernel caps it at `net.core.wmem_max`; failure is harmless).
    pub fn unix(s: UnixStream) -> Self {
        let v = UNIX_SNDBUF;
        // SAFETY: SO_SNDBUF takes an int, passed by valid pointer and size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        Self::Unix(s)
    }

    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => (&*s).read(buf),
            Self::Unix(s) => (&*s).read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }

    /// One read into the slices: `readv` for a plain socket; under TLS,
    /// decrypted straight into the first non-empty slice.
    pub fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => (&*s).read_vectored(bufs),
            Self::Unix(s) => (&*s).read_vectored(bufs),
            Self::Tls(s) => match bufs.iter_mut().find(|b| !b.is_empty()) {
                Some(b) => s.read(b),
                None => Ok(0),
            },
        }
    }

    /// One write of the slices: `writev` for a plain socket; under TLS the
    /// slices are all sent (the count returned is all of them).
    pub fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => (&*s).write_vectored(bufs),
            Self::Unix(s) => (&*s).write_vectored(bufs),
            Self::Tls(s) => {
                s.write_all_vectored(bufs)?;
                Ok(bufs.iter().map(|b| b.len()).sum())
            }
        }
    }

    /// Shut down one or both directions. Errors (e.g. already closed) are
    /// ignored: this is only ever used to end a connection.
    pub fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Unix(s) => s.shutdown(how),
            Self::Tls(s) => {
                s.shutdown(how);
                Ok(())
            }
        };
    }

    /// The end of a connection: under TLS, say so (close_notify) if the
    /// socket takes it at once, then shut the socket down.
    pub fn close(&self) {
        self.close_notify();
        self.shutdown(Shutdown::Both);
    }

    /// Under TLS, send close_notify if the socket takes it at once (the
    /// peer then sees a proper end of the session); nothing otherwise.
    pub fn close_notify(&self) {
        if let Self::Tls(s) = self {
            s.close_notify();
        }
    }

    /// Bound every wait for the socket once a message has started.
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Self::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Self::Tls(s) => {
                s.set_timeouts(t);
                Ok(())
            }
        }
    }

    /// The read timeout of a plain socket (`None` for none, and for TLS).
    pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
        match self {
            Self::Tcp(s) => s.read_timeout(),
            Self::Unix(s) => s.read_timeout(),
            Self::Tls(_) => Ok(None),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_write_timeout(t),
            Self::Unix(s) => s.set_write_timeout(t),
            Self::Tls(s) => {
                s.set_write_timeout(t);
                Ok(())
            }
        }
    }

    /// Plain sockets only: a TLS session's socket is always non-blocking
    /// underneath, and its calls block (up to the timeout) by themselves.
    pub fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_nonblocking(nb),
            Self::Unix(s) => s.set_nonblocking(nb),
            Self::Tls(_) => Ok(()),
        }
    }

    /// A second handle on the same plain socket (for wrapping it in TLS).
    pub fn try_clone(&self) -> io::Result<Self> {
        match self {
            Self::Tcp(s) => Ok(Self::Tcp(s.try_clone()?)),
            Self::Unix(s) => Ok(Self::Unix(s.try_clone()?)),
            Self::Tls(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a TLS session cannot be cloned",
            )),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    /// A printable peer address for logs.
    pub fn peer(&self) -> String {
        match self {
            Self::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp:?".into()),
            Self::Unix(s) => unix_peer(s),
            Self::Tls(s) => s.peer(),
        }
    }

    /// Wait until the stream has data (or EOF) or `wake` fires. Under TLS,
    /// data already decrypted counts, which polling the socket would miss.
    pub fn poll_readable(
        &self,
        wake: Option<RawFd>,
        timeout: Option<Duration>,
    ) -> io::Result<Readiness> {
        match self {
            Self::Tls(s) => s.poll_readable(wake, timeout),
            _ => poll_readable(self.as_raw_fd(), wake, timeout),
        }
    }

    /// Read exactly `buf.len()` bytes. EOF before that is `UnexpectedEof`.
    pub fn read_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.read(&mut buf[done..]) {
                Ok(0) => return Err(eof(done, buf.len())),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Fill every slice of `bufs` completely with `readv` (straight from the
    /// socket into the caller's memory; no intermediate buffer), and in the
    /// same `readv` take up to `extra.len()` more bytes if they have already
    /// arrived (the next request's header), without waiting for them.
    /// Returns how many extra bytes were read. Saves a system call per
    /// pipelined WRITE.
    pub fn read_exact_vectored_then(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        extra: &mut [u8],
    ) -> io::Result<usize> {
        if let Self::Tls(s) = self {
            return s.read_exact_vectored_then(bufs, extra);
        }
        let want: usize = bufs.iter().map(|b| b.len()).sum();
        let mut all: Vec<IoSliceMut<'_>> = Vec::with_capacity(bufs.len() + 1);
        all.extend(bufs.iter_mut().map(|b| IoSliceMut::new(&mut b[..])));
        all.push(IoSliceMut::new(extra));
        let mut rest = &mut all[..];
        let mut done = 0;
        while done < want {
            match self.read_vectored(rest) {
                Ok(0) => return Err(eof(done, want)),
                Ok(n) => {
                    done += n;
                    IoSliceMut::advance_slices(&mut rest, n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done - want)
    }

    /// Read what has already arrived, without waiting: `None` when nothing
    /// has. Lets a busy connection skip `poll` between requests.
    pub fn read_nowait(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if let Self::Tls(s) = self {
            return s.read_nowait(buf);
        }
        loop {
            // SAFETY: `buf` is valid, writable memory of `buf.len()` bytes for
            // the duration of the call, and the descriptor is owned by `self`.
            let r = unsafe {
                libc::recv(
                    self.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if r >= 0 {
                return Ok(Some(r as usize));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(e),
            }
        }
    }

    /// The socket's send buffer size as the kernel counts it (overhead
    /// included); `None` under TLS or if the kernel will not say.
    pub fn send_buffer(&self) -> Option<usize> {
        if self.is_tls() {
            return None;
        }
        let mut sndbuf: libc::c_int = 0;
        let mut optlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `fd` is this stream's open socket; the out-pointer points
        // at a live `c_int` whose size `optlen` gives.
        let ok = unsafe {
            libc::getsockopt(
                self.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&mut sndbuf as *mut libc::c_int).cast(),
                &mut optlen,
            ) == 0
        };
        ok.then_some(sndbuf.max(0) as usize)
    }

    /// Bytes waiting in the socket's send buffer; `None` under TLS or if
    /// the kernel will not say.
    pub fn send_queued(&self) -> Option<usize> {
        if self.is_tls() {
            return None;
        }
        let mut queued: libc::c_int = 0;
        // SIOCOUTQ, which libc spells TIOCOUTQ (the same request number).
        // SAFETY: `fd` is this stream's open socket; the out-pointer points
        // at a live `c_int`.
        let ok = unsafe {
            libc::ioctl(
                self.as_raw_fd(),
                libc::TIOCOUTQ,
                &mut queued as *mut libc::c_int,
            ) == 0
        };
        ok.then_some(queued.max(0) as usize)
    }

    /// Write every slice completely, in order, with `writev`.
    pub fn write_all_vectored(&self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        if let Self::Tls(s) = self {
            return s.write_all_vectored(bufs);
        }
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match self.write_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        self.write_all_vectored(&mut [IoSlice::new(buf)])
    }

    /// Read and drop `n` bytes (the payload of a rejected request), through
    /// a small scratch buffer: nothing of it is kept or written anywhere.
    pub fn discard(&self, mut n: u64) -> io::Result<()> {
        let mut scratch = [0u8; 16 * 1024];
        while n > 0 {
            let want = n.min(scratch.len() as u64) as usize;
            match self.read(&mut scratch[..want]) {
                Ok(0) => return Err(eof(0, 1)),
                Ok(got) => n -= got as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
            Self::Tls(s) => s.as_raw_fd(),
        }
    }
}

fn eof(done: usize, want: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("connection closed after {done} of {want} bytes"),
    )
}

/// What [`poll_readable`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// `fd` has data (or EOF, or an error to report on read).
    Ready,
    /// The wake descriptor fired: the server is shutting down.
    Woken,
    TimedOut,
}

/// Wait until `fd` is readable or `wake` is. Used so that threads blocked
/// waiting for the next request (or connection) notice a shutdown, while
/// a request already being read is read to its end.
pub fn poll_readable(
    fd: RawFd,
    wake: Option<RawFd>,
    timeout: Option<Duration>,
) -> io::Result<Readiness> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms: libc::c_int = match timeout {
        None => -1,
        Some(t) => t.as_millis().min(i32::MAX as u128) as libc::c_int,
    };
    loop {
        // SAFETY: `fds` is a valid, initialised array of two pollfd structs
        // that lives across the call, and the length passed matches it. A
        // negative fd is ignored by poll(2).
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(Readiness::TimedOut);
        }
        if fds[1].revents != 0 {
            return Ok(Readiness::Woken);
        }
        return Ok(Readiness::Ready);
    }
}

/// `unix:` and the peer's socket path when it has one (a client socket
/// rarely does), else the path of our own end (the server's socket), so
/// that `stats` says which socket a connection came in on.
fn unix_peer(s: &UnixStream) -> String {
    let named = |a: std::io::Result<std::os::unix::net::SocketAddr>| {
        a.ok()
            .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
    };
    match named(s.peer_addr()).or_else(|| named(s.local_addr())) {
        Some(p) => format!("unix:{p}"),
        None => "unix".into(),
    }
}
