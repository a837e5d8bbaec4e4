//! One client session against a server connection, for the session targets.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use pmcache_nbd::{Server, Stream};

/// Send a valid client-flags word and then `data` into one connection of
/// `server`, draining its replies; returns once the server is done with it.
pub fn run(server: &Server, data: &[u8]) {
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
    server.serve_stream(Stream::Unix(ours));
    sender.join().unwrap();
    drain.join().unwrap();
}
