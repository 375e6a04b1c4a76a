//! clawq's end-to-end tests, one module per file of this folder, in one test binary
//! (one build and one link instead of one per file). Each test starts the real `clawq`
//! binary (see `support`) and talks to it over loopback sockets.

mod support;

mod agents;
mod api;
mod authoring;
mod backpressure;
mod bounds;
mod cluster;
mod cluster_queue;
mod cluster_relay;
mod cluster_state;
mod connector;
mod crash;
mod crl;
mod deliveries;
mod dlq;
mod docs;
mod event_deliveries;
mod handlers;
mod http_abuse;
mod interop;
mod metrics;
mod power_loss;
mod queue;
mod relay;
mod restart;
mod sandbox;
mod security;
mod shutdown;
mod subscriptions;
mod tls;
mod walkthrough;
mod workers;
