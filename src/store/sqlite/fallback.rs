//! Opening a database for reading when the normal open cannot (SPEC §8: `queue` always
//! prints). A WAL database needs its `-wal` and `-shm` files, and SQLite creates them at
//! open when the last client to close removed them: on a full disk (or in a folder the
//! reader may not write) that fails before a single row is read. When the log holds no
//! changes, the database file alone is the whole committed state and can be read with
//! `immutable=1`, which creates no file and takes no lock. A log that holds changes can
//! only be read through a `-shm` index, so then there is no honest read at all.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rusqlite::{Connection, OpenFlags};

use super::SqliteStore;

impl SqliteStore {
    /// The database at `path`, read-only, from its main file alone; refused when its
    /// write-ahead log holds changes the file does not have yet.
    pub fn open_immutable(path: &Path) -> Result<SqliteStore> {
        let wal = format!("{}-wal", path.display());
        if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
            bail!(
                "{wal} holds changes that only a connection able to create {}-shm can read",
                path.display()
            );
        }
        let conn = Connection::open_with_flags(
            format!("file:{}?mode=ro&immutable=1", uri_path(path)),
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening {} read-only", path.display()))?;
        let mut store = SqliteStore {
            conn,
            path: path.to_path_buf(),
            opened_version: 0,
            created: false,
            busy_timeout: Duration::ZERO,
        };
        let version = store.user_version()?;
        store.opened_version = version;
        store.check_not_newer(version)?;
        Ok(store)
    }

    /// An empty database in memory with the current schema: every block of a snapshot
    /// read from it has its minimal form.
    pub fn open_empty() -> Result<SqliteStore> {
        let store = SqliteStore {
            conn: Connection::open_in_memory().context("opening an empty database")?,
            path: ":memory:".into(),
            opened_version: 0,
            created: false,
            busy_timeout: Duration::ZERO,
        };
        store.migrate()?;
        Ok(store)
    }
}

/// `path` as the path of an SQLite `file:` URI: `%`, `?` and `#` would end or escape it.
fn uri_path(path: &Path) -> String {
    let mut out = String::new();
    for c in path.to_string_lossy().chars() {
        match c {
            '%' => out.push_str("%25"),
            '?' => out.push_str("%3f"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_paths_escape_what_would_end_them() {
        assert_eq!(uri_path(Path::new("/a b/c?d#e%f")), "/a b/c%3fd%23e%25f");
    }
}
