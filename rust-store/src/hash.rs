//! Hashes as Nix prints and parses them (libutil/hash.cc).

use std::fmt;
use std::io;
use std::str::FromStr;

use data_encoding::{BASE64, HEXLOWER, HEXLOWER_PERMISSIVE};
use digest::Digest;

use crate::base32::{self, InvalidBase32};

/// The longest digest, SHA-512's.
const MAX_SIZE: usize = 64;

/// The hash algorithms Nix supports.
///
/// The order is that of the digest sizes, which makes the derived ordering of
/// [`Hash`](struct@Hash) the same as Nix's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    /// The name Nix uses: "md5", "sha1", "sha256" or "sha512".
    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// The digest size in bytes.
    pub fn size(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    fn base16_len(self) -> usize {
        self.size() * 2
    }

    fn base64_len(self) -> usize {
        self.size().div_ceil(3) * 4
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = HashError;

    fn from_str(s: &str) -> Result<Self, HashError> {
        match s {
            "md5" => Ok(HashAlgo::Md5),
            "sha1" => Ok(HashAlgo::Sha1),
            "sha256" => Ok(HashAlgo::Sha256),
            "sha512" => Ok(HashAlgo::Sha512),
            _ => Err(HashError::UnknownAlgo(s.to_owned())),
        }
    }
}

/// Why a hash could not be made or parsed. Messages follow Nix's.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("unknown hash algorithm '{0}', expect 'md5', 'sha1', 'sha256', or 'sha512'")]
    UnknownAlgo(String),
    #[error("a {algo} hash is {} bytes, not {len}", algo.size())]
    WrongSize { algo: HashAlgo, len: usize },
    #[error("hash '{0}' does not include a type, nor is the type otherwise known from context")]
    MissingAlgo(String),
    #[error("hash '{hash}' should have type '{expected}'")]
    AlgoMismatch { hash: String, expected: HashAlgo },
    #[error("hash '{0}' is not SRI")]
    NotSri(String),
    #[error("hash '{hash}' has wrong length for hash algorithm '{algo}'")]
    WrongLength { hash: String, algo: HashAlgo },
    #[error("invalid base-16 hash '{0}'")]
    InvalidBase16(String),
    #[error(transparent)]
    InvalidBase32(#[from] InvalidBase32),
    #[error("invalid {} hash '{hash}'", if *.sri { "SRI" } else { "base-64" })]
    InvalidBase64 { hash: String, sri: bool },
}

/// A digest together with its algorithm.
///
/// Debug prints the SRI form, Display the typed base-32 form ("sha256:1b8m…").
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash {
    algo: HashAlgo,
    /// The digest in the first `algo.size()` bytes; the rest are always zero.
    bytes: [u8; MAX_SIZE],
}

impl Hash {
    /// A hash from its digest bytes, which must be `algo.size()` long.
    pub fn new(algo: HashAlgo, digest: &[u8]) -> Result<Hash, HashError> {
        if digest.len() != algo.size() {
            return Err(HashError::WrongSize { algo, len: digest.len() });
        }
        let mut bytes = [0; MAX_SIZE];
        bytes[..digest.len()].copy_from_slice(digest);
        Ok(Hash { algo, bytes })
    }

    /// Hashes `data` in one go.
    pub fn digest(algo: HashAlgo, data: &[u8]) -> Hash {
        let mut hasher = Hasher::new(algo);
        hasher.update(data);
        hasher.finish()
    }

    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.algo.size()]
    }

    /// Lower-case hexadecimal, without the algorithm.
    pub fn to_base16(&self) -> String {
        HEXLOWER.encode(self.as_bytes())
    }

    /// Nix base-32, without the algorithm.
    pub fn to_base32(&self) -> String {
        base32::encode(self.as_bytes())
    }

    /// Padded standard base-64, without the algorithm.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.as_bytes())
    }

    /// The SRI form, `sha256-<base64>`.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, self.to_base64())
    }

    /// `sha256:<base16>`, the form store path computations hash.
    pub fn to_typed_base16(&self) -> String {
        format!("{}:{}", self.algo, self.to_base16())
    }

    /// `sha256:<base32>`, the form content addresses use.
    pub fn to_typed_base32(&self) -> String {
        format!("{}:{}", self.algo, self.to_base32())
    }

    /// Parses a hash the way Nix's `Hash::parseAny` does: `algo:<hash>`,
    /// SRI `algo-<base64>`, or a bare hash of algorithm `default_algo`. A
    /// prefixed algorithm must agree with `default_algo` if both are given.
    /// Without SRI the encoding (base-16, base-32 or base-64) follows from
    /// the length.
    pub fn parse_any(s: &str, default_algo: Option<HashAlgo>) -> Result<Hash, HashError> {
        let (prefix, rest, sri) = match s.split_once(':') {
            Some((algo, rest)) => (Some(algo), rest, false),
            None => match s.split_once('-') {
                Some((algo, rest)) => (Some(algo), rest, true),
                None => (None, s, false),
            },
        };
        let algo = match (prefix.map(str::parse::<HashAlgo>).transpose()?, default_algo) {
            (None, None) => return Err(HashError::MissingAlgo(s.to_owned())),
            (Some(parsed), Some(expected)) if parsed != expected => {
                return Err(HashError::AlgoMismatch { hash: s.to_owned(), expected });
            }
            (Some(algo), _) | (None, Some(algo)) => algo,
        };
        Self::decode(rest, algo, sri)
    }

    /// Parses an SRI hash, `sha256-<base64>`.
    pub fn parse_sri(s: &str) -> Result<Hash, HashError> {
        let (algo, rest) = s.split_once('-').ok_or_else(|| HashError::NotSri(s.to_owned()))?;
        Self::decode(rest, algo.parse()?, true)
    }

    /// Parses a hash of a known algorithm with no prefix, in base-16, base-32
    /// or base-64 chosen by length (Nix's `Hash::parseNonSRIUnprefixed`).
    pub fn parse_unprefixed(s: &str, algo: HashAlgo) -> Result<Hash, HashError> {
        Self::decode(s, algo, false)
    }

    fn decode(s: &str, algo: HashAlgo, sri: bool) -> Result<Hash, HashError> {
        let bytes = if !sri && s.len() == algo.base16_len() {
            HEXLOWER_PERMISSIVE.decode(s.as_bytes()).map_err(|_| HashError::InvalidBase16(s.to_owned()))?
        } else if !sri && s.len() == base32::encoded_len(algo.size()) {
            base32::decode(s)?
        } else if sri || s.len() == algo.base64_len() {
            decode_base64_like_nix(s)
                .filter(|bytes| bytes.len() == algo.size())
                .ok_or_else(|| HashError::InvalidBase64 { hash: s.to_owned(), sri })?
        } else {
            return Err(HashError::WrongLength { hash: s.to_owned(), algo });
        };
        Hash::new(algo, &bytes)
    }
}

