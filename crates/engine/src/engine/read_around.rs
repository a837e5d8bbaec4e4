//! Reads that only pass through (a stream past the cutoff, or a cache that
//! does not promote) sent to the origin by the caller (the NBD connection's
//! reader) and answered from the origin's reader with the relay pipe it
//! filled: no worker takes the read, and none sleeps until the origin
//! answers. The read twin of `write_around`.
//!
//! Only the plain case goes this way: every block missing, none being
//! written, written back or read from the origin. Anything else, and an
//! origin read that fails, goes the waiting way (`read_or_relay`), which
//! follows the bypass decision taken here and retries.

use super::read::Lookup;
use super::*;
use pmcache_origin::{PassOn, RelayCompletion, MAX_RELAY};

/// Where a read relayed from the origin goes.
pub trait RelayReply: Send + 'static {
    /// The read's data, in a pipe to splice on; or why the origin failed,
    /// with nothing held, for the caller to read the waiting way (which
    /// retries and answers).
    fn reply(self: Box<Self>, r: Result<Relayed>);
}

impl Engine {
    /// Send a read that only passes through to the origin without waiting.
    /// `Ok` if sent: `reply` is called once, on the origin's reader thread
    /// (or in this call), after `pass` (see [`PassOn`]) may have sent the
    /// data on as it arrived. `Err(reply)`, with nothing done, where the
    /// read does not qualify now.
    pub fn start_read_relayed<R: RelayReply>(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        pass: Box<dyn PassOn>,
        reply: R,
    ) -> std::result::Result<(), R> {
        let promotes = self.promotes();
        if len == 0
            || len > MAX_RELAY as u64
            || !self.origin.reads_relayed_async()
            || self.check_request(offset, len).is_err()
            || (promotes && !self.streams.would_bypass(offset, len, false, false))
        {
            return Err(reply);
        }
        // Recorded and handed on: from here a read that cannot go this way
        // goes the waiting way, which follows the decision.
        if promotes && !self.streams.bypass_handed_on(offset, len, false, false) {
            return Err(reply);
        }
        let bs = self.bs();
        let (b0, b1) = (offset / bs, (offset + len - 1) / bs);
        let ids = self.shards_of(b0, b1);
        if !matches!(
            self.lookup_range(b0, b1, &ids, Lookup::MissesOnly),
            Ok(Some(_))
        ) {
            return Err(reply);
        }
        // Every block is a miss now, holding its origin-reader lock.
        if promotes {
            self.streams.take_handed_on(offset, len, false);
        }
        let e = self.clone();
        let done: RelayCompletion = Box::new(move |r| e.relayed_read_done(offset, len, r, reply));
        if let Err(done) = self
            .origin
            .read_relayed_async(offset, len as usize, Some(pass), done)
        {
            done(Err(origin_declined("read")));
        }
        Ok(())
    }

    /// The origin answered a read started by `start_read_relayed`.
    fn relayed_read_done<R: RelayReply>(
        &self,
        offset: u64,
        len: u64,
        r: io::Result<Relayed>,
        reply: R,
    ) {
        let bs = self.bs();
        let (b0, b1) = (offset / bs, (offset + len - 1) / bs);
        self.release_origin_readers(b0..=b1);
        let bypass = self.promotes();
        match r {
            Ok(data) => {
                debug_assert_eq!(data.len() as u64, len);
                self.count_miss_read(len, b1 - b0 + 1, bypass);
                self.counters.add(Ctr::RelayedBytes, len);
                Box::new(reply).reply(Ok(data));
            }
            Err(source) => {
                // Counted, retried and answered by the waiting path, which
                // follows this read's bypass decision.
                if source.kind() != io::ErrorKind::WouldBlock {
                    self.counters.add(Ctr::OriginErrors, 1);
                }
                if bypass {
                    self.streams.hand_on(offset, len, false);
                }
                Box::new(reply).reply(Err(EngineError::Origin { offset, source }));
            }
        }
    }
}
