#!/usr/bin/env bash
# Installs Debian's `prometheus` server (the real one `tests/fleet.rs` scrapes
# `vmm exporter` with), without its recommended extras. Idempotent: a second
# run checks and returns. Prints the server's path on stdout; progress goes
# to stderr. Exits 1 with one line when it cannot install (not root, no apt,
# no network).
set -euo pipefail
check() { command -v prometheus >/dev/null 2>&1 && prometheus --version >/dev/null 2>&1; }
if check; then
    command -v prometheus
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-prometheus: no apt-get on this host; install Prometheus 2.x yourself" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure-prometheus: not root, cannot apt-get install prometheus" >&2
    exit 1
fi
# One installer at a time (tests may call this concurrently).
exec 9>/tmp/ensure-prometheus.lock
flock 9
if ! check; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends prometheus >&2 \
        || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends prometheus >&2; }
    # The package starts a system service where systemd runs; the tests start
    # their own server.
    check
fi
command -v prometheus
