//! The agents allowed to connect a connector: each has a secret token, shown once when
//! the agent is added and stored only as its SHA-256 hash.

use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use clawq_protocol::did::validate_agent_did;
use rusqlite::{Connection, OptionalExtension, params};

use crate::clock::now_ms;
use crate::crypto::{random_token, sha256_hex};
use crate::db::{self, Durability};

/// The agent registry, in SQLite.
pub struct AgentRegistry {
    conn: Mutex<Connection>,
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
    /// Opens (or creates) the registry at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = db::open(
            path,
            Durability::Process,
            "CREATE TABLE IF NOT EXISTS agents (
                 did        TEXT PRIMARY KEY,
                 token_hash TEXT NOT NULL,
                 added_ms   INTEGER NOT NULL
             );",
        )?;
        Ok(AgentRegistry {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `did` and returns its new secret token (to be shown once).
    pub fn add(&self, did: &str) -> Result<String> {
        validate_agent_did(did).with_context(|| format!("`{did}` is not a valid agent DID"))?;
        let token = random_token("cqa_")?;
        let inserted = self.conn().execute(
            "INSERT OR IGNORE INTO agents (did, token_hash, added_ms) VALUES (?1, ?2, ?3)",
            params![did, sha256_hex(token.as_bytes()), now_ms()],
        )?;
        if inserted == 0 {
            bail!("agent {did} is already registered; remove it first to issue a new token");
        }
        Ok(token)
    }

    /// Removes `did`; returns whether it was registered.
    pub fn remove(&self, did: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM agents WHERE did = ?1", [did])?
            > 0)
    }

    /// Every registered agent, by DID.
    pub fn list(&self) -> Result<Vec<Agent>> {
        let conn = self.conn();
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
    }

    /// Whether `token` is the token of agent `did`.
    pub fn authenticate(&self, did: &str, token: &str) -> Result<bool> {
        let found: Option<i64> = self
            .conn()
            .prepare_cached("SELECT 1 FROM agents WHERE did = ?1 AND token_hash = ?2")?
            .query_row(params![did, sha256_hex(token.as_bytes())], |r| r.get(0))
            .optional()?;
        Ok(found.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DID: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";

    #[test]
    fn tokens_authenticate_only_their_agent() {
        let dir = tempfile::tempdir().unwrap();
        let agents = AgentRegistry::open(&dir.path().join("a.db")).unwrap();
        let token = agents.add(DID).unwrap();
        assert!(agents.authenticate(DID, &token).unwrap());
        assert!(!agents.authenticate(DID, "cqa_wrong").unwrap());
        let other = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";
        assert!(!agents.authenticate(other, &token).unwrap());
        assert!(
            agents
                .add(DID)
                .unwrap_err()
                .to_string()
                .contains("already registered")
        );
        assert!(agents.add("did:cdi:bad").is_err());
        assert_eq!(agents.list().unwrap().len(), 1);
        assert!(agents.remove(DID).unwrap());
        assert!(!agents.authenticate(DID, &token).unwrap());
    }
}
