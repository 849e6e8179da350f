//! The protocol's value types and their wire encodings, as Nix 2.26.3 defines them
//! (libstore/worker-protocol.cc, common-protocol.cc).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::codec::{Decode, Decoder, Encode, Encoder};
use crate::error::{Error, Result};
use crate::hash::{Hash, HashAlgo};
use crate::store_path::{ContentAddress, StorePath};

fn protocol<E: fmt::Display>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::Protocol(format!("{what}: {e}"))
}

/// A signed time (`time_t`): a u64 on the wire that must fit in an i64.
async fn time(d: &mut Decoder, what: &str) -> Result<i64> {
    Ok(d.u64_max(i64::MAX as u64, what).await? as i64)
}

// ---------------------------------------------------------------------------------
// Content addresses

impl Encode for Option<ContentAddress> {
    fn encode(&self, e: &mut Encoder<'_>) {
        match self {
            Some(ca) => e.str(&ca.render()),
            None => e.str(""),
        };
    }
}

impl Decode for Option<ContentAddress> {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        let s = d.string().await?;
        if s.is_empty() {
            return Ok(None);
        }
        ContentAddress::parse(&s).map(Some).map_err(protocol("content address"))
    }
}

impl Encode for ContentAddress {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.str(&self.render());
    }
}

impl Decode for ContentAddress {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        let s = d.string().await?;
        ContentAddress::parse(&s).map_err(protocol("content address"))
    }
}

// ---------------------------------------------------------------------------------
// Path infos

/// What the store knows about a valid path, without the path itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnkeyedValidPathInfo {
    pub deriver: Option<StorePath>,
    /// SHA-256 of the path's NAR serialisation.
    pub nar_hash: Hash,
    pub references: BTreeSet<StorePath>,
    pub registration_time: i64,
    pub nar_size: u64,
    /// Built locally (protocol 1.16 and later).
    pub ultimate: bool,
    pub sigs: BTreeSet<String>,
    pub ca: Option<ContentAddress>,
}

impl UnkeyedValidPathInfo {
    pub fn new(nar_hash: Hash, nar_size: u64) -> Self {
        UnkeyedValidPathInfo {
            deriver: None,
            nar_hash,
            references: BTreeSet::new(),
            registration_time: 0,
            nar_size,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        }
    }
}

impl Encode for UnkeyedValidPathInfo {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.opt_path(self.deriver.as_ref())
            .str(&self.nar_hash.to_base16())
            .put(&self.references)
            .u64(self.registration_time as u64)
            .u64(self.nar_size);
        if e.version().at_least(16) {
            e.bool(self.ultimate).put(&self.sigs).put(&self.ca);
        }
    }
}

impl Decode for UnkeyedValidPathInfo {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        let deriver = d.opt_path().await?;
        let nar_hash = Hash::parse_any(&d.string().await?, Some(HashAlgo::Sha256)).map_err(protocol("NAR hash"))?;
        let references = d.get().await?;
        let registration_time = time(d, "registration time").await?;
        let nar_size = d.u64().await?;
        let mut info = UnkeyedValidPathInfo {
            deriver,
            nar_hash,
            references,
            registration_time,
            nar_size,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        };
        if d.version().at_least(16) {
            info.ultimate = d.bool().await?;
            info.sigs = d.get().await?;
            info.ca = d.get().await?;
        }
        Ok(info)
    }
}

/// A valid path and what the store knows about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidPathInfo {
    pub path: StorePath,
    pub info: UnkeyedValidPathInfo,
}

impl Encode for ValidPathInfo {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.path(&self.path).put(&self.info);
    }
}

impl Decode for ValidPathInfo {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        let path = d.path().await?;
        let info = d.get().await?;
        Ok(ValidPathInfo { path, info })
    }
}

/// What a substituter offers for a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubstitutablePathInfo {
    pub deriver: Option<StorePath>,
    pub references: BTreeSet<StorePath>,
    pub download_size: u64,
    pub nar_size: u64,
}

impl Decode for SubstitutablePathInfo {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        Ok(SubstitutablePathInfo {
            deriver: d.opt_path().await?,
            references: d.get().await?,
            download_size: d.u64().await?,
            nar_size: d.u64().await?,
        })
    }
}

// ---------------------------------------------------------------------------------
// Derived paths and builds

/// Which outputs of a derivation a request is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum OutputsSpec {
    All,
    Names(BTreeSet<String>),
}

impl fmt::Display for OutputsSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutputsSpec::All => f.write_str("*"),
            OutputsSpec::Names(names) => {
                let v: Vec<&str> = names.iter().map(String::as_str).collect();
                f.write_str(&v.join(","))
            }
        }
    }
}

