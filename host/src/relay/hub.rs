//! The open connector WebSockets, one per agent: a new connection of an agent supersedes
//! the old one (spec section 4).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

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

struct Connection {
    id: u64,
    tx: mpsc::UnboundedSender<Outbound>,
}

/// The registry of open connections, by agent DID.
#[derive(Default)]
pub struct ConnectionHub {
    connections: Mutex<HashMap<String, Connection>>,
    next_id: AtomicU64,
}

/// Close code and reason of a connection replaced by a newer one of the same agent.
pub const SUPERSEDED: (u16, &str) = (1000, "superseded_by_new_connection");

impl ConnectionHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Connection>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection of `did`, closing the previous one; returns the
    /// connection's id and the channel of what it must send.
    pub fn register(&self, did: &str) -> (u64, mpsc::UnboundedReceiver<Outbound>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(old) = self.lock().insert(did.to_owned(), Connection { id, tx }) {
            let _ = old.tx.send(Outbound::Close(SUPERSEDED.0, SUPERSEDED.1));
        }
        (id, rx)
    }

    /// Forgets connection `id` of `did`, unless a newer one replaced it already.
    pub fn unregister(&self, did: &str, id: u64) {
        let mut connections = self.lock();
        if connections.get(did).is_some_and(|c| c.id == id) {
            connections.remove(did);
        }
    }

    /// Sends `text` to the open connection of `did`; returns how many got it (0 or 1).
    pub fn send(&self, did: &str, text: String) -> u32 {
        self.post(did, Outbound::Text(text))
    }

    /// Wakes the open connection of `did` to push what its session holds; returns how
    /// many were woken (0 or 1).
    pub fn wake(&self, did: &str) -> u32 {
        self.post(did, Outbound::Wake)
    }

    /// Hands `what` to the open connection of `did`; returns how many got it (0 or 1).
    fn post(&self, did: &str, what: Outbound) -> u32 {
        self.lock()
            .get(did)
            .map_or(0, |c| u32::from(c.tx.send(what).is_ok()))
    }

    /// Closes the open connection of `did`, if any.
    pub fn close(&self, did: &str, code: u16, reason: &'static str) -> bool {
        match self.lock().remove(did) {
            Some(c) => c.tx.send(Outbound::Close(code, reason)).is_ok(),
            None => false,
        }
    }

    /// Closes every open connection (the host is shutting down).
    pub fn close_all(&self, code: u16, reason: &'static str) {
        for (_, c) in self.lock().drain() {
            let _ = c.tx.send(Outbound::Close(code, reason));
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
