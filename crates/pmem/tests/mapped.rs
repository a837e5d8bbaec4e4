//! MappedRegion on real files: modes, errors that name the path, msync
//! persistence across reopen, fence counting.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

use pmcache_pmem::flush::FlushKind;
use pmcache_pmem::{MapOptions, MappedRegion, PersistMode, PmemError, PmemRegion};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A path in /dev/shm (tmpfs: MAP_SYNC is refused there) removed on drop.
struct TempPath(PathBuf);

impl TempPath {
    fn new(name: &str) -> Self {
        let p = PathBuf::from(format!(
            "/dev/shm/pmcache-pmem-test-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_dir(&p);
        TempPath(p)
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

fn mentions_path(e: &PmemError, p: &TempPath) {
    assert_eq!(e.path(), p.0.as_path());
    assert!(e.to_string().contains(&*p.0.to_string_lossy()), "{e}");
}

#[test]
fn create_then_open_and_modes_on_tmpfs() {
    let p = TempPath::new("modes");
    let r = MappedRegion::create(&p, 1 << 20, &MapOptions::new().assume_pmem(true)).unwrap();
    assert_eq!(r.len(), 1 << 20);
    assert_eq!(r.path(), p.0.as_path());
    assert_eq!(r.as_ptr() as usize % 4096, 0);
    // tmpfs refuses MAP_SYNC, so never Dax; assume_pmem picks the CPU flush.
    match FlushKind::detect() {
        Some(k) => assert_eq!(r.mode(), PersistMode::AssumedPmem(k)),
        None => assert_eq!(r.mode(), PersistMode::Msync),
    }
    drop(r);
    let r = MappedRegion::open(&p, &MapOptions::new()).unwrap();
    assert_eq!(r.mode(), PersistMode::Msync);
    assert_eq!(r.mode().to_string(), "msync");
    assert_eq!(r.len(), 1 << 20);
}

#[test]
fn data_persists_across_reopen_in_every_mode() {
    for assume in [false, true] {
        let p = TempPath::new(&format!("persist-{assume}"));
        let opts = MapOptions::new().assume_pmem(assume);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        {
            let r = MappedRegion::create(&p, 64 << 10, &opts).unwrap();
            // SAFETY: this thread is the only user of the region.
            unsafe {
                r.copy_flush(100, &data); // large: streaming stores
                r.copy_flush(20_000, &data[..50]); // small: temporal + flush
                r.slice_mut(30_000, 4).copy_from_slice(b"abcd");
                r.flush(30_000, 4);
                r.zero_flush(101, 10);
            }
            r.word(40_000)
                .store(0xDEAD_BEEF, std::sync::atomic::Ordering::Relaxed);
            r.persist(40_000, 8);
            r.fence();
            assert_eq!(r.fences(), 2);
        }
        let r = MappedRegion::open(&p, &MapOptions::new().expect_len(Some(64 << 10))).unwrap();
        // SAFETY: no writer.
        unsafe {
            assert_eq!(r.slice(100, 1), &data[..1]);
            assert!(r.slice(101, 10).iter().all(|&b| b == 0));
            assert_eq!(r.slice(111, data.len() - 11), &data[11..]);
            assert_eq!(r.slice(20_000, 50), &data[..50]);
            assert_eq!(r.slice(30_000, 4), b"abcd");
        }
        assert_eq!(
            r.word(40_000).load(std::sync::atomic::Ordering::Relaxed),
            0xDEAD_BEEF
        );
    }
}

#[test]
fn msync_mode_fences_sync_and_count() {
    let p = TempPath::new("msync");
    let r = MappedRegion::create(&p, 3 * 4096 + 100, &MapOptions::new()).unwrap();
    assert_eq!(r.mode(), PersistMode::Msync);
    // Ranges reaching into the last, partial page must sync cleanly.
    // SAFETY: only user.
    unsafe { r.copy_flush(3 * 4096 + 10, &[7; 90]) };
    r.flush(0, 1);
    r.fence();
    r.fence(); // nothing recorded: still counted
    assert_eq!(r.fences(), 2);
    drop(r);
    let r = MappedRegion::open(&p, &MapOptions::new()).unwrap();
    // SAFETY: no writer.
    assert_eq!(unsafe { r.slice(3 * 4096 + 10, 90) }, &[7; 90]);
}

#[test]
fn missing_file_is_not_found() {
    let p = TempPath::new("missing");
    let e = MappedRegion::open(&p, &MapOptions::new()).unwrap_err();
    assert!(matches!(e, PmemError::NotFound { .. }), "{e:?}");
    mentions_path(&e, &p);
}

#[test]
fn open_can_create_with_create_len() {
    let p = TempPath::new("create-len");
    let r = MappedRegion::open(&p, &MapOptions::new().create_len(Some(8192))).unwrap();
    assert_eq!(r.len(), 8192);
    drop(r);
    let e = MappedRegion::open(&p, &MapOptions::new().create_len(Some(16384))).unwrap_err();
    assert!(
        matches!(
            e,
            PmemError::WrongSize {
                expected: 16384,
                actual: 8192,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn wrong_size_names_both_sizes() {
    let p = TempPath::new("wrong-size");
    drop(MappedRegion::create(&p, 8192, &MapOptions::new()).unwrap());
    let e = MappedRegion::open(&p, &MapOptions::new().expect_len(Some(4096))).unwrap_err();
    assert!(
        matches!(
            e,
            PmemError::WrongSize {
                expected: 4096,
                actual: 8192,
                ..
            }
        ),
        "{e:?}"
    );
    mentions_path(&e, &p);
    assert!(
        e.to_string().contains("8192") && e.to_string().contains("4096"),
        "{e}"
    );
}

#[test]
fn create_refuses_existing_file() {
    let p = TempPath::new("exists");
    drop(MappedRegion::create(&p, 8192, &MapOptions::new()).unwrap());
    let e = MappedRegion::create(&p, 8192, &MapOptions::new()).unwrap_err();
    assert!(matches!(e, PmemError::AlreadyExists { .. }), "{e:?}");
    mentions_path(&e, &p);
}

#[test]
fn read_only_file_is_refused() {
    let p = TempPath::new("readonly");
    std::fs::write(&p, vec![0u8; 8192]).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
    let e = MappedRegion::open(&p, &MapOptions::new()).unwrap_err();
    assert!(matches!(e, PmemError::ReadOnly { .. }), "{e:?}");
    mentions_path(&e, &p);
}

#[test]
fn too_small_and_not_mappable() {
    let p = TempPath::new("small");
    std::fs::write(&p, [0u8; 100]).unwrap();
    let e = MappedRegion::open(&p, &MapOptions::new()).unwrap_err();
    assert!(matches!(e, PmemError::TooSmall { len: 100, .. }), "{e:?}");
    mentions_path(&e, &p);
    let e = MappedRegion::create(TempPath::new("small-create"), 0, &MapOptions::new()).unwrap_err();
    assert!(matches!(e, PmemError::TooSmall { len: 0, .. }), "{e:?}");

    let d = TempPath::new("dir");
    std::fs::create_dir(&d.0).unwrap();
    let e = MappedRegion::open(&d, &MapOptions::new()).unwrap_err();
    assert!(matches!(e, PmemError::NotMappable { .. }), "{e:?}");
    mentions_path(&e, &d);
}

#[test]
fn lock_excludes_a_second_opener() {
    let p = TempPath::new("lock");
    let opts = MapOptions::new().lock(true);
    let first = MappedRegion::create(&p, 8192, &opts).unwrap();
    let e = MappedRegion::open(&p, &opts).unwrap_err();
    assert!(matches!(e, PmemError::Locked { .. }), "{e:?}");
    mentions_path(&e, &p);
    drop(first);
    MappedRegion::open(&p, &opts).unwrap();
}

#[test]
fn prefault_off_still_maps() {
    let p = TempPath::new("noprefault");
    let r = MappedRegion::create(
        &p,
        1 << 20,
        &MapOptions::new().prefault(false).assume_pmem(true),
    )
    .unwrap();
    // SAFETY: only user.
    unsafe { r.copy_flush((1 << 20) - 8, &[1; 8]) };
    r.fence();
    // SAFETY: no writer.
    assert_eq!(unsafe { r.slice((1 << 20) - 8, 8) }, &[1; 8]);
}

#[test]
#[should_panic(expected = "out of bounds")]
fn out_of_range_flush_panics() {
    let p = TempPath::new("oob");
    let r = MappedRegion::create(&p, 8192, &MapOptions::new()).unwrap();
    r.flush(8190, 4);
}

#[test]
fn read_only_mapping_reads_and_refuses_stores() {
    let p = TempPath::new("ro");
    let w = MappedRegion::create(&p, 8192, &MapOptions::new()).unwrap();
    w.word(64)
        .store(0xfeed, std::sync::atomic::Ordering::SeqCst);
    w.persist(64, 8);
    drop(w);
    let f = std::fs::File::open(&p).unwrap();
    let r = MappedRegion::map_read_only(&p, &f).unwrap();
    assert_eq!(r.mode(), PersistMode::ReadOnly);
    assert_eq!(r.word(64).load(std::sync::atomic::Ordering::SeqCst), 0xfeed);
    r.flush(0, 64);
    r.fence();
    assert_eq!(r.fences(), 0, "a read-only region has nothing to fence");
    // SAFETY: the panic fires before any store; nothing else maps the file.
    let stored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
        r.copy_flush(0, &[1, 2, 3])
    }));
    assert!(
        stored.is_err(),
        "a store to a read-only mapping must be refused"
    );
    assert!(std::fs::read(&p).unwrap()[..3] == [0, 0, 0]);
}
