"""Linux's own perf tests in the acceptance: `perf test -v` run by the
perf-test step of perf-checks in the vPMU-on guest (main) and the
vPMU-off guest (off), parsed, compared and explained.

Every test that does not pass with the vPMU on needs a reason from
REASONS, matched against its own -v output: a limit of these hosts or a
gap of the guest image. A test with no known reason fails the
perf-test.explained row (it may be a vPMU defect, to be fixed, not listed).
"""

import re

from acc_parsers import stats_sum, step_output

# Kernel messages interleaved on the console: "[  213.139063] ...".
KERNEL_LINE = re.compile(r"^\s*\[\s*\d+\.\d+\]")
# " 24: Number of exit events of a simple workload :", " 4.2: User ... :"
HEADER = re.compile(r"^\s*(\d+(?:\.\d+)?): (.*?)\s*:\s*$")
# "Track with sched_switch: Ok", "mmap interface tests subtest 2: Skip (permissions)"
RESULT = re.compile(r"^(.*?): (Ok|FAILED!|Skip)(?: \((.*)\))?\s*$")
# Lines of a test's -v output that say nothing about why it ended so.
NOISE = re.compile(r"^(--- start ---|---- end ----|test child forked.*|Using CPUID .*|"
                   r"mmap size \d+B|Problems creating module maps.*|Looking at the vmlinux_path.*|"
                   r"Reading /proc/\d+/task/\d+/maps time out.*)$")

# Tests that need nothing but cycles (user-only included), sampling and
# tracking events: they must pass with the vPMU on.
MUST_PASS = ("Number of exit events of a simple workload",
             "Use a dummy software event to keep tracking", "Track with sched_switch")

# Why a test does not pass here, by its -v output: (pattern, class, reason).
# class "host": a limit of these development hosts (ENVIRONMENT.md, or the
# guest kernel's answers to them, guest-images/linux/README.md); "image":
# something the guest image lacks; "as-hw": a skip that x86 hardware PMUs
# get too (Linux's own published perf test runs). Never "vpmu": a test that
# fails for the vPMU is a defect to fix, not a row of this table.
REASONS = [
    (r"^Test parsing of \"hybrid\" CPU events\nnot hybrid", "as-hw",
     "a test for hybrid CPUs (big and little cores); this model, like the host, is not one"),
    (r"no aliases in sysfs", "as-hw",
     "skipped on x86 hardware PMUs too (Linux's own published perf test runs on Intel machines)"),
    (r"userspace counter access not supported", "host",
     "no guest RDPMC here: the kernel reads counters with RDMSR (perf_read_msr), user-space "
     "RDPMC stays off"),
    (r"User space counter reading of instructions|failed to open evsel: No such file",
     "host", "no hardware events here: instructions has no backing (only cycles, on the task "
     "clock)"),
    (r"perf_read_tsc_conversion is not supported", "host",
     "no user-space time conversion: the guest's sched_clock is kvmclock (the TSC rate comes "
     "from it here), not the TSC"),
    (r"Failed to find TSC frequency in /proc/cpuinfo", "host",
     "the CPU brand string (the host's, passed through) names no frequency"),
    (r"wrong count for bp|Wrong number of executions|[Ww]atchpoint|unexpected sigtraps|"
     r"bp modify|modify test \d+ failed", "host",
     "debug-register breakpoints and watchpoints (not the PMU) never fire in these guests, "
     "vPMU on or off; whether KVM-PVM or the VMM stops them is not known yet"),
    (r"failed to get stack map|failed to get unwind sample", "host",
     "no stack map for the sample: reading the thread's maps outlasts perf's 500 ms limit here "
     "(emulated kernel code), vPMU on or off"),
    (r"Couldn't find a vmlinux", "image", "no vmlinux inside the guest"),
    (r"PERF_RECORD_MMAP for \S+ missing", "image",
     "busybox's sleep is static: no libc or ld mappings to record"),
    (r"python3?: not found|import perf|Setup struct perf_event_attr", "image",
     "no Python in the image (perf's Python parts are stubs)"),
    (r"[Oo]bjdump", "image", "no objdump in the image"),
    (r"not compiled in|clang isn't installed|LLVM search and compile|BPF filter|"
     r"Probe SDT events|dlfilter C API|PE file support|clang", "image",
     "not in Debian's perf build or the image (BPF, clang, libpfm4, SDT, dlfilter, PE)"),
]


def parse(lines):
    """{test id: {"name", "result" (Ok/FAILED!/Skip), "why" (the skip's
    own reason), "text" (its -v lines)}} from `perf test -v` output."""
    tests = {}
    current, name, body = None, None, []
    for raw in lines:
        line = raw.rstrip()
        if KERNEL_LINE.match(line):
            continue
        header = HEADER.match(line)
        if header:
            current, name, body = header.group(1), header.group(2), []
            continue
        result = RESULT.match(line)
        if result and current is not None:
            tests[current] = {"name": name, "result": result.group(2),
                              "why": result.group(3) or "", "text": body}
            current = None
            continue
        if current is not None and line and not NOISE.match(line):
            body.append(line)
    return tests


