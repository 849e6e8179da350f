//! Counters a caller can read: requests by op, bytes each way, and how often and how
//! long callers waited for a reply.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::protocol::Op;

const OPS: usize = 64;

/// Live counters of one connection, updated by its tasks and callers.
pub struct Stats {
    requests: [AtomicU64; OPS],
    sent_without_waiting: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    waits: AtomicU64,
    wait_nanos: AtomicU64,
    backpressure_waits: AtomicU64,
    leases: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            sent_without_waiting: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            wait_nanos: AtomicU64::new(0),
            backpressure_waits: AtomicU64::new(0),
            leases: AtomicU64::new(0),
        }
    }
}

impl Stats {
    pub(crate) fn request(&self, op: Op, waits: bool) {
        if let Some(c) = self.requests.get(op as usize) {
            c.fetch_add(1, Relaxed);
        }
        if !waits {
            self.sent_without_waiting.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn waited(&self, d: Duration) {
        self.waits.fetch_add(1, Relaxed);
        self.wait_nanos.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    pub(crate) fn leased(&self) {
        self.leases.fetch_add(1, Relaxed);
    }

    pub(crate) fn backpressure(&self) {
        self.backpressure_waits.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let mut requests = Vec::new();
        for (code, c) in self.requests.iter().enumerate() {
            let n = c.load(Relaxed);
            if n > 0 {
                if let Some(op) = Op::from_code(code as u64) {
                    requests.push((op, n));
                }
            }
        }
        StatsSnapshot {
            requests,
            sent_without_waiting: self.sent_without_waiting.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            waits: self.waits.load(Relaxed),
            wait_time: Duration::from_nanos(self.wait_nanos.load(Relaxed)),
            backpressure_waits: self.backpressure_waits.load(Relaxed),
            leases: self.leases.load(Relaxed),
        }
    }
}

/// The counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Requests sent, by op.
    pub requests: Vec<(Op, u64)>,
    /// Requests sent without the caller waiting for their reply.
    pub sent_without_waiting: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Calls that blocked until their reply arrived (flushes included).
    pub waits: u64,
    /// Total time callers spent in those waits.
    pub wait_time: Duration,
    /// Times a caller had to wait because the in-flight queue was full.
    pub backpressure_waits: u64,
    /// Times the socket was lent to a caller speaking the protocol itself.
    pub leases: u64,
}

impl StatsSnapshot {
    pub fn total_requests(&self) -> u64 {
        self.requests.iter().map(|(_, n)| n).sum()
    }

    pub fn requests_of(&self, op: Op) -> u64 {
        self.requests.iter().find(|(o, _)| *o == op).map_or(0, |(_, n)| *n)
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "requests: {} ({} without waiting)", self.total_requests(), self.sent_without_waiting)?;
        for (op, n) in &self.requests {
            writeln!(f, "  {op}: {n}")?;
        }
        writeln!(f, "bytes sent: {}, received: {}", self.bytes_sent, self.bytes_received)?;
        writeln!(f, "waits: {}, waited: {:.3} ms", self.waits, self.wait_time.as_secs_f64() * 1e3)?;
        writeln!(f, "backpressure waits: {}", self.backpressure_waits)?;
        write!(f, "leases: {}", self.leases)
    }
}

/// A socket half that counts the bytes through it into the connection's [`Stats`].
pub(crate) struct Counted<S> {
    inner: S,
    stats: Arc<Stats>,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, stats: Arc<Stats>) -> Self {
        Counted { inner, stats }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.stats.bytes_received.fetch_add(n, Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.stats.bytes_sent.fetch_add(n as u64, Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
