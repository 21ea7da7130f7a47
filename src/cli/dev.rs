//! `r4 dev`: the operator's loop on one machine — a local Kubernetes API that kubectl works
//! against (src/devcluster), a kubeconfig pointing at it, the local kubelet (Deployments get
//! pods, `r4 engine` containers run their role in process) and the controller.
//! For trying and testing, not a distribution.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::CliError;
use crate::controller::context::{Options, QueueSource};
use crate::controller::run::RunOptions;
use crate::devcluster::kubelet::{self, KubeletOptions};
use crate::devcluster::{self, kubeconfig};
use crate::queue::Queue;
use crate::queue::memory::MemoryQueue;
use crate::queue::redis::RedisQueue;

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Address of the API server; loopback only (it has no authentication).
    #[arg(long, default_value = "127.0.0.1:6443", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Redis for the queues of the engines the kubelet runs (default: one embedded queue).
    #[arg(long, env = "R4_REDIS_URL", hide_env_values = true)]
    pub redis: Option<String>,
    /// Where to write the kubeconfig for kubectl and kube clients.
    #[arg(long, default_value = "r4-dev.kubeconfig", value_name = "PATH")]
    pub kubeconfig_out: PathBuf,
    /// Do not run the controller (run `r4 controller` against this API yourself).
    #[arg(long)]
    pub no_controller: bool,
    /// Do not run the kubelet: Deployments get no pods and no engine runs (`r4 bench
    /// controller` measures the controller alone against this API).
    #[arg(long)]
    pub no_kubelet: bool,
    /// Seconds between two reconciles of a workflow for its statistics.
    #[arg(long, default_value_t = 2, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub stats_interval: u64,
    /// Address of the controller's /metrics, /healthz and /readyz (none by default).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

/// Start the API, write the kubeconfig, run until Ctrl-C.
pub fn dev(args: DevArgs) -> Result<ExitCode, CliError> {
    let rt = tokio::runtime::Runtime::new()
        .map_err(|e| CliError::Internal(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async move {
        let signal = super::shutdown_signal();
        let handle = devcluster::start(args.listen, devcluster::Options::default())
            .await
            .map_err(|e| CliError::Usage(e.to_string()))?;
        let path = &args.kubeconfig_out;
        kubeconfig::write(path, handle.addr)
            .map_err(|e| CliError::Io(path.display().to_string(), e))?;
        let shown = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        println!(
            "r4 dev: Kubernetes API at {} (Ctrl-C stops it)",
            handle.url()
        );
        println!("export KUBECONFIG={}", shown.display());
        tracing::info!(addr = %handle.addr, kubeconfig = %shown.display(), "dev API serving");
        // The kubelet reaches the API through a kube Client, as it would a cluster's.
        let client = devcluster::client(&handle.url())
            .map_err(|e| CliError::Internal(format!("kube client for {}: {e}", handle.url())))?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        // One queue for the kubelet's engines and the controller (which reads their stats and
        // acknowledgements and writes kill switches and policies there).
        let queue: Arc<dyn Queue> = match &args.redis {
            Some(url) => Arc::new(
                tokio::time::timeout(Duration::from_secs(10), RedisQueue::connect(url))
                    .await
                    .map_err(|_| CliError::Usage("--redis: no answer within 10s".into()))?
                    .map_err(|e| CliError::Usage(format!("--redis: {e}")))?,
            ),
            None => Arc::new(MemoryQueue::new()),
        };
        let opts = KubeletOptions {
            redis: args.redis.clone(),
            ..KubeletOptions::default()
        };
        let mut kubelet = if args.no_kubelet {
            None
        } else {
            Some(tokio::spawn(kubelet::run_on(
                client.clone(),
                opts,
                queue.clone(),
                stopped.clone(),
            )))
        };
        // The controller reaches the API through a kube Client too, as it would a cluster's.
        let mut controller = if args.no_controller {
            None
        } else {
            let opts = RunOptions {
                controller: Options {
                    queue: QueueSource::Shared(queue),
                    stats_interval: Duration::from_secs(args.stats_interval),
                    instance: Some("r4-dev".into()),
                    ..Options::default()
                },
                metrics_listen: args.metrics_listen,
                leader: None,
            };
            Some(tokio::spawn(crate::controller::run::run(
                client, opts, stopped,
            )))
        };
        let kubelet_ended = async {
            match kubelet.as_mut() {
                Some(k) => k.await,
                None => std::future::pending().await,
            }
        };
        let controller_ended = async {
            match controller.as_mut() {
                Some(c) => c.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = controller_ended => {
                let why = match r {
                    Ok(Ok(())) => "stopped".to_string(),
                    Ok(Err(e)) => e,
                    Err(e) => e.to_string(),
                };
                return Err(CliError::Usage(format!("r4 dev: the controller ended: {why}")));
            }
            _ = signal => {}
            r = kubelet_ended => {
                let why = match r {
                    Ok(Ok(())) => "stopped".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                return Err(CliError::Usage(format!("r4 dev: the kubelet ended: {why}")));
            }
        }
        // The kubelet gets a moment to stop its containers (engines checkpoint what is in
        // flight); a Ctrl-C is not held up longer than that.
        let _ = stop.send(true);
        if let Some(mut k) = kubelet
            && tokio::time::timeout(Duration::from_secs(3), &mut k)
                .await
                .is_err()
        {
            k.abort();
        }
        if let Some(mut c) = controller
            && tokio::time::timeout(Duration::from_secs(2), &mut c)
                .await
                .is_err()
        {
            c.abort();
        }
        handle
            .stop()
            .await
            .map_err(|e| CliError::Internal(format!("shutting down: {e}")))?;
        Ok(ExitCode::SUCCESS)
    })
}
