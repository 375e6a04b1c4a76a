//! Fair CPU: a running guest yields its thread at every epoch tick, so that it never
//! holds a runtime thread for longer than one tick, and its CPU budget counts the ticks
//! it ran through. Time spent waiting (for its thread back, or in a host call) is not
//! guest time: a tick is counted only when the guest itself reaches a deadline, and a
//! host call, however long, reaches at most one.

use std::time::Duration;

use wasmtime::{Store, UpdateDeadline};

use super::batch::BatchState;
use super::engine::EPOCH_TICK;

/// Makes the guest of `store` yield at every tick and trap (`Trap::Interrupt`) once it
/// has run through `budget`.
pub(super) fn budget(store: &mut Store<BatchState>, budget: Duration) {
    let allowed = ticks(budget);
    let mut used: u64 = 0;
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        used += 1;
        if used > allowed {
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(UpdateDeadline::YieldCustom(
            1,
            Box::pin(tokio::task::yield_now()),
        ))
    });
}

/// How many ticks `budget` is (at least one).
fn ticks(budget: Duration) -> u64 {
    let ticks = budget.as_millis().div_ceil(EPOCH_TICK.as_millis()).max(1);
    u64::try_from(ticks).unwrap_or(u64::MAX)
}
