//! Link settings for the `reward` crate's tests: find libtorch at run time without
//! `LD_LIBRARY_PATH`, as the root crate's build.rs does for `pso`.

use std::path::Path;

fn main() {
    // Set by torch-sys (`links = "tch"`) for crates that depend on it directly.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report its libtorch directory; run scripts/setup.sh");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // rustc links with --as-needed, which drops libtorch_cuda: nothing calls it directly, it
    // registers the CUDA backend from its static initialisers.
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
