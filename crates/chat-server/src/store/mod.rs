//! Durable history: an embedded SQLite database, written ahead of every
//! broadcast.
//!
//! The store is a plain writer of events (`crate::publish::pipeline`): it
//! knows nothing of the sequencer or of clients. The committer hands it
//! everything waiting and it writes it in **one** transaction (WAL,
//! `synchronous=FULL`: one fsync per batch, not per message); only then are
//! the events published. So no client ever sees a message that a crash
//! could take back.
//!
//! Because `chat-core` is deterministic, the stored messages (in order, with
//! their reactions) are all it takes to rebuild the chat exactly. Beside
//! them, in the same transactions, the store keeps the log's position (the
//! `head`), its `epoch`, and the frames of the last `--log-events` events,
//! so that after a restart, even a SIGKILL, clients resume exactly where
//! they were.

pub(crate) mod data_dir;
mod error;

pub use error::StoreError;

use crate::publish::entry::Entry;
use crate::publish::pipeline::EventWriter;
use chat_core::EventKind;
use chat_proto::{Epoch, Message, Position, Reactions, UserId, Uuid};
use data_dir::DataDir;
use data_dir::private;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};

/// The schema version this build writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 3;

/// The database file inside the data directory.
pub const DB_FILE: &str = "chat.sqlite3";

/// The open database, holding the data directory's lock.
#[derive(Debug)]
pub(crate) struct Store {
    conn: Connection,
    path: PathBuf,
    /// How many of the latest events' frames are kept.
    keep_events: u64,
    _dir: DataDir,
}

/// What the store holds of the log, read at start.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// Every stored message, oldest first.
    pub messages: Vec<Message>,
    /// The log's epoch (drawn when the database was created).
    pub epoch: Epoch,
    /// The position of the latest stored event.
    pub head: Position,
    /// The latest events' frames, oldest first, ending at `head`.
    pub recent: Vec<RecentEvent>,
}

