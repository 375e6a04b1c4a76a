//! Hands the outbox's receipts (spec section 4) and deliveries (spec section 5) to the
//! agent's local webhook, retrying each failed one with backoff until it is 24 h old.
//!
//! Requests are pipelined: up to `--hook-concurrency` (default
//! [`DEFAULT_HOOK_CONCURRENCY`](super::DEFAULT_HOOK_CONCURRENCY)) are in flight at once,
//! started in storage order. The frames of one request (one `x-request-id`) are posted
//! one at a time in storage order, a later one only once the hook took the earlier one
//! (see [`Outbox::due`]); with a concurrency of 1 every frame is posted one at a time in
//! storage order. The outcomes of the requests that ended together are recorded in one
//! transaction, and a row is deleted only once the hook answered it 2xx (or it expired,
//! or can never be posted).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value, json};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::outbox::{Outbox, Row, Settle, describe};
use super::{Tuning, now_ms};
use crate::frame::{Deliver, Frame, FrameBody, ReceiptStatus};

/// The content type of a receipt posted to the hook.
pub(crate) const RECEIPT_CONTENT_TYPE: &str = "application/vnd.clawdentity.receipt+json";
/// The `type` of a receipt posted to the hook.
pub(crate) const RECEIPT_TYPE: &str = "clawdentity.receipt.v1";
/// The content type of a delivery posted to the hook.
pub(crate) const DELIVERY_CONTENT_TYPE: &str = "application/vnd.clawdentity.delivery+json";
/// The `type` of a delivery posted to the hook.
pub(crate) const DELIVERY_TYPE: &str = "clawdentity.delivery.v1";

/// The headers the connector sets itself; a custom header may not use these names.
const RESERVED: [&str; 6] = [
    "content-type",
    "x-clawdentity-agent-did",
    "x-clawdentity-to-agent-did",
    "x-clawdentity-group-id",
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
    /// It can never succeed (the frame cannot be expressed as a request).
    Undeliverable(String),
}

/// The agent's webhook.
pub(crate) struct Hook {
    client: reqwest::Client,
    url: reqwest::Url,
    custom: Vec<(HeaderName, HeaderValue)>,
}

