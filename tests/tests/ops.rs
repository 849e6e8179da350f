//! Every op against a real Nix 2.26.3 daemon, as an untrusted and as a trusted client,
//! and a handful against 2.8.0.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use rust_store::connection::Body;
use rust_store::error::Error;
use rust_store::hash::{Hash, HashAlgo};
use rust_store::logger::{Activity, Field, Logger};
use rust_store::nar;
use rust_store::protocol::Op;
use rust_store::protocol::Version;
use rust_store::store_path::{ContentAddress, ContentAddressMethod, StorePath};
use rust_store::types::*;
use rust_store::{Client, ConnectOptions};
use store_tests::{Daemon, Nix, Trust};

/// Keeps the daemon's log lines for inspection.
#[derive(Default)]
struct Captured(Mutex<Vec<String>>);

impl Logger for Captured {
    fn log(&self, line: &str) {
        self.0.lock().unwrap().push(line.to_owned());
    }
    fn start_activity(&self, a: Activity) {
        self.0.lock().unwrap().push(format!("start {}", a.text));
    }
    fn stop_activity(&self, _: u64) {}
    fn result(&self, _: u64, _: u64, _: Vec<Field>) {}
}

fn refs(paths: &[&StorePath]) -> BTreeSet<StorePath> {
    paths.iter().map(|p| (*p).clone()).collect()
}

fn daemon_message(e: &Error) -> String {
    e.daemon_error().map(|d| d.message.clone()).unwrap_or_else(|| panic!("expected a daemon error, got: {e}"))
}

/// Instantiates a derivation with the Nix CLI, returning its .drv path.
fn instantiate(d: &Daemon, c: &Client, name: &str, script: &str) -> StorePath {
    let expr = format!(
        r#"derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "{script}" ]; }}"#
    );
    let out = d.nix_ok(&["nix-instantiate", "--expr", &expr]);
    c.store_dir().parse(out.trim()).unwrap()
}

