#!/usr/bin/env bash
# Linux + perf acceptance: boot the Debian guest from build.sh under `vmm`
# with its virtual PMU on, run `perf stat -e cycles,instructions` and
# `perf record -e cycles` (+ `perf report`) inside, and check that the
# counts are non-zero and that samples were taken.
#
# Where this host cannot run the scenario, say exactly why and exit with a
# distinct code, without hanging:
#   0  passed
#   1  ran and failed (the guest ran the command; counts or samples wrong,
#      or the guest stopped before finishing it)
#   2  could not set up (bad arguments, build.sh or the vmm build failed,
#      the vmm refused its arguments)
#   3  the host has no hardware PMU (host perf cannot count instructions)
#   4  KVM's in-kernel PMU is off (kvm.enable_pmu=N): guest RDPMC would #GP
#   5  Linux cannot finish booting on this host (no init marker in time)
#   6  /dev/kvm is missing or not usable
# Preconditions (6, 3, 4) are checked first; --force goes on regardless.
#
# Environment: VMM (default target/release/vmm, built with cargo if
# missing), ACCEPT_TIMEOUT (seconds the guest may run, default 240),
# ACCEPT_MEMORY (MiB, default 512), ACCEPT_EXTRA_CMDLINE, ACCEPT_VPMU (the
# --vpmu value, default on; "none" leaves the flag out).
set -euo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd -- "$HERE/../.." && pwd)
FORCE=0
KEEP=0
CHECK_SERIAL=""
CHECK_RC=0
TIMEOUT="${ACCEPT_TIMEOUT:-240}"
MEMORY="${ACCEPT_MEMORY:-512}"
VPMU="${ACCEPT_VPMU:-on}"
OUT="$HERE/out"

usage() {
    cat <<EOF
usage: $0 [--force] [--timeout SECONDS] [--keep]
  --force     run even when a precondition says it cannot work here
  --timeout   how long the guest may run (default $TIMEOUT s)
  --keep      keep the serial log and VMM output (printed at the end)
  --check-serial LOG [--vmm-rc N]
              only judge a serial log kept from an earlier run
Exit codes: 0 passed, 1 failed, 2 set-up error, 3 no hardware PMU,
4 KVM in-kernel PMU off, 5 Linux cannot finish booting here, 6 no /dev/kvm.
EOF
}

while (($#)); do
    case "$1" in
        --force) FORCE=1; shift ;;
        --keep) KEEP=1; shift ;;
        --check-serial) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; CHECK_SERIAL=$2; shift 2 ;;
        --vmm-rc) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; CHECK_RC=$2; shift 2 ;;
        --timeout) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; TIMEOUT=$2; shift 2 ;;
        --timeout=*) TIMEOUT=${1#--timeout=}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) printf 'acceptance: unknown argument: %s\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
done
[[ $TIMEOUT =~ ^[0-9]+$ && $TIMEOUT -gt 0 ]] || { echo "acceptance: --timeout needs whole seconds" >&2; exit 2; }

say() { printf 'acceptance: %s\n' "$*"; }
finish() { # CODE MESSAGE
    local code=$1
    shift
    [[ -z ${TXT:-} ]] || rm -f "$TXT"
    case "$code" in
        0) say "PASS: $*" ;;
        1) say "FAIL: $*" ;;
        2) say "SETUP ERROR: $*" ;;
        *) say "CANNOT RUN HERE (exit $code): $*" ;;
    esac
    exit "$code"
}

