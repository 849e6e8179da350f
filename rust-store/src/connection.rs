//! The pipelining engine.
//!
//! A [`Client`] is a cheap, cloneable handle. Each request it makes is encoded at
//! once and sent over a bounded channel to the connection's **writer** task, which
//! owns the socket's write half. The writer first queues the request's reply slot for
//! the **reader** task, then writes the request; it coalesces whatever else is waiting
//! into the same write and flushes when the channel runs dry. The reader owns the read
//! half and takes reply slots in the order they were queued: the daemon answers in
//! request order, so the n-th reply belongs to the n-th slot. It reads the reply's log
//! messages (to the [`Logger`]), then either the result, which it decodes and hands to
//! the slot, or the daemon's error, which fails only that request.
//!
//! Because reading and writing are separate tasks, neither a large upload nor a large
//! reply can deadlock the pair: the daemon never stalls writing for want of a reader.
//!
//! Callers choose per request whether to wait ([`Call::wait`], or `.await`) or not
//! ([`Call::send`]). A request sent without waiting still has its reply read and
//! checked; if it failed, its error is kept and returned by the next call that waits,
//! or by [`Client::flush`].
//!
//! **Leases.** A caller that speaks the protocol itself on the same socket (Nix's
//! own C++ op bodies, through the bridge) asks for a [`Lease`]: a message in the same
//! queue, so it takes its turn behind the requests before it. The writer flushes
//! them and stops; the reader reads their replies, then hands the socket over,
//! blocking, and waits. Until the lease is given back, the socket is the holder's
//! alone: requests made meanwhile wait in the queue. The daemon sends nothing it was
//! not asked for, so no reply of ours can be read by the holder nor one of the
//! holder's by us.
//!
//! When the connection breaks (EOF, an I/O error, a malformed reply, or the daemon
//! closing after a connection-fatal error), the cause is recorded once, both tasks
//! stop, and every pending and later request fails with [`Error::Disconnected`]
//! carrying that cause.

use std::future::{Future, IntoFuture};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{Instrument, debug, debug_span, trace};

use crate::codec::{Ctx, Decode, Decoder, Encoder};
use crate::error::{DaemonError, Error, Result};
use crate::handshake::{DaemonInfo, handshake};
use crate::logger::{Logger, TracingLogger};
use crate::protocol::{Op, Version};
use crate::stats::{Counted, Stats, StatsSnapshot};
use crate::stderr::{DaemonMessage, Outcome, read_envelope};
use crate::store_path::StoreDir;
use crate::transport::{Fds, Transport};
use crate::types::ClientSettings;

/// Size of the frames an upload is cut into.
const FRAME_SIZE: usize = 64 * 1024;
/// How long a failed write waits for the reader to find out why the connection ended.
const WRITE_ERROR_GRACE: Duration = Duration::from_secs(2);
/// Socket buffer sizes on our side.
const BUFFER_SIZE: usize = 64 * 1024;

/// How to open a connection.
#[derive(Clone)]
pub struct ConnectOptions {
    /// The daemon's store directory; store paths travel printed in full.
    pub store_dir: StoreDir,
    /// Requests that may be sent and not yet answered. When reached, callers wait
    /// (backpressure) until replies come back.
    pub max_in_flight: usize,
    /// Receives the daemon's log messages.
    pub logger: Arc<dyn Logger>,
    /// Settings sent with SetOptions right after the handshake; `None` sends none.
    pub settings: Option<ClientSettings>,
    /// The newest protocol version to offer (lower it to test older behaviour).
    pub max_version: Version,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            store_dir: StoreDir::default(),
            max_in_flight: 4096,
            logger: Arc::new(TracingLogger),
            settings: Some(ClientSettings::default()),
            max_version: Version::LATEST,
        }
    }
}

/// A handle to one daemon connection. Clones share the connection; it closes when
/// the last clone is dropped, after every request sent has been answered.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    requests: mpsc::Sender<Message>,
    ctx: Ctx,
    info: DaemonInfo,
    shared: Arc<Shared>,
}

/// State the handles and both tasks share.
struct Shared {
    stats: Arc<Stats>,
    /// The first failure among requests sent without waiting, and how many followed.
    deferred: Mutex<Option<(Error, usize)>>,
    /// Why the connection ended, once it has.
    cause: OnceLock<Arc<Error>>,
    /// Tells both tasks to stop once `cause` is set.
    dead: watch::Sender<bool>,
    /// The descriptors, for [`Lease`]s.
    fds: Fds,
    /// What is at the other end, for messages.
    peer: Arc<str>,
}

