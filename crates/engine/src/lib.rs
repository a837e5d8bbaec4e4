//! The pmcache engine: a crash-consistent block cache on persistent memory.
//!
//! Layers: [`format`] (what is in media), [`index`] and [`policy`] (what is
//! in DRAM), [`txn`] (sequence numbers and the durable watermark), the
//! request paths in [`engine`], [`writeback`], and [`recovery`], whose rule
//! for which versions of a block survive is [`versions`]. The design and
//! the rules that keep the contract's promises are in [`format`].

pub mod check;
pub mod engine;
mod epoch;
pub mod error;
pub mod format;
pub mod hooks;
pub mod index;
mod owed;
pub mod policy;
mod promotion;
pub mod recovery;
mod sequential;
pub mod stats;
pub mod txn;
pub mod versions;
pub mod writeback;

pub use engine::{
    Engine, EngineConfig, ReadReply, RelayReply, Stage, StagedWrite, WriteReply, WritebackOrder,
};
pub use error::{EngineError, Result};
pub use format::{CacheMode, Superblock};
pub use hooks::HookPoint;
pub use stats::StatsSnapshot;
