//! The bridge through which Nix's C++ (libstore's `RustDaemonStore`) uses rust-store.
//!
//! `RustDaemonStore` is a `RemoteStore`: its operations are Nix's own, and it makes
//! its connections itself, handshake and settings included. It makes a client here
//! ([`new_daemon_connection`]) and hands it the first connection it uses
//! ([`DaemonConnection::attach`]); the client keeps a pipelined connection on the
//! same socket for the requests nobody waits for:
//!
//! - [`DaemonConnection::add_temp_root`]: sent without waiting, at most once per path
//!   and connection (temp roots last as long as the connection);
//! - [`DaemonConnection::add_ca`]: a content-addressed addition at a store path C++
//!   has computed; rust-store's [`Uploads`] roots the path, checks its validity in a
//!   batch and uploads it only if the daemon lacks it, all behind the caller.
//!
//! An `ssh-ng://` store makes that connection in the background, while the
//! evaluation goes on: until it is attached, additions and roots are held in order
//! ([`Link`]), and every call that needs the daemon waits for it.
//!
//! Every operation of C++'s own takes the socket for itself
//! ([`DaemonConnection::begin_lease`], [`DaemonConnection::end_lease`]) once
//! rust-store has resolved the additions before it and read every reply ahead of it,
//! so the daemon has seen them; an operation on another of the store's connections
//! waits for them to be confirmed ([`DaemonConnection::flush`]). Reading the store's
//! files waits only for the path read: a path added on this connection is known
//! valid ([`DaemonConnection::was_added`]) and read, while the daemon has not
//! confirmed it, from the contents held for it ([`DaemonConnection::held_nar`]); a
//! caller that reads the files themselves ([`DaemonConnection::sync_path`]) waits
//! for that path's own addition only.
//!
//! Failures come back as an [`ffi::Outcome`] holding an error in the worker protocol's
//! own error encoding, which C++ rethrows with `readError`, as the C++ client does. A
//! failure of a request sent without waiting is returned by the next call that waits.
//! No panic crosses into C++: each entry point turns one into an error.
//!
//! Calls block the calling C++ thread; the connection's tasks run on a runtime this
//! crate owns.

use std::collections::HashSet;
use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, OnceLock, Weak};

use rust_store::codec::{Ctx, Encoder};
use rust_store::connection::Lease;
use rust_store::handshake::DaemonInfo;
use rust_store::logger::{Activity, Field, Logger};
use rust_store::protocol::Version;
use rust_store::transport::{LOCAL_DAEMON, Transport};
use rust_store::types::{TrustedFlag, UnkeyedValidPathInfo};
use rust_store::uploads::{UploadOptions, Uploads};
use rust_store::{Client, ConnectOptions, Error, StoreDir, StorePath};
use tokio::runtime::Runtime;

#[cxx::bridge(namespace = "nix::rust_store")]
mod ffi {
    /// A call's outcome: its result bytes, or an error in the protocol's encoding.
    struct Outcome {
        ok: bool,
        data: Vec<u8>,
    }

    /// Whether the daemon trusts this client, as its handshake said.
    enum Trust {
        Unknown,
        Trusted,
        NotTrusted,
    }

    /// What the handshake on a connection learnt, for [`DaemonConnection::attach`].
    struct Handshake {
        /// The negotiated protocol version, as the wire encodes it.
        protocol_version: u64,
        /// The daemon's Nix version, or "" if the protocol does not tell.
        daemon_version: String,
        trust: Trust,
        /// The features both sides support.
        features: Vec<String>,
    }

    /// What the daemon will know of a path whose addition it has not confirmed yet.
    #[derive(Default)]
    struct HeldPathInfo {
        /// SHA-256 of its NAR, in base 16.
        nar_hash: String,
        nar_size: u64,
        /// The base names of its references.
        references: Vec<String>,
        /// Its content address, rendered (`text:sha256:…`).
        ca: String,
    }

    /// A field of a log activity or result: an integer or a string.
    struct LogField {
        is_int: bool,
        int_value: u64,
        string_value: String,
    }

