//! The agents allowed to connect a connector: each has a secret token, shown once when
//! the agent is added and stored only as its SHA-256 hash. The running host manages them
//! through `POST/GET/DELETE /v1/agents` (see `admin`), `clawq agents` through that API or,
//! offline, on a data directory. When several hosts share a cluster, the registry is
//! the cluster's ([`jetstream`]), so that an agent added on one host connects on any.

use anyhow::Result;
use clawq_protocol::did::{DidError, validate_agent_did};
use rusqlite::{OptionalExtension, params};

use crate::clock::now_ms;
use crate::cluster::Cluster;
use crate::crypto::{random_token, sha256_hex};
use crate::relay::hub::ConnectionHub;
use crate::store::{Database, StoreError};
use crate::trust::{TrustError, TrustStore};

mod jetstream;

/// Why an agent cannot be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The DID is not a valid agent DID.
    #[error("`{did}` is not a valid agent DID: {reason}")]
    InvalidDid {
        /// The DID given.
        did: String,
        /// What is wrong with it.
        reason: DidError,
    },
    /// The agent is registered already.
    #[error("agent {0} is already registered; remove it first to issue a new token")]
    AlreadyRegistered(String),
    /// The trust store holds the agent revoked: its connector would be refused.
    #[error(
        "agent {0} is revoked: its connector would be refused, so it is not registered \
         (a revocation lasts the trust store's `revocation_ttl`)"
    )]
    Revoked(String),
    /// The agent is not registered.
    #[error("agent {0} is not registered")]
    NotRegistered(String),
    /// The registry or the trust store failed; a later attempt may succeed.
    #[error("the agent registry is unavailable: {0}")]
    Storage(String),
}

impl From<rusqlite::Error> for AgentError {
    fn from(err: rusqlite::Error) -> Self {
        AgentError::Storage(err.to_string())
    }
}

impl From<anyhow::Error> for AgentError {
    fn from(err: anyhow::Error) -> Self {
        AgentError::Storage(format!("{err:#}"))
    }
}

impl From<StoreError> for AgentError {
    fn from(err: StoreError) -> Self {
        AgentError::Storage(err.to_string())
    }
}

impl From<TrustError> for AgentError {
    fn from(err: TrustError) -> Self {
        match err {
            TrustError::InvalidDid { did, reason } => AgentError::InvalidDid { did, reason },
            TrustError::Unavailable(why) => AgentError::Storage(why),
        }
    }
}

/// Why a connector of an agent is not (or no longer) let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The agent is not registered (or was removed), or the token is not its token.
    UnknownOrWrongToken,
    /// The trust store holds the agent revoked.
    Revoked,
}

impl Refusal {
    /// The reason a refused connect's 401 body gives (the connector prints it).
    pub fn message(self) -> &'static str {
        match self {
            Refusal::UnknownOrWrongToken => "unknown agent or wrong token",
            Refusal::Revoked => "agent is revoked",
        }
    }
}

/// The agent registry, in SQLite or in the cluster.
pub struct AgentRegistry {
    backend: Backend,
}

/// Where the agents are kept.
enum Backend {
    Sqlite(Database),
    Cluster(Box<jetstream::ClusterAgents>),
}

/// A registered agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// Its DID.
    pub did: String,
    /// When it was added, ms since the epoch.
    pub added_ms: u64,
}

