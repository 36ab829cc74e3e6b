#!/usr/bin/env bash
# Linux perf acceptance: Linux's own perf, inside a Linux guest, on vmm's
# virtual PMU. Builds what is missing (build.sh for the guest, cargo for
# vmm), then acceptance.py boots the guest three ways (vPMU on, off, and
# with cycles denied), runs guest-images/linux/perf-checks inside, reads the
# VMM's API while it runs, and prints a pass/fail table. See README.md.
#
# Usage: acceptance.sh [acceptance.py options: --only main,off,deny,
#        --sequential, --keep DIR, --json FILE, --timeout S, --memory MIB]
# Environment: VMM (a vmm binary to test; default: cargo build --release
# and target/release/vmm).
#
# Exit codes: 0 passed, 1 a check failed, 2 set-up error (build failed,
# python3 missing, bad arguments), 5 Linux did not reach /init, 6 no usable
# /dev/kvm.
set -euo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd -- "$HERE/../.." && pwd)

case "${1:-}" in
    -h | --help)
        sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
esac
if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
    echo "acceptance: CANNOT RUN HERE: /dev/kvm is missing or not usable"
    exit 6
fi
command -v python3 >/dev/null || { echo "acceptance: SETUP ERROR: python3 is required"; exit 2; }

if ! "$HERE/build.sh" >&2; then
    echo "acceptance: SETUP ERROR: guest-images/linux/build.sh failed"
    exit 2
fi
if [[ -z ${VMM:-} ]]; then
    if ! (cd "$REPO" && cargo build --release -q -p vmm) >&2; then
        echo "acceptance: SETUP ERROR: cargo build of vmm failed"
        exit 2
    fi
    VMM="$REPO/target/release/vmm"
fi
exec python3 "$HERE/acceptance.py" --vmm "$VMM" --out "$HERE/out" "$@"
