//! Message bodies as clawdentity's producers enqueue them (spec section 5): the JSON
//! object itself, a JSON *string* whose content is the object's JSON text (what
//! `queue.send(JSON.stringify(event))` publishes), or a `text` body holding JSON. Every
//! reader of a body (the bundled handlers, by way of [`read_object`], and the host's
//! subscription filters, by way of [`object_text`]) follows the same rules, so that they
//! all accept the same bodies.

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
    decode(
        content_type,
        body,
        |body| {
            let raw: &RawValue = serde_json::from_slice(body)?;
            Ok(match raw_kind(raw) {
                OBJECT => Shape::Object(Cow::Borrowed(raw.get())),
                STRING => Shape::String(serde_json::from_str(raw.get())?),
                other => Shape::Other(other),
            })
        },
        |text| {
            let inner: &RawValue = serde_json::from_str(&text)?;
            Ok(match raw_kind(inner) {
                OBJECT => Shape::Object(Cow::Owned(text)),
                other => Shape::Other(other),
            })
        },
    )
}

/// Reads a message body as a JSON object: the object itself, a JSON string whose
/// content is a JSON object, or a text body holding either (the same bodies as
/// [`object_text`], parsed once into values). The error says which case failed.
pub fn read_object(
    content_type: ContentType,
    body: &[u8],
) -> Result<Map<String, Value>, BodyError> {
    decode(
        content_type,
        body,
        |body| serde_json::from_slice(body).map(value_shape),
        |text| serde_json::from_str(&text).map(value_shape),
    )
}

/// What one parse of a body (or of the string it holds) found.
enum Shape<O> {
    /// A JSON object, as the reader parsed it.
    Object(O),
    /// A JSON string: its content.
    String(String),
    /// Another kind of value (see [`raw_kind`]).
    Other(&'static str),
}

/// The rules shared by [`object_text`] and [`read_object`]: which content types are
/// read, and which error each failing case gets. `outer` parses the body, `inner` the
/// content of a JSON string body; each parses once, into what its reader wants.
fn decode<'b, O>(
    content_type: ContentType,
    body: &'b [u8],
    outer: impl FnOnce(&'b [u8]) -> Result<Shape<O>, serde_json::Error>,
    inner: impl FnOnce(String) -> Result<Shape<O>, serde_json::Error>,
) -> Result<O, BodyError> {
    if content_type == ContentType::Bytes {
        return Err(BodyError::Bytes);
    }
    match outer(body).map_err(|err| BodyError::NotJson(content_type, err.to_string()))? {
        Shape::Object(object) => Ok(object),
        Shape::String(text) => match inner(text) {
            Ok(Shape::Object(object)) => Ok(object),
            Ok(Shape::String(_)) => Err(BodyError::StringNotAnObject(STRING)),
            Ok(Shape::Other(kind)) => Err(BodyError::StringNotAnObject(kind)),
            Err(err) => Err(BodyError::StringNotJson(err.to_string())),
        },
        Shape::Other(kind) => Err(BodyError::NotAnObject(content_type, kind)),
    }
}

/// [`raw_kind`] of an object.
const OBJECT: &str = "an object";
/// [`raw_kind`] of a string.
const STRING: &str = "a string";

/// What kind of JSON value `raw` is, by its first character, for error messages.
fn raw_kind(raw: &RawValue) -> &'static str {
    match raw.get().trim_start().as_bytes().first() {
        Some(b'{') => OBJECT,
        Some(b'"') => STRING,
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// A parsed value as a [`Shape`], named like [`raw_kind`] names it.
fn value_shape(value: Value) -> Shape<Map<String, Value>> {
    match value {
        Value::Object(object) => Shape::Object(object),
        Value::String(text) => Shape::String(text),
        Value::Array(_) => Shape::Other("an array"),
        Value::Bool(_) => Shape::Other("a boolean"),
        Value::Null => Shape::Other("null"),
        Value::Number(_) => Shape::Other("a number"),
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
        for body in [&object, &string] {
            assert_eq!(
                object_text(ContentType::Json, body.as_bytes()).as_deref(),
                Ok(object.as_str())
            );
        }
    }

    #[test]
    fn each_failing_case_is_named() {
        let cases: [(ContentType, &[u8], &str); 8] = [
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
            (
                ContentType::Text,
                br#""\"twice\"""#,
                "body is a JSON string holding a string, not a JSON object",
            ),
        ];
        for (content_type, body, want) in cases {
            let err = read_object(content_type, body).unwrap_err();
            assert!(
                err.to_string().starts_with(want),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(
                object_text(content_type, body),
                Err(err),
                "both readers agree"
            );
        }
    }
}
