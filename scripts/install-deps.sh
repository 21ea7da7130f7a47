#!/usr/bin/env bash
# Installs what r4's tests need on a fresh Debian/Ubuntu machine, only when it is missing:
#   - redis-server (the tests start their own on free ports),
#   - promtool (Debian's `prometheus` package) for the alerting rules,
#   - a Python virtualenv at .tools/venv with the pinned checkers of
#     scripts/requirements-tools.txt (the Helm engine from helm-python-sdk,
#     kubernetes-validate, checkov).
# Everything comes from the distribution's and PyPI's registries; nothing is downloaded
# from anywhere else.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  # --no-install-recommends: promtool is all we need from `prometheus`, not its exporters.
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The tests start their own servers; the distribution's services are not needed.
  if command -v systemctl >/dev/null 2>&1; then
    $sudo systemctl stop redis-server prometheus >/dev/null 2>&1 || true
  fi
fi

# The Python checkers, reinstalled only when the pinned list changed.
venv=.tools/venv
stamp=$venv/.requirements
if ! cmp -s scripts/requirements-tools.txt "$stamp" 2>/dev/null; then
  echo "installing the chart and install checkers into $venv (PyPI)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r scripts/requirements-tools.txt
  cp scripts/requirements-tools.txt "$stamp"
fi
