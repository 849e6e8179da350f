//! rust-store's uploads (root, check validity in batches, upload only what is missing)
//! against real daemons: what is skipped and what is uploaded, the fallback for
//! daemons before protocol 1.32, the memory cap, and failures.

use std::collections::BTreeSet;
use std::sync::Arc;

use rust_store::hash::HashAlgo;
use rust_store::protocol::Op;
use rust_store::protocol::Version;
use rust_store::store_path::ContentAddressMethod;
use rust_store::uploads::{CaAdd, UploadOptions, Uploads};
use rust_store::{Client, ConnectOptions, StorePath};
use store_tests::{Daemon, Nix, Trust};

fn text(name: &str, contents: &str, references: BTreeSet<StorePath>) -> CaAdd {
    CaAdd {
        name: name.into(),
        method: ContentAddressMethod::Text,
        algo: HashAlgo::Sha256,
        references,
        data: contents.as_bytes().to_vec(),
    }
}

/// `n` texts, each referring to the one before, so that uploads must keep their order.
fn chain(c: &Client, tag: &str, n: usize) -> Vec<CaAdd> {
    let mut out = Vec::new();
    let mut previous: Option<StorePath> = None;
    for i in 0..n {
        let add = text(&format!("{tag}-{i}"), &format!("{tag} text {i}\n"), previous.iter().cloned().collect());
        previous = add.path(c.store_dir());
        out.push(add);
    }
    out
}

async fn add_all(u: &Uploads, adds: Vec<CaAdd>) -> Vec<StorePath> {
    let mut paths = Vec::new();
    for a in adds {
        paths.push(u.add(a).await.unwrap_or_else(|a| panic!("{} was given back", a.name)));
    }
    paths
}

async fn assert_valid(c: &Client, paths: &[StorePath]) {
    let set: BTreeSet<StorePath> = paths.iter().cloned().collect();
    let valid = c.query_valid_paths(&set, false).await.unwrap();
    assert_eq!(valid.len(), set.len(), "{} of {} paths are valid", valid.len(), set.len());
}

/// With the first half of a chain in the store, only the second half is uploaded,
/// in few requests; the same adds again send nothing.
#[tokio::test]
async fn skips_valid_paths_and_uploads_the_rest() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = d.connect().await;
    let adds = chain(&c, "skip", 400);
    for a in &adds[..200] {
        c.add_text(&a.name, a.data.clone(), &a.references).send().await.unwrap();
    }
    c.flush().await.unwrap();

    let u = Uploads::new(c.clone(), UploadOptions::default());
    let paths = add_all(&u, adds.clone()).await;
    u.drain().await.unwrap();
    c.flush().await.unwrap();
    assert_valid(&c, &paths).await;
    let s = u.stats();
    assert_eq!((s.added, s.valid, s.uploaded, s.failed), (400, 200, 200, 0), "{s}");
    assert!(s.upload_batches <= 10 && s.check_batches <= 10, "{s}");
    assert!(u.is_idle());

    let before = c.stats().total_requests();
    add_all(&u, adds).await;
    u.drain().await.unwrap();
    assert_eq!(c.stats().total_requests(), before, "repeated adds sent requests");
    assert_eq!(u.stats().repeated, 400);
}

/// Protocol 1.31 has no AddMultipleToStore: one AddToStore per missing path.
#[tokio::test]
async fn falls_back_to_add_to_store_before_protocol_1_32() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = d.connect_with(ConnectOptions { max_version: Version::new(1, 31), ..d.options() }).await;
    let u = Uploads::new(c.clone(), UploadOptions::default());
    let paths = add_all(&u, chain(&c, "old", 50)).await;
    u.drain().await.unwrap();
    c.flush().await.unwrap();
    assert_valid(&c, &paths).await;
    let s = u.stats();
    assert_eq!((s.uploaded, s.upload_batches), (50, 50), "{s}");
    let requests = c.stats().requests;
    assert!(requests.contains(&(Op::AddToStore, 50)), "{requests:?}");
    assert!(!requests.iter().any(|(op, _)| *op == Op::AddMultipleToStore), "{requests:?}");
}

/// Nix 2.8.0's daemon: uploads, then finds everything valid on a new connection.
#[tokio::test]
async fn works_against_nix_2_8() {
    let d = Daemon::start(Nix::V2_8, Trust::Untrusted);
    for expect_valid in [0, 100] {
        let c = d.connect().await;
        let u = Uploads::new(c.clone(), UploadOptions::default());
        let paths = add_all(&u, chain(&c, "v28", 100)).await;
        u.drain().await.unwrap();
        c.flush().await.unwrap();
        assert_valid(&c, &paths).await;
        let s = u.stats();
        assert_eq!((s.valid, s.uploaded), (expect_valid, 100 - expect_valid), "{s}");
    }
}

