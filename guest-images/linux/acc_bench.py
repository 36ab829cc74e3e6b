"""The --bench run's figures (BENCHMARKS.md's Linux section) from the bench
guest's VMM-BENCH runs: boot to /init, perf stat and perf record overheads on
fixed work, and per sample the exits to the VMM, the VMM's own CPU time and
the guest time lost. Standard library only.
"""

import re

from acc_parsers import busy_line, vpmu_totals


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def bench_report(g):
    """Figures from the bench guest's VMM-BENCH runs."""
    text = g.text()
    runs = {}
    marks = {}
    for line, snap, threads in g.bench:
        m = re.match(r"VMM-BENCH (BEGIN|END) round=(\d+) mode=(\w+)", line)
        if m:
            marks[(m.group(2), m.group(3), m.group(1))] = (snap, threads)
    for m in re.finditer(r"VMM-BENCH BEGIN round=(\d+) mode=(\w+)\r?\n(.*?)VMM-BENCH END", text,
                         re.S):
        key = (m.group(1), m.group(2))
        busy = busy_line(m.group(3).splitlines())
        wall = re.search(r"wall_ms=(\d+)", m.group(3))
        b, e = marks.get(key + ("BEGIN",)), marks.get(key + ("END",))
        if not b or not e or not b[0] or not e[0]:
            continue
        if not busy:
            # The work did not finish (a bounded run): what it cost so far.
            p0, _, _ = vpmu_totals(b[0])
            p1, _, _ = vpmu_totals(e[0])
            runs.setdefault(m.group(2) + " (unfinished)", []).append({"pmis": p1 - p0})
            continue
        p0, x0, s0 = vpmu_totals(b[0])
        p1, x1, s1 = vpmu_totals(e[0])
        vmm_user = (e[1][0] - b[1][0]) if b[1] and e[1] else float("nan")
        runs.setdefault(m.group(2), []).append({
            "cpu_ms": busy["cpu_ms"], "wall_ms": int(wall.group(1)) if wall else None,
            "pmis": p1 - p0, "msr_exits": x1 - x0, "signals": s1 - s0,
            "vmm_user_ms": vmm_user})
    lines = []
    init = re.search(r"\[\s*([\d.]+)\] Run /init", text)
    lines.append(f"boot to /init: {g.init_after:.0f} s on the host clock"
                 + (f", {float(init.group(1)):.0f} s on the guest's" if init else ""))
    if "plain" not in runs:
        lines.append("no plain runs: nothing to compare")
        return lines, runs
    # The least disturbed run of each kind: this host's noise only adds.
    base = min(r["cpu_ms"] for r in runs["plain"])
    lines.append(f"plain: busy work, {len(runs['plain'])} runs, "
                 f"{', '.join(str(r['cpu_ms']) for r in runs['plain'])} ms of guest CPU time "
                 f"(baseline: the least, {base:.0f} ms)")
    for mode, rs in runs.items():
        if mode.endswith("(unfinished)"):
            lines.append(f"{mode}: {len(rs)} runs stopped by their time limit after "
                         f"{median([r['pmis'] for r in rs]):.0f} samples (median)")
    for mode in ["stat", "f1000", "f4000"]:
        rs = runs.get(mode, [])
        if not rs:
            continue
        cpu = min(r["cpu_ms"] for r in rs)
        line = (f"{mode}: {len(rs)} runs, {', '.join(str(r['cpu_ms']) for r in rs)} ms; "
                f"least {cpu:.0f} ms ({(cpu / base - 1) * 100:+.1f}%)")
        samples = median([r["pmis"] for r in rs])
        if mode.startswith("f") and samples > 0:
            lost_us = median([(r["cpu_ms"] - base) * 1000 / max(1, r["pmis"]) for r in rs])
            exits = median([(r["msr_exits"] + r["signals"]) / max(1, r["pmis"]) for r in rs])
            # An upper bound on the VMM's share: on this host the vCPU
            # thread's user time also holds guest execution.
            vmm_us = median([r["vmm_user_ms"] * 1000 / max(1, r["pmis"]) for r in rs])
            rate = median([r["pmis"] * 1000 / max(1, r["cpu_ms"]) for r in rs])
            line += (f"; median {samples:.0f} samples ({rate:.0f}/s of guest CPU time), "
                     f"{exits:.2f} exits to the VMM per sample, at most {vmm_us:.0f} us of "
                     f"vCPU-thread user time per sample (guest execution included here), "
                     f"{lost_us:.0f} us of guest time lost per sample")
        lines.append(line)
    return lines, runs
