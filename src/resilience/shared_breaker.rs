//! Opt-in breaker state shared across replicas through Redis.
//!
//! When a replica's breaker opens, it writes the target's key with a TTL
//! equal to the open duration (`SET .. PX`) and publishes `"{ttl_ms} {target}"`
//! on the store's channel. Which key and which channel is the caller's
//! [`SharedBreakerKeys`]: this module names no key itself (the engine takes
//! both from `queue::Keys`, `r4:{ns/wf}:breaker:<tool>` and
//! `r4:{ns/wf}:breaker:chan`, so a tool named `dlq` cannot overwrite the
//! workflow's DLQ). Every attached
//! replica is subscribed to that channel and opens its local breaker for the
//! remaining time at once; it also polls the key's `PTTL` every
//! `poll_interval`, which covers replicas that started (or lost their
//! subscription) after the opening. One replica discovering an outage thus
//! spares the others from re-discovering it with their own failed calls.
//!
//! Keys expire by themselves, so a crashed replica can never leave the fleet
//! stuck open; each replica still runs its own half-open probes afterwards.
//! Redis being unreachable only degrades to per-replica breakers: errors are
//! logged and never fail a call.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, PubSubStream};
use tokio::task::JoinHandle;

use super::breaker::{Breaker, BreakerState};

/// Where a fleet's shared breaker state lives: the key of each target and the one channel
/// openings are announced on. Built by the caller, who owns key naming.
#[derive(Clone)]
pub struct SharedBreakerKeys {
    key: Arc<dyn Fn(&str) -> String + Send + Sync>,
    channel: String,
}

impl SharedBreakerKeys {
    /// `key(target)` names a target's key; `channel` the announcements.
    pub fn new(
        key: impl Fn(&str) -> String + Send + Sync + 'static,
        channel: impl Into<String>,
    ) -> Self {
        Self {
            key: Arc::new(key),
            channel: channel.into(),
        }
    }
}

#[derive(Clone)]
pub struct SharedBreakerStore {
    client: redis::Client,
    conn: ConnectionManager,
    keys: SharedBreakerKeys,
}

impl std::fmt::Debug for SharedBreakerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBreakerStore")
            .field("channel", &self.keys.channel)
            .finish()
    }
}

impl SharedBreakerStore {
    /// Connect to `redis_url` (e.g. `redis://127.0.0.1:6379`), keeping state under `keys`.
    pub async fn connect(redis_url: &str, keys: SharedBreakerKeys) -> redis::RedisResult<Self> {
        let client = crate::tls::redis_client(redis_url)?;
        let conn = ConnectionManager::new(client.clone()).await?;
        Ok(SharedBreakerStore { client, conn, keys })
    }

    fn key(&self, target: &str) -> String {
        (self.keys.key)(target)
    }

    fn channel(&self) -> String {
        self.keys.channel.clone()
    }

    /// Publish that `target` is open for `ttl` (key with TTL + event).
    pub async fn publish_open(&self, target: &str, ttl: Duration) -> redis::RedisResult<()> {
        let ms = ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
        let mut conn = self.conn.clone();
        conn.pset_ex::<_, _, ()>(self.key(target), "open", ms)
            .await?;
        conn.publish::<_, _, ()>(self.channel(), format!("{ms} {target}"))
            .await
    }

    /// Remaining shared open time for `target`, if any replica opened it.
    pub async fn remaining_open(&self, target: &str) -> redis::RedisResult<Option<Duration>> {
        let mut conn = self.conn.clone();
        let pttl: i64 = conn.pttl(self.key(target)).await?;
        // -2: no key, -1: key without TTL (not ours; ignore rather than
        // open forever).
        Ok((pttl > 0).then(|| Duration::from_millis(pttl as u64)))
    }

    /// One polling step: if the shared key is live, open `breaker` for the
    /// remaining time.
    pub async fn sync_once(&self, breaker: &Breaker) -> redis::RedisResult<()> {
        if let Some(rem) = self.remaining_open(breaker.target()).await? {
            breaker.force_open(rem);
        }
        Ok(())
    }

