//! The trust store: which agents are revoked, in SQLite so that revocations survive
//! restarts, or in the cluster's key-value bucket ([`jetstream`]) when several hosts
//! share one, so that every host answers the same. It backs the `trust-store`
//! capability and `GET /v1/trust/agents/{did}`.

use std::sync::Arc;
use std::time::Duration;

use clawq_protocol::did::{DidError, validate_agent_did};
use futures_util::FutureExt;
use rusqlite::{OptionalExtension, params};

use crate::cluster::Cluster;
use crate::coalesced::Coalesced;
use crate::relay::hub::ConnectionHub;
use crate::side_effects::SideEffects;
use crate::store::{Database, Pending, StoreError};

use crate::clock::now_ms;

mod jetstream;

/// Errors of the trust store.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The DID is not a valid agent DID; asking again will not help.
    #[error("invalid agent DID `{did}`: {reason}")]
    InvalidDid {
        /// The DID given.
        did: String,
        /// What is wrong with it.
        reason: DidError,
    },
    /// The storage failed; a later attempt may succeed.
    #[error("trust store unavailable: {0}")]
    Unavailable(String),
}

impl TrustError {
    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, TrustError::Unavailable(_))
    }
}

impl From<rusqlite::Error> for TrustError {
    fn from(err: rusqlite::Error) -> Self {
        TrustError::Unavailable(err.to_string())
    }
}

impl From<StoreError> for TrustError {
    fn from(err: StoreError) -> Self {
        TrustError::Unavailable(err.to_string())
    }
}

/// The revocation state of one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTrust {
    /// When the agent was (last) marked revoked, in ms since the epoch, if its marker
    /// has not expired.
    pub revoked_at_ms: Option<u64>,
    /// When that marker expires, in ms since the epoch.
    pub expires_at_ms: Option<u64>,
}

/// The trust store: in SQLite, or in the cluster.
pub struct TrustStore {
    backend: Backend,
    marker_ttl: Duration,
}

/// Where the revocations are kept.
enum Backend {
    /// The database, and the revocations queued to it: one write job writes all of
    /// those queued before it runs (however many batches queued them).
    Sqlite(Database, Coalesced<Marker>),
    Cluster(Box<jetstream::ClusterTrust>),
}

/// A revocation marker: the DID, when it was revoked, and when the marker expires.
type Marker = (String, u64, u64);

impl TrustStore {
    /// Opens (or creates) the trust store in `db`; revocation markers last `marker_ttl`.
    pub fn open(db: &Database, marker_ttl: Duration) -> Result<Self, TrustError> {
        // Without a rowid, a revocation writes one B-tree, keyed by its DID, instead of
        // a table and its key's index. A table made by an older version keeps its rowid:
        // every statement reads and writes both alike.
        db.connection(
            "CREATE TABLE IF NOT EXISTS revoked_agents (
                 did        TEXT PRIMARY KEY,
                 revoked_ms INTEGER NOT NULL,
                 expires_ms INTEGER NOT NULL
             ) WITHOUT ROWID;",
        )?;
        let unwritten = Coalesced::new(db, false, |conn, rows: Vec<Marker>| {
            Ok(upsert(conn, &rows)?)
        });
        Ok(TrustStore {
            backend: Backend::Sqlite(db.clone(), unwritten),
            marker_ttl,
        })
    }

    /// Opens (or creates) the trust store of `cluster`, shared by every host connected
    /// to it; revocation markers last `marker_ttl`. A revocation made by any host closes
    /// the agent's connection in `hub` (1008 `agent_revoked`).
    pub async fn open_cluster(
        cluster: &Cluster,
        marker_ttl: Duration,
        hub: std::sync::Arc<ConnectionHub>,
    ) -> anyhow::Result<Self> {
        Ok(TrustStore {
            backend: Backend::Cluster(Box::new(jetstream::ClusterTrust::open(cluster, hub).await?)),
            marker_ttl,
        })
    }

    /// Marks `did` revoked from now on, refreshing an existing marker; returns once the
    /// marker is committed.
    pub async fn revoke(&self, did: &str) -> Result<(), TrustError> {
        self.revoke_later(did)?.await
    }

    /// Queues the revocation of `did` (checked at once) without waiting for its commit:
    /// the returned future resolves once it is committed. Every write queued afterwards
    /// (the ack of the message that asked for it) commits no earlier.
    ///
    /// In SQLite, the revocation joins the write job already queued for revocations, if
    /// one is queued and has not run yet (it writes every revocation queued when it
    /// runs), else queues one: so a write queued after this call is queued after that
    /// job, and commits no earlier.
    pub fn revoke_later(&self, did: &str) -> Result<Pending<TrustError>, TrustError> {
        self.revoke_all_later(&[did.to_owned()])
    }

    /// Queues the revocations of `dids` together (each checked at once; none is queued if
    /// one is invalid), as [`TrustStore::revoke_later`] queues one: the returned future
    /// resolves once all of them are committed. In SQLite they join one write job, so
    /// they commit in one transaction, whereas revocations queued one by one may be split
    /// by the writer thread taking the job between two of them.
    pub fn revoke_all_later(&self, dids: &[String]) -> Result<Pending<TrustError>, TrustError> {
        let markers = self.markers(dids.to_vec())?;
        let unwritten = match &self.backend {
            Backend::Sqlite(_, unwritten) => unwritten,
            Backend::Cluster(cluster) => {
                let puts: Vec<_> = markers
                    .into_iter()
                    .map(|(did, now, expires)| {
                        cluster.revoke_later(did, now, expires, self.marker_ttl)
                    })
                    .collect();
                return Ok(Box::pin(
                    futures_util::future::try_join_all(puts).map(|committed| committed.map(drop)),
                ));
            }
        };
        let written = unwritten.add(markers);
        Ok(Box::pin(async move { Ok(written.await?) }))
    }

    /// The revocations of `dids` (each checked at once; none if one is invalid) as side
    /// effects of a batch, committed with its outcomes: in SQLite, the statements that
    /// write them, run in the transaction that settles the batch; in the cluster, the
    /// puts, started now.
    pub fn revocations(&self, dids: Vec<String>) -> Result<SideEffects, TrustError> {
        match &self.backend {
            Backend::Sqlite(db, _) => {
                let rows = self.markers(dids)?;
                Ok(SideEffects::Local {
                    db: db.clone(),
                    statements: Arc::new(move |conn| upsert(conn, &rows)),
                })
            }
            Backend::Cluster(_) => {
                let revoked = self.revoke_all_later(&dids)?;
                Ok(SideEffects::remote(
                    revoked.map(|done| done.map_err(|err| err.to_string())),
                ))
            }
        }
    }

    /// The revocation markers of `dids` made now (each DID checked; none if one is
    /// invalid): the DID, when, and when the marker expires.
    fn markers(&self, dids: Vec<String>) -> Result<Vec<Marker>, TrustError> {
        for did in &dids {
            check_did(did)?;
        }
        let now = now_ms();
        let expires = now + self.marker_ttl.as_millis() as u64;
        Ok(dids.into_iter().map(|did| (did, now, expires)).collect())
    }

    /// The revocation state of `did` now.
    pub async fn lookup(&self, did: &str) -> Result<AgentTrust, TrustError> {
        check_did(did)?;
        let db = match &self.backend {
            Backend::Sqlite(db, _) => db,
            Backend::Cluster(cluster) => return cluster.lookup(did).await,
        };
        let did = did.to_owned();
        let row: Option<(u64, u64)> = db
            .read(move |conn| {
                Ok::<_, TrustError>(
                    conn.prepare_cached(
                        "SELECT revoked_ms, expires_ms FROM revoked_agents
                         WHERE did = ?1 AND expires_ms > ?2",
                    )?
                    .query_row(params![did, now_ms()], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?,
                )
            })
            .await?;
        Ok(AgentTrust {
            revoked_at_ms: row.map(|(revoked, _)| revoked),
            expires_at_ms: row.map(|(_, expires)| expires),
        })
    }

    /// Whether `did` is revoked now.
    pub async fn is_revoked(&self, did: &str) -> Result<bool, TrustError> {
        Ok(self.lookup(did).await?.revoked_at_ms.is_some())
    }
}

