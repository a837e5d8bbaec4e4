//! The NBD URI parser against arbitrary strings: a deterministic stand-in
//! for the fuzz target `parse_uri` (`fuzz/`). It never panics, and what it
//! accepts names an endpoint it could have come from.
#![allow(clippy::unwrap_used)] // tests may panic on failure

use pmcache_nbd::{Endpoint, NbdUri};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const PIECES: &[&str] = &[
    "nbd://",
    "nbd+unix://",
    "nbds://",
    "/",
    "?",
    "&",
    "=",
    "socket=",
    "%",
    "%2F",
    "%zz",
    "[",
    "]",
    "::1",
    ":",
    "10809",
    "99999",
    "host",
    "exp",
    "\u{e9}",
    "\0",
    "//",
    "@",
    "#",
];

#[test]
fn the_uri_parser_survives_any_string() {
    let mut rng = SmallRng::seed_from_u64(13);
    let mut accepted = 0;
    for _ in 0..100_000 {
        let s: String = (0..rng.gen_range(0..10))
            .map(|_| {
                if rng.gen_bool(0.8) {
                    PIECES[rng.gen_range(0..PIECES.len())].to_string()
                } else {
                    char::from(rng.gen_range(0x20u8..0x7f)).to_string()
                }
            })
            .collect();
        if let Ok(u) = NbdUri::parse(&s) {
            accepted += 1;
            let tcp = s.starts_with("nbd://") || s.starts_with("nbds://");
            let unix = s.starts_with("nbd+unix://") || s.starts_with("nbds+unix://");
            match &u.endpoint {
                Endpoint::Tcp { host, .. } => assert!(tcp && !host.is_empty(), "{s:?}"),
                Endpoint::Unix(p) => assert!(unix && !p.as_os_str().is_empty(), "{s:?}"),
            }
        }
    }
    assert!(accepted > 100, "some generated URIs are valid ({accepted})");
}

#[test]
fn known_uris_parse_as_libnbd_reads_them() {
    let u = NbdUri::parse("nbd+unix:///vol%2F1?socket=/run/nas.sock").unwrap();
    assert_eq!(u.endpoint, Endpoint::Unix("/run/nas.sock".into()));
    assert_eq!(u.export, "vol/1");
    let u = NbdUri::parse("nbd://nas.example:10810/vol1").unwrap();
    assert_eq!(
        u.endpoint,
        Endpoint::Tcp {
            host: "nas.example".into(),
            port: 10810
        }
    );
    for bad in ["", "nbd:/x", "http://h/", "nbd+unix:///x", "nbd://h:99999/"] {
        assert!(NbdUri::parse(bad).is_err(), "{bad:?} accepted");
    }
}
