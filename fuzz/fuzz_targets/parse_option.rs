//! Option-haggling parsers: option headers and option data. Whatever they
//! accept must re-encode to something that parses back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pmcache_nbd::proto::{Info, OptionHeader, OptionReplyHeader, OptionRequest};

fuzz_target!(|data: &[u8]| {
    let _ = OptionHeader::parse(data);
    let _ = OptionReplyHeader::parse(data);
    let _ = Info::parse(data);
    let _ = pmcache_nbd::proto::parse_rep_server(data);
    let _ = pmcache_nbd::proto::parse_rep_meta_context(data);
    if data.len() < 4 {
        return;
    }
    let code = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) % 16;
    if let Ok(req) = OptionRequest::parse(code, &data[4..]) {
        let again = OptionRequest::parse(code, &req.encode_data());
        if !matches!(req, OptionRequest::Abort | OptionRequest::Unknown(_)) {
            assert_eq!(again.as_ref(), Ok(&req), "option did not round-trip");
        }
    }
});
