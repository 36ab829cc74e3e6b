"""Parsers of what the acceptance reads: the guest's serial output (perf-checks'
step markers and facts, perf's tables, busy's summary lines, /proc/stat tick
readings), the VMM's GET /vpmu answers, vmm profile's folded stacks and the
VMM's stderr.

Pure functions of text or decoded JSON: no guest, no VMM, no clock
(test_acceptance.py tests them). Standard library only.
"""

import re

AMD_CYCLES = 0x76
# Intel's architectural core cycles; the model's fixed counter 1 exports
# the same event (its programming id is 0x3c with the ring bits).
INTEL_CYCLES = 0x3C
USR, OS = 1 << 16, 1 << 17


def model_vendor(doc):
    """"amd" or "intel": the vendor of the vPMU model in a GET /vpmu
    answer, or None (no model, no answer)."""
    model = ((doc or {}).get("vm") or {}).get("model") or {}
    return model.get("vendor")


# ------------------------------------------------- perf-checks' markers --
STEP_MARKER = re.compile(r"VMM-STEP ([\w-]+) (BEGIN|END)")


def step_marker(line):
    """(step, "BEGIN" or "END") of a `VMM-STEP <step> BEGIN|END` line, or None."""
    m = STEP_MARKER.match(line.strip())
    return (m.group(1), m.group(2)) if m else None


def step_output(text, name):
    """(output lines of step `name`, its rc) from the serial log, or
    (None, None) if the step never ended."""
    m = re.search(rf"VMM-STEP {name} BEGIN\r?\n(.*?)VMM-STEP {name} END rc=(\d+)", text, re.S)
    if not m:
        return None, None
    return m.group(1).splitlines(), int(m.group(2))


def guest_done(text):
    """The rc of the guest's checks, as text, or None if they never
    finished: VMM-CHECKS-DONE rc=N after the steps typed at the shell, or,
    where /init ran them itself (no shell), its VMM-GUEST-DONE rc=N."""
    m = re.search(r"VMM-CHECKS-DONE rc=(\d+)", text)
    if m:
        return m.group(1)
    if "init: vmm.exit=shell" in text:
        return None
    m = re.search(r"VMM-GUEST-DONE rc=(\d+)", text)
    return m.group(1) if m else None


def stats_counts(lines):
    """(SAMPLE events, LOST events) of perf report --stats lines; LOST is 0
    when perf lists none, SAMPLE None when it lists none."""
    samples = lost = None
    for line in lines:
        m = re.match(r"\s*(SAMPLE|LOST) events:\s+(\d+)", line)
        if m and m.group(1) == "SAMPLE":
            samples = int(m.group(2))
        elif m:
            lost = (lost or 0) + int(m.group(2))
    return samples, lost or 0


def restored_in_ms(stderr):
    """The ms of the last "vmm: restored from PATH in N ms" line, or None."""
    found = re.findall(r"vmm: restored from .* in ([\d.]+) ms", stderr)
    return float(found[-1]) if found else None


def facts(lines):
    """perf-checks' KEY=VALUE facts: {key: value}, the last one winning."""
    out = {}
    for line in lines:
        m = re.match(r"^(\w+)=(.*)$", line.strip())
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def section(lines, start, stop=None):
    """The lines after the line `start` up to the line `stop` (or the end)."""
    out, inside = [], False
    for line in lines:
        if line.strip() == start:
            inside = True
        elif stop and line.strip() == stop:
            inside = False
        elif inside:
            out.append(line)
    return out


# ------------------------------------------------------------ boot log --
# How ACPICA starts every message of trouble it prints (ACPI_ERROR,
# ACPI_EXCEPTION, ACPI_BIOS_ERROR, ACPI_WARNING, ACPI_BIOS_WARNING), and the
# lines Linux adds when it cannot load or use the tables the VMM built.
BOOT_LOG_DEFECTS = re.compile(
    r"ACPI (?:BIOS )?(?:Error|Exception|Warning)"
    r"|Unable to load the System Description Tables"
    r"|Could not remove SCI handler"
    r"|Unable to start the ACPI Interpreter")
ACPI_ON = "ACPI: Interpreter enabled"


def boot_log_defects(text):
    """The lines of a serial log that say the kernel could not load or use
    the VMM's ACPI tables (BOOT_LOG_DEFECTS), in order."""
    return [line.strip() for line in text.splitlines() if BOOT_LOG_DEFECTS.search(line)]


def acpi_interpreter_on(text):
    """Whether Linux loaded the tables and turned its ACPI interpreter on."""
    return ACPI_ON in text


