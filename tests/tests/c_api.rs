//! The fork's C API used from Rust through bindgen (`tests/c-api-consumer/`), the
//! way a program embedding Nix uses it: run as the non-root client user, it opens the
//! default store, which is the daemon through the Rust client, evaluates a
//! derivation's `drvPath` and gets what the fork's CLI gets.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use store_tests::{Daemon, FORK_PREFIX, Flake, Nix, Trust, client_user, nix_root, require_fork};

/// The consumer's sources in this repository.
const CONSUMER_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/c-api-consumer");

/// Where the consumer is built inside the trixie root: the copied sources, cargo's
/// home (the registry's downloads) and the target directory all stay there between
/// runs, so that later builds are incremental and need no downloads.
const BUILD_DIR: &str = "/build/c-api-consumer";

const EXPR: &str = r#"(derivation { name = "c-api"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; }).drvPath"#;

/// Copies the files under `from` to `to`, skipping any `target` directory, and
/// rewriting only files whose contents differ (cargo decides what to rebuild by
/// modification times).
fn sync_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let entry = entry.expect("read a directory entry");
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().expect("file type").is_dir() {
            if entry.file_name() != "target" {
                sync_tree(&src, &dst);
            }
        } else {
            sync_file(&src, &dst);
        }
    }
}

fn sync_file(src: &Path, dst: &Path) {
    let contents = std::fs::read(src).unwrap_or_else(|e| panic!("read {}: {e}", src.display()));
    if std::fs::read(dst).ok().as_ref() != Some(&contents) {
        std::fs::write(dst, contents).unwrap_or_else(|e| panic!("write {}: {e}", dst.display()));
    }
}

/// The host's certificate authorities, which the registry's downloads may need (a
/// local proxy's authority is in the host's bundle, not in the root's own).
fn host_ca_bundle() -> Option<PathBuf> {
    ["CARGO_HTTP_CAINFO", "SSL_CERT_FILE"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .chain([PathBuf::from("/etc/ssl/certs/ca-certificates.crt")])
        .find(|p| p.is_file())
}

/// Builds the consumer inside the trixie root with Debian's cargo, against the
/// fork's C API; returns the program's path as the root sees it.
fn build_consumer() -> String {
    let root = nix_root(Nix::V2_26);
    let host_dir = root.join(BUILD_DIR.trim_start_matches('/'));
    sync_tree(Path::new(CONSUMER_SRC), &host_dir.join("crate"));

    let mut cmd = Command::new("chroot");
    cmd.arg(&root)
        .arg("/usr/bin/env")
        .arg("-i")
        .arg("PATH=/usr/bin:/bin")
        .arg("HOME=/root")
        .arg(format!("CARGO_HOME={BUILD_DIR}/cargo-home"))
        .arg(format!("CARGO_TARGET_DIR={BUILD_DIR}/target"))
        .arg(format!("PKG_CONFIG_PATH={FORK_PREFIX}/lib/x86_64-linux-gnu/pkgconfig"));
    if let Some(bundle) = host_ca_bundle() {
        sync_file(&bundle, &host_dir.join("ca-certificates.crt"));
        cmd.arg(format!("CARGO_HTTP_CAINFO={BUILD_DIR}/ca-certificates.crt"));
    }
    cmd.args(["cargo", "build", "--locked", "--manifest-path", &format!("{BUILD_DIR}/crate/Cargo.toml")]);

    let started = Instant::now();
    let out = cmd.output().expect("run cargo in the trixie root");
    assert!(
        out.status.success(),
        "building the consumer in the root failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("built c-api-consumer in the root in {:.1?}", started.elapsed());
    format!("{BUILD_DIR}/target/debug/c-api-consumer")
}

/// The value of the line `NAME: VALUE` in the consumer's stderr.
fn field<'a>(stderr: &'a str, name: &str) -> &'a str {
    stderr
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
        .unwrap_or_else(|| panic!("no '{name}:' line in the consumer's stderr:\n{stderr}"))
}

