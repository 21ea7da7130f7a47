//! The kubeconfig `r4 dev` writes: one cluster, user and context, all named `r4-dev`.

use std::net::SocketAddr;
use std::path::Path;

/// Kubeconfig text for a dev API server at `addr` (plain HTTP on loopback, no credentials).
pub fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: r4-dev
  cluster:
    server: http://{addr}
users:
- name: r4-dev
  user: {{}}
contexts:
- name: r4-dev
  context:
    cluster: r4-dev
    user: r4-dev
    namespace: default
current-context: r4-dev
preferences: {{}}
"
    )
}

/// Write the kubeconfig to `path`.
pub fn write(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, kubeconfig(addr))
}
