//! The open connector WebSockets, one per agent: a new connection of an agent supersedes
//! the old one (spec section 7).
//!
//! What the host hands a connection waits in the connection's [`Outgoing`] queue until
//! its task sends it. Handing never blocks the caller (a handler calling
//! `websocket.send-frame`, a session recording a receipt): a wake only sets a flag, and
//! the frames queued for a connection are bounded ([`QueueBounds`]: frames and bytes). A
//! connection whose queue is full has fallen behind: it is closed with [`TOO_SLOW`], and
//! the frame that did not fit and those still queued are dropped, logged and counted
//! (`clawq_websocket_frames_dropped_total{reason}`). Those frames were never durable:
//! receipts and deliveries are not queued here but read from their relay session when the
//! connection is woken, so they are pushed again on the next connect.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// What the hub asks a connection task to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// Send this text frame.
    Text(String),
    /// Ask the agent's relay session for the frames due now and send them.
    Wake,
    /// Close with this code and reason.
    Close(u16, &'static str),
}

/// How many frames, and how many bytes of them, may wait in one connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueBounds {
    /// Most frames waiting.
    pub max_frames: usize,
    /// Most bytes of frames waiting; at least the largest frame (1 MiB).
    pub max_bytes: usize,
}

impl Default for QueueBounds {
    fn default() -> Self {
        QueueBounds {
            max_frames: 256,
            max_bytes: 8 << 20,
        }
    }
}

/// Close code and reason of a connection replaced by a newer one of the same agent.
pub const SUPERSEDED: (u16, &str) = (1000, "superseded_by_new_connection");

/// Close code and reason of a connection that fell behind: its queue was full.
pub const TOO_SLOW: (u16, &str) = (4008, "connector_too_slow");

/// What waits for a connection task.
#[derive(Default)]
struct Pending {
    frames: VecDeque<String>,
    bytes: usize,
    wake: bool,
    close: Option<(u16, &'static str)>,
}

/// A connection's queue, shared by the hub (which fills it) and the connection task.
#[derive(Default)]
struct Queue {
    pending: Mutex<Pending>,
    changed: Notify,
}

impl Queue {
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

/// The receiving end of a connection's queue, held by its task.
pub struct Outgoing {
    queue: Arc<Queue>,
}

impl Outgoing {
    /// Waits for the next thing to do: a close first, then the queued frames in order,
    /// then a wake. Cancel safe: nothing is taken unless it is returned.
    pub async fn next(&self) -> Outbound {
        loop {
            {
                let mut pending = self.queue.lock();
                if let Some((code, reason)) = pending.close {
                    return Outbound::Close(code, reason);
                }
                if let Some(text) = pending.frames.pop_front() {
                    pending.bytes -= text.len();
                    return Outbound::Text(text);
                }
                if std::mem::take(&mut pending.wake) {
                    return Outbound::Wake;
                }
            }
            self.queue.changed.notified().await;
        }
    }

    /// Waits until the hub asks the connection to close; returns the code and reason.
    pub async fn closed(&self) -> (u16, &'static str) {
        loop {
            if let Some(close) = self.queue.lock().close {
                return close;
            }
            self.queue.changed.notified().await;
        }
    }
}

struct Connection {
    id: u64,
    queue: Arc<Queue>,
    bounds: QueueBounds,
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

    /// Registers a new connection of `did` whose queue holds at most `bounds`, closing
    /// the previous one; returns the connection's id and the queue of what it must do.
    pub fn register(&self, did: &str, bounds: QueueBounds) -> (u64, Outgoing) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let queue = Arc::new(Queue::default());
        let connection = Connection {
            id,
            queue: queue.clone(),
            bounds,
        };
        if let Some(old) = self.lock().insert(did.to_owned(), connection) {
            old.queue.close(SUPERSEDED);
        }
        (id, Outgoing { queue })
    }

    /// Ends connection `id` of `did`, which closed for `reason`: forgets it (unless a
    /// newer one replaced it already), counts the close, and drops, logs and counts the
    /// frames still queued for it.
    pub fn disconnect(&self, did: &str, id: u64, outgoing: Outgoing, reason: &'static str) {
        {
            let mut connections = self.lock();
            if connections.get(did).is_some_and(|c| c.id == id) {
                connections.remove(did);
            }
        }
        crate::metrics::connection_closed(reason);
        let unsent = std::mem::take(&mut *outgoing.queue.lock());
        if !unsent.frames.is_empty() {
            let (frames, bytes) = (unsent.frames.len(), unsent.bytes);
            tracing::warn!(agent = %did, frames, bytes, reason,
                "frames pushed with websocket.send-frame dropped unsent: the connection closed");
            crate::metrics::websocket_frames_dropped(reason, frames as u64);
        }
    }

    /// Queues `text` for the open connection of `did`; returns how many got it (0 or 1).
    /// Never waits: a connection whose queue is full is closed ([`TOO_SLOW`]) and the
    /// frame dropped, logged and counted.
    pub fn send(&self, did: &str, text: String) -> u32 {
        let mut connections = self.lock();
        let Some(connection) = connections.get(did) else {
            return 0;
        };
        let (bounds, len) = (connection.bounds, text.len());
        let mut pending = connection.queue.lock();
        if pending.frames.len() < bounds.max_frames && pending.bytes + len <= bounds.max_bytes {
            pending.bytes += len;
            pending.frames.push_back(text);
            drop(pending);
            connection.queue.changed.notify_one();
            return 1;
        }
        let (frames, bytes) = (pending.frames.len(), pending.bytes);
        drop(pending);
        if let Some(slow) = connections.remove(did) {
            slow.queue.close(TOO_SLOW);
        }
        drop(connections);
        tracing::warn!(agent = %did, frames, bytes, max_frames = bounds.max_frames,
            max_bytes = bounds.max_bytes, frame_bytes = len,
            "connector too slow: its queue is full; closing it and dropping the frame");
        crate::metrics::websocket_frames_dropped(TOO_SLOW.1, 1);
        0
    }

