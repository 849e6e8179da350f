//! The fork (tools/build-fork) as a client of a stock Nix 2.26.3 daemon, run as a
//! non-root user through the default store, against Debian's stock nix-bin.

use std::collections::BTreeMap;
use std::process::Output;
use std::time::{Duration, Instant};

use rust_store::types::UnkeyedValidPathInfo;
use rust_store::{Client, StorePath};
use store_tests::{COMMAND_LIMIT, Daemon, FORK_PREFIX, Nix, Trust, client_user, require_fork, wait_within};

/// Runs `test` against a stock 2.26.3 daemon, then against the fork's.
fn against_each_daemon(test: fn(Nix)) {
    require_fork();
    for nix in [Nix::V2_26, Nix::Fork] {
        test(nix);
    }
}

fn instantiate(d: &Daemon, program: &str, client: &str, n: usize, salt: &str) -> Output {
    let file = d.workload();
    let n = n.to_string();
    d.run_as(
        client_user(),
        &[("NIX_DAEMON_CLIENT", client)],
        &[program, &file, "--arg", "n", &n, "--argstr", "salt", salt],
    )
}

fn ok(out: Output, what: &str) -> Vec<String> {
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
}

/// Where a client run as `client_user()` writes NIX_SHOW_STATS, as Nix sees it.
fn stats_path(d: &Daemon) -> String {
    d.inner_path(&format!("home-{}/stats.json", client_user()))
}

/// The `daemonClient` counters of the last run that wrote to [`stats_path`].
fn client_stats(d: &Daemon) -> serde_json::Value {
    let json = std::fs::read_to_string(d.host_path(&format!("home-{}/stats.json", client_user()))).unwrap();
    serde_json::from_str::<serde_json::Value>(&json).unwrap()["daemonClient"].clone()
}

/// Every valid path of a store with its info and its NAR.
async fn store_contents(c: &Client) -> BTreeMap<StorePath, (UnkeyedValidPathInfo, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for p in c.query_all_valid_paths().await.unwrap() {
        let mut info = c.query_path_info(&p).await.unwrap().unwrap();
        info.registration_time = 0;
        let nar = c.nar_from_path(&p).await.unwrap().0;
        out.insert(p, (info, nar));
    }
    out
}

/// On the bundled workload the fork prints exactly the .drv paths stock Nix prints,
/// and every store path it creates has the same NAR (and references, and content
/// address) as stock's. The two run one after the other, on fresh stores in the
/// same directory.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_writes_what_stock_writes() {
    require_fork();
    let dir = format!("/tmp/nt-equal-{}", std::process::id());
    let run = |program: &str, client: &str| {
        let d = Daemon::start_in(Nix::V2_26, Trust::Untrusted, &dir);
        let paths = ok(instantiate(&d, program, client, 500, "equal"), program);
        (d, paths)
    };
    let (stock_daemon, stock_paths) = run("/usr/bin/nix-instantiate", "cxx");
    let stock = store_contents(&stock_daemon.connect().await).await;
    drop(stock_daemon);
    let (fork_daemon, fork_paths) = run(&format!("{FORK_PREFIX}/bin/nix-instantiate"), "rust");
    let fork = store_contents(&fork_daemon.connect().await).await;

    assert_eq!(stock_paths.len(), 500);
    assert!(stock_paths == fork_paths, "the fork printed other .drv paths than stock");
    let only_stock: Vec<_> = stock.keys().filter(|p| !fork.contains_key(p)).collect();
    let only_fork: Vec<_> = fork.keys().filter(|p| !stock.contains_key(p)).collect();
    assert!(only_stock.is_empty() && only_fork.is_empty(), "only stock: {only_stock:?}; only fork: {only_fork:?}");
    for (p, (info, nar)) in &stock {
        let (finfo, fnar) = &fork[p];
        assert!(nar == fnar, "{p}: different NAR");
        assert_eq!(info, finfo, "{p}: different path info");
    }
    // The workload's derivations, their builder scripts, and the shared file.
    assert_eq!(stock.len(), 1001);
}

/// The Rust client sends the workload's writes without waiting for them and
/// uploads only what the daemon lacks: next to no blocking waits; on a fresh store
/// every path uploaded, in batches; on the second run none, all found valid.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[test]
fn fork_pipelines_the_workload() {
    against_each_daemon(fork_pipelines_the_workload_against);
}

