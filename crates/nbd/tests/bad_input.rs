//! Bad input over raw sockets (contract §7): each case gets the protocol's
//! error reply or the end of that one connection; nothing is written for a
//! rejected request, and a second connection keeps working throughout.
#![allow(clippy::unwrap_used)] // tests and benchmarks may panic on failure

mod common;

use std::time::Duration;

use common::{go_request, mem_export, pattern, wait_until, InProc, Raw};
use pmcache_nbd::proto::*;
use pmcache_nbd::{Client, MemExport, ServerConfig};

const SIZE: usize = 1 << 20;

/// An option with a hand-made body: the header says `payload.len()` bytes.
fn raw_option(option: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = OptionHeader {
        option,
        length: payload.len() as u32,
    }
    .encode()
    .to_vec();
    v.extend_from_slice(payload);
    v
}

/// NBD_OPT_SET_META_CONTEXT of base:allocation on the default export.
fn set_base_allocation() -> Vec<u8> {
    OptionRequest::MetaContext {
        set: true,
        export: String::new(),
        queries: vec![META_BASE_ALLOCATION.into()],
    }
    .encode()
}

/// A server with a 64 KiB maximum request, plus a bystander client whose
/// data is checked after every abuse.
struct Fixture {
    srv: InProc,
    bystander: Client,
    data: Vec<u8>,
}

impl Fixture {
    fn new() -> Self {
        let srv = InProc::start(mem_export(SIZE, 1, 64 * 1024), ServerConfig::default());
        let bystander = Client::connect(&srv.uri()).unwrap();
        let data = pattern(77, 8192);
        bystander.write(&data, 0, false).unwrap();
        Self {
            srv,
            bystander,
            data,
        }
    }

    /// The other connection still reads and writes correctly.
    fn bystander_ok(&self) {
        let mut b = vec![0u8; self.data.len()];
        self.bystander.read(&mut b, 0).unwrap();
        assert!(b == self.data, "the bystander's data changed");
        self.bystander.write(&self.data[..512], 0, false).unwrap();
    }

    fn writes(&self) -> u64 {
        self.srv.export.stats().writes
    }

    fn raw(&self) -> Raw {
        Raw::connect(&self.srv.socket)
    }
}

#[test]
fn malformed_handshakes_end_only_that_connection() {
    let fx = Fixture::new();

    // Unknown client flags.
    let mut r = fx.raw();
    r.recv(GREETING_LEN);
    r.send(&0x8000_0001u32.to_be_bytes());
    assert!(r.closed(), "unknown client flags must end the connection");
    fx.bystander_ok();

    // Garbage instead of an option.
    let mut r = fx.raw();
    r.greet();
    r.send(b"GARBAGE!GARBAGE!");
    assert!(r.closed(), "bad option magic must end the connection");
    fx.bystander_ok();

    // An absurd option length is not allocated, the connection ends.
    let mut r = fx.raw();
    r.greet();
    r.send(
        &OptionHeader {
            option: OPT_GO,
            length: 0x8000_0000,
        }
        .encode(),
    );
    assert!(r.closed());
    fx.bystander_ok();

    // Non-fixed newstyle clients may only send EXPORT_NAME.
    let mut r = fx.raw();
    r.recv(GREETING_LEN);
    r.send(&0u32.to_be_bytes());
    r.send(&OptionRequest::List.encode());
    assert!(r.closed());
    fx.bystander_ok();

    // EXPORT_NAME of an unknown export cannot be answered: hang up.
    let mut r = fx.raw();
    r.greet();
    r.send(&OptionRequest::ExportName("nope".into()).encode());
    assert!(r.closed());
    fx.bystander_ok();

    // Disconnect in the middle of the greeting exchange.
    let mut r = fx.raw();
    r.recv(GREETING_LEN);
    r.send(&[0, 0]);
    drop(r);
    fx.bystander_ok();
    assert_eq!(fx.writes(), 1 + 6, "only the bystander wrote");
}

