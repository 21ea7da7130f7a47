#!/usr/bin/env bash
# The operator end to end, as a user drives it: kubectl, helm and the r4 CLI only.
#
#   E2E_TARGET=dev      (make test) start `r4 dev` on a free port, `kubectl apply -f
#                       config/install.yaml` (the chart rendered with defaults; r4 dev stores it,
#                       and simulates the installed controller: its own runs), then the scenario;
#   E2E_TARGET=cluster  (make e2e)  the cluster of the current kubeconfig (kind, k3d):
#                       `helm install r4 charts/r4 --wait` with the image R4_IMAGE=repo:tag
#                       (pull policy IfNotPresent: an image loaded with `kind load`),
#                       a Redis for the samples (e2e/redis.yaml), then the scenario. The samples'
#                       agent images are placeholders: E2E_AGENT_IMAGE and E2E_AGENT_IMAGE_NEXT
#                       name two tags of an image that serves `POST /tasks` (README, "What runs
#                       in the managed pods") to run instead — the sim-agent image
#                       (`make sim-agent-image`, `r4 sim-agent`) tagged twice, as the hosted
#                       workflow (.github/workflows/e2e.yaml) does.
#
# Scenario: install → CRDs and samples applied → children and Ready → tasks pushed through the
# intake Service and completed → kill switch engaged and released (acknowledged by every
# engine) → a short drill (a tool outage, a pod killed) under load and its verdict → a bad image
# → automatic rollback → a good image (the sim agent, r4-sim-agent:e2e-next: on r4 dev too, where
# the kubelet runs it for real) and a task through it → rollback by hand → `r4 status` → delete, children gone → uninstall,
# nothing of r4 left. Each step prints one line; the first failure stops the script with what
# the cluster said.
set -euo pipefail
cd "$(dirname "$0")/.."
R4=${R4:-target/debug/r4}
TARGET=${E2E_TARGET:-cluster}
INSTALL=${E2E_INSTALL:-config/install.yaml}
WF=payment-disputes
tmp=$(mktemp -d)
dev_pid=
feed_pid=
pf_pid=
cleanup() {
  for pid in "$feed_pid" "$pf_pid" "$dev_pid"; do
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  done
  rm -rf "$tmp"
}
trap cleanup EXIT

step() { printf 'e2e: %s\n' "$*"; }
fail() { printf 'e2e: FAILED: %s\n' "$*" >&2; kubectl get aw "$WF" -o yaml >&2 2>/dev/null || true; exit 1; }
# run WHAT COMMAND...: COMMAND must succeed; its output is shown only when it fails.
run() {
  local what=$1; shift
  "$@" >"$tmp/out" 2>&1 || { cat "$tmp/out" >&2; fail "$what"; }
}

