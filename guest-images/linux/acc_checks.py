"""The acceptance's checks: for each guest kind (GUESTS, at the end) its
`vmm run` flags and its table of perf-checks steps, each with the judge of
its output and the rows that judge adds to the report. That table is the
one list of steps: acceptance.py boots each guest with its steps, and
test_acceptance.py holds perf-checks' step functions to it.

A judge gets the guest (acc_runner.Guest: its GET /vpmu snapshots at step
markers, its host profile, its VMM's stderr), the step's output lines ([]
if the step never ended) and rc (None then), the TSC rate in kHz (from the
guest's first step) and the report. Tolerances are in acc_tolerances.py.
Standard library only.
"""

import re
from collections import namedtuple

from acc_parsers import (AMD_CYCLES, INTEL_CYCLES, OS, USR, acpi_interpreter_on, boot_log_defects,
                         busy_line, counters, dso_shares, event_of, export_total, facts,
                         folded_stacks, guest_done, host_run_share, migrate_line, model_vendor,
                         per_cpu_csv, perf_csv, perf_event_opens, perf_row, perf_symbols,
                         pmu_driver, pmu_shape, report_samples, restored_in_ms, run_ms, run_shares,
                         sample_times, samples_by_cpu, section, select_of, stats_counts, stats_sum,
                         steal_fraction, top_user_symbol, total_for, vcpu_total, vpmu_totals)
from acc_tolerances import (API_COUNT, MIGRATE_MIN_MOVES, MULTIPLEX_SPREAD, PRIVILEGE_SHARE_POINTS,
                            PRIVILEGE_SUM, PROFILE_KERNEL_TOP, RESTORE_COUNT, RESTORE_SAMPLES,
                            PROFILE_USER_POINTS, RECORD_MODES_POINTS, RECORD_SAMPLES,
                            SMP_MIGRATE, SMP_PER_CPU, SMP_RECORD_ALL, SMP_STAT_ALL, STAT_CYCLES,
                            pct)


class Report:
    def __init__(self):
        self.rows = []

    def add(self, name, ok, detail):
        self.rows.append({"check": name, "result": "PASS" if ok else "FAIL", "detail": detail})

    def skip(self, name, why):
        self.rows.append({"check": name, "result": "NOT RUN", "detail": why})

    def ok(self):
        return all(r["result"] == "PASS" for r in self.rows)

    def print(self):
        width = max(len(r["check"]) for r in self.rows)
        print(f"{'check':<{width}}  result   detail")
        for r in self.rows:
            print(f"{r['check']:<{width}}  {r['result']:<7}  {r['detail']}")



def guest_vendor(g):
    """The vendor of guest `g`'s vPMU model, from any GET /vpmu it read."""
    return next((v for v in map(model_vendor, g.snapshots.values()) if v), None)


def guest_cycles(g):
    """The event number of core cycles on guest `g`'s model (0x76 on AMD,
    0x3c on Intel, where fixed counter 1 exports it too)."""
    return INTEL_CYCLES if guest_vendor(g) == "intel" else AMD_CYCLES


def host_cycles():
    """Core cycles on the model `--vpmu auto` gives a guest of this host
    (the host's vendor): what the deny guest denies."""
    try:
        with open("/proc/cpuinfo") as f:
            intel = "GenuineIntel" in f.read(4096)
    except OSError:
        intel = False
    return INTEL_CYCLES if intel else AMD_CYCLES

def within(a, b, frac):
    return b > 0 and abs(a - b) <= frac * b


# --------------------------------------------------------------- main --
def judge_detect(g, out, rc, tsc_khz, r):
    text = "\n".join(out)
    drv = pmu_driver(text)
    model = ((g.snapshots.get("detect BEGIN") or {}).get("vm") or {}).get("model") or {}
    want = (model.get("version"), model.get("gp_counters"), model.get("gp_width"))
    got = pmu_shape(text)
    r.add("main.detect", bool(drv) and "PMU driver" in drv and got == want
          and "perf_read_msr" in text,
          f"driver '{drv}', (version, counters, width) {got}, model {want}")


