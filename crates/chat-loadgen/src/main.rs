//! `chat-loadgen`: drives any server that speaks the chat protocol.
//!
//! ```text
//! cargo run --release -p chat-loadgen -- fanout --clients 1000 --senders 50 --rate 100
//! cargo run --release -p chat-loadgen -- fanout --clients 1000 --senders 50 --rate 100 --sweep-p99-ms 50
//! cargo run --release -p chat-loadgen -- saturate --clients 1000 --senders 50 --in-flight 4
//! cargo run --release -p chat-loadgen -- connect --clients 1000 --history 10000
//! cargo run --release -p chat-loadgen -- storm --clients 1000 --reactors 200 --toggles 100
//! cargo run --release -p chat-loadgen -- idle --clients 10000 --server-pid $(pgrep chat-server)
//! cargo run --release -p chat-loadgen -- --url ws://a/ws,ws://b/ws failover --kill-pid $(pidof-node-a)
//! ```
#![forbid(unsafe_code)]

use chat_loadgen::scenario::{self, Load, Pace, Progress};
use chat_loadgen::{client, stats};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(
    name = "chat-loadgen",
    about = "Load generator for chat-protocol WebSocket servers"
)]
struct Cli {
    /// The server's WebSocket URL, or several separated by commas (a
    /// cluster's nodes: in `fanout` and `saturate` the senders connect to
    /// the first and every other client to the others, so each message
    /// crosses nodes; elsewhere clients go round all of them).
    #[arg(long, global = true, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// Loopback source addresses to spread clients over (127.1.x.y).
    #[arg(long, global = true, default_value_t = 500)]
    source_ips: usize,
    /// Handshakes in flight at once while connecting.
    #[arg(long, global = true, default_value_t = 200)]
    connect_parallel: usize,
    /// The server's PID, to report its CPU and memory (with a cluster,
    /// the first node's).
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// A cluster's other nodes' PIDs, comma-separated: their CPU over the
    /// same window is reported summed (`cpu_cores.peers`).
    #[arg(long, global = true, value_delimiter = ',')]
    peer_pids: Vec<u32>,
    /// The cluster's `nats-server` PIDs, comma-separated: reported summed
    /// (`cpu_cores.nats`).
    #[arg(long, global = true, value_delimiter = ',')]
    nats_pids: Vec<u32>,
    /// Free text recorded with the results, e.g. the server's flags.
    #[arg(long, global = true, default_value = "")]
    note: String,
    /// Print the results as JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

/// Many clients and a long history, put there first.
#[derive(Debug, Args)]
struct CrowdArgs {
    /// Clients connecting at once.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Messages to put in history first (the server's rate limit must allow it).
    #[arg(long, default_value_t = 10_000)]
    history: usize,
    /// Addresses the history is sent from.
    #[arg(long, default_value_t = 200)]
    prefill_senders: usize,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// C clients receive while S of them send at a fixed total rate (open loop).
    Fanout {
        #[command(flatten)]
        load: LoadArgs,
        /// Messages per second, all senders together.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Raise the rate by half each step until p99 exceeds this many ms;
        /// report the highest rate that held.
        #[arg(long)]
        sweep_p99_ms: Option<f64>,
    },
    /// Each sender keeps k messages in flight (closed loop): maximum throughput.
    Saturate {
        #[command(flatten)]
        load: LoadArgs,
        /// Messages each sender keeps in flight.
        #[arg(long, default_value_t = 4)]
        in_flight: usize,
    },
    /// K clients connect at once to a server holding H messages.
    Connect {
        #[command(flatten)]
        crowd: CrowdArgs,
    },
    /// K clients holding H messages drop their connections, M messages are
    /// sent, and they reconnect: once resuming with `?since=`, once with a
    /// plain `/ws` (the whole history). Bytes, time and server CPU of each.
    Reconnect {
        #[command(flatten)]
        crowd: CrowdArgs,
        /// Messages sent while the clients are away.
        #[arg(long, default_value_t = 100)]
        missed: usize,
    },
    /// Ordinary clients chat while abusers attack; samples the server's
    /// memory and descriptors and checks that nothing was lost.
    Soak {
        /// How long.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Ordinary chatting clients.
        #[arg(long, default_value_t = 100)]
        chatters: usize,
        /// How often each ordinary client sends.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        send_every: Duration,
        /// Clients that never read.
        #[arg(long, default_value_t = 5)]
        non_readers: usize,
        /// Connections that open TCP and send nothing.
        #[arg(long, default_value_t = 20)]
        slowloris: usize,
        /// Connections opened at once from one address, in waves.
        #[arg(long, default_value_t = 100)]
        flood: usize,
        /// Clients sending junk as fast as they can.
        #[arg(long, default_value_t = 3)]
        junk: usize,
        /// The server's --max-refusals: each junk client must get exactly
        /// this many error frames, then a 1008 close.
        #[arg(long, default_value_t = 100)]
        max_refusals: u64,
        /// Plain HTTP clients loading the page, /whoami and /metrics over
        /// keep-alive connections, with an oversized request head now and
        /// then.
        #[arg(long, default_value_t = 4)]
        browsers: usize,
        /// Allowed growth of memory after warm-up (0.2 = 20 %). Descriptors are
        /// checked exactly instead: back to the idle count once clients leave.
        #[arg(long, default_value_t = 0.2)]
        tolerance: f64,
    },
    /// Fills one message to the reaction limits, then toggles on it while
    /// C clients receive: the egress of one toggle.
    Storm {
        /// Receiving clients.
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Users filling the message, each toggling every emoji once.
        #[arg(long, default_value_t = 200)]
        reactors: usize,
        /// Emojis used, at most 20.
        #[arg(long, default_value_t = 20)]
        emojis: usize,
        /// Toggles measured.
        #[arg(long, default_value_t = 100)]
        toggles: usize,
        /// Measured toggles per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
    },
    /// K clients follow the first URL's node while one client on the second
    /// sends; the node is SIGKILLed, and its clients resume on the others
    /// with `?since=`: time until all have resumed, and what they missed.
    Failover {
        /// Clients on the node that is killed.
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Messages per second from the sender, on the second node.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        /// Sending before the kill.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        before: Duration,
        /// Sending after the kill.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        after: Duration,
        /// The PID of the node at the first URL: it is sent SIGKILL.
        #[arg(long)]
        kill_pid: u32,
    },
    /// K clients follow the chat with `?sync` over every URL; a message is
    /// posted and removed through the first URL's operator API: time until
    /// the API answers, and until every client was told.
    Removal {
        /// Clients following the chat.
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Removals measured.
        #[arg(long, default_value_t = 20)]
        removals: usize,
        /// An operator key of the server (`--admin-keys-file`).
        #[arg(long, env = "CHAT_ADMIN_KEY", hide_env_values = true)]
        admin_key: String,
    },
    /// K idle connections; reports the server's memory per connection.
    Idle {
        /// Connections to hold.
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
    },
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// Connected clients, all receiving.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// How many of the clients also send (each from its own address).
    #[arg(long, default_value_t = 50)]
    senders: usize,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time sending before measuring starts.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// With several URLs: senders go round all the nodes too (for the
    /// most commands through one cluster), not all to the first.
    #[arg(long)]
    spread_senders: bool,
}

impl LoadArgs {
    fn load(&self, cli: &Cli) -> Load {
        Load {
            clients: self.clients,
            senders: self.senders,
            duration: self.duration,
            warmup: self.warmup,
            connect_parallel: cli.connect_parallel,
            pids: stats::Pids {
                server: cli.server_pid,
                peers: cli.peer_pids.clone(),
                nats: cli.nats_pids.clone(),
            },
            spread_senders: self.spread_senders,
        }
    }
}

/// Prints a progress line to stderr every second until dropped.
fn progress_line(progress: Arc<Progress>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut last = (0, 0);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            let sent = progress.sent.load(Ordering::Relaxed);
            let delivered = progress.delivered.load(Ordering::Relaxed);
            eprint!(
                "\r{:>4}s  connected {:>6}  sent {:>8} ({:>7}/s)  delivered {:>10} ({:>9}/s)   ",
                start.elapsed().as_secs(),
                progress.connected.load(Ordering::Relaxed),
                sent,
                sent - last.0,
                delivered,
                delivered - last.1,
            );
            last = (sent, delivered);
        }
    })
}