fn fork_pipelines_the_workload_against(nix: Nix) {
    let d = Daemon::start(nix, Trust::Untrusted);
    let file = d.workload();
    let stats = stats_path(&d);
    let run = || {
        let out = d.run_as(
            client_user(),
            &[("NIX_DAEMON_CLIENT", "rust"), ("NIX_SHOW_STATS", "1"), ("NIX_SHOW_STATS_PATH", &stats)],
            &[&format!("{FORK_PREFIX}/bin/nix-instantiate"), &file, "--arg", "n", "1000"],
        );
        let drvs = ok(out, "fork");
        assert_eq!(drvs.len(), 1000);
        (drvs, client_stats(&d))
    };
    let count = |v: &serde_json::Value, key: &str| v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"));
    // A .drv and a builder script per derivation, and the shared file.
    let paths = 2001;

    let (first, client) = run();
    let uploads = &client["uploads"];
    assert_eq!(count(uploads, "added"), paths, "{client}");
    assert_eq!(count(uploads, "uploaded"), paths, "{client}");
    assert_eq!(count(uploads, "skippedValid"), 0, "{client}");
    assert!(count(uploads, "uploadBatches") < paths / 10, "{client}");
    assert!(count(uploads, "checkBatches") < paths / 10, "{client}");
    // Drains come before the lease or flush they are for, whose wait counts.
    assert!(count(&client, "waits") <= 2, "{client}");
    assert!(client["requestsByOp"].get("AddToStore").is_none(), "{client}");
    // Each check's paths are rooted first: by one AddTempRoots where the daemon
    // offers it (the fork's), one AddTempRoot each otherwise.
    let ops = &client["requestsByOp"];
    let op = |name: &str| ops.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
    if nix == Nix::Fork {
        assert!(op("AddTempRoots") >= 1 && op("AddTempRoots") <= count(uploads, "checkBatches"), "{client}");
        assert!(op("AddTempRoot") < 10, "{client}");
    } else {
        assert_eq!(op("AddTempRoots"), 0, "{client}");
        assert!(op("AddTempRoot") >= paths, "{client}");
    }

    let (second, client) = run();
    assert_eq!(first, second);
    let uploads = &client["uploads"];
    assert_eq!(count(uploads, "skippedValid"), paths, "{client}");
    assert_eq!(count(uploads, "uploaded"), 0, "{client}");
    assert!(client["requestsByOp"].get("AddMultipleToStore").is_none(), "{client}");
    assert!(count(&client, "waits") <= 2, "{client}");
    for drv in &second {
        assert!(d.real_path(drv).exists(), "{drv} is not in the store");
    }
}

/// Path imports larger than the cap on contents held for unconfirmed additions are
/// not held: they stream to the daemon as they are read (AddToStore, the daemon
/// computing the path, as stock Nix does), and land at the paths stock Nix gives them.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[test]
fn imports_larger_than_the_memory_cap_are_streamed() {
    require_fork();
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let dir = d.host_path("work");
    std::fs::create_dir_all(dir.join("tree/sub")).unwrap();
    // Incompressible, reproducible bytes.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect()
    };
    let cap = 1 << 20;
    std::fs::write(dir.join("tree/sub/a"), bytes(3 * cap)).unwrap();
    std::fs::write(dir.join("tree/b"), bytes(cap / 2)).unwrap();
    let flat = bytes(2 * cap);
    std::fs::write(dir.join("flat"), &flat).unwrap();
    std::fs::write(
        dir.join("imports.nix"),
        r#"[ (builtins.path { path = ./tree; }) (builtins.path { path = ./flat; recursive = false; })
             (builtins.toFile "small" "held, not streamed") ]"#,
    )
    .unwrap();
    let file = d.inner_path("work/imports.nix");
    let stats = stats_path(&d);
    let eval = |program: &str, client: &str| {
        let out = d.run_as(
            client_user(),
            &[("NIX_DAEMON_CLIENT", client), ("NIX_SHOW_STATS", "1"), ("NIX_SHOW_STATS_PATH", &stats)],
            &[
                program,
                "--eval",
                "--strict",
                "--json",
                "--read-write-mode",
                "--option",
                "daemon-client-max-pending",
                &cap.to_string(),
                &file,
            ],
        );
        ok(out, program)
    };

    // The fork first, so that every path is new to the daemon.
    let fork = eval(&format!("{FORK_PREFIX}/bin/nix-instantiate"), "rust");
    let client = client_stats(&d);
    let stock = eval("/usr/bin/nix-instantiate", "cxx");
    assert_eq!(fork, stock, "the fork put the imports elsewhere than stock");

    // The two large imports stream as RemoteStore's own AddToStore, each on the
    // socket leased from the Rust client: not held, not sent by it.
    assert!(client["requestsByOp"].get("AddToStore").is_none(), "{client}");
    assert!(client["leases"].as_u64().unwrap() >= 2, "{client}");
    assert_eq!(client["uploads"]["uploaded"], 1, "{client}");
    assert!(client["uploads"]["peakPendingBytes"].as_u64().unwrap() < cap as u64, "{client}");
    assert!(client["bytesSent"].as_u64().unwrap() < cap as u64, "{client}");
    let printed: Vec<String> = serde_json::from_str(&fork.join("")).unwrap();
    assert_eq!(printed.len(), 3);
    assert_eq!(std::fs::read(d.real_path(&printed[1])).unwrap(), flat);
    assert!(d.real_path(&printed[0]).join("sub/a").exists());
}

