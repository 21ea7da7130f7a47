//! Leader election against the local API server of `r4 dev`, through kube clients only:
//! exactly one of two replicas leads; a leader killed without releasing is replaced within
//! the lease duration (+ one renew period); a leader shut down gracefully is replaced at once;
//! a leader cut off from the API stops leading before its lease expires.
//!
//! The lease library reads the wall clock (renewTime), so these run on real time with a 2 s
//! lease renewed every second; every wait polls with a deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use r4::controller::leader::{LeaderOptions, run_elected};
use r4::devcluster::{Handle, Options, start};
use tokio::sync::watch;

const LEASE: Duration = Duration::from_secs(2);
const RENEW: Duration = Duration::from_secs(1);
const NAMESPACE: &str = "r4-system";

/// How many replicas run `lead` right now, and the most ever at once.
#[derive(Default)]
struct Leading {
    now: AtomicUsize,
    max: AtomicUsize,
}

/// Decrements `Leading::now` when `lead` ends, also when its task is aborted.
struct Term(Arc<Leading>);

impl Drop for Term {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Elector {
    name: &'static str,
    task: tokio::task::JoinHandle<Result<(), r4::controller::leader::LeaderError>>,
    shutdown: watch::Sender<bool>,
    is_leader: watch::Receiver<bool>,
}

async fn api() -> Handle {
    // RUST_LOG=r4=debug,kube_lease_manager=debug shows each election step.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let h = start("127.0.0.1:0".parse().expect("addr"), Options::default())
        .await
        .expect("start the dev API");
    // The Lease lives in the controller's namespace, which must exist (as in a cluster).
    let client = r4::devcluster::client(&h.url()).expect("client");
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": NAMESPACE}}))
            .expect("namespace");
    kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
        .create(&Default::default(), &ns)
        .await
        .expect("create the namespace");
    h
}

fn elector(url: &str, name: &'static str, lease_name: &str, leading: Arc<Leading>) -> Elector {
    let client = r4::devcluster::client(url).expect("client");
    elector_with(client, name, lease_name, leading)
}

fn elector_with(
    client: kube::Client,
    name: &'static str,
    lease_name: &str,
    leading: Arc<Leading>,
) -> Elector {
    let opts = LeaderOptions {
        namespace: NAMESPACE.into(),
        lease_name: lease_name.into(),
        identity: format!("{name}-{}", uuid::Uuid::new_v4().simple()),
        lease_duration: LEASE,
        renew_every: RENEW,
    };
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (is_leader_tx, is_leader) = watch::channel(false);
    let task = tokio::spawn(run_elected(
        client,
        opts,
        shutdown_rx,
        is_leader_tx,
        move |mut stop: watch::Receiver<bool>| {
            let leading = leading.clone();
            async move {
                let n = leading.now.fetch_add(1, Ordering::SeqCst) + 1;
                leading.max.fetch_max(n, Ordering::SeqCst);
                let _term = Term(leading);
                let _ = stop.wait_for(|s| *s).await;
            }
        },
    ));
    Elector {
        name,
        task,
        shutdown,
        is_leader,
    }
}

/// Poll until `f` holds; how long it took. Fails after `within`.
async fn until(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

fn leaders(electors: &[&Elector]) -> Vec<&'static str> {
    electors
        .iter()
        .filter(|e| *e.is_leader.borrow())
        .map(|e| e.name)
        .collect()
}

/// For `during`, check at every poll that at most one replica leads; the leader at the end.
async fn hold_steady(electors: &[&Elector], leading: &Leading, during: Duration) -> &'static str {
    let start = Instant::now();
    let first = leaders(electors);
    assert_eq!(first.len(), 1, "exactly one leads: {first:?}");
    while start.elapsed() < during {
        let now = leaders(electors);
        assert_eq!(now, first, "leadership changed hands with no reason");
        assert!(leading.now.load(Ordering::SeqCst) <= 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leads_and_a_killed_leader_is_replaced_within_the_lease() {
    let h = api().await;
    let leading = Arc::new(Leading::default());
    let started = Instant::now();
    let a = elector(&h.url(), "a", "killed", leading.clone());
    let b = elector(&h.url(), "b", "killed", leading.clone());

    until(Duration::from_secs(10), "a leader", || {
        !leaders(&[&a, &b]).is_empty()
    })
    .await;
    println!("first leader elected after {:?}", started.elapsed());
    // Several renewals: the leader keeps the lease, the standby stays a standby.
    let leader = hold_steady(&[&a, &b], &leading, LEASE * 2).await;
    let (dead, standby) = if leader == "a" { (a, b) } else { (b, a) };

    // Kill the leader's task: no release, its renewals just stop.
    dead.task.abort();
    let killed_at = Instant::now();
    let _ = dead.task.await;
    let took = until(
        LEASE + RENEW + Duration::from_secs(3),
        "the standby to lead",
        || *standby.is_leader.borrow(),
    )
    .await;
    let takeover = killed_at.elapsed().max(took);
    println!(
        "takeover after the leader was killed: {takeover:?} (lease {LEASE:?}, renew {RENEW:?})"
    );
    assert!(
        takeover <= LEASE + RENEW + Duration::from_millis(500),
        "a killed leader must be replaced within the lease duration + one renew period: {takeover:?}"
    );
    assert_eq!(leading.now.load(Ordering::SeqCst), 1);
    assert_eq!(
        leading.max.load(Ordering::SeqCst),
        1,
        "never two leaders at once"
    );

    standby.shutdown.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), standby.task)
        .await
        .expect("returns on shutdown")
        .expect("task")
        .expect("no error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_hands_over_at_once() {
    let h = api().await;
    let leading = Arc::new(Leading::default());
    let a = elector(&h.url(), "a", "graceful", leading.clone());
    until(Duration::from_secs(10), "a to lead", || {
        *a.is_leader.borrow()
    })
    .await;
    // b starts as a standby behind a live leader.
    let b = elector(&h.url(), "b", "graceful", leading.clone());
    hold_steady(&[&a, &b], &leading, LEASE + RENEW).await;

    let stopped_at = Instant::now();
    a.shutdown.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), a.task)
        .await
        .expect("the leader returns on shutdown")
        .expect("task")
        .expect("no error");
    assert!(
        !*a.is_leader.borrow(),
        "is_leader is false once it returned"
    );
    let took = until(LEASE, "b to lead", || *b.is_leader.borrow()).await;
    let takeover = stopped_at.elapsed().max(took);
    println!("takeover after a graceful shutdown: {takeover:?} (lease {LEASE:?})");
    assert!(
        takeover < LEASE / 2,
        "a released lease is taken at once, not after the lease duration: {takeover:?}"
    );
    assert_eq!(
        leading.max.load(Ordering::SeqCst),
        1,
        "never two leaders at once"
    );

