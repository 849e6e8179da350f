//! The worker protocol's wire encoding.
//!
//! Every integer, bool and enum is a little-endian u64. A string is its length, its
//! bytes, and zero padding to a multiple of eight. Collections are a count followed by
//! their elements. Uploads travel as frames: a length and that many raw bytes, ended
//! by an empty frame.
//!
//! [`Encoder`] builds a request in memory; [`Decoder`] reads a reply from a buffered
//! async stream. Both know the negotiated [`Version`](crate::protocol::Version) and the store directory, since
//! several encodings depend on the one and store paths travel printed in full.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use tokio::io::{AsyncBufRead, AsyncReadExt};

use crate::error::{Error, Result};
use crate::protocol::Version;
use crate::store_path::{StoreDir, StorePath};

/// How much a single read of a length-prefixed value may grow a buffer before the
/// bytes have actually arrived. Untrusted lengths never allocate more than this ahead.
const READ_CHUNK: usize = 64 * 1024;

/// What every encoding step needs to know about the connection.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub version: Version,
    pub store_dir: StoreDir,
}

// ---------------------------------------------------------------------------------
// Encoding

/// Writes protocol values into an in-memory buffer.
pub struct Encoder<'a> {
    buf: &'a mut Vec<u8>,
    ctx: &'a Ctx,
}

impl<'a> Encoder<'a> {
    pub fn new(buf: &'a mut Vec<u8>, ctx: &'a Ctx) -> Encoder<'a> {
        Encoder { buf, ctx }
    }

    pub fn ctx(&self) -> &Ctx {
        self.ctx
    }

    pub fn version(&self) -> Version {
        self.ctx.version
    }

    pub fn u64(&mut self, n: u64) -> &mut Self {
        self.buf.extend_from_slice(&n.to_le_bytes());
        self
    }

    pub fn bool(&mut self, b: bool) -> &mut Self {
        self.u64(u64::from(b))
    }

    pub fn bytes(&mut self, s: &[u8]) -> &mut Self {
        self.u64(s.len() as u64);
        self.buf.extend_from_slice(s);
        let pad = padding(s.len());
        self.buf.extend_from_slice(&[0u8; 8][..pad]);
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    pub fn path(&mut self, p: &StorePath) -> &mut Self {
        let printed = self.ctx.store_dir.print(p);
        self.str(&printed)
    }

    pub fn opt_path(&mut self, p: Option<&StorePath>) -> &mut Self {
        match p {
            Some(p) => self.path(p),
            None => self.str(""),
        }
    }

    pub fn put<T: Encode + ?Sized>(&mut self, v: &T) -> &mut Self {
        v.encode(self);
        self
    }

    /// Raw bytes with no length or padding (the body of a frame, a NAR).
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
}

/// Zero bytes that follow a string of length `len`.
pub fn padding(len: usize) -> usize {
    (8 - len % 8) % 8
}

/// A value with a wire encoding.
pub trait Encode {
    fn encode(&self, e: &mut Encoder<'_>);
}

impl Encode for u64 {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.u64(*self);
    }
}

impl Encode for bool {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.bool(*self);
    }
}

impl Encode for str {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.str(self);
    }
}

impl Encode for String {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.str(self);
    }
}

impl Encode for StorePath {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.path(self);
    }
}

impl Encode for Option<StorePath> {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.opt_path(self.as_ref());
    }
}

impl<T: Encode> Encode for [T] {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.u64(self.len() as u64);
        for x in self {
            x.encode(e);
        }
    }
}

impl<T: Encode> Encode for Vec<T> {
    fn encode(&self, e: &mut Encoder<'_>) {
        self.as_slice().encode(e);
    }
}

impl<T: Encode> Encode for BTreeSet<T> {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.u64(self.len() as u64);
        for x in self {
            x.encode(e);
        }
    }
}

impl<K: Encode, V: Encode> Encode for BTreeMap<K, V> {
    fn encode(&self, e: &mut Encoder<'_>) {
        e.u64(self.len() as u64);
        for (k, v) in self {
            k.encode(e);
            v.encode(e);
        }
    }
}

impl<A: Encode, B: Encode> Encode for (A, B) {
    fn encode(&self, e: &mut Encoder<'_>) {
        self.0.encode(e);
        self.1.encode(e);
    }
}

impl<T: Encode + ?Sized> Encode for &T {
    fn encode(&self, e: &mut Encoder<'_>) {
        (**self).encode(e);
    }
}

// ---------------------------------------------------------------------------------
// Decoding

/// The stream a [`Decoder`] reads from.
pub type Source = Box<dyn AsyncBufRead + Send + Unpin>;

/// Reads protocol values from a buffered stream.
///
/// Every method fails with [`Error::Protocol`] on malformed input (an out-of-range
/// integer, non-zero padding, a bad store path) and with [`Error::Io`] when the
/// stream ends early; none panics or allocates ahead of the bytes it has received.
pub struct Decoder {
    src: Source,
    ctx: Ctx,
}

impl Decoder {
    pub fn new(src: Source, ctx: Ctx) -> Decoder {
        Decoder { src, ctx }
    }

    /// A decoder over an in-memory buffer (fixtures, tests).
    pub fn from_bytes(bytes: Vec<u8>, ctx: Ctx) -> Decoder {
        Decoder::new(Box::new(std::io::Cursor::new(bytes)), ctx)
    }

    pub fn ctx(&self) -> &Ctx {
        &self.ctx
    }

    pub fn version(&self) -> Version {
        self.ctx.version
    }