# ------------------------------------------------------------ perf stat --
def perf_csv(lines):
    """perf stat -x, rows: [(value or None, text, event, run_ns, pct_running)]."""
    rows = []
    for line in lines:
        f = line.strip().split(",")
        if len(f) < 4 or f[0].startswith("busy:"):
            continue
        value, unit, event = f[0], f[1], f[2]
        if not re.match(r"^[\w:.-]+$", event):
            continue
        try:
            num = float(value)
        except ValueError:
            num = None  # <not counted>, <not supported>
        run = float(f[3]) if len(f) > 3 and f[3].replace(".", "").isdigit() else None
        pct = float(f[4]) if len(f) > 4 and re.match(r"^[\d.]+$", f[4]) else None
        rows.append((num, value, event, run, pct))
    return rows


def perf_row(rows, event):
    """The perf_csv row of `event`, or None."""
    return next((x for x in rows if x[2] == event), None)


def per_cpu_csv(lines, event):
    """perf stat -A -x, rows of `event`: {cpu: (value, enabled ns)}."""
    out = {}
    for line in lines:
        f = line.strip().split(",")
        if len(f) >= 5 and re.match(r"^CPU\d+$", f[0]) and f[3] == event:
            try:
                out[int(f[0][3:])] = (float(f[1]), float(f[4]))
            except ValueError:
                pass
    return out


def pmu_driver(text):
    """What Linux's `Performance Events: ...` boot line says, or None."""
    m = re.search(r"Performance Events: (.*)", text)
    return m.group(1) if m else None


def pmu_shape(text):
    """(version, generic registers, bit width) from the PMU driver's boot
    lines, each None where missing."""
    found = (re.search(r"version:\s+(\d+)", text),
             re.search(r"generic registers:\s+(\d+)", text),
             re.search(r"bit width:\s+(\d+)", text))
    return tuple(int(m.group(1)) if m else None for m in found)


# ------------------------------------------------------------------ busy --
BUSY_LINE = re.compile(r"busy: mode=(\w+) cpu_ms=(\d+) user_ms=(\d+) sys_ms=(\d+)"
                       r"(?:.* steal_ticks=(\d+) total_ticks=(\d+))?")


def busy_lines(lines):
    """busy's summary lines: its CPU, user and system ms, and the steal
    share of the machine's time over its run (None if it had no reading)."""
    out = []
    for line in lines:
        m = BUSY_LINE.search(line)
        if m:
            steal, total = m.group(5), m.group(6)
            out.append({"cpu_ms": int(m.group(2)), "user_ms": int(m.group(3)),
                        "sys_ms": int(m.group(4)),
                        "steal": int(steal) / int(total) if total and int(total) else None})
    return out


def busy_line(lines):
    """The first of busy_lines, or None."""
    found = busy_lines(lines)
    return found[0] if found else None


def run_ms(busy):
    """A busy task's run time: the user and system time the kernel accounted
    to it (exact, and without steal, with VIRT_CPU_ACCOUNTING_GEN)."""
    return busy["user_ms"] + busy["sys_ms"]


def migrate_line(text):
    """(moves, {CPUs it ran on}) from `busy migrate`'s summary line; (0, set())
    without one."""
    m = re.search(r"migrate: moves=(\d+) cpus_seen=([\d ]*)", text)
    return (int(m.group(1)), set(m.group(2).split())) if m else (0, set())


# ----------------------------------------------------- /proc/stat ticks --
def run_shares(lines):
    """{cpu: run share} between the ticks_before/ticks_after facts of a
    perf-checks window: the CPU's user+system+irq ticks over all its ticks
    (idle and steal included)."""
    # A kernel message on the console can split a reading's line: drop
    # them ("[  199.855765] INFO: ..." up to the end of their line).
    text = re.sub(r"\[\s*\d+\.\d+\] [^\n]*\n?", "", "\n".join(lines))
    f = facts(text.splitlines())

    def parse(text):
        out = {}
        for item in (text or "").split():
            name, _, value = item.partition("=")
            run, _, total = value.partition("/")
            out[int(name[3:])] = (int(run), int(total))
        return out
    try:
        b, e = parse(f.get("ticks_before")), parse(f.get("ticks_after"))
    except ValueError:
        return {}
    return {c: (e[c][0] - b[c][0]) / max(1, e[c][1] - b[c][1]) for c in b if c in e}


def host_run_share(begin, end):
    """The share of the vCPU threads' runnable time that the host let them
    run between two acc_runner.Guest.vcpu_sched() readings: sum of run ns
    over sum of run and wait ns (1 - the host's steal while they had work),
    or None without both readings or with no runnable time."""
    if not begin or not end:
        return None
    run = sum(end[t][0] - begin[t][0] for t in end if t in begin)
    wait = sum(end[t][1] - begin[t][1] for t in end if t in begin)
    return run / (run + wait) if run + wait > 0 else None


