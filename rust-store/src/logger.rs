//! Where the daemon's log lines and activities go.
//!
//! The daemon interleaves log messages with its replies. The connection's reader
//! parses them and hands each to the [`Logger`] the caller supplied at connect time;
//! the default, [`TracingLogger`], forwards them to `tracing`.

/// A field of an activity or result: an integer or a string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    Int(u64),
    String(String),
}

/// An activity the daemon started (a build, a download, …).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activity {
    pub id: u64,
    pub level: u64,
    pub activity_type: u64,
    pub text: String,
    pub fields: Vec<Field>,
    pub parent: u64,
}

/// Receives the daemon's log messages. Called from the connection's reader task: it
/// must not block for long, or replies wait behind it.
pub trait Logger: Send + Sync {
    /// A log line (STDERR_NEXT), without its trailing newline.
    fn log(&self, line: &str);
    fn start_activity(&self, activity: Activity);
    fn stop_activity(&self, id: u64);
    fn result(&self, id: u64, result_type: u64, fields: Vec<Field>);
    /// Data the daemon writes to the client's sink (STDERR_WRITE).
    fn write(&self, data: &[u8]) {
        tracing::debug!(target: "nix_daemon", bytes = data.len(), "daemon wrote data with no sink");
    }
}

/// Forwards the daemon's messages to `tracing`, under the target `nix_daemon`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingLogger;

impl Logger for TracingLogger {
    fn log(&self, line: &str) {
        tracing::info!(target: "nix_daemon", "{line}");
    }

    fn start_activity(&self, a: Activity) {
        tracing::debug!(target: "nix_daemon", id = a.id, parent = a.parent, r#type = a.activity_type, "{}", a.text);
    }

    fn stop_activity(&self, id: u64) {
        tracing::trace!(target: "nix_daemon", id, "activity stopped");
    }

    fn result(&self, id: u64, result_type: u64, fields: Vec<Field>) {
        tracing::trace!(target: "nix_daemon", id, result_type, ?fields, "activity result");
    }
}