    extern "Rust" {
        type DaemonConnection;

        /// A client for the connection C++ is making, or has made, to `peer` (""
        /// for the local daemon), which names the other end in messages.
        /// `store_dir` is the store directory paths are printed with;
        /// `max_pending_bytes` bounds the contents held for additions the daemon
        /// has not confirmed yet. Until `attach` or `fail`, additions and roots
        /// are held, in order, within the same bound, and every call that needs
        /// the daemon waits.
        fn new_daemon_connection(peer: &str, store_dir: &str, max_pending_bytes: u64) -> Result<Box<DaemonConnection>>;

        /// Takes over the connection C++ has opened and handshaken, between two
        /// requests: `read_fd` and `write_fd` (duplicated; the caller keeps its
        /// own) are its socket, passed twice, or the pipes of the process it talks
        /// to (`ssh`). What was held is sent on it first, in order. Fails if the
        /// client has a connection already or was told `fail`; a failure here
        /// fails every later call too.
        fn attach(self: &DaemonConnection, read_fd: i32, write_fd: i32, handshake: Handshake) -> Outcome;

        /// Says that the connection could not be made: what was held is dropped,
        /// and every later call fails with `message`, which should name the peer.
        /// Nothing if the client has a connection already.
        fn fail(self: &DaemonConnection, message: &str);

        /// Whether the connection could not be made and a call has returned why:
        /// C++ is done with the client, and makes a new one for its next connection.
        fn given_up(self: &DaemonConnection) -> bool;

        /// Takes the socket for one of C++'s own operations: waits until every
        /// earlier addition is resolved and every request before answered, then
        /// leaves the socket alone, in blocking mode, until `end_lease`. Fails, with
        /// the socket not taken, if a request sent without waiting has failed.
        fn begin_lease(self: &DaemonConnection) -> Outcome;

        /// Gives the socket back after `begin_lease`; `in_step` is false if the
        /// operation was cut short in the middle of a message, which ends the
        /// connection.
        fn end_lease(self: &DaemonConnection, in_step: bool);

        /// Roots a path for this connection without waiting; repeats are dropped.
        fn add_temp_root(self: &DaemonConnection, path: &str) -> Outcome;

        /// A content-addressed addition (text, flat or NAR hashing; no repair) at
        /// the store path whose base name (`<hash>-<name>`) the caller computed:
        /// `method` with its algorithm as in a content address (`text:sha256`),
        /// the references' base names, and the data. Does not wait: the path is
        /// rooted, checked, and only if missing uploaded, behind the caller; the
        /// rest is checked against the path then.
        fn add_ca(
            self: &DaemonConnection,
            base_name: &str,
            method: &str,
            references: Vec<String>,
            data: &[u8],
        ) -> Outcome;

        /// Waits until every addition is stored or known valid and every request
        /// sent has been answered; returns the first failure of a request sent
        /// without waiting, if any.
        fn flush(self: &DaemonConnection) -> Outcome;

        /// Whether the path with this base name was added on this connection and has
        /// not failed: it is valid, or will be once its upload is stored.
        fn was_added(self: &DaemonConnection, base_name: &str) -> bool;

        /// If the path with this base name was added on this connection and the
        /// daemon has not confirmed it yet, puts its NAR, from the contents held for
        /// it, into `nar` and returns true; otherwise returns false.
        fn held_nar(self: &DaemonConnection, base_name: &str, nar: &mut Vec<u8>) -> bool;

        /// Like `held_nar`, for the path's info.
        fn held_path_info(self: &DaemonConnection, base_name: &str, info: &mut HeldPathInfo) -> bool;

        /// For a caller about to read the files of the path with this base name:
        /// waits until the daemon has confirmed the path's own addition, if it was
        /// added on this connection and is not confirmed yet (not for additions
        /// after it), and returns its failure, or an unreported earlier one. At once
        /// for any other path.
        fn sync_path(self: &DaemonConnection, base_name: &str) -> Outcome;

        /// Asks for the info of the store path `path` (printed in full) without
        /// waiting. `query_path_info_done(token, …)` gets the reply, later and on
        /// the bridge's completion thread, never on the caller's: the result as the
        /// protocol encodes it (a validity flag, then the path's info, in the
        /// negotiated version), or the failure. Fails at once, and then never calls
        /// back, only for a malformed path or a connection already gone.
        fn query_path_info(self: &DaemonConnection, path: &str, token: usize) -> Outcome;

        /// The connection's counters, as a JSON object.
        fn stats_json(self: &DaemonConnection) -> String;

        /// Flushes every connection still open; returns the first failure.
        fn flush_live() -> Outcome;
    }

    unsafe extern "C++" {
        include!("nix-store-bridge-logger.hh");

        fn log_line(line: &str);
        fn start_activity(id: u64, level: u64, activity_type: u64, text: &str, fields: &[LogField], parent: u64);
        fn stop_activity(id: u64);
        fn activity_result(id: u64, result_type: u64, fields: &[LogField]);

        /// The reply to `query_path_info`.
        fn query_path_info_done(token: usize, outcome: Outcome);
    }
}