def steal_fraction(f):
    """Steal share of all CPU time between the before/after facts
    ("STEAL TOTAL" jiffies of /proc/stat's cpu line), or None."""
    try:
        s0, t0 = map(int, f["before"].split())
        s1, t1 = map(int, f["after"].split())
    except (KeyError, ValueError):
        return None
    return (s1 - s0) / max(1, t1 - t0)


# ---------------------------------------------------------- perf report --
def report_samples(text):
    """The `# Samples: N` of a perf report header, or None."""
    m = re.search(r"# Samples: (\d+)", text)
    return int(m.group(1)) if m else None


def dso_shares(lines):
    """(kernel %, user %) of perf report --sort dso -F overhead,sample,dso:
    the [kernel.kallsyms] and busy rows' overheads."""
    kernel = user = 0.0
    for line in lines:
        m = re.match(r"^\s*([\d.]+)%\s+\d+\s+(\S+)", line)
        if m:
            if m.group(2) == "[kernel.kallsyms]":
                kernel += float(m.group(1))
            elif m.group(2) == "busy":
                user += float(m.group(1))
    return kernel, user


def top_user_symbol(text):
    """The first user-mode ([.]) symbol after the record step's
    `top-user-symbols:` line, or None."""
    after = text.split("top-user-symbols:", 1)[-1]
    m = re.search(r"^\s*[\d.]+%\s+\[\.\]\s+(\S+)", after, re.M)
    return m.group(1) if m else None


def perf_symbols(out, section):
    """(percent, symbol) rows of one of the record step's top-N lists."""
    rows, inside = [], False
    for line in out:
        if line.strip() == f"{section}:":
            inside = True
            continue
        m = re.match(r"^\s*([\d.]+)%\s+\[[.k]\]\s+(\S+)", line)
        if inside and m:
            rows.append((float(m.group(1)), m.group(2)))
        elif inside and line.strip():
            break
    return rows


def samples_by_cpu(text):
    """{cpu: samples} of perf report --sort cpu -F overhead,sample,cpu."""
    return {int(m.group(2)): int(m.group(1)) for m in
            re.finditer(r"^\s*[\d.]+%\s+(\d+)\s+0*(\d+)\s*$", text, re.M)}


def sample_times(text):
    """The `# time of first/last sample` seconds of perf report --header."""
    return [float(x) for x in
            re.findall(r"^# time of (?:first|last) sample : ([\d.]+)", text, re.M)]


# ------------------------------------------------------ vmm's own output --
def folded_stacks(text):
    """Folded stacks: [(frames outermost first, count)]."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def perf_event_opens(stderr):
    """How many perf_event_open calls the VMM's exit summary reports, or None."""
    m = re.search(r"(\d+) perf_event_open", stderr)
    return int(m.group(1)) if m else None


# ------------------------------------------------------- GET /vpmu JSON --
def counters(snapshot):
    """Every counter of every vCPU in a GET /vpmu answer."""
    if not snapshot:
        return []
    return [c for v in snapshot.get("vcpus", []) for c in v["vpmu"]["counters"]]


def event_of(counter):
    """The event number a counter's control decodes to, or None."""
    d = counter.get("decoded", {})
    return d.get("event")


def select_of(counter):
    """A counter's raw event select (control) value."""
    return counter.get("control", 0)


def total_for(snapshot, pid):
    """The VM total for programming `pid` in a GET /vpmu answer (0 if none)."""
    for t in (snapshot or {}).get("totals", []):
        if t["id"] == pid:
            return t["count"]
    return 0


def vcpu_total(snapshot, pid, vcpu):
    """vCPU `vcpu`'s total for programming `pid` in a GET /vpmu answer."""
    for t in (snapshot or {}).get("totals", []):
        if t["id"] == pid:
            return sum(v["count"] for v in t.get("vcpus", []) if v["vcpu"] == vcpu)
    return 0


def stats_sum(snapshot, key):
    """A vPMU statistic summed over the vCPUs of a GET /vpmu answer."""
    return sum(v["vpmu"]["stats"].get(key, 0) for v in (snapshot or {}).get("vcpus", []))


def export_total(snapshot):
    """Every event's total the VMM exported in a GET /vpmu answer, summed."""
    return sum(t["count"] for t in (snapshot or {}).get("totals", []))


def vpmu_totals(snapshot):
    """Sums over the vCPUs of (PMIs, PMU MSR exits, overflow signals)."""
    pmis = msrs = signals = 0
    for v in (snapshot or {}).get("vcpus", []):
        st = v["vpmu"]["stats"]
        pmis += st["pmis"]
        msrs += sum(st["rdmsr"].values()) + sum(st["wrmsr"].values())
        signals += st["overflow_signals"]
    return pmis, msrs, signals