async fn queries_and_adds(d: &Daemon, c: &Client) {
    let sd = c.store_dir().clone();

    // AddToStore, text: what writeDerivation and builtins.toFile send.
    let hello = c.add_text("hello.txt", b"hello\n".to_vec(), &BTreeSet::new()).await.unwrap();
    assert_eq!(hello.path, sd.compute_text_path("hello.txt", b"hello\n", &BTreeSet::new()).unwrap());
    let nar_bytes = nar::dump_flat_file_contents(b"hello\n");
    assert_eq!(hello.info.nar_hash, Hash::digest(HashAlgo::Sha256, &nar_bytes));
    assert_eq!(hello.info.nar_size, nar_bytes.len() as u64);
    assert_eq!(hello.info.ca.as_ref().map(|ca| ca.method), Some(ContentAddressMethod::Text));

    // A text with a reference, and the obsolete AddTextToStore.
    let greeting = c
        .add_text("greeting", format!("see {}", sd.print(&hello.path)).into_bytes(), &refs(&[&hello.path]))
        .await
        .unwrap();
    assert_eq!(greeting.info.references, refs(&[&hello.path]));
    let old = c.add_text_to_store("old.txt", b"old", &BTreeSet::new()).await.unwrap();
    assert_eq!(old, sd.compute_text_path("old.txt", b"old", &BTreeSet::new()).unwrap());

    // AddToStore, flat and NAR.
    let flat = c
        .add_to_store(
            "flat",
            ContentAddressMethod::Flat,
            HashAlgo::Sha256,
            &BTreeSet::new(),
            false,
            Body::Bytes(b"flat data".to_vec()),
        )
        .await
        .unwrap();
    let flat_hash = Hash::digest(HashAlgo::Sha256, b"flat data");
    assert_eq!(
        flat.path,
        sd.make_fixed_output_path("flat", ContentAddressMethod::Flat, &flat_hash, &BTreeSet::new(), false).unwrap()
    );
    let tree = nar::NarEntry::Directory(BTreeMap::from([
        ("a".to_string(), nar::NarEntry::Regular { executable: true, contents: b"#!/bin/sh\n".to_vec() }),
        ("b".to_string(), nar::NarEntry::Symlink { target: "a".into() }),
    ]));
    let tree_nar = nar::write_nar(&tree);
    let dir = c
        .add_to_store(
            "tree",
            ContentAddressMethod::Nar,
            HashAlgo::Sha256,
            &BTreeSet::new(),
            false,
            Body::Bytes(tree_nar.clone()),
        )
        .await
        .unwrap();
    let tree_hash = Hash::digest(HashAlgo::Sha256, &tree_nar);
    assert_eq!(
        dir.path,
        sd.make_fixed_output_path("tree", ContentAddressMethod::Nar, &tree_hash, &BTreeSet::new(), false).unwrap()
    );

    // NarFromPath gives back the same NAR.
    assert_eq!(c.nar_from_path(&dir.path).await.unwrap().0, tree_nar);
    assert_eq!(c.nar_from_path(&hello.path).await.unwrap().0, nar_bytes);

    // Validity.
    let missing = sd.compute_text_path("never-added", b"x", &BTreeSet::new()).unwrap();
    assert!(c.is_valid_path(&hello.path).await.unwrap());
    assert!(!c.is_valid_path(&missing).await.unwrap());
    let valid = c.query_valid_paths(&refs(&[&hello.path, &missing, &dir.path]), false).await.unwrap();
    assert_eq!(valid, refs(&[&hello.path, &dir.path]));
    let all = c.query_all_valid_paths().await.unwrap();
    assert!(all.contains(&hello.path) && all.contains(&greeting.path) && all.contains(&flat.path));
    assert!(c.query_path_info(&missing).await.unwrap().is_none());
    let info = c.query_path_info(&greeting.path).await.unwrap().unwrap();
    assert_eq!(info, greeting.info);

    // Reverse queries.
    assert_eq!(c.query_referrers(&hello.path).await.unwrap(), refs(&[&greeting.path]));
    assert_eq!(c.query_path_from_hash_part(&hello.path.hash_part()).await.unwrap(), Some(hello.path.clone()));
    assert_eq!(c.query_path_from_hash_part(&missing.hash_part()).await.unwrap(), None);

    // Substitutes: this daemon has no substituters.
    assert!(c.query_substitutable_paths(&refs(&[&missing])).await.unwrap().is_empty());
    let mut wanted = BTreeMap::new();
    wanted.insert(missing.clone(), None);
    wanted.insert(hello.path.clone(), hello.info.ca.clone());
    assert!(c.query_substitutable_path_infos(&wanted).await.unwrap().is_empty());

    // AddMultipleToStore and AddToStoreNar with content-addressed paths, which the
    // daemon accepts from untrusted clients too.
    let mut items = Vec::new();
    for i in 0..3 {
        let contents = format!("multi {i}");
        let nar = nar::dump_flat_file_contents(contents.as_bytes());
        let ca = ContentAddress {
            method: ContentAddressMethod::Text,
            hash: Hash::digest(HashAlgo::Sha256, contents.as_bytes()),
        };
        let path = sd.make_fixed_output_path_from_ca("multi", &ca, &BTreeSet::new(), false).unwrap();
        let mut info = UnkeyedValidPathInfo::new(Hash::digest(HashAlgo::Sha256, &nar), nar.len() as u64);
        info.ca = Some(ca);
        items.push((ValidPathInfo { path, info }, nar));
    }
    let (last, last_nar) = items.pop().unwrap();
    c.add_multiple_to_store(&items, false, false).await.unwrap();
    c.add_to_store_nar(&last, false, false, Body::Bytes(last_nar)).await.unwrap();
    for (info, _) in items.iter().chain([&(last.clone(), vec![])]) {
        let got = c.query_path_info(&info.path).await.unwrap().expect("added path is valid");
        assert_eq!(got.nar_hash, info.info.nar_hash);
    }

    // Signatures (the daemon does not check who adds them).
    let sigs: BTreeSet<String> = ["test-key:c2lnbmF0dXJl".to_string()].into();
    c.add_signatures(&hello.path, &sigs).await.unwrap();
    let info = c.query_path_info(&hello.path).await.unwrap().unwrap();
    assert!(info.sigs.contains("test-key:c2lnbmF0dXJl"));

    // Temp and indirect roots.
    c.add_temp_root(&flat.path).await.unwrap();
    let link = d.inner_path("gcroot-link");
    std::os::unix::fs::symlink(sd.print(&dir.path), d.host_path("gcroot-link")).unwrap();
    c.add_indirect_root(&link).await.unwrap();
    let roots = c.find_roots().await.unwrap();
    assert!(roots.values().any(|p| *p == dir.path), "indirect root not found: {roots:?}");

    // Garbage collection: the temp-rooted and indirectly rooted paths survive,
    // an unrooted one is deleted on request.
    let doomed = sd.compute_text_path("doomed", b"doomed", &BTreeSet::new()).unwrap();
    c.add_text("doomed", b"doomed".to_vec(), &BTreeSet::new()).await.unwrap();
    let dead = c
        .collect_garbage(&GcOptions {
            action: GcAction::ReturnDead,
            paths_to_delete: BTreeSet::new(),
            ignore_liveness: false,
            max_freed: u64::MAX,
        })
        .await
        .unwrap();
    assert!(!dead.paths.contains(&sd.print(&flat.path)), "temp root reported dead");
    assert!(!dead.paths.contains(&sd.print(&dir.path)), "indirect root reported dead");
    // Paths added on a connection are its temp roots: another cannot delete them.
    let other = d.connect().await;
    let deleted = other
        .collect_garbage(&GcOptions {
            action: GcAction::DeleteSpecific,
            paths_to_delete: refs(&[&flat.path]),
            ignore_liveness: false,
            max_freed: u64::MAX,
        })
        .await;
    assert!(deleted.is_err(), "deleted a path another connection roots");
    let e = other
        .collect_garbage(&GcOptions {
            action: GcAction::DeleteDead,
            paths_to_delete: BTreeSet::new(),
            ignore_liveness: true,
            max_freed: u64::MAX,
        })
        .await
        .unwrap_err();
    assert!(daemon_message(&e).contains("not allowed to ignore liveness"), "{e}");
    assert!(!dead.paths.contains(&sd.print(&doomed)), "a path added on this connection is rooted");
    assert!(c.is_valid_path(&doomed).await.unwrap());

    // Store maintenance.
    c.optimise_store().await.unwrap();
    assert!(!c.verify_store(false, false).await.unwrap());
}

