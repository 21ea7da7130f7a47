//! A ChaosDrill's spec resolved to times: the baseline, each fault's window counted from the
//! start of the run, the recovery limit, and the fault records the engines will read.
//!
//! The spec has normally passed `api::validate::check_drill` already (the CRD schema, the
//! controller's `Valid` condition, `r4 run`'s loading); what is unusable anyway is refused here
//! with one [`FieldError`] naming the field, never a panic and never a silent default.

use std::time::Duration;

use super::{DEFAULT_BASELINE, DEFAULT_RECOVERY_LIMIT, FaultAction, Plan, PlannedFault};
use crate::api::common::DurationStr;
use crate::api::drill::{ChaosDrillSpec, Fault, FaultType};
use crate::api::validate::FieldError;
use crate::engine::faults::FaultRecord;

/// Status of a ToolErrors fault's injected errors when `statusCode` is not set.
const DEFAULT_STATUS: u16 = 503;

/// Resolve `spec` (already validated) into a plan for run `run` of drill `drill`:
/// - the baseline is `[0, spec.baseline)` (default [`DEFAULT_BASELINE`]), the timeline
///   `[baseline, baseline + duration)`;
/// - a fault starts at `baseline + after` (default 0) and ends `for` later, or at the end of
///   the timeline when `for` is absent; a PodKill ends where it starts;
/// - `percent` defaults to 100, a ToolErrors `statusCode` to 503, a PodKill `count` to 1;
/// - the recovery limit is `expect.maxRecoverySeconds`, else [`DEFAULT_RECOVERY_LIMIT`].
pub fn plan(drill: &str, spec: &ChaosDrillSpec, run: u64) -> Result<Plan, FieldError> {
    let duration = positive("spec.duration", &spec.duration)?;
    let baseline = match &spec.baseline {
        Some(b) => positive("spec.baseline", b)?,
        None => DEFAULT_BASELINE,
    };
    let recovery_limit = match spec.expect.as_ref().and_then(|e| e.max_recovery_seconds) {
        Some(s) => Duration::from_secs(non_negative("spec.expect.maxRecoverySeconds", s)?),
        None => DEFAULT_RECOVERY_LIMIT,
    };
    if spec.faults.is_empty() {
        return Err(FieldError::new("spec.faults", "needs at least one fault"));
    }
    let faults = spec
        .faults
        .iter()
        .enumerate()
        .map(|(i, f)| fault(drill, run, i, f, baseline, duration))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Plan {
        drill: drill.to_owned(),
        run,
        baseline,
        duration,
        recovery_limit,
        faults,
        guardrails: spec.guardrails.as_ref().map(|g| g.abort_if.clone()),
        expect: spec.expect.clone(),
    })
}

