//! Moderation end to end: the operator API under `/admin/` (its keys, its
//! refusals, its answers), what clients see of each order, and that it
//! all survives a restart.

mod support;

use chat_proto::{AuditEntry, Moderation, Position, RestrictionEntry, Room, ServerFrame, Uuid};
use std::time::Duration;
use support::admin::{ALICE, BOB, as_alice, decode, order, refusal, remove, request, with_keys};
use support::{TestServer, test_config};

/// A config with alice's and bob's keys.
fn moderated_config() -> (tempfile::NamedTempFile, chat_server::Config) {
    with_keys(test_config())
}

#[tokio::test]
async fn a_removed_message_leaves_every_view_live_and_for_whoever_comes_later() {
    let (_keys, config) = moderated_config();
    let server = TestServer::start(config).await;
    // A client of the seed protocol, and one that opted in.
    let mut seed = server.client(1).await;
    let mut synced = server
        .try_client(2, "/ws?sync", &[])
        .await
        .expect("handshake");
    synced.until_sync().await;
    seed.say("buy cheap pills").await;
    let spam = seed.message().await;
    assert!(
        matches!(synced.frames_but_syncs(1).await[..], [ServerFrame::Message(ref m)] if m.id == spam.id)
    );
    seed.say("a fine message").await;
    seed.message().await;
    synced.frames_but_syncs(1).await;

    let at = remove(&server, spam.id, Some("spam")).await;
    assert_eq!(at, Position(3), "the removal has its own position");
    // Live: the client that opted in is told; the seed client is not
    // sent anything it cannot understand.
    match &synced.frames_but_syncs(1).await[..] {
        [ServerFrame::MessageRemoved(r)] => assert_eq!(r.message_id, spam.id),
        other => panic!("{other:?}"),
    }
    seed.quiet_for(Duration::from_millis(300)).await;
    // Whoever joins later never gets it.
    let mut later = server.client(3).await;
    later.say("hello").await;
    let mut texts = Vec::new();
    loop {
        let m = later.message().await;
        if m.text == "hello" {
            break;
        }
        texts.push(m.text);
    }
    assert_eq!(texts, ["a fine message"]);
    // A reaction to it is refused as to any message that is not there.
    seed.react(spam.id, "👍").await;
    loop {
        match seed.frame().await {
            ServerFrame::Error(e) => {
                assert_eq!(e.error, "message not found");
                break;
            }
            ServerFrame::Message(_) => {}
            other => panic!("{other:?}"),
        }
    }
    // A resume from before the post gets neither the post nor its text.
    let mut resumed = server
        .try_client(
            4,
            &format!("/ws?since=0&epoch={}", synced_epoch(&server).await),
            &[],
        )
        .await
        .expect("handshake");
    let (frames, _) = resumed.until_sync().await;
    for frame in &frames {
        if let ServerFrame::Message(m) = frame {
            assert_ne!(m.id, spam.id, "the removed post was resent on a resume");
        }
    }
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, ServerFrame::MessageRemoved(r) if r.message_id == spam.id))
    );
    // Unknown, or removed already: 404, with the chat's text.
    let again = as_alice(
        &server,
        "POST",
        "/admin/remove_message",
        Some(&format!(r#"{{"message_id":"{}"}}"#, spam.id)),
    )
    .await;
    assert_eq!(again.status, 404);
    assert_eq!(refusal(&again), "message not found");
}

/// The epoch the server's log is in, from a client that opts in.
async fn synced_epoch(server: &TestServer) -> chat_proto::Epoch {
    let mut c = server
        .try_client(5, "/ws?sync", &[])
        .await
        .expect("handshake");
    c.until_sync().await.1.epoch
}

#[tokio::test]
async fn a_timed_out_user_still_reads_but_neither_posts_nor_reacts_until_it_ends() {
    let (_keys, config) = moderated_config();
    let server = TestServer::start(config).await;
    let mut troll = server.client(1).await;
    let mut other = server.client(2).await;
    other.say("hi all").await;
    let hi = other.message().await;
    troll.message().await;
    order(
        &server,
        "/admin/restrict_user",
        r#"{"user_id":"127.0.0.1","term":{"seconds":2},"reason":"cool off"}"#,
    )
    .await;
    troll.say("I am back").await;
    let error = troll.error().await;
    assert!(
        error.starts_with("You are timed out until 20") && error.ends_with("Z."),
        "{error}"
    );
    troll.react(hi.id, "👎").await;
    assert!(troll.error().await.starts_with("You are timed out until"));
    // Reading goes on.
    other.say("still here").await;
    assert_eq!(troll.message().await.text, "still here");
    other.message().await;
    // Listed while in force, by whom and why.
    let list: Vec<RestrictionEntry> =
        decode(&as_alice(&server, "GET", "/admin/restrictions", None).await);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].restriction.user_id.as_str(), "127.0.0.1");
    assert_eq!(list[0].restriction.reason.as_deref(), Some("cool off"));
    assert_eq!(list[0].by.as_str(), "moderator:alice");
    // Once it ends, the user posts again.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    troll.say("sorry").await;
    assert_eq!(troll.message().await.text, "sorry");
    let list: Vec<RestrictionEntry> =
        decode(&as_alice(&server, "GET", "/admin/restrictions", None).await);
    assert!(list.is_empty(), "an ended time-out is not listed: {list:?}");
}

