//! Store paths, content addresses and the computation of content-addressed
//! paths (libstore/path.cc, store-api.cc, content-address.cc).

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt;

use crate::base32;
use crate::hash::{Hash, HashAlgo, HashError, compress_hash};

/// Length of a store path's hash part in base-32 characters (160 bits).
const HASH_PART_LEN: usize = 32;

/// The longest name a store path may have, in bytes.
const MAX_NAME_LEN: usize = 211;

/// Why a store path, name, store directory or content address is not valid.
/// Messages follow Nix's.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("store path name '{name}' is not valid: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("path '{path}' is not a valid store path: {reason}")]
    InvalidPath { path: String, reason: String },
    #[error("path '{0}' is not in the Nix store")]
    NotInStore(String),
    #[error("store directory '{dir}' is not valid: {reason}")]
    InvalidStoreDir { dir: String, reason: &'static str },
    #[error("'{ca}' is not a valid content address: {reason}")]
    InvalidContentAddress { ca: String, reason: String },
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error("text hashing must use SHA-256, not {0}")]
    TextHashAlgo(HashAlgo),
    #[error("Git file ingestion must use SHA-1 hash, not {0}")]
    GitHashAlgo(HashAlgo),
    #[error("self-reference not allowed with text hashing")]
    TextSelfReference,
    #[error("fixed output derivation '{0}' is not allowed to refer to other store paths")]
    FixedOutputReferences(String),
}