/// A daemon that dies in the middle of an evaluation makes the command fail with an
/// error, as stock Nix does: no hang, no panic.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[tokio::test]
async fn fork_fails_cleanly_when_the_daemon_dies() {
    require_fork();
    for (program, client) in
        [("/usr/bin/nix-instantiate", "cxx"), (&*format!("{FORK_PREFIX}/bin/nix-instantiate"), "rust")]
    {
        let mut d = Daemon::start(Nix::V2_26, Trust::Untrusted);
        let file = d.workload();
        let n = "5000";
        let child = d
            .command_as(
                client_user(),
                &[("NIX_DAEMON_CLIENT", client)],
                &[program, &file, "--arg", "n", n, "--argstr", "salt", "killed"],
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Let it get going, then kill the daemon and its connection workers.
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.workers().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        let killed = Instant::now();
        d.kill();
        let out = wait_within(child, Duration::from_secs(60), client);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{client}: succeeded without its daemon");
        assert!(killed.elapsed() < Duration::from_secs(10), "{client}: took {:?} to fail", killed.elapsed());
        assert!(stderr.contains("error"), "{client}: no error message: {stderr}");
        assert!(!stderr.contains("panicked"), "{client}: {stderr}");
    }
}

/// The garbage collector running in a loop while the Rust client evaluates the
/// workload with `--add-root`, a third of whose paths are already in the store
/// (unrooted, so garbage) and the rest new: every .drv it printed, and its whole
/// closure, is valid afterwards.
///
/// Nix 2.26.3's collector has a race of its own, fixed in later Nix: a path that
/// becomes a temporary root while the collector is deleting a closure it belongs
/// to is deleted anyway (only the path being looked at waits for new roots). An
/// evaluation, with either client (the C++ one failed 2 runs in 6 here, the Rust
/// one 3), can then find a path valid that is gone a moment later, and the daemon
/// refuses the next path that refers to it; or the collector deletes the files of
/// a path the daemon is adding again, which then finds them gone ("No such file or
/// directory"). Such a run fails at its next sync point, naming the op and the
/// path; `nix-instantiate` has printed the roots of the derivations before it by
/// then. The test runs again, with the collector still running, until a run
/// succeeds.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[test]
fn garbage_collection_during_evaluation_keeps_what_it_printed() {
    // The fork's daemon roots a check's paths in one AddTempRoots, which goes to the
    // running collector over its socket.
    against_each_daemon(garbage_collection_during_evaluation_against);
}

fn garbage_collection_during_evaluation_against(nix: Nix) {
    /// Runs before the test gives up on meeting the race.
    const MAX_RUNS: usize = 10;
    let d = Daemon::start(nix, Trust::Untrusted);
    let file = d.workload();
    ok(instantiate(&d, "/usr/bin/nix-instantiate", "cxx", 500, "gc"), "stock");
    let root = d.inner_path(&format!("home-{}/result", client_user()));
    let program = format!("{FORK_PREFIX}/bin/nix-instantiate");
    let args = [program.as_str(), &file, "--arg", "n", "1500", "--argstr", "salt", "gc", "--add-root", &root];
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (out, collections, races) = std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                d.nix_ok(&["nix-store", "--gc"]);
                runs += 1;
            }
            runs
        });
        // The collector stops when the evaluations are done, also if they panic.
        let stop_collector = StopOnDrop(&stop);
        // Let the first collection start, then evaluate.
        std::thread::sleep(Duration::from_millis(100));
        let mut races = 0;
        let out = loop {
            let out = d.run_as(client_user(), &[("NIX_DAEMON_CLIENT", "rust")], &args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let raced = stderr.contains("is not valid") || stderr.contains("No such file or directory");
            if out.status.success() || races + 1 == MAX_RUNS || !raced {
                break out;
            }
            assert!(stderr.contains("AddMultipleToStore"), "not the collector's race: {stderr}");
            eprintln!("run {} met the collector's race: {}", races + 1, stderr.trim());
            races += 1;
        };
        drop(stop_collector);
        (out, gc.join().unwrap(), races)
    });
    let links = ok(out, "fork with --add-root");
    assert_eq!(links.len(), 1500);
    assert!(collections >= 2, "the collector ran only {collections} times");
    eprintln!("{nix:?}: {collections} collections; {races} runs met the collector's race before one succeeded");
    // Once more, now that the evaluation's temporary roots are gone.
    d.nix_ok(&["nix-store", "--gc"]);
    let drvs: Vec<String> =
        links.iter().map(|l| std::fs::read_link(d.real_path(l)).unwrap().to_string_lossy().into_owned()).collect();
    assert!(drvs.iter().all(|p| p.ends_with(".drv")), "{:?}", &drvs[..3]);
    d.assert_closure_valid(&drvs);
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Eight evaluations of the same workload at once against one daemon, all with the
/// Rust client: the same output from each, no error, and everything valid; against
/// the stock daemon and the fork's, whose batches then wait for each other's locks.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[test]
fn eight_evaluations_at_once() {
    against_each_daemon(eight_evaluations_at_once_against);
}

