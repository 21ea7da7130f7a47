//! The task envelope: the fields of one work-stream entry, their encoding,
//! and the validation that decides whether an entry is a task at all.
//!
//! Owns the field names (binding for anything that writes to a work stream)
//! and the rejection reasons a malformed entry is dead-lettered with. Leaves
//! "is this step mine" to the consumer, which knows the workflow.
//!
//! | field | required | meaning |
//! |---|---|---|
//! | `task_id` | yes | stable id of the task across every step, retry and replay (`[A-Za-z0-9._:-]`, ≤ 128) |
//! | `payload` | yes | JSON the engine can read ([`parse_payload`]), at most the workflow's payload limit |
//! | `type` | no | `task` (default) or `compensate` |
//! | `step` | no | the agent this entry is for (absent: every consumer of the stream) |
//! | `traceparent` | no | W3C trace context of the hop that wrote the entry |
//! | `replays` | no | how many times the repair role replayed this task from the DLQ |
//! | `history` | no | JSON list of the attempts of earlier rounds (kept across replays) |
//! | `compensate` | with `type=compensate` | the compensation to run |
//! | `saga` | no | with `type=compensate`: JSON list of the compensations still to run after this one |
//! | `submitted_ms` | no | intake time, ms since the epoch |

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::queue::Fields;

pub const TASK_ID: &str = "task_id";
pub const PAYLOAD: &str = "payload";
pub const TYPE: &str = "type";
pub const STEP: &str = "step";
pub const TRACEPARENT: &str = "traceparent";
pub const REPLAYS: &str = "replays";
pub const HISTORY: &str = "history";
pub const COMPENSATE: &str = "compensate";
pub const SAGA: &str = "saga";
pub const SUBMITTED_MS: &str = "submitted_ms";

/// Longest accepted task id.
pub const MAX_TASK_ID: usize = 128;

/// Deepest nesting of arrays and objects in a payload. serde_json's recursion limit (128
/// open containers, counting the outermost as 1, refused at the 128th) is what the engine's
/// decoder enforces; this names it for the intake and the docs.
pub const MAX_DEPTH: usize = 127;

/// Why a payload is not one the engine can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadError {
    /// Larger than the workflow's payload limit.
    TooLarge { len: usize, limit: usize },
    /// Not JSON the engine reads: syntax, invalid UTF-8 in a string, a lone surrogate
    /// escape (`\ud800`), nesting deeper than [`MAX_DEPTH`], a number out of range.
    NotJson(String),
}

impl std::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PayloadError::TooLarge { len, limit } => {
                write!(f, "is {len} bytes, limit {limit}")
            }
            PayloadError::NotJson(e) => write!(f, "is not JSON: {e}"),
        }
    }
}

/// Check that `raw` is a payload the engine can read, without building it: the rules of
/// [`parse_payload`], by the same reader (serde_json's `deserialize_any`, which validates
/// every string and counts nesting), so the intake refuses exactly what the engine could not
/// read later.
pub fn check_payload(raw: &[u8], max_payload: usize) -> Result<(), PayloadError> {
    if raw.len() > max_payload {
        return Err(PayloadError::TooLarge {
            len: raw.len(),
            limit: max_payload,
        });
    }
    serde_json::from_slice::<Checked>(raw)
        .map(|_| ())
        .map_err(|e| PayloadError::NotJson(e.to_string()))
}

/// Read a payload: at most `max_payload` bytes of JSON (see [`PayloadError`]).
pub fn parse_payload(raw: &[u8], max_payload: usize) -> Result<serde_json::Value, PayloadError> {
    if raw.len() > max_payload {
        return Err(PayloadError::TooLarge {
            len: raw.len(),
            limit: max_payload,
        });
    }
    serde_json::from_slice(raw).map_err(|e| PayloadError::NotJson(e.to_string()))
}

/// A JSON value walked as `serde_json::Value` is built (`deserialize_any` all the way
/// down: strings decoded and validated, nesting counted) but kept nowhere.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> serde::de::Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

/// One delivery attempt, as kept in the attempt history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// Delivery count of the entry at this attempt (1-based).
    pub attempt: u64,
    /// Which replay round (0 = before any replay).
    #[serde(default)]
    pub round: u32,
    pub at_ms: u64,
    pub engine: String,
    pub error: String,
    /// `permanent` or `retryable`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
}

/// A compensation still to run (saga), in the order it must run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaStep {
    /// The agent that completed the step and runs its compensation.
    pub agent: String,
    /// The compensation's name (`saga.compensate`).
    pub compensate: String,
}