impl Shared {
    /// Records why the connection ended (the first cause wins) and stops both tasks.
    fn kill(&self, cause: Error) -> Arc<Error> {
        let cause = self.cause.get_or_init(|| Arc::new(cause)).clone();
        self.dead.send_replace(true);
        cause
    }

    fn disconnected(&self) -> Error {
        match self.cause.get() {
            Some(c) => Error::Disconnected { peer: self.peer.clone(), cause: c.clone() },
            None => Error::Disconnected { peer: self.peer.clone(), cause: Arc::new(Error::Eof) },
        }
    }

    fn defer(&self, e: Error) {
        let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *d {
            None => *d = Some((e, 0)),
            Some((_, more)) => *more += 1,
        }
    }

    fn take_deferred(&self) -> Option<Error> {
        let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        d.take().map(|(first, more)| Error::Deferred { first: Box::new(first), more })
    }
}

/// An encoded request on its way to the writer.
pub(crate) struct Request {
    pub op: Op,
    /// What the request concerns, for messages ("/nix/store/…-foo.drv").
    pub subject: Option<String>,
    /// The op code and its arguments.
    pub header: Vec<u8>,
    /// Framed data that follows the header.
    pub body: Option<Body>,
}

/// Data uploaded in frames after a request's header.
pub enum Body {
    Bytes(Vec<u8>),
    Reader(Box<dyn AsyncRead + Send + Unpin>),
}

impl Body {
    /// A body the caller writes as it goes, for data too large to hold: each chunk
    /// sent on the returned sender goes out as it is read, and dropping the sender
    /// ends the data. At most `chunks` chunks wait in between, so the sender waits
    /// for the socket. If the connection ends, sending fails.
    pub fn channel(chunks: usize) -> (mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = mpsc::channel(chunks.max(1));
        (tx, Body::Reader(Box::new(ChannelReader { rx, chunk: Bytes::new() })))
    }
}

/// The reading end of [`Body::channel`].
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    /// What is left of the chunk being read.
    chunk: Bytes,
}

impl AsyncRead for ChannelReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.chunk.is_empty() {
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(chunk) => self.chunk = chunk,
                // The sender is gone: the data ends here.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.chunk.len().min(buf.remaining());
        buf.put_slice(&self.chunk.split_to(n));
        Poll::Ready(Ok(()))
    }
}

enum Message {
    Request {
        request: Request,
        reply: Box<dyn Reply>,
    },
    /// Answered by the reader once every earlier reply has been read.
    Barrier(oneshot::Sender<Result<()>>),
    /// Hands the socket over once every earlier reply has been read.
    Lease(oneshot::Sender<Result<Lease>>),
}

enum Slot {
    Reply {
        op: Op,
        subject: Option<String>,
        reply: Box<dyn Reply>,
    },
    Barrier(oneshot::Sender<Result<()>>),
    /// `resume` tells the writer that the socket is back.
    Lease {
        grant: oneshot::Sender<Result<Lease>>,
        resume: oneshot::Sender<()>,
    },
}

/// The connection's socket (or pipes), handed to a caller that speaks the protocol
/// on it itself, between this client's requests: see [`Client::lease`]. The
/// descriptors are in blocking mode while leased. Dropping the lease gives them back;
/// [`Lease::abandon`] gives them back out of step.
pub struct Lease {
    fds: Fds,
    release: Option<oneshot::Sender<bool>>,
}

impl Lease {
    /// The descriptors to read replies from and write requests to: one socket, or
    /// two pipes. Use them only while the lease lives, and leave them between two
    /// messages: every request answered, nothing unread.
    pub fn fds(&self) -> Fds {
        self.fds
    }

    /// Gives the socket back having left it in the middle of a message (an
    /// operation cut short): the connection cannot go on, and ends.
    pub fn abandon(mut self) {
        if let Some(tx) = self.release.take() {
            let _ = tx.send(false);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(tx) = self.release.take() {
            let _ = tx.send(true);
        }
    }
}

/// Switches the descriptors between blocking (leased) and non-blocking (ours) mode.
fn set_blocking(fds: Fds, blocking: bool) -> std::io::Result<()> {
    set_fd_blocking(fds.read, blocking)?;
    if fds.write != fds.read {
        set_fd_blocking(fds.write, blocking)?;
    }
    Ok(())
}

fn set_fd_blocking(fd: std::os::fd::RawFd, blocking: bool) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor this connection owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags == -1 {
        return Err(std::io::Error::last_os_error());
    }
    let flags = if blocking { flags & !libc::O_NONBLOCK } else { flags | libc::O_NONBLOCK };
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Decodes a reply's result.
pub(crate) type DecodeFn<T> = for<'a> fn(&'a mut Decoder) -> BoxFuture<'a, Result<T>>;

