//! A batch's side effects: what its handler wrote through a capability that the batch's
//! outcomes must not be committed without (an ack whose revocation was lost would lose
//! the revocation for good, since the message is never delivered again).
//!
//! Side effects bound for the host's database are run in the very transaction that
//! commits the outcomes: one commit for both, and never one without the other. Others (a
//! cluster's KV bucket) are written first, and the outcomes committed once they are.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::Shared;
use rusqlite::Connection;

use crate::store::{Database, StoreError};

/// Statements that write side effects; they may be run again (a commit that failed is
/// tried again whole).
pub type Statements = Arc<dyn Fn(&Connection) -> rusqlite::Result<()> + Send + Sync>;

/// Writes under way outside the host's database; the error says why they failed.
pub type Remote = Shared<Pin<Box<dyn Future<Output = Result<(), String>> + Send>>>;

/// What a batch wrote that its outcomes are committed with (see the module doc).
#[derive(Clone, Default)]
pub enum SideEffects {
    /// Nothing.
    #[default]
    None,
    /// Statements for `db`, to run in the transaction that commits the outcomes.
    Local {
        /// The database they write to.
        db: Database,
        /// The statements.
        statements: Statements,
    },
    /// Writes already under way elsewhere.
    Remote(Remote),
}

impl SideEffects {
    /// Commits them on their own: what a caller without outcomes to commit does.
    pub async fn commit(self) -> Result<(), String> {
        match self {
            SideEffects::None => Ok(()),
            SideEffects::Local { db, statements } => db
                .write(move |conn| statements(conn).map_err(StoreError::from))
                .await
                .map_err(|err| err.to_string()),
            SideEffects::Remote(remote) => remote.await,
        }
    }

    /// The statements to run in a transaction of `db`, the transaction that commits the
    /// outcomes; side effects bound elsewhere are committed first (and `None` returned).
    pub async fn statements_for(self, db: &Database) -> Result<Option<Statements>, String> {
        match self {
            SideEffects::Local {
                db: theirs,
                statements,
            } if theirs.path() == db.path() => Ok(Some(statements)),
            other => other.commit().await.map(|()| None),
        }
    }

    /// Writes already under way, from `future`.
    pub fn remote(future: impl Future<Output = Result<(), String>> + Send + 'static) -> Self {
        let future: Pin<Box<dyn Future<Output = Result<(), String>> + Send>> = Box::pin(future);
        SideEffects::Remote(future.shared())
    }
}
