//! Lanes: where one consumer's copies of a queue's messages are kept.
//!
//! A queue's messages are stored once per consumer that subscribes to them, in that
//! consumer's lane ([`super::routes`]). A lane is written (in storage, logs and the API)
//! as the queue's own name for the consumer named like the queue (the only consumer of a
//! queue, usually, and the lane of a queue no consumer reads), and as
//! `<queue>#<consumer>` for the others.

use std::fmt;
use std::str::FromStr;

/// Separates a queue name from a consumer name in a written lane (queue names never
/// contain it).
pub const LANE_SEPARATOR: char = '#';

/// One consumer's lane of a queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lane {
    /// The queue.
    pub queue: String,
    /// The consumer whose copies the lane keeps.
    pub consumer: String,
}

impl Lane {
    /// The lane of `consumer` in `queue`.
    pub fn new(queue: &str, consumer: &str) -> Lane {
        Lane {
            queue: queue.to_owned(),
            consumer: consumer.to_owned(),
        }
    }

    /// The queue's own lane: its default consumer's (named like the queue), also where a
    /// queue that no consumer reads keeps its messages.
    pub fn of(queue: &str) -> Lane {
        Lane::new(queue, queue)
    }

    /// Whether this is the queue's own lane ([`Lane::of`]).
    pub fn is_default(&self) -> bool {
        self.queue == self.consumer
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_default() {
            f.write_str(&self.queue)
        } else {
            write!(f, "{}{LANE_SEPARATOR}{}", self.queue, self.consumer)
        }
    }
}

/// A written lane that is not one: an empty queue or consumer name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a lane (`<queue>` or `<queue>#<consumer>`)")]
pub struct NotALane(pub String);

impl FromStr for Lane {
    type Err = NotALane;

    /// Reads a lane written by its [`Display`](fmt::Display).
    fn from_str(written: &str) -> Result<Lane, NotALane> {
        let (queue, consumer) = written
            .split_once(LANE_SEPARATOR)
            .unwrap_or((written, written));
        if queue.is_empty() || consumer.is_empty() || consumer.contains(LANE_SEPARATOR) {
            return Err(NotALane(written.to_owned()));
        }
        Ok(Lane::new(queue, consumer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_are_written_and_read_back() {
        for (lane, written) in [
            (Lane::of("events"), "events"),
            (Lane::new("events", "events"), "events"),
            (Lane::new("events", "notifier"), "events#notifier"),
        ] {
            assert_eq!(lane.to_string(), written);
            assert_eq!(written.parse::<Lane>(), Ok(lane));
        }
        assert!(Lane::of("events").is_default());
        assert!(!Lane::new("events", "notifier").is_default());
        assert_eq!(
            "events#notifier".parse::<Lane>().unwrap(),
            Lane {
                queue: "events".into(),
                consumer: "notifier".into()
            }
        );
    }

    #[test]
    fn malformed_lanes_are_refused() {
        for bad in ["", "#notifier", "events#", "a#b#c"] {
            assert_eq!(bad.parse::<Lane>(), Err(NotALane(bad.to_owned())), "{bad}");
        }
    }
}
