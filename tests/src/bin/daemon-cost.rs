//! What the daemon spends, in CPU time of its connection process, on each way of
//! telling it about content-addressed paths that are already valid: an AddToStore
//! per path, an AddTempRoot per path, and QueryValidPaths in batches of several
//! sizes. All requests are pipelined; the figure is the daemon worker's user+system
//! time per path, which is what bounds a pipelined client. Then what each daemon,
//! stock 2.26.3's and the fork's (which registers an AddMultipleToStore batch in
//! one transaction), spends per new path uploaded as rust-store's uploads send them
//! (root, check, AddMultipleToStore), alternating.
//!
//!     cargo run --release -p store-tests --bin daemon-cost -- [N] [ROUNDS]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rust_store::hash::HashAlgo;
use rust_store::store_path::ContentAddressMethod;
use rust_store::uploads::{CaAdd, UploadOptions, Uploads};
use rust_store::{Client, StorePath};
use store_tests::{Daemon, Nix, Trust, require_fork};

/// User plus system CPU time of a process, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read the worker's stat");
    let rest = &stat[stat.rfind(')').expect("a stat line") + 1..];
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).map(|s| s.parse().expect("a number")).collect();
    // Clock ticks are 1/100 s on Linux.
    Duration::from_millis((f[0] + f[1]) * 10)
}

#[derive(Clone, Copy)]
enum Way {
    AddToStore,
    TempRoot,
    QueryValid(usize),
}

impl Way {
    fn label(self) -> String {
        match self {
            Way::AddToStore => "AddToStore (text, valid)".into(),
            Way::TempRoot => "AddTempRoot".into(),
            Way::QueryValid(b) => format!("QueryValidPaths, batches of {b}"),
        }
    }
}

async fn run(c: &Client, way: Way, texts: &[(String, Vec<u8>, StorePath)]) {
    let none = BTreeSet::new();
    match way {
        Way::AddToStore => {
            for (name, text, _) in texts {
                c.add_text(name, text.clone(), &none).send().await.unwrap();
            }
        }
        Way::TempRoot => {
            for (_, _, p) in texts {
                c.add_temp_root(p).send().await.unwrap();
            }
        }
        Way::QueryValid(b) => {
            for chunk in texts.chunks(b) {
                let paths: BTreeSet<StorePath> = chunk.iter().map(|(_, _, p)| p.clone()).collect();
                c.query_valid_paths(&paths, false).send().await.unwrap();
            }
        }
    }
    c.flush().await.unwrap();
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|s| s.parse().expect("N is a number")).unwrap_or(6000);
    let rounds: usize = args.next().map(|s| s.parse().expect("ROUNDS is a number")).unwrap_or(5);

    let daemon = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let client = daemon.connect().await;
    let none = BTreeSet::new();
    let texts: Vec<(String, Vec<u8>, StorePath)> = (0..n)
        .map(|i| {
            let (name, text) = (format!("cost-{i}"), format!("daemon cost probe {i}\n").into_bytes());
            let p = client.store_dir().compute_text_path(&name, &text, &none).unwrap();
            (name, text, p)
        })
        .collect();
    for (name, text, _) in &texts {
        client.add_text(name, text.clone(), &none).send().await.unwrap();
    }
    client.flush().await.unwrap();
    let worker = *daemon.workers().first().expect("the connection's worker process");

    println!(
        "Nix {} daemon, untrusted client, {n} valid paths, median of {rounds} rounds",
        client.info().nix_version.as_deref().unwrap_or("?")
    );
    println!("{:<36} {:>14} {:>14}", "way", "daemon CPU/path", "wall/path");
    let ways = [
        Way::AddToStore,
        Way::TempRoot,
        Way::QueryValid(1),
        Way::QueryValid(16),
        Way::QueryValid(128),
        Way::QueryValid(1024),
    ];
    for way in ways {
        let (mut cpu, mut wall) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (c0, t0) = (cpu_time(worker), Instant::now());
            run(&client, way, &texts).await;
            wall.push(t0.elapsed());
            cpu.push(cpu_time(worker) - c0);
        }
        cpu.sort();
        wall.sort();
        let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        println!("{:<36} {:>11.1} us {:>11.1} us", way.label(), per(cpu[rounds / 2]), per(wall[rounds / 2]));
    }
    new_paths(n, rounds).await;
}

/// New paths, each referring to the one before, uploaded through rust-store's
/// uploads on a new connection to `daemon`: the daemon worker's CPU time and the
/// wall time, per path.
async fn upload_new(daemon: &Daemon, tag: &str, n: usize) -> (Duration, Duration) {
    let c = daemon.connect().await;
    let worker = *daemon.workers().iter().max().expect("the connection's worker process");
    let (c0, t0) = (cpu_time(worker), Instant::now());
    let u = Uploads::new(c.clone(), UploadOptions::default());
    let mut previous: Option<StorePath> = None;
    for i in 0..n {
        let add = CaAdd {
            name: format!("{tag}-{i}"),
            method: ContentAddressMethod::Text,
            algo: HashAlgo::Sha256,
            references: previous.iter().cloned().collect(),
            data: format!("{tag} new path {i}\n").into_bytes(),
        };
        previous = Some(u.add(add).await.unwrap_or_else(|_| unreachable!("a text add is computed here")));
    }
    u.drain().await.unwrap();
    c.flush().await.unwrap();
    let cost = (cpu_time(worker) - c0, t0.elapsed());
    assert_eq!(u.stats().uploaded, n as u64);
    cost
}

async fn new_paths(n: usize, rounds: usize) {
    require_fork();
    let daemons = [
        ("stock 2.26.3", Daemon::start(Nix::V2_26, Trust::Untrusted)),
        ("the fork's", Daemon::start(Nix::Fork, Trust::Untrusted)),
    ];
    let mut costs = vec![(Vec::new(), Vec::new()); daemons.len()];
    for round in 0..rounds {
        for (k, (_, d)) in daemons.iter().enumerate() {
            let (cpu, wall) = upload_new(d, &format!("new-{round}"), n).await;
            costs[k].0.push(cpu);
            costs[k].1.push(wall);
        }
    }
    println!("\n{n} new paths uploaded (AddTempRoot, QueryValidPaths, AddMultipleToStore), median of {rounds} rounds");
    println!("{:<36} {:>14} {:>14}", "daemon", "daemon CPU/path", "wall/path");
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    for (k, (name, _)) in daemons.iter().enumerate() {
        let (cpu, wall) = &mut costs[k];
        cpu.sort();
        wall.sort();
        println!("{:<36} {:>11.1} us {:>11.1} us", name, per(cpu[rounds / 2]), per(wall[rounds / 2]));
    }
}