async fn builds(d: &Daemon, c: &Client, trust: Trust) {
    let sd = c.store_dir().clone();
    let drv = instantiate(d, c, "built", "echo built > $out");
    let target = [DerivedPath::Built { drv_path: drv.clone(), outputs: OutputsSpec::All }];

    let missing = c.query_missing(&target).await.unwrap();
    assert!(missing.will_build.contains(&drv), "{missing:?}");

    let outputs = c.query_derivation_output_map(&drv).await.unwrap();
    let out = outputs["out"].clone().expect("input-addressed output path is known");
    assert!(!c.is_valid_path(&out).await.unwrap());

    c.build_paths(&target, BuildMode::Normal).await.unwrap();
    assert!(c.is_valid_path(&out).await.unwrap());
    assert_eq!(std::fs::read_to_string(d.real_path(&sd.print(&out))).unwrap(), "built\n");
    assert!(c.query_valid_derivers(&out).await.unwrap().contains(&drv));
    c.ensure_path(&out).await.unwrap();

    let drv2 = instantiate(d, c, "built-with-results", "echo again > $out");
    let results = c
        .build_paths_with_results(
            &[DerivedPath::Built { drv_path: drv2.clone(), outputs: OutputsSpec::Names(["out".into()].into()) }],
            BuildMode::Normal,
        )
        .await
        .unwrap();
    assert_eq!(results.len(), 1);
    assert!(results[0].result.status.success(), "{:?}", results[0].result);
    assert!(results[0].result.built_outputs.contains_key("out"));

    // A failing build fails only its own request.
    let bad = instantiate(d, c, "failing", "exit 1");
    let e = c
        .build_paths(&[DerivedPath::Built { drv_path: bad, outputs: OutputsSpec::All }], BuildMode::Normal)
        .await
        .unwrap_err();
    assert!(daemon_message(&e).contains("failed"), "{e}");
    assert!(c.is_valid_path(&out).await.unwrap());

    // Repair is refused to untrusted clients, before the daemon starts its reply: it
    // closes the connection, so try it on a connection of its own.
    if trust == Trust::Untrusted {
        let c2 = d.connect().await;
        let e = c2.build_paths(&target, BuildMode::Repair).await.unwrap_err();
        assert!(format!("{e}").contains("repairing is not allowed"), "{e}");
        assert!(c2.is_valid_path(&out).await.unwrap_err().is_disconnect());
    }

    // BuildDerivation of an input-addressed derivation needs trust.
    let drv3 = instantiate(d, c, "basic", "echo basic > $out");
    let out3 = c.query_derivation_output_map(&drv3).await.unwrap()["out"].clone().unwrap();
    let basic = BasicDerivation {
        outputs: [(
            "out".to_string(),
            DerivationOutput { path: Some(out3.clone()), hash_algo: String::new(), hash: String::new() },
        )]
        .into(),
        input_srcs: BTreeSet::new(),
        platform: d
            .nix_ok(&["nix-instantiate", "--eval", "--expr", "builtins.currentSystem"])
            .trim()
            .trim_matches('"')
            .to_string(),
        builder: "/bin/sh".into(),
        args: vec!["-c".into(), "echo basic > $out".into()],
        env: [
            ("out".to_string(), sd.print(&out3)),
            ("name".into(), "basic".into()),
            ("builder".into(), "/bin/sh".into()),
        ]
        .into(),
    };
    let r = c.build_derivation(&drv3, &basic, BuildMode::Normal).await;
    match trust {
        Trust::Trusted => {
            let r = r.unwrap();
            assert!(r.status.success(), "{r:?}");
            assert!(c.is_valid_path(&out3).await.unwrap());
        }
        Trust::Untrusted => {
            let e = r.unwrap_err();
            assert!(daemon_message(&e).contains("not privileged to build input-addressed"), "{e}");
        }
    }
}