/// Writes each revocation of `rows` (the DID, when, and when its marker expires),
/// refreshing an existing marker.
fn upsert(conn: &rusqlite::Connection, rows: &[Marker]) -> rusqlite::Result<()> {
    let mut upsert = conn.prepare_cached(
        "INSERT INTO revoked_agents (did, revoked_ms, expires_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT (did) DO UPDATE SET revoked_ms = ?2, expires_ms = ?3",
    )?;
    for (did, now, expires) in rows {
        upsert.execute(params![did, now, expires])?;
    }
    Ok(())
}

/// Checks that `did` is an agent DID, as a revocation or a lookup requires.
pub(crate) fn check_did(did: &str) -> Result<(), TrustError> {
    validate_agent_did(did).map_err(|reason| TrustError::InvalidDid {
        did: did.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DID: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";

    #[tokio::test]
    async fn revocations_persist_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let store =
            TrustStore::open(&crate::store::test_db(path), Duration::from_secs(3600)).unwrap();
        assert!(!store.is_revoked(DID).await.unwrap());
        store.revoke(DID).await.unwrap();
        store.revoke(DID).await.unwrap();
        drop(store);

        let reopened =
            TrustStore::open(&crate::store::test_db(path), Duration::from_secs(3600)).unwrap();
        assert!(reopened.is_revoked(DID).await.unwrap());

        let expiring = TrustStore::open(&crate::store::test_db(path), Duration::ZERO).unwrap();
        expiring.revoke(DID).await.unwrap();
        assert!(
            !expiring.is_revoked(DID).await.unwrap(),
            "a zero-length marker has expired"
        );
    }

    #[tokio::test]
    async fn revocations_queued_together_are_each_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = TrustStore::open(
            &crate::store::test_db(dir.path()),
            Duration::from_secs(3600),
        )
        .unwrap();
        let dids: Vec<String> = (0..300u64)
            .map(|i| {
                format!(
                    "did:cdi:registry.clawdentity.com:agent:{}",
                    ulid::Ulid::from_parts(i, 7)
                )
            })
            .collect();
        let pending: Vec<_> = dids
            .iter()
            .map(|did| store.revoke_later(did).unwrap())
            .collect();
        for committed in futures_util::future::join_all(pending).await {
            committed.unwrap();
        }
        for did in &dids {
            assert!(store.is_revoked(did).await.unwrap(), "{did}");
        }
    }

    #[tokio::test]
    async fn invalid_dids_are_refused_permanently() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            TrustStore::open(&crate::store::test_db(dir.path()), Duration::from_secs(1)).unwrap();
        let err = store.revoke("did:cdi:x:agent:1").await.unwrap_err();
        assert!(!err.is_transient());
        assert!(err.to_string().contains("invalid agent DID"));
    }
}
