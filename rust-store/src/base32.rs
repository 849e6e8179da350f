//! Nix's base-32 encoding ("nix32").
//!
//! This is not RFC 4648: the alphabet omits `e`, `o`, `u` and `t`, and the
//! bytes are read as one little-endian number whose 5-bit digits are printed
//! most significant first. Store path hash parts and `sha256:1b8m…` hashes use it.

use std::fmt;

/// The 32 digits in order of value (`e`, `o`, `u`, `t` are left out).
const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// The value of each ASCII byte as a digit, or `0xff` if it is not one.
const DIGITS: [u8; 256] = {
    let mut table = [0xff; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// The length of the encoding of `n` bytes: `ceil(8n / 5)`.
pub fn encoded_len(n: usize) -> usize {
    (n * 8).div_ceil(5)
}

/// Encodes `bytes` as Nix base-32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    (0..len)
        .rev()
        .map(|n| {
            let (i, j) = (n * 5 / 8, n * 5 % 8);
            let low = u16::from(bytes[i]) >> j;
            let high = bytes.get(i + 1).map_or(0, |&b| u16::from(b) << (8 - j));
            char::from(ALPHABET[usize::from((low | high) & 0x1f)])
        })
        .collect()
}

/// Decodes Nix base-32, rejecting characters outside the alphabet, lengths no
/// byte string encodes to, and set bits beyond the last byte (as Nix does).
pub fn decode(s: &str) -> Result<Vec<u8>, InvalidBase32> {
    let mut out = vec![0u8; s.len() * 5 / 8];
    decode_into(s, &mut out)?;
    Ok(out)
}

/// Decodes Nix base-32 into exactly `out.len()` bytes, as [`decode`] does; for
/// fixed sizes, such as a store path's hash part, without allocating.
pub fn decode_into(s: &str, out: &mut [u8]) -> Result<(), InvalidBase32> {
    let err = |problem| InvalidBase32 { input: s.to_owned(), problem };
    if let Some(c) = s.chars().find(|&c| u8::try_from(c).map_or(true, |b| DIGITS[usize::from(b)] == 0xff)) {
        return Err(err(Problem::Char(c)));
    }
    // Every character is an ASCII digit now: one byte each.
    if s.len() * 5 / 8 != out.len() || encoded_len(out.len()) != s.len() {
        return Err(err(Problem::Length(s.len())));
    }
    out.fill(0);
    for (n, b) in s.bytes().rev().enumerate() {
        let digit = u16::from(DIGITS[usize::from(b)]);
        let (i, j) = (n * 5 / 8, n * 5 % 8);
        // Truncating to u8 keeps the bits that belong to byte i.
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        match out.get_mut(i + 1) {
            Some(next) => *next |= carry as u8,
            None if carry != 0 => return Err(err(Problem::TrailingBits)),
            None => {}
        }
    }
    Ok(())
}

/// A string that is not valid Nix base-32.
#[derive(Debug, thiserror::Error)]
#[error("invalid base-32 string '{input}': {problem}")]
pub struct InvalidBase32 {
    input: String,
    problem: Problem,
}

/// What was wrong with an [`InvalidBase32`] string.
#[derive(Debug)]
enum Problem {
    Char(char),
    Length(usize),
    TrailingBits,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Char(c) => write!(f, "invalid character '{}'", c.escape_default()),
            Problem::Length(len) => write!(f, "no byte string encodes to {len} characters"),
            Problem::TrailingBits => f.write_str("it has bits set beyond the last byte"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(0), 0);
        assert_eq!(encoded_len(1), 2);
        assert_eq!(encoded_len(16), 26);
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(64), 103);
    }

    #[test]
    fn known_vectors() {
        // sha256("abc") and sha1("abc"), checked with Nix 2.26.3's `nix-hash --to-base32`.
        let sha256 = data_encoding::HEXLOWER
            .decode(b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
            .unwrap();
        let s = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
        assert_eq!(encode(&sha256), s);
        assert_eq!(decode(s).unwrap(), sha256);

        let sha1 = data_encoding::HEXLOWER.decode(b"a9993e364706816aba3e25717850c26c9cd0d89d").unwrap();
        let s = "kpcd173cq987hw957sx6m0868wv3x6d9";
        assert_eq!(encode(&sha1), s);
        assert_eq!(decode(s).unwrap(), sha1);

        assert_eq!(encode(&[]), "");
        assert_eq!(decode("").unwrap(), Vec::<u8>::new());
        assert_eq!(encode(&[0xff]), "7z");
        assert_eq!(encode(&[0x1f]), "0z");
    }

    #[test]
    fn round_trip_every_length() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..100 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let s = encode(&bytes);
            assert_eq!(s.len(), encoded_len(len));
            assert_eq!(decode(&s).unwrap(), bytes);
        }
    }

    #[test]
    fn rejects_bad_input() {
        for bad in ["e0", "0o", "0u", "t0", "0A", "0-", "0\u{e9}"] {
            let err = decode(bad).unwrap_err().to_string();
            assert!(err.contains("invalid character"), "{bad}: {err}");
            assert!(err.contains(bad), "{err}");
        }
        // No byte string encodes to 1, 3, 6 … characters.
        for bad in ["0", "000", "000000"] {
            assert!(decode(bad).unwrap_err().to_string().contains("encodes to"));
        }
        // One byte is two digits with 10 bits: the top two must be zero.
        assert_eq!(decode("7z").unwrap(), [0xff]);
        for bad in ["8z", "z0", "g0"] {
            let err = decode(bad).unwrap_err().to_string();
            assert!(err.contains("beyond the last byte"), "{bad}: {err}");
        }
    }
}
