use super::data_dir::LOCK_FILE;
use super::*;
use chat_core::{Chat, Config, Context, Timestamp};
use chat_proto::{AddReaction, ClientFrame, SendMessage, ServerFrame};

const KEEP: usize = 100;

fn epoch(n: u128) -> Epoch {
    Epoch(Uuid::from_u128(n))
}

fn drive(
    chat: &mut Chat,
    store: &mut Store,
    n: u128,
    user: &str,
    cmd: impl Into<chat_core::Command>,
) {
    let ctx = Context {
        user: user.into(),
        now: Timestamp::from_unix_millis(1_700_000_000_000 + n as u64 * 1000),
        message_id: Uuid::from_u128(n),
    };
    chat.handle(ctx, cmd).expect("accepted");
    let entries: Vec<Entry> = std::iter::from_fn(|| chat.poll_event())
        .map(Entry::from)
        .collect();
    store.commit(&entries).expect("commit");
}

fn say(text: &str) -> ClientFrame {
    ClientFrame::SendMessage(SendMessage {
        text: text.into(),
        author_name: Some("Ada".into()),
    })
}

fn react(id: u128, emoji: &str) -> ClientFrame {
    ClientFrame::AddReaction(AddReaction {
        message_id: Uuid::from_u128(id),
        emoji: emoji.into(),
    })
}

#[test]
fn a_reopened_store_gives_back_the_same_chat() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config {
        history_limit: 3,
        ..Config::default()
    };
    let mut chat = Chat::new(cfg.clone());
    let expected = {
        let mut store = Store::open(dir.path(), KEEP).expect("open");
        for i in 1..=4 {
            drive(&mut chat, &mut store, i, "u1", say(&format!("m{i}")));
        }
        drive(&mut chat, &mut store, 10, "u2", react(3, "🎉"));
        drive(&mut chat, &mut store, 11, "u3", react(3, "👍"));
        drive(&mut chat, &mut store, 12, "u1", react(3, "🎉"));
        drive(&mut chat, &mut store, 13, "u2", react(3, "👍"));
        drive(&mut chat, &mut store, 14, "u2", react(3, "👍"));
        chat.history().iter().cloned().collect::<Vec<_>>()
    };
    let mut store = Store::open(dir.path(), KEEP).expect("reopen");
    let loaded = store.load(epoch(1)).expect("load");
    assert_eq!(loaded.messages.len(), 3, "the evicted message was deleted");
    // Debug shows order, which `==` on maps ignores.
    assert_eq!(format!("{:?}", loaded.messages), format!("{expected:?}"));
    assert_eq!(loaded.head, chat.head());
    let (restored, dropped) = Chat::restore(cfg, loaded.messages, loaded.head);
    assert!(dropped.is_empty());
    assert_eq!(restored.history().len(), 3);
    assert_eq!(restored.head(), Position(9), "4 posts and 5 toggles");
}

#[test]
fn the_log_s_head_epoch_and_latest_frames_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut chat = Chat::new(Config::default());
    let mut sent = Vec::new();
    {
        let mut store = Store::open(dir.path(), 5).expect("open");
        assert_eq!(store.load(epoch(1)).expect("load").head, Position::ZERO);
        for i in 1..=8 {
            drive(&mut chat, &mut store, i, "u1", say(&format!("m{i}")));
            let m = chat.history().iter().last().expect("posted").clone();
            sent.push(ServerFrame::Message(m).encode());
        }
    }
    let mut store = Store::open(dir.path(), 5).expect("reopen");
    let loaded = store.load(epoch(2)).expect("load");
    assert_eq!(loaded.epoch, epoch(1), "the epoch drawn first is kept");
    assert_eq!(loaded.head, Position(8));
    let positions: Vec<u64> = loaded.recent.iter().map(|e| e.position.0).collect();
    assert_eq!(positions, [4, 5, 6, 7, 8], "the latest 5, oldest first");
    let frames: Vec<&str> = loaded.recent.iter().map(|e| e.frame.as_str()).collect();
    assert_eq!(
        frames,
        sent[3..].iter().map(String::as_str).collect::<Vec<_>>()
    );

    // A new epoch replaces the old one; nothing else changes.
    store.set_epoch(epoch(3)).expect("new epoch");
    drop(store);
    let mut store = Store::open(dir.path(), 5).expect("reopen");
    let loaded = store.load(epoch(4)).expect("load");
    assert_eq!((loaded.epoch, loaded.head), (epoch(3), Position(8)));
    assert_eq!(loaded.messages.len(), 8);
}

