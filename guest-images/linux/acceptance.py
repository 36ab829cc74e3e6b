#!/usr/bin/env python3
"""Linux perf acceptance: Linux's own perf inside a Linux guest on vmm's vPMU.

Boots the guest that build.sh makes (out/vmlinux, out/initramfs.cpio,
out/cmdline) four times:

  main  --vpmu auto (on: the kernel reads counters with RDMSR), while this
        script reads GET /vpmu at each step's BEGIN and END marker and all
        through the api step, and takes its own profile of the guest
        (vmm profile, GET /profile) while the record step's workload runs;
  off   --vpmu off: no PMU driver, perf says cycles is not supported;
  deny  --vpmu-events deny:0x76 (0x3c on Intel): cycles counts nothing,
        no host event;
  smp   --vcpus 2: perf stat -a and -A, perf record -a, a migrating task.

Each guest boots to its shell (vmm.cmd=true vmm.exit=shell), is
snapshotted there (with --snapshots DIR, kept as DIR/KIND.snap; a snapshot
an earlier run left there is restored instead of booting, which skips the
minutes of a boot), and its perf-checks steps are typed at the shell.
main's restore step is snapshotted in the middle of its work and continued
in a new VMM, in which main's later steps run.

main, off and deny run side by side; smp boots once off and deny have
ended (fewer vCPUs then share the host's cores while its system-wide
windows measure). Each guest runs /bin/perf-checks with its steps (the
table in acc_checks.py), then this script judges what perf printed against
run time, the guest's TSC rate and what the VMM exported, and prints a
table. Started by acceptance.sh, which builds what is missing first.
Standard library only.

The files: acceptance.py (this: command line, boot order, the table),
acc_runner.py (one `vmm run` followed as it runs), acc_parsers.py (pure
parsers of what the guests and the VMM print), acc_checks.py (each guest
kind's steps, judges and rows), acc_tolerances.py (every tolerance, with
why), acc_bench.py (--bench's figures); test_acceptance.py tests them.

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
import sys
import tempfile
import time

from acc_bench import bench_report
from acc_checks import CHECKED, GUESTS, Report, judge_boot_log, judge_guest, judge_run, steps
from acc_perftest import judge_perf_test, print_table
from acc_runner import Guest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vmm", default=os.environ.get("VMM", os.path.join(REPO, "target/release/vmm")))
    p.add_argument("--out", default=os.path.join(HERE, "out"))
    p.add_argument("--timeout", type=int, default=int(os.environ.get("ACCEPT_TIMEOUT", 1800)),
                   help="seconds each guest may run (vmm --timeout)")
    p.add_argument("--memory", type=int, default=512)
    p.add_argument("--only", default=",".join(CHECKED),
                   help=f"which runs ({','.join(CHECKED)})")
    p.add_argument("--sequential", action="store_true", help="one guest at a time")
    p.add_argument("--keep", help="keep serial logs and VMM output in this directory")
    p.add_argument("--snapshots", metavar="DIR",
                   help="keep each guest's snapshot at its shell here (KIND.snap) and, where "
                        "an earlier run left one, restore it instead of booting")
    p.add_argument("--json", help="also write the table as JSON to this file")
    p.add_argument("--bench", action="store_true",
                   help="run the benchmark guest instead of the checks")
    p.add_argument("--perf-tests", metavar="TESTS",
                   help="Linux's perf tests the main and off guests run: 'all' (all but test "
                        "10, about 9 min per guest here) or numbers (default: the PMU, sampling and "
                        "tracepoint tests, perf-checks' PERF_TESTS_PMU)")
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
    if not runs or any(x not in CHECKED for x in runs):
        print(f"acceptance: SETUP ERROR: --only takes {','.join(CHECKED)}")
        return 2
    if args.bench:
        runs = ["bench"]

    workdir = args.keep or tempfile.mkdtemp(prefix="vmm-accept-")
    os.makedirs(workdir, exist_ok=True)
    if args.snapshots:
        os.makedirs(args.snapshots, exist_ok=True)
    guests = [Guest(n, GUESTS[n].flags, steps(n), args.out, args.memory, workdir, args.timeout,
                    args.cmdline, args.vmm, live_step=GUESTS[n].live_step,
                    profile_step=GUESTS[n].profile_step, restore_step=GUESTS[n].restore_step,
                    snapshots=args.snapshots,
                    env={"VMM_PERF_TESTS": f"'{args.perf_tests}'"} if args.perf_tests else None)
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
        how = "restoring" if g.reusable() else "booting"
        print(f"acceptance: {how} '{g.name}' (perf-checks {' '.join(g.steps)})", flush=True)
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
        judge_boot_log(g, r)
        judge_guest(g, r)
    by_name = {g.name: g for g in guests}
    perf_tests = None
    if "main" in by_name or "off" in by_name:
        perf_tests = judge_perf_test(by_name.get("main"), by_name.get("off"), r)
    print(f"acceptance: {len(guests)} guest(s) in {time.monotonic() - t0:.0f} s; "
          f"logs in {workdir}")
    for g in guests:
        ready = f"{g.ready_after:.1f} s" if g.ready_after is not None else "never"
        how = "booted" if g.booted else "restored"
        print(f"acceptance: '{g.name}' {how}, its shell answered after {ready}"
              + (f" (snapshot kept: {g.boot_snapshot})" if args.snapshots and g.booted else ""))
    if perf_tests:
        print_table(perf_tests)
    r.print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": r.rows, "workdir": workdir, "perf_test": perf_tests}, f, indent=1)
    if not any("VMM-GUEST-START" in g.text() for g in guests):
        tail = "\n".join(guests[0].text().splitlines()[-10:])
        print(f"acceptance: CANNOT RUN HERE: Linux did not reach /init; last serial lines:\n{tail}")
        return 5
    print("acceptance: PASS" if r.ok() else "acceptance: FAIL")
    return 0 if r.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
