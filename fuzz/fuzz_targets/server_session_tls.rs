//! A whole server session with TLS required (PSK): the input is everything
//! a client sends after a valid client-flags word, so the fuzzer haggles
//! around STARTTLS and sends plain bytes where a handshake should follow.
//! The server must neither panic nor hang, and never take a write.
#![no_main]

#[path = "common/session.rs"]
mod session;

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use pmcache_nbd::{
    MemExport, Server, ServerConfig, TlsCredentials, TlsMode, TlsServer, TlsServerConfig,
};

fn server() -> &'static (Server, Arc<MemExport>) {
    static S: OnceLock<(Server, Arc<MemExport>)> = OnceLock::new();
    S.get_or_init(|| {
        let keys = std::env::temp_dir().join(format!("pmcache-fuzz-{}.psk", std::process::id()));
        std::fs::write(&keys, format!("alice:{}\n", "a1".repeat(32))).unwrap();
        let tls = TlsServer::new(&TlsServerConfig {
            mode: TlsMode::Require,
            credentials: TlsCredentials::Psk { file: keys },
            allow: vec![],
        })
        .unwrap();
        let export = Arc::new(MemExport::new(1 << 16));
        let cfg = ServerConfig {
            tls: Some(Arc::new(tls)),
            ..ServerConfig::default()
        };
        (Server::new(export.clone(), cfg).unwrap(), export)
    })
}

fuzz_target!(|data: &[u8]| {
    let (server, export) = server();
    session::run(server, data);
    assert_eq!(export.stats().writes, 0, "a write got in without TLS");
});
