//! Store paths computed locally equal the daemon's, for 1,000 random texts and 1,000
//! random file trees; the NARs the daemon serves back equal ours.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_store::connection::Body;
use rust_store::hash::{Hash, HashAlgo};
use rust_store::nar::{self, NarEntry};
use rust_store::store_path::{ContentAddress, ContentAddressMethod, StorePath};
use store_tests::{Daemon, Nix, Trust};

const NAME_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?=";

fn random_name(rng: &mut StdRng) -> String {
    loop {
        let len = rng.gen_range(1..40);
        let s: String = (0..len).map(|_| NAME_CHARS[rng.gen_range(0..NAME_CHARS.len())] as char).collect();
        if !s.starts_with('.') {
            return s;
        }
    }
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let len = rng.gen_range(0..max);
    (0..len).map(|_| rng.r#gen()).collect()
}

fn random_tree(rng: &mut StdRng, depth: u32) -> NarEntry {
    match rng.gen_range(0..if depth == 0 { 2 } else { 3 }) {
        0 => NarEntry::Regular { executable: rng.gen_bool(0.3), contents: random_bytes(rng, 300) },
        1 => NarEntry::Symlink { target: format!("../{}", random_name(rng)) },
        _ => {
            let mut entries = BTreeMap::new();
            for _ in 0..rng.gen_range(0..5) {
                entries.insert(random_name(rng), random_tree(rng, depth - 1));
            }
            NarEntry::Directory(entries)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_paths_equal_the_daemons() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = d.connect().await;
    let sd = c.store_dir().clone();
    let mut rng = StdRng::seed_from_u64(2026);

    // Texts, some referring to earlier ones.
    let mut earlier: Vec<StorePath> = Vec::new();
    let mut texts = Vec::new();
    for i in 0..1000 {
        let name = random_name(&mut rng);
        let contents = random_bytes(&mut rng, 2000);
        let mut refs = BTreeSet::new();
        if i % 3 == 0 && !earlier.is_empty() {
            for _ in 0..rng.gen_range(1..4) {
                refs.insert(earlier[rng.gen_range(0..earlier.len())].clone());
            }
        }
        let expected = sd.compute_text_path(&name, &contents, &refs).unwrap();
        // References must be valid when the text is added: wait for those first.
        if !refs.is_empty() {
            c.flush().await.unwrap();
        }
        texts.push((c.add_text(&name, contents, &refs).start().await.unwrap(), expected.clone(), refs));
        earlier.push(expected);
    }
    for (reply, expected, refs) in texts {
        let info = reply.await.unwrap();
        assert_eq!(info.path, expected);
        assert_eq!(info.info.references, refs);
    }

    // File trees, added as NARs (fixed:r:sha256) and as flat files where they are one.
    let mut trees = Vec::new();
    for _ in 0..1000 {
        let name = random_name(&mut rng);
        let tree = random_tree(&mut rng, 3);
        let nar_bytes = nar::write_nar(&tree);
        let (method, data) = match (&tree, rng.gen_bool(0.5)) {
            (NarEntry::Regular { executable: false, contents }, true) => (ContentAddressMethod::Flat, contents.clone()),
            _ => (ContentAddressMethod::Nar, nar_bytes.clone()),
        };
        let ca = ContentAddress { method, hash: Hash::digest(HashAlgo::Sha256, &data) };
        let expected = sd.make_fixed_output_path_from_ca(&name, &ca, &BTreeSet::new(), false).unwrap();
        let reply = c
            .add_to_store(&name, method, HashAlgo::Sha256, &BTreeSet::new(), false, Body::Bytes(data))
            .start()
            .await
            .unwrap();
        trees.push((reply, expected, nar_bytes, ca));
    }
    let mut served = Vec::new();
    for (reply, expected, nar_bytes, ca) in trees {
        let info = reply.await.unwrap();
        assert_eq!(info.path, expected);
        assert_eq!(info.info.ca, Some(ca));
        assert_eq!(info.info.nar_hash, Hash::digest(HashAlgo::Sha256, &nar_bytes));
        assert_eq!(info.info.nar_size, nar_bytes.len() as u64);
        served.push((c.nar_from_path(&info.path).start().await.unwrap(), nar_bytes));
    }
    for (reply, nar_bytes) in served {
        assert_eq!(reply.await.unwrap().0, nar_bytes);
    }
}

/// The NAR of a real directory, dumped locally, equals what Nix's own `nix-store
/// --dump` prints for it.
#[test]
fn dump_path_matches_nix_store_dump() {
    let d = Daemon::start(Nix::V2_26, Trust::Trusted);
    let dir = d.host_path("tree");
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    std::fs::write(dir.join("file"), b"contents").unwrap();
    std::fs::write(dir.join("sub/empty"), b"").unwrap();
    std::fs::write(dir.join("sub/deeper/script"), b"#!/bin/sh\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("sub/deeper/script"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("../file", dir.join("sub/link")).unwrap();

    let mut ours = Vec::new();
    nar::dump_path(&dir, &mut ours).unwrap();
    let out = d.nix(&["nix-store", "--dump", &d.inner_path("tree")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ours, out.stdout);
}
