//! The API tokens the operator issues (`clawq tokens`, `POST/GET/DELETE /v1/tokens`):
//! producer tokens, which publish to the queues they name, and extra admin tokens. Each
//! secret is shown once, when it is created, and stored only as its SHA-256 hash, in
//! the host's database ([`crate::store`]).

use anyhow::Result;
use rusqlite::{OptionalExtension, params};

use crate::clock::now_ms;
use crate::crypto::{random_token, sha256_hex};
use crate::store::{self, Database};

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

/// The issued tokens, in SQLite.
pub struct TokenStore {
    db: store::Shared,
}

impl TokenStore {
    /// Opens (or creates) the store in `db`.
    pub fn open(db: &Database) -> Result<Self> {
        Ok(TokenStore {
            db: db.shared(SCHEMA)?,
        })
    }

    /// Issues a token of `role` for `queues`, named `name`; returns it and its secret
    /// (to be shown once).
    pub fn create(&self, role: Role, queues: &[String], name: &str) -> Result<(Token, String)> {
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
        self.db.lock().execute(
            "INSERT INTO tokens (id, name, role, queues, token_hash, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                token.id,
                token.name,
                role.name(),
                serde_json::to_string(&token.queues)?,
                sha256_hex(secret.as_bytes()),
                token.created_ms
            ],
        )?;
        Ok((token, secret))
    }

    /// Every issued token, oldest first.
    pub fn list(&self) -> Result<Vec<Token>> {
        let conn = self.db.lock();
        let mut stmt = conn.prepare(
            "SELECT id, name, role, queues, created_ms FROM tokens ORDER BY created_ms, id",
        )?;
        let rows = stmt
            .query_map([], row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().map(decode).collect()
    }

    /// Removes the token `id`; whether there was one.
    pub fn remove(&self, id: &str) -> Result<bool> {
        Ok(self
            .db
            .lock()
            .execute("DELETE FROM tokens WHERE id = ?1", [id])?
            > 0)
    }

    /// The token whose secret is `secret`, if one was issued and not removed. The secret
    /// is looked up by its SHA-256 hash, so the lookup's timing tells nothing about it.
    pub fn find(&self, secret: &str) -> Result<Option<Token>> {
        let found = self
            .db
            .lock()
            .prepare_cached(
                "SELECT id, name, role, queues, created_ms FROM tokens WHERE token_hash = ?1",
            )?
            .query_row([sha256_hex(secret.as_bytes())], row)
            .optional()?;
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

    #[test]
    fn a_token_is_found_by_its_secret_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(&crate::store::test_db(dir.path())).unwrap();
        let queues = vec!["q1".to_owned()];
        let (token, secret) = store.create(Role::Producer, &queues, "ci").unwrap();
        assert!(secret.starts_with("cqp_"));
        assert_eq!(store.find(&secret).unwrap(), Some(token.clone()));
        assert_eq!(store.find("cqp_wrong").unwrap(), None);
        assert_eq!(store.list().unwrap(), vec![token.clone()]);
        assert!(store.remove(&token.id).unwrap());
        assert!(!store.remove(&token.id).unwrap());
        assert_eq!(store.find(&secret).unwrap(), None);
    }
}
