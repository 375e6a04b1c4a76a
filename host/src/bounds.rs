//! The bounds of what a guest hands the host through its capabilities, in one place: the
//! size of a log line, of actor names, keys and values, of an `actor-storage` page, and
//! the log rate limit of each consumer.
//!
//! An argument over its bound is refused with a permanent `host-error` naming the bound
//! (never a trap); a log line over its size is cut with a marker of its length; a log line
//! over the consumer's rate is dropped, counted in
//! `clawq_handler_log_lines_dropped_total{consumer}` and summed up in a warning, at most
//! one per consumer every [`DROPPED_SUMMARY_INTERVAL`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Largest guest log line written whole; a longer one is cut to this many bytes and
/// marked with its length.
pub const MAX_LOG_LINE_BYTES: usize = 4 * 1024;
/// Shortest time between two warnings of one consumer that sum up its dropped log lines:
/// a quick handler that logs a line a message would otherwise have the host write one
/// warning a batch, thousands a second.
pub const DROPPED_SUMMARY_INTERVAL: Duration = Duration::from_secs(1);
/// Largest actor name of an `actor-storage` call.
pub const MAX_ACTOR_BYTES: usize = 256;
/// Largest key of an `actor-storage` call (and prefix or `start-after` of a listing).
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value stored under one key.
pub const MAX_VALUE_BYTES: usize = 128 * 1024;
/// Most entries in one `actor-storage.list-prefix` page, whatever `limit` asks for.
pub const MAX_LIST_PAGE: u32 = 1000;
/// Bytes of keys and values after which a `list-prefix` page ends early (it holds at
/// least one entry), so that a page fits a small guest's memory.
pub const MAX_LIST_PAGE_BYTES: usize = 1 << 20;

/// Largest request id of a receipt handed to `relay-sessions` (as a delivery's dedup key).
pub const MAX_REQUEST_ID_BYTES: usize = 1024;
/// Largest reason of a receipt handed to `relay-sessions`.
pub const MAX_REASON_BYTES: usize = 4096;

/// A capability argument over its bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} of {len} bytes exceeds the {limit}-byte limit")]
pub struct TooLarge {
    /// What the argument is, e.g. `key`.
    pub what: &'static str,
    /// Its size in bytes.
    pub len: usize,
    /// Its bound in bytes.
    pub limit: usize,
}

impl From<TooLarge> for crate::runtime::HostError {
    fn from(err: TooLarge) -> Self {
        crate::runtime::HostError {
            transient: false,
            message: err.to_string(),
        }
    }
}

/// Checks that the argument `what` of `len` bytes is within `limit` bytes.
pub fn check(what: &'static str, len: usize, limit: usize) -> Result<(), TooLarge> {
    if len > limit {
        return Err(TooLarge { what, len, limit });
    }
    Ok(())
}

/// Checks the actor name and the key (or prefix) of an `actor-storage` call.
pub fn storage_address(actor: &str, key: &str) -> Result<(), TooLarge> {
    check("actor name", actor.len(), MAX_ACTOR_BYTES)?;
    check("key", key.len(), MAX_KEY_BYTES)
}

/// Checks the request id and the reason of a receipt handed to `relay-sessions`, which
/// keeps them in the sender's session until its connector acknowledges the receipt.
pub fn receipt_fields(request_id: &str, reason: Option<&str>) -> Result<(), TooLarge> {
    check("request-id", request_id.len(), MAX_REQUEST_ID_BYTES)?;
    check("reason", reason.map_or(0, str::len), MAX_REASON_BYTES)
}

/// `line` as the host writes it: whole up to [`MAX_LOG_LINE_BYTES`], else cut there (on a
/// character boundary) and marked with its full length.
pub fn log_line(line: String) -> String {
    if line.len() <= MAX_LOG_LINE_BYTES {
        return line;
    }
    crate::text::cut_bytes(&line, MAX_LOG_LINE_BYTES)
}

/// How many log lines a consumer's handler may write: a token bucket holding `burst`
/// lines, refilled at `per_second` lines a second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogRate {
    /// Lines written at once before the rate applies.
    pub burst: u32,
    /// Lines a second in the long run.
    pub per_second: f64,
}

impl Default for LogRate {
    fn default() -> Self {
        LogRate {
            burst: 100,
            per_second: 50.0,
        }
    }
}

