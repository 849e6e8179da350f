//! One method per worker-protocol operation, as Nix 2.26.3's daemon serves them
//! (libstore/daemon.cc). Each returns a [`Call`]: `.await` it for the result, or
//! `.send()` it without waiting.

use futures::future::BoxFuture;
use std::collections::{BTreeMap, BTreeSet};

use crate::codec::{Ctx, Decode, Decoder, Encoder};
use crate::connection::{Body, Call, Client};
use crate::error::{Error, Result};
use crate::hash::HashAlgo;
use crate::nar;
use crate::protocol::{FEATURE_ADD_TEMP_ROOTS, Op, Version};
use crate::store_path::{ContentAddress, ContentAddressMethod, StorePath};
use crate::types::*;

/// A NAR, as NarFromPath returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nar(pub Vec<u8>);

impl Decode for Nar {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        // The NAR follows STDERR_LAST unframed: parse it to find its end.
        let mut out = Vec::new();
        nar::read_nar(d.reader(), &mut out).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::Eof,
            std::io::ErrorKind::InvalidData => Error::Protocol(format!("bad NAR: {e}")),
            _ => Error::Io(e),
        })?;
        Ok(Nar(out))
    }
}

/// A valid flag followed, if set, by the path's info (QueryPathInfo from 1.17).
impl Decode for Option<UnkeyedValidPathInfo> {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        if d.bool().await? { Ok(Some(d.get().await?)) } else { Ok(None) }
    }
}

/// The obsolete `u64 1` many ops answer with.
fn ack(d: &mut Decoder) -> BoxFuture<'_, Result<()>> {
    Box::pin(async move {
        d.u64().await?;
        Ok(())
    })
}

/// Ops whose reply is STDERR_LAST alone.
fn nothing(_: &mut Decoder) -> BoxFuture<'_, Result<()>> {
    Box::pin(async { Ok(()) })
}

fn gc_roots(d: &mut Decoder) -> BoxFuture<'_, Result<BTreeMap<String, StorePath>>> {
    Box::pin(async move {
        let n = d.count().await?;
        let mut roots = BTreeMap::new();
        for _ in 0..n {
            let link = d.text().await?;
            roots.insert(link, d.path().await?);
        }
        Ok(roots)
    })
}

fn realisations(d: &mut Decoder) -> BoxFuture<'_, Result<Vec<Realisation>>> {
    Box::pin(async move {
        let set: BTreeSet<Realisation> = d.get().await?;
        Ok(set.into_iter().collect())
    })
}

fn substitutable_infos(d: &mut Decoder) -> BoxFuture<'_, Result<BTreeMap<StorePath, SubstitutablePathInfo>>> {
    Box::pin(async move { d.get().await })
}

impl Client {
    fn subject(&self, p: &StorePath) -> Option<String> {
        Some(self.store_dir().print(p))
    }

    fn needs<T: Send + 'static>(&self, op: Op, minor: u8) -> Option<Call<'_, T>> {
        if self.version().at_least(minor) {
            None
        } else {
            Some(self.refuse(Error::Unsupported { op, needed: minor, have: self.version() }))
        }
    }