# wait_for SECONDS WHAT COMMAND...: poll until COMMAND succeeds.
wait_for() {
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || fail "$what (not within ${secs}s)"
    sleep 0.2
  done
}
jp() { kubectl get aw "$WF" -o "jsonpath=$1"; }
cond_is() { [ "$(jp "{.status.conditions[?(@.type==\"$1\")].status}")" = "$2" ]; }
current_is() { [ "$(jp '{.status.currentRevision}')" = "$1" ]; }
ready_at() { cond_is Ready True && current_is "$1"; }
rolled_back_to() { cond_is RolledBack True && current_is "$1"; }
no_children() { [ -z "$(kubectl get deployments -l "r4.dev/workflow=$WF" -o name)" ]; }

# The intake Service of the workflow, reached from here: INTAKE=http://127.0.0.1:PORT.
# On a cluster, `kubectl port-forward` to the Service; on r4 dev every pod shares 127.0.0.1 and
# each intake listens on a port the system picked, which r4 dev logs ("intake listening") — the
# newest intake pod that still exists and is Ready.
intake_reachable() {
  case "$TARGET" in
    cluster)
      [ -n "$pf_pid" ] && kill -0 "$pf_pid" 2>/dev/null && [ -n "${INTAKE:-}" ] && return 0
      kubectl port-forward "svc/$WF-r4-intake" :80 >"$tmp/pf.log" 2>&1 &
      pf_pid=$!
      local deadline=$((SECONDS + 10)) port=
      until port=$(sed -n 's/^Forwarding from 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$tmp/pf.log" | head -1) && [ -n "$port" ]; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
      done
      INTAKE=http://127.0.0.1:$port
      ;;
    dev)
      local line pod addr
      INTAKE=
      while read -r line; do
        pod=$(sed -n 's/.* pod=\([^ ]*\) .*/\1/p' <<<"$line")
        addr=$(sed -n 's/.* listen=\([^ ]*\) .*/\1/p' <<<"$line")
        if [ "$(kubectl get pod "$pod" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]; then
          INTAKE=http://$addr
          break
        fi
      done < <(grep "intake listening" "$tmp/dev.log" | grep "workflow=$WF" | tac)
      [ -n "${INTAKE:-}" ] || return 1
      ;;
  esac
  curl -fsS -m 5 "$INTAKE/readyz" >/dev/null
}
# push_tasks FILE N TAG: N tasks in one batch (keys e2e-TAG-1…N); their ids appended to FILE.
push_tasks() {
  local file=$1 n=$2 tag=$3 i body='{"tasks": ['
  for ((i = 1; i <= n; i++)); do
    body+="{\"payload\": {\"ticket\": \"$tag-$i\"}, \"idempotency_key\": \"e2e-$tag-$i\"}"
    [ "$i" -lt "$n" ] && body+=','
  done
  body+=']}'
  curl -fsS -m 10 -X POST "$INTAKE/v1/tasks:batch" -H 'content-type: application/json' -d "$body" \
    | grep -o '"task_id":"[^"]*"' | cut -d'"' -f4 >>"$file"
}
# in_state FILE STATE...: how many of the tasks in FILE are in one of the STATEs
# (`GET /v1/tasks/{id}`: pending, in_progress, completed, dead_lettered).
in_state() {
  local file=$1 id n=0 state; shift
  while read -r id; do
    state=$(curl -fsS -m 5 "$INTAKE/v1/tasks/$id" | grep -o '"state":"[a-z_]*"' | cut -d'"' -f4) || true
    for s in "$@"; do [ "$state" = "$s" ] && n=$((n + 1)); done
  done <"$file"
  echo "$n"
}
# all_in FILE STATE...: every task in FILE is in one of the STATEs.
all_in() { [ "$(in_state "$@")" = "$(wc -l <"$1")" ]; }
# feed: a batch of 5 tasks every 0.5 s until killed (the load a drill measures).
feed() {
  local k=0
  while true; do
    k=$((k + 1))
    push_tasks "$tmp/feed" 5 "feed-$k" 2>/dev/null || true
    sleep 0.5
  done
}

case "$TARGET" in
  dev)
    [ -f "$INSTALL" ] || { echo "e2e: $INSTALL not found (make install-yaml writes it)" >&2; exit 2; }
    # Port 0: the system picks a free one; the kubeconfig r4 dev writes names it.
    "$R4" dev --listen 127.0.0.1:0 --kubeconfig-out "$tmp/kubeconfig" >"$tmp/dev.log" 2>&1 &
    dev_pid=$!
    export KUBECONFIG=$tmp/kubeconfig
    wait_for 30 "r4 dev serving" kubectl get namespaces
    step "$(head -1 "$tmp/dev.log")"
    step "install: kubectl apply -f $INSTALL"
    run "kubectl apply -f $INSTALL" kubectl apply -f "$INSTALL"
    ;;
  cluster)
    kubectl version --request-timeout=5s >/dev/null 2>&1 || { echo "e2e: no reachable cluster (kubeconfig); start kind or k3d first" >&2; exit 2; }
    [[ "${R4_IMAGE:-}" == *:* ]] || { echo "e2e: R4_IMAGE=repo:tag must name the image to install" >&2; exit 2; }
    # Without real agents the samples can never be Ready: say so now, not after 90 s.
    [ -n "${E2E_AGENT_IMAGE:-}" ] && [ -n "${E2E_AGENT_IMAGE_NEXT:-}" ] || {
      echo "e2e: the samples' agent images (ghcr.io/acme/…) are placeholders: set E2E_AGENT_IMAGE and E2E_AGENT_IMAGE_NEXT to two tags of an image serving POST /tasks, loaded into the cluster — e.g. 'make sim-agent-image SIM_AGENT_IMAGE=r4-sim-agent:e2e', 'docker tag r4-sim-agent:e2e r4-sim-agent:e2e-next', 'kind load docker-image r4-sim-agent:e2e r4-sim-agent:e2e-next' (what .github/workflows/e2e.yaml does)" >&2
      exit 2
    }
    step "install: helm install r4 charts/r4 (image $R4_IMAGE)"
    run "helm install" helm install r4 charts/r4 -n r4-system --create-namespace \
      --set "image.repository=${R4_IMAGE%:*},image.tag=${R4_IMAGE##*:},image.pullPolicy=IfNotPresent" \
      --wait --timeout 5m
    step "a Redis for the samples: redis.r4-system:6379"
    run "redis" kubectl apply -f e2e/redis.yaml
    run "redis rollout" kubectl -n r4-system rollout status deployment/redis --timeout=120s
    ;;
  *) echo "e2e: E2E_TARGET must be dev or cluster, got $TARGET" >&2; exit 2 ;;
esac
# The installed controller's Deployments roll out (on r4 dev: simulated, see src/devcluster/kubelet).
for d in $(kubectl -n r4-system get deployments -l app.kubernetes.io/name=r4 -o name); do
  run "$d rolled out" kubectl -n r4-system rollout status "$d" --timeout=60s
done

step "CRDs"
kubectl apply -f crds/ >/dev/null
for crd in agentworkflows circuitpolicies chaosdrills; do
  wait_for 30 "CRD $crd established" kubectl get "$crd.r4.dev"
done

step "samples"
if [ "$TARGET" = cluster ] && [ -n "${E2E_AGENT_IMAGE:-}" ]; then
  for f in config/samples/*.yaml; do sed "s#image: ghcr.io/acme/[^ ]*#image: $E2E_AGENT_IMAGE#" "$f"; echo ---; done >"$tmp/samples.yaml"
  kubectl apply -f "$tmp/samples.yaml" >/dev/null
else
  kubectl apply -f config/samples/ >/dev/null
fi
wait_for 90 "$WF Ready at revision 1" ready_at 1
for d in intake investigation resolution r4-intake r4-repair; do
  kubectl get deployment "$WF-$d" >/dev/null || fail "deployment $WF-$d missing"
done
kubectl get configmap "$WF-engine" >/dev/null && kubectl get service "$WF-r4-intake" >/dev/null || fail "configmap or service missing"
step "children and Ready: $(jp '{.status.agentsReady}') agents ready"

wait_for 30 "the intake Service reachable" intake_reachable
push_tasks "$tmp/before" 20 before || fail "POST $INTAKE/v1/tasks:batch"
wait_for 30 "20 tasks completed" all_in "$tmp/before" completed
step "intake: 20 tasks pushed through the intake Service ($INTAKE), 20 completed"

step "kill switch"
"$R4" kill "$WF/resolution" --wait=10s || fail "r4 kill"
cond_is KillSwitchEngaged True || fail "KillSwitchEngaged is not True"
"$R4" resume "$WF/resolution" --wait=10s || fail "r4 resume"
cond_is KillSwitchEngaged False || fail "KillSwitchEngaged is not False"

step "a drill under load: the bank down for 4s, an investigation pod killed"
touch "$tmp/feed"
feed &
feed_pid=$!
kubectl apply -f - >/dev/null <<'EOF2'
apiVersion: r4.dev/v1alpha1
kind: ChaosDrill
metadata:
  name: e2e-bank-outage
spec:
  workflowRef: payment-disputes
  baseline: 2s
  duration: 6s
  faults:
    - {type: ToolOutage, tool: bank-api, after: 1s, for: 4s}
    - {type: PodKill, agent: investigation, after: 2s, count: 1}
  expect: {maxRecoverySeconds: 30}
EOF2
drill_verdict() { [ -n "$(kubectl get drill e2e-bank-outage -o 'jsonpath={.status.lastVerdict}')" ]; }
wait_for 120 "a verdict of drill e2e-bank-outage" drill_verdict
kill "$feed_pid" 2>/dev/null || true; wait "$feed_pid" 2>/dev/null || true; feed_pid=
"$R4" drill history e2e-bank-outage || fail "r4 drill history"
drill_record() { [ -n "$(jp '{.status.drills.lastVerdict}')" ]; }
wait_for 30 "the workflow's drill record" drill_record
step "drill: $(kubectl get drill e2e-bank-outage -o 'jsonpath={.status.conditions[?(@.type=="LastRunPassed")].message}')"
kubectl delete drill e2e-bank-outage >/dev/null
# After the drill the workflow works again: a probe task completes. (Right after the outage a
# replica's breaker or throttle may still route a task to manual review, as the sample says;
# so a probe at a time until one completes.)
probe=0
recovered() {
  probe=$((probe + 1))
  : >"$tmp/probe"
  push_tasks "$tmp/probe" 1 "probe-$probe" || return 1
  local deadline=$((SECONDS + 5))
  until all_in "$tmp/probe" completed; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}
wait_for 60 "a task completed after the drill" recovered
step "intake: a task completes after the drill ($probe probe(s)); of the $(wc -l <"$tmp/feed") fed during it, $(in_state "$tmp/feed" completed) completed, $(in_state "$tmp/feed" dead_lettered) dead-lettered, the rest in manual review"

BAD_IMAGE=ghcr.io/acme/resolver:cannot-pull
# The good change puts the sim agent in the resolution agent's pods: r4 dev runs an
# r4-sim-agent container for real (the engine delivers to it over HTTP, the agent protocol),
# so the image the cluster run uses for every agent is exercised here too.
GOOD_IMAGE=r4-sim-agent:e2e-next
if [ "$TARGET" = cluster ] && [ -n "${E2E_AGENT_IMAGE:-}" ]; then
  BAD_IMAGE=${E2E_AGENT_IMAGE%:*}:cannot-pull
  GOOD_IMAGE=${E2E_AGENT_IMAGE_NEXT:?E2E_AGENT_IMAGE_NEXT: a second tag of the agent image}
fi
step "a bad image: automatic rollback"
# A shorter deadline first (rollout settings are not a new revision).
kubectl patch aw "$WF" --type merge -p '{"spec":{"rollout":{"progressDeadlineSeconds":10}}}' >/dev/null
kubectl patch aw "$WF" --type json \
  -p "[{\"op\":\"replace\",\"path\":\"/spec/agents/2/image\",\"value\":\"$BAD_IMAGE\"}]" >/dev/null
wait_for 60 "automatic rollback to revision 1" rolled_back_to 1
step "$(jp '{.status.conditions[?(@.type=="RolledBack")].message}')"

step "a good image, then rollback by hand"
kubectl patch aw "$WF" --type json \
  -p "[{\"op\":\"replace\",\"path\":\"/spec/agents/2/image\",\"value\":\"$GOOD_IMAGE\"}]" >/dev/null
wait_for 60 "revision 3 healthy" ready_at 3
# Revision 3 replaced every pod of the workflow, the intake's too: find it again (a fresh
# port-forward on a cluster, the new pod's port on r4 dev).
if [ -n "$pf_pid" ]; then kill "$pf_pid" 2>/dev/null || true; wait "$pf_pid" 2>/dev/null || true; pf_pid=; fi
INTAKE=
wait_for 30 "the intake Service reachable at revision 3" intake_reachable
# (The probes' idempotency keys go on from the last one: a key used before names its task.)
first=$((probe + 1))
wait_for 60 "a task completed at revision 3" recovered
step "revision 3: a task completed through the resolution agent $GOOD_IMAGE ($((probe - first + 1)) probe(s))"
"$R4" rollback "$WF" --to 1 --wait=30s || fail "r4 rollback"
current_is 1 || fail "not at revision 1 after r4 rollback"

step "r4 status"
"$R4" status "$WF" || fail "r4 status"

step "delete"
kubectl delete -f config/samples/ --wait=true --timeout=60s >/dev/null
wait_for 60 "children garbage-collected" no_children

# Nothing labelled as r4's — the install's objects (app.kubernetes.io/name=r4) and a workflow's
# children (app.kubernetes.io/part-of=r4) — is left once it is uninstalled. (The CRDs stay: Helm
# never deletes a chart's CRDs, and deleting them deletes every workflow in the cluster.)
r4_left() {
  local l
  for l in app.kubernetes.io/name=r4 app.kubernetes.io/part-of=r4; do
    kubectl get deployments,replicasets,pods,services,configmaps,secrets,serviceaccounts,roles,rolebindings,networkpolicies,poddisruptionbudgets \
      -A -l "$l" -o name 2>/dev/null
    kubectl get clusterroles,clusterrolebindings -l "$l" -o name 2>/dev/null
  done
}
nothing_left() { [ -z "$(r4_left)" ]; }
case "$TARGET" in
  dev)
    step "uninstall: kubectl delete -f $INSTALL"
    # --ignore-not-found: the namespace may take its objects before kubectl asks for them.
    run "kubectl delete -f $INSTALL" kubectl delete -f "$INSTALL" --ignore-not-found --wait=true --timeout=60s
    ;;
  cluster)
    [ -n "$pf_pid" ] && { kill "$pf_pid" 2>/dev/null || true; wait "$pf_pid" 2>/dev/null || true; pf_pid=; }
    step "uninstall: helm uninstall r4"
    kubectl delete -f e2e/redis.yaml --ignore-not-found >/dev/null
    run "helm uninstall" helm uninstall r4 -n r4-system --wait --timeout 2m
    ;;
esac
deadline=$((SECONDS + 60))
until nothing_left; do
  [ "$SECONDS" -lt "$deadline" ] || fail "left after uninstall: $(r4_left | tr '\n' ' ')"
  sleep 0.2
done
step "passed"
