//! The superblock decoder, with the checksum made valid so the field checks
//! behind it are reached. Accepted superblocks must round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pmcache_engine::format::{Superblock, SB_SIZE};

fuzz_target!(|data: &[u8]| {
    let _ = Superblock::decode(data);
    let mut b = [0u8; SB_SIZE];
    let n = data.len().min(SB_SIZE - 4);
    b[..n].copy_from_slice(&data[..n]);
    let crc = crc32c::crc32c(&b[..SB_SIZE - 4]);
    b[SB_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
    if let Ok(sb) = Superblock::decode(&b) {
        assert_eq!(
            Superblock::decode(&sb.encode()).ok(),
            Some(sb),
            "superblock did not round-trip"
        );
    }
});