    pub fn set_options(&self, settings: &ClientSettings) -> Call<'_, ()> {
        self.call_with(Op::SetOptions, None, nothing, |e| {
            e.put(settings);
        })
    }

    pub fn is_valid_path(&self, path: &StorePath) -> Call<'_, bool> {
        self.call(Op::IsValidPath, self.subject(path), |e| {
            e.path(path);
        })
    }

    /// The subset of `paths` that is valid; with `substitute`, tries substituters first.
    pub fn query_valid_paths(&self, paths: &BTreeSet<StorePath>, substitute: bool) -> Call<'_, BTreeSet<StorePath>> {
        self.call(Op::QueryValidPaths, None, |e| {
            e.put(paths);
            if e.version().at_least(27) {
                e.bool(substitute);
            }
        })
    }

    pub fn query_all_valid_paths(&self) -> Call<'_, BTreeSet<StorePath>> {
        self.call(Op::QueryAllValidPaths, None, |_| {})
    }

    /// The path's info, or `None` if it is not valid.
    pub fn query_path_info(&self, path: &StorePath) -> Call<'_, Option<UnkeyedValidPathInfo>> {
        self.call(Op::QueryPathInfo, self.subject(path), |e| {
            e.path(path);
        })
    }

    pub fn query_referrers(&self, path: &StorePath) -> Call<'_, BTreeSet<StorePath>> {
        self.call(Op::QueryReferrers, self.subject(path), |e| {
            e.path(path);
        })
    }

    pub fn query_valid_derivers(&self, path: &StorePath) -> Call<'_, BTreeSet<StorePath>> {
        self.call(Op::QueryValidDerivers, self.subject(path), |e| {
            e.path(path);
        })
    }

    /// Output names of a derivation to their paths, where known.
    pub fn query_derivation_output_map(&self, drv: &StorePath) -> Call<'_, BTreeMap<String, Option<StorePath>>> {
        self.call(Op::QueryDerivationOutputMap, self.subject(drv), |e| {
            e.path(drv);
        })
    }

    pub fn query_path_from_hash_part(&self, hash_part: &str) -> Call<'_, Option<StorePath>> {
        self.call(Op::QueryPathFromHashPart, Some(hash_part.to_owned()), |e| {
            e.str(hash_part);
        })
    }

    pub fn query_substitutable_paths(&self, paths: &BTreeSet<StorePath>) -> Call<'_, BTreeSet<StorePath>> {
        self.call(Op::QuerySubstitutablePaths, None, |e| {
            e.put(paths);
        })
    }

    pub fn query_substitutable_path_infos(
        &self,
        paths: &BTreeMap<StorePath, Option<ContentAddress>>,
    ) -> Call<'_, BTreeMap<StorePath, SubstitutablePathInfo>> {
        self.call_with(Op::QuerySubstitutablePathInfos, None, substitutable_infos, |e| {
            e.u64(paths.len() as u64);
            for (p, ca) in paths {
                e.path(p).put(ca);
            }
        })
    }

    /// Adds content-addressed data: for `Text` and `Flat` the file's contents, for
    /// `Nar` and `Git` a NAR. The daemon computes the path, roots it for this
    /// connection and returns its info.
    pub fn add_to_store(
        &self,
        name: &str,
        method: ContentAddressMethod,
        algo: HashAlgo,
        references: &BTreeSet<StorePath>,
        repair: bool,
        data: Body,
    ) -> Call<'_, ValidPathInfo> {
        self.call(Op::AddToStore, Some(name.to_owned()), |e| {
            e.str(name).str(&method.render_with_algo(algo)).put(references).bool(repair);
        })
        .body(data)
    }

    /// Adds a text file (`text:sha256`): what writeDerivation and builtins.toFile do.
    pub fn add_text(&self, name: &str, contents: Vec<u8>, references: &BTreeSet<StorePath>) -> Call<'_, ValidPathInfo> {
        self.add_to_store(name, ContentAddressMethod::Text, HashAlgo::Sha256, references, false, Body::Bytes(contents))
    }

    /// The obsolete text add (superseded by AddToStore in 1.25, still served).
    pub fn add_text_to_store(
        &self,
        name: &str,
        contents: &[u8],
        references: &BTreeSet<StorePath>,
    ) -> Call<'_, StorePath> {
        self.call(Op::AddTextToStore, Some(name.to_owned()), |e| {
            e.str(name).bytes(contents).put(references);
        })
    }

    /// Adds a path with its info and NAR; from an untrusted client the daemon checks
    /// signatures or the content address.
    pub fn add_to_store_nar(
        &self,
        info: &ValidPathInfo,
        repair: bool,
        dont_check_sigs: bool,
        nar: Body,
    ) -> Call<'_, ()> {
        self.call_with(Op::AddToStoreNar, self.subject(&info.path), nothing, |e| {
            e.put(info).bool(repair).bool(dont_check_sigs);
        })
        .body(nar)
    }

    /// Adds many paths in one request: each with its info and NAR, in an order where
    /// references come first.
    pub fn add_multiple_to_store(
        &self,
        items: &[(ValidPathInfo, Vec<u8>)],
        repair: bool,
        dont_check_sigs: bool,
    ) -> Call<'_, ()> {
        if let Some(c) = self.needs(Op::AddMultipleToStore, 32) {
            return c;
        }
        // The stream inside the frames encodes path infos as protocol 1.16 does.
        let inner = Ctx { version: Version::new(1, 16), store_dir: self.store_dir().clone() };
        let size: usize = items.iter().map(|(_, nar)| nar.len() + 512).sum();
        let mut stream = Vec::with_capacity(size + 8);
        let mut e = Encoder::new(&mut stream, &inner);
        e.u64(items.len() as u64);
        for (info, nar) in items {
            e.put(info).raw(nar);
        }
        let subject = match items {
            [(info, _)] => self.subject(&info.path),
            _ => Some(format!("{} paths", items.len())),
        };
        self.call_with(Op::AddMultipleToStore, subject, nothing, |e| {
            e.bool(repair).bool(dont_check_sigs);
        })
        .body(Body::Bytes(stream))
    }

    pub fn build_paths(&self, paths: &[DerivedPath], mode: BuildMode) -> Call<'_, ()> {
        self.call_with(Op::BuildPaths, None, ack, |e| {
            e.put(paths).put(&mode);
        })
    }

    pub fn build_paths_with_results(&self, paths: &[DerivedPath], mode: BuildMode) -> Call<'_, Vec<KeyedBuildResult>> {
        if let Some(c) = self.needs(Op::BuildPathsWithResults, 34) {
            return c;
        }
        self.call(Op::BuildPathsWithResults, None, |e| {
            e.put(paths).put(&mode);
        })
    }

    pub fn build_derivation(
        &self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        mode: BuildMode,
    ) -> Call<'_, BuildResult> {
        self.call(Op::BuildDerivation, self.subject(drv_path), |e| {
            e.path(drv_path).put(drv).put(&mode);
        })
    }

    /// Makes the path valid, substituting it if needed.
    pub fn ensure_path(&self, path: &StorePath) -> Call<'_, ()> {
        self.call_with(Op::EnsurePath, self.subject(path), ack, |e| {
            e.path(path);
        })
    }

    /// Protects the path from garbage collection while this connection is open.
    pub fn add_temp_root(&self, path: &StorePath) -> Call<'_, ()> {
        self.call_with(Op::AddTempRoot, self.subject(path), ack, |e| {
            e.path(path);
        })
    }

    /// Protects the paths from garbage collection while this connection is open, in one
    /// request. Only daemons that offer the feature `addTempRoots` serve it (see
    /// [`Client::has_add_temp_roots`]); without it this fails before anything is sent.
    pub fn add_temp_roots(&self, paths: &BTreeSet<StorePath>) -> Call<'_, ()> {
        if !self.has_add_temp_roots() {
            return self.refuse(Error::Refused {
                op: Op::AddTempRoots,
                subject: format!("{} paths", paths.len()),
                reason: format!("the Nix daemon does not offer the feature '{FEATURE_ADD_TEMP_ROOTS}'"),
            });
        }
        self.call_with(Op::AddTempRoots, None, ack, |e| {
            e.put(paths);
        })
    }

    /// Whether the daemon serves [`Client::add_temp_roots`].
    pub fn has_add_temp_roots(&self) -> bool {
        self.info().features.contains(FEATURE_ADD_TEMP_ROOTS)
    }

    /// Registers `link` (a symlink to a store path, outside the store) as a GC root.
    pub fn add_indirect_root(&self, link: &str) -> Call<'_, ()> {
        self.call_with(Op::AddIndirectRoot, Some(link.to_owned()), ack, |e| {
            e.str(link);
        })
    }

    /// Makes `gc_root` a permanent root pointing at `path`; returns the root's path.
    /// Only for trusted clients.
    pub fn add_perm_root(&self, path: &StorePath, gc_root: &str) -> Call<'_, String> {
        if let Some(c) = self.needs(Op::AddPermRoot, 36) {
            return c;
        }
        self.call(Op::AddPermRoot, self.subject(path), |e| {
            e.path(path).str(gc_root);
        })
    }

    /// GC roots: each link to the store path it keeps alive.
    pub fn find_roots(&self) -> Call<'_, BTreeMap<String, StorePath>> {
        self.call_with(Op::FindRoots, None, gc_roots, |_| {})
    }

    pub fn collect_garbage(&self, options: &GcOptions) -> Call<'_, GcResults> {
        self.call(Op::CollectGarbage, None, |e| {
            e.put(options);
        })
    }

    pub fn optimise_store(&self) -> Call<'_, ()> {
        self.call_with(Op::OptimiseStore, None, ack, |_| {})
    }

    /// Checks the store's consistency; returns whether errors remain.
    pub fn verify_store(&self, check_contents: bool, repair: bool) -> Call<'_, bool> {
        self.call(Op::VerifyStore, None, |e| {
            e.bool(check_contents).bool(repair);
        })
    }

    pub fn add_signatures(&self, path: &StorePath, sigs: &BTreeSet<String>) -> Call<'_, ()> {
        self.call_with(Op::AddSignatures, self.subject(path), ack, |e| {
            e.path(path).put(sigs);
        })
    }

    pub fn query_missing(&self, targets: &[DerivedPath]) -> Call<'_, Missing> {
        self.call(Op::QueryMissing, None, |e| {
            e.put(targets);
        })
    }

    /// The path's NAR serialisation.
    pub fn nar_from_path(&self, path: &StorePath) -> Call<'_, Nar> {
        self.call(Op::NarFromPath, self.subject(path), |e| {
            e.path(path);
        })
    }

    /// Stores a build log for a derivation. Only for trusted clients.
    pub fn add_build_log(&self, drv_path: &StorePath, log: Vec<u8>) -> Call<'_, ()> {
        if let Some(c) = self.needs(Op::AddBuildLog, 32) {
            return c;
        }
        // The daemon asserts that the path is a derivation, and aborts if not.
        if !drv_path.is_derivation() {
            return self.refuse(Error::Refused {
                op: Op::AddBuildLog,
                subject: self.store_dir().print(drv_path),
                reason: "build logs belong to derivations (.drv paths)".into(),
            });
        }
        // The daemon refuses untrusted clients after starting its reply but before
        // reading the frames, which would then be read as ops: refuse here instead.
        if self.info().trusted == Some(TrustedFlag::NotTrusted) {
            return self.refuse(Error::Refused {
                op: Op::AddBuildLog,
                subject: self.store_dir().print(drv_path),
                reason: "the Nix daemon does not trust this client, and only trusted clients may add build logs".into(),
            });
        }
        // Unlike every other op, this one takes the path's base name.
        self.call_with(Op::AddBuildLog, self.subject(drv_path), ack, |e| {
            e.str(&drv_path.to_string());
        })
        .body(Body::Bytes(log))
    }

    pub fn register_drv_output(&self, realisation: &Realisation) -> Call<'_, ()> {
        self.call_with(Op::RegisterDrvOutput, Some(realisation.id.to_string()), nothing, |e| {
            if e.version().at_least(31) {
                e.put(realisation);
            } else {
                e.put(&realisation.id).str(&realisation.out_path.to_string());
            }
        })
    }

    /// Where a content-addressed derivation output was realised, if anywhere.
    pub fn query_realisation(&self, id: &DrvOutput) -> Call<'_, Vec<Realisation>> {
        if !self.version().at_least(31) {
            // Older daemons answer with bare paths; there is no realisation to return.
            return self.refuse(Error::Unsupported { op: Op::QueryRealisation, needed: 31, have: self.version() });
        }
        self.call_with(Op::QueryRealisation, Some(id.to_string()), realisations, |e| {
            e.put(id);
        })
    }
}
