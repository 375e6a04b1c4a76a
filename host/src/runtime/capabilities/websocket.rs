//! The `websocket` import: frames pushed to an agent's open connector connections.

use wasmtime::component::HasData;

use super::BatchState;
use crate::bounds;
use crate::frame::{MAX_FRAME_BYTES, VERSION};
use crate::relay::hub::ConnectionHub;
use crate::runtime::HostError;
use crate::runtime::bindings::clawdentity::queues::websocket;
use crate::runtime::record::{CallLog, recorded};

/// What the `websocket` import reaches of a batch: the connector connections, and the
/// batch's call log.
pub(in crate::runtime) struct WebsocketView<'a> {
    hub: &'a ConnectionHub,
    calls: Option<&'a CallLog>,
}

/// The `websocket` import's view of a batch's state, for the linker.
pub(in crate::runtime) struct HasWebsocket;

impl HasData for HasWebsocket {
    type Data<'a> = WebsocketView<'a>;
}

impl HasWebsocket {
    /// The view of `state`.
    pub(in crate::runtime) fn view(state: &mut BatchState) -> WebsocketView<'_> {
        WebsocketView {
            hub: &state.caps.hub,
            calls: state.calls.as_ref(),
        }
    }
}

impl websocket::Host for WebsocketView<'_> {
    async fn send_frame(&mut self, agent_did: String, frame: String) -> Result<u32, HostError> {
        let args = || format!("{agent_did} {frame}");
        let show = |n: &u32| format!("{n} connection{}", if *n == 1 { "" } else { "s" });
        recorded(self.calls, "websocket.send-frame", args, show, async {
            self.push_frame(&agent_did, &frame)
        })
        .await
    }
}

impl WebsocketView<'_> {
    /// Checks `frame`, completes its envelope and sends it to the connections of
    /// `agent_did`.
    fn push_frame(&self, agent_did: &str, frame: &str) -> Result<u32, HostError> {
        let refuse = |message: String| HostError {
            transient: false,
            message,
        };
        clawq_protocol::did::validate_agent_did(agent_did)
            .map_err(|e| refuse(format!("`{agent_did}`: {e}")))?;
        bounds::check("frame", frame.len(), MAX_FRAME_BYTES)?;
        let frame = fill_envelope(frame, crate::clock::now_ms())
            .ok_or_else(|| refuse("frame is not a JSON object".into()))?;
        bounds::check("frame", frame.len(), MAX_FRAME_BYTES)?;
        Ok(self.hub.send(agent_did, frame.into_owned()))
    }
}

/// `frame` with the envelope fields it lacks added: `"v": 1`, a new ULID `id` and `ts`,
/// the time `now_ms` in ISO-8601. `None` when `frame` is not a JSON object.
fn fill_envelope(frame: &str, now_ms: u64) -> Option<std::borrow::Cow<'_, str>> {
    let serde_json::Value::Object(mut fields) = serde_json::from_str(frame).ok()? else {
        return None;
    };
    if ["v", "id", "ts"].iter().all(|k| fields.contains_key(*k)) {
        return Some(frame.into());
    }
    fields.entry("v").or_insert(VERSION.into());
    fields
        .entry("id")
        .or_insert_with(|| ulid::Ulid::new().to_string().into());
    fields
        .entry("ts")
        .or_insert_with(|| crate::clock::iso8601(now_ms).into());
    Some(serde_json::Value::Object(fields).to_string().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn filled(frame: &str) -> Value {
        serde_json::from_str(&fill_envelope(frame, 1_764_072_599_776).unwrap()).unwrap()
    }

    #[test]
    fn a_pushed_frame_gets_the_envelope_fields_it_lacks() {
        let frame = filled(r#"{"type":"nudge","n":1}"#);
        assert_eq!(frame["v"], json!(1));
        assert_eq!(frame["ts"], json!("2025-11-25T12:09:59.776Z"));
        let id = frame["id"].as_str().unwrap();
        assert!(id.len() == 26 && id.parse::<ulid::Ulid>().is_ok(), "{id}");
        assert_eq!((&frame["type"], &frame["n"]), (&json!("nudge"), &json!(1)));

        let own = r#"{"v":7,"id":"mine","ts":"then","type":"x"}"#;
        assert_eq!(
            fill_envelope(own, 0).unwrap(),
            own,
            "a complete envelope is kept as is"
        );
        let partial = filled(r#"{"id":"mine","type":"x"}"#);
        assert_eq!((&partial["id"], &partial["v"]), (&json!("mine"), &json!(1)));

        for not_an_object in ["[]", "1", "nope", ""] {
            assert!(fill_envelope(not_an_object, 0).is_none(), "{not_an_object}");
        }
    }
}
