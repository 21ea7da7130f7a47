#!/usr/bin/env bash
# The operator end to end, as a user drives it: kubectl and the r4 CLI only.
#
#   E2E_TARGET=dev      (make test) start `r4 dev` on a free port and run against it;
#   E2E_TARGET=cluster  (make e2e)  the cluster of the current kubeconfig, with the controller
#                                   already installed (see README, "Installing on a cluster").
#
# Scenario: CRDs and samples applied → children and Ready → kill switch engaged and released
# (acknowledged by every engine) → a short drill (a tool outage, a pod killed) and its verdict →
# a bad image → automatic rollback → rollback by hand →
# `r4 status` → delete, children gone. Each step prints one line; the first failure stops the
# script with what the cluster said.
set -euo pipefail
cd "$(dirname "$0")/.."
R4=${R4:-target/debug/r4}
TARGET=${E2E_TARGET:-cluster}
WF=payment-disputes
tmp=$(mktemp -d)
dev_pid=
cleanup() {
  if [ -n "$dev_pid" ]; then kill "$dev_pid" 2>/dev/null || true; wait "$dev_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

step() { printf 'e2e: %s\n' "$*"; }
fail() { printf 'e2e: FAILED: %s\n' "$*" >&2; kubectl get aw "$WF" -o yaml >&2 2>/dev/null || true; exit 1; }

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

case "$TARGET" in
  dev)
    # Port 0: the system picks a free one; the kubeconfig r4 dev writes names it.
    "$R4" dev --listen 127.0.0.1:0 --kubeconfig-out "$tmp/kubeconfig" >"$tmp/dev.log" 2>&1 &
    dev_pid=$!
    export KUBECONFIG=$tmp/kubeconfig
    wait_for 30 "r4 dev serving" kubectl get namespaces
    step "$(head -1 "$tmp/dev.log")"
    ;;
  cluster)
    kubectl version --request-timeout=5s >/dev/null 2>&1 || { echo "e2e: no reachable cluster (kubeconfig); start kind or k3d first" >&2; exit 2; }
    ;;
  *) echo "e2e: E2E_TARGET must be dev or cluster, got $TARGET" >&2; exit 2 ;;
esac

step "CRDs"
kubectl apply -f crds/ >/dev/null
for crd in agentworkflows circuitpolicies chaosdrills; do
  wait_for 30 "CRD $crd established" kubectl get "$crd.r4.dev"
done

step "samples"
kubectl apply -f config/samples/ >/dev/null
wait_for 90 "$WF Ready at revision 1" ready_at 1
for d in intake investigation resolution r4-intake r4-repair; do
  kubectl get deployment "$WF-$d" >/dev/null || fail "deployment $WF-$d missing"
done
kubectl get configmap "$WF-engine" >/dev/null && kubectl get service "$WF-r4-intake" >/dev/null || fail "configmap or service missing"
step "children and Ready: $(jp '{.status.agentsReady}') agents ready"

step "kill switch"
"$R4" kill "$WF/resolution" --wait=10s || fail "r4 kill"
cond_is KillSwitchEngaged True || fail "KillSwitchEngaged is not True"
"$R4" resume "$WF/resolution" --wait=10s || fail "r4 resume"
cond_is KillSwitchEngaged False || fail "KillSwitchEngaged is not False"

step "a drill: the bank down for 4s, an investigation pod killed"
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
"$R4" drill history e2e-bank-outage || fail "r4 drill history"
drill_record() { [ -n "$(jp '{.status.drills.lastVerdict}')" ]; }
wait_for 30 "the workflow's drill record" drill_record
step "drill: $(kubectl get drill e2e-bank-outage -o 'jsonpath={.status.conditions[?(@.type=="LastRunPassed")].message}')"
kubectl delete drill e2e-bank-outage >/dev/null

step "a bad image: automatic rollback"
# A shorter deadline first (rollout settings are not a new revision).
kubectl patch aw "$WF" --type merge -p '{"spec":{"rollout":{"progressDeadlineSeconds":10}}}' >/dev/null
kubectl patch aw "$WF" --type json \
  -p '[{"op":"replace","path":"/spec/agents/2/image","value":"ghcr.io/acme/resolver:cannot-pull"}]' >/dev/null
wait_for 60 "automatic rollback to revision 1" rolled_back_to 1
step "$(jp '{.status.conditions[?(@.type=="RolledBack")].message}')"

step "a good image, then rollback by hand"
kubectl patch aw "$WF" --type json \
  -p '[{"op":"replace","path":"/spec/agents/2/image","value":"ghcr.io/acme/resolver:1.2"}]' >/dev/null
wait_for 60 "revision 3 healthy" ready_at 3
"$R4" rollback "$WF" --to 1 --wait=30s || fail "r4 rollback"
current_is 1 || fail "not at revision 1 after r4 rollback"

step "r4 status"
"$R4" status "$WF" || fail "r4 status"

step "delete"
kubectl delete -f config/samples/ --wait=true --timeout=60s >/dev/null
wait_for 60 "children garbage-collected" no_children
step "passed"
