//! The `relay-sessions` import: receipts and deliveries handed to an agent's session.

use wasmtime::component::HasData;

use super::BatchState;
use crate::bounds;
use crate::frame::ReceiptStatus;
use crate::relay::sessions::{Delivery, DeliveryIn, ReceiptIn, SessionError};
use crate::relay::store::SessionStore;
use crate::runtime::HostError;
use crate::runtime::bindings::clawdentity::queues::relay_sessions;
use crate::runtime::record::{CallLog, record_result, recorded};

/// What the `relay-sessions` import reaches of a batch: the agents' sessions, and the
/// batch's call log.
pub(in crate::runtime) struct RelaySessionsView<'a> {
    sessions: &'a SessionStore,
    calls: Option<&'a CallLog>,
}

/// The `relay-sessions` import's view of a batch's state, for the linker.
pub(in crate::runtime) struct HasRelaySessions;

impl HasData for HasRelaySessions {
    type Data<'a> = RelaySessionsView<'a>;
}

impl HasRelaySessions {
    /// The view of `state`.
    pub(in crate::runtime) fn view(state: &mut BatchState) -> RelaySessionsView<'_> {
        RelaySessionsView {
            sessions: &state.caps.sessions,
            calls: state.calls.as_ref(),
        }
    }
}

impl relay_sessions::Host for RelaySessionsView<'_> {
    async fn deliver_receipt(
        &mut self,
        receipt: relay_sessions::Receipt,
    ) -> Result<relay_sessions::Delivery, HostError> {
        let args = || show_receipt(&receipt);
        let call = "relay-sessions.deliver-receipt";
        recorded(self.calls, call, args, show_delivery, async {
            let receipt = receipt_in(&receipt)?;
            session_result(self.sessions.deliver_receipt(receipt).await)
        })
        .await
    }

    async fn deliver_receipts(
        &mut self,
        receipts: Vec<relay_sessions::Receipt>,
    ) -> Vec<Result<relay_sessions::Delivery, HostError>> {
        let call = "relay-sessions.deliver-receipts";
        let answers = if receipts.len() > MAX_RECEIPTS_PER_CALL {
            let message = format!(
                "{call} takes at most {MAX_RECEIPTS_PER_CALL} receipts, not {}",
                receipts.len()
            );
            let refused = HostError {
                transient: false,
                message,
            };
            vec![Err(refused); receipts.len()]
        } else {
            let mut valid = Vec::with_capacity(receipts.len());
            let checked: Vec<Result<(), HostError>> = receipts
                .iter()
                .map(|r| receipt_in(r).map(|r| valid.push(r)))
                .collect();
            let mut recorded = self.sessions.deliver_receipts(valid).await.into_iter();
            checked
                .into_iter()
                .map(|c| c.and_then(|()| session_result(recorded.next().expect("one answer each"))))
                .collect()
        };
        for (receipt, answer) in receipts.iter().zip(&answers) {
            record_result(
                self.calls,
                call,
                || show_receipt(receipt),
                show_delivery,
                answer,
            );
        }
        answers
    }

    async fn deliver(
        &mut self,
        delivery: relay_sessions::AgentDelivery,
    ) -> Result<relay_sessions::Delivery, HostError> {
        let args = || show_agent_delivery(&delivery);
        let call = "relay-sessions.deliver";
        recorded(self.calls, call, args, show_delivery, async {
            let delivery = DeliveryIn {
                dedup_key: delivery.dedup_key.trim().to_owned(),
                from_agent_did: delivery.from_agent_did.trim().to_owned(),
                to_agent_did: delivery.to_agent_did.trim().to_owned(),
                payload: delivery.payload.trim().to_owned(),
                delivery_source: trimmed_option(delivery.delivery_source.as_deref()),
                content_type: trimmed_option(delivery.content_type.as_deref()),
                group_id: trimmed_option(delivery.group_id.as_deref()),
                conversation_id: trimmed_option(delivery.conversation_id.as_deref()),
                reply_to: trimmed_option(delivery.reply_to.as_deref()),
            };
            session_result(self.sessions.deliver(delivery).await)
        })
        .await
    }
}

/// Most receipts one `deliver-receipts` call takes (more than any batch holds).
pub const MAX_RECEIPTS_PER_CALL: usize = 1000;