impl Hook {
    /// Checks the url and the custom headers; an `https` hook is verified with `tls`.
    pub(crate) fn new(
        url: &str,
        custom: &[(String, String)],
        timeout: Duration,
        tls: &rustls::ClientConfig,
    ) -> Result<Hook> {
        let url = reqwest::Url::parse(url)
            .with_context(|| format!("the hook url `{url}` is not a valid url"))?;
        match url.scheme() {
            "http" | "https" => {}
            other => bail!("the hook url {url} has scheme `{other}`; expected http or https"),
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
            .use_preconfigured_tls(tls.clone())
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

    /// Posts one receipt or delivery.
    pub(crate) async fn post(&self, row: &Row) -> Outcome {
        let (mut headers, body) = match request(&row.frame) {
            Ok(request) => request,
            Err(why) => return Outcome::Undeliverable(why),
        };
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

/// The connector's own headers and the JSON body of the hook request for a stored
/// `receipt` or `deliver` frame; `Err` says why the frame cannot be posted.
pub(crate) fn request(frame: &Frame) -> Result<(HeaderMap, Value), String> {
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: &str| {
        HeaderValue::from_str(value)
            .map(|value| {
                headers.insert(name, value);
            })
            .map_err(|_| format!("its {name} `{value}` cannot be sent as a header"))
    };
    set("x-clawdentity-verified", "true")?;
    let body = match &frame.body {
        FrameBody::Receipt {
            original_frame_id,
            to_agent_did,
            status,
            reason,
        } => {
            set(CONTENT_TYPE.as_str(), RECEIPT_CONTENT_TYPE)?;
            set("x-clawdentity-to-agent-did", to_agent_did)?;
            set("x-request-id", original_frame_id)?;
            receipt_body(
                frame,
                original_frame_id,
                to_agent_did,
                *status,
                reason.as_deref(),
            )
        }
        FrameBody::Deliver(deliver) => {
            set(CONTENT_TYPE.as_str(), DELIVERY_CONTENT_TYPE)?;
            set("x-clawdentity-agent-did", &deliver.from_agent_did)?;
            set("x-clawdentity-to-agent-did", &deliver.to_agent_did)?;
            set("x-request-id", &frame.id)?;
            if let Some(group_id) = present(&deliver.group_id) {
                set("x-clawdentity-group-id", group_id)?;
            }
            delivery_body(frame, deliver)
        }
        _ => return Err(format!("a {} frame is not for the hook", frame.type_name())),
    };
    Ok((headers, body))
}

/// An optional field's value unless it is absent or blank (the reference connector
/// omits blank fields too).
fn present(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|value| !value.trim().is_empty())
}

/// The JSON body posted to the hook for a receipt (spec section 4).
fn receipt_body(
    frame: &Frame,
    request_id: &str,
    to_agent_did: &str,
    status: ReceiptStatus,
    reason: Option<&str>,
) -> Value {
    let reason = reason.filter(|r| !r.trim().is_empty());
    let mut body = json!({
        "type": RECEIPT_TYPE,
        "requestId": request_id,
        "toAgentDid": to_agent_did,
        "status": status.as_str(),
        "relayMetadata": {"timestamp": frame.ts},
    });
    let fields = body.as_object_mut().expect("an object");
    if let Some(reason) = reason {
        fields.insert("reason".into(), reason.into());
    }
    if status == ReceiptStatus::DeadLettered {
        let message = format!(
            "Your message {request_id} to {to_agent_did} could not be delivered: {}",
            reason.unwrap_or("no reason given")
        );
        fields.insert("message".into(), message.into());
    }
    body
}

/// The JSON body posted to the hook for a delivery (spec section 5): absent or blank
/// optional fields are omitted, never null; `relayMetadata.groupName` is the payload's
/// `groupName` when that is a non-blank string.
fn delivery_body(frame: &Frame, deliver: &Deliver) -> Value {
    let mut body = json!({
        "type": DELIVERY_TYPE,
        "requestId": frame.id,
        "fromAgentDid": deliver.from_agent_did,
        "toAgentDid": deliver.to_agent_did,
        "payload": deliver.payload,
    });
    let fields = body.as_object_mut().expect("an object");
    for (name, value) in [
        ("conversationId", &deliver.conversation_id),
        ("groupId", &deliver.group_id),
    ] {
        if let Some(value) = present(value) {
            fields.insert(name.into(), value.into());
        }
    }
    let mut metadata = Map::new();
    metadata.insert("timestamp".into(), frame.ts.clone().into());
    let group_name = deliver
        .payload
        .get("groupName")
        .and_then(Value::as_str)
        .map(str::to_owned);
    for (name, value) in [
        ("deliverySource", &deliver.delivery_source),
        ("contentType", &deliver.content_type),
        ("replyTo", &deliver.reply_to),
        ("groupName", &group_name),
    ] {
        if let Some(value) = present(value) {
            metadata.insert(name.into(), value.into());
        }
    }
    fields.insert("relayMetadata".into(), metadata.into());
    body
}

/// The wait after the `attempts`-th failed delivery: base, doubling, capped.
pub(crate) fn retry_delay(attempts: u32, base: Duration, max: Duration) -> Duration {
    let doublings = attempts.saturating_sub(1).min(31);
    base.saturating_mul(1 << doublings).min(max)
}

/// Due rows read beyond the free places and kept ready for the next ones, so that under
/// load the outbox is read once every few dozen posts rather than after each.
const LOOKAHEAD: usize = 64;

/// A row whose hook request ended (or that was never posted: expired), waiting to be
/// recorded in the outbox.
struct Ended {
    row: Row,
    fate: Fate,
}

/// What became of a row's turn.
enum Fate {
    /// The hook request ended so.
    Posted(Outcome),
    /// It is older than the maximum age: dropped without a request.
    Expired,
}

/// The delivery task: drains `outbox` into `hook` until `stop` is cancelled, with at most
/// `concurrency` requests in flight. `wake` is notified whenever new rows are stored.
/// The outcomes are recorded in the background, one transaction at a time for all the
/// requests that ended meanwhile, while the next requests go out. Requests under way
/// when `stop` is cancelled get `tuning.shutdown_grace` to finish; the rows of those that
/// do not are posted again on the next start.
pub(crate) async fn deliver(
    outbox: Outbox,
    hook: Hook,
    concurrency: usize,
    wake: Arc<Notify>,
    tuning: Tuning,
    stop: CancellationToken,
) {
    let concurrency = concurrency.max(1);
    let max_age_ms = i64::try_from(tuning.max_age.as_millis()).unwrap_or(i64::MAX);
    match outbox.pending().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            "{n} receipts and deliveries wait in the outbox for the hook {}",
            hook.url()
        ),
        Err(error) => tracing::error!("cannot read the outbox: {error:#}"),
    }
    let recorder = Recorder {
        outbox: &outbox,
        url: hook.url(),
        tuning: &tuning,
        dropped: AtomicU64::new(0),
    };
    let recorder = &recorder;
    let hook = &hook;
    let post = |row: Row| async move {
        let outcome = hook.post(&row).await;
        Ended {
            row,
            fate: Fate::Posted(outcome),
        }
    };
    // Records `ended`; whether it could, and the rows it was about.
    let record = |ended: Vec<Ended>| async move {
        let seqs: Vec<i64> = ended.iter().map(|ended| ended.row.seq).collect();
        (recorder.settle(ended).await, seqs)
    };
    // The rows read as due and not posted yet, in storage order; they stay due until
    // posted (only this task posts, retries or deletes a row, and a row stored later
    // comes after them).
    let mut ready: VecDeque<Row> = VecDeque::new();
    // The rows ready, being posted or waiting to be recorded: not to be read as due
    // again.
    let mut taken: Vec<i64> = Vec::new();
    let mut posts = FuturesUnordered::new();
    let mut ended: Vec<Ended> = Vec::new();
    // The one recording under way, if any.
    let mut recording = FuturesUnordered::new();
    // After a failure to read or write the outbox, nothing is posted before this time.
    let mut paused_until: Option<Instant> = None;
    loop {
        if recording.is_empty() && !ended.is_empty() {
            recording.push(record(std::mem::take(&mut ended)));
        }
        if stop.is_cancelled() {
            break;
        }
        if paused_until.is_some_and(|at| at <= Instant::now()) {
            paused_until = None;
        }
        let mut later_ms = None;
        let room = concurrency.saturating_sub(posts.len());
        if room > 0 && paused_until.is_none() {
            let now = now_ms();
            if ready.len() < room {
                match outbox.due(now, &taken, room + LOOKAHEAD).await {
                    Ok(due) => {
                        later_ms = due.later_ms;
                        for row in due.rows {
                            taken.push(row.seq);
                            ready.push_back(row);
                        }
                    }
                    Err(error) => {
                        tracing::error!("cannot read the outbox: {error:#}; trying again in 1 s");
                        paused_until = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            while posts.len() < concurrency {
                let Some(row) = ready.pop_front() else { break };
                if now.saturating_sub(row.stored_ms) >= max_age_ms {
                    ended.push(Ended {
                        row,
                        fate: Fate::Expired,
                    });
                } else {
                    posts.push(post(row));
                }
            }
            if !ended.is_empty() && recording.is_empty() {
                continue;
            }
        }
        let due_in = later_ms.map(|at| {
            Duration::from_millis(u64::try_from(at.saturating_sub(now_ms())).unwrap_or(0))
        });
        let look_again = match (due_in.map(|wait| Instant::now() + wait), paused_until) {
            (Some(due), Some(paused)) => Some(due.max(paused)),
            (due, paused) => due.or(paused),
        };
        tokio::select! {
            Some(done) = posts.next(), if !posts.is_empty() => {
                ended.push(done);
                // Every other request that ended meanwhile is recorded with it.
                while let Some(Some(done)) = posts.next().now_or_never() {
                    ended.push(done);
                }
            }
            Some((recorded, seqs)) = recording.next(), if !recording.is_empty() => {
                taken.retain(|seq| !seqs.contains(seq));
                if !recorded {
                    // The rows stay in the outbox and are tried again, after a pause.
                    paused_until = Some(Instant::now() + Duration::from_secs(1));
                }
            }
            _ = wake.notified() => {}
            _ = tokio::time::sleep_until(look_again.unwrap_or_else(Instant::now)), if look_again.is_some() => {}
            _ = stop.cancelled() => {}
        }
    }
    // Shutting down: the requests under way get the grace period.
    let grace = tokio::time::sleep(tuning.shutdown_grace);
    tokio::pin!(grace);
    while !posts.is_empty() {
        tokio::select! {
            Some(done) = posts.next() => ended.push(done),
            _ = &mut grace => {
                tracing::warn!(
                    "shutting down while posting {} receipts and deliveries; they will be posted again",
                    posts.len()
                );
                break;
            }
        }
    }
    while recording.next().await.is_some() {}
    if !ended.is_empty() {
        recorder.settle(ended).await;
    }
}

/// Records in the outbox what became of the rows whose turn ended.
struct Recorder<'a> {
    outbox: &'a Outbox,
    /// The hook's url, for log lines.
    url: &'a reqwest::Url,
    tuning: &'a Tuning,
    /// Rows dropped (expired or undeliverable) since the connector started.
    dropped: AtomicU64,
}

impl Recorder<'_> {
    /// Records `ended` in the outbox in one transaction, logging each row's fate once it
    /// is recorded; false if the outbox could not be written (the rows are then tried
    /// again).
    async fn settle(&self, ended: Vec<Ended>) -> bool {
        let now = now_ms();
        let settled: Vec<(i64, Settle)> = ended
            .iter()
            .map(|ended| {
                let settle = match &ended.fate {
                    Fate::Posted(Outcome::Retry(_)) => {
                        let attempts = ended.row.attempts.saturating_add(1);
                        let delay = self.retry_delay(attempts);
                        Settle::Retry {
                            attempts,
                            next_attempt_ms: now.saturating_add(
                                i64::try_from(delay.as_millis()).unwrap_or(i64::MAX),
                            ),
                        }
                    }
                    _ => Settle::Delete,
                };
                (ended.row.seq, settle)
            })
            .collect();
        if let Err(error) = self.outbox.settle(settled).await {
            tracing::error!(
                "cannot record the outcome of {} hook requests in the outbox: {error:#}; they are tried again",
                ended.len()
            );
            return false;
        }
        // Logged once recorded: a row logged as posted is no longer in the outbox.
        let url = self.url;
        for Ended { row, fate } in &ended {
            match fate {
                Fate::Posted(Outcome::Delivered) => {
                    tracing::info!("posted {} to the hook", describe(&row.frame));
                }
                Fate::Posted(Outcome::Retry(why)) => {
                    let attempts = row.attempts.saturating_add(1);
                    tracing::warn!(
                        "the hook {url} did not take {} (attempt {attempts}): {why}; retrying in {}",
                        describe(&row.frame),
                        humantime::format_duration(self.retry_delay(attempts)),
                    );
                }
                Fate::Posted(Outcome::Undeliverable(why)) => {
                    let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::error!(
                        "dropping {}: {why} ({dropped} dropped since the connector started)",
                        describe(&row.frame),
                    );
                }
                Fate::Expired => {
                    let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::error!(
                        "dropping {}: the hook {url} did not take it within {} ({} attempts; {dropped} dropped \
                         since the connector started)",
                        describe(&row.frame),
                        humantime::format_duration(self.tuning.max_age),
                        row.attempts,
                    );
                }
            }
        }
        true
    }

    /// The wait after the `attempts`-th failed delivery.
    fn retry_delay(&self, attempts: u32) -> Duration {
        retry_delay(attempts, self.tuning.retry_base, self.tuning.retry_max)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const FROM: &str = "did:cdi:a.b:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";
    const TO: &str = "did:cdi:a.b:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
    const ID: &str = "01HZX4M3Q8V2J7K9T6R5W1N0PD";
    const TS: &str = "2026-11-24T10:00:00.000Z";

    fn frame(body: FrameBody) -> Frame {
        Frame {
            id: ID.into(),
            ts: TS.into(),
            body,
        }
    }

    fn receipt(status: ReceiptStatus, reason: Option<&str>) -> Frame {
        frame(FrameBody::Receipt {
            original_frame_id: "req-1".into(),
            to_agent_did: TO.into(),
            status,
            reason: reason.map(Into::into),
        })
    }

    /// A delivery with no optional field.
    fn bare() -> Deliver {
        Deliver {
            from_agent_did: FROM.into(),
            to_agent_did: TO.into(),
            payload: json!({"system": {"type": "pair.accepted"}}),
            delivery_source: None,
            content_type: None,
            group_id: None,
            conversation_id: None,
            reply_to: None,
        }
    }

    fn delivery(deliver: Deliver) -> Frame {
        frame(FrameBody::Deliver(Box::new(deliver)))
    }

    /// Every header of the request, by name.
    fn headers(frame: &Frame) -> BTreeMap<String, String> {
        let (headers, _) = request(frame).unwrap();
        headers
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
            .collect()
    }

    fn body(frame: &Frame) -> Value {
        request(frame).unwrap().1
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn receipts_follow_the_spec() {
        let meta = json!({"timestamp": TS});
        assert_eq!(
            body(&receipt(ReceiptStatus::DeliveredToWebhook, Some(""))),
            json!({"type": RECEIPT_TYPE, "requestId": "req-1", "toAgentDid": TO,
                   "status": "delivered_to_webhook", "relayMetadata": meta})
        );
        assert_eq!(
            body(&receipt(ReceiptStatus::DeadLettered, None)),
            json!({"type": RECEIPT_TYPE, "requestId": "req-1", "toAgentDid": TO, "status": "dead_lettered",
                   "relayMetadata": meta,
                   "message": format!("Your message req-1 to {TO} could not be delivered: no reason given")})
        );
        assert_eq!(
            body(&receipt(ReceiptStatus::DeadLettered, Some("hook_gone"))),
            json!({"type": RECEIPT_TYPE, "requestId": "req-1", "toAgentDid": TO, "status": "dead_lettered",
                   "reason": "hook_gone", "relayMetadata": meta,
                   "message": format!("Your message req-1 to {TO} could not be delivered: hook_gone")})
        );
        assert_eq!(
            headers(&receipt(ReceiptStatus::DeadLettered, None)),
            map(&[
                ("content-type", RECEIPT_CONTENT_TYPE),
                ("x-clawdentity-to-agent-did", TO),
                ("x-clawdentity-verified", "true"),
                ("x-request-id", "req-1"),
            ])
        );
    }

    #[test]
    fn a_bare_delivery_has_only_the_required_fields() {
        let frame = delivery(bare());
        assert_eq!(
            headers(&frame),
            map(&[
                ("content-type", DELIVERY_CONTENT_TYPE),
                ("x-clawdentity-agent-did", FROM),
                ("x-clawdentity-to-agent-did", TO),
                ("x-clawdentity-verified", "true"),
                ("x-request-id", ID),
            ])
        );
        assert_eq!(
            body(&frame),
            json!({"type": DELIVERY_TYPE, "requestId": ID, "fromAgentDid": FROM, "toAgentDid": TO,
                   "payload": {"system": {"type": "pair.accepted"}},
                   "relayMetadata": {"timestamp": TS}})
        );
        let null = delivery(Deliver {
            payload: Value::Null,
            ..bare()
        });
        assert_eq!(body(&null)["payload"], Value::Null);
        assert!(body(&null).as_object().unwrap().contains_key("payload"));
    }

    #[test]
    fn a_full_delivery_has_every_field() {
        let frame = delivery(Deliver {
            payload: json!({"groupName": "builders", "text": "hi"}),
            delivery_source: Some("proxy.events.queue.group_member_joined".into()),
            content_type: Some("application/json".into()),
            group_id: Some("grp_01HZX4M3Q8V2J7K9T6R5W1N0PB".into()),
            conversation_id: Some("conv-1".into()),
            reply_to: Some("req-0".into()),
            ..bare()
        });
        assert_eq!(
            headers(&frame),
            map(&[
                ("content-type", DELIVERY_CONTENT_TYPE),
                ("x-clawdentity-agent-did", FROM),
                ("x-clawdentity-to-agent-did", TO),
                ("x-clawdentity-group-id", "grp_01HZX4M3Q8V2J7K9T6R5W1N0PB"),
                ("x-clawdentity-verified", "true"),
                ("x-request-id", ID),
            ])
        );
        assert_eq!(
            body(&frame),
            json!({"type": DELIVERY_TYPE, "requestId": ID, "fromAgentDid": FROM, "toAgentDid": TO,
                   "payload": {"groupName": "builders", "text": "hi"},
                   "conversationId": "conv-1", "groupId": "grp_01HZX4M3Q8V2J7K9T6R5W1N0PB",
                   "relayMetadata": {"timestamp": TS,
                                     "deliverySource": "proxy.events.queue.group_member_joined",
                                     "contentType": "application/json", "replyTo": "req-0",
                                     "groupName": "builders"}})
        );
    }

    #[test]
    fn each_optional_field_lands_alone_in_its_place() {
        type Set = fn(&mut Deliver);
        let cases: [(Set, Option<&str>, Option<&str>); 6] = [
            (
                |d| d.conversation_id = Some("v".into()),
                Some("conversationId"),
                None,
            ),
            (|d| d.group_id = Some("v".into()), Some("groupId"), None),
            (
                |d| d.delivery_source = Some("v".into()),
                None,
                Some("deliverySource"),
            ),
            (
                |d| d.content_type = Some("v".into()),
                None,
                Some("contentType"),
            ),
            (|d| d.reply_to = Some("v".into()), None, Some("replyTo")),
            (
                |d| d.payload = json!({"groupName": "v"}),
                None,
                Some("groupName"),
            ),
        ];
        let keys = |value: &Value| -> Vec<String> {
            let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            keys
        };
        let base = [
            "fromAgentDid",
            "payload",
            "relayMetadata",
            "requestId",
            "toAgentDid",
            "type",
        ];
        for (set, top, meta) in cases {
            let mut deliver = bare();
            set(&mut deliver);
            let body = body(&delivery(deliver));
            let mut want: Vec<String> = base.iter().map(|k| (*k).to_owned()).collect();
            want.extend(top.map(str::to_owned));
            want.sort();
            assert_eq!(keys(&body), want, "{body}");
            let mut want_meta = vec!["timestamp".to_owned()];
            want_meta.extend(meta.map(str::to_owned));
            want_meta.sort();
            assert_eq!(keys(&body["relayMetadata"]), want_meta, "{body}");
            if let Some(top) = top {
                assert_eq!(body[top], "v");
            }
            if let Some(meta) = meta {
                assert_eq!(body["relayMetadata"][meta], "v");
            }
        }
    }

    #[test]
    fn blank_optional_fields_and_a_group_name_that_is_not_text_are_omitted() {
        let blank = Some(" ".to_owned());
        let frame = delivery(Deliver {
            payload: json!({"groupName": 7}),
            delivery_source: blank.clone(),
            content_type: Some(String::new()),
            group_id: blank.clone(),
            conversation_id: blank.clone(),
            reply_to: blank,
            ..bare()
        });
        assert!(!headers(&frame).contains_key("x-clawdentity-group-id"));
        assert_eq!(
            body(&frame),
            json!({"type": DELIVERY_TYPE, "requestId": ID, "fromAgentDid": FROM, "toAgentDid": TO,
                   "payload": {"groupName": 7}, "relayMetadata": {"timestamp": TS}})
        );
    }

    #[test]
    fn a_frame_that_cannot_be_a_request_is_undeliverable() {
        let bad = delivery(Deliver {
            from_agent_did: "line\nbreak".into(),
            ..bare()
        });
        let why = request(&bad).unwrap_err();
        assert!(why.contains("x-clawdentity-agent-did"), "{why}");
        // Only the session's kinds reach the hook (as verified): no other frame does.
        let ack_id = || "01HZX4M3Q8V2J7K9T6R5W1N0PB".to_owned();
        for other in [
            FrameBody::Heartbeat,
            FrameBody::HeartbeatAck { ack_id: ack_id() },
            FrameBody::ReceiptAck { ack_id: ack_id() },
            FrameBody::DeliverAck {
                ack_id: ack_id(),
                accepted: true,
                reason: None,
            },
        ] {
            let why = request(&frame(other)).unwrap_err();
            assert!(why.ends_with("frame is not for the hook"), "{why}");
        }
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
        let tls = crate::tls::client_config(None).unwrap();
        let tls = &*tls;
        let ok = [("x-hook-token".to_owned(), "secret".to_owned())];
        assert!(Hook::new("http://127.0.0.1:18789/hooks/message", &ok, timeout, tls).is_ok());
        assert!(Hook::new("not a url", &[], timeout, tls).is_err());
        assert!(Hook::new("ftp://127.0.0.1/x", &[], timeout, tls).is_err());
        for bad in [
            ("bad name", "v"),
            ("x-ok", "line\nbreak"),
            ("Content-Type", "text/plain"),
            ("X-Clawdentity-Agent-Did", "did"),
            ("x-clawdentity-group-id", "grp"),
        ] {
            let headers = [(bad.0.to_owned(), bad.1.to_owned())];
            assert!(
                Hook::new("http://127.0.0.1/x", &headers, timeout, tls).is_err(),
                "{bad:?}"
            );
        }
    }
}
