//! Content-addressed adds that do no redundant work.
//!
//! Evaluation adds many small content-addressed paths (each `.drv`, each
//! `builtins.toFile`, each path import), and when a commit is evaluated again nearly
//! all of them are valid already. [`Uploads::add`] computes an add's store path and
//! returns it at once ([`Uploads::add_computed_blocking`] takes a path the caller has
//! computed, and decodes the add only if it must be uploaded); behind the caller, a
//! task on the connection
//!
//! 1. roots the path for this connection (once per path: one AddTempRoots per batch
//!    where the daemon offers it, one AddTempRoot per path otherwise);
//! 2. asks, for a batch of paths, which are valid (QueryValidPaths);
//! 3. uploads only the missing ones, in batches (AddMultipleToStore, which the daemon
//!    accepts from untrusted clients for content-addressed paths; one AddToStore per
//!    path from daemons older than protocol 1.32).
//!
//! Nobody waits for any of it. A path's root is on the connection before its check,
//! so a path the daemon reports valid stays valid while the connection is open: the
//! garbage collector cannot take it. A path the collector took before the root
//! arrived is reported missing and uploaded. Each path's contents are kept until the
//! daemon has reported it valid or acknowledged its upload; a failed check uploads
//! the whole batch.
//!
//! **Sync points.** A caller about to rely on the daemon having seen the adds (a
//! request that waits for its answer, a read of the store's files, closing the store)
//! calls [`Uploads::drain`] first. It sends the open batch at once and returns when
//! every earlier add is known valid or has its upload on the connection ahead of
//! whatever the caller sends next. Reading the store's files also needs the uploads
//! finished: flush the connection after draining.
//!
//! **Batches.** A check goes out when it holds [`UploadOptions::check_batch`] paths, when
//! its first path has waited [`UploadOptions::batch_delay`], when memory runs short,
//! or at a sync point. The missing paths of one check are uploaded together, split
//! at [`UploadOptions::upload_batch_bytes`]. On the benchmark, 256 paths or 1 ms and
//! 1,024 paths or 5 ms gave the same times: the daemon's cost per checked path barely
//! depends on the batch size beyond a hundred or so (`daemon-cost`).
//!
//! **Memory.** The contents held are bounded by [`UploadOptions::max_pending_bytes`]:
//! an add that would go over waits until earlier ones are confirmed.
//!
//! A failed upload is reported, like any request sent without waiting, by the next
//! call that waits or by [`Client::flush`].

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, trace};

use crate::connection::{Body, Call, FailureSink, Lease};
use crate::error::{Error, Result};
use crate::hash::{Hash, HashAlgo};
use crate::nar;
use crate::store_path::{ContentAddress, ContentAddressMethod, StoreDir};
use crate::types::{UnkeyedValidPathInfo, ValidPathInfo};
use crate::{Client, StorePath};

/// Limits and batch sizes of [`Uploads`].
#[derive(Clone, Debug)]
pub struct UploadOptions {
    /// Most bytes of contents held for adds not yet confirmed.
    pub max_pending_bytes: u64,
    /// Most paths in one validity check.
    pub check_batch: usize,
    /// Longest a path waits for company before its check goes out.
    pub batch_delay: Duration,
    /// Most bytes of contents in one upload.
    pub upload_batch_bytes: usize,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            max_pending_bytes: 256 << 20,
            check_batch: 256,
            batch_delay: Duration::from_millis(1),
            upload_batch_bytes: 4 << 20,
        }
    }
}

/// A content-addressed addition: what AddToStore takes.
#[derive(Clone, Debug)]
pub struct CaAdd {
    pub name: String,
    pub method: ContentAddressMethod,
    pub algo: HashAlgo,
    pub references: BTreeSet<StorePath>,
    /// The file's contents (text, flat) or the NAR (NAR).
    pub data: Vec<u8>,
}

impl CaAdd {
    /// Where the daemon stores this add, if that is computed here: for text with
    /// SHA-256, flat files and NARs, with a valid name and references.
    pub fn path(&self, store_dir: &StoreDir) -> Option<StorePath> {
        Some(self.info(store_dir)?.0)
    }

    /// The path and content address of this add, if it is computed here.
    fn info(&self, store_dir: &StoreDir) -> Option<(StorePath, ContentAddress)> {
        let ca = match self.method {
            ContentAddressMethod::Text if self.algo == HashAlgo::Sha256 => {
                ContentAddress { method: self.method, hash: Hash::digest(HashAlgo::Sha256, &self.data) }
            }
            ContentAddressMethod::Flat | ContentAddressMethod::Nar => {
                ContentAddress { method: self.method, hash: Hash::digest(self.algo, &self.data) }
            }
            _ => return None,
        };
        let path = store_dir.make_fixed_output_path_from_ca(&self.name, &ca, &self.references, false).ok()?;
        Some((path, ca))
    }

