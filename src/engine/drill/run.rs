//! The runner of one drill run (in progress).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{DrillEvent, DrillTarget, Outcome, Plan};
use crate::queue::{Keys, Queue};

/// Run `plan` against the workflow whose keys are `keys`: baseline, faults, guardrails,
/// recovery, verdict. `abort` set to `Some(reason)` ends the run at once (faults cleared,
/// verdict Aborted). Faults are cleared on every way out; what the run injected expires on time
/// even if this future is dropped (the TTLs). `on_event` sees every event as it happens.
pub async fn run(
    q: Arc<dyn Queue>,
    keys: Keys,
    plan: Plan,
    target: &dyn DrillTarget,
    abort: watch::Receiver<Option<String>>,
    on_event: &mut (dyn FnMut(Duration, &DrillEvent) + Send),
) -> Outcome {
    let _ = (q, keys, plan, target, abort, on_event);
    todo!("helper B")
}
