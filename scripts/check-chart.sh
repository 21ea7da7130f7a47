#!/usr/bin/env bash
# The Helm chart charts/r4 checked by tools nobody here wrote (installed by `make deps` into
# .tools/venv from PyPI):
#   - its crds/ are byte-identical to crds/, its files/rbac/role.yaml to config/rbac/role.yaml;
#   - the Helm engine of helm-python-sdk (scripts/helm.py) lints it strictly and renders it
#     with the default values and with ci/ha-values.yaml;
#   - kubernetes-validate --strict validates every rendered object of a built-in kind against
#     Kubernetes 1.32 (kubectl's version here); kinds that CRDs define (ServiceMonitor,
#     PrometheusRule, r4's own) have no schema there and are named as skipped;
#   - checkov finds no failed Kubernetes check on either render (a skip is a
#     `checkov.io/skipN: CKV_…=reason` annotation in the chart, and must give a reason).
#
#   scripts/check-chart.sh                        all of the above
#   scripts/check-chart.sh --write-install-yaml   regenerate config/install.yaml
#   scripts/check-chart.sh --check-install-yaml   fail when config/install.yaml is stale
#
# Every failure is one line naming what failed, and a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."

CHART=charts/r4
PY=.tools/venv/bin/python
VALIDATE=.tools/venv/bin/kubernetes-validate
CHECKOV=.tools/venv/bin/checkov
KUBE_VERSION=1.32.0
INSTALL_YAML=config/install.yaml

die() { echo "check-chart: $*" >&2; exit 1; }

for tool in "$PY" "$VALIDATE" "$CHECKOV"; do
  [ -x "$tool" ] || die "$tool is missing: run 'make deps'"
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mode=${1:-all}
case "$mode" in
  --write-install-yaml)
    "$PY" scripts/helm.py install-yaml "$CHART" --out "$tmp/install.yaml" || exit 1
    cp "$tmp/install.yaml" "$INSTALL_YAML"
    echo "wrote $INSTALL_YAML"
    exit 0 ;;
  --check-install-yaml)
    "$PY" scripts/helm.py install-yaml "$CHART" --out "$tmp/install.yaml" || exit 1
    cmp -s "$tmp/install.yaml" "$INSTALL_YAML" || die "$INSTALL_YAML is stale: run 'make install-yaml'"
    echo "$INSTALL_YAML is fresh"
    exit 0 ;;
  all) ;;
  *) die "unknown argument $mode (none, --write-install-yaml or --check-install-yaml)" ;;
esac

start=$SECONDS

# (e) The chart's copies of generated files.
diff -r crds "$CHART/crds" >/dev/null || die "$CHART/crds differs from crds/: cp crds/*.yaml $CHART/crds/ (and remove extra files)"
cmp -s config/rbac/role.yaml "$CHART/files/rbac/role.yaml" \
  || die "$CHART/files/rbac/role.yaml differs from config/rbac/role.yaml: run 'make rbac'"
echo "crds/ and config/rbac/role.yaml: the chart's copies are identical"

# (a, b) Lint and render, default and HA values (helm.py prints its own one-line failures).
"$PY" scripts/helm.py lint "$CHART" || exit 1
"$PY" scripts/helm.py lint "$CHART" -f "$CHART/ci/ha-values.yaml" || exit 1
"$PY" scripts/helm.py render "$CHART" --out "$tmp/default" || exit 1
"$PY" scripts/helm.py render "$CHART" -f "$CHART/ci/ha-values.yaml" --out "$tmp/ha" || exit 1
"$PY" scripts/helm.py install-yaml "$CHART" --out "$tmp/install.yaml" || exit 1

# (c) Every object of a built-in kind against Kubernetes' schemas, unknown fields refused
# (and the install.yaml it would write: the default render and its Namespace).
shopt -s nullglob
builtin=("$tmp"/default/builtin/*.yaml "$tmp"/ha/builtin/*.yaml)
custom=("$tmp"/default/custom/*.yaml "$tmp"/ha/custom/*.yaml)
[ ${#builtin[@]} -gt 0 ] || die "the chart rendered no objects"
if ! out=$("$VALIDATE" --strict -k "$KUBE_VERSION" --quiet --no-warn "${builtin[@]}" "$tmp/install.yaml" 2>&1); then
  first=$(printf '%s\n' "$out" | grep -v '^\s*$' | head -n 1 | sed "s|$tmp/||g")
  die "kubernetes-validate --strict (Kubernetes $KUBE_VERSION) refused a rendered object: $first"
fi
skipped=none
if [ ${#custom[@]} -gt 0 ]; then
  skipped=$(sed -n 's/^kind: *//p' "${custom[@]}" | sort -u | paste -sd, - | sed 's/,/, /g')
fi
echo "kubernetes-validate --strict -k $KUBE_VERSION: ${#builtin[@]} rendered objects and install.yaml valid;" \
  "${#custom[@]} skipped, of the kinds CRDs define (no schema there): $skipped"

# (d) checkov, once over both renders and install.yaml (it is slow to start).
"$CHECKOV" -d "$tmp" --framework kubernetes --skip-download --quiet -o json >"$tmp/checkov.json" 2>"$tmp/checkov.err" || true
"$PY" - "$tmp/checkov.json" "$tmp" <<'EOF' || exit 1
import glob, json, re, sys
path, tmp = sys.argv[1], sys.argv[2]
try:
    with open(path) as f:
        reports = json.load(f)
except (OSError, ValueError) as e:
    print(f"check-chart: checkov produced no report ({e}): see its output", file=sys.stderr)
    sys.exit(1)
reports = reports if isinstance(reports, list) else [reports]
passed = failed = skipped = 0
fails, unreasoned = [], []
for r in reports:
    if r.get("check_type") != "kubernetes":
        continue
    s = r["summary"]
    if s.get("parsing_errors"):
        print(f"check-chart: checkov could not parse {s['parsing_errors']} rendered file(s)", file=sys.stderr)
        sys.exit(1)
    passed += s["passed"]; failed += s["failed"]; skipped += s["skipped"]
    res = r["results"]
    fails += [f"{c['check_id']} ({c['check_name']}) on {c['resource']} in {c['file_path'].lstrip('/')}" for c in res["failed_checks"]]
if passed == 0:
    print("check-chart: checkov passed no check: did it scan the render?", file=sys.stderr)
    sys.exit(1)
# A skip must carry a reason: `checkov.io/skipN: CKV_…=<reason of a few words>`.
for f in sorted(glob.glob(f"{tmp}/*/*/*.yaml")):
    with open(f) as fh:
        text = fh.read()
    for m in re.finditer(r"checkov\.io/skip\d+:\s*(\S+?)(?:=(.*))?$", text, re.M):
        if len((m.group(2) or "").split()) < 4:
            unreasoned.append(f"{m.group(1)} in {f[len(tmp) + 1:]}")
if unreasoned:
    print(f"check-chart: a checkov skip without a reason: {unreasoned[0]}", file=sys.stderr)
    sys.exit(1)
print(f"checkov --framework kubernetes (both renders, install.yaml): {passed} passed, {failed} failed, {skipped} skipped (reasons in the chart's checkov.io/skip annotations)")
if fails:
    more = f" (and {len(fails) - 1} more)" if len(fails) > 1 else ""
    print(f"check-chart: checkov failed {fails[0]}{more}", file=sys.stderr)
    sys.exit(1)
EOF

echo "chart-check: ok in $((SECONDS - start)) s"