    /// The path's NAR and its info, for AddMultipleToStore.
    fn into_nar(self, path: StorePath, ca: ContentAddress) -> (ValidPathInfo, Vec<u8>) {
        let nar = match self.method {
            ContentAddressMethod::Nar => self.data,
            _ => nar::dump_flat_file_contents(&self.data),
        };
        let mut info = UnkeyedValidPathInfo::new(Hash::digest(HashAlgo::Sha256, &nar), nar.len() as u64);
        info.references = self.references;
        info.ca = Some(ca);
        (ValidPathInfo { path, info }, nar)
    }
}

/// Counters of [`Uploads`].
#[derive(Default)]
struct Counters {
    added: AtomicU64,
    repeated: AtomicU64,
    checked: AtomicU64,
    check_batches: AtomicU64,
    valid: AtomicU64,
    uploaded: AtomicU64,
    upload_batches: AtomicU64,
    failed: AtomicU64,
    drains: AtomicU64,
    drain_nanos: AtomicU64,
    path_waits: AtomicU64,
    path_wait_nanos: AtomicU64,
    memory_waits: AtomicU64,
    peak_pending_bytes: AtomicU64,
}

/// What [`Uploads`] has done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Adds taken.
    pub added: u64,
    /// Adds of a path already added on this connection: nothing sent.
    pub repeated: u64,
    /// Paths whose validity was asked, and in how many requests.
    pub checked: u64,
    pub check_batches: u64,
    /// Paths the daemon had already: not uploaded.
    pub valid: u64,
    /// Paths uploaded, and in how many requests.
    pub uploaded: u64,
    pub upload_batches: u64,
    /// Paths whose upload failed.
    pub failed: u64,
    /// Sync points that found adds still unresolved and waited for them.
    pub drains: u64,
    /// The time spent in those waits.
    pub drain_time: Duration,
    /// Reads of a path that waited for its add to be confirmed, and how long.
    pub path_waits: u64,
    pub path_wait_time: Duration,
    /// Adds that waited for memory.
    pub memory_waits: u64,
    /// The most bytes of contents held at once.
    pub peak_pending_bytes: u64,
}

impl fmt::Display for UploadStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} adds ({} repeated): {} checked in {} batches, {} already valid, {} uploaded in {} batches, \
             {} failed; {} drains ({:.3} ms), {} path waits ({:.3} ms), {} memory waits, peak {} bytes held",
            self.added,
            self.repeated,
            self.checked,
            self.check_batches,
            self.valid,
            self.uploaded,
            self.upload_batches,
            self.failed,
            self.drains,
            self.drain_time.as_secs_f64() * 1e3,
            self.path_waits,
            self.path_wait_time.as_secs_f64() * 1e3,
            self.memory_waits,
            self.peak_pending_bytes
        )
    }
}

/// State shared by the callers and the task.
struct Shared {
    options: UploadOptions,
    /// Paths added on this connection and not failed, with the add while the daemon
    /// has not confirmed it (found it valid, or acknowledged its upload): a repeated
    /// add sends nothing, and a read of a path not yet confirmed is served from here.
    added: Mutex<AddedMap>,
    /// Wakes [`Uploads::wait_for`] when adds are confirmed or fail.
    confirmed: Notify,
    /// Paths rooted on this connection.
    rooted: Mutex<PathSet>,
    /// Where adds' arguments are copied to.
    arena: Mutex<Arena>,
    /// Adds not yet in a check, in order; `wake` tells the task when the first
    /// arrives and when there are enough for a check.
    open: Mutex<Vec<Item>>,
    wake: Notify,
    /// Bytes of contents held; `freed` wakes adds waiting for room.
    pending_bytes: Mutex<u64>,
    freed: Notify,
    /// Adds neither known valid nor with their upload on the connection yet.
    unresolved: AtomicU64,
    /// Uploads on the connection, not yet acknowledged.
    unacknowledged: AtomicU64,
    counters: Counters,
}

impl Shared {
    /// Holds `bytes` of the memory budget if it has room. One add larger than the
    /// whole budget goes through once nothing else is held.
    fn try_hold(&self, bytes: u64) -> bool {
        let mut held = self.pending_bytes.lock().unwrap_or_else(|p| p.into_inner());
        if *held > 0 && *held + bytes > self.options.max_pending_bytes {
            return false;
        }
        *held += bytes;
        self.counters.peak_pending_bytes.fetch_max(*held, Relaxed);
        true
    }

    fn release(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut held = self.pending_bytes.lock().unwrap_or_else(|p| p.into_inner());
        *held = held.saturating_sub(bytes);
        drop(held);
        self.freed.notify_waiters();
    }

    fn added(&self) -> std::sync::MutexGuard<'_, AddedMap> {
        self.added.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The daemon has these paths now: stop holding their adds.
    fn confirm<'h>(&self, hashes: impl IntoIterator<Item = &'h [u8; 20]>) {
        let mut added = self.added();
        for hash in hashes {
            if let Some(entry) = added.get_mut(hash) {
                *entry = None;
            }
        }
        drop(added);
        self.confirmed.notify_waiters();
    }

    /// These paths' adds failed: forget them, so that a later add tries again.
    fn forget<'h>(&self, hashes: impl IntoIterator<Item = &'h [u8; 20]>) {
        let mut added = self.added();
        for hash in hashes {
            added.remove(hash);
        }
        drop(added);
        self.confirmed.notify_waiters();
    }
}

