//! Nix's own encoding fixtures (src/libstore-tests/data/worker-protocol/*.bin in the
//! 2.26.3 source) decode and re-encode byte for byte.
//!
//! Each fixture is a sequence of values written by Nix's serialisers at one protocol
//! version; the values' types are those in src/libstore-tests/worker-protocol.cc.

use std::collections::BTreeSet;

use rust_store::StoreDir;
use rust_store::codec::{Ctx, Decode, Decoder, Encode, Encoder};
use rust_store::hash::{Hash, HashAlgo};
use rust_store::protocol::Version;
use rust_store::store_path::{ContentAddress, StorePath};
use rust_store::types::*;
use store_tests::nix_source;

fn fixture(name: &str) -> Vec<u8> {
    let path = nix_source().join("src/libstore-tests/data/worker-protocol").join(format!("{name}.bin"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn ctx(minor: u8) -> Ctx {
    Ctx { version: Version::new(1, minor), store_dir: StoreDir::default() }
}

/// Decodes `n` values of type `T` from the fixture, checks that nothing is left, and
/// that encoding them again gives the same bytes.
async fn roundtrip<T: Decode + Encode + std::fmt::Debug>(name: &str, minor: u8, n: usize) -> Vec<T> {
    let bytes = fixture(name);
    let mut d = Decoder::from_bytes(bytes.clone(), ctx(minor));
    let mut values = Vec::new();
    for i in 0..n {
        values.push(d.get::<T>().await.unwrap_or_else(|e| panic!("{name}: value {i}: {e}")));
    }
    assert!(d.at_eof().await.unwrap(), "{name}: bytes left after {n} values");
    let mut out = Vec::new();
    let c = ctx(minor);
    let mut e = Encoder::new(&mut out, &c);
    for v in &values {
        e.put(v);
    }
    assert_eq!(out, bytes, "{name}: re-encoding differs");
    values
}

fn sp(base: &str) -> StorePath {
    StorePath::from_base_name(base).unwrap()
}

#[tokio::test]
async fn strings() {
    let v: Vec<String> = roundtrip("string", 10, 5).await;
    assert_eq!(v[0], "");
    assert_eq!(v[1], "hi");
}

#[tokio::test]
async fn store_paths() {
    let v: Vec<StorePath> = roundtrip("store-path", 10, 2).await;
    assert_eq!(v[0], sp("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo"));
    let v: Vec<Option<StorePath>> = roundtrip("optional-store-path", 10, 2).await;
    assert_eq!(v, vec![None, Some(sp("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo-bar"))]);
}

#[tokio::test]
async fn content_addresses() {
    let v: Vec<ContentAddress> = roundtrip("content-address", 10, 3).await;
    assert!(v[0].render().starts_with("text:sha256:"), "{:?}", v[0]);
    let v: Vec<Option<ContentAddress>> = roundtrip("optional-content-address", 10, 2).await;
    assert_eq!(v[0], None);
    assert_eq!(v[1].as_ref().unwrap().hash, Hash::digest(HashAlgo::Sha1, b"blob blob..."));
}

#[tokio::test]
async fn derived_paths() {
    let v: Vec<DerivedPath> = roundtrip("derived-path-1.29", 29, 3).await;
    assert!(matches!(v[0], DerivedPath::Opaque(_)));
    let v: Vec<DerivedPath> = roundtrip("derived-path-1.30", 30, 4).await;
    assert!(v.iter().any(|p| matches!(p, DerivedPath::Built { outputs: OutputsSpec::All, .. })));
}

#[tokio::test]
async fn drv_outputs_and_realisations() {
    let v: Vec<DrvOutput> = roundtrip("drv-output", 10, 2).await;
    assert_eq!(v[0].output_name, "baz");
    let v: Vec<Realisation> = roundtrip("realisation", 10, 2).await;
    assert_eq!(v[0].out_path, sp("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo"));
    assert!(!v[0].signatures.is_empty());
}

#[tokio::test]
async fn build_results() {
    for (name, minor) in
        [("build-result-1.27", 27), ("build-result-1.28", 28), ("build-result-1.29", 29), ("build-result-1.37", 37)]
    {
        let v: Vec<BuildResult> = roundtrip(name, minor, 3).await;
        assert_eq!(v[0].status, BuildStatus::OUTPUT_REJECTED, "{name}");
        assert_eq!(v[0].error_msg, "no idea why", "{name}");
    }
    let v: Vec<BuildResult> = roundtrip("build-result-1.37", 37, 3).await;
    assert_eq!(v[2].cpu_user, Some(500_000_000));
    assert_eq!(v[2].built_outputs.len(), 2);
    let v: Vec<KeyedBuildResult> = roundtrip("keyed-build-result-1.29", 29, 2).await;
    assert_eq!(v[1].result.times_built, 3);
}

#[tokio::test]
async fn path_infos() {
    let v: Vec<UnkeyedValidPathInfo> = roundtrip("unkeyed-valid-path-info-1.15", 15, 2).await;
    assert_eq!(v[1].references.len(), 1);
    assert_eq!(v[1].registration_time, 23423);
    let v: Vec<ValidPathInfo> = roundtrip("valid-path-info-1.15", 15, 2).await;
    assert_eq!(v[0].info.nar_size, 34878);
    let v: Vec<ValidPathInfo> = roundtrip("valid-path-info-1.16", 16, 3).await;
    assert!(v[0].info.ultimate);
    assert!(v.iter().any(|p| p.info.sigs.len() == 2));
    assert!(v[2].info.ca.is_some());
}

#[tokio::test]
async fn build_modes_and_trust() {
    let v: Vec<BuildMode> = roundtrip("build-mode", 10, 3).await;
    assert_eq!(v, vec![BuildMode::Normal, BuildMode::Repair, BuildMode::Check]);
    let v: Vec<Option<TrustedFlag>> = roundtrip("optional-trusted-flag", 10, 3).await;
    assert_eq!(v, vec![None, Some(TrustedFlag::Trusted), Some(TrustedFlag::NotTrusted)]);
}

#[tokio::test]
async fn collections() {
    // Three lists of strings, then a list of lists.
    for name in ["vector", "set"] {
        let bytes = fixture(name);
        let mut d = Decoder::from_bytes(bytes.clone(), ctx(10));
        let mut out = Vec::new();
        let c = ctx(10);
        let mut e = Encoder::new(&mut out, &c);
        if name == "vector" {
            for _ in 0..3 {
                e.put(&d.get::<Vec<String>>().await.unwrap());
            }
            let nested = d.get::<Vec<Vec<String>>>().await.unwrap();
            assert_eq!(nested[2], vec!["", "1", "2"]);
            e.put(&nested);
        } else {
            for _ in 0..3 {
                e.put(&d.get::<BTreeSet<String>>().await.unwrap());
            }
            e.put(&d.get::<BTreeSet<BTreeSet<String>>>().await.unwrap());
        }
        assert!(d.at_eof().await.unwrap(), "{name}: bytes left");
        assert_eq!(out, bytes, "{name}: re-encoding differs");
    }
}

/// The daemon's greeting after the handshake: its Nix version (1.33) and whether it
/// trusts the client (1.35).
#[tokio::test]
async fn client_handshake_info() {
    for (name, minor, n) in [
        ("client-handshake-info_1_30", 30, 1),
        ("client-handshake-info_1_33", 33, 2),
        ("client-handshake-info_1_35", 35, 2),
    ] {
        let bytes = fixture(name);
        let mut d = Decoder::from_bytes(bytes.clone(), ctx(minor));
        let mut out = Vec::new();
        let c = ctx(minor);
        let mut e = Encoder::new(&mut out, &c);
        for _ in 0..n {
            if minor >= 33 {
                e.str(&d.string().await.unwrap());
            }
            if minor >= 35 {
                e.put(&d.get::<Option<TrustedFlag>>().await.unwrap());
            }
        }
        assert!(d.at_eof().await.unwrap(), "{name}: bytes left");
        assert_eq!(out, bytes, "{name}: re-encoding differs");
    }
}

/// What the daemon sends during the handshake at 1.10: its magic and version.
#[tokio::test]
async fn handshake_to_client() {
    let bytes = fixture("handshake-to-client");
    let mut d = Decoder::from_bytes(bytes.clone(), ctx(10));
    assert_eq!(d.u64().await.unwrap(), rust_store::protocol::WORKER_MAGIC_2);
    assert_eq!(Version::from_wire(d.u64().await.unwrap()), Version::new(1, 10));
    assert!(d.at_eof().await.unwrap());
}