use ffi::Outcome;

/// The runtime the connections' tasks run on, shared by all connections.
///
/// One worker thread: the tasks only move bytes, and the evaluator and the daemon
/// already want a core each. With two workers, the connection's and the uploads'
/// tasks woke each other across threads, which cost more than it gained (with every
/// path of the benchmark valid, 1.34-1.39x read-only time against 1.13-1.22x).
fn runtime() -> Result<&'static Runtime, String> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("nix-daemon-client")
                .enable_io()
                .enable_time()
                .build()
                .map_err(|e| format!("cannot start the daemon client's runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Runs `fut` on the runtime and blocks the calling thread until it is done.
///
/// Unlike `Runtime::block_on`, this needs no thread-local state on the calling
/// thread, so it works from any C++ thread, also while the process exits and a
/// store is destroyed after the thread's thread-locals are gone.
fn wait<T: Send + 'static>(runtime: &Runtime, fut: impl Future<Output = T> + Send + 'static) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| "the daemon client's runtime dropped a request".to_string())
}

/// Runs `f`, turning a panic into an error message instead of unwinding into C++.
fn guard<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        format!("internal error in the Rust daemon client ({what}): {msg}")
    })
}

/// Encodes with the protocol's plain encodings (integers, strings), which depend on
/// neither the version nor the store directory.
fn encode(f: impl FnOnce(&mut Encoder<'_>)) -> Vec<u8> {
    let ctx = Ctx { version: Version::LATEST, store_dir: StoreDir::default() };
    let mut out = Vec::new();
    f(&mut Encoder::new(&mut out, &ctx));
    out
}

/// Encodes an error as the daemon does (Nix's `operator << (Sink &, const Error &)`).
fn encode_error(level: u64, message: &str, traces: &[String]) -> Vec<u8> {
    encode(|e| {
        e.str("Error").u64(level).str("Error").str(message).u64(0).u64(traces.len() as u64);
        for t in traces {
            e.u64(0).str(t);
        }
    })
}

fn ok(data: Vec<u8>) -> Outcome {
    Outcome { ok: true, data }
}

fn failed(e: &Error) -> Outcome {
    let data = match e {
        // The daemon's own error, unchanged: what the C++ client would throw.
        Error::Daemon(d) => encode_error(d.level, &d.message, &d.traces),
        // An earlier request's failure: say which request it was.
        Error::Deferred { first, .. } => match first.daemon_error() {
            Some(d) => {
                let what = d.subject.as_deref().map(|s| format!(" '{s}'")).unwrap_or_default();
                let msg = format!("{}{what}, sent earlier without waiting, failed: {}", d.op, d.message);
                encode_error(d.level, &msg, &d.traces)
            }
            None => encode_error(0, &e.to_string(), &[]),
        },
        _ => encode_error(0, &e.to_string(), &[]),
    };
    Outcome { ok: false, data }
}

fn failed_msg(msg: &str) -> Outcome {
    Outcome { ok: false, data: encode_error(0, msg, &[]) }
}

/// Flattens a guarded outcome.
fn outcome(what: &str, f: impl FnOnce() -> Outcome) -> Outcome {
    guard(what, f).unwrap_or_else(|m| failed_msg(&m))
}

/// Passes the daemon's messages to Nix's logger.
struct CxxLogger;

fn log_fields(fields: &[Field]) -> Vec<ffi::LogField> {
    fields
        .iter()
        .map(|f| match f {
            Field::Int(i) => ffi::LogField { is_int: true, int_value: *i, string_value: String::new() },
            Field::String(s) => ffi::LogField { is_int: false, int_value: 0, string_value: s.clone() },
        })
        .collect()
}

impl Logger for CxxLogger {
    fn log(&self, line: &str) {
        ffi::log_line(line);
    }

    fn start_activity(&self, a: Activity) {
        ffi::start_activity(a.id, a.level, a.activity_type, &a.text, &log_fields(&a.fields), a.parent);
    }

    fn stop_activity(&self, id: u64) {
        ffi::stop_activity(id);
    }

    fn result(&self, id: u64, result_type: u64, fields: Vec<Field>) {
        ffi::activity_result(id, result_type, &log_fields(&fields));
    }
}

/// Runs `f`, a call into C++ for a reply, on the completion thread: one thread for
/// every connection, which runs them in the order the replies came. Never on the
/// connection's reader, which must go on reading while C++ works (and C++ may send
/// more requests from the callback), nor on the runtime. As with Nix's own
/// callbacks (a binary cache's, on its download thread), C++ must not wait in it
/// for another reply.
fn complete(f: impl FnOnce() + Send + 'static) {
    type Job = Box<dyn FnOnce() + Send>;
    static COMPLETIONS: OnceLock<std::sync::mpsc::Sender<Job>> = OnceLock::new();
    let tx = COMPLETIONS.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("nix-daemon-client-completions".into())
            // C++ may recurse in a callback (a closure walk over paths it knows
            // already), as deep as on Nix's main thread.
            .stack_size(64 << 20)
            .spawn(move || {
                for job in rx {
                    // C++ catches its own exceptions; nothing here can unwind, but a
                    // panic must not end the thread that every reply goes through.
                    let _ = catch_unwind(AssertUnwindSafe(job));
                }
            })
            .expect("start the completion thread");
        tx
    });
    let _ = tx.send(Box::new(f));
}

