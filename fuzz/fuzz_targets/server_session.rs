//! A whole server session: the input is everything a client sends after a
//! valid client-flags word (so the fuzzer starts inside option haggling).
//! The server must neither panic nor hang, whatever arrives.
#![no_main]

#[path = "common/session.rs"]
mod session;

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use pmcache_nbd::{MemExport, Server, ServerConfig};

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        Server::new(Arc::new(MemExport::new(1 << 16)), ServerConfig::default()).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    session::run(server(), data);
});
