//! Nix's clients over `ssh-ng://`, side by side, through a real OpenSSH server in front
//! of a stock 2.26.3 daemon, at each round-trip time a relay adds:
//!
//! - `nix-instantiate --store ssh-ng://…` of the bundled workload, every path new and
//!   every path valid, against the same evaluation through the daemon's socket;
//! - `nix eval --store ssh-ng://…` of it as a flake, every path valid, against the
//!   same through the socket;
//! - `nix copy --to ssh-ng://…` of a closure of small paths from a local store;
//! - `nix path-info -r --store ssh-ng://…` of that closure.
//!
//! Clients: Debian's nix-bin 2.26.3, the fork with its C++ client
//! (`NIX_DAEMON_CLIENT=cxx`, Nix's own `SSHStore`) and with its Rust client. For
//! each: the median wall time, the speed-up over nix-bin, and the client's turns per
//! path (the times it sent again after the server had answered, counted by the relay:
//! a client that waits for every reply turns once per request).
//!
//! It also times a connection alone (`nix store info`: ssh's own setup and the
//! protocol's handshake), which every command pays once.
//!
//!     cargo run --release -p store-tests --bin ssh-bench -- [--n N] [--rounds R]
//!         [--rtt MS[,MS…]] [--paths P] [--clients nix-bin,cxx,rust] [--daemon stock|fork]
//!         [--parts eval,flake,copy,info]
//!
//! `--share-connections` makes the clients share one ssh connection per run
//! (`ControlMaster`, `ControlPersist`), as a user running many commands against one
//! host would; then each command pays for a session on it, not for a connection.
//!
//! `--daemon fork` puts the fork's daemon behind sshd instead (which serves
//! AddTempRoots, one request per batch where the stock daemon takes one per path).
//! `--clients` picks some of the three (the first one picked is the speed-up's
//! reference), `--parts` some of `eval`, `flake`, `copy` and `info` (the copy is made, untimed,
//! even when only `info` is asked for), and `--paths 0` leaves out the closure.

use std::process::Output;
use std::time::{Duration, Instant};

use store_tests::ssh::{Relay, Sshd};
use store_tests::{Daemon, FORK_PREFIX, Flake, Nix, Trust, require_fork};

struct Args {
    n: usize,
    rounds: usize,
    rtts: Vec<u64>,
    paths: usize,
    clients: Vec<String>,
    daemon: Nix,
    share: bool,
    parts: Vec<String>,
}

impl Args {
    fn part(&self, name: &str) -> bool {
        self.parts.iter().any(|p| p == name)
    }
}

fn args() -> Args {
    let mut a = Args {
        n: 500,
        rounds: 3,
        rtts: vec![2, 10],
        paths: 3000,
        clients: vec!["nix-bin".into(), "cxx".into(), "rust".into()],
        daemon: Nix::V2_26,
        share: false,
        parts: vec!["eval".into(), "flake".into(), "copy".into(), "info".into()],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--share-connections" {
            a.share = true;
            continue;
        }
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--n" => a.n = value().parse().expect("--n N"),
            "--rounds" => a.rounds = value().parse().expect("--rounds R"),
            "--rtt" => a.rtts = value().split(',').map(|s| s.parse().expect("--rtt MS[,MS…]")).collect(),
            "--paths" => a.paths = value().parse().expect("--paths P"),
            "--clients" => a.clients = value().split(',').map(str::to_owned).collect(),
            "--parts" => {
                a.parts = value().split(',').map(str::to_owned).collect();
                for p in &a.parts {
                    assert!(
                        ["eval", "flake", "copy", "info"].contains(&p.as_str()),
                        "--parts: '{p}' is not eval, flake, copy or info"
                    );
                }
            }
            "--daemon" => {
                a.daemon = match value().as_str() {
                    "stock" => Nix::V2_26,
                    "fork" => Nix::Fork,
                    other => panic!("--daemon is stock or fork, not {other}"),
                }
            }
            other => panic!("unknown argument {other}; see the source's header"),
        }
    }
    a
}

/// One of the clients compared.
#[derive(Clone, Copy)]
struct ClientKind {
    name: &'static str,
    label: &'static str,
    bin: &'static str,
    daemon_client: &'static str,
}

