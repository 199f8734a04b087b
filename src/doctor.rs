//! `pso doctor`: what libtorch this binary runs on, and which devices it can use.

use std::path::{Path, PathBuf};

use anyhow::Context;

use serde::Serialize;

/// One CUDA device as the driver describes it.
#[derive(Debug, Clone, Serialize)]
pub struct CudaDevice {
    /// Ordinal.
    pub index: usize,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// Native bf16 matmul (compute capability ≥ 8.0).
    pub bf16: bool,
}

/// Everything `pso doctor` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Version of the PyTorch install libtorch was loaded from (from its `version.py`).
    pub libtorch_version: Option<String>,
    /// Directory libtorch was loaded from at run time.
    pub libtorch_loaded_from: Option<PathBuf>,
    /// Directory the binary was linked against.
    pub libtorch_linked_at: PathBuf,
    /// Whether libtorch_cuda is loaded into this process.
    pub libtorch_cuda_loaded: bool,
    /// `torch::cuda::is_available()`.
    pub cuda_available: bool,
    /// Devices libtorch can use.
    pub cuda_device_count: i64,
    /// Their descriptions (from the CUDA driver).
    pub cuda_devices: Vec<CudaDevice>,
    /// cuDNN available.
    pub cudnn_available: bool,
    /// Whether the CPU has native bf16 instructions (AVX512-BF16 or AMX-BF16); without them
    /// bf16 on CPU works but is slow.
    pub cpu_bf16_native: bool,
    /// Intra-op threads libtorch uses.
    pub torch_threads: i32,
    /// Logical CPUs of this machine.
    pub cpus: usize,
    /// libtorch built with MKL / OpenMP.
    pub mkl: bool,
    /// libtorch built with OpenMP.
    pub openmp: bool,
    /// The data-parallel launch this process belongs to (torchrun's or Slurm's variables), or
    /// why those variables do not make one; `null` when none are set.
    pub launch: Option<String>,
    /// The c10d process groups this binary was built with ("gloo", and "nccl" when the CUDA
    /// and NCCL headers were there at build time).
    pub dist_backends: Vec<&'static str>,
    /// What the `--config` run needs in GPU memory.
    pub memory: Option<pso::memory::MemoryEstimate>,
}

/// Paths of the shared objects mapped into this process whose file name contains `needle`.
fn loaded_library(needle: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            std::path::Path::new(p)
                .file_name()
                .is_some_and(|f| f.to_string_lossy().contains(needle))
        })
        .map(PathBuf::from)
}

/// Reads `__version__` from the `version.py` of the torch package that holds `lib_dir`.
fn torch_version(lib_dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(lib_dir.parent()?.join("version.py")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim().trim_matches('\'').trim_matches('"').to_owned())
}

fn cpu_bf16_native() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines().filter(|l| l.starts_with("flags")).any(|l| {
                l.split_whitespace()
                    .any(|f| f == "avx512_bf16" || f == "amx_bf16")
            })
        })
        .unwrap_or(false)
}

