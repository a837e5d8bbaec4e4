//! Shared test helpers: temporary directories, starting servers (in-process
//! or as a child process, always stopped by PID), running external tools
//! with bounded time, and a raw NBD connection for bad-input tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pmcache_nbd::proto::*;
use pmcache_nbd::{BlockSizes, MemExport, Server, ServerConfig, ShutdownHandle};

// ---------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------

pub use pmcache_testkit::{pattern, TempDir};

pub fn unix_uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

/// Poll `done` every `poll` until it is true or `limit` has passed; returns
/// whether it became true.
pub fn wait_until(limit: Duration, poll: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if done() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(poll);
    }
}

/// The encoded NBD_OPT_GO for export `name`, with no information requests.
pub fn go_request(name: &str) -> Vec<u8> {
    OptionRequest::Info {
        go: true,
        name: name.into(),
        requests: vec![],
    }
    .encode()
}

// ---------------------------------------------------------------------------
// In-process server
// ---------------------------------------------------------------------------

/// A RAM export of `size` bytes with the given minimum and maximum block
/// sizes (preferred: 4096).
pub fn mem_export(size: usize, minimum: u32, maximum: u32) -> MemExport {
    MemExport::new(size).with_block_sizes(BlockSizes {
        minimum,
        preferred: 4096,
        maximum,
    })
}

/// Serve `server` on a Unix socket `s.sock` in a new temporary directory,
/// in a thread. Returns (the directory, the socket, the thread).
pub fn serve_unix(server: &Server) -> (TempDir, PathBuf, JoinHandle<std::io::Result<()>>) {
    let dir = TempDir::new("n");
    let socket = dir.join("s.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let s = server.clone();
    let thread = std::thread::spawn(move || s.serve_unix(listener));
    (dir, socket, thread)
}

/// A [`Server`] over a [`MemExport`] on a Unix socket in this process.
pub struct InProc {
    pub export: Arc<MemExport>,
    pub server: Server,
    pub handle: ShutdownHandle,
    pub socket: PathBuf,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    _dir: TempDir,
}

impl InProc {
    pub fn start(export: MemExport, config: ServerConfig) -> Self {
        let export = Arc::new(export);
        let server = Server::new(export.clone(), config).expect("server");
        let handle = server.shutdown_handle();
        let (dir, socket, thread) = serve_unix(&server);
        Self {
            export,
            server,
            handle,
            socket,
            thread: Some(thread),
            _dir: dir,
        }
    }

    pub fn mem(size: usize) -> Self {
        Self::start(MemExport::new(size), ServerConfig::default())
    }

    pub fn uri(&self) -> String {
        unix_uri(&self.socket)
    }

    /// Shut down and wait (bounded) for `serve_unix` to return.
    pub fn stop(&mut self) -> std::io::Result<()> {
        self.handle.shutdown();
        let t = self.thread.take().expect("running");
        assert!(
            wait_until(Duration::from_secs(20), Duration::from_millis(10), || {
                t.is_finished()
            }),
            "server did not shut down within 20 s"
        );
        t.join().expect("server thread panicked")
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.handle.shutdown();
            if let Some(t) = self.thread.take() {
                wait_until(Duration::from_secs(20), Duration::from_millis(10), || {
                    t.is_finished()
                });
                if t.is_finished() {
                    let _ = t.join();
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Child-process servers
// ---------------------------------------------------------------------------

/// Which server to start as a child process. `{socket}` in arguments is
/// replaced by the Unix socket path the test will connect to, `{dir}` by a
/// private temporary directory.
#[derive(Debug, Clone)]
pub enum ServerKind {
    /// `examples/nbd-mem-server` with a RAM disk of `size` (e.g. "64M").
    MemServer { size: String, extra: Vec<String> },
    /// Any program.
    Command { program: String, args: Vec<String> },
}

/// The server the interop tests run against. This is the one place to
/// change to run the same tests against another server (e.g. `pmcache
/// serve`).
pub fn server_under_test(size: &str) -> ServerKind {
    ServerKind::MemServer {
        size: size.into(),
        extra: Vec::new(),
    }
}

/// A running child server; stopped (SIGTERM, then SIGKILL, by PID) on drop.
pub struct ServerGuard {
    child: Child,
    pub socket: PathBuf,
    pub dir: TempDir,
}

impl ServerGuard {
    pub fn uri(&self) -> String {
        unix_uri(&self.socket)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) with the PID of our own, not yet reaped child
        // (so the PID cannot have been reused) has no memory effects.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let child = &mut self.child;
        if wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            matches!(child.try_wait(), Ok(Some(_)))
        }) {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Path of an example binary next to the test binary. A plain `cargo test`
/// builds examples; when only some test targets were built, it is built
/// here once, with the cargo that runs the tests.
pub fn example_path(name: &str) -> PathBuf {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>  ->  target/<profile>/examples/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join("examples").join(name);
    let _g = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if !p.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "pmcache-nbd", "--example", name])
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()) && p.exists(),
            "{} not found and could not be built: run `cargo build -p pmcache-nbd --examples`",
            p.display()
        );
    }
    p
}

