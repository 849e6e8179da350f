//! Fault injection with a scripted daemon on a socket pair: malformed replies, old or
//! foreign peers, a peer that vanishes mid-reply. None may panic or hang; each must
//! fail with an error that says what went wrong. (The real daemon is exercised by the
//! workspace's `tests` crate.)

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rust_store::codec::*;
use rust_store::error::Error;
use rust_store::logger::{Activity, Field, Logger};
use rust_store::protocol::*;
use rust_store::{Client, ConnectOptions, StoreDir, StorePath};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The daemon's side of a socket pair, written by hand.
struct Peer {
    s: UnixStream,
}

impl Peer {
    async fn u64(&mut self) -> u64 {
        self.s.read_u64_le().await.unwrap()
    }

    async fn string(&mut self) -> String {
        let n = self.u64().await as usize;
        let mut b = vec![0u8; n + padding(n)];
        self.s.read_exact(&mut b).await.unwrap();
        b.truncate(n);
        String::from_utf8(b).unwrap()
    }

    async fn put_u64(&mut self, n: u64) {
        self.s.write_all(&n.to_le_bytes()).await.unwrap();
    }

    async fn put_str(&mut self, s: &str) {
        self.put_u64(s.len() as u64).await;
        self.s.write_all(s.as_bytes()).await.unwrap();
        self.s.write_all(&[0u8; 8][..padding(s.len())]).await.unwrap();
    }

    /// Answers the handshake as a daemon of protocol `1.minor` would.
    async fn handshake(&mut self, minor: u64) {
        assert_eq!(self.u64().await, WORKER_MAGIC_1);
        let client = self.u64().await;
        self.put_u64(WORKER_MAGIC_2).await;
        self.put_u64(0x100 | minor).await;
        let minor = minor.min(client & 0xff);
        if minor >= 38 {
            let n = self.u64().await;
            for _ in 0..n {
                self.string().await;
            }
            self.put_u64(0).await;
        }
        self.u64().await; // CPU affinity
        self.u64().await; // reserveSpace
        if minor >= 33 {
            self.put_str("fake").await;
        }
        if minor >= 35 {
            self.put_u64(2).await;
        }
        self.put_u64(STDERR_LAST).await;
    }

    /// Reads an op that takes one string argument, returning the op.
    async fn op_with_string(&mut self) -> u64 {
        let op = self.u64().await;
        self.string().await;
        op
    }
}

fn options() -> ConnectOptions {
    ConnectOptions { settings: None, ..ConnectOptions::default() }
}

fn path() -> StorePath {
    StoreDir::default().compute_text_path("x", b"x", &BTreeSet::new()).unwrap()
}

/// Runs a client against a scripted peer; fails the test if either hangs.
async fn with_peer<P, PF, C, CF>(peer: P, client: C)
where
    P: FnOnce(Peer) -> PF,
    PF: Future<Output = ()> + Send + 'static,
    C: FnOnce(UnixStream) -> CF,
    CF: Future<Output = ()>,
{
    let (a, b) = UnixStream::pair().unwrap();
    let peer = tokio::spawn(peer(Peer { s: b }));
    tokio::time::timeout(Duration::from_secs(5), client(a)).await.expect("the client hung");
    tokio::time::timeout(Duration::from_secs(5), peer).await.expect("the peer hung").unwrap();
}

async fn connected(s: UnixStream) -> Client {
    Client::from_stream(s, options()).await.expect("handshake")
}

#[tokio::test]
async fn refuses_a_daemon_older_than_1_25_naming_both_versions() {
    with_peer(
        |mut p| async move {
            p.u64().await;
            p.u64().await;
            p.put_u64(WORKER_MAGIC_2).await;
            p.put_u64(0x100 | 21).await;
        },
        |s| async move {
            let e = Client::from_stream(s, options()).await.err().expect("refused");
            assert!(matches!(e, Error::UnsupportedDaemon { .. }));
            let msg = e.to_string();
            assert!(msg.contains("1.21") && msg.contains("1.25"), "{msg}");
        },
    )
    .await;
}

#[tokio::test]
async fn refuses_a_peer_that_is_not_a_daemon() {
    with_peer(
        |mut p| async move {
            p.u64().await;
            p.u64().await;
            p.put_u64(0x1234).await;
            p.put_u64(0x126).await;
        },
        |s| async move {
            let e = Client::from_stream(s, options()).await.err().expect("refused");
            assert!(e.to_string().contains("not a Nix daemon"), "{e}");
        },
    )
    .await;
}

