//! `r4 dev`: the operator's loop on one machine — a local Kubernetes API that kubectl works
//! against (src/devcluster), a kubeconfig pointing at it, the local kubelet (Deployments get
//! pods, `r4 engine` containers run their role in process) and, once it lands, the controller.
//! For trying and testing, not a distribution.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use super::CliError;
use crate::devcluster::kubelet::{self, KubeletOptions};
use crate::devcluster::{self, Options, kubeconfig};

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
}

/// Start the API, write the kubeconfig, run until Ctrl-C.
pub fn dev(args: DevArgs) -> Result<ExitCode, CliError> {
    let rt = tokio::runtime::Runtime::new()
        .map_err(|e| CliError::Internal(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async move {
        let signal = super::shutdown_signal();
        let handle = devcluster::start(args.listen, Options::default())
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
        let opts = KubeletOptions {
            redis: args.redis,
            ..KubeletOptions::default()
        };
        let mut kubelet = tokio::spawn(kubelet::run(client, opts, stopped));
        // controller: started here once it lands, through the same kind of client.
        tokio::select! {
            _ = signal => {}
            r = &mut kubelet => {
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
        if tokio::time::timeout(std::time::Duration::from_secs(3), &mut kubelet)
            .await
            .is_err()
        {
            kubelet.abort();
        }
        handle
            .stop()
            .await
            .map_err(|e| CliError::Internal(format!("shutting down: {e}")))?;
        Ok(ExitCode::SUCCESS)
    })
}
