//! The receipt path's host side: connector connections ([`hub`]), the per-agent relay
//! session actors ([`sessions`]) and the connector WebSocket endpoint ([`endpoint`]).

pub mod endpoint;
pub mod hub;
pub mod sessions;
