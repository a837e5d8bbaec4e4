//! A whole server session: the input is everything a client sends after a
//! valid client-flags word (so the fuzzer starts inside option haggling).
//! The server must neither panic nor hang, whatever arrives.
#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use pmcache_nbd::{MemExport, Server, ServerConfig, Stream};

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        Server::new(Arc::new(MemExport::new(1 << 16)), ServerConfig::default()).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let mut reader = theirs.try_clone().unwrap();
    let input = data.to_vec();
    // The client sends on one thread and drains replies on another, so
    // neither side can block the other on a full socket buffer.
    let sender = std::thread::spawn(move || {
        let _ = theirs.write_all(&3u32.to_be_bytes());
        let _ = theirs.write_all(&input);
        let _ = theirs.shutdown(Shutdown::Write);
    });
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
    });
    server().serve_stream(Stream::Unix(ours));
    sender.join().unwrap();
    drain.join().unwrap();
});
