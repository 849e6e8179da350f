//! The bridge through which Nix's C++ (libstore's `RustDaemonStore`) uses rust-store.
//!
//! The C++ side encodes each request's arguments and decodes each result with Nix's
//! own worker-protocol serialisers; this side owns the connection, pipelines the
//! requests on it, and hands back result bytes. Two operations never wait:
//!
//! - [`DaemonConnection::add_temp_root`]: sent without waiting, at most once per path
//!   and connection (temp roots last as long as the connection);
//! - [`DaemonConnection::add_ca`]: a content-addressed addition at a store path C++
//!   has computed; rust-store's [`Uploads`] roots the path, checks its validity in a
//!   batch and uploads it only if the daemon lacks it, all behind the caller.
//!
//! Data too large to hold (an addition beyond the cap on contents held, a NAR with its
//! info) streams instead: [`DaemonConnection::start_upload`] sends the request, C++
//! writes the data piece by piece, and the socket's pace holds it back.
//!
//! The sync points, where the daemon has seen every earlier addition: each call that
//! waits ([`DaemonConnection::call`]) resolves the additions first, so that they are
//! ahead of it on the connection; [`DaemonConnection::flush`], which C++ calls when
//! the store closes, also waits until the uploads are stored.
//!
//! Reading the store's files waits only for the path read: a path added on this
//! connection is known valid ([`DaemonConnection::was_added`]), and read, while the
//! daemon has not confirmed it, from the contents held for it
//! ([`DaemonConnection::held_nar`]); a caller that reads the files themselves
//! ([`DaemonConnection::sync_path`]) waits for that path's own addition only.
//!
//! Failures come back as an [`ffi::Outcome`] holding an error in the worker protocol's
//! own error encoding, which C++ rethrows with `readError`, as the C++ client does. A
//! failure of a request sent without waiting is returned by the next call that waits.
//! No panic crosses into C++: each entry point turns one into an error.
//!
//! Calls block the calling C++ thread; the connection's tasks run on a runtime this
//! crate owns.

use std::future::Future;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, Once, OnceLock, Weak};

