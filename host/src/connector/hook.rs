//! Hands the outbox's receipts to the agent's local webhook (spec section 4), and the
//! handlers' system notifications beside them, in storage order, retrying each failed one
//! with backoff until it is 24 h old.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::outbox::{Kind, Next, Outbox, Row};
use super::{Tuning, now_ms};
use crate::frame::ReceiptStatus;

/// The content type of a receipt posted to the hook.
pub(crate) const RECEIPT_CONTENT_TYPE: &str = "application/vnd.clawdentity.receipt+json";
/// The `type` of a receipt posted to the hook.
pub(crate) const RECEIPT_TYPE: &str = "clawdentity.receipt.v1";
/// The content type of a notification posted to the hook.
pub(crate) const NOTIFICATION_CONTENT_TYPE: &str = "application/vnd.clawdentity.notification+json";
/// The `type` of a notification posted to the hook.
pub(crate) const NOTIFICATION_TYPE: &str = "clawdentity.notification.v1";

/// The headers the connector sets itself; a custom header may not use these names.
const RESERVED: [&str; 4] = [
    "content-type",
    "x-clawdentity-to-agent-did",
    "x-clawdentity-verified",
    "x-request-id",
];

/// What became of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The hook answered 2xx.
    Delivered,
    /// It failed; try again later.
    Retry(String),
    /// It can never succeed (the receipt cannot be expressed as a request).
    Undeliverable(String),
}

/// The agent's webhook.
pub(crate) struct Hook {
    client: reqwest::Client,
    url: reqwest::Url,
    custom: Vec<(HeaderName, HeaderValue)>,
}

