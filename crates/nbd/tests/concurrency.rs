//! Requests within one connection proceed independently (issue 13): a
//! write that waits (for space, the origin, a persistence call) blocks
//! neither reads nor other writes behind it, replies come out of order, and
//! clients that leave, flood or reuse handles end only their own connection.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

mod common;

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, wait_until, Raw};
use parking_lot::{Condvar, Mutex};
use pmcache_nbd::proto::*;
use pmcache_nbd::{
    BlockSizes, Client, Export, ExportError, Extent, MemExport, PendingWrite, Relayed, Server,
    ServerConfig, Staged, WriteDone, WriteOutcome, ZeroFlags,
};

const SIZE: usize = 1 << 20;
/// A buffered write here waits for the gate (like a write short of space).
const GATED: u64 = 0;
/// From here on writes are staged (received into the export's memory); a
/// staged write here waits for the gate in its commit (like an msync or an
/// origin round trip).
const STAGED: u64 = 512 * 1024;
const STAGED_GATED: u64 = STAGED;
/// From here on staged writes commit as an msync-mode cache's do: on the
/// reader thread when the connection is idle (passing the gate), else on a
/// thread of their own.
const LOCAL: u64 = 768 * 1024;
/// Buffered writes from here up to [`STAGED`] want a relay pipe; the one at
/// [`RELAY_AT`] is declined by `start_write_relayed` (made by a worker),
/// the others are finished on a thread of their own.
const RELAY_AT: u64 = 256 * 1024;

/// A closed-until-opened gate.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn pass(&self) {
        let mut g = self.open.lock();
        while !*g {
            self.cv.wait(&mut g);
        }
    }
    fn open(&self) {
        *self.open.lock() = true;
        self.cv.notify_all();
    }
}

/// A RAM export whose writes at [`GATED`] and [`STAGED_GATED`] wait for a
/// gate, and which stages writes at [`STAGED`] and above.
struct Gated {
    mem: Arc<MemExport>,
    gate: Arc<Gate>,
    local: Arc<Local>,
}

/// How the writes at [`LOCAL`] were committed, and the relayed ones made.
#[derive(Default)]
struct Local {
    gate: Gate,
    inline: AtomicUsize,
    handed_off: AtomicUsize,
    relays_started: AtomicUsize,
    relays_waited: AtomicUsize,
}

struct LocalWrite {
    w: Option<Box<GatedWrite>>,
    local: Arc<Local>,
}

impl PendingWrite for LocalWrite {
    fn commit(self: Box<Self>) -> Result<(), ExportError> {
        self.w.map_or(Ok(()), |w| w.commit())
    }

    fn commit_async(&mut self, done: WriteDone) -> Result<(), WriteDone> {
        let w = self.w.take().unwrap();
        self.local.handed_off.fetch_add(1, Ordering::SeqCst);
        std::thread::spawn(move || done(WriteOutcome::Done(w.commit())));
        Ok(())
    }

    fn commit_when_idle(&mut self, done: WriteDone) -> Result<(), WriteDone> {
        let w = self.w.take().unwrap();
        self.local.inline.fetch_add(1, Ordering::SeqCst);
        self.local.gate.pass();
        done(WriteOutcome::Done(w.commit()));
        Ok(())
    }
}

struct GatedWrite {
    mem: Arc<MemExport>,
    gate: Option<Arc<Gate>>,
    offset: u64,
    data: Vec<u8>,
    fua: bool,
}

impl PendingWrite for GatedWrite {
    /// Ungated, it commits on the reader thread, whose replies are corked.
    fn commit_is_quick(&self) -> bool {
        self.gate.is_none()
    }

    fn commit(self: Box<Self>) -> Result<(), ExportError> {
        if let Some(g) = &self.gate {
            g.pass();
        }
        let len = self.data.len() as u32;
        self.mem
            .write(self.offset, len, self.fua, &mut |s| copy(&self.data, s))
    }
}