fn fault(
    drill: &str,
    run: u64,
    index: usize,
    f: &Fault,
    baseline: Duration,
    duration: Duration,
) -> Result<PlannedFault, FieldError> {
    let p = format!("spec.faults[{index}]");
    let after = match &f.after {
        Some(a) => parse(&format!("{p}.after"), a)?,
        None => Duration::ZERO,
    };
    if after >= duration {
        return Err(FieldError::new(
            format!("{p}.after"),
            format!(
                "starts at {} but the drill lasts {}",
                secs(after),
                secs(duration)
            ),
        ));
    }
    let length = match &f.for_ {
        Some(x) => positive(&format!("{p}.for"), x)?,
        None => duration - after,
    };
    if after + length > duration {
        return Err(FieldError::new(
            format!("{p}.for"),
            format!(
                "fault window ends at {} but the drill lasts {}",
                secs(after + length),
                secs(duration)
            ),
        ));
    }
    let start = baseline + after;
    let need = |field: &str, v: bool| {
        if v {
            Ok(())
        } else {
            Err(FieldError::new(
                format!("{p}.{field}"),
                format!("{:?} needs `{field}`", f.kind),
            ))
        }
    };
    let name = |field: &str, v: &Option<String>| -> Result<Option<String>, FieldError> {
        need(field, v.as_deref().is_some_and(|s| !s.is_empty()))?;
        Ok(v.clone())
    };
    if f.kind == FaultType::PodKill {
        let agent = name("agent", &f.agent)?.unwrap_or_default();
        let count = match f.count {
            None => 1,
            Some(c) => u32::try_from(c).ok().filter(|c| *c >= 1).ok_or_else(|| {
                FieldError::new(format!("{p}.count"), format!("must be at least 1, got {c}"))
            })?,
        };
        return Ok(PlannedFault {
            start,
            end: start,
            action: FaultAction::PodKill { agent, count },
        });
    }
    let percent = f.percent.unwrap_or(100.0);
    if !(0.0..=100.0).contains(&percent) {
        return Err(FieldError::new(
            format!("{p}.percent"),
            format!("must be between 0 and 100, got {percent}"),
        ));
    }
    let mut record = FaultRecord {
        drill: drill.to_owned(),
        run,
        index,
        kind: f.kind,
        tool: None,
        agent: None,
        stream: None,
        latency_ms: None,
        percent,
        error_rate: None,
        status_code: None,
        retry_after_seconds: None,
        max_per_second: None,
    };
    let latency = || -> Result<Option<u64>, FieldError> {
        need("latencyMs", f.latency_ms.is_some())?;
        let v = f.latency_ms.unwrap_or_default();
        u64::try_from(v)
            .ok()
            .filter(|v| *v >= 1)
            .map(Some)
            .ok_or_else(|| {
                FieldError::new(
                    format!("{p}.latencyMs"),
                    format!("must be at least 1, got {v}"),
                )
            })
    };
    match f.kind {
        FaultType::ToolOutage => record.tool = name("tool", &f.tool)?,
        FaultType::ToolLatency => {
            record.tool = name("tool", &f.tool)?;
            record.latency_ms = latency()?;
        }
        FaultType::ToolErrors => {
            record.tool = name("tool", &f.tool)?;
            need("errorRate", f.error_rate.is_some())?;
            let rate = f.error_rate.unwrap_or_default();
            if !(0.0..=1.0).contains(&rate) {
                return Err(FieldError::new(
                    format!("{p}.errorRate"),
                    format!("must be between 0 and 1, got {rate}"),
                ));
            }
            record.error_rate = Some(rate);
            record.status_code = Some(match f.status_code {
                None => DEFAULT_STATUS,
                Some(s) => u16::try_from(s)
                    .ok()
                    .filter(|s| (400..=599).contains(s))
                    .ok_or_else(|| {
                        FieldError::new(
                            format!("{p}.statusCode"),
                            format!("must be between 400 and 599, got {s}"),
                        )
                    })?,
            });
            record.retry_after_seconds = f
                .retry_after_seconds
                .map(|s| non_negative(&format!("{p}.retryAfterSeconds"), s))
                .transpose()?;
        }
        FaultType::MessageCorruption => record.stream = name("stream", &f.stream)?,
        FaultType::QueueThrottle => {
            record.stream = name("stream", &f.stream)?;
            need("maxPerSecond", f.max_per_second.is_some())?;
            record.max_per_second = Some(non_negative(
                &format!("{p}.maxPerSecond"),
                f.max_per_second.unwrap_or_default(),
            )?);
        }
        FaultType::AgentSlowdown => {
            record.agent = name("agent", &f.agent)?;
            record.latency_ms = latency()?;
        }
        // Resolved (and returned) above: nothing of it is stored.
        FaultType::PodKill => {}
    }
    Ok(PlannedFault {
        start,
        end: start + length,
        action: FaultAction::Inject(record),
    })
}

fn parse(path: &str, d: &DurationStr) -> Result<Duration, FieldError> {
    d.parse().map_err(|e| FieldError::new(path, e))
}

fn positive(path: &str, d: &DurationStr) -> Result<Duration, FieldError> {
    let v = parse(path, d)?;
    if v.is_zero() {
        return Err(FieldError::new(path, "must be greater than 0"));
    }
    Ok(v)
}

