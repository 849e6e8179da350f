//! A pipelined client for the Nix daemon's worker protocol.
//!
//! The [`Client`] is a cheap, cloneable handle. Every request it makes goes over one
//! channel to a [`Connection`](connection) task that owns the socket: a writer half sends
//! requests as they come, a reader half parses replies and hands each to its requester
//! in order. Callers that need an answer await it; callers that don't (temp roots,
//! writes whose path is already known) send and move on, and a failure surfaces at the
//! next call that waits or at [`Client::flush`].
//!
//! Module map:
//! - [`protocol`]: the protocol's constants: version, op codes, magic numbers.
//! - [`codec`]: the wire encoding (integers, padded strings, collections, frames).
//! - [`types`]: the protocol's value types (path infos, build results, …) and their encoding.
//! - [`transport`]: what a connection runs over: a Unix socket, or a process's pipes.
//! - [`handshake`]: version negotiation, features, trust, and the daemon's greeting.
//! - [`connection`]: the pipelining engine: the writer and reader tasks and the reply queue.
//! - [`ops`]: one method per worker-protocol operation.
//! - [`uploads`]: content-addressed adds that root, check validity in batches and upload
//!   only what is missing, without waiting.
//! - [`hash`], [`base32`], [`store_path`], [`nar`]: the store-path maths done locally.
//! - [`stats`]: counters a caller can read.
//! - [`logger`]: where the daemon's log lines and activities go.

pub mod base32;
pub mod codec;
pub mod connection;
pub mod error;
pub mod handshake;
pub mod hash;
pub mod logger;
pub mod nar;
pub mod ops;
pub mod protocol;
pub mod stats;
mod stderr;
pub mod store_path;
pub mod transport;
pub mod types;
pub mod uploads;

pub use connection::{Call, Client, ConnectOptions};
pub use error::{Error, Result};
pub use store_path::{StoreDir, StorePath};
