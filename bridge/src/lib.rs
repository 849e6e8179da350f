//! The bridge through which Nix's C++ (libstore's `RustDaemonStore`) uses rust-store.
//!
//! The C++ side encodes each request's arguments and decodes each result with Nix's
//! own worker-protocol serialisers; this side owns the connection, pipelines the
//! requests on it, and hands back result bytes. Two operations never wait:
//!
//! - [`DaemonConnection::add_temp_root`]: sent without waiting, at most once per path
//!   and connection (temp roots last as long as the connection);
//! - [`DaemonConnection::add_ca`]: a content-addressed addition whose store path is
//!   computed here, so the caller gets the path at once while the upload goes out
//!   behind the requests before it. The daemon's answer is still checked.
//!
//! Failures come back as an [`ffi::Outcome`] holding an error in the worker protocol's
//! own error encoding, which C++ rethrows with `readError`, as the C++ client does. A
//! failure of a request sent without waiting is returned by the next call that waits.
//! No panic crosses into C++: each entry point turns one into an error.
//!
//! Calls block the calling C++ thread; the connection's tasks run on a runtime this
//! crate owns.

use std::collections::{BTreeSet, HashSet};
use std::future::Future;

use futures::FutureExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rust_store::codec::{Ctx, Decoder, Encoder, Version};
use rust_store::connection::Body;
use rust_store::hash::{Hash, HashAlgo};
use rust_store::logger::{Activity, Field, Logger};
use rust_store::ops::Op;
use rust_store::store_path::{ContentAddressMethod, StorePath};
use rust_store::types::TrustedFlag;
use rust_store::{Client, ConnectOptions, Error, StoreDir};
use tokio::runtime::Runtime;

#[cxx::bridge(namespace = "nix::rust_store")]
mod ffi {
    /// A call's outcome: its result bytes, or an error in the protocol's encoding.
    struct Outcome {
        ok: bool,
        data: Vec<u8>,
    }

    extern "Rust" {
        type DaemonConnection;

        /// Connects to the daemon's socket and runs the handshake. `store_dir` is
        /// the store directory paths are printed with.
        fn connect_daemon(socket: &str, store_dir: &str) -> Result<Box<DaemonConnection>>;

        /// The negotiated protocol version, as the wire encodes it.
        fn protocol_version(self: &DaemonConnection) -> u64;
        /// The daemon's Nix version, or "" if the protocol does not tell.
        fn daemon_version(self: &DaemonConnection) -> String;
        /// Whether the daemon trusts us: 0 unknown, 1 trusted, 2 not trusted.
        fn trusted(self: &DaemonConnection) -> u8;

        /// Sends `op` with its encoded arguments (and, if `has_framed`, framed data)
        /// and waits for its result.
        fn call(
            self: &DaemonConnection,
            op: u64,
            subject: &str,
            args: &[u8],
            has_framed: bool,
            framed: &[u8],
        ) -> Outcome;

        /// Roots a path for this connection without waiting; repeats are dropped.
        fn add_temp_root(self: &DaemonConnection, path: &str) -> Outcome;

        /// AddToStore for content-addressed data: `args` are the op's encoded
        /// arguments, `data` its upload. Returns the printed store path. Computes the
        /// path and does not wait where it can (no repair, text or flat or NAR
        /// hashing); otherwise waits for the daemon's answer.
        fn add_ca(self: &DaemonConnection, args: &[u8], data: &[u8]) -> Outcome;

        /// Waits until every request sent has been answered; returns the first
        /// failure of a request sent without waiting, if any.
        fn flush(self: &DaemonConnection) -> Outcome;

        /// Like flush, but only if a request sent without waiting is still
        /// unanswered; otherwise returns at once. For callers about to read the
        /// store's files.
        fn sync(self: &DaemonConnection) -> Outcome;

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
fn runtime() -> Result<&'static Runtime, String> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
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
    client: Client,
    runtime: &'static Runtime,
    /// Paths rooted on this connection so far.
    temp_roots: Mutex<HashSet<StorePath>>,
    /// Requests sent without waiting whose reply has not been read yet.
    unanswered: Arc<AtomicU64>,
}

/// Counts a request sent without waiting until its reply has been read (or the
/// request is dropped with the connection).
struct Unanswered(Arc<AtomicU64>);

impl Unanswered {
    fn new(count: &Arc<AtomicU64>) -> Unanswered {
        count.fetch_add(1, Ordering::SeqCst);
        Unanswered(count.clone())
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn connect_daemon(socket: &str, store_dir: &str) -> Result<Box<DaemonConnection>, String> {
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
        let socket = socket.to_owned();
        let client =
            wait(runtime, async move { Client::connect(socket, options).await })?.map_err(|e| e.to_string())?;
        Ok(Box::new(DaemonConnection {
            client,
            runtime,
            temp_roots: Mutex::new(HashSet::new()),
            unanswered: Arc::new(AtomicU64::new(0)),
        }))
    })?
}

/// What AddToStore's arguments say, as far as computing the path goes.
struct CaArgs {
    name: String,
    method: ContentAddressMethod,
    algo: HashAlgo,
    references: BTreeSet<StorePath>,
    repair: bool,
}

impl DaemonConnection {
    fn protocol_version(&self) -> u64 {
        self.client.version().to_wire()
    }