/// Checks a store path name as Nix 2.26.3's `checkName` does: 1 to 211
/// bytes of `[0-9a-zA-Z+-._?=]`, and neither "." nor ".." nor starting
/// with ".-" or "..-".
pub fn check_name(name: &str) -> Result<(), PathError> {
    let invalid = |reason: String| Err(PathError::InvalidName { name: name.to_owned(), reason });
    if name.is_empty() {
        return invalid("it is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return invalid(format!("it is longer than {MAX_NAME_LEN} characters"));
    }
    let first_component = name.split('-').next().unwrap_or(name);
    if first_component == "." || first_component == ".." {
        return invalid(format!("its first dash-separated component is '{first_component}'"));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "+-._?=".contains(c);
    match name.chars().find(|&c| !allowed(c)) {
        Some(c) => invalid(format!("it contains illegal character '{}'", c.escape_default())),
        None => Ok(()),
    }
}

/// A store directory such as "/nix/store".
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl Default for StoreDir {
    fn default() -> Self {
        StoreDir("/nix/store".to_owned())
    }
}

impl StoreDir {
    /// A store directory from a canonical absolute path: no trailing slash,
    /// no empty, "." or ".." components.
    pub fn new(dir: impl Into<String>) -> Result<StoreDir, PathError> {
        let dir = dir.into();
        let reason = if !dir.starts_with('/') {
            Some("it is not absolute")
        } else if dir.ends_with('/') {
            Some("it ends with '/'")
        } else if dir.contains('\0') {
            Some("it contains a NUL byte")
        } else if dir[1..].split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            Some("it is not canonical")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(PathError::InvalidStoreDir { dir, reason }),
            None => Ok(StoreDir(dir)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The full path of a store path, `/nix/store/<hash>-<name>`.
    pub fn print(&self, path: &StorePath) -> String {
        format!("{}/{path}", self.0)
    }

    /// Parses a full store path: this directory, '/', and a valid base name
    /// with nothing after it.
    pub fn parse(&self, path: &str) -> Result<StorePath, PathError> {
        let base = path
            .strip_prefix(self.0.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|base| !base.contains('/'))
            .ok_or_else(|| PathError::NotInStore(path.to_owned()))?;
        StorePath::parse_base_name(base, path)
    }

    /// Whether `path` is strictly below this directory (like Nix's `isInStore`,
    /// it need not be a store path itself).
    pub fn is_in_store(&self, path: &str) -> bool {
        path.strip_prefix(self.0.as_str()).and_then(|rest| rest.strip_prefix('/')).is_some_and(|rest| !rest.is_empty())
    }

    /// Nix's `makeStorePath`: the path named `name` whose hash part is the
    /// SHA-256 of `<ty>:<algo>:<base16 hash>:<store dir>:<name>` folded to 20 bytes.
    pub fn make_store_path(&self, ty: &str, hash: &Hash, name: &str) -> Result<StorePath, PathError> {
        check_name(name)?;
        let fingerprint = format!("{ty}:{}:{}:{name}", hash.to_typed_base16(), self.0);
        let digest = Hash::digest(HashAlgo::Sha256, fingerprint.as_bytes());
        let mut bytes = [0; 20];
        bytes.copy_from_slice(&compress_hash(digest.as_bytes(), 20));
        Ok(StorePath { hash: bytes, name: name.to_owned() })
    }

    /// Nix's `makeType`: the type followed by each reference's full path and,
    /// if the object refers to itself, "self", all separated by ':'.
    fn make_type(&self, ty: &str, references: &BTreeSet<StorePath>, self_ref: bool) -> String {
        let mut out = ty.to_owned();
        for reference in references {
            out.push(':');
            out.push_str(&self.print(reference));
        }
        if self_ref {
            out.push_str(":self");
        }
        out
    }

    /// The path of a text object (`builtins.toFile`, derivations) whose
    /// contents have SHA-256 `text_hash`. A text object cannot refer to itself.
    pub fn make_text_path(
        &self,
        name: &str,
        text_hash: &Hash,
        references: &BTreeSet<StorePath>,
    ) -> Result<StorePath, PathError> {
        if text_hash.algo() != HashAlgo::Sha256 {
            return Err(PathError::TextHashAlgo(text_hash.algo()));
        }
        self.make_store_path(&self.make_type("text", references, false), text_hash, name)
    }

    /// The path of a text object with the given contents.
    pub fn compute_text_path(
        &self,
        name: &str,
        contents: &[u8],
        references: &BTreeSet<StorePath>,
    ) -> Result<StorePath, PathError> {
        self.make_text_path(name, &Hash::digest(HashAlgo::Sha256, contents), references)
    }

    /// The path of a content-addressed object, following Nix's
    /// `makeFixedOutputPathFromCA`: text objects as [`make_text_path`](Self::make_text_path)
    /// (no self-reference); SHA-256 NAR hashes as "source" paths, which may
    /// have references; everything else, with no references at all, from the
    /// hash of `fixed:out:<method prefix><algo>:<base16>:`.
    pub fn make_fixed_output_path(
        &self,
        name: &str,
        method: ContentAddressMethod,
        hash: &Hash,
        references: &BTreeSet<StorePath>,
        self_ref: bool,
    ) -> Result<StorePath, PathError> {
        match method {
            ContentAddressMethod::Text if self_ref => Err(PathError::TextSelfReference),
            ContentAddressMethod::Text => self.make_text_path(name, hash, references),
            ContentAddressMethod::Git if hash.algo() != HashAlgo::Sha1 => Err(PathError::GitHashAlgo(hash.algo())),
            ContentAddressMethod::Nar if hash.algo() == HashAlgo::Sha256 => {
                self.make_store_path(&self.make_type("source", references, self_ref), hash, name)
            }
            _ if self_ref || !references.is_empty() => Err(PathError::FixedOutputReferences(name.to_owned())),
            _ => {
                let payload = format!("fixed:out:{}{}:", method.ingestion_prefix(), hash.to_typed_base16());
                let digest = Hash::digest(HashAlgo::Sha256, payload.as_bytes());
                self.make_store_path("output:out", &digest, name)
            }
        }
    }

    /// [`make_fixed_output_path`](Self::make_fixed_output_path) with the
    /// method and hash of a content address.
    pub fn make_fixed_output_path_from_ca(
        &self,
        name: &str,
        ca: &ContentAddress,
        references: &BTreeSet<StorePath>,
        self_ref: bool,
    ) -> Result<StorePath, PathError> {
        self.make_fixed_output_path(name, ca.method, &ca.hash, references, self_ref)
    }
}

/// A store path without its directory: a 20-byte hash and a name, printed as
/// `<32 base-32 characters>-<name>`.
///
/// Ordered like Nix's `StorePath`, by the printed base name.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StorePath {
    hash: [u8; 20],
    name: String,
}

impl StorePath {
    /// Parses `<hash>-<name>`.
    pub fn from_base_name(base: &str) -> Result<StorePath, PathError> {
        Self::parse_base_name(base, base)
    }

    /// Parses a base name; errors name `shown`, the string the caller gave.
    fn parse_base_name(base: &str, shown: &str) -> Result<StorePath, PathError> {
        let (hash, name) = Self::split_base_name(base, shown)?;
        Ok(StorePath { hash, name: name.to_owned() })
    }

    /// Checks `<hash>-<name>` and returns its hash without allocating, for callers
    /// that make the path later, on another thread.
    pub fn check_base_name(base: &str) -> Result<[u8; 20], PathError> {
        Ok(Self::split_base_name(base, base)?.0)
    }

    /// The parts of a base name that [`StorePath::check_base_name`] accepted.
    pub(crate) fn from_checked_parts(hash: [u8; 20], name: &str) -> StorePath {
        debug_assert!(check_name(name).is_ok());
        StorePath { hash, name: name.to_owned() }
    }

    fn split_base_name<'a>(base: &'a str, shown: &str) -> Result<([u8; 20], &'a str), PathError> {
        let invalid = |reason: String| PathError::InvalidPath { path: shown.to_owned(), reason };
        if base.len() <= HASH_PART_LEN {
            return Err(invalid("it is too short".into()));
        }
        let (hash_part, name) = base
            .split_at_checked(HASH_PART_LEN)
            .ok_or_else(|| invalid("its hash part contains a non-ASCII character".into()))?;
        let name = name.strip_prefix('-').ok_or_else(|| invalid("its hash part is not followed by '-'".into()))?;
        let mut hash = [0u8; 20];
        base32::decode_into(hash_part, &mut hash).map_err(|e| invalid(e.to_string()))?;
        check_name(name).map_err(|e| invalid(e.to_string()))?;
        Ok((hash, name))
    }

    /// A store path from its parts; the name must pass [`check_name`].
    pub fn from_parts(hash: [u8; 20], name: &str) -> Result<StorePath, PathError> {
        check_name(name)?;
        Ok(StorePath { hash, name: name.to_owned() })
    }

    /// The 32-character base-32 hash part.
    pub fn hash_part(&self) -> String {
        base32::encode(&self.hash)
    }

    pub fn hash_bytes(&self) -> &[u8; 20] {
        &self.hash
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the name ends in ".drv".
    pub fn is_derivation(&self) -> bool {
        self.name.ends_with(".drv")
    }
}

impl Ord for StorePath {
    /// Compares the printed base names without printing them. The hash part
    /// writes the hash as a little-endian number, most significant digit
    /// first, in an alphabet in ASCII order; 32 digits hold exactly its 160
    /// bits, so comparing hash parts is comparing the bytes from the last.
    fn cmp(&self, other: &Self) -> Ordering {
        self.hash.iter().rev().cmp(other.hash.iter().rev()).then_with(|| self.name.cmp(&other.name))
    }
}

impl PartialOrd for StorePath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.hash_part(), self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How a content-addressed object's hash was computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContentAddressMethod {
    /// The hash of a flat file's contents, for text objects (which may have references).
    Text,
    /// The hash of a flat file's contents.
    Flat,
    /// The hash of the NAR serialisation.
    Nar,
    /// The Git object hash (experimental in Nix).
    Git,
}

impl ContentAddressMethod {
    /// The prefix "fixed:" paths and content addresses put before the algorithm.
    fn ingestion_prefix(self) -> &'static str {
        match self {
            ContentAddressMethod::Text | ContentAddressMethod::Flat => "",
            ContentAddressMethod::Nar => "r:",
            ContentAddressMethod::Git => "git:",
        }
    }

    /// Nix's `renderPrefixModern`: "text:", "fixed:", "fixed:r:" or "fixed:git:".
    fn render_prefix(self) -> String {
        match self {
            ContentAddressMethod::Text => "text:".to_owned(),
            _ => format!("fixed:{}", self.ingestion_prefix()),
        }
    }

    /// The method string of AddToStore: "text:sha256", "fixed:sha256",
    /// "fixed:r:sha256", "fixed:git:sha1".
    pub fn render_with_algo(self, algo: HashAlgo) -> String {
        format!("{}{algo}", self.render_prefix())
    }

    /// Parses what [`render_with_algo`](Self::render_with_algo) renders.
    pub fn parse_with_algo(s: &str) -> Result<(ContentAddressMethod, HashAlgo), PathError> {
        let (method, algo) = Self::parse_prefix(s)?;
        Ok((method, algo.parse()?))
    }

    /// Splits "text:…", "fixed:…", "fixed:r:…" or "fixed:git:…" into the
    /// method and what follows it.
    fn parse_prefix(s: &str) -> Result<(ContentAddressMethod, &str), PathError> {
        let invalid = |reason: String| PathError::InvalidContentAddress { ca: s.to_owned(), reason };
        let (prefix, rest) =
            s.split_once(':').ok_or_else(|| invalid("it is not of the form '<prefix>:<rest>'".into()))?;
        match prefix {
            "text" => Ok((ContentAddressMethod::Text, rest)),
            "fixed" => Ok(if let Some(rest) = rest.strip_prefix("r:") {
                (ContentAddressMethod::Nar, rest)
            } else if let Some(rest) = rest.strip_prefix("git:") {
                (ContentAddressMethod::Git, rest)
            } else {
                (ContentAddressMethod::Flat, rest)
            }),
            _ => Err(invalid(format!("prefix '{prefix}' is unrecognized; recognized prefixes are 'text' and 'fixed'"))),
        }
    }
}

/// A content address: how an object was hashed, and the hash.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContentAddress {
    pub method: ContentAddressMethod,
    pub hash: Hash,
}

