//! End to end: backpressure to connectors (spec section 7). A hostile handler floods an
//! agent with 1 MB frames through `websocket.send-frame`: a connector that does not read
//! is closed (4008 `connector_too_slow`, or on the send timeout) while the host's memory
//! stays bounded and its API answers, the receipts it held are pushed again on its next
//! connect, and a connector that reads slowly but keeps within the bounds stays open.

mod support;

use std::time::Instant;

use serde_json::{Value, json};
use support::*;

const RECEIPTS: &str = "clawdentity-receipts";
const HOSTILE: &str = "hostile";
/// How much the host's resident memory may grow while a non-reading connector is
/// flooded: the connection's queue (8 MiB) and socket buffers, the handler's instance,
/// and the frames in flight through the capability call, with room to spare (16 MiB
/// measured); the flood is 150 MB.
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

/// The flood: `n` frames of `size` bytes pushed to `agent`.
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
fn a_connector_that_does_not_read_is_closed_and_its_receipts_are_pushed_again() {
    let host = Host::start(&config(""));
    let token = host.add_agent(DID_A);
    let mut stuck = host.connect(DID_A, Some(&token)).unwrap();
    wait_connections(&host, 1);
    host.publish(
        RECEIPTS,
        receipt("before-flood", DID_A, DID_B, "dead_lettered", Some("gone")),
    );
    host.wait_drained(RECEIPTS);
    let (rss_before, peak_before) = host.memory_kib();

    host.publish(HOSTILE, flood(150, 1_000_000, DID_A));
    // Recorded while the connector is stuck: recording never waits for its connection.
    host.publish(
        RECEIPTS,
        receipt("during-flood", DID_A, DID_B, "dead_lettered", Some("gone")),
    );
    host.wait_drained(RECEIPTS);
    host.wait_drained(HOSTILE);
    let (rss_after, peak_after) = host.memory_kib();
    eprintln!(
        "memory (KiB): before the flood {rss_before} (peak {peak_before}), \
         after {rss_after} (peak {peak_after})"
    );
    assert!(
        peak_after.saturating_sub(rss_before) < MEMORY_GROWTH_BOUND_KIB,
        "the host grew from {rss_before} KiB to a peak of {peak_after} KiB"
    );
    let closed = host.wait_log_all(&["connector disconnected", "connector_too_slow"]);
    let (status, body) = host.get("/healthz");
    assert_eq!((status, &body["status"]), (200, &json!("ok")), "{body}");
    assert!(
        host.log_lines(&["connector too slow", "its queue is full"])
            .len()
            == 1,
        "the overflow is logged once: {closed:?}"
    );
    let connections_closed = "clawq_websocket_connections_closed_total";
    assert_eq!(
        counted(&host, connections_closed, "connector_too_slow"),
        1.0
    );
    let dropped = "clawq_websocket_frames_dropped_total";
    assert!(counted(&host, dropped, "connector_too_slow") >= 1.0);
    wait_connections(&host, 0);
    if let Some(close) = read_until_closed(&mut stuck) {
        assert_eq!(close, (4008, "connector_too_slow".to_owned()));
    }

    // Nothing durable was lost: both receipts come again, and no flood frame.
    let mut again = host.connect(DID_A, Some(&token)).unwrap();
    let mut pushed: Vec<String> = (0..2)
        .map(|_| {
            let frame = next_frame(&mut again);
            assert_eq!(frame["type"], "receipt", "{frame}");
            frame["originalFrameId"].as_str().unwrap().to_owned()
        })
        .collect();
    pushed.sort();
    assert_eq!(pushed, ["before-flood", "during-flood"]);
}

#[test]
fn a_send_that_cannot_go_through_times_out_and_closes_the_connection() {
    // A queue large enough to hold the whole flood: only the send timeout can end it.
    let host = Host::start(&config(
        "max_queued_frames = 1000\nmax_queued_bytes = 134217728\nsend_timeout = 1\n",
    ));
    let token = host.add_agent(DID_A);
    let mut stuck = host.connect(DID_A, Some(&token)).unwrap();
    wait_connections(&host, 1);

    host.publish(HOSTILE, flood(40, 1_000_000, DID_A));
    host.wait_log_all(&["connector disconnected", "send_timeout"]);
    wait_connections(&host, 0);
    let connections_closed = "clawq_websocket_connections_closed_total";
    assert_eq!(counted(&host, connections_closed, "send_timeout"), 1.0);
    assert_eq!(
        counted(&host, connections_closed, "connector_too_slow"),
        0.0
    );
    let (status, _) = host.get("/healthz");
    assert_eq!(status, 200);
    assert_eq!(
        read_until_closed(&mut stuck),
        None,
        "a peer that takes nothing gets no close frame"
    );
}

#[test]
fn a_connector_that_reads_slowly_within_the_bounds_stays_open() {
    let host = Host::start(&config(""));
    let token = host.add_agent(DID_B);
    let mut slow = host.connect(DID_B, Some(&token)).unwrap();
    wait_connections(&host, 1);

    // 6 MB in 200 frames, pushed faster than read: less than the queue holds.
    let (n, size) = (200, 30_000);
    host.publish(HOSTILE, flood(n, size, DID_B));
    for i in 0..n {
        let frame = next_frame(&mut slow);
        assert_eq!(frame["type"], "flood", "frame {i}: {frame}");
        assert_eq!(frame["pad"].as_str().map(str::len), Some(size));
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
    let dropped = "clawq_websocket_frames_dropped_total";
    assert_eq!(counted(&host, dropped, "connector_too_slow"), 0.0);
}