// One thread: the load generator shares the machine with the server it
// measures, and a second runtime thread would take CPU from the server and
// add cross-thread wake-ups to every frame counted.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let target = match client::Target::resolve(&cli.url, cli.source_ips).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("chat-loadgen: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let progress = Arc::new(Progress::default());
    let ticker = progress_line(Arc::clone(&progress));
    let (name, params, results) = match &cli.scenario {
        Scenario::Fanout {
            load,
            rate,
            sweep_p99_ms,
        } => {
            let l = load.load(&cli);
            let params = json!({"clients": l.clients, "senders": l.senders, "spread_senders": l.spread_senders, "rate": rate, "duration_s": l.duration.as_secs_f64(), "warmup_s": l.warmup.as_secs_f64(), "sweep_p99_ms": sweep_p99_ms});
            let results = match sweep_p99_ms {
                None => scenario::run_load(&target, &l, Pace::Rate(*rate), &progress).await,
                Some(limit) => sweep(&target, &l, *rate, *limit, &progress).await,
            };
            ("fanout", params, results)
        }
        Scenario::Saturate { load, in_flight } => {
            let l = load.load(&cli);
            let params = json!({"clients": l.clients, "senders": l.senders, "spread_senders": l.spread_senders, "in_flight": in_flight, "duration_s": l.duration.as_secs_f64(), "warmup_s": l.warmup.as_secs_f64()});
            let results =
                scenario::run_load(&target, &l, Pace::InFlight(*in_flight), &progress).await;
            ("saturate", params, results)
        }
        Scenario::Connect {
            crowd:
                CrowdArgs {
                    clients,
                    history,
                    prefill_senders,
                },
        } => {
            let params =
                json!({"clients": clients, "history": history, "prefill_senders": prefill_senders});
            let results =
                match scenario::prefill(&target, *history, *prefill_senders, &progress).await {
                    Ok(run) => {
                        scenario::connect_storm(&target, *clients, *history, run, &progress).await
                    }
                    Err(e) => json!({ "error": e }),
                };
            ("connect", params, results)
        }
        Scenario::Reconnect {
            crowd:
                CrowdArgs {
                    clients,
                    history,
                    prefill_senders,
                },
            missed,
        } => {
            let params = json!({"clients": clients, "history": history, "prefill_senders": prefill_senders, "missed": missed});
            let r = chat_loadgen::reconnect::Reconnect {
                clients: *clients,
                history: *history,
                missed: *missed,
                parallel: cli.connect_parallel,
                server_pid: cli.server_pid,
            };
            let results =
                match scenario::prefill(&target, *history, *prefill_senders, &progress).await {
                    Ok(_) => chat_loadgen::reconnect::run(&target, &r, &progress).await,
                    Err(e) => json!({ "error": e }),
                };
            ("reconnect", params, results)
        }
        Scenario::Soak {
            duration,
            chatters,
            send_every,
            non_readers,
            slowloris,
            flood,
            junk,
            max_refusals,
            browsers,
            tolerance,
        } => {
            let soak = chat_loadgen::soak::Soak {
                duration: *duration,
                chatters: *chatters,
                send_every: *send_every,
                non_readers: *non_readers,
                slowloris: *slowloris,
                flood: *flood,
                junk: *junk,
                refusal_budget: *max_refusals,
                browsers: *browsers,
                server_pid: cli.server_pid,
                tolerance: *tolerance,
            };
            let params = json!({"duration_s": duration.as_secs_f64(), "chatters": chatters, "send_every_s": send_every.as_secs_f64(), "non_readers": non_readers, "slowloris": slowloris, "flood": flood, "junk": junk, "browsers": browsers, "tolerance": tolerance});
            let results = chat_loadgen::soak::run(&target, &soak).await;
            ("soak", params, results)
        }
        Scenario::Storm {
            clients,
            reactors,
            emojis,
            toggles,
            rate,
        } => {
            let storm = chat_loadgen::storm::Storm {
                clients: *clients,
                reactors: *reactors,
                emojis: *emojis,
                toggles: *toggles,
                rate: *rate,
            };
            let params = json!({"clients": clients, "reactors": reactors, "emojis": emojis, "toggles": toggles, "rate": rate});
            let results =
                chat_loadgen::storm::run(&target, &storm, cli.connect_parallel, &progress).await;
            ("storm", params, results)
        }
        Scenario::Failover {
            clients,
            rate,
            before,
            after,
            kill_pid,
        } => {
            let f = chat_loadgen::failover::Failover {
                clients: *clients,
                rate: *rate,
                before: *before,
                after: *after,
                kill_pid: *kill_pid,
                parallel: cli.connect_parallel,
            };
            let params = json!({"clients": clients, "rate": rate, "before_s": before.as_secs_f64(), "after_s": after.as_secs_f64()});
            let results = chat_loadgen::failover::run(&target, &f, &progress).await;
            ("failover", params, results)
        }
        Scenario::Removal {
            clients,
            removals,
            admin_key,
        } => {
            let r = chat_loadgen::removal::Removal {
                clients: *clients,
                removals: *removals,
                admin_key: admin_key.clone(),
                parallel: cli.connect_parallel,
            };
            let params = json!({"clients": clients, "removals": removals});
            let results = chat_loadgen::removal::run(&target, &r, &progress).await;
            ("removal", params, results)
        }
        Scenario::Idle { clients } => {
            let params = json!({"clients": clients});
            let results = scenario::idle(
                &target,
                *clients,
                cli.server_pid,
                cli.connect_parallel,
                &progress,
            )
            .await;
            ("idle", params, results)
        }
    };
    ticker.abort();
    eprintln!();
    let report = json!({
        "scenario": name,
        "url": cli.url,
        "note": cli.note,
        "params": params,
        "machine": stats::machine(),
        "results": results,
    });
    if cli.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    if report["results"].get("error").is_some() || report["results"]["passed"] == json!(false) {
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}

