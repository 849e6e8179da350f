//! Generates Rust bindings for the fork's C API from its installed headers and links
//! the program against its libraries, both found with pkg-config (PKG_CONFIG_PATH
//! must name the fork's pkgconfig directory).

use std::collections::BTreeSet;
use std::path::PathBuf;

/// The C API's public headers this program uses.
const HEADERS: [&str; 5] = ["nix_api_util.h", "nix_api_store.h", "nix_api_expr.h", "nix_api_value.h", "nix_api_flake.h"];

/// The C API's libraries, as pkg-config names them (each brings nix-util-c along).
const PACKAGES: [&str; 3] = ["nix-store-c", "nix-expr-c", "nix-flake-c"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    let mut include_dirs = BTreeSet::new();
    let mut lib_dirs = BTreeSet::new();
    for package in PACKAGES {
        // Emits the link search paths and libraries for rustc.
        let lib = pkg_config::Config::new().probe(package).unwrap_or_else(|e| {
            panic!("pkg-config cannot find {package}; is PKG_CONFIG_PATH the fork's pkgconfig directory?\n{e}")
        });
        include_dirs.extend(lib.include_paths);
        lib_dirs.extend(lib.link_paths);
    }
    // Find the libraries at run time where they were found at link time, so that the
    // program runs without LD_LIBRARY_PATH.
    for dir in &lib_dirs {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }

    // Only the include directories: the packages' other flags are for C++ (-std=c++2a),
    // which clang refuses for a C header.
    let wrapper: String = HEADERS.iter().map(|h| format!("#include <{h}>\n")).collect();
    let bindings = bindgen::Builder::default()
        .header_contents("nix_c_api.h", &wrapper)
        .clang_args(include_dirs.iter().map(|dir| format!("-I{}", dir.display())))
        .allowlist_function("nix_.*")
        // Plain constants named as in C: NIX_OK, NIX_TYPE_STRING, ...
        .prepend_enum_name(false)
        // Reruns this script when a header it read changes.
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .unwrap_or_else(|e| panic!("bindgen failed on the C API's headers: {e}"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings.write_to_file(out.join("nix_c_api.rs")).expect("write the bindings");
}
