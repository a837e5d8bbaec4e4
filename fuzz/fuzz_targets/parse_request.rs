//! Transmission-phase parsers: request and reply headers and chunk
//! payloads. Accepted requests must round-trip exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pmcache_nbd::proto::{self, ErrorChunk, ReplyHeader, Request, REPLY_TYPE_ERROR_OFFSET};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Request::parse(data) {
        assert_eq!(&r.encode()[..], data, "request did not round-trip");
        let _ = r.end();
    }
    let _ = ReplyHeader::parse(data);
    let _ = ErrorChunk::parse(REPLY_TYPE_ERROR_OFFSET, data);
    let _ = proto::parse_block_status(data);
    let _ = proto::parse_offset_hole(data);
    let _ = proto::parse_greeting(data);
    let _ = proto::parse_client_flags(data);
    let _ = proto::parse_export_name_reply(data);
});
