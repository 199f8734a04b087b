//! Real c10d collectives across processes on the CPU (Gloo over loopback): the test binary
//! starts itself once per rank with torchrun's variables, and each rank reports what it got.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use dist::{Launch, ProcessGroup};
use tch::{Kind, Tensor};

/// Set in the children: which part to play.
const ROLE: &str = "PSO_DIST_TEST_ROLE";

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// One rank's part; a no-op unless started by `spawn`.
#[test]
fn rank() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let launch = Launch::from_env().unwrap().expect("spawned with a launch");
    let timeout = if role == "lonely" { 3 } else { 60 };
    let group = match ProcessGroup::gloo(&launch, Duration::from_secs(timeout)) {
        Ok(group) => group,
        Err(e) => {
            println!("ERROR {e}");
            return;
        }
    };
    let r = launch.rank as f32;
    let mut sum = Tensor::from_slice(&[r + 1.0, 2.0 * r, 10.0]);
    group.all_reduce_sum(&mut sum).unwrap();
    let mut mean = Tensor::from_slice(&[r, 1.0]);
    group.all_reduce_mean(&mut mean).unwrap();
    let mut ids = Tensor::from_slice(&[launch.rank as i64]);
    group.all_reduce_sum(&mut ids).unwrap();
    let mut from_one = Tensor::from_slice(&[7.0 * r, -1.0]);
    group.broadcast(&mut from_one, 1).unwrap();
    let mut bad = Tensor::from_slice(&[1i64]);
    let refused = group.all_reduce_mean(&mut bad).unwrap_err().to_string();
    group.barrier().unwrap();
    println!(
        "RESULT {:?} {:?} {:?} {:?} {}",
        values(&sum),
        values(&mean),
        values(&ids),
        values(&from_one),
        refused.contains("has no mean")
    );
}

/// Starts `ranks` of a world of `world` processes playing `role`; returns their outputs.
fn spawn(role: &str, world: usize, ranks: usize) -> Vec<Output> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let children: Vec<_> = (0..ranks)
        .map(|rank| {
            Command::new(std::env::current_exe().unwrap())
                .args(["rank", "--exact", "--nocapture", "--test-threads", "1"])
                .env(ROLE, role)
                .envs(Launch::local(rank, world, port).to_env())
                .env("GLOO_SOCKET_IFNAME", "lo")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

fn report(output: &Output, tag: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|l| l.split_once(tag).map(|(_, rest)| rest))
        .map(str::to_owned)
        .unwrap_or_else(|| {
            panic!(
                "no {tag} line:\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
}

#[test]
fn all_reduce_broadcast_and_barrier_agree_across_three_processes() {
    let outputs = spawn("collectives", 3, 3);
    for output in &outputs {
        // Sums over ranks 0, 1, 2: [1+2+3, 0+2+4, 30]; means [1, 1]; ids 0+1+2; rank 1's [7, -1].
        assert_eq!(
            report(output, "RESULT "),
            "[6.0, 6.0, 30.0] [1.0, 1.0] [3.0] [7.0, -1.0] true"
        );
    }
}

#[test]
fn a_missing_peer_ends_in_a_clear_error_after_the_timeout() {
    let started = std::time::Instant::now();
    let outputs = spawn("lonely", 2, 1);
    let error = report(&outputs[0], "ERROR ");
    assert!(
        error.contains("joining the Gloo process group (rank 0 of 2)"),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

/// NCCL, as one rank: on a GPU machine it reduces CUDA tensors and CPU tensors (through the
/// GPU); without a GPU, joining fails with libtorch's reason, never a crash. Either way the NCCL
/// process group was compiled and linked from this libtorch.
#[test]
fn nccl_reduces_on_a_gpu_and_says_why_not_without_one() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let launch = Launch::local(0, 1, port);
    match ProcessGroup::nccl(&launch, Duration::from_secs(30)) {
        Ok(group) => {
            assert!(tch::Cuda::is_available());
            assert_eq!(group.backend(), "nccl");
            let mut on_gpu = Tensor::from_slice(&[1.0f32, 2.0]).to_device(tch::Device::Cuda(0));
            group.all_reduce_sum(&mut on_gpu).unwrap();
            assert_eq!(values(&on_gpu.to_device(tch::Device::Cpu)), [1.0, 2.0]);
            let mut on_cpu = Tensor::from_slice(&[3.0f32]);
            group.broadcast(&mut on_cpu, 0).unwrap();
            assert_eq!(on_cpu.device(), tch::Device::Cpu);
            assert_eq!(values(&on_cpu), [3.0]);
            group.barrier().unwrap();
        }
        Err(e) => {
            assert!(!tch::Cuda::is_available(), "a GPU is there: {e}");
            let e = e.to_string();
            assert!(
                e.contains("joining the NCCL process group (rank 0 of 1)"),
                "{e}"
            );
            assert!(
                !e.contains("built without"),
                "NCCL was not compiled in: {e}"
            );
        }
    }
}