    pub(crate) fn set_version(&mut self, v: Version) {
        self.ctx.version = v;
    }

    /// Fills `buf` from the stream (the one place the decoder reads).
    async fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        self.src.read_exact(buf).await.map_err(read_error)?;
        Ok(())
    }

    /// The underlying stream, for values with their own framing (a NAR).
    pub fn reader(&mut self) -> &mut (dyn AsyncBufRead + Send + Unpin) {
        &mut *self.src
    }

    /// Whether the stream has ended (no byte left to read).
    pub async fn at_eof(&mut self) -> Result<bool> {
        use tokio::io::AsyncBufReadExt;
        Ok(self.src.fill_buf().await.map_err(read_error)?.is_empty())
    }

    pub async fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.fill(&mut b).await?;
        Ok(u64::from_le_bytes(b))
    }

    /// An integer that must fit in `max` (Nix's readNum<T> range check).
    pub async fn u64_max(&mut self, max: u64, what: &str) -> Result<u64> {
        let n = self.u64().await?;
        if n > max {
            return Err(Error::Protocol(format!("{what}: {n} is out of range (at most {max})")));
        }
        Ok(n)
    }

    pub async fn bool(&mut self) -> Result<bool> {
        Ok(self.u64_max(1, "boolean").await? == 1)
    }

    /// A length for a collection; bounded only by usize, elements are read one by one.
    pub async fn count(&mut self) -> Result<usize> {
        let n = self.u64().await?;
        usize::try_from(n).map_err(|_| Error::Protocol(format!("collection size {n} is too large")))
    }

    pub async fn bytes(&mut self) -> Result<Vec<u8>> {
        let len = self.u64().await?;
        let len = usize::try_from(len).map_err(|_| Error::Protocol(format!("string length {len} is too large")))?;
        let mut out = Vec::with_capacity(len.min(READ_CHUNK));
        let mut left = len;
        while left > 0 {
            let n = left.min(READ_CHUNK);
            let start = out.len();
            out.resize(start + n, 0);
            self.fill(&mut out[start..]).await?;
            left -= n;
        }
        self.padding(len).await?;
        Ok(out)
    }

    async fn padding(&mut self, len: usize) -> Result<()> {
        let pad = padding(len);
        if pad > 0 {
            let mut z = [0u8; 8];
            self.fill(&mut z[..pad]).await?;
            if z[..pad].iter().any(|&b| b != 0) {
                return Err(Error::Protocol("non-zero padding after a string".into()));
            }
        }
        Ok(())
    }

    /// A string that must be UTF-8 (paths, names, hashes).
    pub async fn string(&mut self) -> Result<String> {
        let b = self.bytes().await?;
        String::from_utf8(b)
            .map_err(|e| Error::Protocol(format!("string is not UTF-8: {:?}", String::from_utf8_lossy(e.as_bytes()))))
    }

    /// A string shown to people (log lines, error messages); invalid UTF-8 is replaced.
    pub async fn text(&mut self) -> Result<String> {
        let b = self.bytes().await?;
        Ok(match String::from_utf8(b) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    pub async fn path(&mut self) -> Result<StorePath> {
        let s = self.string().await?;
        self.ctx.store_dir.parse(&s).map_err(|e| Error::Protocol(format!("bad store path from the daemon: {e}")))
    }

    pub async fn opt_path(&mut self) -> Result<Option<StorePath>> {
        let s = self.string().await?;
        if s.is_empty() {
            return Ok(None);
        }
        self.ctx
            .store_dir
            .parse(&s)
            .map(Some)
            .map_err(|e| Error::Protocol(format!("bad store path from the daemon: {e}")))
    }

    pub async fn get<T: Decode>(&mut self) -> Result<T> {
        T::decode(self).await
    }

    /// Reads raw bytes with no framing.
    pub async fn raw(&mut self, buf: &mut [u8]) -> Result<()> {
        self.fill(buf).await
    }
}

fn read_error(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof { Error::Eof } else { Error::Io(e) }
}

/// A value with a wire decoding.
pub trait Decode: Sized + Send + 'static {
    fn decode(d: &mut Decoder) -> impl Future<Output = Result<Self>> + Send;
}

impl Decode for u64 {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        d.u64().await
    }
}

impl Decode for bool {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        d.bool().await
    }
}

impl Decode for String {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        d.string().await
    }
}

impl Decode for StorePath {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        d.path().await
    }
}

impl Decode for Option<StorePath> {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        d.opt_path().await
    }
}

impl Decode for () {
    async fn decode(_: &mut Decoder) -> Result<Self> {
        Ok(())
    }
}

impl<T: Decode> Decode for Vec<T> {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        let n = d.count().await?;
        let mut v = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            v.push(T::decode(d).await?);
        }
        Ok(v)
    }
}

impl<T: Decode + Ord> Decode for BTreeSet<T> {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        let n = d.count().await?;
        let mut s = BTreeSet::new();
        for _ in 0..n {
            s.insert(T::decode(d).await?);
        }
        Ok(s)
    }
}

impl<K: Decode + Ord, V: Decode> Decode for BTreeMap<K, V> {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        let n = d.count().await?;
        let mut m = BTreeMap::new();
        for _ in 0..n {
            let k = K::decode(d).await?;
            let v = V::decode(d).await?;
            m.insert(k, v);
        }
        Ok(m)
    }
}

impl<A: Decode, B: Decode> Decode for (A, B) {
    async fn decode(d: &mut Decoder) -> Result<Self> {
        let a = A::decode(d).await?;
        let b = B::decode(d).await?;
        Ok((a, b))
    }
}
