#!/usr/bin/env python3
"""Linux perf acceptance: Linux's own perf inside a Linux guest on vmm's vPMU.

Boots the guest that build.sh makes (out/vmlinux, out/initramfs.cpio,
out/cmdline) three times, side by side:

  main  --vpmu auto (on: the kernel reads counters with RDMSR), running
        /bin/perf-checks (detect, stat, unbacked, privilege, record,
        multiplex, api, watchdog) while this script reads GET /vpmu at
        each step's BEGIN and END marker and while the api step runs;
  off   --vpmu off: no PMU driver, perf says cycles is not supported;
  deny  --vpmu-events deny:0x76: cycles counts nothing, no host event.

then judges what perf printed against run time, the guest's TSC rate and
what the VMM exported, and prints a table. Started by acceptance.sh, which
builds what is missing first. Standard library only.

While the main guest's record step runs its workload, the host takes its
own profile of the guest (vmm profile, GET /profile) and holds its top
kernel symbols and its user-mode share against what the guest's perf
report says.

With --bench it boots one guest that runs perf-checks' bench step instead
and prints the figures of BENCHMARKS.md's Linux section: boot to /init,
perf stat and perf record overheads on fixed work, and per sample the
exits to the VMM, the VMM's own CPU time and the guest time lost.

Exit codes: 0 every check passed, 1 a check failed, 2 set-up error,
5 Linux did not reach /init in time, 6 no usable /dev/kvm.
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

AMD_CYCLES = 0x76
USR, OS = 1 << 16, 1 << 17
# The host-side profile of the record step: from this long after busy says
# it started (under perf record: 3 s of its CPU time, about 3.5 s here) for
# this long, at this rate per second of vCPU time.
PROFILE_DELAY_S = 0.2
PROFILE_SECONDS = 2.5
PROFILE_HZ = 199


# ----------------------------------------------------------------- running --
def api_get(sock_path, path, timeout=5.0):
    """GET path on the VMM's Unix socket; the decoded JSON, or None."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(sock_path)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return None
        return json.loads(body)
    except (OSError, ValueError):
        return None


