//! Why a batch failed, whose fault it was, and the bound on the guest text a failure
//! carries into logs and into the queue (`last_error`, `dead_reason`).

/// Most bytes of a guest's text (its `handle` error, a dead-letter reason) kept: the
/// rest is cut and replaced by a marker giving the original length.
pub const MAX_GUEST_TEXT_BYTES: usize = 1024;

/// Why a whole batch failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchFailure {
    /// The guest trapped (a panic, an unreachable, a bad memory access).
    #[error("handler trapped: {0}")]
    Trap(String),
    /// The guest's `handle` returned an error.
    #[error("handler returned an error: {0}")]
    Error(String),
    /// The batch exceeded a sandbox limit (memory, CPU budget, wall-clock deadline) and
    /// was stopped.
    #[error("handler stopped: {0}")]
    Limit(String),
    /// The host had no room to run the batch (its instance pool was exhausted), or could
    /// not commit the batch's side effects: not the handler's fault, so the batch is
    /// released without counting an attempt.
    #[error("host out of capacity: {0}")]
    Capacity(String),
}

impl BatchFailure {
    /// Whether the handler caused the failure (a trap, an error, a limit), so that it
    /// costs the batch an attempt and counts against the version's health; `false` when
    /// the host could not run it.
    pub fn is_guest_fault(&self) -> bool {
        !matches!(self, BatchFailure::Capacity(_))
    }
}

/// `text` cut to [`MAX_GUEST_TEXT_BYTES`] (at a character boundary), followed by
/// `… (<n> bytes)` with its original length when it was longer.
pub fn bounded(text: &str) -> String {
    crate::text::cut_bytes(text, MAX_GUEST_TEXT_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_is_cut_at_a_character_boundary_with_its_length() {
        assert_eq!(bounded("short"), "short");
        let exact = "e".repeat(MAX_GUEST_TEXT_BYTES);
        assert_eq!(bounded(&exact), exact);
        let huge = "e".repeat(20 << 20);
        let cut = bounded(&huge);
        assert!(cut.starts_with(&exact), "the head is kept");
        assert!(cut.ends_with("… (20971520 bytes)"), "{}", &cut[1000..]);
        // 'é' is two bytes: the cut falls inside one at byte 1024 when the text starts
        // with one 'a'.
        let accented = format!("a{}", "é".repeat(MAX_GUEST_TEXT_BYTES));
        let cut = bounded(&accented);
        assert!(cut.len() <= MAX_GUEST_TEXT_BYTES + 32, "{}", cut.len());
        assert!(cut.ends_with(&format!("… ({} bytes)", accented.len())));
    }
}