#[test]
fn unknown_and_invalid_options_get_error_replies() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    r.greet();

    r.send(&OptionRequest::Unknown(200).encode());
    let (h, msg) = r.option_reply();
    assert_eq!((h.option, h.reply_type), (200, REP_ERR_UNSUP));
    assert!(!msg.is_empty(), "error replies carry a message");

    // Known option, invalid data.
    r.send(&raw_option(OPT_GO, &[0, 0, 0, 9, b'x']));
    let (h, _) = r.option_reply();
    assert_eq!((h.option, h.reply_type), (OPT_GO, REP_ERR_INVALID));

    r.send(&raw_option(OPT_LIST, b"abc"));
    assert_eq!(r.option_reply().0.reply_type, REP_ERR_INVALID);

    // Too long for any valid option: skipped and refused.
    r.send(&raw_option(OPT_INFO, &vec![0u8; 100_000]));
    assert_eq!(r.option_reply().0.reply_type, REP_ERR_TOO_BIG);

    // STARTTLS is not offered.
    r.send(&OptionRequest::StartTls.encode());
    assert_eq!(r.option_reply().0.reply_type, REP_ERR_UNSUP);

    // Meta contexts need structured replies first.
    r.send(&set_base_allocation());
    assert_eq!(r.option_reply().0.reply_type, REP_ERR_INVALID);

    // Unknown export in GO is an error reply, not a hang-up.
    r.send(&go_request("missing"));
    let (h, msg) = r.option_reply();
    assert_eq!(h.reply_type, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("missing"));

    // LIST works and names the export.
    r.send(&OptionRequest::List.encode());
    let (h, d) = r.option_reply();
    assert_eq!(h.reply_type, REP_SERVER);
    assert_eq!(parse_rep_server(&d).unwrap().0, "");
    assert_eq!(r.option_reply().0.reply_type, REP_ACK);

    // After all that, the same connection can still enter transmission.
    r.send(&go_request(""));
    let mut saw_block_size = false;
    // Every reply up to the ACK is an INFO (go_infos checks that).
    for info in r.go_infos() {
        if let Info::BlockSize(bs) = info {
            assert_eq!(bs.maximum, 64 * 1024);
            saw_block_size = true;
        }
    }
    assert!(saw_block_size);
    r.request(CMD_READ, 0, 1, 0, 16);
    assert_eq!(r.simple_reply().error, 0);
    assert_eq!(r.recv(16), fx.data[..16]);
    fx.bystander_ok();

    // ABORT gets an ACK and the connection ends.
    let mut r = fx.raw();
    r.greet();
    r.send(&OptionRequest::Abort.encode());
    assert_eq!(r.option_reply().0.reply_type, REP_ACK);
    assert!(r.closed());
}

