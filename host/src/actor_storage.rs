//! Durable key-value storage for handlers (the `actor-storage` capability): values live
//! in actors addressed by a key of the handler's choosing, and each consumer sees only its
//! own actors, within its quota of keys and bytes. The actors are in the host's
//! database, or in the cluster's key-value bucket ([`jetstream`]) when several hosts
//! share one.

use std::collections::HashMap;
use std::sync::RwLock;

use rusqlite::{Connection, OptionalExtension, params};

use crate::bounds::{self, MAX_LIST_PAGE, MAX_LIST_PAGE_BYTES, MAX_VALUE_BYTES};
use crate::cluster::Cluster;
use crate::store::{Database, StoreError};

mod claims;
mod jetstream;

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The call is refused (an argument over its bound, a quota reached); it will be
    /// refused again.
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

impl From<StoreError> for StorageError {
    fn from(err: StoreError) -> Self {
        StorageError::Unavailable(err.to_string())
    }
}

impl From<bounds::TooLarge> for StorageError {
    fn from(err: bounds::TooLarge) -> Self {
        StorageError::Refused(err.to_string())
    }
}

/// How much one consumer may keep in its actors (all of them together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Most keys.
    pub keys: u64,
    /// Most bytes: actor names, keys and values, summed over every key.
    pub bytes: u64,
}

impl Default for Quota {
    fn default() -> Self {
        Quota {
            keys: 10_000,
            bytes: 64 << 20,
        }
    }
}

/// What one consumer keeps in its actors, counted as its [`Quota`] is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Keys stored.
    pub keys: u64,
    /// Bytes of actor names, keys and values stored.
    pub bytes: u64,
}

/// The actor storage of every handler, in one SQLite database or in the cluster.
pub struct ActorStorage {
    backend: Backend,
    quotas: RwLock<HashMap<String, Quota>>,
}

/// The actors a batch uses, released when it is dropped (the batch ended): in a
/// cluster, each actor is used by one batch at a time across every host (see
/// [`claims`]); on one host, the consumer's `max_concurrency` decides, and there is
/// nothing to hold.
pub struct ActorClaims(Option<claims::BatchClaims>);

impl ActorClaims {
    /// Holds `actor` of `consumer` for the batch (at once on one host; in a cluster once
    /// no other batch holds it, waiting at most [`claims::CLAIM_WAIT`]). Call it before
    /// each storage call of the batch.
    pub async fn hold(&self, consumer: &str, actor: &str) -> Result<(), StorageError> {
        match &self.0 {
            Some(claims) => claims.hold(consumer, actor).await,
            None => Ok(()),
        }
    }
}

/// Where the actors are kept.
enum Backend {
    Sqlite(Database),
    Cluster(Box<jetstream::ClusterActors>),
}

/// The bytes one stored key counts for.
const ROW_BYTES: &str = "length(CAST(actor AS BLOB)) + length(CAST(key AS BLOB)) + length(value)";

