//! What a queue storage backend provides to the [`super::core`]: the data path
//! ([`DataPath`]: store published rows in their lanes, lease a lane's due rows, commit
//! fates) and the operator's work ([`Operator`]: counts, browsing, redrive, purge,
//! expiry). [`Storage`] is both.
//!
//! Every method is one transaction of the backend: its changes are all kept or none. The
//! decisions are the core's: a backend applies [`super::core::readiness`],
//! [`super::core::poisoned`] and the [`DeadLetterRoute`] it is given inside its
//! transaction, so that every backend batches, retries and dead-letters alike.

use std::sync::Arc;

use async_trait::async_trait;

use super::core::DeadLetterRoute;
use super::lane::Lane;
use super::routes::Routes;
use super::{
    Delivery, MessagePage, NewMessage, QueueCounts, QueueError, RedriveSummary, RedriveTarget,
    RetryPolicy, Selection, SettleSummary, StoredMessage,
};
use crate::side_effects::SideEffects;

/// A published message and the lanes it is stored in, one row per lane.
#[derive(Debug, Clone)]
pub struct PublishRow {
    /// Its id.
    pub id: String,
    /// The message.
    pub message: NewMessage,
    /// The lanes of the consumers that take it (never empty).
    pub lanes: Vec<Lane>,
}

/// How to lease the next batch of a lane.
#[derive(Clone)]
pub struct LeasePlan {
    /// Most messages in the batch.
    pub max_size: usize,
    /// Most batches leased at once (see [`super::BatchTerms::batches`] and
    /// [`super::core::taken`]).
    pub batches: usize,
    /// Longest wait for a batch to fill from its first ready message, in milliseconds.
    pub timeout_ms: u64,
    /// The time of the lease, in milliseconds since the Unix epoch.
    pub now: u64,
    /// When the lease runs out.
    pub deadline: u64,
    /// The lane's retry policy, for [`super::core::poisoned`].
    pub policy: RetryPolicy,
    /// Where the messages given up on go.
    pub dead_letters: DeadLetterRoute,
}

/// What a lease did.
#[derive(Debug)]
pub enum Leased {
    /// No batch is due: look again at this time, or when woken (`None`).
    Wait(Option<u64>),
    /// A batch was due: these messages are leased (maybe none, if every due message was
    /// given up on); `gave_up` counts the due messages dead-lettered or dropped instead,
    /// `woken` the lanes that received dead letters.
    Batch {
        /// The leased messages, in the order they became ready.
        deliveries: Vec<Delivery>,
        /// The due messages given up on.
        gave_up: SettleSummary,
        /// Lanes that received dead letters.
        woken: Vec<Lane>,
    },
}

/// Where a settled message ends up, once the core applied the retry policy
/// ([`super::core::Fate::of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Delete it.
    Delete,
    /// Make it ready at `visible_ms`, recording `error` as its last failure.
    Retry {
        /// When it is ready again.
        visible_ms: u64,
        /// Why the attempt failed.
        error: String,
    },
    /// Make it ready at `visible_ms` without counting the delivery as an attempt.
    Release {
        /// When it is ready again.
        visible_ms: u64,
    },
    /// Give up on it: to the dead-letter queue, or dropped without one.
    DeadLetter {
        /// Why.
        reason: String,
        /// The failure of this attempt, when it was a retry over the limit.
        error: Option<String>,
    },
}

/// What a commit of fates did.
#[derive(Debug, Default)]
pub struct Committed {
    /// Message by message, summed.
    pub summary: SettleSummary,
    /// Lanes that received dead letters.
    pub woken: Vec<Lane>,
}

/// The data path: what consumers and producers need, each call one transaction.
#[async_trait]
pub trait DataPath: Send + Sync + 'static {
    /// Stores every row of `rows`, ready at `now` plus its delay.
    async fn insert(&self, rows: Vec<PublishRow>, now: u64) -> Result<(), QueueError>;

    /// Reads the head of `lane`; if [`super::core::readiness`] says a batch is due,
    /// leases its messages until `plan.deadline`, counting an attempt each, except those
    /// [`super::core::poisoned`] says to give up on, which go where
    /// `plan.dead_letters` says.
    async fn lease(&self, lane: &Lane, plan: LeasePlan) -> Result<Leased, QueueError>;

    /// Commits the fate of each message delivered from `lane`, provided the lease it was
    /// delivered under still holds it (else it counts as stale and is left alone), with
    /// the batch's side effects `effects` or after them.
    async fn commit(
        &self,
        lane: &Lane,
        fates: Vec<(Delivery, Fate)>,
        dead_letters: DeadLetterRoute,
        now: u64,
        effects: SideEffects,
    ) -> Result<Committed, QueueError>;
}

/// The operator's work, each call one transaction (or one read).
#[async_trait]
pub trait Operator: Send + Sync + 'static {
    /// The lanes of `queue` that hold messages, each with its counts at `now`, in the
    /// order of their written names. Costs no scan of the backlog.
    async fn lanes(&self, queue: &str, now: u64) -> Result<Vec<(Lane, QueueCounts)>, QueueError>;

    /// Up to `limit` messages of `queue` in publish order, after the position `after`.
    async fn list(
        &self,
        queue: &str,
        after: Option<u64>,
        limit: usize,
        now: u64,
    ) -> Result<MessagePage, QueueError>;

    /// The message `id` of `queue`, if it is there.
    async fn get(
        &self,
        queue: &str,
        id: &str,
        now: u64,
    ) -> Result<Option<StoredMessage>, QueueError>;

    /// Moves the selected messages of `queue` not in flight at `now` to `target` (a
    /// named queue fans out through `routes`), ready at once with attempts and failure
    /// records reset; returns what it did and the lanes that received messages.
    async fn redrive(
        &self,
        queue: &str,
        selection: &Selection,
        target: &RedriveTarget,
        routes: Arc<Routes>,
        now: u64,
    ) -> Result<(RedriveSummary, Vec<Lane>), QueueError>;

    /// Deletes the selected messages of `queue` not in flight at `now`; returns how many.
    async fn purge(&self, queue: &str, selection: &Selection, now: u64) -> Result<u64, QueueError>;

    /// Deletes at most `limit` messages of `queue` not in flight at `now` that entered it
    /// before `cutoff_ms`; returns how many.
    async fn expire(
        &self,
        queue: &str,
        cutoff_ms: u64,
        now: u64,
        limit: u64,
    ) -> Result<u64, QueueError>;
}

/// A complete storage backend.
pub trait Storage: DataPath + Operator {}

impl<T: DataPath + Operator> Storage for T {}
