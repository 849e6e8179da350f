//! The upload logic against a scripted daemon, on tokio's paused clock: when checks
//! go out, what is rooted, checked and uploaded, and when an add waits for memory.
//! Time only moves when every task is idle, so each figure is exact whatever the
//! machine. (The real daemon is exercised by the workspace's `tests` crate.)

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rust_store::hash::HashAlgo;
use rust_store::protocol::*;
use rust_store::store_path::ContentAddressMethod;
use rust_store::uploads::{CaAdd, UploadOptions, Uploads};
use rust_store::{Client, ConnectOptions, StorePath};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;

/// What the scripted daemon received, and when (since it started).
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Root(Duration, String),
    Roots(Duration, Vec<String>),
    Check(Duration, Vec<String>),
    /// An AddMultipleToStore, with the number of paths in it.
    Upload(Duration, u64),
}

/// How the scripted daemon behaves.
#[derive(Clone)]
struct Script {
    /// Offer the `addTempRoots` feature.
    add_temp_roots: bool,
    /// Which paths (by printed name) it reports valid.
    valid: fn(&str) -> bool,
    /// How long it takes to answer a check.
    check_time: Duration,
}

impl Default for Script {
    fn default() -> Self {
        Script { add_temp_roots: false, valid: |_| false, check_time: Duration::ZERO }
    }
}

struct Daemon {
    s: UnixStream,
    script: Script,
    seen: Arc<Mutex<Vec<Seen>>>,
    start: Instant,
}

impl Daemon {
    async fn u64(&mut self) -> Option<u64> {
        self.s.read_u64_le().await.ok()
    }

    async fn string(&mut self) -> String {
        let n = self.u64().await.unwrap() as usize;
        let mut b = vec![0u8; n.div_ceil(8) * 8];
        self.s.read_exact(&mut b).await.unwrap();
        b.truncate(n);
        String::from_utf8(b).unwrap()
    }

    async fn strings(&mut self) -> Vec<String> {
        let n = self.u64().await.unwrap();
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(self.string().await);
        }
        v
    }

    async fn put_u64(&mut self, n: u64) {
        self.s.write_all(&n.to_le_bytes()).await.unwrap();
    }

    async fn put_str(&mut self, s: &str) {
        self.put_u64(s.len() as u64).await;
        self.s.write_all(s.as_bytes()).await.unwrap();
        self.s.write_all(&[0u8; 8][..(8 - s.len() % 8) % 8]).await.unwrap();
    }

    fn see(&self, f: impl FnOnce(Duration) -> Seen) {
        self.seen.lock().unwrap().push(f(self.start.elapsed()));
    }

    /// A daemon of protocol 1.38 that answers what uploads send, until the client
    /// closes the connection.
    async fn serve(mut self) {
        assert_eq!(self.u64().await, Some(WORKER_MAGIC_1));
        self.u64().await;
        self.put_u64(WORKER_MAGIC_2).await;
        self.put_u64(0x100 | 38).await;
        self.strings().await;
        let features: Vec<&str> = if self.script.add_temp_roots { vec![FEATURE_ADD_TEMP_ROOTS] } else { vec![] };
        self.put_u64(features.len() as u64).await;
        for f in features {
            self.put_str(f).await;
        }
        self.u64().await;
        self.u64().await;
        self.put_str("scripted").await;
        self.put_u64(0).await;
        self.put_u64(STDERR_LAST).await;
        while let Some(op) = self.u64().await {
            match Op::from_code(op) {
                Some(Op::AddTempRoot) => {
                    let path = self.string().await;
                    self.see(|t| Seen::Root(t, path));
                    self.put_u64(STDERR_LAST).await;
                    self.put_u64(1).await;
                }
                Some(Op::AddTempRoots) => {
                    let paths = self.strings().await;
                    self.see(|t| Seen::Roots(t, paths));
                    self.put_u64(STDERR_LAST).await;
                    self.put_u64(1).await;
                }
                Some(Op::QueryValidPaths) => {
                    let paths = self.strings().await;
                    self.u64().await; // substitute
                    self.see(|t| Seen::Check(t, paths.clone()));
                    tokio::time::sleep(self.script.check_time).await;
                    let valid: Vec<&String> = paths.iter().filter(|p| (self.script.valid)(p)).collect();
                    self.put_u64(STDERR_LAST).await;
                    self.put_u64(valid.len() as u64).await;
                    for p in valid {
                        self.put_str(p).await;
                    }
                }
                Some(Op::AddMultipleToStore) => {
                    self.u64().await; // repair
                    self.u64().await; // dontCheckSigs
                    let mut data = Vec::new();
                    loop {
                        let n = self.u64().await.unwrap() as usize;
                        if n == 0 {
                            break;
                        }
                        let mut frame = vec![0u8; n];
                        self.s.read_exact(&mut frame).await.unwrap();
                        data.extend_from_slice(&frame);
                    }
                    let count = u64::from_le_bytes(data[..8].try_into().unwrap());
                    self.see(|t| Seen::Upload(t, count));
                    self.put_u64(STDERR_LAST).await;
                }
                other => panic!("the scripted daemon does not serve {other:?} ({op})"),
            }
        }
    }
}