fn eight_evaluations_at_once_against(nix: Nix) {
    let d = Daemon::start(nix, Trust::Untrusted);
    let file = d.workload();
    let program = format!("{FORK_PREFIX}/bin/nix-instantiate");
    let children: Vec<_> = (0..8)
        .map(|_| {
            d.command_as(
                client_user(),
                &[("NIX_DAEMON_CLIENT", "rust")],
                &[&program, &file, "--arg", "n", "1000", "--argstr", "salt", "eight"],
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let outputs: Vec<Vec<String>> =
        children.into_iter().map(|c| ok(wait_within(c, COMMAND_LIMIT, "an evaluation"), "fork")).collect();
    assert_eq!(outputs[0].len(), 1000);
    assert!(outputs.iter().all(|o| *o == outputs[0]), "the eight evaluations printed different paths");
    d.assert_closure_valid(&outputs[0]);
}

/// The fork's daemon, which registers each AddMultipleToStore batch in one
/// transaction, stores what the stock daemon stores: the Rust client's evaluation
/// of the workload through it gives the same paths, NARs and path infos as stock
/// nix-bin through the stock daemon; stock clients (2.26.3's nix-bin) get the same
/// answers from it; and its store verifies, contents included.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fork_daemon_stores_what_the_stock_daemon_stores() {
    require_fork();
    let dir = format!("/tmp/nt-fork-daemon-{}", std::process::id());
    let (stock, stock_paths) = {
        let d = Daemon::start_in(Nix::V2_26, Trust::Untrusted, &dir);
        let paths = ok(instantiate(&d, "/usr/bin/nix-instantiate", "cxx", 500, "daemons"), "stock");
        (store_contents(&d.connect().await).await, paths)
    };
    let d = Daemon::start_in(Nix::Fork, Trust::Untrusted, &dir);
    let fork_paths = ok(instantiate(&d, &format!("{FORK_PREFIX}/bin/nix-instantiate"), "rust", 500, "daemons"), "fork");
    assert!(fork_paths == stock_paths, "other .drv paths through the fork's daemon");
    let fork = store_contents(&d.connect().await).await;
    assert_eq!(fork.len(), stock.len());
    for (p, (info, nar)) in &stock {
        let (finfo, fnar) = fork.get(p).unwrap_or_else(|| panic!("{p} is missing from the fork daemon's store"));
        assert!(nar == fnar, "{p}: different NAR");
        assert_eq!(info, finfo, "{p}: different path info");
    }
    d.nix_ok(&["nix-store", "--verify", "--check-contents"]);
    // A stock client against the fork's daemon: all valid already, the same paths.
    let again =
        ok(instantiate(&d, "/usr/bin/nix-instantiate", "cxx", 500, "daemons"), "stock against the fork's daemon");
    assert!(again == stock_paths);
    // And new paths from it, one AddToStore each.
    let new =
        ok(instantiate(&d, "/usr/bin/nix-instantiate", "cxx", 200, "stock-new"), "stock against the fork's daemon");
    d.assert_closure_valid(&new);
}

/// The fork's daemon killed (SIGKILL, its connection's process) in the middle of
/// the Rust client's batches, 20 times: afterwards the store verifies with its
/// contents, and every path it reports valid has its files.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fork_daemon_killed_mid_batch_leaves_a_sound_store() {
    require_fork();
    let d = Daemon::start(Nix::Fork, Trust::Untrusted);
    let file = d.workload();
    let program = format!("{FORK_PREFIX}/bin/nix-instantiate");
    let mut killed = 0;
    for round in 0..20 {
        let salt = format!("killed-{round}");
        let child = d
            .command_as(
                client_user(),
                &[("NIX_DAEMON_CLIENT", "rust")],
                &[&program, &file, "--arg", "n", "3000", "--argstr", "salt", &salt],
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Into the uploads: some batches registered, one in the middle.
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.workers().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(150 + 37 * round));
        if !d.workers().is_empty() {
            killed += 1;
        }
        d.kill_workers();
        // Failing or not, the evaluation ends, well within a minute.
        wait_within(child, Duration::from_secs(60), &format!("round {round}'s nix-instantiate"));
    }
    assert!(killed >= 10, "only {killed} of 20 runs were killed while they ran");
    d.nix_ok(&["nix-store", "--verify", "--check-contents"]);
    let c = d.connect().await;
    let valid = c.query_all_valid_paths().await.unwrap();
    assert!(valid.len() > 1000, "only {} valid paths", valid.len());
    for p in &valid {
        assert!(d.real_path(&d.store_dir.print(p)).exists(), "{p} is valid but not on disk");
    }
}

/// `nix-daemon --stdio` of the fork, whose store is the Rust client's
/// (`RustDaemonStore`, a `RemoteStore`), forwards its connection to the daemon as
/// stock does: the client on its stdin and stdout talks to the daemon itself. In
/// 2.26.3, `--stdio` forwards only with `--force-untrusted` (experimental feature
/// `daemon-trust-override`; without it, it processes the ops itself, through its
/// store); a forwarded add is the daemon's own, so it is
/// valid on another connection as soon as it is answered.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[tokio::test]
async fn the_forks_stdio_daemon_forwards_to_the_daemon() {
    require_fork();
    use tokio::io::AsyncWriteExt;
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    for client in ["rust", "cxx"] {
        let daemon = format!("{FORK_PREFIX}/bin/nix-daemon");
        let mut cmd = tokio::process::Command::from(d.command_as(
            client_user(),
            &[("NIX_DAEMON_CLIENT", client), ("NIX_CONFIG", "extra-experimental-features = daemon-trust-override")],
            &[&daemon, "--stdio", "--force-untrusted"],
        ));
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // The child's pipes, joined to a socket the client can use.
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let (mut from_child, mut to_child) = (child.stdout.take().unwrap(), child.stdin.take().unwrap());
        let (mut read_half, mut write_half) = theirs.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut from_child, &mut write_half).await;
            let _ = write_half.shutdown().await;
        });
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut read_half, &mut to_child).await;
        });
        let c = Client::from_stream(ours, d.options()).await.unwrap();
        assert_eq!(c.info().trusted, Some(rust_store::types::TrustedFlag::NotTrusted), "{client}");
        let name = format!("through-stdio-{client}");
        let added = c.add_text(&name, b"forwarded\n".to_vec(), &Default::default()).await.unwrap();
        drop(c);
        let direct = d.connect().await;
        assert!(direct.is_valid_path(&added.path).await.unwrap(), "{client}");
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
        assert!(status.success(), "{client}: nix-daemon --stdio ended with {status}");
    }
}

