//! End to end: backpressure to connectors (spec section 7). A hostile handler floods an
//! agent with 1 MB `deliver` frames through `relay-sessions.deliver`: a connector that
//! does not read is dropped on the send timeout while the host's memory stays bounded and
//! its API answers, the receipts and deliveries it held are pushed again on its next
//! connect (nothing durable is lost), and a connector that reads slowly but keeps within
//! the timeout stays open.

use std::time::Instant;

use crate::support::*;
use serde_json::{Value, json};

const RECEIPTS: &str = "clawdentity-receipts";
const HOSTILE: &str = "hostile";
/// How much the host's resident memory may grow while a non-reading connector is
/// flooded: the socket buffers, the handler's instance, the frames in flight through the
/// capability call and the session's storage, with room to spare; the flood is 150 MB.
const MEMORY_GROWTH_BOUND_KIB: u64 = 64 << 10;

/// A host whose queues batch quickly, with the hostile handler consuming `hostile` one
/// message at a time, and `relay` appended to its `[relay]` table.
fn config(relay: &str) -> String {
    fast_config(&format!(
        "[[queues.consumers]]\nqueue = \"{HOSTILE}\"\nhandler = \"{HOSTILE_HANDLER}\"\n\
         world = \"handler-host\"\nmax_batch_size = 1\nmax_batch_timeout = 0\nmax_retries = 0\n\n\
         [relay]\nretry_initial = 60\nretry_max = 60\n{relay}"
    ))
}

/// The flood: `n` deliveries with a payload of `size` bytes (a JSON string) to `agent`.
fn flood(n: u32, size: usize, agent: &str) -> Value {
    json!({"do": "frames", "n": n, "size": size, "agent": agent})
}

/// Waits until the host counts `n` open connections.
fn wait_connections(host: &Host, n: u64) {
    wait_for(&format!("{n} open connections"), || {
        let (status, body) = host.get("/v1/relay");
        assert_eq!(status, 200, "{body}");
        (body["connections"] == n).then_some(())
    });
}

/// The counter `name{reason}`, 0 when nothing was counted yet.
fn counted(host: &Host, name: &str, reason: &str) -> f64 {
    find_sample(&host.scrape(), name, &[("reason", reason)]).unwrap_or(0.0)
}

/// Reads `socket` until the connection ends; returns the close frame's code and reason,
/// if one came before the end.
fn read_until_closed(socket: &mut Socket) -> Option<(u16, String)> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(
            Instant::now() < deadline,
            "the connection still open after {DEADLINE:?}"
        );
        match socket.read() {
            Ok(tungstenite::Message::Close(close)) => {
                return close.map(|c| (c.code.into(), c.reason.to_string()));
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
    }
}

#[test]
fn a_connector_that_does_not_read_is_dropped_and_everything_is_pushed_again() {
    let host = Host::start(&config("send_timeout = 1\n"));
    let token = host.add_agent(DID_A);
    let mut stuck = host.connect(DID_A, Some(&token)).unwrap();
    wait_connections(&host, 1);
    host.publish(
        RECEIPTS,
        receipt("before-flood", DID_A, DID_B, "dead_lettered", Some("gone")),
    );
    host.wait_drained(RECEIPTS);
    let (rss_before, peak_before) = host.memory_kib();

    let (n, size) = (150, 1_000_000);
    host.publish(HOSTILE, flood(n, size, DID_A));
    // Recorded while the connector is stuck: recording never waits for its connection.
    host.publish(
        RECEIPTS,
        receipt("during-flood", DID_A, DID_B, "dead_lettered", Some("gone")),
    );
    host.wait_drained(RECEIPTS);
    host.wait_drained(HOSTILE);
    assert!(
        host.log_lines(&["hostile refused"]).is_empty(),
        "every delivery was taken"
    );
    let (rss_after, peak_after) = host.memory_kib();
    eprintln!(
        "memory (KiB): before the flood {rss_before} (peak {peak_before}), \
         after {rss_after} (peak {peak_after})"
    );
    assert!(
        peak_after.saturating_sub(rss_before) < MEMORY_GROWTH_BOUND_KIB,
        "the host grew from {rss_before} KiB to a peak of {peak_after} KiB"
    );
    host.wait_log_all(&["connector disconnected", "send_timeout"]);
    let (status, body) = host.get("/healthz");
    assert_eq!((status, &body["status"]), (200, &json!("ok")), "{body}");
    let connections_closed = "clawq_websocket_connections_closed_total";
    assert_eq!(counted(&host, connections_closed, "send_timeout"), 1.0);
    wait_connections(&host, 0);
    assert_eq!(
        read_until_closed(&mut stuck),
        None,
        "a peer that takes nothing gets no close frame"
    );

    // Nothing durable was lost: both receipts and every delivery come again.
    let mut again = host.connect(DID_A, Some(&token)).unwrap();
    let (mut receipts, mut deliveries) = (Vec::new(), std::collections::BTreeSet::new());
    while receipts.len() + deliveries.len() < 2 + n as usize {
        let frame = next_frame(&mut again);
        match frame["type"].as_str() {
            Some("receipt") => receipts.push(frame["originalFrameId"].as_str().unwrap().to_owned()),
            Some("deliver") => {
                assert_eq!(frame["payload"].as_str().map(str::len), Some(size - 2));
                assert!(deliveries.insert(frame["id"].as_str().unwrap().to_owned()));
            }
            _ => panic!("{frame}"),
        }
    }
    receipts.sort();
    assert_eq!(receipts, ["before-flood", "during-flood"]);
}

#[test]
fn a_connector_that_reads_slowly_within_the_bounds_stays_open() {
    let host = Host::start(&config(""));
    let token = host.add_agent(DID_B);
    let mut slow = host.connect(DID_B, Some(&token)).unwrap();
    wait_connections(&host, 1);

    // 6 MB in 200 deliveries, pushed faster than read: each send still goes out within
    // the send timeout.
    let (n, size) = (200, 30_000);
    host.publish(HOSTILE, flood(n, size, DID_B));
    for i in 0..n {
        let frame = next_frame(&mut slow);
        assert_eq!(frame["type"], "deliver", "frame {i}: {frame}");
        assert_eq!(frame["payload"].as_str().map(str::len), Some(size - 2));
        // A slow reader: the frames wait for it in the host's queue.
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    host.wait_drained(HOSTILE);

    let beat = frame("heartbeat", json!({}));
    send_frame(&mut slow, &beat);
    let ack = next_frame(&mut slow);
    assert_eq!(
        (&ack["type"], &ack["ackId"]),
        (&json!("heartbeat_ack"), &beat["id"])
    );
    assert!(host.log_lines(&["connector disconnected"]).is_empty());
    let connections_closed = "clawq_websocket_connections_closed_total";
    assert_eq!(counted(&host, connections_closed, "send_timeout"), 0.0);
}