fn clients(a: &Args) -> Vec<ClientKind> {
    let all = [
        ClientKind { name: "nix-bin", label: "nix-bin 2.26.3", bin: "/usr/bin", daemon_client: "cxx" },
        ClientKind { name: "cxx", label: "fork, C++ client", bin: "FORK", daemon_client: "cxx" },
        ClientKind { name: "rust", label: "fork, Rust client", bin: "FORK", daemon_client: "rust" },
    ];
    for c in &a.clients {
        assert!(all.iter().any(|k| k.name == c), "--clients: '{c}' is not nix-bin, cxx or rust");
    }
    all.into_iter().filter(|k| a.clients.iter().any(|c| c == k.name)).collect()
}

impl ClientKind {
    fn program(&self, name: &str) -> String {
        match self.bin {
            "FORK" => format!("{FORK_PREFIX}/bin/{name}"),
            dir => format!("{dir}/{name}"),
        }
    }
}

fn check(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A row: the label, the median time, turns, and how many paths it concerned.
struct Row {
    label: String,
    time: Duration,
    turns: u64,
    paths: usize,
}

fn print_table(title: &str, rows: &[Row]) {
    println!("\n{title}");
    println!("  {:<34} {:>9} {:>11} {:>11}", "client", "median", "speed-up", "turns/path");
    let base = rows.first().map(|r| r.time).unwrap_or_default();
    for r in rows {
        println!(
            "  {:<34} {:>8.2}s {:>10.2}x {:>11.3}",
            r.label,
            r.time.as_secs_f64(),
            base.as_secs_f64() / r.time.as_secs_f64(),
            r.turns as f64 / r.paths.max(1) as f64
        );
    }
}

/// Runs `run` once: its wall time, and the relay's turns meanwhile.
fn time_once(relay: Option<&Relay>, run: impl FnOnce() -> Output) -> (Duration, u64) {
    let before = relay.map(Relay::turns).unwrap_or(0);
    let started = Instant::now();
    check(run(), "a run");
    (started.elapsed(), relay.map(Relay::turns).unwrap_or(0) - before)
}

/// Times `run` `rounds` times; turns are the relay's over the last round.
fn measure(relay: Option<&Relay>, rounds: usize, mut run: impl FnMut(usize) -> Output) -> (Duration, u64) {
    let mut times = Vec::new();
    let mut turns = 0;
    for round in 0..rounds {
        let (time, t) = time_once(relay, || run(round));
        times.push(time);
        turns = t;
    }
    (median(times), turns)
}

/// `nix eval --json --store ssh-ng://… <flake>#drvPaths` of the workload as a flake
/// (bench/flake.nix), every path valid, a new commit each round as CI evaluates
/// each commit, against the same through the daemon's socket. 2.26.3's fetcher reads
/// a flake's source on this file system, which the store's host shares here.
fn bench_flake(a: &Args, d: &Daemon, sshd: &Sshd, relay: &Relay, ms: u128) {
    let mut flake = Flake::new(d);
    let n = a.n;
    // A path: reference: root runs the commands, and git refuses the client user's
    // repository to root.
    let mut commit =
        move || format!("{}#drvPaths", flake.commit("workload", n, "valid").replace("git+file://", "path:"));
    let eval = |c: &ClientKind, target: &str, store: Option<&str>| {
        let program = c.program("nix");
        let mut args = vec![&program, "--extra-experimental-features", "nix-command flakes", "eval", "--json", target];
        args.extend(store.map(|s| ["--store", s]).into_iter().flatten());
        sshd.client_command(d, relay.port, &[("NIX_DAEMON_CLIENT", c.daemon_client)], &args).output().unwrap()
    };
    let store = sshd.store_uri();
    let clients = clients(a);
    let fork_rust =
        ClientKind { name: "rust", label: "fork, Rust client, local socket", bin: "FORK", daemon_client: "rust" };
    // Every path valid from the first timed round on.
    check(eval(&fork_rust, &commit(), None), "the first evaluation of the flake");
    let mut rows = Vec::new();
    for c in &clients {
        let (time, turns) = measure(Some(relay), a.rounds, |_| eval(c, &commit(), Some(&store)));
        rows.push(Row { label: c.label.into(), time, turns, paths: n });
    }
    let (local, _) = measure(None, a.rounds, |_| eval(&fork_rust, &commit(), None));
    rows.push(Row { label: fork_rust.label.into(), time: local, turns: 0, paths: n });
    print_table(&format!("{ms} ms: nix eval of a flake, every path valid"), &rows);
    if let Some(rust) = clients.iter().position(|c| c.name == "rust") {
        println!(
            "  Rust client over ssh-ng at {ms} ms / through the local socket: {:.2}x",
            rows[rust].time.as_secs_f64() / local.as_secs_f64()
        );
    }
}

fn main() {
    let a = args();
    require_fork();
    println!(
        "ssh-ng:// through OpenSSH on 127.0.0.1 and a relay adding each round-trip time, to {}; \
         workload n = {}, median of {} rounds; closure of {} paths{}",
        if a.daemon == Nix::Fork { "the fork's daemon" } else { "a stock 2.26.3 daemon" },
        a.n,
        a.rounds,
        a.paths,
        if a.share { "; clients share one ssh connection" } else { "" }
    );
    for &rtt in &a.rtts {
        bench_at(&a, Duration::from_millis(rtt));
    }
}

fn bench_at(a: &Args, rtt: Duration) {
    let d = Daemon::start(a.daemon, Trust::Trusted);
    let mut sshd = Sshd::start(&d);
    if a.share {
        sshd.share_connections();
    }
    let relay = Relay::start(sshd.port, rtt);
    let file = d.workload();
    let n = a.n.to_string();
    let store = sshd.store_uri();
    let ms = rtt.as_millis();

    if a.part("eval") {
        // Evaluation, every path new (a fresh salt each round), then every path valid.
        let mut new_rows = Vec::new();
        let mut valid_rows = Vec::new();
        let mut connect_rows = Vec::new();
        for (i, c) in clients(a).iter().enumerate() {
            let info = c.program("nix");
            let (time, turns) = measure(Some(&relay), a.rounds, |_| {
                sshd.client_command(
                    &d,
                    relay.port,
                    &[("NIX_DAEMON_CLIENT", c.daemon_client)],
                    &[&info, "--extra-experimental-features", "nix-command", "store", "info", "--store", &store],
                )
                .output()
                .unwrap()
            });
            connect_rows.push(Row { label: c.label.into(), time, turns, paths: 1 });
            let program = c.program("nix-instantiate");
            let env = [("NIX_DAEMON_CLIENT", c.daemon_client)];
            let eval = |salt: &str| {
                sshd.client_command(
                    &d,
                    relay.port,
                    &env,
                    &[&program, "--store", &store, &file, "--arg", "n", &n, "--argstr", "salt", salt],
                )
                .output()
                .unwrap()
            };
            let (time, turns) = measure(Some(&relay), a.rounds, |round| eval(&format!("new-{ms}-{i}-{round}")));
            new_rows.push(Row { label: c.label.into(), time, turns, paths: a.n });
            let (time, turns) = measure(Some(&relay), a.rounds, |_| eval("valid"));
            valid_rows.push(Row { label: c.label.into(), time, turns, paths: a.n });
        }
        // The same all-valid evaluation through the daemon's socket, for the goal.
        let local = format!("{FORK_PREFIX}/bin/nix-instantiate");
        let (time, _) =
            measure(None, a.rounds, |_| d.nix(&[&local, &file, "--arg", "n", &n, "--argstr", "salt", "valid"]));
        valid_rows.push(Row { label: "fork, Rust client, local socket".into(), time, turns: 0, paths: a.n });
        print_table(&format!("{ms} ms: a connection alone (nix store info; turns per connection)"), &connect_rows);
        print_table(&format!("{ms} ms: nix-instantiate, every path new"), &new_rows);
        print_table(&format!("{ms} ms: nix-instantiate, every path valid"), &valid_rows);
        if let Some(rust) = clients(a).iter().position(|c| c.name == "rust") {
            let remote = valid_rows[rust].time.as_secs_f64();
            println!(
                "  Rust client over ssh-ng at {ms} ms / through the local socket: {:.2}x ({:.2}x without one connection's cost)",
                remote / time.as_secs_f64(),
                (remote - connect_rows[rust].time.as_secs_f64()) / time.as_secs_f64()
            );
        }
    }
    if a.part("flake") {
        bench_flake(a, &d, &sshd, &relay, ms);
    }
    if a.paths == 0 || !(a.part("copy") || a.part("info")) {
        return;
    }

    // A closure of small paths in a local store with the daemon's store directory:
    // a top path referring to groups that refer to the leaves.
    let source = format!("local?root={}", d.inner_path("source"));
    let expr = format!(
        "let leaves = builtins.genList (i: builtins.toFile \"leaf-${{toString i}}\" \"leaf ${{toString i}}\") {}; \
         groups = builtins.genList (g: builtins.toFile \"group-${{toString g}}\" \
           (builtins.concatStringsSep \"\\n\" (builtins.genList (j: builtins.elemAt leaves (g * 50 + j)) 50))) {}; \
         in builtins.toFile \"top\" (builtins.concatStringsSep \"\\n\" groups)",
        a.paths / 50 * 50,
        a.paths / 50
    );
    let top = check(
        sshd.client_command(
            &d,
            relay.port,
            &[],
            &["nix-instantiate", "--store", &source, "--eval", "--read-write-mode", "-E", &expr],
        )
        .output()
        .unwrap(),
        "making the closure",
    );
    let top = String::from_utf8(top.stdout).unwrap().trim().trim_matches('"').to_owned();
    let closure = a.paths / 50 * 51 + 1;

    let clients = clients(a);
    let nix = |c: &ClientKind, args: &[&str]| {
        let program = c.program("nix");
        let mut all = vec![program.as_str(), "--extra-experimental-features", "nix-command"];
        all.extend_from_slice(args);
        sshd.client_command(&d, relay.port, &[("NIX_DAEMON_CLIENT", c.daemon_client)], &all).output().unwrap()
    };
    // Each copy goes into a store that lacks the closure; making it so is not timed.
    let empty = || {
        let listed = d.nix(&["nix-store", "-qR", &top]);
        let listed = String::from_utf8(listed.stdout).unwrap();
        let paths: Vec<&str> = listed.lines().collect();
        if !paths.is_empty() {
            let mut del = vec!["nix-store", "--delete"];
            del.extend(paths.iter().copied());
            check(d.nix(&del), "deleting the copied closure");
        }
    };
    // The clients take turns, each round in another order: every copy has the daemon
    // create the files that the one before deleted, and a file system without a
    // journal slows down with the inodes it freed recently (see tools/fork-bench), so
    // a client timed after all the others' rounds would be timed on a slower disk.
    let mut copy_times = vec![Vec::new(); clients.len()];
    let mut copy_turns = vec![0; clients.len()];
    for round in 0..a.rounds {
        for k in 0..clients.len() {
            let i = (round + k) % clients.len();
            empty();
            let (time, turns) = time_once(Some(&relay), || {
                nix(&clients[i], &["copy", "--no-check-sigs", "--from", &source, "--to", &store, &top])
            });
            copy_times[i].push(time);
            copy_turns[i] = turns;
        }
    }
    let copy_rows: Vec<Row> = clients
        .iter()
        .zip(copy_times.into_iter().zip(copy_turns))
        .map(|(c, (times, turns))| Row { label: c.label.into(), time: median(times), turns, paths: closure })
        .collect();
    let mut info_rows = Vec::new();
    if a.part("info") {
        for c in &clients {
            let (time, turns) =
                measure(Some(&relay), a.rounds, |_| nix(c, &["path-info", "-r", "--store", &store, &top]));
            info_rows.push(Row { label: c.label.into(), time, turns, paths: closure });
        }
    }
    if a.part("copy") {
        print_table(&format!("{ms} ms: nix copy --to ssh-ng://, {closure} paths"), &copy_rows);
    }
    if a.part("info") {
        print_table(&format!("{ms} ms: nix path-info -r --store ssh-ng://, {closure} paths"), &info_rows);
    }
}
