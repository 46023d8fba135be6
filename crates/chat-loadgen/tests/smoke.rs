//! A short run of every scenario against a real server in this process:
//! the figures must be sane (no timing assertions; this box is noisy).

use chat_loadgen::client::Target;
use chat_loadgen::scenario::{self, Load, Pace, Progress};
use chat_server::{Config, Server};
use std::sync::Arc;
use std::time::Duration;

async fn server() -> (String, chat_server::CancellationToken) {
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        in_memory: true,
        message_rate: 100_000,
        ..Config::default()
    };
    let server = Server::bind(config).await.expect("bind");
    let url = format!("ws://{}/ws", server.local_addr());
    let stop = server.shutdown_handle();
    tokio::spawn(server.run());
    (url, stop)
}

fn load(clients: usize, senders: usize) -> Load {
    Load {
        clients,
        senders,
        duration: Duration::from_secs(1),
        warmup: Duration::from_millis(300),
        connect_parallel: 16,
        pids: chat_loadgen::stats::Pids::server(Some(std::process::id())),
        spread_senders: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_counts_every_frame_and_loses_none() {
    let (url, stop) = server().await;
    let target = Target::resolve(&url, 8).await.expect("target");
    let progress = Arc::new(Progress::default());
    let r = scenario::run_load(&target, &load(20, 4), Pace::Rate(40.0), &progress).await;
    assert!(r.get("error").is_none(), "{r}");
    assert_eq!(r["clients_connected"], 20, "{r}");
    let sent = r["messages_sent"].as_u64().expect("sent");
    assert!(sent >= 20, "about 40/s for 1.3 s: {r}");
    assert_eq!(r["frames_lost"], 0, "{r}");
    assert_eq!(r["clients_closed_early"], 0, "{r}");
    let lat = &r["latency_ms"];
    assert!(lat["samples"].as_u64().expect("samples") > 0, "{r}");
    let p50 = lat["p50"].as_f64().expect("p50");
    let p99 = lat["p99"].as_f64().expect("p99");
    let max = lat["max"].as_f64().expect("max");
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{r}");
    assert!(
        r["delivered_frames_per_s"].as_f64().expect("rate") > 0.0,
        "{r}"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturate_delivers_to_every_client() {
    let (url, stop) = server().await;
    let target = Target::resolve(&url, 8).await.expect("target");
    let progress = Arc::new(Progress::default());
    let r = scenario::run_load(&target, &load(10, 2), Pace::InFlight(2), &progress).await;
    assert!(r.get("error").is_none(), "{r}");
    assert!(r["messages_sent"].as_u64().expect("sent") > 0, "{r}");
    assert_eq!(r["frames_lost"], 0, "{r}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_storm_gets_the_whole_history() {
    let (url, stop) = server().await;
    let target = Target::resolve(&url, 8).await.expect("target");
    let progress = Arc::new(Progress::default());
    let run = scenario::prefill(&target, 200, 4, &progress)
        .await
        .expect("prefill");
    let r = scenario::connect_storm(&target, 10, 200, run, &progress).await;
    assert_eq!(r["failures"], 0, "{r}");
    assert_eq!(r["clients"], 10, "{r}");
    assert!(r["all_have_history_s"].as_f64().expect("time") > 0.0, "{r}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_reports_memory_per_connection() {
    let (url, stop) = server().await;
    let target = Target::resolve(&url, 8).await.expect("target");
    let progress = Arc::new(Progress::default());
    let r = scenario::idle(&target, 20, Some(std::process::id()), 8, &progress).await;
    assert_eq!(r["connections"], 20, "{r}");
    assert_eq!(r["failures"], 0, "{r}");
    assert!(r["server_rss_after_bytes"].as_u64().is_some(), "{r}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_fills_the_message_and_counts_every_toggle() {
    let (url, stop) = server().await;
    // Six addresses: four reactors and the poster need their own users.
    let target = Target::resolve(&url, 8).await.expect("target");
    let progress = Arc::new(Progress::default());
    let storm = chat_loadgen::storm::Storm {
        clients: 3,
        reactors: 4,
        emojis: 2,
        toggles: 4,
        rate: 50.0,
    };
    let r = chat_loadgen::storm::run(&target, &storm, 4, &progress).await;
    assert!(r.get("error").is_none(), "{r}");
    assert_eq!(r["fill"]["toggles_accepted"], 8, "{r}");
    assert_eq!(r["frames_received"], 12, "3 clients x 4 toggles: {r}");
    assert_eq!(r["receivers_cut_short"], 0, "{r}");
    let per_client = r["bytes_per_toggle_per_client"].as_f64().expect("bytes");
    let largest = r["largest_frame_bytes"].as_f64().expect("largest");
    assert!(per_client > 0.0 && per_client <= largest, "{r}");
    stop.cancel();
}
