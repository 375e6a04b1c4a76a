//! Hosts sharing a NATS JetStream cluster answer the same: the trust store, the agents,
//! the tokens, the actor storage and the handler versions live in the cluster's key-value
//! buckets and object store (real `nats-server -js`, real hosts).

use std::time::Instant;

use crate::handlers::{JOBS, current_version, deploy, scripted_variant, version_of};
use crate::support::nats::NatsServer;
use crate::support::*;
use serde_json::json;

const RECEIPTS: &str = "clawdentity-receipts";

/// A host of the cluster served by `nats`, with `config` after its `[backend]`.
fn host(nats: &NatsServer, config: &str) -> Host {
    Host::start(&format!("{}{config}", nats.backend_config()))
}

/// Answers the heartbeats of `socket` until the host closes it; returns the close.
fn wait_close(socket: &mut Socket) -> (u16, String) {
    loop {
        match next_event(socket, &[]) {
            Seen::Closed(code, reason) => return (code, reason),
            Seen::Frame(beat) => send_frame(
                socket,
                &frame("heartbeat_ack", json!({"ackId": beat["id"]})),
            ),
        }
    }
}

#[test]
fn a_revocation_on_one_host_is_seen_and_enforced_by_every_host() {
    let nats = NatsServer::start();
    let a = host(&nats, &fast_events_config(""));
    let (b, c) = (host(&nats, ""), host(&nats, ""));
    let token = a.add_agent(DID_A);
    let mut open = c
        .connect(DID_A, Some(&token))
        .expect("registered on A, let in on C");
    assert!(!b.is_revoked(DID_A));

    a.publish(
        "clawdentity-events",
        revocation_event("agent_revoked", json!({"agentDid": DID_A})),
    );
    let published = Instant::now();
    assert_eq!(wait_close(&mut open), (1008, "agent_revoked".to_owned()));
    let closed = published.elapsed();
    assert!(b.is_revoked(DID_A), "B reads the cluster's trust store");
    let (_, trust) = b.get(&format!("/v1/trust/agents/{DID_A}"));
    assert!(
        trust["revokedAt"].as_str().unwrap().ends_with('Z'),
        "{trust}"
    );
    assert!(!c.is_revoked(DID_B));
    assert_eq!(
        c.refused_status(DID_A, Some(&token)),
        401,
        "C refuses it now"
    );
    c.wait_log("revoked agent's connection closed");
    eprintln!("publish on A → close on C: {closed:?}");
}