/// Decodes a result of type `T` by its [`Decode`] impl.
pub(crate) fn decode_as<T: Decode>(d: &mut Decoder) -> BoxFuture<'_, Result<T>> {
    Box::pin(T::decode(d))
}

/// A reply slot, with its result's type erased so that one queue holds them all.
trait Reply: Send {
    /// Reads the result that follows STDERR_LAST and keeps it.
    fn read<'a>(&'a mut self, d: &'a mut Decoder) -> BoxFuture<'a, Result<()>>;
    /// Delivers the kept result, or the request's error.
    fn complete(self: Box<Self>, outcome: Result<()>);
}

struct Typed<T> {
    decode: DecodeFn<T>,
    check: Option<Check<T>>,
    value: Option<T>,
    to: Delivery<T>,
}

/// A test a result must pass; failing it fails the request.
type Check<T> = Box<dyn FnOnce(&T) -> Result<()> + Send>;

enum Delivery<T> {
    /// A caller is waiting for the result.
    Caller(oneshot::Sender<Result<T>>),
    /// Nobody waits: a failure is kept for the next call that does.
    Deferred(Arc<Shared>),
    /// Nobody waits: a handler takes the result, failure included.
    Handler(OnReply<T>),
}

/// A handler of a request's result. It is called exactly once: with the result, or
/// with the connection's failure if the request is dropped unanswered.
struct OnReply<T> {
    handler: Option<Box<dyn FnOnce(Result<T>) + Send>>,
    shared: Arc<Shared>,
}

impl<T> OnReply<T> {
    fn call(mut self, result: Result<T>) {
        if let Some(h) = self.handler.take() {
            h(result);
        }
    }
}

impl<T> Drop for OnReply<T> {
    fn drop(&mut self) {
        if let Some(h) = self.handler.take() {
            h(Err(self.shared.disconnected()));
        }
    }
}

impl<T: Send + 'static> Reply for Typed<T> {
    fn read<'a>(&'a mut self, d: &'a mut Decoder) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.value = Some((self.decode)(d).await?);
            Ok(())
        })
    }

    fn complete(self: Box<Self>, outcome: Result<()>) {
        let Typed { value, to, check, .. } = *self;
        let result = outcome
            .and_then(|()| value.ok_or_else(|| Error::Protocol("a reply completed without its value".into())))
            .and_then(|v| match check {
                Some(check) => check(&v).map(|()| v),
                None => Ok(v),
            });
        match to {
            Delivery::Caller(tx) => {
                let _ = tx.send(result);
            }
            Delivery::Deferred(shared) => {
                if let Err(e) = result {
                    // A broken connection is reported to every later call anyway.
                    if !matches!(e, Error::Disconnected { .. }) {
                        shared.defer(e);
                    }
                }
            }
            Delivery::Handler(h) => h.call(result),
        }
    }
}