/// A connection to a scripted daemon and the uploads on it.
async fn start(script: Script, options: UploadOptions) -> (Uploads, Arc<Mutex<Vec<Seen>>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let daemon = Daemon { s: b, script, seen: seen.clone(), start: Instant::now() };
    tokio::spawn(daemon.serve());
    let client = Client::from_stream(a, ConnectOptions { settings: None, ..ConnectOptions::default() }).await.unwrap();
    (Uploads::new(client, options), seen)
}

fn text(name: &str, data: &str) -> CaAdd {
    CaAdd {
        name: name.into(),
        method: ContentAddressMethod::Text,
        algo: HashAlgo::Sha256,
        references: BTreeSet::new(),
        data: data.as_bytes().to_vec(),
    }
}

async fn add(u: &Uploads, name: &str) -> StorePath {
    u.add(text(name, name)).await.unwrap_or_else(|_| panic!("{name} is computed here"))
}

fn seen(seen: &Mutex<Vec<Seen>>) -> Vec<Seen> {
    seen.lock().unwrap().clone()
}

fn printed(u: &Uploads, paths: &[&StorePath]) -> Vec<String> {
    let mut v: Vec<String> = paths.iter().map(|p| u.client().store_dir().print(p)).collect();
    v.sort();
    v
}

#[tokio::test(start_paused = true)]
async fn a_lone_add_is_checked_after_the_batch_delay_and_rooted_first() {
    let delay = Duration::from_millis(5);
    let (u, log) = start(Script::default(), UploadOptions { batch_delay: delay, ..UploadOptions::default() }).await;
    let begin = Instant::now();
    let p = add(&u, "lone").await;
    assert_eq!(begin.elapsed(), Duration::ZERO, "an add does not wait");
    // Nobody asks for it (a flush would send the check at once): the deadline does.
    tokio::time::sleep(delay * 2).await;
    assert!(u.is_idle());
    u.flush().await.unwrap();
    let all = seen(&log);
    let name = printed(&u, &[&p]);
    match &all[..] {
        [Seen::Root(_, r), Seen::Check(at, c), Seen::Upload(_, 1)] => {
            assert_eq!(r, &name[0]);
            assert_eq!(c, &name);
            // The handshake took no time on this clock: the check left at the deadline.
            assert_eq!(*at, delay, "{all:?}");
        }
        _ => panic!("{all:?}"),
    }
    assert_eq!(u.stats().check_batches, 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_goes_out_at_once() {
    let options = UploadOptions { check_batch: 4, batch_delay: Duration::from_secs(10), ..UploadOptions::default() };
    let (u, log) = start(Script { valid: |_| true, ..Script::default() }, options).await;
    let mut paths = Vec::new();
    for i in 0..4 {
        paths.push(add(&u, &format!("full-{i}")).await);
    }
    // Let the task and the daemon run; the clock does not move while they have work.
    while !u.is_idle() {
        tokio::task::yield_now().await;
    }
    let checks: Vec<Seen> = seen(&log).into_iter().filter(|s| matches!(s, Seen::Check(..))).collect();
    assert_eq!(checks, [Seen::Check(Duration::ZERO, printed(&u, &paths.iter().collect::<Vec<_>>()))]);
    assert_eq!(u.stats().valid, 4);
}

#[tokio::test(start_paused = true)]
async fn only_what_the_daemon_lacks_is_uploaded_and_a_repeat_sends_nothing() {
    // Valid: the paths whose name ends in an even digit.
    let script = Script {
        valid: |p| p.chars().last().and_then(|c| c.to_digit(10)).is_some_and(|d| d % 2 == 0),
        ..Script::default()
    };
    let (u, log) = start(script, UploadOptions::default()).await;
    let mut paths = Vec::new();
    for i in 0..10 {
        paths.push(add(&u, &format!("half-{i}")).await);
    }
    for i in 0..10 {
        add(&u, &format!("half-{i}")).await;
    }
    u.flush().await.unwrap();
    let all = seen(&log);
    let roots = all.iter().filter(|s| matches!(s, Seen::Root(..))).count();
    let checks: Vec<usize> =
        all.iter().filter_map(|s| if let Seen::Check(_, c) = s { Some(c.len()) } else { None }).collect();
    let uploads: Vec<u64> =
        all.iter().filter_map(|s| if let Seen::Upload(_, n) = s { Some(*n) } else { None }).collect();
    assert_eq!((roots, checks, uploads), (10, vec![10], vec![5]), "{all:?}");
    let s = u.stats();
    assert_eq!((s.added, s.repeated, s.valid, s.uploaded), (20, 10, 5, 5));
    for p in &paths {
        assert!(u.was_added(p.hash_bytes()) && !u.is_pending(p.hash_bytes()));
    }
}

#[tokio::test(start_paused = true)]
async fn with_add_temp_roots_a_check_roots_its_paths_in_one_request() {
    let (u, log) = start(Script { add_temp_roots: true, ..Script::default() }, UploadOptions::default()).await;
    assert!(u.client().has_add_temp_roots());
    let a = add(&u, "batch-a").await;
    let b = add(&u, "batch-b").await;
    let c = add(&u, "batch-c").await;
    u.flush().await.unwrap();
    let all = seen(&log);
    match &all[..] {
        [Seen::Roots(_, r), Seen::Check(_, c_), Seen::Upload(_, 3)] => {
            let mut r = r.clone();
            r.sort();
            assert_eq!(r, printed(&u, &[&a, &b, &c]));
            assert_eq!(c_.len(), 3);
        }
        _ => panic!("{all:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn without_the_feature_add_temp_roots_is_refused_unsent() {
    let (u, log) = start(Script::default(), UploadOptions::default()).await;
    let p = add(&u, "refused").await;
    let e = u.client().add_temp_roots(&BTreeSet::from([p])).await.unwrap_err();
    assert!(e.to_string().contains("addTempRoots"), "{e}");
    u.flush().await.unwrap();
    assert!(!seen(&log).iter().any(|s| matches!(s, Seen::Roots(..))));
}

#[tokio::test(start_paused = true)]
async fn an_add_beyond_the_memory_budget_waits_for_the_check_before_it() {
    let check_time = Duration::from_millis(50);
    let options =
        UploadOptions { max_pending_bytes: 300, batch_delay: Duration::from_millis(1), ..UploadOptions::default() };
    let (u, _log) = start(Script { valid: |_| true, check_time, ..Script::default() }, options).await;
    let begin = Instant::now();
    u.add(text("big-1", &"x".repeat(200))).await.unwrap();
    assert_eq!(begin.elapsed(), Duration::ZERO);
    // Does not fit beside the first: sends the first's check now, and waits for it.
    u.add(text("big-2", &"y".repeat(200))).await.unwrap();
    assert_eq!(begin.elapsed(), check_time, "waited for the first add's check, sent at once");
    let s = u.stats();
    assert_eq!((s.memory_waits, s.valid), (1, 1));
    assert!(s.peak_pending_bytes <= 300, "{s:?}");
    u.flush().await.unwrap();
}