#[tokio::test]
async fn handshake_at_each_supported_version() {
    for minor in [25u64, 30, 33, 35, 37, 38, 40] {
        with_peer(
            |mut p| async move { p.handshake(minor).await },
            |s| async move {
                let c = connected(s).await;
                assert_eq!(u64::from(c.version().minor), minor.min(38));
                assert_eq!(c.info().nix_version.is_some(), minor >= 33);
                assert_eq!(c.info().trusted.is_some(), minor >= 35);
            },
        )
        .await;
    }
}

/// A malformed result (a boolean of 5) fails that request and every one behind it,
/// with an error naming the op.
#[tokio::test]
async fn malformed_reply_fails_all_pending() {
    with_peer(
        |mut p| async move {
            p.handshake(38).await;
            for _ in 0..3 {
                assert_eq!(p.op_with_string().await, 1);
            }
            p.put_u64(STDERR_LAST).await;
            p.put_u64(1).await;
            p.put_u64(STDERR_LAST).await;
            p.put_u64(5).await;
            // Keep the socket open: the client must not wait for more.
            tokio::time::sleep(Duration::from_millis(500)).await;
        },
        |s| async move {
            let c = connected(s).await;
            let a = c.is_valid_path(&path()).start().await.unwrap();
            let b = c.is_valid_path(&path()).start().await.unwrap();
            let d = c.is_valid_path(&path()).start().await.unwrap();
            assert!(a.await.unwrap());
            let e = b.await.unwrap_err().to_string();
            assert!(e.contains("malformed") && e.contains("IsValidPath") && e.contains("boolean: 5"), "{e}");
            assert!(d.await.unwrap_err().is_disconnect());
            assert!(c.is_closed());
        },
    )
    .await;
}

#[tokio::test]
async fn non_zero_padding_is_an_error() {
    with_peer(
        |mut p| async move {
            p.handshake(38).await;
            p.op_with_string().await;
            p.put_u64(STDERR_LAST).await;
            p.put_u64(3).await;
            p.s.write_all(b"abc\0\0\0\0\x01").await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        },
        |s| async move {
            let c = connected(s).await;
            let e = c.query_path_from_hash_part("abc").await.unwrap_err().to_string();
            assert!(e.contains("non-zero padding"), "{e}");
        },
    )
    .await;
}

#[tokio::test]
async fn unknown_message_type_and_stderr_read_are_errors() {
    for (code, expected) in [(0x1234_5678u64, "unknown message type"), (STDERR_READ, "asked for data")] {
        with_peer(
            |mut p| async move {
                p.handshake(38).await;
                p.op_with_string().await;
                p.put_u64(code).await;
                p.put_u64(64).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            },
            |s| async move {
                let c = connected(s).await;
                let e = c.is_valid_path(&path()).await.unwrap_err().to_string();
                assert!(e.contains(expected), "{e}");
            },
        )
        .await;
    }
}

/// A string that claims to be 2^62 bytes long and then ends: an error, and no
/// attempt to allocate it.
#[tokio::test]
async fn absurd_length_then_eof() {
    with_peer(
        |mut p| async move {
            p.handshake(38).await;
            p.op_with_string().await;
            p.put_u64(STDERR_LAST).await;
            p.put_u64(1 << 62).await;
            p.s.write_all(b"a little").await.unwrap();
        },
        |s| async move {
            let c = connected(s).await;
            let e = c.query_path_from_hash_part("abc").await.unwrap_err();
            assert!(e.is_disconnect(), "{e}");
            assert!(e.to_string().contains("closed the connection"), "{e}");
        },
    )
    .await;
}

#[tokio::test]
async fn eof_mid_reply_fails_pending_requests() {
    with_peer(
        |mut p| async move {
            p.handshake(38).await;
            p.op_with_string().await;
            p.put_u64(STDERR_LAST).await;
            p.s.write_all(&[1, 0, 0]).await.unwrap();
        },
        |s| async move {
            let c = connected(s).await;
            let a = c.is_valid_path(&path()).start().await.unwrap();
            let b = c.is_valid_path(&path()).start().await;
            assert!(a.await.unwrap_err().is_disconnect());
            if let Ok(b) = b {
                assert!(b.await.unwrap_err().is_disconnect());
            }
            assert!(c.flush().await.unwrap_err().is_disconnect());
        },
    )
    .await;
}