impl Client {
    /// Connects to the daemon's Unix socket and runs the handshake.
    pub async fn connect(socket: impl AsRef<Path>, options: ConnectOptions) -> Result<Client> {
        let socket = socket.as_ref();
        let stream = connect_unix(socket).await.map_err(|source| Error::Connect { path: socket.to_owned(), source })?;
        Client::from_stream(stream, options).await.map_err(|e| match e {
            Error::Eof => Error::Connect {
                path: socket.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the daemon closed the connection during the handshake (is this user in allowed-users?)",
                ),
            },
            e => e,
        })
    }

    /// Runs the handshake on an open stream and starts the connection's tasks on the
    /// current tokio runtime.
    pub async fn from_stream(stream: UnixStream, options: ConnectOptions) -> Result<Client> {
        Client::start(Transport::unix(stream), None, options).await
    }

    /// Runs the handshake over a transport (a socket, or a process's pipes: see
    /// [`Transport`]) and starts the connection's tasks on the current tokio runtime.
    pub async fn over(transport: Transport, options: ConnectOptions) -> Result<Client> {
        let peer = transport.peer.clone();
        Client::start(transport, None, options).await.map_err(|e| match e {
            // A process that exits before it has greeted us: ssh refused, or no
            // daemon at the other end.
            Error::Eof | Error::Io(_) => Error::Handshake { peer, cause: Box::new(e) },
            e => e,
        })
    }

    /// Takes over a connection whose handshake someone else has done (Nix's C++,
    /// which then leases the descriptors for its own requests): `info` is what that
    /// handshake learnt. Starts the connection's tasks on the current tokio runtime
    /// and sends `options.settings`, if any.
    pub async fn adopt(transport: Transport, info: DaemonInfo, options: ConnectOptions) -> Result<Client> {
        Client::start(transport, Some(info), options).await
    }

    async fn start(transport: Transport, info: Option<DaemonInfo>, options: ConnectOptions) -> Result<Client> {
        let stats = Arc::new(Stats::default());
        let Transport { read, write, fds, peer, child } = transport;
        let source = BufReader::with_capacity(BUFFER_SIZE, Counted::new(read, stats.clone()));
        let mut sink: Sink = BufWriter::with_capacity(BUFFER_SIZE, Counted::new(write, stats.clone()));
        let ctx = Ctx { version: options.max_version, store_dir: options.store_dir.clone() };
        let mut decoder = Decoder::new(Box::new(source), ctx);

        let info = match info {
            Some(info) => {
                decoder.set_version(info.version);
                info
            }
            None => handshake(&mut decoder, &mut sink, options.max_version, &*options.logger).await?,
        };
        debug!(version = %info.version, nix = ?info.nix_version, trusted = ?info.trusted, "connected to the Nix daemon");

        let (dead, dead_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            stats,
            deferred: Mutex::new(None),
            cause: OnceLock::new(),
            dead,
            fds,
            peer: peer.into(),
        });
        let in_flight = options.max_in_flight.max(1);
        let (requests, requests_rx) = mpsc::channel(in_flight);
        let (slots, slots_rx) = mpsc::channel(in_flight);

        let span = debug_span!("nix_daemon_connection", version = %info.version);
        tokio::spawn(writer(requests_rx, sink, slots, shared.clone(), dead_rx.clone()).instrument(span.clone()));
        tokio::spawn(
            reader(decoder, slots_rx, options.logger.clone(), shared.clone(), dead_rx, child).instrument(span),
        );

        let client = Client {
            inner: Arc::new(Inner {
                requests,
                ctx: Ctx { version: info.version, store_dir: options.store_dir },
                info,
                shared,
            }),
        };
        if let Some(settings) = &options.settings {
            client.set_options(settings).await?;
        }
        Ok(client)
    }

    /// What the handshake learnt about the daemon.
    pub fn info(&self) -> &DaemonInfo {
        &self.inner.info
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> Version {
        self.inner.ctx.version
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.inner.ctx.store_dir
    }

    /// The connection's counters so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.shared.stats.snapshot()
    }

    /// Whether a request sent without waiting has failed and not been reported yet
    /// (the next call that waits, or flush, will report it).
    pub fn has_unreported_failure(&self) -> bool {
        self.inner.shared.deferred.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Where work done on this connection without waiting reports its failures: the
    /// next call that waits (or [`Client::flush`]) returns them, as if a request sent
    /// without waiting had failed. Holding it does not keep the connection open.
    pub fn failure_sink(&self) -> FailureSink {
        FailureSink(self.inner.shared.clone())
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.cause.get().is_some()
    }

    /// Waits until every request sent so far has been answered, then returns the
    /// first failure among those sent without waiting, if any. Costs no round trip.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.submit(Message::Barrier(tx)).await?;
        Pending { rx, shared: self.inner.shared.clone(), blocked_since: None }.await
    }

    /// Takes the socket for a caller that speaks the protocol on it itself, once
    /// every request sent before has been answered (see the module documentation).
    /// Requests made while the lease lives wait for it. If a request sent without
    /// waiting has failed, returns that failure instead, and the socket stays ours.
    pub async fn lease(&self) -> Result<Lease> {
        let shared = &self.inner.shared;
        let (tx, rx) = oneshot::channel();
        self.submit(Message::Lease(tx)).await?;
        let lease = Pending { rx, shared: shared.clone(), blocked_since: None }.await?;
        shared.stats.leased();
        Ok(lease)
    }

    /// Starts a request: `args` writes its arguments after the op code.
    pub(crate) fn call<T: Decode>(
        &self,
        op: Op,
        subject: Option<String>,
        args: impl FnOnce(&mut Encoder<'_>),
    ) -> Call<'_, T> {
        self.call_with(op, subject, decode_as::<T>, args)
    }

    /// Like [`Client::call`], with a decoder of its own for the result.
    pub(crate) fn call_with<T: Send + 'static>(
        &self,
        op: Op,
        subject: Option<String>,
        decode: DecodeFn<T>,
        args: impl FnOnce(&mut Encoder<'_>),
    ) -> Call<'_, T> {
        let mut header = Vec::with_capacity(64);
        let mut e = Encoder::new(&mut header, &self.inner.ctx);
        e.u64(op as u64);
        args(&mut e);
        Call { client: self, request: Ok(Request { op, subject, header, body: None }), decode, check: None }
    }

    /// A request this connection cannot make, failing when awaited or sent.
    pub(crate) fn refuse<T: Send + 'static>(&self, e: Error) -> Call<'_, T> {
        fn never<T>(_: &mut Decoder) -> BoxFuture<'_, Result<T>> {
            Box::pin(async { Err(Error::Internal("a refused request was sent".into())) })
        }
        Call { client: self, request: Err(e), decode: never::<T>, check: None }
    }

    /// Hands a message to the writer if there is room; gives it back if the queue is
    /// full.
    fn try_submit(&self, msg: Message) -> Result<Option<Message>> {
        let shared = &self.inner.shared;
        if shared.cause.get().is_some() {
            return Err(shared.disconnected());
        }
        match self.inner.requests.try_send(msg) {
            Ok(()) => Ok(None),
            Err(mpsc::error::TrySendError::Full(msg)) => {
                shared.stats.backpressure();
                Ok(Some(msg))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(shared.disconnected()),
        }
    }

    /// Hands a message to the writer, waiting for room if the queue is full.
    async fn submit(&self, msg: Message) -> Result<()> {
        match self.try_submit(msg)? {
            None => Ok(()),
            Some(msg) => self.inner.requests.send(msg).await.map_err(|_| self.inner.shared.disconnected()),
        }
    }

    /// Room in the queue for one request, for a thread outside the runtime: blocks
    /// the thread while the queue is full. Sending into it ([`Call::send_in`]) never
    /// blocks, so a caller can wait for room first and then send while it holds a
    /// lock that the connection's tasks may need.
    pub fn reserve_blocking(&self) -> Result<Room<'_>> {
        let shared = &self.inner.shared;
        if shared.cause.get().is_some() {
            return Err(shared.disconnected());
        }
        let permit = match self.inner.requests.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Full(())) => {
                shared.stats.backpressure();
                futures::executor::block_on(self.inner.requests.reserve()).map_err(|_| shared.disconnected())?
            }
            Err(mpsc::error::TrySendError::Closed(())) => return Err(shared.disconnected()),
        };
        Ok(Room { permit })
    }
}

