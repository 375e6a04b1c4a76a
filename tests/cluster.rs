//! Hosts on a NATS JetStream cluster (`[backend] kind = "nats"`), against a real
//! `nats-server -js`: how a host connects, and what it says while the cluster is away.

use crate::support::nats::NatsServer;
use crate::support::*;

#[test]
fn healthz_reports_a_nats_outage_while_it_lasts() {
    let mut nats = NatsServer::start();
    let host = Host::start(&nats.backend_config());
    let (status, body) = host.get("/healthz");
    assert_eq!((status, body["nats"].as_str()), (200, Some("connected")));
    nats.kill();
    let body = wait_for("/healthz to report the outage", || {
        let (status, body) = host.get("/healthz");
        (status == 503).then_some(body)
    });
    assert_eq!(body["nats"], "disconnected");
    assert_eq!(body["error"]["code"], "nats_unavailable");
    nats.restart();
    wait_for("/healthz to report the reconnection", || {
        (host.get("/healthz").0 == 200).then_some(())
    });
}

#[test]
fn a_host_that_cannot_reach_nats_stops_with_a_clear_error() {
    let nats = NatsServer::start();
    let url = nats.url();
    drop(nats);
    let said = refused_serve(&format!("[backend]\nkind = \"nats\"\nurl = \"{url}\"\n"));
    assert!(
        said.contains(&format!("cannot reach NATS at {url}")),
        "{said}"
    );
}