    async fn subscribe(&self) -> redis::RedisResult<PubSubStream> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(self.channel()).await?;
        Ok(pubsub.into_on_message())
    }

    /// Wire `breaker` to the store: publish its own openings, react to other
    /// replicas' openings (subscription, established before this returns),
    /// and poll every `poll_interval` as a backstop. Abort the returned
    /// handle to stop.
    pub async fn attach(
        &self,
        breaker: &Breaker,
        poll_interval: Duration,
    ) -> redis::RedisResult<JoinHandle<()>> {
        let messages = self.subscribe().await?;
        let store = self.clone();
        let target = breaker.target().to_string();
        let open_duration = breaker.config().open_duration;
        breaker.on_transition(move |t| {
            // Remote openings are not echoed back: the key already exists.
            if t.to != BreakerState::Open || t.remote {
                return;
            }
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let store = store.clone();
            let target = target.clone();
            rt.spawn(async move {
                if let Err(e) = store.publish_open(&target, open_duration).await {
                    tracing::warn!(breaker = %target, error = %e, "publishing breaker state failed");
                }
            });
        });
        let store = self.clone();
        let breaker = breaker.clone();
        Ok(tokio::spawn(async move {
            let mut messages = Some(messages);
            let mut tick = tokio::time::interval(poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let next_msg = async {
                    match messages.as_mut() {
                        Some(m) => m.next().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    msg = next_msg => match msg {
                        Some(msg) => {
                            let payload: String = msg.get_payload().unwrap_or_default();
                            if let Some((ms, t)) = payload.split_once(' ')
                                && t == breaker.target()
                                && let Ok(ms) = ms.parse::<u64>()
                            {
                                breaker.force_open(Duration::from_millis(ms));
                            }
                        }
                        None => {
                            tracing::warn!(breaker = breaker.target(), "breaker subscription lost; polling only");
                            messages = None;
                        }
                    },
                    _ = tick.tick() => {
                        if messages.is_none() {
                            messages = store.subscribe().await.ok();
                        }
                        if let Err(e) = store.sync_once(&breaker).await {
                            tracing::warn!(breaker = breaker.target(), error = %e, "reading shared breaker state failed");
                        }
                    }
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::config::{BreakerConfig, BreakerWindow};
    use crate::resilience::{FailureClass, Outcome, Telemetry};

    async fn connect(url: &str) -> SharedBreakerStore {
        let keys = SharedBreakerKeys::new(|t| format!("test:breaker:{t}"), "test:breaker:chan");
        SharedBreakerStore::connect(url, keys)
            .await
            .expect("connect to the test redis-server")
    }

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            failure_rate_threshold: 0.5,
            slow_call_rate_threshold: 1.0,
            slow_call_duration: Duration::from_secs(10),
            window: BreakerWindow::Count(4),
            minimum_calls: 4,
            open_duration: Duration::from_secs(30),
            half_open_calls: 1,
        }
    }

    /// Resolves when `b` next transitions to Open.
    fn opened(b: &Breaker) -> tokio::sync::oneshot::Receiver<bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        b.on_transition(move |t| {
            if t.to == BreakerState::Open
                && let Some(tx) = crate::resilience::lock(&tx).take()
            {
                let _ = tx.send(t.remote);
            }
        });
        rx
    }

    #[tokio::test]
    async fn replica_opening_opens_the_other() {
        // The harness waits until the server answers PING; `make test` installs redis-server.
        let server = crate::testutil::RedisServer::start()
            .await
            .expect("redis-server (run `make deps`)");
        let store_a = connect(&server.url()).await;
        let store_b = connect(&server.url()).await;
        let a = Breaker::new(cfg(), Telemetry::noop("tool-x"));
        let b = Breaker::new(cfg(), Telemetry::noop("tool-x"));
        let other = Breaker::new(cfg(), Telemetry::noop("tool-y"));
        // Hour-long poll interval: B can only learn through pub/sub.
        let hour = Duration::from_secs(3600);
        let ha = store_a.attach(&a, hour).await.unwrap();
        let hb = store_b.attach(&b, hour).await.unwrap();
        let ho = store_b.attach(&other, hour).await.unwrap();
        let b_opened = opened(&b);

        assert_eq!(b.state(), BreakerState::Closed);
        for _ in 0..4 {
            a.try_acquire()
                .unwrap()
                .complete(Outcome::Failure(FailureClass::Status5xx), Duration::ZERO);
        }
        assert_eq!(a.state(), BreakerState::Open);

        // B opens through the event, marked remote, and rejects calls.
        let remote = tokio::time::timeout(Duration::from_secs(5), b_opened)
            .await
            .expect("replica B opened within 5 s")
            .unwrap();
        assert!(remote);
        assert!(b.try_acquire().is_err());
        assert!(b.open_remaining().unwrap() > Duration::from_secs(25));
        // Other targets are unaffected.
        assert_eq!(other.state(), BreakerState::Closed);

        // The key carries a TTL, so it expires without anyone cleaning up,
        // and a replica that was not subscribed catches up by polling.
        let rem = store_b.remaining_open("tool-x").await.unwrap().unwrap();
        assert!(rem <= Duration::from_secs(30) && rem > Duration::from_secs(25));
        let late = Breaker::new(cfg(), Telemetry::noop("tool-x"));
        store_b.sync_once(&late).await.unwrap();
        assert_eq!(late.state(), BreakerState::Open);
        assert!(store_b.remaining_open("tool-z").await.unwrap().is_none());
        for h in [ha, hb, ho] {
            h.abort();
        }
        drop(server);
    }
}
