//! The versions of the handler contract the host links: the current
//! `clawdentity:queues@0.2.0` (`wit/`) and the frozen `0.1.0` (`host/wit-compat/0.1.0`),
//! so that components built against 0.1.0 keep loading. wasmtime does not match 0.1.x
//! imports to 0.2.x definitions, so the linker holds both; each 0.1.0 capability
//! converts its types and calls the 0.2.0 implementation, and a 0.1.0 handler's messages
//! and outcomes are converted on the way in and out. 0.1.0's `websocket`, retired in
//! 0.2.0, is linked only so that such components still instantiate: its `send-frame` is
//! refused with a permanent error and a warning, and sends nothing.

use wasmtime::component::{HasData, HasSelf, InstancePre, Linker};
use wasmtime::{Engine, Store};

use super::batch::BatchState;
use super::bindings as current;
use super::capabilities::{
    ActorStorageView, HasActorStorage, HasLog, HasRelaySessions, HasTrustStore, LogView,
    RelaySessionsView, TrustStoreView,
};
use super::record::{CallLog, recorded};
use super::{Message, Outcome};
use crate::bounds::MAX_LIST_PAGE;
use current::clawdentity::queues as now;

mod bindings {
    wasmtime::component::bindgen!({
        world: "handler-host",
        path: "wit-compat/0.1.0",
        imports: { default: async },
        exports: { default: async },
    });
}

use bindings::clawdentity::queues::{
    actor_storage, log, relay_sessions, trust_store, types, websocket,
};

/// The handler export of the current contract.
pub const HANDLER_EXPORT: &str = "clawdentity:queues/handler@0.2.0";
/// The handler export of the 0.1.0 contract.
pub const LEGACY_HANDLER_EXPORT: &str = "clawdentity:queues/handler@0.1.0";

/// Adds the capabilities of both contract versions to `linker`, each on its view of the
/// batch's state.
pub(super) fn add_to_linker(linker: &mut Linker<BatchState>) -> wasmtime::Result<()> {
    now::types::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    types::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    /// Links the interfaces named, of both versions, to their views.
    macro_rules! link {
        ($($interface:ident: $view:ident),*) => {$(
            now::$interface::add_to_linker::<_, $view>(linker, $view::view)?;
            $interface::add_to_linker::<_, $view>(linker, $view::view)?;
        )*};
    }
    link!(
        log: HasLog,
        trust_store: HasTrustStore,
        relay_sessions: HasRelaySessions,
        actor_storage: HasActorStorage
    );
    websocket::add_to_linker::<_, HasRetiredWebsocket>(linker, HasRetiredWebsocket::view)?;
    Ok(())
}

/// A handler ready to instantiate, by the contract version it exports.
pub(super) enum HandlerPre {
    /// Built against `clawdentity:queues@0.2.0`.
    Current(current::HandlerHostPre<BatchState>),
    /// Built against `clawdentity:queues@0.1.0`.
    Legacy(bindings::HandlerHostPre<BatchState>),
}

impl HandlerPre {
    /// The handler of `pre`: a 0.1.0 one when it exports the 0.1.0 handler, a 0.2.0 one
    /// otherwise (the error then names what is missing).
    pub(super) fn new(pre: InstancePre<BatchState>, exports: &[String]) -> wasmtime::Result<Self> {
        if exports.iter().any(|e| e == LEGACY_HANDLER_EXPORT) {
            Ok(HandlerPre::Legacy(bindings::HandlerHostPre::new(pre)?))
        } else {
            Ok(HandlerPre::Current(current::HandlerHostPre::new(pre)?))
        }
    }

    /// The engine the handler was compiled with.
    pub(super) fn engine(&self) -> &Engine {
        match self {
            HandlerPre::Current(pre) => pre.engine(),
            HandlerPre::Legacy(pre) => pre.engine(),
        }
    }

    /// Instantiates the handler without calling it.
    pub(super) async fn instantiate(&self, store: &mut Store<BatchState>) -> wasmtime::Result<()> {
        match self {
            HandlerPre::Current(pre) => pre.instantiate_async(store).await.map(drop),
            HandlerPre::Legacy(pre) => pre.instantiate_async(store).await.map(drop),
        }
    }

    /// Instantiates the handler and calls its `handle` with `messages` of `queue`.
    pub(super) async fn handle(
        &self,
        store: &mut Store<BatchState>,
        queue: &str,
        messages: &[Message],
    ) -> wasmtime::Result<Result<Vec<Outcome>, String>> {
        match self {
            HandlerPre::Current(pre) => {
                let instance = pre.instantiate_async(&mut *store).await?;
                let handler = instance.clawdentity_queues_handler();
                handler.call_handle(store, queue, messages).await
            }
            HandlerPre::Legacy(pre) => {
                let instance = pre.instantiate_async(&mut *store).await?;
                let messages: Vec<types::Message> = messages.iter().map(legacy_message).collect();
                let handler = instance.clawdentity_queues_handler();
                let outcomes = handler.call_handle(store, queue, &messages).await?;
                Ok(outcomes.map(|outcomes| outcomes.into_iter().map(current_outcome).collect()))
            }
        }
    }
}

fn legacy_message(message: &Message) -> types::Message {
    types::Message {
        id: message.id.clone(),
        attempts: message.attempts,
        timestamp_ms: message.timestamp_ms,
        content_type: match message.content_type {
            now::types::ContentType::Json => types::ContentType::Json,
            now::types::ContentType::Text => types::ContentType::Text,
            now::types::ContentType::Bytes => types::ContentType::Bytes,
        },
        body: message.body.clone(),
    }
}