#[test]
fn an_evicted_message_takes_its_events_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config {
        history_limit: 2,
        ..Config::default()
    };
    let mut chat = Chat::new(cfg);
    let mut store = Store::open(dir.path(), KEEP).expect("open");
    // Messages 1, 2; a reaction to 1 (position 3); message 3 evicts 1
    // (position 4): events 1 to 3 go, 1's last at 3.
    drive(&mut chat, &mut store, 1, "u1", say("one"));
    drive(&mut chat, &mut store, 2, "u1", say("two"));
    drive(&mut chat, &mut store, 10, "u2", react(1, "🎉"));
    drive(&mut chat, &mut store, 3, "u1", say("three"));
    let positions = |store: &mut Store| -> Vec<u64> {
        let loaded = store.load(epoch(1)).expect("load");
        loaded.recent.iter().map(|e| e.position.0).collect()
    };
    assert_eq!(positions(&mut store), [4]);
    // A reaction to 2 (5), then 4 evicts 2 (6): 4 and 5 go.
    drive(&mut chat, &mut store, 11, "u2", react(2, "👍"));
    drive(&mut chat, &mut store, 4, "u1", say("four"));
    assert_eq!(positions(&mut store), [6]);
    let loaded = store.load(epoch(1)).expect("load");
    assert_eq!(loaded.recent[0].message, Some(Uuid::from_u128(4)));
}

#[test]
fn a_schema_2_database_names_each_event_s_message_and_forgets_unheld_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let held = Uuid::from_u128(2);
    let gone = Uuid::from_u128(1);
    {
        // A database as schema 2 left it: message 1 evicted, its
        // events still kept.
        let conn = Connection::open(dir.path().join(DB_FILE)).expect("db");
        conn.execute_batch(&format!(
            "CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, id BLOB NOT NULL UNIQUE,
                 text TEXT NOT NULL, author_id TEXT NOT NULL, author_name TEXT NOT NULL,
                 created_at INTEGER NOT NULL, reactions TEXT NOT NULL);
             CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
             CREATE TABLE events (position INTEGER PRIMARY KEY, frame TEXT NOT NULL);
             INSERT INTO meta (key, value) VALUES ('head', 3);
             INSERT INTO messages (id, text, author_id, author_name, created_at, reactions)
                 VALUES (x'{held_hex}', 'two', 'u', 'Anonymous', 1, '{{}}');
             INSERT INTO events VALUES (1, '{{\"type\":\"message\",\"data\":{{\"id\":\"{gone}\"}}}}');
             INSERT INTO events VALUES (2, '{{\"type\":\"reaction_updated\",\"data\":{{\"message_id\":\"{gone}\"}}}}');
             INSERT INTO events VALUES (3, '{{\"type\":\"message\",\"data\":{{\"id\":\"{held}\"}}}}');
             PRAGMA user_version = 2;",
            held_hex = held.simple(),
        ))
        .expect("schema 2");
    }
    let mut store = Store::open(dir.path(), KEEP).expect("migrates");
    let loaded = store.load(epoch(1)).expect("load");
    let recent: Vec<(u64, Option<Uuid>)> = loaded
        .recent
        .iter()
        .map(|e| (e.position.0, e.message))
        .collect();
    assert_eq!(
        recent,
        [(3, Some(held))],
        "the evicted message's events are gone"
    );
}

#[test]
fn the_identity_key_is_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Store::open(dir.path(), KEEP)
        .expect("open")
        .identity_key([7; 32])
        .expect("key");
    let again = Store::open(dir.path(), KEEP)
        .expect("open")
        .identity_key([9; 32])
        .expect("key");
    assert_eq!(first, [7; 32]);
    assert_eq!(again, [7; 32]);
}

#[cfg(unix)]
#[test]
fn the_data_directory_is_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    let parent = tempfile::tempdir().expect("tempdir");
    let dir = parent.path().join("data");
    let mut store = Store::open(&dir, KEEP).expect("open");
    store
        .identity_key([1; 32])
        .expect("a write, so the WAL exists");
    assert_eq!(mode(&dir), 0o700);
    for file in [DB_FILE, "chat.sqlite3-wal", "chat.sqlite3-shm", LOCK_FILE] {
        let path = dir.join(file);
        assert!(path.exists(), "{file}");
        assert_eq!(mode(&path), 0o600, "{file}");
    }
    drop(store);

    // One an older server left readable is tightened at start.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(dir.join(DB_FILE), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    drop(Store::open(&dir, KEEP).expect("reopen"));
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(DB_FILE)), 0o600);
}