def judge_stat(g, out, rc, tsc_khz, r):
    rows = perf_csv(out)
    cyc = perf_row(rows, "cycles")
    clk = perf_row(rows, "task-clock")
    sf = facts(out)
    if cyc and clk and cyc[0] and clk[0] and tsc_khz:
        # perf's task-clock is the task's time on its (virtual) CPU, steal
        # included; the host's share of it is in /proc/stat's steal column,
        # as busy read it over its own run (one CPU: the machine's line is
        # that CPU's), else right before and after perf stat.
        steal = (busy_line(out) or {}).get("steal")
        if steal is None:
            steal = steal_fraction(sf)
        if steal is None:
            r.add("main.stat-cycles", False, f"no /proc/stat steal figures: {sf}")
        else:
            run = clk[0] * (1 - steal)
            ratio = cyc[0] / (run * tsc_khz)  # ms x kHz = cycles
            r.add("main.stat-cycles", rc == 0 and abs(ratio - 1) <= STAT_CYCLES,
                  f"{cyc[0]:.0f} cycles over {clk[0]:.1f} ms task-clock less "
                  f"{steal * 100:.1f}% steal ({run:.1f} ms run time) at "
                  f"{tsc_khz:.0f} kHz: ratio {ratio:.3f} (within {pct(STAT_CYCLES)})")
    else:
        r.add("main.stat-cycles", False, f"perf stat gave no cycles/task-clock: {rows}")


def judge_unbacked(g, out, rc, tsc_khz, r):
    rows = perf_csv(out)
    ins = perf_row(rows, "instructions")
    cyc = perf_row(rows, "cycles")
    host = [c for c in counters(g.snapshots.get("unbacked END")) if event_of(c) == 0xC0]
    reasons = [c["backing"].get("reason", "") for c in host if c["backing"]["kind"] == "unbacked"]
    # AMD has no way to tell the guest an event is unavailable: perf shows 0
    # there (never a made-up count), and the host export says why.
    shown = ins[1] if ins else None
    honest = ins is not None and (ins[0] is None or ins[0] == 0)
    # Intel's model tells the guest an event is unavailable (CPUID.0AH:EBX):
    # perf says "<not supported>" and never programs it.
    told = guest_vendor(g) == "intel" and ins is not None and ins[0] is None
    r.add("main.unbacked", honest and bool(cyc and cyc[0]) and (bool(reasons) or told),
          f"perf: instructions '{shown}', cycles {cyc[1] if cyc else None}; host: "
          f"{'unbacked: ' + reasons[0] if reasons else 'no unbacked instructions counter'}")


def judge_privilege(g, out, rc, tsc_khz, r):
    """cycles:u and cycles:k: they add up to cycles, and split it as the
    guest accounted busy's time; the host backs each as hardware (exact) or
    as an estimate from sampled privilege levels, never not at all."""
    rows = {x[2]: x for x in perf_csv(out)}
    busy = busy_line(out)
    end = g.snapshots.get("privilege END")
    host = counters(end)
    filtered = [c for c in host if event_of(c) == guest_cycles(g)
                and bool(select_of(c) & USR) != bool(select_of(c) & OS)]
    backed = [c for c in filtered
              if c["backing"]["kind"] in ("hardware_raw", "software_clock_estimate")]
    estimates = sum(c["backing"]["kind"] == "software_clock_estimate" for c in filtered)
    samples = stats_sum(end, "mode_samples")
    u, k, both = (int((rows.get(e) or [0])[0] or 0) for e in ("cycles:u", "cycles:k", "cycles"))
    # AMD: cycles:u and cycles:k end on two general-purpose counters. Intel:
    # one of them on fixed counter 1, whose control reads 0 once perf has
    # disabled it, so only the other shows at the step's end.
    shown = 1 if guest_vendor(g) == "intel" else 2
    share = 100 * u / (u + k) if u + k else None
    guest = 100 * busy["user_ms"] / run_ms(busy) if busy and run_ms(busy) else None
    ok = (rc == 0 and u > 0 and k > 0 and both > 0 and share is not None and guest is not None
          and abs(share - guest) <= PRIVILEGE_SHARE_POINTS
          and abs((u + k) / both - 1) <= PRIVILEGE_SUM
          and len(filtered) >= shown and len(backed) == len(filtered)
          and (estimates == 0 or samples > 0))
    r.add("main.privilege", ok,
          f"perf: cycles:u {u}, cycles:k {k}, cycles {both} (u + k = {pct((u + k) / both) if both else '?'}"
          f" of cycles); user share {share:.1f}% vs busy's {guest:.1f}% (guest accounting, within "
          f"{PRIVILEGE_SHARE_POINTS} points); host: {len(backed)} of {len(filtered)} filtered "
          f"counters backed ({estimates} estimates, {samples} mode samples)"
          if share is not None and guest is not None else
          f"perf: cycles:u {u}, cycles:k {k}, cycles {both}; busy: {busy}; rc {rc}")


def judge_record_step(g, out, rc, tsc_khz, r):
    judge_record(out, rc, tsc_khz, r)
    judge_profile(out, g.profile, r)


