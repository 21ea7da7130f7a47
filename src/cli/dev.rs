//! `r4 dev`: the operator's loop on one machine — a local Kubernetes API that kubectl works
//! against (src/devcluster), a kubeconfig pointing at it, and (once they land) the kubelet and
//! the controller. For trying and testing, not a distribution.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use super::CliError;
use crate::devcluster::{self, Options, kubeconfig};

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Address of the API server; loopback only (it has no authentication).
    #[arg(long, default_value = "127.0.0.1:6443", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Redis for the workflows' queues (used by the kubelet's engines once it lands).
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
        // The Redis URL is for the engines the kubelet runs.
        let _redis = args.redis;
        // kubelet: started here once it lands (src/devcluster/kubelet.rs, a kube Client loop
        // against handle.url(), like any other client).
        // controller: started here once it lands, through the same kubeconfig.
        tokio::signal::ctrl_c()
            .await
            .map_err(|e| CliError::Internal(format!("cannot wait for Ctrl-C: {e}")))?;
        handle
            .stop()
            .await
            .map_err(|e| CliError::Internal(format!("shutting down: {e}")))?;
        Ok(ExitCode::SUCCESS)
    })
}
