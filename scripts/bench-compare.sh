#!/usr/bin/env bash
# Measures vmm/benches/vpmu_costs.rs on two builds in one session: BASE (a
# git revision, default origin's previous main: HEAD~1) and this working
# tree, alternating BASE, tree, BASE, tree so that host load falls on both,
# then prints every figure of both side by side (median of each side's
# runs) with tree / BASE.
#
# Usage: scripts/bench-compare.sh [BASE] [ROUNDS]   (ROUNDS: default 2)
# Needs /dev/kvm. BASE is built in target/bench-base (a git worktree) with
# the `bench` feature; this tree's binary is the one `cargo bench` builds.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-HEAD~1}
ROUNDS=${2:-2}
OUT=target/bench-compare
mkdir -p "$OUT"
rev=$(git rev-parse --verify "$BASE^{commit}") || { echo "bench-compare: no revision $BASE" >&2; exit 2; }
if [[ ! -d target/bench-base ]]; then
    git worktree add --detach target/bench-base "$rev" >&2
else
    git -C target/bench-base checkout -q --detach "$rev"
fi
(cd target/bench-base && cargo build --release -q -p vmm --features bench) >&2
base_vmm=$PWD/target/bench-base/target/release/vmm
# Build the harness and this tree's vmm once.
cargo bench -p vmm --bench vpmu_costs --no-run -q >&2
for round in $(seq "$ROUNDS"); do
    echo "bench-compare: round $round: base ${rev:0:10}" >&2
    VPMU_COSTS_VMM=$base_vmm cargo bench -q -p vmm --bench vpmu_costs >"$OUT/base-$round.md"
    echo "bench-compare: round $round: this tree" >&2
    cargo bench -q -p vmm --bench vpmu_costs >"$OUT/tree-$round.md"
done
python3 - "$OUT" "$ROUNDS" "${rev:0:10}" <<'PY'
import re, statistics, sys
out, rounds, rev = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def rows(path):
    """The figures table: from its header row to the first line after it
    that is not a table row (Figure 5's growth table follows, in other
    columns)."""
    got, started = {}, False
    for line in open(path):
        if not line.startswith("|"):
            if started:
                break
            continue
        started = True
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0] or cells[0] in ("#", "---"):
            continue
        m = re.match(r"(?:p50 )?([-\d.]+)\s*(\w*)", cells[2])
        if m:
            got[(cells[0], cells[1])] = (float(m.group(1)), m.group(2))
    return got
def median_of(side):
    runs = [rows(f"{out}/{side}-{r}.md") for r in range(1, rounds + 1)]
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {k: (statistics.median(r[k][0] for r in runs), runs[0][k][1]) for k in keys}
base, tree = median_of("base"), median_of("tree")
print(f"vpmu_costs, base {rev} vs this tree: median of {rounds} alternating runs each\n")
print("| # | figure | base | tree | tree / base |")
print("|---|---|---:|---:|---:|")
for key, (b, unit) in base.items():
    if key not in tree:
        continue
    t = tree[key][0]
    ratio = f"{t / b:.3f}" if b else "-"
    print(f"| {key[0]} | {key[1]} | {b:g} {unit} | {t:g} {unit} | {ratio} |")
PY
