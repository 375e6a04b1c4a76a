//! The JetStream queue backend (`[backend] kind = "nats"`) end to end, against a real
//! `nats-server -js`: the queue semantics of the SQLite tests on one host, then several
//! hosts sharing the queues while hosts and the NATS server are killed.

use crate::support::nats::NatsServer;

#[test]
fn batches_are_full_or_timed_out() {
    let nats = NatsServer::start();
    crate::queue::full_and_partial_batches(&nats.backend_config());
}

#[test]
fn a_retry_with_delay_comes_back_after_it() {
    let nats = NatsServer::start();
    crate::queue::retry_with_delay(&nats.backend_config());
}

#[test]
fn max_retries_then_the_dead_letter_queue() {
    let nats = NatsServer::start();
    crate::queue::max_retries_then_dlq(&nats.backend_config());
}

#[test]
fn a_dead_letter_outcome_skips_the_retries() {
    let nats = NatsServer::start();
    crate::queue::dead_letter_outcome(&nats.backend_config());
}

#[test]
fn failed_batches_are_retried() {
    let nats = NatsServer::start();
    crate::queue::failed_batches_retried(&nats.backend_config());
}

#[test]
fn dead_letters_are_listed_redriven_and_purged() {
    let nats = NatsServer::start();
    let host = crate::dlq::start_on(&nats.backend_config());
    crate::dlq::dead_letters_listed_redriven_and_purged(&host);
}
