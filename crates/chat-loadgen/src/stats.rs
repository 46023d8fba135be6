//! Measuring: latency histograms, counters, CPU and memory of processes.

use hdrhistogram::Histogram;
use std::time::Instant;

/// A latency histogram in microseconds, 1 µs to 60 s, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// CPU time (user + system) of a process, in seconds, from `/proc`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: utime and stime are fields 14 and 15 overall.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every mainstream Linux.
    Some((utime + stime) / 100.0)
}

/// Resident memory of a process, in bytes, from `/proc`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The processes whose CPU is reported beside the load generator's.
#[derive(Debug, Clone, Default)]
pub struct Pids {
    /// The server under test (with a cluster, the first node).
    pub server: Option<u32>,
    /// A cluster's other nodes: their CPU is reported summed.
    pub peers: Vec<u32>,
    /// The `nats-server` processes under a cluster, summed.
    pub nats: Vec<u32>,
}

impl Pids {
    /// The server alone.
    pub fn server(pid: Option<u32>) -> Self {
        Pids {
            server: pid,
            ..Pids::default()
        }
    }
}

/// CPU use of the load generator and of the processes in [`Pids`], over a
/// window.
#[derive(Debug, Clone)]
pub struct CpuWindow {
    start: Instant,
    pids: Pids,
    own: Option<f64>,
    server: Option<f64>,
    peers: Option<f64>,
    nats: Option<f64>,
}

/// CPU use over a window, as a share of one core (1.0 = one core busy).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    /// The load generator's own CPU.
    pub loadgen: Option<f64>,
    /// The server's CPU, when its PID was given.
    pub server: Option<f64>,
    /// The other nodes' CPU together, when their PIDs were given.
    pub peers: Option<f64>,
    /// The `nats-server` processes' CPU together, when given.
    pub nats: Option<f64>,
}

/// The CPU seconds of `pids` together: `None` with none, or when one
/// cannot be read.
fn summed(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&pid| cpu_seconds(pid)).sum()
}

impl CpuWindow {
    /// Starts measuring now.
    pub fn start(pids: &Pids) -> Self {
        CpuWindow {
            start: Instant::now(),
            own: cpu_seconds(std::process::id()),
            server: pids.server.and_then(cpu_seconds),
            peers: summed(&pids.peers),
            nats: summed(&pids.nats),
            pids: pids.clone(),
        }
    }

    /// CPU used since [`start`](Self::start).
    pub fn finish(&self) -> CpuUse {
        let secs = self.start.elapsed().as_secs_f64();
        let share = |before: Option<f64>, after: Option<f64>| Some((after? - before?) / secs);
        CpuUse {
            loadgen: share(self.own, cpu_seconds(std::process::id())),
            server: share(self.server, self.pids.server.and_then(cpu_seconds)),
            peers: share(self.peers, summed(&self.pids.peers)),
            nats: share(self.nats, summed(&self.pids.nats)),
        }
    }
}

/// The machine, for the record.
pub fn machine() -> serde_json::Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    serde_json::json!({ "cores": cores, "kernel": kernel, "cpu": cpu })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_measurable() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).is_some());
        assert!(rss_bytes(pid).is_some_and(|b| b > 0));
    }
}