/// The pipelined client on a connection of the C++ store's, and the uploads on it.
pub struct DaemonConnection {
    link: Arc<Link>,
    runtime: &'static Runtime,
    /// The socket while one of C++'s operations has it.
    lease: Mutex<Option<Lease>>,
}

/// A client's way to its connection, which C++ may still be making: an `ssh-ng://`
/// store connects in the background while the evaluation goes on. Additions and
/// roots made meanwhile are held here, and handed to the uploads, in the order they
/// came, once the connection is there; every call that needs the daemon waits.
struct Link {
    /// The other end, for messages.
    peer: String,
    store_dir: StoreDir,
    max_pending_bytes: u64,
    state: Mutex<LinkState>,
    /// Notified when `state` stops being [`LinkState::Connecting`].
    changed: Condvar,
    /// How many additions and roots were held while connecting, for the counters.
    held_while_connecting: AtomicU64,
}

enum LinkState {
    Connecting(Held),
    Up(Arc<Uploads>),
    /// The connection could not be made: every call fails with `message`. `told`
    /// once a call has returned it (not `attach`), or if nothing was held: the
    /// client is given up, and C++ makes a new one for its next connection.
    Failed {
        message: String,
        told: bool,
    },
}

/// The work made before there was a connection.
#[derive(Default)]
struct Held {
    /// In the order it came.
    work: Vec<Early>,
    /// Bytes of contents in `work`, at most the connection's bound (or one addition).
    bytes: u64,
    /// The hashes of the paths `work` adds.
    added: HashSet<[u8; 20]>,
}

enum Early {
    /// An addition, with the hash of its path's base name.
    Add {
        hash: [u8; 20],
        base_name: String,
        method: String,
        references: Vec<String>,
        data: Vec<u8>,
    },
    Root(StorePath),
}

impl Link {
    fn state(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The uploads on the connection; waits while it is being made. If it could not
    /// be made, returns why, for the caller to tell.
    fn uploads(&self) -> Result<Arc<Uploads>, String> {
        self.wait_connected(true)
    }

    /// Like [`Link::uploads`], for a caller that does not tell the failure.
    fn uploads_quietly(&self) -> Option<Arc<Uploads>> {
        self.wait_connected(false).ok()
    }

    fn wait_connected(&self, tell: bool) -> Result<Arc<Uploads>, String> {
        let mut state = self.state();
        loop {
            match &mut *state {
                LinkState::Connecting(_) => state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner()),
                LinkState::Up(uploads) => return Ok(uploads.clone()),
                LinkState::Failed { message, told } => {
                    *told |= tell;
                    return Err(message.clone());
                }
            }
        }
    }

    /// Whether the connection could not be made and the failure has been told.
    fn given_up(&self) -> bool {
        matches!(&*self.state(), LinkState::Failed { told: true, .. })
    }

    /// The uploads, if the connection is there; never waits.
    fn uploads_now(&self) -> Option<Arc<Uploads>> {
        match &*self.state() {
            LinkState::Up(uploads) => Some(uploads.clone()),
            _ => None,
        }
    }