def judge_record(out, rc, tsc_khz, r):
    """perf record's samples against run time, its user/kernel split against
    busy's, its top user-mode symbol."""
    text = "\n".join(out)
    f = facts(out)
    busy = busy_line(out)
    n = report_samples(text)
    period = int(f.get("period", 0) or 0)
    if rc != 0 or n is None or not busy or not period:
        r.add("main.record-samples", False, f"perf record/report failed (rc {rc}): {text[-300:]}")
        r.add("main.record-modes", False, "no report")
        r.add("main.record-symbol", False, "no report")
        return
    # perf samples the whole task, from exec on: its run time is the user
    # and system time the kernel accounted to it.
    run = run_ms(busy)
    expect = run * tsc_khz / period
    r.add("main.record-samples", within(n, expect, RECORD_SAMPLES),
          f"{n} samples, expected {expect:.0f} ({run} ms of run time x TSC / period "
          f"{period}), within {pct(RECORD_SAMPLES)}")
    kernel, user = dso_shares(out)
    sys_pct = 100.0 * busy["sys_ms"] / max(1, busy["user_ms"] + busy["sys_ms"])
    r.add("main.record-modes", kernel + user > 0 and abs(kernel - sys_pct) <= RECORD_MODES_POINTS,
          f"samples {kernel:.1f}% kernel / {user:.1f}% user; busy's own time "
          f"{sys_pct:.1f}% system (user {busy['user_ms']} ms, sys {busy['sys_ms']} ms), "
          f"within {RECORD_MODES_POINTS} points")
    top = top_user_symbol(text)
    r.add("main.record-symbol", top == "spin_user", f"top user-mode symbol: {top}")


def judge_profile(out, profile, r):
    """The host's profile of the record step against the guest's perf report:
    the guest's top kernel symbol among the host's top kernel symbols, and
    the user-mode share of samples in proportion."""
    if profile is None or profile[0] != 0:
        why = "never taken" if profile is None else f"vmm profile exit {profile[0]}: {profile[1]}"
        r.add("main.profile-kernel", False, f"no host profile: {why}")
        r.add("main.profile-user", False, f"no host profile: {why}")
        return
    stacks = folded_stacks(profile[2])
    total = sum(c for _, c in stacks)
    user = sum(c for f, c in stacks if f and f[-1].startswith("[user"))
    leaves = {}
    for frames, count in stacks:
        leaf = frames[-1] if frames else ""
        if not leaf.startswith("["):
            leaves[leaf] = leaves.get(leaf, 0) + count
    # Ranked among the host's top 10 (the detail shows the rank), held to
    # its top PROFILE_KERNEL_TOP.
    host_top = [name for name, _ in sorted(leaves.items(), key=lambda x: -x[1])[:10]]
    guest_kernel = perf_symbols(out, "top-kernel-symbols")
    want = guest_kernel[0][1] if guest_kernel else None
    rank = host_top.index(want) + 1 if want in host_top else None
    r.add("main.profile-kernel", total > 0 and rank is not None and rank <= PROFILE_KERNEL_TOP,
          f"guest perf's top kernel symbol {want} is #{rank} of the host profile's kernel "
          f"symbols (top {PROFILE_KERNEL_TOP} wanted; host top: "
          f"{', '.join(host_top[:PROFILE_KERNEL_TOP])}; {total} samples)")
    kernel_pct, user_pct = dso_shares(out)
    host_user = 100.0 * user / max(1, total)
    guest_user = 100.0 * user_pct / max(1e-9, user_pct + kernel_pct)
    r.add("main.profile-user", total > 0 and abs(host_user - guest_user) <= PROFILE_USER_POINTS,
          f"host profile {host_user:.1f}% [user] ({user} of {total} samples), guest perf "
          f"{guest_user:.1f}% user (busy's dso), within {PROFILE_USER_POINTS} points")


def judge_multiplex(g, out, rc, tsc_khz, r):
    rows = [x for x in perf_csv(out) if x[2] == "cycles"]
    vals = [x[0] for x in rows if x[0]]
    pcts = [x[4] for x in rows if x[4] is not None]
    if len(vals) == 8 and pcts:
        mean = sum(vals) / len(vals)
        spread = max(abs(v - mean) / mean for v in vals)
        # Below 100% running: the events really took turns.
        r.add("main.multiplex", rc == 0 and max(pcts) < 100 and spread <= MULTIPLEX_SPREAD,
              f"8 cycles events on 6 counters: running {min(pcts):.0f}-{max(pcts):.0f}% "
              f"of enabled, scaled counts within {spread * 100:.1f}% of their mean "
              f"({pct(MULTIPLEX_SPREAD)})")
    else:
        r.add("main.multiplex", False, f"expected 8 scaled cycles counts: {rows}")


