//! Persistence primitives: cache-line flushes, the store fence, and
//! non-temporal (streaming) copy and zero.
//!
//! On x86-64 with ADR a store is durable once its line has been written back
//! (`clwb` / `clflushopt` / `clflush`) and an `sfence` has completed after it.
//! Streaming stores bypass the cache, so they need no flush, only the fence.
//!
//! # When streaming stores pay off
//!
//! [`copy_flush`] and [`zero_flush`] use streaming stores from
//! [`NT_THRESHOLD`] bytes up and temporal stores + flush below. The threshold
//! was measured with `cargo bench -p pmcache-pmem --bench persist` on the
//! development machine (AMD EPYC, Zen 5 class, 2 vCPUs; a /dev/shm file
//! mapped with `assume_pmem`, so the flushes are real `clwb`s), timing
//! "temporal copy + clwb + sfence" against "AVX2 streaming copy + sfence"
//! per size, medians of 101 interleaved rounds. Destination cold (walking
//! 256 MiB) or hot (one address), line-aligned or 8 bytes off. Streaming
//! time as a fraction of copy + clwb time:
//!
//! | size   | cold aligned | cold +8 | hot aligned | hot +8 |
//! |--------|--------------|---------|-------------|--------|
//! | 512 B  |         0.61 |    0.92 |        0.87 |   0.83 |
//! | 1 KiB  |         0.61 |    0.86 |        0.88 |   1.12 |
//! | 2 KiB  |         0.62 |    0.78 |        0.80 |   0.79 |
//! | 4 KiB  |         0.48 |    0.53 |        0.63 |   0.66 |
//! | 1 MiB  |         0.50 |    0.50 |        0.56 |   0.56 |
//!
//! (2 KiB cold aligned: 230 ns against 142 ns.) Streaming often wins from
//! 64 B, but below 2 KiB not in every case and not by much, while it evicts
//! the written lines, so a later read misses (a cost the bench does not
//! charge). The rule "at least 10% faster in every case" gave 2 KiB in three
//! full runs out of four (1 KiB in the other), hence 2 KiB. AVX-512 stores
//! measured the same as AVX2 (memory-bound) and are not used; SSE2 is the
//! fallback. BENCHMARKS.md ("Persistence primitives") has the full run.
//!
//! Off x86-64 there is no user-space flush this crate knows, so
//! [`FlushKind::detect`] returns `None` and mappings fall back to `msync`; the
//! functions here still compile there (plain copies and an atomic fence).

use crate::LINE;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

/// Copies and zeroings of at least this many bytes use streaming stores.
/// Measured, see the module documentation.
pub const NT_THRESHOLD: usize = 2048;

/// The cache-line write-back instruction in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlushKind {
    /// Write back, keep the line cached (best: later reads still hit).
    Clwb,
    /// Write back and evict, weakly ordered (needs the fence).
    ClflushOpt,
    /// Write back and evict, serialising (the oldest, slowest one).
    Clflush,
}

impl fmt::Display for FlushKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FlushKind::Clwb => "clwb",
            FlushKind::ClflushOpt => "clflushopt",
            FlushKind::Clflush => "clflush",
        })
    }
}

impl FlushKind {
    /// The best flush this CPU has (clwb > clflushopt > clflush), or `None`
    /// where this crate has no user-space flush (not x86-64). Cached.
    pub fn detect() -> Option<FlushKind> {
        static KIND: OnceLock<Option<FlushKind>> = OnceLock::new();
        *KIND.get_or_init(imp::detect_flush)
    }

    /// Whether this CPU can execute `self` (benchmarks use it to skip the
    /// instructions the machine lacks).
    pub fn available(self) -> bool {
        imp::flush_available(self)
    }
}

/// The instruction set used for streaming stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NtIsa {
    /// 32-byte `vmovntdq ymm`.
    Avx2,
    /// 16-byte `movntdq xmm` (every x86-64 has it).
    Sse2,
    /// No streaming stores (not x86-64): plain stores.
    Plain,
}

impl fmt::Display for NtIsa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NtIsa::Avx2 => "avx2",
            NtIsa::Sse2 => "sse2",
            NtIsa::Plain => "plain",
        })
    }
}

impl NtIsa {
    /// The widest streaming store this CPU has. Cached.
    pub fn detect() -> NtIsa {
        static ISA: OnceLock<NtIsa> = OnceLock::new();
        *ISA.get_or_init(imp::detect_nt)
    }

