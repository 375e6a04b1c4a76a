//! The worlds of `wit/`: which capabilities a handler slot grants, and the check that a
//! component imports nothing more.

use std::fmt;

/// The WIT package every capability interface belongs to.
const PACKAGE: &str = "clawdentity:queues/";
/// The versions of that package the host links (0.1.0 for components built before 0.2.0).
const VERSIONS: [&str; 2] = ["0.2.0", "0.1.0"];
/// The 0.1.0 interface 0.2.0 retired: a raw frame push, refused by the host.
const RETIRED_WEBSOCKET: &str = "websocket";

/// A world a handler slot accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum World {
    /// `crl-invalidation`: trust store and log.
    CrlInvalidation,
    /// `receipt-router`: relay sessions and log.
    ReceiptRouter,
    /// `event-router`: relay sessions and log.
    EventRouter,
    /// `receipt-handler`: relay sessions, websocket, actor storage and log.
    ReceiptHandler,
    /// `handler-host`: every capability.
    HandlerHost,
}

impl World {
    /// Every world, by name.
    pub const ALL: [World; 5] = [
        World::CrlInvalidation,
        World::ReceiptRouter,
        World::EventRouter,
        World::ReceiptHandler,
        World::HandlerHost,
    ];

    /// The world's name in `wit/`.
    pub fn name(self) -> &'static str {
        match self {
            World::CrlInvalidation => "crl-invalidation",
            World::ReceiptRouter => "receipt-router",
            World::EventRouter => "event-router",
            World::ReceiptHandler => "receipt-handler",
            World::HandlerHost => "handler-host",
        }
    }

    /// The world called `name`.
    pub fn parse(name: &str) -> Option<World> {
        World::ALL.into_iter().find(|w| w.name() == name)
    }

    /// The capability interfaces the world grants (`types` is always allowed).
    pub fn grants(self) -> &'static [&'static str] {
        match self {
            World::CrlInvalidation => &["trust-store", "log"],
            World::ReceiptRouter | World::EventRouter => &["relay-sessions", "log"],
            World::ReceiptHandler => &["relay-sessions", "actor-storage", "log"],
            World::HandlerHost => &["trust-store", "relay-sessions", "actor-storage", "log"],
        }
    }

    /// Whether the world grants `interface` at contract `version`: its grants, plus, at
    /// 0.1.0, the retired `websocket` for the worlds that imported it then (the host
    /// links it only to refuse its calls).
    fn grants_at(self, interface: &str, version: &str) -> bool {
        self.grants().contains(&interface)
            || (interface == RETIRED_WEBSOCKET
                && version == "0.1.0"
                && matches!(self, World::ReceiptHandler | World::HandlerHost))
    }

    /// Checks the import names of a component: WASI interfaces and the capabilities this
    /// world grants, in a version the host links, are allowed; the error names the first
    /// one that is not.
    pub fn check_imports<'a>(
        self,
        imports: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), String> {
        for import in imports {
            if import.starts_with("wasi:") {
                continue;
            }
            let Some(rest) = import.strip_prefix(PACKAGE) else {
                return Err(format!("imports `{import}`, which no clawq world grants"));
            };
            let (interface, version) = rest.split_once('@').unwrap_or((rest, ""));
            if !VERSIONS.contains(&version) {
                return Err(format!(
                    "imports `{import}`, a version of `clawdentity:queues` this host does not implement (it implements {})",
                    VERSIONS.join(", ")
                ));
            }
            if interface == RETIRED_WEBSOCKET && version != "0.1.0" {
                return Err(format!(
                    "imports `{import}`, which clawdentity:queues@{version} does not have: the raw frame push is retired, frames are built by the host (use relay-sessions.deliver)"
                ));
            }
            if interface != "types" && !self.grants_at(interface, version) {
                return Err(format!(
                    "imports `{interface}`, which world `{}` does not grant (it grants {})",
                    self.name(),
                    self.grants().join(", ")
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Display for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_beyond_the_world_are_named() {
        let crl = [
            "wasi:io/streams@0.2.6",
            "clawdentity:queues/types@0.2.0",
            "clawdentity:queues/trust-store@0.2.0",
        ];
        assert_eq!(World::CrlInvalidation.check_imports(crl), Ok(()));
        let legacy = [
            "clawdentity:queues/types@0.1.0",
            "clawdentity:queues/log@0.1.0",
        ];
        assert_eq!(World::ReceiptRouter.check_imports(legacy), Ok(()));
        let future = World::ReceiptRouter
            .check_imports(["clawdentity:queues/log@0.3.0"])
            .unwrap_err();
        assert!(
            future.contains("`clawdentity:queues/log@0.3.0`, a version")
                && future.contains("0.2.0, 0.1.0"),
            "{future}"
        );
        let err = World::CrlInvalidation
            .check_imports(["clawdentity:queues/relay-sessions@0.2.0"])
            .unwrap_err();
        assert!(
            err.starts_with(
                "imports `relay-sessions`, which world `crl-invalidation` does not grant"
            ),
            "{err}"
        );
        assert!(
            World::HandlerHost
                .check_imports(["acme:evil/net"])
                .unwrap_err()
                .contains("acme:evil/net")
        );
        assert_eq!(World::parse("receipt-handler"), Some(World::ReceiptHandler));
    }

    #[test]
    fn the_retired_websocket_loads_only_at_0_1_0() {
        for world in [World::ReceiptHandler, World::HandlerHost] {
            assert_eq!(
                world.check_imports(["clawdentity:queues/websocket@0.1.0"]),
                Ok(()),
                "{world}"
            );
            let err = world
                .check_imports(["clawdentity:queues/websocket@0.2.0"])
                .unwrap_err();
            assert!(
                err.contains("`clawdentity:queues/websocket@0.2.0`")
                    && err.contains("retired")
                    && err.contains("relay-sessions.deliver"),
                "{err}"
            );
        }
        let err = World::ReceiptRouter
            .check_imports(["clawdentity:queues/websocket@0.1.0"])
            .unwrap_err();
        assert!(
            err.starts_with("imports `websocket`, which world `receipt-router` does not grant"),
            "{err}"
        );
    }
}
