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
//!
//! Moderation is kept alike: the restrictions in force, the room's modes
//! and the audit trail, in the same transactions. A message a moderator
//! removes is erased, not hidden: its row is deleted and every kept frame
//! that held it is blanked, with `secure_delete` on (SQLite overwrites
//! what it frees with zeros) and the write-ahead log checkpointed and
//! truncated after, so its text is in neither file.

pub(crate) mod data_dir;
mod error;

pub use error::StoreError;

use crate::publish::entry::Entry;
use crate::publish::pipeline::EventWriter;
use crate::wire::frame::Audience;
use chat_core::{AUDIT_KEPT, EventKind, Held, ModerationSnapshot};
use chat_proto::{AuditEntry, Epoch, Message, Position, Reactions, Room, UserId, Uuid};
use data_dir::DataDir;
use data_dir::private;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};

/// The schema version this build writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 4;

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
    /// Restrictions, the room's modes and the audit trail.
    pub moderation: ModerationSnapshot,
}

/// One of the latest events, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecentEvent {
    /// Its position in the log.
    pub position: Position,
    /// The message whose body its frame holds (posted, or with its
    /// reactions updated), if any.
    pub message: Option<Uuid>,
    /// Its frame, as sent (empty once erased).
    pub frame: String,
    /// Who is sent it.
    pub audience: Audience,
}

