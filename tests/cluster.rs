//! Cluster mode over a real `nats-server` with JetStream: several nodes,
//! one chat. Each test starts its own NATS server on a free port with its
//! own store directory.

mod support;

use chat_proto::{Epoch, Position, ServerFrame, Sync};
use chat_server::Config;
use support::nats::NatsServer;
use support::{Client, TestServer, test_config};

fn node(nats: &NatsServer, name: &str) -> Config {
    Config {
        cluster: Some(nats.url()),
        node_id: Some(name.into()),
        ..test_config()
    }
}

/// Reads frames until a `sync`; returns the frames before it and the sync.
async fn until_sync(c: &mut Client) -> (Vec<ServerFrame>, Sync) {
    let mut frames = Vec::new();
    loop {
        match c.frame().await {
            ServerFrame::Sync(s) => return (frames, s),
            other => frames.push(other),
        }
    }
}

/// Reads a `?sync` client's frames (skipping `sync`s) until it has `n`.
async fn frames(c: &mut Client, n: usize) -> Vec<ServerFrame> {
    let mut out = Vec::new();
    while out.len() < n {
        match c.frame().await {
            ServerFrame::Sync(_) => {}
            other => out.push(other),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_one_chat_in_one_order_with_the_same_positions() {
    let nats = NatsServer::start();
    let a = TestServer::start(node(&nats, "a")).await;
    let b = TestServer::start(node(&nats, "b")).await;
    let c = TestServer::start(node(&nats, "c")).await;
    let mut watchers = Vec::new();
    for server in [&a, &b, &c] {
        let mut w = server.try_client(9, "/ws?sync", &[]).await.expect("ws");
        let (history, sync) = until_sync(&mut w).await;
        assert!(history.is_empty());
        assert_eq!(sync.position, Position(0));
        watchers.push((w, sync.epoch));
    }
    let epoch = watchers[0].1;
    assert!(
        watchers.iter().all(|(_, e)| *e == epoch),
        "one stream, one epoch"
    );

    // Clients on different nodes post and react, interleaved.
    let mut on_a = a.client(2).await;
    let mut on_b = b.client(3).await;
    let mut on_c = c.client(4).await;
    on_a.say("from a").await;
    on_b.say("from b").await;
    on_c.say("from c").await;
    let first = on_a.message().await;
    on_b.react(first.id, "👍").await;
    on_c.react(first.id, "👍").await;

    let mut seen = Vec::new();
    for (w, _) in &mut watchers {
        seen.push(frames(w, 5).await);
    }
    assert_eq!(seen[0], seen[1], "node a and node b differ");
    assert_eq!(seen[0], seen[2], "node a and node c differ");
    let last = match &seen[0][4] {
        ServerFrame::ReactionUpdated(r) => r.message.clone(),
        other => panic!("{other:?}"),
    };
    let reactors: Vec<&str> = last.reactions["👍"].iter().map(|u| u.as_str()).collect();
    assert_eq!(reactors.len(), 2);

    // A node that starts later catches up before it serves: it shows the
    // same history.
    let d = TestServer::start(node(&nats, "d")).await;
    let mut late = d.try_client(9, "/ws?sync", &[]).await.expect("ws");
    let (history, sync) = until_sync(&mut late).await;
    assert_eq!(
        sync,
        Sync {
            epoch,
            position: Position(5)
        }
    );
    let messages = |frames: &[ServerFrame]| -> Vec<chat_proto::Message> {
        frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Message(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    };
    let mut expected = messages(&seen[0]);
    expected[0] = last;
    assert_eq!(messages(&history), expected, "the late node's history");
    for server in [a, b, c, d] {
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_is_exact_across_nodes() {
    let nats = NatsServer::start();
    let mut config = node(&nats, "x");
    config.message_rate = 6;
    let nodes = [
        TestServer::start(Config {
            node_id: Some("a".into()),
            ..config.clone()
        })
        .await,
        TestServer::start(Config {
            node_id: Some("b".into()),
            ..config.clone()
        })
        .await,
        TestServer::start(Config {
            node_id: Some("c".into()),
            ..config
        })
        .await,
    ];
    // One address, one user, connected to all three.
    let mut clients = Vec::new();
    for server in &nodes {
        clients.push(server.client(2).await);
    }
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..7 {
        let c = &mut clients[i % 3];
        c.say(&format!("m{i}")).await;
        // Each node's own outcome: its echo, or a refusal.
        loop {
            match c.frame().await {
                ServerFrame::Message(m) if m.text == format!("m{i}") => {
                    accepted += 1;
                    break;
                }
                ServerFrame::Message(_) => {}
                ServerFrame::Error(e) => {
                    assert_eq!(
                        e.error,
                        "Rate limit exceeded. Maximum 6 messages per minute."
                    );
                    refused += 1;
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(
        (accepted, refused),
        (6, 1),
        "7 messages over 3 nodes, limit 6"
    );
    for server in nodes {
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_node() {
    let nats = NatsServer::start();
    let a = TestServer::start(node(&nats, "a")).await;
    let b = TestServer::start(node(&nats, "b")).await;
    let mut sender = a.client(2).await;
    sender.say("before").await;
    sender.message().await;

    let mut c = a.try_client(3, "/ws?sync", &[]).await.expect("ws");
    let (_, at) = until_sync(&mut c).await;
    drop(c);
    // While it is away (its node died, say), more is said.
    for text in ["away 1", "away 2"] {
        sender.say(text).await;
        sender.message().await;
    }
    let path = format!("/ws?since={}&epoch={}", at.position, at.epoch);
    let mut back = b.try_client(3, &path, &[]).await.expect("ws");
    let (missed, sync) = until_sync(&mut back).await;
    let texts: Vec<String> = missed
        .iter()
        .map(|f| match f {
            ServerFrame::Message(m) => m.text.clone(),
            other => panic!("a resume on another node: {other:?}"),
        })
        .collect();
    assert_eq!(texts, ["away 1", "away 2"]);
    assert_eq!(sync.position, Position(at.position.0 + 2));
    let _: Epoch = sync.epoch;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_in_the_stream_is_skipped_by_every_node_alike() {
    let nats = NatsServer::start();
    let a = TestServer::start(node(&nats, "a")).await;
    let mut on_a = a.try_client(2, "/ws?sync", &[]).await.expect("ws");
    until_sync(&mut on_a).await;
    // Something else publishes to the chat's subject.
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    for junk in [&b"not json"[..], br#"{"v":1,"node":"?"}"#, b""] {
        js.publish("chat.commands", junk.to_vec().into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
    on_a.say("after the junk").await;
    let got = frames(&mut on_a, 1).await;
    assert!(matches!(&got[0], ServerFrame::Message(m) if m.text == "after the junk"));
    // A node that reads the same stream from the start agrees.
    let b = TestServer::start(node(&nats, "b")).await;
    let mut on_b = b.try_client(3, "/ws?sync", &[]).await.expect("ws");
    let (history, sync) = until_sync(&mut on_b).await;
    assert_eq!(history, got);
    assert_eq!(sync.position, Position(1), "junk takes no position");
    a.shutdown().await;
    b.shutdown().await;
}