    fn daemon_version(&self) -> String {
        self.client.info().nix_version.clone().unwrap_or_default()
    }

    fn trusted(&self) -> u8 {
        match self.client.info().trusted {
            None => 0,
            Some(TrustedFlag::Trusted) => 1,
            Some(TrustedFlag::NotTrusted) => 2,
        }
    }

    fn call(&self, op: u64, subject: &str, args: &[u8], has_framed: bool, framed: &[u8]) -> Outcome {
        outcome("call", || {
            let Some(op) = Op::from_code(op) else {
                return failed_msg(&format!("the Rust daemon client does not implement worker op {op}"));
            };
            let subject = (!subject.is_empty()).then(|| subject.to_owned());
            let body = has_framed.then(|| Body::Bytes(framed.to_vec()));
            let (client, args) = (self.client.clone(), args.to_vec());
            match self.wait(async move { client.raw_call(op, subject, &args, body).wait().await }) {
                Ok(bytes) => ok(bytes),
                Err(e) => failed(&e),
            }
        })
    }

    fn add_temp_root(&self, path: &str) -> Outcome {
        outcome("add_temp_root", || {
            let path = match self.client.store_dir().parse(path) {
                Ok(p) => p,
                Err(e) => return failed_msg(&e.to_string()),
            };
            let mut roots = self.temp_roots.lock().unwrap_or_else(|p| p.into_inner());
            if roots.contains(&path) {
                return ok(Vec::new());
            }
            let unanswered = Unanswered::new(&self.unanswered);
            let answered = move |_: &()| {
                drop(unanswered);
                Ok(())
            };
            match self.client.add_temp_root(&path).check(answered).send_blocking() {
                Ok(()) => {
                    roots.insert(path);
                    ok(Vec::new())
                }
                Err(e) => failed(&e),
            }
        })
    }

    /// Decodes AddToStore's arguments: name, method with algorithm, references,
    /// repair.
    fn parse_ca_args(&self, args: &[u8]) -> Result<CaArgs, Error> {
        let ctx = Ctx { version: self.client.version(), store_dir: self.client.store_dir().clone() };
        let mut d = Decoder::from_bytes(args.to_vec(), ctx);
        // Decoding bytes in memory never waits: poll it once, on this thread.
        let parse = async move {
            let name = d.string().await?;
            let method = d.string().await?;
            let (method, algo) = ContentAddressMethod::parse_with_algo(&method)
                .map_err(|e| Error::InvalidRequest(format!("AddToStore '{name}': {e}")))?;
            let references = d.get().await?;
            let repair = d.bool().await?;
            Ok(CaArgs { name, method, algo, references, repair })
        };
        parse.now_or_never().unwrap_or_else(|| Err(Error::InvalidRequest("AddToStore arguments are incomplete".into())))
    }

