//! Shared test helpers: temporary directories, starting servers (in-process
//! or as a child process, always stopped by PID), running external tools
//! with bounded time, and a raw NBD connection for bad-input tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pmcache_nbd::proto::*;
use pmcache_nbd::{MemExport, Server, ServerConfig, ShutdownHandle};

// ---------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------

/// A directory under /tmp removed on drop. Paths stay short: Unix socket
/// paths are limited to 107 bytes.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = PathBuf::from(format!(
            "/tmp/pmnbd-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn unix_uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

/// Deterministic pseudo-random bytes (xorshift64*), for patterns.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------
// In-process server
// ---------------------------------------------------------------------------

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
        let dir = TempDir::new();
        let socket = dir.join("s.sock");
        let export = Arc::new(export);
        let server = Server::new(export.clone(), config).expect("server");
        let handle = server.shutdown_handle();
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let s = server.clone();
        let thread = std::thread::spawn(move || s.serve_unix(listener));
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
        let start = Instant::now();
        while !t.is_finished() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "server did not shut down within 20 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().expect("server thread panicked")
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.handle.shutdown();
            if let Some(t) = self.thread.take() {
                let start = Instant::now();
                while !t.is_finished() && start.elapsed() < Duration::from_secs(20) {
                    std::thread::sleep(Duration::from_millis(10));
                }
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
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
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

/// Path of `tool` in PATH (with /usr/bin first), or a failure that says
/// what to install. Missing tools fail the test: CI installs them.
pub fn require_tool(tool: &str) -> PathBuf {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
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
    let dir = TempDir::new();
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
    let mut child = Command::new(&program)
        .args(&args)
        .env(
            "PATH",
            format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
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
    if let Some(mut s) = child.stderr.take() {
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
    }
    ServerGuard { child, socket, dir }
}

/// Run a tool with a time limit; fails the test if it is missing or takes
/// too long. Returns its output, whatever its exit status.
pub fn run_tool(tool: &str, args: &[&str], timeout: Duration) -> Output {
    let program = require_tool(tool);
    let mut child = Command::new(&program)
        .args(args)
        .env(
            "PATH",
            format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{tool} {args:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
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
        self.send(
            &OptionRequest::Info {
                go: true,
                name: String::new(),
                requests: vec![],
            }
            .encode(),
        );
        let mut export = None;
        loop {
            let (h, d) = self.option_reply();
            match h.reply_type {
                REP_INFO => {
                    if let Info::Export { size, flags } = Info::parse(&d).unwrap() {
                        export = Some((size, flags));
                    }
                }
                REP_ACK => return export.expect("INFO_EXPORT"),
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
