//! Wire-format tests: encoders round-trip through the parsers, parsers
//! reject truncated and garbage input, and no input makes them panic.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

use pmcache_nbd::proto::*;
use pmcache_nbd::{BlockSizes, Extent};

#[test]
fn greeting_round_trip_and_rejects() {
    let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(parse_greeting(&g), Ok(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    for n in 0..g.len() {
        assert!(matches!(
            parse_greeting(&g[..n]),
            Err(ProtoError::Truncated { .. })
        ));
    }
    let mut bad = g;
    bad[0] ^= 1;
    assert!(matches!(parse_greeting(&bad), Err(ProtoError::BadMagic(_))));
    // Oldstyle is recognised and refused with a clear reason.
    let mut old = g.to_vec();
    old[8..16].copy_from_slice(&CLISERV_MAGIC.to_be_bytes());
    assert_eq!(
        parse_greeting(&old),
        Err(ProtoError::Invalid("oldstyle negotiation is not supported"))
    );
    let mut long = g.to_vec();
    long.push(0);
    assert_eq!(parse_greeting(&long), Err(ProtoError::Trailing(1)));
}

#[test]
fn client_flags() {
    assert_eq!(parse_client_flags(&[0, 0, 0, 3]), Ok(3));
    assert_eq!(parse_client_flags(&[0, 0, 0, 1]), Ok(1));
    assert!(parse_client_flags(&[0, 0, 0, 4]).is_err());
    assert!(parse_client_flags(&[0x80, 0, 0, 0]).is_err());
    assert!(parse_client_flags(&[0, 0, 0]).is_err());
}

#[test]
fn option_header_round_trip() {
    let h = OptionHeader {
        option: OPT_GO,
        length: 1234,
    };
    assert_eq!(OptionHeader::parse(&h.encode()), Ok(h));
    let mut b = h.encode();
    b[3] = 0;
    assert!(matches!(
        OptionHeader::parse(&b),
        Err(ProtoError::BadMagic(_))
    ));
    assert!(OptionHeader::parse(&h.encode()[..15]).is_err());
}

fn all_options() -> Vec<OptionRequest> {
    vec![
        OptionRequest::ExportName("disk-1".into()),
        OptionRequest::ExportName(String::new()),
        OptionRequest::Abort,
        OptionRequest::List,
        OptionRequest::StartTls,
        OptionRequest::StructuredReply,
        OptionRequest::Info {
            go: false,
            name: "x".into(),
            requests: vec![INFO_NAME, INFO_BLOCK_SIZE],
        },
        OptionRequest::Info {
            go: true,
            name: "ünïcode".into(),
            requests: vec![],
        },
        OptionRequest::MetaContext {
            set: true,
            export: "e".into(),
            queries: vec![META_BASE_ALLOCATION.into(), "qemu:dirty-bitmap:a".into()],
        },
        OptionRequest::MetaContext {
            set: false,
            export: String::new(),
            queries: vec![],
        },
        OptionRequest::Unknown(4242),
    ]
}

#[test]
fn options_round_trip() {
    for opt in all_options() {
        let wire = opt.encode();
        let h = OptionHeader::parse(&wire[..OPTION_HEADER_LEN]).unwrap();
        assert_eq!(h.option, opt.code());
        assert_eq!(h.length as usize, wire.len() - OPTION_HEADER_LEN);
        let back = OptionRequest::parse(h.option, &wire[OPTION_HEADER_LEN..]).unwrap();
        assert_eq!(back, opt);
    }
}

#[test]
fn options_reject_truncated_and_inconsistent() {
    // Every strict prefix of a GO/INFO/META option body is invalid.
    for opt in all_options() {
        let data = opt.encode_data();
        if !matches!(
            opt,
            OptionRequest::Info { .. } | OptionRequest::MetaContext { .. }
        ) {
            continue;
        }
        for n in 0..data.len() {
            assert!(
                OptionRequest::parse(opt.code(), &data[..n]).is_err(),
                "{opt:?} accepted {n} of {} bytes",
                data.len()
            );
        }
        let mut extra = data.clone();
        extra.push(0);
        assert!(OptionRequest::parse(opt.code(), &extra).is_err());
    }
    // Name length larger than the data.
    let mut d = 100u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"abc\0\0");
    assert!(OptionRequest::parse(OPT_GO, &d).is_err());
    // Data on options that take none.
    assert!(OptionRequest::parse(OPT_LIST, b"x").is_err());
    assert!(OptionRequest::parse(OPT_STRUCTURED_REPLY, b"x").is_err());
    // Bad strings.
    assert!(OptionRequest::parse(OPT_EXPORT_NAME, b"a\0b").is_err());
    assert!(OptionRequest::parse(OPT_EXPORT_NAME, &[0xff, 0xfe]).is_err());
    assert!(OptionRequest::parse(OPT_EXPORT_NAME, &vec![b'a'; 4097]).is_err());
    // A huge query count with little data is refused without allocating.
    let mut m = 0u32.to_be_bytes().to_vec();
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(OptionRequest::parse(OPT_SET_META_CONTEXT, &m).is_err());
    // ABORT ignores data; unknown options parse as Unknown.
    assert_eq!(
        OptionRequest::parse(OPT_ABORT, b"junk"),
        Ok(OptionRequest::Abort)
    );
    assert_eq!(
        OptionRequest::parse(99, b"junk"),
        Ok(OptionRequest::Unknown(99))
    );
}

#[test]
fn option_replies_round_trip() {
    let r = encode_option_reply(OPT_LIST, REP_SERVER, &encode_rep_server("disk", "a disk"));
    let h = OptionReplyHeader::parse(&r[..OPTION_REPLY_HEADER_LEN]).unwrap();
    assert_eq!(
        h,
        OptionReplyHeader {
            option: OPT_LIST,
            reply_type: REP_SERVER,
            length: (r.len() - OPTION_REPLY_HEADER_LEN) as u32
        }
    );
    assert!(!h.is_error());
    assert_eq!(
        parse_rep_server(&r[OPTION_REPLY_HEADER_LEN..]).unwrap(),
        ("disk".to_string(), "a disk".to_string())
    );
    let e = OptionReplyHeader {
        option: 7,
        reply_type: REP_ERR_UNSUP,
        length: 0,
    };
    assert!(OptionReplyHeader::parse(&e.encode()).unwrap().is_error());
    assert!(OptionReplyHeader::parse(&e.encode()[..19]).is_err());
    assert_eq!(
        parse_rep_meta_context(&encode_rep_meta_context(5, META_BASE_ALLOCATION)).unwrap(),
        (5, META_BASE_ALLOCATION.to_string())
    );
    assert!(parse_rep_meta_context(&[0, 0, 1]).is_err());
    assert!(parse_rep_server(&[0, 0, 0, 9, b'a']).is_err());
}

#[test]
fn info_round_trip_and_validation() {
    let bs = BlockSizes {
        minimum: 512,
        preferred: 4096,
        maximum: 1 << 25,
    };
    for info in [
        Info::Export {
            size: 1 << 40,
            flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
        },
        Info::Name("n".into()),
        Info::Description("d".into()),
        Info::BlockSize(bs),
    ] {
        assert_eq!(Info::parse(&info.encode()).unwrap(), info);
        let e = info.encode();
        if matches!(info, Info::Export { .. } | Info::BlockSize(_)) {
            for n in 0..e.len() {
                assert!(Info::parse(&e[..n]).is_err());
            }
        }
    }
    assert_eq!(Info::parse(&[0, 77, 1, 2, 3]).unwrap(), Info::Unknown(77));
    // Block sizes must be sane.
    let bad = BlockSizes {
        minimum: 3,
        preferred: 4096,
        maximum: 4096,
    };
    assert!(Info::parse(&Info::BlockSize(bad).encode()).is_err());
    let bad = BlockSizes {
        minimum: 512,
        preferred: 4096,
        maximum: 1000,
    };
    assert!(validate_block_sizes(&bad).is_err());
    assert!(validate_block_sizes(&bs).is_ok());
}

#[test]
fn export_name_reply() {
    let full = encode_export_name_reply(4096, 0x1234, false);
    assert_eq!(full.len(), 10 + 124);
    assert!(full[10..].iter().all(|b| *b == 0));
    let short = encode_export_name_reply(4096, 0x1234, true);
    assert_eq!(parse_export_name_reply(&short), Ok((4096, 0x1234)));
    assert!(parse_export_name_reply(&short[..9]).is_err());
}

#[test]
fn request_round_trip() {
    let r = Request {
        flags: CMD_FLAG_FUA,
        command: CMD_WRITE,
        cookie: 0xdead_beef_cafe_f00d,
        offset: u64::MAX - 5,
        length: 77,
    };
    let w = r.encode();
    assert_eq!(w.len(), 28);
    assert_eq!(&w[..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(Request::parse(&w), Ok(r));
    assert_eq!(r.end(), None, "offset + length overflow is detected");
    for n in 0..w.len() {
        assert!(Request::parse(&w[..n]).is_err());
    }
    let mut bad = w;
    bad[0] = 0;
    assert!(matches!(Request::parse(&bad), Err(ProtoError::BadMagic(_))));
}

#[test]
fn replies_round_trip() {
    let s = SimpleReply {
        error: EIO,
        cookie: 42,
    };
    assert_eq!(SimpleReply::parse(&s.encode()), Ok(s));
    assert_eq!(ReplyHeader::header_len(&s.encode()[..4]), Ok(16));
    assert_eq!(ReplyHeader::parse(&s.encode()), Ok(ReplyHeader::Simple(s)));
    let c = StructuredReply {
        flags: REPLY_FLAG_DONE,
        reply_type: REPLY_TYPE_OFFSET_DATA,
        cookie: 43,
        length: 9,
    };
    assert!(c.is_done());
    assert_eq!(StructuredReply::parse(&c.encode()), Ok(c));
    assert_eq!(ReplyHeader::header_len(&c.encode()[..4]), Ok(20));
    assert_eq!(
        ReplyHeader::parse(&c.encode()),
        Ok(ReplyHeader::Structured(c))
    );
    assert!(ReplyHeader::header_len(&[1, 2, 3, 4]).is_err());
    assert!(ReplyHeader::header_len(&[1, 2]).is_err());
    assert!(StructuredReply::parse(&c.encode()[..19]).is_err());
}

#[test]
fn error_chunks() {
    let e = ErrorChunk {
        error: ENOSPC,
        message: "full".into(),
        offset: None,
    };
    assert_eq!(
        ErrorChunk::parse(e.reply_type(), &e.encode()),
        Ok(e.clone())
    );
    let o = ErrorChunk {
        error: EIO,
        message: String::new(),
        offset: Some(4096),
    };
    assert_eq!(o.reply_type(), REPLY_TYPE_ERROR_OFFSET);
    assert_eq!(
        ErrorChunk::parse(o.reply_type(), &o.encode()),
        Ok(o.clone())
    );
    // Message length beyond the payload, and error 0, are invalid.
    assert!(ErrorChunk::parse(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9, b'a']).is_err());
    assert!(ErrorChunk::parse(REPLY_TYPE_ERROR, &[0, 0, 0, 0, 0, 0]).is_err());
    assert!(ErrorChunk::parse(REPLY_TYPE_ERROR_OFFSET, &e.encode()).is_err());
    // Over-long messages are cut on a character boundary.
    let long = ErrorChunk {
        error: EIO,
        message: "é".repeat(3000),
        offset: None,
    };
    let back = ErrorChunk::parse(REPLY_TYPE_ERROR, &long.encode()).unwrap();
    assert!(back.message.len() <= MAX_STRING_LEN && !back.message.is_empty());
}

#[test]
fn block_status_and_holes() {
    let ex = [
        Extent {
            length: 4096,
            flags: STATE_HOLE | STATE_ZERO,
        },
        Extent {
            length: 512,
            flags: 0,
        },
    ];
    let p = encode_block_status(7, &ex);
    assert_eq!(parse_block_status(&p).unwrap(), (7, ex.to_vec()));
    assert!(parse_block_status(&p[..p.len() - 1]).is_err());
    assert!(parse_block_status(&p[..4]).is_err(), "needs a descriptor");
    assert!(parse_block_status(&encode_block_status(
        1,
        &[Extent {
            length: 0,
            flags: 0
        }]
    ))
    .is_err());
    let mut h = 10u64.to_be_bytes().to_vec();
    h.extend_from_slice(&5u32.to_be_bytes());
    assert_eq!(parse_offset_hole(&h), Ok((10, 5)));
    assert!(parse_offset_hole(&h[..11]).is_err());
    h[11] = 0;
    assert!(parse_offset_hole(&h).is_err(), "zero-length hole");
}

/// A deterministic stand-in for the fuzzer in the normal suite: random and
/// mutated inputs through every parser; the test fails on any panic.
#[test]
fn parsers_never_panic_on_random_input() {
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let seeds: Vec<Vec<u8>> = all_options()
        .iter()
        .map(|o| o.encode())
        .chain([
            Request {
                flags: 0,
                command: 0,
                cookie: 1,
                offset: 0,
                length: 512,
            }
            .encode()
            .to_vec(),
            encode_greeting(3).to_vec(),
            Info::BlockSize(BlockSizes {
                minimum: 1,
                preferred: 4096,
                maximum: 1 << 20,
            })
            .encode(),
            ErrorChunk {
                error: 5,
                message: "m".into(),
                offset: Some(1),
            }
            .encode(),
        ])
        .collect();
    let mut accepted = 0usize;
    for i in 0..200_000u64 {
        let mut buf = if i % 2 == 0 {
            seeds[(next() % seeds.len() as u64) as usize].clone()
        } else {
            (0..(next() % 64)).map(|_| next() as u8).collect()
        };
        for _ in 0..(next() % 4) {
            if !buf.is_empty() {
                let at = (next() % buf.len() as u64) as usize;
                buf[at] = next() as u8;
            }
        }
        if next() % 3 == 0 {
            let cut = (next() % (buf.len() as u64 + 1)) as usize;
            buf.truncate(cut);
        }
        let code = (next() % 12) as u32;
        let tail = buf.get(OPTION_HEADER_LEN.min(buf.len())..).unwrap_or(&[]);
        accepted += usize::from(OptionRequest::parse(code, &buf).is_ok());
        accepted += usize::from(OptionRequest::parse(code, tail).is_ok());
        accepted += usize::from(OptionHeader::parse(&buf).is_ok());
        accepted += usize::from(Request::parse(&buf).is_ok());
        accepted += usize::from(ReplyHeader::parse(&buf).is_ok());
        accepted += usize::from(OptionReplyHeader::parse(&buf).is_ok());
        accepted += usize::from(Info::parse(&buf).is_ok());
        accepted += usize::from(parse_greeting(&buf).is_ok());
        accepted += usize::from(parse_client_flags(&buf).is_ok());
        accepted += usize::from(ErrorChunk::parse(REPLY_TYPE_ERROR_OFFSET, &buf).is_ok());
        accepted += usize::from(parse_block_status(&buf).is_ok());
        accepted += usize::from(parse_rep_server(&buf).is_ok());
        accepted += usize::from(parse_export_name_reply(&buf).is_ok());
    }
    // Sanity: the mutations were not all trivially rejected.
    assert!(accepted > 1000, "only {accepted} inputs parsed");
}
