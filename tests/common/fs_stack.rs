//! A kernel file system on an export: nbdfuse shows the export as a file,
//! losetup makes that file a block device, and the kernel mounts it. Used by
//! the interop test (a clean life cycle) and the cache-loss test (torn down
//! after its server was killed). Every step is bounded, and dropping the
//! stack undoes whatever is still set up.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;

const T: Duration = Duration::from_secs(90);

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The export as a file (nbdfuse), that file as a block device (losetup),
/// and optionally mounted. Dropping it undoes whatever is still set up, in
/// reverse order, so a failing test leaves no mount or loop device behind.
pub struct FsStack {
    nbdfuse: Option<Proc>,
    fuse_dir: PathBuf,
    loopdev: Option<String>,
    mounted: Option<PathBuf>,
}

impl FsStack {
    /// nbdfuse `uri` as `dir/name/disk` (nbdfuse runs in `dir`, so that
    /// anything it leaves, such as a core dump, goes with the directory),
    /// and that file on a free loop device.
    pub fn attach(dir: &Path, name: &str, uri: &str) -> FsStack {
        let fuse_dir = dir.join(name);
        std::fs::create_dir_all(&fuse_dir).unwrap();
        let disk = fuse_dir.join("disk");
        let program = require_tool("nbdfuse");
        require_tool("fusermount3");
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: FUSE is not available here"
        );
        let mut stack = FsStack {
            nbdfuse: Some(Proc::spawn_in(
                Some(dir),
                &program,
                &[s(&disk), uri.to_string()],
                dir.join(format!("{name}-nbdfuse.log")),
                &[],
            )),
            fuse_dir,
            loopdev: None,
            mounted: None,
        };
        let start = Instant::now();
        while !disk.exists() {
            let p = stack.nbdfuse.as_mut().unwrap();
            if let Some(st) = p.exited() {
                panic!("nbdfuse exited with {st}: {}", p.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nbdfuse did not show {} within 20 s",
                disk.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let dev = run_ok("losetup", &["-f", "--show", &s(&disk)], T);
        let dev = dev.trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        stack.loopdev = Some(dev);
        stack
    }

    pub fn dev(&self) -> &str {
        self.loopdev.as_deref().expect("loop device attached")
    }

    pub fn mount(&mut self, mnt: &Path) {
        std::fs::create_dir_all(mnt).unwrap();
        run_ok("mount", &["-t", "ext4", self.dev(), &s(mnt)], T);
        self.mounted = Some(mnt.to_path_buf());
    }

    pub fn umount(&mut self) {
        if let Some(m) = self.mounted.take() {
            run_ok("umount", &[&s(&m)], T);
        }
    }

    /// Unmount, detach the loop device, unmount the FUSE file and wait
    /// (bounded) for nbdfuse to exit, which closes its NBD connection.
    pub fn detach(&mut self) {
        self.umount();
        run_ok("sync", &[], T);
        if let Some(d) = self.loopdev.take() {
            detach_loop(&d);
        }
        run_ok("fusermount3", &["-u", &s(&self.fuse_dir)], T);
        if let Some(mut p) = self.nbdfuse.take() {
            let st = p.wait_exit(Duration::from_secs(20));
            assert!(
                st.is_some(),
                "nbdfuse did not exit after fusermount3 -u: {}",
                p.log_text()
            );
        }
    }

    /// After the NBD server died: stop nbdfuse (by PID; it may have exited
    /// by itself already). Its FUSE connection goes with it, so every
    /// request to the file, queued or new, fails at once instead of waiting
    /// for a server that is gone, and processes doing I/O on the mounted
    /// file system get errors and can exit.
    pub fn cut_off(&mut self) {
        if let Some(p) = self.nbdfuse.as_mut() {
            if p.exited().is_none() {
                p.signal(libc::SIGKILL);
            }
            assert!(
                p.wait_exit(Duration::from_secs(20)).is_some(),
                "nbdfuse (pid {}) did not exit after SIGKILL",
                p.pid()
            );
        }
    }

    /// Tear the stack down after `cut_off` (the processes using the mount
    /// have exited): unmount (lazily if a plain umount is refused), detach
    /// the loop device, drop the dead FUSE mount. The file system sees I/O
    /// errors on the way; none of it waits on them. Asserts that no mount
    /// and no loop device is left; returns how the unmount went.
    pub fn detach_after_crash(&mut self) -> String {
        self.cut_off();
        let mut how = String::from("no mount");
        if let Some(m) = self.mounted.take() {
            let out = run_tool("umount", &[&s(&m)], T);
            how = if out.status.success() {
                "umount".into()
            } else {
                run_ok("umount", &["-l", &s(&m)], T);
                format!(
                    "umount -l (umount: {})",
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            };
            assert!(!is_mounted(&m), "{} is still mounted", m.display());
        }
        if let Some(d) = self.loopdev.take() {
            detach_loop(&d);
            wait_loop_free(&d);
        }
        run_ok("fusermount3", &["-u", "-z", &s(&self.fuse_dir)], T);
        self.nbdfuse = None;
        assert!(
            !is_mounted(&self.fuse_dir),
            "{} is still mounted",
            self.fuse_dir.display()
        );
        how
    }
}

/// Is `path` a mount point (in /proc/self/mountinfo)?
pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let p = s(path);
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == p))
}

/// `losetup -d dev`. A device that has no backing file any more is already
/// what detaching wants (the kernel clears one whose file went away, and
/// `losetup -d` then fails with ENXIO).
fn detach_loop(dev: &str) {
    let out = run_tool("losetup", &["-d", dev], T);
    let backing = format!(
        "/sys/block/{}/loop/backing_file",
        dev.trim_start_matches("/dev/")
    );
    assert!(
        out.status.success() || !Path::new(&backing).exists(),
        "losetup -d {dev} failed and it still has a backing file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Wait (bounded) until loop device `dev` has no backing file: a busy
/// device is detached by `losetup -d` only when its last user closes it.
fn wait_loop_free(dev: &str) {
    let name = dev.trim_start_matches("/dev/");
    let backing = format!("/sys/block/{name}/loop/backing_file");
    let start = Instant::now();
    while Path::new(&backing).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{dev} still has a backing file 20 s after losetup -d"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for FsStack {
    fn drop(&mut self) {
        let quiet = Duration::from_secs(20);
        if let Some(m) = self.mounted.take() {
            let _ = run_tool("umount", &["-l", &s(&m)], quiet);
        }
        if let Some(d) = self.loopdev.take() {
            let _ = run_tool("losetup", &["-d", &d], quiet);
        }
        if self.nbdfuse.is_some() {
            let _ = run_tool("fusermount3", &["-u", "-z", &s(&self.fuse_dir)], quiet);
        }
        // nbdfuse itself (if still running) is stopped by Proc's drop.
    }
}