def judge_api(g, out, rc, tsc_khz, r):
    rows = perf_csv(out)
    cyc = perf_row(rows, "cycles")
    during = g.during.get("api", [])
    live = [c for s in during for c in counters(s)
            if c.get("running") and event_of(c) == guest_cycles(g)]
    r.add("main.api-live", bool(live),
          f"{len(during)} reads of GET /vpmu during perf stat, "
          f"{len(live)} showed a running cycles counter"
          + (f" (select {select_of(live[0]):#x}, backing {live[0]['backing']['kind']})"
             if live else ""))
    pid = (guest_cycles(g) | USR | OS)
    before = total_for(g.snapshots.get("api BEGIN"), pid)
    after = total_for(g.snapshots.get("api END"), pid)
    host_count = after - before
    if cyc and cyc[0]:
        r.add("main.api-count", within(host_count, cyc[0], API_COUNT),
              f"perf {cyc[0]:.0f} cycles, host total for programming {pid:#x} grew by "
              f"{host_count} ({(host_count / cyc[0] - 1) * 100:+.2f}%, within {pct(API_COUNT)})")
    else:
        r.add("main.api-count", False, f"perf stat gave no cycles count: {rows}")


def judge_watchdog(g, out, rc, tsc_khz, r):
    f = facts(out)
    try:
        before, after = int(f["pmi_before"]), int(f["pmi_after"])
    except (KeyError, ValueError):
        before = after = None
    host = counters(g.snapshots.get("watchdog END"))
    wd = [c for c in host
          if c.get("running") and event_of(c) == guest_cycles(g) and c.get("pmis", 0) > 0]
    enabled = "NMI watchdog: Enabled" in "\n".join(out)
    r.add("main.watchdog", rc == 0 and enabled and before is not None and after > before
          and bool(wd),
          f"{'enabled' if enabled else 'no NMI watchdog line'} (Linux's sample rate limit "
          f"was {f.get('sample_rate_found', '?')}/s, set to {f.get('sample_rate', '?')}/s), "
          f"PMIs {before} -> {after} "
          f"over 4 s of busy; host: "
          + (f"counter {wd[0]['index']} running with {wd[0]['pmis']} PMIs" if wd else
             "no counter with PMIs; the host's counters: " + ", ".join(
                 f"#{c.get('index')} ctl {c.get('control', 0):#x} value {c.get('value')} "
                 f"running {c.get('running')} pmis {c.get('pmis')}" for c in host)))


# ---------------------------------------------------------- off, deny --
def judge_nopmu(g, out, rc, tsc_khz, r):
    text = "\n".join(out)
    rows = perf_csv(out)
    cyc = perf_row(rows, "cycles")
    # "no PMU driver, software events only." or, as a guest (CPUID's
    # hypervisor bit), "PMU not available due to virtualization, using
    # software events only."
    r.add("off.no-pmu", "software events only" in text and bool(cyc)
          and cyc[1] == "<not supported>",
          f"driver line '{pmu_driver(text)}', "
          f"perf stat cycles '{cyc[1] if cyc else None}'")


def judge_deny(g, out, rc, tsc_khz, r):
    rows = perf_csv(out)
    cyc = perf_row(rows, "cycles")
    host = [c for c in counters(g.snapshots.get("deny END")) if event_of(c) == guest_cycles(g)]
    denied = [c for c in host if c["backing"]["kind"] == "denied"]
    opens = perf_event_opens(g.vmm_stderr())
    # Intel's model tells the guest (CPUID.0AH:EBX), so its perf never
    # programs cycles: "<not supported>"; AMD's cannot, so it counts 0.
    told = guest_vendor(g) == "intel" and bool(cyc) and cyc[0] is None
    r.add("deny.cycles", bool(cyc) and (cyc[0] or 0) == 0 and (bool(denied) or told)
          and opens is not None and opens == 0,
          f"perf stat cycles '{cyc[1] if cyc else None}'; host: {len(denied)} counter(s) "
          f"denied, {opens if opens is not None else '?'} perf_event_open")


