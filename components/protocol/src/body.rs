//! Message bodies as clawdentity's producers enqueue them (spec section 5): the JSON
//! object itself, a JSON *string* whose content is the object's JSON text (what
//! `queue.send(JSON.stringify(event))` publishes), or a `text` body holding JSON. Every
//! reader of a body (the bundled handlers, by way of [`read_object`], and the host's
//! subscription filters) goes through [`object_text`], so that they all accept the same
//! bodies.

use std::borrow::Cow;
use std::fmt;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// How a message body is encoded (the queue's content types, spec section 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// UTF-8 JSON text.
    Json,
    /// UTF-8 text, which may hold JSON.
    Text,
    /// Arbitrary bytes: never read as JSON.
    Bytes,
}

/// Why a body is not a JSON object in any accepted encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// A `bytes` body: not read as JSON.
    Bytes,
    /// The body (of this content type) is not JSON; the parser's message.
    NotJson(ContentType, String),
    /// The body is JSON, but this kind of value (`an array`, `a number`...) is not an
    /// object.
    NotAnObject(ContentType, &'static str),
    /// The body is a JSON string whose content is not JSON; the parser's message.
    StringNotJson(String),
    /// The body is a JSON string whose content is JSON of this kind, not an object.
    StringNotAnObject(&'static str),
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = |content_type: &ContentType| match content_type {
            ContentType::Text => "text body",
            ContentType::Json | ContentType::Bytes => "body",
        };
        match self {
            BodyError::Bytes => f.write_str("body is bytes, not JSON or text"),
            BodyError::NotJson(ct, err) => write!(f, "{} is not JSON: {err}", body(ct)),
            BodyError::NotAnObject(ct, kind) => {
                write!(f, "{} is {kind}, not a JSON object", body(ct))
            }
            BodyError::StringNotJson(err) => {
                write!(f, "body is a JSON string whose content is not JSON: {err}")
            }
            BodyError::StringNotAnObject(kind) => {
                write!(f, "body is a JSON string holding {kind}, not a JSON object")
            }
        }
    }
}

impl std::error::Error for BodyError {}

/// The JSON text of the object a message body holds, in any encoding [`read_object`]
/// accepts: the body itself, or the content of the JSON string it is. The text is checked
/// to be a JSON object but not parsed into values, for a reader that wants only some of
/// its members (the host's subscription filters). The error says which case failed.
pub fn object_text(content_type: ContentType, body: &[u8]) -> Result<Cow<'_, str>, BodyError> {
    if content_type == ContentType::Bytes {
        return Err(BodyError::Bytes);
    }
    let not_json = |err: serde_json::Error| BodyError::NotJson(content_type, err.to_string());
    let raw: &RawValue = serde_json::from_slice(body).map_err(not_json)?;
    match kind(raw) {
        OBJECT => Ok(Cow::Borrowed(raw.get())),
        STRING => {
            let text: String = serde_json::from_str(raw.get()).map_err(not_json)?;
            let inner: &RawValue = serde_json::from_str(&text)
                .map_err(|err| BodyError::StringNotJson(err.to_string()))?;
            match kind(inner) {
                OBJECT => Ok(Cow::Owned(text)),
                other => Err(BodyError::StringNotAnObject(other)),
            }
        }
        other => Err(BodyError::NotAnObject(content_type, other)),
    }
}

/// Reads a message body as a JSON object: the object itself, a JSON string whose
/// content is a JSON object, or a text body holding either (see [`object_text`]). The
/// error says which case failed.
pub fn read_object(
    content_type: ContentType,
    body: &[u8],
) -> Result<Map<String, Value>, BodyError> {
    let text = object_text(content_type, body)?;
    serde_json::from_str(&text).map_err(|err| BodyError::NotJson(content_type, err.to_string()))
}

/// [`kind`] of an object.
const OBJECT: &str = "an object";
/// [`kind`] of a string.
const STRING: &str = "a string";

/// What kind of JSON value `raw` is, by its first character, for error messages.
fn kind(raw: &RawValue) -> &'static str {
    match raw.get().trim_start().as_bytes().first() {
        Some(b'{') => OBJECT,
        Some(b'"') => STRING,
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> Value {
        json!({"type": "pair.accepted", "n": 1})
    }

    #[test]
    fn the_object_a_json_string_of_it_and_text_holding_it_read_the_same() {
        let object = event().to_string();
        let string = Value::String(object.clone()).to_string();
        let want = event().as_object().unwrap().clone();
        assert_eq!(
            read_object(ContentType::Json, object.as_bytes()),
            Ok(want.clone())
        );
        assert_eq!(
            read_object(ContentType::Json, string.as_bytes()),
            Ok(want.clone())
        );
        assert_eq!(
            read_object(ContentType::Text, object.as_bytes()),
            Ok(want.clone())
        );
        assert_eq!(read_object(ContentType::Text, string.as_bytes()), Ok(want));
    }

    #[test]
    fn each_failing_case_is_named() {
        let cases: [(ContentType, &[u8], &str); 7] = [
            (
                ContentType::Bytes,
                br#"{"type":"x"}"#,
                "body is bytes, not JSON or text",
            ),
            (ContentType::Json, b"{nope", "body is not JSON: "),
            (ContentType::Text, b"hello", "text body is not JSON: "),
            (
                ContentType::Json,
                b"[1]",
                "body is an array, not a JSON object",
            ),
            (
                ContentType::Text,
                b"7",
                "text body is a number, not a JSON object",
            ),
            (
                ContentType::Json,
                br#""{nope""#,
                "body is a JSON string whose content is not JSON: ",
            ),
            (
                ContentType::Json,
                br#""[1,2]""#,
                "body is a JSON string holding an array, not a JSON object",
            ),
        ];
        for (content_type, body, want) in cases {
            let err = read_object(content_type, body).unwrap_err().to_string();
            assert!(
                err.starts_with(want),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
