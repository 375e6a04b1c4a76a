//! The receipt path's host side: connector connections ([`hub`]), the relay sessions
//! ([`store`]: the per-agent SQLite session actors of [`sessions`], or the sessions kept
//! in the NATS JetStream cluster, [`cluster_sessions`]) and the connector WebSocket
//! endpoint ([`endpoint`]).

pub mod cluster_sessions;
pub mod endpoint;
pub mod hub;
pub mod sessions;
pub mod store;