def judge_tracepoints(g, out, rc, tsc_khz, r):
    """Static tracepoints for perf: tracefs and debugfs mounted, perf lists
    the sched, syscalls and irq events, counts a syscall tracepoint and
    records scheduler switches."""
    f = facts(out)
    mounts = f.get("mounts", "").split()
    counts = {k[len("tracepoints_"):]: int(v) for k, v in f.items()
              if k.startswith("tracepoints_") and v.isdigit()}
    listed = f.get("listed", "").split()
    want = ["irq:irq_handler_entry", "sched:sched_switch", "syscalls:sys_enter_openat"]
    r.add("off.tracepoint-list",
          "tracefs:/sys/kernel/tracing" in mounts and "debugfs:/sys/kernel/debug" in mounts
          and all(counts.get(s, 0) > 0 for s in ("sched", "syscalls", "irq"))
          and listed == want,
          f"mounts {' '.join(mounts) or 'none'}; perf list tracepoint: "
          + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no tracepoints")
          + f"; listed {listed} (wanted {want})")
    stat_lines = section(out, "perf-stat-openat:", "perf-record-switch:")
    openat = perf_row(perf_csv(stat_lines), "syscalls:sys_enter_openat")
    opened = int(f.get("opened", 0) or 0)
    r.add("off.tracepoint-stat", bool(openat) and opened > 0 and (openat[0] or 0) >= opened,
          f"perf stat -e syscalls:sys_enter_openat on a cat of {opened} files: "
          f"'{openat[1] if openat else None}' (at least {opened})")
    rec = section(out, "perf-record-switch:")
    n = report_samples("\n".join(rec))
    sleeps = int(f.get("sleeps", 0) or 0)
    comms = [line.split()[-1] for line in rec if re.match(r"^\s*[\d.]+%\s+\S+", line)]
    r.add("off.tracepoint-record",
          rc == 0 and n is not None and sleeps > 0 and n >= sleeps and "sleep" in comms,
          f"perf record -e sched:sched_switch over {sleeps} sleeps: {n} samples "
          f"(at least {sleeps}), commands {comms}")


# ---------------------------------------------------------------- smp --
def judge_cpus(g, out, rc, tsc_khz, r):
    f = facts(out)
    r.add("smp.cpus", f.get("nproc") == "2" and f.get("online") == "0-1",
          f"nproc {f.get('nproc')}, online {f.get('online')}")


# Each window: a shell under perf that has perf enable its events, reads
# the ticks, sleeps, reads them again and has perf disable its events,
# with spinners keeping the busy CPUs busy throughout; a CPU's run time
# while perf counted is perf's enabled time times the CPU's run share
# between the tick readings (steal and idle left out).
def judge_stat_all(g, out, rc, tsc_khz, r):
    hz = tsc_khz * 1e3
    one_lines = section(out, "perf-stat-a-one:", "perf-stat-a:")
    two_lines = section(out, "perf-stat-a:", "perf-stat-per-cpu:")
    one, two = perf_row(perf_csv(one_lines), "cycles"), perf_row(perf_csv(two_lines), "cycles")
    shares1, shares2 = run_shares(one_lines), run_shares(two_lines)
    if one and two and one[0] and two[0] and one[3] and two[3] and shares1 and shares2 and hz:
        # perf stat -a's enabled time is the sum over the CPUs.
        run1 = one[3] / 1e9 / len(shares1) * sum(shares1.values())
        run2 = two[3] / 1e9 / len(shares2) * sum(shares2.values())
        ratio, expect = two[0] / one[0], run2 / run1
        r.add("smp.stat-all", abs(ratio / expect - 1) <= SMP_STAT_ALL,
              f"perf stat -a: {two[0]:.0f} cycles with both CPUs busy, {one[0]:.0f} with one: "
              f"ratio {ratio:.2f}; the CPUs' run time in the windows {run2:.2f} s vs "
              f"{run1:.2f} s: ratio {expect:.2f} (counts' ratio within {pct(SMP_STAT_ALL)} of "
              f"it; 2 when no CPU loses time to steal); vs run time x TSC: "
              f"{one[0] / (run1 * hz) - 1:+.1%} / {two[0] / (run2 * hz) - 1:+.1%}")
    else:
        r.add("smp.stat-all", False, f"no perf stat -a cycles counts or tick readings: {out}")
    per_lines = section(out, "perf-stat-per-cpu:")
    cpus = per_cpu_csv(per_lines, "cycles")
    shares = run_shares(per_lines)
    if len(cpus) == 2 and len(shares) == 2 and hz:
        errs = {c: cpus[c][0] / (cpus[c][1] / 1e9 * shares[c] * hz) - 1
                for c in sorted(cpus) if cpus[c][1] and shares.get(c)}
        r.add("smp.per-cpu", len(errs) == 2 and all(abs(e) <= SMP_PER_CPU for e in errs.values()),
              "perf stat -a -A: " + ", ".join(
                  f"CPU{c} {cpus[c][0]:.0f} cycles over {cpus[c][1] / 1e9:.2f} s x "
                  f"{shares.get(c, 0):.1%} run: {errs.get(c, float('nan')):+.1%}"
                  for c in sorted(cpus)) + f" (each within {pct(SMP_PER_CPU)} of run time x TSC)")
    else:
        r.add("smp.per-cpu", False, f"expected 2 CPU rows and tick readings: {cpus}, {shares}")