    /// The path the daemon will store `data` at, if it can be known beforehand.
    fn predict_path(&self, a: &CaArgs, data: &[u8]) -> Option<StorePath> {
        let store_dir = self.client.store_dir();
        match a.method {
            ContentAddressMethod::Text if a.algo == HashAlgo::Sha256 => {
                store_dir.compute_text_path(&a.name, data, &a.references).ok()
            }
            ContentAddressMethod::Flat | ContentAddressMethod::Nar => {
                let hash = Hash::digest(a.algo, data);
                store_dir.make_fixed_output_path(&a.name, a.method, &hash, &a.references, false).ok()
            }
            _ => None,
        }
    }

    fn add_ca(&self, args: &[u8], data: &[u8]) -> Outcome {
        outcome("add_ca", || {
            let a = match self.parse_ca_args(args) {
                Ok(a) => a,
                Err(e) => return failed(&e),
            };
            let body = Body::Bytes(data.to_vec());
            let predicted = if a.repair { None } else { self.predict_path(&a, data) };
            let client = self.client.clone();
            let Some(path) = predicted else {
                // Wait for the daemon to say where it stored the data.
                let r = self.wait(async move {
                    client.add_to_store(&a.name, a.method, a.algo, &a.references, a.repair, body).wait().await
                });
                return match r {
                    Ok(info) => ok(self.client.store_dir().print(&info.path).into_bytes()),
                    Err(e) => failed(&e),
                };
            };
            // The daemon roots the path itself when it handles the request.
            self.temp_roots.lock().unwrap_or_else(|p| p.into_inner()).insert(path.clone());
            let printed = self.client.store_dir().print(&path);
            let expected = printed.clone();
            let store_dir = self.client.store_dir().clone();
            let unanswered = Unanswered::new(&self.unanswered);
            let check = move |info: &rust_store::types::ValidPathInfo| {
                drop(unanswered);
                if info.path == path {
                    Ok(())
                } else {
                    Err(Error::Unexpected(format!(
                        "the daemon added '{}' as '{}', not at the path computed for it",
                        expected,
                        store_dir.print(&info.path)
                    )))
                }
            };
            match client
                .add_to_store(&a.name, a.method, a.algo, &a.references, false, body)
                .check(check)
                .send_blocking()
            {
                Ok(()) => ok(printed.into_bytes()),
                Err(e) => failed(&e),
            }
        })
    }

    fn flush(&self) -> Outcome {
        outcome("flush", || {
            let client = self.client.clone();
            match self.wait(async move { client.flush().await }) {
                Ok(()) => ok(Vec::new()),
                Err(e) => failed(&e),
            }
        })
    }

    fn sync(&self) -> Outcome {
        if self.unanswered.load(Ordering::SeqCst) == 0 && !self.client.has_unreported_failure() {
            return ok(Vec::new());
        }
        self.flush()
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
            let s = self.client.stats();
            let by_op: Vec<String> = s.requests.iter().map(|(op, n)| format!("\"{op}\":{n}")).collect();
            format!(
                "{{\"requests\":{},\"requestsWithoutWaiting\":{},\"requestsByOp\":{{{}}},\"bytesSent\":{},\
                 \"bytesReceived\":{},\"waits\":{},\"waitTimeMs\":{:.3},\"backpressureWaits\":{}}}",
                s.total_requests(),
                s.sent_without_waiting,
                by_op.join(","),
                s.bytes_sent,
                s.bytes_received,
                s.waits,
                s.wait_time.as_secs_f64() * 1e3,
                s.backpressure_waits
            )
        })
        .unwrap_or_else(|_| "{}".into())
    }
}
