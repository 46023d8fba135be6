//! A seeded randomized fault test, in the manner of Jepsen, against real
//! processes: `nats-server` (one, then three routed with R3), three
//! `chat-server` nodes with data directories, and nginx with
//! `deploy/nginx.conf` in front.
//!
//! Twenty-four clients, each its own user, connect through nginx and
//! straight to nodes, post and toggle reactions at random, and resume with
//! `?since=&epoch=` whenever their socket dies. A moderator removes some of
//! their messages, times users out (some with a purge), lifts restrictions
//! and turns slow mode on and off, through a random node's operator API
//! (see [`moderator`]). Meanwhile faults are drawn
//! from the seed: nodes SIGKILLed and restarted with their data or replaced
//! by brand-new ones, nodes SIGSTOPped past `--cluster-timeout`, NATS
//! servers SIGKILLed (with three, the stream's leader), and, with one NATS
//! server, a lost tail (its newest block file cut, as a power loss would).
//!
//! When the faults stop and everything has caught up, the checks (see
//! [`check`]) compare what every client was told with what every node
//! serves. A failure names the seed; `CHAOS_SEED=<seed>` replays the same
//! schedule and the same client choices. `CHAOS_SECS` sets how long faults
//! are drawn for each NATS shape (default 40 s; `benches/chaos.sh` runs
//! longer and over many seeds).
#![allow(unreachable_pub)]

#[allow(dead_code, unreachable_pub)]
#[path = "../../../../tests/support/nats.rs"]
mod nats;
#[allow(dead_code, unreachable_pub)]
#[path = "../../../../tests/support/nginx.rs"]
mod nginx;

#[path = "../binary/mod.rs"]
mod binary;

mod client;
mod cluster;
mod faults;
mod moderator;

use chat_proto::{Message, ServerFrame, SyncPoint};
use chat_testkit::FrameValidator;
use client::{Control, Record};
use cluster::Cluster;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS: usize = 24;