    // A standby shut down returns at once without ever leading.
    let leading_c = Arc::new(Leading::default());
    let c = elector(&h.url(), "c", "graceful", leading_c.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.shutdown.send_replace(true);
    tokio::time::timeout(Duration::from_secs(2), c.task)
        .await
        .expect("a standby returns on shutdown")
        .expect("task")
        .expect("no error");
    assert_eq!(leading_c.max.load(Ordering::SeqCst), 0);
    assert!(*b.is_leader.borrow(), "b still leads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_options_name_the_field() {
    let client = r4::devcluster::client("http://127.0.0.1:1").expect("client");
    let opts = LeaderOptions {
        renew_every: Duration::from_secs(5),
        lease_duration: Duration::from_secs(5),
        ..LeaderOptions::new("ns")
    };
    let (_s, shutdown) = watch::channel(false);
    let (tx, _rx) = watch::channel(false);
    let e = run_elected(client, opts, shutdown, tx, |_| async {})
        .await
        .expect_err("renew_every = lease_duration is refused");
    assert!(e.to_string().contains("renew_every"), "{e}");
}

/// A TCP proxy to `upstream` that can be frozen: from then on it forwards nothing (requests
/// hang, as to an API server behind a network partition) without closing a connection.
async fn freezable_proxy(upstream: std::net::SocketAddr) -> (String, watch::Sender<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (freeze, frozen) = watch::channel(false);
    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut frozen: watch::Receiver<bool>,
    ) {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = tokio::select! {
                r = from.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                () = async { drop(frozen.wait_for(|f| *f).await) } => std::future::pending().await,
            };
            if *frozen.borrow() {
                std::future::pending::<()>().await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let (dr, dw) = down.into_split();
            let (ur, uw) = up.into_split();
            tokio::spawn(pipe(dr, uw, frozen.clone()));
            tokio::spawn(pipe(ur, dw, frozen.clone()));
        }
    });
    (format!("http://{addr}"), freeze)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_stops_before_its_lease_expires() {
    let h = api().await;
    let leading = Arc::new(Leading::default());
    let (proxied, freeze) = freezable_proxy(h.addr).await;
    let a = elector(&proxied, "a", "partition", leading.clone());
    until(Duration::from_secs(10), "a to lead", || {
        *a.is_leader.borrow()
    })
    .await;
    let b = elector(&h.url(), "b", "partition", leading.clone());
    hold_steady(&[&a, &b], &leading, LEASE + RENEW).await;

    // Cut a off: its renewals hang instead of failing.
    let cut_at = Instant::now();
    freeze.send_replace(true);
    let stepped_down = until(LEASE + Duration::from_secs(2), "a to stop leading", || {
        !*a.is_leader.borrow()
    })
    .await;
    println!(
        "a leader cut off from the API stopped leading after {stepped_down:?} (lease {LEASE:?})"
    );
    // It stops half a renew period before its lease expires (the last renewal was at most
    // one renew period before the cut).
    assert!(
        stepped_down <= LEASE - RENEW / 2 + Duration::from_millis(200),
        "a leader that cannot renew stops before its lease expires: {stepped_down:?}"
    );
    let took = until(LEASE + RENEW + Duration::from_secs(3), "b to lead", || {
        *b.is_leader.borrow()
    })
    .await;
    println!(
        "takeover after the partition: {:?}",
        cut_at.elapsed().max(took)
    );
    assert_eq!(
        leading.max.load(Ordering::SeqCst),
        1,
        "the cut-off leader stopped before the standby started"
    );
    b.shutdown.send_replace(true);
    a.shutdown.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), a.task)
        .await
        .expect("a cut-off replica still returns on shutdown")
        .expect("task")
        .expect("no error");
}

/// The calls leader election makes are exactly the Lease calls listed for the RBAC role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_makes_exactly_the_lease_calls_in_the_role() {
    use r4::controller::rbac::{CALLS, audit, recording_client};
    let h = api().await;
    let leading = Arc::new(Leading::default());
    let (client, recorder) =
        recording_client(kube::Config::new(h.url().parse().expect("url"))).expect("client");
    let a = elector_with(client, "a", "audited", leading.clone());
    until(Duration::from_secs(10), "a to lead", || {
        *a.is_leader.borrow()
    })
    .await;
    // Renew at least once, then release on shutdown.
    let renewed = Instant::now();
    until(LEASE + RENEW, "a renewal", || {
        renewed.elapsed() > RENEW + RENEW / 2
    })
    .await;
    a.shutdown.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), a.task)
        .await
        .expect("returns on shutdown")
        .expect("task")
        .expect("no error");
    let lease_calls: Vec<_> = CALLS
        .iter()
        .filter(|c| c.resource == "leases")
        .cloned()
        .collect();
    let report = audit(&recorder.calls(), &lease_calls);
    assert!(report.is_clean(), "{report:?}");
}