#[test]
fn bad_requests_get_errors_and_write_nothing() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    let (size, flags) = r.handshake(false);
    assert_eq!(size, SIZE as u64);
    assert_ne!(flags & FLAG_SEND_FUA, 0);
    let before = fx.writes();

    // Unknown command.
    r.request(99, 0, 1, 0, 0);
    let rep = r.simple_reply();
    assert_eq!((rep.cookie, rep.error), (1, EINVAL));

    // Unknown command flag.
    r.request(CMD_FLUSH, 1 << 9, 2, 0, 0);
    assert_eq!(r.simple_reply().error, EINVAL);
    // DF without structured replies.
    r.request(CMD_READ, CMD_FLAG_DF, 3, 0, 16);
    assert_eq!(r.simple_reply().error, EINVAL);

    // Out-of-range read.
    r.request(CMD_READ, 0, 4, SIZE as u64 - 10, 11);
    assert_eq!(r.simple_reply().error, EINVAL);
    r.request(CMD_READ, 0, 5, u64::MAX, 2);
    assert_eq!(r.simple_reply().error, EINVAL);

    // Out-of-range write: ENOSPC, the payload is skipped, nothing written.
    r.request(CMD_WRITE, 0, 6, SIZE as u64 - 10, 100);
    r.send(&[0xaa; 100]);
    let rep = r.simple_reply();
    assert_eq!((rep.cookie, rep.error), (6, ENOSPC));
    r.request(CMD_WRITE_ZEROES, 0, 7, SIZE as u64, 1);
    assert_eq!(r.simple_reply().error, ENOSPC);
    r.request(CMD_TRIM, 0, 8, u64::MAX - 1, 10);
    assert_eq!(r.simple_reply().error, ENOSPC);
    r.request(CMD_CACHE, 0, 9, SIZE as u64, 1);
    assert_eq!(r.simple_reply().error, EINVAL);

    // Oversized read.
    r.request(CMD_READ, 0, 10, 0, 64 * 1024 + 1);
    assert_eq!(r.simple_reply().error, EOVERFLOW);

    // Block status without a negotiated context.
    r.request(CMD_BLOCK_STATUS, 0, 11, 0, 512);
    assert_eq!(r.simple_reply().error, EINVAL);

    // Still in sync: a valid write and read on the same connection.
    r.request(CMD_WRITE, CMD_FLAG_FUA, 12, 16384, 4);
    r.send(b"abcd");
    assert_eq!(
        r.simple_reply(),
        SimpleReply {
            error: 0,
            cookie: 12
        }
    );
    r.request(CMD_READ, 0, 13, 16384, 4);
    assert_eq!(r.simple_reply().error, 0);
    assert_eq!(r.recv(4), b"abcd");
    assert_eq!(fx.writes(), before + 1, "only the valid write executed");
    assert_eq!(fx.srv.export.snapshot(SIZE - 10, 10), vec![0u8; 10]);
    fx.bystander_ok();

    // A bad request magic ends the connection.
    r.send(&[0u8; REQUEST_LEN]);
    assert!(r.closed());
    fx.bystander_ok();
}

#[test]
fn structured_errors_and_block_status() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    r.greet();
    r.send(&OptionRequest::StructuredReply.encode());
    assert_eq!(r.option_reply().0.reply_type, REP_ACK);
    r.send(&set_base_allocation());
    let (h, d) = r.option_reply();
    assert_eq!(h.reply_type, REP_META_CONTEXT);
    let (id, name) = parse_rep_meta_context(&d).unwrap();
    assert_eq!(name, META_BASE_ALLOCATION);
    assert_eq!(r.option_reply().0.reply_type, REP_ACK);
    r.send(&go_request(""));
    r.go_infos();

    // A READ error must be a structured error chunk.
    r.request(CMD_READ, 0, 1, SIZE as u64, 1);
    let (h, p) = r.any_reply();
    let ReplyHeader::Structured(c) = h else {
        panic!("simple reply to READ with structured replies")
    };
    assert!(c.is_done());
    assert_eq!(c.reply_type, REPLY_TYPE_ERROR);
    let e = ErrorChunk::parse(c.reply_type, &p).unwrap();
    assert_eq!(e.error, EINVAL);
    assert!(e.message.contains("beyond"), "{}", e.message);

    // Block status: 8 KiB of data then zeroes.
    r.request(CMD_BLOCK_STATUS, 0, 2, 0, 64 * 1024);
    let (h, p) = r.any_reply();
    let ReplyHeader::Structured(c) = h else {
        panic!("block status needs a structured reply")
    };
    assert_eq!((c.reply_type, c.cookie), (REPLY_TYPE_BLOCK_STATUS, 2));
    let (cid, ex) = parse_block_status(&p).unwrap();
    assert_eq!(cid, id);
    assert_eq!(ex[0].length, 8192);
    assert_eq!(ex[0].flags, 0);
    assert_eq!(ex[1].flags, STATE_HOLE | STATE_ZERO);
    assert_eq!(
        ex.iter().map(|e| u64::from(e.length)).sum::<u64>(),
        64 * 1024
    );
    // REQ_ONE: one descriptor.
    r.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 3, 0, 64 * 1024);
    let (_, p) = r.any_reply();
    assert_eq!(parse_block_status(&p).unwrap().1.len(), 1);

    // A successful READ is one data chunk.
    r.request(CMD_READ, 0, 4, 100, 50);
    let (h, p) = r.any_reply();
    let ReplyHeader::Structured(c) = h else {
        panic!()
    };
    assert_eq!(c.reply_type, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(&p[..8], &100u64.to_be_bytes());
    assert_eq!(&p[8..], &fx.data[100..150]);
    fx.bystander_ok();
}

