"""Running the acceptance's guests: one `vmm run` each, its serial log
followed as it grows, GET /vpmu read at perf-checks' step markers (and all
through the step a guest reads live), and a host-side `vmm profile` during
the step a guest profiles. What it gathers is judged by acc_checks.py.
Standard library only.
"""

import json
import os
import socket
import subprocess
import threading
import time

from acc_parsers import step_marker, step_output

# The host-side profile of the profiled step (main's record): from this long
# after busy says it started (under perf record: 3 s of its CPU time, about
# 3.5 s here) for this long, at this rate per second of vCPU time.
PROFILE_DELAY_S = 0.2
PROFILE_SECONDS = 2.5
PROFILE_HZ = 199


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
    """One `vmm run` of the guest, its serial log read as it grows.

    name: the guest's kind (acc_checks.GUESTS); flags: its extra `vmm run`
    flags; steps: the perf-checks steps it runs; live_step: the step during
    which GET /vpmu is read over and over (self.during); profile_step: the
    step during whose workload `vmm profile` runs (self.profile).
    """

    def __init__(self, name, flags, steps, out, memory, workdir, timeout, extra_cmdline,
                 env_vmm, live_step=None, profile_step=None):
        self.name = name
        self.steps = list(steps)
        self.serial = os.path.join(workdir, f"{name}.serial")
        self.stderr_path = os.path.join(workdir, f"{name}.vmm")
        self.socket = os.path.join(workdir, f"{name}.sock")
        with open(os.path.join(out, "cmdline")) as f:
            cmdline = f.read().strip()
        cmdline += f' vmm.cmd="perf-checks {" ".join(steps)}"'
        if extra_cmdline:
            cmdline += " " + extra_cmdline
        self.argv = [env_vmm, "run",
                     "--kernel", os.path.join(out, "vmlinux"),
                     "--initrd", os.path.join(out, "initramfs.cpio"),
                     "--memory", str(memory),
                     "--serial", f"file:{self.serial}",
                     "--api-socket", self.socket,
                     "--timeout", str(timeout),
                     "--cmdline", cmdline] + list(flags)
        self.timeout = timeout
        self.live_step = live_step
        self.profile_step = profile_step
        self.snapshots = {}  # "step BEGIN|END" -> GET /vpmu
        self.sched = {}      # "step BEGIN|END" -> vcpu_sched(): the host's truth
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

    def vcpu_sched(self):
        """{thread id: [run ns, runnable-but-waiting ns]} of the VMM's vCPU
        threads, from the host's /proc/PID/task/TID/schedstat: how long each
        ran and how long the host kept it waiting (its steal), or None."""
        out = {}
        try:
            for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                base = f"/proc/{self.proc.pid}/task/{tid}"
                if not open(f"{base}/comm").read().startswith("vcpu"):
                    continue
                run, wait = open(f"{base}/schedstat").read().split()[:2]
                out[tid] = [int(run), int(wait)]
        except (OSError, ValueError):
            return None
        return out or None

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
                marker = step_marker(line)
                if marker:
                    step, edge = marker
                    self.snapshots[f"{step} {edge}"] = api_get(self.socket, "/vpmu")
                    self.sched[f"{step} {edge}"] = self.vcpu_sched()
                    running_step = step if edge == "BEGIN" else None
                if (running_step is not None and running_step == self.profile_step
                        and line.startswith("busy: start") and not self.profile_thread):
                    self.profile_thread = threading.Thread(target=self.take_profile,
                                                           daemon=True)
                    self.profile_thread.start()
            seen += cut
            if running_step is not None and running_step == self.live_step:
                snap = api_get(self.socket, "/vpmu")
                if snap:
                    self.during.setdefault(running_step, []).append(snap)
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
        """vmm profile of the profiled step, as folded stacks."""
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
            with open(self.serial, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def vmm_stderr(self):
        try:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def step(self, name):
        """(output lines of the step, its rc) or (None, None) if it never ended."""
        if name not in self.steps:
            raise ValueError(f"guest '{self.name}' runs no step '{name}' ({self.steps})")
        return step_output(self.text(), name)