/// The fork's daemon serves AddTempRoots (op 49) and offers the feature `addTempRoots`
/// to clients that offer it; the stock daemon offers nothing. Paths rooted in one
/// request survive another connection's garbage collection; an unrooted one does not.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fork_daemon_roots_a_set_of_paths_in_one_request() {
    use rust_store::types::{GcAction, GcOptions};
    use std::collections::BTreeSet;
    require_fork();
    let stock = Daemon::start(Nix::V2_26, Trust::Untrusted);
    assert!(!stock.connect().await.has_add_temp_roots(), "the stock daemon offers addTempRoots");
    let d = Daemon::start(Nix::Fork, Trust::Untrusted);
    // Added on a connection that is then closed: nothing roots them any more.
    let paths: Vec<StorePath> = {
        let adder = d.connect().await;
        let mut v = Vec::new();
        for i in 0..4 {
            let data = format!("root me {i}").into_bytes();
            v.push(adder.add_text(&format!("roots-{i}"), data, &BTreeSet::new()).await.unwrap().path);
        }
        adder.flush().await.unwrap();
        v
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = d.connect().await;
    assert!(c.has_add_temp_roots());
    let rooted: BTreeSet<StorePath> = paths[..3].iter().cloned().collect();
    let before = c.stats().total_requests();
    c.add_temp_roots(&rooted).await.unwrap();
    assert_eq!(c.stats().total_requests(), before + 1);
    let gc = d.connect().await;
    let delete = |p: &StorePath| GcOptions {
        action: GcAction::DeleteSpecific,
        paths_to_delete: BTreeSet::from([p.clone()]),
        ignore_liveness: false,
        max_freed: u64::MAX,
    };
    for p in &rooted {
        let e = gc.collect_garbage(&delete(p)).await.expect_err("deleted a rooted path");
        assert!(e.to_string().contains("it is still alive"), "{e}");
    }
    gc.collect_garbage(&delete(&paths[3])).await.expect("the unrooted path is deleted");
    for p in &rooted {
        assert!(gc.is_valid_path(p).await.unwrap());
    }
    assert!(!gc.is_valid_path(&paths[3]).await.unwrap());
    // An empty set is answered too.
    c.add_temp_roots(&BTreeSet::new()).await.unwrap();
}

/// Stock clients of 2.8.0 (Debian bookworm's) and 2.26.3 get from the fork's daemon
/// what they get from the stock one: the same .drv paths, with the same contents,
/// all valid, and a store that verifies.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_clients_get_the_same_from_the_fork_daemon() {
    require_fork();
    let dir = format!("/tmp/nt-stock-clients-{}", std::process::id());
    let run = |nix: Nix| {
        let d = Daemon::start_in(nix, Trust::Untrusted, &dir);
        let file = d.workload();
        let mut printed = Vec::new();
        for (client, salt) in [(Nix::V2_8, "old"), (Nix::V2_26, "new")] {
            let out = d.run_from(client, &["nix-instantiate", &file, "--arg", "n", "100", "--argstr", "salt", salt]);
            let paths = ok(out, &format!("{client:?} client against {nix:?}"));
            d.assert_closure_valid(&paths);
            printed.push(paths);
        }
        let accepted = d.log().matches("accepted connection").count();
        assert!(accepted >= 2, "the clients did not go through {nix:?}'s daemon:\n{}", d.log());
        d.nix_ok(&["nix-store", "--verify", "--check-contents"]);
        let contents: Vec<String> =
            printed.iter().flatten().map(|p| d.nix_ok(&["nix-store", "--query", "--hash", p])).collect();
        (printed, contents)
    };
    let stock = run(Nix::V2_26);
    let fork = run(Nix::Fork);
    assert!(stock == fork, "stock clients got other paths or contents from the fork's daemon");
}

/// Contents that do not match the content address they are sent with are refused,
/// and the path stays invalid, by each daemon: the fork's hashes what it restores
/// for text, flat and NAR content addresses instead of reading the files back, and
/// must refuse exactly what stock refuses.
#[test]
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
fn contents_that_do_not_match_their_content_address_are_refused() {
    use rust_store::hash::{Hash, HashAlgo};
    use rust_store::nar::{self, NarEntry};
    use rust_store::store_path::{ContentAddress, ContentAddressMethod};
    use rust_store::types::ValidPathInfo;

    fn file(contents: &str) -> NarEntry {
        NarEntry::Regular { executable: false, contents: contents.as_bytes().to_vec() }
    }
    fn dir(contents: &str) -> NarEntry {
        NarEntry::Directory(BTreeMap::from([("a".to_owned(), file(contents))]))
    }
    against_each_daemon(|nix| {
        let d = Daemon::start(nix, Trust::Untrusted);
        let rt = tokio::runtime::Runtime::new().unwrap();
        // (what, method, the entry the address is of, the entry sent, what the daemon says)
        let cases = [
            ("text", ContentAddressMethod::Text, file("claimed"), file("delivered"), "ca hash mismatch"),
            ("flat", ContentAddressMethod::Flat, file("claimed"), file("delivered"), "ca hash mismatch"),
            ("nar", ContentAddressMethod::Nar, dir("claimed"), dir("delivered"), "ca hash mismatch"),
            ("flat-dir", ContentAddressMethod::Flat, file("claimed"), dir("claimed"), "Is a directory"),
            ("good", ContentAddressMethod::Nar, dir("fine"), dir("fine"), ""),
        ];
        for (what, method, claimed, sent, refusal) in cases {
            let hashed = match (&claimed, method) {
                (NarEntry::Regular { contents, .. }, ContentAddressMethod::Text | ContentAddressMethod::Flat) => {
                    contents.clone()
                }
                _ => nar::write_nar(&claimed),
            };
            let ca = ContentAddress { method, hash: Hash::digest(HashAlgo::Sha256, &hashed) };
            let path = d.store_dir.make_fixed_output_path_from_ca(what, &ca, &Default::default(), false).unwrap();
            let nar = nar::write_nar(&sent);
            let mut info = UnkeyedValidPathInfo::new(Hash::digest(HashAlgo::Sha256, &nar), nar.len() as u64);
            info.ca = Some(ca);
            let item = (ValidPathInfo { path: path.clone(), info }, nar);
            let (result, valid) = rt.block_on(async {
                let r = d.connect().await.add_multiple_to_store(&[item], false, false).await;
                (r, d.connect().await.is_valid_path(&path).await.unwrap())
            });
            match result {
                Ok(()) => assert!(refusal.is_empty() && valid, "{nix:?}: {what} was accepted"),
                Err(e) => {
                    assert!(!refusal.is_empty(), "{nix:?}: {what} refused: {e}");
                    assert!(e.to_string().contains(refusal), "{nix:?}: {what}: {e}");
                    assert!(!valid, "{nix:?}: {what} refused but valid");
                }
            }
        }
    });
}