impl ActorStorage {
    /// Opens (or creates) the storage in `db`, and counts each consumer's usage again.
    pub fn open(db: &Database) -> Result<Self, StorageError> {
        db.connection(&format!(
            "CREATE TABLE IF NOT EXISTS actor_values (
                     handler TEXT NOT NULL,
                     actor   TEXT NOT NULL,
                     key     TEXT NOT NULL,
                     value   BLOB NOT NULL,
                     PRIMARY KEY (handler, actor, key)
                 );
                 CREATE TABLE IF NOT EXISTS actor_usage (
                     handler TEXT PRIMARY KEY,
                     keys    INTEGER NOT NULL,
                     bytes   INTEGER NOT NULL
                 );
                 BEGIN;
                 DELETE FROM actor_usage;
                 INSERT INTO actor_usage (handler, keys, bytes)
                     SELECT handler, count(*), sum({ROW_BYTES}) FROM actor_values GROUP BY handler;
                 COMMIT;"
        ))?;
        Ok(ActorStorage {
            backend: Backend::Sqlite(db.clone()),
            quotas: RwLock::default(),
        })
    }

    /// Opens (or creates) the storage of `cluster`, shared by every host connected to it.
    pub async fn open_cluster(cluster: &Cluster) -> anyhow::Result<Self> {
        Ok(ActorStorage {
            backend: Backend::Cluster(Box::new(jetstream::ClusterActors::open(cluster).await?)),
            quotas: RwLock::default(),
        })
    }

    /// The claims of a new batch that runs for at most `lease`.
    pub fn claims(&self, lease: std::time::Duration) -> ActorClaims {
        ActorClaims(match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Cluster(cluster) => Some(cluster.batch_claims(lease)),
        })
    }

    /// Sets the quota of `consumer` ([`Quota::default`] until set).
    pub fn set_quota(&self, consumer: &str, quota: Quota) {
        let mut quotas = self.quotas.write().unwrap_or_else(|p| p.into_inner());
        quotas.insert(consumer.to_owned(), quota);
    }

    /// The quota of `consumer`.
    pub fn quota(&self, consumer: &str) -> Quota {
        let quotas = self.quotas.read().unwrap_or_else(|p| p.into_inner());
        quotas.get(consumer).copied().unwrap_or_default()
    }

    /// What every consumer with stored keys keeps, by consumer.
    pub async fn usage(&self) -> Result<Vec<(String, Usage)>, StorageError> {
        let db = match &self.backend {
            Backend::Sqlite(db) => db,
            Backend::Cluster(cluster) => return cluster.usage().await,
        };
        db.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT handler, keys, bytes FROM actor_usage")?;
            let rows = stmt
                .query_map([], |r| {
                    let (keys, bytes): (i64, i64) = (r.get(1)?, r.get(2)?);
                    let usage = Usage {
                        keys: keys as u64,
                        bytes: bytes as u64,
                    };
                    Ok((r.get(0)?, usage))
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }

    /// The value of `key` in `actor` of `handler`.
    pub async fn get(
        &self,
        handler: &str,
        actor: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        bounds::storage_address(actor, key)?;
        let db = match &self.backend {
            Backend::Sqlite(db) => db,
            Backend::Cluster(cluster) => return cluster.get(handler, actor, key).await,
        };
        let address = (handler.to_owned(), actor.to_owned(), key.to_owned());
        db.read(move |conn| {
            let (handler, actor, key) = address;
            Ok(conn
                .prepare_cached(
                    "SELECT value FROM actor_values
                         WHERE handler = ?1 AND actor = ?2 AND key = ?3",
                )?
                .query_row(params![handler, actor, key], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    /// Stores `value` under `key` in `actor` of `handler`, within `handler`'s quota: the
    /// usage check and the write are one transaction, and a value replacing another
    /// counts the difference.
    pub async fn put(
        &self,
        handler: &str,
        actor: &str,
        key: &str,
        value: &[u8],
    ) -> Result<(), StorageError> {
        bounds::storage_address(actor, key)?;
        bounds::check("value", value.len(), MAX_VALUE_BYTES)?;
        let quota = self.quota(handler);
        let db = match &self.backend {
            Backend::Sqlite(db) => db,
            Backend::Cluster(cluster) => {
                return cluster.put(handler, actor, key, value, quota).await;
            }
        };
        let row = (
            handler.to_owned(),
            actor.to_owned(),
            key.to_owned(),
            value.to_vec(),
        );
        db.write(move |conn| {
            let (handler, actor, key, value) = row;
            let replaced: Option<i64> = conn
                .prepare_cached(&format!(
                    "SELECT {ROW_BYTES} FROM actor_values
                         WHERE handler = ?1 AND actor = ?2 AND key = ?3"
                ))?
                .query_row(params![handler, actor, key], |r| r.get(0))
                .optional()?;
            let usage = usage_of(conn, &handler)?;
            let row_bytes = (actor.len() + key.len() + value.len()) as u64;
            let replaced = replaced.map(|bytes| bytes as u64);
            let after = usage.after_put(&handler, quota, replaced, row_bytes)?;
            conn.prepare_cached(
                "INSERT INTO actor_values (handler, actor, key, value) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (handler, actor, key) DO UPDATE SET value = ?4",
            )?
            .execute(params![handler, actor, key, value])?;
            set_usage(conn, &handler, after)?;
            Ok(())
        })
        .await
    }

    /// Deletes `key` from `actor` of `handler`.
    pub async fn delete(&self, handler: &str, actor: &str, key: &str) -> Result<(), StorageError> {
        bounds::storage_address(actor, key)?;
        let db = match &self.backend {
            Backend::Sqlite(db) => db,
            Backend::Cluster(cluster) => return cluster.delete(handler, actor, key).await,
        };
        let address = (handler.to_owned(), actor.to_owned(), key.to_owned());
        db.write(move |conn| {
            let (handler, actor, key) = address;
            let deleted: Option<i64> = conn
                .prepare_cached(&format!(
                    "DELETE FROM actor_values WHERE handler = ?1 AND actor = ?2 AND key = ?3
                         RETURNING {ROW_BYTES}"
                ))?
                .query_row(params![handler, actor, key], |r| r.get(0))
                .optional()?;
            if let Some(bytes) = deleted {
                let usage = usage_of(conn, &handler)?;
                let after = Usage {
                    keys: usage.keys.saturating_sub(1),
                    bytes: usage.bytes.saturating_sub(bytes as u64),
                };
                set_usage(conn, &handler, after)?;
            }
            Ok(())
        })
        .await
    }

    /// One page of the keys of `actor` of `handler` starting with `prefix`, with their
    /// values, in key order (by UTF-8 bytes): the first keys after `start_after` (from
    /// the first when `None`), at most `limit` of them and [`MAX_LIST_PAGE`] in any case.
    /// A page ends early, after at least one entry, once it holds
    /// [`MAX_LIST_PAGE_BYTES`] of keys and values; an empty page ends the listing.
    pub async fn list_prefix(
        &self,
        handler: &str,
        actor: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        bounds::storage_address(actor, prefix)?;
        if let Some(after) = start_after {
            bounds::check("start-after key", after.len(), bounds::MAX_KEY_BYTES)?;
        }
        let range = (
            handler.to_owned(),
            actor.to_owned(),
            prefix.to_owned(),
            start_after.map(str::to_owned),
            limit.min(MAX_LIST_PAGE),
        );
        let db = match &self.backend {
            Backend::Sqlite(db) => db,
            Backend::Cluster(cluster) => {
                let (handler, actor, prefix, start_after, limit) = range;
                return cluster
                    .list_prefix(&handler, &actor, &prefix, start_after.as_deref(), limit)
                    .await;
            }
        };
        db.read(move |conn| {
            let (handler, actor, prefix, start_after, limit) = range;
            let mut stmt = conn.prepare_cached(
                "SELECT key, value FROM actor_values
                     WHERE handler = ?1 AND actor = ?2 AND key >= ?3 AND (?4 IS NULL OR key > ?4)
                       AND substr(key, 1, length(?3)) = ?3
                     ORDER BY key LIMIT ?5",
            )?;
            let mut rows = stmt.query(params![handler, actor, prefix, start_after, limit])?;
            let (mut page, mut bytes) = (Vec::new(), 0);
            while let Some(row) = rows.next()? {
                if bytes >= MAX_LIST_PAGE_BYTES {
                    break;
                }
                let (key, value): (String, Vec<u8>) = (row.get(0)?, row.get(1)?);
                bytes += key.len() + value.len();
                page.push((key, value));
            }
            Ok(page)
        })
        .await
    }
}

impl Usage {
    /// What `consumer` keeps after a put of a row of `row_bytes` that replaces one of
    /// `replaced` bytes (`None`: a new key), if `quota` allows it: a put that does not
    /// grow what is kept is allowed even over the quota.
    fn after_put(
        self,
        consumer: &str,
        quota: Quota,
        replaced: Option<u64>,
        row_bytes: u64,
    ) -> Result<Usage, StorageError> {
        let after = Usage {
            keys: self.keys + u64::from(replaced.is_none()),
            bytes: (self.bytes + row_bytes).saturating_sub(replaced.unwrap_or(0)),
        };
        if after.keys > quota.keys && after.keys > self.keys {
            return Err(StorageError::Refused(format!(
                "actor storage quota of {} keys reached: consumer `{consumer}` keeps {} keys",
                quota.keys, self.keys
            )));
        }
        if after.bytes > quota.bytes && after.bytes > self.bytes {
            return Err(StorageError::Refused(format!(
                "actor storage quota of {} bytes reached: consumer `{consumer}` keeps {} \
                 bytes and this value would make it {}",
                quota.bytes, self.bytes, after.bytes
            )));
        }
        Ok(after)
    }
}

/// What `handler` keeps, as `conn` sees it.
fn usage_of(conn: &Connection, handler: &str) -> rusqlite::Result<Usage> {
    let usage: Option<(i64, i64)> = conn
        .prepare_cached("SELECT keys, bytes FROM actor_usage WHERE handler = ?1")?
        .query_row([handler], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(usage.map_or_else(Usage::default, |(keys, bytes)| Usage {
        keys: keys as u64,
        bytes: bytes as u64,
    }))
}

/// Records what `handler` keeps, in `conn`'s transaction.
fn set_usage(conn: &Connection, handler: &str, usage: Usage) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO actor_usage (handler, keys, bytes) VALUES (?1, ?2, ?3)
         ON CONFLICT (handler) DO UPDATE SET keys = ?2, bytes = ?3",
    )?
    .execute(params![handler, usage.keys as i64, usage.bytes as i64])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits for a storage call (the work runs on the database's threads).
    fn run<T>(call: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(call)
    }

    fn open(dir: &tempfile::TempDir) -> ActorStorage {
        ActorStorage::open(&crate::store::test_db(dir.path())).unwrap()
    }

    fn list(store: &ActorStorage, prefix: &str) -> Vec<(String, Vec<u8>)> {
        run(store.list_prefix("h1", "a", prefix, None, 100)).unwrap()
    }

    #[test]
    fn values_are_scoped_by_handler_and_actor() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        run(store.put("h1", "a", "count:x", b"1")).unwrap();
        run(store.put("h1", "a", "count:y", b"2")).unwrap();
        run(store.put("h1", "a", "other", b"3")).unwrap();
        run(store.put("h2", "a", "count:x", b"9")).unwrap();
        run(store.put("h1", "b", "count:x", b"8")).unwrap();
        assert_eq!(
            run(store.get("h1", "a", "count:x")).unwrap().as_deref(),
            Some(&b"1"[..])
        );
        assert_eq!(
            list(&store, "count:"),
            [
                ("count:x".into(), b"1".to_vec()),
                ("count:y".into(), b"2".to_vec())
            ]
        );
        run(store.put("h1", "a", "count:x", b"5")).unwrap();
        run(store.delete("h1", "a", "count:y")).unwrap();
        run(store.delete("h1", "a", "missing")).unwrap();
        assert_eq!(list(&store, "count:"), [("count:x".into(), b"5".to_vec())]);
    }

    #[test]
    fn arguments_over_their_bounds_are_refused_naming_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let refused = |result: Result<(), StorageError>| match result {
            Err(StorageError::Refused(why)) => why,
            other => panic!("{other:?}"),
        };
        let why = refused(run(store.put(
            "h",
            "a",
            "big",
            &vec![0; MAX_VALUE_BYTES + 1],
        )));
        assert_eq!(why, "value of 131073 bytes exceeds the 131072-byte limit");
        let why = refused(run(store.put("h", "a", &"k".repeat(8 << 20), b"v")));
        assert!(why.starts_with("key of 8388608 bytes"), "{why}");
        let why = refused(run(store.delete("h", &"a".repeat(257), "k")));
        assert!(why.contains("actor name of 257 bytes"), "{why}");
        assert!(run(store.get("h", "a", &"k".repeat(1025))).is_err());
        assert_eq!(run(store.usage()).unwrap(), [], "nothing was stored");
    }

    #[test]
    fn quotas_count_keys_and_bytes_and_a_replaced_value_counts_the_difference() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.set_quota(
            "h",
            Quota {
                keys: 3,
                bytes: 100,
            },
        );
        // Each row counts the actor name (1), the key (2) and the value.
        run(store.put("h", "a", "k1", &[0; 27])).unwrap();
        run(store.put("h", "a", "k2", &[0; 27])).unwrap();
        let usage = |store: &ActorStorage| run(store.usage()).unwrap()[0].1;
        assert_eq!(usage(&store), Usage { keys: 2, bytes: 60 });
        let err = run(store.put("h", "a", "k3", &[0; 38]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("quota of 100 bytes"), "{err}");
        run(store.put("h", "a", "k1", &[0; 7])).unwrap();
        assert_eq!(usage(&store), Usage { keys: 2, bytes: 40 }, "shrunk");
        run(store.put("h", "a", "k3", &[0; 37])).unwrap();
        assert_eq!(usage(&store), Usage { keys: 3, bytes: 80 });
        let err = run(store.put("h", "a", "k4", b"")).unwrap_err().to_string();
        assert!(err.contains("quota of 3 keys"), "{err}");
        run(store.put("h", "a", "k3", &[1; 37])).unwrap();
        run(store.put("other", "a", "k4", &[0; 100])).unwrap();
        run(store.delete("h", "a", "k2")).unwrap();
        assert_eq!(usage(&store), Usage { keys: 2, bytes: 50 });
        run(store.put("h", "a", "k4", b"")).unwrap();

        drop(store);
        let reopened = open(&dir);
        let mut all = run(reopened.usage()).unwrap();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            all,
            [
                ("h".into(), Usage { keys: 3, bytes: 53 }),
                (
                    "other".into(),
                    Usage {
                        keys: 1,
                        bytes: 103
                    }
                )
            ],
            "counted again from the rows"
        );
        assert_eq!(
            reopened.quota("h"),
            Quota::default(),
            "quotas come from the config"
        );
    }

    #[test]
    fn listings_come_in_pages_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.set_quota(
            "h1",
            Quota {
                keys: 5000,
                bytes: 1 << 30,
            },
        );
        for i in 0..2500 {
            run(store.put("h1", "a", &format!("k:{i:05}"), b"v")).unwrap();
        }
        run(store.put("h1", "a", "l", b"v")).unwrap();
        let mut pages = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = run(store.list_prefix("h1", "a", "k:", after.as_deref(), 5000)).unwrap();
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            pages.push(page);
        }
        let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
        assert_eq!(sizes, [1000, 1000, 500], "capped at {MAX_LIST_PAGE}");
        let keys: Vec<&String> = pages.iter().flatten().map(|(k, _)| k).collect();
        assert_eq!(keys.len(), 2500);
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "in order, once each");
        let small = run(store.list_prefix("h1", "a", "k:", Some("k:00009"), 2)).unwrap();
        assert_eq!(small[0].0, "k:00010");
        assert_eq!(small.len(), 2);

        for i in 0..20 {
            run(store.put("h1", "big", &format!("{i:02}"), &[0; 100 * 1024])).unwrap();
        }
        let page = run(store.list_prefix("h1", "big", "", None, 1000)).unwrap();
        assert_eq!(page.len(), 11, "a page ends once it holds 1 MiB");
    }
}
