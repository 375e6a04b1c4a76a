//! End to end: crash safety under load. The host is killed with SIGKILL at random points
//! while producers publish to a queue with two consumers, and restarted on the same data
//! each time; in the end every message a publish call returned an id for has been
//! handled at least once by each consumer and none is left. The same holds for a batch killed while it is retrying with a delay.
//!
//! The random points come from a seed printed by each test; `CLAWQ_CRASH_SEED=<seed>`
//! replays them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::support::*;
use serde_json::{Value, json};

const QUEUE: &str = "load";
/// Messages published in all.
const MESSAGES: usize = 20_000;
/// Concurrent producers, each publishing its share in batches.
const PRODUCERS: usize = 4;
/// Messages per publish call.
const PUBLISH_BATCH: usize = 100;
/// SIGKILLs while publishing.
const KILLS: usize = 3;

/// Batches of 100, taken as soon as they are ready.
const BATCHES: &str = "max_batch_size = 100\nmax_batch_timeout = 0.01";
/// The second consumer of the queue under load, which takes every message too.
const MIRROR: &str = "mirror";

/// A host consuming `queue` with the scripted handler in batches of 100.
fn config(queue: &str) -> String {
    scripted_consumer(queue, BATCHES)
}

/// [`config`] plus a second consumer of `queue`, [`MIRROR`], running the same handler.
fn fanned_out_config(queue: &str) -> String {
    format!(
        "{}[[queues.consumers]]\nqueue = \"{queue}\"\nname = \"{MIRROR}\"\n\
         handler = \"{SCRIPTED_HANDLER}\"\n{BATCHES}\n{UNLIMITED_LOGS}\n",
        config(queue)
    )
}

/// The random generator of a test, seeded from `CLAWQ_CRASH_SEED` or at random; the seed
/// is printed so that a failure can be replayed.
fn rng(test: &str) -> fastrand::Rng {
    let seed = std::env::var("CLAWQ_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("{test}: CLAWQ_CRASH_SEED={seed}");
    fastrand::Rng::with_seed(seed)
}

/// Where producers publish: the base url of the host's current run, which changes at
/// each restart (the host listens on a free port).
struct Target {
    run: Mutex<(u64, String)>,
    restarted: Condvar,
}

impl Target {
    fn new(base: &str) -> Target {
        Target {
            run: Mutex::new((0, base.to_owned())),
            restarted: Condvar::new(),
        }
    }

    /// The current run's number and base url.
    fn current(&self) -> (u64, String) {
        self.run.lock().unwrap().clone()
    }

    /// Records that the host runs again at `base`.
    fn restarted(&self, base: &str) {
        let mut run = self.run.lock().unwrap();
        *run = (run.0 + 1, base.to_owned());
        self.restarted.notify_all();
    }

    /// Waits for a run after `run`, failing the test with `why` if none comes in time.
    fn wait_after(&self, run: u64, why: &str) {
        let deadline = Instant::now() + DEADLINE;
        let mut current = self.run.lock().unwrap();
        while current.0 <= run {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no restart came after: {why}");
            current = self.restarted.wait_timeout(current, left).unwrap().0;
        }
    }
}

/// Publishes `tags` as one batch of scripted acks, again and again until a call returns
/// ids: a call cut by a kill may or may not have stored its messages, so it is retried
/// once the host runs again (a message stored twice is then handled twice, under the
/// same tag). Returns the ids.
fn publish_until_stored(
    target: &Target,
    http: &reqwest::blocking::Client,
    token: &str,
    queue: &str,
    tags: &[String],
) -> Vec<String> {
    let messages: Vec<Value> = tags
        .iter()
        .map(|tag| json!({"body": {"do": "ack", "tag": tag}}))
        .collect();
    let body = json!({"messages": messages});
    loop {
        let (run, base) = target.current();
        let reply = http
            .post(format!("{base}/v1/queues/{queue}/messages/batch"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json::<Value>());
        match reply {
            Ok(reply) => {
                return reply["ids"]
                    .as_array()
                    .unwrap_or_else(|| panic!("no ids in {reply}"))
                    .iter()
                    .map(|id| id.as_str().unwrap().to_owned())
                    .collect();
            }
            Err(err) => target.wait_after(run, &format!("publishing failed: {err}")),
        }
    }
}

/// The tags the scripted handler of `consumer` logged across every run, each with how
/// many times.
fn seen_tags(host: &Host, consumer: &str, prefix: &str) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    let consumer = format!("consumer=\"{consumer}\"");
    let tag = format!("seen tag={prefix}");
    for line in host.all_log_lines(&[&consumer, &tag, " attempts="]) {
        let tag = line.text.split("seen tag=").nth(1).unwrap();
        let tag = tag.split(' ').next().unwrap().to_owned();
        *seen.entry(tag).or_insert(0) += 1;
    }
    seen
}

/// Waits until `queue` holds nothing and nothing went to its dead-letter queue.
fn assert_drained(host: &Host, queue: &str) {
    let status = host.wait_drained(queue);
    assert_eq!(status["dead_lettered"], 0, "{status}");
}

#[test]
fn nothing_is_lost_when_the_host_is_killed_under_load() {
    let started = Instant::now();
    let mut rng = rng("kills under load");
    let mut host = Host::start(&fanned_out_config(QUEUE));
    let target = Arc::new(Target::new(&host.base));
    let published = Arc::new(AtomicUsize::new(0));

    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (target, published) = (target.clone(), published.clone());
            let token = host.admin_token();
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(DEADLINE)
                    .build()
                    .unwrap();
                let tags: Vec<String> = (0..MESSAGES / PRODUCERS)
                    .map(|i| format!("p{p}-{i}"))
                    .collect();
                let mut stored = BTreeMap::new();
                for chunk in tags.chunks(PUBLISH_BATCH) {
                    let ids = publish_until_stored(&target, &http, &token, QUEUE, chunk);
                    assert_eq!(ids.len(), chunk.len());
                    stored.extend(chunk.iter().cloned().zip(ids));
                    published.fetch_add(chunk.len(), Ordering::SeqCst);
                }
                stored
            })
        })
        .collect();

    let mut kill_points: Vec<usize> = (0..KILLS).map(|_| rng.usize(1..MESSAGES)).collect();
    kill_points.sort();
    for point in &kill_points {
        wait_for(&format!("{point} messages published"), || {
            (published.load(Ordering::SeqCst) >= *point).then_some(())
        });
        host.kill_and_restart();
        target.restarted(&host.base);
    }
    let stored: BTreeMap<String, String> = producers
        .into_iter()
        .flat_map(|p| p.join().unwrap())
        .collect();
    let ids: BTreeSet<&String> = stored.values().collect();
    assert_eq!(
        (stored.len(), ids.len()),
        (MESSAGES, MESSAGES),
        "a distinct id for each message"
    );

    assert_drained(&host, QUEUE);
    for consumer in [QUEUE, MIRROR] {
        let seen = seen_tags(&host, consumer, "p");
        let lost: Vec<_> = stored
            .iter()
            .filter(|(tag, _)| !seen.contains_key(*tag))
            .collect();
        assert!(
            lost.is_empty(),
            "{} of {MESSAGES} messages were never handled by {consumer}, e.g. (tag, id) {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        let deliveries: usize = seen.values().sum();
        eprintln!(
            "{consumer}: {MESSAGES} messages, {KILLS} kills after {kill_points:?} published: \
             {deliveries} deliveries, {} duplicates, 0 lost, in {:?}",
            deliveries - MESSAGES,
            started.elapsed()
        );
    }
}

