#!/usr/bin/env bash
# Runs every benchmark that is available in this build and prints one JSON line per bench.
set -euo pipefail
r4=target/release/r4
for b in hedge breaker killswitch; do
  if $r4 bench "$b" --help >/dev/null 2>&1; then
    echo "== $b"; $r4 bench "$b" --json | tail -n 1
  fi
done
if $r4 bench pipeline --help >/dev/null 2>&1; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  dir=$(mktemp -d)
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" --daemonize yes >/dev/null
  trap 'redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
  for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  echo "== pipeline"; $r4 bench pipeline --redis "redis://127.0.0.1:$port" --json | tail -n 1
fi