/// PATH with /usr/bin first: where tools are looked up, and the PATH they
/// run with.
fn tool_search_path() -> String {
    format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default())
}

/// Start `program` with `args` and [`tool_search_path`], stdin closed,
/// stdout to `stdout`, stderr piped.
fn spawn_tool(
    program: &Path,
    args: &[impl AsRef<std::ffi::OsStr>],
    stdout: Stdio,
) -> std::io::Result<Child> {
    Command::new(program)
        .args(args)
        .env("PATH", tool_search_path())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
}

/// Path of `tool` in PATH (with /usr/bin first), or a failure that says
/// what to install. Missing tools fail the test: CI installs them.
pub fn require_tool(tool: &str) -> PathBuf {
    let path = tool_search_path();
    for d in path.split(':') {
        let p = Path::new(d).join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "required tool `{tool}` is not installed; install it with: \
         apt-get install -y nbdkit libnbd-bin python3-libnbd fio qemu-utils"
    );
}

/// Start a server and wait (bounded) until its socket accepts connections.
pub fn launch(kind: &ServerKind) -> ServerGuard {
    let dir = TempDir::new("n");
    let socket = dir.join("nbd.sock");
    let subst = |a: &str| {
        a.replace("{socket}", &socket.display().to_string())
            .replace("{dir}", &dir.path().display().to_string())
    };
    let (program, args): (PathBuf, Vec<String>) = match kind {
        ServerKind::MemServer { size, extra } => {
            let mut args = vec![
                "--socket".to_string(),
                socket.display().to_string(),
                "--size".into(),
                size.clone(),
            ];
            args.extend(extra.iter().map(|a| subst(a)));
            (example_path("nbd-mem-server"), args)
        }
        ServerKind::Command { program, args } => (
            require_tool(program),
            args.iter().map(|a| subst(a)).collect(),
        ),
    };
    let mut child = spawn_tool(&program, &args, Stdio::null())
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = s.read_to_string(&mut err);
            }
            panic!(
                "server {} {:?} exited with {status} before listening: {err}",
                program.display(),
                args
            );
        }
        if UnixStream::connect(&socket).is_ok() {
            break;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "server {} did not listen on {} within 20 s",
                program.display(),
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nothing reads stderr from here on: let it go to /dev/null-like drain
    // in a thread so a chatty server never blocks on a full pipe.
    if let Some(s) = child.stderr.take() {
        drain(s);
    }
    ServerGuard { child, socket, dir }
}

/// Read `r` to its end in a thread; the thread returns what it read.
fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// Run a tool with a time limit; fails the test if it is missing or takes
/// too long. Returns its output, whatever its exit status.
pub fn run_tool(tool: &str, args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new(require_tool(tool));
    cmd.args(args).env("PATH", tool_search_path());
    pmcache_testkit::run_bounded(cmd, timeout)
}