class Guest:
    """One `vmm run` of the guest, its serial log read as it grows."""

    def __init__(self, name, args, steps, workdir, timeout, extra_cmdline, env_vmm):
        self.name = name
        self.serial = os.path.join(workdir, f"{name}.serial")
        self.stderr_path = os.path.join(workdir, f"{name}.vmm")
        self.socket = os.path.join(workdir, f"{name}.sock")
        cmdline = open(os.path.join(args.out, "cmdline")).read().strip()
        cmdline += f' vmm.cmd="perf-checks {" ".join(steps)}"'
        if extra_cmdline:
            cmdline += " " + extra_cmdline
        self.argv = [env_vmm, "run",
                     "--kernel", os.path.join(args.out, "vmlinux"),
                     "--initrd", os.path.join(args.out, "initramfs.cpio"),
                     "--memory", str(args.memory),
                     "--serial", f"file:{self.serial}",
                     "--api-socket", self.socket,
                     "--timeout", str(timeout),
                     "--cmdline", cmdline] + self.vmm_flags()
        self.timeout = timeout
        self.snapshots = {}  # "step BEGIN|END" -> GET /vpmu
        self.bench = []      # (marker line, GET /vpmu, vCPU thread ms)
        self.init_after = None  # host seconds until /init printed its start
        self.during = {}     # step -> [GET /vpmu while it ran]
        self.rc = None
        self.elapsed = None
        self.proc = None
        self.thread = None
        self.vmm = env_vmm
        self.workdir = workdir
        self.profile = None  # (vmm profile's exit code, stderr, folded stacks)
        self.profile_thread = None

    def vmm_flags(self):
        return {"main": [], "bench": [], "off": ["--vpmu", "off"],
                "deny": ["--vpmu-events", "deny:0x76"], "smp": ["--vcpus", "2"]}[self.name]

    def thread_ms(self):
        """(user, system) CPU ms of the VMM's vCPU threads, from /proc."""
        user = system = 0
        tick = os.sysconf("SC_CLK_TCK")
        try:
            for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                base = f"/proc/{self.proc.pid}/task/{tid}"
                if not open(f"{base}/comm").read().startswith("vcpu"):
                    continue
                fields = open(f"{base}/stat").read().rsplit(")", 1)[1].split()
                user += int(fields[11]) * 1000 // tick
                system += int(fields[12]) * 1000 // tick
        except (OSError, ValueError, IndexError):
            return None
        return user, system

    def start(self):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.stderr_path, "w"))
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self):
        """Follow the serial log; read the API at step markers."""
        seen = 0
        running_step = None
        deadline = self.started + self.timeout + 60
        while True:
            done = self.proc.poll() is not None
            try:
                with open(self.serial, "rb") as f:
                    f.seek(seen)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            # whole lines only
            cut = data.rfind(b"\n") + 1
            for line in data[:cut].decode("utf-8", "replace").splitlines():
                if self.init_after is None and "VMM-GUEST-START" in line:
                    self.init_after = time.monotonic() - self.started
                if line.startswith("VMM-BENCH "):
                    self.bench.append((line.strip(), api_get(self.socket, "/vpmu"),
                                       self.thread_ms()))
                m = re.match(r"VMM-STEP (\w+) (BEGIN|END)", line.strip())
                if m:
                    key = f"{m.group(1)} {m.group(2)}"
                    self.snapshots[key] = api_get(self.socket, "/vpmu")
                    running_step = m.group(1) if m.group(2) == "BEGIN" else None
                if (running_step == "record" and self.name == "main"
                        and line.startswith("busy: start") and not self.profile_thread):
                    self.profile_thread = threading.Thread(target=self.take_profile,
                                                           daemon=True)
                    self.profile_thread.start()
            seen += cut
            if running_step == "api":
                snap = api_get(self.socket, "/vpmu")
                if snap:
                    self.during.setdefault("api", []).append(snap)
            if done:
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                break
            time.sleep(0.3)
        self.rc = self.proc.returncode
        self.elapsed = time.monotonic() - self.started

    def take_profile(self):
        """vmm profile of the record step, as folded stacks."""
        time.sleep(PROFILE_DELAY_S)
        out = os.path.join(self.workdir, f"{self.name}.profile.folded")
        argv = [self.vmm, "profile", "--api-socket", self.socket,
                "--seconds", str(PROFILE_SECONDS), "--frequency", str(PROFILE_HZ),
                "--format", "folded", "-o", out]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=PROFILE_SECONDS + 60)
            folded = open(out).read() if done.returncode == 0 else ""
            self.profile = (done.returncode, done.stderr.strip(), folded)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.profile = (None, str(e), "")

    def wait(self):
        self.thread.join()
        if self.profile_thread:
            self.profile_thread.join()

    def text(self):
        try:
            return open(self.serial, encoding="utf-8", errors="replace").read()
        except FileNotFoundError:
            return ""

    def vmm_stderr(self):
        try:
            return open(self.stderr_path, encoding="utf-8", errors="replace").read()
        except FileNotFoundError:
            return ""

    def step(self, name):
        """(output lines of the step, its rc) or (None, None) if it never ended."""
        m = re.search(rf"VMM-STEP {name} BEGIN\r?\n(.*?)VMM-STEP {name} END rc=(\d+)",
                      self.text(), re.S)
        if not m:
            return None, None
        return m.group(1).splitlines(), int(m.group(2))


# ----------------------------------------------------------------- parsing --
def facts(lines):
    out = {}
    for line in lines:
        m = re.match(r"^(\w+)=(.*)$", line.strip())
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


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
    found = busy_lines(lines)
    return found[0] if found else None


def run_ms(busy):
    """A busy task's run time: the user and system time the kernel accounted
    to it (exact, and without steal, with VIRT_CPU_ACCOUNTING_GEN)."""
    return busy["user_ms"] + busy["sys_ms"]


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


def steal_fraction(f):
    """Steal share of all CPU time between the before/after facts."""
    try:
        s0, t0 = map(int, f["before"].split())
        s1, t1 = map(int, f["after"].split())
    except (KeyError, ValueError):
        return None
    return (s1 - s0) / max(1, t1 - t0)


