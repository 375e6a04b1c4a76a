//! End to end: a hostile handler on a queue of its own meets the bounds of its output at
//! the capability boundary. A log flood is rate limited, counted and summed up (in at
//! most one warning a second); a huge log line is cut; oversized keys and values are
//! refused with a permanent error; puts past the consumer's storage quota are refused and
//! the store's file stays bounded; `list-prefix` pages through more keys than one page
//! holds.

use std::time::Instant;

use crate::support::*;
use serde_json::json;

const HOSTILE: &str = "hostile";

/// A host whose queue `hostile` runs the hostile handler one message at a time, with
/// `settings` appended to its consumer.
fn hostile_host(settings: &str) -> Host {
    Host::start(&fast_config(&format!(
        "[[queues.consumers]]\nqueue = \"{HOSTILE}\"\nhandler = \"{HOSTILE_HANDLER}\"\n\
         max_batch_timeout = 0\nmax_batch_size = 1\nmax_retries = 0\n{settings}\n"
    )))
}

/// The value of the sample `name` of the hostile consumer in `/metrics`.
fn hostile_sample(host: &Host, name: &str) -> f64 {
    sample(host, name, "consumer")
}

/// The value of the sample `name` whose `label` is `hostile` in `/metrics`.
fn sample(host: &Host, name: &str, label: &str) -> f64 {
    find_sample(&host.scrape(), name, &[(label, HOSTILE)])
        .unwrap_or_else(|| panic!("no sample {name}{{{label}=\"{HOSTILE}\"}}"))
}

/// Bytes of the host's log (stderr) so far.
fn log_bytes(host: &Host) -> usize {
    host.log_lines(&[]).iter().map(|l| l.text.len() + 1).sum()
}

/// The number after `key=` in `text`.
fn field(text: &str, key: &str) -> u64 {
    let tail = &text[text.find(&format!("{key}=")).expect(key) + key.len() + 1..];
    let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap()
}

#[test]
fn a_log_flood_is_rate_limited_counted_and_summed_up_at_most_once_a_second() {
    let host = hostile_host("");
    let (before, start) = (log_bytes(&host), Instant::now());
    let lines: u64 = 1_000_000;
    let summary = "guest log lines over the consumer's log rate dropped";
    let acked = |host: &Host| {
        find_sample(
            &host.scrape(),
            "clawq_messages_acked_total",
            &[("queue", HOSTILE)],
        )
        .unwrap_or(0.0)
    };
    let figures = host.under_attack(
        "a log flood",
        |_| {
            host.publish(HOSTILE, json!({"do": "log", "n": lines, "size": 200}));
        },
        |round| acked(&host) >= f64::from(round),
    );
    let elapsed = start.elapsed().as_secs_f64();
    host.wait_drained(HOSTILE);

    let dropped = hostile_sample(&host, "clawq_handler_log_lines_dropped_total") as u64;
    let lines = lines * u64::from(figures.rounds);
    let line = "l".repeat(200);
    let written = host.log_lines(&[&line]).len() as u64;
    assert_eq!(written + dropped, lines, "every line written or dropped");
    // The default rate: a burst of 100 lines (the attack's first line takes one), then
    // 50 lines a second.
    assert!(written >= 99, "the burst is written: {written}");
    let allowed = 100.0 + 50.0 * elapsed;
    assert!(
        (written as f64) <= allowed,
        "{written} lines in {elapsed:.1} s, over {allowed:.0}"
    );
    let bytes = log_bytes(&host) - before;
    assert!(
        bytes as f64 <= allowed * 600.0,
        "{bytes} bytes of log for {written} lines"
    );
    eprintln!(
        "log flood: {lines} lines of 200 bytes in {elapsed:.2} s, {written} written, \
         {dropped} dropped, {bytes} bytes of host log"
    );

    // The lines dropped since the last warning are summed up by the consumer's first
    // batch to end a second after it: quiet messages (each logs one line) until a
    // warning has summed up every line dropped so far.
    let summed_up = |host: &Host| -> u64 {
        let summaries = host.log_lines(&[summary]);
        summaries.iter().map(|s| field(&s.text, "dropped")).sum()
    };
    wait_for("every dropped line summed up", || {
        let summed = summed_up(&host);
        if summed == hostile_sample(&host, "clawq_handler_log_lines_dropped_total") as u64 {
            return Some(());
        }
        host.publish(HOSTILE, json!({"do": "log", "n": 0}));
        None
    });
    let summaries = host.log_lines(&[summary]);
    let seconds = start.elapsed().as_secs_f64();
    assert!(
        summaries.len() as f64 <= seconds.ceil() + 1.0,
        "{} warnings in {seconds:.1} s",
        summaries.len()
    );
}