#[test]
fn a_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _held = Store::open(dir.path(), KEEP).expect("open");
    let err = Store::open(dir.path(), KEEP).expect_err("second open");
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert!(err.to_string().contains(&dir.path().display().to_string()));
}

#[test]
fn a_newer_schema_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(Store::open(dir.path(), KEEP).expect("open"));
    let db = dir.path().join(DB_FILE);
    Connection::open(&db)
        .and_then(|c| c.pragma_update(None, "user_version", 99))
        .expect("bump version");
    let err = Store::open(dir.path(), KEEP).expect_err("too new");
    assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    assert!(err.to_string().contains(DB_FILE));
    let v: i64 = Connection::open(&db)
        .and_then(|c| c.pragma_query_value(None, "user_version", |r| r.get(0)))
        .expect("read");
    assert_eq!(v, 99, "not overwritten");
}

#[test]
fn a_corrupt_file_is_an_error_naming_it_and_is_not_wiped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join(DB_FILE);
    let junk = vec![0x42u8; 8192];
    std::fs::write(&db, &junk).expect("write junk");
    let err = Store::open(dir.path(), KEEP).expect_err("corrupt");
    assert!(err.to_string().contains(DB_FILE), "{err}");
    assert_eq!(std::fs::read(&db).expect("read"), junk, "left as it was");
}

/// Every byte of the data directory's files, as one buffer.
fn files_bytes(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            all.extend(std::fs::read(&path).expect("read"));
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn a_removed_message_is_erased_from_the_database_files_not_hidden() {
    use chat_proto::{Moderation, Purge, RemoveMessage, RestrictUser, Term};
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = "the-secret-text-4f2a";
    let purged = "purged-by-a-ban-9c1e";
    let mut chat = Chat::new(Config::default());
    {
        let mut store = Store::open(dir.path(), KEEP).expect("open");
        drive(&mut chat, &mut store, 1, "u1", say(secret));
        drive(&mut chat, &mut store, 2, "u2", react(1, "🎉"));
        drive(&mut chat, &mut store, 3, "u2", say("kept"));
        drive(&mut chat, &mut store, 4, "u3", say(purged));
        // Written, and in the files, before the removal.
        let before = files_bytes(dir.path());
        assert!(
            contains(&before, secret) && contains(&before, purged),
            "the test's texts are in the files to begin with"
        );
        let remove = Moderation::RemoveMessage(RemoveMessage {
            message_id: Uuid::from_u128(1),
            reason: Some("leaked a password".into()),
        });
        drive(&mut chat, &mut store, 5, "moderator:alice", remove);
        let ban = Moderation::RestrictUser(RestrictUser {
            user_id: "u3".into(),
            term: Term::Forever,
            purge: Purge::All,
            reason: None,
        });
        drive(&mut chat, &mut store, 6, "moderator:alice", ban);
        let after = files_bytes(dir.path());
        assert!(
            !contains(&after, secret),
            "the removed text is still in the database files"
        );
        assert!(
            !contains(&after, purged),
            "the purged text is still in the database files"
        );
        assert!(contains(&after, "kept"));
    }
    // And after a restart: not in the history, not in a resume, and the
    // ban holds.
    let mut store = Store::open(dir.path(), KEEP).expect("reopen");
    let loaded = store.load(epoch(1)).expect("load");
    let texts: Vec<&str> = loaded.messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["kept"]);
    for event in &loaded.recent {
        assert!(
            !event.frame.contains(secret) && !event.frame.contains(purged),
            "{event:?}"
        );
    }
    let erased: Vec<u64> = loaded
        .recent
        .iter()
        .filter(|e| e.audience == Audience::Nobody)
        .map(|e| e.position.0)
        .collect();
    assert_eq!(
        erased,
        [1, 2, 4],
        "the post, its reaction, and the purged post"
    );
    assert_eq!(loaded.recent.len(), 7, "every position is still there");
    assert_eq!(loaded.moderation.restrictions.len(), 1);
    assert_eq!(loaded.moderation.audit.len(), 2);
    assert_eq!(loaded.moderation.audit[1].removed, [Uuid::from_u128(4)]);
    assert_eq!(
        loaded.moderation.restrictions,
        chat.moderation().restrictions
    );
}