def vcpu_total(snapshot, pid, vcpu):
    """vCPU `vcpu`'s total for programming `pid` in a GET /vpmu answer."""
    for t in (snapshot or {}).get("totals", []):
        if t["id"] == pid:
            return sum(v["count"] for v in t.get("vcpus", []) if v["vcpu"] == vcpu)
    return 0


def stats_sum(snapshot, key):
    """A vPMU statistic summed over the vCPUs of a GET /vpmu answer."""
    return sum(v["vpmu"]["stats"][key] for v in (snapshot or {}).get("vcpus", []))


def counters(snapshot):
    """Every counter of every vCPU in a GET /vpmu answer."""
    if not snapshot:
        return []
    return [c for v in snapshot.get("vcpus", []) for c in v["vpmu"]["counters"]]


def total_for(snapshot, pid):
    for t in (snapshot or {}).get("totals", []):
        if t["id"] == pid:
            return t["count"]
    return 0


def event_of(counter):
    d = counter.get("decoded", {})
    return d.get("event")


def select_of(counter):
    return counter.get("control", 0)


# ------------------------------------------------------------------ checks --
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


def within(a, b, frac):
    return b > 0 and abs(a - b) <= frac * b


def judge_main(g, r):
    out, rc = g.step("detect")
    if out is None:
        for name in ["detect", "stat", "unbacked", "privilege", "record", "multiplex",
                     "api-live", "api-count", "watchdog", "profile-kernel", "profile-user"]:
            r.skip(f"main.{name}", "the guest never ran the step")
        return
    text = "\n".join(out)
    f = facts(out)
    drv = re.search(r"Performance Events: (.*)", text)
    version = re.search(r"version:\s+(\d+)", text)
    regs = re.search(r"generic registers:\s+(\d+)", text)
    width = re.search(r"bit width:\s+(\d+)", text)
    model = ((g.snapshots.get("detect BEGIN") or {}).get("vm") or {}).get("model") or {}
    want = (model.get("version"), model.get("gp_counters"), model.get("gp_width"))
    got = tuple(int(m.group(1)) if m else None for m in (version, regs, width))
    r.add("main.detect", bool(drv) and "PMU driver" in drv.group(1) and got == want
          and "perf_read_msr" in text,
          f"driver '{drv.group(1) if drv else None}', (version, counters, width) {got}, "
          f"model {want}")
    tsc_khz = float(f.get("tsc_khz", 0) or 0)

    out, rc = g.step("stat")
    rows = perf_csv(out or [])
    cyc = perf_row(rows, "cycles")
    clk = perf_row(rows, "task-clock")
    sf = facts(out or [])
    if cyc and clk and cyc[0] and clk[0] and tsc_khz:
        # perf's task-clock is the task's time on its (virtual) CPU, steal
        # included; the host's share of it is in /proc/stat's steal column,
        # as busy read it over its own run (one CPU: the machine's line is
        # that CPU's), else right before and after perf stat.
        steal = (busy_line(out or []) or {}).get("steal")
        if steal is None:
            steal = steal_fraction(sf)
        if steal is None:
            r.add("main.stat-cycles", False, f"no /proc/stat steal figures: {sf}")
        else:
            run_ms = clk[0] * (1 - steal)
            ratio = cyc[0] / (run_ms * tsc_khz)  # ms x kHz = cycles
            r.add("main.stat-cycles", rc == 0 and abs(ratio - 1) <= 0.10,
                  f"{cyc[0]:.0f} cycles over {clk[0]:.1f} ms task-clock less "
                  f"{steal * 100:.1f}% steal ({run_ms:.1f} ms run time) at "
                  f"{tsc_khz:.0f} kHz: ratio {ratio:.3f} (within 10%)")
    else:
        r.add("main.stat-cycles", False, f"perf stat gave no cycles/task-clock: {rows}")

    out, rc = g.step("unbacked")
    rows = perf_csv(out or [])
    ins = perf_row(rows, "instructions")
    cyc = perf_row(rows, "cycles")
    host = [c for c in counters(g.snapshots.get("unbacked END")) if event_of(c) == 0xC0]
    reasons = [c["backing"].get("reason", "") for c in host if c["backing"]["kind"] == "unbacked"]
    # AMD has no way to tell the guest an event is unavailable: perf shows 0
    # there (never a made-up count), and the host export says why.
    shown = ins[1] if ins else None
    honest = ins is not None and (ins[0] is None or ins[0] == 0)
    r.add("main.unbacked", honest and bool(cyc and cyc[0]) and bool(reasons),
          f"perf: instructions '{shown}', cycles {cyc[1] if cyc else None}; host: "
          f"{'unbacked: ' + reasons[0] if reasons else 'no unbacked instructions counter'}")

    out, rc = g.step("privilege")
    rows = {x[2]: x for x in perf_csv(out or [])}
    host = counters(g.snapshots.get("privilege END"))
    filtered = [c for c in host if event_of(c) == AMD_CYCLES
                and bool(select_of(c) & USR) != bool(select_of(c) & OS)]
    flagged = [c for c in filtered if c["backing"]["kind"] == "unbacked"
               and "user from kernel" in c["backing"].get("reason", "")]
    u, k, both = rows.get("cycles:u"), rows.get("cycles:k"), rows.get("cycles")
    r.add("main.privilege", bool(u and k and both) and (u[0] or 0) == 0 and (k[0] or 0) == 0
          and (both[0] or 0) > 0 and len(filtered) == 2 and len(flagged) == 2,
          f"perf: cycles:u '{u[1] if u else None}', cycles:k '{k[1] if k else None}', "
          f"cycles '{both[1] if both else None}'; host flags {len(flagged)} of "
          f"{len(filtered)} filtered counters as unbacked")

    out, rc = g.step("record")
    judge_record(out or [], rc, tsc_khz, r)
    judge_profile(out or [], g.profile, r)

    out, rc = g.step("multiplex")
    rows = [x for x in perf_csv(out or []) if x[2] == "cycles"]
    vals = [x[0] for x in rows if x[0]]
    pcts = [x[4] for x in rows if x[4] is not None]
    if len(vals) == 8 and pcts:
        mean = sum(vals) / len(vals)
        spread = max(abs(v - mean) / mean for v in vals)
        r.add("main.multiplex", rc == 0 and max(pcts) < 100 and spread <= 0.15,
              f"8 cycles events on 6 counters: running {min(pcts):.0f}-{max(pcts):.0f}% "
              f"of enabled, scaled counts within {spread * 100:.1f}% of their mean (15%)")
    else:
        r.add("main.multiplex", False, f"expected 8 scaled cycles counts: {rows}")

    out, rc = g.step("api")
    rows = perf_csv(out or [])
    cyc = perf_row(rows, "cycles")
    live = [c for s in g.during.get("api", []) for c in counters(s)
            if c.get("running") and event_of(c) == AMD_CYCLES]
    r.add("main.api-live", bool(live),
          f"{len(g.during.get('api', []))} reads of GET /vpmu during perf stat, "
          f"{len(live)} showed a running cycles counter"
          + (f" (select {select_of(live[0]):#x}, backing {live[0]['backing']['kind']})"
             if live else ""))
    pid = (0x76 | USR | OS)
    before = total_for(g.snapshots.get("api BEGIN"), pid)
    after = total_for(g.snapshots.get("api END"), pid)
    host_count = after - before
    if cyc and cyc[0]:
        r.add("main.api-count", within(host_count, cyc[0], 0.05),
              f"perf {cyc[0]:.0f} cycles, host total for programming {pid:#x} grew by "
              f"{host_count} ({(host_count / cyc[0] - 1) * 100:+.2f}%, within 5%)")
    else:
        r.add("main.api-count", False, f"perf stat gave no cycles count: {rows}")

    out, rc = g.step("watchdog")
    f = facts(out or [])
    try:
        before, after = int(f["pmi_before"]), int(f["pmi_after"])
    except (KeyError, ValueError):
        before = after = None
    host = counters(g.snapshots.get("watchdog END"))
    wd = [c for c in host if c.get("running") and event_of(c) == AMD_CYCLES and c.get("pmis", 0) > 0]
    enabled = "NMI watchdog: Enabled" in "\n".join(out or [])
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


