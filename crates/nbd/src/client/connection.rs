//! A connection as the client's threads share it: the socket, what the
//! handshake settled, and the table of requests in flight, which the
//! threads that submit requests fill and the reader thread empties.

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::export::BlockSizes;
use crate::net::Stream;
use crate::relay::Relayed;

/// The caller's buffer a READ reply is written into.
pub(super) struct RawBuf {
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
}

// SAFETY: the pointer is only dereferenced by the reader thread while the
// thread that lent the buffer is blocked in `Ticket` waiting for the op to
// complete (see `Ticket`), or, for a read without a waiter
// (`Client::read_raw_async`), while the lender keeps the memory for the
// callback that completes the op; so the buffer is never accessed from two
// threads at once.
unsafe impl Send for RawBuf {}
// SAFETY: as above; shared references to `RawBuf` never access the memory.
unsafe impl Sync for RawBuf {}

pub(super) struct OpState {
    pub(super) done: bool,
    pub(super) result: Option<io::Result<()>>,
    /// First error chunk of a structured reply.
    pub(super) error: Option<io::Error>,
    /// READ bytes delivered so far (data and hole chunks).
    pub(super) received: u64,
}

/// One request in flight.
pub(super) struct Op {
    pub(super) command: u16,
    pub(super) offset: u64,
    pub(super) length: u32,
    /// Where a READ's data goes: consecutive pieces of the caller's memory
    /// (empty for other commands).
    pub(super) buf: Vec<RawBuf>,
    /// Where a relayed READ's data goes instead of `buf` (see `crate::relay`).
    pub(super) relay: Option<Mutex<Relayed>>,
    /// Where that data may go on as it arrives, instead of parking in the
    /// pipe until the read completes.
    pub(super) pass: Mutex<Option<Box<dyn PassOn>>>,
    pub(super) state: Mutex<OpState>,
    pub(super) cv: Condvar,
    /// For a request nobody waits for: what to run when it completes, and
    /// when the connection is to be given up if it has not.
    pub(super) callback: Mutex<Option<Callback>>,
    pub(super) deadline: Option<Instant>,
}

/// What runs when a request without a waiter (a read or a write) completes,
/// on the thread that completed it (the connection's reader), with its
/// result.
pub type Completion = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Where a relayed READ's payload may go as it arrives (cut-through): a
/// client's socket, where the read only passes through.
pub trait PassOn: Send {
    /// The whole payload is about to arrive on `src`, in order: send it on
    /// with [`Relayed::pass`](crate::relay::Relayed), or return `Ok(false)`,
    /// having read nothing, where that cannot be done now (the payload then
    /// parks in `relay`'s pipe as usual). `Err` is `src`'s failure.
    fn pass_on(self: Box<Self>, src: &Stream, relay: &mut Relayed) -> io::Result<bool>;
}

/// What runs when a relayed READ without a waiter completes: its pipe, full
/// of the data, or why it failed (see [`Completion`]).
pub type RelayCompletion = Box<dyn FnOnce(io::Result<Relayed>) + Send>;

/// A request's completion: with its result, or with the relay pipe a READ
/// filled.
pub(super) enum Callback {
    Result(Completion),
    Relayed(RelayCompletion),
}

impl Callback {
    /// Run it with the op's result (a READ's relay pipe taken from `op`).
    fn run(self, op: &Op, r: io::Result<()>) {
        match self {
            Callback::Result(done) => done(r),
            Callback::Relayed(done) => done(r.and_then(|()| {
                op.relay
                    .as_ref()
                    .map(|m| std::mem::replace(&mut *m.lock(), Relayed::spent()))
                    .ok_or_else(|| io::Error::other("a relayed read without its pipe"))
            })),
        }
    }
}

impl Op {
    pub(super) fn new(
        command: u16,
        offset: u64,
        length: u32,
        buf: Vec<RawBuf>,
        relay: Option<Relayed>,
        callback: Option<(Callback, Option<Instant>)>,
    ) -> Self {
        let (callback, deadline) = match callback {
            Some((c, d)) => (Some(c), d),
            None => (None, None),
        };
        Self {
            command,
            offset,
            length,
            buf,
            relay: relay.map(Mutex::new),
            pass: Mutex::new(None),
            state: Mutex::new(OpState {
                done: false,
                result: None,
                error: None,
                received: 0,
            }),
            cv: Condvar::new(),
            callback: Mutex::new(callback),
            deadline,
        }
    }

    /// Finish the op: its waiter wakes, or its callback runs here.
    pub(super) fn complete(&self, r: io::Result<()>) {
        let callback = self.callback.lock().take();
        let mut st = self.state.lock();
        st.done = true;
        match callback {
            None => {
                st.result = Some(r);
                self.cv.notify_all();
            }
            Some(done) => {
                drop(st);
                // A panic must not end the reader, which serves every
                // other request on this connection.
                let ran =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| done.run(self, r)));
                if ran.is_err() {
                    tracing::error!("a request's completion panicked; its request is lost");
                }
            }
        }
    }
}

pub(super) struct Pending {
    pub(super) ops: HashMap<u64, Arc<Op>>,
    /// Set by the reader when it stops; no op is accepted after that.
    pub(super) dead: Option<String>,
    /// Why another thread tore the connection down (for messages).
    pub(super) kill_reason: Option<String>,
}

/// One connection, shared by the `Client` and its reader thread.
pub(super) struct Inner {
    pub(super) uri: String,
    pub(super) stream: Stream,
    pub(super) send_lock: Mutex<()>,
    pub(super) pending: Mutex<Pending>,
    pub(super) next_cookie: AtomicU64,
    pub(super) size: u64,
    pub(super) flags: u16,
    pub(super) sizes: BlockSizes,
    pub(super) structured: bool,
    /// Largest READ/WRITE sent in one request.
    pub(super) max_request: u32,
    pub(super) request_timeout: Option<Duration>,
    /// Registered with the watchdog (see `watchdog.rs`).
    pub(super) watched: AtomicBool,
    /// Requests in `pending.ops`, readable without the lock.
    pub(super) in_flight: AtomicUsize,
}

impl Inner {
    /// Enter a request in the table of those in flight; `Err` if the
    /// connection is dead.
    pub(super) fn put_op(&self, cookie: u64, op: &Arc<Op>) -> io::Result<()> {
        let mut p = self.pending.lock();
        if let Some(why) = &p.dead {
            return Err(self.lost(why));
        }
        p.ops.insert(cookie, op.clone());
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Take a finished request out of the table.
    pub(super) fn take_op(&self, cookie: u64) -> Option<Arc<Op>> {
        let op = self.pending.lock().ops.remove(&cookie);
        if op.is_some() {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        op
    }

    pub(super) fn lost(&self, why: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("{}: NBD connection lost: {why}", self.uri),
        )
    }

    /// Tear the connection down from any thread. The reader notices (its
    /// read fails) and fails every request in flight; it is the only thread
    /// that completes requests, so no buffer is released while it may still
    /// be writing into it.
    pub(super) fn kill(&self, why: String) {
        {
            let mut p = self.pending.lock();
            if p.kill_reason.is_none() {
                p.kill_reason = Some(why);
            }
        }
        self.stream.shutdown(Shutdown::Both);
    }
}