/// A store path, or outputs of a derivation, to realise.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DerivedPath {
    Opaque(StorePath),
    Built { drv_path: StorePath, outputs: OutputsSpec },
}

impl Encode for DerivedPath {
    fn encode(&self, e: &mut Encoder<'_>) {
        let store_dir = &e.ctx().store_dir;
        let s = match self {
            DerivedPath::Opaque(p) => store_dir.print(p),
            DerivedPath::Built { drv_path, outputs } => format!("{}!{}", store_dir.print(drv_path), outputs),
        };
        e.str(&s);
    }
}

impl Decode for DerivedPath {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        let s = d.string().await?;
        let store_dir = &d.ctx().store_dir;
        let bad = protocol("derived path");
        Ok(match s.split_once('!') {
            None => DerivedPath::Opaque(store_dir.parse(&s).map_err(bad)?),
            Some((drv, outs)) => DerivedPath::Built {
                drv_path: store_dir.parse(drv).map_err(bad)?,
                outputs: if outs == "*" {
                    OutputsSpec::All
                } else {
                    OutputsSpec::Names(outs.split(',').map(str::to_owned).collect())
                },
            },
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BuildMode {
    #[default]
    Normal = 0,
    Repair = 1,
    Check = 2,
}

impl Encode for BuildMode {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.u64(*self as u64);
    }
}

impl Decode for BuildMode {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        match d.u64().await? {
            0 => Ok(BuildMode::Normal),
            1 => Ok(BuildMode::Repair),
            2 => Ok(BuildMode::Check),
            n => Err(Error::Protocol(format!("invalid build mode {n}"))),
        }
    }
}

/// A derivation output's identity under content-addressed derivations:
/// `<hash of the derivation modulo>!<output name>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DrvOutput {
    pub drv_hash: Hash,
    pub output_name: String,
}

impl DrvOutput {
    pub fn parse(s: &str) -> Result<DrvOutput> {
        let (h, name) =
            s.split_once('!').ok_or_else(|| Error::InvalidInput(format!("invalid derivation output id '{s}'")))?;
        let drv_hash = Hash::parse_any(h, None)
            .map_err(|e| Error::InvalidInput(format!("invalid derivation output id '{s}': {e}")))?;
        Ok(DrvOutput { drv_hash, output_name: name.to_owned() })
    }
}

impl fmt::Display for DrvOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}!{}", self.drv_hash.algo().name(), self.drv_hash.to_base16(), self.output_name)
    }
}

impl Encode for DrvOutput {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.str(&self.to_string());
    }
}

impl Decode for DrvOutput {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        let s = d.string().await?;
        DrvOutput::parse(&s).map_err(|e| Error::Protocol(e.to_string()))
    }
}

/// Where a content-addressed derivation's output ended up. Travels as JSON.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Realisation {
    pub id: DrvOutput,
    pub out_path: StorePath,
    pub signatures: BTreeSet<String>,
    pub dependent_realisations: BTreeMap<DrvOutput, StorePath>,
}

impl Realisation {
    /// The JSON form Nix writes (keys sorted, no spaces).
    pub fn to_json(&self) -> String {
        use serde_json::{Map, Value};
        let mut deps = Map::new();
        for (k, v) in &self.dependent_realisations {
            deps.insert(k.to_string(), Value::String(v.to_string()));
        }
        let mut m = Map::new();
        m.insert("dependentRealisations".into(), Value::Object(deps));
        m.insert("id".into(), Value::String(self.id.to_string()));
        m.insert("outPath".into(), Value::String(self.out_path.to_string()));
        m.insert("signatures".into(), Value::Array(self.signatures.iter().cloned().map(Value::String).collect()));
        Value::Object(m).to_string()
    }

    pub fn from_json(s: &str) -> Result<Realisation> {
        use serde_json::Value;
        let bad = |what: &str| Error::Protocol(format!("realisation {s}: {what}"));
        let v: Value = serde_json::from_str(s).map_err(|e| bad(&e.to_string()))?;
        let field =
            |name: &str| v.get(name).and_then(Value::as_str).ok_or_else(|| bad(&format!("missing field {name}")));
        let id = DrvOutput::parse(field("id")?).map_err(|e| bad(&e.to_string()))?;
        let out_path = StorePath::from_base_name(field("outPath")?).map_err(|e| bad(&e.to_string()))?;
        let mut signatures = BTreeSet::new();
        if let Some(sigs) = v.get("signatures").and_then(Value::as_array) {
            for s in sigs {
                signatures.insert(s.as_str().ok_or_else(|| bad("signature is not a string"))?.to_owned());
            }
        }
        let mut dependent_realisations = BTreeMap::new();
        if let Some(deps) = v.get("dependentRealisations").and_then(Value::as_object) {
            for (k, p) in deps {
                let k = DrvOutput::parse(k).map_err(|e| bad(&e.to_string()))?;
                let p = p.as_str().ok_or_else(|| bad("dependency is not a string"))?;
                dependent_realisations.insert(k, StorePath::from_base_name(p).map_err(|e| bad(&e.to_string()))?);
            }
        }
        Ok(Realisation { id, out_path, signatures, dependent_realisations })
    }
}

