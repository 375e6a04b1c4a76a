//! Protocol rules of clawdentity shared by the clawq host and its handler components
//! (spec `PROTOCOL.md`), written once so that both sides agree.

pub mod body;
pub mod did;
pub mod event;
pub mod fields;
pub mod problem;
pub mod receipt;