enum Command {
    /// Send the open batch now (an add is waiting for memory, or a read for its path).
    SendNow,
    /// Answer once every earlier add is resolved.
    Drain(oneshot::Sender<()>),
}

/// An add on its way through the task, holding its contents until the daemon has
/// confirmed its path: its arguments as the caller gave them, in one copy (the path's
/// base name, the method with its algorithm, the references' base names separated by
/// spaces, and the data; `ends` marks where the first three end). It is decoded only
/// if it must be uploaded, and then checked against its path.
#[derive(Clone)]
struct Item {
    hash: [u8; 20],
    bytes: Bytes,
    ends: [usize; 3],
}

impl Item {
    /// The bytes held for it.
    fn bytes(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Its path, made on the task's thread.
    fn path(&self) -> Result<StorePath> {
        Ok(StorePath::from_checked_parts(self.hash, self.name()?))
    }

    /// The method, its algorithm, and the data.
    fn contents(&self) -> Result<(ContentAddressMethod, HashAlgo, &[u8])> {
        let (method, algo) = ContentAddressMethod::parse_with_algo(self.text(self.ends[0], self.ends[1])?)?;
        Ok((method, algo, &self.bytes[self.ends[2]..]))
    }

    /// The path's NAR.
    fn nar(&self) -> Result<Vec<u8>> {
        Ok(match self.contents()? {
            (ContentAddressMethod::Nar, _, data) => data.to_vec(),
            (_, _, data) => nar::dump_flat_file_contents(data),
        })
    }

    fn text(&self, from: usize, to: usize) -> Result<&str> {
        std::str::from_utf8(&self.bytes[from..to]).map_err(|e| Error::InvalidInput(e.to_string()))
    }

    fn base_name(&self) -> Result<&str> {
        self.text(0, self.ends[0])
    }

    /// The name: the base name after the hash part and its dash.
    fn name(&self) -> Result<&str> {
        let base_name = self.base_name()?;
        // The hash part has no dash.
        Ok(base_name.split_once('-').map_or(base_name, |(_, name)| name))
    }

    /// The add and its content address, checked against the path it was added at.
    fn decode(self, store_dir: &StoreDir) -> Result<(StorePath, CaAdd, ContentAddress)> {
        let base_name = self.base_name()?;
        let path = StorePath::from_base_name(base_name)?;
        let what = |e: &dyn fmt::Display| Error::InvalidInput(format!("adding '{}': {e}", store_dir.print(&path)));
        let (method, algo, data) = self.contents().map_err(|e| what(&e))?;
        let references = self
            .text(self.ends[1], self.ends[2])?
            .split_ascii_whitespace()
            .map(StorePath::from_base_name)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| what(&e))?;
        let add = CaAdd { name: path.name().to_owned(), method, algo, references, data: data.to_vec() };
        match add.info(store_dir) {
            Some((computed, ca)) if computed == path => Ok((path, add, ca)),
            _ => Err(what(&"it is not the path of its contents")),
        }
    }
}

/// A validity check's answer, by the check's id.
struct Checked(u64, Result<BTreeSet<StorePath>>);