def explain(test):
    """(class, reason) of a test that did not pass, or (None, its last
    lines) when no known reason matches."""
    text = "\n".join([test["name"], test["why"]] + test["text"])
    for pattern, kind, reason in REASONS:
        if re.search(pattern, text):
            return kind, reason
    last = [line for line in test["text"] if not line.startswith("test child finished")]
    return None, " | ".join(last[-3:]) or test["why"] or "no output"


def table(on, off):
    """Rows (id, name, result on, result off, class, reason), in test order."""
    def key(t):
        return tuple(int(p) for p in t.split("."))
    rows = []
    for t in sorted(set(on) | set(off), key=key):
        a, b = on.get(t), off.get(t)
        name = (a or b)["name"]
        ra = a["result"] if a else "-"
        rb = b["result"] if b else "-"
        kind, reason = explain(a) if a and ra != "Ok" else ("", "")
        rows.append((t, name, ra, rb, kind, reason))
    return rows


def print_table(rows):
    print("acceptance: perf test, vPMU on and off (guests main and off):")
    print(f"  {'test':<6} {'on':<8} {'off':<8} {'class':<6} name: reason")
    for t, name, ra, rb, kind, reason in rows:
        print(f"  {t:<6} {ra:<8} {rb:<8} {kind or ('?' if ra != 'Ok' else ''):<6} {name}"
              + (f": {reason}" if reason else ""))


def summary(rows):
    """The table's summary line: passed, skipped and failed with the vPMU
    on and off."""
    def counts(i):
        results = [r[i] for r in rows]
        return "/".join(str(results.count(x)) for x in ("Ok", "Skip", "FAILED!"))
    return (f"{len(rows)} tests; passed/skipped/failed with the vPMU on {counts(2)}, "
            f"off {counts(3)}")


def judge_perf_test(main, off, r):
    """The perf-test rows, from guests main (vPMU on) and off; returns the
    table (print_table prints it), or None if a guest did not run it."""
    out_on = step_output(main.text(), "perf-test")[0] if main else None
    out_off = step_output(off.text(), "perf-test")[0] if off else None
    names = ["perf-test.ran", "perf-test.off-passes-on", "perf-test.explained",
             "perf-test.pmu"]
    if not out_on or not out_off:
        for name in names:
            r.skip(name, "a guest did not run the perf-test step")
        return None
    on, off_tests = parse(out_on), parse(out_off)
    rows = table(on, off_tests)
    r.add("perf-test.ran", bool(on) and set(on) == set(off_tests), summary(rows)
          + ("" if set(on) == set(off_tests) else
             f"; tests run only on one side: {sorted(set(on) ^ set(off_tests))}"))
    lost = [f"{t} {name}" for t, name, ra, rb, _, _ in rows if rb == "Ok" and ra != "Ok"]
    r.add("perf-test.off-passes-on", bool(on) and not lost,
          f"{sum(1 for row in rows if row[3] == 'Ok')} pass with the vPMU off, all pass with it "
          "on" if not lost else f"pass off, not on: {', '.join(lost)}")
    unexplained = [f"{t} {name} ({ra}: {reason})" for t, name, ra, _, kind, reason in rows
                   if ra != "Ok" and kind is None]
    kinds = [row[4] for row in rows if row[2] != "Ok"]
    r.add("perf-test.explained", bool(on) and not unexplained,
          (f"{len(kinds)} do not pass with the vPMU on: {kinds.count('host')} for a host limit, "
           f"{kinds.count('image')} for an image gap, {kinds.count('as-hw')} skipped on hardware "
           "PMUs too, none for the vPMU") if not unexplained
          else "no known reason (a vPMU defect?): " + "; ".join(unexplained))
    begin, end = main.snapshots.get("perf-test BEGIN"), main.snapshots.get("perf-test END")
    opens = stats_sum(end, "opens") - stats_sum(begin, "opens")
    pmis = stats_sum(end, "pmis") - stats_sum(begin, "pmis")
    must = {row[1]: row[2] for row in rows if row[1] in MUST_PASS}
    failing = [n for n in MUST_PASS if must.get(n) != "Ok"]
    r.add("perf-test.pmu", not failing and opens > 0 and pmis > 0 and end is not None,
          f"{len(MUST_PASS) - len(failing)} of {len(MUST_PASS)} cycles and sampling tests pass "
          f"({'; '.join(n + ': ' + must.get(n, 'not run') for n in MUST_PASS)}); the vPMU during "
          f"the step: {opens} host events opened, {pmis} PMIs")
    return rows
