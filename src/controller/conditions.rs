//! Standard `metav1.Condition`s in a status: set one by type, read one back.
//!
//! Owns the rule every condition of r4 keeps: `lastTransitionTime` moves only when the status
//! flips (True/False/Unknown), never when only the reason, message or observed generation
//! changes — so "since when is it Ready" stays true across reconciles. Which conditions exist
//! and what they mean is the reconcilers'.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Set condition `type_` (status `"True"`/`"False"`/`"Unknown"`, reason CamelCase, message)
/// in `conds`, with `observedGeneration`; `lastTransitionTime` becomes `now` only when the
/// condition is new or its status changes. Returns whether anything changed (so the caller
/// writes the status only then).
pub fn set(
    conds: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let Some(c) = conds.iter_mut().find(|c| c.type_ == type_) else {
        conds.push(Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            observed_generation: generation,
            last_transition_time: Time(now),
        });
        return true;
    };
    let mut changed = false;
    if c.status != status {
        c.status = status.to_owned();
        c.last_transition_time = Time(now);
        changed = true;
    }
    if c.reason != reason {
        c.reason = reason.to_owned();
        changed = true;
    }
    if c.message != message {
        c.message = message.to_owned();
        changed = true;
    }
    if c.observed_generation != generation {
        c.observed_generation = generation;
        changed = true;
    }
    changed
}

/// The condition of type `type_`, if set.
pub fn get<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

/// Whether condition `type_` is set and `"True"` (absent or `"Unknown"` is not true).
pub fn is_true(conds: &[Condition], type_: &str) -> bool {
    get(conds, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn a_new_condition_is_added_with_its_transition_time() {
        let mut c = Vec::new();
        assert!(set(
            &mut c,
            "Ready",
            "False",
            "Starting",
            "0/2",
            Some(1),
            at(0)
        ));
        let r = get(&c, "Ready").unwrap();
        assert_eq!(
            (r.status.as_str(), r.reason.as_str(), r.message.as_str()),
            ("False", "Starting", "0/2")
        );
        assert_eq!(
            (r.observed_generation, r.last_transition_time.0),
            (Some(1), at(0))
        );
        assert!(!is_true(&c, "Ready"));
        assert!(!is_true(&c, "Degraded"), "absent is not true");
        assert!(get(&c, "Degraded").is_none());
    }

    #[test]
    fn transition_time_is_kept_when_only_the_message_changes() {
        let mut c = Vec::new();
        set(&mut c, "Ready", "False", "Starting", "0/2", Some(1), at(0));
        assert!(set(
            &mut c,
            "Ready",
            "False",
            "Starting",
            "1/2",
            Some(1),
            at(5)
        ));
        assert_eq!(get(&c, "Ready").unwrap().last_transition_time.0, at(0));
        assert_eq!(get(&c, "Ready").unwrap().message, "1/2");
        // Reason and generation alone do not move it either.
        assert!(set(
            &mut c,
            "Ready",
            "False",
            "Waiting",
            "1/2",
            Some(2),
            at(6)
        ));
        let r = get(&c, "Ready").unwrap();
        assert_eq!(
            (r.last_transition_time.0, r.observed_generation),
            (at(0), Some(2))
        );
        assert_eq!(r.reason, "Waiting");
    }

    #[test]
    fn transition_time_moves_when_the_status_flips() {
        let mut c = Vec::new();
        set(&mut c, "Ready", "False", "Starting", "0/2", Some(1), at(0));
        assert!(set(
            &mut c,
            "Ready",
            "True",
            "AllReady",
            "2/2",
            Some(1),
            at(9)
        ));
        assert_eq!(get(&c, "Ready").unwrap().last_transition_time.0, at(9));
        assert!(is_true(&c, "Ready"));
        assert!(set(
            &mut c,
            "Ready",
            "Unknown",
            "NoData",
            "",
            Some(1),
            at(12)
        ));
        assert_eq!(get(&c, "Ready").unwrap().last_transition_time.0, at(12));
        assert!(!is_true(&c, "Ready"));
    }

    #[test]
    fn no_change_reports_false_and_other_types_are_untouched() {
        let mut c = Vec::new();
        set(&mut c, "Ready", "True", "AllReady", "2/2", Some(3), at(0));
        set(&mut c, "Degraded", "False", "Healthy", "", Some(3), at(0));
        let before = c.clone();
        assert!(!set(
            &mut c,
            "Ready",
            "True",
            "AllReady",
            "2/2",
            Some(3),
            at(50)
        ));
        assert_eq!(c, before, "nothing moved, not even the time");
        assert!(set(
            &mut c,
            "Degraded",
            "True",
            "RolloutFailed",
            "x",
            Some(3),
            at(50)
        ));
        assert_eq!(c.len(), 2);
        assert_eq!(get(&c, "Ready").unwrap(), &before[0]);
    }
}