    /// Holds `early`, with `bytes` of contents, while the connection is being made;
    /// waits for the connection instead if that would hold more than the bound.
    /// Returns the uploads to hand it to if the connection is there.
    fn hold(&self, early: Early, bytes: u64) -> Result<Option<Arc<Uploads>>, String> {
        let mut state = self.state();
        loop {
            match &mut *state {
                LinkState::Connecting(held) => {
                    if held.work.is_empty() || held.bytes + bytes <= self.max_pending_bytes {
                        if let Early::Add { hash, .. } = &early {
                            held.added.insert(*hash);
                        }
                        held.work.push(early);
                        held.bytes += bytes;
                        self.held_while_connecting.fetch_add(1, Relaxed);
                        return Ok(None);
                    }
                    state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                LinkState::Up(uploads) => return Ok(Some(uploads.clone())),
                LinkState::Failed { message, told } => {
                    *told = true;
                    return Err(message.clone());
                }
            }
        }
    }

    /// Whether the path with this hash was added on this connection and has not
    /// failed; while connecting, whether an addition of it is held.
    fn was_added(&self, hash: &[u8; 20]) -> bool {
        match &*self.state() {
            LinkState::Connecting(held) => held.added.contains(hash),
            LinkState::Up(uploads) => uploads.was_added(hash),
            LinkState::Failed { .. } => false,
        }
    }

    /// Makes the client on the connection C++ has made, hands it what was held, in
    /// order, and lets every call through; or, if it cannot be made, fails them all.
    fn attach(
        &self,
        runtime: &Runtime,
        read_fd: RawFd,
        write_fd: RawFd,
        handshake: ffi::Handshake,
    ) -> Result<(), String> {
        self.held_mut(&mut self.state())?;
        let made = self.open_uploads(runtime, read_fd, write_fd, handshake);
        let mut state = self.state();
        let held = std::mem::take(self.held_mut(&mut state)?);
        let result = match made {
            Ok(uploads) => {
                // Under the lock: whatever comes next goes after what was held.
                for early in held.work {
                    let r = match early {
                        Early::Add { base_name, method, references, data, .. } => {
                            uploads.add_computed_blocking(&base_name, &method, &references, &data)
                        }
                        Early::Root(path) => uploads.add_temp_root(&path),
                    };
                    // Its caller was told it went without waiting: the next call
                    // that waits reports it.
                    if let Err(e) = r {
                        uploads.client().failure_sink().defer(e);
                    }
                }
                *state = LinkState::Up(uploads);
                Ok(())
            }
            Err(message) => {
                *state = failed_link(&message, &held);
                Err(message)
            }
        };
        self.changed.notify_all();
        result
    }

    /// What is held; fails unless the connection is still being made.
    fn held_mut<'s>(&self, state: &'s mut LinkState) -> Result<&'s mut Held, String> {
        match state {
            LinkState::Connecting(held) => Ok(held),
            LinkState::Up(_) => Err(format!("the client for {} has a connection already", self.peer)),
            LinkState::Failed { message, .. } => Err(message.clone()),
        }
    }

    fn fail(&self, message: &str) {
        let mut state = self.state();
        if let Ok(held) = self.held_mut(&mut state) {
            let held = std::mem::take(held);
            if !held.work.is_empty() {
                tracing::debug!("{} additions and roots for {} dropped: {message}", held.work.len(), self.peer);
            }
            *state = failed_link(message, &held);
            self.changed.notify_all();
        }
    }

    fn open_uploads(
        &self,
        runtime: &Runtime,
        read_fd: RawFd,
        write_fd: RawFd,
        handshake: ffi::Handshake,
    ) -> Result<Arc<Uploads>, String> {
        let version = Version::from_wire(handshake.protocol_version);
        let info = DaemonInfo {
            version,
            daemon_version: version,
            nix_version: (!handshake.daemon_version.is_empty()).then_some(handshake.daemon_version),
            trusted: match handshake.trust {
                ffi::Trust::Trusted => Some(TrustedFlag::Trusted),
                ffi::Trust::NotTrusted => Some(TrustedFlag::NotTrusted),
                _ => None,
            },
            features: handshake.features.into_iter().collect(),
        };
        let peer = self.peer.clone();
        let dup = |fd| dup_fd(fd).map_err(|e| format!("cannot take over the connection to {peer}: {e}"));
        let read = dup(read_fd)?;
        let write = if write_fd == read_fd { None } else { Some(dup(write_fd)?) };
        // C++ has sent SetOptions itself, with Nix's settings.
        let options = ConnectOptions {
            store_dir: self.store_dir.clone(),
            logger: Arc::new(CxxLogger),
            settings: None,
            ..ConnectOptions::default()
        };
        let upload_options = UploadOptions { max_pending_bytes: self.max_pending_bytes, ..upload_tuning() };
        let uploads = wait(runtime, async move {
            let transport = Transport::from_fds(read, write, peer)?;
            let client = Client::adopt(transport, info, options).await?;
            Ok::<_, Error>(Uploads::new(client, upload_options))
        })?
        .map_err(|e| format!("cannot take over the connection to {}: {e}", self.peer))?;
        Ok(Arc::new(uploads))
    }
}

