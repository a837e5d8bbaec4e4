use std::io;

/// Everything the engine can report. Messages name what and where.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("origin I/O failed at byte {offset}: {source}")]
    Origin { offset: u64, source: io::Error },
    #[error("request {offset}+{len} is beyond the end of the device ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("request of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("not a pmcache cache: {0}")]
    NotACache(String),
    #[error("cache format version {found} is not this pmcache's ({expected}): {hint}")]
    OldFormat {
        found: u32,
        expected: u32,
        hint: &'static str,
    },
    #[error("corrupt cache metadata: {0}")]
    Corrupt(String),
    #[error("the cached data of block {block} (slot {slot}) failed its checksum, and the cache holds its only copy (not yet written back): reads of it fail until it is written again")]
    DataCorrupt { block: u64, slot: u64 },
    #[error("cache belongs to origin '{expected}' ({expected_size} bytes), not '{found}' ({found_size} bytes); use --force to attach it anyway")]
    OriginMismatch {
        expected: String,
        expected_size: u64,
        found: String,
        found_size: u64,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("the origin ({origin_blocks} blocks) is smaller than the cache's dirty data: slot {slot} holds dirty block {block} past its end; write the dirty data back to the origin it belongs to first (pmcache flush, without --force)")]
    DirtyPastOrigin {
        slot: u64,
        block: u64,
        origin_blocks: u64,
    },
    #[error("payload transfer failed: {0}")]
    Transfer(io::Error),
    #[error("the cache is shutting down")]
    ShuttingDown,
    #[error("the cache device could not make a write durable: {0}")]
    Persist(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;