/// The log budget of one consumer, shared by its batches, and the lines it dropped that
/// no warning has summed up yet.
#[derive(Debug)]
struct Bucket {
    rate: LogRate,
    tokens: f64,
    refilled: Instant,
    /// Lines dropped since the last summary warning.
    unreported: u64,
    /// When the last summary warning was written, if one was.
    reported: Option<Instant>,
}

impl Bucket {
    fn new(rate: LogRate, now: Instant) -> Self {
        Bucket {
            rate,
            tokens: f64::from(rate.burst),
            refilled: now,
            unreported: 0,
            reported: None,
        }
    }

    /// Takes one line's token at `now`; false when the bucket is empty.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * self.rate.per_second).min(f64::from(self.rate.burst));
        self.refilled = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// Adds a batch's `dropped` lines at `now`; returns the lines to sum up in a warning
    /// now, if any: every line dropped since the last warning, once
    /// [`DROPPED_SUMMARY_INTERVAL`] has passed since it.
    fn report(&mut self, dropped: u64, now: Instant) -> Option<u64> {
        self.unreported += dropped;
        let due = self
            .reported
            .is_none_or(|at| now.saturating_duration_since(at) >= DROPPED_SUMMARY_INTERVAL);
        if self.unreported == 0 || !due {
            return None;
        }
        self.reported = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

/// The guest log rate limits of every consumer: one bucket per consumer, at the rate
/// its config sets ([`LogRate::default`] otherwise).
#[derive(Debug, Default)]
pub struct GuestLogs {
    rates: RwLock<HashMap<String, LogRate>>,
    buckets: Mutex<HashMap<Arc<str>, Arc<Mutex<Bucket>>>>,
}

impl GuestLogs {
    /// Sets the log rate of `consumer`, from its next batch on.
    pub fn set_rate(&self, consumer: &str, rate: LogRate) {
        // One lock at a time: `batch` takes the buckets' lock, then the rates'.
        (self.rates.write().unwrap_or_else(|p| p.into_inner())).insert(consumer.to_owned(), rate);
        (self.buckets.lock().unwrap_or_else(|p| p.into_inner())).remove(consumer);
    }

    /// The log budget of one batch of `consumer`'s handler `handler` at `version`.
    pub fn batch(&self, consumer: &Arc<str>, handler: &Arc<str>, version: &Arc<str>) -> BatchLog {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets.entry(consumer.clone()).or_insert_with(|| {
            let rates = self.rates.read().unwrap_or_else(|p| p.into_inner());
            let rate = rates.get(&**consumer).copied().unwrap_or_default();
            Arc::new(Mutex::new(Bucket::new(rate, Instant::now())))
        });
        BatchLog {
            bucket: bucket.clone(),
            consumer: consumer.clone(),
            handler: handler.clone(),
            version: version.clone(),
            dropped: 0,
        }
    }
}

/// The log budget of one batch: admits the lines its consumer's rate allows, and on drop
/// counts the lines it refused and, when one is due ([`DROPPED_SUMMARY_INTERVAL`]), logs
/// the warning that sums up the consumer's lines dropped since the last one (so the
/// first batch to end after the interval writes it, whether it dropped lines or not).
#[derive(Debug)]
pub struct BatchLog {
    bucket: Arc<Mutex<Bucket>>,
    consumer: Arc<str>,
    handler: Arc<str>,
    version: Arc<str>,
    dropped: u64,
}

impl BatchLog {
    /// Whether the next guest log line may be written; a refused line is counted.
    pub fn admit(&mut self) -> bool {
        let taken = {
            let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            bucket.take(Instant::now())
        };
        if !taken {
            self.dropped += 1;
        }
        taken
    }
}

impl Drop for BatchLog {
    fn drop(&mut self) {
        if self.dropped > 0 {
            crate::metrics::log_lines_dropped(&self.consumer, self.dropped);
        }
        let (summed_up, rate) = {
            let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            (bucket.report(self.dropped, Instant::now()), bucket.rate)
        };
        let Some(dropped) = summed_up else {
            return;
        };
        tracing::warn!(consumer = %self.consumer, handler = %self.handler,
            version = %self.version, dropped, burst = rate.burst,
            per_second = rate.per_second,
            "guest log lines over the consumer's log rate dropped since the last such warning");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_long_log_line_is_cut_on_a_character_boundary_with_its_length() {
        let short = "x".repeat(MAX_LOG_LINE_BYTES);
        assert_eq!(log_line(short.clone()), short);
        let long = format!("a{}", "é".repeat(MAX_LOG_LINE_BYTES));
        let cut = log_line(long.clone());
        assert!(cut.len() < MAX_LOG_LINE_BYTES + 40, "{}", cut.len());
        assert!(
            cut.ends_with(&format!("… ({} bytes)", long.len())),
            "{}",
            &cut[cut.len() - 40..]
        );
        assert!(cut.starts_with("aé"));
    }

    #[test]
    fn arguments_over_their_bound_name_it() {
        assert_eq!(storage_address(&"a".repeat(MAX_ACTOR_BYTES), "k"), Ok(()));
        let err = storage_address("a", &"k".repeat(8_000_000)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "key of 8000000 bytes exceeds the 1024-byte limit"
        );
        let err = storage_address(&"a".repeat(300), "k").unwrap_err();
        assert_eq!(err.what, "actor name");
        assert!(check("value", MAX_VALUE_BYTES + 1, MAX_VALUE_BYTES).is_err());
        assert_eq!(
            receipt_fields("r", Some(&"x".repeat(MAX_REASON_BYTES))),
            Ok(())
        );
        let err = receipt_fields("r", Some(&"x".repeat(2 << 20))).unwrap_err();
        assert_eq!(err.what, "reason");
        assert_eq!(
            receipt_fields(&"r".repeat(1025), None).unwrap_err().what,
            "request-id"
        );
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let rate = LogRate {
            burst: 10,
            per_second: 5.0,
        };
        let mut bucket = Bucket::new(rate, start);
        let admitted = (0..1000).filter(|_| bucket.take(start)).count();
        assert_eq!(admitted, 10, "the burst");
        let later = start + Duration::from_secs(2);
        let admitted = (0..1000).filter(|_| bucket.take(later)).count();
        assert_eq!(admitted, 10, "2 s at 5 lines/s");
        let much_later = later + Duration::from_secs(3600);
        let admitted = (0..1000).filter(|_| bucket.take(much_later)).count();
        assert_eq!(admitted, 10, "never more than the burst at once");
    }

    #[test]
    fn dropped_lines_are_summed_up_at_most_once_an_interval() {
        let start = Instant::now();
        let mut bucket = Bucket::new(LogRate::default(), start);
        assert_eq!(
            bucket.report(0, start),
            None,
            "nothing dropped, nothing to say"
        );
        assert_eq!(bucket.report(7, start), Some(7), "the first drops at once");
        let soon = start + DROPPED_SUMMARY_INTERVAL / 2;
        assert_eq!(bucket.report(5, soon), None);
        assert_eq!(bucket.report(3, soon), None);
        let after = start + DROPPED_SUMMARY_INTERVAL;
        assert_eq!(
            bucket.report(0, after),
            Some(8),
            "the first batch after the interval sums up the lines dropped since"
        );
        assert_eq!(bucket.report(0, after), None);
        let later = after + DROPPED_SUMMARY_INTERVAL;
        assert_eq!(bucket.report(0, later), None, "nothing left to sum up");
        assert_eq!(bucket.report(2, later), Some(2));
    }

    #[test]
    fn each_consumer_has_its_own_budget_shared_by_its_batches() {
        let logs = GuestLogs::default();
        logs.set_rate(
            "quiet",
            LogRate {
                burst: 3,
                per_second: 0.001,
            },
        );
        let name = |s: &str| Arc::<str>::from(s);
        let (quiet, loud, v) = (name("quiet"), name("loud"), name("v1"));
        let mut first = logs.batch(&quiet, &quiet, &v);
        assert_eq!((0..5).filter(|_| first.admit()).count(), 3);
        assert_eq!(first.dropped, 2);
        let mut second = logs.batch(&quiet, &quiet, &v);
        assert!(!second.admit(), "the next batch shares the spent budget");
        let mut other = logs.batch(&loud, &loud, &v);
        let default_burst = LogRate::default().burst as usize;
        assert_eq!(
            (0..default_burst + 1).filter(|_| other.admit()).count(),
            default_burst
        );
    }
}