impl ContentAddress {
    /// Nix's rendering, e.g. `fixed:r:sha256:<base32>` or `text:sha256:<base32>`.
    pub fn render(&self) -> String {
        format!("{}{}", self.method.render_prefix(), self.hash.to_typed_base32())
    }

    /// Parses a content address; the hash may be base-16, base-32 or base-64.
    pub fn parse(s: &str) -> Result<ContentAddress, PathError> {
        let (method, rest) = ContentAddressMethod::parse_prefix(s)?;
        let (algo, hash) = rest.split_once(':').ok_or_else(|| PathError::InvalidContentAddress {
            ca: s.to_owned(),
            reason: "its hash is not of the form '<algo>:<hash>'".into(),
        })?;
        let hash = Hash::parse_unprefixed(hash, algo.parse()?)?;
        Ok(ContentAddress { method, hash })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH_PART: &str = "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q";

    fn sha256(hex: &str) -> Hash {
        Hash::parse_any(hex, Some(HashAlgo::Sha256)).unwrap()
    }

    fn refs(dir: &StoreDir, paths: &[&str]) -> BTreeSet<StorePath> {
        paths.iter().map(|p| dir.parse(p).unwrap()).collect()
    }

    /// The cases of Nix's libstore-tests/path.cc.
    #[test]
    fn names_like_nix() {
        let dir = StoreDir::default();
        for bad in ["", "&*()", "**", "*,foo", "foo,*", "foo!o", ".", "..", "..-1", ".-1", "..-a", ".-a"] {
            let path = format!("/nix/store/{HASH_PART}-{bad}");
            let err = dir.parse(&path).unwrap_err().to_string();
            assert!(err.contains(&path), "{err}");
            assert!(check_name(bad).is_err(), "{bad}");
        }
        for good in [
            "02345",
            "foo",
            "FOO",
            "foo+bar",
            "foo-dev",
            "foo_bar",
            "foo.txt",
            "foo?why",
            "foo=foo",
            ".gitignore",
            "...a",
            "...1",
            "...-",
            "...",
        ] {
            let path = dir.parse(&format!("/nix/store/{HASH_PART}-{good}")).unwrap();
            assert_eq!(path.name(), good);
            assert_eq!(path.hash_part(), HASH_PART);
        }
        assert!(check_name(&"a".repeat(211)).is_ok());
        let err = check_name(&"a".repeat(212)).unwrap_err().to_string();
        assert!(err.contains("longer than 211"), "{err}");
        let err = check_name("foo bar").unwrap_err().to_string();
        assert_eq!(err, "store path name 'foo bar' is not valid: it contains illegal character ' '");
        assert!(check_name("caf\u{e9}").is_err());
    }

    #[test]
    fn parse_and_print() {
        let dir = StoreDir::default();
        let s = "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo.drv";
        let path = dir.parse(s).unwrap();
        assert_eq!(dir.print(&path), s);
        assert_eq!(path.to_string(), "vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo.drv");
        assert_eq!(format!("{path:?}"), path.to_string());
        assert!(path.is_derivation());
        assert_eq!(StorePath::from_base_name(&path.to_string()).unwrap(), path);
        assert_eq!(StorePath::from_parts(*path.hash_bytes(), "foo.drv").unwrap(), path);
        assert!(StorePath::from_parts(*path.hash_bytes(), "a/b").is_err());

        for (bad, needle) in [
            ("/nix/store", "not in the Nix store"),
            ("/nix/store/", "too short"),
            ("/nix/storevxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo", "not in the Nix store"),
            ("/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo/bin", "not in the Nix store"),
            ("/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-", "is empty"),
            ("/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0", "too short"),
            ("/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0_foo", "not followed by '-'"),
            ("/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2awe-foo", "invalid character 'e'"),
            ("/nix/store/VXJIWKJKN7X4079QVH1JKL5PN05J2AW0-foo", "invalid character 'V'"),
            ("/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2a\u{e9}-foo", "is not a valid store path"),
        ] {
            let err = dir.parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains(needle), "{bad}: {err}");
        }
        assert!(dir.is_in_store(s));
        assert!(dir.is_in_store("/nix/store/x/y"));
        assert!(!dir.is_in_store("/nix/store/"));
        assert!(!dir.is_in_store("/nix/storex"));
    }

