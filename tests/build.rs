//! Marks the tests of the fork as ignored, visibly, when the fork is not built, unless
//! NIXRS_REQUIRE_FORK is set (as `tools/check` sets it), in which case they run and
//! fail. Looks where `store_tests::cache_dir` does.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(fork_missing)");
    for var in ["NIXRS_CACHE", "XDG_CACHE_HOME", "HOME", "NIXRS_REQUIRE_FORK"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let cache = match std::env::var_os("NIXRS_CACHE") {
        Some(d) => PathBuf::from(d),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"))
            .join("nixrs"),
    };
    let nix = cache.join("trixie/opt/nix-fork/bin/nix");
    // A path that does not exist makes cargo run this again every build, so building
    // the fork is noticed; once it exists, its changes are.
    println!("cargo::rerun-if-changed={}", nix.display());
    if !nix.exists() && std::env::var_os("NIXRS_REQUIRE_FORK").is_none() {
        println!("cargo::rustc-cfg=fork_missing");
    }
}