/// Errors in the format before 1.26 (message and status) and from 1.26 (with traces).
#[tokio::test]
async fn daemon_errors_in_both_formats() {
    for minor in [25u64, 38] {
        with_peer(
            |mut p| async move {
                p.handshake(minor).await;
                p.op_with_string().await;
                p.put_u64(STDERR_ERROR).await;
                if minor >= 26 {
                    p.put_str("Error").await;
                    p.put_u64(0).await;
                    p.put_str("Error").await;
                    p.put_str("it broke").await;
                    p.put_u64(0).await;
                    p.put_u64(1).await;
                    p.put_u64(0).await;
                    p.put_str("while testing").await;
                } else {
                    p.put_str("it broke").await;
                    p.put_u64(1).await;
                }
                // The connection goes on.
                p.op_with_string().await;
                p.put_u64(STDERR_LAST).await;
                p.put_u64(1).await;
            },
            |s| async move {
                let c = connected(s).await;
                let e = c.is_valid_path(&path()).await.unwrap_err();
                let de = e.daemon_error().unwrap();
                assert_eq!(de.message, "it broke");
                if minor >= 26 {
                    assert_eq!(de.traces, vec!["while testing".to_string()]);
                } else {
                    assert_eq!(de.status, Some(1));
                }
                assert!(c.is_valid_path(&path()).await.unwrap());
            },
        )
        .await;
    }
}

#[derive(Default)]
struct Captured(Mutex<Vec<String>>);

impl Logger for Captured {
    fn log(&self, line: &str) {
        self.0.lock().unwrap().push(format!("log {line}"));
    }
    fn start_activity(&self, a: Activity) {
        self.0.lock().unwrap().push(format!("start {} {} {:?}", a.id, a.text, a.fields));
    }
    fn stop_activity(&self, id: u64) {
        self.0.lock().unwrap().push(format!("stop {id}"));
    }
    fn result(&self, id: u64, t: u64, fields: Vec<Field>) {
        self.0.lock().unwrap().push(format!("result {id} {t} {fields:?}"));
    }
}

#[tokio::test]
async fn log_messages_reach_the_logger_in_order() {
    let log = Arc::new(Captured::default());
    let log2 = log.clone();
    with_peer(
        |mut p| async move {
            p.handshake(38).await;
            p.op_with_string().await;
            p.put_u64(STDERR_NEXT).await;
            p.put_str("hello\n").await;
            p.put_u64(STDERR_START_ACTIVITY).await;
            for n in [7, 3, 105] {
                p.put_u64(n).await;
            }
            p.put_str("building").await;
            p.put_u64(2).await;
            p.put_u64(0).await;
            p.put_u64(42).await;
            p.put_u64(1).await;
            p.put_str("f").await;
            p.put_u64(0).await;
            p.put_u64(STDERR_RESULT).await;
            p.put_u64(7).await;
            p.put_u64(101).await;
            p.put_u64(0).await;
            p.put_u64(STDERR_STOP_ACTIVITY).await;
            p.put_u64(7).await;
            p.put_u64(STDERR_LAST).await;
            p.put_u64(0).await;
        },
        |s| async move {
            let c = Client::from_stream(s, ConnectOptions { logger: log2, ..options() }).await.unwrap();
            assert!(!c.is_valid_path(&path()).await.unwrap());
        },
    )
    .await;
    assert_eq!(
        *log.0.lock().unwrap(),
        vec![
            "log hello".to_string(),
            "start 7 building [Int(42), String(\"f\")]".into(),
            "result 7 101 []".into(),
            "stop 7".into(),
        ]
    );
}

/// Dropping every handle closes the connection after the replies already asked for.
#[tokio::test]
async fn dropping_the_client_closes_after_pending_replies() {
    with_peer(
        |mut p| async move {
            p.handshake(38).await;
            p.op_with_string().await;
            p.put_u64(STDERR_LAST).await;
            p.put_u64(1).await;
            // The client shuts down its side once it has nothing left to send.
            let mut rest = Vec::new();
            p.s.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        },
        |s| async move {
            let c = connected(s).await;
            let reply = c.is_valid_path(&path()).start().await.unwrap();
            drop(c);
            assert!(reply.await.unwrap());
        },
    )
    .await;
}

/// A socket path longer than a socket address holds still connects.
#[tokio::test]
async fn connects_to_a_socket_with_a_long_path() {
    let base = std::env::temp_dir().join(format!("rust-store-long-{}", std::process::id()));
    let dir = base.join("a".repeat(60)).join("b".repeat(60));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("socket");
    assert!(socket.as_os_str().len() > 108);
    let listener = tokio::net::UnixListener::bind(&socket).or_else(|_| {
        // Binding has the same limit: bind through the directory too.
        let fd = std::fs::File::open(&dir).unwrap();
        use std::os::fd::AsRawFd;
        let short = std::path::Path::new("/proc/self/fd").join(fd.as_raw_fd().to_string()).join("socket");
        let l = tokio::net::UnixListener::bind(short);
        drop(fd);
        l
    });
    let listener = listener.unwrap();
    let peer = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        Peer { s }.handshake(38).await;
    });
    let c = tokio::time::timeout(Duration::from_secs(5), Client::connect(&socket, options())).await.unwrap().unwrap();
    assert_eq!(c.info().nix_version.as_deref(), Some("fake"));
    peer.await.unwrap();
    std::fs::remove_dir_all(base).unwrap();
}
