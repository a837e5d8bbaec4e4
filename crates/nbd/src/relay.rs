//! Zero-copy relay: data that only passes through (a bypassed cache miss,
//! a write that goes around the cache) parks in a kernel pipe on its way
//! from one socket to the other, moved by `splice`, so it never enters
//! user memory.
//!
//! The pipe is sized at twice the payload where allowed (a pipe counts
//! pages, and socket data arrives in pieces), so the thread that fills it
//! never waits for the thread that will drain it. Whatever does not go
//! into the pipe in order (a chunk out of order, a hole, a pipe that filled
//! after all) lands in a tail buffer in user memory and is sent after the
//! pipe's bytes: the relay is always complete, at worst with a copy.

use std::fs::File;
use std::io::{self, IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::Mutex;

use crate::net::Stream;

/// The largest payload relayed (fs.pipe-max-size is 1 MiB by default).
pub const MAX_RELAY: usize = 1 << 20;
/// Idle pipes kept for reuse.
const POOL_MAX: usize = 32;
/// Pipes in existence at most (two descriptors each): past it, payloads go
/// through memory rather than take descriptors that accept() or an origin
/// reconnect would need.
const LIVE_MAX: usize = 256;

static LIVE: AtomicUsize = AtomicUsize::new(0);

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());
/// Set once a pipe of twice the payload was refused: ask for less from then on.
static LIMITED: AtomicBool = AtomicBool::new(false);

/// A pipe: both ends and its capacity in bytes.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

impl Pipe {
    /// An empty pipe of `want` bytes, or of `least` where the system
    /// allows no more (`fs.pipe-max-size` without CAP_SYS_RESOURCE): from
    /// the pool, else new. `None` if not even `least` can be had.
    fn take(want: usize, least: usize) -> Option<Pipe> {
        let want = if LIMITED.load(Ordering::Relaxed) {
            least
        } else {
            want
        };
        {
            let mut pool = POOL.lock();
            if let Some(i) = pool.iter().position(|p| p.cap >= want) {
                return Some(pool.swap_remove(i));
            }
        }
        if LIVE.load(Ordering::Relaxed) >= LIVE_MAX {
            return None;
        }
        match Self::create(want.next_power_of_two()) {
            Ok(p) => Some(p),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                LIMITED.store(true, Ordering::Relaxed);
                Self::create(least.next_power_of_two()).ok()
            }
            Err(_) => None,
        }
    }

    /// A new pipe of `cap` bytes; EPERM if that is over the size allowed.
    fn create(cap: usize) -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two descriptors for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are new descriptors owned by no one else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ on a pipe we own, with an integer argument.
        let got = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, cap as libc::c_int) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        if got < cap as libc::c_int {
            return Err(io::Error::other("pipe smaller than asked"));
        }
        LIVE.fetch_add(1, Ordering::Relaxed);
        Ok(Pipe { r, w, cap })
    }

    /// Back to the pool (the caller checked that it is empty).
    fn give_back(self) {
        let mut pool = POOL.lock();
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }

    /// Bytes in the pipe, as the kernel counts them.
    fn queued(&self) -> io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the valid pointer.
        if unsafe { libc::ioctl(self.r.as_raw_fd(), libc::FIONREAD, &mut n) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `splice(2)` without offsets (both ends are a pipe or a socket).
fn splice(from: RawFd, to: RawFd, len: usize, flags: libc::c_uint) -> io::Result<usize> {
    // SAFETY: null offsets are allowed for pipes and sockets; the kernel
    // checks the descriptors, and no user memory is involved.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            flags | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Splice exactly `len` bytes from pipe `from` to `to`, waiting for room.
fn splice_all(from: RawFd, to: RawFd, len: usize) -> io::Result<()> {
    let mut left = len;
    while left > 0 {
        match splice(from, to, left, 0) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => left -= k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How a [`Relayed::pass`] ended.
pub(crate) enum Passed {
    /// Every byte went on.
    Whole,
    /// The destination failed; the rest was read from the source and dropped.
    DestFailed(io::Error),
    /// The source failed after the first `sent` bytes went on, each piece
    /// whole with its header.
    SourceFailed { err: io::Error, sent: usize },
}

/// The least a piece of a passed payload carries (but the last): pieces
/// arrive as the sender's socket buffer lets them, and each costs a header.
const PIECE_MIN: usize = 64 << 10;

/// Wait until `fd` is readable (or hung up), at most `timeout` (the
/// socket's own read timeout, which a blocking read would have honoured).
fn wait_readable(fd: RawFd, timeout: Option<Duration>) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |t| {
        t.as_millis().clamp(1, i32::MAX as u128) as libc::c_int
    });
    loop {
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "payload stalled"));
        }
        if n > 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A READ payload on its way through: bytes `[0, in_pipe)` in the pipe,
/// `[in_pipe, len)` in `tail` (allocated only if needed).
pub struct Relayed {
    pipe: Option<Pipe>,
    len: usize,
    in_pipe: usize,
    tail: Vec<u8>,
    /// Sent on as it arrived ([`Relayed::pass`]): nothing is left to send.
    passed: bool,
}

impl std::fmt::Debug for Relayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relayed")
            .field("len", &self.len)
            .field("in_pipe", &self.in_pipe)
            .field("tail", &self.tail.len())
            .finish()
    }
}

