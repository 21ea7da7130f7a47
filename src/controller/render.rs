//! The children of an AgentWorkflow, rendered by pure functions: spec in, objects out, no I/O.
//!
//! This module owns what the children look like: their names, labels, owner reference and pod
//! layout, and the engine config file the pods read. It leaves to the workflow reconciler
//! when to render, which revision's spec to render, and applying the
//! objects (server-side apply as [`super::FIELD_MANAGER`]); and to the engine what the config
//! means.
//!
//! # The children
//! - ServiceAccount `<wf>-engine` (no API token: the engines never talk to Kubernetes) and
//!   ConfigMap `<wf>-engine` holding [`CONFIG_KEY`] = [`engine_config`], mounted as a directory
//!   at [`CONFIG_DIR`] (not with `subPath`, so a CircuitPolicy change reaches running pods).
//! - Per agent a Deployment `<wf>-<agent>`: the agent container plus the engine as a native
//!   sidecar (an init container with `restartPolicy: Always`: it starts before the agent and
//!   stops after it). The engine alone holds the tools' credentials (`headersFrom`).
//! - With `spec.intake.enabled`, Deployment and ClusterIP Service `<wf>-r4-intake`; with
//!   `spec.repair.enabled`, Deployment `<wf>-r4-repair`. The `r4-` keeps r4's own roles apart
//!   from the agents: the worked example has an agent named `intake`, whose Deployment is
//!   `<wf>-intake`.
//!
//! # What rolls the pods
//! A pod template depends on the revision (label [`super::REVISION_LABEL`]) and on nothing
//! that can change without one: CircuitPolicies reach the engines through the ConfigMap only
//! (the engines reload them live), and kill switches through Redis only (never the file: a
//! switch in the file would stay engaged in an engine after it is released). Selectors use
//! [`selector_labels`] alone, which no revision changes (a Deployment's selector is immutable).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
    SecretKeySelector, SecretProjection, SecurityContext, Service, ServiceAccount, ServicePort,
    ServiceSpec, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{AGENT_LABEL, COMPONENT_LABEL, REVISION_LABEL, WORKFLOW_LABEL};
use crate::api::common::SecretKeyRef;
use crate::api::policy::CircuitPolicySpec;
use crate::api::workflow::{AgentSpec, AgentWorkflow, AgentWorkflowSpec};

/// Key of the engine config in the ConfigMap.
pub const CONFIG_KEY: &str = "workflow.yaml";
/// Where the ConfigMap is mounted in every engine container.
pub const CONFIG_DIR: &str = "/etc/r4";

/// Name of the engine container (the sidecar of an agent pod, the only container of the
/// intake and repair pods).
pub const ENGINE_CONTAINER: &str = "r4-engine";
/// Name of the agent container.
pub const AGENT_CONTAINER: &str = "agent";
/// The engine's HTTP port (`r4 engine --listen` default: health, metrics, intake API).
pub const ENGINE_PORT: i32 = 8080;
/// The engine's tool proxy port (`r4 engine --tools-listen` default), on localhost.
pub const TOOLS_PORT: i32 = 8082;
/// The agent container's port when `agents[].port` is not set (the engine's, as a port number
/// of the Kubernetes API).
pub const DEFAULT_AGENT_PORT: i32 = crate::engine::delivery::DEFAULT_AGENT_PORT as i32;
/// Seconds a revision's Deployments have to become available when the spec does not say.
pub const DEFAULT_PROGRESS_DEADLINE_SECONDS: i32 = 600;
/// Annotation holding the hash of the rendered revision's spec.
pub const REVISION_HASH_ANNOTATION: &str = "r4.dev/revision-hash";

/// Environment variable of the engine's Redis URL (`r4 engine --redis`).
pub const REDIS_URL_ENV: &str = "R4_REDIS_URL";
/// Environment variable of the engine id (`r4 engine --engine-id`): the pod's name.
pub const ENGINE_ID_ENV: &str = "R4_ENGINE_ID";
/// Environment variables telling the agent container where the engine's tool proxy is and
/// which port to serve tasks on (the agent protocol's, `engine::delivery`).
pub use crate::engine::delivery::{AGENT_PORT_ENV, TOOLS_URL_ENV};

/// The user and group every container runs as (distroless `nonroot`, the r4 image's user).
const RUN_AS: i64 = 65532;
/// Longest Deployment name whose pods' names (`<name>-<10-char hash>-<5 chars>`) fit in 63.
const MAX_DEPLOYMENT_NAME: usize = 63 - 17;
const NAME_LABEL: &str = "app.kubernetes.io/name";
const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
const PART_OF_LABEL: &str = "app.kubernetes.io/part-of";
const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
const CONFIG_VOLUME: &str = "engine-config";
const TOOL_CREDENTIALS_VOLUME: &str = "tool-credentials";
const TMP_VOLUME: &str = "tmp";

/// Options of a render that do not come from the workflow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderOptions {
    /// Image of the r4 engine (same image as the controller), e.g. "ghcr.io/r4-dev/r4:0.1.0".
    pub engine_image: String,
    /// Extra environment of every engine container (the controller's forwarded `OTEL_*`).
    pub engine_env: Vec<(String, String)>,
    /// Revision number and hash of the spec being rendered (label r4.dev/revision = number).
    pub revision: i64,
    pub revision_hash: String,
}

/// Every child of one workflow.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    pub service_account: ServiceAccount,
    pub config_map: ConfigMap,
    /// One per agent (in spec order), then intake, then repair (when enabled).
    pub deployments: Vec<Deployment>,
    /// The intake Service when the intake is enabled.
    pub services: Vec<Service>,
}

impl Children {
    /// Every object as JSON (apiVersion/kind set), in apply order: SA, ConfigMap, Services,
    /// Deployments (what the pods mount and call exists before the pods).
    pub fn to_values(&self) -> Vec<serde_json::Value> {
        let mut out = vec![to_value(&self.service_account), to_value(&self.config_map)];
        out.extend(self.services.iter().map(to_value));
        out.extend(self.deployments.iter().map(to_value));
        out
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> serde_json::Value {
    // k8s-openapi objects are plain structs with string keys: serialising one cannot fail.
    serde_json::to_value(v).expect("a Kubernetes object always serialises to JSON")
}

/// Why a workflow cannot be rendered. Display is one line starting with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The workflow object lacks metadata the children need.
    #[error("metadata.{field}: missing ({why})")]
    MissingMetadata {
        field: &'static str,
        why: &'static str,
    },
    /// A child's name would be too long.
    #[error("{field}: {name:?} is {len} characters; {rule}")]
    NameTooLong {
        field: String,
        name: String,
        len: usize,
        rule: String,
    },
    /// A policyRef names a CircuitPolicy that is not there.
    #[error("{field}: CircuitPolicy {name:?} not found")]
    UnknownPolicy { field: String, name: String },
    /// Any other field the children cannot be made from.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// The engine config could not be written as YAML.
    #[error("engine config: cannot write YAML: {0}")]
    Yaml(String),
}

impl RenderError {
    /// The field at fault (`spec.agents[2].name`), for a `Valid=False` condition.
    pub fn field(&self) -> String {
        match self {
            Self::MissingMetadata { field, .. } => format!("metadata.{field}"),
            Self::NameTooLong { field, .. }
            | Self::UnknownPolicy { field, .. }
            | Self::Invalid { field, .. } => field.clone(),
            Self::Yaml(_) => "spec".into(),
        }
    }
}

/// `<wf>-<agent>`: the Deployment of an agent.
pub fn deployment_name(workflow: &str, agent: &str) -> String {
    format!("{workflow}-{agent}")
}

/// `<wf>-r4-intake`: the intake's Deployment and Service.
pub fn intake_name(workflow: &str) -> String {
    format!("{workflow}-r4-intake")
}

/// `<wf>-r4-repair`: the repair role's Deployment.
pub fn repair_name(workflow: &str) -> String {
    format!("{workflow}-r4-repair")
}

/// `<wf>-engine`: the ConfigMap holding the engine config.
pub fn config_map_name(workflow: &str) -> String {
    format!("{workflow}-engine")
}

/// `<wf>-engine`: the ServiceAccount of every pod of the workflow.
pub fn service_account_name(workflow: &str) -> String {
    format!("{workflow}-engine")
}

/// Labels a child's selector uses: stable across revisions (a Deployment's selector is
/// immutable), and unique per Deployment: the workflow, the component and, for an agent, its
/// name.
pub fn selector_labels(
    workflow: &str,
    component: &str,
    agent: Option<&str>,
) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (WORKFLOW_LABEL.to_string(), workflow.to_string()),
        (COMPONENT_LABEL.to_string(), component.to_string()),
    ]);
    if let Some(a) = agent {
        l.insert(AGENT_LABEL.to_string(), a.to_string());
    }
    l
}

