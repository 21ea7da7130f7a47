//! Bearer-token authentication of the intake API, and the client key spaces it gives.
//!
//! Off unless tokens are given. With tokens, every `/v1/…` request needs
//! `Authorization: Bearer <token>`; without one, or with a token that is not accepted, it is
//! answered `401` with `WWW-Authenticate: Bearer realm="r4-intake"` (plus
//! `error="invalid_token"` for a wrong one). Health and metrics stay open (probes and
//! scrapers carry no token).
//!
//! Where the tokens come from (the controller mounts `intake.auth.tokenSecretRef`):
//! [`TOKEN_FILE_ENV`] names a file, else [`TOKEN_ENV`] holds the text itself. The text holds
//! one token per line, or `<client>:<token>` to name the client; blank lines and lines
//! starting with `#` are skipped. A client named by no prefix is `t-<12 hex of SHA-256 of its
//! token>`, so rotating a token moves its client to a new key space unless it is named.
//!
//! Key spaces: with authentication on, an `Idempotency-Key` is stored as
//! `<client>/<key>` (client ids hold no `/`), so two clients reusing the same key never see
//! each other's task. Turning authentication on or off therefore starts fresh key spaces.
//!
//! Tokens are compared as SHA-256 digests in constant time, against every accepted token.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Environment variable holding the token text.
pub const TOKEN_ENV: &str = "R4_INTAKE_TOKEN";
/// Environment variable naming a file with the token text (wins over [`TOKEN_ENV`]).
pub const TOKEN_FILE_ENV: &str = "R4_INTAKE_TOKEN_FILE";
/// The `WWW-Authenticate` realm.
pub const REALM: &str = "r4-intake";
/// Longest client id.
pub const MAX_CLIENT_ID: usize = 64;

struct Accepted {
    digest: [u8; 32],
    client: String,
}

