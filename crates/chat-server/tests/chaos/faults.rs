//! The faults, drawn from the seed before the run starts (so a seed
//! replays the same schedule), and how each is done and undone.

use crate::cluster::{CLUSTER_TIMEOUT, Cluster};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use std::time::Duration;

#[derive(Debug, Clone)]
pub enum Fault {
    /// SIGKILL a node; start it again with its data directory.
    KillRestart { node: usize, down: Duration },
    /// SIGKILL a node; start a brand-new one in its place, with another
    /// id and an empty data directory.
    KillFresh { node: usize, down: Duration },
    /// SIGSTOP a node for longer than `--cluster-timeout`; SIGCONT.
    Pause { node: usize, stopped: Duration },
    /// SIGKILL a NATS server; start it again with its store.
    NatsRestart { server: usize, down: Duration },
    /// With three NATS servers: SIGKILL the stream's leader.
    LeaderKill { down: Duration },
    /// One NATS server: SIGKILL it and cut the end off the stream's newest
    /// block file, as a power loss would; start it again. The stream
    /// then has fewer entries than the nodes applied: a rewind.
    LostTail,
}

/// A fault, after a quiet gap.
#[derive(Debug, Clone)]
pub struct Step {
    pub after: Duration,
    pub fault: Fault,
}

/// The schedule of `seed`: faults for about `run`, in the NATS shape given.
pub fn schedule(seed: u64, run: Duration, three_nats: bool) -> Vec<Step> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ if three_nats { 0x3 } else { 0x1 });
    let ms = |rng: &mut Xoshiro256PlusPlus, lo: u64, hi: u64| {
        Duration::from_millis(rng.random_range(lo..hi))
    };
    let mut steps = Vec::new();
    let mut total = Duration::ZERO;
    let mut lost_tail = false;
    while total < run {
        let after = ms(&mut rng, 1_500, 5_000);
        let node = rng.random_range(0..3);
        let fault = match rng.random_range(0..100) {
            0..25 => Fault::KillRestart {
                node,
                down: ms(&mut rng, 200, 3_000),
            },
            25..40 => Fault::KillFresh {
                node,
                down: ms(&mut rng, 200, 2_000),
            },
            40..60 => Fault::Pause {
                node,
                stopped: CLUSTER_TIMEOUT + ms(&mut rng, 500, 3_000),
            },
            60..80 => Fault::NatsRestart {
                server: if three_nats {
                    rng.random_range(0..3)
                } else {
                    0
                },
                down: ms(&mut rng, 200, 3_000),
            },
            80..92 if three_nats => Fault::LeaderKill {
                down: ms(&mut rng, 500, 4_000),
            },
            // At most one rewind a run, late enough that there is a tail.
            _ if !three_nats && !lost_tail && total > run / 3 => {
                lost_tail = true;
                Fault::LostTail
            }
            _ => Fault::KillRestart {
                node,
                down: ms(&mut rng, 200, 3_000),
            },
        };
        total += after;
        steps.push(Step { after, fault });
    }
    steps
}

/// Does `fault` and undoes it. Returns whether it rewound the log.
pub fn apply(cluster: &mut Cluster, fault: &Fault) -> bool {
    match fault {
        Fault::KillRestart { node, down } => {
            cluster.nodes[*node].kill();
            cluster.wait(*down);
            cluster.nodes[*node].start(&cluster.nats);
        }
        Fault::KillFresh { node, down } => {
            cluster.nodes[*node].kill();
            cluster.nodes[*node].forget();
            cluster.wait(*down);
            cluster.nodes[*node].start(&cluster.nats);
        }
        Fault::Pause { node, stopped } => {
            cluster.nodes[*node].signal("-STOP");
            cluster.wait(*stopped);
            cluster.nodes[*node].signal("-CONT");
        }
        Fault::NatsRestart { server, down } => {
            cluster.nats.kill(*server);
            cluster.wait(*down);
            cluster.nats.restart(*server);
        }
        Fault::LeaderKill { down } => {
            let leader = cluster.nats.leader().unwrap_or(0);
            cluster.nats.kill(leader);
            cluster.wait(*down);
            cluster.nats.restart(leader);
        }
        Fault::LostTail => {
            let crate::cluster::Nats::One(nats) = &mut cluster.nats else {
                unreachable!("drawn only with one NATS server")
            };
            nats.lose_the_tail();
            return true;
        }
    }
    false
}