/// Content-addressed adds on one connection: see the module documentation.
pub struct Uploads {
    client: Client,
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl Uploads {
    /// Starts the task that serves adds on `client`'s connection. Must be called
    /// within a Tokio runtime.
    pub fn new(client: Client, options: UploadOptions) -> Uploads {
        let shared = Arc::new(Shared {
            options,
            added: Mutex::default(),
            confirmed: Notify::new(),
            rooted: Mutex::default(),
            arena: Mutex::default(),
            open: Mutex::default(),
            wake: Notify::new(),
            pending_bytes: Mutex::new(0),
            freed: Notify::new(),
            unresolved: AtomicU64::new(0),
            unacknowledged: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let (commands, inbox) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let task = Task {
            client: client.clone(),
            failures: client.failure_sink(),
            shared: shared.clone(),
            inbox,
            events,
            events_tx,
            deadline: None,
            checks: Checks::default(),
        };
        tokio::spawn(task.run());
        Uploads { client, commands, shared }
    }

    /// Adds `add` and returns its store path without waiting for the daemon. Waits
    /// only while memory for contents is short. An add whose path is not computed
    /// here (see [`CaAdd::path`]) is given back: send it as a request that waits,
    /// after [`Uploads::drain`].
    pub async fn add(&self, add: CaAdd) -> std::result::Result<StorePath, CaAdd> {
        let Some(path) = add.path(self.client.store_dir()) else { return Err(add) };
        let base_name = path.to_string();
        let method = add.method.render_with_algo(add.algo);
        let references = add.references.iter().map(StorePath::to_string).collect::<Vec<_>>().join(" ");
        let parts = [base_name.as_bytes(), method.as_bytes(), references.as_bytes(), &add.data];
        if let Some(item) = self.take_new(*path.hash_bytes(), parts) {
            if let Some(item) = self.try_push(item) {
                self.reserve(item.bytes()).await;
                self.push(item);
            }
        }
        Ok(path)
    }

    /// Adds, without waiting, an add at a path the caller computed: the path's base
    /// name, the content-addressing method with its algorithm (`text:sha256`), the
    /// references' base names, and the data. The rest is checked
    /// only if the path must be uploaded: it is decoded then, and an add that is not
    /// at the path of its contents fails like a failed upload. Blocks the calling
    /// thread (outside the runtime) only while memory for contents is short.
    ///
    /// This runs on the evaluator's thread once per `.drv` and `builtins.toFile`, so
    /// it does little: a repeated path is only looked up, and the arguments are
    /// copied once, into a shared chunk; everything that allocates per path happens
    /// on the task.
    pub fn add_computed_blocking<R: AsRef<str>>(
        &self,
        base_name: &str,
        method: &str,
        references: &[R],
        data: &[u8],
    ) -> Result<()> {
        let hash = StorePath::check_base_name(base_name)?;
        let references = join_base_names(references)?;
        let parts = [base_name.as_bytes(), method.as_bytes(), references.as_bytes(), data];
        if let Some(item) = self.take_new(hash, parts) {
            if let Some(item) = self.try_push(item) {
                futures::executor::block_on(self.reserve(item.bytes()));
                self.push(item);
            }
        }
        Ok(())
    }

    /// An add's arguments in one copy, unless its path was added on this connection
    /// before (and has not failed): then nothing is sent for it. The add is listed
    /// as added before anyone can look for it.
    fn take_new(&self, hash: [u8; 20], parts: [&[u8]; 4]) -> Option<Item> {
        let mut added = self.shared.added();
        if added.contains_key(&hash) {
            drop(added);
            let c = &self.shared.counters;
            c.added.fetch_add(1, Relaxed);
            c.repeated.fetch_add(1, Relaxed);
            return None;
        }
        let bytes = self.shared.arena.lock().unwrap_or_else(|p| p.into_inner()).copy(&parts);
        let ends = [parts[0].len(), parts[0].len() + parts[1].len(), parts[0].len() + parts[1].len() + parts[2].len()];
        let item = Item { hash, bytes, ends };
        added.insert(hash, Some(item.clone()));
        Some(item)
    }

    /// Whether `path` was added on this connection and has not failed (so far): it
    /// is valid, or will be once its upload is stored.
    pub fn was_added(&self, path: &[u8; 20]) -> bool {
        self.shared.added().contains_key(path)
    }

    /// Whether `path` was added on this connection and the daemon has not confirmed
    /// it yet (found it valid, or acknowledged its upload).
    pub fn is_pending(&self, path: &[u8; 20]) -> bool {
        self.shared.added().get(path).is_some_and(Option::is_some)
    }

    /// The NAR of `path` if its add is not confirmed yet, from the contents held for
    /// it: a read of a path just added needs no wait.
    pub fn held_nar(&self, path: &[u8; 20]) -> Option<Vec<u8>> {
        let item = self.shared.added().get(path)?.clone()?;
        item.nar().ok()
    }

    /// The info the daemon will have for `path` (its NAR's hash and size, its
    /// references and content address) if its add is not confirmed yet, computed
    /// from the contents held for it; the registration time is left for the caller.
    pub fn held_info(&self, path: &[u8; 20]) -> Option<ValidPathInfo> {
        let item = self.shared.added().get(path)?.clone()?;
        let (path, add, ca) = item.decode(self.client.store_dir()).ok()?;
        Some(add.into_nar(path, ca).0)
    }

    /// Returns once the daemon has confirmed `path`'s add, for a caller about to
    /// read its files. At once if it is not pending; otherwise its check goes out now,
    /// and this waits for that check and, if the path was missing, its upload (and so
    /// for adds before it, which are ahead of it on the connection), not for adds
    /// after it. If the add failed, returns its failure.
    pub async fn wait_for(&self, path: &[u8; 20]) -> Result<()> {
        if !self.is_pending(path) {
            return Ok(());
        }
        let c = &self.shared.counters;
        c.path_waits.fetch_add(1, Relaxed);
        let start = std::time::Instant::now();
        let _ = self.commands.send(Command::SendNow);
        loop {
            let confirmed = self.shared.confirmed.notified();
            tokio::pin!(confirmed);
            confirmed.as_mut().enable();
            if !self.is_pending(path) {
                break;
            }
            if self.client.is_closed() {
                break;
            }
            confirmed.await;
        }
        c.path_wait_nanos.fetch_add(start.elapsed().as_nanos().try_into().unwrap_or(u64::MAX), Relaxed);
        if self.was_added(path) && !self.client.is_closed() {
            return Ok(());
        }
        // It failed: its failure (or the connection's) is deferred; report it here.
        self.client.flush().await
    }

    /// Takes `item` if memory is there for it; otherwise gives it back, to wait.
    fn try_push(&self, item: Item) -> Option<Item> {
        if !self.shared.try_hold(item.bytes()) {
            return Some(item);
        }
        self.push(item);
        None
    }

    /// Puts an item whose memory is held into the open batch.
    fn push(&self, item: Item) {
        self.shared.unresolved.fetch_add(1, Relaxed);
        self.shared.counters.added.fetch_add(1, Relaxed);
        let wake = {
            let mut open = self.shared.open.lock().unwrap_or_else(|p| p.into_inner());
            open.push(item);
            open.len() == 1 || open.len() >= self.shared.options.check_batch
        };
        // The task needs to know only when a batch starts and when it is full.
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Roots `path` for this connection without waiting, once. Blocks the calling
    /// thread (outside the runtime) only while the connection's queue is full, and
    /// then holds no lock: the task takes the same one on the runtime, whose tasks
    /// are what makes room.
    pub fn add_temp_root(&self, path: &StorePath) -> Result<()> {
        let rooted = || self.shared.rooted.lock().unwrap_or_else(|p| p.into_inner());
        if rooted().contains(path.hash_bytes()) {
            return Ok(());
        }
        let room = self.client.reserve_blocking()?;
        // Marked and sent under the lock, so that the task, which roots the paths it
        // checks, never sends a check for this path ahead of its root.
        let mut rooted = rooted();
        if !rooted.insert(*path.hash_bytes()) {
            return Ok(());
        }
        self.client.add_temp_root(path).send_in(room).inspect_err(|_| {
            rooted.remove(path.hash_bytes());
        })
    }

    /// The connection, for what needs no ordering against the adds: its store
    /// directory, its counters, whether a failure is waiting to be reported. A
    /// request that waits goes through [`Uploads::call`] or [`Uploads::lease`].
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Resolves every add, then waits until every request sent on the connection has
    /// been answered; returns the first failure of work done without waiting (a
    /// failed upload among them).
    pub async fn flush(&self) -> Result<()> {
        self.drain().await?;
        self.client.flush().await
    }

    /// The connection's socket for a caller that speaks the protocol on it itself
    /// ([`Client::lease`]), once every add made before is resolved and every request
    /// before it answered: whatever the caller sends, the daemon has seen them all.
    pub async fn lease(&self) -> Result<Lease> {
        self.drain().await?;
        self.client.lease().await
    }

    /// A request that waits for its answer, sent after every add made before is
    /// resolved, so that the daemon sees them first: `request` makes it on the
    /// connection's client.
    pub async fn call<T: Send + 'static>(&self, request: impl FnOnce(&Client) -> Call<'_, T>) -> Result<T> {
        self.drain().await?;
        request(&self.client).wait().await
    }

    /// Returns once every add made before is known valid or has its upload on the
    /// connection, so that whatever the caller sends next is behind it. At once if
    /// there is nothing to resolve.
    pub async fn drain(&self) -> Result<()> {
        if self.shared.unresolved.load(Relaxed) == 0 {
            return Ok(());
        }
        let c = &self.shared.counters;
        c.drains.fetch_add(1, Relaxed);
        let start = std::time::Instant::now();
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Drain(tx)).map_err(|_| self.stopped())?;
        let drained = rx.await.map_err(|_| self.stopped());
        c.drain_nanos.fetch_add(start.elapsed().as_nanos().try_into().unwrap_or(u64::MAX), Relaxed);
        drained
    }

    /// The task stops only when the last handle is dropped; if it has stopped
    /// anyway, adds are lost, and that must not pass silently.
    fn stopped(&self) -> Error {
        Error::Internal(format!(
            "the daemon client's upload task has stopped with {} additions unsent",
            self.shared.unresolved.load(Relaxed)
        ))
    }

    /// Whether nothing is left to do: every add is valid or its upload acknowledged.
    pub fn is_idle(&self) -> bool {
        self.shared.unresolved.load(Relaxed) == 0 && self.shared.unacknowledged.load(Relaxed) == 0
    }

    pub fn stats(&self) -> UploadStats {
        let c = &self.shared.counters;
        UploadStats {
            added: c.added.load(Relaxed),
            repeated: c.repeated.load(Relaxed),
            checked: c.checked.load(Relaxed),
            check_batches: c.check_batches.load(Relaxed),
            valid: c.valid.load(Relaxed),
            uploaded: c.uploaded.load(Relaxed),
            upload_batches: c.upload_batches.load(Relaxed),
            failed: c.failed.load(Relaxed),
            drains: c.drains.load(Relaxed),
            drain_time: Duration::from_nanos(c.drain_nanos.load(Relaxed)),
            path_waits: c.path_waits.load(Relaxed),
            path_wait_time: Duration::from_nanos(c.path_wait_nanos.load(Relaxed)),
            memory_waits: c.memory_waits.load(Relaxed),
            peak_pending_bytes: c.peak_pending_bytes.load(Relaxed),
        }
    }

    /// Holds `bytes` of the memory budget, waiting while it is spent.
    async fn reserve(&self, bytes: u64) {
        let shared = &self.shared;
        shared.counters.memory_waits.fetch_add(1, Relaxed);
        trace!(bytes, "waiting for memory for uploads");
        loop {
            let freed = shared.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if shared.try_hold(bytes) {
                return;
            }
            let _ = self.commands.send(Command::SendNow);
            if self.client.is_closed() {
                // Nothing will be freed by replies any more: go on, the add fails later.
                *shared.pending_bytes.lock().unwrap_or_else(|p| p.into_inner()) += bytes;
                return;
            }
            freed.await;
        }
    }
}

/// The task that roots, checks and uploads, in the order adds came.
struct Task {
    client: Client,
    failures: FailureSink,
    shared: Arc<Shared>,
    inbox: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedReceiver<Checked>,
    /// Given to reply handlers; also keeps `events` open.
    events_tx: mpsc::UnboundedSender<Checked>,
    /// When the open batch must go.
    deadline: Option<Instant>,
    /// Checks on the connection, with their items, and the drains waiting for them.
    checks: Checks<Vec<Item>>,
}

impl Task {
    async fn run(mut self) {
        let mut open = true;
        // Uploads in flight need no task: their replies' handlers finish them.
        while open || self.unsent() > 0 || !self.checks.is_empty() {
            let deadline = self.deadline;
            tokio::select! {
                command = self.inbox.recv(), if open => match command {
                    Some(Command::SendNow) => self.send_check().await,
                    Some(Command::Drain(tx)) => {
                        self.send_check().await;
                        self.checks.drain(tx);
                    }
                    // Every handle is gone: finish what was added.
                    None => {
                        open = false;
                        self.send_check().await;
                    }
                },
                () = self.shared.wake.notified() => {
                    let unsent = self.unsent();
                    if unsent >= self.shared.options.check_batch {
                        self.send_check().await;
                    } else if unsent > 0 && self.deadline.is_none() {
                        self.deadline = Some(Instant::now() + self.shared.options.batch_delay);
                    }
                }
                Some(Checked(id, result)) = self.events.recv() => self.checked(id, result).await,
                () = sleep_until(deadline), if deadline.is_some() => self.send_check().await,
            }
        }
        trace!("upload task stopped");
    }

    /// How many adds wait in the open batch.
    fn unsent(&self) -> usize {
        self.shared.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Roots the open batch's paths and sends its validity check behind the roots.
    async fn send_check(&mut self) {
        self.deadline = None;
        let items = std::mem::take(&mut *self.shared.open.lock().unwrap_or_else(|p| p.into_inner()));
        if items.is_empty() {
            return;
        }
        let mut paths = BTreeSet::new();
        let mut unrooted = Vec::new();
        let mut checked = Vec::with_capacity(items.len());
        {
            let mut rooted = self.shared.rooted.lock().unwrap_or_else(|p| p.into_inner());
            for item in items {
                match item.path() {
                    Ok(path) => {
                        if rooted.insert(item.hash) {
                            unrooted.push(path.clone());
                        }
                        paths.insert(path);
                        checked.push(item);
                    }
                    Err(e) => self.failed(item.bytes(), &item.hash, e),
                }
            }
        }
        // A failure here is the connection's: the check behind it fails too.
        if unrooted.len() > 1 && self.client.has_add_temp_roots() {
            let _ = self.client.add_temp_roots(&unrooted.into_iter().collect()).send().await;
        } else {
            for path in &unrooted {
                let _ = self.client.add_temp_root(path).send().await;
            }
        }
        let id = self.checks.push(checked);
        let c = &self.shared.counters;
        c.checked.fetch_add(paths.len() as u64, Relaxed);
        c.check_batches.fetch_add(1, Relaxed);
        trace!(id, paths = paths.len(), "check");
        let events = self.events_tx.clone();
        self.client
            .query_valid_paths(&paths, false)
            .send_then(move |r| {
                let _ = events.send(Checked(id, r));
            })
            .await;
    }

    /// A check's answer: forget the valid paths' contents, upload the others.
    async fn checked(&mut self, id: u64, result: Result<BTreeSet<StorePath>>) {
        let Some(items) = self.checks.answer(id) else { return };
        let (valid, missing): (Vec<Item>, Vec<Item>) = match result {
            Ok(valid) => {
                let valid: PathSet = valid.iter().map(|p| *p.hash_bytes()).collect();
                items.into_iter().partition(|i| valid.contains(&i.hash))
            }
            Err(e) => {
                // Upload them all: the daemon skips what it has.
                debug!("validity check failed, uploading its {} paths: {e}", items.len());
                (Vec::new(), items)
            }
        };
        let freed: u64 = valid.iter().map(Item::bytes).sum();
        self.shared.counters.valid.fetch_add(valid.len() as u64, Relaxed);
        self.shared.confirm(valid.iter().map(|i| &i.hash));
        self.shared.unresolved.fetch_sub(valid.len() as u64, Relaxed);
        self.shared.release(freed);
        self.upload(missing).await;
        self.checks.release_drains();
    }

    /// Sends uploads of `items`, in order, in batches.
    async fn upload(&mut self, items: Vec<Item>) {
        let batched = self.client.version().at_least(32);
        let limit = if batched { self.shared.options.upload_batch_bytes as u64 } else { 0 };
        let mut batch = Vec::new();
        let mut size = 0u64;
        for item in items {
            if !batch.is_empty() && size + item.bytes() > limit {
                self.send_upload(std::mem::take(&mut batch)).await;
                size = 0;
            }
            size += item.bytes();
            batch.push(item);
        }
        if !batch.is_empty() {
            self.send_upload(batch).await;
        }
    }

    /// Fails an add for which nothing was sent, as if its upload had failed.
    fn failed(&self, bytes: u64, hash: &[u8; 20], e: Error) {
        self.failures.defer(e);
        self.shared.counters.failed.fetch_add(1, Relaxed);
        self.shared.unresolved.fetch_sub(1, Relaxed);
        self.shared.release(bytes);
        self.shared.forget([hash]);
    }

    async fn send_upload(&mut self, items: Vec<Item>) {
        let mut decoded = Vec::with_capacity(items.len());
        let mut bytes = 0;
        for item in items {
            let (size, hash) = (item.bytes(), item.hash);
            match item.decode(self.client.store_dir()) {
                Ok(d) => {
                    bytes += size;
                    decoded.push(d);
                }
                Err(e) => self.failed(size, &hash, e),
            }
        }
        if decoded.is_empty() {
            return;
        }
        let n = decoded.len() as u64;
        let paths: Vec<StorePath> = decoded.iter().map(|(path, ..)| path.clone()).collect();
        let c = &self.shared.counters;
        c.uploaded.fetch_add(n, Relaxed);
        c.upload_batches.fetch_add(1, Relaxed);
        self.shared.unacknowledged.fetch_add(1, Relaxed);
        trace!(paths = n, bytes, "upload");
        let (shared, failures) = (self.shared.clone(), self.failures.clone());
        // Runs on the reader, before the next reply is delivered, so that the call
        // that waits next sees the failure and the counters are up to date.
        let done = move |r: Result<()>| {
            let hashes = paths.iter().map(StorePath::hash_bytes);
            match r {
                Ok(()) => shared.confirm(hashes),
                Err(e) => {
                    failures.defer(e);
                    shared.counters.failed.fetch_add(paths.len() as u64, Relaxed);
                    // Let a later add of these paths try again.
                    shared.forget(hashes);
                }
            }
            shared.release(bytes);
            shared.unacknowledged.fetch_sub(1, Relaxed);
        };
        if self.client.version().at_least(32) {
            let nars: Vec<(ValidPathInfo, Vec<u8>)> =
                decoded.into_iter().map(|(path, add, ca)| add.into_nar(path, ca)).collect();
            self.client.add_multiple_to_store(&nars, false, false).send_then(done).await;
        } else {
            let [(path, add, _)] = <[_; 1]>::try_from(decoded).unwrap_or_else(|_| unreachable!("one path per upload"));
            let printed = self.client.store_dir().print(&path);
            let check = move |info: &ValidPathInfo| {
                if info.path == path {
                    Ok(())
                } else {
                    Err(Error::UnexpectedReply(format!("the daemon added '{printed}' at another path")))
                }
            };
            self.client
                .add_to_store(&add.name, add.method, add.algo, &add.references, false, Body::Bytes(add.data))
                .check(check)
                .send_then(move |r| done(r.map(|_| ())))
                .await;
        }
        self.shared.unresolved.fetch_sub(n, Relaxed);
    }
}

/// The validity checks on the connection, each with its items, and the drains
/// waiting for them.
///
/// While the connection lives, the daemon answers checks in the order they were
/// sent. When it breaks, that order is lost: a check made after the break fails at
/// once, while earlier ones still queued for the writer fail only when it drops its
/// queue. So an answer is matched to its check by id, and a drain is answered when
/// no check sent before it is left, not when the check it came after is answered.
struct Checks<I> {
    sent: VecDeque<(u64, I)>,
    next_id: u64,
    /// Drains, each waiting for every check with an id below its own.
    drains: Vec<(u64, oneshot::Sender<()>)>,
}

impl<I> Default for Checks<I> {
    fn default() -> Self {
        Checks { sent: VecDeque::new(), next_id: 0, drains: Vec::new() }
    }
}

impl<I> Checks<I> {
    /// Records a check about to be sent; returns its id.
    fn push(&mut self, items: I) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.sent.push_back((id, items));
        id
    }

    fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    /// The items of check `id`, which has been answered; `None` if it was already.
    fn answer(&mut self, id: u64) -> Option<I> {
        let at = self.sent.iter().position(|(sent, _)| *sent == id)?;
        self.sent.remove(at).map(|(_, items)| items)
    }

    /// Answers `tx` once every check recorded so far has been answered (and its
    /// missing paths' uploads sent): at once if none is left.
    fn drain(&mut self, tx: oneshot::Sender<()>) {
        self.drains.push((self.next_id, tx));
        self.release_drains();
    }

    /// Answers the drains that no longer wait for any check.
    fn release_drains(&mut self) {
        let oldest = self.sent.front().map_or(self.next_id, |(id, _)| *id);
        let (ready, waiting) = std::mem::take(&mut self.drains).into_iter().partition(|(upto, _)| *upto <= oldest);
        self.drains = waiting;
        for (_, tx) in ready {
            let _ = tx.send(());
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Store paths by the 20 bytes of their hash part, which names them uniquely (the
/// name is hashed into it). Those bytes are a digest already: the set uses eight of
/// them as the hash rather than hashing them again.
type PathSet = HashSet<[u8; 20], BuildHasherDefault<DigestHasher>>;

/// See [`Shared::added`].
type AddedMap = HashMap<[u8; 20], Option<Item>, BuildHasherDefault<DigestHasher>>;

#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        // An array is hashed as its length and then its bytes; keep the bytes.
        if let Some(first) = bytes.first_chunk::<8>() {
            self.0 = u64::from_le_bytes(*first);
        }
    }

    fn write_usize(&mut self, _: usize) {}

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Copies of contents, cut from shared chunks: one allocation per chunk rather
/// than two per add, and dropping a copy, on whichever thread, only lowers the
/// chunk's count. A chunk is freed when its last copy is.
#[derive(Default)]
struct Arena {
    chunk: BytesMut,
}

impl Arena {
    const CHUNK: usize = 64 << 10;

    /// `parts`, one after the other.
    fn copy(&mut self, parts: &[&[u8]]) -> Bytes {
        let len = parts.iter().map(|p| p.len()).sum();
        if len > Self::CHUNK / 8 {
            // Large contents get their own allocation, freed with them.
            let mut own = BytesMut::with_capacity(len);
            parts.iter().for_each(|p| own.extend_from_slice(p));
            return own.freeze();
        }
        if self.chunk.capacity() - self.chunk.len() < len {
            self.chunk = BytesMut::with_capacity(Self::CHUNK);
        }
        parts.iter().for_each(|p| self.chunk.extend_from_slice(p));
        self.chunk.split().freeze()
    }
}

/// The references of a computed add as the add keeps them: base names, checked,
/// separated by spaces.
fn join_base_names<R: AsRef<str>>(references: &[R]) -> Result<String> {
    let mut joined = String::with_capacity(references.iter().map(|r| r.as_ref().len() + 1).sum());
    for r in references {
        let r = r.as_ref();
        StorePath::check_base_name(r)?;
        if !joined.is_empty() {
            joined.push(' ');
        }
        joined.push_str(r);
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(rx: &mut oneshot::Receiver<()>) -> bool {
        rx.try_recv().is_ok()
    }

    #[test]
    fn a_drain_waits_for_the_checks_before_it() {
        let mut checks = Checks::default();
        let (a, b) = (checks.push("a"), checks.push("b"));
        let (tx, mut rx) = oneshot::channel();
        checks.drain(tx);
        let c = checks.push("c");
        assert_eq!(checks.answer(a), Some("a"));
        checks.release_drains();
        assert!(!drained(&mut rx));
        assert_eq!(checks.answer(b), Some("b"));
        checks.release_drains();
        assert!(drained(&mut rx), "the check after the drain is not waited for");
        assert_eq!(checks.answer(c), Some("c"));
        assert!(checks.is_empty());
    }

    #[test]
    fn a_drain_with_nothing_outstanding_is_answered_at_once() {
        let mut checks = Checks::<()>::default();
        let (tx, mut rx) = oneshot::channel();
        checks.drain(tx);
        assert!(drained(&mut rx));
    }

    /// A broken connection fails a check made after the break before the earlier
    /// ones still queued: a drain made in between still ends once they fail.
    #[test]
    fn answers_out_of_order_still_release_every_drain() {
        let mut checks = Checks::default();
        let (first, second) = (checks.push(1), checks.push(2));
        let (early, mut early_rx) = oneshot::channel();
        checks.drain(early);
        assert_eq!(checks.answer(second), Some(2));
        checks.release_drains();
        let (late, mut late_rx) = oneshot::channel();
        checks.drain(late);
        assert!(!drained(&mut early_rx) && !drained(&mut late_rx));
        assert_eq!(checks.answer(first), Some(1));
        checks.release_drains();
        assert!(drained(&mut early_rx) && drained(&mut late_rx));
        assert_eq!(checks.answer(first), None, "answered twice");
        assert!(checks.is_empty());
    }
}