fn copy(data: &[u8], slices: &mut [IoSliceMut<'_>]) -> io::Result<()> {
    let mut pos = 0;
    for s in slices.iter_mut() {
        let n = s.len();
        s.copy_from_slice(&data[pos..pos + n]);
        pos += n;
    }
    Ok(())
}

impl Export for Gated {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn block_sizes(&self) -> BlockSizes {
        self.mem.block_sizes()
    }
    fn read(
        &self,
        offset: u64,
        len: u32,
        sink: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<()>,
    ) -> Result<(), ExportError> {
        self.mem.read(offset, len, sink)
    }
    fn write(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        source: &mut dyn FnMut(&mut [IoSliceMut<'_>]) -> io::Result<()>,
    ) -> Result<(), ExportError> {
        if offset == GATED {
            self.gate.pass();
        }
        self.mem.write(offset, len, fua, source)
    }
    fn stage_write(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        source: &mut dyn FnMut(&mut [IoSliceMut<'_>]) -> io::Result<()>,
    ) -> Result<Staged, ExportError> {
        if offset < STAGED {
            return Ok(Staged::WouldWait);
        }
        let mut data = vec![0u8; len as usize];
        source(&mut [IoSliceMut::new(&mut data)]).map_err(ExportError::Transfer)?;
        let w = Box::new(GatedWrite {
            mem: self.mem.clone(),
            gate: (offset == STAGED_GATED).then(|| self.gate.clone()),
            offset,
            data,
            fua,
        });
        if offset < LOCAL {
            return Ok(Staged::Pending(w));
        }
        Ok(Staged::Pending(Box::new(LocalWrite {
            w: Some(w),
            local: self.local.clone(),
        })))
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), ExportError> {
        self.mem.write_zeroes(offset, len, flags)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.mem.trim(offset, len, fua)
    }
    fn flush(&self) -> Result<(), ExportError> {
        self.mem.flush()
    }
    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.mem.cache(offset, len)
    }
    fn block_status(&self, offset: u64, len: u64) -> Option<Result<Vec<Extent>, ExportError>> {
        self.mem.block_status(offset, len)
    }
    fn prefers_relay(&self, offset: u64, _len: u32, _fua: bool) -> bool {
        (RELAY_AT..STAGED).contains(&offset)
    }
    fn write_relayed(&self, offset: u64, data: &mut Relayed, fua: bool) -> Result<(), ExportError> {
        self.local.relays_waited.fetch_add(1, Ordering::SeqCst);
        let v = data.take_bytes().map_err(ExportError::Transfer)?;
        self.mem
            .write(offset, v.len() as u32, fua, &mut |s| copy(&v, s))
    }
    fn start_write_relayed(
        &self,
        offset: u64,
        mut data: Relayed,
        fua: bool,
        done: WriteDone,
    ) -> Result<(), (Relayed, WriteDone)> {
        if offset == RELAY_AT {
            return Err((data, done));
        }
        self.local.relays_started.fetch_add(1, Ordering::SeqCst);
        let mem = self.mem.clone();
        std::thread::spawn(move || {
            let r = data
                .take_bytes()
                .map_err(ExportError::Transfer)
                .and_then(|v| mem.write(offset, v.len() as u32, fua, &mut |s| copy(&v, s)));
            done(WriteOutcome::Done(r));
        });
        Ok(())
    }
}

struct Rig {
    mem: Arc<MemExport>,
    gate: Arc<Gate>,
    local: Arc<Local>,
    server: Server,
    socket: std::path::PathBuf,
    _dir: common::TempDir,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl Rig {
    fn new(config: ServerConfig) -> Self {
        let mem = Arc::new(MemExport::new(SIZE));
        let gate = Arc::new(Gate::default());
        let local = Arc::new(Local::default());
        let export = Arc::new(Gated {
            mem: mem.clone(),
            gate: gate.clone(),
            local: local.clone(),
        });
        let server = Server::new(export, config).unwrap();
        let (dir, socket, thread) = common::serve_unix(&server);
        Self {
            mem,
            gate,
            local,
            server,
            socket,
            _dir: dir,
            thread: Some(thread),
        }
    }

    fn raw(&self, structured: bool) -> Raw {
        let mut r = Raw::connect(&self.socket);
        r.handshake(structured);
        r
    }

    fn client(&self) -> Client {
        Client::connect(&common::unix_uri(&self.socket)).unwrap()
    }

    fn write(r: &mut Raw, cookie: u64, offset: u64, data: &[u8]) {
        r.request(CMD_WRITE, 0, cookie, offset, data.len() as u32);
        r.send(data);
    }

    /// The cookie and error of the next reply (a READ's data is consumed).
    fn reply(r: &mut Raw, structured: bool, read_len: usize) -> (u64, u32) {
        if !structured {
            let h = r.simple_reply();
            if h.error == 0 && read_len > 0 {
                r.recv(read_len);
            }
            return (h.cookie, h.error);
        }
        match r.any_reply().0 {
            ReplyHeader::Structured(s) => {
                let err = if s.reply_type == REPLY_TYPE_ERROR {
                    1
                } else {
                    0
                };
                (s.cookie, err)
            }
            ReplyHeader::Simple(h) => (h.cookie, h.error),
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.gate.open();
        self.local.gate.open();
        self.server.shutdown_handle().shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Two waiting writes (one buffered, one staged) hold up nothing behind
/// them on the same connection: later writes and reads are answered first,
/// with simple and with structured replies.
fn waiting_writes_block_nothing(structured: bool) {
    let rig = Rig::new(ServerConfig::default());
    rig.mem.fill(200_000, &pattern(5, 4096));
    let mut r = rig.raw(structured);
    let data: Vec<Vec<u8>> = (0..4).map(|i| pattern(i, 4096)).collect();
    Rig::write(&mut r, 1, GATED, &data[0]);
    Rig::write(&mut r, 2, STAGED_GATED, &data[1]);
    Rig::write(&mut r, 3, 8192, &data[2]);
    Rig::write(&mut r, 4, STAGED + 8192, &data[3]);
    r.request(CMD_READ, 0, 5, 200_000, 4096);
    let mut first = Vec::new();
    for _ in 0..3 {
        let len = if structured { 0 } else { 4096 };
        // Only the read has data; its simple reply is the one with cookie 5.
        let (cookie, err) = if structured {
            Rig::reply(&mut r, true, 0)
        } else {
            let h = r.simple_reply();
            if h.cookie == 5 {
                r.recv(len);
            }
            (h.cookie, h.error)
        };
        assert_eq!(err, 0);
        first.push(cookie);
    }
    first.sort_unstable();
    assert_eq!(
        first,
        [3, 4, 5],
        "requests behind the waiting writes were held up"
    );
    assert!(rig.mem.snapshot(GATED as usize, 4096) != data[0]);
    rig.gate.open();
    let mut last = [
        Rig::reply(&mut r, structured, 0),
        Rig::reply(&mut r, structured, 0),
    ];
    last.sort_unstable();
    assert_eq!(last, [(1, 0), (2, 0)]);
    for (off, d) in [(GATED, 0), (STAGED_GATED, 1), (8192, 2), (STAGED + 8192, 3)] {
        assert!(
            rig.mem.snapshot(off as usize, 4096) == data[d],
            "write at {off}"
        );
    }
}

#[test]
fn waiting_writes_block_nothing_simple_replies() {
    waiting_writes_block_nothing(false);
}

#[test]
fn waiting_writes_block_nothing_structured_replies() {
    waiting_writes_block_nothing(true);
}

/// Many writes in flight on one connection, staged and buffered, all land
/// and are all answered.
#[test]
fn a_pipelined_connection_writes_everything() {
    let rig = Rig::new(ServerConfig::default());
    rig.gate.open();
    let c = rig.client();
    let datas: Vec<(u64, Vec<u8>)> = (0..200u64)
        .map(|i| {
            (
                (i % 2) * STAGED + 4096 + (i / 2) * 4096,
                pattern(100 + i, 4096),
            )
        })
        .collect();
    let pieces: Vec<(u64, &[u8])> = datas.iter().map(|(o, d)| (*o, &d[..])).collect();
    c.write_many(&pieces).unwrap();
    for (o, d) in &datas {
        assert!(rig.mem.snapshot(*o as usize, 4096) == *d, "write at {o}");
    }
}

/// Writes committed on the reader thread are answered in batches while
/// more requests are waiting, but never held back: a lone write is answered
/// without another request coming, and so is the last of a burst.
#[test]
fn corked_replies_are_never_held_back() {
    let rig = Rig::new(ServerConfig::default());
    let mut r = rig.raw(false);
    let mut burst = Vec::new();
    for i in 0..100u64 {
        let mut req = Request {
            flags: 0,
            command: CMD_WRITE,
            cookie: i + 1,
            offset: STAGED + 4096 + i * 4096,
            length: 4096,
        }
        .encode()
        .to_vec();
        req.extend_from_slice(&pattern(200 + i, 4096));
        burst.extend_from_slice(&req);
    }
    r.send(&burst);
    let mut cookies: Vec<u64> = (0..100)
        .map(|_| Rig::reply(&mut r, false, 0))
        .map(|(c, e)| {
            assert_eq!(e, 0);
            c
        })
        .collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (1..=100).collect::<Vec<u64>>());
    for i in 0..100u64 {
        let got = rig.mem.snapshot((STAGED + 4096 + i * 4096) as usize, 4096);
        assert!(got == pattern(200 + i, 4096), "write {i}");
    }
    // One at a time: each reply comes without a next request (the read
    // times out, failing the test, if a reply is held back).
    for i in 0..5u64 {
        Rig::write(&mut r, 1000 + i, STAGED + 4096, &pattern(300 + i, 4096));
        assert_eq!(Rig::reply(&mut r, false, 0), (1000 + i, 0));
    }
}

/// A client that leaves with writes in flight (waiting, staged, buffered)
/// and a rejected one ends only its connection: the rejected write is not
/// made, the others are whole or absent, and a bystander is served
/// throughout.
#[test]
fn leaving_with_requests_in_flight_ends_only_that_connection() {
    let rig = Rig::new(ServerConfig::default());
    let bystander = rig.client();
    let mine = pattern(9, 4096);
    bystander.write(&mine, 300_000, false).unwrap();
    let mut r = rig.raw(false);
    Rig::write(&mut r, 1, GATED, &pattern(1, 4096));
    Rig::write(&mut r, 2, STAGED_GATED, &pattern(2, 4096));
    Rig::write(&mut r, 3, STAGED + 4096, &pattern(3, 4096));
    // Unsupported flag: rejected, its payload skipped.
    r.request(CMD_WRITE, 0x8000, 4, 100_000, 4096);
    r.send(&pattern(4, 4096));
    drop(r);
    let mut b = vec![0u8; 4096];
    bystander.read(&mut b, 300_000).unwrap();
    assert!(b == mine);
    rig.gate.open();
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(10), || {
            rig.server.active_connections() == 1
        }),
        "the abandoned connection did not end"
    );
    assert!(
        rig.mem.snapshot(100_000, 4096).iter().all(|&x| x == 0),
        "a rejected write was made"
    );
    for (off, seed) in [(GATED, 1), (STAGED_GATED, 2), (STAGED + 4096, 3)] {
        let got = rig.mem.snapshot(off as usize, 4096);
        assert!(
            got == pattern(seed, 4096) || got.iter().all(|&x| x == 0),
            "write at {off} is torn"
        );
    }
    bystander.write(&mine, 0, false).unwrap();
}

/// A client that sends requests and never reads the replies is cut off
/// once a reply cannot be delivered (the I/O timeout); back-pressure keeps
/// it from queueing more than `max_in_flight`, and a bystander is served
/// meanwhile. Acknowledged or not, every write is whole or absent.
#[test]
fn a_flooding_client_ends_only_itself() {
    let rig = Rig::new(ServerConfig {
        io_timeout: Some(Duration::from_millis(500)),
        max_in_flight: 8,
        ..Default::default()
    });
    rig.gate.open();
    let bystander = rig.client();
    let socket = rig.socket.clone();
    let flooder = std::thread::spawn(move || {
        let mut r = Raw::connect(&socket);
        r.handshake(false);
        r.s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut sent = 0u64;
        for i in 0..100_000u64 {
            // Big reads fill the reply path; writes go to their own blocks.
            let req = if i % 2 == 0 {
                Request {
                    flags: 0,
                    command: CMD_READ,
                    cookie: i,
                    offset: 0,
                    length: 256 * 1024,
                }
                .encode()
                .to_vec()
            } else {
                let off = STAGED + (i / 2 % 100) * 4096;
                let mut v = Request {
                    flags: 0,
                    command: CMD_WRITE,
                    cookie: i,
                    offset: off,
                    length: 4096,
                }
                .encode()
                .to_vec();
                v.extend(pattern(off, 4096));
                v
            };
            if std::io::Write::write_all(&mut r.s, &req).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let start = Instant::now();
    let data = pattern(11, 4096);
    while !flooder.is_finished() && start.elapsed() < Duration::from_secs(20) {
        let t = Instant::now();
        bystander.write(&data, 400_000, false).unwrap();
        let mut b = vec![0u8; 4096];
        bystander.read(&mut b, 400_000).unwrap();
        assert!(b == data);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the bystander was held up by the flood"
        );
    }
    let sent = flooder.join().unwrap();
    assert!(sent < 100_000, "the flood was never pushed back");
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(10), || {
            rig.server.active_connections() == 1
        }),
        "the flooding connection did not end"
    );
    for i in 0..100u64 {
        let off = STAGED + i * 4096;
        let got = rig.mem.snapshot(off as usize, 4096);
        assert!(got == pattern(off, 4096) || got.iter().all(|&x| x == 0));
    }
}

/// A handle reused while its first request is in flight: both requests
/// are answered, each once, and the answers can be told apart by order.
#[test]
fn a_reused_handle_gets_both_answers() {
    let rig = Rig::new(ServerConfig::default());
    let mut r = rig.raw(true);
    Rig::write(&mut r, 7, GATED, &pattern(1, 4096));
    r.request(CMD_READ, 0, 7, 4096, 512);
    let (h, payload) = r.any_reply();
    match h {
        ReplyHeader::Structured(s) => {
            assert_eq!((s.cookie, s.reply_type), (7, REPLY_TYPE_OFFSET_DATA));
            assert_eq!(payload.len(), 8 + 512, "the read's data");
        }
        other => panic!("expected the read's structured reply, got {other:?}"),
    }
    rig.gate.open();
    match r.any_reply().0 {
        ReplyHeader::Simple(s) => assert_eq!((s.cookie, s.error), (7, 0)),
        ReplyHeader::Structured(s) => {
            assert_eq!((s.cookie, s.reply_type), (7, REPLY_TYPE_NONE))
        }
    }
    r.request(CMD_DISC, 0, 8, 0, 0);
    assert!(r.closed(), "nothing more was sent");
}

/// A write that waits only for the export's own persistence call, on a
/// connection with nothing else in flight, is committed by the reader
/// itself (no hand-off) and answered at once; writes that arrive together
/// are handed off, so the reader goes on reading.
#[test]
fn an_idle_connection_commits_on_its_reader() {
    let rig = Rig::new(ServerConfig::default());
    rig.local.gate.open();
    let mut r = rig.raw(false);
    for i in 0..5u64 {
        Rig::write(&mut r, 1 + i, LOCAL + i * 4096, &pattern(400 + i, 4096));
        assert_eq!(Rig::reply(&mut r, false, 0), (1 + i, 0));
    }
    assert_eq!(rig.local.inline.load(Ordering::SeqCst), 5);
    assert_eq!(rig.local.handed_off.load(Ordering::SeqCst), 0);
    let mut burst = Vec::new();
    for i in 0..50u64 {
        let req = Request {
            flags: 0,
            command: CMD_WRITE,
            cookie: 100 + i,
            offset: LOCAL + i * 4096,
            length: 4096,
        };
        burst.extend_from_slice(&req.encode());
        burst.extend_from_slice(&pattern(500 + i, 4096));
    }
    r.send(&burst);
    let mut cookies: Vec<u64> = (0..50).map(|_| Rig::reply(&mut r, false, 0).0).collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (100..150).collect::<Vec<u64>>());
    assert!(
        rig.local.handed_off.load(Ordering::SeqCst) > 0,
        "a burst was committed on the reader, one by one"
    );
    for i in 0..50u64 {
        let got = rig.mem.snapshot((LOCAL + i * 4096) as usize, 4096);
        assert!(got == pattern(500 + i, 4096), "write {i}");
    }
}

/// A request that arrives while the reader makes a commit itself waits for
/// that one commit, and the connection then hands its commits off, so that
/// a client with several requests in flight is not held up again.
#[test]
fn a_request_during_a_reader_commit_turns_them_off() {
    let rig = Rig::new(ServerConfig::default());
    rig.mem.fill(4096, &pattern(9, 4096));
    let mut r = rig.raw(false);
    Rig::write(&mut r, 1, LOCAL, &pattern(600, 4096));
    let started = wait_until(Duration::from_secs(10), Duration::from_millis(1), || {
        rig.local.inline.load(Ordering::SeqCst) == 1
    });
    assert!(started, "the lone write was not committed on the reader");
    r.request(CMD_READ, 0, 2, 4096, 4096);
    rig.local.gate.open();
    let mut got: Vec<(u64, u32)> = (0..2)
        .map(|_| {
            let h = r.simple_reply();
            if h.cookie == 2 {
                assert!(r.recv(4096) == pattern(9, 4096), "the read's data");
            }
            (h.cookie, h.error)
        })
        .collect();
    got.sort_unstable();
    assert_eq!(got, [(1, 0), (2, 0)]);
    for i in 1..6u64 {
        Rig::write(&mut r, 10 + i, LOCAL + i * 4096, &pattern(600 + i, 4096));
        assert_eq!(Rig::reply(&mut r, false, 0), (10 + i, 0));
    }
    assert_eq!(rig.local.inline.load(Ordering::SeqCst), 1);
    assert_eq!(rig.local.handed_off.load(Ordering::SeqCst), 5);
}

/// A write whose payload went into a relay pipe is started by the reader
/// and finished (answered) by the export's own thread where the export
/// takes it, and made by a worker where it declines; both land.
#[test]
fn relayed_writes_are_finished_by_the_export_or_a_worker() {
    let rig = Rig::new(ServerConfig::default());
    let mut r = rig.raw(false);
    let offsets = [RELAY_AT, RELAY_AT + 65536, RELAY_AT + 131_072];
    for (i, &off) in offsets.iter().enumerate() {
        Rig::write(&mut r, 1 + i as u64, off, &pattern(700 + i as u64, 65536));
        assert_eq!(Rig::reply(&mut r, false, 0), (1 + i as u64, 0));
    }
    assert_eq!(rig.local.relays_started.load(Ordering::SeqCst), 2);
    assert_eq!(rig.local.relays_waited.load(Ordering::SeqCst), 1);
    for (i, &off) in offsets.iter().enumerate() {
        let got = rig.mem.snapshot(off as usize, 65536);
        assert!(got == pattern(700 + i as u64, 65536), "write at {off}");
    }
}
