//! Data-parallel collectives for pso on PyTorch's own distributed engine: a c10d process group
//! (Gloo, or NCCL on GPUs) built from torchrun's launch variables, with the all-reduce, broadcast and barrier a
//! data-parallel learner needs. tch has no distributed layer, so a small C++ bridge
//! (cxx/bridge.cpp) reaches c10d in the libtorch pso already links; nothing here implements a
//! collective itself.
//!
//! With no launch variables set, [`Launch::from_env`] says so and pso runs as one process
//! without touching the bridge.

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tch::Tensor;

extern "C" {
    fn pso_c10d_gloo_new(
        host: *const c_char,
        port: u16,
        rank: i32,
        world_size: i32,
        timeout_ms: i64,
        error: *mut *mut c_char,
    ) -> *mut c_void;
    fn pso_c10d_nccl_new(
        host: *const c_char,
        port: u16,
        rank: i32,
        world_size: i32,
        timeout_ms: i64,
        device_index: i32,
        error: *mut *mut c_char,
    ) -> *mut c_void;
    fn pso_c10d_all_reduce_sum(
        group: *mut c_void,
        tensor: *mut c_void,
        error: *mut *mut c_char,
    ) -> i32;
    fn pso_c10d_broadcast(
        group: *mut c_void,
        tensor: *mut c_void,
        root: i32,
        error: *mut *mut c_char,
    ) -> i32;
    fn pso_c10d_barrier(group: *mut c_void, error: *mut *mut c_char) -> i32;
    fn pso_c10d_store_add(
        group: *mut c_void,
        key: *const c_char,
        delta: i64,
        value: *mut i64,
        error: *mut *mut c_char,
    ) -> i32;
    fn pso_c10d_free(group: *mut c_void);
    fn pso_c10d_has_nccl() -> i32;
    fn pso_c10d_free_error(error: *mut c_char);
}

/// Errors of the launch contract and of the collectives.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A launch variable is missing or malformed.
    #[error("launch variable {name}={value:?}: {why}")]
    Launch {
        /// The variable.
        name: &'static str,
        /// Its value as found.
        value: String,
        /// What is wrong and what to do.
        why: String,
    },
    /// c10d refused or failed (rendezvous timeout, a peer gone, a tensor it cannot reduce).
    #[error("{what} (rank {rank} of {world_size}): {message}")]
    C10d {
        /// The operation.
        what: &'static str,
        /// This process's rank.
        rank: usize,
        /// The number of processes.
        world_size: usize,
        /// libtorch's message.
        message: String,
    },
}

/// Where this process sits in a data-parallel launch: torchrun's variables (`RANK`,
/// `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), or Slurm's
/// (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`) for the ranks with `MASTER_ADDR` /
/// `MASTER_PORT` still set by the job script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// This process's rank, 0..world_size.
    pub rank: usize,
    /// The number of processes.
    pub world_size: usize,
    /// Its rank on this node (the GPU it uses).
    pub local_rank: usize,
    /// Processes on this node.
    pub local_world_size: usize,
    /// The rendezvous host (rank 0 listens there).
    pub master_addr: String,
    /// The rendezvous port.
    pub master_port: u16,
}

