//! Helpers for the interoperability tests of the `pmcache` binary: private
//! directories in /dev/shm, servers started as child processes (`pmcache
//! serve`, nbdkit, qemu-nbd) that are always stopped by PID with bounded
//! waits, and external tools run with a time limit.
//!
//! Same design as `crates/nbd/tests/common/mod.rs` (`launch(&ServerKind) ->
//! ServerGuard`), but the server under test is the real binary. The child
//! processes are started and awaited by `launch.rs`, shared with
//! `common/mod.rs`, which the CLI and kill -9 tests use.

#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use std::time::{Duration, Instant};

pub const MIB: usize = 1 << 20;

#[path = "launch.rs"]
mod launch;
pub use launch::*;

#[path = "fs_stack.rs"]
mod fs_stack;
#[allow(unused_imports)] // only the tests that mount a file system use it
pub use fs_stack::*;

// ---------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------

pub use pmcache_testkit::{pattern, TempDir};

pub fn unix_uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

/// Compare two buffers, naming the first differing byte.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(x, y)| x != y) {
        let n = got[i..]
            .iter()
            .zip(&want[i..])
            .take_while(|(x, y)| x != y)
            .count();
        panic!(
            "{what}: first difference at byte {i} ({n} bytes differ from there): got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

// ---------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------

/// The Debian package that provides a tool (for the failure message).
pub fn package_of(tool: &str) -> &'static str {
    match tool {
        "qemu-io" | "qemu-img" | "qemu-nbd" => "qemu-utils",
        "nbdinfo" | "nbdcopy" | "nbdfuse" => "libnbd-bin",
        "nbdsh" => "python3-libnbd",
        "nbdkit" => "nbdkit",
        "fio" => "fio",
        "certtool" | "psktool" => "gnutls-bin",
        "fusermount3" => "fuse3",
        "losetup" | "mount" | "umount" => "mount",
        "mkfs.ext4" | "fsck.ext4" | "e2fsck" | "debugfs" => "e2fsprogs",
        "sha256sum" | "sync" | "dd" | "cp" => "coreutils",
        "bash" => "bash",
        "perf" => "linux-perf",
        _ => "(unknown package)",
    }
}

/// Path of `tool`, or a failure that names the package to install. Missing
/// tools fail the test: CI installs them.
pub fn require_tool(tool: &str) -> PathBuf {
    for d in child_path().split(':') {
        let p = Path::new(d).join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "required tool `{tool}` is not installed; install it with: apt-get install -y {}",
        package_of(tool)
    );
}

/// Run a program with a time limit (killed by PID and the test failed when
/// it takes longer). Returns its output, whatever its exit status.
pub fn run_program(program: &Path, args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args).env("PATH", child_path());
    pmcache_testkit::run_bounded(cmd, timeout)
}

/// Run an external tool (see `require_tool`) with a time limit.
pub fn run_tool(tool: &str, args: &[&str], timeout: Duration) -> Output {
    run_program(&require_tool(tool), args, timeout)
}

fn expect_success(what: &str, args: &[&str], out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} {args:?} failed with {}:\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `run_tool`, asserting success; returns stdout as text.
pub fn run_ok(tool: &str, args: &[&str], timeout: Duration) -> String {
    let out = run_tool(tool, args, timeout);
    expect_success(tool, args, &out)
}

/// Run a `pmcache` subcommand (check, dump, flush, ...) to completion.
pub fn pmcache(args: &[&str], timeout: Duration) -> Output {
    run_program(Path::new(pmcache_bin()), args, timeout)
}