/// What an entry asks its consumer to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// Run the step.
    Task,
    /// Undo the step (saga): run `compensation`, then hand `rest` on.
    Compensate {
        compensation: String,
        rest: Vec<SagaStep>,
    },
}

/// A decoded task envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub task_id: String,
    pub kind: Kind,
    pub step: Option<String>,
    pub payload: serde_json::Value,
    pub traceparent: Option<String>,
    pub replays: u32,
    pub history: Vec<Attempt>,
    pub submitted_ms: Option<u64>,
}

/// Why an entry is not a task (the DLQ `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    Malformed,
    Oversized,
    UnknownType,
}

impl Reject {
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::Oversized => "oversized",
            Reject::UnknownType => "unknown_type",
        }
    }
}

/// A rejection with its one-line detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reject,
    pub detail: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.detail)
    }
}

fn reject(reason: Reject, detail: impl Into<String>) -> Rejection {
    Rejection {
        reason,
        detail: detail.into(),
    }
}

/// Whether `id` is an acceptable task id.
pub fn valid_task_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TASK_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a Bytes> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

fn text<'a>(fields: &'a Fields, name: &str) -> Result<Option<&'a str>, Rejection> {
    field(fields, name)
        .map(|b| {
            std::str::from_utf8(b)
                .map_err(|_| reject(Reject::Malformed, format!("field {name} is not UTF-8")))
        })
        .transpose()
}

impl Task {
    /// A fresh task as the intake writes it (without `task_id`, which
    /// [`crate::queue::Queue::submit_idempotent`] prepends, or with it for
    /// plain adds).
    pub fn new(task_id: impl Into<String>, payload: serde_json::Value) -> Self {
        Self {
            task_id: task_id.into(),
            kind: Kind::Task,
            step: None,
            payload,
            traceparent: None,
            replays: 0,
            history: Vec::new(),
            submitted_ms: None,
        }
    }

    /// Decode and validate an entry's fields. `max_payload` bounds the
    /// payload size in bytes.
    pub fn decode(fields: &Fields, max_payload: usize) -> Result<Self, Rejection> {
        let task_id =
            text(fields, TASK_ID)?.ok_or_else(|| reject(Reject::Malformed, "missing task_id"))?;
        if !valid_task_id(task_id) {
            return Err(reject(Reject::Malformed, "invalid task_id"));
        }
        let raw =
            field(fields, PAYLOAD).ok_or_else(|| reject(Reject::Malformed, "missing payload"))?;
        let payload = parse_payload(raw, max_payload).map_err(|e| {
            let reason = match e {
                PayloadError::TooLarge { .. } => Reject::Oversized,
                PayloadError::NotJson(_) => Reject::Malformed,
            };
            reject(reason, format!("payload {e}"))
        })?;
        let kind = match text(fields, TYPE)? {
            None | Some("task") => Kind::Task,
            Some("compensate") => {
                let compensation = text(fields, COMPENSATE)?
                    .filter(|c| !c.is_empty())
                    .ok_or_else(|| {
                        reject(Reject::Malformed, "compensate entry without compensate")
                    })?
                    .to_owned();
                let rest = match field(fields, SAGA) {
                    None => Vec::new(),
                    Some(b) => serde_json::from_slice(b)
                        .map_err(|e| reject(Reject::Malformed, format!("bad saga field: {e}")))?,
                };
                Kind::Compensate { compensation, rest }
            }
            Some(other) => {
                let mut shown = other.to_owned();
                shown.truncate(64);
                return Err(reject(
                    Reject::UnknownType,
                    format!("unknown task type {shown:?}"),
                ));
            }
        };
        let replays = match text(fields, REPLAYS)? {
            None => 0,
            Some(s) => s
                .parse()
                .map_err(|_| reject(Reject::Malformed, "replays is not a number"))?,
        };
        let history = match field(fields, HISTORY) {
            None => Vec::new(),
            Some(b) => serde_json::from_slice(b)
                .map_err(|e| reject(Reject::Malformed, format!("bad history field: {e}")))?,
        };
        Ok(Self {
            task_id: task_id.to_owned(),
            kind,
            step: text(fields, STEP)?.map(str::to_owned),
            payload,
            traceparent: text(fields, TRACEPARENT)?.map(str::to_owned),
            replays,
            history,
            submitted_ms: text(fields, SUBMITTED_MS)?.and_then(|s| s.parse().ok()),
        })
    }

    /// Encode as stream fields (`task_id` first).
    pub fn encode(&self) -> Fields {
        let mut f: Fields = Vec::with_capacity(8);
        f.push((TASK_ID.into(), Bytes::from(self.task_id.clone())));
        self.encode_rest(&mut f);
        f
    }

