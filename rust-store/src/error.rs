//! Errors, named for what failed: the op and the path a request concerned, the
//! daemon's own message, or the cause that ended the connection.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::protocol::{Op, Version};
use crate::store_path::PathError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon answered this request with an error; the connection goes on.
    #[error(transparent)]
    Daemon(Box<DaemonError>),

    /// A request sent without waiting failed earlier; this is the first such failure
    /// since the last call that waited.
    #[error("{first}{}", if *more > 0 { format!(" (and {more} more failed requests)") } else { String::new() })]
    Deferred { first: Box<Error>, more: usize },

    /// The connection is gone; every request still pending on it fails with the cause.
    /// `peer` names the other end: "the Nix daemon", or a remote store's URI.
    #[error("lost the connection to {peer}: {cause}")]
    Disconnected { peer: Arc<str>, cause: Arc<Error> },

    /// A connection through a process (`ssh`, `nix-daemon --stdio`) ended before the
    /// handshake: the process failed to start it (its own message is on standard
    /// error).
    #[error("cannot open a connection to {peer}: {cause}")]
    Handshake { peer: String, cause: Box<Error> },

    /// The daemon's reply could not be parsed. The connection cannot be resynchronised.
    #[error("malformed data from the Nix daemon: {0}")]
    Protocol(String),

    #[error("the Nix daemon closed the connection")]
    Eof,

    /// The daemon closed the connection right after this error: it was fatal to the
    /// connection (a malformed store path, an unknown op, a refused repair).
    #[error("the Nix daemon closed the connection after this error: {0}")]
    ClosedAfter(Box<DaemonError>),

    /// A lease's holder gave the socket back in the middle of a message.
    #[error("the connection was given up in the middle of an operation")]
    Abandoned,

    /// Every handle to the connection was dropped and its replies were all read.
    #[error("the connection was closed")]
    Closed,

    #[error("I/O error on the connection to the Nix daemon: {0}")]
    Io(#[from] std::io::Error),

    #[error("cannot connect to the Nix daemon at '{}': {source}", path.display())]
    Connect { path: PathBuf, source: std::io::Error },

    #[error(
        "the Nix daemon speaks worker protocol {daemon}, but this client needs at least {minimum} (Nix 2.4 or newer)"
    )]
    UnsupportedDaemon { daemon: Version, minimum: Version },

    #[error("{op} needs worker protocol 1.{needed}, but the Nix daemon speaks {have}")]
    Unsupported { op: Op, needed: u8, have: Version },

    #[error(transparent)]
    Path(#[from] PathError),

    /// An upload's data could not be read; the connection was closed so that the
    /// daemon stores nothing half-written.
    #[error("reading the data to upload for {op} '{subject}': {source}")]
    Upload { op: Op, subject: String, source: std::io::Error },

    /// This client will not send the request: the daemon would fail it in a way that
    /// breaks the connection, or it cannot succeed.
    #[error("{op} '{subject}': {reason}")]
    Refused { op: Op, subject: String, reason: String },

    /// The caller's input is malformed (an id, a path, a content address).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// The daemon's reply is well-formed but not what the request implies; the
    /// caller's check ([`crate::Call::check`]) found it.
    #[error("{0}")]
    UnexpectedReply(String),

    /// This client itself failed: its runtime or upload task is gone.
    #[error("internal error in the Nix daemon client: {0}")]
    Internal(String),
}

impl Error {
    /// The daemon's error, if this is one (directly, or as the first deferred failure).
    pub fn daemon_error(&self) -> Option<&DaemonError> {
        match self {
            Error::Daemon(e) => Some(e),
            Error::Deferred { first, .. } => first.daemon_error(),
            _ => None,
        }
    }

    /// Whether the connection this error came from is unusable.
    pub fn is_disconnect(&self) -> bool {
        match self {
            Error::Disconnected { .. }
            | Error::Handshake { .. }
            | Error::Eof
            | Error::ClosedAfter(_)
            | Error::Closed
            | Error::Abandoned
            | Error::Io(_)
            | Error::Protocol(_) => true,
            Error::Deferred { first, .. } => first.is_disconnect(),
            _ => false,
        }
    }
}

/// An error the daemon reported for one request (STDERR_ERROR).
#[derive(Debug, Clone)]
pub struct DaemonError {
    pub op: Op,
    /// What the request concerned: a store path, a name, as printed in messages.
    pub subject: Option<String>,
    /// The daemon's message, as it sent it (may carry ANSI colour codes).
    pub message: String,
    /// Verbosity level of the error (protocol 1.26 and later).
    pub level: u64,
    /// Exit status (protocols before 1.26).
    pub status: Option<u64>,
    /// The daemon's trace lines, innermost first.
    pub traces: Vec<String>,
}

impl DaemonError {
    /// Whether `next`, the error that answered the next request, is this one repeated
    /// by the daemon as it closes the connection: the same message for a different
    /// request. (The same request failing the same way twice is just that.)
    pub(crate) fn repeated_by(&self, next: &DaemonError) -> bool {
        self.message == next.message
            && self.traces == next.traces
            && (self.op != next.op || self.subject != next.subject)
    }
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.subject {
            Some(s) => write!(f, "{} '{}' failed: {}", self.op, s, self.message)?,
            None => write!(f, "{} failed: {}", self.op, self.message)?,
        }
        for t in &self.traces {
            write!(f, "\n… {t}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DaemonError {}