def judge_record_all(g, out, rc, tsc_khz, r):
    hz = tsc_khz * 1e3
    text = "\n".join(out)
    period = int(facts(out).get("period", 0) or 0)
    samples = samples_by_cpu(text)
    times = sample_times(text)
    shares = run_shares(out)
    if rc == 0 and period and len(times) == 2 and len(shares) == 2 and hz:
        span = times[1] - times[0]
        expect = {c: span * shares[c] * hz / period for c in sorted(shares)}
        ok = len(samples) == 2 and all(within(samples.get(c, 0), e, SMP_RECORD_ALL)
                                       for c, e in expect.items())
        r.add("smp.record-all", ok,
              f"perf record -a -c {period}: samples by CPU {samples} over {span:.2f} s "
              f"(first to last sample); expected "
              f"{ {c: round(e) for c, e in expect.items()} } (span x run share x TSC / period), "
              f"each within {pct(SMP_RECORD_ALL)}")
    else:
        r.add("smp.record-all", False, f"perf record -a/report failed (rc {rc}): {text[-300:]}")


def judge_migrate(g, out, rc, tsc_khz, r):
    rows = perf_csv(out)
    cyc, clk = perf_row(rows, "cycles"), perf_row(rows, "task-clock")
    moves, seen = migrate_line("\n".join(out))
    # The task's run time: its task clock less the host's steal, measured
    # by the host while the task ran (the vCPU threads' run and wait time in
    # schedstat, read as busy started and ended): a guest's /proc/stat steal
    # over both CPUs, one of them idle most of the time, halves the moving
    # task's steal, and the whole step's window holds perf's start-up too.
    sched = getattr(g, "sched", {})
    share = host_run_share(sched.get("migrate busy-start"), sched.get("migrate busy-end"))
    if cyc and clk and cyc[0] and clk[0] and tsc_khz and share is not None:
        task_ms = clk[0] * share
        ratio = cyc[0] / (task_ms * tsc_khz)
        low, high = SMP_MIGRATE
        r.add("smp.migrate", rc == 0 and moves >= MIGRATE_MIN_MOVES and seen == {"0", "1"}
              and low <= ratio <= high,
              f"{moves} taskset moves, ran on CPUs {sorted(seen)}: perf {cyc[0]:.0f} cycles "
              f"over {clk[0]:.0f} ms task-clock x {share:.3f} host run share of the vCPU "
              f"threads ({task_ms:.0f} ms run time), ratio {ratio:.3f} (within {low}-{high})")
    else:
        r.add("smp.migrate", False, f"no cycles/task-clock count or no host schedstat as the "
              f"migrating task started and ended ({share}): {out}")
    b, e = g.snapshots.get("migrate BEGIN"), g.snapshots.get("migrate END")
    pid = (guest_cycles(g) | USR | OS)
    if b and e:
        opens = stats_sum(e, "opens") - stats_sum(b, "opens")
        progs = stats_sum(e, "reprograms") - stats_sum(b, "reprograms")
        grew = {v: vcpu_total(e, pid, v) - vcpu_total(b, pid, v) for v in (0, 1)}
        r.add("smp.migrate-opens", opens <= progs and min(grew.values()) > 0
              and moves >= MIGRATE_MIN_MOVES,
              f"over {moves} moves the host opened {opens} perf events for {progs} new "
              f"programmings (opens <= programmings); cycles counted on both vCPUs: {grew}")
    else:
        r.add("smp.migrate-opens", False, "no GET /vpmu at the migrate markers")
    # Each vCPU's counters are its own, and the VM totals are their sum.
    rows = (e or {}).get("totals", [])
    sums_ok = bool(rows) and all(t["count"] == sum(v["count"] for v in t.get("vcpus", []))
                                 for t in rows)
    cyc_row = next((t for t in rows if t["id"] == pid), {})
    per_vcpu = {v["vcpu"]: v["count"] for v in cyc_row.get("vcpus", [])}
    views = [v.get("index") for v in (e or {}).get("vcpus", [])]
    r.add("smp.vcpu-totals", sums_ok and views == [0, 1] and len(per_vcpu) == 2
          and min(per_vcpu.values()) > 0,
          f"GET /vpmu: vCPU views {views}; cycles ({pid:#x}) by vCPU {per_vcpu}, VM total "
          f"{cyc_row.get('count')}; every total row equals its vCPUs' sum: {sums_ok}")