/// A small memory cap: adds wait for room, the contents held never exceed it, and
/// everything arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_cap_bounds_the_contents_held() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = d.connect().await;
    let cap = 16 << 10;
    let u = Uploads::new(c.clone(), UploadOptions { max_pending_bytes: cap, ..UploadOptions::default() });
    let adds: Vec<CaAdd> =
        (0..500).map(|i| text(&format!("cap-{i}"), &format!("{i:01024}"), BTreeSet::new())).collect();
    let paths = add_all(&u, adds).await;
    u.drain().await.unwrap();
    c.flush().await.unwrap();
    assert_valid(&c, &paths).await;
    let s = u.stats();
    assert!(s.memory_waits > 0, "{s}");
    assert!(s.peak_pending_bytes <= cap, "{s}");
    assert_eq!(s.uploaded, 500, "{s}");
}

/// Adds at paths the caller computed, given as the fork's C++ gives them (base names,
/// the method as text, the references' base names), are uploaded with their
/// references when missing and skipped when valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn computed_adds_upload_with_their_references() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = d.connect().await;
    let adds = chain(&c, "computed", 60);
    for a in &adds[..20] {
        c.add_text(&a.name, a.data.clone(), &a.references).send().await.unwrap();
    }
    c.flush().await.unwrap();

    let u = Arc::new(Uploads::new(c.clone(), UploadOptions::default()));
    let (u2, given) = (u.clone(), adds.clone());
    let store_dir = c.store_dir().clone();
    let paths = tokio::task::spawn_blocking(move || {
        let mut paths = Vec::new();
        for a in given {
            let path = a.path(&store_dir).unwrap();
            let refs: Vec<String> = a.references.iter().map(StorePath::to_string).collect();
            u2.add_computed_blocking(&path.to_string(), "text:sha256", &refs, &a.data).unwrap();
            paths.push(path);
        }
        paths
    })
    .await
    .unwrap();
    u.drain().await.unwrap();
    c.flush().await.unwrap();
    assert_valid(&c, &paths).await;
    for (path, add) in paths.iter().zip(&adds) {
        let info = c.query_path_info(path).await.unwrap().unwrap();
        assert_eq!(info.references, add.references, "{path}");
    }
    let s = u.stats();
    assert_eq!((s.added, s.valid, s.uploaded, s.failed), (60, 20, 40, 0), "{s}");

    // A base name that is not one fails at once, naming it.
    let e = u.add_computed_blocking::<&str>("not-a-store-path", "text:sha256", &[], b"").unwrap_err().to_string();
    assert!(e.contains("not-a-store-path"), "{e}");
}

/// Failures surface at the next wait, naming what failed: contents that do not
/// match the path they were added at (caught before sending), and an upload the
/// daemon refuses (a reference that is not valid). A failed path can be added again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_surface_at_the_next_wait() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = d.connect().await;
    let u = Arc::new(Uploads::new(c.clone(), UploadOptions::default()));

    // Given as the fork's C++ gives it.
    let wrong = text("mismatch", "these contents", BTreeSet::new());
    let other = text("mismatch", "other contents", BTreeSet::new()).path(c.store_dir()).unwrap();
    let u2 = u.clone();
    let add = move || u2.add_computed_blocking::<&str>(&other.to_string(), "text:sha256", &[], &wrong.data);
    tokio::task::spawn_blocking(add).await.unwrap().unwrap();
    u.drain().await.unwrap();
    let e = c.flush().await.unwrap_err().to_string();
    assert!(e.contains("is not the path of its contents"), "{e}");

    let missing = text("missing-ref", "never added", BTreeSet::new()).path(c.store_dir()).unwrap();
    let dangling = text("dangling", "refers to a path that is not valid", [missing].into());
    let path = u.add(dangling.clone()).await.unwrap();
    u.drain().await.unwrap();
    let e = c.flush().await.unwrap_err().to_string();
    assert!(e.contains("AddMultipleToStore"), "{e}");
    let s = u.stats();
    assert_eq!(s.failed, 2, "{s}");
    assert!(u.is_idle());

    // Not remembered as added: a second try is sent (and fails the same way).
    u.add(dangling).await.unwrap();
    u.drain().await.unwrap();
    assert!(c.flush().await.is_err());
    assert_eq!(u.stats().failed, 3);
    assert!(!c.is_valid_path(&path).await.unwrap());
}

