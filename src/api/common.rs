//! Small value types shared by the three kinds: durations written the way users write them
//! (`150ms`, `2s`, `5m`, `168h`, `1h30m`), secret references and the patterns the schemas use.
//!
//! The duration grammar is a subset of Go's `time.ParseDuration`, so the API server's CEL
//! `duration()` function and r4 agree on every value the schema admits.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Pattern of a DNS-1123 label (names of agents, tools, streams, workflows).
pub const DNS_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// Pattern of a duration (`150ms`, `2s`, `5m`, `168h`, `1h30m`).
pub const DURATION: &str = r"^([0-9]+(ms|s|m|h))+$";
/// Pattern of an http(s) URL.
pub const HTTP_URL: &str = r"^https?://[^\s/$.?#][^\s]*$";
/// Pattern of a Redis URL.
pub const REDIS_URL: &str = r"^(redis|rediss|redis\+unix|unix)://[^\s]*$";

/// A duration as users write it: one or more `<digits><unit>` groups, units `ms`, `s`, `m`, `h`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DurationStr(pub String);

impl DurationStr {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// Parse into a [`Duration`]; the error says what is wrong with the text.
    pub fn parse(&self) -> Result<Duration, String> {
        parse_duration(&self.0)
    }
}

impl fmt::Display for DurationStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for DurationStr {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION,
            "maxLength": 32,
        })
    }
}

/// Parse `150ms`, `2s`, `5m`, `168h`, `1h30m` into a [`Duration`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total = Duration::ZERO;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(format!(
                "invalid duration {s:?}: expected digits at offset {start}"
            ));
        }
        let n: u64 = s[start..i]
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let part = match &s[unit_start..i] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => n
                .checked_mul(60)
                .map(Duration::from_secs)
                .ok_or_else(|| format!("invalid duration {s:?}: too large"))?,
            "h" => n
                .checked_mul(3600)
                .map(Duration::from_secs)
                .ok_or_else(|| format!("invalid duration {s:?}: too large"))?,
            "" => {
                return Err(format!(
                    "invalid duration {s:?}: missing unit (ms, s, m, h)"
                ));
            }
            u => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {u:?} (ms, s, m, h)"
                ));
            }
        };
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
    }
    Ok(total)
}

/// A key of a Kubernetes Secret in the same namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        length(max = 253)
    )]
    pub name: String,
    /// Key inside the Secret whose value is used.
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(max = 253))]
    pub key: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_units_users_write() {
        assert_eq!(parse_duration("150ms"), Ok(Duration::from_millis(150)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("168h"), Ok(Duration::from_secs(168 * 3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn refuses_what_the_pattern_refuses() {
        let re = regex::Regex::new(DURATION).unwrap();
        for bad in ["", "5", "ms", "1d", "1.5s", "-1s", "1 s", "1sm"] {
            assert!(parse_duration(bad).is_err() || !re.is_match(bad), "{bad}");
            assert!(
                !re.is_match(bad),
                "{bad} should not match the schema pattern"
            );
        }
        assert!(parse_duration("99999999999999999999h").is_err());
    }
}
