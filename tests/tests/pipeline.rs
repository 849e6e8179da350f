//! Pipelining against a real Nix 2.26.3 daemon: many requests in flight from many
//! tasks on one connection, a large upload with small requests behind it, and
//! failures in the middle of a pipeline.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rust_store::connection::Body;
use rust_store::error::Error;
use rust_store::hash::{Hash, HashAlgo};
use rust_store::nar::{self, NarEntry};
use rust_store::store_path::ContentAddressMethod;
use rust_store::{ConnectOptions, StoreDir};
use store_tests::{Daemon, Nix, Trust};

/// 10,000 mixed requests (temp roots, text adds, validity queries) from 8 tasks on
/// one connection: every reply matches its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_mixed_requests_from_eight_tasks() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = d.connect().await;
    let sd = c.store_dir().clone();

    // Some paths that exist, to query and root.
    let mut valid = Vec::new();
    for i in 0..50 {
        valid.push(
            c.add_text(&format!("base-{i}"), format!("base {i}").into_bytes(), &BTreeSet::new()).await.unwrap().path,
        );
    }
    let before = c.stats();

    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let c = c.clone();
        let sd = sd.clone();
        let valid = valid.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(t);
            let mut checked = 0;
            let mut pending = futures::stream::FuturesOrdered::new();
            for i in 0..1250u64 {
                let c = c.clone();
                let sd = sd.clone();
                let kind = rng.gen_range(0..4);
                let known = valid[rng.gen_range(0..valid.len())].clone();
                pending.push_back(async move {
                    match kind {
                        0 => {
                            c.add_temp_root(&known).await.unwrap();
                        }
                        1 => {
                            let name = format!("t{t}-{i}");
                            let text = format!("task {t} request {i}");
                            let info = c.add_text(&name, text.clone().into_bytes(), &BTreeSet::new()).await.unwrap();
                            assert_eq!(
                                info.path,
                                sd.compute_text_path(&name, text.as_bytes(), &BTreeSet::new()).unwrap()
                            );
                        }
                        2 => assert!(c.is_valid_path(&known).await.unwrap(), "{known} should be valid"),
                        _ => {
                            let absent =
                                sd.compute_text_path(&format!("absent-{t}-{i}"), b"", &BTreeSet::new()).unwrap();
                            assert!(!c.is_valid_path(&absent).await.unwrap(), "{absent} should not be valid");
                        }
                    }
                });
                // Keep up to 64 requests of this task in flight at once.
                if pending.len() >= 64 {
                    use futures::StreamExt;
                    pending.next().await;
                    checked += 1;
                }
            }
            use futures::StreamExt;
            while pending.next().await.is_some() {
                checked += 1;
            }
            checked
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 10_000);
    c.flush().await.unwrap();
    let after = c.stats();
    assert_eq!(after.total_requests() - before.total_requests(), 10_000);
    println!("{after}");
}

/// A 100 MiB NAR upload while small requests queue behind it: no deadlock, and all
/// succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_with_small_requests_behind() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = d.connect().await;
    let sd = c.store_dir().clone();
    let known = c.add_text("known", b"known".to_vec(), &BTreeSet::new()).await.unwrap().path;

    let mut rng = rand::rngs::StdRng::seed_from_u64(100);
    let mut contents = vec![0u8; 100 << 20];
    rng.fill(&mut contents[..]);
    let tree = NarEntry::Regular { executable: false, contents };
    let big_nar = nar::write_nar(&tree);
    let expected = sd
        .make_fixed_output_path(
            "big",
            ContentAddressMethod::Nar,
            &Hash::digest(HashAlgo::Sha256, &big_nar),
            &BTreeSet::new(),
            false,
        )
        .unwrap();

    let upload = {
        let c = c.clone();
        tokio::spawn(async move {
            c.add_to_store(
                "big",
                ContentAddressMethod::Nar,
                HashAlgo::Sha256,
                &BTreeSet::new(),
                false,
                Body::Bytes(big_nar),
            )
            .await
        })
    };
    // Small requests queue behind the upload on the same connection.
    let small: Vec<_> = (0..2000)
        .map(|_| {
            let c = c.clone();
            let known = known.clone();
            tokio::spawn(async move { c.is_valid_path(&known).await })
        })
        .collect();
    let start = Instant::now();
    let info =
        tokio::time::timeout(Duration::from_secs(120), upload).await.expect("upload deadlocked").unwrap().unwrap();
    assert_eq!(info.path, expected);
    for s in small {
        assert!(tokio::time::timeout(Duration::from_secs(60), s).await.expect("small request hung").unwrap().unwrap());
    }
    println!("100 MiB upload and 2000 small requests: {:?}", start.elapsed());
    // And a large reply: the same NAR back.
    let nar = c.nar_from_path(&info.path).await.unwrap();
    assert_eq!(Hash::digest(HashAlgo::Sha256, &nar.0), info.info.nar_hash);
}

/// A daemon error in the middle of a pipeline fails only that request.
#[tokio::test]
async fn daemon_error_fails_only_its_request() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = d.connect().await;
    let sd = c.store_dir().clone();
    let absent = sd.compute_text_path("absent", b"absent", &BTreeSet::new()).unwrap();

    // 300 requests in flight from one task, the 150th of which fails.
    let mut adds = Vec::new();
    let mut failing = None;
    for i in 0..300usize {
        if i == 150 {
            // Valid path syntax, but not in the store and no substituter: the daemon
            // reports an error and carries on.
            failing = Some(c.ensure_path(&absent).start().await.unwrap());
        }
        adds.push((i, c.add_text(&format!("p{i}"), vec![b'x'; i], &BTreeSet::new()).start().await.unwrap()));
    }
    let e = failing.unwrap().await.unwrap_err();
    let de = e.daemon_error().expect("a daemon error");
    assert_eq!(de.subject.as_deref(), Some(sd.print(&absent).as_str()));
    assert!(e.to_string().starts_with("EnsurePath '"), "{e}");
    for (i, add) in adds {
        let info = add.await.unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert_eq!(info.path, sd.compute_text_path(&format!("p{i}"), &vec![b'x'; i], &BTreeSet::new()).unwrap());
    }
    assert!(!c.is_valid_path(&absent).await.unwrap());
}