/// Closures and path infos through the daemon's socket, which the Rust client asks
/// for without waiting for each: `nix path-info -r`, `nix-store -qR` and
/// `nix path-info --json` print what nix-bin prints, and a missing path fails as
/// with nix-bin, against each daemon.
#[test]
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
fn closures_and_path_infos_are_stock_s() {
    against_each_daemon(|nix| {
        let d = Daemon::start(nix, Trust::Untrusted);
        let drvs = ok(instantiate(&d, "/usr/bin/nix-instantiate", "cxx", 300, "closures"), "nix-bin");
        let top = &drvs[drvs.len() - 1];
        let missing = format!("{}/{}-missing", d.store_dir.as_str(), "0".repeat(32));
        let fork_nix = format!("{FORK_PREFIX}/bin/nix");
        let fork_store = format!("{FORK_PREFIX}/bin/nix-store");
        let experimental = ["--extra-experimental-features", "nix-command"];
        let queries: [(&str, Vec<&str>); 4] = [
            ("path-info -r", [&experimental[..], &["path-info", "-r", top.as_str()]].concat()),
            ("path-info --json", [&experimental[..], &["path-info", "--json", "-r", top.as_str()]].concat()),
            ("-qR", vec!["-qR", top.as_str()]),
            ("missing", [&experimental[..], &["path-info", missing.as_str()]].concat()),
        ];
        for (what, args) in queries {
            let run = |program: &str, client: &str| {
                let mut all = vec![program];
                all.extend(args.iter().copied());
                d.run_as(client_user(), &[("NIX_DAEMON_CLIENT", client)], &all)
            };
            let (stock_program, fork_program) = if what == "-qR" {
                ("/usr/bin/nix-store", fork_store.as_str())
            } else {
                ("/usr/bin/nix", fork_nix.as_str())
            };
            let stock = run(stock_program, "cxx");
            let fork = run(fork_program, "rust");
            assert_eq!(stock.status.success(), fork.status.success(), "{nix:?} {what}");
            if what == "missing" {
                let (s, f) = (String::from_utf8_lossy(&stock.stderr), String::from_utf8_lossy(&fork.stderr));
                assert!(s.contains("is not valid") && f.contains("is not valid"), "{nix:?}: {s} / {f}");
                continue;
            }
            assert!(stock.status.success(), "{nix:?} {what}: {}", String::from_utf8_lossy(&stock.stderr));
            let mut s: Vec<String> = String::from_utf8(stock.stdout).unwrap().lines().map(str::to_owned).collect();
            let mut f: Vec<String> = String::from_utf8(fork.stdout).unwrap().lines().map(str::to_owned).collect();
            if what == "path-info --json" {
                // Registration times aside, the same infos.
                let strip = |v: &mut Vec<String>| {
                    let mut j: serde_json::Value = serde_json::from_str(&v.join("\n")).unwrap();
                    let infos = j.as_object_mut().unwrap();
                    for (_, info) in infos.iter_mut() {
                        info.as_object_mut().unwrap().remove("registrationTime");
                    }
                    *v = infos.iter().map(|(path, info)| format!("{path} {info}")).collect();
                };
                strip(&mut s);
                strip(&mut f);
            }
            s.sort();
            f.sort();
            assert!(s.len() > 300, "{nix:?} {what}: {} lines", s.len());
            assert_eq!(s, f, "{nix:?} {what}");
        }
    });
}