/// A link whose connection could not be made, with `held` dropped: nobody is left
/// to tell if nothing was held.
fn failed_link(message: &str, held: &Held) -> LinkState {
    LinkState::Failed { message: message.to_owned(), told: held.work.is_empty() }
}

/// The clients that exist, for [`flush_live_connections`].
static LIVE: Mutex<Vec<Weak<Link>>> = Mutex::new(Vec::new());

/// Why [`flush_all`] stopped.
enum Unflushed {
    /// A request failed.
    Request(Error),
    /// A client's connection could not be made.
    NoConnection(String),
}

impl Unflushed {
    fn outcome(&self) -> Outcome {
        match self {
            Unflushed::Request(e) => failed(e),
            Unflushed::NoConnection(message) => failed_msg(message),
        }
    }
}

impl std::fmt::Display for Unflushed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unflushed::Request(e) => e.fmt(f),
            Unflushed::NoConnection(message) => f.write_str(message),
        }
    }
}

/// Flushes every client still open, waiting for connections still being made;
/// stops at the first failure.
fn flush_all() -> Result<(), Unflushed> {
    let live: Vec<_> = LIVE.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(Weak::upgrade).collect();
    let runtime = runtime().map_err(|e| Unflushed::Request(Error::Internal(e)))?;
    for link in live {
        let uploads = link.uploads().map_err(Unflushed::NoConnection)?;
        wait(runtime, async move { uploads.flush().await })
            .map_err(|e| Unflushed::Request(Error::Internal(e)))?
            .map_err(Unflushed::Request)?;
    }
    Ok(())
}

/// Flushes every client still open when the process exits, so that additions
/// made without waiting reach the daemon even if their store is never closed (a
/// program on the C API that exits holding it, say). A failure can only be logged
/// here: the exit status is decided.
extern "C" fn flush_live_connections() {
    if let Err(e) = flush_all() {
        eprintln!("error: {e}");
    }
}

fn flush_live() -> Outcome {
    outcome("flush_live", || match flush_all() {
        Ok(()) => ok(Vec::new()),
        Err(e) => e.outcome(),
    })
}

/// Registers [`flush_live_connections`] once, and `link` in [`LIVE`].
fn register(link: &Arc<Link>) {
    static HOOKED: Once = Once::new();
    HOOKED.call_once(|| {
        // If it cannot be registered, closing each store still flushes it.
        let _ = unsafe { libc::atexit(flush_live_connections) };
    });
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    live.retain(|w| w.strong_count() > 0);
    live.push(Arc::downgrade(link));
}

fn new_daemon_connection(peer: &str, store_dir: &str, max_pending_bytes: u64) -> Result<Box<DaemonConnection>, String> {
    guard("new_daemon_connection", || {
        let link = Arc::new(Link {
            peer: if peer.is_empty() { LOCAL_DAEMON.to_owned() } else { peer.to_owned() },
            store_dir: StoreDir::new(store_dir).map_err(|e| e.to_string())?,
            max_pending_bytes,
            state: Mutex::new(LinkState::Connecting(Held::default())),
            changed: Condvar::new(),
            held_while_connecting: AtomicU64::new(0),
        });
        register(&link);
        Ok(Box::new(DaemonConnection { link, runtime: runtime()?, lease: Mutex::new(None) }))
    })?
}