impl Encode for Realisation {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.str(&self.to_json());
    }
}

impl Decode for Realisation {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        Realisation::from_json(&d.string().await?)
    }
}

/// BuildResult::Status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuildStatus(pub u64);

impl BuildStatus {
    pub const BUILT: BuildStatus = BuildStatus(0);
    pub const SUBSTITUTED: BuildStatus = BuildStatus(1);
    pub const ALREADY_VALID: BuildStatus = BuildStatus(2);
    pub const PERMANENT_FAILURE: BuildStatus = BuildStatus(3);
    pub const INPUT_REJECTED: BuildStatus = BuildStatus(4);
    pub const OUTPUT_REJECTED: BuildStatus = BuildStatus(5);
    pub const TRANSIENT_FAILURE: BuildStatus = BuildStatus(6);
    pub const CACHED_FAILURE: BuildStatus = BuildStatus(7);
    pub const TIMED_OUT: BuildStatus = BuildStatus(8);
    pub const MISC_FAILURE: BuildStatus = BuildStatus(9);
    pub const DEPENDENCY_FAILED: BuildStatus = BuildStatus(10);
    pub const LOG_LIMIT_EXCEEDED: BuildStatus = BuildStatus(11);
    pub const NOT_DETERMINISTIC: BuildStatus = BuildStatus(12);
    pub const RESOLVES_TO_ALREADY_VALID: BuildStatus = BuildStatus(13);
    pub const NO_SUBSTITUTERS: BuildStatus = BuildStatus(14);

    pub fn success(self) -> bool {
        matches!(self.0, 0 | 1 | 2 | 13)
    }
}

/// The outcome of building one derived path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildResult {
    pub status: BuildStatus,
    pub error_msg: String,
    pub times_built: u64,
    pub is_non_deterministic: bool,
    pub start_time: i64,
    pub stop_time: i64,
    /// CPU time in microseconds (protocol 1.37 and later).
    pub cpu_user: Option<i64>,
    pub cpu_system: Option<i64>,
    /// Output name to realisation (protocol 1.28 and later).
    pub built_outputs: BTreeMap<String, Realisation>,
}

async fn opt_micros(d: &mut Decoder) -> Result<Option<i64>> {
    match d.u64().await? {
        0 => Ok(None),
        1 => Ok(Some(d.u64().await? as i64)),
        n => Err(Error::Protocol(format!("invalid optional tag {n}"))),
    }
}

fn put_opt_micros(e: &mut Encoder<'_>, v: Option<i64>) {
    match v {
        None => e.u64(0),
        Some(us) => e.u64(1).u64(us as u64),
    };
}

impl Encode for BuildResult {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.u64(self.status.0).str(&self.error_msg);
        if e.version().at_least(29) {
            e.u64(self.times_built)
                .bool(self.is_non_deterministic)
                .u64(self.start_time as u64)
                .u64(self.stop_time as u64);
        }
        if e.version().at_least(37) {
            put_opt_micros(e, self.cpu_user);
            put_opt_micros(e, self.cpu_system);
        }
        if e.version().at_least(28) {
            let by_id: BTreeMap<&DrvOutput, &Realisation> = self.built_outputs.values().map(|r| (&r.id, r)).collect();
            e.put(&by_id);
        }
    }
}

impl Decode for BuildResult {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        let mut r = BuildResult {
            status: BuildStatus(d.u64().await?),
            error_msg: d.text().await?,
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            cpu_user: None,
            cpu_system: None,
            built_outputs: BTreeMap::new(),
        };
        if d.version().at_least(29) {
            r.times_built = d.u64_max(u32::MAX.into(), "times built").await?;
            r.is_non_deterministic = d.bool().await?;
            r.start_time = time(d, "start time").await?;
            r.stop_time = time(d, "stop time").await?;
        }
        if d.version().at_least(37) {
            r.cpu_user = opt_micros(d).await?;
            r.cpu_system = opt_micros(d).await?;
        }
        if d.version().at_least(28) {
            let outs: BTreeMap<DrvOutput, Realisation> = d.get().await?;
            for (id, real) in outs {
                r.built_outputs.insert(id.output_name, real);
            }
        }
        Ok(r)
    }
}

/// A build result together with the derived path it is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyedBuildResult {
    pub path: DerivedPath,
    pub result: BuildResult,
}

impl Encode for KeyedBuildResult {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.put(&self.path).put(&self.result);
    }
}

