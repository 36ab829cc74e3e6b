#!/usr/bin/env python3
"""How close the vPMU's cycles:u / cycles:k estimate comes to the truth.

    guest-images/linux/bench-privilege.py SNAP [--ms 3000] [--modes user,mixed,kernel]

SNAP is a snapshot at the Linux guest's shell (snapshot.py boot). For each
`busy` mode, a restore runs `perf stat -e cycles:u,cycles:k,cycles -- busy
MODE MS` and prints, side by side, cycles:u's share of cycles:u + cycles:k
(the estimate, from the guest's privilege level sampled at the vCPU's clock
signals), the user share of the guest's own accounting of busy (exact at
its context-tracking hooks), and the host's: the vCPU thread's guest time
share of its run time (/proc .../stat guest_time over utime + stime, read as
busy starts and ends). On a host that runs guest kernel code through KVM's
emulator and guest user code natively (ENVIRONMENT.md), guest time is
guest user mode: the host's split is the truth there. Elsewhere guest time
holds both modes and that column means nothing.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The restore-and-type helper, the acceptance's parsers and /proc readers.
import snapshot  # noqa: E402
from acc_parsers import busy_line, perf_csv, perf_row  # noqa: E402
from acc_runner import vcpu_stats  # noqa: E402

def vcpu_ticks(pid):
    """(utime, stime, guest_time) ticks summed over the VMM's vCPU threads."""
    total = [0, 0, 0]
    for fields in vcpu_stats(pid):
        for i, field in enumerate((11, 12, 40)):
            total[i] += int(fields[field])
    return total


def measure(vmm, snap, mode, ms):
    guest = snapshot.Guest(vmm, ["--restore", snap])
    guest.send("echo RESTORED-$((6*7))")
    ready = guest.wait_for(r"^RESTORED-42$", 300)
    guest.send(f"perf stat -x, -e cycles:u,cycles:k,cycles -- busy {mode} {ms}; "
               "echo BENCH-$((6*7))-DONE")
    start = guest.wait_for(r"^busy: start", 300, ready + 1)
    before = vcpu_ticks(guest.proc.pid)
    end = guest.wait_for(r"^busy: mode=", 600, start + 1)
    after = vcpu_ticks(guest.proc.pid)
    done = guest.wait_for(r"BENCH-42-DONE", 300, end + 1)
    with guest.lock:
        lines = guest.lines[end:done]
    guest.send("reboot -f")
    guest.end()
    rows = perf_csv(lines)
    busy = busy_line(lines)
    user, system = busy["user_ms"], busy["sys_ms"]
    u, k, both = ((perf_row(rows, e) or (0,))[0] or 0 for e in ("cycles:u", "cycles:k", "cycles"))
    utime, stime, guest_time = (b - a for a, b in zip(before, after))
    return {
        "estimate": 100 * u / (u + k) if u + k else None,
        "guest": 100 * user / (user + system) if user + system else None,
        "host": 100 * guest_time / (utime + stime) if utime + stime else None,
        "sum": (u + k) / both if both else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshot")
    parser.add_argument("--ms", type=int, default=3000)
    parser.add_argument("--modes", default="user,mixed,kernel")
    parser.add_argument("--vmm", default=snapshot.default_vmm())
    args = parser.parse_args()
    print(f"{'busy':<8} {'estimate':>9} {'guest':>7} {'host':>7} {'u+k/cycles':>11}"
          "   (user share of cycles / of busy's time, %)")
    for mode in args.modes.split(","):
        m = measure(args.vmm, args.snapshot, mode, args.ms)

        def fmt(x, spec):
            return "-" if x is None else format(x, spec)
        print(f"{mode:<8} {fmt(m['estimate'], '9.1f')} {fmt(m['guest'], '7.1f')} "
              f"{fmt(m['host'], '7.1f')} {fmt(m['sum'], '11.3f')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