/// A descriptor of our own for the same socket or pipe as `fd`.
fn dup_fd(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor, which we then own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Batch sizes of uploads: the measured defaults, unless the environment sets
/// `NIX_DAEMON_CLIENT_CHECK_BATCH` (most paths per validity check) or
/// `NIX_DAEMON_CLIENT_BATCH_DELAY_US` (how long a path waits for company).
fn upload_tuning() -> UploadOptions {
    let mut o = UploadOptions::default();
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = var("NIX_DAEMON_CLIENT_CHECK_BATCH") {
        o.check_batch = n.max(1) as usize;
    }
    if let Some(us) = var("NIX_DAEMON_CLIENT_BATCH_DELAY_US") {
        o.batch_delay = std::time::Duration::from_micros(us);
    }
    o
}

/// The outcome of a call that returns nothing.
fn done(r: Result<(), Error>) -> Outcome {
    match r {
        Ok(()) => ok(Vec::new()),
        Err(e) => failed(&e),
    }
}

/// Unwraps the uploads of a connection, or returns the outcome of its failure.
macro_rules! uploads_or_fail {
    ($e:expr) => {
        match $e {
            Ok(uploads) => uploads,
            Err(message) => return failed_msg(&message),
        }
    };
}

impl DaemonConnection {
    fn attach(&self, read_fd: i32, write_fd: i32, handshake: ffi::Handshake) -> Outcome {
        outcome("attach", || match self.link.attach(self.runtime, read_fd, write_fd, handshake) {
            Ok(()) => ok(Vec::new()),
            Err(message) => failed_msg(&message),
        })
    }

    fn fail(&self, message: &str) {
        let _ = guard("fail", || self.link.fail(message));
    }

    fn given_up(&self) -> bool {
        guard("given_up", || self.link.given_up()).unwrap_or(false)
    }

    fn begin_lease(&self) -> Outcome {
        outcome("begin_lease", || {
            let uploads = uploads_or_fail!(self.link.uploads());
            match self.wait(async move { uploads.lease().await }) {
                Ok(lease) => {
                    let mut held = self.lease.lock().unwrap_or_else(|p| p.into_inner());
                    if held.is_some() {
                        // Two operations at once on one connection: C++'s pool
                        // never does that. Give this one back and refuse it.
                        drop(lease);
                        return failed_msg("the daemon connection is already taken by another operation");
                    }
                    *held = Some(lease);
                    ok(Vec::new())
                }
                Err(e) => failed(&e),
            }
        })
    }

    fn end_lease(&self, in_step: bool) {
        let _ = guard("end_lease", || {
            let lease = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take();
            match lease {
                Some(lease) if !in_step => lease.abandon(),
                lease => drop(lease),
            }
        });
    }

    fn add_temp_root(&self, path: &str) -> Outcome {
        outcome("add_temp_root", || {
            let path = match self.link.store_dir.parse(path) {
                Ok(p) => p,
                Err(e) => return failed_msg(&e.to_string()),
            };
            match uploads_or_fail!(self.link.hold(Early::Root(path.clone()), 0)) {
                Some(uploads) => done(uploads.add_temp_root(&path)),
                None => ok(Vec::new()),
            }
        })
    }

    fn add_ca(&self, base_name: &str, method: &str, references: Vec<String>, data: &[u8]) -> Outcome {
        outcome("add_ca", || {
            if let Some(uploads) = self.link.uploads_now() {
                return done(uploads.add_computed_blocking(base_name, method, &references, data));
            }
            // Refused now what the uploads would refuse once connected.
            let hash = match StorePath::check_base_name(base_name) {
                Ok(hash) => hash,
                Err(e) => return failed(&Error::from(e)),
            };
            if let Some(e) = references.iter().find_map(|r| StorePath::check_base_name(r).err()) {
                return failed(&Error::from(e));
            }
            let early = Early::Add {
                hash,
                base_name: base_name.to_owned(),
                method: method.to_owned(),
                references: references.clone(),
                data: data.to_vec(),
            };
            match uploads_or_fail!(self.link.hold(early, data.len() as u64)) {
                Some(uploads) => done(uploads.add_computed_blocking(base_name, method, &references, data)),
                None => ok(Vec::new()),
            }
        })
    }

    fn flush(&self) -> Outcome {
        outcome("flush", || {
            let uploads = uploads_or_fail!(self.link.uploads());
            done(self.wait(async move { uploads.flush().await }))
        })
    }

    fn was_added(&self, base_name: &str) -> bool {
        guard("was_added", || StorePath::check_base_name(base_name).is_ok_and(|hash| self.link.was_added(&hash)))
            .unwrap_or(false)
    }

    fn held_nar(&self, base_name: &str, nar: &mut Vec<u8>) -> bool {
        guard("held_nar", || {
            let Ok(hash) = StorePath::check_base_name(base_name) else { return false };
            let Some(uploads) = self.link.uploads_quietly() else { return false };
            match uploads.held_nar(&hash) {
                Some(held) => {
                    *nar = held;
                    true
                }
                None => false,
            }
        })
        .unwrap_or(false)
    }

    fn held_path_info(&self, base_name: &str, out: &mut ffi::HeldPathInfo) -> bool {
        guard("held_path_info", || {
            let Ok(hash) = StorePath::check_base_name(base_name) else { return false };
            let Some(uploads) = self.link.uploads_quietly() else { return false };
            let Some(held) = uploads.held_info(&hash) else { return false };
            let info = &held.info;
            *out = ffi::HeldPathInfo {
                nar_hash: info.nar_hash.to_base16(),
                nar_size: info.nar_size,
                references: info.references.iter().map(StorePath::to_string).collect(),
                ca: info.ca.as_ref().map(|ca| ca.render()).unwrap_or_default(),
            };
            true
        })
        .unwrap_or(false)
    }

    fn sync_path(&self, base_name: &str) -> Outcome {
        outcome("sync_path", || {
            // Not a path this connection added: nothing to wait for; the caller's
            // read says what is wrong with it.
            let Ok(hash) = StorePath::check_base_name(base_name) else { return ok(Vec::new()) };
            let uploads = uploads_or_fail!(self.link.uploads());
            if !uploads.is_pending(&hash) && !uploads.client().has_unreported_failure() {
                return ok(Vec::new());
            }
            done(self.wait(async move {
                uploads.wait_for(&hash).await?;
                if uploads.client().has_unreported_failure() { uploads.client().flush().await } else { Ok(()) }
            }))
        })
    }

    fn query_path_info(&self, path: &str, token: usize) -> Outcome {
        outcome("query_path_info", || {
            let client = uploads_or_fail!(self.link.uploads()).client().clone();
            let path = match client.store_dir().parse(path) {
                Ok(p) => p,
                Err(e) => return failed_msg(&e.to_string()),
            };
            let ctx = Ctx { version: client.version(), store_dir: client.store_dir().clone() };
            let reply = move |r: Result<Option<UnkeyedValidPathInfo>, Error>| {
                let outcome = match r {
                    Ok(info) => {
                        let mut data = Vec::new();
                        let mut e = Encoder::new(&mut data, &ctx);
                        match info {
                            Some(info) => e.u64(1).put(&info),
                            None => e.u64(0),
                        };
                        ok(data)
                    }
                    Err(e) => failed(&e),
                };
                complete(move || ffi::query_path_info_done(token, outcome));
            };
            // Once sent, the handler is called whatever happens, so the caller always
            // hears back; a request that cannot be sent is told to the caller now.
            match client.reserve_blocking() {
                Ok(room) => {
                    client.query_path_info(&path).send_then_in(room, reply);
                    ok(Vec::new())
                }
                Err(e) => failed(&e),
            }
        })
    }

    /// Runs `fut` on the runtime and waits for it; a lost request is an error.
    fn wait<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, Error>> + Send + 'static,
    ) -> Result<T, Error> {
        wait(self.runtime, fut).map_err(Error::Internal)?
    }

    fn stats_json(&self) -> String {
        guard("stats", || {
            let held_while_connecting = self.link.held_while_connecting.load(Relaxed);
            let Some(uploads) = self.link.uploads_now() else {
                return serde_json::json!({ "heldWhileConnecting": held_while_connecting }).to_string();
            };
            let s = uploads.client().stats();
            let u = uploads.stats();
            let by_op: serde_json::Map<String, serde_json::Value> =
                s.requests.iter().map(|(op, n)| (op.to_string(), (*n).into())).collect();
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            serde_json::json!({
                "requests": s.total_requests(),
                "requestsWithoutWaiting": s.sent_without_waiting,
                "requestsByOp": by_op,
                "bytesSent": s.bytes_sent,
                "bytesReceived": s.bytes_received,
                "waits": s.waits,
                "waitTimeMs": ms(s.wait_time),
                "backpressureWaits": s.backpressure_waits,
                "leases": s.leases,
                "heldWhileConnecting": held_while_connecting,
                "uploads": {
                    "added": u.added,
                    "repeated": u.repeated,
                    "checked": u.checked,
                    "checkBatches": u.check_batches,
                    "skippedValid": u.valid,
                    "uploaded": u.uploaded,
                    "uploadBatches": u.upload_batches,
                    "failed": u.failed,
                    "drains": u.drains,
                    "drainTimeMs": ms(u.drain_time),
                    "pathWaits": u.path_waits,
                    "pathWaitTimeMs": ms(u.path_wait_time),
                    "memoryWaits": u.memory_waits,
                    "peakPendingBytes": u.peak_pending_bytes,
                },
            })
            .to_string()
        })
        .unwrap_or_else(|_| "{}".into())
    }
}

impl Drop for DaemonConnection {
    /// Additions nobody waited for must reach the daemon before the connection
    /// closes; C++ flushes first and reports a failure, so this only finishes the
    /// work of a store dropped without that (its failure goes to the log).
    fn drop(&mut self) {
        let _ = guard("close", || {
            drop(self.lease.lock().unwrap_or_else(|p| p.into_inner()).take());
            // C++ attaches a connection, or fails it, before it drops the client.
            let Some(uploads) = self.link.uploads_now() else { return };
            if let Ok(Err(e)) = wait(self.runtime, async move { uploads.flush().await }) {
                tracing::error!("daemon connection closed with a failed request: {e}");
            }
        });
    }
}