fn seed() -> u64 {
    match std::env::var("CHAOS_SEED") {
        Ok(s) => s.parse().expect("CHAOS_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_nanos() as u64,
    }
}

fn run_secs() -> u64 {
    std::env::var("CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
}

#[test]
fn chaos_every_acknowledged_message_survives_and_every_view_agrees() {
    let seed = seed();
    let secs = run_secs();
    say(&format!(
        "chaos: seed {seed} ({secs} s of faults per NATS shape); replay with CHAOS_SEED={seed}"
    ));
    let mut failures = Vec::new();
    // CHAOS_NATS=1 or 3: one shape only (to replay a failure faster).
    let shapes = match std::env::var("CHAOS_NATS").as_deref() {
        Ok("1") => vec![false],
        Ok("3") => vec![true],
        _ => vec![false, true],
    };
    for three_nats in shapes {
        failures.extend(
            one_shape(seed, secs, three_nats)
                .into_iter()
                .map(|f| format!("[{} NATS] {f}", if three_nats { 3 } else { 1 })),
        );
    }
    say(&format!("chaos: {} problem(s)", failures.len()));
    for f in &failures {
        say(&format!("  {f}"));
    }
    assert!(
        failures.is_empty(),
        "chaos (seed {seed}; replay with CHAOS_SEED={seed}) found {} problem(s), listed above; the first:\n  {}",
        failures.len(),
        failures
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

/// One run: returns what failed.
fn one_shape(seed: u64, secs: u64, three_nats: bool) -> Vec<String> {
    let steps = faults::schedule(seed, Duration::from_secs(secs), three_nats);
    say(&format!(
        "chaos: {} NATS server(s), {} faults: {:?}",
        if three_nats { 3 } else { 1 },
        steps.len(),
        steps.iter().map(|s| &s.fault).collect::<Vec<_>>()
    ));
    let mut cluster = Cluster::start(three_nats);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let validator = Arc::new(FrameValidator::server_frames());
    let stop = Arc::new(AtomicBool::new(false));
    let (set_target, target) = tokio::sync::watch::channel(None);
    let mut targets = vec![cluster.nginx.port];
    targets.extend(cluster.nodes.iter().map(|n| n.port));
    let taken = Arc::new(Mutex::new(Vec::new()));
    let moderator = rt.spawn(moderator::run(
        seed ^ u64::from(three_nats),
        targets.clone(),
        Arc::clone(&taken),
        (0..CLIENTS)
            .map(|i| client::address(i).to_string())
            .collect(),
        Arc::clone(&stop),
    ));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            rt.spawn(client::run(
                i,
                seed ^ u64::from(three_nats),
                targets.clone(),
                Arc::clone(&validator),
                Control {
                    stop: Arc::clone(&stop),
                    target: target.clone(),
                    taken: Arc::clone(&taken),
                },
            ))
        })
        .collect();

    // The faults.
    let started = Instant::now();
    let mut lost_tail = None;
    for step in &steps {
        cluster.wait(step.after);
        if faults::apply(&mut cluster, &step.fault) {
            lost_tail = Some(Instant::now());
        }
    }
    let rewound = lost_tail.is_some();
    let faulted = started.elapsed();

    // Calm: every node runs, the clients finish the commands in hand, and
    // the nodes agree.
    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    let orders = rt
        .block_on(moderator)
        .unwrap_or_else(|e| panic!("the moderator panicked: {e}"));
    // And a node that joins now must compute the same chat from the log:
    // a node that applied entries the stream lost, or skipped one, holds
    // another chat than the log says, which only a newcomer can show. It
    // applies the whole stream, with no snapshot to start from, so it
    // meets every entry erased after a removal (and its tombstone).
    // JetStream may be electing a leader after the last fault: asked again
    // for up to 30 s.
    let forgot = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match forget_snapshots(&cluster).await {
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                done => return done,
            }
        }
    });
    match forgot {
        Ok(n) => say(&format!(
            "chaos: the cluster's {n} snapshot(s) deleted: the new node applies the whole stream"
        )),
        Err(e) => failures.push(format!("the cluster's snapshots could not be deleted: {e}")),
    }
    cluster.add_fresh_node();
    if !cluster.settle(Duration::from_secs(90)) {
        failures.push("not every node served again within 90 s of the last fault".to_owned());
    }
    let agreed = rt.block_on(agreement(&mut cluster, &mut failures));
    let _ = set_target.send(agreed.as_ref().map(|(_, at)| *at));
    // One deadline for all of them: a client that cannot reach the
    // target (a node serving something else) must not hold the run.
    let mut behind = Vec::new();
    let records: Vec<Record> = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut out = Vec::new();
        for (i, c) in clients.into_iter().enumerate() {
            let abort = c.abort_handle();
            match tokio::time::timeout_at(deadline, c).await {
                Ok(Ok(r)) => out.push(r),
                Ok(Err(e)) => failures.push(format!("client {i} panicked: {e}")),
                Err(_) => {
                    abort.abort();
                    behind.push(i);
                }
            }
        }
        out
    });
    if !behind.is_empty() {
        failures.push(format!(
            "{} client(s) never caught up with where the nodes agree ({:?}): {behind:?}",
            behind.len(),
            agreed.as_ref().map(|(_, at)| at)
        ));
    }
    if three_nats && !rewound {
        rt.block_on(replicas_agree(&cluster, &mut failures));
    }
    if let Some((history, at)) = &agreed {
        match rt.block_on(moderator::audit(cluster.nodes[0].port)) {
            Ok(audit) => {
                for node in &cluster.nodes[1..] {
                    match rt.block_on(moderator::audit(node.port)) {
                        Ok(theirs) if theirs == audit => {}
                        Ok(theirs) => failures.push(format!(
                            "node {} serves another audit trail ({} entries) than node 0 ({})",
                            node.slot,
                            theirs.len(),
                            audit.len()
                        )),
                        Err(e) => failures.push(format!(
                            "node {} did not serve its audit trail: {e}",
                            node.slot
                        )),
                    }
                }
                let removed = moderator::removed(&audit);
                check(&records, history, rewound, &removed, &mut failures);
                moderator::check(&orders, &audit, history, lost_tail, &mut failures);
                // And the texts removed are erased from the stream.
                let texts: Vec<String> = records
                    .iter()
                    .flat_map(|r| &r.acked)
                    .filter(|a| removed.contains(&a.id))
                    .map(|a| a.text.clone())
                    .collect();
                match rt.block_on(moderator::still_in_the_stream(cluster.nats.addrs(), &texts)) {
                    Ok(held) if held.is_empty() => {}
                    Ok(held) => failures.push(format!(
                        "{} of {} removed messages are still in the stream's entries: {:?}",
                        held.len(),
                        texts.len(),
                        &held[..held.len().min(5)]
                    )),
                    Err(e) => failures.push(format!("the stream could not be read: {e}")),
                }
                say(&format!(
                    "chaos: moderation: {}",
                    moderator::summary(&orders, &audit)
                ));
            }
            Err(e) => failures.push(format!("node 0 did not serve its audit trail: {e}")),
        }
        report(&records, at, faulted, &cluster, rewound);
    }
    for node in &mut cluster.nodes {
        failures.extend(
            node.panics()
                .into_iter()
                .map(|p| format!("node {} {p}", node.slot)),
        );
        if let Some(code) = node.stop()
            && code != 0
        {
            failures.push(format!("node {} exited with {code} on SIGTERM", node.slot));
        }
    }
    if !failures.is_empty() {
        let logs = std::mem::replace(&mut cluster.logs, tempfile::tempdir().expect("dir"));
        let kept = logs.keep();
        failures.push(format!("the nodes' logs are kept in {}", kept.display()));
    }
    failures
}

