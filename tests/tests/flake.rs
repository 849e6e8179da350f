//! Flake evaluation through the fork's Rust client, as CI evaluates a commit: the
//! bundled workloads as a git flake (bench/flake.nix), evaluated with `nix eval`,
//! `nix flake check --no-build` and `nix derivation show`, against Debian's stock
//! nix-bin on the same daemon.

use std::process::Output;

use store_tests::{Daemon, FORK_PREFIX, Flake, Nix, SYSTEM, Trust, client_user, require_fork};

/// Runs `nix ARGS` as the client user with the fork's Rust client or stock nix-bin,
/// with flakes enabled and the counters written to `stats.json` in its home.
fn nix(d: &Daemon, fork: bool, args: &[&str]) -> Output {
    let program = if fork { format!("{FORK_PREFIX}/bin/nix") } else { "/usr/bin/nix".to_owned() };
    let stats = d.inner_path(&format!("home-{}/stats.json", client_user()));
    let mut argv = vec![program.as_str(), "--extra-experimental-features", "nix-command flakes"];
    argv.extend(args);
    d.run_as(
        client_user(),
        &[("NIX_DAEMON_CLIENT", "rust"), ("NIX_SHOW_STATS", "1"), ("NIX_SHOW_STATS_PATH", &stats)],
        &argv,
    )
}

fn stdout(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The `daemonClient` counters of the fork's last run.
fn client_stats(d: &Daemon) -> serde_json::Value {
    let json = std::fs::read_to_string(d.host_path(&format!("home-{}/stats.json", client_user()))).unwrap();
    serde_json::from_str::<serde_json::Value>(&json).unwrap()["daemonClient"].clone()
}

/// Every time the Rust client blocked: a request that waited for its reply, a sync
/// point that waited for additions, a read that waited for its path's addition, an
/// addition that waited for memory.
fn blocking_waits(client: &serde_json::Value) -> u64 {
    let count = |v: &serde_json::Value, key: &str| v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"));
    let u = &client["uploads"];
    // A drain is always followed by the wait of the lease or flush it was for, and
    // is the same sync point: count that wait only.
    count(client, "waits") + count(u, "pathWaits") + count(u, "memoryWaits")
}

/// `nix eval` of a commit, every path new and then every path valid (a new commit
/// with the same derivations), for both workload shapes: the Rust client prints
/// what stock prints, leaves every .drv and its closure valid, and blocks only a
/// few times in all, not per derivation.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[test]
fn nix_eval_of_a_flake_matches_stock_and_blocks_a_few_times() {
    require_fork();
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let mut flake = Flake::new(&d);
    for (shape, n) in [("workload", 600), ("nixpkgs", 400)] {
        let eval = |fork: bool, flake_ref: &str| -> Vec<String> {
            let out = nix(&d, fork, &["eval", "--json", &format!("{flake_ref}#drvPaths")]);
            serde_json::from_str(&stdout(out, &format!("nix eval ({shape}, fork: {fork})"))).unwrap()
        };
        let new = flake.commit(shape, n, "new");
        let fork = eval(true, &new);
        let new_stats = client_stats(&d);
        assert!(fork.len() >= n, "{shape}: {} paths", fork.len());
        d.assert_closure_valid(&fork);
        let stock = eval(false, &flake.commit(shape, n, "new"));
        assert!(fork == stock, "{shape}: the Rust client printed other .drv paths than stock");

        let again = eval(true, &flake.commit(shape, n, "new"));
        let valid_stats = client_stats(&d);
        assert!(again == stock, "{shape}: the second evaluation printed other paths");
        for (state, client) in [("new", &new_stats), ("valid", &valid_stats)] {
            let waits = blocking_waits(client);
            eprintln!("{shape}, {state}: {waits} blocking waits for {} derivations: {client}", fork.len());
            assert!(waits <= 4, "{shape}, {state}: {waits} blocking waits: {client}");
        }
        assert_eq!(valid_stats["uploads"]["uploaded"], 1, "{shape}: only the new commit's source: {valid_stats}");
    }
}

/// `nix flake check --no-build`, which evaluates every package of the flake to its
/// .drv path (read-only, as stock does without building: it writes only the flake's
/// source), succeeds through the Rust client as through stock, with the same
/// derivations, and blocks only a few times.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[test]
fn flake_check_matches_stock() {
    require_fork();
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let mut flake = Flake::new(&d);
    let flake_ref = flake.commit("nixpkgs", 200, "check");
    let check = |fork: bool| -> Vec<String> {
        let out = nix(&d, fork, &["flake", "check", "--no-build", "-v", &flake_ref]);
        let what = format!("nix flake check (fork: {fork})");
        assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8(out.stderr).unwrap();
        let mut drvs: Vec<String> =
            stderr.lines().filter_map(|l| l.strip_prefix("derivation evaluated to ")).map(str::to_owned).collect();
        drvs.sort();
        drvs
    };
    let fork = check(true);
    let client = client_stats(&d);
    assert!(fork.len() >= 200, "{} derivations checked", fork.len());
    assert!(blocking_waits(&client) <= 4, "{client}");
    assert!(fork == check(false), "the Rust client checked other derivations than stock");
}

/// `nix derivation show --recursive` writes each .drv of a chain of packages and
/// reads every one of them back at once, as an evaluation worker does: the Rust
/// client serves those reads from the contents it holds, so no read waits for the
/// daemon, and the output is stock's.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[test]
fn reading_back_what_was_just_written_does_not_wait() {
    require_fork();
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let mut flake = Flake::new(&d);
    let n = 300;
    let installable = |r: &str| format!("{r}#packages.{SYSTEM}.pkg{}", n - 1);
    let show = |fork: bool, flake_ref: &str| {
        let out = nix(&d, fork, &["derivation", "show", "--recursive", &installable(flake_ref)]);
        let json: serde_json::Value = serde_json::from_str(&stdout(out, "nix derivation show")).unwrap();
        json
    };
    let fork = show(true, &flake.commit("nixpkgs", n, "read-back"));
    let client = client_stats(&d);
    let read_back = fork.as_object().unwrap().len();
    assert!(read_back > n, "only {read_back} derivations shown");
    // At most the flake source's own files, read where they are stored.
    assert!(client["uploads"]["pathWaits"].as_u64().unwrap() <= 1, "{client}");
    assert!(blocking_waits(&client) <= 4, "{client}");
    let stock = show(false, &flake.commit("nixpkgs", n, "read-back"));
    assert!(fork == stock, "the Rust client showed other derivations than stock");
}
