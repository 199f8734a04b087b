//! The build script of every workspace crate that links libtorch: its binaries (the CLI, tests,
//! benches) find libtorch at run time without `LD_LIBRARY_PATH`, and keep libtorch_cuda even
//! though no symbol of it is referenced.

use std::path::Path;

pub fn main() {
    // Set by torch-sys (`links = "tch"`) for crates that depend on it directly; absent only when
    // a crate is built without libtorch (the reward crate without its `local` feature).
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // rustc links with --as-needed, which drops libtorch_cuda: nothing calls it directly, it
    // registers the CUDA backend from its static initialisers.
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    println!("cargo:rustc-env=PSO_LIBTORCH_LIB={lib}");
}
