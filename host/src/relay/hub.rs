//! The open connector WebSockets, one per agent: a new connection of an agent supersedes
//! the old one (spec section 7).
//!
//! The hub is the hand-off between an agent's relay session and its connection task. A
//! session's actor hands the frames of its turn to [`ConnectionHub::push`] once the turn
//! has committed, in the order of its turns, and the connection task sends them in that
//! order: pushing only appends to the connection's backlog, so it never blocks the
//! actor, and a session's frames go out in the order the session recorded them. The
//! backlog is bounded ([`MAX_BACKLOG_BYTES`]): a connection that far behind takes no
//! more frames until it catches up (its send timeout drops it if it never does); the
//! frames it did not take stay in the session and are pushed again when their retry is
//! due or on the next connect. With the frames comes the session's next retry time,
//! which the connection task waits for before asking the session for the frames due.
//!
//! A connection is *live* once its session has pushed it every unacked frame (its
//! connect push): before that, a session pushes a new frame to nobody, since the
//! connect push will carry it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};

/// Most bytes of frames a connection holds, waiting or taken by its task and not yet
/// sent; a push past it is not taken. A connector that reads nothing holds, until its
/// send timeout drops it, at most this much plus one push, which a fast session reaches
/// well within the send timeout.
pub const MAX_BACKLOG_BYTES: usize = 16 << 20;

/// What the hub asks a connection task to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// Send these frames, in this order.
    Frames(Vec<String>),
    /// Close with this code and reason.
    Close(u16, &'static str),
}

/// Close code and reason of a connection replaced by a newer one of the same agent.
pub const SUPERSEDED: (u16, &str) = (1000, "superseded_by_new_connection");

/// What waits for a connection task.
#[derive(Default)]
struct Pending {
    frames: Vec<String>,
    bytes: usize,
    live: bool,
    retry_at_ms: Option<u64>,
    close: Option<(u16, &'static str)>,
}

/// What the hub has asked of a connection's task (frames, a close), shared by the hub
/// and the task.
#[derive(Default)]
struct Signals {
    pending: Mutex<Pending>,
    changed: Notify,
}

impl Signals {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes what waits with `change` and tells the connection task.
    fn update<T>(&self, change: impl FnOnce(&mut Pending) -> T) -> T {
        let changed = change(&mut self.lock());
        self.changed.notify_one();
        changed
    }

    /// Asks the connection task to close with `code` and `reason`; the first ask wins.
    fn close(&self, (code, reason): (u16, &'static str)) {
        self.update(|p| {
            p.close.get_or_insert((code, reason));
        });
    }
}

/// The earlier of two optional times; `None` is never.
fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The receiving end of a connection's signals, held by its task.
pub struct Outgoing {
    signals: Arc<Signals>,
}

impl Outgoing {
    /// Waits for the next thing to do: a close first, then the frames waiting. Cancel
    /// safe: nothing is taken unless it is returned.
    pub async fn next(&self) -> Outbound {
        loop {
            {
                let mut pending = self.signals.lock();
                if let Some((code, reason)) = pending.close {
                    return Outbound::Close(code, reason);
                }
                if !pending.frames.is_empty() {
                    return Outbound::Frames(std::mem::take(&mut pending.frames));
                }
            }
            self.signals.changed.notified().await;
        }
    }

    /// Counts a frame of `bytes` taken from [`Outgoing::next`] as sent: it no longer
    /// holds room in the backlog.
    pub fn sent(&self, bytes: usize) {
        let mut pending = self.signals.lock();
        pending.bytes = pending.bytes.saturating_sub(bytes);
    }

    /// Waits until the hub asks the connection to close; returns the code and reason.
    pub async fn closed(&self) -> (u16, &'static str) {
        loop {
            if let Some(close) = self.signals.lock().close {
                return close;
            }
            self.signals.changed.notified().await;
        }
    }

    /// When to ask the session for the frames due (ms since the Unix epoch), if ever.
    pub fn retry_at_ms(&self) -> Option<u64> {
        self.signals.lock().retry_at_ms
    }

    /// Forgets the retry time (it came): the session's answer sets the next one.
    pub fn retry_came(&self) {
        self.signals.lock().retry_at_ms = None;
    }

