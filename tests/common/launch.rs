//! The one launcher of child processes for the binary's tests: `pmcache
//! serve` and the other servers and tools, always stopped by PID with
//! bounded waits. Shared by `common/mod.rs` (the CLI and kill -9 tests) and
//! `common/nbd.rs` (the interoperability tests).

#![allow(dead_code)]

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn pmcache_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pmcache")
}

/// PATH for child processes: /usr/bin first, so that tools written in
/// Python (nbdsh) get the system python3 that has the `nbd` module.
pub fn child_path() -> String {
    format!(
        "/usr/bin:/usr/sbin:/bin:/sbin:{}",
        std::env::var("PATH").unwrap_or_default()
    )
}

/// A loopback TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A child process with its output in a log file. Stopped on drop by PID:
/// SIGTERM, then SIGKILL after 5 s.
pub struct Proc {
    child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(program: &Path, args: &[String], log: PathBuf, env: &[(&str, &str)]) -> Proc {
        Self::spawn_in(None, program, args, log, env)
    }

    /// As [`spawn`](Self::spawn), in the directory `cwd` if given.
    pub fn spawn_in(
        cwd: Option<&Path>,
        program: &Path,
        args: &[String],
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> Proc {
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let f = File::create(&log).expect("create log file");
        let mut c = Command::new(program);
        c.args(args)
            .env("PATH", child_path())
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup log"))
            .stderr(f);
        for (k, v) in env {
            c.env(k, v);
        }
        if let Some(d) = cwd {
            c.current_dir(d);
        }
        let child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Proc { child, name, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn signal(&mut self, sig: i32) {
        if self.exited().is_none() {
            // SAFETY: kill(2) on the PID of our own child, which has not been
            // reaped (try_wait returned None), so the PID cannot be reused.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, sig);
            }
        }
    }

    /// Wait (bounded) for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and wait up to `timeout`; fails the test (after SIGKILL) if
    /// the process ignores it.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_exit(timeout) {
            Some(s) => s,
            None => {
                self.signal(libc::SIGKILL);
                let _ = self.wait_exit(Duration::from_secs(10));
                panic!(
                    "{} (pid {}) ignored SIGTERM for {timeout:?}; log:\n{}",
                    self.name,
                    self.pid(),
                    self.log_text()
                );
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        self.signal(libc::SIGTERM);
        if self.wait_exit(Duration::from_secs(5)).is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.wait_exit(Duration::from_secs(10));
        }
    }
}

/// Where clients reach a running server.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(u16),
}

impl Endpoint {
    /// Does the server accept connections here?
    pub fn connects(&self) -> bool {
        match self {
            Endpoint::Unix(s) => UnixStream::connect(s).is_ok(),
            Endpoint::Tcp(p) => TcpStream::connect(("127.0.0.1", *p)).is_ok(),
        }
    }
}

/// `pmcache serve ARGS` in `cwd` (if given), logging at info level to `log`.
pub fn spawn_pmcache_serve(cwd: Option<&Path>, args: &[String], log: PathBuf) -> Proc {
    let mut all = vec!["serve".to_string()];
    all.extend(args.iter().cloned());
    let env = [("RUST_LOG", "info")];
    Proc::spawn_in(cwd, Path::new(pmcache_bin()), &all, log, &env)
}

/// Wait until the server accepts connections at `endpoint` and, for
/// pmcache, has logged that it is serving. On failure (it exited, or
/// `timeout` passed, when it is killed) returns what happened with its log.
pub fn wait_serving(
    proc: &mut Proc,
    endpoint: &Endpoint,
    is_pmcache: bool,
    timeout: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if let Some(status) = proc.exited() {
            return Err(format!(
                "server {} exited with {status} before serving; log:\n{}",
                proc.name,
                proc.log_text()
            ));
        }
        if endpoint.connects() && (!is_pmcache || proc.log_text().contains("serving")) {
            return Ok(());
        }
        if start.elapsed() > timeout {
            let log = proc.log_text();
            proc.signal(libc::SIGKILL);
            let _ = proc.wait_exit(Duration::from_secs(10));
            return Err(format!(
                "server {} did not serve within {timeout:?}; log:\n{log}",
                proc.name
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
