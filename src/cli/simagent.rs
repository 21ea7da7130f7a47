//! `r4 sim-agent`: the flags (each with an environment variable, so an image is configured by a
//! Deployment's `env`), the listen address, the start-up line and the stop on SIGTERM/SIGINT.
//! What the agent does is [`crate::local::simagent_server`]'s.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::sync::watch;

use super::{CliError, runtime};
use crate::local::simagent_server::{
    self as server, AGENT_PORT_ENV, Options, SimAgentServer, ToolTarget,
};

/// Arguments of `r4 sim-agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimAgentArgs {
    /// Address to serve POST /tasks, /healthz and /readyz on [default: 0.0.0.0:$R4_AGENT_PORT,
    /// else 0.0.0.0:8081]; port 0 = any free port (the address is printed).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Name in every output's `r4_sim.agent` and in the logs [default: $HOSTNAME, else
    /// sim-agent].
    #[arg(long, env = server::NAME_ENV)]
    pub name: Option<String>,
    /// Time each delivery takes: MEDIAN (`20ms`) or MEDIAN,P99 (`20ms,200ms`, log-normal).
    #[arg(long, env = server::LATENCY_ENV, default_value = "10ms", value_name = "MEDIAN[,P99]", value_parser = server::parse_latency)]
    pub latency: crate::api::workflow::LatencySpec,
    /// Share of task deliveries answered 503 (retryable: the engine retries, then dead-letters).
    #[arg(long, env = server::ERROR_RATE_ENV, default_value = "0", value_name = "FRACTION", allow_negative_numbers = true, value_parser = server::parse_rate)]
    pub error_rate: f64,
    /// Share of task deliveries answered 422 (permanent: dead-lettered at once); drawn first.
    #[arg(long, env = server::FAIL_PERMANENTLY_RATE_ENV, default_value = "0", value_name = "FRACTION", allow_negative_numbers = true, value_parser = server::parse_rate)]
    pub fail_permanently_rate: f64,
    /// Per task, POST <tools-url>/tools/TOOL[/path] with the task's Idempotency-Key and
    /// traceparent (repeat, or separate with commas); a failed tool answer fails the delivery
    /// (503, or 422 for a 4xx refusal), a degraded 2xx (r4-degraded) is passed on, marked.
    #[arg(long = "call", env = server::CALLS_ENV, value_name = "TOOL[/PATH]", value_delimiter = ',', value_parser = clap::value_parser!(ToolTarget))]
    pub calls: Vec<ToolTarget>,
    /// The engine's tool proxy.
    #[arg(long, env = server::TOOLS_URL_ENV, default_value = server::DEFAULT_TOOLS_URL, value_name = "URL", value_parser = server::parse_tools_url)]
    pub tools_url: String,
}

/// `r4 sim-agent …`: serve until SIGTERM/SIGINT, then finish the requests in flight.
pub fn sim_agent(args: SimAgentArgs) -> Result<ExitCode, CliError> {
    let port_env = std::env::var(AGENT_PORT_ENV).ok();
    let addr = server::listen_addr(args.listen, port_env.as_deref()).map_err(CliError::Usage)?;
    let name = args
        .name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "sim-agent".into());
    let opts = Options {
        name,
        latency: args.latency.clone(),
        error_rate: args.error_rate,
        fail_permanently_rate: args.fail_permanently_rate,
        calls: args.calls.clone(),
        tools_url: args.tools_url.clone(),
    };
    let agent = Arc::new(SimAgentServer::new(opts).map_err(CliError::Internal)?);
    runtime()?.block_on(async move {
        let signal = super::shutdown_signal();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| CliError::Io(format!("--listen {addr}"), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| CliError::Io(format!("--listen {addr}"), e))?;
        let o = agent.options();
        // Standard output says where it serves (a test or a script reads the port from it);
        // the log line says how it behaves.
        println!(
            "r4 sim-agent: {} serving POST /tasks on http://{bound} (SIGTERM stops it)",
            o.name
        );
        let calls: Vec<String> = o.calls.iter().map(ToString::to_string).collect();
        tracing::info!(
            agent = %o.name,
            listen = %bound,
            latency_median_ms = o.latency.median_ms,
            latency_p99_ms = o.latency.p99_ms.unwrap_or(o.latency.median_ms),
            error_rate = o.error_rate,
            fail_permanently_rate = o.fail_permanently_rate,
            calls = %calls.join(","),
            tools_url = %o.tools_url,
            "sim-agent started"
        );
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            signal.await;
            tracing::info!("stopping: finishing the deliveries in flight");
            let _ = tx.send(true);
        });
        agent
            .serve(listener, rx)
            .await
            .map_err(|e| CliError::Io(bound.to_string(), e))?;
        tracing::info!("sim-agent stopped");
        Ok(ExitCode::SUCCESS)
    })
}