/// Raises the rate by half each step while p99 stays under `limit_ms`.
async fn sweep(
    target: &client::Target,
    load: &Load,
    start: f64,
    limit_ms: f64,
    progress: &Arc<Progress>,
) -> Value {
    let mut rate = start;
    let mut steps = Vec::new();
    let mut best = None;
    loop {
        let r = scenario::run_load(target, load, Pace::Rate(rate), progress).await;
        let p99 = r["latency_ms"]["p99"].as_f64().unwrap_or(f64::INFINITY);
        let lost = r["frames_lost"].as_u64().unwrap_or(u64::MAX);
        let held = p99 <= limit_ms && lost == 0 && r.get("error").is_none();
        steps.push(json!({"rate": rate, "p99_ms": p99, "frames_lost": lost, "delivered_frames_per_s": r["delivered_frames_per_s"], "held": held}));
        if !held || steps.len() >= 20 {
            break;
        }
        best = Some(json!({"rate": rate, "result": r}));
        rate *= 1.5;
    }
    json!({ "highest_rate_held": best, "steps": steps })
}

/// A readable `key: value` table, nested keys joined with dots.
fn print_table(report: &Value) {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(&format!("{prefix}[{i}]"), v, out);
                }
            }
            Value::Number(n) => {
                let s = match n.as_f64() {
                    Some(f) if n.is_f64() => format!("{f:.3}"),
                    _ => n.to_string(),
                };
                out.push((prefix.to_owned(), s));
            }
            Value::Null => out.push((prefix.to_owned(), "-".into())),
            other => out.push((
                prefix.to_owned(),
                other.to_string().trim_matches('"').to_owned(),
            )),
        }
    }
    let mut rows = Vec::new();
    walk("", report, &mut rows);
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("{k:<width$}  {v}");
    }
}
