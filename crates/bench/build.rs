//! Link libpmemblk (the peer the engine is measured against). Debian:
//! `apt-get install libpmemblk-dev`.

fn main() {
    println!("cargo:rustc-link-lib=pmemblk");
    println!("cargo:rerun-if-changed=build.rs");
}