#[test]
fn agents_and_tokens_added_on_one_host_are_taken_by_every_host() {
    let nats = NatsServer::start();
    let (a, b) = (host(&nats, ""), host(&nats, ""));

    let token = a.add_agent(DID_A);
    let mut open = b
        .connect(DID_A, Some(&token))
        .expect("added on A, let in on B");
    let (status, body) = b.admin("GET", "/v1/agents", vec![], None);
    assert_eq!(
        (status, &body["agents"][0]["did"]),
        (200, &json!(DID_A)),
        "{body}"
    );
    let (status, body) = a.admin("DELETE", &format!("/v1/agents/{DID_A}"), vec![], None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(wait_close(&mut open), (1008, "agent_removed".to_owned()));
    assert_eq!(b.refused_status(DID_A, Some(&token)), 401, "removed on A");
    let (status, _) = b.admin("DELETE", &format!("/v1/agents/{DID_A}"), vec![], None);
    assert_eq!(status, 404, "removed once");

    let request = json!({"role": "producer", "queues": ["clawdentity-events"]});
    let (status, issued) = a.post("/v1/tokens", &request);
    assert_eq!(status, 200, "{issued}");
    let secret = issued["token"].as_str().unwrap();
    let publish = |host: &Host| {
        host.admin(
            "POST",
            "/v1/queues/clawdentity-events/messages",
            serde_json::to_vec(&json!({"body": {"n": 1}})).unwrap(),
            Some(secret),
        )
        .0
    };
    assert_eq!(publish(&b), 200, "issued on A, taken by B");
    let (status, listed) = b.admin("GET", "/v1/tokens", vec![], None);
    assert_eq!((status, &listed["tokens"][0]["id"]), (200, &issued["id"]));
    let id = issued["id"].as_str().unwrap();
    let (status, body) = a.admin("DELETE", &format!("/v1/tokens/{id}"), vec![], None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(publish(&b), 401, "removed on A, refused by B");
}

/// Waits until one of `hosts` logs a line with every one of `needles`.
fn wait_log_on_any(hosts: &[&Host], needles: &[&str]) {
    wait_for(&format!("a host to log {needles:?}"), || {
        hosts
            .iter()
            .any(|h| !h.log_lines(needles).is_empty())
            .then_some(())
    });
}

#[test]
fn a_deploy_or_rollback_on_one_host_switches_every_host() {
    let nats = NatsServer::start();
    let config = scripted_consumer(JOBS, "world = \"crl-invalidation\"\nmax_batch_timeout = 0");
    let (a, b, c) = (
        host(&nats, &config),
        host(&nats, &config),
        host(&nats, &config),
    );
    let v1 = current_version(&a);
    let v2_wasm = scripted_variant("cluster-v2");
    let v2 = version_of(&v2_wasm);

    let (status, body) = deploy(&a, JOBS, v2_wasm);
    assert_eq!(status, 200, "{body}");
    let deployed = Instant::now();
    for other in [&b, &c] {
        wait_for("the deploy on A to switch the other hosts", || {
            (current_version(other) == v2).then_some(())
        });
    }
    eprintln!("deploy on A → B and C switched: {:?}", deployed.elapsed());
    b.publish(JOBS, json!({"do": "ack", "tag": "after-deploy"}));
    wait_log_on_any(&[&a, &b, &c], &["seen tag=after-deploy ", &v2[..12]]);
    let (status, slot) = b.admin("GET", &format!("/v1/handlers/{JOBS}"), vec![], None);
    assert_eq!(status, 200, "{slot}");
    let history: Vec<(&str, &str)> = slot["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["version"].as_str().unwrap(),
                e["loaded_by"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        history,
        [(v2.as_str(), "api"), (v1.as_str(), "config")],
        "B shows A's deploy: {slot}"
    );

    let (status, body) = a.admin(
        "POST",
        &format!("/v1/handlers/{JOBS}/rollback"),
        vec![],
        None,
    );
    assert_eq!(status, 200, "{body}");
    for other in [&b, &c] {
        wait_for("the rollback on A to switch the other hosts", || {
            (current_version(other) == v1).then_some(())
        });
    }
    c.publish(JOBS, json!({"do": "ack", "tag": "after-rollback"}));
    wait_log_on_any(&[&a, &b, &c], &["seen tag=after-rollback ", &v1[..12]]);
}

/// Two hosts running the dead-letter digest example (it counts a sender's dead-lettered
/// receipts in its actor storage and delivers a digest to the sender at every third),
/// and the socket of `DID_A`'s connector on the second.
fn digest_cluster(nats: &NatsServer) -> (Host, Host, Socket) {
    let digest = digest_consumer("");
    let (a, b) = (
        host(nats, &fast_config(&digest)),
        host(nats, &fast_config(&digest)),
    );
    let token = a.add_agent(DID_A);
    let socket = b.connect(DID_A, Some(&token)).unwrap();
    (a, b, socket)
}

/// The consumer of the dead-letter digest example, with `extra` settings.
fn digest_consumer(extra: &str) -> String {
    format!(
        "[[queues.consumers]]\nqueue = \"{RECEIPTS}\"\nname = \"dead-letter-digest\"\n\
         handler = \"{}\"\nworld = \"receipt-handler\"\nmax_batch_timeout = 0.05\n\
         filter = {{ type = \"delivery_receipt\", status = \"dead_lettered\" }}\n{extra}",
        clawq_test_guests::DEAD_LETTER_DIGEST
    )
}

/// The dead-lettered receipt `n` of `DID_A`.
fn dead_lettered(n: u32) -> serde_json::Value {
    receipt(&format!("req-{n}"), DID_A, DID_B, "dead_lettered", None)
}

/// The count of the next digest on `socket`, acked (receipts skipped, heartbeats
/// answered).
fn next_digest_count(socket: &mut Socket) -> u64 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "no digest within {DEADLINE:?}");
        match next_event(socket, &["receipt"]) {
            Seen::Frame(digest) if digest["type"] == "deliver" => {
                let system = &digest["payload"]["system"];
                assert_eq!(system["type"], "clawq.dead-letter-digest", "{digest}");
                let ack = json!({"ackId": digest["id"], "accepted": true});
                send_frame(socket, &frame("deliver_ack", ack));
                return system["count"].as_u64().unwrap();
            }
            Seen::Frame(beat) => send_frame(
                socket,
                &frame("heartbeat_ack", json!({"ackId": beat["id"]})),
            ),
            Seen::Closed(code, reason) => panic!("closed: {code} {reason}"),
        }
    }
}

