//! Links libtorch like every pso crate (rpath, libtorch_cuda kept) and compiles the c10d bridge
//! against the headers of that same libtorch.

#[path = "../link-libtorch.rs"]
mod link_libtorch;

use std::path::PathBuf;

fn main() {
    link_libtorch::main();
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports where libtorch is"),
    );
    let include = lib
        .parent()
        .expect("libtorch/lib has a parent")
        .join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    println!("cargo:rerun-if-changed=cxx");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("cxx/bridge.cpp")
        .include("cxx/gloo-stub")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .define("USE_C10D_GLOO", None)
        .define("GLOG_USE_GLOG_EXPORT", None)
        .warnings(false);
    match nccl_includes(&include) {
        Some(dirs) => {
            for dir in &dirs {
                println!("cargo:rerun-if-changed={}", dir.display());
                build.include(dir);
            }
            build
                .define("USE_C10D_NCCL", None)
                .define("PSO_WITH_NCCL", None);
        }
        None => println!(
            "cargo:warning=no CUDA/NCCL headers beside libtorch or in CUDA_HOME: the c10d \
             bridge is built with Gloo only (scripts/setup.sh installs the headers)"
        ),
    }
    build.compile("pso_c10d");
}

/// The include folders ProcessGroupNCCL.hpp needs (the CUDA runtime with its crt/ and CCCL's
/// nv/target, and nccl.h): the NVIDIA wheels beside a pip-installed torch, or `CUDA_HOME`.
fn nccl_includes(torch_include: &std::path::Path) -> Option<Vec<PathBuf>> {
    let complete = |cuda: &PathBuf, nccl: &PathBuf| {
        cuda.join("cuda_runtime_api.h").is_file()
            && cuda.join("crt/host_config.h").is_file()
            && cuda.join("nv/target").is_file()
            && nccl.join("nccl.h").is_file()
    };
    // torch/include → site-packages/nvidia/{cu13,nccl}/include
    let site = torch_include.parent()?.parent()?.join("nvidia");
    let wheels = (site.join("cu13/include"), site.join("nccl/include"));
    if complete(&wheels.0, &wheels.1) {
        return Some(vec![wheels.0, wheels.1]);
    }
    let home = PathBuf::from(std::env::var_os("CUDA_HOME")?).join("include");
    complete(&home, &home).then(|| vec![home])
}
