"""Running the acceptance's guests. Each guest boots once to its shell
(`vmm.cmd=true vmm.exit=shell`) and is snapshotted there, or is restored
from such a snapshot of an earlier run (--snapshots): then its perf-checks
steps are typed at the shell. Its serial console (the VMM's stdin and
stdout) is followed as it grows, GET /vpmu read at perf-checks' step
markers (and all through the step a guest reads live), `vmm profile` run
during the step a guest profiles, and in the restore step the VM is
snapshotted mid-work and continued in a new VMM from that snapshot. What it
gathers is judged by acc_checks.py. Standard library only.
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
# The restore step: after RESTORE-WORK-START the work runs this long, then
# the VM is snapshotted, its VMM ended, and a new VMM restores it after this
# long stopped (about 25 G cycles at 2.5 GHz that no count may include).
SPAN_BEFORE_S = 2.0
SPAN_STOPPED_S = 10.0
# What the shell prints once it reads commands; the answer to READY_ASK.
SHELL_UP = "init: vmm.exit=shell"
READY_ASK = "echo READY-$((6*7))"
READY = "READY-42"


def vcpu_threads(pid):
    """(thread id, its /proc directory) of each vCPU thread of VMM `pid`;
    raises OSError if the VMM is gone."""
    tasks = f"/proc/{pid}/task"
    for tid in os.listdir(tasks):
        base = f"{tasks}/{tid}"
        with open(f"{base}/comm") as f:
            if f.read().startswith("vcpu"):
                yield tid, base


def vcpu_stats(pid):
    """Each vCPU thread's /proc stat fields after its command name (so
    utime is [11], stime [12], guest_time [40]); raises OSError if the VMM
    is gone."""
    for _, base in vcpu_threads(pid):
        with open(f"{base}/stat") as f:
            yield f.read().rsplit(")", 1)[1].split()


def api_request(sock_path, method, path, body=None, timeout=5.0):
    """One request on the VMM's Unix socket (`body`: a JSON document):
    (status, answer body bytes); raises OSError or ValueError."""
    data = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall((head + "\r\n").encode() + data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    status_line, _, answer = reply.partition(b"\r\n\r\n")
    status = int(status_line.split(b" ", 2)[1]) if status_line.startswith(b"HTTP/1.1 ") else 0
    return status, answer


def api_get(sock_path, path, timeout=5.0):
    """GET path on the VMM's Unix socket; the decoded JSON, or None."""
    try:
        status, answer = api_request(sock_path, "GET", path, timeout=timeout)
        return json.loads(answer) if status == 200 else None
    except (OSError, ValueError, IndexError):
        return None


def api_put(sock_path, path, body, timeout=600.0):
    """PUT body (JSON) to path on the VMM's Unix socket: (status, text)."""
    try:
        status, answer = api_request(sock_path, "PUT", path, body, timeout)
        return status, answer.decode(errors="replace")
    except (OSError, ValueError, IndexError) as e:
        return 0, str(e)


