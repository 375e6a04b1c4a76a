//! The issued tokens of a cluster: one key per token in the `clawq_tokens` key-value
//! bucket, named by the SHA-256 hash of its secret (what a request's token is looked up
//! by), holding the token without its secret. Every host reads the bucket, so a token
//! issued on one host is taken by all, and one removed on one host is refused by all.

use anyhow::{Context, Result};
use async_nats::jetstream::kv::Store;
use bytes::Bytes;

use super::{Role, Token};
use crate::cluster::Cluster;
use crate::kv;

/// The bucket of the issued tokens.
pub const BUCKET: &str = "clawq_tokens";

/// A token, as the bucket keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    id: String,
    name: String,
    role: Role,
    queues: Vec<String>,
    created_ms: u64,
}

impl From<Record> for Token {
    fn from(r: Record) -> Token {
        Token {
            id: r.id,
            name: r.name,
            role: r.role,
            queues: r.queues,
            created_ms: r.created_ms,
        }
    }
}

/// The tokens of a cluster.
pub struct ClusterTokens {
    bucket: Store,
}

impl ClusterTokens {
    /// Opens the bucket.
    pub(super) async fn open(cluster: &Cluster) -> Result<Self> {
        let bucket = kv::bucket(cluster, BUCKET, "clawq: the issued API tokens", false).await?;
        Ok(ClusterTokens { bucket })
    }

    /// Stores `token`, whose secret hashes to `hash`.
    pub(super) async fn create(&self, token: &Token, hash: &str) -> Result<()> {
        let record = Record {
            id: token.id.clone(),
            name: token.name.clone(),
            role: token.role,
            queues: token.queues.clone(),
            created_ms: token.created_ms,
        };
        self.bucket
            .create(hash, Bytes::from(serde_json::to_vec(&record)?))
            .await
            .context("storing the token")?;
        Ok(())
    }

    /// Every token with the hash it is kept under, in no particular order.
    async fn all(&self) -> Result<Vec<(String, Token)>> {
        let mut tokens = Vec::new();
        for hash in kv::keys(&self.bucket).await? {
            if let Some(token) = self.find(&hash).await? {
                tokens.push((hash, token));
            }
        }
        Ok(tokens)
    }

    /// Every token, oldest first.
    pub(super) async fn list(&self) -> Result<Vec<Token>> {
        let mut tokens: Vec<Token> = self.all().await?.into_iter().map(|(_, t)| t).collect();
        tokens.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(tokens)
    }

    /// Removes the token `id`; whether there was one.
    pub(super) async fn remove(&self, id: &str) -> Result<bool> {
        let Some((hash, _)) = self.all().await?.into_iter().find(|(_, t)| t.id == id) else {
            return Ok(false);
        };
        self.bucket
            .delete(&hash)
            .await
            .context("removing the token")?;
        Ok(true)
    }

    /// The token whose secret hashes to `hash`, if one is kept.
    pub(super) async fn find(&self, hash: &str) -> Result<Option<Token>> {
        let value = kv::leader_get(&self.bucket, hash)
            .await
            .context("reading the tokens")?;
        value
            .map(|v| {
                serde_json::from_slice::<Record>(&v)
                    .map(Token::from)
                    .context("a corrupt token record")
            })
            .transpose()
    }
}
