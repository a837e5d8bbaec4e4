//! pmcache: a crash-consistent block cache on persistent memory, served over
//! NBD. This crate holds the commands; the layers are separate crates.

pub use pmcache_engine as engine;
pub use pmcache_nbd as nbd;
pub use pmcache_origin as origin;
pub use pmcache_pmem as pmem;

pub mod cache;
pub mod cli;
pub mod commands;
pub mod control;
pub mod export;
pub mod report;
pub mod size;