/// The tokens an intake accepts, each with its client id.
pub struct Tokens {
    accepted: Vec<Accepted>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let clients: Vec<&str> = self.accepted.iter().map(|a| a.client.as_str()).collect();
        f.debug_struct("Tokens").field("clients", &clients).finish()
    }
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization: Bearer …` header.
    Missing,
    /// A bearer token that is not accepted.
    Invalid,
}

impl AuthError {
    /// The `WWW-Authenticate` header value of the `401`.
    pub fn challenge(self) -> String {
        match self {
            AuthError::Missing => format!("Bearer realm=\"{REALM}\""),
            AuthError::Invalid => format!("Bearer realm=\"{REALM}\", error=\"invalid_token\""),
        }
    }

    /// The one-line reason of the `401`.
    pub fn message(self) -> &'static str {
        match self {
            AuthError::Missing => "authentication required: Authorization: Bearer <token>",
            AuthError::Invalid => "invalid bearer token",
        }
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Whether `c` may name a client: `[A-Za-z0-9._-]`, 1..=[`MAX_CLIENT_ID`].
pub fn valid_client_id(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= MAX_CLIENT_ID
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Tokens {
    /// Parse the token text (see the module docs). Errors name the line, never the token.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut accepted: Vec<Accepted> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (client, token) = match line.split_once(':') {
                Some((c, t)) => {
                    if !valid_client_id(c) {
                        return Err(format!(
                            "line {}: client id must be 1..={MAX_CLIENT_ID} of [A-Za-z0-9._-]",
                            n + 1
                        ));
                    }
                    (Some(c.to_owned()), t.trim())
                }
                None => (None, line),
            };
            if token.len() < 16 || token.bytes().any(|b| !b.is_ascii_graphic()) {
                return Err(format!(
                    "line {}: a token must be at least 16 printable ASCII characters",
                    n + 1
                ));
            }
            let digest = digest(token.as_bytes());
            let client = client.unwrap_or_else(|| format!("t-{}", &hex::encode(digest)[..12]));
            if accepted.iter().any(|a| a.client == client) {
                return Err(format!("line {}: client {client:?} named twice", n + 1));
            }
            accepted.push(Accepted { digest, client });
        }
        if accepted.is_empty() {
            return Err("no token".into());
        }
        Ok(Self { accepted })
    }

    /// The tokens from the environment (see the module docs); `None` when neither variable
    /// is set.
    pub fn from_env() -> Result<Option<Self>, String> {
        if let Some(path) = std::env::var_os(TOKEN_FILE_ENV).filter(|p| !p.is_empty()) {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("{TOKEN_FILE_ENV}={}: {e}", path.to_string_lossy()))?;
            return Self::parse(&text)
                .map(Some)
                .map_err(|e| format!("{TOKEN_FILE_ENV}: {e}"));
        }
        match std::env::var(TOKEN_ENV) {
            Ok(text) if !text.trim().is_empty() => Self::parse(&text)
                .map(Some)
                .map_err(|e| format!("{TOKEN_ENV}: {e}")),
            _ => Ok(None),
        }
    }

    /// The client an `Authorization` header value authenticates.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<&str, AuthError> {
        let token = authorization
            .and_then(bearer_token)
            .ok_or(AuthError::Missing)?;
        let presented = digest(token);
        // Compare with every token, whatever matched, so timing says nothing about which.
        let mut found = None;
        for a in &self.accepted {
            if bool::from(a.digest.ct_eq(&presented)) {
                found = Some(a.client.as_str());
            }
        }
        found.ok_or(AuthError::Invalid)
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive, RFC 6750).
fn bearer_token(v: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = v.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// The stored form of `client`'s idempotency key (see the module docs).
pub fn scoped_key(client: Option<&str>, key: &str) -> String {
    match client {
        Some(c) => format!("{c}/{key}"),
        None => key.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "alpha-token-0123456789";
    const B: &str = "bravo-token-0123456789";

    #[test]
    fn accepts_only_the_given_tokens() {
        let t = Tokens::parse(&format!("# clients\n\nbilling:{A}\n{B}\n")).unwrap();
        let h = |s: String| t.authenticate(Some(s.as_bytes()));
        assert_eq!(h(format!("Bearer {A}")), Ok("billing"));
        assert_eq!(h(format!("bearer  {A} ")), Ok("billing"));
        let derived = h(format!("Bearer {B}")).unwrap().to_owned();
        assert!(
            derived.starts_with("t-") && derived.len() == 14,
            "{derived}"
        );
        assert!(valid_client_id(&derived));
        assert_eq!(h(format!("Bearer {A}x")), Err(AuthError::Invalid));
        assert_eq!(h(format!("Basic {A}")), Err(AuthError::Missing));
        assert_eq!(h("Bearer ".into()), Err(AuthError::Missing));
        assert_eq!(t.authenticate(None), Err(AuthError::Missing));
        assert!(!format!("{t:?}").contains(A), "Debug shows no token");
    }

    #[test]
    fn refuses_bad_token_text_without_echoing_it() {
        for (text, says) in [
            ("", "no token"),
            ("short", "line 1: a token must be"),
            ("bad/id:0123456789abcdefgh", "line 1: client id"),
            (
                "c:0123456789abcdefgh\nc:0123456789abcdefgX",
                "line 2: client \"c\" named twice",
            ),
        ] {
            let e = Tokens::parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
            assert!(!e.contains("0123456789"), "{e}");
        }
    }

    #[test]
    fn key_spaces_of_clients_never_meet() {
        assert_eq!(scoped_key(None, "k"), "k");
        assert_eq!(scoped_key(Some("a"), "b/c"), "a/b/c");
        // A client id holds no '/', so the first '/' splits client and key unambiguously.
        assert!(!valid_client_id("a/b"));
        assert_ne!(scoped_key(Some("a"), "k"), scoped_key(Some("b"), "k"));
    }
}