/// A request sent without waiting that fails is reported by the next call that
/// waits, naming the op and the path.
#[tokio::test]
async fn deferred_failure_surfaces_at_next_wait() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = d.connect().await;
    let sd = c.store_dir().clone();
    let absent = sd.compute_text_path("absent", b"absent", &BTreeSet::new()).unwrap();
    let present = c.add_text("present", b"present".to_vec(), &BTreeSet::new()).await.unwrap().path;

    for _ in 0..100 {
        c.add_temp_root(&present).send().await.unwrap();
    }
    c.ensure_path(&absent).send().await.unwrap();
    for _ in 0..100 {
        c.add_temp_root(&present).send().await.unwrap();
    }
    let e = c.is_valid_path(&present).await.unwrap_err();
    match &e {
        Error::Deferred { first, more } => {
            assert_eq!(*more, 0);
            let de = first.daemon_error().unwrap();
            assert_eq!(de.op, rust_store::protocol::Op::EnsurePath);
            assert_eq!(de.subject.as_deref(), Some(sd.print(&absent).as_str()));
        }
        other => panic!("expected a deferred error, got {other}"),
    }
    assert!(e.to_string().contains(&sd.print(&absent)), "{e}");
    // Reported once: the connection goes on.
    assert!(c.is_valid_path(&present).await.unwrap());

    // flush() is a sync point too.
    c.ensure_path(&absent).send().await.unwrap();
    assert!(matches!(c.flush().await, Err(Error::Deferred { .. })));
    c.flush().await.unwrap();
}

/// A connection-fatal error (a store path the daemon cannot parse: here, one printed
/// with the wrong store directory) fails every pending request with a clear error.
#[tokio::test]
async fn connection_fatal_error_fails_all_pending() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let wrong = StoreDir::new("/wrong/store").unwrap();
    let c = d.connect_with(ConnectOptions { store_dir: wrong.clone(), ..d.options() }).await;
    let path = wrong.compute_text_path("x", b"x", &BTreeSet::new()).unwrap();

    // Requests without paths succeed before the fatal one.
    let mut before = Vec::new();
    for _ in 0..20 {
        before.push(c.query_path_from_hash_part("00000000000000000000000000000000").start().await.unwrap());
    }
    let fatal = c.is_valid_path(&path).start().await.unwrap();
    let mut behind = Vec::new();
    for _ in 0..50 {
        behind.push(c.query_path_from_hash_part("00000000000000000000000000000000").start().await);
    }

    for b in before {
        assert_eq!(b.await.unwrap(), None);
    }
    let e = fatal.await.unwrap_err();
    assert!(e.to_string().contains("is not in the Nix store"), "{e}");
    for b in behind {
        // Refused at once if the connection was already known dead, else failed.
        let e = match b {
            Ok(pending) => {
                tokio::time::timeout(Duration::from_secs(5), pending).await.expect("pending request hung").unwrap_err()
            }
            Err(e) => e,
        };
        let msg = e.to_string();
        assert!(msg.contains("lost the connection") && msg.contains("closed the connection after"), "{msg}");
        assert!(msg.contains("is not in the Nix store"), "{msg}");
    }
    assert!(c.is_closed());
    assert!(c.flush().await.unwrap_err().is_disconnect());
}

/// Killing the daemon mid-pipeline fails every pending request within a second. The
/// daemon's worker is stopped first, so that requests are pending however fast the
/// machine is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_daemon_fails_pending_within_a_second() {
    let mut d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = d.connect().await;
    let first = c.add_text("k-first", b"kill test".to_vec(), &BTreeSet::new()).await.unwrap();
    assert!(!d.workers().is_empty());
    d.stop_workers();
    let mut calls = Vec::new();
    for i in 0..500 {
        calls.push(
            c.add_text(&format!("k{i}"), format!("kill test {i}").into_bytes(), &BTreeSet::new())
                .start()
                .await
                .unwrap(),
        );
    }
    let killed = Instant::now();
    d.kill();
    for call in calls {
        let r = tokio::time::timeout(Duration::from_secs(1), call)
            .await
            .expect("request still pending a second after the kill");
        let e = r.expect_err("the stopped daemon answered");
        assert!(e.is_disconnect(), "{e}");
    }
    let elapsed = killed.elapsed();
    println!("500 pending requests failed {elapsed:?} after the kill");
    assert!(c.add_temp_root(&first.path).await.unwrap_err().is_disconnect());
}

/// A check attached to a request sent without waiting runs when its reply arrives;
/// its failure surfaces at the next call that waits.
#[tokio::test]
async fn failed_check_surfaces_like_a_daemon_error() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = d.connect().await;
    let wrong = c.store_dir().compute_text_path("other", b"", &BTreeSet::new()).unwrap();
    c.add_text("checked", b"checked".to_vec(), &BTreeSet::new())
        .check(move |info| {
            if info.path == wrong {
                Ok(())
            } else {
                Err(rust_store::error::Error::UnexpectedReply(format!("stored at {}", info.path)))
            }
        })
        .send()
        .await
        .unwrap();
    let e = c.flush().await.unwrap_err();
    assert!(e.to_string().contains("-checked"), "{e}");
    c.flush().await.unwrap();
}