/// `receipt` as a session takes it: its values trimmed and its fields' sizes checked.
fn receipt_in(receipt: &relay_sessions::Receipt) -> Result<ReceiptIn, HostError> {
    let receipt = ReceiptIn {
        request_id: receipt.request_id.trim().to_owned(),
        sender_agent_did: receipt.sender_agent_did.trim().to_owned(),
        recipient_agent_did: receipt.recipient_agent_did.trim().to_owned(),
        status: match receipt.status {
            relay_sessions::ReceiptStatus::DeliveredToWebhook => ReceiptStatus::DeliveredToWebhook,
            relay_sessions::ReceiptStatus::DeadLettered => ReceiptStatus::DeadLettered,
        },
        reason: trimmed_option(receipt.reason.as_deref()),
    };
    bounds::receipt_fields(&receipt.request_id, receipt.reason.as_deref())?;
    Ok(receipt)
}

/// `value` trimmed; `None` when it is blank.
fn trimmed_option(value: Option<&str>) -> Option<String> {
    value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// A session's answer as the guest sees it: a refusal is permanent, an unavailable
/// session transient.
fn session_result(
    result: Result<Delivery, SessionError>,
) -> Result<relay_sessions::Delivery, HostError> {
    match result {
        Ok(Delivery::Pushed(n)) => Ok(relay_sessions::Delivery::Pushed(n)),
        Ok(Delivery::Stored) => Ok(relay_sessions::Delivery::Stored),
        Ok(Delivery::Unchanged) => Ok(relay_sessions::Delivery::Unchanged),
        Ok(Delivery::Ignored) => Ok(relay_sessions::Delivery::Ignored),
        Err(err) => Err(HostError {
            transient: matches!(err, SessionError::Unavailable(_)),
            message: err.to_string(),
        }),
    }
}

/// What a session did, as `clawq run` shows it.
fn show_delivery(delivery: &relay_sessions::Delivery) -> String {
    match delivery {
        relay_sessions::Delivery::Pushed(n) => format!("pushed({n})"),
        relay_sessions::Delivery::Stored => "stored".into(),
        relay_sessions::Delivery::Unchanged => "unchanged".into(),
        relay_sessions::Delivery::Ignored => "ignored".into(),
    }
}

/// A delivery as `clawq run` shows it.
fn show_agent_delivery(delivery: &relay_sessions::AgentDelivery) -> String {
    let mut text = format!(
        "{{dedup-key: {:?}, from: {}, to: {}, payload: {}",
        delivery.dedup_key, delivery.from_agent_did, delivery.to_agent_did, delivery.payload
    );
    let optional = [
        ("delivery-source", &delivery.delivery_source),
        ("content-type", &delivery.content_type),
        ("group-id", &delivery.group_id),
        ("conversation-id", &delivery.conversation_id),
        ("reply-to", &delivery.reply_to),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            text += &format!(", {name}: {value:?}");
        }
    }
    text + "}"
}