/// Waits until every node serves the same history at the same position
/// and epoch (within 60 s), and returns it.
async fn agreement(
    cluster: &mut Cluster,
    failures: &mut Vec<String>,
) -> Option<(Vec<Message>, SyncPoint)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut seen = Vec::new();
        for node in &cluster.nodes {
            seen.push(served(node.port).await);
        }
        if let Some(Some(first)) = seen.first()
            && seen.iter().all(|s| s.as_ref() == Some(first))
        {
            // Still the same a moment later: the chat is quiet.
            tokio::time::sleep(Duration::from_secs(1)).await;
            if served(cluster.nodes[0].port).await.as_ref() == Some(first) {
                return Some(first.clone());
            }
        }
        if Instant::now() > deadline {
            let said: Vec<String> = seen
                .iter()
                .enumerate()
                .map(|(i, s)| match s {
                    Some((h, at)) => format!("node {i}: {} messages at {at:?}", h.len()),
                    None => format!("node {i}: no answer"),
                })
                .collect();
            failures.push(format!(
                "the nodes never agreed on one history, position and epoch: {}",
                said.join("; ")
            ));
            return None;
        }
        cluster.supervise();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// With three NATS servers: whether each holds the same entries of the
/// chat's stream. Each is made the stream's leader in turn (a stepdown
/// that prefers it) and the stream read through it. If replicas differ,
/// a node that judged the stream "rewound" may have been right (issue 22's
/// open question). A server that does not take the lead within 10 s is
/// reported, not failed: the question is then left open for that run.
async fn replicas_agree(cluster: &Cluster, failures: &mut Vec<String>) {
    let client = match async_nats::connect(cluster.nats.addrs()).await {
        Ok(client) => client,
        Err(e) => {
            say(&format!(
                "chaos: replicas not compared: no NATS connection ({e}; {})",
                cluster.nats.urls()
            ));
            return;
        }
    };
    let js = async_nats::jetstream::new(client);
    let mut read: Vec<(usize, Vec<(u64, u64)>)> = Vec::new();
    for i in 0..3usize {
        let name = format!("n{i}");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut leading = false;
        while !leading && Instant::now() < deadline {
            let Ok(mut stream) = js.get_stream("chat").await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let leader = stream
                .info()
                .await
                .ok()
                .and_then(|info| info.cluster.as_ref().and_then(|c| c.leader.clone()));
            if leader.as_deref() == Some(name.as_str()) {
                leading = true;
                break;
            }
            let ask = serde_json::json!({ "placement": { "preferred": name } });
            let _: Result<serde_json::Value, _> =
                js.request("STREAM.LEADER.STEPDOWN.chat", &ask).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if !leading {
            say(&format!(
                "chaos: replicas not compared: {name} did not take the lead"
            ));
            return;
        }
        let Ok(mut stream) = js.get_stream("chat").await else {
            return;
        };
        let Ok(info) = stream.info().await else {
            return;
        };
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut entries = Vec::new();
        for seq in first..=last {
            if let Ok(m) = stream.get_raw_message(seq).await {
                let mut h = std::hash::DefaultHasher::new();
                std::hash::Hash::hash(&m.payload[..], &mut h);
                entries.push((seq, std::hash::Hasher::finish(&h)));
            }
        }
        read.push((i, entries));
    }
    let (_, first) = &read[0];
    for (i, entries) in &read[1..] {
        if entries != first {
            let at = first
                .iter()
                .zip(entries)
                .find(|(a, b)| a != b)
                .map(|(a, _)| a.0);
            failures.push(format!(
                "NATS server n{i} holds other entries of the stream than n0 ({} against {} entries; first difference at {at:?})",
                entries.len(),
                first.len()
            ));
        }
    }
    say(&format!(
        "chaos: the three NATS servers hold the same {} entries: {}",
        first.len(),
        read.iter().all(|(_, e)| e == first)
    ));
}

/// Deletes every snapshot in the cluster's bucket (as an operator may):
/// how many there were.
async fn forget_snapshots(cluster: &Cluster) -> Result<usize, String> {
    use futures_util::StreamExt;
    let client = async_nats::connect(cluster.nats.addrs())
        .await
        .map_err(|e| format!("no NATS connection: {e}"))?;
    let js = async_nats::jetstream::new(client);
    let bucket = js
        .get_object_store("chat-snapshots")
        .await
        .map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    let mut list = bucket.list().await.map_err(|e| e.to_string())?;
    while let Some(object) = list.next().await {
        let object = object.map_err(|e| e.to_string())?;
        if !object.deleted {
            names.push(object.name);
        }
    }
    for name in &names {
        bucket.delete(name).await.map_err(|e| e.to_string())?;
    }
    Ok(names.len())
}

/// What a node serves a new client: the history and its sync point.
async fn served(port: u16) -> Option<(Vec<Message>, SyncPoint)> {
    let url = format!("ws://127.0.0.1:{port}/ws?sync");
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(3),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .ok()?
    .ok()?;
    use futures_util::StreamExt;
    let mut history = Vec::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .ok()??
            .ok()?;
        let tokio_tungstenite::tungstenite::Message::Text(t) = frame else {
            continue;
        };
        match ServerFrame::decode(&t).ok()? {
            ServerFrame::Message(m) => history.push(m),
            ServerFrame::Sync(at) => return Some((history, at)),
            _ => return None,
        }
    }
}

