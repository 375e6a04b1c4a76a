//! Opening the host's SQLite databases, all alike: WAL journal, a busy timeout, and the
//! schema created if missing.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::Connection;

/// How long a statement waits for another connection's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How hard a commit waits for the disk.
#[derive(Debug, Clone, Copy)]
pub enum Durability {
    /// Survives a crash of the process (`synchronous = NORMAL` in WAL mode).
    Process,
    /// Survives a crash of the OS too (`synchronous = FULL`): an fsync per commit.
    Machine,
}

/// Opens (or creates) the database at `path` in WAL mode and runs `schema` (idempotent
/// `CREATE ... IF NOT EXISTS` statements).
pub fn open(path: &Path, durability: Durability, schema: &str) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let synchronous = match durability {
        Durability::Process => "NORMAL",
        Durability::Machine => "FULL",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.execute_batch(schema)?;
    Ok(conn)
}

/// One connection to a store's database, shared behind a lock by stores whose calls are
/// short (a row or two).
pub struct Shared(Mutex<Connection>);

impl Shared {
    /// Opens (or creates) the database at `path` as [`open`] does.
    pub fn open(path: &Path, durability: Durability, schema: &str) -> rusqlite::Result<Shared> {
        Ok(Shared(Mutex::new(open(path, durability, schema)?)))
    }

    /// The connection, once no other call holds it (a call that panicked left it as it
    /// was: SQLite rolled back what it did not commit).
    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
