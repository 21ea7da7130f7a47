//! TLS end to end, against servers whose certificate a private CA (generated here) signed:
//! a redis-server on `--tls-port` reached through `rediss://`, and an `https://` tool reached
//! through the tool proxy. Trust is given by naming the CA, never by switching verification
//! off; without the CA both connections fail, and no error shows the password.

mod engine_common;
use engine_common::free_port;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use r4::engine::tools::{self, HttpToolOptions, ToolProxy};
use r4::queue::Queue;
use r4::queue::redis::{RedisConfig, RedisQueue};
use r4::resilience::HttpRequest;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// A CA and a certificate for `localhost` / `127.0.0.1` it signed, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: Vec<u8>,
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "r4 test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = leaf
            .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
            .unwrap();
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
            ca_pem: ca_cert.pem().into_bytes(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        std::fs::write(pki.path("ca.pem"), &pki.ca_pem).unwrap();
        std::fs::write(pki.path("cert.pem"), &pki.cert_pem).unwrap();
        std::fs::write(pki.path("key.pem"), &pki.key_pem).unwrap();
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A redis-server listening only on a TLS port, with a password.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PASSWORD: &str = "hunter2-redis-password";

async fn start_tls_redis(pki: &Pki) -> TlsRedis {
    let port = free_port();
    let p = |name: &str| pki.path(name).display().to_string();
    let child = Command::new(r4::testutil::REDIS_SERVER)
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .args([
            "--tls-cert-file",
            &p("cert.pem"),
            "--tls-key-file",
            &p("key.pem"),
        ])
        .args([
            "--tls-ca-cert-file",
            &p("ca.pem"),
            "--tls-auth-clients",
            "no",
        ])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--requirepass", PASSWORD, "--dir", &p("")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (make deps)");
    let server = TlsRedis { child, port };
    // Ready when a TLS client trusting the CA gets an answer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if connect_with_ca(&url(&server), &pki.ca_pem).await.is_ok() {
            return server;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "TLS redis-server not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn url(r: &TlsRedis) -> String {
    format!("rediss://:{PASSWORD}@127.0.0.1:{}/", r.port)
}

async fn connect_with_ca(url: &str, ca: &[u8]) -> Result<RedisQueue, r4::queue::QueueError> {
    let client = r4::tls::redis_client_with_ca(url, Some(ca))?;
    RedisQueue::connect_client(client, RedisConfig::default()).await
}

#[tokio::test]
async fn rediss_through_a_private_ca() {
    let pki = Pki::new();
    let redis = start_tls_redis(&pki).await;
    let q = connect_with_ca(&url(&redis), &pki.ca_pem).await.unwrap();
    q.add("s", r4::queue::fields([("task_id", "t-1")]), None)
        .await
        .unwrap();
    assert_eq!(q.len("s").await.unwrap(), 1, "commands go over TLS");

    // The webpki roots alone do not know the private CA: refused, and the error is clean.
    let e = RedisQueue::connect(&url(&redis)).await.unwrap_err();
    assert!(!e.to_string().contains(PASSWORD), "{e}");

    // The binary: R4_REDIS_CA_FILE makes the CA trusted; without it, a one-line refusal
    // that names the server and hides the password.
    let r4 = |ca: Option<&Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_r4"));
        cmd.args(["dlq", "list", "wf", "--redis", &url(&redis)])
            .env_remove("R4_REDIS_URL")
            .env_remove(r4::tls::REDIS_CA_FILE_ENV);
        if let Some(ca) = ca {
            cmd.env(r4::tls::REDIS_CA_FILE_ENV, ca);
        }
        cmd.output().unwrap()
    };
    let ok = r4(Some(&pki.path("ca.pem")));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = r4(None);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains(&format!(
            "cannot connect to rediss://:***@127.0.0.1:{}/",
            redis.port
        )),
        "{stderr}"
    );
    assert!(!stderr.contains(PASSWORD), "{stderr}");
    let bad_ca = r4(Some(&pki.path("key.pem")));
    let stderr = String::from_utf8_lossy(&bad_ca.stderr);
    assert!(!bad_ca.status.success());
    assert!(stderr.contains("R4_REDIS_CA_FILE"), "{stderr}");
}

/// An `https://` tool: answers 200 and records the `Authorization` header of each call.
async fn serve_https_tool(pki: &Pki, seen: Arc<Mutex<Vec<String>>>) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    r4::tls::install_crypto_provider();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(pki.cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/api",
        axum::routing::post(move |h: axum::http::HeaderMap| {
            let seen = seen.clone();
            async move {
                let a = h.get("authorization").and_then(|v| v.to_str().ok());
                seen.lock().unwrap().push(a.unwrap_or("").to_string());
                r#"{"ok": true}"#
            }
        }),
    );
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    port
}

#[tokio::test]
async fn https_tools_through_a_private_ca_with_credentials_from_a_secret() {
    let pki = Pki::new();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let port = serve_https_tool(&pki, seen.clone()).await;
    let spec: r4::api::workflow::AgentWorkflowSpec = serde_yaml::from_str(&format!(
        r#"
queue: {{redis: {{url: "redis://x"}}}}
tools:
  - name: bank
    url: "https://localhost:{port}/api"
    headersFrom: [{{name: Authorization, secretRef: {{name: bank-creds, key: token}}}}]
agents:
  - {{name: a, image: i, consumes: in, tools: [bank]}}
"#
    ))
    .unwrap();
    // The mounted Secret, as the controller lays it out.
    std::fs::create_dir(pki.path("bank")).unwrap();
    std::fs::write(pki.path("bank/authorization"), "Bearer bank-s3cret\n").unwrap();
    let headers = tools::load_tool_headers(&spec, &["bank".into()], pki.dir.path())
        .unwrap()
        .remove("bank")
        .unwrap();
    let call = |ca: Option<Vec<u8>>| {
        let spec = spec.clone();
        let headers = headers.clone();
        async move {
            let client = tools::http_client(ca.as_deref()).unwrap();
            let options = HttpToolOptions {
                headers,
                ..HttpToolOptions::default()
            };
            let proxy = ToolProxy::new(
                &spec,
                &Default::default(),
                &|_| tools::http_transport_with(client.clone(), options.clone()),
                None,
                None,
            )
            .unwrap();
            // The switch state as `supervise` would have read it: nothing killed.
            proxy.set_killed(Default::default());
            proxy
                .call(
                    &["bank".into()],
                    "bank",
                    HttpRequest::post("", b"{}".to_vec()),
                )
                .await
        }
    };
    let r = call(Some(pki.ca_pem.clone())).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(seen.lock().unwrap().as_slice(), ["Bearer bank-s3cret"]);
    // Without the CA the handshake fails: nothing reaches the tool, no URL in the answer.
    let r = call(None).await;
    assert_eq!(r.status, 502);
    let body = String::from_utf8_lossy(&r.body);
    assert!(
        !body.contains("localhost:") && !body.contains("s3cret"),
        "{body}"
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
}