#[test]
fn a_huge_log_line_is_cut_and_oversized_arguments_are_refused() {
    let host = hostile_host("");
    host.publish(HOSTILE, json!({"do": "log", "n": 1, "size": 1_000_000}));
    let cut = host.wait_log("… (1000000 bytes)");
    assert!(cut.text.len() < 4096 + 512, "{} bytes", cut.text.len());

    host.publish(HOSTILE, json!({"do": "big-key", "size": 8_000_000}));
    host.wait_log_all(&["hostile refused: key of 8000000 bytes exceeds the 1024-byte limit"]);
    host.publish(HOSTILE, json!({"do": "put", "n": 1, "size": 200_000}));
    host.wait_log_all(&["hostile refused: value of 200000 bytes exceeds the 131072-byte limit"]);
    host.publish(HOSTILE, json!({"do": "list", "n": 10}));
    host.wait_log("hostile listed 0 keys in 0 pages");
    // A refusal is no failure: every message is acked (counted once its batch settled).
    wait_for("4 acked messages", || {
        (sample(&host, "clawq_messages_acked_total", "queue") == 4.0).then_some(())
    });
    assert_eq!(sample(&host, "clawq_messages_retried_total", "queue"), 0.0);
}

#[test]
fn puts_past_the_quota_are_refused_and_the_store_stays_bounded() {
    // Its log lines unlimited: each round's refusal is logged.
    let host = hostile_host(&format!(
        "storage_limit_mb = 1\nstorage_max_keys = 50\n{UNLIMITED_LOGS}"
    ));
    let before = host.db_bytes("clawq.db");
    // Rounds of 200 values of 128 KiB, 25 MiB asked for in each: the first fills the
    // quota with 7 of them, the next replace those 7 (their size unchanged) and are
    // refused at the 8th.
    let refused = "hostile refused: actor storage quota of 1048576 bytes";
    let figures = host.under_attack(
        "a storage flood",
        |_| {
            host.publish(HOSTILE, json!({"do": "put", "n": 200, "size": 128 * 1024}));
        },
        |round| host.log_lines(&[refused]).len() >= round as usize,
    );
    let refusal = host.wait_log(refused);
    assert!(
        refusal.text.contains("consumer `hostile`"),
        "{}",
        refusal.text
    );
    host.wait_drained(HOSTILE);
    let grown = host.db_bytes("clawq.db") - before;
    let rounds = figures.rounds;
    eprintln!(
        "a storage flood: the database grew by {grown} bytes for {rounds} × 25 MiB of \
         puts"
    );
    // The quota's megabyte, and one write-ahead log between SQLite's checkpoints (1000
    // pages of 4 KiB) with the transaction that crossed it.
    assert!(grown < 6 << 20, "the database grew by {grown} bytes");
    assert_eq!(hostile_sample(&host, "clawq_actor_storage_keys"), 7.0);
    let bytes = hostile_sample(&host, "clawq_actor_storage_bytes");
    assert!(
        bytes <= f64::from(1 << 20) && bytes > 7.0 * 131072.0,
        "{bytes}"
    );

    // Small values replace the first 7 (freeing their bytes) until the 50th key.
    host.publish(HOSTILE, json!({"do": "put", "n": 200, "size": 10}));
    host.wait_log("hostile refused: actor storage quota of 50 keys reached");
    host.publish(HOSTILE, json!({"do": "list", "n": 1000}));
    host.wait_log("hostile listed 50 keys in 1 pages of at most 50");
    assert_eq!(hostile_sample(&host, "clawq_actor_storage_keys"), 50.0);
    assert_eq!(
        hostile_sample(&host, "clawq_actor_storage_bytes"),
        50.0 * (7 + 12 + 10) as f64,
        "the replaced values count their new size"
    );
}

#[test]
fn list_prefix_pages_through_more_keys_than_one_page() {
    let host = hostile_host("");
    host.publish(HOSTILE, json!({"do": "put", "n": 2500, "size": 10}));
    host.publish(HOSTILE, json!({"do": "list", "n": 100_000}));
    host.wait_log("hostile listed 2500 keys in 3 pages of at most 1000");
    host.publish(HOSTILE, json!({"do": "list", "n": 700}));
    host.wait_log("hostile listed 2500 keys in 4 pages of at most 700");
}
