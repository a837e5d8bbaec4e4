//! The NBD URI parser (origins given on the command line).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pmcache_nbd::{Endpoint, NbdUri};

fuzz_target!(|s: &str| {
    if let Ok(u) = NbdUri::parse(s) {
        match u.endpoint {
            Endpoint::Tcp { host, .. } => assert!(!host.is_empty()),
            Endpoint::Unix(p) => assert!(!p.as_os_str().is_empty()),
        }
    }
});
