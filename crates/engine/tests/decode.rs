//! Decoders of on-media records against arbitrary bytes: deterministic
//! stand-ins for the fuzz targets `decode_superblock` and `decode_entry`
//! (`fuzz/`). A decoder never panics, and what it accepts re-encodes to
//! what it decodes from.
#![allow(clippy::unwrap_used)] // tests may panic on failure

use pmcache_engine::format::{Entry, Layout, Superblock, ENTRY_WORDS, SB_SIZE, W_STATE};
use pmcache_engine::CacheMode;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn valid() -> Superblock {
    Superblock {
        layout: Layout::compute(64 << 20, 4096).unwrap(),
        origin_size: 1 << 30,
        origin_fingerprint: "nbd+unix:///vol?socket=/run/nas.sock".into(),
        generation: 7,
        clean_shutdown: true,
        mode: CacheMode::Writethrough,
        uuid: 0x1234_5678_9abc_def0,
    }
}

/// Mutated superblocks, with the checksum made valid again so that the
/// field checks behind it are reached.
#[test]
fn superblock_decode_survives_any_field_values() {
    let mut rng = SmallRng::seed_from_u64(11);
    let good = valid().encode();
    assert_eq!(Superblock::decode(&good).unwrap(), valid());
    let mut accepted = 0;
    for _ in 0..50_000 {
        let mut b = good;
        for _ in 0..rng.gen_range(1..8) {
            let i = rng.gen_range(8..SB_SIZE - 4);
            b[i] = rng.gen();
        }
        let crc = crc32c::crc32c(&b[..SB_SIZE - 4]);
        b[SB_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        if let Ok(sb) = Superblock::decode(&b) {
            accepted += 1;
            assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
        }
        // Truncated and unchecked inputs are refused, never a panic.
        let cut = rng.gen_range(0..SB_SIZE);
        assert!(Superblock::decode(&b[..cut]).is_err());
        b[rng.gen_range(0..SB_SIZE)] ^= 1 << rng.gen_range(0..8);
        let _ = Superblock::decode(&b);
    }
    assert!(accepted > 1000, "mutations of harmless fields are accepted");
}

#[test]
fn entry_decode_accepts_exactly_checksummed_words() {
    let mut rng = SmallRng::seed_from_u64(12);
    for _ in 0..100_000 {
        let mut w: [u64; ENTRY_WORDS] = std::array::from_fn(|_| rng.gen());
        w[W_STATE] = 0;
        if let Some(e) = Entry::decode(&w) {
            assert_eq!(e.encode(), w, "accepted words re-encode exactly");
        }
        let e = Entry {
            block: w[0],
            seq: w[1],
            hash: w[2],
            count: w[3] as u32,
            flags: (w[3] >> 32) as u32,
            epoch: w[6],
        };
        let mut enc = e.encode();
        assert_eq!(Entry::decode(&enc), Some(e));
        enc[W_STATE] = rng.gen();
        assert_eq!(
            Entry::decode(&enc),
            Some(e),
            "the state word is not covered"
        );
        let word = [0, 1, 2, 3, 4, 6][rng.gen_range(0..6)];
        enc[word] ^= 1 << rng.gen_range(0..64);
        assert_eq!(Entry::decode(&enc), None, "a flipped bit is caught");
    }
}