/// Base-64 as leniently as Nix's `base64Decode`: stops at the first '=',
/// skips newlines and ignores leftover bits. `None` on any other character.
fn decode_base64_like_nix(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 2);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().take_while(|&c| c != b'=').filter(|&c| c != b'\n') {
        let digit = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6 | u32::from(digit)) & 0xfff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_typed_base32())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_sri())
    }
}

/// A streaming hash computation.
#[derive(Clone)]
pub struct Hasher(State);

#[derive(Clone)]
enum State {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algo: HashAlgo) -> Hasher {
        Hasher(match algo {
            HashAlgo::Md5 => State::Md5(Digest::new()),
            HashAlgo::Sha1 => State::Sha1(Digest::new()),
            HashAlgo::Sha256 => State::Sha256(Digest::new()),
            HashAlgo::Sha512 => State::Sha512(Digest::new()),
        })
    }

    pub fn update(&mut self, data: &[u8]) {
        match &mut self.0 {
            State::Md5(h) => h.update(data),
            State::Sha1(h) => h.update(data),
            State::Sha256(h) => h.update(data),
            State::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Hash {
        let (algo, digest) = match self.0 {
            State::Md5(h) => (HashAlgo::Md5, h.finalize().to_vec()),
            State::Sha1(h) => (HashAlgo::Sha1, h.finalize().to_vec()),
            State::Sha256(h) => (HashAlgo::Sha256, h.finalize().to_vec()),
            State::Sha512(h) => (HashAlgo::Sha512, h.finalize().to_vec()),
        };
        let mut bytes = [0; MAX_SIZE];
        bytes[..digest.len()].copy_from_slice(&digest);
        Hash { algo, bytes }
    }
}

/// A [`Hasher`] that also counts the bytes, as Nix's `HashSink` does: write a
/// NAR into it to get the narHash and narSize together.
#[derive(Clone)]
pub struct HashSink {
    hasher: Hasher,
    len: u64,
}

impl HashSink {
    pub fn new(algo: HashAlgo) -> HashSink {
        HashSink { hasher: Hasher::new(algo), len: 0 }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
    }

    /// The hash and the number of bytes hashed.
    pub fn finish(self) -> (Hash, u64) {
        (self.hasher.finish(), self.len)
    }
}

impl io::Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Folds `bytes` into `new_size` bytes by XOR-ing byte `i` into `i % new_size`
/// (Nix's `compressHash`). Empty if `new_size` is zero.
pub fn compress_hash(bytes: &[u8], new_size: usize) -> Vec<u8> {
    let mut out = vec![0; new_size];
    if new_size > 0 {
        for (i, b) in bytes.iter().enumerate() {
            out[i % new_size] ^= b;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const LONG1: &str = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    const LONG2: &str = "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu";

    /// The RFC vectors of Nix's libutil-tests/hash.cc.
    #[test]
    fn known_digests() {
        let cases = [
            (HashAlgo::Md5, "", "md5:d41d8cd98f00b204e9800998ecf8427e"),
            (HashAlgo::Md5, "abc", "md5:900150983cd24fb0d6963f7d28e17f72"),
            (HashAlgo::Sha1, "abc", "sha1:a9993e364706816aba3e25717850c26c9cd0d89d"),
            (HashAlgo::Sha1, LONG1, "sha1:84983e441c3bd26ebaae4aa1f95129e5e54670f1"),
            (HashAlgo::Sha256, "abc", "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
            (HashAlgo::Sha256, LONG1, "sha256:248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"),
            (
                HashAlgo::Sha512,
                "abc",
                "sha512:ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
            ),
            (
                HashAlgo::Sha512,
                LONG2,
                "sha512:8e959b75dae313da8cf4f72814fc143f8f7779c6eb9f7fa17299aeadb6889018501d289e4900f7e4331b99dec4b5433ac7d329eeb6dd26545e96e55b874be909",
            ),
        ];
        for (algo, input, expected) in cases {
            let hash = Hash::digest(algo, input.as_bytes());
            assert_eq!(hash.to_typed_base16(), expected);
            assert_eq!(hash.algo(), algo);
            assert_eq!(hash.as_bytes().len(), algo.size());
        }
    }

    /// Every form of sha256("abc"), as printed by Nix 2.26.3's nix-hash.
    #[test]
    fn formats() {
        let h = Hash::digest(HashAlgo::Sha256, b"abc");
        let b16 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let b32 = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
        let b64 = "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=";
        assert_eq!(h.to_base16(), b16);
        assert_eq!(h.to_base32(), b32);
        assert_eq!(h.to_base64(), b64);
        assert_eq!(h.to_sri(), format!("sha256-{b64}"));
        assert_eq!(h.to_typed_base32(), format!("sha256:{b32}"));
        assert_eq!(h.to_string(), format!("sha256:{b32}"));
        assert_eq!(format!("{h:?}"), format!("sha256-{b64}"));

        let md5 = Hash::digest(HashAlgo::Md5, b"abc");
        assert_eq!(md5.to_base32(), "3jgzhjhz9zjvbb0kyj7jc500ch");
        let sha512 = Hash::digest(HashAlgo::Sha512, b"abc");
        assert_eq!(
            sha512.to_base32(),
            "2gs8k559z4rlahfx0y688s49m2vvszylcikrfinm30ly9rak69236nkam5ydvly1ai7xac99vxfc4ii84hawjbk876blyk1jfhkbbyx"
        );
    }

    #[test]
    fn parse_every_form() {
        for algo in [HashAlgo::Md5, HashAlgo::Sha1, HashAlgo::Sha256, HashAlgo::Sha512] {
            let h = Hash::digest(algo, b"parse me");
            let forms = [
                h.to_typed_base16(),
                h.to_typed_base16().to_uppercase().replacen(&algo.name().to_uppercase(), algo.name(), 1),
                h.to_typed_base32(),
                format!("{algo}:{}", h.to_base64()),
                h.to_sri(),
                h.to_sri().trim_end_matches('=').to_owned(),
            ];
            for form in &forms {
                assert_eq!(Hash::parse_any(form, None).unwrap(), h, "{form}");
                assert_eq!(Hash::parse_any(form, Some(algo)).unwrap(), h, "{form}");
            }
            for bare in [h.to_base16(), h.to_base32(), h.to_base64()] {
                assert_eq!(Hash::parse_any(&bare, Some(algo)).unwrap(), h, "{bare}");
                assert_eq!(Hash::parse_unprefixed(&bare, algo).unwrap(), h, "{bare}");
            }
            assert_eq!(Hash::parse_sri(&h.to_sri()).unwrap(), h);
        }
    }

    #[test]
    fn parse_errors() {
        let h = Hash::digest(HashAlgo::Sha256, b"abc");
        let err = |s: &str, algo| Hash::parse_any(s, algo).unwrap_err().to_string();

        assert!(err(&h.to_base32(), None).contains("does not include a type"));
        assert!(err(&h.to_typed_base32(), Some(HashAlgo::Sha1)).contains("should have type 'sha1'"));
        assert!(err("sha3:abcd", None).contains("unknown hash algorithm 'sha3'"));
        assert!(err("sha256:abcd", None).contains("wrong length for hash algorithm 'sha256'"));
        let bad16 = format!("sha256:{}", "g".repeat(64));
        assert!(err(&bad16, None).contains("invalid base-16 hash"));
        let bad32 = format!("sha256:{}", "e".repeat(52));
        assert!(err(&bad32, None).contains("invalid character 'e'"));
        let bad64 = format!("sha256:{}", "!".repeat(44));
        assert!(err(&bad64, None).contains("invalid base-64 hash"));
        assert!(err("sha256-AAAA", None).contains("invalid SRI hash"));
        assert!(err("sha256-!!!!", None).contains("invalid SRI hash"));
        // SRI never takes base-16 or base-32.
        assert!(err(&format!("sha256-{}", h.to_base32()), None).contains("invalid SRI hash"));

        assert!(Hash::parse_sri(&h.to_typed_base16()).unwrap_err().to_string().contains("is not SRI"));
        // Bits beyond the digest in the top base-32 digit.
        let top_bits = format!("z{}", &h.to_base32()[1..]);
        assert!(Hash::parse_any(&top_bits, Some(HashAlgo::Sha256)).is_err());
        // parse_unprefixed takes neither prefixes nor SRI.
        assert!(Hash::parse_unprefixed(&h.to_sri(), HashAlgo::Sha256).is_err());
    }

    #[test]
    fn new_checks_length() {
        assert!(Hash::new(HashAlgo::Sha1, &[0; 20]).is_ok());
        let err = Hash::new(HashAlgo::Sha1, &[0; 32]).unwrap_err().to_string();
        assert_eq!(err, "a sha1 hash is 20 bytes, not 32");
    }

    #[test]
    fn algo_names_round_trip() {
        for algo in [HashAlgo::Md5, HashAlgo::Sha1, HashAlgo::Sha256, HashAlgo::Sha512] {
            assert_eq!(algo.name().parse::<HashAlgo>().unwrap(), algo);
        }
        assert!("SHA256".parse::<HashAlgo>().is_err());
    }

    #[test]
    fn ordering_is_nixs() {
        // Nix orders by size, then bytes: an md5 sorts before any sha1.
        let md5 = Hash::new(HashAlgo::Md5, &[0xff; 16]).unwrap();
        let sha1 = Hash::new(HashAlgo::Sha1, &[0; 20]).unwrap();
        assert!(md5 < sha1);
        let a = Hash::new(HashAlgo::Sha1, &[1; 20]).unwrap();
        assert!(sha1 < a);
    }

    #[test]
    fn streaming_matches_one_shot() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut hasher = Hasher::new(HashAlgo::Sha256);
        let mut sink = HashSink::new(HashAlgo::Sha256);
        for chunk in data.chunks(333) {
            hasher.update(chunk);
            sink.write_all(chunk).unwrap();
        }
        let expected = Hash::digest(HashAlgo::Sha256, &data);
        assert_eq!(hasher.finish(), expected);
        assert_eq!(sink.finish(), (expected, data.len() as u64));
    }

    #[test]
    fn compress() {
        assert_eq!(compress_hash(&[1, 2, 4, 8, 16], 2), [1 ^ 4 ^ 16, 2 ^ 8]);
        assert_eq!(compress_hash(&[1, 2], 4), [1, 2, 0, 0]);
        assert_eq!(compress_hash(&[1, 2], 0), Vec::<u8>::new());
    }
}
