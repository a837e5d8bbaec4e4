//! Helpers shared by the CLI and kill -9 tests: temp dirs, running the
//! binary, and servers that are always stopped by PID with bounded waits
//! (started by `launch.rs`, the launcher the interop tests use too).

#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::Duration;

mod launch;
pub use launch::*;

pub fn bin() -> &'static str {
    pmcache_bin()
}

pub use pmcache_testkit::TempDir;

/// Run the binary to completion (bounded: these commands never wait on a
/// server), in `cwd` if given.
pub fn run_in(cwd: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new(bin());
    c.args(args).env_remove("RUST_LOG").stdin(Stdio::null());
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    c.output().expect("run pmcache")
}

pub fn run(args: &[&str]) -> Output {
    run_in(None, args)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Assert a successful run, showing its output otherwise.
pub fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "pmcache failed ({:?})\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// Assert a failed run with exactly one `pmcache: error:` line on stderr
/// that contains `needle`.
pub fn fails_with(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success\nstdout: {}\nstderr: {err}",
        stdout(o)
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one stderr line, got: {err}");
    assert!(
        lines[0].starts_with("pmcache: error: "),
        "stderr line is not a pmcache error: {err}"
    );
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "stderr does not mention {needle:?}: {err}"
    );
}

/// Make a sparse file of `len` bytes.
pub fn sparse(path: &Path, len: u64) {
    File::create(path)
        .and_then(|f| f.set_len(len))
        .expect("create sparse file");
}

/// Run `pmcache format --cache CACHE --size SIZE --origin ORIGIN EXTRA…`.
pub fn run_format(cache: &str, size: &str, origin: &str, extra: &[&str]) -> Output {
    let args = [
        "format", "--cache", cache, "--size", size, "--origin", origin,
    ];
    run(&[&args[..], extra].concat())
}

/// `pmcache format` a cache (assumed pmem, fast on /dev/shm).
pub fn format(cache: &Path, size: &str, origin: &Path) {
    ok(&run_format(
        &cache.display().to_string(),
        size,
        &origin.display().to_string(),
        &["--assume-pmem"],
    ));
}

/// A sparse origin `o.img` of `origin_len` bytes in `d` and a cache
/// `c.pmem` of `size` formatted for it. Returns (cache, origin).
pub fn formatted_cache(d: &TempDir, origin_len: u64, size: &str) -> (PathBuf, PathBuf) {
    let (cache, origin) = (d.join("c.pmem"), d.join("o.img"));
    sparse(&origin, origin_len);
    format(&cache, size, &origin);
    (cache, origin)
}

/// `pmcache flush` a cache to its origin (assumed pmem), asserting success.
pub fn flush_ok(cache: &Path, origin: &Path) -> Output {
    let o = run(&[
        "flush",
        "--cache",
        &cache.display().to_string(),
        "--origin",
        &origin.display().to_string(),
        "--assume-pmem",
    ]);
    ok(&o);
    o
}

/// `pmcache check` a cache, asserting that it passes.
pub fn check_ok(cache: &Path) {
    ok(&run(&["check", "--cache", &cache.display().to_string()]));
}

/// Run a command that prints JSON, asserting success; returns the JSON.
pub fn run_json(args: &[&str]) -> serde_json::Value {
    let o = run(args);
    ok(&o);
    serde_json::from_str(&stdout(&o))
        .unwrap_or_else(|e| panic!("{args:?} did not print JSON ({e}): {}", stdout(&o)))
}

pub fn dump_json(cache: &Path) -> serde_json::Value {
    run_json(&["dump", "--cache", &cache.display().to_string(), "--json"])
}

/// Assert that a run printed `want` on stdout, showing stdout otherwise.
pub fn assert_stdout_has(o: &Output, want: &str) {
    let out = stdout(o);
    assert!(out.contains(want), "stdout lacks {want:?}: {out}");
}

/// Run, asserting success and that stdout contains `want`.
pub fn run_prints(args: &[&str], want: &str) -> Output {
    let o = run(args);
    ok(&o);
    assert_stdout_has(&o, want);
    o
}

/// Runs `f` with the arguments that serve `d`'s cache `c.pmem` (assumed
/// pmem) on loopback `port`, followed by `extra`.
fn with_serve_args<R>(d: &TempDir, port: u16, extra: &[&str], f: impl FnOnce(&[&str]) -> R) -> R {
    let (cache, listen) = (d.s("c.pmem"), format!("127.0.0.1:{port}"));
    let args = ["--cache", &cache, "--assume-pmem", "--listen", &listen];
    f(&[&args[..], extra].concat())
}

/// `pmcache serve` `d`'s cache `c.pmem` (assumed pmem) on loopback `port`
/// with `extra` arguments, in `d`, logging to `log` there; returns once it
/// serves (within 20 s).
pub fn serve_cache(d: &TempDir, port: u16, extra: &[&str], log: &str) -> Server {
    let mut s = with_serve_args(d, port, extra, |args| {
        Server::start(d.path(), args, d.join(log))
    });
    s.wait_ready(Duration::from_secs(20));
    s
}

/// The arguments of [`serve_cache`] as a command run to completion: for
/// a serve that is refused.
pub fn run_serve_cache(d: &TempDir, port: u16, extra: &[&str]) -> Output {
    with_serve_args(d, port, extra, |args| run(&[&["serve"], args].concat()))
}

/// A `pmcache serve` child process, started and awaited by the shared
/// launcher (`launch.rs`). Dropping it kills it (SIGKILL) and reaps it.
pub struct Server {
    pub proc: Proc,
    pub port: Option<u16>,
}

impl Server {
    /// Start `pmcache serve ARGS` in `cwd`, logging to `log`.
    pub fn start(cwd: &Path, args: &[&str], log: PathBuf) -> Server {
        let port = args
            .iter()
            .position(|a| *a == "--listen")
            .and_then(|i| args.get(i + 1))
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok());
        Self::start_port(cwd, args, log, port)
    }

    pub fn start_port(cwd: &Path, args: &[&str], log: PathBuf, port: Option<u16>) -> Server {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let proc = spawn_pmcache_serve(Some(cwd), &args, log);
        Server { proc, port }
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid() as i32
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// Wait until the server accepts TCP connections on its port and has
    /// logged that it is serving. Panics with its log when it exits or does
    /// not come up within `timeout`.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let port = self.port.expect("server has a TCP port");
        if let Err(e) = wait_serving(&mut self.proc, &Endpoint::Tcp(port), true, timeout) {
            panic!("{e}");
        }
    }

    /// Wait for the process to exit within `timeout` (None if it did not).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.wait_exit(timeout)
    }

    pub fn signal(&mut self, sig: i32) {
        self.proc.signal(sig);
    }

    /// SIGTERM and wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_exit(Duration::from_secs(20)) {
            Some(st) => st,
            None => panic!("server ignored SIGTERM for 20 s; log:\n{}", self.log_text()),
        }
    }

    /// SIGTERM and assert a clean exit (status 0), showing the log otherwise.
    pub fn terminate_ok(&mut self) {
        let st = self.terminate();
        assert_eq!(st.code(), Some(0), "log: {}", self.log_text());
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.wait_exit(Duration::from_secs(10));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}
