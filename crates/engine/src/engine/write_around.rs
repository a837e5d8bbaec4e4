//! Writes of a sequential stream past the cutoff, whose payload waits in a
//! relay pipe, sent to the origin by the caller (the NBD connection's
//! reader) and finished by the origin's reply: no worker takes the write,
//! and none sleeps until the origin answers and then wakes to reply. On two
//! vCPUs those two hand-offs cost a 1 MiB stream more than its splices.
//!
//! Only the plain case goes this way: blocks with no cached copy and no
//! writer, reader or origin writer busy with them, and (ordered writeback)
//! an origin owed nothing from an earlier epoch. Anything else, and an
//! origin write that fails, goes the waiting way ([`Engine::write_relayed`]),
//! which follows the bypass decision taken here.

use super::*;
use pmcache_origin::Completion;

/// What a write sent around the cache holds until the origin answers.
struct Around {
    engine: Arc<Engine>,
    offset: u64,
    len: u64,
    /// The ordered epoch held open until the origin has the write.
    epoch: Option<u64>,
}

impl Engine {
    /// Send a relayed write of a stream past the cutoff to the origin
    /// without waiting. `Ok` if sent: `reply` is told once the origin has it
    /// (with FUA in writeback mode: an acknowledged write is durable), or
    /// gets the waiting way to run where it failed. `Err`, with nothing
    /// done, where the write does not qualify now.
    pub fn start_write_relayed<R: WriteReply>(
        self: &Arc<Self>,
        offset: u64,
        data: Relayed,
        fua: bool,
        reply: R,
    ) -> std::result::Result<(), (Relayed, R)> {
        let len = data.len() as u64;
        let mode = self.mode();
        // A FUA write is a sync point of its stream and never bypasses.
        if fua
            || !self.origin.writes_relayed_async()
            || !matches!(mode, CacheMode::Writeback | CacheMode::Writethrough)
            || self.check_request(offset, len).is_err()
            || !self.streams.would_bypass(offset, len, true, false)
            || !self.streams.bypass_handed_on(offset, len, true, false)
        {
            return Err((data, reply));
        }
        // The decision is recorded and handed on: from here a declined write
        // goes the waiting way, which follows it.
        let Some(epoch) = self.take_around(offset, len, mode) else {
            return Err((data, reply));
        };
        self.streams.take_handed_on(offset, len, true);
        let around = Around {
            engine: self.clone(),
            offset,
            len,
            epoch,
        };
        let dup = match data.dup() {
            Ok(d) => d,
            Err(e) => {
                around.failed(data, e, reply);
                return Ok(());
            }
        };
        let done: Completion = Box::new(move |r| match r {
            Ok(()) => around.done(reply),
            Err(e) => around.failed(data, e, reply),
        });
        // In writeback mode the cache never holds this write: it must be
        // durable on the origin when acknowledged.
        let fua = mode == CacheMode::Writeback;
        if let Err(done) = self.origin.write_relayed_async(&dup, offset, fua, done) {
            done(Err(origin_declined("write")));
        }
        Ok(())
    }

    /// Everything a write around the cache holds, without waiting: the
    /// ordered epoch (if the origin is owed nothing earlier), the writer and
    /// origin-writer locks, and no cached copy. `None`, with nothing held,
    /// where something is busy or owed; else the epoch held, if any.
    fn take_around(&self, offset: u64, len: u64, mode: CacheMode) -> Option<Option<u64>> {
        let bs = self.bs();
        let (b0, b1) = (offset / bs, (offset + len - 1) / bs);
        let epoch = if mode == CacheMode::Writeback && self.ordered() {
            let g = self.epochs.enter();
            if self.earlier_epochs_open(g.epoch) {
                drop(g);
                self.kick_writeback_now();
                return None;
            }
            Some(g.detach())
        } else {
            None
        };
        let leave = || {
            if let Some(ep) = epoch {
                self.epochs.leave(ep);
            }
        };
        if self.try_lock_writers(b0, b1).is_none() {
            leave();
            return None;
        }
        if self.any_version(b0, b1, |_| true) || !self.try_lock_origin_writers(b0, b1) {
            self.unlock_writers(b0, b1);
            leave();
            return None;
        }
        Some(epoch)
    }
}

impl Around {
    /// Let go of the locks and the epoch.
    fn release(&self) {
        let e = &*self.engine;
        let bs = e.bs();
        let (b0, b1) = (self.offset / bs, (self.offset + self.len - 1) / bs);
        e.unlock_origin_writers(b0..=b1);
        e.unlock_writers(b0, b1);
        if let Some(ep) = self.epoch {
            e.epochs.leave(ep);
        }
    }

    /// The origin has the write.
    fn done<R: WriteReply>(self, reply: R) {
        self.release();
        let e = &*self.engine;
        let bs = e.bs();
        let blocks = (self.offset + self.len).div_ceil(bs) - self.offset / bs;
        e.counters.add(Ctr::WriteMisses, blocks);
        e.counters.add(Ctr::BypassWrites, 1);
        e.counters.add(Ctr::BypassBytes, self.len);
        e.counters.add(Ctr::RelayedBytes, self.len);
        e.count_write(self.len);
        Box::new(reply).reply(Ok(()));
    }

    /// The origin did not take it: the waiting way tries again (and keeps
    /// the write in the cache if the origin still fails), following the
    /// bypass decision handed on again here.
    fn failed<R: WriteReply>(self, mut data: Relayed, err: io::Error, reply: R) {
        self.release();
        let e = self.engine.clone();
        if err.kind() != io::ErrorKind::WouldBlock {
            e.counters.add(Ctr::OriginErrors, 1);
            tracing::debug!(offset = self.offset, error = %err, "a write around the cache goes the waiting way");
        }
        e.streams.hand_on(self.offset, self.len, true);
        let offset = self.offset;
        Box::new(reply).retry(Box::new(move || e.write_relayed(offset, &mut data, false)));
    }
}