#[test]
fn a_batch_killed_while_retrying_with_a_delay_is_delivered_again_and_acked() {
    const RETRYING: usize = 300;
    let mut rng = rng("kill while retrying");
    let queue = "retrying";
    let mut host = Host::start(&config(queue));
    let bodies: Vec<Value> = (0..RETRYING)
        .map(|i| json!({"do": "retry", "delay": 1, "ack_at": 2, "tag": format!("r{i}")}))
        .collect();
    for chunk in bodies.chunks(PUBLISH_BATCH) {
        host.publish_batch(queue, chunk);
    }
    // Kill once a random number of first attempts were seen: by then some retries are
    // committed and waiting out their delay, and a batch may be in flight.
    let first_attempts = rng.usize(1..=RETRYING);
    wait_for(&format!("{first_attempts} first attempts"), || {
        (host.log_lines(&["seen tag=r", " attempts=1 "]).len() >= first_attempts).then_some(())
    });
    host.kill_and_restart();

    assert_drained(&host, queue);
    let mut acked_attempt: BTreeMap<String, u32> = BTreeMap::new();
    for line in host.all_log_lines(&["seen tag=r", " attempts="]) {
        let fields: Vec<&str> = line
            .text
            .split("seen tag=")
            .nth(1)
            .unwrap()
            .split(' ')
            .collect();
        let attempts: u32 = fields[1].trim_start_matches("attempts=").parse().unwrap();
        let best = acked_attempt.entry(fields[0].to_owned()).or_default();
        *best = (*best).max(attempts);
    }
    let not_acked: Vec<_> = (0..RETRYING)
        .map(|i| format!("r{i}"))
        .filter(|tag| acked_attempt.get(tag).is_none_or(|a| *a < 2))
        .collect();
    assert!(
        not_acked.is_empty(),
        "never delivered a second time: {not_acked:?}"
    );
}