fn current_outcome(outcome: types::Outcome) -> Outcome {
    match outcome {
        types::Outcome::Ack => Outcome::Ack,
        types::Outcome::Retry(delay) => Outcome::Retry(delay),
        types::Outcome::DeadLetter(reason) => Outcome::DeadLetter(reason),
    }
}

/// A 0.2.0 capability's answer as a 0.1.0 guest sees it.
fn legacy<T>(result: Result<T, now::types::HostError>) -> Result<T, types::HostError> {
    result.map_err(|err| types::HostError {
        transient: err.transient,
        message: err.message,
    })
}

impl types::Host for BatchState {}

impl log::Host for LogView<'_> {
    async fn write(&mut self, level: log::Level, message: String) {
        let level = match level {
            log::Level::Trace => now::log::Level::Trace,
            log::Level::Debug => now::log::Level::Debug,
            log::Level::Info => now::log::Level::Info,
            log::Level::Warn => now::log::Level::Warn,
            log::Level::Error => now::log::Level::Error,
        };
        now::log::Host::write(self, level, message).await
    }
}

impl trust_store::Host for TrustStoreView<'_> {
    async fn revoke_agent(&mut self, did: String) -> Result<(), types::HostError> {
        legacy(now::trust_store::Host::revoke_agent(self, did).await)
    }

    async fn is_revoked(&mut self, did: String) -> Result<bool, types::HostError> {
        legacy(now::trust_store::Host::is_revoked(self, did).await)
    }
}

impl relay_sessions::Host for RelaySessionsView<'_> {
    async fn deliver_receipt(
        &mut self,
        receipt: relay_sessions::Receipt,
    ) -> Result<relay_sessions::Delivery, types::HostError> {
        let receipt = now::relay_sessions::Receipt {
            request_id: receipt.request_id,
            sender_agent_did: receipt.sender_agent_did,
            recipient_agent_did: receipt.recipient_agent_did,
            status: match receipt.status {
                relay_sessions::ReceiptStatus::DeliveredToWebhook => {
                    now::relay_sessions::ReceiptStatus::DeliveredToWebhook
                }
                relay_sessions::ReceiptStatus::DeadLettered => {
                    now::relay_sessions::ReceiptStatus::DeadLettered
                }
            },
            reason: receipt.reason,
            processed_at: receipt.processed_at,
        };
        let delivery = now::relay_sessions::Host::deliver_receipt(self, receipt).await;
        legacy(delivery).map(|delivery| match delivery {
            now::relay_sessions::Delivery::Pushed(n) => relay_sessions::Delivery::Pushed(n),
            now::relay_sessions::Delivery::Stored => relay_sessions::Delivery::Stored,
            now::relay_sessions::Delivery::Unchanged => relay_sessions::Delivery::Unchanged,
            now::relay_sessions::Delivery::Ignored => relay_sessions::Delivery::Ignored,
        })
    }
}

/// Why a 0.1.0 `websocket.send-frame` is refused.
const SEND_FRAME_RETIRED: &str =
    "websocket.send-frame is retired: frames are built by the host; use relay-sessions.deliver";

/// What the retired 0.1.0 `websocket` import reaches of a batch: the handler it names in
/// its warning, and the batch's call log.
struct RetiredWebsocketView<'a> {
    handler: &'a str,
    version: &'a str,
    calls: Option<&'a CallLog>,
}

/// The retired `websocket` import's view of a batch's state, for the linker.
struct HasRetiredWebsocket;

impl HasData for HasRetiredWebsocket {
    type Data<'a> = RetiredWebsocketView<'a>;
}

impl HasRetiredWebsocket {
    /// The view of `state`.
    fn view(state: &mut BatchState) -> RetiredWebsocketView<'_> {
        RetiredWebsocketView {
            handler: &state.handler,
            version: &state.version,
            calls: state.calls.as_ref(),
        }
    }
}

impl websocket::Host for RetiredWebsocketView<'_> {
    /// Refused, permanently: nothing reaches any connection.
    async fn send_frame(
        &mut self,
        agent_did: String,
        frame: String,
    ) -> Result<u32, types::HostError> {
        let (handler, version) = (self.handler, self.version);
        tracing::warn!(handler, version, agent = %agent_did,
            "refused websocket.send-frame of a 0.1.0 handler: {SEND_FRAME_RETIRED}");
        let args = || format!("{agent_did} {frame}");
        let refused = async {
            Err(now::types::HostError {
                transient: false,
                message: SEND_FRAME_RETIRED.into(),
            })
        };
        legacy(
            recorded(
                self.calls,
                "websocket.send-frame",
                args,
                |_: &u32| String::new(),
                refused,
            )
            .await,
        )
    }
}

impl actor_storage::Host for ActorStorageView<'_> {
    async fn get(
        &mut self,
        actor: String,
        key: String,
    ) -> Result<Option<Vec<u8>>, types::HostError> {
        legacy(now::actor_storage::Host::get(self, actor, key).await)
    }

    async fn put(
        &mut self,
        actor: String,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), types::HostError> {
        legacy(now::actor_storage::Host::put(self, actor, key, value).await)
    }

    async fn delete(&mut self, actor: String, key: String) -> Result<(), types::HostError> {
        legacy(now::actor_storage::Host::delete(self, actor, key).await)
    }

    /// 0.1.0's `list-prefix` has no paging: it gets the first page of the 0.2.0 one
    /// (at most [`MAX_LIST_PAGE`] keys and about 1 MiB), not every key.
    async fn list_prefix(
        &mut self,
        actor: String,
        prefix: String,
    ) -> Result<Vec<(String, Vec<u8>)>, types::HostError> {
        let first_page =
            now::actor_storage::Host::list_prefix(self, actor, prefix, None, MAX_LIST_PAGE);
        legacy(first_page.await)
    }
}