impl Launch {
    /// The launch described by the environment; `None` when no launcher set `WORLD_SIZE` (or
    /// `SLURM_NTASKS`): one process, as pso runs without one.
    pub fn from_env() -> Result<Option<Launch>, DistError> {
        Launch::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Launch::from_env`] over any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>, DistError> {
        let pick = |torchrun: &'static str, slurm: &'static str| {
            var(torchrun)
                .map(|v| (torchrun, v))
                .or_else(|| var(slurm).map(|v| (slurm, v)))
        };
        let Some(world) = pick("WORLD_SIZE", "SLURM_NTASKS") else {
            return Ok(None);
        };
        let number = |(name, value): (&'static str, String)| -> Result<usize, DistError> {
            value.trim().parse().map_err(|_| DistError::Launch {
                name,
                value,
                why: "not a non-negative integer".into(),
            })
        };
        let world_size = number(world)?;
        let rank = number(pick("RANK", "SLURM_PROCID").ok_or_else(|| missing("RANK"))?)?;
        let local_rank = match pick("LOCAL_RANK", "SLURM_LOCALID") {
            Some(v) => number(v)?,
            None => rank,
        };
        let local_world_size = match var("LOCAL_WORLD_SIZE") {
            Some(v) => number(("LOCAL_WORLD_SIZE", v))?,
            None => world_size,
        };
        let master_addr = var("MASTER_ADDR").ok_or_else(|| missing("MASTER_ADDR"))?;
        let port = var("MASTER_PORT").ok_or_else(|| missing("MASTER_PORT"))?;
        let master_port = port.trim().parse().map_err(|_| DistError::Launch {
            name: "MASTER_PORT",
            value: port.clone(),
            why: "not a port number (1..=65535)".into(),
        })?;
        if world_size == 0 || rank >= world_size {
            return Err(DistError::Launch {
                name: "RANK",
                value: rank.to_string(),
                why: format!("must be below WORLD_SIZE ({world_size}), which must be at least 1"),
            });
        }
        if local_rank >= local_world_size {
            return Err(DistError::Launch {
                name: "LOCAL_RANK",
                value: local_rank.to_string(),
                why: format!("must be below LOCAL_WORLD_SIZE ({local_world_size})"),
            });
        }
        Ok(Some(Launch {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
        }))
    }

    /// Rank `rank` of `world_size` processes on this machine, meeting at 127.0.0.1:`port`.
    pub fn local(rank: usize, world_size: usize, port: u16) -> Launch {
        Launch {
            rank,
            world_size,
            local_rank: rank,
            local_world_size: world_size,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    /// The environment torchrun gives the process of this launch (what [`Launch::from_env`]
    /// reads), e.g. for `Command::envs`.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RANK", self.rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("LOCAL_WORLD_SIZE", self.local_world_size.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ]
    }
}

fn missing(name: &'static str) -> DistError {
    DistError::Launch {
        name,
        value: String::new(),
        why: "unset, though WORLD_SIZE is set; launch with torchrun (--no-python) or set \
              RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
            .into(),
    }
}

/// Whether this build has c10d's NCCL process group (build.rs found the CUDA and NCCL headers).
pub fn nccl_built() -> bool {
    // SAFETY: a constant answer, no arguments.
    unsafe { pso_c10d_has_nccl() != 0 }
}

/// How often each rank counts its heartbeat up in the rendezvous store.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// A c10d process group: every collective blocks until all ranks took part, or fails after the
/// group's timeout. A failed collective names the ranks that are gone (their heartbeat in the
/// rendezvous store stopped), so a killed rank is reported as such by the others.
#[derive(Debug)]
pub struct ProcessGroup {
    group: Handle,
    rank: usize,
    world_size: usize,
    /// NCCL's GPU (collectives of tensors elsewhere go through it); None for Gloo.
    device: Option<tch::Device>,
    heartbeat: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

/// The bridge's group pointer.
#[derive(Debug, Clone, Copy)]
struct Handle(NonNull<c_void>);

// c10d process groups are made to be driven from any thread: PyTorch's DDP reducer issues
// collectives from autograd threads, ProcessGroupGloo queues each call under its own mutex, and
// TCPStore serialises its requests under a lock.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl ProcessGroup {
    /// Joins the Gloo group of `launch` (rank 0 hosts the TCPStore rendezvous), waiting at
    /// most `timeout` for the others; collectives then time out after the same.
    pub fn gloo(launch: &Launch, timeout: Duration) -> Result<ProcessGroup, DistError> {
        Self::join(launch, timeout, None)
    }

    /// Joins the NCCL group of `launch` on GPU `cuda:LOCAL_RANK` (the rendezvous as for Gloo).
    /// Tensors elsewhere are reduced through that GPU. Fails with libtorch's message on a
    /// machine without that GPU, or when this pso was built without the NCCL headers.
    pub fn nccl(launch: &Launch, timeout: Duration) -> Result<ProcessGroup, DistError> {
        Self::join(launch, timeout, Some(launch.local_rank))
    }

    fn join(
        launch: &Launch,
        timeout: Duration,
        gpu: Option<usize>,
    ) -> Result<ProcessGroup, DistError> {
        let host = CString::new(launch.master_addr.clone()).map_err(|_| DistError::Launch {
            name: "MASTER_ADDR",
            value: launch.master_addr.clone(),
            why: "holds a NUL byte".into(),
        })?;
        let timeout_ms = timeout.as_millis().min(i64::MAX as u128) as i64;
        let (rank, world) = (launch.rank as i32, launch.world_size as i32);
        let mut error = std::ptr::null_mut();
        // SAFETY: `host` outlives the call; `error` is written only on failure.
        let group = unsafe {
            match gpu {
                None => pso_c10d_gloo_new(
                    host.as_ptr(),
                    launch.master_port,
                    rank,
                    world,
                    timeout_ms,
                    &mut error,
                ),
                Some(index) => pso_c10d_nccl_new(
                    host.as_ptr(),
                    launch.master_port,
                    rank,
                    world,
                    timeout_ms,
                    index as i32,
                    &mut error,
                ),
            }
        };
        let fail = |message| DistError::C10d {
            what: if gpu.is_some() {
                "joining the NCCL process group"
            } else {
                "joining the Gloo process group"
            },
            rank: launch.rank,
            world_size: launch.world_size,
            message,
        };
        let Some(group) = NonNull::new(group) else {
            let message = take_error(error);
            let lower = message.to_lowercase();
            let rendezvous = lower.contains("time") || lower.contains("connect");
            return Err(fail(if rendezvous {
                format!(
                    "{message}; every rank must start within the timeout and reach rank 0 at \
                     {}:{} (MASTER_ADDR, MASTER_PORT)",
                    launch.master_addr, launch.master_port
                )
            } else {
                message
            }));
        };
        let group = Handle(group);
        let stop = Arc::new(AtomicBool::new(false));
        let beat = stop.clone();
        let key = heartbeat_key(launch.rank);
        let thread = std::thread::Builder::new()
            .name("c10d-heartbeat".into())
            .spawn(move || {
                // Stops quietly when the store is gone: the collectives report that.
                while !beat.load(Ordering::Relaxed) && store_add(group, &key, 1).is_ok() {
                    std::thread::sleep(HEARTBEAT);
                }
            })
            .map_err(|e| fail(format!("cannot start the heartbeat thread: {e}")))?;
        Ok(ProcessGroup {
            group,
            rank: launch.rank,
            world_size: launch.world_size,
            device: gpu.map(tch::Device::Cuda),
            heartbeat: Some((stop, thread)),
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        if self.device.is_some() {
            "nccl"
        } else {
            "gloo"
        }
    }

    /// Replaces `tensor` on every rank with the sum over the ranks.
    pub fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<(), DistError> {
        self.on_device(tensor, |t| {
            self.call("all_reduce", |group, error| {
                // SAFETY: the tensor pointer is a live at::Tensor* owned by `t`.
                unsafe { pso_c10d_all_reduce_sum(group, t.as_mut_ptr().cast(), error) }
            })
        })
    }

    /// Runs a collective on `tensor`, through NCCL's GPU when the tensor lives elsewhere.
    fn on_device(
        &self,
        tensor: &mut Tensor,
        collective: impl FnOnce(&mut Tensor) -> Result<(), DistError>,
    ) -> Result<(), DistError> {
        match self.device {
            Some(device) if tensor.device() != device => {
                let mut there = tensor.to_device(device);
                collective(&mut there)?;
                tensor.copy_(&there);
                Ok(())
            }
            _ => collective(tensor),
        }
    }

    /// Replaces a floating-point `tensor` on every rank with the mean over the ranks (a sum,
    /// then a division: Gloo has no average).
    pub fn all_reduce_mean(&self, tensor: &mut Tensor) -> Result<(), DistError> {
        if !tensor.is_floating_point() {
            return Err(DistError::C10d {
                what: "all_reduce_mean",
                rank: self.rank,
                world_size: self.world_size,
                message: format!(
                    "a {:?} tensor has no mean; reduce a float tensor",
                    tensor.kind()
                ),
            });
        }
        self.all_reduce_sum(tensor)?;
        let _ = tensor.g_div_scalar_(self.world_size as f64);
        Ok(())
    }

    /// Replaces `tensor` on every rank with rank `root`'s.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), DistError> {
        self.on_device(tensor, |t| {
            self.call("broadcast", |group, error| {
                // SAFETY: as in all_reduce_sum.
                unsafe { pso_c10d_broadcast(group, t.as_mut_ptr().cast(), root as i32, error) }
            })
        })
    }

    /// Returns once every rank called it.
    pub fn barrier(&self) -> Result<(), DistError> {
        self.call("barrier", |group, error| {
            // SAFETY: the group is live while self is.
            unsafe { pso_c10d_barrier(group, error) }
        })
    }

    fn call(
        &self,
        what: &'static str,
        body: impl FnOnce(*mut c_void, *mut *mut c_char) -> i32,
    ) -> Result<(), DistError> {
        let mut error = std::ptr::null_mut();
        if body(self.group.0.as_ptr(), &mut error) == 0 {
            return Ok(());
        }
        let message = take_error(error);
        Err(DistError::C10d {
            what,
            rank: self.rank,
            world_size: self.world_size,
            message: format!("{}; libtorch says: {message}", self.lost_ranks()),
        })
    }

    /// After a failed collective: which ranks stopped beating (read the counters twice, a few
    /// heartbeats apart), or that rank 0, whose store holds the counters, is unreachable.
    fn lost_ranks(&self) -> String {
        let read = || -> Result<Vec<i64>, String> {
            (0..self.world_size)
                .map(|r| store_add(self.group, &heartbeat_key(r), 0))
                .collect()
        };
        let Ok(before) = read() else {
            return "rank 0 is gone (its rendezvous store does not answer): it crashed, was                     killed or lost the network; see its log"
                .into();
        };
        std::thread::sleep(HEARTBEAT * 4);
        let Ok(after) = read() else {
            return "rank 0 is gone (its rendezvous store stopped answering); see its log".into();
        };
        let lost: Vec<String> = (0..self.world_size)
            .filter(|&r| r != self.rank && after[r] == before[r])
            .map(|r| r.to_string())
            .collect();
        match lost.len() {
            0 => "every rank is still alive: one is stalled (a collective timed out) or the                   network between them failed"
                .into(),
            1 => format!(
                "lost rank {}: it stopped (crashed or was killed); see its log",
                lost[0]
            ),
            _ => format!(
                "lost ranks {}: they stopped (crashed or were killed); see their logs",
                lost.join(", ")
            ),
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.heartbeat.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
        // SAFETY: made by pso_c10d_gloo_new, freed once, after the heartbeat thread ended.
        unsafe { pso_c10d_free(self.group.0.as_ptr()) }
    }
}

/// The store counter rank `rank` counts up while alive.
fn heartbeat_key(rank: usize) -> String {
    format!("pso/heartbeat/{rank}")
}

/// Adds `delta` to the store counter `key`; returns its new value or libtorch's message.
fn store_add(group: Handle, key: &str, delta: i64) -> Result<i64, String> {
    let key = CString::new(key).expect("heartbeat keys hold no NUL");
    let (mut value, mut error) = (0, std::ptr::null_mut());
    // SAFETY: the group outlives every caller (Drop joins the heartbeat thread first); `key`
    // outlives the call; `value` and `error` are written by the bridge.
    let rc = unsafe {
        pso_c10d_store_add(
            group.0.as_ptr(),
            key.as_ptr(),
            delta,
            &mut value,
            &mut error,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(take_error(error))
    }
}

/// The bridge's error message, freed.
fn take_error(error: *mut c_char) -> String {
    if error.is_null() {
        return "no message".into();
    }
    // SAFETY: the bridge wrote a NUL-terminated strdup'ed string.
    let message = unsafe { CStr::from_ptr(error) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: allocated by the bridge's strdup, freed once.
    unsafe { pso_c10d_free_error(error) };
    // libtorch appends where it threw and a C++ stack trace to the message.
    let message = message.lines().next().unwrap_or_default();
    message
        .split(" Exception raised from")
        .next()
        .unwrap_or(message)
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>, DistError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_and_slurm_variables_make_a_launch() {
        assert_eq!(launch(&[]).unwrap(), None);
        let torchrun = launch(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (torchrun.rank, torchrun.world_size, torchrun.local_rank),
            (3, 8, 1)
        );
        assert_eq!(
            (torchrun.master_addr.as_str(), torchrun.master_port),
            ("10.0.0.1", 29500)
        );
        let slurm = launch(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((slurm.rank, slurm.world_size, slurm.local_rank), (5, 16, 1));
    }

    #[test]
    fn a_launch_round_trips_through_its_environment() {
        let launch = Launch::local(2, 4, 29500);
        let env: HashMap<&str, String> = launch.to_env().into_iter().collect();
        let back = Launch::from_vars(|k| env.get(k).cloned()).unwrap().unwrap();
        assert_eq!(back, launch);
    }

    #[test]
    fn a_broken_launch_names_the_variable() {
        let e = launch(&[("WORLD_SIZE", "2"), ("RANK", "0")]).unwrap_err();
        assert!(e.to_string().contains("MASTER_ADDR"), "{e}");
        let e = launch(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("below WORLD_SIZE (2)"), "{e}");
        let e = launch(&[
            ("WORLD_SIZE", "two"),
            ("RANK", "0"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("WORLD_SIZE=\"two\""), "{e}");
    }
}