/// `pmcache`, asserting success; returns stdout as text.
pub fn pmcache_ok(args: &[&str], timeout: Duration) -> String {
    let out = pmcache(args, timeout);
    expect_success("pmcache", args, &out)
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// nbdkit in the foreground on the Unix socket `sock` (a fixed path, so a
/// restarted server is the same origin to pmcache) with `args` (filters,
/// plugin and its parameters); returns once it accepts connections, and
/// fails the test if that takes longer than `within`.
pub fn nbdkit_at(sock: &Path, args: &[String], log: PathBuf, within: Duration) -> Proc {
    let mut all: Vec<String> = vec![
        "--foreground".into(),
        "--exit-with-parent".into(),
        "--unix".into(),
        sock.display().to_string(),
    ];
    all.extend(args.iter().cloned());
    let _ = std::fs::remove_file(sock);
    let mut p = Proc::spawn(&require_tool("nbdkit"), &all, log, &[]);
    let end = Instant::now() + within;
    while UnixStream::connect(sock).is_err() {
        assert!(
            p.exited().is_none() && Instant::now() < end,
            "nbdkit did not start: {}",
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

/// Where a server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket in the server's private directory.
    Unix,
    /// A free loopback TCP port.
    Tcp,
}

/// Which server to start.
#[derive(Debug, Clone)]
pub enum ServerKind {
    /// `pmcache serve --cache CACHE --assume-pmem [--cache-size SIZE]
    /// [--origin ORIGIN] EXTRA...` on a Unix socket or a loopback port.
    Pmcache {
        cache: PathBuf,
        cache_size: Option<String>,
        origin: Option<String>,
        listen: Listen,
        extra: Vec<String>,
    },
    /// Any program that listens on the Unix socket `{socket}` (replaced in
    /// its arguments, as `{dir}` is by its private directory).
    Command { program: String, args: Vec<String> },
}

impl ServerKind {
    /// pmcache on a Unix socket over `origin` (creating the cache with
    /// `cache_size` if it does not exist).
    pub fn pmcache(cache: &Path, cache_size: &str, origin: &str, extra: &[&str]) -> Self {
        ServerKind::Pmcache {
            cache: cache.to_path_buf(),
            cache_size: Some(cache_size.into()),
            origin: Some(origin.into()),
            listen: Listen::Unix,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// pmcache reopening an existing cache, with the origin it records.
    pub fn pmcache_reopen(cache: &Path, extra: &[&str]) -> Self {
        ServerKind::Pmcache {
            cache: cache.to_path_buf(),
            cache_size: None,
            origin: None,
            listen: Listen::Unix,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// nbdkit in the foreground on `{socket}` with these plugin arguments.
    pub fn nbdkit(plugin_args: &[&str]) -> Self {
        let mut args: Vec<String> = ["--foreground", "--exit-with-parent", "--unix", "{socket}"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(plugin_args.iter().map(|s| s.to_string()));
        ServerKind::Command {
            program: "nbdkit".into(),
            args,
        }
    }

    /// qemu-nbd serving a raw file on `{socket}`, for several clients in
    /// turn and at once.
    pub fn qemu_nbd(file: &Path) -> Self {
        ServerKind::Command {
            program: "qemu-nbd".into(),
            args: vec![
                "--persistent".into(),
                "--shared=8".into(),
                "--format=raw".into(),
                "--cache=writeback".into(),
                "--socket={socket}".into(),
                file.display().to_string(),
            ],
        }
    }
}

/// A running server; stopped by PID on drop (SIGTERM, then SIGKILL).
pub struct ServerGuard {
    pub proc: Proc,
    pub endpoint: Endpoint,
    pub dir: TempDir,
}

impl ServerGuard {
    /// URI of the default export.
    pub fn uri(&self) -> String {
        self.uri_export("")
    }

    /// URI of a named export.
    pub fn uri_export(&self, name: &str) -> String {
        match &self.endpoint {
            Endpoint::Unix(s) => format!("nbd+unix:///{name}?socket={}", s.display()),
            Endpoint::Tcp(p) => format!("nbd://127.0.0.1:{p}/{name}"),
        }
    }

    pub fn socket(&self) -> &Path {
        match &self.endpoint {
            Endpoint::Unix(s) => s,
            Endpoint::Tcp(_) => panic!("server listens on TCP"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// SIGTERM (a clean shutdown), waiting at most 30 s; asserts that the
    /// server exits with status 0.
    pub fn stop(mut self) {
        let status = self.proc.terminate(Duration::from_secs(30));
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM; log:\n{}",
            self.proc.name,
            self.proc.log_text()
        );
    }
}

/// Start a server and wait (bounded) until it accepts connections (and,
/// for pmcache, has logged that it is serving).
pub fn launch(kind: &ServerKind) -> ServerGuard {
    // A free port can be taken by someone else before the server binds it:
    // try a few.
    for attempt in 0..3 {
        match try_launch(kind) {
            Ok(g) => return g,
            Err(log) if attempt < 2 && log.contains("cannot listen") => continue,
            Err(log) => panic!("{log}"),
        }
    }
    unreachable!()
}

fn try_launch(kind: &ServerKind) -> Result<ServerGuard, String> {
    let dir = TempDir::new("i");
    let log = dir.join("server.log");
    let (mut proc, endpoint, is_pmcache) = match kind {
        ServerKind::Pmcache {
            cache,
            cache_size,
            origin,
            listen,
            extra,
        } => {
            let mut args: Vec<String> = vec![
                "--cache".into(),
                cache.display().to_string(),
                "--assume-pmem".into(),
            ];
            if let Some(s) = cache_size {
                args.extend(["--cache-size".into(), s.clone()]);
            }
            if let Some(o) = origin {
                args.extend(["--origin".into(), o.clone()]);
            }
            let endpoint = match listen {
                Listen::Unix => {
                    let s = dir.join("nbd.sock");
                    args.extend(["--socket".into(), s.display().to_string()]);
                    Endpoint::Unix(s)
                }
                Listen::Tcp => {
                    let p = free_port();
                    args.extend(["--listen".into(), format!("127.0.0.1:{p}")]);
                    Endpoint::Tcp(p)
                }
            };
            args.extend(extra.iter().cloned());
            let p = spawn_pmcache_serve(None, &args, log);
            (p, endpoint, true)
        }
        ServerKind::Command { program, args } => {
            let socket = dir.join("nbd.sock");
            let args: Vec<String> = args
                .iter()
                .map(|a| {
                    a.replace("{socket}", &socket.display().to_string())
                        .replace("{dir}", &dir.path().display().to_string())
                })
                .collect();
            let p = Proc::spawn(&require_tool(program), &args, log, &[]);
            (p, Endpoint::Unix(socket), false)
        }
    };
    wait_serving(&mut proc, &endpoint, is_pmcache, Duration::from_secs(30))?;
    Ok(ServerGuard {
        proc,
        endpoint,
        dir,
    })
}

/// Make a file of `len` bytes holding `data` at its start (the rest zero).
pub fn write_file(path: &Path, data: &[u8], len: usize) {
    let mut v = data.to_vec();
    v.resize(len, 0);
    std::fs::write(path, v).expect("write file");
}

/// A file of `len` pseudo-random bytes, some 256 KiB stretches left zero
/// (so that zero detection and sparse paths are exercised too).
pub fn random_image(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut data = pattern(seed, len);
    for z in (0..len).step_by(5 * MIB / 2) {
        let end = (z + MIB / 4).min(len);
        data[z..end].fill(0);
    }
    std::fs::write(path, &data).expect("write image");
    data
}

/// The run's seed, printed for a replay; each test draws its own rounds.
pub fn test_seed(test: &str) -> u64 {
    let seed = pmcache_testkit::seed();
    eprintln!("{test}: seed {seed} (replay with PMCACHE_SEED={seed})");
    seed
}

/// Each round's choices, from the run's seed.
pub fn round_seed(seed: u64, salt: u64, n: u64) -> u64 {
    pmcache_testkit::splitmix(seed ^ salt.rotate_left(32) ^ n)
}

/// The counters of the server running on `cache` (`pmcache stats --json`).
pub fn stats(cache: &Path, within: Duration) -> serde_json::Value {
    let out = pmcache_ok(
        &["stats", "--cache", &cache.display().to_string(), "--json"],
        within,
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("stats --json ({e}): {out}"))
}

/// One counter of [`stats`].
pub fn counter(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("stats lack {key}: {v}"))
}
