//! A cluster install of r4 applied with the real kubectl to the real `r4 dev` binary: every
//! kind the chart renders (RBAC, NetworkPolicy, PodDisruptionBudget, and ServiceMonitor /
//! PrometheusRule once their CRDs are in) is stored and served back, discovery and the OpenAPI
//! kubectl reads agree on each kind, the installed controller Deployment rolls out without
//! running a second controller (r4 dev runs its own), the samples still reconcile, and
//! `kubectl delete -f` removes it all. `config/install.yaml` (the chart rendered with
//! defaults) is applied too once it exists. Skipped with a message when kubectl is missing,
//! except under CI.

mod support;

use support::{DevProcess, eventually_blocking, kubectl_present, repo};

/// `kind/name` of every object in a multi-document manifest, as `kubectl get -o name` prints
/// them (`deployment.apps/r4-controller`).
fn names_in(manifest: &str) -> Vec<String> {
    let mut out = Vec::new();
    for doc in manifest.split("\n---") {
        let v: serde_yaml::Value = serde_yaml::from_str(doc).expect("manifest YAML");
        let Some(kind) = v.get("kind").and_then(|k| k.as_str()) else {
            continue;
        };
        let api = v
            .get("apiVersion")
            .and_then(|a| a.as_str())
            .expect("apiVersion");
        let name = v
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .expect("metadata.name");
        let kind = kind.to_lowercase();
        out.push(match api.rsplit_once('/') {
            Some((group, _)) => format!("{kind}.{group}/{name}"),
            None => format!("{kind}/{name}"),
        });
    }
    out
}

#[test]
fn an_install_is_stored_served_back_and_removed() {
    if !kubectl_present() {
        return;
    }
    let dev = DevProcess::start(|_, _| {});
    let install = repo("tests/fixtures/install-kinds.yaml");
    let install = install.to_str().expect("path");
    let crds = repo("tests/fixtures/monitoring-crds.yaml");
    dev.ok(&["apply", "-f", crds.to_str().expect("path")]);
    for crd in ["servicemonitors", "prometheusrules"] {
        dev.ok(&[
            "wait",
            "--for=condition=Established",
            &format!("crd/{crd}.monitoring.coreos.com"),
            "--timeout=20s",
        ]);
    }

    // Applied, every object comes back by name; applied again, nothing is created.
    let text = std::fs::read_to_string(install).expect("read the install fixture");
    let want = names_in(&text);
    assert_eq!(want.len(), 13, "{want:?}");
    let out = dev.ok(&["apply", "-f", install]);
    assert_eq!(out.matches(" created").count(), want.len(), "{out}");
    let got = dev.ok(&["get", "-f", install, "-o", "name"]);
    let got: Vec<&str> = got.lines().collect();
    assert_eq!(got, want);
    let again = dev.ok(&["apply", "-f", install]);
    assert!(!again.contains(" created"), "{again}");
    let role = dev.ok(&["get", "rolebindings", "-n", "r4-system"]);
    assert!(role.contains("Role/r4-leader-election"), "{role}");
    let pdb = dev.ok(&["get", "pdb", "-n", "r4-system"]);
    assert!(pdb.contains("ALLOWED DISRUPTIONS"), "{pdb}");

    // Discovery and OpenAPI agree: every kind discovery lists can be listed and explained.
    let resources = dev.ok(&["api-resources", "-o", "name"]);
    for want in [
        "clusterroles.rbac.authorization.k8s.io",
        "clusterrolebindings.rbac.authorization.k8s.io",
        "roles.rbac.authorization.k8s.io",
        "rolebindings.rbac.authorization.k8s.io",
        "networkpolicies.networking.k8s.io",
        "poddisruptionbudgets.policy",
        "servicemonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
    ] {
        assert!(
            resources.lines().any(|l| l == want),
            "{want} not in discovery:\n{resources}"
        );
    }
    // NAME [SHORTNAMES] APIVERSION NAMESPACED KIND
    let table = dev.ok(&["api-resources", "--no-headers"]);
    for row in table.lines() {
        let cols: Vec<&str> = row.split_whitespace().collect();
        let [plural, .., api_version, _, kind] = cols[..] else {
            panic!("api-resources row {row:?}");
        };
        let resource = match api_version.split_once('/') {
            Some((group, version)) => format!("{plural}.{version}.{group}"),
            None => plural.to_string(),
        };
        dev.ok(&["get", &resource, "-A", "-o", "name"]);
        let explained = dev.ok(&["explain", plural, "--api-version", api_version]);
        assert!(
            explained.contains(&format!("KIND:       {kind}")),
            "{plural} {api_version}: {explained}"
        );
    }
    let explained = dev.ok(&["explain", "pdb.spec.minAvailable"]);
    assert!(explained.contains("IntOrString"), "{explained}");
    let explained = dev.ok(&["explain", "clusterrole.rules.verbs"]);
    assert!(explained.contains("[]string"), "{explained}");

    // The installed controller is a simulated container: its pod rolls out, but it never runs
    // (a controller with --leader-elect would take the Lease), so r4 dev's own controller is
    // the only one reconciling the samples.
    let rolled = dev.ok(&[
        "rollout",
        "status",
        "deployment/r4-controller",
        "-n",
        "r4-system",
        "--timeout=60s",
    ]);
    assert!(rolled.contains("successfully rolled out"), "{rolled}");
    dev.ok(&["apply", "-f", repo("crds").to_str().expect("path")]);
    dev.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/agentworkflows.r4.dev",
        "--timeout=20s",
    ]);
    dev.ok(&[
        "apply",
        "-f",
        repo("config/samples").to_str().expect("path"),
    ]);
    dev.ok(&[
        "wait",
        "--for=condition=Ready",
        "aw/payment-disputes",
        "--timeout=90s",
    ]);
    let leases = dev.ok(&["get", "leases", "-A", "-o", "name"]);
    assert!(
        leases.trim().is_empty(),
        "a controller took a lease: {leases}"
    );

    // The chart rendered with defaults, once it exists, is served back as well.
    let rendered = repo("config/install.yaml");
    if rendered.exists() {
        let rendered = rendered.to_str().expect("path");
        dev.ok(&["apply", "-f", rendered]);
        let text = std::fs::read_to_string(rendered).expect("read config/install.yaml");
        let got = dev.ok(&["get", "-f", rendered, "-o", "name"]);
        assert_eq!(got.lines().collect::<Vec<_>>(), names_in(&text));
        dev.ok(&[
            "delete",
            "-f",
            rendered,
            "--ignore-not-found",
            "--wait=false",
        ]);
    }

    // Deleted, nothing of it is left. (The namespace takes its objects with it before kubectl
    // asks for them, as a cluster's namespace controller may: hence --ignore-not-found.)
    dev.ok(&[
        "delete",
        "-f",
        install,
        "--ignore-not-found",
        "--wait=false",
    ]);
    eventually_blocking(30, "the r4-system namespace gone", || {
        !dev.run(&["get", "namespace", "r4-system"]).status.success()
    });
    let left = dev.ok(&["get", "clusterroles,clusterrolebindings", "-o", "name"]);
    assert!(left.trim().is_empty(), "left behind: {left}");
}
