//! The API tokens the operator issues (`clawq tokens`, `POST/GET/DELETE /v1/tokens`):
//! producer tokens, which publish to the queues they name, and extra admin tokens. Each
//! secret is shown once, when it is created, and stored only as its SHA-256 hash, in
//! the host's database ([`crate::store`]), or in the cluster's key-value bucket
//! ([`jetstream`]) when several hosts share one.

use anyhow::Result;
use rusqlite::{OptionalExtension, params};

use crate::clock::now_ms;
use crate::cluster::Cluster;
use crate::crypto::{random_token, sha256_hex};
use crate::store::{Database, StoreError};

mod jetstream;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Publish to the queues the token names.
    Producer,
    /// Everything the admin token may do.
    Admin,
}

impl Role {
    /// The role's name, as the API and the store spell it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Admin => "admin",
        }
    }

    fn parse(name: &str) -> Option<Role> {
        [Role::Producer, Role::Admin]
            .into_iter()
            .find(|r| r.name() == name)
    }
}

/// An issued token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// Its id (`tok_<ULID>`), which names it in a listing and a removal.
    pub id: String,
    /// The name the operator gave it (may be empty).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The queues a producer token publishes to (empty for an admin token).
    pub queues: Vec<String>,
    /// When it was created, ms since the epoch.
    pub created_ms: u64,
}

/// The table of the issued tokens.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS tokens (
             id         TEXT PRIMARY KEY,
             name       TEXT NOT NULL,
             role       TEXT NOT NULL,
             queues     TEXT NOT NULL,
             token_hash TEXT NOT NULL UNIQUE,
             created_ms INTEGER NOT NULL
         );";

/// The issued tokens, in SQLite or in the cluster.
pub struct TokenStore {
    backend: Backend,
}

/// Where the tokens are kept.
enum Backend {
    Sqlite(Database),
    Cluster(Box<jetstream::ClusterTokens>),
}

impl TokenStore {
    /// Opens (or creates) the store in `db`.
    pub fn open(db: &Database) -> Result<Self> {
        db.connection(SCHEMA)?;
        Ok(TokenStore {
            backend: Backend::Sqlite(db.clone()),
        })
    }

    /// Opens (or creates) the store of `cluster`, shared by every host connected to it.
    pub async fn open_cluster(cluster: &Cluster) -> Result<Self> {
        Ok(TokenStore {
            backend: Backend::Cluster(Box::new(jetstream::ClusterTokens::open(cluster).await?)),
        })
    }

    /// Issues a token of `role` for `queues`, named `name`; returns it and its secret
    /// (to be shown once).
    pub async fn create(
        &self,
        role: Role,
        queues: &[String],
        name: &str,
    ) -> Result<(Token, String)> {
        let secret = random_token(match role {
            Role::Producer => "cqp_",
            Role::Admin => "cqadm_",
        })?;
        let token = Token {
            id: format!("tok_{}", ulid::Ulid::new()),
            name: name.to_owned(),
            role,
            queues: queues.to_vec(),
            created_ms: now_ms(),
        };
        let row = (
            token.id.clone(),
            token.name.clone(),
            serde_json::to_string(&token.queues)?,
            sha256_hex(secret.as_bytes()),
            token.created_ms,
        );
        let db = match &self.backend {
            Backend::Sqlite(db) => db,
            Backend::Cluster(cluster) => {
                cluster.create(&token, &row.3).await?;
                return Ok((token, secret));
            }
        };
        db.write_synced(move |conn| {
            let (id, name, queues, hash, created_ms) = row;
            conn.execute(
                "INSERT INTO tokens (id, name, role, queues, token_hash, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, name, role.name(), queues, hash, created_ms],
            )?;
            Ok::<_, anyhow::Error>(())
        })
        .await?;
        Ok((token, secret))
    }

    /// Every issued token, oldest first.
    pub async fn list(&self) -> Result<Vec<Token>> {
        let db = match &self.backend {
            Backend::Sqlite(db) => db,
            Backend::Cluster(cluster) => return cluster.list().await,
        };
        let rows = db
            .read(|conn| {
                conn.prepare(
                    "SELECT id, name, role, queues, created_ms FROM tokens
                     ORDER BY created_ms, id",
                )?
                .query_map([], row)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(StoreError::from)
            })
            .await?;
        rows.into_iter().map(decode).collect()
    }

    /// Removes the token `id`; whether there was one.
    pub async fn remove(&self, id: &str) -> Result<bool> {
        let db = match &self.backend {
            Backend::Sqlite(db) => db,
            Backend::Cluster(cluster) => return cluster.remove(id).await,
        };
        let id = id.to_owned();
        db.write_synced(move |conn| {
            Ok::<_, anyhow::Error>(conn.execute("DELETE FROM tokens WHERE id = ?1", [id])? > 0)
        })
        .await
    }

    /// The token whose secret is `secret`, if one was issued and not removed. The secret
    /// is looked up by its SHA-256 hash, so the lookup's timing tells nothing about it.
    pub async fn find(&self, secret: &str) -> Result<Option<Token>> {
        let hash = sha256_hex(secret.as_bytes());
        let db = match &self.backend {
            Backend::Sqlite(db) => db,
            Backend::Cluster(cluster) => return cluster.find(&hash).await,
        };
        let found = db
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT id, name, role, queues, created_ms FROM tokens WHERE token_hash = ?1",
                )?
                .query_row([hash], row)
                .optional()
                .map_err(StoreError::from)
            })
            .await?;
        found.map(decode).transpose()
    }
}

/// A token's row, as stored.
type Row = (String, String, String, String, u64);

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn decode((id, name, role, queues, created_ms): Row) -> Result<Token> {
    Ok(Token {
        role: Role::parse(&role)
            .ok_or_else(|| anyhow::anyhow!("token {id} has an unknown role `{role}`"))?,
        queues: serde_json::from_str(&queues)?,
        id,
        name,
        created_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_is_found_by_its_secret_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(&crate::store::test_db(dir.path())).unwrap();
        let queues = vec!["q1".to_owned()];
        let (token, secret) = store.create(Role::Producer, &queues, "ci").await.unwrap();
        assert!(secret.starts_with("cqp_"));
        assert_eq!(store.find(&secret).await.unwrap(), Some(token.clone()));
        assert_eq!(store.find("cqp_wrong").await.unwrap(), None);
        assert_eq!(store.list().await.unwrap(), vec![token.clone()]);
        assert!(store.remove(&token.id).await.unwrap());
        assert!(!store.remove(&token.id).await.unwrap());
        assert_eq!(store.find(&secret).await.unwrap(), None);
    }
}
