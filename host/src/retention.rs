//! Retention: a periodic sweep deletes the messages that have been in their queue longer
//! than the queue's retention (`retention` in the config, 4 days by default), counting and
//! logging what it deleted (`clawq_messages_expired_total`). A message counts from when it entered its queue: its publish,
//! or its move to a dead-letter queue, or its redrive.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::queue::QueueBackend;

/// How often `clawq serve` sweeps.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Deletes the expired messages of each queue of `retentions` (queue name → retention)
/// once, and logs each queue that had some. Returns how many were deleted per queue; a
/// queue whose sweep failed (logged) counts 0 and is swept again next time.
pub async fn sweep(
    backend: &dyn QueueBackend,
    retentions: &BTreeMap<String, Duration>,
) -> BTreeMap<String, u64> {
    let mut deleted = BTreeMap::new();
    for (queue, retention) in retentions {
        let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_ms().saturating_sub(retention_ms);
        let count = match backend.purge_expired(queue, cutoff).await {
            Ok(count) => count,
            Err(err) => {
                tracing::error!(queue, error = %err, "deleting expired messages failed");
                0
            }
        };
        if count > 0 {
            metrics::counter!("clawq_messages_expired_total", "queue" => queue.clone())
                .increment(count);
            tracing::warn!(queue, count, retention = ?retention,
                "deleted messages older than the queue's retention");
        }
        deleted.insert(queue.clone(), count);
    }
    deleted
}

/// Sweeps at once, then every `interval`, until `shutdown` is cancelled.
pub async fn run(
    backend: Arc<dyn QueueBackend>,
    retentions: BTreeMap<String, Duration>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        sweep(backend.as_ref(), &retentions).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::sqlite::SqliteQueue;
    use crate::queue::{ContentType, NewMessage};

    const HOUR: Duration = Duration::from_secs(3600);

    async fn publish(backend: &dyn QueueBackend, queue: &str, n: usize) {
        let message = NewMessage {
            content_type: ContentType::Text,
            body: b"x".to_vec(),
            delay_seconds: 0,
        };
        backend.publish(queue, vec![message; n]).await.unwrap();
    }

    async fn held(backend: &dyn QueueBackend, queue: &str) -> u64 {
        backend.counts(queue).await.unwrap().held()
    }

    fn open() -> (tempfile::TempDir, Arc<dyn QueueBackend>) {
        let dir = tempfile::tempdir().unwrap();
        let backend = SqliteQueue::open(&crate::store::test_db(dir.path())).unwrap();
        (dir, Arc::new(backend))
    }

    #[tokio::test]
    async fn a_sweep_deletes_only_what_outlived_its_queue_retention() {
        let (_dir, backend) = open();
        publish(backend.as_ref(), "short", 3).await;
        publish(backend.as_ref(), "long", 2).await;
        let published = now_ms();
        while now_ms() <= published {
            tokio::task::yield_now().await;
        }
        let retentions = BTreeMap::from([
            ("short".to_owned(), Duration::ZERO),
            ("long".to_owned(), HOUR),
        ]);
        let deleted = sweep(backend.as_ref(), &retentions).await;
        assert_eq!(
            deleted,
            BTreeMap::from([("long".to_owned(), 0), ("short".to_owned(), 3)])
        );
        assert_eq!(held(backend.as_ref(), "short").await, 0);
        assert_eq!(held(backend.as_ref(), "long").await, 2);
    }

    #[tokio::test]
    async fn the_sweep_runs_periodically_until_shutdown() {
        let (_dir, backend) = open();
        let retentions = BTreeMap::from([
            ("short".to_owned(), Duration::ZERO),
            ("long".to_owned(), HOUR),
        ]);
        let shutdown = CancellationToken::new();
        let sweeper = tokio::spawn(run(
            backend.clone(),
            retentions,
            Duration::from_millis(10),
            shutdown.clone(),
        ));
        publish(backend.as_ref(), "long", 1).await;
        for _ in 0..2 {
            publish(backend.as_ref(), "short", 2).await;
            tokio::time::timeout(Duration::from_secs(10), async {
                while held(backend.as_ref(), "short").await > 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("a later sweep deletes them");
        }
        assert_eq!(held(backend.as_ref(), "long").await, 1);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), sweeper)
            .await
            .expect("the sweep stops on shutdown")
            .unwrap();
    }
}