    /// Encode every field but `task_id` (for `submit_idempotent`).
    pub fn encode_without_id(&self) -> Fields {
        let mut f: Fields = Vec::with_capacity(8);
        self.encode_rest(&mut f);
        f
    }

    /// Encode with `payload` (JSON text the caller has validated) in place
    /// of `self.payload`: the intake stores a body as it came instead of
    /// parsing it into a value and printing it again. Without `task_id`
    /// when `with_id` is false (for `submit_idempotent`).
    pub fn encode_with_payload(&self, with_id: bool, payload: Bytes) -> Fields {
        let mut f: Fields = Vec::with_capacity(8);
        if with_id {
            f.push((TASK_ID.into(), Bytes::from(self.task_id.clone())));
        }
        self.encode_tail(&mut f, payload);
        f
    }

    fn encode_rest(&self, f: &mut Fields) {
        let payload =
            Bytes::from(serde_json::to_vec(&self.payload).unwrap_or_else(|_| b"null".to_vec()));
        self.encode_tail(f, payload);
    }

    fn encode_tail(&self, f: &mut Fields, payload: Bytes) {
        f.push((PAYLOAD.into(), payload));
        if let Kind::Compensate { compensation, rest } = &self.kind {
            f.push((TYPE.into(), Bytes::from_static(b"compensate")));
            f.push((COMPENSATE.into(), Bytes::from(compensation.clone())));
            if !rest.is_empty() {
                f.push((SAGA.into(), Bytes::from(json_bytes(rest))));
            }
        }
        if let Some(s) = &self.step {
            f.push((STEP.into(), Bytes::from(s.clone())));
        }
        if let Some(t) = &self.traceparent {
            f.push((TRACEPARENT.into(), Bytes::from(t.clone())));
        }
        if self.replays > 0 {
            f.push((REPLAYS.into(), Bytes::from(self.replays.to_string())));
        }
        if !self.history.is_empty() {
            f.push((HISTORY.into(), Bytes::from(json_bytes(&self.history))));
        }
        if let Some(ms) = self.submitted_ms {
            f.push((SUBMITTED_MS.into(), Bytes::from(ms.to_string())));
        }
    }
}

pub(crate) fn json_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_else(|_| b"null".to_vec())
}