/// Room for one request in a connection's queue: see [`Client::reserve_blocking`].
/// Dropping it unused gives the room back.
pub struct Room<'c> {
    permit: mpsc::Permit<'c, Message>,
}

/// See [`Client::failure_sink`].
#[derive(Clone)]
pub struct FailureSink(Arc<Shared>);

impl FailureSink {
    pub fn defer(&self, e: Error) {
        // A broken connection is reported to every later call anyway.
        if !matches!(e, Error::Disconnected { .. }) {
            self.0.defer(e);
        }
    }
}

/// Connects to a Unix socket, also when its path is longer than a socket address
/// holds (108 bytes on Linux): then through the open directory, by /proc/self/fd.
async fn connect_unix(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::AsRawFd;
    const SUN_PATH_MAX: usize = 107;
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return UnixStream::connect(path).await;
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return UnixStream::connect(path).await;
    };
    let dir = std::fs::File::open(dir)?;
    let short = Path::new("/proc/self/fd").join(dir.as_raw_fd().to_string()).join(name);
    let stream = UnixStream::connect(&short).await;
    drop(dir);
    stream
}

/// A request ready to go. Await it (or call [`Call::wait`]) for the result, or
/// [`Call::send`] it without waiting.
#[must_use = "a request does nothing until it is awaited or sent"]
pub struct Call<'c, T> {
    client: &'c Client,
    request: Result<Request>,
    decode: DecodeFn<T>,
    check: Option<Check<T>>,
}

