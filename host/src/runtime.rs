//! The component runtime, split the way wasmtime's own WASI host is:
//!
//! - [`engine`]: compiles handler components once, on a pooling allocator with epoch
//!   interruption, and links every capability;
//! - [`batch`]: one batch in a fresh store, with its memory cap, CPU budget ([`cpu`]:
//!   guests yield their thread at every epoch tick) and wall-clock deadline, run once the
//!   host has room for its instance; [`failure`] says what went wrong and whose fault
//!   it was, and bounds the guest text it carries;
//! - [`capabilities`]: one file per import of `wit/`, each implementing its generated
//!   `Host` trait on a narrow view of the batch's state; [`record`] wraps their calls,
//!   recording them for `clawq run`;
//! - [`compat`]: the 0.1.0 contract, linked next to the current one.
//!
//! Each batch runs in a fresh store whose WASI context grants nothing: no filesystem,
//! no network, no environment, no clock beyond WASI's defaults. A guest's stderr (where a
//! Rust panic message goes) is captured ([`stderr`]) and reported with its trap.

mod batch;
mod capabilities;
mod compat;
mod cpu;
mod engine;
mod failure;
#[doc(hidden)]
pub mod native;
mod record;
mod stderr;

pub use batch::{Handled, Limits, LoadedHandler, MAX_ROOM_WAIT};
pub use capabilities::Capabilities;
pub use compat::{HANDLER_EXPORT, LEGACY_HANDLER_EXPORT};
pub use engine::{Compiled, LoadError, MAX_MEMORY_BYTES, Runtime};
pub use failure::{BatchFailure, MAX_GUEST_TEXT_BYTES, bounded};
pub use record::{Call, CallLog};

mod bindings {
    wasmtime::component::bindgen!({
        world: "handler-host",
        path: "../wit",
        imports: { default: async },
        exports: { default: async },
    });
}

pub use bindings::clawdentity::queues::types::{
    ContentType, HostError, Message, Outcome, Unhandled, UnhandledReason,
};

impl UnhandledReason {
    /// The reason's name in logs and in the `reason` label of
    /// `clawq_messages_unhandled_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            UnhandledReason::Malformed => "malformed",
            UnhandledReason::UnknownType => "unknown_type",
            UnhandledReason::InvalidField => "invalid_field",
            UnhandledReason::Refused => "refused",
        }
    }
}
