"""Unit tests of scripts/pmu-host-check's choices (no KVM, no cargo)."""

import importlib.machinery
import importlib.util
import os
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
_loader = importlib.machinery.SourceFileLoader("pmu_host_check", os.path.join(HERE, "pmu-host-check"))
_spec = importlib.util.spec_from_loader("pmu_host_check", _loader)
check = importlib.util.module_from_spec(_spec)
_loader.exec_module(check)


def offer(ok, why=""):
    return {"ok": ok, "why": why}


def report(vendor="amd", kvm=True, hardware=None, rdpmc=None):
    """A `vmm host --json` document: `hardware`/`rdpmc` None means offered."""
    other = "intel" if vendor == "amd" else "amd"
    foreign = f"the guest's CPU vendor is not the host's ({vendor})"
    plan = lambda guest, hw, rd: {
        "guest": guest, "hardware_events": offer(hw is None, hw or ""),
        "rdpmc": offer(rd is None, rd or ""), "backing": f"backing of {guest}",
        "plan": {"Ok": "vPMU on"}, "notes": []}
    return {
        "cpu": "Test", "vendor": vendor, "pmu_cpuid": "", "perf_event_paranoid": 2,
        "kvm": offer(kvm, "" if kvm else "/dev/kvm: No such file or directory"),
        "msr_exits": offer(kvm), "kvm_pmu": "N", "hardware_events": offer(hardware is None),
        "plans": [plan(vendor, hardware, rdpmc), plan(other, foreign, foreign)] if kvm else [],
    }


class PlanTest(unittest.TestCase):
    def test_a_host_without_a_pmu_runs_what_it_can_and_names_the_hosts_reason(self):
        rep = report(hardware="host has no such event (perf_event_open: ENOENT)",
                     rdpmc="KVM's in-kernel PMU is off (kvm.enable_pmu=N)")
        planned = check.plan(rep, {"kut": None})
        ran = [c for c in planned if c.skip is None]
        self.assertTrue(any("task clock" in c.name for c in ran))
        self.assertTrue(any(c.name.startswith("probe guest on task-clock backing") for c in ran))
        for c in planned:
            if "hardware" in c.needs:
                self.assertEqual(c.skip, "host has no such event (perf_event_open: ENOENT)",
                                 c.name)
            if c.needs == ["kvm", "rdpmc"]:
                self.assertIn("enable_pmu=N", c.skip)
            if "kut" in c.needs:
                self.assertIn("--kvm-unit-tests", c.skip)

    def test_an_amd_host_with_a_pmu_runs_every_hardware_check_but_the_intel_one(self):
        with tempfile.TemporaryDirectory() as out:
            for f in ("vmlinux", "initramfs.cpio", "cmdline"):
                open(os.path.join(out, f), "w").close()
            planned = check.plan(report(), {"linux_out": out, "kut": "/src"})
        not_run = {c.name: c.skip for c in planned if c.skip is not None}
        self.assertEqual(list(not_run.values()), ["the host CPU is amd, not Intel"], not_run)

    def test_an_intel_host_with_a_pmu_runs_the_intel_hardware_check(self):
        planned = check.plan(report(vendor="intel"), {"no_linux": True})
        intel = [c for c in planned if "intel_host" in c.needs]
        self.assertEqual([c.skip for c in intel], [None])
        linux = [c for c in planned if "linux" in c.needs]
        self.assertEqual([c.skip for c in linux], ["--no-linux"])

    def test_without_kvm_only_the_host_perf_check_runs(self):
        planned = check.plan(report(kvm=False), {})
        self.assertEqual([c.needs for c in planned if c.skip is None], [["perf"]])
        self.assertTrue(all("/dev/kvm" in c.skip for c in planned if "kvm" in c.needs))

    def test_a_cargo_run_where_no_test_ran_is_not_a_pass(self):
        self.assertEqual(check.cargo_passed("test result: ok. 0 passed; 0 failed; 4 ignored"),
                         (0, 0))
        self.assertEqual(check.cargo_passed(
            "test result: ok. 3 passed; 0 failed\ntest result: FAILED. 1 passed; 2 failed"),
            (4, 2))

    def test_the_table_counts_each_result(self):
        planned = check.plan(report(hardware="no PMU", rdpmc="off"), {})
        for c in planned:
            c.result = "NOT RUN" if c.skip else "PASS"
        planned[0].result = "FAIL"
        text = check.table(planned)
        ran = sum(c.skip is None for c in planned)
        self.assertIn(f"{ran - 1} passed, 1 failed, {len(planned) - ran} not run", text)
        self.assertIn("no PMU", text)


if __name__ == "__main__":
    unittest.main()