/// The fork's daemon looks a QueryValidPaths set up in one read transaction: it
/// answers as stock does for a set mixing valid and missing paths, and for none.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_paths_of_a_mixed_set_are_stock_s() {
    use std::collections::BTreeSet;
    require_fork();
    for nix in [Nix::V2_26, Nix::Fork] {
        let d = Daemon::start(nix, Trust::Untrusted);
        let drvs = ok(instantiate(&d, "/usr/bin/nix-instantiate", "cxx", 200, "valid-set"), "nix-bin");
        let valid: BTreeSet<StorePath> = drvs.iter().map(|p| d.store_dir.parse(p).unwrap()).collect();
        assert_eq!(valid.len(), 200, "{nix:?}");
        let missing: BTreeSet<StorePath> = (0..50)
            .map(|i| d.store_dir.parse(&format!("{}/{:0>32}-missing-{i}", d.store_dir.as_str(), i)).unwrap())
            .collect();
        let c = d.connect().await;
        let all: BTreeSet<StorePath> = valid.union(&missing).cloned().collect();
        let found = c.query_valid_paths(&all, false).await.unwrap();
        assert_eq!(found, valid, "{nix:?}");
        assert!(c.query_valid_paths(&missing, false).await.unwrap().is_empty(), "{nix:?}");
        assert!(c.query_valid_paths(&BTreeSet::new(), false).await.unwrap().is_empty(), "{nix:?}");
    }
}

/// The fork parses a store path as stock does, however it is spelt: the daemon
/// answers IsValidPath, sent by hand with each spelling (canonical or not, in the
/// store or not, malformed), with the same answer or the same error from each daemon.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_paths_are_parsed_as_stock_parses_them() {
    use rust_store::protocol::Op;
    use std::collections::BTreeSet;
    use std::io::{Read, Write};
    use std::os::fd::BorrowedFd;
    require_fork();

    type Sock = std::fs::File;
    fn read_u64(sock: &mut Sock) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        sock.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn read_string(sock: &mut Sock) -> std::io::Result<String> {
        let len = read_u64(sock)? as usize;
        let mut b = vec![0u8; len.next_multiple_of(8)];
        sock.read_exact(&mut b)?;
        b.truncate(len);
        Ok(String::from_utf8(b).unwrap())
    }
    /// IsValidPath of `path` on `sock`: "valid", "invalid" or the daemon's error.
    fn is_valid(sock: &mut Sock, path: &str) -> std::io::Result<String> {
        let mut req = Vec::new();
        req.extend_from_slice(&(Op::IsValidPath as u64).to_le_bytes());
        req.extend_from_slice(&(path.len() as u64).to_le_bytes());
        req.extend_from_slice(path.as_bytes());
        req.resize(req.len().next_multiple_of(8), 0);
        sock.write_all(&req)?;
        Ok(match read_u64(sock)? {
            0x616c7473 => if read_u64(sock)? == 1 { "valid" } else { "invalid" }.to_owned(),
            0x63787470 => {
                assert_eq!(read_string(sock)?, "Error");
                let _level = read_u64(sock)?;
                let _name = read_string(sock)?;
                let msg = read_string(sock)?;
                assert_eq!(read_u64(sock)?, 0, "no position");
                for _ in 0..read_u64(sock)? {
                    assert_eq!(read_u64(sock)?, 0, "no position");
                    read_string(sock)?;
                }
                format!("error: {msg}")
            }
            other => panic!("unexpected message {other:#x} for {path}"),
        })
    }

    let mut answers = Vec::new();
    for nix in [Nix::V2_26, Nix::Fork] {
        let d = Daemon::start(nix, Trust::Untrusted);
        let c = d.connect().await;
        let hello = c.add_text("hello.txt", b"hello\n".to_vec(), &BTreeSet::new()).await.unwrap();
        let (s, b) = (d.store_dir.as_str().to_owned(), hello.path.to_string());
        let last = s.rsplit('/').next().unwrap().to_owned();
        let hash = b[..32].to_owned();
        let spellings = [
            format!("{s}/{b}"),
            format!("{s}//{b}"),
            format!("{s}/./{b}"),
            format!("{s}/{b}/"),
            format!("{s}/../{last}/{b}"),
            format!("{s}/{b}/sub"),
            format!("{s}/{b}/.."),
            format!("{s}x/{b}"),
            format!("/elsewhere/{b}"),
            format!("{s}/{hash}-missing"),
            format!("{s}/{hash}"),
            format!("{s}/{hash}-"),
            format!("{s}/{hash}-.."),
            format!("{s}/{hash}-a b"),
            format!("{s}/short"),
            format!("{s}/{}-x", "e".repeat(32)),
            format!("{s}/"),
            s.clone(),
            String::new(),
        ];
        // A connection each: the daemon ends one after an error in a request's arguments.
        let mut replies = Vec::new();
        for p in spellings {
            let c = d.connect().await;
            let lease = c.lease().await.unwrap();
            let fd = lease.fds().read;
            let asked = p.clone();
            let r = tokio::task::spawn_blocking(move || {
                let fd = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().unwrap();
                is_valid(&mut Sock::from(fd), &asked).unwrap_or_else(|e| format!("closed: {}", e.kind()))
            })
            .await
            .unwrap();
            lease.abandon();
            // The same for either daemon: its own store directory and path hidden.
            let hide = |x: &str| x.replace(&s, "STORE").replace(&b[33..], "NAME").replace(&hash, "HASH");
            replies.push(format!("{} -> {}", hide(&p), hide(&r)));
        }
        assert!(c.is_valid_path(&hello.path).await.unwrap(), "{nix:?}");
        answers.push(replies);
    }
    let (stock, fork) = (&answers[0], &answers[1]);
    assert!(stock[..5].iter().all(|a| a.ends_with("-> valid")), "{stock:#?}");
    assert!(stock[5..].iter().all(|a| !a.ends_with("-> valid")), "{stock:#?}");
    assert_eq!(stock, fork);
}

