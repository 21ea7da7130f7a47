//! Secrets by reference only, and nothing secret in what r4 shows: on the real `r4 dev` binary
//! (API server, kubelet with real engines, controller; `R4_LOG_FORMAT=json`, `RUST_LOG=debug`
//! so that a leak is as likely as it gets), a workflow whose Redis URL (with a password, to a
//! real `redis-server --requirepass`) comes from `spec.queue.redis.urlSecretRef`, whose intake
//! takes a bearer token from a Secret, and whose tool has an `Authorization` header from a
//! Secret, runs until Ready and tasks flow through the authenticated intake. Then every log
//! line r4 dev wrote (controller, kubelet, engines: one process), every object but the Secrets
//! (specs, statuses, ConfigMaps, Deployments' env), every Event and what `r4 status` prints
//! (it reads the URL from the Secret) are searched for each secret value and for the URL with
//! the password: none may appear.
//!
//! Skipped with a message when kubectl is missing, except under CI.

mod support;

use support::{DevProcess, eventually_blocking, kubectl_present, repo};

use std::process::Command;
use std::time::Duration;

use r4::testutil::{RedisServer, RedisServerOptions};
use serde_json::Value;

/// `r4 dev` with its engines on `redis_url` (given as `R4_REDIS_URL`, as a Secret would give
/// it), logging JSON at debug level to `dev.log`.
fn start_dev(redis_url: &str) -> DevProcess {
    DevProcess::start(|cmd, dir| {
        let log = std::fs::File::create(dir.join("dev.log")).expect("dev.log");
        cmd.env("R4_REDIS_URL", redis_url)
            .env("R4_LOG_FORMAT", "json")
            .env("RUST_LOG", "debug")
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
    })
}

fn log(dev: &DevProcess) -> String {
    std::fs::read_to_string(dev.dir().join("dev.log")).expect("read dev.log")
}

/// The address the newest intake pod of `workflow` listens on (the kubelet logs it).
fn intake(dev: &DevProcess, workflow: &str) -> Option<String> {
    log(dev)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "intake listening" && v["workflow"] == workflow)
        .filter_map(|v| v["listen"].as_str().map(str::to_string))
        .next_back()
}

/// A Secret's `data` value (k8s-openapi's ByteString serialises as base64).
fn base64(s: &str) -> String {
    serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec()))
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .expect("base64")
}

fn manifest(redis_url: &str, intake_token: &str, bank_token: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: vault-redis}}
data: {{url: {url}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: vault-intake}}
data: {{token: {token}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: bank-creds}}
data: {{authorization: {bank}}}
---
apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {{name: vault}}
spec:
  queue:
    redis: {{urlSecretRef: {{name: vault-redis, key: url}}}}
  tools:
    - name: bank
      url: https://bank.example.com/v1/statements
      idempotent: true
      headersFrom: [{{name: Authorization, secretRef: {{name: bank-creds, key: authorization}}}}]
      simulate: {{latency: {{medianMs: 2}}}}
  agents:
    - name: triage
      image: ghcr.io/acme/triage:1.0
      consumes: tickets
      tools: [bank]
      simulate: {{latency: {{medianMs: 2}}, calls: [bank]}}
  intake:
    enabled: true
    auth: {{tokenSecretRef: {{name: vault-intake, key: token}}}}
"#,
        url = base64(redis_url),
        token = base64(intake_token),
        bank = base64(&format!("Bearer {bank_token}")),
    )
}

