//! Following a state kept in Redis and announced on a channel (kill switches, published
//! policies): subscribe, re-read after every (re)subscription, on every announcement and every
//! re-read period — so an announcement lost while the subscription was down cannot leave a
//! change unseen for longer than that period. What is read and how it is applied belongs to the
//! caller; this module owns only the loop.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use crate::queue::Queue;

/// How long a subscription may take before the loop re-reads and tries again.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Run until every receiver of `tx` is dropped: `reread(true)` right after each subscription
/// attempt (read after subscribing, so a change between the two is seen), and `reread(false)`
/// on every message and every `every`. `reread` applies what it read to `tx`.
pub(crate) async fn follow<T, F, Fut>(
    q: &dyn Queue,
    channel: &str,
    every: Duration,
    tx: &watch::Sender<T>,
    mut reread: F,
) where
    F: FnMut(bool) -> Fut,
    Fut: Future<Output = ()>,
{
    while !tx.is_closed() {
        let sub = tokio::time::timeout(SUBSCRIBE_TIMEOUT, q.subscribe(channel)).await;
        reread(true).await;
        let Ok(Ok(mut sub)) = sub else {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = tx.closed() => return,
            }
            continue;
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = sub.next() => if msg.is_none() { break },
                _ = tick.tick() => {},
                _ = tx.closed() => return,
            }
            reread(false).await;
        }
    }
}