/// `run_tool`, asserting success; returns stdout as text.
pub fn run_ok(tool: &str, args: &[&str], timeout: Duration) -> String {
    let out = run_tool(tool, args, timeout);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed with {}:\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------
// Raw protocol access
// ---------------------------------------------------------------------------

/// A raw socket speaking just enough NBD to send hand-made bytes.
pub struct Raw {
    pub s: UnixStream,
}

impl Raw {
    pub fn connect(socket: &Path) -> Self {
        let s = UnixStream::connect(socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        Self { s }
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).expect("recv");
        v
    }

    /// Read the greeting and answer with fixed newstyle + no zeroes.
    pub fn greet(&mut self) {
        let g = self.recv(GREETING_LEN);
        let flags = parse_greeting(&g).expect("greeting");
        assert_eq!(flags & FLAG_FIXED_NEWSTYLE, FLAG_FIXED_NEWSTYLE);
        self.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    }

    /// Read one option reply.
    pub fn option_reply(&mut self) -> (OptionReplyHeader, Vec<u8>) {
        let h = OptionReplyHeader::parse(&self.recv(OPTION_REPLY_HEADER_LEN)).expect("reply");
        let d = self.recv(h.length as usize);
        (h, d)
    }

    /// Full handshake to transmission with GO; optionally with structured
    /// replies. Returns (size, flags).
    pub fn handshake(&mut self, structured: bool) -> (u64, u16) {
        self.greet();
        if structured {
            self.send(&OptionRequest::StructuredReply.encode());
            let (h, _) = self.option_reply();
            assert_eq!(h.reply_type, REP_ACK);
        }
        self.send(&go_request(""));
        // The last INFO_EXPORT counts.
        self.go_infos()
            .into_iter()
            .rev()
            .find_map(|i| match i {
                Info::Export { size, flags } => Some((size, flags)),
                _ => None,
            })
            .expect("INFO_EXPORT")
    }

    /// Read the replies to a GO up to its ACK: every one before it must be
    /// an INFO reply. Returns the information they carry, in order.
    pub fn go_infos(&mut self) -> Vec<Info> {
        let mut infos = Vec::new();
        loop {
            let (h, d) = self.option_reply();
            match h.reply_type {
                REP_INFO => infos.push(Info::parse(&d).unwrap()),
                REP_ACK => return infos,
                other => panic!("unexpected GO reply {other:#x}"),
            }
        }
    }

    pub fn request(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        self.send(
            &Request {
                flags,
                command,
                cookie,
                offset,
                length,
            }
            .encode(),
        );
    }

    /// Read a simple reply header.
    pub fn simple_reply(&mut self) -> SimpleReply {
        SimpleReply::parse(&self.recv(SIMPLE_REPLY_LEN)).expect("simple reply")
    }

    /// Read any reply header; for structured ones also the payload.
    pub fn any_reply(&mut self) -> (ReplyHeader, Vec<u8>) {
        let m = self.recv(4);
        let n = ReplyHeader::header_len(&m).expect("reply magic");
        let mut h = m;
        h.extend(self.recv(n - 4));
        let hdr = ReplyHeader::parse(&h).expect("reply header");
        let payload = match hdr {
            ReplyHeader::Structured(s) => self.recv(s.length as usize),
            ReplyHeader::Simple(_) => Vec::new(),
        };
        (hdr, payload)
    }

    /// True if the server closed the connection (EOF within the timeout).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

/// Eight threads on one client, each writing `ops` random ranges into its
/// own 2 MiB region (some with FUA) and reading each back, then checking
/// its whole region: many requests in flight on one connection.
pub fn hammer(c: &std::sync::Arc<pmcache_nbd::Client>, ops: u64) {
    const MIB: usize = 1 << 20;
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                let base = t * 2 * MIB as u64;
                let mut model = vec![0u8; 2 * MIB];
                for i in 0..ops {
                    let seed = t * 1000 + i;
                    let p = pattern(seed, 8);
                    let off = u64::from(u32::from_le_bytes([p[0], p[1], p[2], 0]))
                        % (2 * MIB as u64 - 70_000);
                    let len = 1 + (u64::from(p[3]) * 251 + u64::from(p[4])) as usize % 65_536;
                    let data = pattern(seed ^ 0xabc, len);
                    c.write(&data, base + off, i % 7 == 0).unwrap();
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                    let mut back = vec![0u8; len];
                    c.read(&mut back, base + off).unwrap();
                    assert_eq!(back, data, "thread {t} op {i}");
                }
                let mut all = vec![0u8; 2 * MIB];
                c.read(&mut all, base).unwrap();
                assert!(all == model, "thread {t}: final region differs");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
