#!/usr/bin/env bash
# Installs the Python packages the end-to-end tests need (the Prometheus
# text parser of `prometheus_client`) into a virtual environment under the
# cargo target directory. Idempotent: a second run checks and returns.
# Prints the environment's python on stdout; progress goes to stderr.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${CARGO_TARGET_DIR:-$root/target}/python-deps"
packages=("prometheus-client==0.26.0")
check='import prometheus_client.parser'

python="$venv/bin/python"
if [ -x "$python" ] && "$python" -c "$check" 2>/dev/null; then
    echo "$python"
    exit 0
fi
mkdir -p "$(dirname "$venv")"
# One installer at a time (tests may call this concurrently).
exec 9>"$venv.lock"
flock 9
if ! { [ -x "$python" ] && "$python" -c "$check" 2>/dev/null; }; then
    host_python="$(command -v python3 || true)"
    if [ -z "$host_python" ]; then
        echo "ensure-python-deps: python3 is not installed" >&2
        exit 1
    fi
    rm -rf "$venv"
    "$host_python" -m venv "$venv" >&2
    "$python" -m pip install --quiet --disable-pip-version-check "${packages[@]}" >&2
    "$python" -c "$check"
fi
echo "$python"
