//! The tool proxy's audit log: every call is ONE `r4::audit` event — for a success, a failure,
//! a refusal and a degraded answer (kill switch, open breaker, fallback) — naming who, which
//! tool, the key, the outcome, degraded or not, the duration and the requests it cost, and
//! never a header value; with a stream, the same events in `r4:{ns/wf}:audit`, trimmed to the
//! retention.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use r4::engine::WorkflowConfig;
use r4::engine::tools::{ToolProxy, Transport};
use r4::resilience::{BoxError, HttpRequest, HttpResponse};
use r4::telemetry::audit::{Auditor, Who};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// Collects the fields of every `r4::audit` event.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<BTreeMap<String, String>>>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name().into(), format!("{v:?}"));
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().into(), v.into());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Events {
    fn on_event(&self, e: &tracing::Event<'_>, _: Context<'_, S>) {
        if e.metadata().target() == r4::telemetry::audit::TARGET {
            let mut m = BTreeMap::new();
            e.record(&mut Fields(&mut m));
            self.0.lock().unwrap().push(m);
        }
    }
}

impl Events {
    fn take(&self) -> Vec<BTreeMap<String, String>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

const SECRET: &str = "Bearer s3cr3t-t0ken";

/// `bank` answers 200 (read-only, with a static fallback), `ledger` 500, `flaky` never
/// connects (its breaker opens after two failures); every request carries a secret header.
fn proxy(sent: Arc<AtomicU32>) -> ToolProxy {
    let yaml = r#"apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {name: audited}
spec:
  queue: {redis: {url: "redis://127.0.0.1:6379"}}
  tools:
    - {name: bank, url: "http://bank/", idempotent: true, readOnly: true}
    - {name: ledger, url: "http://ledger/"}
    - {name: flaky, url: "http://flaky/", idempotent: true, policyRef: brk}
  agents:
    - {name: a, image: i, consumes: in, tools: [bank, ledger, flaky]}
---
apiVersion: r4.dev/v1alpha1
kind: CircuitPolicy
metadata: {name: brk}
spec:
  retry: {maxAttempts: 2, backoff: {initial: 1ms, max: 1ms, jitter: None}}
  circuitBreaker: {failureRateThreshold: 0.5, window: {type: Count, size: 2}, minimumCalls: 2, openDuration: 1h}
"#;
    let cfg = WorkflowConfig::from_yaml("test", yaml, None, Some("team")).unwrap();
    let transport = move |t: &r4::api::workflow::ToolSpec| -> Transport {
        let name = t.name.clone();
        let sent = sent.clone();
        BoxCloneService::new(tower::service_fn(move |mut req: HttpRequest| {
            let name = name.clone();
            sent.fetch_add(1, Ordering::SeqCst);
            // As a tool's `headersFrom` credential would be.
            req.headers.push(("authorization".into(), SECRET.into()));
            async move {
                match name.as_str() {
                    "bank" => Ok(HttpResponse::new(200, b"{\"statement\":42}".to_vec())),
                    "ledger" => Ok(HttpResponse::new(500, b"{\"error\":\"down\"}".to_vec())),
                    _ => Err(
                        r4::resilience::ResilienceError::Connect("connection refused".into())
                            .into(),
                    ) as Result<HttpResponse, BoxError>,
                }
            }
        }))
    };
    let p = cfg.tool_proxy(&transport, None, None).unwrap();
    p.set_killed(BTreeSet::new());
    p.with_audit(Auditor::new(Who {
        workflow: "team/audited".into(),
        agent: "a".into(),
        engine: "a-0".into(),
    }))
}

fn call(key: &str) -> HttpRequest {
    let mut r = HttpRequest::post(String::new(), b"{}".to_vec());
    r.headers.push(("idempotency-key".into(), key.into()));
    r.headers.push(("authorization".into(), SECRET.into()));
    r
}

#[tokio::test]
async fn every_call_is_one_audit_event() {
    let events = Events::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(events.clone()));
    let sent = Arc::new(AtomicU32::new(0));
    let p = proxy(sent.clone());
    let tools: Vec<String> = ["bank", "ledger", "flaky"].map(String::from).into();

    // Success.
    assert_eq!(p.call(&tools, "bank", call("t1:a")).await.status, 200);
    let e = events.take();
    assert_eq!(e.len(), 1, "{e:#?}");
    let ok = &e[0];
    for (k, v) in [
        ("workflow", "team/audited"),
        ("agent", "a"),
        ("engine", "a-0"),
        ("tool", "bank"),
        ("key", "t1:a"),
        ("outcome", "ok"),
        ("status", "200"),
        ("degraded", "false"),
        ("attempts", "1"),
    ] {
        assert_eq!(ok.get(k).map(String::as_str), Some(v), "{k}: {ok:#?}");
    }
    assert!(ok.contains_key("duration_ms"), "{ok:#?}");
    assert!(!ok.contains_key("error_class"), "{ok:#?}");

    // The tool's own failure (not idempotent: one request).
    assert_eq!(p.call(&tools, "ledger", call("t2:a")).await.status, 500);
    let e = events.take();
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_eq!(e[0]["outcome"], "error");
    assert_eq!(e[0]["error_class"], "http-5xx");
    assert_eq!(e[0]["degraded"], "false");