def judge_restore(g, out, rc, tsc_khz, r):
    """The restore step: perf stat and perf record across a snapshot of the
    VM and its restore in a new VMM (acc_runner.Guest.span_restore) against
    the same work after it, and the restored vPMU (model, totals, time)."""
    span = getattr(g, "span", {}) or {}
    status, answer = span.get("snapshot") or (None, "no snapshot was taken")
    if status != 200 or not span.get("at_restore"):
        why = f"the snapshot mid-work failed: {status} {answer}" if status != 200 \
            else "the restored VMM never answered GET /vpmu"
        for name in ("main.restore-count", "main.restore-record", "main.restore-vpmu"):
            r.add(name, False, why)
        return
    across = perf_row(perf_csv(section(out, "span:", "span-stats:")), "cycles")
    after = perf_row(perf_csv(section(out, "reference:", "reference-stats:")), "cycles")
    if across and after and across[0] and after[0]:
        ratio = across[0] / after[0]
        r.add("main.restore-count", rc == 0 and RESTORE_COUNT[0] <= ratio <= RESTORE_COUNT[1],
              f"perf stat: {across[0]:.0f} cycles of the work across a snapshot and a restore "
              f"{span.get('stopped_s', 0):.0f} s later vs {after[0]:.0f} after it: ratio "
              f"{ratio:.2f} (within {RESTORE_COUNT[0]}-{RESTORE_COUNT[1]})")
    else:
        r.add("main.restore-count", False, f"perf stat gave no cycles: {out}")
    # The recording's two sides, as the host delivered them (PMIs).
    before = vpmu_totals(span["at_snapshot"])[0] - vpmu_totals(span["at_start"])[0]
    later = vpmu_totals(g.snapshots.get("restore END"))[0] - vpmu_totals(span["at_restore"])[0]
    (s_span, l_span) = stats_counts(section(out, "span-stats:", "reference:"))
    (s_ref, l_ref) = stats_counts(section(out, "reference-stats:"))
    ratio = (s_span or 0) / max(1, s_ref or 0)
    r.add("main.restore-record",
          before > 0 and later > 0 and (s_ref or 0) > 10 and l_span == 0 and l_ref == 0
          and RESTORE_SAMPLES[0] <= ratio <= RESTORE_SAMPLES[1],
          f"perf record across the restore: {s_span} samples, {l_span} lost (PMIs delivered: "
          f"{before} before the snapshot, {later} after the restore); after it: {s_ref} "
          f"samples, {l_ref} lost; ratio {ratio:.2f} (within {RESTORE_SAMPLES[0]}-"
          f"{RESTORE_SAMPLES[1]})")
    model = (span["at_snapshot"].get("vm") or {}).get("model")
    restored = (span["at_restore"].get("vm") or {}).get("model")
    t0, t1 = export_total(span["at_snapshot"]), export_total(span["at_restore"])
    ms = restored_in_ms(g.vmm_stderr())
    r.add("main.restore-vpmu", model is not None and model == restored and t1 >= t0
          and ms is not None,
          f"the restored VMM: the same model ({model == restored}), exported totals "
          f"{t1} at the restore from {t0} at the snapshot, restored in {ms} ms")


# ------------------------------------------------------------- tables --
# One perf-checks step: its name (a step_* function of perf-checks, `-` for
# `_`), the judge of its output (None: judged elsewhere) and the rows that
# judge adds, in order.
Check = namedtuple("Check", "step judge rows")
# One guest kind: its extra `vmm run` flags, its steps in the order it runs
# them, the step during which GET /vpmu is read over and over (live_step)
# and the step during whose workload `vmm profile` runs (profile_step).
# restore_step: the step whose work the VM is snapshotted in and continued
# from in a new VMM (the steps after it run in that VMM).
Kind = namedtuple("Kind", "flags checks live_step profile_step restore_step",
                  defaults=(None, None, None))