    /// Whether this CPU can execute `self`.
    pub fn available(self) -> bool {
        imp::nt_available(self)
    }
}

/// Writes back every line overlapping `[addr, addr + len)`.
///
/// # Safety
/// The range must be mapped memory of this process, and `kind` must be
/// available on this CPU (as [`FlushKind::detect`] guarantees).
pub unsafe fn flush(kind: FlushKind, addr: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    let misalign = addr as usize % LINE;
    let first = addr.wrapping_sub(misalign);
    let lines = (misalign + len).div_ceil(LINE);
    // SAFETY: forwarded from the caller; `first` is the start of the line
    // holding `addr`, and `lines` lines end at or after `addr + len` but
    // never beyond the last line the range touches, which is mapped.
    unsafe { imp::flush_lines(kind, first, lines) }
}

/// Waits until every earlier flush and streaming store of this thread is
/// durable (`sfence`; an atomic fence elsewhere).
#[inline]
pub fn sfence() {
    imp::sfence();
}

/// Copies `src` to `dst` and leaves the range flushed (still needs
/// [`sfence`]): temporal copy + flush below [`NT_THRESHOLD`], streaming
/// stores from it up.
///
/// # Safety
/// `dst..dst + src.len()` must be mapped, writable, not overlap `src`, and
/// not be accessed by anyone else during the call; `kind` must be available.
pub unsafe fn copy_flush(kind: FlushKind, dst: *mut u8, src: &[u8]) {
    if src.len() >= NT_THRESHOLD {
        // SAFETY: forwarded from the caller.
        unsafe { copy_nt(kind, NtIsa::detect(), dst, src) }
    } else {
        // SAFETY: forwarded from the caller.
        unsafe { copy_temporal_flush(kind, dst, src) }
    }
}

/// Zeroes `[dst, dst + len)` and leaves it flushed (still needs [`sfence`]).
///
/// # Safety
/// As [`copy_flush`].
pub unsafe fn zero_flush(kind: FlushKind, dst: *mut u8, len: usize) {
    if len >= NT_THRESHOLD {
        // SAFETY: forwarded from the caller.
        unsafe { zero_nt(kind, NtIsa::detect(), dst, len) }
    } else {
        // SAFETY: forwarded from the caller.
        unsafe {
            std::ptr::write_bytes(dst, 0, len);
            flush(kind, dst, len);
        }
    }
}

/// Temporal copy, then flush of every line written.
///
/// # Safety
/// As [`copy_flush`].
pub unsafe fn copy_temporal_flush(kind: FlushKind, dst: *mut u8, src: &[u8]) {
    // SAFETY: forwarded from the caller.
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len());
        flush(kind, dst, src.len());
    }
}

/// Streaming copy with `isa`: whole lines by streaming stores, a partial
/// first or last line by temporal stores + `kind` flush. Still needs
/// [`sfence`].
///
/// # Safety
/// As [`copy_flush`]; `isa` must be available.
pub unsafe fn copy_nt(kind: FlushKind, isa: NtIsa, dst: *mut u8, src: &[u8]) {
    // SAFETY: forwarded from the caller.
    unsafe { nt(kind, isa, dst, Some(src.as_ptr()), src.len()) }
}

/// Stores `v` into the word `w` with one streaming store (`movnti`): the
/// line is not read first, so storing into a cold line does not wait for
/// memory. Still needs [`sfence`]. Only where a streaming ISA exists
/// (the mapping's persistence mode says so); a plain store elsewhere.
pub fn store_word_nt(w: &AtomicU64, v: u64) {
    imp::store_word_nt(w, v);
}

