#!/usr/bin/env bash
# `make rules-check`: r4's Prometheus rules and Grafana dashboard, checked by tools nobody here
# wrote.
#   1. `promtool check rules` — the rule file parses, every expression is valid PromQL;
#   2. `promtool test rules` — the alerts' unit tests (r4.rules.test.yaml) pass;
#   3. every alert carries a `severity` label and `summary`, `description` and `runbook_url`
#      annotations, and every runbook_url points at an anchor the README has;
#   4. the dashboard is valid JSON with the datasource/namespace/workflow variables, and every
#      panel query is valid PromQL (`promtool check rules` on the queries as recording rules).
# That every series the rules and the dashboard name exists on a real /metrics is the
# Rust test tests/metrics_series.rs (cargo test), not this script.
# Each failure is one line on stderr; the exit status is non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

rules=charts/r4/files/rules/r4.rules.yaml
tests=charts/r4/files/rules/r4.rules.test.yaml
dashboard=charts/r4/files/dashboards/r4.json
python=.tools/venv/bin/python

fail() {
  echo "rules-check: $*" >&2
  exit 1
}

command -v promtool >/dev/null 2>&1 || fail "promtool not found (make deps installs Debian's prometheus package)"
[ -x "$python" ] || fail "$python not found (make deps creates it)"
for f in "$rules" "$tests" "$dashboard"; do
  [ -f "$f" ] || fail "$f is missing"
done

out=$(promtool check rules "$rules" 2>&1) ||
  fail "promtool check rules $rules: $(echo "$out" | grep -v '^Checking' | tr '\n' ' ' | sed 's/  */ /g')"

# promtool reads rule_files relative to the test file.
tested=$(promtool test rules "$tests" 2>&1) ||
  fail "promtool test rules $tests failed: $(echo "$tested" | grep -E 'alertname:|expr:|FAILED|error' | head -5 | tr '\n' ' ' | sed 's/  */ /g')"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" - "$rules" "$dashboard" README.md "$tmp/dashboard.rules.yaml" <<'EOF' || exit 1
import json, re, sys, yaml

rules_path, dashboard_path, readme_path = sys.argv[1:4]

def fail(msg):
    print(f"rules-check: {msg}", file=sys.stderr)
    sys.exit(1)

readme = open(readme_path, encoding="utf-8").read()
anchors = set(re.findall(r'<a id="([^"]+)"', readme))
doc = yaml.safe_load(open(rules_path, encoding="utf-8"))
alerts = 0
for g in doc.get("groups", []):
    for r in g.get("rules", []):
        name = r.get("alert")
        if not name:
            continue
        alerts += 1
        if not r.get("labels", {}).get("severity"):
            fail(f"{rules_path}: alert {name} has no severity label")
        ann = r.get("annotations", {})
        for k in ("summary", "description", "runbook_url"):
            if not ann.get(k):
                fail(f"{rules_path}: alert {name} has no {k} annotation")
        anchor = ann["runbook_url"].rpartition("#")[2]
        if anchor not in anchors:
            fail(f'{rules_path}: alert {name}: runbook_url anchor #{anchor} is not in {readme_path} (<a id="{anchor}">)')
if alerts == 0:
    fail(f"{rules_path}: no alert")
try:
    dash = json.load(open(dashboard_path, encoding="utf-8"))
except ValueError as e:
    fail(f"{dashboard_path}: not valid JSON: {e}")
if dash.get("schemaVersion", 0) < 36:
    fail(f"{dashboard_path}: schemaVersion {dash.get('schemaVersion')} is older than 36")
names = {v.get("name") for v in dash.get("templating", {}).get("list", [])}
for v in ("datasource", "namespace", "workflow"):
    if v not in names:
        fail(f"{dashboard_path}: no ${v} template variable")
# Every panel query as a recording rule, Grafana's variables given plausible values, for
# promtool to parse (below).
grafana = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
           "$namespace": ".*", "$workflow": ".*"}
exprs = []
def walk(panels):
    for p in panels:
        walk(p.get("panels", []))
        for t in p.get("targets", []):
            e = t.get("expr", "")
            for k, v in grafana.items():
                e = e.replace(k, v)
            if "$" in e:
                fail(f"{dashboard_path}: panel {p.get('title')!r}: unknown variable in {t.get('expr')!r}")
            exprs.append({"record": f"dashboard:panel_{len(exprs)}", "expr": e})
walk(dash.get("panels", []))
if not exprs:
    fail(f"{dashboard_path}: no panel query")
with open(sys.argv[4], "w", encoding="utf-8") as f:
    yaml.safe_dump({"groups": [{"name": "dashboard", "rules": exprs}]}, f)
EOF

out=$(promtool check rules "$tmp/dashboard.rules.yaml" 2>&1) ||
  fail "$dashboard: a panel query is not valid PromQL: $(echo "$out" | grep -v '^Checking' | tr '\n' ' ' | sed 's/  */ /g')"

groups=$("$python" -c 'import sys, yaml; print(len(yaml.safe_load(open(sys.argv[1]))["tests"]))' "$tests")
echo "rules-check: ok — $rules checked, $groups promtool test groups passed, $dashboard queries valid"