GUESTS = {
    # --vpmu auto: on, the kernel reading counters with RDMSR.
    "main": Kind([], [
        Check("detect", judge_detect, ["main.detect"]),
        Check("stat", judge_stat, ["main.stat-cycles"]),
        Check("unbacked", judge_unbacked, ["main.unbacked"]),
        Check("privilege", judge_privilege, ["main.privilege"]),
        Check("record", judge_record_step, ["main.record-samples", "main.record-modes",
                                            "main.record-symbol", "main.profile-kernel",
                                            "main.profile-user"]),
        # Every step after this one runs in a VMM restored mid-step. After
        # record: Linux keeps a running average of its (slow, here) perf
        # NMI handler, and after the restore step's sampling it throttles a
        # new recording to 100/s at its first sample.
        Check("restore", judge_restore, ["main.restore-count", "main.restore-record",
                                         "main.restore-vpmu"]),
        Check("multiplex", judge_multiplex, ["main.multiplex"]),
        Check("api", judge_api, ["main.api-live", "main.api-count"]),
        Check("watchdog", judge_watchdog, ["main.watchdog"]),
        # Linux's perf tests, judged against the off guest's (acc_perftest).
        Check("perf-test", None, []),
    ], live_step="api", profile_step="record", restore_step="restore"),
    # No PMU driver: perf says cycles is not supported.
    "off": Kind(["--vpmu", "off"], [
        Check("nopmu", judge_nopmu, ["off.no-pmu"]),
        # Tracepoints need no PMU: checked in this short guest.
        Check("tracepoints", judge_tracepoints, ["off.tracepoint-list", "off.tracepoint-stat",
                                                 "off.tracepoint-record"]),
        Check("perf-test", None, []),
    ]),
    # Cycles denied: cycles counts nothing, no host event.
    "deny": Kind(["--vpmu-events", f"deny:{host_cycles():#x}"], [
        Check("deny", judge_deny, ["deny.cycles"]),
    ]),
    # 2 vCPUs: perf across CPUs.
    "smp": Kind(["--vcpus", "2"], [
        Check("cpus", judge_cpus, ["smp.cpus"]),
        Check("stat-all", judge_stat_all, ["smp.stat-all", "smp.per-cpu"]),
        Check("record-all", judge_record_all, ["smp.record-all"]),
        Check("migrate", judge_migrate, ["smp.migrate", "smp.migrate-opens",
                                         "smp.vcpu-totals"]),
    ]),
    # --bench: BENCHMARKS.md's figures (acc_bench.py), no rows.
    "bench": Kind([], [Check("bench", None, [])]),
}
# The kinds a check run boots (--only), in the order of the table.
CHECKED = [name for name, kind in GUESTS.items() if any(c.judge for c in kind.checks)]


def steps(kind):
    """The perf-checks steps guest `kind` runs, in order."""
    return [c.step for c in GUESTS[kind].checks]


def rows(kind):
    """The rows the checks of guest `kind` add, in order (without its .run row)."""
    return [row for c in GUESTS[kind].checks for row in c.rows]


def judge_guest(g, r):
    """Every check of guest g's kind; all NOT RUN if its first step never
    ended. The TSC rate is the tsc_khz fact of its first step."""
    checks = GUESTS[g.name].checks
    first, _ = g.step(checks[0].step)
    if first is None:
        for name in rows(g.name):
            r.skip(name, "the guest never ran the step")
        return
    tsc_khz = float(facts(first).get("tsc_khz", 0) or 0)
    for c in checks:
        if c.judge:
            out, rc = g.step(c.step)
            c.judge(g, out or [], rc, tsc_khz, r)


def judge_run(g, r):
    """The run itself: the guest's steps ran to their end, the VMM ended by
    the reboot, and (where it booted) its snapshot at the shell was taken."""
    done = guest_done(g.text())
    error = getattr(g, "error", None)
    how = {True: "booted; ", False: "restored; "}.get(getattr(g, "booted", None), "")
    r.add(f"{g.name}.run", g.rc == 0 and done is not None and not error,
          f"{how}vmm exit {g.rc} after {g.elapsed:.0f} s; "
          + (f"perf-checks finished, rc={done}" if done else "perf-checks did not finish")
          + (f"; {error}" if error else ""))


def judge_boot_log(g, r):
    """The kernel's boot log: Linux loaded the VMM's ACPI tables (its
    interpreter is on) and printed no ACPI error, exception or warning."""
    text = g.text()
    bad = boot_log_defects(text)
    on = acpi_interpreter_on(text)
    r.add(f"{g.name}.boot-log", on and not bad,
          ("ACPI interpreter enabled" if on else "no 'ACPI: Interpreter enabled' line")
          + (f"; {len(bad)} ACPI trouble line(s): " + " | ".join(bad[:3]) if bad
             else "; no ACPI error, exception or warning"))
