#!/usr/bin/env bash
# Runs kvm-unit-tests' PMU tests (x86/pmu, pmu_lbr, pmu_pebs) under vmm
# with its vPMU on, and prints their PASS/FAIL/SKIP lines as a table.
#
#   scripts/kvm-unit-tests-pmu.sh SRC [--memory MIB] [--timeout S] [--vmm PATH] [-- VMM-FLAGS...]
#
# SRC is a kvm-unit-tests source tree the user provides (it is not a
# package this project can install, and it is not copied here); it is
# configured for x86_64 and the .flat files are built in it. Each test is a
# Multiboot kernel: vmm boots it in 32-bit protected mode, gives it an
# environment module (NR_CPUS=1: without it, or QEMU's fw_cfg, it waits for
# CPUs forever) and maps QEMU's isa-debug-exit port, whose code the table
# reports (1 = every check passed, 3 = a check failed).
#
# Exit status: 0 when every test passed or was skipped by its own rules
# (code 77), 1 otherwise, 2 on bad input.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
VMM="$HERE/target/release/vmm"
MEMORY=256
TIMEOUT=1800
[[ $# -ge 1 ]] || { echo "usage: $0 SRC [--memory MIB] [--timeout S] [--vmm PATH] [-- VMM-FLAGS...]" >&2; exit 2; }
SRC=$1; shift
EXTRA=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --memory) MEMORY=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --vmm) VMM=$2; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "$0: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -f "$SRC/x86/pmu.c" ]] || { echo "$0: $SRC is not a kvm-unit-tests tree (no x86/pmu.c)" >&2; exit 2; }
[[ -x "$VMM" ]] || { echo "$0: no vmm at $VMM (cargo build --release)" >&2; exit 2; }
(cd "$SRC" && { [[ -f config.mak ]] || ./configure --arch=x86_64 >/dev/null; } &&
    make -j"$(nproc)" x86/pmu.flat x86/pmu_lbr.flat x86/pmu_pebs.flat >/dev/null)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
printf 'NR_CPUS=1\n' >"$WORK/env"
status=0
printf '%-10s %-6s %s\n' test result "detail"
for t in pmu pmu_lbr pmu_pebs; do
    log="$WORK/$t.log"
    set +e
    "$VMM" run --kernel "$SRC/x86/$t.flat" --initrd "$WORK/env" --memory "$MEMORY" \
        --vpmu on --timeout "$TIMEOUT" "${EXTRA[@]}" >"$log" 2>&1
    rc=$?
    set -e
    pass=$(grep -c '^PASS:' "$log" || true)
    fail=$(grep -c '^FAIL:' "$log" || true)
    skip=$(grep -c '^SKIP:' "$log" || true)
    # Exit code 1 is also vmm's own for a guest that stopped abnormally: the
    # guest's write to the port is told by vmm's last line.
    if grep -q 'to the debug-exit port 0xf4 (exit code 1)' "$log"; then
        verdict=PASS
    elif grep -q 'to the debug-exit port 0xf4 (exit code 77)' "$log"; then
        verdict=SKIP   # kvm-unit-tests' code for a test that does not apply
    elif [[ $rc == 3 ]]; then
        verdict=TIMEOUT
    else
        verdict="EXIT-$rc"
    fi
    [[ $verdict == PASS || $verdict == SKIP ]] || status=1
    printf '%-10s %-6s %s PASS, %s FAIL, %s SKIP; vmm: %s\n' "$t" "$verdict" "$pass" "$fail" "$skip" \
        "$(grep '^vmm: ' "$log" | tail -1 | cut -c1-120)"
    grep -E '^(PASS|FAIL|SKIP):' "$log" | sed 's/^/    /' || true
done
exit $status