impl Decode for KeyedBuildResult {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        let path = d.get().await?;
        let result = d.get().await?;
        Ok(KeyedBuildResult { path, result })
    }
}

/// One output of a derivation sent to BuildDerivation, in its wire form:
/// `(path or "", method and hash algorithm or "", hash or "")`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DerivationOutput {
    pub path: Option<StorePath>,
    pub hash_algo: String,
    pub hash: String,
}

/// A derivation without its input derivations: what BuildDerivation builds.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct BasicDerivation {
    pub outputs: BTreeMap<String, DerivationOutput>,
    pub input_srcs: BTreeSet<StorePath>,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

impl Encode for BasicDerivation {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.u64(self.outputs.len() as u64);
        for (name, out) in &self.outputs {
            e.str(name).opt_path(out.path.as_ref()).str(&out.hash_algo).str(&out.hash);
        }
        e.put(&self.input_srcs).str(&self.platform).str(&self.builder).put(&self.args).put(&self.env);
    }
}

// ---------------------------------------------------------------------------------
// Garbage collection

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GcAction {
    ReturnLive = 0,
    ReturnDead = 1,
    DeleteDead = 2,
    DeleteSpecific = 3,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcOptions {
    pub action: GcAction,
    pub paths_to_delete: BTreeSet<StorePath>,
    pub ignore_liveness: bool,
    pub max_freed: u64,
}

impl Encode for GcOptions {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.u64(self.action as u64)
            .put(&self.paths_to_delete)
            .bool(self.ignore_liveness)
            .u64(self.max_freed)
            // Three obsolete fields.
            .u64(0)
            .u64(0)
            .u64(0);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcResults {
    /// Paths deleted, or (for the Return actions) found live or dead, as printed.
    pub paths: BTreeSet<String>,
    pub bytes_freed: u64,
}

impl Decode for GcResults {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        let paths = d.get().await?;
        let bytes_freed = d.u64().await?;
        d.u64().await?; // obsolete
        Ok(GcResults { paths, bytes_freed })
    }
}

/// What realising some derived paths would take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    pub will_build: BTreeSet<StorePath>,
    pub will_substitute: BTreeSet<StorePath>,
    pub unknown: BTreeSet<StorePath>,
    pub download_size: u64,
    pub nar_size: u64,
}

impl Decode for Missing {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        Ok(Missing {
            will_build: d.get().await?,
            will_substitute: d.get().await?,
            unknown: d.get().await?,
            download_size: d.u64().await?,
            nar_size: d.u64().await?,
        })
    }
}

// ---------------------------------------------------------------------------------
// Connection settings

/// Whether the daemon trusts this client (protocol 1.35 and later).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrustedFlag {
    Trusted,
    NotTrusted,
}

impl Encode for Option<TrustedFlag> {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.u64(match self {
            None => 0,
            Some(TrustedFlag::Trusted) => 1,
            Some(TrustedFlag::NotTrusted) => 2,
        });
    }
}

impl Decode for Option<TrustedFlag> {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        match d.u64().await? {
            0 => Ok(None),
            1 => Ok(Some(TrustedFlag::Trusted)),
            2 => Ok(Some(TrustedFlag::NotTrusted)),
            n => Err(Error::Protocol(format!("invalid trusted status {n}"))),
        }
    }
}

/// The client's settings, sent with SetOptions. The defaults are those Nix's
/// RemoteStore sends with default settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSettings {
    pub keep_failed: bool,
    pub keep_going: bool,
    pub try_fallback: bool,
    pub verbosity: u64,
    pub max_build_jobs: u64,
    pub max_silent_time: u64,
    pub verbose_build: bool,
    pub build_cores: u64,
    pub use_substitutes: bool,
    /// Further settings by name, as in nix.conf.
    pub overrides: BTreeMap<String, String>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            keep_failed: false,
            keep_going: false,
            try_fallback: false,
            verbosity: 3, // lvlInfo
            max_build_jobs: 1,
            max_silent_time: 0,
            verbose_build: true,
            build_cores: 0,
            use_substitutes: true,
            overrides: BTreeMap::new(),
        }
    }
}

impl Encode for ClientSettings {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.bool(self.keep_failed)
            .bool(self.keep_going)
            .bool(self.try_fallback)
            .u64(self.verbosity)
            .u64(self.max_build_jobs)
            .u64(self.max_silent_time)
            .u64(1) // obsolete useBuildHook
            .u64(if self.verbose_build { 0 } else { 7 }) // lvlError or lvlVomit
            .u64(0) // obsolete logType
            .u64(0) // obsolete printBuildTrace
            .u64(self.build_cores)
            .bool(self.use_substitutes)
            .put(&self.overrides);
    }
}
