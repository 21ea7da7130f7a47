//! Redaction of secrets from text r4 prints, logs or hands to an agent.
//!
//! A URL may carry a password (`redis://:hunter2@redis:6379`, `https://user:pw@tool`) or a
//! token in its query (`redis+unix:///run/redis.sock?pass=…`, `https://tool/api?key=…`).
//! [`redact_url`] keeps what an operator needs to find the endpoint — scheme, user name,
//! host, port, path — and replaces the password and the whole query with `***`. Every
//! message that names a Redis or tool URL goes through it; reqwest errors are stripped of
//! their URL instead (`reqwest::Error::without_url`).

/// `url` with the userinfo password and the query (and fragment) replaced by `***`.
///
/// Works on text that is not a well-formed URL too (it never fails): anything between the
/// scheme and the last `@` of the authority is treated as userinfo.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let host = match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = match userinfo.find(':') {
                Some(c) => format!("{}:***", &userinfo[..c]),
                // A lone userinfo is a password for Redis (`redis://secret@host`).
                None if scheme.starts_with("redis") => "***".to_string(),
                None => userinfo.to_string(),
            };
            format!("{user}@{}", &authority[at + 1..])
        }
        None => authority.to_string(),
    };
    let path_end = tail.find(['?', '#']).unwrap_or(tail.len());
    let (path, query) = tail.split_at(path_end);
    let query = if query.is_empty() { "" } else { "?***" };
    format!("{scheme}{host}{path}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_passwords_and_queries() {
        for (url, want) in [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0"),
            (
                "rediss://default:hunter2@redis.prod:6380",
                "rediss://default:***@redis.prod:6380",
            ),
            ("redis://hunter2@redis", "redis://***@redis"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=hunter2",
                "redis+unix:///run/redis.sock?***",
            ),
            (
                "https://user:p%40ss@tool.example/api?key=hunter2#frag",
                "https://user:***@tool.example/api?***",
            ),
            (
                "https://tool.example?key=hunter2",
                "https://tool.example?***",
            ),
            ("https://bot@tool.example/x", "https://bot@tool.example/x"),
            ("a:b:c@d@host/p", "a:***@host/p"),
            ("", ""),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
            assert!(!redact_url(url).contains("hunter2"), "{url}");
        }
    }

    #[test]
    fn never_leaks_a_password_whatever_its_characters() {
        // xorshift: a fixed, dependency-free sequence.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut pick = |set: &[&str]| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            set[(state % set.len() as u64) as usize].to_string()
        };
        let secret_chars = [
            "a", "Z", ":", "@", "%40", "!", "$", "&", "(", "*", "+", ",", ";", "=",
        ];
        for _ in 0..20_000 {
            let scheme = pick(&[
                "redis://",
                "rediss://",
                "https://",
                "http://",
                "redis+unix://",
            ]);
            let user = pick(&["", "user", "default"]);
            let password: String = (0..4).map(|_| pick(&secret_chars)).collect::<String>()
                + "hunter2"
                + &pick(&secret_chars);
            let host = pick(&["redis", "10.0.0.1:6379", "[::1]:6380", "tool.example", ""]);
            let path = pick(&["", "/", "/0", "/api/v", "/mcp"]);
            let query = pick(&["", "?k=hunter2", "?a=b&pass=hunter2", "#hunter2", "?"]);
            let url = format!("{scheme}{user}:{password}@{host}{path}{query}");
            let out = redact_url(&url);
            assert!(!out.contains("hunter2"), "{url} -> {out}");
            assert!(out.contains(&host), "{url} -> {out}: the host is kept");
        }
    }
}