impl AgentRegistry {
    /// Opens (or creates) the registry in `db`.
    pub fn open(db: &Database) -> Result<Self> {
        db.connection(
            "CREATE TABLE IF NOT EXISTS agents (
                 did        TEXT PRIMARY KEY,
                 token_hash TEXT NOT NULL,
                 added_ms   INTEGER NOT NULL
             );",
        )?;
        Ok(AgentRegistry {
            backend: Backend::Sqlite(db.clone()),
        })
    }

    /// Opens (or creates) the registry of `cluster`, shared by every host connected to
    /// it. An agent removed by any host has its connection in `hub` closed (1008
    /// `agent_removed`).
    pub async fn open_cluster(
        cluster: &Cluster,
        hub: std::sync::Arc<ConnectionHub>,
    ) -> Result<Self> {
        Ok(AgentRegistry {
            backend: Backend::Cluster(Box::new(
                jetstream::ClusterAgents::open(cluster, hub).await?,
            )),
        })
    }

    /// Registers `did` and returns its new secret token (to be shown once), whatever the
    /// trust store says (see [`AgentRegistry::register`]).
    pub async fn add(&self, did: &str) -> Result<String, AgentError> {
        validate_agent_did(did).map_err(|reason| AgentError::InvalidDid {
            did: did.to_owned(),
            reason,
        })?;
        let token = random_token("cqa_")?;
        let (did, hash) = (did.to_owned(), sha256_hex(token.as_bytes()));
        let db = match &self.backend {
            Backend::Sqlite(db) => db,
            Backend::Cluster(cluster) => {
                cluster.add(&did, hash, now_ms()).await?;
                return Ok(token);
            }
        };
        db.write_synced(move |conn| {
            let inserted = conn.execute(
                "INSERT OR IGNORE INTO agents (did, token_hash, added_ms) VALUES (?1, ?2, ?3)",
                params![did, hash, now_ms()],
            )?;
            match inserted {
                0 => Err(AgentError::AlreadyRegistered(did)),
                _ => Ok(()),
            }
        })
        .await?;
        Ok(token)
    }

    /// Registers `did` unless `trust` holds it revoked (its connector could never
    /// connect), and returns its new secret token (to be shown once).
    pub async fn register(&self, did: &str, trust: &TrustStore) -> Result<String, AgentError> {
        if trust.is_revoked(did).await? {
            return Err(AgentError::Revoked(did.to_owned()));
        }
        self.add(did).await
    }

    /// Removes `did`, which must be registered. Its open connection, if any, is the
    /// caller's to close.
    pub async fn remove(&self, did: &str) -> Result<(), AgentError> {
        let db = match &self.backend {
            Backend::Sqlite(db) => db,
            Backend::Cluster(cluster) => return cluster.remove(did).await,
        };
        let did = did.to_owned();
        db.write(
            move |conn| match conn.execute("DELETE FROM agents WHERE did = ?1", [&did])? {
                0 => Err(AgentError::NotRegistered(did)),
                _ => Ok(()),
            },
        )
        .await
    }

    /// Every registered agent, by DID.
    pub async fn list(&self) -> Result<Vec<Agent>> {
        let db = match &self.backend {
            Backend::Sqlite(db) => db,
            Backend::Cluster(cluster) => return cluster.list().await,
        };
        db.read(|conn| {
            let mut stmt = conn.prepare("SELECT did, added_ms FROM agents ORDER BY did")?;
            let agents = stmt
                .query_map([], |r| {
                    Ok(Agent {
                        did: r.get(0)?,
                        added_ms: r.get(1)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(agents)
        })
        .await
    }

    /// Whether the connector of `did` presenting `token` may connect: `Ok(None)` if so,
    /// else why not; `Err` when the stores cannot say.
    pub async fn admission(
        &self,
        did: &str,
        token: &str,
        trust: &TrustStore,
    ) -> Result<Option<Refusal>> {
        if !self.authenticate(did, token).await? {
            return Ok(Some(Refusal::UnknownOrWrongToken));
        }
        if trust.is_revoked(did).await? {
            return Ok(Some(Refusal::Revoked));
        }
        Ok(None)
    }

    /// Whether `token` is the token of agent `did`.
    pub async fn authenticate(&self, did: &str, token: &str) -> Result<bool> {
        let (did, hash) = (did.to_owned(), sha256_hex(token.as_bytes()));
        let db = match &self.backend {
            Backend::Sqlite(db) => db,
            Backend::Cluster(cluster) => return cluster.authenticate(&did, &hash).await,
        };
        db.read(move |conn| {
            let found: Option<i64> = conn
                .prepare_cached("SELECT 1 FROM agents WHERE did = ?1 AND token_hash = ?2")?
                .query_row(params![did, hash], |r| r.get(0))
                .optional()?;
            Ok(found.is_some())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DID: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";

    #[tokio::test]
    async fn tokens_authenticate_only_their_agent() {
        let dir = tempfile::tempdir().unwrap();
        let agents = AgentRegistry::open(&crate::store::test_db(dir.path())).unwrap();
        let token = agents.add(DID).await.unwrap();
        assert!(agents.authenticate(DID, &token).await.unwrap());
        assert!(!agents.authenticate(DID, "cqa_wrong").await.unwrap());
        let other = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";
        assert!(!agents.authenticate(other, &token).await.unwrap());
        assert!(
            agents
                .add(DID)
                .await
                .unwrap_err()
                .to_string()
                .contains("already registered")
        );
        assert!(agents.add("did:cdi:bad").await.is_err());
        assert_eq!(agents.list().await.unwrap().len(), 1);
        agents.remove(DID).await.unwrap();
        assert!(!agents.authenticate(DID, &token).await.unwrap());
        assert!(matches!(
            agents.remove(DID).await,
            Err(AgentError::NotRegistered(_))
        ));
    }

    #[tokio::test]
    async fn a_revoked_agent_is_not_registered() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::test_db(dir.path());
        let agents = AgentRegistry::open(&db).unwrap();
        let trust = TrustStore::open(&db, std::time::Duration::from_secs(60)).unwrap();
        trust.revoke(DID).await.unwrap();
        let err = agents.register(DID, &trust).await.unwrap_err();
        assert!(matches!(err, AgentError::Revoked(_)), "{err}");
        assert!(agents.list().await.unwrap().is_empty(), "nothing stored");
        let other = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";
        assert!(
            agents
                .register(other, &trust)
                .await
                .unwrap()
                .starts_with("cqa_")
        );
    }
}