/// How an event's audience is stored.
fn audience_code(audience: Audience) -> i64 {
    match audience {
        Audience::Everyone => 0,
        Audience::OptedIn => 1,
        Audience::Nobody => 2,
    }
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
        // What a removal deletes is overwritten, not left in free pages.
        conn.pragma_update(None, "secure_delete", "ON")
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
        if version < 4 {
            // Moderation: who is sent an event (0 everyone, 1 clients that
            // opted in, 2 no one: erased), the restrictions in force, the
            // audit trail; the room's modes go in `meta`.
            self.conn
                .execute_batch(
                    "BEGIN;
                     ALTER TABLE events ADD COLUMN audience INTEGER NOT NULL DEFAULT 0;
                     CREATE TABLE restrictions (
                         user_id  TEXT PRIMARY KEY,
                         until_ms INTEGER,
                         held     TEXT NOT NULL
                     );
                     CREATE TABLE audit (
                         position INTEGER PRIMARY KEY,
                         entry    TEXT NOT NULL
                     );
                     PRAGMA user_version = 4;
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
            moderation: self.load_moderation()?,
        })
    }

    /// The restrictions, the room's modes and the audit trail.
    fn load_moderation(&self) -> Result<ModerationSnapshot, StoreError> {
        let mut restrictions = Vec::new();
        {
            let mut stmt = self
                .conn
                .prepare("SELECT user_id, held FROM restrictions ORDER BY user_id")
                .map_err(|e| self.sql(e))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(|e| self.sql(e))?;
            for row in rows {
                let (user, held) = row.map_err(|e| self.sql(e))?;
                let held: Held = serde_json::from_str(&held)
                    .map_err(|e| self.corrupt(format!("restriction of {user}: {e}")))?;
                restrictions.push((UserId::from(user), held));
            }
        }
        let mut audit = Vec::new();
        {
            let mut stmt = self
                .conn
                .prepare("SELECT entry FROM audit ORDER BY position")
                .map_err(|e| self.sql(e))?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(|e| self.sql(e))?;
            for row in rows {
                let entry = row.map_err(|e| self.sql(e))?;
                let entry: AuditEntry = serde_json::from_str(&entry)
                    .map_err(|e| self.corrupt(format!("audit entry: {e}")))?;
                audit.push(entry);
            }
        }
        let room = match self.meta_blob("room")? {
            Some(json) => serde_json::from_slice::<Room>(&json)
                .map_err(|e| self.corrupt(format!("room: {e}")))?,
            None => Room::default(),
        };
        Ok(ModerationSnapshot {
            restrictions,
            room,
            slow_mode: None,
            audit,
        })
    }

    /// Deletes the time-outs that ended before `now_ms` (Unix ms): the
    /// chat no longer holds them once it applies its next moderation
    /// order, and nothing else would.
    pub(crate) fn forget_ended_restrictions(&mut self, now_ms: u64) -> Result<(), StoreError> {
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        // Looked up first, so that a store with nothing to forget is only
        // read at start.
        let ended: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM restrictions WHERE until_ms IS NOT NULL AND until_ms <= ?1",
                [now],
                |r| r.get(0),
            )
            .map_err(|e| self.sql(e))?;
        if ended > 0 {
            self.conn
                .execute(
                    "DELETE FROM restrictions WHERE until_ms IS NOT NULL AND until_ms <= ?1",
                    [now],
                )
                .map_err(|e| self.sql(e))?;
        }
        Ok(())
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
                "SELECT position, message, frame, audience FROM events
                 WHERE position > ?1 AND position <= ?2 ORDER BY position",
            )
            .map_err(|e| self.sql(e))?;
        let from = head.0.saturating_sub(self.keep_events);
        let rows = stmt
            .query_map(params![from as i64, head.0 as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<Vec<u8>>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut recent = Vec::new();
        for row in rows {
            let (position, message, frame, audience) = row.map_err(|e| self.sql(e))?;
            let message = message
                .map(|m| Uuid::from_slice(&m))
                .transpose()
                .map_err(|e| self.corrupt(format!("event {position}: {e}")))?;
            let audience = match audience {
                0 => Audience::Everyone,
                1 => Audience::OptedIn,
                2 => Audience::Nobody,
                other => return Err(self.corrupt(format!("event {position}: audience {other}"))),
            };
            recent.push(RecentEvent {
                position: Position(position as u64),
                message,
                frame,
                audience,
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
                 WHERE message IS NOT NULL AND message NOT IN (SELECT id FROM messages)",
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
        let mut erased = false;
        let mut moderated = false;
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
                .prepare_cached(
                    "INSERT INTO events (position, message, frame, audience) VALUES (?1, ?2, ?3, ?4)",
                )
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
                    entry
                        .holds_message()
                        .as_ref()
                        .map(|m| m.as_bytes().as_slice()),
                    entry.frame.as_str(),
                    audience_code(entry.frame.audience()),
                ])
                .map_err(sql)?;
                if let Some(audit) = event.audit() {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO audit (position, entry) VALUES (?1, ?2)",
                    )
                    .and_then(|mut s| s.execute(params![audit.position.0 as i64, to_json(audit)]))
                    .map_err(sql)?;
                    moderated = true;
                }
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
                    EventKind::MessageRemoved { message, .. } => {
                        let id = message.id.as_bytes().as_slice();
                        delete.execute(params![id]).map_err(sql)?;
                        // Every kept frame that held it is blanked: the
                        // events keep their positions, sent to no one.
                        tx.prepare_cached(
                            "UPDATE events SET frame = '', message = NULL, audience = 2
                             WHERE message = ?1",
                        )
                        .and_then(|mut s| s.execute(params![id]))
                        .map_err(sql)?;
                        erased = true;
                    }
                    EventKind::UserRestricted { user, held, .. } => {
                        tx.prepare_cached(
                            "INSERT OR REPLACE INTO restrictions (user_id, until_ms, held)
                             VALUES (?1, ?2, ?3)",
                        )
                        .and_then(|mut s| {
                            s.execute(params![
                                user.as_str(),
                                held.until
                                    .map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX)),
                                to_json(held),
                            ])
                        })
                        .map_err(sql)?;
                    }
                    EventKind::RestrictionLifted { user, .. } => {
                        tx.prepare_cached("DELETE FROM restrictions WHERE user_id = ?1")
                            .and_then(|mut s| s.execute(params![user.as_str()]))
                            .map_err(sql)?;
                    }
                    EventKind::RoomUpdated { room, .. } => {
                        tx.prepare_cached(
                            "INSERT OR REPLACE INTO meta (key, value) VALUES ('room', ?1)",
                        )
                        .and_then(|mut s| s.execute(params![to_json(room).into_bytes()]))
                        .map_err(sql)?;
                    }
                }
            }
            if moderated {
                // The audit trail keeps the latest AUDIT_KEPT, as the chat.
                tx.prepare_cached(
                    "DELETE FROM audit WHERE position <=
                     (SELECT position FROM audit ORDER BY position DESC LIMIT 1 OFFSET ?1)",
                )
                .and_then(|mut s| s.execute([i64::try_from(AUDIT_KEPT).unwrap_or(i64::MAX)]))
                .map_err(sql)?;
            }
            tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'head'")
                .and_then(|mut s| s.execute([head]))
                .map_err(sql)?;
            let keep = i64::try_from(self.keep_events).unwrap_or(i64::MAX);
            tx.prepare_cached("DELETE FROM events WHERE position <= ?1")
                .and_then(|mut s| s.execute([head.saturating_sub(keep)]))
                .map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
        if erased {
            // The pages that held the removed text are zeroed in the
            // database, but their old images are still in the write-ahead
            // log: copy it back and empty it.
            self.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(|e| self.sql(e))?;
        }
        Ok(())
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

/// A stored value as JSON: plain data, which always serializes.
fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("stored values serialize")
}

fn reactions_json(reactions: &Reactions) -> String {
    // A map of strings to lists of strings always serializes.
    serde_json::to_string(reactions).expect("reactions serialize")
}

#[cfg(test)]
mod tests;