async fn privileged(d: &Daemon, c: &Client, trust: Trust) {
    let sd = c.store_dir().clone();
    let path = c.add_text("logged", b"logged".to_vec(), &BTreeSet::new()).await.unwrap().path;

    // AddBuildLog: refused locally to a client the daemon says it does not trust
    // (the daemon would leave the frames unread and lose the connection's framing).
    let drv = instantiate(d, c, "logged", "true");
    let e = c.add_build_log(&path, b"a build log\n".to_vec()).await.unwrap_err();
    assert!(e.to_string().contains("build logs belong to derivations"), "{e}");
    let r = c.add_build_log(&drv, b"a build log\n".to_vec()).await;
    match trust {
        Trust::Trusted => {
            r.unwrap();
            let printed = c.store_dir().print(&drv);
            assert_eq!(d.nix_ok(&["nix-store", "--read-log", &printed]), "a build log\n");
        }
        Trust::Untrusted => {
            assert!(format!("{}", r.unwrap_err()).contains("does not trust this client"), "untrusted build log")
        }
    }

    // AddToStoreNar of a path with no content address: needs a trusted client that
    // skips the signature check.
    let nar = nar::dump_flat_file_contents(b"input addressed");
    let ia = sd.make_store_path("output:out", &Hash::digest(HashAlgo::Sha256, b"ia"), "input-addressed").unwrap();
    let info = ValidPathInfo {
        path: ia.clone(),
        info: UnkeyedValidPathInfo::new(Hash::digest(HashAlgo::Sha256, &nar), nar.len() as u64),
    };
    let r = c.add_to_store_nar(&info, false, true, Body::Bytes(nar)).await;
    match trust {
        Trust::Trusted => r.unwrap(),
        Trust::Untrusted => {
            let e = r.unwrap_err();
            assert!(daemon_message(&e).contains("lacks a signature"), "{e}");
            // The daemon drained the frames: the connection goes on.
            assert!(c.is_valid_path(&path).await.unwrap());
        }
    }

    // Realisations (ca-derivations is enabled in the test daemon's configuration).
    let id = DrvOutput { drv_hash: Hash::digest(HashAlgo::Sha256, b"a derivation"), output_name: "out".into() };
    let realisation = Realisation {
        id: id.clone(),
        out_path: path.clone(),
        signatures: BTreeSet::new(),
        dependent_realisations: BTreeMap::new(),
    };
    assert!(c.query_realisation(&id).await.unwrap().is_empty());
    c.register_drv_output(&realisation).await.unwrap();
    let got = c.query_realisation(&id).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].out_path, path);

    // AddPermRoot: only for trusted clients; refused before the daemon starts its
    // reply, so the daemon closes the connection.
    let root = d.inner_path("perm-root");
    match trust {
        Trust::Trusted => {
            assert_eq!(c.add_perm_root(&path, &root).await.unwrap(), root);
            assert!(d.host_path("perm-root").symlink_metadata().is_ok());
        }
        Trust::Untrusted => {
            let c2 = d.connect().await;
            let e = c2.add_perm_root(&path, &root).await.unwrap_err();
            assert!(daemon_message(&e).contains("not privileged to create perm roots"), "{e}");
            let e = c2.is_valid_path(&path).await.unwrap_err();
            assert!(format!("{e}").contains("closed the connection after"), "{e}");
        }
    }

    // Repairing the store needs trust; refused after the reply started, so the
    // connection survives.
    let r = c.verify_store(false, true).await;
    match trust {
        Trust::Trusted => assert!(!r.unwrap()),
        Trust::Untrusted => {
            assert!(daemon_message(&r.unwrap_err()).contains("not privileged to repair"));
            assert!(c.is_valid_path(&path).await.unwrap());
        }
    }
}

