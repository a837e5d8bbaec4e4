//! The NBD protocol for pmcache: wire format ([`proto`]), a server for an
//! [`Export`] ([`server`]), a synchronous client ([`client`]), and an
//! in-memory export for tests ([`mem`]).
//!
//! Data is never copied on its way through the server: WRITE payloads are
//! read from the socket straight into slices the export provides, and READ
//! replies are written from the slices the export hands out. Data that only
//! passes between a client and an origin server moves through a kernel pipe
//! ([`relay`]) and never enters user memory.

pub mod client;
pub mod conns;
pub mod export;
pub mod mem;
pub mod net;
pub mod proto;
pub mod relay;
pub mod server;
pub mod tls;

pub use client::{
    Client, ClientOptions, Completion, Endpoint, NbdUri, PassOn, RelayCompletion, RunsInFlight,
    ServerError,
};
pub use conns::{ConnectionInfo, Connections, Phase, TlsSessionInfo};
pub use export::{
    BlockSizes, Export, ExportError, Extent, PendingWrite, ReadReply as ExportReadReply,
    RelayReadReply, Staged, WriteDone, WriteOutcome, ZeroFlags,
};
pub use mem::{MemExport, MemStats};
pub use net::Stream;
pub use relay::Relayed;
pub use server::{Server, ServerConfig, ShutdownHandle, DEFAULT_TCP_ADDR};
pub use tls::{TlsCredentials, TlsMode, TlsServer, TlsServerConfig, TlsStats};
