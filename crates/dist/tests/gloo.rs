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
        error.contains("joining the process group (rank 0 of 2)"),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}