/// Every label of a child: the selector's plus the `app.kubernetes.io` set.
fn labels(
    workflow: &str,
    component: &str,
    name: &str,
    agent: Option<&str>,
) -> BTreeMap<String, String> {
    let mut l = selector_labels(workflow, component, agent);
    for (k, v) in [
        (NAME_LABEL, name),
        (INSTANCE_LABEL, workflow),
        (PART_OF_LABEL, "r4"),
        (MANAGED_BY_LABEL, "r4"),
    ] {
        l.insert(k.to_string(), v.to_string());
    }
    l
}

/// The engine config (what `r4 engine --workflow-file` reads): the workflow document (the
/// given spec with `killSwitches` removed — the controller propagates switches through Redis
/// only, and a switch in the file would stay engaged in the engine after it is released — and
/// without rollout/rollbackTo, which are the controller's) followed by every CircuitPolicy it
/// references, as multi-document YAML that `WorkflowConfig::from_yaml` accepts.
pub fn engine_config(
    name: &str,
    namespace: &str,
    spec: &AgentWorkflowSpec,
    policies: &BTreeMap<String, CircuitPolicySpec>,
) -> Result<String, RenderError> {
    let mut engine_spec = spec.clone();
    engine_spec.kill_switches = None;
    engine_spec.rollout = None;
    engine_spec.rollback_to = None;
    let mut refs = BTreeSet::new();
    let fields = spec
        .policy_ref
        .iter()
        .map(|p| ("spec.policyRef".to_string(), p))
        .chain(spec.tools.iter().enumerate().filter_map(|(i, t)| {
            t.policy_ref
                .as_ref()
                .map(|p| (format!("spec.tools[{i}].policyRef"), p))
        }));
    for (field, p) in fields {
        if !policies.contains_key(p) {
            return Err(RenderError::UnknownPolicy {
                field,
                name: p.clone(),
            });
        }
        refs.insert(p.as_str());
    }
    let mut out = format!(
        "# Engine config of AgentWorkflow {namespace}/{name}, written by the r4 controller.\n\
         # Kill switches are not here: the engines read them from Redis.\n"
    );
    out += &document("AgentWorkflow", name, namespace, &engine_spec)?;
    for (p, spec) in policies.iter().filter(|(p, _)| refs.contains(p.as_str())) {
        out += "---\n";
        out += &document("CircuitPolicy", p, namespace, spec)?;
    }
    Ok(out)
}

/// One r4 object of the engine config, as YAML.
fn document<T: serde::Serialize>(
    kind: &str,
    name: &str,
    namespace: &str,
    spec: &T,
) -> Result<String, RenderError> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Document<'a, T> {
        api_version: &'a str,
        kind: &'a str,
        metadata: Meta<'a>,
        spec: &'a T,
    }
    #[derive(serde::Serialize)]
    struct Meta<'a> {
        name: &'a str,
        namespace: &'a str,
    }
    serde_yaml::to_string(&Document {
        api_version: "r4.dev/v1alpha1",
        kind,
        metadata: Meta { name, namespace },
        spec,
    })
    .map_err(|e| RenderError::Yaml(e.to_string()))
}

/// What every child of one render shares.
struct Ctx<'a> {
    workflow: &'a str,
    namespace: &'a str,
    owner: OwnerReference,
    opts: &'a RenderOptions,
    spec: &'a AgentWorkflowSpec,
    progress_deadline: i32,
}

/// Render every child of `wf` from `spec` (the spec of the revision to render: it differs
/// from `wf.spec` when an older revision is applied again). `policies` are the CircuitPolicies
/// by name; the ones the spec references must be there.
pub fn render(
    wf: &AgentWorkflow,
    spec: &AgentWorkflowSpec,
    policies: &BTreeMap<String, CircuitPolicySpec>,
    opts: &RenderOptions,
) -> Result<Children, RenderError> {
    let missing = |field, why| RenderError::MissingMetadata { field, why };
    let workflow = wf
        .metadata
        .name
        .as_deref()
        .ok_or(missing("name", "every child is named after it"))?;
    let namespace = wf
        .metadata
        .namespace
        .as_deref()
        .ok_or(missing("namespace", "the children live in it"))?;
    let uid = wf
        .metadata
        .uid
        .as_deref()
        .ok_or(missing("uid", "the children's owner reference needs it"))?;
    check(workflow, spec)?;
    let config = engine_config(workflow, namespace, spec, policies)?;
    let ctx = Ctx {
        workflow,
        namespace,
        owner: OwnerReference {
            api_version: "r4.dev/v1alpha1".into(),
            kind: "AgentWorkflow".into(),
            name: workflow.into(),
            uid: uid.into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        },
        opts,
        spec,
        progress_deadline: spec
            .rollout
            .as_ref()
            .and_then(|r| r.progress_deadline_seconds)
            .unwrap_or(DEFAULT_PROGRESS_DEADLINE_SECONDS),
    };

    let mut deployments = Vec::new();
    for agent in &spec.agents {
        deployments.push(agent_deployment(&ctx, agent));
    }
    let mut services = Vec::new();
    if let Some(intake) = spec.intake.as_ref().filter(|i| i.enabled) {
        let mut env = Vec::new();
        if let Some(auth) = &intake.auth {
            env.push(secret_env(
                crate::engine::auth::TOKEN_ENV,
                &auth.token_secret_ref,
            ));
        }
        let engine = engine_container(&ctx, "intake", None, env, Vec::new());
        deployments.push(role_deployment(
            &ctx,
            "intake",
            intake_name(workflow),
            intake.replicas.unwrap_or(1),
            engine,
        ));
        services.push(intake_service(&ctx));
    }
    if spec.repair.as_ref().is_some_and(|r| r.enabled) {
        let engine = engine_container(&ctx, "repair", None, Vec::new(), Vec::new());
        deployments.push(role_deployment(
            &ctx,
            "repair",
            repair_name(workflow),
            1,
            engine,
        ));
    }

    let service_account = ServiceAccount {
        metadata: ctx.meta(
            service_account_name(workflow),
            labels(workflow, "engine-config", "engine", None),
        ),
        // The engines never call the Kubernetes API: no token in their pods.
        automount_service_account_token: Some(false),
        ..Default::default()
    };
    let config_map = ConfigMap {
        metadata: ctx.meta(
            config_map_name(workflow),
            labels(workflow, "engine-config", "engine", None),
        ),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), config)])),
        ..Default::default()
    };
    Ok(Children {
        service_account,
        config_map,
        deployments,
        services,
    })
}