/// Milliseconds since the Unix epoch, on tokio's clock: the wall clock read once, then advanced
/// by `tokio::time::Instant`. In a pod that is the wall clock (and monotonic); under `r4 run`'s
/// virtual clock it is simulated time, so backoffs, replay delays, ages and latencies measured
/// in milliseconds agree with the timers that drive the simulation.
pub fn now_ms() -> u64 {
    static ANCHOR: std::sync::OnceLock<(u64, tokio::time::Instant)> = std::sync::OnceLock::new();
    let (wall, mono) = *ANCHOR.get_or_init(|| {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        (wall, tokio::time::Instant::now())
    });
    let elapsed = tokio::time::Instant::now().saturating_duration_since(mono);
    wall.saturating_add(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::fields;

    #[test]
    fn round_trips() {
        let mut t = Task::new("t-1", serde_json::json!({"a": 1}));
        t.traceparent = Some("00-aa-bb-01".into());
        t.replays = 2;
        t.step = Some("coder".into());
        t.history = vec![Attempt {
            attempt: 1,
            round: 0,
            at_ms: 5,
            engine: "e".into(),
            error: "boom".into(),
            kind: "retryable".into(),
            tool: Some("bank".into()),
        }];
        t.kind = Kind::Compensate {
            compensation: "undo".into(),
            rest: vec![SagaStep {
                agent: "a".into(),
                compensate: "undo-a".into(),
            }],
        };
        assert_eq!(Task::decode(&t.encode(), 1024).unwrap(), t);
        assert_eq!(t.encode()[0].0, TASK_ID);
        let raw = Bytes::from_static(br#"{ "a" : 1 }"#);
        assert_eq!(
            Task::decode(&t.encode_with_payload(true, raw.clone()), 1024).unwrap(),
            t
        );
        let without = t.encode_with_payload(false, raw.clone());
        assert_eq!(without[0], (PAYLOAD.to_owned(), raw));
        assert_eq!(without[1..], t.encode_without_id()[1..]);
    }

    #[test]
    fn rejects_with_reasons() {
        let r = |f: Fields| Task::decode(&f, 16).unwrap_err();
        assert_eq!(r(fields([("payload", "{}")])).reason, Reject::Malformed);
        assert!(r(fields([("payload", "{}")])).detail.contains("task_id"));
        assert_eq!(
            r(fields([("task_id", "t"), ("payload", "{nope")])).reason,
            Reject::Malformed
        );
        assert_eq!(r(fields([("task_id", "t")])).reason, Reject::Malformed);
        assert_eq!(
            r(fields([("task_id", "a b"), ("payload", "{}")])).reason,
            Reject::Malformed
        );
        assert_eq!(
            r(fields([
                ("task_id", "t"),
                ("payload", "[1,2,3,4,5,6,7,8,9]")
            ]))
            .reason,
            Reject::Oversized
        );
        assert_eq!(
            r(fields([
                ("task_id", "t"),
                ("payload", "{}"),
                ("type", "launch")
            ]))
            .reason,
            Reject::UnknownType
        );
        let bad_utf8: Fields = vec![
            ("task_id".into(), Bytes::from_static(&[0xff, 0xfe])),
            ("payload".into(), Bytes::from_static(b"{}")),
        ];
        assert_eq!(r(bad_utf8).reason, Reject::Malformed);
        assert!(Task::decode(&fields([("task_id", "t"), ("payload", "{}")]), 16).is_ok());
    }
}

#[cfg(test)]
mod payload_tests {
    use super::*;

    fn nested(depth: usize) -> Vec<u8> {
        let mut v = vec![b'['; depth];
        v.extend(std::iter::repeat_n(b']', depth));
        v
    }

    /// Payloads the old intake let through and the engine then refused, and their neighbours.
    fn nasty() -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = vec![
            b"{\"s\": \"\xff\xfe\"}".to_vec(),
            b"{\"\xc3\": 1}".to_vec(),
            br#"{"s": "\ud800"}"#.to_vec(),
            br#"{"s": "\udc00x"}"#.to_vec(),
            br#"{"s": "\ud800\u0041"}"#.to_vec(),
            br#"{"\ud800": 1}"#.to_vec(),
            br#"{"s": "\ud83d\ude00"}"#.to_vec(),
            br#"{"s": "\u00e9"}"#.to_vec(),
            "{\"s\": \"é😀\"}".as_bytes().to_vec(),
            br#"{"n": 1e400}"#.to_vec(),
            br#"{"n": -0.0, "m": 18446744073709551615}"#.to_vec(),
            br#"{"s": "\x"}"#.to_vec(),
            b"{\"s\": \"a\x01b\"}".to_vec(),
            br#"{"a": 1,}"#.to_vec(),
            br#"{"a": 1} x"#.to_vec(),
            b"{}".to_vec(),
            b"".to_vec(),
        ];
        for d in [1, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 10_000] {
            v.push(nested(d));
            let mut obj = b"{\"a\":".to_vec();
            obj.extend(nested(d - 1));
            obj.push(b'}');
            v.push(obj);
        }
        v
    }

    #[test]
    fn the_check_and_the_parser_agree_on_every_payload() {
        for p in nasty() {
            let checked = check_payload(&p, 1 << 20);
            let parsed = parse_payload(&p, 1 << 20);
            assert_eq!(
                checked.is_ok(),
                parsed.is_ok(),
                "{:?}: check {checked:?}, parse {parsed:?}",
                String::from_utf8_lossy(&p)
            );
            let decoded = Task::decode(
                &vec![
                    (TASK_ID.into(), Bytes::from_static(b"t")),
                    (PAYLOAD.into(), Bytes::from(p.clone())),
                ],
                1 << 20,
            );
            assert_eq!(
                checked.is_ok(),
                decoded.is_ok(),
                "{:?}",
                String::from_utf8_lossy(&p)
            );
        }
    }

    #[test]
    fn refuses_bad_strings_and_deep_nesting_with_the_reason() {
        let e = check_payload(b"{\"s\": \"\xff\"}", 64).unwrap_err();
        assert!(e.to_string().starts_with("is not JSON:"), "{e}");
        let e = check_payload(br#"{"s": "\ud800"}"#, 64).unwrap_err();
        assert!(e.to_string().contains("hex escape"), "{e}");
        let e = check_payload(br#"{"s": "\udc00"}"#, 64).unwrap_err();
        assert!(e.to_string().contains("surrogate"), "{e}");
        assert!(check_payload(&nested(MAX_DEPTH), 1 << 10).is_ok());
        let e = check_payload(&nested(MAX_DEPTH + 1), 1 << 10).unwrap_err();
        assert!(e.to_string().contains("recursion limit"), "{e}");
        assert_eq!(
            check_payload(b"{\"a\": 1}", 4),
            Err(PayloadError::TooLarge { len: 8, limit: 4 })
        );
    }
}