#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[test]
fn c_api_consumer_evaluates_through_the_rust_client() {
    require_fork();
    let consumer = build_consumer();
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let user = client_user();

    // The consumer, through the default store and the default client.
    let out = d.run_as(user, &[], &[&consumer, EXPR]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("the consumer's stderr:\n{stderr}");
    assert!(out.status.success(), "the consumer failed ({}):\n{stderr}\ndaemon log:\n{}", out.status, d.log());
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 output");
    let drv = stdout.strip_suffix('\n').unwrap_or(&stdout);
    eprintln!("the consumer's stdout: {drv}");

    // `auto` chose the daemon, and the Rust client's runtime served it.
    let uri = field(&stderr, "store");
    assert!(
        uri == "daemon" || uri == format!("unix://{}", d.inner_path("socket")),
        "the consumer opened '{uri}', not the daemon:\n{stderr}"
    );
    let threads: usize = field(&stderr, "rust-client-threads")
        .parse()
        .unwrap_or_else(|e| panic!("rust-client-threads is not a number ({e}):\n{stderr}"));
    assert!(threads > 0, "no thread of the Rust client in the consumer:\n{stderr}");

    // A .drv path of the daemon's store, which the consumer's evaluation wrote there.
    let path = d.store_dir.parse(drv).unwrap_or_else(|e| panic!("'{drv}' is not a store path ({e}):\n{stderr}"));
    assert_eq!(path.name(), "c-api.drv", "{stderr}");
    d.nix_ok(&["nix-store", "--check-validity", drv]);

    // A control: with the fork's C++ client, the same answer and no such thread.
    let cxx = d.run_as(user, &[("NIX_DAEMON_CLIENT", "cxx")], &[&consumer, EXPR]);
    let cxx_stderr = String::from_utf8_lossy(&cxx.stderr);
    assert!(cxx.status.success(), "the consumer failed with the C++ client ({}):\n{cxx_stderr}", cxx.status);
    assert_eq!(String::from_utf8_lossy(&cxx.stdout), stdout, "{cxx_stderr}");
    assert_eq!(field(&cxx_stderr, "rust-client-threads"), "0", "{cxx_stderr}");

    // The fork's CLI gives the same answer (impure: `nix eval` evaluates purely by
    // default, without builtins.currentSystem; the C API does not).
    let nix = format!("{FORK_PREFIX}/bin/nix");
    let cli = d.run_as(
        user,
        &[],
        &[&nix, "--extra-experimental-features", "nix-command", "eval", "--impure", "--raw", "--expr", EXPR],
    );
    let cli_stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(cli.status.success(), "nix eval failed ({}):\n{cli_stderr}", cli.status);
    let cli_drv = String::from_utf8(cli.stdout).expect("UTF-8 output");
    assert_eq!(cli_drv, drv, "the CLI and the consumer disagree; the consumer's stderr:\n{stderr}");
}

/// The consumer evaluates a flake's outputs through the C API's flake support
/// (libflake-c's `nix_flake_init_global`, then `builtins.getFlake`), as an
/// evaluation worker on the C API does: through the Rust client, the derivations
/// the CLI prints, each written to the daemon's store with its closure.
#[cfg_attr(fork_missing, ignore = "the fork is not built: run tools/build-fork")]
#[test]
fn c_api_consumer_evaluates_a_flake_through_the_rust_client() {
    require_fork();
    let consumer = build_consumer();
    let d = Daemon::start(Nix::V2_26, Trust::Untrusted);
    let user = client_user();
    let mut flake = Flake::new(&d);
    let flake_ref = flake.commit("nixpkgs", 100, "c-api");
    let features = ("NIX_CONFIG", "experimental-features = nix-command flakes");
    let expr = format!(r#"builtins.concatStringsSep "\n" (builtins.getFlake "{flake_ref}").drvPaths"#);

    let out = d.run_as(user, &[features], &[&consumer, &expr]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the consumer failed ({}):\n{stderr}\ndaemon log:\n{}", out.status, d.log());
    assert_ne!(field(&stderr, "rust-client-threads"), "0", "{stderr}");
    let drvs: Vec<String> = String::from_utf8(out.stdout).expect("UTF-8 output").lines().map(str::to_owned).collect();
    assert!(drvs.len() >= 100, "{} paths:\n{stderr}", drvs.len());

    // Written: every printed .drv is valid, with its closure.
    d.assert_closure_valid(&drvs);

    // The same derivations as the fork's CLI.
    let nix = format!("{FORK_PREFIX}/bin/nix");
    let cli = d.run_as(user, &[features], &[&nix, "eval", "--json", &format!("{flake_ref}#drvPaths")]);
    let cli_stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(cli.status.success(), "nix eval failed ({}):\n{cli_stderr}", cli.status);
    let cli_drvs: Vec<String> = serde_json::from_slice(&cli.stdout).expect("a JSON list");
    assert!(cli_drvs == drvs, "the CLI and the consumer disagree; the consumer's stderr:\n{stderr}");
}