# evaluate SERIAL_LOG VMM_RC ELAPSED: judge a run from its serial log.
evaluate() {
    local SERIAL=$1 RC=$2 ELAPSED=$3 TXT v ev rc samples exact what
    # Serial lines may end in CR; drop those.
    TXT=$(mktemp /tmp/vmm-acceptance-serial.XXXXXX)
    tr -d '\r' <"$SERIAL" >"$TXT"
    if ! grep -q '^VMM-GUEST-START' "$TXT"; then
        say "last serial lines:"
        tail -n 25 "$TXT" | sed 's/^/  serial| /'
        if grep -q 'Linux version' "$TXT"; then
            what="the kernel started (banner seen) but never ran /init"
        else
            what="no kernel banner on the serial console"
        fi
        finish 5 "Linux cannot finish booting on this host: $what within ${TIMEOUT}s (vmm exit $RC)"
    fi
    if ! grep -q '^ACC-END' "$TXT"; then
        tail -n 25 "$TXT" | sed 's/^/  serial| /'
        finish 1 "/init started but the perf commands did not finish (vmm exit $RC)"
    fi

    grep '^ACC-' "$TXT" | sed 's/^/  guest| /'

    FAILS=()
    # perf stat -x, lines: VALUE,UNIT,EVENT,RUNTIME,PERCENT,...
    for ev in cycles instructions; do
        v=$(awk -F, -v ev="$ev" '/^ACC-STAT / { sub(/^ACC-STAT /, ""); if ($3 == ev || $3 ~ "^" ev "(:|$)") { print $1; exit } }' "$TXT")
        if [[ $v =~ ^[0-9]+$ ]] && ((v > 0)); then
            say "perf stat: $ev = $v"
        else
            FAILS+=("perf stat counted no $ev (${v:-no line})")
        fi
    done
    rc=$(awk '/^ACC-STAT-RC / {print $2}' "$TXT")
    [[ $rc == 0 ]] || FAILS+=("perf stat exited $rc")
    rc=$(awk '/^ACC-RECORD-RC / {print $2}' "$TXT")
    [[ $rc == 0 ]] || FAILS+=("perf record exited $rc")
    # perf report's "# Samples: 813  of event 'cycles'" says the event
    # really was cycles (perf record falls back to cpu-clock without a
    # PMU); perf record's "(1196 samples)" gives the exact count.
    samples=$(sed -n "s/^ACC-REPORT # Samples: \([0-9][0-9]*[KM]\{0,1\}\) *of event 'cycles.*/\1/p" "$TXT" | head -n 1)
    exact=$(sed -n 's/^ACC-RECLOG .*(\([0-9][0-9]*\) samples).*/\1/p' "$TXT" | head -n 1)
    if [[ -n $samples && -n $exact ]]; then samples=$exact; fi
    if [[ -n $samples && $samples != 0 ]]; then
        say "perf record: $samples samples of cycles"
    else
        FAILS+=("perf record took no samples of cycles (${samples:-no report header})")
    fi
    if grep -q '^VMM-GUEST-DONE' "$TXT" && ((RC != 0)); then
        FAILS+=("the guest finished but the vmm exited $RC instead of 0")
    fi

    if ((${#FAILS[@]})); then
        finish 1 "$(IFS=';'; echo "${FAILS[*]}")"
    fi
    finish 0 "perf stat counted cycles and instructions, perf record took $samples samples (${ELAPSED}s)"
}

if [[ -n $CHECK_SERIAL ]]; then
    [[ -r $CHECK_SERIAL ]] || finish 2 "cannot read $CHECK_SERIAL"
    evaluate "$CHECK_SERIAL" "$CHECK_RC" 0
fi

# ------------------------------------------------------ preconditions -----
# Each failing one is reported; the first decides the exit code.
BLOCK=0
BLOCK_MSG=""
block() { # CODE MESSAGE
    say "precondition failed: $2"
    if ((BLOCK == 0)); then BLOCK=$1; BLOCK_MSG=$2; fi
}

if [[ ! -e /dev/kvm ]]; then
    block 6 "/dev/kvm does not exist (no KVM on this host)"
elif [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
    block 6 "/dev/kvm is not readable and writable by $(id -un)"
fi

if [[ ! -d /sys/bus/event_source/devices/cpu ]]; then
    block 3 "the host has no hardware PMU (/sys/bus/event_source/devices/cpu is absent; perf_event_open of hardware events fails)"
elif command -v perf >/dev/null; then
    # `perf stat` exits 0 even when the event is not supported: read the value.
    val=$(perf stat -x, -e instructions -- true 2>&1 >/dev/null | awk -F, '$3 ~ /^instructions/ {print $1; exit}')
    if [[ ! $val =~ ^[0-9]+$ ]]; then
        block 3 "the host's perf cannot count instructions (perf stat says '${val:-nothing}')"
    fi
fi

EP=/sys/module/kvm/parameters/enable_pmu
if [[ -r $EP ]]; then
    if [[ "$(cat "$EP")" != Y ]]; then
        block 4 "KVM's in-kernel PMU is off ($EP = $(cat "$EP")): a guest's RDPMC, which Linux's perf uses, would get #GP"
    fi
elif [[ ! -d /sys/module/kvm ]]; then
    block 6 "the kvm module is not loaded (/sys/module/kvm is absent)"
fi

if ((BLOCK)); then
    if ((FORCE)); then
        say "--force: going on although this host cannot run the scenario ($BLOCK_MSG)"
    else
        finish "$BLOCK" "$BLOCK_MSG (use --force to try anyway)"
    fi
fi

# ------------------------------------------------------------- inputs -----
say "building the guest image (guest-images/linux/build.sh)"
mkdir -p "$OUT"
if ! "$HERE/build.sh" --out "$OUT" >"$OUT/build.log" 2>&1; then
    tail -n 20 "$OUT/build.log" >&2
    finish 2 "build.sh failed (log: $OUT/build.log)"
fi
for f in vmlinux initramfs.cpio.gz; do
    [[ -s "$OUT/$f" ]] || finish 2 "build.sh produced no $OUT/$f"
done

VMM="${VMM:-target/release/vmm}"
[[ $VMM == /* ]] || VMM="$REPO/$VMM"
if [[ ! -x $VMM ]]; then
    say "building the vmm ($VMM is missing): cargo build --release -p vmm"
    command -v cargo >/dev/null || finish 2 "$VMM is missing and cargo is not installed"
    (cd "$REPO" && timeout 1800 cargo build --release -p vmm) >&2 || finish 2 "cargo build --release -p vmm failed"
    [[ -x $VMM ]] || finish 2 "$VMM still missing after cargo build"
fi

# ------------------------------------------------------------- run --------
TMP=$(mktemp -d /tmp/vmm-acceptance.XXXXXX)
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    if ((KEEP)); then say "kept: $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

# The guest's part, passed base64-encoded on the kernel command line
# (vmm.cmd64, read by /init). Every result is a line starting with ACC-.
read -r -d '' GUEST <<'EOF' || true
echo ACC-BEGIN
perf stat -x, -o /tmp/stat.csv -e cycles,instructions -- /bin/busy 300000
echo "ACC-STAT-RC $?"
sed 's/^/ACC-STAT /' /tmp/stat.csv
perf record -e cycles -o /tmp/perf.data -- /bin/busy 300000 >/tmp/rec.log 2>&1
echo "ACC-RECORD-RC $?"
sed 's/^/ACC-RECLOG /' /tmp/rec.log
perf report --stdio -i /tmp/perf.data --sort comm,dso >/tmp/rep.txt 2>&1
echo "ACC-REPORT-RC $?"
sed 's/^/ACC-REPORT /' /tmp/rep.txt
echo ACC-END
EOF
CMD64=$(printf '%s\n' "$GUEST" | base64 -w0)
CMDLINE="console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 pci=off nokaslr i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
CMDLINE+=" ${ACCEPT_EXTRA_CMDLINE:-} vmm.cmd64=$CMD64"

SERIAL="$TMP/serial.log"
VPMU_ARGS=()
[[ $VPMU == none ]] || VPMU_ARGS=(--vpmu "$VPMU")
say "booting: $VMM run --kernel $OUT/vmlinux --initrd $OUT/initramfs.cpio.gz ${VPMU_ARGS[*]} --timeout $TIMEOUT"
START=$SECONDS
set +e
# The VMM's own --timeout bounds the guest; timeout(1) bounds the VMM.
timeout -k 10 $((TIMEOUT + 60)) "$VMM" run \
    --kernel "$OUT/vmlinux" --initrd "$OUT/initramfs.cpio.gz" \
    --memory "$MEMORY" "${VPMU_ARGS[@]}" --serial "file:$SERIAL" --timeout "$TIMEOUT" \
    --cmdline "$CMDLINE" </dev/null >"$TMP/vmm.out" 2>"$TMP/vmm.err"
RC=$?
set -e
ELAPSED=$((SECONDS - START))
touch "$SERIAL"
say "vmm exited with $RC after ${ELAPSED}s"
if [[ -s "$TMP/vmm.err" ]]; then
    say "vmm stderr:"
    sed 's/^/  | /' "$TMP/vmm.err" | tail -n 20
fi

if ((RC == 124 || RC == 137)); then
    tail -n 20 "$SERIAL" | sed 's/^/  serial| /'
    finish 1 "the vmm did not stop within $((TIMEOUT + 60))s although told --timeout $TIMEOUT: killed"
fi
if ((RC == 2)); then
    finish 2 "the vmm refused its arguments (does it support --vpmu yet?): $(head -n 3 "$TMP/vmm.err")"
fi

evaluate "$SERIAL" "$RC" "$ELAPSED"
