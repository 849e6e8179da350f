fn main() {
    cxx_build::bridge("src/lib.rs").include("include").std("c++17").compile("nix_store_bridge_cxx");
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=include/nix-store-bridge-logger.hh");
}