/// The checks. `history` is what every node serves; `removed`, what the
/// audit trail says the moderator removed.
fn check(
    records: &[Record],
    history: &[Message],
    rewound: bool,
    removed: &HashSet<chat_proto::Uuid>,
    failures: &mut Vec<String>,
) {
    let mut fail = |f: String| failures.push(f);
    let by_id: HashMap<_, _> = history.iter().map(|m| (m.id, m)).collect();
    if by_id.len() != history.len() {
        fail("a message id appears twice in the history".into());
    }
    let mut texts = HashMap::new();
    for m in history {
        *texts.entry(m.text.as_str()).or_insert(0) += 1;
    }
    for (text, n) in &texts {
        if *n > 1 {
            fail(format!("{text:?} is in the history {n} times"));
        }
    }
    // Nothing no client sent.
    let sent: HashSet<&str> = records
        .iter()
        .flat_map(|r| r.sent.iter().map(String::as_str))
        .collect();
    for m in history {
        if !sent.contains(m.text.as_str()) {
            fail(format!(
                "{:?} is in the history, and no client sent it",
                m.text
            ));
        }
    }
    for r in records {
        let who = &r.user;
        // A rewind is the only excuse for a reset by epoch.
        if r.epoch_resets > 0 && !rewound {
            fail(format!(
                "{who} was told the epoch changed, but the log was never rewound"
            ));
        }
        // `expired` is allowed: a brand-new node starts from a snapshot and
        // holds no events before it, so a client resuming there from an
        // older position gets the full history instead (README, "A node's
        // own snapshot"). Its view is rebuilt, and checked below like any.
        // `ahead` would mean a node served a position it had not reached.
        if r.other_resets.contains(&chat_proto::ResetReason::Ahead) {
            fail(format!("{who} was told its position is ahead of the chat"));
        }
        // Every acknowledged message, once, unless a rewind was announced
        // to this client after it.
        for a in &r.acked {
            let excused = rewound && r.epoch_resets > a.resets_before;
            match by_id.get(&a.id) {
                Some(m) if m.text == a.text => {}
                Some(m) => fail(format!(
                    "{who}: message {} is {:?}, not {:?}",
                    a.id, m.text, a.text
                )),
                None if excused || removed.contains(&a.id) => {}
                None => fail(format!("{who}: acknowledged {:?} is missing", a.text)),
            }
        }
        // Nothing refused.
        for (text, why) in &r.refused {
            if texts.contains_key(text.as_str()) {
                fail(format!(
                    "{who}: {text:?} was refused ({why}) yet is in the history"
                ));
            }
        }
        // Each user's reaction is its last acknowledged toggle.
        for ((id, emoji), t) in &r.toggles {
            let (Some((reacted, resets)), false) = (t.last, t.uncertain) else {
                continue;
            };
            if resets < r.epoch_resets {
                continue; // acknowledged in an epoch that was rewound
            }
            let Some(m) = by_id.get(id) else {
                if !removed.contains(id) {
                    fail(format!("{who}: reacted to {id}, which is missing"));
                }
                continue;
            };
            let now = m
                .reactions
                .get(emoji)
                .is_some_and(|users| users.iter().any(|u| u.as_str() == who));
            if now != reacted {
                fail(format!(
                    "{who}: {emoji} on {id} is {now} in the history; the last toggle acknowledged said {reacted}"
                ));
            }
        }
        // The client's own view is the history.
        let view = r.history();
        if view.len() != history.len() || view.iter().zip(history).any(|(a, b)| *a != b) {
            let differ = view
                .iter()
                .zip(history)
                .position(|(a, b)| *a != b)
                .unwrap_or(view.len().min(history.len()));
            fail(format!(
                "{who}'s view ({} messages) differs from the history ({}) from message {differ} on",
                view.len(),
                history.len()
            ));
        }
        for a in &r.anomalies {
            fail(format!("{who}: {a}"));
        }
    }
}