impl<'c, T: Send + 'static> Call<'c, T> {
    /// Framed data to upload after the arguments.
    pub(crate) fn body(mut self, body: Body) -> Self {
        if let Ok(r) = &mut self.request {
            r.body = Some(body);
        }
        self
    }

    /// A test the result must pass when it arrives, whether or not anyone waits for
    /// it: an error from `check` becomes the request's error.
    pub fn check(mut self, check: impl FnOnce(&T) -> Result<()> + Send + 'static) -> Self {
        self.check = Some(Box::new(check));
        self
    }

    /// Sends the request and waits for its result. If a request sent earlier without
    /// waiting has failed, that failure is returned instead.
    pub async fn wait(self) -> Result<T> {
        self.start().await?.await
    }

    /// Sends the request now and returns its reply to await later, so that one task
    /// can have many requests in flight, in the order it started them.
    pub async fn start(self) -> Result<Pending<T>> {
        let request = self.request?;
        let shared = &self.client.inner.shared;
        shared.stats.request(request.op, true);
        let (tx, rx) = oneshot::channel();
        let reply = Box::new(Typed { decode: self.decode, check: self.check, value: None, to: Delivery::Caller(tx) });
        self.client.submit(Message::Request { request, reply }).await?;
        Ok(Pending { rx, shared: shared.clone(), blocked_since: None })
    }

    /// Sends the request without waiting for its reply. The reply is still read and
    /// checked; a failure is returned by the next call that waits, or by
    /// [`Client::flush`]. Waits only if the in-flight queue is full.
    pub async fn send(self) -> Result<()> {
        let (client, msg) = self.deferred()?;
        client.submit(msg).await
    }

    /// [`Call::send`] into room reserved before ([`Client::reserve_blocking`]):
    /// never waits.
    pub fn send_in(self, room: Room<'_>) -> Result<()> {
        let (_, msg) = self.deferred()?;
        room.permit.send(msg);
        Ok(())
    }

    /// Sends the request without waiting, and hands its result to `handler` when the
    /// reply has been read. Unlike [`Call::send`], a failure goes to the handler, not
    /// to the next call that waits; if the request cannot be sent, or the connection
    /// ends first, the handler gets that error. The handler runs on the connection's
    /// reader (or on whichever thread drops the request): it must not block.
    /// Handlers of answered requests run in request order; when the connection
    /// breaks, those of the requests it fails may run in any order (one refused
    /// after the break before one still queued for the writer).
    pub async fn send_then(self, handler: impl FnOnce(Result<T>) + Send + 'static) {
        let client = self.client;
        if let Some(msg) = self.handled(Box::new(handler)) {
            // If the message cannot be handed over, dropping it calls the handler.
            let _ = client.submit(msg).await;
        }
    }

    /// [`Call::send_then`] into room reserved before ([`Client::reserve_blocking`]):
    /// never waits, so a thread outside the runtime sends without a hop to it.
    pub fn send_then_in(self, room: Room<'_>, handler: impl FnOnce(Result<T>) + Send + 'static) {
        if let Some(msg) = self.handled(Box::new(handler)) {
            room.permit.send(msg);
        }
    }

    /// The message that sends this request with its result going to `handler`, or
    /// `None` if the request cannot be made, which the handler has been told.
    fn handled(self, handler: Box<dyn FnOnce(Result<T>) + Send>) -> Option<Message> {
        let shared = self.client.inner.shared.clone();
        let on_reply = OnReply { handler: Some(handler), shared: shared.clone() };
        let request = match self.request {
            Ok(r) => r,
            Err(e) => {
                on_reply.call(Err(e));
                return None;
            }
        };
        shared.stats.request(request.op, false);
        let reply =
            Box::new(Typed { decode: self.decode, check: self.check, value: None, to: Delivery::Handler(on_reply) });
        Some(Message::Request { request, reply })
    }

    /// The message that sends this request with nobody waiting for its reply.
    fn deferred(self) -> Result<(&'c Client, Message)> {
        let request = self.request?;
        let shared = &self.client.inner.shared;
        shared.stats.request(request.op, false);
        let reply = Box::new(Typed {
            decode: self.decode,
            check: self.check,
            value: None,
            to: Delivery::Deferred(shared.clone()),
        });
        Ok((self.client, Message::Request { request, reply }))
    }
}

/// The reply to a request already sent. Resolves to its result, or to the failure of
/// an earlier request sent without waiting.
#[must_use = "the reply is read anyway; drop it only if the result does not matter"]
pub struct Pending<T> {
    rx: oneshot::Receiver<Result<T>>,
    shared: Arc<Shared>,
    /// When the caller first found the reply not there yet.
    blocked_since: Option<Instant>,
}

