//! Putting requests in flight and waiting for them.

use std::io::{self, IoSlice};
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::connection::{Callback, Completion, Inner, Op, PassOn, RawBuf, RelayCompletion};
use super::Client;
use crate::proto::{command_name, Request, CMD_READ, CMD_WRITE};
use crate::relay::Relayed;

/// An op nobody waits for, before it is put in flight.
struct AsyncOp {
    command: u16,
    flags: u16,
    offset: u64,
    length: u32,
    /// Where a READ's data goes: the caller's memory,
    buf: Vec<RawBuf>,
    /// or a relay pipe,
    relay: Option<Relayed>,
    /// and from there on as it arrives.
    pass: Option<Box<dyn PassOn>>,
}

impl Client {
    /// Put one request in flight. For READ, `dest` is where the reply's
    /// data will be written; the returned ticket keeps it borrowed.
    pub(super) fn submit<'a>(
        &'a self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
        dest: Option<&'a mut [u8]>,
    ) -> io::Result<Ticket<'a>> {
        let payload = payload.map(IoSlice::new);
        self.submit_v(
            command,
            flags,
            offset,
            length,
            payload.as_slice(),
            dest.into_iter().collect(),
        )
    }

    /// [`submit`](Self::submit) with the payload gathered from, or the
    /// reply's data scattered into, several buffers: one request however
    /// many cache slots it spans.
    pub(super) fn submit_v<'a>(
        &'a self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[IoSlice<'_>],
        dest: Vec<&'a mut [u8]>,
    ) -> io::Result<Ticket<'a>> {
        debug_assert!(
            dest.is_empty() || dest.iter().map(|d| d.len()).sum::<usize>() == length as usize
        );
        let buf = dest
            .into_iter()
            .map(|b| RawBuf {
                ptr: b.as_mut_ptr(),
                len: b.len(),
            })
            .collect();
        self.submit_op(
            command,
            flags,
            offset,
            length,
            Out::Slices(payload),
            buf,
            None,
        )
    }

    /// A READ whose data the reader thread puts into `relay`.
    pub(super) fn submit_relayed(
        &self,
        offset: u64,
        relay: Relayed,
    ) -> io::Result<(Ticket<'_>, Arc<Op>)> {
        debug_assert!(relay.len() <= self.inner.max_request as usize);
        let len = relay.len() as u32;
        let t = self.submit_op(CMD_READ, 0, offset, len, Out::NONE, Vec::new(), Some(relay))?;
        let op = t.op.clone();
        Ok((t, op))
    }

    /// A WRITE whose payload is spliced from `data`'s pipe (consumed).
    pub(super) fn submit_relayed_write(
        &self,
        flags: u16,
        offset: u64,
        data: &Relayed,
    ) -> io::Result<Ticket<'_>> {
        let len = data.len() as u32;
        self.submit_op(
            CMD_WRITE,
            flags,
            offset,
            len,
            Out::Relay(data),
            Vec::new(),
            None,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_op(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Out<'_, '_>,
        buf: Vec<RawBuf>,
        relay: Option<Relayed>,
    ) -> io::Result<Ticket<'_>> {
        let op = Arc::new(Op::new(command, offset, length, buf, relay, None));
        self.put_in_flight(&op, flags, payload)?;
        // From here on the ticket must be waited for (its Drop does that).
        Ok(Ticket {
            inner: &self.inner,
            op,
            _buf: PhantomData,
        })
    }

    /// A READ into `buf`, or a WRITE of `payload`, that nobody waits for:
    /// `done` runs on the reader thread when it completes (or fails).
    /// `Err(done)` if the connection is already dead; then nothing was sent
    /// and `done` is handed back.
    pub(super) fn submit_async(
        &self,
        command: u16,
        offset: u64,
        length: u32,
        (buf, payload): (Vec<RawBuf>, &[IoSlice<'_>]),
        done: Completion,
    ) -> Result<(), Completion> {
        self.submit_async_out(
            command,
            0,
            offset,
            length,
            (buf, Out::Slices(payload)),
            done,
        )
    }

    /// [`submit_async`](Self::submit_async) with request flags and a payload
    /// that may be a relay pipe (spliced out, so consumed).
    pub(super) fn submit_async_out(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        (buf, payload): (Vec<RawBuf>, Out<'_, '_>),
        done: Completion,
    ) -> Result<(), Completion> {
        let op = AsyncOp {
            command,
            flags,
            offset,
            length,
            buf,
            relay: None,
            pass: None,
        };
        match self.submit_callback(op, payload, Callback::Result(done)) {
            Ok(()) => Ok(()),
            Err(Callback::Result(done)) => Err(done),
            Err(Callback::Relayed(_)) => unreachable!("the callback given back is the one given"),
        }
    }

    /// A READ into `relay` that nobody waits for, its payload offered to
    /// `pass` as it arrives: `done` gets the pipe (full, or passed on) on
    /// the reader thread.
    pub(super) fn submit_relayed_async(
        &self,
        offset: u64,
        relay: Relayed,
        pass: Option<Box<dyn PassOn>>,
        done: RelayCompletion,
    ) -> Result<(), RelayCompletion> {
        let op = AsyncOp {
            command: CMD_READ,
            flags: 0,
            offset,
            length: relay.len() as u32,
            buf: Vec::new(),
            relay: Some(relay),
            pass,
        };
        match self.submit_callback(op, Out::NONE, Callback::Relayed(done)) {
            Ok(()) => Ok(()),
            Err(Callback::Relayed(done)) => Err(done),
            Err(Callback::Result(_)) => unreachable!("the callback given back is the one given"),
        }
    }

    /// Put an op that nobody waits for in flight, with a deadline if the
    /// connection has a request timeout. `Err` gives `done` back, with
    /// nothing sent, if the connection is dead.
    fn submit_callback(
        &self,
        a: AsyncOp,
        payload: Out<'_, '_>,
        done: Callback,
    ) -> Result<(), Callback> {
        let deadline = self.inner.request_timeout.map(|t| Instant::now() + t);
        let op = Op::new(
            a.command,
            a.offset,
            a.length,
            a.buf,
            a.relay,
            Some((done, deadline)),
        );
        *op.pass.lock() = a.pass;
        let op = Arc::new(op);
        match self.put_in_flight(&op, a.flags, payload) {
            Ok(()) => {
                if deadline.is_some() {
                    super::watchdog::watch(&self.inner);
                }
                Ok(())
            }
            Err(_) => Err(op
                .callback
                .lock()
                .take()
                .expect("an op refused before it was in flight keeps its callback")),
        }
    }

    /// Enter `op` in the table of requests in flight and send it. `Err` if
    /// the connection is dead (`op` not entered); once entered, the op is
    /// completed by the reader thread, also when sending fails.
    fn put_in_flight(&self, op: &Arc<Op>, flags: u16, payload: Out<'_, '_>) -> io::Result<()> {
        let inner = &*self.inner;
        let (command, length) = (op.command, op.length);
        debug_assert!(match payload {
            Out::Slices(p) =>
                p.is_empty() || p.iter().map(|p| p.len()).sum::<usize>() == length as usize,
            Out::Relay(r) => r.len() == length as usize,
        });
        let cookie = inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        inner.put_op(cookie, op)?;
        let hdr = Request {
            flags,
            command,
            cookie,
            offset: op.offset,
            length,
        }
        .encode();
        let slices = match payload {
            Out::Slices(p) => p,
            Out::Relay(_) => &[],
        };
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(1 + slices.len());
        iov.push(IoSlice::new(&hdr));
        iov.extend(slices.iter().map(|p| IoSlice::new(p)));
        let sent = {
            let _g = inner.send_lock.lock();
            inner
                .stream
                .write_all_vectored(&mut iov)
                .and_then(|()| match payload {
                    Out::Relay(r) => r.send(&inner.stream),
                    Out::Slices(_) => Ok(()),
                })
        };
        if let Err(e) = sent {
            // The stream may be out of sync now: end the connection. The
            // reader fails every request in flight, this one included.
            inner.kill(format!("sending {} failed: {e}", command_name(command)));
        }
        Ok(())
    }
}

/// A request's payload: slices of memory, or a relay pipe spliced out.
#[derive(Clone, Copy)]
pub(super) enum Out<'p, 'q> {
    Slices(&'p [IoSlice<'q>]),
    Relay(&'p Relayed),
}

impl Out<'_, '_> {
    const NONE: Out<'static, 'static> = Out::Slices(&[]);
}

pub(super) fn collect(tickets: Vec<Ticket<'_>>, mut err: Option<io::Error>) -> io::Result<()> {
    for t in tickets {
        if let Err(e) = t.wait() {
            err.get_or_insert(e);
        }
    }
    err.map_or(Ok(()), Err)
}

/// A request in flight. Waiting consumes it; dropping it without waiting
/// still blocks until the request is finished, because the reader thread
/// may be writing into the buffer it borrows.
pub(super) struct Ticket<'a> {
    inner: &'a Inner,
    op: Arc<Op>,
    _buf: PhantomData<&'a mut [u8]>,
}

impl Ticket<'_> {
    /// Wait for the reply; the later Drop finds the op done.
    pub(super) fn wait(self) -> io::Result<()> {
        self.wait_done()
    }

    fn wait_done(&self) -> io::Result<()> {
        let deadline = self.inner.request_timeout.map(|t| (t, Instant::now() + t));
        let mut st = self.op.state.lock();
        let mut killed = false;
        while !st.done {
            match deadline {
                Some((t, d)) if !killed => {
                    if self.op.cv.wait_until(&mut st, d).timed_out() && !st.done {
                        drop(st);
                        self.inner.kill(format!(
                            "{} at offset {} timed out after {t:?}",
                            command_name(self.op.command),
                            self.op.offset
                        ));
                        killed = true;
                        st = self.op.state.lock();
                    }
                }
                _ => self.op.cv.wait(&mut st),
            }
        }
        st.result
            .take()
            .unwrap_or_else(|| Err(io::Error::other("request result already taken")))
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let done = self.op.state.lock().done;
        if !done {
            let _ = self.wait_done();
        }
    }
}