fn report(records: &[Record], at: &SyncPoint, faulted: Duration, cluster: &Cluster, rewound: bool) {
    let sum = |f: fn(&Record) -> usize| records.iter().map(f).sum::<usize>();
    say(&format!(
        "chaos: {:.0} s of faults; final position {} (epoch {}); acknowledged {} messages and {} toggles; \
         refused {}; unknown {}; {} connections; {} frames validated; epoch resets {} (log rewound: {rewound}); \
         other resets {}; \
         supervisor restarts {}: {:?}",
        faulted.as_secs_f64(),
        at.position,
        at.epoch,
        sum(|r| r.acked.len()),
        sum(|r| r.toggles_acked),
        sum(|r| r.refused.len()),
        sum(|r| r.unknown.len()),
        sum(|r| r.connections),
        records.iter().map(|r| r.frames).sum::<u64>(),
        sum(|r| r.epoch_resets),
        sum(|r| r.other_resets.len()),
        cluster.restarts.len(),
        cluster.restarts,
    ));
}

/// Prints `line`, and appends it to `target/tmp/chaos-report.txt`, which
/// `.ci/run` shows (the test's output is hidden when it passes).
fn say(line: &str) {
    use std::io::Write;
    println!("{line}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-report.txt");
    if let Ok(mut f) = std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}