class Guest:
    """One guest of the acceptance: booted to its shell and snapshotted (or
    restored from such a snapshot), its steps typed at the shell, its serial
    console followed.

    name: the guest's kind (acc_checks.GUESTS); flags: its extra `vmm run`
    flags; steps: the perf-checks steps it runs; live_step: the step during
    which GET /vpmu is read over and over (self.during); profile_step: the
    step during whose workload `vmm profile` runs (self.profile);
    restore_step: the step whose work is snapshotted and continued in a new
    VMM (self.span); snapshots: where the boot snapshot is kept
    (`<name>.snap`, with the boot's serial log `<name>.boot.serial`): one
    there from an earlier run is restored instead of booting.
    """

    def __init__(self, name, flags, steps, out, memory, workdir, timeout, extra_cmdline,
                 env_vmm, live_step=None, profile_step=None, restore_step=None, snapshots=None,
                 env=None):
        self.name = name
        self.steps = list(steps)
        self.serial = os.path.join(workdir, f"{name}.serial")
        self.parts = [self.serial]  # serial logs, in order: one per VMM
        self.stderr_path = os.path.join(workdir, f"{name}.vmm")
        self.socket = os.path.join(workdir, f"{name}.sock")
        snapshots = snapshots or workdir
        self.boot_snapshot = os.path.join(snapshots, f"{name}.snap")
        self.boot_log = os.path.join(snapshots, f"{name}.boot.serial")
        with open(os.path.join(out, "cmdline")) as f:
            cmdline = f.read().strip()
        cmdline += " vmm.cmd=true vmm.exit=shell"
        if extra_cmdline:
            cmdline += " " + extra_cmdline
        # What is typed at the shell: the steps (with `env`'s variables),
        # the done marker, the end.
        assigns = "".join(f"{k}={v} " for k, v in (env or {}).items())
        self.command = (f"{assigns}perf-checks {' '.join(steps)}; "
                        "echo \"VMM-CHECKS-DONE rc=$?\"; reboot -f")
        self.host_flags = ["--serial", "stdio", "--api-socket", self.socket,
                           "--timeout", str(timeout)]
        # The image a boot snapshot holds in its memory, and the machine it
        # keeps (what it is reused for).
        self.image = [os.path.join(out, f) for f in ("vmlinux", "initramfs.cpio", "cmdline")]
        self.machine = ["--kernel", self.image[0], "--initrd", self.image[1],
                        "--memory", str(memory),
                        "--cmdline", cmdline] + list(flags)
        self.argv = [env_vmm, "run", *self.host_flags, *self.machine]
        self.timeout = timeout
        self.live_step = live_step
        self.profile_step = profile_step
        self.restore_step = restore_step
        self.snapshots = {}  # "step BEGIN|END" -> GET /vpmu
        self.sched = {}      # "step BEGIN|END" -> vcpu_sched(): the host's truth
        self.bench = []      # (marker line, GET /vpmu, vCPU thread ms)
        self.init_after = None  # host seconds until /init printed its start
        self.during = {}     # step -> [GET /vpmu while it ran]
        self.booted = None   # True: booted here; False: restored from an earlier snapshot
        self.ready_after = None  # host seconds until the shell answered
        self.span = {}       # the restore step: GET /vpmu around it, times, failures
        self.rc = None
        self.elapsed = None
        self.proc = None
        self.thread = None
        self.vmm = env_vmm
        self.workdir = workdir
        self.profile = None  # (vmm profile's exit code, stderr, folded stacks)
        self.profile_thread = None
        self.error = None    # why the run stopped short, if it did
        self._seen = 0
        self._running_step = None
        self._span_due = False

    def thread_ms(self):
        """(user, system) CPU ms of the VMM's vCPU threads, from /proc."""
        user = system = 0
        tick = os.sysconf("SC_CLK_TCK")
        try:
            for fields in vcpu_stats(self.proc.pid):
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
            for tid, base in vcpu_threads(self.proc.pid):
                run, wait = open(f"{base}/schedstat").read().split()[:2]
                out[tid] = [int(run), int(wait)]
        except (OSError, ValueError):
            return None
        return out or None

    # ------------------------------------------------------------ VMMs --
    def launch(self, argv, part):
        """Starts one VMM with its console on `part` (appended to the parts)."""
        if part != self.parts[-1]:
            self.parts.append(part)
        self._seen = 0
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                     stdout=open(part, "wb"),
                                     stderr=open(self.stderr_path, "a"))

    def restore_argv(self, snapshot):
        return [self.vmm, "run", "--restore", snapshot, *self.host_flags]

    def send(self, line):
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def start(self):
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def reusable(self):
        """Whether the boot snapshot an earlier run left is of this machine
        and image: the same machine flags (kept beside it), and newer than
        the kernel, initramfs and command line it booted (the guest's memory
        holds the image it booted, perf-checks included)."""
        try:
            with open(self.boot_snapshot + ".argv") as f:
                same = json.load(f) == self.machine
            taken = os.path.getmtime(self.boot_snapshot)
            return same and os.path.exists(self.boot_log) and \
                all(os.path.getmtime(p) < taken for p in self.image)
        except (OSError, ValueError):
            return False

    def run(self):
        """Boot or restore, the shell's answer, the command, then follow."""
        self.booted = not self.reusable()
        if not self.booted:
            self.parts = [self.boot_log, self.serial]
            self.launch(self.restore_argv(self.boot_snapshot), self.serial)
            self.send(READY_ASK)
        else:
            self.launch(self.argv, self.serial)
            if self.follow(lambda line: line.startswith(SHELL_UP)):
                self.send(READY_ASK)
        if not self.follow(lambda line: line.startswith(READY)):
            self.error = self.error or "the shell never answered"
            return self.finish()
        self.ready_after = time.monotonic() - self.started
        if self.booted:
            status, text = api_put(self.socket, "/vm/snapshot",
                                   {"path": self.boot_snapshot, "resume": True,
                                    "overwrite": True})
            if status == 200:
                with open(self.serial, "rb") as src, open(self.boot_log, "wb") as dst:
                    dst.write(src.read())
                with open(self.boot_snapshot + ".argv", "w") as f:
                    json.dump(self.machine, f)
            else:
                self.error = f"the boot snapshot failed: {status} {text}"
        self.send(self.command)
        self.follow(lambda line: False)
        self.finish()

    def finish(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.rc = self.proc.returncode
        self.elapsed = time.monotonic() - self.started

    def follow(self, until):
        """Follow the console, reading the API at step markers, until a line
        satisfies `until` (True), the VMM ends or the time is up (False)."""
        deadline = self.started + self.timeout + 60
        while True:
            done = self.proc.poll() is not None
            for line in self.new_lines():
                self.on_line(line)
                if until(line):
                    return True
            if self._span_due:
                self._span_due = False
                self.span_restore()
                continue
            if self._running_step is not None and self._running_step == self.live_step:
                snap = api_get(self.socket, "/vpmu")
                if snap:
                    self.during.setdefault(self._running_step, []).append(snap)
            if done:
                return False
            if time.monotonic() > deadline:
                self.error = f"no end within {self.timeout + 60} s"
                return False
            time.sleep(0.3)

    def new_lines(self):
        """The whole lines the current VMM's console printed since last asked."""
        try:
            with open(self.parts[-1], "rb") as f:
                f.seek(self._seen)
                data = f.read()
        except FileNotFoundError:
            return []
        cut = data.rfind(b"\n") + 1
        self._seen += cut
        return data[:cut].decode("utf-8", "replace").splitlines()

    def on_line(self, line):
        if self.init_after is None and "VMM-GUEST-START" in line:
            self.init_after = time.monotonic() - self.started
        if line.startswith("VMM-BENCH "):
            self.bench.append((line.strip(), api_get(self.socket, "/vpmu"), self.thread_ms()))
        marker = step_marker(line)
        if marker:
            step, edge = marker
            self.snapshots[f"{step} {edge}"] = api_get(self.socket, "/vpmu")
            self.sched[f"{step} {edge}"] = self.vcpu_sched()
            self._running_step = step if edge == "BEGIN" else None
        running = self._running_step
        # The host's truth over the workload itself (busy prints a line as
        # it starts and one as it ends), not the whole step with perf's
        # start-up: what the host took from the vCPUs then.
        if running is not None and line.startswith("busy: "):
            edge = "busy-start" if line.startswith("busy: start") else "busy-end"
            self.sched.setdefault(f"{running} {edge}", self.vcpu_sched())
        if (running is not None and running == self.profile_step
                and line.startswith("busy: start") and not self.profile_thread):
            self.profile_thread = threading.Thread(target=self.take_profile, daemon=True)
            self.profile_thread.start()
        if running is not None and running == self.restore_step \
                and line.strip() == "RESTORE-WORK-START" and not self.span:
            self._span_due = True

    def span_restore(self):
        """The restore step: let the work run, snapshot the VM, end its VMM,
        wait, and continue it from the snapshot in a new VMM."""
        span = self.span
        span["at_start"] = api_get(self.socket, "/vpmu")
        time.sleep(SPAN_BEFORE_S)
        span["at_snapshot"] = api_get(self.socket, "/vpmu")
        path = os.path.join(self.workdir, f"{self.name}.span.snap")
        status, text = api_put(self.socket, "/vm/snapshot", {"path": path, "resume": False})
        span["snapshot"] = (status, text)
        if status != 200:
            return
        self.proc.kill()
        self.proc.wait()
        time.sleep(SPAN_STOPPED_S)
        span["stopped_s"] = SPAN_STOPPED_S
        part = os.path.join(self.workdir, f"{self.name}.serial.restored")
        self.launch(self.restore_argv(path), part)
        for _ in range(100):
            doc = api_get(self.socket, "/vpmu")
            if doc:
                span["at_restore"] = doc
                break
            time.sleep(0.1)

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
        """Everything the guest printed: each VMM's console in order."""
        text = ""
        for part in self.parts:
            try:
                with open(part, encoding="utf-8", errors="replace") as f:
                    text += f.read()
            except FileNotFoundError:
                pass
        return text

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