/// Describes CUDA devices through the driver API (libtorch exposes no device names).
fn cuda_devices(count: i64) -> Vec<CudaDevice> {
    // SAFETY: the CUDA driver API is called with the documented signatures; every buffer is
    // sized as the call requires, and results are read only on success (return code 0).
    unsafe {
        let Ok(lib) = libloading::Library::new("libcuda.so.1") else {
            return Vec::new();
        };
        type Init = unsafe extern "C" fn(u32) -> i32;
        type Get = unsafe extern "C" fn(*mut i32, i32) -> i32;
        type Name = unsafe extern "C" fn(*mut std::ffi::c_char, i32, i32) -> i32;
        type Attr = unsafe extern "C" fn(*mut i32, i32, i32) -> i32;
        type Mem = unsafe extern "C" fn(*mut usize, i32) -> i32;
        let (Ok(init), Ok(get), Ok(name), Ok(attr), Ok(mem)) = (
            lib.get::<Init>(b"cuInit"),
            lib.get::<Get>(b"cuDeviceGet"),
            lib.get::<Name>(b"cuDeviceGetName"),
            lib.get::<Attr>(b"cuDeviceGetAttribute"),
            lib.get::<Mem>(b"cuDeviceTotalMem_v2"),
        ) else {
            return Vec::new();
        };
        if init(0) != 0 {
            return Vec::new();
        }
        const CC_MAJOR: i32 = 75;
        const CC_MINOR: i32 = 76;
        (0..count.max(0) as usize)
            .filter_map(|index| {
                let mut dev = 0;
                if get(&mut dev, index as i32) != 0 {
                    return None;
                }
                let mut buf = [0 as std::ffi::c_char; 256];
                if name(buf.as_mut_ptr(), buf.len() as i32, dev) != 0 {
                    return None;
                }
                let device_name = std::ffi::CStr::from_ptr(buf.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                let (mut major, mut minor, mut bytes) = (0, 0, 0usize);
                attr(&mut major, CC_MAJOR, dev);
                attr(&mut minor, CC_MINOR, dev);
                mem(&mut bytes, dev);
                Some(CudaDevice {
                    index,
                    name: device_name,
                    compute_capability: (major, minor),
                    memory_bytes: bytes as u64,
                    bf16: major >= 8,
                })
            })
            .collect()
    }
}

/// Gathers the report.
pub fn report() -> Report {
    let cuda_available = tch::Cuda::is_available();
    let cuda_device_count = tch::Cuda::device_count();
    let loaded = loaded_library("libtorch_cpu.so");
    let loaded_dir = loaded.as_ref().and_then(|p| p.parent().map(PathBuf::from));
    let linked = PathBuf::from(env!("PSO_LIBTORCH_LIB"));
    Report {
        libtorch_version: torch_version(loaded_dir.as_deref().unwrap_or(&linked)),
        libtorch_loaded_from: loaded_dir,
        libtorch_linked_at: linked,
        libtorch_cuda_loaded: loaded_library("libtorch_cuda.so").is_some(),
        cuda_available,
        cuda_device_count,
        cuda_devices: if cuda_available {
            cuda_devices(cuda_device_count)
        } else {
            Vec::new()
        },
        cudnn_available: tch::Cuda::cudnn_is_available(),
        cpu_bf16_native: cpu_bf16_native(),
        torch_threads: tch::get_num_threads(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        mkl: tch::utils::has_mkl(),
        openmp: tch::utils::has_openmp(),
        dist_backends: if dist::nccl_built() {
            vec!["gloo", "nccl"]
        } else {
            vec!["gloo"]
        },
        memory: None,
        launch: match dist::Launch::from_env() {
            Ok(None) => None,
            Ok(Some(l)) => Some(format!(
                "rank {} of {} (local {} of {}), rendezvous {}:{}",
                l.rank,
                l.world_size,
                l.local_rank,
                l.local_world_size,
                l.master_addr,
                l.master_port
            )),
            Err(e) => Some(format!("invalid: {e}")),
        },
    }
}

impl Report {
    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        let mut lines = vec![
            format!(
                "libtorch        {}",
                self.libtorch_version.as_deref().unwrap_or("unknown")
            ),
            format!(
                "loaded from     {}",
                self.libtorch_loaded_from
                    .as_ref()
                    .map_or("unknown".into(), |p| p.display().to_string())
            ),
            format!("linked at       {}", self.libtorch_linked_at.display()),
            format!(
                "libtorch_cuda   {}",
                if self.libtorch_cuda_loaded {
                    "loaded"
                } else {
                    "not loaded (CPU-only libtorch, or linked without it)"
                }
            ),
            format!("CUDA available  {}", yes(self.cuda_available)),
            format!("CUDA devices    {}", self.cuda_device_count),
        ];
        for d in &self.cuda_devices {
            lines.push(format!(
                "  cuda:{}        {}, compute {}.{}, {:.1} GiB, bf16 {}",
                d.index,
                d.name,
                d.compute_capability.0,
                d.compute_capability.1,
                d.memory_bytes as f64 / (1u64 << 30) as f64,
                yes(d.bf16)
            ));
        }
        lines.extend([
            format!("cuDNN           {}", yes(self.cudnn_available)),
            format!(
                "bf16 on CPU     {}",
                if self.cpu_bf16_native {
                    "native"
                } else {
                    "emulated (slow): use f32 on this CPU"
                }
            ),
            format!(
                "threads         {} libtorch threads on {} CPUs",
                self.torch_threads, self.cpus
            ),
            format!("MKL / OpenMP    {} / {}", yes(self.mkl), yes(self.openmp)),
            format!(
                "data-parallel   {}",
                self.launch
                    .as_deref()
                    .unwrap_or("one process (no RANK / WORLD_SIZE: not launched by torchrun)")
            ),
            format!(
                "c10d backends   {} (NCCL on GPUs, Gloo on the CPU; PSO_DIST_BACKEND chooses)",
                self.dist_backends.join(", ")
            ),
        ]);
        let mut text = lines.join("\n") + "\n";
        if let Some(m) = &self.memory {
            let devices: Vec<(String, u64)> = self
                .cuda_devices
                .iter()
                .map(|d| (format!("cuda:{}", d.index), d.memory_bytes))
                .collect();
            text += "memory of the run (one process)\n";
            text += &m.to_text(&devices);
        }
        text
    }
}

/// Prints the report, as JSON when `json`; with a run config, its memory estimate too.
pub fn run(json: bool, config: Option<&Path>, sets: &[String]) -> anyhow::Result<()> {
    let mut report = report();
    if let Some(path) = config {
        let config = pso::config::RunConfig::load(path, sets)?;
        let root = hf::hub::local_model(&config.model.id).with_context(|| {
            format!(
                "model.id {}: not a local folder nor in the Hugging Face cache; the estimate \
                 reads its configs and weight headers (download it first, e.g. `hf download {}`)",
                config.model.id, config.model.id
            )
        })?;
        report.memory = Some(
            pso::memory::estimate(&config, &root)
                .with_context(|| format!("estimating the memory of {}", path.display()))?,
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}