/// A receipt as `clawq run` shows it.
fn show_receipt(receipt: &relay_sessions::Receipt) -> String {
    let status = match receipt.status {
        relay_sessions::ReceiptStatus::DeliveredToWebhook => "delivered-to-webhook",
        relay_sessions::ReceiptStatus::DeadLettered => "dead-lettered",
    };
    let mut text = format!(
        "{{request-id: {:?}, sender: {}, recipient: {}, status: {status}",
        receipt.request_id, receipt.sender_agent_did, receipt.recipient_agent_did
    );
    if let Some(reason) = &receipt.reason {
        text += &format!(", reason: {reason:?}");
    }
    if let Some(at) = &receipt.processed_at {
        text += &format!(", processed-at: {at:?}");
    }
    text + "}"
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const A: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
    const B: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";

    /// The state of a batch over fresh capabilities in `dir`, recording its calls.
    fn batch_state(dir: &std::path::Path) -> BatchState {
        let caps = crate::server::open_capabilities(
            &crate::store::test_db(dir),
            std::time::Duration::from_secs(60),
            crate::relay::sessions::SessionLimits::default(),
        );
        BatchState::recording(caps.unwrap())
    }

    #[tokio::test]
    async fn a_session_write_that_fails_is_a_transient_error_and_records_nothing() {
        use relay_sessions::Host;
        let dir = tempfile::tempdir().unwrap();
        let mut batch = batch_state(dir.path());
        let sessions = batch.caps.sessions.clone();
        let db = rusqlite::Connection::open(dir.path().join(crate::store::DATABASE_FILE));
        db.unwrap()
            .execute_batch(
                "CREATE TRIGGER refuse AFTER INSERT ON outbound
                 BEGIN SELECT RAISE(ABORT, 'the disk is full'); END;",
            )
            .unwrap();
        let mut state = HasRelaySessions::view(&mut batch);
        let receipt = relay_sessions::Receipt {
            request_id: "r1".into(),
            sender_agent_did: A.into(),
            recipient_agent_did: B.into(),
            status: relay_sessions::ReceiptStatus::DeliveredToWebhook,
            reason: None,
            processed_at: None,
        };
        let err = state.deliver_receipt(receipt).await.unwrap_err();
        assert!(
            err.transient && err.message.contains("the disk is full"),
            "{err:?}"
        );
        let push = sessions.push(A, crate::relay::sessions::Ask::Connected);
        assert!(push.await.unwrap().frames.is_empty(), "nothing recorded");
    }

    /// A receipt of `request_id` from `sender` to `recipient`.
    fn receipt(request_id: &str, sender: &str, recipient: &str) -> relay_sessions::Receipt {
        relay_sessions::Receipt {
            request_id: request_id.into(),
            sender_agent_did: sender.into(),
            recipient_agent_did: recipient.into(),
            status: relay_sessions::ReceiptStatus::DeliveredToWebhook,
            reason: None,
            processed_at: None,
        }
    }

    /// The `originalFrameId` of every frame the session of `did` holds unacked, in order.
    async fn held(sessions: &SessionStore, did: &str) -> Vec<String> {
        let push = sessions.push(did, crate::relay::sessions::Ask::Connected);
        let frames = push.await.unwrap().frames;
        let frames = frames
            .iter()
            .map(|f| serde_json::from_str::<Value>(f).unwrap());
        frames
            .map(|f| f["originalFrameId"].as_str().unwrap().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn deliver_receipts_answers_each_receipt_in_place_and_keeps_each_senders_order() {
        use relay_sessions::Host;
        let dir = tempfile::tempdir().unwrap();
        let mut batch = batch_state(dir.path());
        let (sessions, calls) = (batch.caps.sessions.clone(), batch.calls.clone().unwrap());
        let mut state = HasRelaySessions::view(&mut batch);
        let mut receipts: Vec<_> = (0..150)
            .map(|n| {
                let (sender, recipient) = if n % 3 == 0 { (B, A) } else { (A, B) };
                receipt(&format!("r{n}"), sender, recipient)
            })
            .collect();
        receipts[5] = receipt("bad-did", "did:cdi:nope", B);
        receipts[7] = receipt(&"x".repeat(2000), A, B);
        receipts[8] = receipt("r1", A, A);
        let answers = state.deliver_receipts(receipts.clone()).await;
        let shown: Vec<String> = answers
            .iter()
            .map(|a| match a {
                Ok(d) => show_delivery(d),
                Err(e) => format!("error: {}", e.message),
            })
            .collect();
        assert_eq!(shown.len(), 150);
        assert!(
            shown[5].starts_with("error: invalid receipt"),
            "{}",
            shown[5]
        );
        assert!(shown[7].contains("request-id"), "{}", shown[7]);
        assert_eq!(shown[8], "ignored", "r1 is held for another recipient");
        let stored = shown.iter().filter(|s| *s == "stored").count();
        assert_eq!(stored, 147, "{shown:?}");

        let of = |sender: &str| -> Vec<String> {
            let refused = ["bad-did", "r1"];
            receipts
                .iter()
                .filter(|r| r.sender_agent_did == sender && r.request_id.len() < 100)
                .filter(|r| {
                    !(refused.contains(&r.request_id.as_str()) && r.recipient_agent_did == A)
                })
                .map(|r| r.request_id.clone())
                .collect()
        };
        assert_eq!(
            held(&sessions, A).await,
            of(A),
            "A's receipts in the order given"
        );
        assert_eq!(
            held(&sessions, B).await,
            of(B),
            "B's receipts in the order given"
        );
        let recorded = calls.lock().unwrap().clone();
        assert_eq!(recorded.len(), 150, "one recorded call per receipt");
        assert!(
            recorded
                .iter()
                .all(|c| c.call == "relay-sessions.deliver-receipts")
        );

        let too_many = vec![receipt("over", A, B); MAX_RECEIPTS_PER_CALL + 1];
        let answers = state.deliver_receipts(too_many).await;
        assert_eq!(answers.len(), MAX_RECEIPTS_PER_CALL + 1);
        assert!(
            answers.iter().all(|a| a
                .as_ref()
                .is_err_and(|e| !e.transient && e.message.contains("at most 1000"))),
            "{:?}",
            answers[0]
        );
        assert!(
            !held(&sessions, A).await.contains(&"over".to_owned()),
            "nothing recorded"
        );
    }

    #[tokio::test]
    async fn the_deliver_capability_trims_checks_and_records() {
        use relay_sessions::Host;
        let dir = tempfile::tempdir().unwrap();
        let mut batch = batch_state(dir.path());
        let (sessions, calls) = (batch.caps.sessions.clone(), batch.calls.clone().unwrap());
        let mut state = HasRelaySessions::view(&mut batch);
        let padded = relay_sessions::AgentDelivery {
            dedup_key: " pair.accepted:a:b:1 ".into(),
            from_agent_did: format!(" {B}"),
            to_agent_did: format!("{A}\n"),
            payload: r#" {"system": {}} "#.into(),
            delivery_source: Some(" proxy.events.queue.pair_accepted ".into()),
            content_type: None,
            group_id: None,
            conversation_id: Some("  ".into()),
            reply_to: None,
        };
        let stored = state.deliver(padded.clone()).await.unwrap();
        assert_eq!(show_delivery(&stored), "stored");
        let again = state.deliver(padded.clone()).await.unwrap();
        assert_eq!(show_delivery(&again), "unchanged", "the trimmed key dedups");

        let push = sessions
            .push(A, crate::relay::sessions::Ask::Connected)
            .await;
        let frames = push.unwrap().frames;
        assert_eq!(frames.len(), 1);
        let frame: Value = serde_json::from_str(&frames[0]).unwrap();
        assert_eq!(
            (&frame["fromAgentDid"], &frame["toAgentDid"]),
            (&json!(B), &json!(A))
        );
        assert_eq!(frame["deliverySource"], "proxy.events.queue.pair_accepted");
        assert!(
            frame.get("conversationId").is_none(),
            "a blank field is left out: {frame}"
        );

        let not_json = relay_sessions::AgentDelivery {
            payload: "{oops".into(),
            ..padded.clone()
        };
        let err = state.deliver(not_json).await.unwrap_err();
        assert!(
            !err.transient && err.message.contains("`payload`"),
            "{err:?}"
        );
        let long_group = relay_sessions::AgentDelivery {
            group_id: Some("g".repeat(2000)),
            ..padded
        };
        let err = state.deliver(long_group).await.unwrap_err();
        assert!(
            !err.transient && err.message.contains("`group-id`"),
            "{err:?}"
        );

        let receipt = relay_sessions::Receipt {
            request_id: " r1 ".into(),
            sender_agent_did: format!("  {A} "),
            recipient_agent_did: format!("{B} "),
            status: relay_sessions::ReceiptStatus::DeadLettered,
            reason: Some(" ".into()),
            processed_at: None,
        };
        let routed = state.deliver_receipt(receipt).await.unwrap();
        assert_eq!(show_delivery(&routed), "stored", "padded values are routed");
        let push = sessions.push(A, crate::relay::sessions::Ask::Due).await;
        let receipt: Value = serde_json::from_str(&push.unwrap().frames[0]).unwrap();
        assert_eq!(receipt["originalFrameId"], "r1");
        assert!(
            receipt.get("reason").is_none(),
            "a blank reason is none: {receipt}"
        );

        let calls = calls.lock().unwrap().clone();
        let shown: Vec<String> = calls
            .iter()
            .map(|c| format!("{} -> {:?}", c.call, c.result))
            .collect();
        assert_eq!(
            shown,
            [
                "relay-sessions.deliver -> Some(\"stored\")",
                "relay-sessions.deliver -> Some(\"unchanged\")",
                "relay-sessions.deliver -> Some(\"error: invalid delivery: `payload` is not JSON: key must be a string at line 1 column 2\")",
                "relay-sessions.deliver -> Some(\"error: invalid delivery: `group-id` is 2000 bytes, over the 1024-byte limit\")",
                "relay-sessions.deliver-receipt -> Some(\"stored\")",
            ]
        );
    }
}
