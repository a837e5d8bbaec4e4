//! XXH3-64 of data blocks with runtime CPU dispatch, and a streaming copy
//! that hashes what it copies.
//!
//! The block hash is part of the on-media format, so every function here
//! returns exactly `xxhash_rust::xxh3::xxh3_64`. xxhash-rust picks its SIMD
//! width at compile time (SSE2 in a portable x86-64 build); here inputs over
//! 240 bytes (XXH3's "long" path, where a 4 KiB block's time goes) use the
//! widest vectors the CPU has, and everything else goes to xxhash-rust.
//!
//! Measured on the development machine (Zen 5 class), a hot 4 KiB block hashes in ~50 ns
//! with it, ~73 ns with AVX2 and ~113 ns in xxhash-rust (SSE2); the fused
//! streaming copy is bound by the copy either way.
//!
//! The long path, per the reference (`xxhash.h`, `XXH3_hashLong_64b`): the
//! input is cut in 64-byte stripes, each folded into eight u64 accumulators
//! with the secret advanced 8 bytes per stripe; every 16 stripes (one
//! 1 KiB block with the default 192-byte secret) the accumulators are
//! scrambled. The last, possibly overlapping, stripe ends exactly at the end
//! of the input and uses the secret at `192 - 64 - 7`; the merge uses it at
//! 11.

/// Inputs up to this length take XXH3's short paths (xxhash-rust).
const MID_SIZE_MAX: usize = 240;
const STRIPE: usize = 64;
const SECRET_LEN: usize = 192;
const STRIPES_PER_BLOCK: usize = (SECRET_LEN - STRIPE) / 8;
const BLOCK: usize = STRIPE * STRIPES_PER_BLOCK;
const SCRAMBLE_KEY: usize = SECRET_LEN - STRIPE;
const LASTACC_KEY: usize = SECRET_LEN - STRIPE - 7;
const MERGEACCS_START: usize = 11;

const PRIME32_1: u32 = 0x9E37_79B1;
const PRIME32_2: u32 = 0x85EB_CA77;
const PRIME32_3: u32 = 0xC2B2_AE3D;
const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;

const INIT_ACC: [u64; 8] = [
    PRIME32_3 as u64,
    PRIME64_1,
    PRIME64_2,
    PRIME64_3,
    PRIME64_4,
    PRIME32_2 as u64,
    PRIME64_5,
    PRIME32_1 as u64,
];

#[repr(C, align(64))]
struct Secret([u8; SECRET_LEN]);

/// XXH3's default secret (`XXH3_kSecret`); xxhash-rust does not export it.
static SECRET: Secret = Secret([
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
]);

/// Which implementation of the long path runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    /// 512-bit vectors: one register holds all eight accumulators.
    Avx512,
    /// 256-bit vectors.
    Avx2,
    /// xxhash-rust as compiled (SSE2 on a portable x86-64 build).
    Portable,
}

impl Variant {
    /// The fastest variant this CPU runs. Cached.
    pub(crate) fn detect() -> Variant {
        use std::sync::atomic::{AtomicU8, Ordering};
        // 0 = not yet detected; otherwise 1 + the variant's index.
        static CACHE: AtomicU8 = AtomicU8::new(0);
        const ALL: [Variant; 3] = [Variant::Avx512, Variant::Avx2, Variant::Portable];
        match CACHE.load(Ordering::Relaxed) {
            0 => {
                let i = ALL.iter().position(|v| v.available()).unwrap_or(2);
                CACHE.store(i as u8 + 1, Ordering::Relaxed);
                ALL[i]
            }
            n => ALL[usize::from(n - 1)],
        }
    }

    /// Whether this CPU can run `self`.
    pub(crate) fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => is_x86_feature_detected!("avx2"),
            Variant::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// The long-path implementation in use ("avx512", "avx2" or
/// "xxhash-rust"), for logs and benchmark headers.
pub fn implementation() -> &'static str {
    match Variant::detect() {
        Variant::Avx512 => "avx512",
        Variant::Avx2 => "avx2",
        Variant::Portable => "xxhash-rust",
    }
}

