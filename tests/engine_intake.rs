//! The intake API over real HTTP on a real redis-server: idempotency, size
//! and schema limits, status, health and metrics.

mod engine_common;

use std::sync::Arc;
use std::time::Duration;

use engine_common::*;
use r4::engine::Intake;
use serde_json::{Value, json};
use tokio::sync::watch;

#[tokio::test]
async fn intake_http_contract() {
    let (_b, q) = queue(true).await;
    let cfg = Arc::new(workflow(
        "intake",
        "    - {name: a, image: x, consumes: in, produces: [done]}",
        "  intake: {enabled: true, maxPayloadBytes: 1024}",
    ));
    let intake = Intake::new(cfg.clone(), q.clone(), "intake-t");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = watch::channel(false);
    let server = tokio::spawn(r4::engine::http::serve(listener, intake.router(), rx));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let post = |body: String, key: Option<&str>| {
        let mut r = http
            .post(format!("{base}/v1/tasks"))
            .body(body)
            .header("content-type", "application/json");
        if let Some(k) = key {
            r = r.header("Idempotency-Key", k);
        }
        r.send()
    };
    // Same key => same task id, one entry.
    let r1 = post(r#"{"ticket": 1}"#.into(), Some("k-1")).await.unwrap();
    assert_eq!(r1.status(), 202);
    let j1: Value = r1.json().await.unwrap();
    let r2 = post(r#"{"ticket": 1}"#.into(), Some("k-1")).await.unwrap();
    assert_eq!(r2.status(), 202);
    let j2: Value = r2.json().await.unwrap();
    assert_eq!(j1["task_id"], j2["task_id"]);
    assert_eq!(
        (j1["duplicate"].clone(), j2["duplicate"].clone()),
        (json!(false), json!(true))
    );
    let r3: Value = post(r#"{"ticket": 2}"#.into(), None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(r3["task_id"], j1["task_id"]);
    assert_eq!(q.len(&cfg.keys.stream("in")).await.unwrap(), 2);
    // Limits: size, JSON, object.
    let big = format!(r#"{{"x": "{}"}}"#, "y".repeat(2000));
    let r = post(big, None).await.unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.text().await.unwrap().contains("1024"));
    let r = post("not json".into(), None).await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("not JSON"));
    let r = post("[1, 2]".into(), None).await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("JSON object"));
    let r = post("{}".into(), Some(&"k".repeat(300))).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        q.len(&cfg.keys.stream("in")).await.unwrap(),
        2,
        "refused bodies add nothing"
    );
    // Status follows the task through the agent.
    let id = j1["task_id"].as_str().unwrap().to_owned();
    let st: Value = http
        .get(format!("{base}/v1/tasks/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["state"], "pending");
    let run = start_agents(&cfg, &q, &ScriptedAgent::ok());
    eventually("completed", Duration::from_secs(20), || async {
        let st: Value = http
            .get(format!("{base}/v1/tasks/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        st["state"] == "completed"
    })
    .await;
    assert_eq!(
        http.get(format!("{base}/v1/tasks/bad%20id"))
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    // Health and metrics.
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let m = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains(r#"r4_engine_tasks_total{agent="",outcome="completed"} 2"#),
        "{m}"
    );
    assert!(m.contains(r#"outcome="duplicate"} 1"#), "{m}");
    run.stop().await;
    let _ = stop.send(true);
    let _ = server.await;
}
