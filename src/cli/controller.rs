//! `r4 controller`: the operator on a cluster (or any Kubernetes API the kubeconfig names).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::CliError;
use crate::controller::context::{Options, QueueSource, default_engine_image};
use crate::controller::leader::LeaderOptions;
use crate::controller::run::{RunOptions, run};
use crate::queue::redis::RedisQueue;

/// Arguments of `r4 controller`.
#[derive(clap::Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Image of the engine the children run (sidecar, intake, repair); normally this image.
    #[arg(long, env = "R4_ENGINE_IMAGE", default_value_t = default_engine_image())]
    pub engine_image: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080", value_name = "ADDR")]
    pub metrics_listen: SocketAddr,
    /// Lead only while holding the Lease `r4-controller` (run two or more replicas).
    #[arg(long)]
    pub leader_elect: bool,
    /// Namespace of the Lease (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "r4-system")]
    pub lease_namespace: String,
    /// This replica's identity in the Lease; default: the pod's name (else the host name) and
    /// a random suffix.
    #[arg(long)]
    pub identity: Option<String>,
    /// Seconds between two reconciles of a workflow for its statistics (queue, SLO, cost, analysis).
    #[arg(long, default_value_t = 10, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub stats_interval: u64,
    /// One Redis for every workflow, whatever its spec says (testing; normally each workflow's
    /// `spec.queue.redis` is used).
    #[arg(long, hide_env_values = true)]
    pub redis: Option<String>,
}

pub fn controller(args: ControllerArgs) -> Result<ExitCode, CliError> {
    let rt = super::runtime()?;
    rt.block_on(async move {
        let signal = super::shutdown_signal();
        let config = tokio::time::timeout(Duration::from_secs(10), kube::Config::infer())
            .await
            .map_err(|_| CliError::Usage("kubeconfig: no answer within 10s".into()))?
            .map_err(|e| CliError::Usage(format!("kubeconfig: {e}")))?;
        // Every request is counted by (verb, group, resource) for /metrics — the same
        // recording the RBAC audit uses, so the two cannot disagree on what a call is.
        let (client, api_requests) = crate::controller::rbac::recording_client(config)
            .map_err(|e| CliError::Usage(format!("kubeconfig: {e}")))?;
        let queue = match &args.redis {
            None => QueueSource::Spec,
            Some(url) => QueueSource::Shared(Arc::new(
                RedisQueue::connect(url)
                    .await
                    .map_err(|e| CliError::Usage(format!("--redis: {e}")))?,
            )),
        };
        let identity = args
            .identity
            .clone()
            .unwrap_or_else(crate::controller::leader::default_identity);
        let opts = RunOptions {
            controller: Options {
                engine_image: args.engine_image.clone(),
                engine_env: crate::controller::context::forwarded_engine_env(|k| {
                    std::env::var(k).ok()
                }),
                stats_interval: Duration::from_secs(args.stats_interval),
                queue,
                instance: Some(identity.clone()),
                api_requests: Some(api_requests),
                ..Options::default()
            },
            metrics_listen: Some(args.metrics_listen),
            leader: args.leader_elect.then(|| LeaderOptions {
                identity: identity.clone(),
                ..LeaderOptions::new(args.lease_namespace.clone())
            }),
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut task = tokio::spawn(run(client, opts, stopped));
        tokio::select! {
            _ = signal => {}
            r = &mut task => {
                return match r {
                    Ok(Ok(())) => Ok(ExitCode::SUCCESS),
                    Ok(Err(e)) => Err(CliError::Usage(e)),
                    Err(e) => Err(CliError::Internal(e.to_string())),
                };
            }
        }
        tracing::info!("shutting down: finishing the reconciles in progress");
        let _ = stop.send(true);
        if tokio::time::timeout(Duration::from_secs(20), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
        Ok(ExitCode::SUCCESS)
    })
}