/// What would not make valid children: a name too long for a Deployment's pods, a Service
/// name that is not a DNS-1035 label, an agent whose Deployment would be a role's, an agent
/// port the engine sidecar already takes, no Redis to give the engines.
fn check(workflow: &str, spec: &AgentWorkflowSpec) -> Result<(), RenderError> {
    let redis = &spec.queue.redis;
    if redis.url.is_some() == redis.url_secret_ref.is_some() {
        return Err(RenderError::Invalid {
            field: "spec.queue.redis".into(),
            reason: "exactly one of url and urlSecretRef must be set".into(),
        });
    }
    let fits = |field: String, name: &str, rule: String| {
        if name.len() <= MAX_DEPLOYMENT_NAME {
            return Ok(());
        }
        Err(RenderError::NameTooLong {
            field,
            len: name.len(),
            name: name.to_string(),
            rule,
        })
    };
    let intake = spec.intake.as_ref().is_some_and(|i| i.enabled);
    let repair = spec.repair.as_ref().is_some_and(|r| r.enabled);
    let roles = [
        (intake, "intake", intake_name(workflow)),
        (repair, "repair", repair_name(workflow)),
    ];
    for (enabled, role, name) in &roles {
        if !enabled {
            continue;
        }
        let max = MAX_DEPLOYMENT_NAME - (name.len() - workflow.len());
        let rule = format!(
            "with the {role} enabled the workflow name must be at most {max} characters (a Deployment's pods add 17 to its name, within 63)"
        );
        fits("metadata.name".into(), name, rule)?;
    }
    if intake && !is_dns1035_label(workflow) {
        return Err(RenderError::Invalid {
            field: "metadata.name".into(),
            reason: format!(
                "{workflow:?} cannot name the intake Service: it must start with a letter and hold only a-z, 0-9 and '-'"
            ),
        });
    }
    for (i, a) in spec.agents.iter().enumerate() {
        let name = deployment_name(workflow, &a.name);
        let rule = format!(
            "workflow and agent names together must be at most {} characters (a Deployment's pods add 17 to its name, within 63)",
            MAX_DEPLOYMENT_NAME - 1
        );
        fits(format!("spec.agents[{i}].name"), &name, rule)?;
        if let Some((_, role, _)) = roles.iter().find(|(on, _, n)| *on && *n == name) {
            return Err(RenderError::Invalid {
                field: format!("spec.agents[{i}].name"),
                reason: format!(
                    "{:?} would name the same Deployment {name:?} as the {role}; rename the agent",
                    a.name
                ),
            });
        }
        let port = agent_port(a);
        if port == ENGINE_PORT || port == TOOLS_PORT {
            return Err(RenderError::Invalid {
                field: format!("spec.agents[{i}].port"),
                reason: format!(
                    "{port} is taken by the engine sidecar in the same pod ({ENGINE_PORT} HTTP, {TOOLS_PORT} tool proxy)"
                ),
            });
        }
    }
    Ok(())
}

fn is_dns1035_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn agent_port(a: &AgentSpec) -> i32 {
    a.port.unwrap_or(DEFAULT_AGENT_PORT)
}

impl Ctx<'_> {
    fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.to_string()),
            labels: Some(labels),
            owner_references: Some(vec![self.owner.clone()]),
            ..Default::default()
        }
    }

    /// A Deployment that keeps serving during a rollout (one pod more, none less) and whose
    /// pods roll with the revision.
    fn deployment(
        &self,
        name: String,
        component: &str,
        label_name: &str,
        agent: Option<&str>,
        replicas: i32,
        pod: PodSpec,
    ) -> Deployment {
        let mut l = labels(self.workflow, component, label_name, agent);
        l.insert(REVISION_LABEL.into(), self.opts.revision.to_string());
        let annotations = BTreeMap::from([(
            REVISION_HASH_ANNOTATION.to_string(),
            self.opts.revision_hash.clone(),
        )]);
        let mut metadata = self.meta(name, l.clone());
        metadata.annotations = Some(annotations.clone());
        Deployment {
            metadata,
            spec: DeploymentSpec {
                replicas: Some(replicas),
                selector: LabelSelector {
                    match_labels: Some(selector_labels(self.workflow, component, agent)),
                    ..Default::default()
                },
                strategy: Some(DeploymentStrategy {
                    type_: Some("RollingUpdate".into()),
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: Some(IntOrString::Int(1)),
                        max_unavailable: Some(IntOrString::Int(0)),
                    }),
                }),
                progress_deadline_seconds: Some(self.progress_deadline),
                // r4 keeps its own revisions (ControllerRevisions); old ReplicaSets are clutter.
                revision_history_limit: Some(2),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(l),
                        annotations: Some(annotations),
                        ..Default::default()
                    }),
                    spec: Some(pod),
                },
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