/// Adds whose path is not computed here are given back, untouched.
#[tokio::test]
async fn gives_back_adds_it_cannot_compute() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = d.connect().await;
    let u = Uploads::new(c.clone(), UploadOptions::default());
    let git = CaAdd { method: ContentAddressMethod::Git, algo: HashAlgo::Sha1, ..text("git", "x", BTreeSet::new()) };
    let back = u.add(git).await.unwrap_err();
    assert_eq!(back.name, "git");
    assert_eq!(u.stats().added, 0);
}

/// A path just added is known to this connection at once: valid, with its NAR held
/// until the daemon confirms it (the NAR the daemon then has), and a wait for it
/// returns once it is confirmed, without a drain. A path added with a batch delay
/// far longer than the test waits is confirmed only because a wait asked for it.
#[tokio::test]
async fn added_paths_are_read_from_what_is_held_until_confirmed() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = d.connect().await;
    let options = UploadOptions { batch_delay: std::time::Duration::from_secs(3600), ..UploadOptions::default() };
    let u = Uploads::new(c.clone(), options);
    let adds = chain(&c, "held", 3);
    let paths = add_all(&u, adds.clone()).await;
    let [first, _, last] = [0, 1, 2].map(|i| *paths[i].hash_bytes());
    let unknown = *text("unknown", "never added", BTreeSet::new()).path(c.store_dir()).unwrap().hash_bytes();

    assert!(u.was_added(&first) && u.is_pending(&first) && !u.was_added(&unknown));
    let held = u.held_nar(&last).expect("a pending path's NAR");
    assert!(u.held_nar(&unknown).is_none());

    u.wait_for(&unknown).await.unwrap();
    u.wait_for(&first).await.unwrap();
    assert!(!u.is_pending(&first) && u.was_added(&first) && u.held_nar(&first).is_none());
    // One check went out for all three, so all three were uploaded together.
    assert!(!u.is_pending(&last));
    let s = u.stats();
    assert_eq!((s.path_waits, s.drains, s.check_batches, s.uploaded), (1, 0, 1, 3), "{s}");
    let nar = c.nar_from_path(&paths[2]).await.unwrap().0;
    assert!(nar == held, "the held NAR is not the daemon's");
}

/// Temp roots from many threads while uploads run, on a connection with room for
/// only two requests in flight and a runtime with one worker, as the bridge runs it:
/// a root that waits for room in the queue must not hold anything the upload task
/// needs, or the task blocks the only worker and the queue never drains. Bounded in
/// time: a hang fails the test (leaving the stuck runtime behind, since dropping it
/// would wait for its worker).
#[test]
fn temp_roots_waiting_for_room_do_not_block_the_uploads() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let c = rt.block_on(d.connect_with(ConnectOptions { max_in_flight: 2, ..d.options() }));
    let options = UploadOptions { check_batch: 4, batch_delay: std::time::Duration::ZERO, ..UploadOptions::default() };
    let u = Arc::new(rt.block_on(async { Uploads::new(c.clone(), options) }));
    let adds = chain(&c, "roots", 400);
    let paths: Vec<StorePath> = adds.iter().map(|a| a.path(c.store_dir()).unwrap()).collect();
    // As the bridge hands them over: base name, references, contents.
    let computed: Vec<(String, Vec<String>, Vec<u8>)> = adds
        .iter()
        .zip(&paths)
        .map(|(a, p)| {
            let refs = a.references.iter().map(StorePath::to_string).collect::<Vec<_>>();
            (p.to_string(), refs, a.data.clone())
        })
        .collect();
    let work = {
        let (u, paths) = (u.clone(), paths.clone());
        std::thread::spawn(move || {
            std::thread::scope(|s| {
                // An adder, as the evaluator adds.
                s.spawn(|| {
                    for (base_name, refs, data) in &computed {
                        u.add_computed_blocking(base_name, "text:sha256", refs, data).unwrap();
                    }
                });
                // Rooters, each rooting the paths, racing the task's own roots.
                for t in 0..4 {
                    let (u, paths) = (&u, &paths);
                    s.spawn(move || {
                        for p in paths.iter().skip(t) {
                            u.add_temp_root(p).unwrap();
                        }
                    });
                }
            })
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !work.is_finished() {
        if std::time::Instant::now() > deadline {
            std::mem::forget((rt, u, c));
            panic!("temp roots and uploads deadlocked");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    work.join().unwrap();
    rt.block_on(async {
        u.drain().await.unwrap();
        c.flush().await.unwrap();
        assert_valid(&c, &paths).await;
    });
}