    #[test]
    fn store_dirs() {
        assert_eq!(StoreDir::new("/foo/bar").unwrap().as_str(), "/foo/bar");
        assert_eq!(StoreDir::default().as_str(), "/nix/store");
        for bad in ["", "nix/store", "/", "/nix/store/", "/nix//store", "/nix/./store", "/nix/../store", "/a\0b"] {
            let err = StoreDir::new(bad).unwrap_err().to_string();
            assert!(err.contains("store directory"), "{bad:?}: {err}");
        }
    }

    /// Ordering by bytes from the last must agree with ordering the printed names.
    #[test]
    fn ordering_matches_printed_names() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let paths: Vec<StorePath> = (0..300)
            .map(|i| {
                let mut hash = [0u8; 20];
                // Few distinct byte values, so that prefixes are often shared.
                hash.iter_mut().for_each(|b| *b = (next() % 3) as u8 * 0x7f);
                let name = ["a", "b", "a-b", "ab"][i % 4];
                StorePath::from_parts(hash, name).unwrap()
            })
            .collect();
        for a in &paths {
            for b in &paths {
                assert_eq!(a.cmp(b), a.to_string().cmp(&b.to_string()), "{a} {b}");
            }
        }
    }

    /// Paths printed by Nix 2.26.3: `nix-store --print-fixed-path`,
    /// `builtins.toFile` and `nix store add --dry-run`.
    #[test]
    fn fixed_output_paths() {
        let dir = StoreDir::default();
        let none = BTreeSet::new();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let fixed =
            |method, hash: &Hash| dir.make_fixed_output_path("foo", method, hash, &none, false).unwrap().to_string();
        assert_eq!(fixed(ContentAddressMethod::Flat, &sha256(abc)), "p8hd84z8vx40y3q2l1mmbfd9y23h7g1a-foo");
        assert_eq!(fixed(ContentAddressMethod::Nar, &sha256(abc)), "8nz4xrxpk6mgia8bb9jxncpcikkm2xxv-foo");
        let sha1 = Hash::digest(HashAlgo::Sha1, b"abc");
        assert_eq!(fixed(ContentAddressMethod::Nar, &sha1), "vpvld71qx55l3i2gdawdlqipjs7gfw6r-foo");
        let md5 = Hash::digest(HashAlgo::Md5, b"abc");
        assert_eq!(fixed(ContentAddressMethod::Flat, &md5), "5cn55ilvxjp5a3wc5s9v6jxk3syc5v0m-foo");
        let sha512 = Hash::digest(HashAlgo::Sha512, b"abc");
        assert_eq!(fixed(ContentAddressMethod::Flat, &sha512), "4rc5l3lrid1k7j821yy8sr6kx2ha6sjs-foo");

        let other = StoreDir::new("/foo/bar").unwrap();
        let path = other.make_fixed_output_path("foo", ContentAddressMethod::Nar, &sha256(abc), &none, false);
        assert_eq!(other.print(&path.unwrap()), "/foo/bar/d2d241s992kg11r4923lpp27zmaisdaf-foo");

        // The Git blob hash of "hello\n".
        let git = Hash::parse_any("sha1:ce013625030ba8dba906f756967f9e9ca394464a", None).unwrap();
        let path = dir.make_fixed_output_path("hello.txt", ContentAddressMethod::Git, &git, &none, false);
        assert_eq!(path.unwrap().to_string(), "rk1ijlrs1r2baksyhs884xqb0afsc830-hello.txt");
    }

    #[test]
    fn text_paths() {
        let dir = StoreDir::default();
        let none = BTreeSet::new();
        let text = |name, contents: &str, refs| dir.compute_text_path(name, contents.as_bytes(), refs).unwrap();
        assert_eq!(dir.print(&text("foo", "bar", &none)), "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo");
        assert_eq!(dir.print(&text("baz", "hello", &none)), "/nix/store/lch6ll8cr7y7aq6f7ljyi5p01l6wpcx1-baz");
        assert_eq!(text("x.drv", "", &none).to_string(), "mmm9bhchl8y3rnfvk02d2pnnsxjf87jn-x.drv");
        assert_eq!(text("hello.txt", "hello\n", &none).to_string(), "qa1w9gdfrba6jl2r57mb3c43863gqywp-hello.txt");
        let other = StoreDir::new("/foo/bar").unwrap();
        let path = other.compute_text_path("foo", b"bar", &none).unwrap();
        assert_eq!(path.to_string(), "22hzlp8niqxmxh35cpknwb5avv5hwsdw-foo");

        // builtins.toFile "withrefs" "${baz} ${foo}": references sorted by name.
        let baz = "/nix/store/lch6ll8cr7y7aq6f7ljyi5p01l6wpcx1-baz";
        let foo = "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo";
        let with_refs = text("withrefs", &format!("{baz} {foo}"), &refs(&dir, &[foo, baz]));
        assert_eq!(with_refs.to_string(), "z1c03mf7siwgrkyky2rq4p8cidp7wkln-withrefs");
    }

    /// A store with directory /tmp/paths-exp/s/store in which Nix 2.26.3's
    /// `nix store make-content-addressed` rewrote a self-referencing output
    /// and its text dependency into "source" paths.
    #[test]
    fn source_paths_with_references() {
        let dir = StoreDir::new("/tmp/paths-exp/s/store").unwrap();
        let none = BTreeSet::new();
        let from_ca = |name, ca: &str, refs: &BTreeSet<StorePath>, self_ref| {
            let ca = ContentAddress::parse(ca).unwrap();
            dir.print(&dir.make_fixed_output_path_from_ca(name, &ca, refs, self_ref).unwrap())
        };
        let text_dep = "text:sha256:0njri53nkmgsfdf3cnzkd3yydpyakm4vvcs5j8dky6iyjz2l9zsy";
        assert_eq!(
            from_ca("dep", text_dep, &none, false),
            "/tmp/paths-exp/s/store/4sag06wwyi0gnzfy0nk22iqbjk4ln7sg-dep"
        );
        let dep = "/tmp/paths-exp/s/store/z36w1whb88vzlwdy8xj8sg6l8fmdmvil-dep";
        let nar_dep = "fixed:r:sha256:0hf76l5xclv6x309v16ralpi37nadq4pdafnn8b3kfwf6qyqh2bv";
        assert_eq!(from_ca("dep", nar_dep, &none, false), dep);
        let nar_selfref = "fixed:r:sha256:06k8lq7v27pa6zcw90bl91dcd1v0dxyv4rair3nzkhqi02kkaabz";
        assert_eq!(
            from_ca("selfref", nar_selfref, &refs(&dir, &[dep]), true),
            "/tmp/paths-exp/s/store/b3f2c5v7s9vcs7i27pci4v11yvqr40br-selfref"
        );
    }

    #[test]
    fn path_computation_errors() {
        let dir = StoreDir::default();
        let none = BTreeSet::new();
        let one = refs(&dir, &["/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo"]);
        let sha1 = Hash::digest(HashAlgo::Sha1, b"x");
        let sha256 = Hash::digest(HashAlgo::Sha256, b"x");
        let fixed = |method, hash, refs, self_ref| {
            dir.make_fixed_output_path("x", method, hash, refs, self_ref).unwrap_err().to_string()
        };
        assert!(fixed(ContentAddressMethod::Text, &sha256, &none, true).contains("self-reference"));
        assert!(fixed(ContentAddressMethod::Text, &sha1, &none, false).contains("SHA-256"));
        assert!(fixed(ContentAddressMethod::Git, &sha256, &none, false).contains("SHA-1"));
        assert!(fixed(ContentAddressMethod::Flat, &sha256, &one, false).contains("not allowed to refer"));
        assert!(fixed(ContentAddressMethod::Flat, &sha256, &none, true).contains("not allowed to refer"));
        assert!(fixed(ContentAddressMethod::Nar, &sha1, &one, false).contains("not allowed to refer"));
        assert!(dir.make_text_path("x", &sha1, &none).is_err());
        assert!(dir.make_store_path("source", &sha256, "bad/name").is_err());
        // Allowed: references in text and SHA-256 NAR paths.
        assert!(dir.make_fixed_output_path("x", ContentAddressMethod::Text, &sha256, &one, false).is_ok());
        assert!(dir.make_fixed_output_path("x", ContentAddressMethod::Nar, &sha256, &one, true).is_ok());
    }

    #[test]
    fn content_addresses() {
        let h = Hash::digest(HashAlgo::Sha256, b"abc");
        let b32 = h.to_base32();
        for (method, rendered) in [
            (ContentAddressMethod::Text, format!("text:sha256:{b32}")),
            (ContentAddressMethod::Flat, format!("fixed:sha256:{b32}")),
            (ContentAddressMethod::Nar, format!("fixed:r:sha256:{b32}")),
            (ContentAddressMethod::Git, format!("fixed:git:sha256:{b32}")),
        ] {
            let ca = ContentAddress { method, hash: h.clone() };
            assert_eq!(ca.render(), rendered);
            assert_eq!(ContentAddress::parse(&rendered).unwrap(), ca);
        }
        // Base-16 and base-64 hashes parse too.
        let hex = ContentAddress::parse(&format!("fixed:r:sha256:{}", h.to_base16())).unwrap();
        assert_eq!(hex.hash, h);
        let b64 = ContentAddress::parse(&format!("text:sha256:{}", h.to_base64())).unwrap();
        assert_eq!(b64.hash, h);

        for (bad, needle) in [
            ("sha256", "'<prefix>:<rest>'"),
            ("source:sha256:abc", "prefix 'source' is unrecognized"),
            ("fixed:r:sha256", "'<algo>:<hash>'"),
            ("fixed:sha3:abc", "unknown hash algorithm 'sha3'"),
            ("fixed:sha256:abc", "wrong length"),
            (&format!("fixed:sha256:{}", h.to_sri()), "wrong length"),
        ] {
            let err = ContentAddress::parse(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn methods_with_algo() {
        for (method, algo, s) in [
            (ContentAddressMethod::Text, HashAlgo::Sha256, "text:sha256"),
            (ContentAddressMethod::Nar, HashAlgo::Sha256, "fixed:r:sha256"),
            (ContentAddressMethod::Flat, HashAlgo::Sha256, "fixed:sha256"),
            (ContentAddressMethod::Git, HashAlgo::Sha1, "fixed:git:sha1"),
            (ContentAddressMethod::Flat, HashAlgo::Md5, "fixed:md5"),
        ] {
            assert_eq!(method.render_with_algo(algo), s);
            assert_eq!(ContentAddressMethod::parse_with_algo(s).unwrap(), (method, algo));
        }
        for bad in ["text", "fixed:r", "fixed:r:sha256:x", "flat:sha256", "fixed:git:"] {
            assert!(ContentAddressMethod::parse_with_algo(bad).is_err(), "{bad}");
        }
    }
}
