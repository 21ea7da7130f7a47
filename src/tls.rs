//! TLS for every outbound connection r4 opens: Redis (`rediss://`) and tools (`https://`).
//!
//! Owns the one rustls crypto provider of the process (`ring`, as kube uses) and the trust
//! anchors: the Mozilla roots compiled in (webpki-roots, so a distroless image needs no system
//! store), plus a CA bundle the user names. Certificate verification cannot be switched off:
//! the insecure modes of the redis crate are not compiled in, and reqwest is never told to
//! accept invalid certificates.
//!
//! - Redis: [`redis_client`] trusts the PEM bundle in `R4_REDIS_CA_FILE` (when set) instead
//!   of the webpki roots, for a Redis whose certificate a private CA signed.
//! - Tools: the engine's tool client trusts the bundle given with `--tools-ca-file`
//!   (`R4_TOOLS_CA_FILE`) in addition to the webpki roots ([`crate::engine::tools`]).
//!
//! Leaves which URL to open to its callers.

use std::path::Path;

/// Environment variable naming a PEM file of CA certificates to trust for `rediss://`.
pub const REDIS_CA_FILE_ENV: &str = "R4_REDIS_CA_FILE";

/// Make `ring` the process-wide rustls provider. Idempotent and cheap; every TLS client
/// builder of r4 calls it first, so no code path can meet rustls without a provider
/// (rustls panics then) or with two compiled in and none chosen.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err: another provider was installed first (a test harness, a library): keep it.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Read a PEM bundle of CA certificates; the error names the file and says what is wrong.
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    check_ca(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(pem)
}

/// A CA bundle must hold at least one PEM certificate: an empty trust store would only
/// fail every connection later, with a less helpful error.
fn check_ca(pem: &[u8]) -> Result<(), String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate in the bundle".into());
    }
    Ok(())
}

/// A Redis client for `url`: for `rediss://`, TLS trusting the CA bundle in
/// [`REDIS_CA_FILE_ENV`] if set, else the webpki roots. Every Redis connection of r4 is made
/// from a client built here.
pub fn redis_client(url: &str) -> redis::RedisResult<redis::Client> {
    let ca = match std::env::var_os(REDIS_CA_FILE_ENV) {
        Some(p) if !p.is_empty() && is_tls_url(url) => Some(
            read_ca_file(Path::new(&p))
                .map_err(|e| config_error(format!("{REDIS_CA_FILE_ENV}: {e}")))?,
        ),
        _ => None,
    };
    redis_client_with_ca(url, ca.as_deref())
}

/// [`redis_client`] with the CA bundle given (`None`: the webpki roots). A CA for a URL
/// that is not `rediss://` is an error: it says the user expected TLS and would not get it.
pub fn redis_client_with_ca(url: &str, ca_pem: Option<&[u8]>) -> redis::RedisResult<redis::Client> {
    if is_tls_url(url) {
        install_crypto_provider();
    }
    match ca_pem {
        None => redis::Client::open(url),
        Some(_) if !is_tls_url(url) => Err(config_error(
            "a CA file was given for a Redis URL without TLS; use rediss://".into(),
        )),
        Some(pem) => {
            check_ca(pem).map_err(config_error)?;
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.to_vec()),
                },
            )
        }
    }
}

fn is_tls_url(url: &str) -> bool {
    url.get(..9)
        .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"))
}

fn config_error(msg: String) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "TLS configuration",
        msg,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_without_tls_is_refused_and_plain_urls_open() {
        assert!(redis_client_with_ca("redis://127.0.0.1:1/", None).is_ok());
        let e = redis_client_with_ca("redis://127.0.0.1:1/", Some(b"x")).unwrap_err();
        assert!(e.to_string().contains("rediss://"), "{e}");
        assert!(redis_client_with_ca("rediss://127.0.0.1:1/", None).is_ok());
        assert!(redis_client_with_ca("REDISS://127.0.0.1:1/", Some(b"not pem")).is_err());
    }

    #[test]
    fn verification_cannot_be_switched_off() {
        // The redis crate's `#insecure` needs a feature r4 does not compile in.
        let c = redis_client_with_ca("rediss://127.0.0.1:1/#insecure", None).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt
            .block_on(c.get_multiplexed_async_connection())
            .unwrap_err();
        assert!(e.to_string().contains("insecure"), "{e}");
    }

    #[test]
    fn ca_files_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "hello").unwrap();
        assert!(
            read_ca_file(&p).unwrap_err().contains("no PEM certificate"),
            "{p:?}"
        );
        assert!(read_ca_file(&dir.path().join("nope")).is_err());
    }
}