/// A batch that mixes paths already valid, paths whose files an interrupted
/// addition left behind unregistered, and new paths: each daemon leaves the valid
/// ones as they were (neither restored again nor registered again), replaces what
/// was left behind, and adds the new ones. The fork's daemon looks at a path's
/// files before asking its database whether the path is valid.
#[test]
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
fn a_batch_of_valid_left_over_and_new_paths_is_handled_as_stock_handles_it() {
    use rust_store::hash::{Hash, HashAlgo};
    use rust_store::nar;
    use rust_store::store_path::{ContentAddress, ContentAddressMethod};
    use rust_store::types::ValidPathInfo;

    against_each_daemon(|nix| {
        let d = Daemon::start(nix, Trust::Untrusted);
        let item = |name: &str| {
            let contents = format!("{name} of a batch");
            let ca = ContentAddress {
                method: ContentAddressMethod::Text,
                hash: Hash::digest(HashAlgo::Sha256, contents.as_bytes()),
            };
            let path = d.store_dir.make_fixed_output_path_from_ca(name, &ca, &Default::default(), false).unwrap();
            let nar = nar::dump_flat_file_contents(contents.as_bytes());
            let mut info = UnkeyedValidPathInfo::new(Hash::digest(HashAlgo::Sha256, &nar), nar.len() as u64);
            info.ca = Some(ca);
            (ValidPathInfo { path, info }, nar)
        };
        let valid: Vec<_> = (0..3).map(|i| item(&format!("valid-{i}"))).collect();
        let left: Vec<_> = (0..3).map(|i| item(&format!("left-{i}"))).collect();
        let new: Vec<_> = (0..3).map(|i| item(&format!("new-{i}"))).collect();
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let c = d.connect().await;
            c.add_multiple_to_store(&valid, false, false).await.unwrap();
            let mut before = Vec::new();
            for (v, _) in &valid {
                before.push(c.query_path_info(&v.path).await.unwrap().unwrap());
            }
            // What an interrupted addition leaves: files, and no registration.
            for (v, _) in &left {
                std::fs::write(d.real_path(&d.store_dir.print(&v.path)), "half written").unwrap();
            }
            // A registration time of its own for anything registered again.
            std::thread::sleep(Duration::from_millis(1100));
            let mut batch = Vec::new();
            for i in 0..3 {
                batch.extend([valid[i].clone(), left[i].clone(), new[i].clone()]);
            }
            c.add_multiple_to_store(&batch, false, false).await.unwrap();
            for ((v, _), was) in valid.iter().zip(&before) {
                let now = c.query_path_info(&v.path).await.unwrap().unwrap();
                assert_eq!(now.registration_time, was.registration_time, "{nix:?}: registered again");
            }
            for (v, _) in left.iter().chain(&new) {
                let info = c.query_path_info(&v.path).await.unwrap().expect("valid after the batch");
                assert_eq!(info.nar_hash, v.info.nar_hash, "{nix:?}");
            }
            for (v, _) in &left {
                let contents = std::fs::read_to_string(d.real_path(&d.store_dir.print(&v.path))).unwrap();
                assert!(contents.ends_with("of a batch"), "{nix:?}: {contents}");
            }
        });
        d.nix_ok(&["nix-store", "--verify", "--check-contents"]);
    });
}

/// A connection of the fork's daemon that waits for the store's database, while
/// another process holds its write lock, ends when its client goes away: it waits
/// in short sleeps that give up once the connection is interrupted, where SQLite's
/// busy timeout would wait for the lock for up to an hour. Once the lock is released
/// the daemon adds paths again.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[test]
fn a_connection_waiting_for_the_database_ends_with_its_client() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    require_fork();
    let d = Daemon::start(Nix::Fork, Trust::Untrusted);
    // Another process holds the database's write lock, as a long transaction does.
    let mut holder = std::process::Command::new("chroot")
        .arg(store_tests::nix_root(Nix::Fork))
        .args(["sqlite3", &d.inner_path("var/nix/db/db.sqlite")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start sqlite3");
    let mut to_holder = holder.stdin.take().unwrap();
    writeln!(to_holder, "BEGIN IMMEDIATE; SELECT 'locked';").unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "locked", "sqlite3 did not take the database's write lock");
    // The C++ client waits for each addition, so its connection waits for the lock.
    let program = format!("{FORK_PREFIX}/bin/nix-instantiate");
    let add = |text: &str| {
        let expr = format!("builtins.toFile \"held\" \"{text}\"");
        d.command_as(
            client_user(),
            &[("NIX_DAEMON_CLIENT", "cxx")],
            &[&program, "--eval", "--read-write-mode", "-E", &expr],
        )
    };
    let mut client = add("waits").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.workers().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !d.workers().is_empty() && client.try_wait().unwrap().is_none(),
        "the addition ended while the database was locked"
    );
    let _ = client.kill();
    let _ = client.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.workers().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let waiting = d.workers();
    // sqlite3 rolls back and exits at the end of its input.
    drop(to_holder);
    let _ = holder.wait();
    assert!(waiting.is_empty(), "the connection of a client that went away still waits for the database");
    let out = store_tests::output_within(add("added"), COMMAND_LIMIT);
    assert!(out.status.success(), "adding after the lock was released: {}", String::from_utf8_lossy(&out.stderr));
}