/// The Deployment of one agent: the agent container and the engine as its native sidecar.
fn agent_deployment(ctx: &Ctx, agent: &AgentSpec) -> Deployment {
    let port = agent_port(agent);
    let (credentials, credentials_mount) = tool_credentials(ctx.spec, agent);
    let mut engine = engine_container(
        ctx,
        "agent",
        Some((&agent.name, port)),
        Vec::new(),
        credentials_mount.into_iter().collect(),
    );
    // A native sidecar: started (and probed) before the agent, stopped after it.
    engine.restart_policy = Some("Always".into());
    let mut env = Vec::new();
    // The tool proxy listens only for an agent that has tools.
    if !agent.tools.is_empty() {
        env.push(value_env(
            TOOLS_URL_ENV,
            format!("http://127.0.0.1:{TOOLS_PORT}"),
        ));
    }
    env.push(value_env(AGENT_PORT_ENV, port.to_string()));
    let container = Container {
        name: AGENT_CONTAINER.into(),
        image: Some(agent.image.clone()),
        ports: Some(vec![ContainerPort {
            name: Some("agent".into()),
            container_port: port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        env: Some(env),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", "100m"), ("memory", "128Mi")])),
            ..Default::default()
        }),
        security_context: Some(container_security()),
        // The root file system is read-only: the agent gets a writable /tmp.
        volume_mounts: Some(vec![VolumeMount {
            name: TMP_VOLUME.into(),
            mount_path: "/tmp".into(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let mut volumes = vec![
        config_volume(ctx.workflow),
        Volume {
            name: TMP_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ];
    volumes.extend(credentials);
    let pod = pod_spec(ctx, vec![engine], vec![container], volumes);
    ctx.deployment(
        deployment_name(ctx.workflow, &agent.name),
        "agent",
        &agent.name,
        Some(&agent.name),
        agent.replicas.unwrap_or(1),
        pod,
    )
}

/// The Deployment of an engine role (intake, repair): the engine container alone.
fn role_deployment(
    ctx: &Ctx,
    role: &str,
    name: String,
    replicas: i32,
    engine: Container,
) -> Deployment {
    let pod = pod_spec(
        ctx,
        Vec::new(),
        vec![engine],
        vec![config_volume(ctx.workflow)],
    );
    ctx.deployment(name, role, role, None, replicas, pod)
}

fn intake_service(ctx: &Ctx) -> Service {
    Service {
        metadata: ctx.meta(
            intake_name(ctx.workflow),
            labels(ctx.workflow, "intake", "intake", None),
        ),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(ctx.workflow, "intake", None)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pod_spec(
    ctx: &Ctx,
    init_containers: Vec<Container>,
    containers: Vec<Container>,
    volumes: Vec<Volume>,
) -> PodSpec {
    PodSpec {
        service_account_name: Some(service_account_name(ctx.workflow)),
        automount_service_account_token: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            fs_group: Some(RUN_AS),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        init_containers: (!init_containers.is_empty()).then_some(init_containers),
        containers,
        volumes: Some(volumes),
        ..Default::default()
    }
}

/// The engine container of `role`; `agent` is the agent's name and port (role agent).
fn engine_container(
    ctx: &Ctx,
    role: &str,
    agent: Option<(&str, i32)>,
    extra_env: Vec<EnvVar>,
    extra_mounts: Vec<VolumeMount>,
) -> Container {
    let mut args: Vec<String> = vec!["engine".into(), "--role".into(), role.into()];
    if let Some((name, _)) = agent {
        args.extend(["--agent".into(), name.into()]);
    }
    args.extend([
        "--workflow".into(),
        ctx.workflow.into(),
        "--namespace".into(),
        ctx.namespace.into(),
        "--workflow-file".into(),
        format!("{CONFIG_DIR}/{CONFIG_KEY}"),
    ]);
    if let Some((_, port)) = agent {
        args.extend([
            "--agent-url".into(),
            format!("http://127.0.0.1:{port}/tasks"),
        ]);
    }
    let redis = &ctx.spec.queue.redis;
    // check() made sure one of the two is set.
    let mut env = vec![match (&redis.url_secret_ref, &redis.url) {
        (Some(r), _) => secret_env(REDIS_URL_ENV, r),
        (None, url) => value_env(REDIS_URL_ENV, url.clone().unwrap_or_default()),
    }];
    env.push(EnvVar {
        name: ENGINE_ID_ENV.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    env.push(value_env(
        crate::telemetry::logging::FORMAT_ENV,
        "json".into(),
    ));
    env.extend(
        ctx.opts
            .engine_env
            .iter()
            .map(|(k, v)| value_env(k, v.clone())),
    );
    env.extend(extra_env);
    let mut mounts = vec![VolumeMount {
        name: CONFIG_VOLUME.into(),
        mount_path: CONFIG_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }];
    mounts.extend(extra_mounts);
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    };
    Container {
        name: ENGINE_CONTAINER.into(),
        image: Some(ctx.opts.engine_image.clone()),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: ENGINE_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(probe("/readyz", 5, 3)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        // Up to a minute to connect to Redis and load the config before liveness counts.
        startup_probe: Some(probe("/healthz", 2, 30)),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", "50m"), ("memory", "64Mi")])),
            limits: Some(quantities(&[("memory", "256Mi")])),
            ..Default::default()
        }),
        security_context: Some(container_security()),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

/// The `headersFrom` values of the tools `agent` uses, as one projected volume of Secret items
/// at `<tool>/<header name in lower case>` (what `engine::tools::load_tool_headers` reads),
/// and its read-only mount at the engine's default secrets directory. None when no tool of
/// the agent has credentials.
fn tool_credentials(
    spec: &AgentWorkflowSpec,
    agent: &AgentSpec,
) -> (Option<Volume>, Option<VolumeMount>) {
    let sources: Vec<VolumeProjection> = spec
        .tools
        .iter()
        .filter(|t| agent.tools.contains(&t.name))
        .flat_map(|t| {
            t.headers_from.iter().map(move |h| VolumeProjection {
                secret: Some(SecretProjection {
                    name: h.secret_ref.name.clone(),
                    items: Some(vec![KeyToPath {
                        key: h.secret_ref.key.clone(),
                        path: format!("{}/{}", t.name, h.name.to_ascii_lowercase()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            })
        })
        .collect();
    if sources.is_empty() {
        return (None, None);
    }
    let volume = Volume {
        name: TOOL_CREDENTIALS_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            // Owner and group (fsGroup) may read; nobody may write.
            default_mode: Some(0o440),
            sources: Some(sources),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mount = VolumeMount {
        name: TOOL_CREDENTIALS_VOLUME.into(),
        mount_path: crate::engine::tools::DEFAULT_SECRETS_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    };
    (Some(volume), Some(mount))
}

/// The ConfigMap as a directory (not `subPath`): a policy change reaches the running engines.
fn config_volume(workflow: &str) -> Volume {
    Volume {
        name: CONFIG_VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map_name(workflow),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn quantities(q: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    q.iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect()
}

fn value_env(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    }
}

/// An environment variable from a Secret key: the value never appears in the object.
fn secret_env(name: &str, r: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: r.name.clone(),
                key: r.key.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    use super::*;
    use crate::api::common::SecretKeyRef;
    use crate::api::policy::CircuitPolicy;
    use crate::api::workflow::{HeaderFrom, IntakeAuth, KillSwitchesSpec, RollbackTo};
    use crate::devcluster::kubelet::engine::{self as kubelet, FileSource};
    use crate::engine::WorkflowConfig;

    const IMAGE: &str = "ghcr.io/r4-dev/r4:0.1.0";
    const UID: &str = "6f1c2a9e-0b7d-4c1e-9a55-3d2f8e4b7c10";

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    /// A sample workflow as the API server would hand it over: in `default`, with a uid.
    fn sample(name: &str) -> AgentWorkflow {
        let path = root().join("config/samples").join(format!("{name}.yaml"));
        let text = std::fs::read_to_string(&path).unwrap();
        let mut wf: AgentWorkflow = serde_yaml::from_str(&text).unwrap();
        wf.metadata.namespace = Some("default".into());
        wf.metadata.uid = Some(UID.into());
        wf
    }

    /// Every CircuitPolicy of config/samples, by name.
    fn sample_policies() -> BTreeMap<String, CircuitPolicySpec> {
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(root().join("config/samples")).unwrap() {
            let path = entry.unwrap().path();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            if file.contains("policy") && file.ends_with(".yaml") {
                let cp: CircuitPolicy =
                    serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                out.insert(cp.metadata.name.unwrap(), cp.spec);
            }
        }
        assert!(out.contains_key("default-policy") && out.contains_key("bank-policy"));
        out
    }

    fn opts(revision: i64) -> RenderOptions {
        RenderOptions {
            engine_image: IMAGE.into(),
            engine_env: Vec::new(),
            revision,
            revision_hash: format!("hash-of-revision-{revision}"),
        }
    }

    fn render_sample(name: &str) -> Children {
        let wf = sample(name);
        render(&wf, &wf.spec, &sample_policies(), &opts(1)).unwrap()
    }

    /// The objects as one multi-document YAML file (what `kubectl apply -f` takes).
    fn to_yaml(c: &Children) -> String {
        c.to_values()
            .iter()
            .map(|v| serde_yaml::to_string(v).unwrap())
            .collect::<Vec<_>>()
            .join("---\n")
    }

    fn check_golden(name: &str) {
        let got = to_yaml(&render_sample(name));
        let path = root()
            .join("src/controller/testdata")
            .join(format!("{name}.children.yaml"));
        if std::env::var("R4_UPDATE_GOLDEN").as_deref() == Ok("1") {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &got).unwrap();
            return;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        if got != want {
            let line = got
                .lines()
                .zip(want.lines())
                .position(|(g, w)| g != w)
                .unwrap_or_else(|| got.lines().count().min(want.lines().count()));
            panic!(
                "{} differs from the render of config/samples/{name}.yaml from line {}:\n  golden: {:?}\n  render: {:?}\nIf the change is intended, review it and regenerate with R4_UPDATE_GOLDEN=1 cargo test --lib controller::render",
                path.display(),
                line + 1,
                want.lines().nth(line),
                got.lines().nth(line),
            );
        }
    }

    #[test]
    fn golden_payment_disputes() {
        check_golden("payment-disputes");
    }

    #[test]
    fn golden_chargeback_triage() {
        check_golden("chargeback-triage");
    }

    fn template(d: &Deployment) -> &PodTemplateSpec {
        &d.spec.template
    }

    fn pod_of(d: &Deployment) -> Pod {
        Pod {
            metadata: template(d).metadata.clone().unwrap_or_default(),
            spec: template(d).spec.clone(),
            ..Default::default()
        }
    }

    fn name_of(meta: &ObjectMeta) -> &str {
        meta.name.as_deref().unwrap()
    }

    /// Every container of a Deployment with whether it is a native sidecar.
    fn containers(d: &Deployment) -> Vec<(&Container, bool)> {
        let spec = template(d).spec.as_ref().unwrap();
        spec.init_containers
            .iter()
            .flatten()
            .map(|c| (c, c.restart_policy.as_deref() == Some("Always")))
            .chain(spec.containers.iter().map(|c| (c, false)))
            .collect()
    }

    fn engines(c: &Children) -> Vec<(&Deployment, &Container)> {
        c.deployments
            .iter()
            .flat_map(|d| {
                containers(d)
                    .into_iter()
                    .filter(|(c, _)| c.name == ENGINE_CONTAINER)
                    .map(move |(c, _)| (d, c))
            })
            .collect()
    }

    fn env<'a>(c: &'a Container, name: &str) -> Option<&'a EnvVar> {
        c.env.iter().flatten().find(|e| e.name == name)
    }

    #[test]
    fn children_of_the_worked_example() {
        let c = render_sample("payment-disputes");
        let names: Vec<&str> = c.deployments.iter().map(|d| name_of(&d.metadata)).collect();
        // The sample's agent named `intake` keeps its own Deployment beside the intake role's.
        assert_eq!(
            names,
            [
                "payment-disputes-intake",
                "payment-disputes-investigation",
                "payment-disputes-resolution",
                "payment-disputes-r4-intake",
                "payment-disputes-r4-repair",
            ]
        );
        assert_eq!(c.services.len(), 1);
        assert_eq!(
            name_of(&c.services[0].metadata),
            "payment-disputes-r4-intake"
        );
        assert_eq!(name_of(&c.config_map.metadata), "payment-disputes-engine");
        assert_eq!(
            name_of(&c.service_account.metadata),
            "payment-disputes-engine"
        );
        // Replicas: as given, else 1; the intake's own count.
        let replicas: Vec<i32> = c
            .deployments
            .iter()
            .map(|d| d.spec.replicas.unwrap())
            .collect();
        assert_eq!(replicas, [2, 3, 1, 2, 1]);
        for d in &c.deployments {
            assert_eq!(d.spec.progress_deadline_seconds, Some(120));
        }
        // Without a rollout block: the default deadline.
        let c = render_sample("chargeback-triage");
        for d in &c.deployments {
            assert_eq!(d.spec.progress_deadline_seconds, Some(600));
        }
    }

    #[test]
    fn apply_order_kinds_namespace_and_owner() {
        let c = render_sample("payment-disputes");
        let values = c.to_values();
        let kinds: Vec<&str> = values.iter().map(|v| v["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "ServiceAccount",
                "ConfigMap",
                "Service",
                "Deployment",
                "Deployment",
                "Deployment",
                "Deployment",
                "Deployment"
            ]
        );
        for v in &values {
            assert!(v["apiVersion"].is_string(), "{v}");
            assert_eq!(v["metadata"]["namespace"], "default");
            let labels = &v["metadata"]["labels"];
            assert_eq!(labels["app.kubernetes.io/instance"], "payment-disputes");
            assert_eq!(labels["app.kubernetes.io/part-of"], "r4");
            assert_eq!(labels["app.kubernetes.io/managed-by"], "r4");
            assert_eq!(labels[WORKFLOW_LABEL], "payment-disputes");
            assert_eq!(
                v["metadata"]["ownerReferences"],
                json!([{
                    "apiVersion": "r4.dev/v1alpha1",
                    "kind": "AgentWorkflow",
                    "name": "payment-disputes",
                    "uid": UID,
                    "controller": true,
                    "blockOwnerDeletion": true,
                }])
            );
        }
    }

    #[test]
    fn selectors_are_stable_across_revisions_and_the_revision_label_rolls_the_pods() {
        let wf = sample("payment-disputes");
        let policies = sample_policies();
        let one = render(&wf, &wf.spec, &policies, &opts(1)).unwrap();
        let two = render(&wf, &wf.spec, &policies, &opts(2)).unwrap();
        assert_eq!(one.deployments.len(), two.deployments.len());
        for (a, b) in one.deployments.iter().zip(&two.deployments) {
            assert_eq!(a.spec.selector, b.spec.selector);
            for (d, rev) in [(a, "1"), (b, "2")] {
                let labels = d.metadata.labels.as_ref().unwrap();
                assert_eq!(labels[REVISION_LABEL], rev);
                let pod_labels = template(d)
                    .metadata
                    .as_ref()
                    .unwrap()
                    .labels
                    .as_ref()
                    .unwrap();
                assert_eq!(pod_labels[REVISION_LABEL], rev);
                let selector = d.spec.selector.match_labels.as_ref().unwrap();
                assert!(!selector.contains_key(REVISION_LABEL));
            }
            assert_ne!(
                a.spec.template, b.spec.template,
                "a new revision must roll the pods"
            );
        }
        assert_eq!(one.services, two.services);
        assert_eq!(one.config_map, two.config_map);
    }

    #[test]
    fn every_selector_matches_its_template_and_only_its_own_pods() {
        for name in ["payment-disputes", "chargeback-triage"] {
            let c = render_sample(name);
            let pods: Vec<(String, BTreeMap<String, String>)> = c
                .deployments
                .iter()
                .map(|d| {
                    let l = template(d)
                        .metadata
                        .as_ref()
                        .unwrap()
                        .labels
                        .clone()
                        .unwrap();
                    (name_of(&d.metadata).to_string(), l)
                })
                .collect();
            let matches = |sel: &BTreeMap<String, String>, labels: &BTreeMap<String, String>| {
                sel.iter().all(|(k, v)| labels.get(k) == Some(v))
            };
            for d in &c.deployments {
                let sel = d.spec.selector.match_labels.as_ref().unwrap();
                assert!(d.spec.selector.match_expressions.is_none());
                let selected: Vec<&str> = pods
                    .iter()
                    .filter(|(_, l)| matches(sel, l))
                    .map(|(n, _)| n.as_str())
                    .collect();
                assert_eq!(selected, [name_of(&d.metadata)], "selector {sel:?}");
            }
            let sel = c.services[0]
                .spec
                .as_ref()
                .unwrap()
                .selector
                .as_ref()
                .unwrap();
            let selected: Vec<&str> = pods
                .iter()
                .filter(|(_, l)| matches(sel, l))
                .map(|(n, _)| n.as_str())
                .collect();
            assert_eq!(selected, [intake_name(name)]);
        }
    }

    #[test]
    fn a_policy_change_changes_only_the_config_map() {
        let wf = sample("payment-disputes");
        let before = sample_policies();
        let mut after = before.clone();
        after.get_mut("bank-policy").unwrap().bulkhead = None;
        after.get_mut("default-policy").unwrap().timeout = None;
        let a = render(&wf, &wf.spec, &before, &opts(3)).unwrap();
        let b = render(&wf, &wf.spec, &after, &opts(3)).unwrap();
        assert_eq!(a.deployments, b.deployments);
        assert_eq!(a.services, b.services);
        assert_eq!(a.service_account, b.service_account);
        assert_ne!(a.config_map, b.config_map);
    }

    #[test]
    fn kill_switches_change_no_child() {
        let wf = sample("payment-disputes");
        let mut engaged = wf.spec.clone();
        engaged.kill_switches = Some(KillSwitchesSpec {
            all: true,
            agents: BTreeMap::from([("resolution".into(), true)]),
            tools: BTreeMap::from([("bank-api".into(), true)]),
        });
        let policies = sample_policies();
        let a = render(&wf, &wf.spec, &policies, &opts(1)).unwrap();
        let b = render(&wf, &engaged, &policies, &opts(1)).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn the_engine_config_never_holds_kill_switches_and_reads_back_whole() {
        let wf = sample("payment-disputes");
        let mut spec = wf.spec.clone();
        spec.kill_switches = Some(KillSwitchesSpec {
            all: true,
            agents: BTreeMap::from([("resolution".into(), true)]),
            tools: BTreeMap::from([("bank-api".into(), true)]),
        });
        spec.rollback_to = Some(RollbackTo { revision: 1 });
        let mut policies = sample_policies();
        policies.insert("unused-policy".into(), CircuitPolicySpec::default());
        let text = engine_config("payment-disputes", "team-a", &spec, &policies).unwrap();
        for word in ["killSwitches", "rollout", "rollbackTo", "unused-policy"] {
            assert!(!text.contains(word), "{word} in the engine config:\n{text}");
        }
        let cfg = WorkflowConfig::from_yaml(
            "workflow.yaml",
            &text,
            Some("payment-disputes"),
            Some("team-a"),
        )
        .unwrap();
        assert_eq!(
            (cfg.name.as_str(), cfg.namespace.as_str()),
            ("payment-disputes", "team-a")
        );
        assert!(cfg.spec_killed_tools().is_empty());
        assert_eq!(cfg.spec.kill_switches, None);
        let mut want = spec.clone();
        want.kill_switches = None;
        want.rollout = None;
        want.rollback_to = None;
        assert_eq!(cfg.spec, want);
        let names: Vec<&str> = cfg.agents.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["intake", "investigation", "resolution"]);
        policies.remove("unused-policy");
        assert_eq!(cfg.policies, policies);
        // The file is read without the namespace flag too: the manifest carries it.
        let cfg = WorkflowConfig::from_yaml("workflow.yaml", &text, None, None).unwrap();
        assert_eq!(cfg.namespace, "team-a");
        assert_eq!(cfg.policies, policies);
    }

    #[test]
    fn the_config_map_holds_the_engine_config() {
        let wf = sample("chargeback-triage");
        let policies = sample_policies();
        let c = render(&wf, &wf.spec, &policies, &opts(1)).unwrap();
        let data = c.config_map.data.as_ref().unwrap();
        assert_eq!(
            data[CONFIG_KEY],
            engine_config("chargeback-triage", "default", &wf.spec, &policies).unwrap()
        );
        // chargeback-triage names only default-policy.
        let cfg = WorkflowConfig::from_yaml("x", &data[CONFIG_KEY], None, None).unwrap();
        assert_eq!(cfg.policies.keys().collect::<Vec<_>>(), ["default-policy"]);
    }

    #[test]
    fn a_redis_url_secret_ref_becomes_a_secret_key_ref_and_never_appears_inline() {
        let mut wf = sample("payment-disputes");
        let secret_url = "redis://:hunter2@redis.prod:6379/0";
        wf.spec.queue.redis.url = None;
        wf.spec.queue.redis.url_secret_ref = Some(SecretKeyRef {
            name: "redis".into(),
            key: "url".into(),
        });
        let c = render(&wf, &wf.spec, &sample_policies(), &opts(1)).unwrap();
        let all = serde_json::to_string(&c.to_values()).unwrap();
        assert!(!all.contains("redis://"), "a Redis URL is inline");
        assert!(!all.contains(secret_url));
        let all_engines = engines(&c);
        assert_eq!(all_engines.len(), 5);
        for (d, e) in all_engines {
            let var = env(e, REDIS_URL_ENV).unwrap();
            assert_eq!(var.value, None, "{}", name_of(&d.metadata));
            let r = var
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap();
            assert_eq!((r.name.as_str(), r.key.as_str()), ("redis", "url"));
        }
        // A development URL is given as a value.
        let c = render_sample("payment-disputes");
        for (_, e) in engines(&c) {
            let var = env(e, REDIS_URL_ENV).unwrap();
            assert_eq!(var.value.as_deref(), Some("redis://redis.r4-system:6379/0"));
            assert!(var.value_from.is_none());
        }
    }

    #[test]
    fn the_intake_token_is_a_secret_key_ref_of_the_intake_only() {
        let mut wf = sample("payment-disputes");
        wf.spec.intake.as_mut().unwrap().auth = Some(IntakeAuth {
            token_secret_ref: SecretKeyRef {
                name: "intake-token".into(),
                key: "token".into(),
            },
        });
        let c = render(&wf, &wf.spec, &sample_policies(), &opts(1)).unwrap();
        for (d, e) in engines(&c) {
            let token = env(e, crate::engine::auth::TOKEN_ENV);
            if name_of(&d.metadata) != intake_name("payment-disputes") {
                assert!(token.is_none(), "{}", name_of(&d.metadata));
                continue;
            }
            let token = token.unwrap();
            assert_eq!(token.value, None);
            let r = token
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap();
            assert_eq!((r.name.as_str(), r.key.as_str()), ("intake-token", "token"));
        }
        // Without auth, no token variable at all (the engine runs the intake open).
        let c = render_sample("payment-disputes");
        assert!(
            engines(&c)
                .iter()
                .all(|(_, e)| env(e, crate::engine::auth::TOKEN_ENV).is_none())
        );
    }

    #[test]
    fn every_container_is_hardened() {
        for name in ["payment-disputes", "chargeback-triage"] {
            let c = render_sample(name);
            assert_eq!(
                c.service_account.automount_service_account_token,
                Some(false)
            );
            for d in &c.deployments {
                let pod = template(d).spec.as_ref().unwrap();
                assert_eq!(pod.automount_service_account_token, Some(false));
                assert_eq!(
                    pod.service_account_name.as_deref(),
                    Some(service_account_name(name).as_str())
                );
                let psc = pod.security_context.as_ref().unwrap();
                assert_eq!(psc.run_as_non_root, Some(true));
                assert_eq!(psc.run_as_user, Some(65532));
                assert_eq!(
                    psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
                    Some("RuntimeDefault")
                );
                for (c, _) in containers(d) {
                    let sc = c.security_context.as_ref().unwrap();
                    let what = format!("{}/{}", name_of(&d.metadata), c.name);
                    assert_eq!(sc.run_as_non_root, Some(true), "{what}");
                    assert_eq!(sc.read_only_root_filesystem, Some(true), "{what}");
                    assert_eq!(sc.allow_privilege_escalation, Some(false), "{what}");
                    assert_eq!(sc.privileged, None, "{what}");
                    let caps = sc.capabilities.as_ref().unwrap();
                    assert_eq!(
                        caps.drop.as_deref(),
                        Some(&["ALL".to_string()][..]),
                        "{what}"
                    );
                    assert_eq!(caps.add, None, "{what}");
                    assert!(c.resources.as_ref().unwrap().requests.is_some(), "{what}");
                }
            }
        }
    }

    /// `r4 engine`'s real argument parser.
    #[derive(clap::Parser, Debug)]
    struct EngineCli {
        #[command(flatten)]
        args: crate::cli::engine::EngineArgs,
    }

    #[test]
    fn the_local_kubelet_and_the_real_cli_run_every_engine_container() {
        use crate::cli::engine::Role as CliRole;
        use clap::{CommandFactory, Parser};
        for name in ["payment-disputes", "chargeback-triage"] {
            let c = render_sample(name);
            let mut roles = Vec::new();
            for d in &c.deployments {
                let pod = pod_of(d);
                let engines: Vec<_> = containers(d)
                    .into_iter()
                    .filter_map(|(c, sidecar)| {
                        kubelet::engine_command(c, sidecar).map(|cmd| (c, sidecar, cmd))
                    })
                    .collect();
                assert_eq!(
                    engines.len(),
                    1,
                    "{}: one engine per pod",
                    name_of(&d.metadata)
                );
                let (e, sidecar, cmd) = &engines[0];
                assert_eq!(e.name, ENGINE_CONTAINER);
                let cmd = cmd.as_ref().unwrap();
                assert_eq!(cmd.workflow.as_deref(), Some(name));
                assert_eq!(cmd.namespace.as_deref(), Some("default"));
                assert_eq!(cmd.workflow_file, "/etc/r4/workflow.yaml");
                assert_eq!(
                    kubelet::file_source(&pod, e, &cmd.workflow_file).unwrap(),
                    FileSource::ConfigMap {
                        name: config_map_name(name),
                        key: CONFIG_KEY.into()
                    }
                );
                let flags = &e.args.as_ref().unwrap()[1..];
                assert_eq!(&kubelet::parse_engine_args(flags).as_ref(), &Ok(cmd));
                // The real CLI takes the same words (the Redis URL comes from the environment).
                let argv = std::iter::once("r4".to_string())
                    .chain(flags.iter().cloned())
                    .chain(["--redis".into(), "redis://unused".into()]);
                let cli = EngineCli::try_parse_from(argv).unwrap().args;
                assert_eq!(cli.workflow.as_deref(), Some(name));
                assert_eq!(cli.namespace.as_deref(), Some("default"));
                assert_eq!(cli.workflow_file, PathBuf::from("/etc/r4/workflow.yaml"));
                // Its HTTP endpoints and tool proxy are where the pod says they are.
                assert!(
                    cli.listen.ends_with(&format!(":{ENGINE_PORT}")),
                    "{}",
                    cli.listen
                );
                assert_eq!(cli.tools_listen, format!("127.0.0.1:{TOOLS_PORT}"));
                assert_eq!(
                    PathBuf::from(&cli.tools_secrets_dir),
                    PathBuf::from(crate::engine::tools::DEFAULT_SECRETS_DIR)
                );
                match cmd.role {
                    kubelet::Role::Agent => {
                        assert!(*sidecar, "the agent's engine is a native sidecar");
                        let agent = cmd.agent.clone().unwrap();
                        assert_eq!(name_of(&d.metadata), deployment_name(name, &agent));
                        assert_eq!(cli.role, CliRole::Agent);
                        assert_eq!(cli.agent.as_deref(), Some(agent.as_str()));
                        let port = template(d).spec.as_ref().unwrap().containers[0]
                            .ports
                            .as_ref()
                            .unwrap()[0]
                            .container_port;
                        assert_eq!(cli.agent_url, format!("http://127.0.0.1:{port}/tasks"));
                        roles.push(format!("agent {agent}"));
                    }
                    kubelet::Role::Intake => {
                        assert_eq!(cli.role, CliRole::Intake);
                        assert_eq!(name_of(&d.metadata), intake_name(name));
                        roles.push("intake".into());
                    }
                    kubelet::Role::Repair => {
                        assert_eq!(cli.role, CliRole::Repair);
                        assert_eq!(name_of(&d.metadata), repair_name(name));
                        roles.push("repair".into());
                    }
                }
                assert_eq!(
                    env(e, ENGINE_ID_ENV)
                        .and_then(|v| v.value_from.as_ref())
                        .and_then(|f| f.field_ref.as_ref())
                        .map(|f| f.field_path.as_str()),
                    Some("metadata.name")
                );
            }
            let wf = sample(name);
            let mut want: Vec<String> = wf
                .spec
                .agents
                .iter()
                .map(|a| format!("agent {}", a.name))
                .collect();
            want.extend(["intake".into(), "repair".into()]);
            assert_eq!(roles, want);
        }
        // The environment the pods set is the one the CLI reads.
        let cmd = EngineCli::command();
        let env_of = |id: &str| {
            cmd.get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned())
        };
        assert_eq!(env_of("engine_id").as_deref(), Some(ENGINE_ID_ENV));
        assert_eq!(env_of("redis").as_deref(), Some(REDIS_URL_ENV));
    }

    #[test]
    fn tool_credentials_are_mounted_where_the_engine_reads_them() {
        let mut wf = sample("payment-disputes");
        wf.spec.tools[0].headers_from = vec![
            HeaderFrom {
                name: "Authorization".into(),
                secret_ref: SecretKeyRef {
                    name: "bank-creds".into(),
                    key: "token".into(),
                },
            },
            HeaderFrom {
                name: "X-Api-Key".into(),
                secret_ref: SecretKeyRef {
                    name: "bank-key".into(),
                    key: "key".into(),
                },
            },
        ];
        let bank = wf.spec.tools[0].name.clone();
        let c = render(&wf, &wf.spec, &sample_policies(), &opts(1)).unwrap();
        for d in &c.deployments {
            let pod = template(d).spec.as_ref().unwrap();
            let agent = d.metadata.labels.as_ref().unwrap().get(AGENT_LABEL);
            let uses_bank = agent.is_some_and(|a| {
                wf.spec
                    .agents
                    .iter()
                    .any(|s| &s.name == a && s.tools.contains(&bank))
            });
            let volume = pod
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == TOOL_CREDENTIALS_VOLUME);
            assert_eq!(volume.is_some(), uses_bank, "{}", name_of(&d.metadata));
            for (c, _) in containers(d) {
                let mounted = c
                    .volume_mounts
                    .iter()
                    .flatten()
                    .find(|m| m.name == TOOL_CREDENTIALS_VOLUME);
                // Only the engine holds credentials, never the agent.
                assert_eq!(mounted.is_some(), uses_bank && c.name == ENGINE_CONTAINER);
                if let Some(m) = mounted {
                    assert_eq!(m.mount_path, crate::engine::tools::DEFAULT_SECRETS_DIR);
                    assert_eq!(m.read_only, Some(true));
                }
            }
            let Some(volume) = volume else { continue };
            // Lay the projected items out as the kubelet would, and let the engine read them.
            let dir = tempfile::tempdir().unwrap();
            let sources = volume.projected.as_ref().unwrap().sources.as_ref().unwrap();
            for s in sources {
                let secret = s.secret.as_ref().unwrap();
                for item in secret.items.iter().flatten() {
                    let path = dir.path().join(&item.path);
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, format!("{}/{}\n", secret.name, item.key)).unwrap();
                }
            }
            let agent = wf
                .spec
                .agents
                .iter()
                .find(|s| Some(&s.name) == agent)
                .unwrap();
            let headers =
                crate::engine::tools::load_tool_headers(&wf.spec, &agent.tools, dir.path())
                    .unwrap();
            let got: Vec<(String, String)> = headers[&bank]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
                .collect();
            assert_eq!(
                got,
                [
                    ("authorization".into(), "bank-creds/token".into()),
                    ("x-api-key".into(), "bank-key/key".into())
                ]
            );
        }
        // The Secret values themselves never appear: only names and keys.
        let all = serde_json::to_string(&c.to_values()).unwrap();
        assert!(all.contains("bank-creds") && !all.contains("Bearer"));
    }

    #[test]
    fn agent_pods_tell_the_agent_where_its_port_and_tools_are() {
        let mut wf = sample("payment-disputes");
        wf.spec.agents[1].port = Some(9000);
        let c = render(&wf, &wf.spec, &sample_policies(), &opts(1)).unwrap();
        for (i, a) in wf.spec.agents.iter().enumerate() {
            let d = &c.deployments[i];
            let pod = template(d).spec.as_ref().unwrap();
            let agent = &pod.containers[0];
            assert_eq!(agent.name, AGENT_CONTAINER);
            assert_eq!(agent.image.as_deref(), Some(a.image.as_str()));
            let port = a.port.unwrap_or(DEFAULT_AGENT_PORT);
            assert_eq!(agent.ports.as_ref().unwrap()[0].container_port, port);
            assert_eq!(
                env(agent, AGENT_PORT_ENV).and_then(|e| e.value.clone()),
                Some(port.to_string())
            );
            assert_eq!(
                env(agent, TOOLS_URL_ENV).and_then(|e| e.value.clone()),
                (!a.tools.is_empty()).then(|| "http://127.0.0.1:8082".to_string())
            );
            let engine = &pod.init_containers.as_ref().unwrap()[0];
            assert!(
                engine
                    .args
                    .as_ref()
                    .unwrap()
                    .contains(&format!("http://127.0.0.1:{port}/tasks"))
            );
            // A writable /tmp for the agent on a read-only root.
            let tmp = agent.volume_mounts.as_ref().unwrap();
            assert!(
                tmp.iter()
                    .any(|m| m.mount_path == "/tmp" && m.name == TMP_VOLUME)
            );
        }
    }

    #[test]
    fn every_engine_gets_the_forwarded_otel_env_and_no_other_container_does() {
        let wf = sample("payment-disputes");
        let plain = render(&wf, &wf.spec, &sample_policies(), &opts(1)).unwrap();
        assert!(
            engines(&plain)
                .iter()
                .all(|(_, c)| env(c, "OTEL_EXPORTER_OTLP_ENDPOINT").is_none())
        );
        let mut o = opts(1);
        o.engine_env = vec![(
            "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            "http://collector:4318".into(),
        )];
        let c = render(&wf, &wf.spec, &sample_policies(), &o).unwrap();
        let engines = engines(&c);
        // Every role's engine: one per agent, the intake and the repair.
        assert_eq!(engines.len(), c.deployments.len());
        for (d, e) in &engines {
            assert_eq!(
                env(e, "OTEL_EXPORTER_OTLP_ENDPOINT").and_then(|v| v.value.as_deref()),
                Some("http://collector:4318"),
                "{}",
                name_of(&d.metadata)
            );
        }
        for d in &c.deployments {
            for (k, _) in containers(d) {
                if k.name != ENGINE_CONTAINER {
                    assert!(
                        env(k, "OTEL_EXPORTER_OTLP_ENDPOINT").is_none(),
                        "{}",
                        k.name
                    );
                }
            }
        }
    }

    fn render_err(wf: &AgentWorkflow) -> RenderError {
        render(wf, &wf.spec, &sample_policies(), &opts(1)).unwrap_err()
    }

    #[test]
    fn a_name_too_long_for_its_pods_names_the_field() {
        let mut wf = sample("chargeback-triage");
        // "chargeback-triage-" is 18 characters: an agent of 28 makes 46, the longest allowed.
        wf.spec.agents[2].name = "a".repeat(28);
        render(&wf, &wf.spec, &sample_policies(), &opts(1)).unwrap();
        wf.spec.agents[2].name = "a".repeat(29);
        let e = render_err(&wf);
        assert_eq!(e.field(), "spec.agents[2].name");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "spec.agents[2].name: \"chargeback-triage-{}\" is 47 characters;",
                "a".repeat(29)
            )),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
        // The roles' names are longer: the workflow name alone can be too long for them.
        let mut wf = sample("chargeback-triage");
        wf.metadata.name = Some("w".repeat(36));
        wf.spec.agents.truncate(1);
        wf.spec.agents[0].name = "a".into();
        render(&wf, &wf.spec, &sample_policies(), &opts(1)).unwrap();
        wf.metadata.name = Some("w".repeat(37));
        let e = render_err(&wf);
        assert_eq!(e.field(), "metadata.name");
        assert!(e.to_string().contains("at most 36"), "{e}");
    }

    #[test]
    fn an_unknown_policy_ref_names_the_field() {
        let wf = sample("payment-disputes");
        let mut policies = sample_policies();
        policies.remove("bank-policy");
        let e = render(&wf, &wf.spec, &policies, &opts(1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.tools[0].policyRef: CircuitPolicy \"bank-policy\" not found"
        );
        let e = engine_config("payment-disputes", "default", &wf.spec, &policies).unwrap_err();
        assert_eq!(e.field(), "spec.tools[0].policyRef");
        let mut policies = sample_policies();
        policies.remove("default-policy");
        let e = render(&wf, &wf.spec, &policies, &opts(1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.policyRef: CircuitPolicy \"default-policy\" not found"
        );
    }

    #[test]
    fn children_that_would_clash_name_the_field() {
        // An agent whose Deployment would be the intake's.
        let mut wf = sample("payment-disputes");
        wf.spec.agents[2].name = "r4-intake".into();
        let e = render_err(&wf);
        assert_eq!(e.field(), "spec.agents[2].name");
        assert!(e.to_string().contains("same Deployment"), "{e}");
        // ... which is fine while the intake is off.
        wf.spec.intake.as_mut().unwrap().enabled = false;
        let c = render(&wf, &wf.spec, &sample_policies(), &opts(1)).unwrap();
        assert!(c.services.is_empty());
        assert_eq!(c.deployments.len(), 4);
        // An agent port the engine sidecar listens on.
        for port in [ENGINE_PORT, TOOLS_PORT] {
            let mut wf = sample("payment-disputes");
            wf.spec.agents[1].port = Some(port);
            let e = render_err(&wf);
            assert_eq!(e.field(), "spec.agents[1].port", "{e}");
        }
        // A workflow name that cannot name the intake Service.
        let mut wf = sample("payment-disputes");
        wf.metadata.name = Some("1-disputes".into());
        assert_eq!(render_err(&wf).field(), "metadata.name");
        wf.spec.intake = None;
        render(&wf, &wf.spec, &sample_policies(), &opts(1)).unwrap();
    }

    #[test]
    fn missing_metadata_names_the_field() {
        let mut wf = sample("payment-disputes");
        wf.metadata.uid = None;
        assert_eq!(render_err(&wf).field(), "metadata.uid");
        let mut wf = sample("payment-disputes");
        wf.metadata.namespace = None;
        assert_eq!(
            render_err(&wf).to_string(),
            "metadata.namespace: missing (the children live in it)"
        );
    }

    #[test]
    fn the_spec_given_is_rendered_not_the_objects() {
        // Applying an older revision again: its spec, not wf.spec, makes the children.
        let wf = sample("payment-disputes");
        let mut old = wf.spec.clone();
        old.agents[1].image = "ghcr.io/acme/investigator:1.9".into();
        old.repair = None;
        let c = render(&wf, &old, &sample_policies(), &opts(1)).unwrap();
        assert_eq!(c.deployments.len(), 4);
        let pod = template(&c.deployments[1]).spec.as_ref().unwrap();
        assert_eq!(
            pod.containers[0].image.as_deref(),
            Some("ghcr.io/acme/investigator:1.9")
        );
        let cfg = &c.config_map.data.as_ref().unwrap()[CONFIG_KEY];
        assert!(cfg.contains("investigator:1.9"));
    }
}
