//! TLS end to end, against servers whose certificate a private CA (generated here) signed:
//! a redis-server on `--tls-port` reached through `rediss://`. Trust is given by naming the
//! CA, never by switching verification off; without the CA the connection fails, and no
//! error shows the password.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use r4::queue::Queue;
use r4::queue::redis::{RedisConfig, RedisQueue};
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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