/// Hint that the line at `addr` is needed soon. Never faults, whatever
/// `addr` is, and changes no data.
#[inline]
pub fn prefetch(addr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch of any address is architecturally harmless: it
    // cannot fault and writes nothing.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(addr.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// Streaming zero, as [`copy_nt`].
///
/// # Safety
/// As [`copy_nt`].
pub unsafe fn zero_nt(kind: FlushKind, isa: NtIsa, dst: *mut u8, len: usize) {
    // SAFETY: forwarded from the caller.
    unsafe { nt(kind, isa, dst, None, len) }
}

/// Shared body of the streaming copy and zero; `src == None` means zeroes.
///
/// # Safety
/// As [`copy_nt`], with `src` (when given) readable for `len` bytes.
unsafe fn nt(kind: FlushKind, isa: NtIsa, dst: *mut u8, src: Option<*const u8>, len: usize) {
    let head = ((LINE - dst as usize % LINE) % LINE).min(len);
    let body_lines = (len - head) / LINE;
    let tail = len - head - body_lines * LINE;
    // SAFETY: the three pieces [0, head), [head, head + body), [.., len)
    // partition the caller's range, so every access stays inside `dst` /
    // `src`; the body starts line-aligned as the streaming loops require.
    unsafe {
        let partial = |off: usize, n: usize| {
            if n > 0 {
                match src {
                    Some(s) => std::ptr::copy_nonoverlapping(s.add(off), dst.add(off), n),
                    None => std::ptr::write_bytes(dst.add(off), 0, n),
                }
                flush(kind, dst.add(off), n);
            }
        };
        partial(0, head);
        if body_lines > 0 {
            imp::nt_lines(isa, dst.add(head), src.map(|s| s.add(head)), body_lines);
        }
        partial(head + body_lines * LINE, tail);
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::{FlushKind, NtIsa};
    use crate::LINE;
    use std::arch::asm;
    use std::arch::x86_64::{
        __m128i, __m256i, _mm256_loadu_si256, _mm256_setzero_si256, _mm256_stream_si256,
        _mm_loadu_si128, _mm_setzero_si128, _mm_stream_si128,
    };

    pub(super) fn detect_flush() -> Option<FlushKind> {
        [FlushKind::Clwb, FlushKind::ClflushOpt, FlushKind::Clflush]
            .into_iter()
            .find(|k| flush_available(*k))
    }

    pub(super) fn flush_available(kind: FlushKind) -> bool {
        match kind {
            FlushKind::Clwb => cpuid_bit(7, Reg::Ebx, 24),
            FlushKind::ClflushOpt => cpuid_bit(7, Reg::Ebx, 23),
            FlushKind::Clflush => cpuid_bit(1, Reg::Edx, 19),
        }
    }

    enum Reg {
        Ebx,
        Edx,
    }

    /// One CPUID feature bit (subleaf 0). `is_x86_feature_detected!` does not
    /// know clwb and clflushopt, so read them directly.
    fn cpuid_bit(leaf: u32, reg: Reg, bit: u32) -> bool {
        // `__cpuid_count` is an unsafe fn in older Rust and safe in newer.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU and only reads registers;
        // leaves above the maximum are never queried.
        let r = unsafe {
            if std::arch::x86_64::__cpuid(0).eax < leaf {
                return false;
            }
            std::arch::x86_64::__cpuid_count(leaf, 0)
        };
        let v = match reg {
            Reg::Ebx => r.ebx,
            Reg::Edx => r.edx,
        };
        v & (1 << bit) != 0
    }

    pub(super) fn detect_nt() -> NtIsa {
        [NtIsa::Avx2, NtIsa::Sse2]
            .into_iter()
            .find(|i| nt_available(*i))
            .unwrap_or(NtIsa::Plain)
    }

    pub(super) fn nt_available(isa: NtIsa) -> bool {
        match isa {
            NtIsa::Avx2 => is_x86_feature_detected!("avx2"),
            NtIsa::Sse2 | NtIsa::Plain => true,
        }
    }

    #[inline]
    pub(super) fn sfence() {
        // SAFETY: sfence only orders this thread's stores; it touches no
        // memory or registers.
        unsafe { asm!("sfence", options(nostack, preserves_flags)) }
    }

    #[inline]
    pub(super) fn store_word_nt(w: &std::sync::atomic::AtomicU64, v: u64) {
        // SAFETY: `w` is a valid, 8-aligned word, so `movnti` is one
        // single-copy-atomic 8-byte store, as an atomic store would be.
        unsafe {
            asm!("movnti [{}], {}", in(reg) w.as_ptr(), in(reg) v, options(nostack, preserves_flags))
        }
    }

    /// # Safety
    /// `first` is line-aligned; `lines` lines from it are mapped; `kind` is
    /// available on this CPU.
    pub(super) unsafe fn flush_lines(kind: FlushKind, first: *const u8, lines: usize) {
        // One loop per instruction so the match is outside the hot loop.
        // Not `nomem`: the compiler must not move stores past the flush.
        // SAFETY: (all three) the caller guarantees every flushed address
        // is mapped and the instruction exists; a flush changes no data.
        unsafe {
            match kind {
                FlushKind::Clwb => {
                    for i in 0..lines {
                        asm!("clwb [{}]", in(reg) first.add(i * LINE), options(nostack, preserves_flags));
                    }
                }
                FlushKind::ClflushOpt => {
                    for i in 0..lines {
                        asm!("clflushopt [{}]", in(reg) first.add(i * LINE), options(nostack, preserves_flags));
                    }
                }
                FlushKind::Clflush => {
                    for i in 0..lines {
                        asm!("clflush [{}]", in(reg) first.add(i * LINE), options(nostack, preserves_flags));
                    }
                }
            }
        }
    }

    /// Streams `lines` whole lines to `dst` from `src` (zeroes if `None`).
    ///
    /// # Safety
    /// `dst` is line-aligned and writable for `lines * LINE` bytes, `src`
    /// readable as much; `isa` is available on this CPU.
    pub(super) unsafe fn nt_lines(isa: NtIsa, dst: *mut u8, src: Option<*const u8>, lines: usize) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match isa {
                NtIsa::Avx2 => nt_lines_avx2(dst, src, lines),
                NtIsa::Sse2 => nt_lines_sse2(dst, src, lines),
                NtIsa::Plain => super::plain_lines(dst, src, lines),
            }
        }
    }

    /// # Safety
    /// As `nt_lines`, with AVX2 available.
    #[target_feature(enable = "avx2")]
    unsafe fn nt_lines_avx2(dst: *mut u8, src: Option<*const u8>, lines: usize) {
        const W: usize = 32;
        // SAFETY: every access is inside the caller's ranges; `dst + i*W` is
        // 32-aligned because `dst` is line-aligned (streaming stores require
        // it); loads are unaligned-tolerant.
        unsafe {
            match src {
                Some(s) => {
                    for i in 0..lines * (LINE / W) {
                        let v = _mm256_loadu_si256(s.add(i * W) as *const __m256i);
                        _mm256_stream_si256(dst.add(i * W) as *mut __m256i, v);
                    }
                }
                None => {
                    let z = _mm256_setzero_si256();
                    for i in 0..lines * (LINE / W) {
                        _mm256_stream_si256(dst.add(i * W) as *mut __m256i, z);
                    }
                }
            }
        }
    }

    /// # Safety
    /// As `nt_lines`.
    unsafe fn nt_lines_sse2(dst: *mut u8, src: Option<*const u8>, lines: usize) {
        const W: usize = 16;
        // SAFETY: as in `nt_lines_avx2`, with 16-byte stores; SSE2 is part
        // of x86-64.
        unsafe {
            match src {
                Some(s) => {
                    for i in 0..lines * (LINE / W) {
                        let v = _mm_loadu_si128(s.add(i * W) as *const __m128i);
                        _mm_stream_si128(dst.add(i * W) as *mut __m128i, v);
                    }
                }
                None => {
                    let z = _mm_setzero_si128();
                    for i in 0..lines * (LINE / W) {
                        _mm_stream_si128(dst.add(i * W) as *mut __m128i, z);
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    //! Portable fallback: no user-space flush, so `detect` reports none and
    //! mappings use msync; these only keep the API callable.
    use super::{FlushKind, NtIsa};
    use std::sync::atomic::{fence, Ordering};

    pub(super) fn detect_flush() -> Option<FlushKind> {
        None
    }

    pub(super) fn flush_available(_kind: FlushKind) -> bool {
        false
    }

    pub(super) fn detect_nt() -> NtIsa {
        NtIsa::Plain
    }

    pub(super) fn nt_available(isa: NtIsa) -> bool {
        isa == NtIsa::Plain
    }

    pub(super) fn sfence() {
        fence(Ordering::SeqCst);
    }

    pub(super) unsafe fn flush_lines(_kind: FlushKind, _first: *const u8, _lines: usize) {
        fence(Ordering::SeqCst);
    }

    pub(super) fn store_word_nt(w: &std::sync::atomic::AtomicU64, v: u64) {
        w.store(v, Ordering::SeqCst);
    }

    pub(super) unsafe fn nt_lines(_isa: NtIsa, dst: *mut u8, src: Option<*const u8>, lines: usize) {
        // SAFETY: forwarded from the caller.
        unsafe { super::plain_lines(dst, src, lines) }
    }
}

/// Plain-store stand-in for streaming stores.
///
/// # Safety
/// As `imp::nt_lines`.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
unsafe fn plain_lines(dst: *mut u8, src: Option<*const u8>, lines: usize) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match src {
            Some(s) => std::ptr::copy_nonoverlapping(s, dst, lines * LINE),
            None => std::ptr::write_bytes(dst, 0, lines * LINE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One cache line, aligned as one.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Line([u8; 64]);

    /// A 64-aligned buffer, so tests control the misalignment exactly.
    fn aligned(len: usize) -> Vec<Line> {
        let v = vec![Line([0u8; 64]); len.div_ceil(64) + 2];
        assert_eq!(v.as_ptr() as usize % 64, 0);
        v
    }

    #[test]
    fn detection_follows_preference() {
        let k = FlushKind::detect();
        #[cfg(target_arch = "x86_64")]
        {
            let k = k.expect("x86-64 always has a flush");
            assert!(k.available());
            if FlushKind::Clwb.available() {
                assert_eq!(k, FlushKind::Clwb);
            } else if FlushKind::ClflushOpt.available() {
                assert_eq!(k, FlushKind::ClflushOpt);
            } else {
                assert_eq!(k, FlushKind::Clflush);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        assert_eq!(k, None);
        assert_eq!(FlushKind::Clwb.to_string(), "clwb");
        assert_eq!(FlushKind::ClflushOpt.to_string(), "clflushopt");
        assert_eq!(FlushKind::Clflush.to_string(), "clflush");
    }

    /// Every kind and every ISA, at odd offsets and lengths around line and
    /// threshold boundaries, must copy/zero exactly the range and nothing else.
    #[test]
    fn nt_copy_and_zero_are_exact() {
        let kinds: Vec<FlushKind> = [FlushKind::Clwb, FlushKind::ClflushOpt, FlushKind::Clflush]
            .into_iter()
            .filter(|k| k.available())
            .collect();
        let isas: Vec<NtIsa> = [NtIsa::Avx2, NtIsa::Sse2, NtIsa::Plain]
            .into_iter()
            .filter(|i| i.available())
            .collect();
        let src: Vec<u8> = (0..9000u32).map(|i| (i * 7 + 3) as u8).collect();
        for &kind in &kinds {
            for &isa in &isas {
                for &off in &[0usize, 1, 8, 63, 64, 100] {
                    for &len in &[0usize, 1, 63, 64, 65, 127, 128, 200, 4096, 4097, 8191] {
                        let mut buf = aligned(off + len + 64);
                        let base = buf.as_mut_ptr() as *mut u8;
                        let total = buf.len() * 64;
                        // SAFETY: [base, base + total) is the vector's storage.
                        unsafe {
                            std::ptr::write_bytes(base, 0xAA, total);
                            copy_nt(kind, isa, base.add(off), &src[..len]);
                            sfence();
                            let all = std::slice::from_raw_parts(base, total);
                            assert!(
                                all[..off].iter().all(|&b| b == 0xAA),
                                "{kind} {isa} off {off} len {len}"
                            );
                            assert_eq!(
                                &all[off..off + len],
                                &src[..len],
                                "{kind} {isa} off {off} len {len}"
                            );
                            assert!(
                                all[off + len..].iter().all(|&b| b == 0xAA),
                                "{kind} {isa} off {off} len {len}"
                            );

                            zero_nt(kind, isa, base.add(off), len);
                            sfence();
                            let all = std::slice::from_raw_parts(base, total);
                            assert!(all[..off].iter().all(|&b| b == 0xAA));
                            assert!(all[off..off + len].iter().all(|&b| b == 0));
                            assert!(all[off + len..].iter().all(|&b| b == 0xAA));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn threshold_dispatch_copies_both_sides() {
        let Some(kind) = FlushKind::detect() else {
            return;
        };
        for &len in &[NT_THRESHOLD - 1, NT_THRESHOLD, NT_THRESHOLD + 65] {
            let src: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut buf = aligned(len + 8);
            let base = buf.as_mut_ptr() as *mut u8;
            // SAFETY: the range lies inside the vector.
            unsafe {
                copy_flush(kind, base.add(3), &src);
                sfence();
                assert_eq!(std::slice::from_raw_parts(base.add(3), len), &src[..]);
                zero_flush(kind, base.add(3), len);
                sfence();
                assert!(std::slice::from_raw_parts(base.add(3), len)
                    .iter()
                    .all(|&b| b == 0));
                assert_eq!(*base.add(3 + len), 0);
            }
        }
    }
}