impl<T> Future for Pending<T> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let this = &mut *self;
        let result = match Pin::new(&mut this.rx).poll(cx) {
            Poll::Pending => {
                this.blocked_since.get_or_insert_with(Instant::now);
                return Poll::Pending;
            }
            Poll::Ready(r) => r,
        };
        // Only a caller that actually blocked counts as a wait.
        if let Some(since) = this.blocked_since.take() {
            this.shared.stats.waited(since.elapsed());
        }
        if let Some(e) = this.shared.take_deferred() {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(result.unwrap_or_else(|_| Err(this.shared.disconnected())))
    }
}

impl<'c, T: Send + 'static> IntoFuture for Call<'c, T> {
    type Output = Result<T>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<T>> + Send + 'c>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
    }
}

// ---------------------------------------------------------------------------------
// The writer task

/// What the writer writes to.
type Sink = BufWriter<Counted<Box<dyn AsyncWrite + Send + Unpin>>>;

async fn writer(
    mut requests: mpsc::Receiver<Message>,
    mut sink: Sink,
    slots: mpsc::Sender<Slot>,
    shared: Arc<Shared>,
    mut dead: watch::Receiver<bool>,
) {
    let work = async {
        while let Some(first) = requests.recv().await {
            let mut next = Some(first);
            // Coalesce whatever else is already waiting into the same write.
            while let Some(msg) = next.take() {
                match msg {
                    Message::Lease(grant) => {
                        sink.flush().await?;
                        let (resume, resumed) = oneshot::channel();
                        slots.send(Slot::Lease { grant, resume }).await.map_err(|_| Error::Eof)?;
                        // The socket is the holder's until the reader has it back;
                        // if the reader stops instead, it has recorded why.
                        resumed.await.map_err(|_| Error::Closed)?;
                    }
                    msg => write_message(msg, &mut sink, &slots).await?,
                }
                next = requests.try_recv().ok();
            }
            sink.flush().await?;
        }
        // Every handle is gone: let the daemon see EOF once it has read everything.
        sink.shutdown().await?;
        Ok::<(), Error>(())
    };
    let failed = tokio::select! {
        biased;
        _ = dead.wait_for(|d| *d) => None,
        r = work => r.err(),
    };
    if let Some(e) = failed {
        // A write fails when the daemon has closed the connection. The reader holds
        // the slot of the request that failed to go out, so it will read why the
        // daemon closed (its last error, or EOF): let that be the cause, and report
        // the write error only if the reader says nothing.
        let reader_told =
            matches!(e, Error::Io(_)) && tokio::time::timeout(WRITE_ERROR_GRACE, dead.wait_for(|d| *d)).await.is_ok();
        if !reader_told {
            shared.kill(e);
        }
    }
    trace!("writer stopped");
    // Dropping `requests` fails later submissions; dropping `slots` lets the reader end.
}

