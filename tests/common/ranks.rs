//! Starting `pso` as the ranks of a torchrun launch: its environment variables, a loopback
//! rendezvous on a free port, Gloo on the loopback interface.

use std::process::{Child, Command, Stdio};

/// Starts `pso ARGS` as `world` ranks (stdout and stderr piped); `timeout` is
/// `PSO_DIST_TIMEOUT` in seconds.
pub fn spawn_ranks(world: usize, args: &[&str], timeout: u32) -> Vec<Child> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    (0..world)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_pso"))
                .args(args)
                .envs(dist::Launch::local(rank, world, port).to_env())
                .env("GLOO_SOCKET_IFNAME", "lo")
                .env("PSO_DIST_TIMEOUT", timeout.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Runs `pso ARGS` as `world` ranks to the end; every rank must succeed. Returns each rank's
/// stdout.
pub fn run_ranks(world: usize, args: &[&str]) -> Vec<String> {
    let outputs: Vec<_> = spawn_ranks(world, args, 120)
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for (rank, out) in outputs.iter().enumerate() {
        assert!(
            out.status.success(),
            "rank {rank} of pso {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    outputs
        .into_iter()
        .map(|out| String::from_utf8(out.stdout).unwrap())
        .collect()
}