    // Connect errors, retried: two requests for one call; then the breaker opens.
    let before = sent.load(Ordering::SeqCst);
    let r = p.call(&tools, "flaky", call("t3:a")).await;
    assert_eq!(r.status, 502);
    assert_eq!(sent.load(Ordering::SeqCst) - before, 2);
    let e = events.take();
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_eq!(e[0]["error_class"], "connect-error");
    assert_eq!(e[0]["attempts"], "2");
    let deadline = Instant::now() + Duration::from_secs(5);
    let open = loop {
        let r = p.call(&tools, "flaky", call("t4:a")).await;
        let e = events.take();
        assert_eq!(e.len(), 1, "one event per call: {e:#?}");
        if r.header("r4-degraded") == Some("flaky; reason=breaker-open") {
            break e[0].clone();
        }
        assert!(Instant::now() < deadline, "the breaker never opened");
    };
    assert_eq!(open["outcome"], "error");
    assert_eq!(open["degraded"], "true");
    assert_eq!(open["reason"], "breaker-open");
    assert_eq!(open["error_class"], "breaker-open");
    assert_eq!(open["attempts"], "0", "an open breaker sends nothing");

    // Kill switch: refused, degraded, nothing sent.
    p.set_killed(BTreeSet::from(["ledger".to_string()]));
    let before = sent.load(Ordering::SeqCst);
    assert_eq!(p.call(&tools, "ledger", call("t5:a")).await.status, 503);
    assert_eq!(sent.load(Ordering::SeqCst), before);
    let e = events.take();
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_eq!(e[0]["outcome"], "refused");
    assert_eq!(e[0]["degraded"], "true");
    assert_eq!(e[0]["reason"], "killed");
    assert_eq!(e[0]["attempts"], "0");

    // Capability gating: refused, not degraded.
    assert_eq!(
        p.call(&["bank".into()], "ledger", call("t6:a"))
            .await
            .status,
        403
    );
    let e = events.take();
    assert_eq!(e[0]["outcome"], "refused");
    assert_eq!(e[0]["reason"], "not-allowed");
    assert_eq!(e[0]["degraded"], "false");

    // No event ever holds a header value.
    let all = format!("{ok:?}{e:?}{open:?}");
    assert!(!all.contains("s3cr3t"), "{all}");
}

#[tokio::test]
async fn the_audit_stream_keeps_the_last_n_events() {
    // A subscriber here too: a callsite first met on a thread without one could be cached as
    // uninteresting for the other test's thread (tracing's interest cache is global).
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(Events::default()));
    let redis = r4::testutil::RedisServer::start()
        .await
        .expect("redis-server (make deps)");
    let q: Arc<dyn r4::queue::Queue> = Arc::new(
        r4::queue::redis::RedisQueue::connect(&redis.url())
            .await
            .unwrap(),
    );
    let keys = r4::queue::Keys::new("team", "audited");
    let key = keys.audit();
    assert_eq!(key, "r4:{team/audited}:audit");
    let p = proxy(Arc::default()).with_audit(
        Auditor::new(Who {
            workflow: "team/audited".into(),
            agent: "a".into(),
            engine: "a-0".into(),
        })
        .with_stream(q.clone(), key.clone(), 3),
    );
    let tools: Vec<String> = ["bank", "ledger", "flaky"].map(String::from).into();
    for i in 0..5 {
        p.call(&tools, "bank", call(&format!("t{i}:a"))).await;
    }
    p.set_killed(BTreeSet::from(["bank".to_string()]));
    p.call(&tools, "bank", call("t5:a")).await;

    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let entries: Vec<(String, Vec<(String, String)>)> = loop {
        let v: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query_async(&mut con)
            .await
            .unwrap();
        let entries: Vec<_> = v
            .ids
            .into_iter()
            .map(|id| {
                let mut f: Vec<(String, String)> = id
                    .map
                    .into_iter()
                    .map(|(k, v)| (k, redis::from_redis_value::<String>(v).unwrap()))
                    .collect();
                f.sort();
                (id.id, f)
            })
            .collect();
        let has_last = entries
            .iter()
            .any(|(_, f)| f.contains(&("key".into(), "t5:a".into())));
        if has_last {
            break entries;
        }
        assert!(
            Instant::now() < deadline,
            "the last event never reached the stream: {entries:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(entries.len(), 3, "trimmed to the retention: {entries:#?}");
    let keys: Vec<&str> = entries
        .iter()
        .filter_map(|(_, f)| f.iter().find(|(k, _)| k == "key").map(|(_, v)| v.as_str()))
        .collect();
    assert_eq!(
        keys,
        ["t3:a", "t4:a", "t5:a"],
        "the last three, in call order"
    );
    let last: BTreeMap<_, _> = entries[2].1.iter().cloned().collect();
    assert_eq!(last["tool"], "bank");
    assert_eq!(last["outcome"], "refused");
    assert_eq!(last["degraded"], "true");
    assert_eq!(last["reason"], "killed");
    assert_eq!(last["workflow"], "team/audited");
    assert_eq!(last["engine"], "a-0");
    let all = format!("{entries:?}");
    assert!(!all.contains("s3cr3t"), "{all}");
}