/// XXH3-64 (seed 0, default secret) of `data`: always equal to
/// `xxhash_rust::xxh3::xxh3_64(data)`, faster for long inputs on CPUs with
/// AVX2 or AVX-512.
#[inline]
pub fn xxh3_64(data: &[u8]) -> u64 {
    xxh3_64_with(Variant::detect(), data)
}

/// [`xxh3_64`] with a chosen variant (xxhash-rust if it is unavailable).
pub(crate) fn xxh3_64_with(v: Variant, data: &[u8]) -> u64 {
    if data.len() > MID_SIZE_MAX && v.available() {
        match v {
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512 => {
                // SAFETY: `v` runs on this CPU (checked); the input is longer
                // than one stripe, as the long path needs; the null
                // destination is never written without COPY.
                return unsafe { x86::avx512::long::<false>(data, std::ptr::null_mut()) };
            }
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => {
                // SAFETY: as for AVX-512 above.
                return unsafe { x86::long_avx2::<false>(data, std::ptr::null_mut()) };
            }
            _ => {}
        }
    }
    xxhash_rust::xxh3::xxh3_64(data)
}

/// Copies `src` to `dst` with streaming stores and returns
/// `Some(xxh3_64(src))`, hashing from the registers the copy loaded, so the
/// source is read once. Only the fast case is handled: `dst` 64-byte
/// aligned, `src.len()` a multiple of 64 and over 240, and AVX2 present;
/// otherwise nothing is copied and `None` returned. The stores still need an
/// `sfence` to be ordered (and durable).
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` bytes, must not overlap
/// `src`, and nobody else may access it during the call.
pub unsafe fn copy_nt_hash(dst: *mut u8, src: &[u8]) -> Option<u64> {
    // AVX2 even where AVX-512 is enabled: the copy bounds this loop, and as
    // for plain streaming copies (see `flush`) 64-byte stores measured no
    // faster (isolated cold 4 KiB copy+hash: ~90-110 ns both, within noise).
    let v = if Variant::Avx2.available() {
        Variant::Avx2
    } else {
        Variant::Portable
    };
    // SAFETY: forwarded from the caller; the variant is this CPU's.
    unsafe { copy_nt_hash_with(v, dst, src) }
}

/// [`copy_nt_hash`] with a chosen variant (`None` if it is unavailable).
///
/// # Safety
/// As [`copy_nt_hash`].
pub(crate) unsafe fn copy_nt_hash_with(v: Variant, dst: *mut u8, src: &[u8]) -> Option<u64> {
    let len = src.len();
    if len <= MID_SIZE_MAX
        || !len.is_multiple_of(STRIPE)
        || !(dst as usize).is_multiple_of(STRIPE)
        || !v.available()
    {
        return None;
    }
    match v {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller guarantees `dst` is writable for `len` bytes
        // and exclusive; it is 64-aligned and `len` is a whole number of
        // stripes (checked above), as the streaming loops require; `v` runs
        // on this CPU (checked).
        Variant::Avx512 => Some(unsafe { x86::avx512::long::<true>(src, dst) }),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as for AVX-512 above.
        Variant::Avx2 => Some(unsafe { x86::long_avx2::<true>(src, dst) }),
        _ => None,
    }
}

/// Folds the accumulators into the hash (`XXH3_mergeAccs` + avalanche).
fn merge_accs(acc: &[u64; 8], len: usize) -> u64 {
    let key = |i: usize| {
        let at = MERGEACCS_START + 8 * i;
        u64::from_le_bytes(SECRET.0[at..at + 8].try_into().expect("8 bytes"))
    };
    let mut r = (len as u64).wrapping_mul(PRIME64_1);
    for i in 0..4 {
        let p = u128::from(acc[2 * i] ^ key(2 * i)) * u128::from(acc[2 * i + 1] ^ key(2 * i + 1));
        r = r.wrapping_add(p as u64 ^ (p >> 64) as u64);
    }
    r ^= r >> 37;
    r = r.wrapping_mul(0x1656_6791_9E37_79F9);
    r ^ (r >> 32)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The long path in AVX2 and AVX-512. Both share one
    //! loop ([`long`]) through the [`Lanes`] trait; `COPY` also streams each
    //! stripe to a destination from the registers it was loaded into.
    //!
    //! The helpers are `#[inline(always)]` without target features of their
    //! own: they are only called from the `#[target_feature]` entry points,
    //! into which they inline, so the intrinsics compile with the feature.

    use super::{merge_accs, BLOCK, INIT_ACC, LASTACC_KEY, SCRAMBLE_KEY, SECRET, STRIPE};
    use super::{PRIME32_1, STRIPES_PER_BLOCK};
    use std::arch::x86_64::*;

    /// Eight u64 accumulators in vector registers.
    trait Lanes: Copy {
        /// # Safety
        /// The vector ISA is enabled in the caller.
        unsafe fn init() -> Self;
        /// Folds the stripe at `src` in with the secret at `key`, and
        /// streams it to `dst` if `COPY`.
        ///
        /// # Safety
        /// `src` readable for 64 bytes; `key` for 64; with `COPY`, `dst`
        /// 64-aligned and writable for 64; the vector ISA is enabled.
        unsafe fn stripe<const COPY: bool>(&mut self, src: *const u8, dst: *mut u8, key: *const u8);
        /// # Safety
        /// `key` readable for 64 bytes; the vector ISA is enabled.
        unsafe fn scramble(&mut self, key: *const u8);
        /// # Safety
        /// The vector ISA is enabled.
        unsafe fn store(self) -> [u64; 8];
    }

    /// The whole long path (`XXH3_hashLong_64b`).
    ///
    /// # Safety
    /// `src.len() > 64`; with `COPY`, `src.len()` a multiple of 64 and `dst`
    /// 64-aligned, writable for `src.len()` bytes, not overlapping `src`;
    /// `L`'s ISA enabled in the caller.
    #[inline(always)]
    unsafe fn long<L: Lanes, const COPY: bool>(src: &[u8], dst: *mut u8) -> u64 {
        let len = src.len();
        debug_assert!(len > STRIPE && (!COPY || len.is_multiple_of(STRIPE)));
        let p = src.as_ptr();
        let s = SECRET.0.as_ptr();
        // Whole blocks, then the stripes of the last block except the final
        // stripe, which is always done apart with its own key.
        let blocks = (len - 1) / BLOCK;
        let rest = ((len - 1) - blocks * BLOCK) / STRIPE;
        // SAFETY: the loops read stripes k < (len - 1) / 64, each ending at
        // 64 (k + 1) <= len - 1, then [len - 64, len): all inside `src`.
        // Secret reads end at most at 8 * 15 + 64 = 184, 128 + 64 = 192 and
        // 121 + 64 = 185, inside its 192 bytes. With COPY, `len` is a stripe
        // multiple, so the stripes written are exactly [0, len) in `dst`,
        // each 64-aligned; without it `dst` is never dereferenced.
        unsafe {
            let mut acc = L::init();
            for b in 0..blocks {
                let at = b * BLOCK;
                for i in 0..STRIPES_PER_BLOCK {
                    let o = at + i * STRIPE;
                    acc.stripe::<COPY>(p.add(o), dst.wrapping_add(o), s.add(i * 8));
                }
                acc.scramble(s.add(SCRAMBLE_KEY));
            }
            let at = blocks * BLOCK;
            for i in 0..rest {
                let o = at + i * STRIPE;
                acc.stripe::<COPY>(p.add(o), dst.wrapping_add(o), s.add(i * 8));
            }
            let o = len - STRIPE;
            acc.stripe::<COPY>(p.add(o), dst.wrapping_add(o), s.add(LASTACC_KEY));
            merge_accs(&acc.store(), len)
        }
    }

    /// # Safety
    /// As [`long`], with AVX2 available.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn long_avx2<const COPY: bool>(src: &[u8], dst: *mut u8) -> u64 {
        // SAFETY: forwarded; AVX2 is enabled here.
        unsafe { long::<Avx2, COPY>(src, dst) }
    }

    #[derive(Clone, Copy)]
    struct Avx2([__m256i; 2]);

    impl Avx2 {
        /// `XXH3_accumulate_512` on four lanes.
        ///
        /// # Safety
        /// `key` readable for 32 bytes; AVX2 enabled.
        #[inline(always)]
        unsafe fn acc(acc: __m256i, data: __m256i, key: *const u8) -> __m256i {
            // SAFETY: per the contract.
            unsafe {
                let dk = _mm256_xor_si256(data, _mm256_loadu_si256(key.cast()));
                // Each lane's high half moved to its low half, for mul_epu32.
                let hi = _mm256_shuffle_epi32::<0x31>(dk);
                let prod = _mm256_mul_epu32(dk, hi);
                // acc[i] += data[i ^ 1]: swap the 64-bit halves of each 128.
                let swapped = _mm256_shuffle_epi32::<0x4E>(data);
                _mm256_add_epi64(_mm256_add_epi64(acc, swapped), prod)
            }
        }

        /// `XXH3_scrambleAcc` on four lanes.
        ///
        /// # Safety
        /// `key` readable for 32 bytes; AVX2 enabled.
        #[inline(always)]
        unsafe fn scr(acc: __m256i, key: *const u8) -> __m256i {
            // SAFETY: per the contract.
            unsafe {
                let a = _mm256_xor_si256(acc, _mm256_srli_epi64::<47>(acc));
                let a = _mm256_xor_si256(a, _mm256_loadu_si256(key.cast()));
                // a * PRIME32_1 mod 2^64 = lo * P + ((hi * P) << 32).
                let prime = _mm256_set1_epi64x(i64::from(PRIME32_1));
                let lo = _mm256_mul_epu32(a, prime);
                let hi = _mm256_mul_epu32(_mm256_shuffle_epi32::<0x31>(a), prime);
                _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(hi))
            }
        }
    }

    impl Lanes for Avx2 {
        #[inline(always)]
        unsafe fn init() -> Self {
            let p = INIT_ACC.as_ptr().cast::<__m256i>();
            // SAFETY: INIT_ACC is 64 bytes; unaligned loads; AVX2 enabled.
            unsafe { Avx2([_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1))]) }
        }

        #[inline(always)]
        unsafe fn stripe<const COPY: bool>(
            &mut self,
            src: *const u8,
            dst: *mut u8,
            key: *const u8,
        ) {
            // SAFETY: per the trait contract; `dst` and `dst + 32` are
            // 32-aligned because `dst` is 64-aligned.
            unsafe {
                let d0 = _mm256_loadu_si256(src.cast());
                let d1 = _mm256_loadu_si256(src.add(32).cast());
                if COPY {
                    _mm256_stream_si256(dst.cast(), d0);
                    _mm256_stream_si256(dst.add(32).cast(), d1);
                }
                self.0[0] = Self::acc(self.0[0], d0, key);
                self.0[1] = Self::acc(self.0[1], d1, key.add(32));
            }
        }

        #[inline(always)]
        unsafe fn scramble(&mut self, key: *const u8) {
            // SAFETY: per the trait contract.
            unsafe {
                self.0[0] = Self::scr(self.0[0], key);
                self.0[1] = Self::scr(self.0[1], key.add(32));
            }
        }

        #[inline(always)]
        unsafe fn store(self) -> [u64; 8] {
            let mut out = [0u64; 8];
            let p = out.as_mut_ptr().cast::<__m256i>();
            // SAFETY: `out` is 64 bytes; unaligned stores; AVX2 enabled.
            unsafe {
                _mm256_storeu_si256(p, self.0[0]);
                _mm256_storeu_si256(p.add(1), self.0[1]);
            }
            out
        }
    }

    /// The AVX-512 variant (its intrinsics are stable from Rust 1.89).
    pub(super) mod avx512 {
        use super::{Lanes, INIT_ACC, PRIME32_1};
        use std::arch::x86_64::*;

        /// # Safety
        /// As [`super::long`], with AVX-512F available.
        #[target_feature(enable = "avx512f")]
        pub(in crate::hash) unsafe fn long<const COPY: bool>(src: &[u8], dst: *mut u8) -> u64 {
            // SAFETY: forwarded; AVX-512F is enabled here.
            unsafe { super::long::<Avx512, COPY>(src, dst) }
        }

        #[derive(Clone, Copy)]
        struct Avx512(__m512i);

        impl Lanes for Avx512 {
            #[inline(always)]
            unsafe fn init() -> Self {
                // SAFETY: INIT_ACC is 64 bytes; unaligned load; AVX-512F enabled.
                unsafe { Avx512(_mm512_loadu_si512(INIT_ACC.as_ptr().cast())) }
            }

            #[inline(always)]
            unsafe fn stripe<const COPY: bool>(
                &mut self,
                src: *const u8,
                dst: *mut u8,
                key: *const u8,
            ) {
                // SAFETY: per the trait contract (`dst` 64-aligned with COPY).
                unsafe {
                    let data = _mm512_loadu_si512(src.cast());
                    if COPY {
                        _mm512_stream_si512(dst.cast(), data);
                    }
                    let dk = _mm512_xor_si512(data, _mm512_loadu_si512(key.cast()));
                    let prod = _mm512_mul_epu32(dk, _mm512_srli_epi64::<32>(dk));
                    let swapped = _mm512_shuffle_epi32::<_MM_PERM_BADC>(data);
                    self.0 = _mm512_add_epi64(_mm512_add_epi64(self.0, swapped), prod);
                }
            }

            #[inline(always)]
            unsafe fn scramble(&mut self, key: *const u8) {
                // SAFETY: per the trait contract.
                unsafe {
                    let a = self.0;
                    // a ^ (a >> 47) ^ key in one three-way xor.
                    let a = _mm512_ternarylogic_epi64::<0x96>(
                        a,
                        _mm512_srli_epi64::<47>(a),
                        _mm512_loadu_si512(key.cast()),
                    );
                    let prime = _mm512_set1_epi64(i64::from(PRIME32_1));
                    let lo = _mm512_mul_epu32(a, prime);
                    let hi = _mm512_mul_epu32(_mm512_srli_epi64::<32>(a), prime);
                    self.0 = _mm512_add_epi64(lo, _mm512_slli_epi64::<32>(hi));
                }
            }

            #[inline(always)]
            unsafe fn store(self) -> [u64; 8] {
                let mut out = [0u64; 8];
                // SAFETY: `out` is 64 bytes; unaligned store; AVX-512F enabled.
                unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), self.0) };
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn variants() -> Vec<Variant> {
        [Variant::Avx512, Variant::Avx2, Variant::Portable]
            .into_iter()
            .filter(|v| v.available())
            .collect()
    }

    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Line([u8; 64]);

    /// A 64-aligned buffer of at least `len` bytes.
    fn aligned(len: usize) -> Vec<Line> {
        vec![Line([0; 64]); len.div_ceil(64) + 1]
    }

    fn reference(data: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64(data)
    }

    /// Hash (every variant and the dispatcher) and fused copy (every
    /// variant) of `data` against xxhash-rust.
    fn check(data: &[u8], what: &str) {
        let want = reference(data);
        assert_eq!(xxh3_64(data), want, "dispatch, {what}, len {}", data.len());
        for v in variants() {
            assert_eq!(
                xxh3_64_with(v, data),
                want,
                "{v:?}, {what}, len {}",
                data.len()
            );
            let mut buf = aligned(data.len() + 64);
            let base = buf.as_mut_ptr().cast::<u8>();
            let total = buf.len() * 64;
            assert_eq!(base as usize % 64, 0);
            // SAFETY: [base, base + total) is the vector's storage, which
            // `data` (a separate allocation) does not overlap.
            unsafe {
                std::ptr::write_bytes(base, 0xAA, total);
                let got = copy_nt_hash_with(v, base, data);
                crate::flush::sfence();
                let all = std::slice::from_raw_parts(base, total);
                let fast =
                    data.len() > 240 && data.len().is_multiple_of(64) && v != Variant::Portable;
                if fast {
                    assert_eq!(got, Some(want), "copy {v:?}, {what}, len {}", data.len());
                    assert_eq!(&all[..data.len()], data, "copy {v:?} bytes, {what}");
                    assert!(all[data.len()..].iter().all(|&b| b == 0xAA));
                } else {
                    assert_eq!(got, None, "copy {v:?}, {what}, len {}", data.len());
                    assert!(all.iter().all(|&b| b == 0xAA), "declined copy wrote");
                }
                // A misaligned destination is always declined.
                if data.len() + 8 <= total {
                    assert_eq!(copy_nt_hash_with(v, base.add(8), data), None);
                }
            }
        }
    }

    fn lengths(rng: &mut SmallRng) -> Vec<usize> {
        let mut l: Vec<usize> = (0..=300).collect();
        l.extend([
            319,
            320,
            321,
            512,
            1000,
            1023,
            1024,
            1025,
            1087,
            1088,
            1089,
            2048,
            4095,
            4096,
            4097,
            8192,
            65536,
            1 << 20,
        ]);
        l.extend((0..40).map(|_| rng.gen_range(241..20_000)));
        l.extend((0..20).map(|_| rng.gen_range(4..300) * 64));
        l
    }

    #[test]
    fn random_data_matches_xxhash_rust() {
        let mut rng = SmallRng::seed_from_u64(0x5eed);
        let mut data = vec![0u8; 1 << 20];
        rng.fill(&mut data[..]);
        for len in lengths(&mut rng) {
            check(&data[..len], "random");
            // Also from an odd source address.
            if len < data.len() {
                check(&data[1..=len], "random, src+1");
            }
        }
    }

    #[test]
    fn patterned_data_matches_xxhash_rust() {
        let mut rng = SmallRng::seed_from_u64(7);
        type Pattern = (&'static str, fn(usize) -> u8);
        let patterns: [Pattern; 4] = [
            ("zeros", |_| 0),
            ("ones", |_| 0xFF),
            ("counter", |i| i as u8),
            ("words", |i| ((i / 8 * 0x9E37_79B1) >> 7) as u8),
        ];
        for (name, f) in patterns {
            let data: Vec<u8> = (0..(1 << 20) + 64).map(f).collect();
            for len in lengths(&mut rng) {
                check(&data[..len], name);
            }
        }
    }

    /// Many random lengths and contents, a property test in all but name
    /// (proptest is not a dependency here).
    #[test]
    fn random_lengths_and_contents() {
        let mut rng = SmallRng::seed_from_u64(0xdead_beef);
        let mut data = vec![0u8; 40_000];
        for _ in 0..300 {
            let len = rng.gen_range(0..data.len());
            rng.fill(&mut data[..len]);
            check(&data[..len], "random case");
            let whole = (len / 64).max(4) * 64;
            if whole <= data.len() {
                check(&data[..whole], "random stripes");
            }
        }
    }

    /// The trait's default (the simulator's) copies, flushes and hashes:
    /// the copy is pending until the fence, then durable.
    #[test]
    fn sim_region_default_copy_flush_hash() {
        use crate::{PmemRegion, SimRegion};
        let r = SimRegion::new(16 << 10);
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8 + 1).collect();
        // SAFETY: in bounds; this thread is the only user.
        let h = unsafe { r.copy_flush_hash(4096, &data) };
        assert_eq!(h, reference(&data));
        assert_eq!(r.crash_state().pending_words(), 4096 / 8);
        assert_eq!(r.persist_points(), 1, "the hash is no persistence point");
        r.fence();
        assert_eq!(&r.durable_image()[4096..8192], &data[..]);
        assert_eq!(r.crash_state().pending_words(), 0);
    }

    #[test]
    fn detection_prefers_the_widest() {
        let v = Variant::detect();
        assert!(v.available());
        assert_eq!(Variant::detect(), v, "cached");
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            assert_eq!(v, Variant::Avx512);
        } else if is_x86_feature_detected!("avx2") {
            assert_eq!(v, Variant::Avx2);
        }
    }
}