impl Hook {
    /// Checks the url and the custom headers.
    pub(crate) fn new(url: &str, custom: &[(String, String)], timeout: Duration) -> Result<Hook> {
        let url = reqwest::Url::parse(url)
            .with_context(|| format!("the hook url `{url}` is not a valid url"))?;
        match url.scheme() {
            "http" => {}
            "https" => bail!(
                "the hook url {url} uses https, which this build does not support: use an http url"
            ),
            other => bail!("the hook url {url} has scheme `{other}`; expected http"),
        }
        let mut headers = Vec::with_capacity(custom.len());
        for (name, value) in custom {
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .with_context(|| format!("`{name}` is not a valid header name"))?;
            if RESERVED.contains(&name.as_str()) {
                bail!(
                    "the hook header `{name}` is set by the connector itself and cannot be configured"
                );
            }
            let value = HeaderValue::from_str(value.trim()).with_context(|| {
                format!("the value of hook header `{name}` is not a valid header value")
            })?;
            headers.push((name, value));
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            // The hook is the agent's local endpoint: never route it through a proxy
            // configured in the environment.
            .no_proxy()
            .build()
            .context("building the hook's http client")?;
        Ok(Hook {
            client,
            url,
            custom: headers,
        })
    }

    /// The hook's url.
    pub(crate) fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// Posts one receipt or notification.
    pub(crate) async fn post(&self, row: &Row) -> Outcome {
        let (Ok(to), Ok(request_id)) = (
            HeaderValue::from_str(&row.to_agent_did),
            HeaderValue::from_str(&row.original_frame_id),
        ) else {
            return Outcome::Undeliverable(
                "its toAgentDid or originalFrameId cannot be sent as a header".into(),
            );
        };
        let mut headers = HeaderMap::new();
        let (content_type, body) = match row.kind {
            Kind::Receipt(_) => {
                headers.insert("x-clawdentity-to-agent-did", to);
                (RECEIPT_CONTENT_TYPE, receipt_body(row))
            }
            Kind::Notification => (NOTIFICATION_CONTENT_TYPE, notification_body(row)),
        };
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert("x-clawdentity-verified", HeaderValue::from_static("true"));
        headers.insert("x-request-id", request_id);
        for (name, value) in &self.custom {
            headers.append(name.clone(), value.clone());
        }
        let request = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .body(body.to_string());
        match request.send().await {
            Ok(response) if response.status().is_success() => Outcome::Delivered,
            Ok(response) => Outcome::Retry(format!("the hook answered HTTP {}", response.status())),
            Err(error) => Outcome::Retry(format!("{:#}", anyhow::Error::new(error))),
        }
    }
}

/// The JSON body posted to the hook for a notification: its text as `message`, like the
/// system notification of a dead-lettered receipt.
pub(crate) fn notification_body(row: &Row) -> Value {
    json!({
        "type": NOTIFICATION_TYPE,
        "requestId": row.original_frame_id,
        "message": row.reason.as_deref().unwrap_or_default(),
        "relayMetadata": {"timestamp": row.frame_ts},
    })
}

/// The JSON body posted to the hook for a receipt (spec section 4).
pub(crate) fn receipt_body(row: &Row) -> Value {
    let reason = row.reason.as_deref().filter(|r| !r.trim().is_empty());
    let mut body = json!({
        "type": RECEIPT_TYPE,
        "requestId": row.original_frame_id,
        "toAgentDid": row.to_agent_did,
        "status": row.kind.as_str(),
        "relayMetadata": {"timestamp": row.frame_ts},
    });
    let fields = body.as_object_mut().expect("an object");
    if let Some(reason) = reason {
        fields.insert("reason".into(), reason.into());
    }
    if row.kind == Kind::Receipt(ReceiptStatus::DeadLettered) {
        let message = format!(
            "Your message {} to {} could not be delivered: {}",
            row.original_frame_id,
            row.to_agent_did,
            reason.unwrap_or("no reason given")
        );
        fields.insert("message".into(), message.into());
    }
    body
}

/// The wait after the `attempts`-th failed delivery: base, doubling, capped.
pub(crate) fn retry_delay(attempts: u32, base: Duration, max: Duration) -> Duration {
    let doublings = attempts.saturating_sub(1).min(31);
    base.saturating_mul(1 << doublings).min(max)
}

/// The delivery task: drains `outbox` into `hook` until `stop` is cancelled. `wake` is
/// notified whenever a new row is stored. A delivery under way when `stop` is cancelled
/// gets `tuning.shutdown_grace` to finish; if it does not, its row is delivered again on
/// the next start.
pub(crate) async fn deliver(
    outbox: Outbox,
    hook: Hook,
    wake: Arc<Notify>,
    tuning: Tuning,
    stop: CancellationToken,
) {
    let max_age_ms = i64::try_from(tuning.max_age.as_millis()).unwrap_or(i64::MAX);
    let mut dropped: u64 = 0;
    match outbox.pending().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            "{n} receipts wait in the outbox for the hook {}",
            hook.url()
        ),
        Err(error) => tracing::error!("cannot read the outbox: {error:#}"),
    }
    loop {
        if stop.is_cancelled() {
            return;
        }
        let now = now_ms();
        let next = match outbox.next(now).await {
            Ok(next) => next,
            Err(error) => {
                tracing::error!("cannot read the outbox: {error:#}; trying again in 1 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        let row = match next {
            Next::Due(row) => row,
            Next::WaitUntil(at) => {
                let wait = Duration::from_millis(u64::try_from(at - now).unwrap_or(0));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = wake.notified() => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            }
            Next::Empty => {
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            }
        };
        let age_ms = now.saturating_sub(row.stored_ms);
        if age_ms >= max_age_ms {
            dropped += 1;
            tracing::error!(
                "dropping receipt {} (request {} to {}, {}): the hook {} did not take it within {} \
                 ({} attempts; {dropped} receipts dropped since the connector started)",
                row.frame_id,
                row.original_frame_id,
                row.to_agent_did,
                row.kind.as_str(),
                hook.url(),
                humantime::format_duration(tuning.max_age),
                row.attempts,
            );
            remove(&outbox, &row).await;
            continue;
        }
        let post = hook.post(&row);
        tokio::pin!(post);
        let grace = async {
            stop.cancelled().await;
            tokio::time::sleep(tuning.shutdown_grace).await;
        };
        let outcome = tokio::select! {
            outcome = &mut post => outcome,
            _ = grace => {
                tracing::warn!("shutting down during the delivery of receipt {}; it will be delivered again", row.frame_id);
                return;
            }
        };
        match outcome {
            Outcome::Delivered => {
                tracing::info!(
                    "delivered receipt {} (request {}, {}) to the hook",
                    row.frame_id,
                    row.original_frame_id,
                    row.kind.as_str()
                );
                remove(&outbox, &row).await;
            }
            Outcome::Retry(why) => {
                let attempts = row.attempts.saturating_add(1);
                let delay = retry_delay(attempts, tuning.retry_base, tuning.retry_max);
                let next_ms =
                    now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
                tracing::warn!(
                    "the hook {} did not take receipt {} (attempt {attempts}): {why}; retrying in {}",
                    hook.url(),
                    row.frame_id,
                    humantime::format_duration(delay),
                );
                if let Err(error) = outbox.reschedule(row.seq, attempts, next_ms).await {
                    tracing::error!("cannot reschedule receipt {}: {error:#}", row.frame_id);
                }
            }
            Outcome::Undeliverable(why) => {
                dropped += 1;
                tracing::error!(
                    "dropping receipt {} (request {:?} to {:?}): {why} ({dropped} receipts dropped since the \
                     connector started)",
                    row.frame_id,
                    row.original_frame_id,
                    row.to_agent_did,
                );
                remove(&outbox, &row).await;
            }
        }
    }
}

/// Deletes a row, logging a failure (the row is then tried again).
async fn remove(outbox: &Outbox, row: &Row) {
    if let Err(error) = outbox.delete(row.seq).await {
        tracing::error!(
            "cannot delete receipt {} from the outbox: {error:#}",
            row.frame_id
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(status: ReceiptStatus, reason: Option<&str>) -> Row {
        Row {
            seq: 1,
            frame_id: "01HZX4M3Q8V2J7K9T6R5W1N0PB".into(),
            original_frame_id: "req-1".into(),
            to_agent_did: "did:cdi:a.b:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB".into(),
            kind: Kind::Receipt(status),
            reason: reason.map(Into::into),
            frame_ts: "2026-11-24T10:00:00.000Z".into(),
            stored_ms: 0,
            attempts: 0,
            next_attempt_ms: 0,
        }
    }

    #[test]
    fn bodies_follow_the_spec() {
        let did = "did:cdi:a.b:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
        let meta = json!({"timestamp": "2026-11-24T10:00:00.000Z"});
        assert_eq!(
            receipt_body(&row(ReceiptStatus::DeliveredToWebhook, Some(""))),
            json!({"type": RECEIPT_TYPE, "requestId": "req-1", "toAgentDid": did,
                   "status": "delivered_to_webhook", "relayMetadata": meta})
        );
        assert_eq!(
            receipt_body(&row(ReceiptStatus::DeadLettered, None)),
            json!({"type": RECEIPT_TYPE, "requestId": "req-1", "toAgentDid": did, "status": "dead_lettered",
                   "relayMetadata": meta,
                   "message": format!("Your message req-1 to {did} could not be delivered: no reason given")})
        );
        assert_eq!(
            receipt_body(&row(ReceiptStatus::DeadLettered, Some("hook_gone"))),
            json!({"type": RECEIPT_TYPE, "requestId": "req-1", "toAgentDid": did, "status": "dead_lettered",
                   "reason": "hook_gone", "relayMetadata": meta,
                   "message": format!("Your message req-1 to {did} could not be delivered: hook_gone")})
        );
        let notification = Row {
            kind: Kind::Notification,
            to_agent_did: String::new(),
            ..row(ReceiptStatus::DeadLettered, Some("Pairing complete."))
        };
        assert_eq!(
            notification_body(&notification),
            json!({"type": NOTIFICATION_TYPE, "requestId": "req-1",
                   "message": "Pairing complete.", "relayMetadata": meta})
        );
    }

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        let delays: Vec<u64> = (1..=9)
            .map(|n| retry_delay(n, Duration::from_secs(1), Duration::from_secs(60)).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(
            retry_delay(u32::MAX, Duration::from_secs(1), Duration::from_secs(60)).as_secs(),
            60
        );
    }

    #[test]
    fn bad_hooks_and_headers_are_refused() {
        let timeout = Duration::from_secs(1);
        let ok = [("x-hook-token".to_owned(), "secret".to_owned())];
        assert!(Hook::new("http://127.0.0.1:18789/hooks/message", &ok, timeout).is_ok());
        assert!(Hook::new("not a url", &[], timeout).is_err());
        assert!(Hook::new("ftp://127.0.0.1/x", &[], timeout).is_err());
        for bad in [
            ("bad name", "v"),
            ("x-ok", "line\nbreak"),
            ("Content-Type", "text/plain"),
        ] {
            let headers = [(bad.0.to_owned(), bad.1.to_owned())];
            assert!(
                Hook::new("http://127.0.0.1/x", &headers, timeout).is_err(),
                "{bad:?}"
            );
        }
    }
}
