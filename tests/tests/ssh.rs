//! `ssh-ng://` through a real OpenSSH server (in the trixie root, on 127.0.0.1) in front
//! of a real daemon: rust-store over `ssh`'s pipes, and the fork's `ssh-ng://` store
//! with each client.

use std::collections::BTreeSet;
use std::process::Output;
use std::time::{Duration, Instant};

use rust_store::Client;
use rust_store::transport::Transport;
use store_tests::ssh::{Relay, Sshd};
use store_tests::{COMMAND_LIMIT, Daemon, FORK_PREFIX, Flake, Nix, Trust, output_within, require_fork, wait_within};

const HOST: &str = "ssh-ng://root@127.0.0.1";

async fn connect(d: &Daemon, sshd: &Sshd, port: u16) -> (Client, u32) {
    let transport = Transport::spawn(sshd.ssh_command(port), HOST).expect("start ssh");
    let pid = transport.pid().unwrap();
    match Client::over(transport, d.options()).await {
        Ok(c) => (c, pid),
        Err(e) => panic!("handshake over ssh: {e}\nsshd log:\n{}\ndaemon log:\n{}", sshd.log(), d.log()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_store_pipelines_over_ssh() {
    let d = Daemon::start(Nix::V2_26, Trust::Trusted);
    let sshd = Sshd::start(&d);
    let relay = Relay::start(sshd.port, Duration::from_millis(10));
    let (c, _) = connect(&d, &sshd, relay.port).await;
    let before = relay.turns();
    let started = Instant::now();
    let mut calls = Vec::new();
    for i in 0..500 {
        calls.push(
            c.add_text(&format!("s{i}"), format!("over ssh {i}").into_bytes(), &BTreeSet::new()).start().await.unwrap(),
        );
    }
    let mut paths = BTreeSet::new();
    for call in calls {
        paths.insert(call.await.unwrap().path);
    }
    assert_eq!(c.query_valid_paths(&paths, false).await.unwrap(), paths);
    let turns = relay.turns() - before;
    println!("500 additions and a check at 10 ms: {:?}, {turns} turns", started.elapsed());
    // Pipelined: far fewer turns than requests (ssh's own window updates are turns too).
    assert!(turns < 100, "{turns} turns for 501 requests");
    let out = d.nix_ok(&["nix-store", "--check-validity", &d.store_dir.print(paths.iter().next().unwrap())]);
    assert!(out.is_empty());
}

/// Killing `ssh` fails every pending request within a second, naming the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_ssh_fails_pending_requests_naming_the_host() {
    let d = Daemon::start(Nix::V2_26, Trust::Trusted);
    let sshd = Sshd::start(&d);
    let (c, ssh) = connect(&d, &sshd, sshd.port).await;
    let took = store_tests::pending_fail_when_killed(&d, &c, ssh, HOST).await;
    println!("300 pending requests failed {took:?} after the kill");
}

/// A refused key fails the connection naming the host, at once.
#[tokio::test]
async fn a_refused_login_names_the_host() {
    let d = Daemon::start(Nix::V2_26, Trust::Trusted);
    let sshd = Sshd::start(&d);
    std::fs::write(d.host_path("ssh/authorized_keys"), "").unwrap();
    let transport = Transport::spawn(sshd.ssh_command(sshd.port), HOST).unwrap();
    let e = tokio::time::timeout(Duration::from_secs(20), Client::over(transport, d.options()))
        .await
        .expect("hung on a refused login")
        .err()
        .expect("logged in without a key");
    assert!(e.to_string().contains(HOST), "{e}");
}

fn instantiate(d: &Daemon, sshd: &Sshd, port: u16, program: &str, client: &str, n: usize, salt: &str) -> Output {
    let file = d.workload();
    let cmd = sshd.client_command(
        d,
        port,
        &[("NIX_DAEMON_CLIENT", client)],
        &[program, "--store", &sshd.store_uri(), &file, "--arg", "n", &n.to_string(), "--argstr", "salt", salt],
    );
    output_within(cmd, COMMAND_LIMIT)
}

fn ok(out: Output, what: &str) -> Vec<String> {
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
}

/// `nix-instantiate --store ssh-ng://…`: the fork's Rust client writes what its C++
/// client and Debian's nix-bin write, with far fewer turns.
#[test]
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
fn the_fork_evaluates_over_ssh_ng_with_each_client() {
    require_fork();
    let d = Daemon::start(Nix::V2_26, Trust::Trusted);
    let sshd = Sshd::start(&d);
    let relay = Relay::start(sshd.port, Duration::from_millis(2));
    let fork = format!("{FORK_PREFIX}/bin/nix-instantiate");
    let mut results = Vec::new();
    for (program, client, salt) in
        [("/usr/bin/nix-instantiate", "cxx", "a"), (&*fork, "cxx", "b"), (&*fork, "rust", "c"), (&*fork, "rust", "a")]
    {
        let before = relay.turns();
        let paths = ok(instantiate(&d, &sshd, relay.port, program, client, 200, salt), program);
        let turns = relay.turns() - before;
        println!("{program} ({client}), salt {salt}: {} paths, {turns} turns", paths.len());
        d.assert_closure_valid(&paths);
        results.push((salt, paths, turns));
    }
    // The same salt gives the same paths, whoever wrote them.
    assert_eq!(results[0].1, results[3].1);
    // Two turns per derivation and more for the C++ clients; few for the Rust client.
    assert!(results[2].2 * 10 < results[1].2, "rust {} vs cxx {} turns", results[2].2, results[1].2);
}

/// Starts the fork's `nix-instantiate --store ssh-ng://…` of the workload with the Rust
/// client, reaching sshd at `port`, and waits until its `ssh` runs and `ready()` holds;
/// returns the command, for the caller to wait for, and the pid of its `ssh`.
#[allow(clippy::zombie_processes)]
fn evaluate_over_ssh(
    d: &Daemon,
    sshd: &Sshd,
    port: u16,
    n: &str,
    salt: &str,
    ready: impl Fn() -> bool,
) -> (std::process::Child, u32) {
    let program = format!("{FORK_PREFIX}/bin/nix-instantiate");
    let child = sshd
        .client_command(
            d,
            port,
            &[("NIX_DAEMON_CLIENT", "rust")],
            &[&program, "--store", &sshd.store_uri(), &d.workload(), "--arg", "n", n, "--argstr", "salt", salt],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "the evaluation did not start");
        let ssh = store_tests::children_of(child.id())
            .into_iter()
            .flat_map(|p| std::iter::once(p).chain(store_tests::children_of(p)))
            .find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "ssh"));
        if let Some(ssh) = ssh
            && ready()
        {
            return (child, ssh);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills `ssh` and checks that the evaluation fails soon, naming the host.
fn kill_ssh_and_expect_the_host_named(child: std::process::Child, ssh: u32) {
    let killed = Instant::now();
    store_tests::kill(ssh);
    let out = wait_within(child, Duration::from_secs(60), "nix-instantiate over ssh");
    let elapsed = killed.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("the evaluation ended {elapsed:?} after ssh was killed: {stderr}");
    assert!(!out.status.success());
    assert!(stderr.contains("root@127.0.0.1"), "{stderr}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

/// Killing `ssh` mid-evaluation ends the evaluation with an error naming the host.
#[test]
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
fn killing_ssh_mid_evaluation_fails_naming_the_host() {
    require_fork();
    let d = Daemon::start(Nix::V2_26, Trust::Trusted);
    let sshd = Sshd::start(&d);
    // Once the evaluation is under way (its first additions are in the store),
    // stopped workers leave every request pending.
    let (child, ssh) = evaluate_over_ssh(&d, &sshd, sshd.port, "3000", "kill", || !d.workers().is_empty());
    std::thread::sleep(Duration::from_millis(300));
    d.stop_workers();
    std::thread::sleep(Duration::from_millis(200));
    kill_ssh_and_expect_the_host_named(child, ssh);
}

/// A closure of `groups` × 50 leaves under groups under a top path, added directly;
/// returns the top path, printed.
async fn closure(d: &Daemon, groups: usize) -> String {
    let c = d.connect().await;
    let mut tops = BTreeSet::new();
    for g in 0..groups {
        let mut leaves = BTreeSet::new();
        for j in 0..50 {
            leaves.insert(
                c.add_text(&format!("leaf-{g}-{j}"), format!("leaf {g} {j}").into_bytes(), &BTreeSet::new())
                    .await
                    .unwrap()
                    .path,
            );
        }
        let text: Vec<String> = leaves.iter().map(|p| d.store_dir.print(p)).collect();
        tops.insert(c.add_text(&format!("group-{g}"), text.join("\n").into_bytes(), &leaves).await.unwrap().path);
    }
    let text: Vec<String> = tops.iter().map(|p| d.store_dir.print(p)).collect();
    d.store_dir.print(&c.add_text("top", text.join("\n").into_bytes(), &tops).await.unwrap().path)
}

/// `nix path-info -r --store ssh-ng://…` of a closure: the Rust client asks for the
/// paths' infos without waiting for each, level by level, and prints what nix-bin
/// prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
async fn the_fork_queries_a_closure_over_ssh_ng_level_by_level() {
    require_fork();
    let d = Daemon::start(Nix::V2_26, Trust::Trusted);
    let top = closure(&d, 10).await;
    let sshd = Sshd::start(&d);
    let relay = Relay::start(sshd.port, Duration::from_millis(10));
    let fork = format!("{FORK_PREFIX}/bin/nix");
    let mut outputs = Vec::new();
    for (program, client) in [("/usr/bin/nix", "cxx"), (&*fork, "rust")] {
        let started = Instant::now();
        let cmd = sshd.client_command(
            &d,
            relay.port,
            &[("NIX_DAEMON_CLIENT", client)],
            &[
                program,
                "--extra-experimental-features",
                "nix-command",
                "path-info",
                "-r",
                "--store",
                &sshd.store_uri(),
                &top,
            ],
        );
        let out = output_within(cmd, COMMAND_LIMIT);
        let paths = ok(out, program);
        println!("{program} ({client}): {} paths in {:?}", paths.len(), started.elapsed());
        outputs.push((paths, started.elapsed()));
    }
    assert_eq!(outputs[0].0.len(), 511);
    assert_eq!(outputs[0].0, outputs[1].0);
}

/// An ssh-ng:// store that cannot be reached, or that refuses the key, fails the
/// first write naming the host, with either of the fork's clients.
#[test]
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
fn an_unreachable_or_refusing_host_is_named_by_either_client() {
    require_fork();
    let d = Daemon::start(Nix::V2_26, Trust::Trusted);
    let sshd = Sshd::start(&d);
    let program = format!("{FORK_PREFIX}/bin/nix-instantiate");
    let write = ["--eval", "--read-write-mode", "-E", "builtins.toFile \"x\" \"y\""];
    // Port 1 on loopback: nobody listens.
    for (what, port, ssh_says) in
        [("unreachable", 1, "Connection refused"), ("refused", sshd.port, "Permission denied")]
    {
        if what == "refused" {
            std::fs::write(d.host_path("ssh/authorized_keys"), "").unwrap();
        }
        for client in ["rust", "cxx"] {
            let mut args = vec![program.as_str(), "--store"];
            let uri = sshd.store_uri();
            args.push(&uri);
            args.extend(write);
            let started = Instant::now();
            let out =
                output_within(sshd.client_command(&d, port, &[("NIX_DAEMON_CLIENT", client)], &args), COMMAND_LIMIT);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{what} ({client}): succeeded");
            assert!(stderr.contains("root@127.0.0.1") && stderr.contains(ssh_says), "{what} ({client}): {stderr}");
            assert!(started.elapsed() < Duration::from_secs(30), "{what} ({client}) took {:?}", started.elapsed());
        }
    }
}

/// The Rust client makes an `ssh-ng://` store's connection in the background: the
/// evaluation goes on meanwhile, its additions held for the connection, which gets
/// them in order once made. Through a relay adding 100 ms per round trip (ssh's
/// setup takes a dozen), the evaluation's additions come while it is being made,
/// and the result is that of the C++ client, which waits for the connection.
#[test]
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
fn evaluation_goes_on_while_ssh_connects() {
    require_fork();
    let d = Daemon::start(Nix::V2_26, Trust::Trusted);
    let sshd = Sshd::start(&d);
    let relay = Relay::start(sshd.port, Duration::from_millis(100));
    let fork = format!("{FORK_PREFIX}/bin/nix-instantiate");
    let stats = d.inner_path("stats.json");
    let file = d.workload();
    let mut printed = Vec::new();
    for (client, salt) in [("rust", "early"), ("cxx", "early"), ("rust", "early-new")] {
        let cmd = sshd.client_command(
            &d,
            relay.port,
            &[("NIX_DAEMON_CLIENT", client), ("NIX_SHOW_STATS", "1"), ("NIX_SHOW_STATS_PATH", &stats)],
            &[&fork, "--store", &sshd.store_uri(), &file, "--arg", "n", "100", "--argstr", "salt", salt],
        );
        let paths = ok(output_within(cmd, COMMAND_LIMIT), client);
        d.assert_closure_valid(&paths);
        if client == "rust" {
            let s: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.host_path("stats.json")).unwrap()).unwrap();
            let held = s["daemonClient"]["heldWhileConnecting"].as_u64().unwrap_or(0);
            println!("salt {salt}: {held} held while connecting; {}", s["daemonClient"]);
            assert!(held > 0, "nothing was held while ssh connected: {}", s["daemonClient"]);
        }
        printed.push(paths);
    }
    assert_eq!(printed[0], printed[1], "the Rust and the C++ client wrote other paths");
}

/// While the connection is being made in the background, an evaluation reads back a
/// file it has just added (here the store's host shares this file system, as with
/// `ssh-ng://localhost`, so the read waits for that file's addition), and asks the
/// daemon about a path it did not add (which waits for the connection). What was
/// held reaches the daemon; each client prints the same.
#[test]
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
fn reads_and_queries_while_ssh_connects() {
    require_fork();
    let d = Daemon::start(Nix::V2_26, Trust::Trusted);
    let sshd = Sshd::start(&d);
    let relay = Relay::start(sshd.port, Duration::from_millis(50));
    let fork = format!("{FORK_PREFIX}/bin/nix-instantiate");
    let eval = |client: &str, expr: &str| {
        let cmd = sshd.client_command(
            &d,
            relay.port,
            &[("NIX_DAEMON_CLIENT", client)],
            &[&fork, "--store", &sshd.store_uri(), "--eval", "--read-write-mode", "-E", expr],
        );
        let out = ok(output_within(cmd, COMMAND_LIMIT), client);
        out.concat().trim_matches('"').to_owned()
    };
    let existing = eval("cxx", r#"builtins.toFile "existing.nix" "40""#);
    for client in ["rust", "cxx"] {
        let expr = format!(
            r#"let held = builtins.toFile "held-{client}.nix" "1";
               in "${{held}} ${{toString (import held + import (builtins.storePath "{existing}"))}}""#
        );
        let out = eval(client, &expr);
        let (held, sum) = out.split_once(' ').unwrap_or_else(|| panic!("{client}: printed {out}"));
        assert_eq!(sum, "41", "{client}");
        d.nix_ok(&["nix-store", "--check-validity", held]);
    }
}

/// Killing `ssh` while the connection is still being made in the background (a
/// relay adds 200 ms per round trip, so it takes seconds) fails the evaluation,
/// whose additions were held, with an error naming the host, instead of a hang.
#[test]
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
fn killing_ssh_while_it_connects_fails_naming_the_host() {
    require_fork();
    let d = Daemon::start(Nix::V2_26, Trust::Trusted);
    let sshd = Sshd::start(&d);
    let relay = Relay::start(sshd.port, Duration::from_millis(200));
    let (child, ssh) = evaluate_over_ssh(&d, &sshd, relay.port, "100", "connecting", || true);
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.workers().is_empty(), "the connection was made already");
    kill_ssh_and_expect_the_host_named(child, ssh);
}

/// `nix eval` of a flake over `ssh-ng://`: the fetcher reads the source it has just
/// added where the store keeps it, on this file system (which the store's host
/// shares here; stock 2.26.3 reads flakes over `ssh-ng://` no other way), so that
/// read waits for the source's addition, over a connection made in the background.
/// Both clients print the same derivations, and the Rust client's are valid.
#[test]
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
fn the_fork_evaluates_a_flake_over_ssh_ng_with_each_client() {
    require_fork();
    let d = Daemon::start(Nix::V2_26, Trust::Trusted);
    let sshd = Sshd::start(&d);
    let relay = Relay::start(sshd.port, Duration::from_millis(10));
    let mut flake = Flake::new(&d);
    let nix = format!("{FORK_PREFIX}/bin/nix");
    let mut printed = Vec::new();
    for client in ["rust", "cxx"] {
        // A path: reference, as root runs the command and the repository is the
        // client user's, which git refuses.
        let reference = flake.commit("workload", 200, "ssh").replace("git+file://", "path:");
        let target = format!("{reference}#drvPaths");
        let uri = sshd.store_uri();
        let args =
            [&nix, "--extra-experimental-features", "nix-command flakes", "eval", "--json", "--store", &uri, &target];
        let cmd = sshd.client_command(&d, relay.port, &[("NIX_DAEMON_CLIENT", client)], &args);
        let out = ok(output_within(cmd, COMMAND_LIMIT), client);
        let paths: Vec<String> = serde_json::from_str(&out.concat()).unwrap();
        assert!(paths.len() >= 200, "{client}: {} paths", paths.len());
        d.assert_closure_valid(&paths);
        printed.push(paths);
    }
    assert_eq!(printed[0], printed[1], "the Rust and the C++ client printed other derivations");
}
