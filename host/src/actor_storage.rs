//! Durable key-value storage for handlers (the `actor-storage` capability): values live
//! in actors addressed by a key of the handler's choosing, and each handler sees only its
//! own actors.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use crate::db::{self, Durability};

/// Largest value stored under one key.
pub const MAX_VALUE_BYTES: usize = 128 * 1024;

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The call is refused (e.g. a value over the limit); it will be refused again.
    #[error("{0}")]
    Refused(String),
    /// The storage failed; a later attempt may succeed.
    #[error("actor storage unavailable: {0}")]
    Unavailable(String),
}

impl From<rusqlite::Error> for StorageError {
    fn from(err: rusqlite::Error) -> Self {
        StorageError::Unavailable(err.to_string())
    }
}

/// The actor storage of every handler, in one SQLite database.
pub struct ActorStorage {
    conn: Mutex<Connection>,
}

impl ActorStorage {
    /// Opens (or creates) the storage at `path`.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let conn = db::open(
            path,
            Durability::Process,
            "CREATE TABLE IF NOT EXISTS actor_values (
                 handler TEXT NOT NULL,
                 actor   TEXT NOT NULL,
                 key     TEXT NOT NULL,
                 value   BLOB NOT NULL,
                 PRIMARY KEY (handler, actor, key)
             );",
        )?;
        Ok(ActorStorage {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of `key` in `actor` of `handler`.
    pub fn get(
        &self,
        handler: &str,
        actor: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .conn()
            .prepare_cached(
                "SELECT value FROM actor_values WHERE handler = ?1 AND actor = ?2 AND key = ?3",
            )?
            .query_row(params![handler, actor, key], |r| r.get(0))
            .optional()?)
    }

    /// Stores `value` under `key` in `actor` of `handler`.
    pub fn put(
        &self,
        handler: &str,
        actor: &str,
        key: &str,
        value: &[u8],
    ) -> Result<(), StorageError> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(StorageError::Refused(format!(
                "value of {} bytes exceeds the {MAX_VALUE_BYTES}-byte limit",
                value.len()
            )));
        }
        self.conn()
            .prepare_cached(
                "INSERT INTO actor_values (handler, actor, key, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (handler, actor, key) DO UPDATE SET value = ?4",
            )?
            .execute(params![handler, actor, key, value])?;
        Ok(())
    }

    /// Deletes `key` from `actor` of `handler`.
    pub fn delete(&self, handler: &str, actor: &str, key: &str) -> Result<(), StorageError> {
        self.conn()
            .prepare_cached(
                "DELETE FROM actor_values WHERE handler = ?1 AND actor = ?2 AND key = ?3",
            )?
            .execute(params![handler, actor, key])?;
        Ok(())
    }

    /// Every key of `actor` of `handler` starting with `prefix`, with its value, by key.
    pub fn list_prefix(
        &self,
        handler: &str,
        actor: &str,
        prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT key, value FROM actor_values
             WHERE handler = ?1 AND actor = ?2 AND substr(key, 1, length(?3)) = ?3 ORDER BY key",
        )?;
        let rows = stmt
            .query_map(params![handler, actor, prefix], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_scoped_by_handler_and_actor() {
        let dir = tempfile::tempdir().unwrap();
        let store = ActorStorage::open(&dir.path().join("a.db")).unwrap();
        store.put("h1", "a", "count:x", b"1").unwrap();
        store.put("h1", "a", "count:y", b"2").unwrap();
        store.put("h1", "a", "other", b"3").unwrap();
        store.put("h2", "a", "count:x", b"9").unwrap();
        store.put("h1", "b", "count:x", b"8").unwrap();
        assert_eq!(
            store.get("h1", "a", "count:x").unwrap().as_deref(),
            Some(&b"1"[..])
        );
        let listed = store.list_prefix("h1", "a", "count:").unwrap();
        assert_eq!(
            listed,
            [
                ("count:x".into(), b"1".to_vec()),
                ("count:y".into(), b"2".to_vec())
            ]
        );
        store.put("h1", "a", "count:x", b"5").unwrap();
        store.delete("h1", "a", "count:y").unwrap();
        store.delete("h1", "a", "missing").unwrap();
        assert_eq!(
            store.list_prefix("h1", "a", "count:").unwrap(),
            [("count:x".into(), b"5".to_vec())]
        );
        assert!(matches!(
            store.put("h1", "a", "big", &vec![0; MAX_VALUE_BYTES + 1]),
            Err(StorageError::Refused(_))
        ));
    }
}