def judge_record(out, rc, tsc_khz, r):
    text = "\n".join(out)
    f = facts(out)
    busy = busy_line(out)
    samples = re.search(r"# Samples: (\d+)", text)
    period = int(f.get("period", 0) or 0)
    if rc != 0 or not samples or not busy or not period:
        r.add("main.record-samples", False, f"perf record/report failed (rc {rc}): {text[-300:]}")
        r.add("main.record-modes", False, "no report")
        r.add("main.record-symbol", False, "no report")
        return
    n = int(samples.group(1))
    # perf samples the whole task, from exec on: its run time is the user
    # and system time the kernel accounted to it.
    run_ms = busy["user_ms"] + busy["sys_ms"]
    expect = run_ms * tsc_khz / period
    r.add("main.record-samples", within(n, expect, 0.30),
          f"{n} samples, expected {expect:.0f} ({run_ms} ms of run time x TSC / period "
          f"{period}), within 30%")
    kernel = user = 0.0
    for line in out:
        m = re.match(r"^\s*([\d.]+)%\s+\d+\s+(\S+)", line)
        if m:
            if m.group(2) == "[kernel.kallsyms]":
                kernel += float(m.group(1))
            elif m.group(2) == "busy":
                user += float(m.group(1))
    sys_pct = 100.0 * busy["sys_ms"] / max(1, busy["user_ms"] + busy["sys_ms"])
    r.add("main.record-modes", kernel + user > 0 and abs(kernel - sys_pct) <= 15,
          f"samples {kernel:.1f}% kernel / {user:.1f}% user; busy's own time "
          f"{sys_pct:.1f}% system (user {busy['user_ms']} ms, sys {busy['sys_ms']} ms), "
          f"within 15 points")
    top = None
    after = text.split("top-user-symbols:", 1)[-1]
    m = re.search(r"^\s*[\d.]+%\s+\[\.\]\s+(\S+)", after, re.M)
    if m:
        top = m.group(1)
    r.add("main.record-symbol", top == "spin_user", f"top user-mode symbol: {top}")