/// One of the latest events, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecentEvent {
    /// Its position in the log.
    pub position: Position,
    /// The message it carries (posted, or with its reactions updated).
    pub message: Uuid,
    /// Its frame, as sent.
    pub frame: String,
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, locks the directory,
    /// and brings the schema up to date. Never wipes anything: a database
    /// it cannot read is an error naming the file.
    /// It keeps the frames of the latest `keep_events` events.
    pub(crate) fn open(dir: &Path, keep_events: usize) -> Result<Store, StoreError> {
        let dir_err = |source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        };
        let locked = DataDir::lock(dir)?;
        let path = dir.join(DB_FILE);
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        // Created private before SQLite opens it; SQLite gives its WAL and
        // shared-memory files the database file's permissions.
        private::create_file(&path).map_err(dir_err)?;
        for companion in ["-wal", "-shm"] {
            let mut name = path.clone().into_os_string();
            name.push(companion);
            private::tighten(Path::new(&name)).map_err(dir_err)?;
        }
        let conn = Connection::open(&path).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        let mut store = Store {
            conn,
            path,
            keep_events: u64::try_from(keep_events).unwrap_or(u64::MAX),
            _dir: locked,
        };
        store.migrate()?;
        Ok(store)
    }

    /// The database file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| self.sql(e))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found: version,
                ours: SCHEMA_VERSION,
            });
        }
        // Each step takes the schema from version N to N + 1.
        if version < 1 {
            self.conn
                .execute_batch(
                    "BEGIN;
                     CREATE TABLE messages (
                         seq         INTEGER PRIMARY KEY AUTOINCREMENT,
                         id          BLOB NOT NULL UNIQUE,
                         text        TEXT NOT NULL,
                         author_id   TEXT NOT NULL,
                         author_name TEXT NOT NULL,
                         created_at  INTEGER NOT NULL,
                         reactions   TEXT NOT NULL
                     );
                     CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
                     PRAGMA user_version = 1;
                     COMMIT;",
                )
                .map_err(|e| self.sql(e))?;
        }
        if version < 2 {
            // The log: its head and epoch in `meta`, the latest events'
            // frames in `events`. A database from before positions starts
            // a new epoch at position 0: its clients never had one.
            self.conn
                .execute_batch(
                    "BEGIN;
                     CREATE TABLE events (
                         position INTEGER PRIMARY KEY,
                         frame    TEXT NOT NULL
                     );
                     INSERT OR IGNORE INTO meta (key, value) VALUES ('head', 0);
                     PRAGMA user_version = 2;
                     COMMIT;",
                )
                .map_err(|e| self.sql(e))?;
        }
        if version < 3 {
            // Each event names the message it carries, so that the events
            // of an evicted message go with it. Older events are named
            // from their frames (`message`: data.id; `reaction_updated`:
            // data.message_id).
            self.conn
                .execute_batch(
                    "BEGIN;
                     ALTER TABLE events ADD COLUMN message BLOB;
                     UPDATE events SET message = unhex(replace(coalesce(
                         json_extract(frame, '$.data.message_id'),
                         json_extract(frame, '$.data.id')), '-', ''));
                     CREATE INDEX events_by_message ON events (message, position);
                     PRAGMA user_version = 3;
                     COMMIT;",
                )
                .map_err(|e| self.sql(e))?;
        }
        Ok(())
    }

    /// Everything stored, for the chat and its log to start from. The
    /// epoch is drawn now (as `fresh`) if the database has none yet.
    pub(crate) fn load(&mut self, fresh: Epoch) -> Result<Loaded, StoreError> {
        let epoch = match self.meta_blob("epoch")? {
            Some(bytes) => {
                Epoch(Uuid::from_slice(&bytes).map_err(|e| self.corrupt(format!("epoch: {e}")))?)
            }
            None => {
                self.set_epoch(fresh)?;
                fresh
            }
        };
        let head: i64 = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'head'", [], |r| {
                r.get(0)
            })
            .map_err(|e| self.sql(e))?;
        let head = Position(u64::try_from(head).map_err(|_| self.corrupt(format!("head {head}")))?);
        self.forget_unheld_events()?;
        let recent = self.load_recent(head)?;
        Ok(Loaded {
            messages: self.load_messages()?,
            epoch,
            head,
            recent,
        })
    }

    /// Replaces the epoch (after a backup was restored into the data
    /// directory, say): every client's position becomes stale and resumes
    /// with a full replay.
    pub(crate) fn set_epoch(&mut self, epoch: Epoch) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?1)",
                params![epoch.0.as_bytes().as_slice()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    fn meta_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.sql(e))
    }

    fn corrupt(&self, detail: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            detail,
        }
    }

    fn load_recent(&self, head: Position) -> Result<Vec<RecentEvent>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT position, message, frame FROM events WHERE position > ?1 AND position <= ?2
                 ORDER BY position",
            )
            .map_err(|e| self.sql(e))?;
        let from = head.0.saturating_sub(self.keep_events);
        let rows = stmt
            .query_map(params![from as i64, head.0 as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut recent = Vec::new();
        for row in rows {
            let (position, message, frame) = row.map_err(|e| self.sql(e))?;
            let message = Uuid::from_slice(&message)
                .map_err(|e| self.corrupt(format!("event {position}: {e}")))?;
            recent.push(RecentEvent {
                position: Position(position as u64),
                message,
                frame,
            });
        }
        Ok(recent)
    }

    /// Deletes every event up to the last one that carries a message the
    /// store no longer holds: what the history no longer holds is never
    /// served again, and the events kept stay one unbroken run.
    fn forget_unheld_events(&mut self) -> Result<(), StoreError> {
        // Looked up first, so that a store with nothing to forget is only
        // read at start.
        let through: Option<i64> = self
            .conn
            .query_row(
                "SELECT max(position) FROM events
                 WHERE message IS NULL OR message NOT IN (SELECT id FROM messages)",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.sql(e))?;
        if let Some(through) = through {
            self.conn
                .execute("DELETE FROM events WHERE position <= ?1", [through])
                .map_err(|e| self.sql(e))?;
        }
        Ok(())
    }

    /// Every stored message, oldest first.
    fn load_messages(&self) -> Result<Vec<Message>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, text, author_id, author_name, created_at, reactions
                 FROM messages ORDER BY seq",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut messages = Vec::new();
        for row in rows {
            let (id, text, author_id, author_name, created_at, reactions) =
                row.map_err(|e| self.sql(e))?;
            let corrupt = |detail: String| StoreError::Corrupt {
                path: self.path.clone(),
                detail,
            };
            let id = Uuid::from_slice(&id).map_err(|e| corrupt(format!("message id: {e}")))?;
            let reactions: Reactions = serde_json::from_str(&reactions)
                .map_err(|e| corrupt(format!("reactions of {id}: {e}")))?;
            messages.push(Message {
                id,
                text,
                author_id: UserId::from(author_id),
                author_name,
                created_at,
                reactions,
            });
        }
        Ok(messages)
    }

    /// The identity key stored by an earlier run, or `fresh` stored now.
    pub(crate) fn identity_key(&mut self, fresh: [u8; 32]) -> Result<[u8; 32], StoreError> {
        let stored: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'identity_key'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        match stored {
            Some(key) => key.try_into().map_err(|_| StoreError::Corrupt {
                path: self.path.clone(),
                detail: "identity key is not 32 bytes".into(),
            }),
            None => {
                self.conn
                    .execute(
                        "INSERT INTO meta (key, value) VALUES ('identity_key', ?1)",
                        params![fresh.as_slice()],
                    )
                    .map_err(|e| self.sql(e))?;
                Ok(fresh)
            }
        }
    }

    /// Writes a batch of events in one transaction, with their frames and
    /// the new head, and forgets the frames that fell out of the kept
    /// window; when this returns `Ok`, they are on disk.
    pub(crate) fn commit(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let head = last.event.position.0 as i64;
        let path = self.path.clone();
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO messages (id, text, author_id, author_name, created_at, reactions)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(sql)?;
            let mut update = tx
                .prepare_cached("UPDATE messages SET reactions = ?2 WHERE id = ?1")
                .map_err(sql)?;
            let mut delete = tx
                .prepare_cached("DELETE FROM messages WHERE id = ?1")
                .map_err(sql)?;
            let mut log = tx
                .prepare_cached("INSERT INTO events (position, message, frame) VALUES (?1, ?2, ?3)")
                .map_err(sql)?;
            // The events of an evicted message, and every event before
            // them, go with it.
            let mut forget = tx
                .prepare_cached(
                    "DELETE FROM events WHERE position <= (
                         SELECT max(position) FROM events WHERE message = ?1)",
                )
                .map_err(sql)?;
            for entry in entries {
                let event = &entry.event;
                log.execute(params![
                    event.position.0 as i64,
                    event.message_id().as_bytes().as_slice(),
                    entry.frame.as_str()
                ])
                .map_err(sql)?;
                match &event.kind {
                    EventKind::MessagePosted {
                        message: m,
                        evicted,
                    } => {
                        if let Some(old) = evicted {
                            let old = old.id.as_bytes().as_slice();
                            delete.execute(params![old]).map_err(sql)?;
                            forget.execute(params![old]).map_err(sql)?;
                        }
                        insert
                            .execute(params![
                                m.id.as_bytes().as_slice(),
                                m.text,
                                m.author_id.as_str(),
                                m.author_name,
                                m.created_at,
                                reactions_json(&m.reactions),
                            ])
                            .map_err(sql)?;
                    }
                    EventKind::ReactionUpdated(r) => {
                        update
                            .execute(params![
                                r.message_id.as_bytes().as_slice(),
                                reactions_json(&r.message.reactions),
                            ])
                            .map_err(sql)?;
                    }
                }
            }
            tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'head'")
                .and_then(|mut s| s.execute([head]))
                .map_err(sql)?;
            let keep = i64::try_from(self.keep_events).unwrap_or(i64::MAX);
            tx.prepare_cached("DELETE FROM events WHERE position <= ?1")
                .and_then(|mut s| s.execute([head.saturating_sub(keep)]))
                .map_err(sql)?;
        }
        tx.commit().map_err(sql)
    }

    /// Deletes messages (the ones a lowered history limit dropped), and
    /// with them their events.
    pub(crate) fn delete(&mut self, messages: &[Message]) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(|e| StoreError::Sqlite {
            path: self.path.clone(),
            source: e,
        })?;
        for m in messages {
            tx.execute(
                "DELETE FROM messages WHERE id = ?1",
                params![m.id.as_bytes().as_slice()],
            )
            .map_err(|e| StoreError::Sqlite {
                path: self.path.clone(),
                source: e,
            })?;
        }
        tx.commit().map_err(|e| self.sql(e))?;
        self.forget_unheld_events()
    }
}

impl EventWriter for Store {
    type Error = StoreError;

    fn write(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        self.commit(entries)
    }
}

fn reactions_json(reactions: &Reactions) -> String {
    // A map of strings to lists of strings always serializes.
    serde_json::to_string(reactions).expect("reactions serialize")
}

#[cfg(test)]
mod tests {
    use super::data_dir::LOCK_FILE;
    use super::*;
    use chat_core::{Chat, Config, Context, Timestamp};
    use chat_proto::{AddReaction, ClientFrame, SendMessage, ServerFrame};

    const KEEP: usize = 100;

    fn epoch(n: u128) -> Epoch {
        Epoch(Uuid::from_u128(n))
    }

    fn drive(chat: &mut Chat, store: &mut Store, n: u128, user: &str, cmd: ClientFrame) {
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
        assert_eq!(loaded.recent[0].message, Uuid::from_u128(4));
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
        let recent: Vec<(u64, Uuid)> = loaded
            .recent
            .iter()
            .map(|e| (e.position.0, e.message))
            .collect();
        assert_eq!(recent, [(3, held)], "the evicted message's events are gone");
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
}