async fn settings(d: &Daemon, trust: Trust) {
    let log = Arc::new(Captured::default());
    let mut settings = ClientSettings::default();
    settings.overrides.insert("allowed-uris".into(), "file:///".into());
    let options = ConnectOptions { logger: log.clone(), settings: Some(settings), ..d.options() };
    let c = d.connect_with(options).await;
    c.flush().await.unwrap();
    let warned = log.0.lock().unwrap().iter().any(|l| l.contains("restricted setting"));
    assert_eq!(warned, trust == Trust::Untrusted, "restricted setting warning: {:?}", log.0.lock().unwrap());
}

async fn all_ops(trust: Trust) {
    let d = Daemon::start(Nix::V2_26, trust);
    let c = d.connect().await;
    let info = c.info().clone();
    assert_eq!(info.version, Version::new(1, 38));
    assert_eq!(info.nix_version.as_deref(), Some("2.26.3"));
    let expected = match trust {
        Trust::Trusted => TrustedFlag::Trusted,
        Trust::Untrusted => TrustedFlag::NotTrusted,
    };
    assert_eq!(info.trusted, Some(expected));

    queries_and_adds(&d, &c).await;
    builds(&d, &c, trust).await;
    privileged(&d, &c, trust).await;
    settings(&d, trust).await;
    c.flush().await.unwrap();
    let stats = c.stats();
    assert!(stats.requests_of(Op::AddToStore) >= 5, "{stats}");
    assert!(stats.bytes_sent > 0 && stats.bytes_received > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_untrusted() {
    all_ops(Trust::Untrusted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_trusted() {
    all_ops(Trust::Trusted).await;
}

#[tokio::test]
async fn older_daemon_2_8() {
    let d = Daemon::start(Nix::V2_8, Trust::Untrusted);
    let c = d.connect().await;
    let info = c.info().clone();
    assert_eq!(info.nix_version.as_deref(), Some("2.8.0"));
    assert!(info.version < Version::LATEST && info.version >= Version::MINIMUM, "{info:?}");
    assert_eq!(info.version, info.daemon_version);
    assert!(info.features.is_empty());

    let sd = c.store_dir().clone();
    let hello = c.add_text("hello.txt", b"hello\n".to_vec(), &BTreeSet::new()).await.unwrap();
    assert_eq!(hello.path, sd.compute_text_path("hello.txt", b"hello\n", &BTreeSet::new()).unwrap());
    c.add_temp_root(&hello.path).send().await.unwrap();
    assert!(c.is_valid_path(&hello.path).await.unwrap());
    assert_eq!(c.query_valid_paths(&refs(&[&hello.path]), false).await.unwrap(), refs(&[&hello.path]));
    assert_eq!(c.query_path_info(&hello.path).await.unwrap().unwrap(), hello.info);
    assert_eq!(c.nar_from_path(&hello.path).await.unwrap().0, nar::dump_flat_file_contents(b"hello\n"));
    let old = c.add_text_to_store("old.txt", b"old", &BTreeSet::new()).await.unwrap();
    assert_eq!(old, sd.compute_text_path("old.txt", b"old", &BTreeSet::new()).unwrap());
    let drv = instantiate(&d, &c, "old-build", "echo old > $out");
    c.build_paths(&[DerivedPath::Built { drv_path: drv.clone(), outputs: OutputsSpec::All }], BuildMode::Normal)
        .await
        .unwrap();
    let out = c.query_derivation_output_map(&drv).await.unwrap()["out"].clone().unwrap();
    assert!(c.is_valid_path(&out).await.unwrap());
    c.flush().await.unwrap();
}

/// Offering an older version negotiates down to it, and ops that need a newer one
/// are refused locally with an error naming both versions.
#[tokio::test]
async fn negotiates_down() {
    let d = Daemon::start(Nix::V2_26, Trust::Trusted);
    let c = d.connect_with(ConnectOptions { max_version: Version::new(1, 25), ..d.options() }).await;
    assert_eq!(c.version(), Version::new(1, 25));
    assert_eq!(c.info().nix_version, None);
    assert_eq!(c.info().trusted, None);
    let hello = c.add_text("hello.txt", b"hello\n".to_vec(), &BTreeSet::new()).await.unwrap();
    assert_eq!(c.query_path_info(&hello.path).await.unwrap().unwrap(), hello.info);
    let e = c.add_multiple_to_store(&[], false, false).await.unwrap_err();
    assert_eq!(e.to_string(), "AddMultipleToStore needs worker protocol 1.32, but the Nix daemon speaks 1.25");
}

/// A body fed through `Body::channel` goes out as it is written; data that ends
/// short of a whole NAR is refused by the daemon, and the connection goes on.
#[tokio::test]
async fn channel_bodies_stream_and_a_nar_cut_short_is_refused() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = d.connect().await;
    let none = BTreeSet::new();
    let contents: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let nar = nar::write_nar(&nar::NarEntry::Regular { executable: false, contents });
    let add = |name: &str, body| c.add_to_store(name, ContentAddressMethod::Nar, HashAlgo::Sha256, &none, false, body);

    let (data, body) = Body::channel(2);
    let reply = add("streamed", body).start().await.unwrap();
    let pieces: Vec<_> = nar.chunks(10_000).map(bytes::Bytes::copy_from_slice).collect();
    let feeder = tokio::spawn(async move {
        for piece in pieces {
            data.send(piece).await.unwrap();
        }
    });
    let info = reply.await.unwrap();
    feeder.await.unwrap();
    let hash = Hash::digest(HashAlgo::Sha256, &nar);
    let expected = c.store_dir().make_fixed_output_path("streamed", ContentAddressMethod::Nar, &hash, &none, false);
    assert_eq!(info.path, expected.unwrap());

    let (data, body) = Body::channel(2);
    let reply = add("cut", body).start().await.unwrap();
    data.send(bytes::Bytes::copy_from_slice(&nar[..nar.len() / 2])).await.unwrap();
    drop(data);
    let e = reply.await.unwrap_err();
    assert!(matches!(e, Error::Daemon(_)), "{e}");
    assert!(c.is_valid_path(&info.path).await.unwrap());
}

/// A lease hands the socket over once the requests in flight before it are
/// answered: the holder speaks the protocol itself on it, requests made meanwhile
/// wait, and afterwards the pipeline goes on. A lease given back out of step ends
/// the connection.
#[tokio::test]
async fn a_lease_lends_the_socket_between_requests() {
    use std::io::{Read, Write};
    use std::os::fd::BorrowedFd;
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = d.connect().await;
    let hello = c.add_text("hello.txt", b"hello\n".to_vec(), &BTreeSet::new()).await.unwrap();
    let before: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..50 {
            v.push(c.is_valid_path(&hello.path).start().await.unwrap());
        }
        v
    };
    let lease = c.lease().await.unwrap();
    // Every reply before the lease has been read.
    for p in before {
        assert!(p.await.unwrap());
    }
    let during = tokio::spawn({
        let (c, path) = (c.clone(), hello.path.clone());
        async move { c.is_valid_path(&path).await }
    });

    // IsValidPath, by hand, on the blocking socket.
    let path = c.store_dir().print(&hello.path);
    let fd = lease.fds().read;
    let reply = tokio::task::spawn_blocking(move || {
        let fd = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().unwrap();
        let mut sock = std::fs::File::from(fd);
        let mut req = Vec::new();
        req.extend_from_slice(&(Op::IsValidPath as u64).to_le_bytes());
        req.extend_from_slice(&(path.len() as u64).to_le_bytes());
        req.extend_from_slice(path.as_bytes());
        req.resize(req.len().next_multiple_of(8), 0);
        sock.write_all(&req).unwrap();
        let mut reply = [0u8; 16];
        sock.read_exact(&mut reply).unwrap();
        reply
    })
    .await
    .unwrap();
    assert_eq!(u64::from_le_bytes(reply[..8].try_into().unwrap()), 0x616c7473, "STDERR_LAST");
    assert_eq!(u64::from_le_bytes(reply[8..].try_into().unwrap()), 1);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!during.is_finished(), "a request made during the lease went out before it ended");
    drop(lease);
    assert!(during.await.unwrap().unwrap());
    assert!(c.is_valid_path(&hello.path).await.unwrap());
    assert_eq!(c.stats().leases, 1);

    c.lease().await.unwrap().abandon();
    let e = c.is_valid_path(&hello.path).await.unwrap_err();
    assert!(e.to_string().contains("given up in the middle of an operation"), "{e}");
}