impl Relayed {
    /// Room for `len` bytes, or `None` if relaying does not apply (too
    /// large, or no pipe of that size to be had).
    pub fn new(len: usize) -> Option<Self> {
        if len == 0 || len > MAX_RELAY {
            return None;
        }
        Some(Self {
            pipe: Some(Pipe::take(2 * len, len)?),
            len,
            in_pipe: 0,
            tail: Vec::new(),
            passed: false,
        })
    }

    /// An empty relay without a pipe: what is left where one was taken out.
    pub(crate) fn spent() -> Self {
        Self {
            pipe: None,
            len: 0,
            in_pipe: 0,
            tail: Vec::new(),
            passed: false,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes that went through user memory (for statistics and tests).
    pub fn copied(&self) -> usize {
        self.len - self.in_pipe
    }

    /// The tail, from `in_pipe` on; allocated on first use.
    fn tail_at(&mut self, at: usize, n: usize) -> io::Result<&mut [u8]> {
        if at < self.in_pipe || at + n > self.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "relayed data overlaps data already received",
            ));
        }
        if self.tail.is_empty() {
            self.tail = vec![0; self.len - self.in_pipe];
        }
        let from = at - self.in_pipe;
        Ok(&mut self.tail[from..from + n])
    }

    /// Take `n` payload bytes for offset `at` from `src`: spliced into the
    /// pipe when they come in order, read into the tail otherwise.
    pub(crate) fn receive(&mut self, src: &Stream, at: usize, n: usize) -> io::Result<()> {
        let mut done = 0;
        if at == self.in_pipe && self.tail.is_empty() && !src.is_tls() {
            done = self.splice_in(src, n)?;
        }
        if done < n {
            let buf = self.tail_at(at + done, n - done)?;
            src.read_exact(buf)?;
        }
        Ok(())
    }

    /// Splice up to `n` bytes from socket `src` into the pipe; fewer only if
    /// the pipe is full. Never blocks on the pipe: nothing drains it yet.
    fn splice_in(&mut self, src: &Stream, n: usize) -> io::Result<usize> {
        let fd = src.as_raw_fd();
        let w = self.pipe.as_ref().map(|p| p.w.as_raw_fd()).unwrap_or(-1);
        let mut done = 0;
        let mut polled = false;
        while done < n {
            match splice(fd, w, n - done, libc::SPLICE_F_NONBLOCK) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(k) => {
                    done += k;
                    self.in_pipe += k;
                    polled = false;
                }
                // Readable, yet nothing moved: the pipe is full.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && polled => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_readable(fd, src.read_timeout()?)?;
                    polled = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Cut-through: the whole payload, about to arrive in order on `src`,
    /// goes on to `dst` (which the caller holds for writing, with room for
    /// it) piece by piece as it arrives, through the pipe, instead of
    /// parking there first: the next hop starts with the first piece.
    /// `head(at, n)` writes to `dst` what goes before the piece of `n` bytes
    /// at payload offset `at` (a reply chunk's header). The relay is spent
    /// afterwards. A failing `dst` does not stop `src` being read to the
    /// end, so `src` stays in step.
    pub(crate) fn pass(
        &mut self,
        src: &Stream,
        dst: &Stream,
        head: &mut dyn FnMut(usize, usize) -> io::Result<()>,
    ) -> Passed {
        let fail = |err, sent| Passed::SourceFailed { err, sent };
        if self.in_pipe != 0 || !self.tail.is_empty() || self.passed || dst.is_tls() {
            let err = io::Error::other("a relay can only pass on a whole payload");
            return fail(err, 0);
        }
        let Some(pipe) = self.pipe.as_ref() else {
            return fail(io::Error::other("relay without a pipe"), 0);
        };
        let (fd, w, r) = (src.as_raw_fd(), pipe.w.as_raw_fd(), pipe.r.as_raw_fd());
        self.passed = true;
        let mut failed = None;
        let (mut sent, mut held) = (0, 0);
        while sent < self.len {
            let left = self.len - sent - held;
            match splice(fd, w, left, libc::SPLICE_F_NONBLOCK) {
                Ok(0) => return fail(io::ErrorKind::UnexpectedEof.into(), sent),
                Ok(k) => held += k,
                // Only `src` can make this wait: the pipe holds the payload.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let timeout = match src.read_timeout() {
                        Ok(t) => t,
                        Err(e) => return fail(e, sent),
                    };
                    if let Err(e) = wait_readable(fd, timeout) {
                        return fail(e, sent);
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return fail(e, sent),
            }
            // A piece goes on once it is large enough, or the last.
            if held < PIECE_MIN && sent + held < self.len {
                continue;
            }
            if failed.is_none() {
                failed = head(sent, held)
                    .and_then(|()| splice_all(r, dst.as_raw_fd(), held))
                    .err();
            }
            if failed.is_some() && !pipe.queued().is_ok_and(|q| q == 0 || discard(pipe, q)) {
                return fail(io::Error::other("cannot empty a relay pipe"), sent);
            }
            (sent, held) = (sent + held, 0);
        }
        failed.map_or(Passed::Whole, Passed::DestFailed)
    }

    /// An error if the payload went on as it arrived: nothing is left.
    fn unpassed(&self) -> io::Result<()> {
        if self.passed {
            return Err(io::Error::other("a relay passed on holds no data"));
        }
        Ok(())
    }

    /// Whether the payload went on as it arrived ([`Relayed::pass`]).
    pub fn was_passed(&self) -> bool {
        self.passed
    }

    /// The same bytes in a relay of their own, this one untouched: the
    /// pipe duplicated by `tee` (page references, not copies). A send
    /// consumes its pipe, so each attempt of an origin write sends a copy.
    pub fn dup(&self) -> io::Result<Relayed> {
        self.unpassed()?;
        let pipe = self
            .pipe
            .as_ref()
            .ok_or_else(|| io::Error::other("relay without a pipe"))?;
        let twin = Pipe::take(pipe.cap, pipe.cap)
            .ok_or_else(|| io::Error::other("no pipe for a relay copy"))?;
        let mut done = 0;
        while done < self.in_pipe {
            // SAFETY: both are pipes we own; tee touches no user memory.
            let n = unsafe {
                libc::tee(
                    pipe.r.as_raw_fd(),
                    twin.w.as_raw_fd(),
                    self.in_pipe - done,
                    libc::SPLICE_F_NONBLOCK,
                )
            };
            match n {
                // The twin has the slots the original has: it cannot fill.
                0 => return Err(io::Error::other("tee found the relay pipe short")),
                n if n > 0 => done += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(Relayed {
            pipe: Some(twin),
            len: self.len,
            in_pipe: self.in_pipe,
            tail: self.tail.clone(),
            passed: false,
        })
    }

    /// Move every byte into `dst` (which must hold exactly `len`), out of
    /// the pipe by `read`: where the data must be in memory after all.
    pub fn read_out(&mut self, dst: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        self.unpassed()?;
        let total: usize = dst.iter().map(|d| d.len()).sum();
        let pipe = self
            .pipe
            .as_ref()
            .ok_or_else(|| io::Error::other("relay without a pipe"))?;
        if total != self.len || pipe.queued()? != self.in_pipe {
            return Err(io::Error::other("relay read out into the wrong size"));
        }
        let mut from_pipe = File::from(pipe.r.try_clone()?);
        let (mut at, mut skip) = (0, 0);
        for d in dst.iter_mut() {
            let d: &mut [u8] = d;
            let dl = d.len();
            let n = dl.min(self.in_pipe.saturating_sub(at));
            from_pipe.read_exact(&mut d[..n])?;
            d[n..].copy_from_slice(&self.tail[skip..skip + dl - n]);
            skip += dl - n;
            at += dl;
        }
        self.in_pipe = 0;
        Ok(())
    }

    /// Every byte moved into memory, out of the pipe.
    pub fn take_bytes(&mut self) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; self.len];
        self.read_out(&mut [IoSliceMut::new(&mut v)])?;
        Ok(v)
    }

    /// The bytes in memory, this relay untouched.
    pub fn to_vec(&self) -> io::Result<Vec<u8>> {
        self.dup()?.take_bytes()
    }

    /// A hole: zeroes (the tail starts zeroed).
    pub(crate) fn zero(&mut self, at: usize, n: usize) -> io::Result<()> {
        self.tail_at(at, n).map(|_| ())
    }

    /// Send every byte to `dst`, which the caller holds for writing: the
    /// pipe's bytes by splice, then the tail.
    pub(crate) fn send(&self, dst: &Stream) -> io::Result<()> {
        self.unpassed()?;
        let pipe = self
            .pipe
            .as_ref()
            .ok_or_else(|| io::Error::other("relay without a pipe"))?;
        // A count that disagreed with the kernel's would block forever below.
        if dst.is_tls() {
            return Err(io::Error::other(
                "a relay cannot be spliced into a TLS session",
            ));
        }
        let queued = pipe.queued()?;
        if queued != self.in_pipe {
            return Err(io::Error::other(format!(
                "relay pipe holds {queued} bytes, expected {}",
                self.in_pipe
            )));
        }
        splice_all(pipe.r.as_raw_fd(), dst.as_raw_fd(), self.in_pipe)?;
        if !self.tail.is_empty() {
            dst.write_all(&self.tail)?;
        }
        Ok(())
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        if let Some(p) = self.pipe.take() {
            // A payload already sent as a copy (`dup`) is still in its pipe:
            // dropped into /dev/null, the pipe is reused rather than made anew.
            if p.queued().is_ok_and(|q| q == 0 || discard(&p, q)) {
                p.give_back();
            }
        }
    }
}

/// Empty `p` of its `queued` bytes without reading them; true if it is empty.
fn discard(p: &Pipe, queued: usize) -> bool {
    static NULL: OnceLock<Option<File>> = OnceLock::new();
    let Some(null) = NULL.get_or_init(|| File::options().write(true).open("/dev/null").ok()) else {
        return false;
    };
    let mut left = queued;
    while left > 0 {
        match splice(
            p.r.as_raw_fd(),
            null.as_raw_fd(),
            left,
            libc::SPLICE_F_NONBLOCK,
        ) {
            Ok(n) if n > 0 => left -= n.min(left),
            _ => return false,
        }
    }
    p.queued().is_ok_and(|q| q == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::thread;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    /// Relay `chunks` ((offset, data) or holes as `None` data) written by
    /// another thread; return what the far end received.
    fn relay(len: usize, pieces: Vec<(usize, Option<Vec<u8>>)>, shrink: bool) -> (Vec<u8>, usize) {
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let (out_tx, mut out_rx) = UnixStream::pair().unwrap();
        let mut r = Relayed::new(len).unwrap();
        if shrink {
            // A pipe of one page: every later byte must go to the tail.
            let p = r.pipe.as_mut().unwrap();
            // SAFETY: F_SETPIPE_SZ on a pipe we own.
            assert!(unsafe { libc::fcntl(p.w.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) } >= 4096);
            p.cap = 4096; // as the pool must know it
        }
        let plan: Vec<(usize, usize, bool)> = pieces
            .iter()
            .map(|(o, d)| (*o, d.as_ref().map_or(0, |d| d.len()), d.is_some()))
            .collect();
        let writer = thread::spawn(move || {
            for (_, d) in pieces {
                if let Some(d) = d {
                    tx.write_all(&d).unwrap();
                }
            }
        });
        let src = Stream::Unix(rx);
        for (off, n, data) in plan {
            if data {
                r.receive(&src, off, n).unwrap();
            } else {
                r.zero(off, 4096).unwrap();
            }
        }
        writer.join().unwrap();
        let copied = r.copied();
        let reader = thread::spawn(move || {
            let mut v = vec![0; len];
            out_rx.read_exact(&mut v).unwrap();
            v
        });
        r.send(&Stream::Unix(out_tx)).unwrap();
        (reader.join().unwrap(), copied)
    }

    #[test]
    fn in_order_data_is_spliced_whole() {
        let len = 1 << 20;
        let data = pattern(len);
        let pieces = data.chunks(300 * 1024).enumerate();
        let pieces = pieces
            .map(|(i, c)| (i * 300 * 1024, Some(c.to_vec())))
            .collect();
        let (got, copied) = relay(len, pieces, false);
        assert!(got == data, "relayed bytes differ");
        assert!(
            copied < len / 4,
            "{copied} of {len} bytes went through memory"
        );
    }

    /// Cut-through: a payload written in pieces, with pauses, reaches the
    /// far end exactly, each piece after its header, and the relay is spent.
    /// Where the far end has gone, the source is still read to the end;
    /// where the source fails midway, what went on is whole pieces.
    #[test]
    fn a_payload_passes_on_as_it_arrives() {
        let len = MAX_RELAY - 12345;
        let data = pattern(len);
        for case in ["whole", "far end gone", "source fails"] {
            let (mut tx, rx) = UnixStream::pair().unwrap();
            let (out_tx, mut out_rx) = UnixStream::pair().unwrap();
            let mut r = Relayed::new(len).unwrap();
            let d = data.clone();
            let writer = thread::spawn(move || {
                let upto = if case == "source fails" { len / 2 } else { len };
                for c in d[..upto].chunks(50 * 1024) {
                    tx.write_all(c).unwrap();
                    thread::sleep(Duration::from_millis(1));
                }
                if upto == len {
                    tx.write_all(b"next").unwrap();
                }
            });
            let reader = thread::spawn(move || {
                let mut v = Vec::new();
                if case != "far end gone" {
                    out_rx.read_to_end(&mut v).unwrap();
                }
                v
            });
            let src = Stream::Unix(rx);
            let dst = Stream::Unix(out_tx);
            if case == "far end gone" {
                thread::sleep(Duration::from_millis(20));
            }
            let mut pieces = Vec::new();
            let passed = r.pass(&src, &dst, &mut |at, n| {
                pieces.push((at, n));
                dst.write_all(b"HEAD")
            });
            drop(dst);
            writer.join().unwrap();
            let got = reader.join().unwrap();
            assert!(r.was_passed() && r.send(&src).is_err() && r.dup().is_err());
            let mut want = Vec::new();
            let mut at = 0;
            for &(a, n) in &pieces {
                assert_eq!(a, at, "{case}: pieces in order");
                assert!(
                    n >= PIECE_MIN || a + n == len,
                    "{case}: a piece of {n} bytes"
                );
                want.extend_from_slice(b"HEAD");
                want.extend_from_slice(&data[a..a + n]);
                at += n;
            }
            match passed {
                Passed::Whole => {
                    assert_eq!((case, at), ("whole", len));
                    assert!(got == want, "passed bytes differ");
                    let mut next = [0u8; 4];
                    src.read_exact(&mut next).unwrap();
                    assert_eq!(&next, b"next", "the source is read exactly to the end");
                }
                Passed::DestFailed(_) => assert_eq!(case, "far end gone"),
                Passed::SourceFailed { sent, .. } => {
                    assert_eq!(case, "source fails");
                    assert!(sent == at && sent <= len / 2, "{sent} bytes sent");
                    assert!(got == want, "what went on is whole pieces");
                }
            }
        }
    }

    #[test]
    fn out_of_order_chunks_and_holes_land_in_place() {
        let len = 64 * 1024;
        let data = pattern(len);
        let mut want = data.clone();
        want[16384..20480].fill(0);
        let pieces = vec![
            (0, Some(data[..8192].to_vec())),
            (32768, Some(data[32768..].to_vec())),
            (16384, None),
            (8192, Some(data[8192..16384].to_vec())),
            (20480, Some(data[20480..32768].to_vec())),
        ];
        let (got, copied) = relay(len, pieces, false);
        assert!(got == want, "relayed bytes differ");
        assert_eq!(copied, len - 8192, "only the first chunk came in order");
    }

    #[test]
    fn a_full_pipe_spills_into_the_tail() {
        let len = 256 * 1024;
        let data = pattern(len);
        let (got, copied) = relay(len, vec![(0, Some(data.clone()))], true);
        assert!(got == data, "relayed bytes differ");
        assert!(
            copied >= len - 4096,
            "only one page fits the pipe, {copied} copied"
        );
    }

    /// A relay a third in the pipe, the rest in the tail (a chunk came out
    /// of order).
    fn split_relay(data: &[u8]) -> Relayed {
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let q = data.len() / 3;
        for (a, b) in [(0, q), (2 * q, data.len()), (q, 2 * q)] {
            tx.write_all(&data[a..b]).unwrap();
        }
        let src = Stream::Unix(rx);
        let mut r = Relayed::new(data.len()).unwrap();
        for (a, b) in [(0, q), (2 * q, data.len()), (q, 2 * q)] {
            r.receive(&src, a, b - a).unwrap();
        }
        assert_eq!(r.copied(), data.len() - q);
        r
    }

    #[test]
    fn copies_and_read_out_leave_the_original_whole() {
        let data = pattern(96 * 1024);
        let mut r = split_relay(&data);
        // Read out across uneven slices, twice from copies, then the original.
        assert!(r.to_vec().unwrap() == data);
        let (mut a, mut b) = (vec![0u8; 10_000], vec![0u8; data.len() - 10_000]);
        r.dup()
            .unwrap()
            .read_out(&mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)])
            .unwrap();
        assert!(a[..] == data[..10_000] && b[..] == data[10_000..]);
        let (out_tx, mut out_rx) = UnixStream::pair().unwrap();
        let reader = thread::spawn(move || {
            let mut v = vec![0; 96 * 1024];
            out_rx.read_exact(&mut v).unwrap();
            v
        });
        r.dup().unwrap().send(&Stream::Unix(out_tx)).unwrap();
        assert!(reader.join().unwrap() == data);
        let mut all = vec![0u8; data.len()];
        r.read_out(&mut [IoSliceMut::new(&mut all)]).unwrap();
        assert!(all == data);
        assert!(
            r.read_out(&mut [IoSliceMut::new(&mut all[..5])]).is_err(),
            "wrong size"
        );
    }

    #[test]
    fn overlapping_data_is_refused() {
        let (mut tx, rx) = UnixStream::pair().unwrap();
        tx.write_all(&[1; 8192]).unwrap();
        let src = Stream::Unix(rx);
        let mut r = Relayed::new(8192).unwrap();
        r.receive(&src, 0, 4096).unwrap();
        assert!(r.receive(&src, 0, 4096).is_err());
        assert!(Relayed::new(MAX_RELAY + 1).is_none());
        assert!(Relayed::new(0).is_none());
    }
}
