//! `r4 dev`'s local Kubernetes API: a development and test tool in the spirit of kwok and
//! envtest, judged by clients nobody here wrote (kubectl, kube-rs' watcher and Controller).
//!
//! It owns the generic API machinery: the object store with one global `resourceVersion`,
//! watch with a bounded history (410 Expired past it), discovery and OpenAPI v3, CRD
//! registration with schema defaulting/validation/CEL, the status subresource, finalizers,
//! garbage collection, Table output, and the HTTP server on loopback. It knows nothing of
//! r4's kinds beyond what CRDs register. The patch algorithms live in [`patch`] and [`apply`]
//! (pure functions); the [`kubelet`] (deployment controller + kubelet) is a separate loop that
//! reaches the API only through a kube `Client`, as on a cluster.
//!
//! Not here: authentication and authorization, admission webhooks, scheduling, protobuf,
//! aggregated APIs (see the README's conformance list).
//!
//! [`patch`] and [`apply`] are the pure write semantics the API server calls: the three PATCH
//! formats, and server-side apply with managed-fields bookkeeping. How a request maps onto them:
//!
//! | request | call |
//! | --- | --- |
//! | PATCH `application/merge-patch+json` | [`patch::merge_patch`], then [`apply::record_update`] |
//! | PATCH `application/json-patch+json` | [`patch::json_patch`], then `record_update` |
//! | PATCH `application/strategic-merge-patch+json` | 415 unless [`patch::smp_supported`]; [`patch::strategic_merge_patch`], then `record_update` |
//! | PATCH `application/apply-patch+yaml` (`fieldManager` required, `force`) | [`apply::server_side_apply`]; a conflict is a 409 with [`apply::ApplyError::status_message`] |
//! | POST, PUT | `record_update` (old `None` on create) |
//!
//! The list semantics come from [`patch::builtin_list_keys`] for both. What stays the
//! server's: defaulting, resetting `status` on the main resource (and everything but
//! `status` on `/status`) before these calls, and metadata it sets itself (uid,
//! resourceVersion, generation, timestamps), which no manager owns.

pub mod admit;
pub mod apply;
pub mod http;
pub mod kubeconfig;
pub mod kubelet;
pub mod openapi;
pub mod patch;
pub mod protobuf;
pub mod resources;
pub mod selector;
pub mod status;
pub mod store;
pub mod table;

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use store::Store;

/// Knobs of the dev API server (tests shrink them).
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Events kept for watches; a watch from before them gets 410 Expired.
    pub history: usize,
    /// How often a watch with `allowWatchBookmarks` gets a BOOKMARK.
    pub bookmark_interval: Duration,
    /// Longest watch (a client's `timeoutSeconds` may ask for less).
    pub max_watch: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            history: 4096,
            bookmark_interval: Duration::from_secs(30),
            max_watch: Duration::from_secs(1800),
        }
    }
}

struct Shared {
    store: Store,
    options: Options,
    addr: Mutex<Option<SocketAddr>>,
}

/// The API server's state, shared by every request.
#[derive(Clone)]
pub struct ApiState(Arc<Shared>);

impl ApiState {
    pub fn new(options: Options) -> Self {
        Self(Arc::new(Shared {
            store: Store::new(options.history),
            options,
            addr: Mutex::new(None),
        }))
    }

    pub fn store(&self) -> &Store {
        &self.0.store
    }

    pub fn options(&self) -> Options {
        self.0.options
    }

    fn addr_string(&self) -> String {
        let addr = match self.0.addr.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        };
        addr.map(|a| a.to_string()).unwrap_or_default()
    }

    /// Changes whenever the served resources (or their schemas) change: clients key their
    /// OpenAPI caches on it.
    fn registry_hash(&self, inner: &store::Inner) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for r in inner.registry.all() {
            r.group_resource().hash(&mut h);
            r.versions.hash(&mut h);
            if let Some(crd) = &r.crd {
                format!("{:?}", crd.schemas).hash(&mut h);
            }
        }
        h.finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(
        "refusing to listen on {0}: --listen must be a loopback address (127.0.0.1 or [::1]); the dev API has no authentication"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// The router serving the whole API.
pub fn router(state: ApiState) -> axum::Router {
    axum::Router::new()
        .fallback(http::handle)
        .layer(axum::extract::DefaultBodyLimit::max(8 << 20))
        .with_state(state)
}

/// Serve the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(a) = listener.local_addr()
        && let Ok(mut g) = state.0.addr.lock()
    {
        *g = Some(a);
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A running dev API server; dropping it (or [`Handle::stop`]) shuts it down.
pub struct Handle {
    pub addr: SocketAddr,
    pub state: ApiState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Handle {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop accepting requests; open watches get a second to end, then are cut.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(Duration::from_secs(1), &mut task).await {
            Ok(r) => r.unwrap_or(Ok(())),
            Err(_) => {
                task.abort();
                Ok(())
            }
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Start a dev API server on `addr` (port 0: any free port) on the current tokio runtime.
/// Refuses any address that is not loopback.
pub async fn start(addr: SocketAddr, options: Options) -> Result<Handle, DevError> {
    if !addr.ip().is_loopback() {
        return Err(DevError::NotLoopback(addr));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| DevError::Bind(addr, e))?;
    let bound = listener.local_addr().map_err(|e| DevError::Bind(addr, e))?;
    let state = ApiState::new(options);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, state.clone(), async move {
        let _ = stopped.await;
    }));
    Ok(Handle {
        addr: bound,
        state,
        stop: Some(stop),
        task: Some(task),
    })
}

/// A kube [`Client`](kube::Client) for the dev API at `url` (`http://127.0.0.1:PORT`): what the
/// kubelet and the tests use, as any client of a cluster would.
pub fn client(url: &str) -> Result<kube::Client, kube::Error> {
    let uri: ::http::Uri = url
        .parse()
        .map_err(|e: ::http::uri::InvalidUri| kube::Error::Service(Box::new(e)))?;
    kube::Client::try_from(kube::Config::new(uri))
}
