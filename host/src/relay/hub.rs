//! The open connector WebSockets, one per agent: a new connection of an agent supersedes
//! the old one (spec section 7).
//!
//! The hub never carries a frame. What an agent must be told (receipts and deliveries)
//! is kept by its relay session, and the hub only wakes the agent's connection task to
//! read it from there (or asks the task to close): a wake only sets a flag, so handing
//! never blocks the caller (a session recording a receipt) and takes no room.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// What the hub asks a connection task to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// Ask the agent's relay session for the frames due now and send them.
    Wake,
    /// Close with this code and reason.
    Close(u16, &'static str),
}

/// Close code and reason of a connection replaced by a newer one of the same agent.
pub const SUPERSEDED: (u16, &str) = (1000, "superseded_by_new_connection");

/// What waits for a connection task.
#[derive(Default)]
struct Pending {
    wake: bool,
    close: Option<(u16, &'static str)>,
}

/// What the hub has asked of a connection's task (a wake, a close), shared by the hub
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
    fn update(&self, change: impl FnOnce(&mut Pending)) {
        change(&mut self.lock());
        self.changed.notify_one();
    }

    /// Asks the connection task to close with `code` and `reason`; the first ask wins.
    fn close(&self, (code, reason): (u16, &'static str)) {
        self.update(|p| {
            p.close.get_or_insert((code, reason));
        });
    }
}

/// The receiving end of a connection's signals, held by its task.
pub struct Outgoing {
    signals: Arc<Signals>,
}

impl Outgoing {
    /// Waits for the next thing to do: a close first, then a wake. Cancel safe: nothing is taken unless it is returned.
    pub async fn next(&self) -> Outbound {
        loop {
            {
                let mut pending = self.signals.lock();
                if let Some((code, reason)) = pending.close {
                    return Outbound::Close(code, reason);
                }
                if std::mem::take(&mut pending.wake) {
                    return Outbound::Wake;
                }
            }
            self.signals.changed.notified().await;
        }
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

    /// Wakes the open connection of `did` to push what its session holds; returns how
    /// many were woken (0 or 1). Wakes not yet handled count once.
    pub fn wake(&self, did: &str) -> u32 {
        self.lock().get(did).map_or(0, |c| {
            c.signals.update(|p| p.wake = true);
            1
        })
    }

    /// Closes the open connection of `did`, if any.
    pub fn close(&self, did: &str, code: u16, reason: &'static str) -> bool {
        let closed = self.lock().remove(did);
        closed.map(|c| c.signals.close((code, reason))).is_some()
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

    #[tokio::test]
    async fn wakes_count_once() {
        let hub = ConnectionHub::default();
        let (_, outgoing) = hub.register(A);
        assert!(idle(&outgoing).await, "nothing to do yet");
        for _ in 0..1000 {
            assert_eq!(hub.wake(A), 1);
        }
        assert_eq!(ready(&outgoing).await, Outbound::Wake);
        assert!(idle(&outgoing).await, "a thousand wakes, one push");
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
        assert_eq!(hub.wake(A), 1);
        assert_eq!(ready(&new).await, Outbound::Wake);
    }

    #[tokio::test]
    async fn closed_waits_for_a_close() {
        let hub = Arc::new(ConnectionHub::default());
        let (_, outgoing) = hub.register(A);
        assert_eq!(hub.wake(A), 1);
        let waiting = tokio::time::timeout(Duration::from_millis(20), outgoing.closed());
        assert!(waiting.await.is_err(), "a wake is no close");
        let closer = hub.clone();
        tokio::spawn(async move { closer.close(A, 1008, "agent_revoked") });
        let closed = tokio::time::timeout(Duration::from_secs(5), outgoing.closed());
        assert_eq!(closed.await.unwrap(), (1008, "agent_revoked"));
        assert!(!hub.close(A, 1008, "agent_revoked"), "closed once");
    }
}