async fn write_message(msg: Message, sink: &mut Sink, slots: &mpsc::Sender<Slot>) -> Result<()> {
    let (request, slot) = match msg {
        Message::Barrier(tx) => (None, Slot::Barrier(tx)),
        Message::Lease(_) => unreachable!("the writer hands leases over itself"),
        Message::Request { request, reply } => {
            let slot = Slot::Reply { op: request.op, subject: request.subject.clone(), reply };
            (Some(request), slot)
        }
    };
    // Queue the reply slot before the request goes out, so that the reader always
    // knows what it is reading. If the queue is full, first push out what is buffered:
    // the replies that free it may be waiting on those very requests.
    let slot = match slots.try_send(slot) {
        Ok(()) => None,
        Err(mpsc::error::TrySendError::Full(slot)) => Some(slot),
        Err(mpsc::error::TrySendError::Closed(_)) => return Err(Error::Eof),
    };
    if let Some(slot) = slot {
        sink.flush().await?;
        slots.send(slot).await.map_err(|_| Error::Eof)?;
    }
    let Some(request) = request else { return Ok(()) };
    trace!(op = %request.op, subject = ?request.subject, "send");
    sink.write_all(&request.header).await?;
    match request.body {
        None => {}
        Some(Body::Bytes(data)) => {
            for chunk in data.chunks(FRAME_SIZE) {
                sink.write_all(&(chunk.len() as u64).to_le_bytes()).await?;
                sink.write_all(chunk).await?;
            }
            sink.write_all(&0u64.to_le_bytes()).await?;
        }
        Some(Body::Reader(mut reader)) => {
            let mut buf = vec![0u8; FRAME_SIZE];
            loop {
                let n = reader.read(&mut buf).await.map_err(|source| Error::Upload {
                    op: request.op,
                    subject: request.subject.clone().unwrap_or_default(),
                    source,
                })?;
                sink.write_all(&(n as u64).to_le_bytes()).await?;
                if n == 0 {
                    break;
                }
                sink.write_all(&buf[..n]).await?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The reader task

async fn reader(
    mut decoder: Decoder,
    mut slots: mpsc::Receiver<Slot>,
    logger: Arc<dyn Logger>,
    shared: Arc<Shared>,
    mut dead: watch::Receiver<bool>,
    child: Option<Child>,
) {
    // The process at the other end, if we started it, lives as long as this task.
    let _child = child;
    // The error that answered the previous request, if it failed. An error that
    // cannot be answered in order (thrown while the daemon was still reading the
    // request: a store path it cannot parse, an unknown op, a refused privilege) is
    // connection-fatal: the daemon sends it, sends it a second time from its outer
    // handler, and closes. So an EOF, or an identical error for a different request,
    // right after an error means the connection ended because of that error.
    let mut previous: Option<DaemonError> = None;
    let work = async {
        while let Some(slot) = slots.recv().await {
            let (op, subject, mut reply) = match slot {
                Slot::Barrier(tx) => {
                    let _ = tx.send(Ok(()));
                    continue;
                }
                Slot::Lease { grant, resume } => match lend(shared.fds, grant).await {
                    Ok(()) => {
                        let _ = resume.send(());
                        continue;
                    }
                    Err(e) => {
                        shared.kill(e);
                        return;
                    }
                },
                Slot::Reply { op, subject, reply } => (op, subject, reply),
            };
            let outcome = match read_envelope(&mut decoder, &*logger).await {
                Ok(Outcome::Last) => reply.read(&mut decoder).await.map(|()| None),
                Ok(Outcome::Failed(m)) => Ok(Some(m)),
                Err(e) => Err(e),
            };
            let fatal = match outcome {
                Ok(None) => {
                    previous = None;
                    reply.complete(Ok(()));
                    continue;
                }
                Ok(Some(DaemonMessage { message, level, status, traces })) => {
                    let e = DaemonError { op, subject, message, level, status, traces };
                    match previous.take() {
                        Some(p) if p.repeated_by(&e) => Error::ClosedAfter(Box::new(p)),
                        _ => {
                            debug!(op = %e.op, subject = ?e.subject, "daemon error: {}", e.message);
                            previous = Some(e.clone());
                            reply.complete(Err(Error::Daemon(Box::new(e))));
                            continue;
                        }
                    }
                }
                Err(Error::Eof) => match previous.take() {
                    Some(p) => Error::ClosedAfter(Box::new(p)),
                    None => Error::Eof,
                },
                Err(Error::Protocol(m)) => Error::Protocol(format!("in the reply to {op}: {m}")),
                Err(e) => e,
            };
            let cause = shared.kill(fatal);
            reply.complete(Err(Error::Disconnected { peer: shared.peer.clone(), cause }));
            return;
        }
        // The writer has stopped and every reply has been read: the connection is done.
        shared.kill(Error::Closed);
    };
    tokio::select! {
        biased;
        _ = dead.wait_for(|d| *d) => {}
        () = work => {}
    }
    // Fail whatever is still queued, with the recorded cause.
    slots.close();
    while let Ok(slot) = slots.try_recv() {
        match slot {
            Slot::Barrier(tx) => drop(tx),
            Slot::Lease { grant, .. } => drop(grant),
            Slot::Reply { reply, .. } => reply.complete(Err(shared.disconnected())),
        }
    }
    trace!("reader stopped");
}

/// Hands the socket to a lease's holder and waits until it is given back. Every
/// earlier reply has been read, and the daemon sends nothing unasked, so nothing of
/// the holder's is in our buffers, nor will anything of ours be in theirs.
async fn lend(fds: Fds, grant: oneshot::Sender<Result<Lease>>) -> Result<()> {
    set_blocking(fds, true)?;
    let (release, released) = oneshot::channel();
    // If the caller has gone, the lease it would have had is dropped here, which
    // gives the socket back at once.
    let _ = grant.send(Ok(Lease { fds, release: Some(release) }));
    let in_step = released.await.unwrap_or(true);
    set_blocking(fds, false)?;
    if in_step { Ok(()) } else { Err(Error::Abandoned) }
}
