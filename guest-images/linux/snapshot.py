#!/usr/bin/env python3
"""Boot the Linux + perf guest once, snapshot it at its shell, and run any
number of experiments from restores of that snapshot.

    guest-images/linux/snapshot.py boot SNAP [-- VMM-RUN-FLAGS...]
    guest-images/linux/snapshot.py run SNAP 'perf stat -e cycles -- /bin/busy 1'

`boot` boots guest-images/linux/out (build.sh) with its command line plus
`vmm.cmd=true vmm.exit=shell`, waits for the shell to answer, writes SNAP
with `vmm snapshot` and ends that VMM. Extra flags go to `vmm run` (for
example `--vcpus 2`, `--cpu-vendor intel`, `--vpmu off`): they are part of
the machine the snapshot keeps.

`run` restores SNAP in a fresh VMM (the snapshot is mapped copy-on-write and
never changed, so runs can go side by side), types the command into the
restored shell, prints what it printed, and exits with its exit status. The
VMM's own lines go to stderr: its `restored from SNAP in N ms`, and its vPMU
summary (host events opened, PMIs delivered) when the guest reboots.

Times are printed on stderr: boot to the shell, restore to the shell's
answer, and the command.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BEGIN = re.compile(r"^VMM-RUN-42-BEGIN$")
DONE = re.compile(r"^VMM-RUN-42-DONE rc=(\d+)$")


class Guest:
    """A `vmm run` whose serial console is its stdin and stdout."""

    def __init__(self, vmm, args):
        self.proc = subprocess.Popen(
            [vmm, "run", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
        )
        self.lines = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in iter(self.proc.stdout.readline, b""):
            # Without the terminal's escape sequences (colours, the shell's
            # cursor query), which can start a line before a marker.
            line = ESCAPE.sub("", raw.decode(errors="replace").rstrip("\r\n"))
            with self.lock:
                self.lines.append(line)

    def send(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_for(self, pattern, timeout, start=0):
        """Index of the first line from `start` matching `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for i in range(start, len(self.lines)):
                    if regex.search(self.lines[i]):
                        return i
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        with self.lock:
            tail = "\n".join(self.lines[-20:])
        self.proc.kill()
        sys.exit(f"snapshot.py: no line matching {pattern!r} within {timeout} s:\n{tail}")

    def end(self, timeout=120):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def default_vmm():
    return str(REPO / "target" / "release" / "vmm")


def boot(args):
    out = Path(args.out)
    cmdline = (out / "cmdline").read_text().strip() + " vmm.cmd=true vmm.exit=shell"
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "api.sock")
        start = time.monotonic()
        guest = Guest(
            args.vmm,
            [
                "--kernel", str(out / "vmlinux"), "--initrd", str(out / "initramfs.cpio"),
                "--memory", "512", "--cmdline", cmdline, "--api-socket", sock,
                *args.flags,
            ],
        )
        guest.wait_for(r"init: vmm\.exit=shell", args.timeout)
        guest.send("echo READY-$((6*7))")
        guest.wait_for(r"^READY-42$", 300)
        booted = time.monotonic() - start
        snap = subprocess.run(
            [args.vmm, "snapshot", "--api-socket", sock, "--stay-paused", "--force", args.snapshot],
            capture_output=True, text=True,
        )
        guest.proc.terminate()
        guest.end()
        if snap.returncode != 0:
            sys.exit(f"snapshot.py: vmm snapshot failed: {snap.stderr.strip()}")
        print(snap.stdout.strip(), file=sys.stderr)
        print(f"snapshot.py: booted to the shell in {booted:.1f} s", file=sys.stderr)


def run(args):
    start = time.monotonic()
    guest = Guest(args.vmm, ["--restore", args.snapshot, *args.flags])
    guest.send("echo RESTORED-$((6*7))")
    ready = guest.wait_for(r"^RESTORED-42$", 300)
    restored = time.monotonic() - start
    # The markers' 42 is the shell's arithmetic: the echo of the command
    # line (which the console wraps at its width) never matches them.
    guest.send(f"echo VMM-RUN-$((6*7))-BEGIN; {args.command}; echo VMM-RUN-$((6*7))-DONE rc=$?")
    begun = guest.wait_for(BEGIN.pattern, 60, ready + 1)
    done = guest.wait_for(DONE.pattern, args.timeout, begun + 1)
    took = time.monotonic() - start - restored
    with guest.lock:
        output = guest.lines[begun + 1:done]
        rc = int(DONE.match(guest.lines[done]).group(1))
    for line in output:
        print(line)
    guest.send("reboot -f")
    guest.end()
    print(
        f"snapshot.py: restored to the shell's answer in {restored:.1f} s, "
        f"the command took {took:.1f} s (exit {rc})",
        file=sys.stderr,
    )
    return rc


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vmm", default=default_vmm(), help="the vmm binary")
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("boot", help="boot once and snapshot at the shell")
    b.add_argument("snapshot")
    b.add_argument("--out", default=str(HERE / "out"), help="build.sh's output")
    b.add_argument("--timeout", type=float, default=1800, help="seconds to reach the shell")
    b.add_argument("flags", nargs="*", help="more `vmm run` flags (after --)")
    r = sub.add_parser("run", help="run a command in a restore")
    r.add_argument("snapshot")
    r.add_argument("command")
    r.add_argument("--timeout", type=float, default=1800, help="seconds for the command")
    r.add_argument("flags", nargs="*", help="host-side `vmm run` flags (after --)")
    args = parser.parse_args()
    if not os.access(args.vmm, os.X_OK):
        sys.exit(f"snapshot.py: no vmm at {args.vmm} (cargo build --release)")
    if args.what == "boot":
        boot(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
