#!/usr/bin/env bash
# Linux perf acceptance: Linux's own perf, inside a Linux guest, on vmm's
# virtual PMU. Builds what is missing (build.sh for the guest, cargo for
# vmm), then acceptance.py boots four guests (main: vPMU on; off; deny:
# cycles denied; smp: 2 vCPUs), runs guest-images/linux/perf-checks inside,
# reads the VMM's API while it runs, and prints a pass/fail table. See
# README.md.
#
# Usage: acceptance.sh [acceptance.py options: --only main,off,deny,smp,
#        --sequential, --keep DIR, --json FILE, --timeout S, --memory MIB,
#        --bench, --cmdline PARAMS]
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
        # The comment block at the top, without its '# '.
        awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
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
