//! Why a message cannot be handled: a typed problem, so that a handler maps it to the
//! WIT `unhandled-reason` without matching on the text.

use std::fmt;

/// The kind of a [`Problem`], one for each WIT `unhandled-reason` a message body can
/// cause (`refused` comes from a capability, not from the body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The body is not a JSON object in any accepted encoding.
    Malformed,
    /// The message's `type` is not one the protocol knows (or not the one expected).
    UnknownType,
    /// A required field is missing or invalid.
    InvalidField,
}

/// A message that cannot be handled, and what exactly is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Which kind of problem it is.
    pub kind: ProblemKind,
    /// What is wrong, for the log line (names the field when one is at fault).
    pub detail: String,
}

impl Problem {
    /// A body that is not a JSON object.
    pub fn malformed(detail: impl Into<String>) -> Problem {
        Problem {
            kind: ProblemKind::Malformed,
            detail: detail.into(),
        }
    }

    /// A message whose `type` is not known.
    pub fn unknown_type(detail: impl Into<String>) -> Problem {
        Problem {
            kind: ProblemKind::UnknownType,
            detail: detail.into(),
        }
    }

    /// The field `field` (a dotted path, e.g. `data.groupId`) is missing or invalid:
    /// `why` says how.
    pub fn invalid_field(field: &str, why: impl fmt::Display) -> Problem {
        Problem {
            kind: ProblemKind::InvalidField,
            detail: format!("{field} {why}"),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for Problem {}
