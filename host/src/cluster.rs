//! The NATS JetStream cluster that several clawq hosts share (`[backend] kind = "nats"`):
//! how a host connects to it, how it tells whether it still reaches it (`/healthz`), and
//! the names of what clawq keeps there.
//!
//! The connection is `async-nats`'s: it reconnects by itself, forever, after an outage;
//! requests made meanwhile fail (and are retried by whoever made them), so a host rides
//! out a restart of the NATS server without losing anything it acknowledged.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_nats::connection::State;
use async_nats::jetstream;

/// How a host reaches the cluster: `[backend]` in the config, `--nats URL` on the
/// command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The NATS server(s) to connect to: `nats://host:port`, several separated by commas.
    pub url: String,
    /// Copies JetStream keeps of each stream, bucket and object store clawq creates
    /// (1 for a single server, 3 for a production cluster).
    pub replicas: usize,
}

/// The default NATS URL: a server on this machine.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// How long a host tries to reach the cluster at start before it gives up with an error,
/// unless [`CONNECT_TIMEOUT_VAR`] says otherwise.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The environment variable that sets how long a host tries to reach the cluster at
/// start, in seconds (fractions allowed), instead of [`CONNECT_TIMEOUT`].
pub const CONNECT_TIMEOUT_VAR: &str = "CLAWQ_NATS_CONNECT_TIMEOUT";

/// How long to try to reach the cluster at start: `given` seconds (the value of
/// [`CONNECT_TIMEOUT_VAR`]), else [`CONNECT_TIMEOUT`].
fn connect_timeout(given: Option<&str>) -> Result<Duration> {
    let Some(text) = given else {
        return Ok(CONNECT_TIMEOUT);
    };
    text.trim()
        .parse::<f64>()
        .ok()
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .with_context(|| {
            format!("{CONNECT_TIMEOUT_VAR}={text:?} is not a number of seconds, e.g. `10` or `0.5`")
        })
}

/// How long one JetStream request waits for its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to the cluster, shared by every part of the host that keeps state there.
#[derive(Clone)]
pub struct Cluster {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    replicas: usize,
}

impl Cluster {
    /// Connects to the cluster named by `config`, waiting [`CONNECT_TIMEOUT`] (or
    /// [`CONNECT_TIMEOUT_VAR`]) at most for the first connection, and checks that
    /// JetStream is enabled there.
    pub async fn connect(config: &ClusterConfig) -> Result<Cluster> {
        let timeout = connect_timeout(std::env::var(CONNECT_TIMEOUT_VAR).ok().as_deref())?;
        let servers: Vec<async_nats::ServerAddr> = config
            .url
            .split(',')
            .map(|url| {
                url.trim()
                    .parse()
                    .with_context(|| format!("the NATS URL {url:?} is not valid"))
            })
            .collect::<Result<_>>()?;
        // Retried until the timeout: a host started with its NATS server (a test, a
        // compose file) may come up first.
        let deadline = tokio::time::Instant::now() + timeout;
        let client = loop {
            match options().connect(servers.clone()).await {
                Ok(client) => break client,
                Err(err) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %err, "NATS not reachable yet");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => bail!(
                    "cannot reach NATS at {} (tried for {timeout:?}): {err}; is \
                     `nats-server -js` running there?",
                    config.url
                ),
            }
        };
        let jetstream = jetstream::new(client.clone());
        jetstream.query_account().await.with_context(|| {
            format!(
                "NATS at {} answers, but not JetStream: start the server with `-js`",
                config.url
            )
        })?;
        Ok(Cluster {
            client,
            jetstream,
            replicas: config.replicas,
        })
    }

    /// The core NATS client (plain subjects: notifications between hosts).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context (streams, consumers, key-value buckets, object stores).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// Copies to keep of each stream, bucket and object store clawq creates.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Whether the host is connected to NATS right now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }
}

/// How the host connects: named, reconnecting forever after the first connection, with
/// the outage and the reconnection logged.
fn options() -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new()
        .name("clawq")
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(REQUEST_TIMEOUT))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("lost the connection to NATS: reconnecting")
                }
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                other => tracing::warn!(event = %other, "NATS"),
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connect_timeout_is_the_default_or_the_seconds_given() {
        assert_eq!(connect_timeout(None).unwrap(), CONNECT_TIMEOUT);
        assert_eq!(
            connect_timeout(Some(" 0.5")).unwrap(),
            Duration::from_millis(500)
        );
        for wrong in ["soon", "-1", ""] {
            let err = connect_timeout(Some(wrong)).unwrap_err().to_string();
            assert!(err.contains(CONNECT_TIMEOUT_VAR), "{err}");
        }
    }
}
