//! `r4 bench drill`: the worked example's game day (`config/samples/payment-disputes.yaml` under
//! `config/samples/bank-outage-drill.yaml`, or the files given) run by `r4 run --drill` on the
//! virtual clock, once per seed: failover and recovery (median and worst), tasks lost and
//! effects duplicated (0 in every seed, or the bench says so), and how far each fault's actual
//! start and end — as the drill's timeline saw them — were from its plan.
//!
//! The run, the drill and the measurement are [`crate::local::run`]'s and
//! [`crate::engine::drill`]'s; this module only repeats them and sums up.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::api::validate::Manifest;
use crate::local::drill::{LocalDrill, schedule_error};
use crate::local::run::{self, Load, RunOptions};
use crate::queue::Queue;

const DRILL: (&str, &str) = (
    "config/samples/bank-outage-drill.yaml",
    include_str!("../../config/samples/bank-outage-drill.yaml"),
);

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct DrillBenchOpts {
    /// Runs, with seeds `1..=seeds`.
    pub seeds: u64,
    /// The workflow and its policies (default: the worked example).
    pub manifests: Option<Vec<Manifest>>,
    /// The drill file (source, text) (default: the worked example's).
    pub drill: Option<(String, String)>,
}

/// Run the bench; the JSON of SPEC §9 (`seeds, failover_seconds{p50,max},
/// recovery_seconds{p50,max}, lost, duplicate_effects`) plus `schedule_error_ms{start_max,
/// end_max, applied_start_max, applied_end_max}` ([`crate::local::drill::ScheduleError`]), the
/// verdicts and one row per seed.
pub fn run(opts: DrillBenchOpts) -> Result<Value, String> {
    let manifests = match opts.manifests {
        Some(m) => m,
        None => crate::bench::worked_example_manifests()?,
    };
    let (source, text) = opts
        .drill
        .unwrap_or_else(|| (DRILL.0.to_string(), DRILL.1.to_string()));
    let wall = std::time::Instant::now();
    let mut rows = Vec::new();
    let (mut failovers, mut recoveries) = (Vec::new(), Vec::new());
    let (mut lost, mut duplicates) = (0u64, 0u64);
    let (mut start_max, mut end_max) = (0.0f64, 0.0f64);
    let (mut applied_start_max, mut applied_end_max) = (None::<f64>, None::<f64>);
    let mut verdicts = serde_json::Map::new();
    let mut name = String::new();
    for seed in 1..=opts.seeds.max(1) {
        let cfg =
            run::prepare(&manifests, None, "r4-bench-drill", &[]).map_err(|e| e.to_string())?;
        let drill: LocalDrill = crate::local::drill::load(&source, &text, &cfg)
            .map_err(|e| e.first().cloned().unwrap_or_default())?;
        name = drill.name.clone();
        let load = Load::choose(&cfg, None, false).map_err(|e| e.to_string())?;
        let run_opts = RunOptions {
            tasks: None,
            load,
            seed,
            progress: false,
            clock: "virtual",
            drill: Some(drill),
        };
        // The virtual clock: a paused runtime of its own per run, so each starts at zero.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .map_err(|e| format!("cannot start the runtime: {e}"))?;
        let report = rt
            .block_on(async {
                let q: Arc<dyn Queue> = Arc::new(crate::queue::memory::MemoryQueue::new());
                run::run(cfg, q, &run_opts, |_| {}).await
            })
            .map_err(|e| format!("seed {seed}: {e}"))?;
        let Some(d) = &report.drill else {
            return Err(format!("seed {seed}: the run reported no drill"));
        };
        // The run's final count and the drill's own, whichever saw more.
        let seed_lost = report.lost.max(d.tasks_lost);
        let seed_dups = report.duplicate_effects.max(d.duplicate_effects);
        lost += seed_lost;
        duplicates += seed_dups;
        let err = schedule_error(d);
        start_max = start_max.max(err.start_ms);
        end_max = end_max.max(err.end_ms);
        let worst = |acc: Option<f64>, x: Option<f64>| match (acc, x) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        applied_start_max = worst(applied_start_max, err.applied_start_ms);
        applied_end_max = worst(applied_end_max, err.applied_end_ms);
        failovers.extend(d.failover_seconds);
        recoveries.extend(d.recovery_seconds);
        let n = verdicts
            .entry(d.verdict.clone())
            .or_insert_with(|| json!(0u64));
        *n = json!(n.as_u64().unwrap_or(0) + 1);
        rows.push(json!({
            "seed": seed,
            "verdict": d.verdict,
            "score": d.score,
            "failover_seconds": d.failover_seconds,
            "recovery_seconds": d.recovery_seconds,
            "dlq_growth": d.dlq_growth,
            "dlq_replayed": d.dlq_replayed,
            "breaker_trips": d.breaker_trips,
            "submitted": report.submitted,
            "lost": seed_lost,
            "duplicate_effects": seed_dups,
            "aborted_because": d.aborted_because,
            "schedule_error_ms": {
                "start": err.start_ms,
                "end": err.end_ms,
                "applied_start": err.applied_start_ms,
                "applied_end": err.applied_end_ms,
            },
        }));
    }
    Ok(json!({
        "seeds": opts.seeds.max(1),
        "drill": name,
        "clock": "virtual",
        "failover_seconds": spread(&mut failovers),
        "recovery_seconds": spread(&mut recoveries),
        "lost": lost,
        "duplicate_effects": duplicates,
        "schedule_error_ms": {
            "start_max": start_max,
            "end_max": end_max,
            "applied_start_max": applied_start_max,
            "applied_end_max": applied_end_max,
        },
        "verdicts": verdicts,
        "runs": rows,
        "wall_seconds": wall.elapsed().as_secs_f64(),
    }))
}

/// `{p50, max}` of the measured values (`null` each when none was measured: a drill that never
/// failed over, or never recovered, in any seed). The median of an even count is the mean of
/// the two middle values.
fn spread(v: &mut [f64]) -> Value {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let p50 = match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    };
    json!({"p50": p50, "max": v.last()})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_median_and_worst() {
        assert_eq!(spread(&mut []), json!({"p50": null, "max": null}));
        assert_eq!(
            spread(&mut [3.0, 1.0, 2.0]),
            json!({"p50": 2.0, "max": 3.0})
        );
        assert_eq!(
            spread(&mut [4.0, 1.0, 2.0, 3.0]),
            json!({"p50": 2.5, "max": 4.0})
        );
    }

    #[test]
    fn the_built_in_example_is_valid() {
        let m = crate::bench::worked_example_manifests().unwrap();
        let cfg = run::prepare(&m, None, "t", &[]).unwrap();
        let d = crate::local::drill::load(DRILL.0, DRILL.1, &cfg).unwrap();
        assert_eq!(d.name, "bank-outage");
    }
}
