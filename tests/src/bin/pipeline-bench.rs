//! Sequential versus pipelined requests against one private Nix 2.26.3 daemon.
//!
//! For N AddTempRoot, N text AddToStore of new paths and N of already-valid paths,
//! it times awaiting each request before sending the next (what Nix's C++ client
//! does) against sending them all without waiting and then flushing, side by side in
//! one run, alternating, and prints the per-op medians and their ratio.
//!
//!     cargo run --release -p store-tests --bin pipeline-bench -- [N] [ROUNDS]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rust_store::{Client, StorePath};
use store_tests::{Daemon, Nix, Trust};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Sequential,
    Pipelined,
}

#[derive(Clone, Copy)]
enum Workload {
    TempRoot,
    NewText,
    ValidText,
}

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::TempRoot => "AddTempRoot",
            Workload::NewText => "AddToStore (text, new path)",
            Workload::ValidText => "AddToStore (text, already valid)",
        }
    }
}

struct Bench {
    client: Client,
    n: usize,
    /// Valid paths to root.
    rooted: Vec<StorePath>,
    salt: u64,
}

impl Bench {
    fn texts(&self, salt: u64) -> Vec<(String, Vec<u8>)> {
        (0..self.n)
            .map(|i| (format!("bench-{salt}-{i}"), format!("benchmark text {salt} {i}\n").into_bytes()))
            .collect()
    }

    async fn run(&mut self, w: Workload, mode: Mode) -> Duration {
        let none = BTreeSet::new();
        let c = self.client.clone();
        // Prepare outside the timed section.
        let texts = match w {
            Workload::TempRoot => Vec::new(),
            Workload::NewText => {
                self.salt += 1;
                self.texts(self.salt)
            }
            Workload::ValidText => {
                let t = self.texts(0);
                for (name, text) in &t {
                    c.add_text(name, text.clone(), &none).send().await.unwrap();
                }
                c.flush().await.unwrap();
                t
            }
        };
        let start = Instant::now();
        match (w, mode) {
            (Workload::TempRoot, Mode::Sequential) => {
                for p in &self.rooted {
                    c.add_temp_root(p).await.unwrap();
                }
            }
            (Workload::TempRoot, Mode::Pipelined) => {
                for p in &self.rooted {
                    c.add_temp_root(p).send().await.unwrap();
                }
            }
            (_, Mode::Sequential) => {
                for (name, text) in texts {
                    c.add_text(&name, text, &none).await.unwrap();
                }
            }
            (_, Mode::Pipelined) => {
                for (name, text) in texts {
                    c.add_text(&name, text, &none).send().await.unwrap();
                }
            }
        }
        c.flush().await.unwrap();
        start.elapsed()
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|s| s.parse().expect("N is a number")).unwrap_or(2000);
    let rounds: usize = args.next().map(|s| s.parse().expect("ROUNDS is a number")).unwrap_or(5);

    let daemon = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let client = daemon.connect().await;
    let none = BTreeSet::new();
    let mut rooted = Vec::with_capacity(n);
    for i in 0..n {
        let p = client.store_dir().compute_text_path(&format!("root-{i}"), b"root", &none).unwrap();
        client.add_text(&format!("root-{i}"), b"root".to_vec(), &none).send().await.unwrap();
        rooted.push(p);
    }
    client.flush().await.unwrap();
    let mut bench = Bench { client: client.clone(), n, rooted, salt: 0 };

    println!(
        "Nix {} daemon (protocol {}), untrusted client, N = {n}, median of {rounds} alternating rounds",
        client.info().nix_version.as_deref().unwrap_or("?"),
        client.version()
    );
    println!("{:<34} {:>12} {:>12} {:>9}", "op", "sequential", "pipelined", "speed-up");
    for w in [Workload::TempRoot, Workload::ValidText, Workload::NewText] {
        let (mut seq, mut pip) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Alternate which goes first, so that drift hits both alike.
            let order =
                if round % 2 == 0 { [Mode::Sequential, Mode::Pipelined] } else { [Mode::Pipelined, Mode::Sequential] };
            for mode in order {
                let t = bench.run(w, mode).await;
                match mode {
                    Mode::Sequential => seq.push(t),
                    Mode::Pipelined => pip.push(t),
                }
            }
        }
        let (s, p) = (median(seq), median(pip));
        let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        println!("{:<34} {:>9.1} us {:>9.1} us {:>8.2}x", w.label(), per(s), per(p), s.as_secs_f64() / p.as_secs_f64());
    }
    println!("\nclient counters:\n{}", client.stats());
}