    /// Wakes the open connection of `did` to push what its session holds; returns how
    /// many were woken (0 or 1). Wakes not yet handled count once.
    pub fn wake(&self, did: &str) -> u32 {
        self.lock().get(did).map_or(0, |c| {
            c.queue.update(|p| p.wake = true);
            1
        })
    }

    /// Closes the open connection of `did`, if any.
    pub fn close(&self, did: &str, code: u16, reason: &'static str) -> bool {
        let closed = self.lock().remove(did);
        closed.map(|c| c.queue.close((code, reason))).is_some()
    }

    /// Closes every open connection (the host is shutting down).
    pub fn close_all(&self, code: u16, reason: &'static str) {
        for (_, c) in self.lock().drain() {
            c.queue.close((code, reason));
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
    const BOUNDS: QueueBounds = QueueBounds {
        max_frames: 3,
        max_bytes: 10,
    };

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
    async fn a_full_queue_by_frames_closes_the_connection_and_drops_the_frame() {
        let hub = ConnectionHub::default();
        let (id, outgoing) = hub.register(A, BOUNDS);
        for n in 0..3 {
            assert_eq!(hub.send(A, n.to_string()), 1);
        }
        assert_eq!(hub.send(A, "3".into()), 0, "the fourth frame does not fit");
        assert_eq!(
            ready(&outgoing).await,
            Outbound::Close(TOO_SLOW.0, TOO_SLOW.1),
            "the close comes before the queued frames"
        );
        assert!(hub.is_empty(), "the hub forgot the connection at once");
        assert_eq!(hub.send(A, "4".into()), 0, "no connection: nobody gets it");
        hub.disconnect(A, id, outgoing, TOO_SLOW.1);
    }

    #[tokio::test]
    async fn a_full_queue_by_bytes_closes_the_connection() {
        let hub = ConnectionHub::default();
        let (_, outgoing) = hub.register(A, BOUNDS);
        assert_eq!(hub.send(A, "x".repeat(6)), 1);
        assert_eq!(hub.send(A, "x".repeat(4)), 1, "exactly at the byte bound");
        assert_eq!(hub.send(A, "x".into()), 0, "one byte over");
        assert_eq!(
            ready(&outgoing).await,
            Outbound::Close(4008, "connector_too_slow")
        );
    }

    #[tokio::test]
    async fn a_reader_keeping_up_is_never_closed() {
        let hub = ConnectionHub::default();
        let (_, outgoing) = hub.register(A, BOUNDS);
        for n in 0..100 {
            let frame = format!("{:03}", n % 1000);
            assert_eq!(hub.send(A, frame.clone()), 1, "frame {n}");
            assert_eq!(hub.send(A, frame.clone()), 1, "frame {n} again");
            assert_eq!(ready(&outgoing).await, Outbound::Text(frame.clone()));
            assert_eq!(ready(&outgoing).await, Outbound::Text(frame));
        }
        assert!(idle(&outgoing).await);
        assert_eq!(hub.len(), 1);
    }

    #[tokio::test]
    async fn wakes_never_fill_the_queue_and_count_once() {
        let hub = ConnectionHub::default();
        let (_, outgoing) = hub.register(A, BOUNDS);
        for _ in 0..1000 {
            assert_eq!(hub.wake(A), 1);
        }
        assert_eq!(hub.send(A, "f".into()), 1, "wakes take no room");
        assert_eq!(ready(&outgoing).await, Outbound::Text("f".into()));
        assert_eq!(ready(&outgoing).await, Outbound::Wake);
        assert!(idle(&outgoing).await, "a thousand wakes, one push");
    }

    #[tokio::test]
    async fn a_new_connection_supersedes_the_old_and_disconnecting_the_old_keeps_it() {
        let hub = ConnectionHub::default();
        let (old_id, old) = hub.register(A, BOUNDS);
        assert_eq!(hub.send(A, "old".into()), 1);
        let (_, new) = hub.register(A, BOUNDS);
        assert_eq!(
            ready(&old).await,
            Outbound::Close(SUPERSEDED.0, SUPERSEDED.1)
        );
        hub.disconnect(A, old_id, old, SUPERSEDED.1);
        assert_eq!(hub.len(), 1, "the new connection stays");
        assert_eq!(hub.send(A, "new".into()), 1);
        assert_eq!(ready(&new).await, Outbound::Text("new".into()));
    }

    #[tokio::test]
    async fn closed_waits_for_a_close() {
        let hub = Arc::new(ConnectionHub::default());
        let (_, outgoing) = hub.register(A, BOUNDS);
        assert_eq!(hub.send(A, "f".into()), 1);
        let waiting = tokio::time::timeout(Duration::from_millis(20), outgoing.closed());
        assert!(waiting.await.is_err(), "a frame is no close");
        let closer = hub.clone();
        tokio::spawn(async move { closer.close(A, 1008, "agent_revoked") });
        let closed = tokio::time::timeout(Duration::from_secs(5), outgoing.closed());
        assert_eq!(closed.await.unwrap(), (1008, "agent_revoked"));
        assert!(!hub.close(A, 1008, "agent_revoked"), "closed once");
    }
}
