//! The slot entry decoder: accepted words must re-encode exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pmcache_engine::format::Entry;

fuzz_target!(|data: [u64; 5]| {
    if let Some(e) = Entry::decode(&data) {
        assert_eq!(e.encode(), data, "entry did not round-trip");
    }
});