def folded_stacks(text):
    """Folded stacks: [(frames outermost first, count)]."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


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
    host_top = [name for name, _ in sorted(leaves.items(), key=lambda x: -x[1])[:10]]
    guest_kernel = perf_symbols(out, "top-kernel-symbols")
    want = guest_kernel[0][1] if guest_kernel else None
    rank = host_top.index(want) + 1 if want in host_top else None
    r.add("main.profile-kernel", total > 0 and rank is not None and rank <= 5,
          f"guest perf's top kernel symbol {want} is #{rank} of the host profile's kernel "
          f"symbols (top 5 wanted; host top: {', '.join(host_top[:5])}; {total} samples)")
    kernel_pct = user_pct = 0.0
    for line in out:
        m = re.match(r"^\s*([\d.]+)%\s+\d+\s+(\S+)", line)
        if m and m.group(2) == "[kernel.kallsyms]":
            kernel_pct += float(m.group(1))
        elif m and m.group(2) == "busy":
            user_pct += float(m.group(1))
    host_user = 100.0 * user / max(1, total)
    guest_user = 100.0 * user_pct / max(1e-9, user_pct + kernel_pct)
    r.add("main.profile-user", total > 0 and abs(host_user - guest_user) <= 20,
          f"host profile {host_user:.1f}% [user] ({user} of {total} samples), guest perf "
          f"{guest_user:.1f}% user (busy's dso), within 20 points")


def judge_off(g, r):
    out, rc = g.step("nopmu")
    if out is None:
        r.skip("off.no-pmu", "the guest never ran the step")
        return
    text = "\n".join(out)
    rows = perf_csv(out)
    cyc = perf_row(rows, "cycles")
    # "no PMU driver, software events only." or, as a guest (CPUID's
    # hypervisor bit), "PMU not available due to virtualization, using
    # software events only."
    r.add("off.no-pmu", "software events only" in text and bool(cyc)
          and cyc[1] == "<not supported>",
          f"driver line '{(re.search(r'Performance Events: (.*)', text) or [None, None])[1]}', "
          f"perf stat cycles '{cyc[1] if cyc else None}'")


def judge_deny(g, r):
    out, rc = g.step("deny")
    if out is None:
        r.skip("deny.cycles", "the guest never ran the step")
        return
    rows = perf_csv(out)
    cyc = perf_row(rows, "cycles")
    host = [c for c in counters(g.snapshots.get("deny END")) if event_of(c) == AMD_CYCLES]
    denied = [c for c in host if c["backing"]["kind"] == "denied"]
    opens = re.search(r"(\d+) perf_event_open", g.vmm_stderr())
    r.add("deny.cycles", bool(cyc) and (cyc[0] or 0) == 0 and bool(denied)
          and opens is not None and int(opens.group(1)) == 0,
          f"perf stat cycles '{cyc[1] if cyc else None}'; host: {len(denied)} counter(s) "
          f"denied, {opens.group(1) if opens else '?'} perf_event_open")


def judge_smp(g, r):
    """The 2-vCPU guest: CPUs up, perf -a / per CPU / record -a, migration."""
    out, rc = g.step("cpus")
    if out is None:
        for name in ["cpus", "stat-all", "per-cpu", "record-all", "migrate", "migrate-opens",
                     "vcpu-totals"]:
            r.skip(f"smp.{name}", "the guest never ran the step")
        return
    f = facts(out)
    r.add("smp.cpus", f.get("nproc") == "2" and f.get("online") == "0-1",
          f"nproc {f.get('nproc')}, online {f.get('online')}")
    tsc_khz = float(f.get("tsc_khz", 0) or 0)

    # Each window: a shell under perf that has perf enable its events, reads
    # the ticks, sleeps, reads them again and has perf disable its events,
    # with spinners keeping the busy CPUs busy throughout; a CPU's run time
    # while perf counted is perf's enabled time times the CPU's run share
    # between the tick readings (steal and idle left out).
    out, rc = g.step("stat-all")
    out = out or []
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
        r.add("smp.stat-all", abs(ratio / expect - 1) <= 0.15,
              f"perf stat -a: {two[0]:.0f} cycles with both CPUs busy, {one[0]:.0f} with one: "
              f"ratio {ratio:.2f}; the CPUs' run time in the windows {run2:.2f} s vs "
              f"{run1:.2f} s: ratio {expect:.2f} (counts' ratio within 15% of it; 2 when no "
              f"CPU loses time to steal); vs run time x TSC: "
              f"{one[0] / (run1 * hz) - 1:+.1%} / {two[0] / (run2 * hz) - 1:+.1%}")
    else:
        r.add("smp.stat-all", False, f"no perf stat -a cycles counts or tick readings: {out}")
    per_lines = section(out, "perf-stat-per-cpu:")
    cpus = per_cpu_csv(per_lines, "cycles")
    shares = run_shares(per_lines)
    if len(cpus) == 2 and len(shares) == 2 and hz:
        errs = {c: cpus[c][0] / (cpus[c][1] / 1e9 * shares[c] * hz) - 1
                for c in sorted(cpus) if cpus[c][1] and shares.get(c)}
        r.add("smp.per-cpu", len(errs) == 2 and all(abs(e) <= 0.15 for e in errs.values()),
              "perf stat -a -A: " + ", ".join(
                  f"CPU{c} {cpus[c][0]:.0f} cycles over {cpus[c][1] / 1e9:.2f} s x "
                  f"{shares.get(c, 0):.1%} run: {errs.get(c, float('nan')):+.1%}"
                  for c in sorted(cpus)) + " (each within 15% of run time x TSC)")
    else:
        r.add("smp.per-cpu", False, f"expected 2 CPU rows and tick readings: {cpus}, {shares}")

    out, rc = g.step("record-all")
    out = out or []
    text = "\n".join(out)
    period = int(facts(out).get("period", 0) or 0)
    samples = {int(m.group(2)): int(m.group(1)) for m in
               re.finditer(r"^\s*[\d.]+%\s+(\d+)\s+0*(\d+)\s*$", text, re.M)}
    times = [float(x) for x in
             re.findall(r"^# time of (?:first|last) sample : ([\d.]+)", text, re.M)]
    shares = run_shares(out)
    if rc == 0 and period and len(times) == 2 and len(shares) == 2 and hz:
        span = times[1] - times[0]
        expect = {c: span * shares[c] * hz / period for c in sorted(shares)}
        ok = len(samples) == 2 and all(within(samples.get(c, 0), e, 0.30)
                                       for c, e in expect.items())
        r.add("smp.record-all", ok,
              f"perf record -a -c {period}: samples by CPU {samples} over {span:.2f} s "
              f"(first to last sample); expected "
              f"{ {c: round(e) for c, e in expect.items()} } (span x run share x TSC / period), "
              f"each within 30%")
    else:
        r.add("smp.record-all", False, f"perf record -a/report failed (rc {rc}): {text[-300:]}")

    out, rc = g.step("migrate")
    out = out or []
    f = facts(out)
    rows = perf_csv(out)
    cyc, clk = perf_row(rows, "cycles"), perf_row(rows, "task-clock")
    m = re.search(r"migrate: moves=(\d+) cpus_seen=([\d ]*)", "\n".join(out))
    moves = int(m.group(1)) if m else 0
    seen = set(m.group(2).split()) if m else set()
    steal = steal_fraction(f)
    if cyc and clk and cyc[0] and clk[0] and tsc_khz and steal is not None:
        # The task's run time: its task clock less the steal share, as in
        # main.stat-cycles.
        task_ms = clk[0] * (1 - steal)
        ratio = cyc[0] / (task_ms * tsc_khz)
        r.add("smp.migrate", rc == 0 and moves >= 10 and seen == {"0", "1"}
              and abs(ratio - 1) <= 0.10,
              f"{moves} taskset moves, ran on CPUs {sorted(seen)}: perf {cyc[0]:.0f} cycles "
              f"over {clk[0]:.0f} ms task-clock less {steal * 100:.1f}% steal, "
              f"ratio {ratio:.3f} (within 10%)")
    else:
        r.add("smp.migrate", False, f"no cycles/task-clock count or steal figures: {out}")
    b, e = g.snapshots.get("migrate BEGIN"), g.snapshots.get("migrate END")
    pid = (AMD_CYCLES | USR | OS)
    if b and e:
        opens = stats_sum(e, "opens") - stats_sum(b, "opens")
        progs = stats_sum(e, "reprograms") - stats_sum(b, "reprograms")
        grew = {v: vcpu_total(e, pid, v) - vcpu_total(b, pid, v) for v in (0, 1)}
        r.add("smp.migrate-opens", opens <= progs and min(grew.values()) > 0 and moves >= 10,
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


def judge_run(g, r):
    """The run itself: /init ran, every step ended, the VMM ended by the reboot."""
    text = g.text()
    done = re.search(r"VMM-GUEST-DONE rc=(\d+)", text)
    r.add(f"{g.name}.run", g.rc == 0 and done is not None,
          f"vmm exit {g.rc} after {g.elapsed:.0f} s; /init "
          + (f"finished, perf-checks rc={done.group(1)}" if done else "did not finish"))


# ------------------------------------------------------------------- bench --
def vpmu_totals(snapshot):
    """Sums over the vCPUs of (PMIs, PMU MSR exits, overflow signals)."""
    pmis = msrs = signals = 0
    for v in (snapshot or {}).get("vcpus", []):
        st = v["vpmu"]["stats"]
        pmis += st["pmis"]
        msrs += sum(st["rdmsr"].values()) + sum(st["wrmsr"].values())
        signals += st["overflow_signals"]
    return pmis, msrs, signals


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
    for m in re.finditer(r"VMM-BENCH BEGIN round=(\d+) mode=(\w+)\r?\n(.*?)VMM-BENCH END", text, re.S):
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


# -------------------------------------------------------------------- main --
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vmm", default=os.environ.get("VMM", os.path.join(REPO, "target/release/vmm")))
    p.add_argument("--out", default=os.path.join(HERE, "out"))
    p.add_argument("--timeout", type=int, default=int(os.environ.get("ACCEPT_TIMEOUT", 1800)),
                   help="seconds each guest may run (vmm --timeout)")
    p.add_argument("--memory", type=int, default=512)
    p.add_argument("--only", default="main,off,deny,smp",
                   help="which runs (main,off,deny,smp)")
    p.add_argument("--sequential", action="store_true", help="one guest at a time")
    p.add_argument("--keep", help="keep serial logs and VMM output in this directory")
    p.add_argument("--json", help="also write the table as JSON to this file")
    p.add_argument("--bench", action="store_true",
                   help="run the benchmark guest instead of the checks")
    p.add_argument("--cmdline", default="",
                   help="more kernel parameters (e.g. VMM_BENCH_ROUNDS=2, passed to "
                        "/init's environment)")
    args = p.parse_args()

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("acceptance: CANNOT RUN HERE: /dev/kvm is missing or not usable")
        return 6
    for f in ["vmlinux", "initramfs.cpio", "cmdline"]:
        if not os.path.exists(os.path.join(args.out, f)):
            print(f"acceptance: SETUP ERROR: {args.out}/{f} missing (run build.sh)")
            return 2
    if not os.access(args.vmm, os.X_OK):
        print(f"acceptance: SETUP ERROR: no vmm at {args.vmm}")
        return 2
    runs = [x for x in args.only.split(",") if x]
    if not runs or any(x not in ("main", "off", "deny", "smp") for x in runs):
        print("acceptance: SETUP ERROR: --only takes main,off,deny,smp")
        return 2
    if args.bench:
        runs = ["bench"]

    workdir = args.keep or tempfile.mkdtemp(prefix="vmm-accept-")
    os.makedirs(workdir, exist_ok=True)
    steps = {"main": ["detect", "stat", "unbacked", "privilege", "record", "multiplex", "api",
                      "watchdog"],
             "off": ["nopmu"], "deny": ["deny"], "bench": ["bench"],
             "smp": ["cpus", "stat-all", "record-all", "migrate"]}
    guests = [Guest(n, args, steps[n], workdir, args.timeout, args.cmdline, args.vmm)
              for n in runs]
    t0 = time.monotonic()
    # The 2-vCPU guest boots once the short guests (off, deny) have ended:
    # its system-wide windows hold counts against each CPU's run share,
    # which heavy, changing steal from five vCPUs on two cores blurs.
    later = [g for g in guests if g.name == "smp"]
    short = [g for g in guests if g.name in ("off", "deny")]
    for g in [g for g in guests if g not in later] + later:
        if g in later and not args.sequential:
            for s in short:
                s.wait()
        print(f"acceptance: booting '{g.name}' (perf-checks {' '.join(steps[g.name])})", flush=True)
        g.start()
        if args.sequential:
            g.wait()
    for g in guests:
        g.wait()

    if args.bench:
        g = guests[0]
        lines, runs = bench_report(g)
        print(f"acceptance: bench guest ended with vmm exit {g.rc} after {g.elapsed:.0f} s; "
              f"logs in {workdir}")
        for line in lines:
            print("  " + line)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"figures": lines, "runs": runs}, f, indent=1)
        return 0 if g.rc == 0 and "plain" in runs else 1

    r = Report()
    for g in guests:
        judge_run(g, r)
        {"main": judge_main, "off": judge_off, "deny": judge_deny,
         "smp": judge_smp}[g.name](g, r)
    print(f"acceptance: {len(guests)} guest(s) in {time.monotonic() - t0:.0f} s; "
          f"logs in {workdir}")
    r.print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": r.rows, "workdir": workdir}, f, indent=1)
    if not any("VMM-GUEST-START" in g.text() for g in guests):
        tail = "\n".join(guests[0].text().splitlines()[-10:])
        print(f"acceptance: CANNOT RUN HERE: Linux did not reach /init; last serial lines:\n{tail}")
        return 5
    print("acceptance: PASS" if r.ok() else "acceptance: FAIL")
    return 0 if r.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
