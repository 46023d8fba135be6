//! The data directory: private to the server's user, and locked for one
//! process.

use super::error::StoreError;
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};

/// The lock file that keeps two servers out of one data directory.
pub(super) const LOCK_FILE: &str = "lock";

/// The data directory is private to the server's user: the database holds
/// the pseudonym key, and with it every `author_id` could be turned back
/// into an address by trying every IPv4 address. So the directory is
/// created 0700 and its files 0600, whatever the umask, and an existing
/// one that others can read is tightened at start, with a warning.
pub(super) mod private {
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::path::Path;

    #[cfg(unix)]
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

    /// The permission bits that let anyone but the owner in.
    #[cfg(unix)]
    const OTHERS: u32 = 0o077;

    /// Creates `dir` (and its parents) 0700, or tightens it if it exists.
    pub(crate) fn create_dir(dir: &Path) -> io::Result<()> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        builder.mode(0o700);
        builder.create(dir)?;
        tighten(dir)
    }

    /// Opens (creating 0600 if missing) `path`, tightening it if it exists.
    pub(crate) fn create_file(path: &Path) -> io::Result<File> {
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        options.mode(0o600);
        let file = options.open(path)?;
        tighten(path)?;
        Ok(file)
    }

    /// Takes away every permission of others on `path`, if it exists and
    /// has any, and says so.
    pub(crate) fn tighten(path: &Path) -> io::Result<()> {
        #[cfg(unix)]
        {
            let meta = match std::fs::metadata(path) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            let mode = meta.permissions().mode();
            if mode & OTHERS != 0 {
                let private = mode & !OTHERS;
                tracing::warn!(
                    path = %path.display(),
                    was = format!("{:o}", mode & 0o777),
                    now = format!("{:o}", private & 0o777),
                    "the data directory was readable by others; made it private to this user"
                );
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(private))?;
            }
        }
        #[cfg(not(unix))]
        let _ = path;
        Ok(())
    }
}

/// A data directory, private to this user and locked for this process:
/// a second server given the same directory refuses to start.
#[derive(Debug)]
pub(crate) struct DataDir {
    path: PathBuf,
    _lock: File,
}

impl DataDir {
    /// Creates `dir` if missing (0700), and takes its lock.
    pub(crate) fn lock(dir: &Path) -> Result<DataDir, StoreError> {
        let dir_err = |source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        };
        private::create_dir(dir).map_err(dir_err)?;
        let lock = private::create_file(&dir.join(LOCK_FILE)).map_err(dir_err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    path: dir.to_owned(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(dir_err(e)),
        }
        Ok(DataDir {
            path: dir.to_owned(),
            _lock: lock,
        })
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The contents of the file `name`, or `None` if there is none.
    pub(crate) fn read(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path.join(name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes the file `name`, if there is one, and on disk when it
    /// returns.
    pub(crate) fn remove(&self, name: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path.join(name)) {
            Ok(()) => File::open(&self.path)?.sync_all(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Replaces the file `name` with `bytes`, whole or not at all, and on
    /// disk when it returns: written to a temporary file, synced, renamed
    /// over the old one, and the directory synced. A crash at any moment
    /// leaves the old file or the new one.
    pub(crate) fn replace(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let path = self.path.join(name);
        let temporary = self.path.join(format!("{name}.new"));
        {
            let mut file = private::create_file(&temporary)?;
            file.set_len(0)?;
            file.write_all(bytes)?;
            file.sync_all()?;
        }
        std::fs::rename(&temporary, &path)?;
        File::open(&self.path)?.sync_all()
    }
}
