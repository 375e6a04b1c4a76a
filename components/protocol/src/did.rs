//! Agent DIDs: `did:cdi:<authority>:agent:<ULID>` (spec section 2).

use std::fmt;

/// Why a string is not a valid agent DID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DidError {
    /// Not five colon-separated parts.
    WrongShape,
    /// The method prefix is not `did:cdi`.
    WrongMethod,
    /// The authority is not a DNS name of at least two lowercase labels, ≤ 253 chars.
    InvalidAuthority,
    /// The entity kind is not `agent` (e.g. a `human` DID).
    NotAnAgent,
    /// The last part is not a 26-character Crockford base32 ULID.
    InvalidUlid,
}

impl fmt::Display for DidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DidError::WrongShape => "expected did:cdi:<authority>:agent:<ULID>",
            DidError::WrongMethod => "DID method is not did:cdi",
            DidError::InvalidAuthority => "authority is not a valid DNS name",
            DidError::NotAnAgent => "DID is not an agent DID",
            DidError::InvalidUlid => "agent id is not a 26-character ULID",
        })
    }
}

impl std::error::Error for DidError {}

/// Checks that `did` is a valid agent DID.
pub fn validate_agent_did(did: &str) -> Result<(), DidError> {
    // Five parts, read without collecting them: a revocation checks its DID on the
    // handler's hot path.
    let mut parts = did.split(':');
    let (Some(scheme), Some(method), Some(authority), Some(kind), Some(id), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(DidError::WrongShape);
    };
    if scheme != "did" || method != "cdi" {
        return Err(DidError::WrongMethod);
    }
    if !is_dns_name(authority) {
        return Err(DidError::InvalidAuthority);
    }
    if kind != "agent" {
        return Err(DidError::NotAnAgent);
    }
    if !is_ulid(id) {
        return Err(DidError::InvalidUlid);
    }
    Ok(())
}

/// A DNS name of at least two labels, each lowercase `[a-z0-9]` with inner `-`.
fn is_dns_name(name: &str) -> bool {
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    name.len() <= 253 && name.split('.').count() >= 2 && name.split('.').all(label_ok)
}

/// Whether `id` is a ULID: 26 characters of Crockford base32 (digits and uppercase
/// letters except I, L, O, U).
pub fn is_ulid(id: &str) -> bool {
    id.len() == 26
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b.is_ascii_uppercase() && !b"ILOU".contains(&b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";

    #[test]
    fn accepts_the_spec_example() {
        assert_eq!(validate_agent_did(VALID), Ok(()));
    }

    #[test]
    fn rejects_each_broken_part() {
        let cases = [
            ("", DidError::WrongShape),
            ("did:cdi:a.b:agent", DidError::WrongShape),
            (
                "did:cdi:a.b:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB:x",
                DidError::WrongShape,
            ),
            (
                "did:web:a.b:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB",
                DidError::WrongMethod,
            ),
            (
                "did:cdi:localhost:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB",
                DidError::InvalidAuthority,
            ),
            (
                "did:cdi:Reg.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB",
                DidError::InvalidAuthority,
            ),
            (
                "did:cdi:-a.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB",
                DidError::InvalidAuthority,
            ),
            (
                "did:cdi:a..com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB",
                DidError::InvalidAuthority,
            ),
            (
                "did:cdi:a.com:human:01HZX4M3Q8V2J7K9T6R5W1N0PB",
                DidError::NotAnAgent,
            ),
            (
                "did:cdi:a.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0P",
                DidError::InvalidUlid,
            ),
            (
                "did:cdi:a.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PI",
                DidError::InvalidUlid,
            ),
            (
                "did:cdi:a.com:agent:01hzx4m3q8v2j7k9t6r5w1n0pb",
                DidError::InvalidUlid,
            ),
        ];
        for (did, want) in cases {
            assert_eq!(validate_agent_did(did), Err(want), "{did}");
        }
    }

    #[test]
    fn authority_length_is_capped() {
        let long = vec!["a".repeat(60); 5].join(".");
        let did = format!("did:cdi:{long}:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB");
        assert_eq!(validate_agent_did(&did), Err(DidError::InvalidAuthority));
    }
}
