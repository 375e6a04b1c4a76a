//! The relay sessions of a host, wherever they are kept: in the host's SQLite
//! ([`RelaySessions`], one actor per agent) or in the NATS JetStream cluster that several
//! hosts share ([`ClusterSessions`], `[backend] kind = "nats"`). The capabilities, the
//! connector endpoint and the metrics use this one type; each call goes to the store the
//! host was started with.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{Either, join_all};

use super::cluster_sessions::ClusterSessions;
use super::sessions::{
    Ask, Delivery, DeliveryIn, Kind, Push, ReceiptIn, RelaySessions, SessionError, SessionLimits,
};

/// The relay sessions of the host.
pub enum SessionStore {
    /// In the host's SQLite.
    Sqlite(Arc<RelaySessions>),
    /// In the NATS JetStream cluster.
    Cluster(ClusterSessions),
}

impl SessionStore {
    /// The limits the sessions keep to.
    pub fn limits(&self) -> SessionLimits {
        match self {
            SessionStore::Sqlite(s) => s.limits(),
            SessionStore::Cluster(s) => s.limits(),
        }
    }

    /// Records `receipt` in its sender's session; returns once it is stored.
    pub async fn deliver_receipt(&self, receipt: ReceiptIn) -> Result<Delivery, SessionError> {
        match self {
            SessionStore::Sqlite(s) => s.deliver_receipt(receipt).await,
            SessionStore::Cluster(s) => s.deliver_receipt(receipt).await,
        }
    }

    /// Records each of `receipts` in its sender's session, in the order given; answers
    /// in that order once all are stored. In SQLite every sender's receipts are queued
    /// at once (see [`RelaySessions::deliver_receipts`]); in the cluster each sender's
    /// are recorded one after the other, and different senders' at the same time.
    pub async fn deliver_receipts(
        &self,
        receipts: Vec<ReceiptIn>,
    ) -> Vec<Result<Delivery, SessionError>> {
        let cluster = match self {
            SessionStore::Sqlite(s) => return s.deliver_receipts(receipts).await,
            SessionStore::Cluster(s) => s,
        };
        let mut by_sender: HashMap<String, Vec<(usize, ReceiptIn)>> = HashMap::new();
        for (at, receipt) in receipts.into_iter().enumerate() {
            let sender = receipt.sender_agent_did.clone();
            by_sender.entry(sender).or_default().push((at, receipt));
        }
        let senders = by_sender.into_values().map(|theirs| async move {
            let mut answers = Vec::with_capacity(theirs.len());
            for (at, receipt) in theirs {
                answers.push((at, cluster.deliver_receipt(receipt).await));
            }
            answers
        });
        let mut answers: Vec<_> = join_all(senders).await.into_iter().flatten().collect();
        answers.sort_unstable_by_key(|(at, _)| *at);
        answers.into_iter().map(|(_, answer)| answer).collect()
    }

    /// Records `delivery` in the session of its `to_agent_did`; returns once it is
    /// stored.
    pub async fn deliver(&self, delivery: DeliveryIn) -> Result<Delivery, SessionError> {
        match self {
            SessionStore::Sqlite(s) => s.deliver(delivery).await,
            SessionStore::Cluster(s) => s.deliver(delivery).await,
        }
    }

    /// Pushes to the connection of `did` what it must send for `ask` (see
    /// [`RelaySessions::push`] and [`ClusterSessions::push`]).
    pub async fn push(&self, did: &str, ask: Ask) -> Result<Push, SessionError> {
        match self {
            SessionStore::Sqlite(s) => s.push(did, ask).await,
            SessionStore::Cluster(s) => s.push(did, ask).await,
        }
    }

    /// Connection `connection` of `did` ended.
    pub fn disconnected(&self, did: &str, connection: u64) {
        match self {
            SessionStore::Sqlite(_) => {}
            SessionStore::Cluster(s) => s.disconnected(did, connection),
        }
    }

    /// Settles the `kind` frame `frame_id` of `did`, which its connector acked (never
    /// pushed again). False when the session holds no such frame. In the SQLite store
    /// the ack is in the actor's mailbox when this returns.
    pub fn ack(
        &self,
        did: &str,
        kind: Kind,
        frame_id: &str,
    ) -> impl Future<Output = Result<bool, SessionError>> + Send + use<> {
        self.settle(did, kind, frame_id, None)
    }

    /// Settles the `kind` frame `frame_id` of `did`, which its connector refused for
    /// `reason`: never pushed again, counted as dropped (`rejected`).
    pub fn reject(
        &self,
        did: &str,
        kind: Kind,
        frame_id: &str,
        reason: Option<&str>,
    ) -> impl Future<Output = Result<bool, SessionError>> + Send + use<> {
        self.settle(did, kind, frame_id, Some(reason))
    }

    /// An ack (`rejected: None`) or a refusal (`Some(reason)`).
    fn settle(
        &self,
        did: &str,
        kind: Kind,
        frame_id: &str,
        rejected: Option<Option<&str>>,
    ) -> impl Future<Output = Result<bool, SessionError>> + Send + use<> {
        match self {
            SessionStore::Sqlite(s) => Either::Left(match rejected {
                None => Either::Left(s.ack(did, kind, frame_id)),
                Some(reason) => Either::Right(s.reject(did, kind, frame_id, reason)),
            }),
            SessionStore::Cluster(s) => {
                let (s, did, frame_id) = (s.clone(), did.to_owned(), frame_id.to_owned());
                let why = rejected.map(|reason| {
                    format!(
                        "the connector refused it: {}",
                        reason.unwrap_or("no reason given")
                    )
                });
                Either::Right(async move { s.settle(&did, kind, &frame_id, why).await })
            }
        }
    }

    /// Drops the expired rows every `every` until `stop` is cancelled (the SQLite store;
    /// the cluster expires its rows itself).
    pub async fn sweep_every(
        self: Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        if let SessionStore::Sqlite(s) = &*self {
            s.clone().sweep_every(every, stop).await;
        }
    }

    /// Session actors (SQLite) or connection feeds (cluster) in memory right now.
    pub fn resident_actors(&self) -> usize {
        match self {
            SessionStore::Sqlite(s) => s.resident_actors(),
            SessionStore::Cluster(s) => s.resident_actors(),
        }
    }

    /// Rows of `kind` dropped unacked since start, for any reason.
    pub fn dropped_total(&self, kind: Kind) -> u64 {
        match self {
            SessionStore::Sqlite(s) => s.dropped_total(kind),
            SessionStore::Cluster(s) => s.dropped_total(kind),
        }
    }

    /// Unacked, unexpired rows of `kind` across every session.
    pub async fn pending(&self, kind: Kind) -> Result<u64, SessionError> {
        match self {
            SessionStore::Sqlite(s) => s.pending(kind).await,
            SessionStore::Cluster(s) => s.pending(kind).await,
        }
    }
}
