//! clawq: a runtime that hosts WASM component handlers for clawdentity's message queues.
//!
//! The pieces, one module each: [`config`] (TOML and defaults), [`queue`] (the durable
//! queue engine), [`runtime`] (wasmtime, the handler components and their capabilities),
//! [`trust`] (the trust store), [`consumer`] (feeds batches to handlers), [`api`] (the
//! HTTP API), [`auth`] (who may call which route, [`tokens`] the issued tokens) and
//! [`server`] (wires them together for `clawq serve`); [`check`], [`run`] and
//! [`scaffold`] are the authoring commands (`clawq check`, `clawq run`, `clawq new`).

pub mod actor_storage;
pub mod admin;
pub mod agents;
pub mod allocator;
pub mod api;
pub mod auth;
pub mod body_budget;
pub mod bounds;
pub mod bundled;
pub mod check;
pub mod clock;
pub mod cluster;
pub mod coalesced;
pub mod config;
pub mod connector;
pub mod consumer;
pub mod crypto;
pub mod dir_lock;
pub mod frame;
pub mod handlers;
pub mod http_guard;
pub mod kv;
pub mod listener;
pub mod metrics;
pub mod operator;
pub mod parse_errors;
pub mod private_dir;
pub mod queue;
pub mod relay;
pub mod retention;
pub mod run;
pub mod runtime;
pub mod scaffold;
pub mod server;
pub mod side_effects;
pub mod store;
pub mod text;
pub mod tls;
pub mod tokens;
pub mod trust;
pub mod watched_body;
pub mod world;
