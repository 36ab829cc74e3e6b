#!/usr/bin/env bash
# Installs a tool the tests drive from Debian's packages, without the
# package's recommended extras: `prometheus` (the real server
# `tests/fleet.rs` scrapes `vmm exporter` with) or `tmux` (the terminal
# `vmm top` is tested in). Idempotent: a second run checks and returns.
# Prints the tool's path on stdout; progress goes to stderr. Exits 1 with
# one line when it cannot install (not root, no apt, no network), 2 for a
# tool it does not know.
#
# Usage: scripts/ensure-tool.sh prometheus|tmux
set -euo pipefail
tool=${1:-}
case "$tool" in
    prometheus) check() { command -v prometheus >/dev/null 2>&1 && prometheus --version >/dev/null 2>&1; } ;;
    tmux) check() { command -v tmux >/dev/null 2>&1 && tmux -V >/dev/null 2>&1; } ;;
    *) echo "ensure-tool: expected prometheus or tmux, got '$tool'" >&2; exit 2 ;;
esac
if check; then
    command -v "$tool"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-tool: no apt-get on this host; install $tool yourself" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure-tool: not root, cannot apt-get install $tool" >&2
    exit 1
fi
# One installer at a time (tests may call this concurrently).
exec 9>/tmp/ensure-tool.lock
flock 9
if ! check; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "$tool" >&2 \
        || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "$tool" >&2; }
    # Prometheus's package starts a system service where systemd runs; the
    # tests start their own server.
    check
fi
command -v "$tool"