fn non_negative(path: &str, v: i64) -> Result<u64, FieldError> {
    u64::try_from(v).map_err(|_| FieldError::new(path, format!("must be at least 0, got {v}")))
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::drill::{AbortIf, Expectations, Guardrails};

    fn f(kind: FaultType) -> Fault {
        Fault {
            kind,
            tool: None,
            agent: None,
            stream: None,
            after: None,
            for_: None,
            latency_ms: None,
            percent: None,
            error_rate: None,
            status_code: None,
            retry_after_seconds: None,
            count: None,
            max_per_second: None,
        }
    }

    fn spec(faults: Vec<Fault>) -> ChaosDrillSpec {
        ChaosDrillSpec {
            workflow_ref: "wf".into(),
            schedule: None,
            duration: DurationStr::new("5m"),
            baseline: None,
            faults,
            guardrails: None,
            expect: None,
            suspend: false,
        }
    }

    fn d(s: &str) -> Option<DurationStr> {
        Some(DurationStr::new(s))
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn plan_resolves_times_and_defaults() {
        let mut s = spec(vec![
            Fault {
                tool: Some("bank-api".into()),
                after: d("30s"),
                for_: d("2m"),
                ..f(FaultType::ToolOutage)
            },
            Fault {
                tool: Some("bank-api".into()),
                error_rate: Some(0.3),
                ..f(FaultType::ToolErrors)
            },
            Fault {
                agent: Some("investigation".into()),
                after: d("1m"),
                ..f(FaultType::PodKill)
            },
            Fault {
                stream: Some("tickets".into()),
                max_per_second: Some(10),
                percent: Some(50.0),
                after: d("4m"),
                ..f(FaultType::QueueThrottle)
            },
        ]);
        s.guardrails = Some(Guardrails {
            abort_if: AbortIf {
                success_rate_below: Some(0.9),
                dlq_depth_above: None,
                p95_latency_ms_above: None,
            },
        });
        let p = plan("bank", &s, 42).unwrap();
        assert_eq!((p.drill.as_str(), p.run), ("bank", 42));
        assert_eq!(p.baseline, DEFAULT_BASELINE);
        assert_eq!(p.duration, S(300));
        assert_eq!(p.recovery_limit, DEFAULT_RECOVERY_LIMIT);
        assert_eq!(p.last_end(), S(330));
        assert_eq!(
            p.longest(),
            S(330 + 300 + 3),
            "recovery limit and its confirmation"
        );
        assert_eq!(p.guardrails, s.guardrails.map(|g| g.abort_if));
        // Windows count from the timeline's start (after the 30s baseline).
        let w: Vec<_> = p.faults.iter().map(|f| (f.start, f.end)).collect();
        assert_eq!(
            w,
            vec![
                (S(60), S(180)),
                (S(30), S(330)),
                (S(90), S(90)),
                (S(270), S(330))
            ]
        );
        let FaultAction::Inject(r) = &p.faults[1].action else {
            panic!("{:?}", p.faults[1])
        };
        assert_eq!(
            r,
            &FaultRecord {
                drill: "bank".into(),
                run: 42,
                index: 1,
                kind: FaultType::ToolErrors,
                tool: Some("bank-api".into()),
                agent: None,
                stream: None,
                latency_ms: None,
                percent: 100.0,
                error_rate: Some(0.3),
                status_code: Some(503),
                retry_after_seconds: None,
                max_per_second: None,
            }
        );
        assert_eq!(
            p.faults[2].action,
            FaultAction::PodKill {
                agent: "investigation".into(),
                count: 1
            }
        );
        let FaultAction::Inject(r) = &p.faults[3].action else {
            panic!()
        };
        assert_eq!(
            (r.index, r.percent, r.max_per_second, r.stream.as_deref()),
            (3, 50.0, Some(10), Some("tickets"))
        );
    }

    #[test]
    fn plan_takes_baseline_recovery_limit_and_explicit_values() {
        let mut s = spec(vec![
            Fault {
                tool: Some("t".into()),
                latency_ms: Some(800),
                percent: Some(0.0),
                ..f(FaultType::ToolLatency)
            },
            Fault {
                tool: Some("t".into()),
                error_rate: Some(1.0),
                status_code: Some(429),
                retry_after_seconds: Some(7),
                ..f(FaultType::ToolErrors)
            },
            Fault {
                agent: Some("a".into()),
                count: Some(3),
                ..f(FaultType::PodKill)
            },
            Fault {
                agent: Some("a".into()),
                latency_ms: Some(5),
                for_: d("1s"),
                ..f(FaultType::AgentSlowdown)
            },
        ]);
        s.baseline = d("1500ms");
        s.duration = DurationStr::new("10s");
        s.expect = Some(Expectations {
            max_recovery_seconds: Some(60),
            max_lost_tasks: None,
            max_duplicate_effects: None,
        });
        let p = plan("x", &s, 1).unwrap();
        assert_eq!(p.baseline, Duration::from_millis(1500));
        assert_eq!(p.recovery_limit, S(60));
        let rec = |i: usize| match &p.faults[i].action {
            FaultAction::Inject(r) => r.clone(),
            a => panic!("{a:?}"),
        };
        assert_eq!((rec(0).latency_ms, rec(0).percent), (Some(800), 0.0));
        assert_eq!(
            (rec(1).status_code, rec(1).retry_after_seconds),
            (Some(429), Some(7))
        );
        assert_eq!(
            p.faults[2].action,
            FaultAction::PodKill {
                agent: "a".into(),
                count: 3
            }
        );
        assert_eq!(
            (p.faults[3].start, p.faults[3].end),
            (Duration::from_millis(1500), Duration::from_millis(2500))
        );
        assert_eq!(rec(3).agent.as_deref(), Some("a"));
        // maxRecoverySeconds 0 is a limit of 0, not the default.
        s.expect = Some(Expectations {
            max_recovery_seconds: Some(0),
            max_lost_tasks: None,
            max_duplicate_effects: None,
        });
        assert_eq!(plan("x", &s, 1).unwrap().recovery_limit, Duration::ZERO);
    }

    #[test]
    fn plan_refuses_what_is_unusable_naming_the_field() {
        let err = |s: ChaosDrillSpec| plan("x", &s, 1).unwrap_err().to_string();
        let tool = || Fault {
            tool: Some("t".into()),
            ..f(FaultType::ToolOutage)
        };
        let mut s = spec(vec![tool()]);
        s.duration = DurationStr::new("0s");
        assert_eq!(err(s), "spec.duration: must be greater than 0");
        let mut s = spec(vec![tool()]);
        s.baseline = d("soon");
        assert!(err(s).starts_with("spec.baseline: "));
        assert_eq!(err(spec(vec![])), "spec.faults: needs at least one fault");
        assert_eq!(
            err(spec(vec![tool(), f(FaultType::ToolOutage)])),
            "spec.faults[1].tool: ToolOutage needs `tool`"
        );
        assert_eq!(
            err(spec(vec![Fault {
                after: d("5m"),
                ..tool()
            }])),
            "spec.faults[0].after: starts at 300s but the drill lasts 300s"
        );
        assert_eq!(
            err(spec(vec![Fault {
                after: d("4m"),
                for_: d("2m"),
                ..tool()
            }])),
            "spec.faults[0].for: fault window ends at 360s but the drill lasts 300s"
        );
        assert_eq!(
            err(spec(vec![Fault {
                for_: d("0s"),
                ..tool()
            }])),
            "spec.faults[0].for: must be greater than 0"
        );
        assert_eq!(
            err(spec(vec![Fault {
                percent: Some(101.0),
                ..tool()
            }])),
            "spec.faults[0].percent: must be between 0 and 100, got 101"
        );
        assert_eq!(
            err(spec(vec![Fault {
                tool: Some("t".into()),
                ..f(FaultType::ToolLatency)
            }])),
            "spec.faults[0].latencyMs: ToolLatency needs `latencyMs`"
        );
        assert_eq!(
            err(spec(vec![Fault {
                tool: Some("t".into()),
                error_rate: Some(0.5),
                status_code: Some(200),
                ..f(FaultType::ToolErrors)
            }])),
            "spec.faults[0].statusCode: must be between 400 and 599, got 200"
        );
        assert_eq!(
            err(spec(vec![Fault {
                agent: Some("a".into()),
                count: Some(0),
                ..f(FaultType::PodKill)
            }])),
            "spec.faults[0].count: must be at least 1, got 0"
        );
        assert_eq!(
            err(spec(vec![f(FaultType::QueueThrottle)])),
            "spec.faults[0].stream: QueueThrottle needs `stream`"
        );
        assert_eq!(
            err(spec(vec![Fault {
                stream: Some("s".into()),
                max_per_second: Some(-1),
                ..f(FaultType::QueueThrottle)
            }])),
            "spec.faults[0].maxPerSecond: must be at least 0, got -1"
        );
        let mut s = spec(vec![tool()]);
        s.expect = Some(Expectations {
            max_recovery_seconds: Some(-5),
            max_lost_tasks: None,
            max_duplicate_effects: None,
        });
        assert_eq!(
            err(s),
            "spec.expect.maxRecoverySeconds: must be at least 0, got -5"
        );
    }
}
