//! Connections over a process's pipes (`nix-daemon --stdio`, as behind `ssh`) work as
//! connections over the daemon's socket do: pipelined, leased, and failing every
//! pending request, naming the peer, when the process dies.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;

use rust_store::Client;
use rust_store::transport::Transport;
use store_tests::{Daemon, Nix, Trust};

const PEER: &str = "nix-daemon --stdio (test)";

async fn connect(d: &Daemon) -> Client {
    connect_with_pid(d).await.0
}

/// A connection, and the pid of the `nix-daemon --stdio` at its other end.
async fn connect_with_pid(d: &Daemon) -> (Client, u32) {
    let transport = Transport::spawn(d.stdio_command(), PEER).expect("start nix-daemon --stdio");
    let pid = transport.pid().expect("a child");
    match Client::over(transport, d.options()).await {
        Ok(c) => (c, pid),
        Err(e) => panic!("handshake over pipes: {e}\ndaemon log:\n{}", d.log()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_in_flight_over_pipes() {
    for nix in [Nix::V2_26, Nix::V2_8] {
        let d = Daemon::start(nix, Trust::Untrusted);
        let c = connect(&d).await;
        let mut calls = Vec::new();
        for i in 0..1000 {
            let text = format!("piped {i}");
            calls.push(c.add_text(&format!("p{i}"), text.into_bytes(), &BTreeSet::new()).start().await.unwrap());
        }
        let mut paths = BTreeSet::new();
        for call in calls {
            paths.insert(call.await.unwrap().path);
        }
        assert_eq!(c.query_valid_paths(&paths, false).await.unwrap(), paths);
        let stats = c.stats();
        assert!(stats.requests.iter().map(|(_, n)| n).sum::<u64>() >= 1001, "{stats:?}");
        // The store behind the pipes is the daemon's own.
        let first = paths.iter().next().unwrap();
        let out = d.nix_ok(&["nix-store", "--check-validity", &d.store_dir.print(first)]);
        assert!(out.is_empty(), "{out}");
    }
}

/// A lease hands over both pipes: the holder writes a request on one and reads the
/// reply from the other, between the client's own requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_hands_over_both_pipes() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let c = connect(&d).await;
    let added = c.add_text("leased", b"leased".to_vec(), &BTreeSet::new()).await.unwrap();
    let lease = c.lease().await.unwrap();
    let fds = lease.fds();
    assert_ne!(fds.read, fds.write);
    let printed = d.store_dir.print(&added.path);
    // IsValidPath (1), by hand.
    let mut req = Vec::new();
    req.extend_from_slice(&1u64.to_le_bytes());
    req.extend_from_slice(&(printed.len() as u64).to_le_bytes());
    req.extend_from_slice(printed.as_bytes());
    req.resize(req.len().div_ceil(8) * 8, 0);
    // Borrow the descriptors without closing them.
    let mut w = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fds.write) });
    let mut r = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fds.read) });
    w.write_all(&req).unwrap();
    let mut reply = [0u8; 16];
    r.read_exact(&mut reply).unwrap();
    assert_eq!(u64::from_le_bytes(reply[..8].try_into().unwrap()), 0x616c7473, "STDERR_LAST");
    assert_eq!(u64::from_le_bytes(reply[8..].try_into().unwrap()), 1, "valid");
    drop(lease);
    assert!(c.is_valid_path(&added.path).await.unwrap());
}

/// The process at the other end dies with requests pending: each fails within a
/// second, naming the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_requests_fail_naming_the_peer_when_the_process_dies() {
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let (c, relay) = connect_with_pid(&d).await;
    let took = store_tests::pending_fail_when_killed(&d, &c, relay, PEER).await;
    println!("300 pending requests failed {took:?} after the kill");
}

/// A process that exits without greeting (ssh refused, no daemon there) fails the
/// connection with an error naming the peer.
#[tokio::test]
async fn a_process_that_exits_at_once_names_the_peer() {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.args(["-c", "echo 'Permission denied (publickey).' >&2; exit 255"]).stderr(std::process::Stdio::null());
    let e = Client::over(Transport::spawn(cmd, "ssh-ng://nobody@192.0.2.1").unwrap(), Default::default())
        .await
        .err()
        .expect("connected to nothing");
    assert!(e.to_string().contains("ssh-ng://nobody@192.0.2.1"), "{e}");
    assert!(e.is_disconnect(), "{e}");
}
