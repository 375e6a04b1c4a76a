//! Protocol rules of clawdentity shared by the clawq host and its handler components
//! (spec `PROTOCOL.md`), written once so that both sides agree.

pub mod body;
pub mod did;
pub mod event;
pub mod fields;
pub mod problem;
pub mod receipt;
pub mod samples;

/// Defines, in a handler component crate, the glue between its WIT bindings and this
/// crate (each crate's `wit_bindgen::generate!` makes its own copy of the WIT types, so the
/// glue is written once here and expanded in each): `content_type`, the protocol's view of
/// a message's content type; `unhandled`, the `unhandled` outcome of a [`Problem`] (its
/// kind becomes the WIT `unhandled-reason`); and `refused`, the `unhandled` outcome of a
/// message a capability refused for good. Invoke it after `generate!`.
///
/// [`Problem`]: problem::Problem
#[macro_export]
macro_rules! wit_glue {
    () => {
        /// The protocol's view of a message's content type.
        fn content_type(
            content_type: clawdentity::queues::types::ContentType,
        ) -> $crate::body::ContentType {
            use clawdentity::queues::types::ContentType;
            match content_type {
                ContentType::Json => $crate::body::ContentType::Json,
                ContentType::Text => $crate::body::ContentType::Text,
                ContentType::Bytes => $crate::body::ContentType::Bytes,
            }
        }

        /// The outcome of a message that cannot be handled: acknowledged `unhandled`, with
        /// the problem's kind as the reason and its text as the detail.
        fn unhandled(problem: $crate::problem::Problem) -> clawdentity::queues::types::Outcome {
            use clawdentity::queues::types::{Outcome, Unhandled, UnhandledReason};
            use $crate::problem::ProblemKind;
            let reason = match problem.kind {
                ProblemKind::Malformed => UnhandledReason::Malformed,
                ProblemKind::UnknownType => UnhandledReason::UnknownType,
                ProblemKind::InvalidField => UnhandledReason::InvalidField,
            };
            Outcome::Unhandled(Unhandled {
                reason,
                detail: problem.detail,
            })
        }

        /// The outcome of a message a capability refused for good: acknowledged
        /// `unhandled` with reason `refused`.
        fn refused(detail: String) -> clawdentity::queues::types::Outcome {
            use clawdentity::queues::types::{Outcome, Unhandled, UnhandledReason};
            Outcome::Unhandled(Unhandled {
                reason: UnhandledReason::Refused,
                detail,
            })
        }
    };
}
