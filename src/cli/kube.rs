//! What every `r4` subcommand that talks to a cluster shares: the `--kubeconfig`, `--context`
//! and `-n/--namespace` flags, loading the kubeconfig the way kubectl does, and turning each API
//! call into one bounded await whose failure is one line a person can act on.
//!
//! Owns: where the kubeconfig comes from (`--kubeconfig`, else `KUBECONFIG`, else
//! `~/.kube/config`, else the pod's service account — kube-rs' loader, as kubectl's), which
//! namespace a command acts in (the flag, else the context's, else `default`), the per-call
//! deadline [`API_DEADLINE`], and the wording of API failures. What a command reads or patches
//! is its own module's business.

use std::fmt::Display;
use std::path::PathBuf;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};

use super::CliError;

/// Deadline of every call to the Kubernetes API (and of connecting to it).
pub const API_DEADLINE: Duration = Duration::from_secs(10);

/// The field manager of every change the CLI makes through the API.
pub const FIELD_MANAGER: &str = "r4-cli";

/// How to reach the cluster, as kubectl's flags of the same names.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KubeArgs {
    /// The kubeconfig to use (default: $KUBECONFIG, else ~/.kube/config, else in-cluster).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// Namespace of the workflow (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, value_name = "NS")]
    pub namespace: Option<String>,
}

/// A client of one cluster, with the namespace the command acts in.
#[derive(Clone)]
pub struct Kube {
    pub client: kube::Client,
    /// The namespace the command acts in.
    pub namespace: String,
    /// The API server's URL, for messages.
    pub server: String,
}

impl Kube {
    /// Load the kubeconfig `args` name and build a client; nothing is sent yet.
    pub async fn connect(args: &KubeArgs) -> Result<Self, CliError> {
        let mut config = load_config(args).await?;
        // kube's own timeouts too, so a half-open connection cannot outlive the deadline.
        config.connect_timeout = Some(API_DEADLINE);
        config.read_timeout = Some(API_DEADLINE);
        config.write_timeout = Some(API_DEADLINE);
        let server = config.cluster_url.to_string();
        let namespace = match &args.namespace {
            Some(ns) if ns.is_empty() => {
                return Err(CliError::Usage("--namespace must not be empty".into()));
            }
            Some(ns) => ns.clone(),
            None => config.default_namespace.clone(),
        };
        let client = kube::Client::try_from(config).map_err(|e| {
            CliError::Usage(format!(
                "cannot use the kubeconfig's cluster {server}: {}",
                chain(&e)
            ))
        })?;
        Ok(Self {
            client,
            namespace,
            server,
        })
    }

    /// A namespaced API of the command's namespace.
    pub fn api<K>(&self) -> kube::Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        kube::Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// `fut` within [`API_DEADLINE`]; a failure is one line starting with `what` (an answer of
    /// the API) or saying the API cannot be reached.
    pub async fn call<T>(
        &self,
        what: impl Display,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, CliError> {
        self.call_within(API_DEADLINE, what, fut).await
    }

    /// [`Kube::call`] with a shorter deadline (a wait's remaining time).
    pub async fn call_within<T>(
        &self,
        deadline: Duration,
        what: impl Display,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, CliError> {
        match tokio::time::timeout(deadline.min(API_DEADLINE), fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(what, e)),
            Err(_) => Err(CliError::Internal(format!(
                "cannot reach the Kubernetes API at {}: no answer within {:?} ({what})",
                self.server,
                deadline.min(API_DEADLINE)
            ))),
        }
    }

    /// One line for a failed call.
    pub fn error(&self, what: impl Display, e: kube::Error) -> CliError {
        match e {
            kube::Error::Api(s) => {
                let line = one_line(&format!("{what}: {} ({})", s.message, s.code));
                // Refused as invalid: the input was wrong, not the cluster.
                if matches!(s.code, 400 | 422) {
                    CliError::Usage(line)
                } else {
                    CliError::Internal(line)
                }
            }
            kube::Error::Auth(e) => CliError::Internal(format!(
                "cannot authenticate to the Kubernetes API at {}: {}",
                self.server,
                chain(&e)
            )),
            kube::Error::SerdeError(e) => CliError::Internal(one_line(&format!(
                "{what}: unexpected answer from the Kubernetes API at {}: {e}",
                self.server
            ))),
            kube::Error::Service(e) => self.unreachable(chain(e.as_ref())),
            kube::Error::HyperError(e) => self.unreachable(chain(&e)),
            other => self.unreachable(chain(&other)),
        }
    }

    fn unreachable(&self, why: String) -> CliError {
        CliError::Internal(format!(
            "cannot reach the Kubernetes API at {}: {why}",
            self.server
        ))
    }
}

/// The kubeconfig as kubectl finds it; without any, the pod's service account.
async fn load_config(args: &KubeArgs) -> Result<kube::Config, CliError> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let loaded = match &args.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| {
                CliError::Usage(one_line(&format!(
                    "--kubeconfig {}: {}",
                    path.display(),
                    kubeconfig_error(&e)
                )))
            })?;
            kube::Config::from_custom_kubeconfig(kc, &options).await
        }
        None => kube::Config::from_kubeconfig(&options).await,
    };
    match loaded {
        Ok(config) => Ok(config),
        Err(e) if args.kubeconfig.is_none() && args.context.is_none() && no_file(&e) => {
            // As kubectl: no kubeconfig at all inside a pod means its service account.
            kube::Config::incluster().map_err(|_| {
                CliError::Usage(
                    "no kubeconfig found: pass --kubeconfig PATH, set KUBECONFIG, or create ~/.kube/config".into(),
                )
            })
        }
        Err(e) => Err(CliError::Usage(one_line(&format!(
            "cannot load the kubeconfig: {}",
            kubeconfig_error(&e)
        )))),
    }
}

fn no_file(e: &KubeconfigError) -> bool {
    match e {
        KubeconfigError::FindPath => true,
        KubeconfigError::ReadConfig(io, _) => io.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

fn kubeconfig_error(e: &KubeconfigError) -> String {
    match e {
        // kube says "failed to load current context: x"; kubectl's words are clearer.
        KubeconfigError::LoadContext(name) => format!("context {name:?} does not exist"),
        KubeconfigError::ReadConfig(io, path) => format!("cannot read {}: {io}", path.display()),
        other => chain(other),
    }
}

/// An error and its sources, `a: b: c`, without repeating a source its parent already says.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    one_line(&out)
}

/// Whitespace (newlines included) folded to single spaces: every message is one line.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line_without_repeats() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused\n(os 111)");
        let e = KubeconfigError::ReadConfig(io, "/x/config".into());
        assert_eq!(
            kubeconfig_error(&e),
            "cannot read /x/config: refused\n(os 111)"
        );
        assert_eq!(
            chain(&e),
            "failed to read kubeconfig from '\"/x/config\"': refused (os 111)"
        );
        assert_eq!(one_line(" a\n  b\tc "), "a b c");
    }
}