    /// Asks the session again at `at_ms` at the latest.
    pub fn retry_by(&self, at_ms: u64) {
        self.signals
            .update(|p| p.retry_at_ms = earliest(p.retry_at_ms, Some(at_ms)));
    }
}

struct Connection {
    id: u64,
    signals: Arc<Signals>,
}

/// The registry of open connections, by agent DID.
#[derive(Default)]
pub struct ConnectionHub {
    connections: Mutex<HashMap<String, Connection>>,
    next_id: AtomicU64,
    /// The connection tasks, from the upgrade of their request to their end.
    tasks: TaskTracker,
}

impl ConnectionHub {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Connection>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection of `did`, closing the previous one; returns the
    /// connection's id and the signals of what it must do.
    pub fn register(&self, did: &str) -> (u64, Outgoing) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let signals = Arc::new(Signals::default());
        let connection = Connection {
            id,
            signals: signals.clone(),
        };
        if let Some(old) = self.lock().insert(did.to_owned(), connection) {
            old.signals.close(SUPERSEDED);
        }
        (id, Outgoing { signals })
    }

    /// Ends connection `id` of `did`, which closed for `reason`: forgets it (unless a
    /// newer one replaced it already) and counts the close.
    pub fn disconnect(&self, did: &str, id: u64, reason: &'static str) {
        {
            let mut connections = self.lock();
            if connections.get(did).is_some_and(|c| c.id == id) {
                connections.remove(did);
            }
        }
        crate::metrics::connection_closed(reason);
    }

    /// The id of the open connection of `did`, if any.
    pub fn connection_id(&self, did: &str) -> Option<u64> {
        self.lock().get(did).map(|c| c.id)
    }

    /// Closes connection `id` of `did` if it is still the open one; true if it was.
    pub fn close_connection(&self, did: &str, id: u64, code: u16, reason: &'static str) -> bool {
        let mut connections = self.lock();
        if connections.get(did).is_none_or(|c| c.id != id) {
            return false;
        }
        let closed = connections.remove(did);
        closed.map(|c| c.signals.close((code, reason))).is_some()
    }

    /// Whether `did` has a live connection: one its session made its connect push to.
    pub fn is_live(&self, did: &str) -> bool {
        self.lock().get(did).is_some_and(|c| c.signals.lock().live)
    }

    /// Appends `frames` to the backlog of the connection of `did` and makes its retry
    /// time `next_at_ms` if that is earlier; returns how many connections took them (0
    /// or 1). With `connect` (the connect push) the connection takes them and becomes
    /// live; without, only a live connection takes them. Frames that would take a
    /// connection holding unsent frames past [`MAX_BACKLOG_BYTES`] are not taken (the
    /// retry time still is).
    pub fn push(
        &self,
        did: &str,
        frames: Vec<String>,
        next_at_ms: Option<u64>,
        connect: bool,
    ) -> u32 {
        let connections = self.lock();
        let Some(connection) = connections.get(did) else {
            return 0;
        };
        let taken = connection.signals.update(|p| {
            if !(connect || p.live) || p.close.is_some() {
                return false;
            }
            p.live = true;
            p.retry_at_ms = earliest(p.retry_at_ms, next_at_ms);
            let bytes = p.bytes + frames.iter().map(String::len).sum::<usize>();
            // A connection holding nothing takes any push: a connect push is as large as
            // its session.
            if bytes > MAX_BACKLOG_BYTES && p.bytes > 0 {
                return false;
            }
            p.bytes = bytes;
            p.frames.extend(frames);
            true
        });
        u32::from(taken)
    }

    /// Closes the open connection of `did`, if any.
    pub fn close(&self, did: &str, code: u16, reason: &'static str) -> bool {
        let closed = self.lock().remove(did);
        closed.map(|c| c.signals.close((code, reason))).is_some()
    }

    /// Counts a connection task as running until the returned token is dropped.
    pub fn track_connection(&self) -> TaskTrackerToken {
        self.tasks.token()
    }