/// Every place a secret value must not be, as (where, text).
fn shown(dev: &DevProcess) -> Vec<(String, String)> {
    // `r4 status` reads the Redis URL from the Secret itself (for the breakers) and prints
    // what it found there: it is searched too.
    let status = Command::new(env!("CARGO_BIN_EXE_r4"))
        .args(["status", "vault"])
        .env("KUBECONFIG", dev.dir().join("kubeconfig"))
        .env("R4_LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .output()
        .expect("r4 status");
    let status = format!(
        "{}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(status.contains("breakers:"), "{status}");
    let mut out = vec![
        ("r4 dev's log".to_string(), log(dev)),
        ("r4 status".to_string(), status),
    ];
    let kinds = dev.ok(&["api-resources", "--verbs=list", "-o", "name"]);
    for kind in kinds.lines().filter(|k| *k != "secrets") {
        let list = dev.ok(&["get", kind, "-A", "-o", "json"]);
        out.push((format!("kubectl get {kind}"), list));
    }
    out
}

/// Runs the workflow with its three secrets and searches what r4 shows for each of them; the
/// lines where one was found.
fn run_and_search() -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let password = format!("redis-pw-{suffix}");
    let redis = rt
        .block_on(RedisServer::start_with(RedisServerOptions {
            password: Some(password.clone()),
            ..RedisServerOptions::default()
        }))
        .expect("redis-server --requirepass");
    let url = redis.url();
    assert!(url.contains(&password), "{url}");
    let intake_token = format!("intake-token-{suffix}");
    let bank_token = format!("bank-token-{suffix}");

    let dev = start_dev(&url);
    dev.ok(&["apply", "-f", repo("crds").to_str().expect("path")]);
    dev.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/agentworkflows.r4.dev",
        "--timeout=20s",
    ]);
    dev.ok_with(
        &["apply", "-f", "-"],
        Some(&manifest(&url, &intake_token, &bank_token)),
    );
    dev.ok(&["wait", "--for=condition=Ready", "aw/vault", "--timeout=90s"]);

    // Tasks flow through the authenticated intake: refused without the token, accepted and
    // completed with it.
    let addr = eventually_blocking(30, "the intake listening", || intake(&dev, "vault"));
    let client = reqwest::Client::new();
    let ids: Vec<String> = rt.block_on(async {
        let url = format!("http://{addr}/v1/tasks");
        let refused = client
            .post(&url)
            .json(&serde_json::json!({"ticket": 0}))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .expect("POST without a token");
        assert_eq!(refused.status(), 401);
        let mut ids = Vec::new();
        for i in 1..=5 {
            let r = client
                .post(&url)
                .bearer_auth(&intake_token)
                .json(&serde_json::json!({"ticket": i}))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .expect("POST a task");
            assert!(r.status().is_success(), "{}", r.status());
            let v: Value = r.json().await.expect("intake answer");
            ids.push(v["task_id"].as_str().expect("task_id").to_string());
        }
        ids
    });
    for id in &ids {
        eventually_blocking(30, "a task completed", || {
            rt.block_on(async {
                let r = client
                    .get(format!("http://{addr}/v1/tasks/{id}"))
                    .bearer_auth(&intake_token)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                    .ok()?;
                let v: Value = r.json().await.ok()?;
                (v["state"] == "completed").then_some(())
            })
        });
    }
    // The engines worked on the password-protected Redis (not a queue of their own).
    let keys = rt.block_on(async {
        let c = redis::Client::open(url.as_str()).expect("redis client");
        let mut con = c
            .get_multiplexed_async_connection()
            .await
            .expect("connect with the password");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("r4:*")
            .query_async(&mut con)
            .await
            .expect("KEYS");
        keys
    });
    assert!(!keys.is_empty(), "no r4 key in the workflow's Redis");

    let secrets = [
        password.clone(),
        url.clone(),
        url.replace("redis://", ""),
        intake_token.clone(),
        bank_token.clone(),
    ];
    let places = shown(&dev);
    // The search sees what it must: the engines' log lines, the tool's URL in the engine
    // ConfigMap, the workflow's status, its Events.
    let all: String = places.iter().map(|(_, t)| t.as_str()).collect();
    for canary in [
        "\"intake listening\"",
        "https://bank.example.com/v1/statements",
        "\"currentRevision\"",
        "\"involvedObject\"",
    ] {
        assert!(all.contains(canary), "{canary} is not in what was searched");
    }
    let mut found = Vec::new();
    for (place, text) in &places {
        for s in &secrets {
            if let Some(at) = text.find(s.as_str()) {
                let from = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let to = text[at..].find('\n').map_or(text.len(), |i| at + i);
                found.push(format!("{s:?} in {place}: {}", &text[from..to]));
            }
        }
    }
    found
}

#[test]
fn no_secret_in_logs_status_or_events() {
    if !kubectl_present() {
        return;
    }
    let found = run_and_search();
    assert!(found.is_empty(), "secrets shown:\n{}", found.join("\n"));
}
