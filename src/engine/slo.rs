//! The SLO arithmetic and the incident cost model: one model for every figure r4 shows, so
//! `r4 run`'s report and the controller's status (`status.slo`, `status.incidentCost`) cannot
//! disagree.
//!
//! - success rate = tasks that succeeded / tasks that were asked for (1 when none was); error
//!   budget remaining = 1 − (1 − success rate) / (1 − SLO success rate) (1 = untouched, ≤ 0 =
//!   spent; with no SLO the target is 0.999);
//! - daily failure cost = failure rate × tasks per day × (margin per task + remediation cost
//!   per failure), with tasks per day from `economics.tasksPerMinute` (else the measured rate).
//!
//! What counts as a success is the caller's to say (pure functions of counts): `r4 run` counts
//! tasks completed within `slo.p95LatencyMs` among those it was asked to submit; the
//! controller counts the completions and dead-letterings its engines published
//! (`controller::analysis::Window`). Measuring is left to them.

use serde::Serialize;

use crate::api::workflow::{EconomicsSpec, IncidentCost, SloSpec, SloStatus};

/// The SLO target when the workflow names none.
pub const DEFAULT_SUCCESS_RATE: f64 = 0.999;

/// SLO attainment.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SloReport {
    pub success_rate: f64,
    pub p95_latency_ms: f64,
    pub error_budget_remaining: f64,
}

impl SloReport {
    /// The figures in the shape of `status.slo`.
    pub fn to_status(&self) -> SloStatus {
        SloStatus {
            success_rate: self.success_rate,
            p95_latency_ms: self.p95_latency_ms,
            error_budget_remaining: self.error_budget_remaining,
        }
    }
}

/// Incident cost model output.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CostReport {
    pub failure_rate: f64,
    pub daily_cost: f64,
}

impl CostReport {
    /// The figures in the shape of `status.incidentCost`.
    pub fn to_status(&self) -> IncidentCost {
        IncidentCost {
            failure_rate: self.failure_rate,
            daily_cost: self.daily_cost,
        }
    }
}

/// SLO attainment from counts and the measured p95: `succeeded` of `total` tasks met the
/// objective (`r4 run` passes the tasks completed within `slo.p95LatencyMs`, the same rule as
/// the cost model, so a run cannot show "SLO success 100%" beside failures the cost model
/// counts).
pub fn slo(succeeded: u64, total: u64, p95_ms: f64, spec: Option<&SloSpec>) -> SloReport {
    let success_rate = if total == 0 {
        1.0
    } else {
        succeeded as f64 / total as f64
    };
    let target = spec.map_or(DEFAULT_SUCCESS_RATE, |s| s.success_rate);
    let allowed = 1.0 - target;
    let error_budget_remaining = if allowed <= 0.0 {
        if success_rate >= 1.0 { 1.0 } else { 0.0 }
    } else {
        1.0 - (1.0 - success_rate) / allowed
    };
    SloReport {
        success_rate,
        p95_latency_ms: p95_ms,
        error_budget_remaining,
    }
}

/// Incident cost per day: `failed / total` scaled to a day of traffic, times the cost of one
/// failure (lost margin + manual remediation). Without `economics` the cost is 0 (the failure
/// rate is still given).
pub fn incident_cost(
    failed: u64,
    total: u64,
    measured_tasks_per_sec: f64,
    e: Option<&EconomicsSpec>,
) -> CostReport {
    let failure_rate = if total == 0 {
        0.0
    } else {
        failed as f64 / total as f64
    };
    let Some(e) = e else {
        return CostReport {
            failure_rate,
            daily_cost: 0.0,
        };
    };
    let per_day = e
        .tasks_per_minute
        .map_or(measured_tasks_per_sec * 86_400.0, |m| m * 1440.0);
    let daily_cost = failure_rate * per_day * (e.margin_per_task + e.remediation_cost_per_failure);
    CostReport {
        failure_rate,
        daily_cost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_budget_is_spent_proportionally() {
        let spec = SloSpec {
            success_rate: 0.99,
            p95_latency_ms: None,
            recovery_seconds: None,
        };
        let s = slo(995, 1000, 10.0, Some(&spec));
        assert!((s.error_budget_remaining - 0.5).abs() < 1e-9);
        let s = slo(980, 1000, 10.0, Some(&spec));
        assert!(
            (s.error_budget_remaining + 1.0).abs() < 1e-9,
            "overspent budget goes negative"
        );
    }

    #[test]
    fn no_task_spends_nothing_and_a_perfect_target_is_all_or_nothing() {
        let s = slo(0, 0, 0.0, None);
        assert_eq!((s.success_rate, s.error_budget_remaining), (1.0, 1.0));
        let perfect = SloSpec {
            success_rate: 1.0,
            p95_latency_ms: None,
            recovery_seconds: None,
        };
        assert_eq!(slo(10, 10, 1.0, Some(&perfect)).error_budget_remaining, 1.0);
        assert_eq!(slo(9, 10, 1.0, Some(&perfect)).error_budget_remaining, 0.0);
        // Default target 0.999: one failure in 1000 spends the whole budget.
        assert!(slo(999, 1000, 1.0, None).error_budget_remaining.abs() < 1e-9);
    }

    #[test]
    fn cost_model_scales_failures_to_a_day() {
        let e = EconomicsSpec {
            margin_per_task: 0.08,
            remediation_cost_per_failure: 3.5,
            tasks_per_minute: Some(200.0),
        };
        let c = incident_cost(12, 1000, 0.0, Some(&e));
        // 1.2% of 288,000 tasks/day × $3.58
        assert!(
            (c.daily_cost - 0.012 * 288_000.0 * 3.58).abs() < 1e-6,
            "{}",
            c.daily_cost
        );
        let measured = EconomicsSpec {
            tasks_per_minute: None,
            ..e
        };
        let c = incident_cost(1, 100, 10.0, Some(&measured));
        assert!((c.daily_cost - 0.01 * 864_000.0 * 3.58).abs() < 1e-6);
        let none = incident_cost(1, 4, 10.0, None);
        assert_eq!((none.failure_rate, none.daily_cost), (0.25, 0.0));
    }

    #[test]
    fn status_shapes_carry_the_figures() {
        let s = slo(9, 10, 12.5, None);
        let st = s.to_status();
        assert_eq!(
            (
                st.success_rate,
                st.p95_latency_ms,
                st.error_budget_remaining
            ),
            (s.success_rate, 12.5, s.error_budget_remaining)
        );
        let c = incident_cost(1, 10, 1.0, None).to_status();
        assert_eq!((c.failure_rate, c.daily_cost), (0.1, 0.0));
    }
}