#[test]
fn actor_storage_written_on_one_host_is_read_on_another() {
    // Both hosts pull from the digest's lane, so its batches run on both at once: the
    // count reaches 3 only if each batch reads what the others wrote, never interleaving
    // its read and write of the count with another host's (each batch holds the actor
    // while it runs).
    let nats = NatsServer::start();
    let (a, b, mut socket) = digest_cluster(&nats);
    a.publish(RECEIPTS, dead_lettered(1));
    a.publish(RECEIPTS, dead_lettered(2));
    a.wait_drained(RECEIPTS);
    b.publish(RECEIPTS, dead_lettered(3));
    assert_eq!(next_digest_count(&mut socket), 3);
}

#[test]
fn concurrent_batches_on_two_hosts_lose_no_write_of_an_actor() {
    let nats = NatsServer::start();
    let (a, b, mut socket) = digest_cluster(&nats);
    for n in 1..=12 {
        let host = if n % 2 == 0 { &a } else { &b };
        host.publish(RECEIPTS, dead_lettered(n));
    }
    let counts: Vec<u64> = (0..4).map(|_| next_digest_count(&mut socket)).collect();
    assert_eq!(counts, [3, 6, 9, 12], "every count reached once");
}

#[test]
fn batches_taken_one_at_a_time_on_one_host_lose_no_write_of_an_actor() {
    // One receipt a batch, one batch at a time (`max_concurrency = 1`): the next batch
    // is taken while the one before commits its outcomes, but its handler runs only once
    // that one's has returned, so each reads the count the one before wrote.
    let host = Host::start(&fast_config(&digest_consumer("max_batch_size = 1\n")));
    let token = host.add_agent(DID_A);
    let mut socket = host.connect(DID_A, Some(&token)).unwrap();
    let receipts: Vec<_> = (1..=12).map(dead_lettered).collect();
    host.publish_batch(RECEIPTS, &receipts);
    let counts: Vec<u64> = (0..4).map(|_| next_digest_count(&mut socket)).collect();
    assert_eq!(counts, [3, 6, 9, 12], "every count reached once");
}

#[test]
fn hosts_starting_at_once_on_a_fresh_cluster_all_serve_one_history() {
    let nats = NatsServer::start();
    let config = scripted_consumer(JOBS, "world = \"crl-invalidation\"");
    let hosts: Vec<Host> = std::thread::scope(|scope| {
        let starting: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| host(&nats, &config)))
            .collect();
        starting.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (status, slot) = hosts[2].admin("GET", &format!("/v1/handlers/{JOBS}"), vec![], None);
    assert_eq!(status, 200, "{slot}");
    let loaded_by: Vec<&str> = slot["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["loaded_by"].as_str().unwrap())
        .collect();
    assert_eq!(loaded_by, ["config"], "one entry for three starts: {slot}");
    for host in &hosts {
        host.publish(JOBS, json!({"do": "ack", "tag": "started-at-once"}));
    }
    wait_for("the three messages handled", || {
        (hosts
            .iter()
            .map(|h| h.log_lines(&["seen tag=started-at-once "]).len())
            .sum::<usize>()
            >= 3)
            .then_some(())
    });
}