#[test]
fn oversized_write_and_disconnect_mid_payload_write_nothing() {
    let fx = Fixture::new();
    let snapshot = fx.srv.export.snapshot(0, SIZE);
    let start_writes = fx.writes();

    // Oversized WRITE: the payload is read and thrown away, then the error,
    // and the connection goes on (a reply before the payload would read,
    // to the client, as the answer to something else).
    let mut r = fx.raw();
    r.handshake(false);
    r.request(CMD_WRITE, 0, 1, 0, 64 * 1024 + 1);
    r.send(&[0x55; 64 * 1024 + 1]);
    let rep = r.simple_reply();
    assert_eq!((rep.cookie, rep.error), (1, EOVERFLOW));
    r.request(CMD_FLUSH, 0, 2, 0, 0);
    let rep = r.simple_reply();
    assert_eq!((rep.cookie, rep.error), (2, 0), "in sync after the refusal");
    // One past any reasonable size ends the connection, with no reply.
    r.request(CMD_WRITE, 0, 3, 0, 100 << 20);
    assert!(r.closed());
    assert_eq!(fx.writes(), start_writes, "an oversized write executed");
    fx.bystander_ok();
    let before = fx.writes();

    // Client leaves in the middle of a write payload.
    let mut r = fx.raw();
    r.handshake(false);
    r.request(CMD_WRITE, 0, 2, 0, 60_000);
    r.send(&[0x66; 30_000]);
    drop(r);
    // Give the server a moment to notice, then check nothing landed.
    wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        fx.srv.server.active_connections() <= 1
    });
    assert_eq!(
        fx.srv.server.active_connections(),
        1,
        "only the bystander is left"
    );
    assert_eq!(fx.writes(), before, "a cut-off payload must not be written");
    assert!(
        fx.srv.export.snapshot(0, SIZE) == snapshot,
        "export changed"
    );

    // Truncated request header then disconnect.
    let mut r = fx.raw();
    r.handshake(false);
    r.send(
        &Request {
            flags: 0,
            command: CMD_WRITE,
            cookie: 3,
            offset: 0,
            length: 10,
        }
        .encode()[..20],
    );
    drop(r);
    fx.bystander_ok();
    assert_eq!(fx.writes(), before + 1, "just the bystander's check write");
}

#[test]
fn read_only_export_refuses_writes() {
    let srv = InProc::start(
        MemExport::new(SIZE),
        ServerConfig {
            read_only: true,
            ..ServerConfig::default()
        },
    );
    let mut r = Raw::connect(&srv.socket);
    let (_, flags) = r.handshake(false);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    r.request(CMD_WRITE, 0, 1, 0, 8);
    r.send(&[1; 8]);
    assert_eq!(r.simple_reply().error, EPERM);
    r.request(CMD_TRIM, 0, 2, 0, 8);
    assert_eq!(r.simple_reply().error, EPERM);
    r.request(CMD_WRITE_ZEROES, 0, 3, 0, 8);
    assert_eq!(r.simple_reply().error, EPERM);
    r.request(CMD_READ, 0, 4, 0, 8);
    assert_eq!(r.simple_reply().error, 0);
    assert_eq!(r.recv(8), vec![0u8; 8]);
    assert_eq!(srv.export.stats().writes, 0);
}
