//! Reading the fields of a message body with the lenient rules of spec section 5:
//! strings are trimmed, and every error names the field by its dotted path.

use serde_json::{Map, Value};

use crate::did::validate_agent_did;
use crate::problem::Problem;

/// The fields of a JSON object, and where the object sits in the body (for error
/// messages: `data.groupId`).
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    object: &'a Map<String, Value>,
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    /// The fields of the body's top-level object.
    pub fn new(object: &'a Map<String, Value>) -> Fields<'a> {
        Fields { object, prefix: "" }
    }

    /// The dotted path of field `name` of this object.
    pub fn path(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The raw value of field `name`, if present.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.object.get(name)
    }

    /// The object in field `name`; its fields are named after `prefix` in errors (give
    /// `data.` for `data`).
    pub fn object(&self, name: &str, prefix: &'a str) -> Result<Fields<'a>, Problem> {
        match self.object.get(name) {
            Some(Value::Object(object)) => Ok(Fields { object, prefix }),
            Some(_) => Err(Problem::invalid_field(&self.path(name), "is not an object")),
            None => Err(Problem::invalid_field(&self.path(name), "is missing")),
        }
    }

    /// The required string `name`, trimmed and non-blank.
    pub fn string(&self, name: &str) -> Result<&'a str, Problem> {
        match self.object.get(name) {
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim()),
            Some(Value::String(_)) => Err(Problem::invalid_field(&self.path(name), "is blank")),
            Some(_) => Err(Problem::invalid_field(&self.path(name), "is not a string")),
            None => Err(Problem::invalid_field(&self.path(name), "is missing")),
        }
    }

    /// The optional string `name`, trimmed: `None` when absent, null or blank; an error
    /// when it is another kind of value.
    pub fn optional_string(&self, name: &str) -> Result<Option<&'a str>, Problem> {
        match self.object.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim()).filter(|s| !s.is_empty())),
            Some(_) => Err(Problem::invalid_field(&self.path(name), "is not a string")),
        }
    }

    /// The informational string `name`, trimmed: `None` when absent, blank or not a
    /// string (it is dropped, never an error).
    pub fn lenient_string(&self, name: &str) -> Option<&'a str> {
        self.object
            .get(name)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    /// The required agent DID `name`, trimmed and valid.
    pub fn agent_did(&self, name: &str) -> Result<&'a str, Problem> {
        let did = self.string(name)?;
        validate_agent_did(did)
            .map_err(|err| Problem::invalid_field(&self.path(name), format!("`{did}`: {err}")))?;
        Ok(did)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::ProblemKind;
    use serde_json::json;

    const DID: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";

    #[test]
    fn strings_are_trimmed_and_errors_name_the_path() {
        let body =
            json!({"data": {"a": "  x ", "b": " ", "c": 3, "d": null, "did": format!(" {DID}\t")}});
        let top = Fields::new(body.as_object().unwrap());
        let data = top.object("data", "data.").unwrap();
        assert_eq!(data.string("a"), Ok("x"));
        assert_eq!(data.agent_did("did"), Ok(DID));
        assert_eq!(data.optional_string("b"), Ok(None));
        assert_eq!(data.optional_string("d"), Ok(None));
        assert_eq!(data.lenient_string("c"), None);
        assert_eq!(data.lenient_string("a"), Some("x"));
        for (result, want) in [
            (data.string("b").map(drop), "data.b is blank"),
            (data.string("c").map(drop), "data.c is not a string"),
            (data.string("zz").map(drop), "data.zz is missing"),
            (
                data.optional_string("c").map(drop),
                "data.c is not a string",
            ),
            (
                data.agent_did("a").map(drop),
                "data.a `x`: expected did:cdi:<authority>:agent:<ULID>",
            ),
        ] {
            let err = result.unwrap_err();
            assert_eq!(
                (err.kind, err.detail.as_str()),
                (ProblemKind::InvalidField, want)
            );
        }
        let err = top.object("nope", "nope.").unwrap_err();
        assert_eq!(err.detail, "nope is missing");
        let err = data.object("a", "data.a.").unwrap_err();
        assert_eq!(err.detail, "data.a is not an object");
    }
}