use bytes::Bytes;
use rust_store::codec::{Ctx, Encoder, Version};
use rust_store::connection::{Body, Pending};
use rust_store::logger::{Activity, Field, Logger};
use rust_store::ops::Op;
use rust_store::types::TrustedFlag;
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

    extern "Rust" {
        type DaemonConnection;
        type Upload;

        /// Connects to the daemon's socket and runs the handshake. `store_dir` is
        /// the store directory paths are printed with; `max_pending_bytes` bounds the
        /// contents held for additions the daemon has not confirmed yet.
        fn connect_daemon(socket: &str, store_dir: &str, max_pending_bytes: u64) -> Result<Box<DaemonConnection>>;

        /// The negotiated protocol version, as the wire encodes it.
        fn protocol_version(self: &DaemonConnection) -> u64;
        /// The daemon's Nix version, or "" if the protocol does not tell.
        fn daemon_version(self: &DaemonConnection) -> String;
        /// Whether the daemon trusts us: 0 unknown, 1 trusted, 2 not trusted.
        fn trusted(self: &DaemonConnection) -> u8;

        /// Sends `op` with its encoded arguments (and, if `has_framed`, framed data)
        /// and waits for its result. Earlier additions are resolved first, so the
        /// daemon sees them before this request.
        fn call(
            self: &DaemonConnection,
            op: u64,
            subject: &str,
            args: &[u8],
            has_framed: bool,
            framed: &[u8],
        ) -> Outcome;

        /// Starts `op` with its encoded arguments and framed data that the caller
        /// then streams with `write_data`, for data too large to hold; `finish`
        /// ends the data and waits for the result. Earlier additions are resolved
        /// first. Dropping the upload unfinished ends the data where it is.
        fn start_upload(self: &DaemonConnection, op: u64, subject: &str, args: &[u8]) -> Box<Upload>;

        /// Sends the next piece of an upload's data; waits while the connection is
        /// behind. Fails if the connection has ended.
        fn write_data(self: &mut Upload, data: &[u8]) -> Outcome;

        /// Ends an upload's data and waits for the request's result.
        fn finish(self: &mut Upload) -> Outcome;

        /// Sends `op` with its encoded arguments without waiting for its result (for
        /// ops whose result is empty, such as SetOptions); a failure is returned by
        /// the next call that waits.
        fn send(self: &DaemonConnection, op: u64, subject: &str, args: &[u8]) -> Outcome;

        /// Roots a path for this connection without waiting; repeats are dropped.
        fn add_temp_root(self: &DaemonConnection, path: &str) -> Outcome;

        /// A content-addressed addition (text, flat or NAR hashing; no repair) at
        /// the store path whose base name (`<hash>-<name>`) the caller computed:
        /// `method` with its algorithm as in a content address (`text:sha256`),
        /// the references' base names separated by spaces, and the data. Does not
        /// wait: the path is rooted, checked, and only if missing uploaded, behind
        /// the caller; the rest is checked against the path then.
        fn add_ca(self: &DaemonConnection, base_name: &str, method: &str, references: &str, data: &[u8]) -> Outcome;

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

        /// The connection's counters, as a JSON object.
        fn stats_json(self: &DaemonConnection) -> String;
    }

    unsafe extern "C++" {
        include!("nix-store-bridge-logger.hh");

        fn log_line(line: &str);
        fn start_activity(id: u64, level: u64, activity_type: u64, text: &str, fields: &[u8], parent: u64);
        fn stop_activity(id: u64);
        fn activity_result(id: u64, result_type: u64, fields: &[u8]);
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

fn encode_fields(fields: &[Field]) -> Vec<u8> {
    encode(|e| {
        e.u64(fields.len() as u64);
        for f in fields {
            match f {
                Field::Int(i) => e.u64(0).u64(*i),
                Field::String(s) => e.u64(1).str(s),
            };
        }
    })
}

impl Logger for CxxLogger {
    fn log(&self, line: &str) {
        ffi::log_line(line);
    }

    fn start_activity(&self, a: Activity) {
        ffi::start_activity(a.id, a.level, a.activity_type, &a.text, &encode_fields(&a.fields), a.parent);
    }

    fn stop_activity(&self, id: u64) {
        ffi::stop_activity(id);
    }

    fn result(&self, id: u64, result_type: u64, fields: Vec<Field>) {
        ffi::activity_result(id, result_type, &encode_fields(&fields));
    }
}

/// One connection to the daemon, shared by every thread of the C++ store.
pub struct DaemonConnection {
    /// Also listed, weakly, in [`LIVE`].
    live: Arc<Live>,
    runtime: &'static Runtime,
}

/// A connection and the uploads on it.
struct Live {
    client: Client,
    uploads: Uploads,
}

impl Live {
    /// Resolves every add, then waits until every request sent has been answered;
    /// returns the first failure of work done without waiting.
    async fn flush(&self) -> Result<(), Error> {
        self.uploads.drain().await?;
        self.client.flush().await
    }
}

/// The connections that exist, for [`flush_at_exit`].
static LIVE: Mutex<Vec<Weak<Live>>> = Mutex::new(Vec::new());

/// Flushes every connection still open when the process exits, so that adds made
/// without waiting reach the daemon even if their store is never destroyed (a
/// program on the C API that exits holding it, say). A failure is reported as the
/// store's destructor reports one: on stderr, with exit status 1.
extern "C" fn flush_at_exit() {
    let live: Vec<_> = LIVE.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(Weak::upgrade).collect();
    let Ok(runtime) = runtime() else { return };
    for conn in live {
        let r = wait(runtime, async move { conn.flush().await });
        if let Ok(Err(e)) = r {
            eprintln!("error: {e}");
            // Exiting from an exit handler: only _exit is safe here.
            unsafe { libc::_exit(1) };
        }
    }
}

/// Registers [`flush_at_exit`] once, and `conn` in [`LIVE`].
fn register(conn: &Arc<Live>) {
    static AT_EXIT: Once = Once::new();
    AT_EXIT.call_once(|| {
        // If it cannot be registered, closing each store still flushes it.
        let _ = unsafe { libc::atexit(flush_at_exit) };
    });
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    live.retain(|w| w.strong_count() > 0);
    live.push(Arc::downgrade(conn));
}

fn connect_daemon(socket: &str, store_dir: &str, max_pending_bytes: u64) -> Result<Box<DaemonConnection>, String> {
    guard("connect", || {
        let runtime = runtime()?;
        let store_dir = StoreDir::new(store_dir).map_err(|e| e.to_string())?;
        // The C++ side sends SetOptions itself, with Nix's settings.
        let options = ConnectOptions {
            store_dir,
            logger: std::sync::Arc::new(CxxLogger),
            settings: None,
            ..ConnectOptions::default()
        };
        let upload_options = UploadOptions { max_pending_bytes, ..upload_tuning() };
        let socket = socket.to_owned();
        let (client, uploads) = wait(runtime, async move {
            let client = Client::connect(socket, options).await?;
            let uploads = Uploads::new(client.clone(), upload_options);
            Ok::<_, Error>((client, uploads))
        })?
        .map_err(|e| e.to_string())?;
        let live = Arc::new(Live { client, uploads });
        register(&live);
        Ok(Box::new(DaemonConnection { live, runtime }))
    })?
}

/// How many pieces of an upload's data (each up to what C++ buffers, 64 KiB) may
/// wait for the socket.
const UPLOAD_CHUNKS: usize = 4;

/// A request whose data C++ streams: see [`DaemonConnection::start_upload`].
pub struct Upload {
    runtime: &'static Runtime,
    /// Dropped to end the data.
    data: Option<tokio::sync::mpsc::Sender<Bytes>>,
    /// The request's reply, or why it could not be sent; taken by `finish`.
    reply: Option<Result<Pending<Vec<u8>>, Outcome>>,
}

impl Upload {
    fn write_data(&mut self, data: &[u8]) -> Outcome {
        outcome("write_data", || {
            if !matches!(self.reply, Some(Ok(_))) {
                return self.finish();
            }
            let Some(sender) = &self.data else { return failed_msg("the upload's data has already ended") };
            match sender.blocking_send(Bytes::copy_from_slice(data)) {
                Ok(()) => ok(Vec::new()),
                // The connection has ended and dropped the data: its reply says why.
                Err(_) => self.finish(),
            }
        })
    }

    fn finish(&mut self) -> Outcome {
        outcome("finish", || {
            self.data = None;
            match self.reply.take() {
                None => failed_msg("the upload has already finished"),
                Some(Err(outcome)) => outcome,
                Some(Ok(pending)) => match wait(self.runtime, pending) {
                    Ok(Ok(bytes)) => ok(bytes),
                    Ok(Err(e)) => failed(&e),
                    Err(message) => failed_msg(&message),
                },
            }
        })
    }
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

/// Parses an op code from C++.
fn op_of(code: u64) -> Result<Op, Outcome> {
    Op::from_code(code)
        .ok_or_else(|| failed_msg(&format!("the Rust daemon client does not implement worker op {code}")))
}

impl DaemonConnection {
    fn protocol_version(&self) -> u64 {
        self.live.client.version().to_wire()
    }

    fn daemon_version(&self) -> String {
        self.live.client.info().nix_version.clone().unwrap_or_default()
    }

    fn trusted(&self) -> u8 {
        match self.live.client.info().trusted {
            None => 0,
            Some(TrustedFlag::Trusted) => 1,
            Some(TrustedFlag::NotTrusted) => 2,
        }
    }

    fn call(&self, op: u64, subject: &str, args: &[u8], has_framed: bool, framed: &[u8]) -> Outcome {
        outcome("call", || {
            let op = match op_of(op) {
                Ok(op) => op,
                Err(o) => return o,
            };
            let subject = (!subject.is_empty()).then(|| subject.to_owned());
            let body = has_framed.then(|| Body::Bytes(framed.to_vec()));
            let (live, args) = (self.live.clone(), args.to_vec());
            match self.wait(async move {
                live.uploads.drain().await?;
                live.client.raw_call(op, subject, &args, body).wait().await
            }) {
                Ok(bytes) => ok(bytes),
                Err(e) => failed(&e),
            }
        })
    }

    fn start_upload(&self, op: u64, subject: &str, args: &[u8]) -> Box<Upload> {
        let (data, body) = Body::channel(UPLOAD_CHUNKS);
        let started = guard("start_upload", || -> Result<Pending<Vec<u8>>, Outcome> {
            let op = op_of(op)?;
            let subject = (!subject.is_empty()).then(|| subject.to_owned());
            let (live, args) = (self.live.clone(), args.to_vec());
            self.wait(async move {
                live.uploads.drain().await?;
                live.client.raw_call(op, subject, &args, Some(body)).start().await
            })
            .map_err(|e| failed(&e))
        });
        let reply = started.unwrap_or_else(|message| Err(failed_msg(&message)));
        Box::new(Upload { runtime: self.runtime, data: Some(data), reply: Some(reply) })
    }

    fn send(&self, op: u64, subject: &str, args: &[u8]) -> Outcome {
        outcome("send", || {
            let op = match op_of(op) {
                Ok(op) => op,
                Err(o) => return o,
            };
            let subject = (!subject.is_empty()).then(|| subject.to_owned());
            match self.live.client.raw_call(op, subject, args, None).send_blocking() {
                Ok(()) => ok(Vec::new()),
                Err(e) => failed(&e),
            }
        })
    }

    fn add_temp_root(&self, path: &str) -> Outcome {
        outcome("add_temp_root", || {
            let path = match self.live.client.store_dir().parse(path) {
                Ok(p) => p,
                Err(e) => return failed_msg(&e.to_string()),
            };
            match self.live.uploads.add_temp_root(&path) {
                Ok(()) => ok(Vec::new()),
                Err(e) => failed(&e),
            }
        })
    }

    fn add_ca(&self, base_name: &str, method: &str, references: &str, data: &[u8]) -> Outcome {
        outcome("add_ca", || match self.live.uploads.add_computed_blocking(base_name, method, references, data) {
            Ok(()) => ok(Vec::new()),
            Err(e) => failed(&e),
        })
    }

    fn flush(&self) -> Outcome {
        outcome("flush", || {
            let live = self.live.clone();
            match self.wait(async move { live.flush().await }) {
                Ok(()) => ok(Vec::new()),
                Err(e) => failed(&e),
            }
        })
    }

    fn was_added(&self, base_name: &str) -> bool {
        guard("was_added", || {
            StorePath::check_base_name(base_name).is_ok_and(|hash| self.live.uploads.was_added(&hash))
        })
        .unwrap_or(false)
    }

    fn held_nar(&self, base_name: &str, nar: &mut Vec<u8>) -> bool {
        guard("held_nar", || {
            let Ok(hash) = StorePath::check_base_name(base_name) else { return false };
            match self.live.uploads.held_nar(&hash) {
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
            let Some(held) = self.live.uploads.held_info(&hash) else { return false };
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
            let live = &self.live;
            if !live.uploads.is_pending(&hash) && !live.client.has_unreported_failure() {
                return ok(Vec::new());
            }
            let live = live.clone();
            match self.wait(async move {
                live.uploads.wait_for(&hash).await?;
                if live.client.has_unreported_failure() { live.client.flush().await } else { Ok(()) }
            }) {
                Ok(()) => ok(Vec::new()),
                Err(e) => failed(&e),
            }
        })
    }

    /// Runs `fut` on the runtime and waits for it; a lost request is an error.
    fn wait<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, Error>> + Send + 'static,
    ) -> Result<T, Error> {
        wait(self.runtime, fut).map_err(Error::InvalidRequest)?
    }

    fn stats_json(&self) -> String {
        guard("stats", || {
            let s = self.live.client.stats();
            let u = self.live.uploads.stats();
            let by_op: Vec<String> = s.requests.iter().map(|(op, n)| format!("\"{op}\":{n}")).collect();
            let uploads = format!(
                "{{\"added\":{},\"repeated\":{},\"checked\":{},\"checkBatches\":{},\"skippedValid\":{},\
                 \"uploaded\":{},\"uploadBatches\":{},\"failed\":{},\"drains\":{},\"drainTimeMs\":{:.3},\
                 \"pathWaits\":{},\"pathWaitTimeMs\":{:.3},\"memoryWaits\":{},\"peakPendingBytes\":{}}}",
                u.added,
                u.repeated,
                u.checked,
                u.check_batches,
                u.valid,
                u.uploaded,
                u.upload_batches,
                u.failed,
                u.drains,
                u.drain_time.as_secs_f64() * 1e3,
                u.path_waits,
                u.path_wait_time.as_secs_f64() * 1e3,
                u.memory_waits,
                u.peak_pending_bytes
            );
            format!(
                "{{\"requests\":{},\"requestsWithoutWaiting\":{},\"requestsByOp\":{{{}}},\"bytesSent\":{},\
                 \"bytesReceived\":{},\"waits\":{},\"waitTimeMs\":{:.3},\"backpressureWaits\":{},\"uploads\":{}}}",
                s.total_requests(),
                s.sent_without_waiting,
                by_op.join(","),
                s.bytes_sent,
                s.bytes_received,
                s.waits,
                s.wait_time.as_secs_f64() * 1e3,
                s.backpressure_waits,
                uploads
            )
        })
        .unwrap_or_else(|_| "{}".into())
    }
}