    /// Waits until every connection task counted by [`ConnectionHub::track_connection`]
    /// has ended (the host is shutting down: its connections have been closed).
    pub async fn connections_ended(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Closes every open connection (the host is shutting down).
    pub fn close_all(&self, code: u16, reason: &'static str) {
        for (_, c) in self.lock().drain() {
            c.signals.close((code, reason));
        }
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const A: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
    /// The next thing `outgoing` has to do, which must be there already.
    async fn ready(outgoing: &Outgoing) -> Outbound {
        tokio::time::timeout(Duration::from_secs(5), outgoing.next())
            .await
            .expect("something to do")
    }

    /// Whether `outgoing` has nothing to do.
    async fn idle(outgoing: &Outgoing) -> bool {
        tokio::time::timeout(Duration::from_millis(20), outgoing.next())
            .await
            .is_err()
    }

    fn frames(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[tokio::test]
    async fn frames_go_to_a_live_connection_in_push_order_with_the_earliest_retry() {
        let hub = ConnectionHub::default();
        assert_eq!(hub.push(A, frames(&["x"]), None, true), 0, "no connection");
        let (_, outgoing) = hub.register(A);
        assert!(!hub.is_live(A));
        assert_eq!(
            hub.push(A, frames(&["new"]), Some(50), false),
            0,
            "not live before its connect push"
        );
        assert!(idle(&outgoing).await, "nothing to do yet");
        assert_eq!(hub.push(A, frames(&["a", "b"]), Some(100), true), 1);
        assert!(hub.is_live(A));
        assert_eq!(hub.push(A, frames(&["c"]), Some(40), false), 1);
        assert_eq!(hub.push(A, frames(&["d"]), Some(70), false), 1);
        assert_eq!(
            ready(&outgoing).await,
            Outbound::Frames(frames(&["a", "b", "c", "d"]))
        );
        assert_eq!(outgoing.retry_at_ms(), Some(40), "the earliest");
        outgoing.retry_came();
        outgoing.retry_by(90);
        assert_eq!(outgoing.retry_at_ms(), Some(90));
        assert!(idle(&outgoing).await, "every frame taken once");
    }

    #[tokio::test]
    async fn a_backlog_past_its_limit_takes_no_more_frames_until_it_is_sent() {
        let hub = ConnectionHub::default();
        let (_, outgoing) = hub.register(A);
        let big = "f".repeat(MAX_BACKLOG_BYTES / 2 + 1);
        let empty = hub.push(A, vec![big.clone(), big.clone(), big.clone()], None, true);
        assert_eq!(empty, 1, "an empty backlog takes any push");
        assert!(matches!(ready(&outgoing).await, Outbound::Frames(f) if f.len() == 3));
        assert_eq!(
            hub.push(A, vec![big.clone()], Some(5), false),
            0,
            "frames taken but not sent still hold their room"
        );
        assert_eq!(outgoing.retry_at_ms(), Some(5), "retried later");
        for _ in 0..3 {
            outgoing.sent(big.len());
        }
        assert_eq!(
            hub.push(A, vec![big.clone()], None, false),
            1,
            "sent: room again"
        );
        assert_eq!(hub.push(A, vec![big.clone()], None, false), 0);
        assert_eq!(ready(&outgoing).await, Outbound::Frames(vec![big.clone()]));
        assert_eq!(
            hub.push(A, vec![big.clone()], None, false),
            0,
            "taken, not sent"
        );
        outgoing.sent(big.len());
        assert_eq!(hub.push(A, vec![big], None, false), 1, "room again");
    }

    #[tokio::test]
    async fn a_new_connection_supersedes_the_old_and_disconnecting_the_old_keeps_it() {
        let hub = ConnectionHub::default();
        let (old_id, old) = hub.register(A);
        let (_, new) = hub.register(A);
        assert_eq!(
            ready(&old).await,
            Outbound::Close(SUPERSEDED.0, SUPERSEDED.1)
        );
        drop(old);
        hub.disconnect(A, old_id, SUPERSEDED.1);
        assert_eq!(hub.len(), 1, "the new connection stays");
        assert_eq!(hub.push(A, frames(&["a"]), None, true), 1);
        assert_eq!(ready(&new).await, Outbound::Frames(frames(&["a"])));
    }

    #[tokio::test]
    async fn closed_waits_for_a_close() {
        let hub = Arc::new(ConnectionHub::default());
        let (_, outgoing) = hub.register(A);
        assert_eq!(hub.push(A, frames(&["a"]), None, true), 1);
        let waiting = tokio::time::timeout(Duration::from_millis(20), outgoing.closed());
        assert!(waiting.await.is_err(), "frames are no close");
        let closer = hub.clone();
        tokio::spawn(async move { closer.close(A, 1008, "agent_revoked") });
        let closed = tokio::time::timeout(Duration::from_secs(5), outgoing.closed());
        assert_eq!(closed.await.unwrap(), (1008, "agent_revoked"));
        assert!(!hub.close(A, 1008, "agent_revoked"), "closed once");
    }
}
