//! Why the store could not be used.

use std::path::PathBuf;
use thiserror::Error;

/// Why the store could not be used. Every variant names the file.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The data directory could not be created or read.
    #[error("data directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Another process holds the data directory's lock.
    #[error(
        "data directory {path} is in use by another running server: give each server (each \
         cluster node) its own --data-dir (CHAT_DATA_DIR), e.g. chat-data/node-1 and \
         chat-data/node-2; the lock ends with the process that holds it"
    )]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// The database was written by a newer version of the server.
    #[error(
        "database {path} has schema version {found}, newer than this server's {ours}; upgrade the server"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// The version found.
        found: i64,
        /// The newest version this build reads.
        ours: i64,
    },
    /// SQLite refused (a corrupt file, a full disk, ...).
    #[error("database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// A stored row could not be read back.
    #[error("database {path}: unreadable row: {detail}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
}