#[tokio::test]
async fn a_ban_with_a_purge_removes_the_users_messages_and_a_lift_ends_it() {
    let (_keys, config) = moderated_config();
    let server = TestServer::start(config).await;
    let mut spammer = server.client(1).await;
    let mut watcher = server
        .try_client(2, "/ws?sync", &[])
        .await
        .expect("handshake");
    watcher.until_sync().await;
    for text in ["spam one", "spam two"] {
        spammer.say(text).await;
        spammer.message().await;
    }
    let mut other = server.client(3).await;
    other.say("innocent").await;
    watcher.frames_but_syncs(3).await;
    order(
        &server,
        "/admin/restrict_user",
        r#"{"user_id":"127.0.0.1","term":"forever","purge":"all"}"#,
    )
    .await;
    let frames = watcher.frames_but_syncs(3).await;
    let removed = frames
        .iter()
        .filter(|f| matches!(f, ServerFrame::MessageRemoved(_)))
        .count();
    assert_eq!(removed, 2, "{frames:?}");
    assert!(
        matches!(frames.last(), Some(ServerFrame::UserRestricted(r)) if r.until.is_none() && r.user_id.as_str() == "127.0.0.1"),
        "{frames:?}"
    );
    spammer.say("more spam").await;
    loop {
        match spammer.frame().await {
            ServerFrame::Error(e) => {
                assert_eq!(e.error, "You are banned from this chat.");
                break;
            }
            ServerFrame::Message(m) => assert_eq!(m.text, "innocent"),
            other => panic!("{other:?}"),
        }
    }
    order(
        &server,
        "/admin/lift_restriction",
        r#"{"user_id":"127.0.0.1","reason":"appealed"}"#,
    )
    .await;
    spammer.say("thank you").await;
    assert_eq!(spammer.message().await.text, "thank you");
    let lifted = as_alice(
        &server,
        "POST",
        "/admin/lift_restriction",
        Some(r#"{"user_id":"127.0.0.1"}"#),
    )
    .await;
    assert_eq!(lifted.status, 404);
    assert_eq!(refusal(&lifted), "user is not restricted");
    // The audit trail: who, when, why, and where.
    let audit: Vec<AuditEntry> = decode(&as_alice(&server, "GET", "/admin/audit", None).await);
    assert_eq!(audit.len(), 2);
    assert!(matches!(audit[0].command, Moderation::RestrictUser(_)));
    assert_eq!(audit[0].removed.len(), 2);
    assert!(
        matches!(&audit[1].command, Moderation::LiftRestriction(l) if l.reason.as_deref() == Some("appealed"))
    );
    assert!(audit.iter().all(|e| e.by.as_str() == "moderator:alice"));
    assert!(audit[0].position < audit[1].position);
    let page: Vec<AuditEntry> = decode(
        &as_alice(
            &server,
            "GET",
            &format!("/admin/audit?since={}", audit[0].position),
            None,
        )
        .await,
    );
    assert_eq!(page, audit[1..]);
}

#[tokio::test]
async fn slow_mode_lets_one_message_through_per_window() {
    let (_keys, config) = moderated_config();
    let server = TestServer::start(config).await;
    order(&server, "/admin/set_room", r#"{"slow_mode_seconds":30}"#).await;
    let room: Room = decode(&as_alice(&server, "GET", "/admin/room", None).await);
    assert_eq!(room.slow_mode_seconds, 30);
    let mut c = server.client(1).await;
    c.say("first").await;
    c.message().await;
    c.say("second").await;
    let error = c.error().await;
    assert!(
        error.starts_with("Slow mode is on: one message every 30 seconds. You may post again at "),
        "{error}"
    );
    let mut d = server.client(2).await;
    d.message().await;
    d.say("another user").await;
    assert_eq!(d.message().await.text, "another user");
    order(&server, "/admin/set_room", r#"{"slow_mode_seconds":0}"#).await;
    c.say("third").await;
    loop {
        if c.message().await.text == "third" {
            break;
        }
    }
}

#[tokio::test]
async fn the_operator_api_refuses_without_a_key_a_wrong_key_and_a_guesser() {
    let (_keys, config) = moderated_config();
    let server = TestServer::start(config).await;
    let none = request(&server, 7, "GET", "/admin/room", None, None).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    let wrong = request(
        &server,
        7,
        "GET",
        "/admin/room",
        Some("not-a-key-0123456789abcdef"),
        None,
    )
    .await;
    assert_eq!(wrong.status, 401);
    // Guessing: after ten failures, even the right key is refused from
    // that address for a minute; another address is not affected.
    for _ in 0..8 {
        let r = request(
            &server,
            7,
            "GET",
            "/admin/room",
            Some("guess-0123456789abcdefghij"),
            None,
        )
        .await;
        assert_eq!(r.status, 401);
    }
    let shut = request(&server, 7, "GET", "/admin/room", Some(ALICE), None).await;
    assert_eq!(shut.status, 429);
    assert_eq!(shut.header("retry-after"), Some("60"));
    let elsewhere = request(&server, 8, "GET", "/admin/room", Some(BOB), None).await;
    assert_eq!(elsewhere.status, 200);
    // Counted, by reason.
    let metrics = request(&server, 8, "GET", "/metrics", None, None).await;
    let text = String::from_utf8_lossy(&metrics.body);
    for line in [
        "chat_admin_denied_total{reason=\"no_key\"} 1",
        "chat_admin_denied_total{reason=\"wrong_key\"} 9",
        "chat_admin_denied_total{reason=\"too_many_failures\"} 1",
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
    // The API's own refusals.
    let get_order = as_alice(&server, "GET", "/admin/remove_message", None).await;
    assert_eq!(
        (get_order.status, get_order.header("allow")),
        (405, Some("POST"))
    );
    let unknown = as_alice(&server, "GET", "/admin/nothing", None).await;
    assert_eq!(unknown.status, 404);
    let bad = as_alice(
        &server,
        "POST",
        "/admin/set_room",
        Some(r#"{"slow_mode_secs":5}"#),
    )
    .await;
    assert_eq!(bad.status, 400, "an unknown field is refused, not ignored");
    assert!(refusal(&bad).starts_with("Invalid body: unknown field `slow_mode_secs`"));
    let big = "x".repeat(20_000);
    let too_big = as_alice(&server, "POST", "/admin/remove_message", Some(&big)).await;
    assert_eq!(too_big.status, 413);
    let against_rules = as_alice(
        &server,
        "POST",
        "/admin/restrict_user",
        Some(r#"{"user_id":"u","term":{"seconds":0}}"#),
    )
    .await;
    assert_eq!(against_rules.status, 422);
    assert_eq!(
        refusal(&against_rules),
        "a time-out lasts from 1 second to 366 days (ban for longer)"
    );
    let unknown_message = as_alice(
        &server,
        "POST",
        "/admin/remove_message",
        Some(&format!(r#"{{"message_id":"{}"}}"#, Uuid::from_u128(7))),
    )
    .await;
    assert_eq!(unknown_message.status, 404);
}

#[tokio::test]
async fn without_a_keys_file_there_is_no_operator_api() {
    let server = TestServer::start(test_config()).await;
    let reply = as_alice(&server, "GET", "/admin/room", None).await;
    assert_eq!(reply.status, 404);
    assert!(refusal(&reply).contains("--admin-keys-file"));
    let metrics = request(&server, 8, "GET", "/metrics", None, None).await;
    assert!(!String::from_utf8_lossy(&metrics.body).contains("admin_denied_total{"));
}

#[tokio::test]
async fn a_bad_keys_file_stops_the_start_with_a_reason() {
    let mut keys = tempfile::NamedTempFile::new().expect("keys file");
    std::io::Write::write_all(&mut keys, b"alice short\n").expect("write");
    let mut config = test_config();
    config.admin_keys_file = Some(keys.path().to_owned());
    let err = chat_server::Server::bind(config)
        .await
        .expect_err("refused");
    assert!(
        err.to_string().contains("shorter than 24 characters"),
        "{err}"
    );
}

#[tokio::test]
async fn restrictions_removals_and_the_audit_trail_survive_a_restart() {
    let (_keys, mut config) = moderated_config();
    let dir = tempfile::tempdir().expect("tempdir");
    config.in_memory = false;
    config.data_dir = dir.path().to_owned();
    let spam_id = {
        let server = TestServer::start(config.clone()).await;
        let mut c = server.client(1).await;
        c.say("spam").await;
        let spam = c.message().await;
        c.say("kept").await;
        c.message().await;
        remove(&server, spam.id, None).await;
        order(
            &server,
            "/admin/restrict_user",
            r#"{"user_id":"127.0.0.1","term":"forever"}"#,
        )
        .await;
        order(&server, "/admin/set_room", r#"{"slow_mode_seconds":10}"#).await;
        // A connection still open holds the store until it closes.
        drop(c);
        server.shutdown().await;
        spam.id
    };
    let server = TestServer::start(config).await;
    let mut c = server.client(1).await;
    assert_eq!(
        c.message().await.text,
        "kept",
        "the removed message stays gone"
    );
    c.say("again").await;
    assert_eq!(c.error().await, "You are banned from this chat.");
    let audit: Vec<AuditEntry> = decode(&as_alice(&server, "GET", "/admin/audit", None).await);
    assert_eq!(audit.len(), 3);
    assert_eq!(audit[0].removed, [spam_id]);
    let room: Room = decode(&as_alice(&server, "GET", "/admin/room", None).await);
    assert_eq!(room.slow_mode_seconds, 10);
}
