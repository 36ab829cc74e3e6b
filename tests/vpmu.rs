//! The vPMU end to end: the probe guest drives it the way Linux's perf
//! driver does, under real KVM, with host perf (task-clock on these hosts)
//! behind it.

mod common;

use common::{perf_opens, result, run_probe, timing_lock};

#[test]
fn probe_detects_the_pmu_only_when_the_vpmu_is_on() {
    require_kvm!();
    let (on, _) = run_probe("probe.tests=detect", &["--vpmu", "on"]);
    let d = result(&on, 0, "detect");
    assert_ne!(d.get("pmu"), "none", "{d:?}");
    assert_eq!(d.get("msr_probe"), "ok", "{d:?}");
    assert!(d.num("gp") >= 4.0, "{d:?}");

    let (off, o) = run_probe("probe.tests=detect", &["--vpmu", "off"]);
    let d = result(&off, 0, "detect");
    assert_eq!(d.get("pmu"), "none", "{d:?}");
    assert_eq!(d.get("ext_core"), "0", "{d:?}");
    assert_eq!(d.get("perfmon_v2"), "0", "{d:?}");
    assert!(common::stderr(&o).contains("vPMU off"));
}

#[test]
fn core_cycles_over_a_busy_loop_match_its_tsc_length() {
    require_kvm!();
    let _serial = timing_lock();
    let (r, _) = run_probe("probe.tests=cycles probe.cycles_ms=300", &["--vpmu", "on"]);
    let c = result(&r, 0, "cycles");
    // The loop's length in TSC cycles, less the time the host did not run
    // the vCPU at all (KVM steal time, read by the guest): other processes
    // on a 2-core host take the CPU, and a descheduled vCPU executes no
    // cycles, on hardware as here.
    let ratio = c.num("run_ratio_permille") / 1000.0;
    assert!(
        (0.85..=1.15).contains(&ratio),
        "cycles/(tsc - steal) = {ratio:.3} outside 15%: {c:?}"
    );
}

#[test]
fn a_halted_guest_accumulates_almost_nothing() {
    require_kvm!();
    let _serial = timing_lock();
    let (r, _) = run_probe("probe.tests=halt probe.halt_ms=200", &["--vpmu", "on"]);
    let h = result(&r, 0, "halt");
    let ratio = h.num("cycles") / h.num("tsc");
    assert!(
        h.num("timer_irqs") >= 1.0,
        "the timer woke the guest: {h:?}"
    );
    assert!(ratio < 0.05, "halted cycles/tsc = {ratio:.3}: {h:?}");
}

#[test]
fn pmis_arrive_at_the_programmed_period_and_stop_when_disabled() {
    require_kvm!();
    let _serial = timing_lock();
    // The default period is 1 ms of guest cycles: about 300 PMIs.
    let (r, o) = run_probe("probe.tests=pmi probe.pmi_ms=300", &["--vpmu", "on"]);
    let p = result(&r, 0, "pmi");
    // Expected from the window's TSC length less steal time (see above).
    let (pmis, expected) = (p.num("pmis"), p.num("expected_run"));
    // At least 50 periods of run time, even when other processes steal
    // most of the window from the vCPU.
    assert!(expected >= 50.0, "{p:?}");
    assert!(
        (pmis - expected).abs() <= 0.3 * expected,
        "{pmis} PMIs, expected {expected} within 30%: {p:?}"
    );
    assert_eq!(
        p.num("status_ok"),
        pmis,
        "every PMI had its status bit: {p:?}"
    );
    assert_eq!(p.num("after_disable"), 0.0, "{p:?}");
    assert_eq!(p.num("unexpected_nmis"), 0.0, "{p:?}");
    // Only Intel's LAPIC masks LVTPC on a PMI (tests/intel.rs).
    let masked = if common::host_is_amd() { 0.0 } else { pmis };
    assert_eq!(p.num("lvt_masked"), masked, "{p:?}");
    assert!(common::stderr(&o).contains(&format!("{} PMIs", pmis as u64)));
}

#[test]
fn reserved_bits_and_out_of_model_msrs_get_what_hardware_gives() {
    require_kvm!();
    // Intel faults on every reserved bit; AMD hardware (and KVM's svm/pmu.c)
    // drops reserved event-select and global-register bits instead. MSRs
    // outside the model fault on both.
    let rsvd = common::rsvd_mode();
    for model in [
        &["--vpmu", "on"][..],
        &["--vpmu-version", "1", "--vpmu-gp-counters", "4"],
    ] {
        let (r, o) = run_probe(&format!("probe.tests=gp,detect probe.rsvd={rsvd}"), model);
        let g = result(&r, 0, "gp");
        assert!(g.num("checks") > 100.0, "{g:?}");
        assert!(g.num("gp_expected") > 0.0, "{g:?}");
        assert_eq!(g.num("gp_got"), g.num("gp_expected"), "{model:?}: {g:?}");
        assert_eq!(g.num("mismatches"), 0.0, "{model:?}: {g:?}");
        assert_eq!(g.num("kept"), 0.0, "no reserved bit stays set: {g:?}");
        let (got, total) = g.get("outside").split_once('/').unwrap();
        assert_eq!(got, total, "every out-of-model access faults: {g:?}");
        // The VMM kept running: the test after it ran too.
        assert_eq!(result(&r, 0, "detect").get("msr_probe"), "ok");
        assert!(common::stderr(&o).contains("guest reset the machine"));
    }
}

#[test]
fn enable_toggles_never_reopen_host_events() {
    require_kvm!();
    common::assert_toggles_open_no_host_events(&["--vpmu", "on"]);
}

#[test]
fn two_vcpus_count_independently() {
    require_kvm!();
    let _serial = timing_lock();
    let (r, o) = run_probe(
        "probe.tests=cycles probe.cycles_ms=200 probe.cpus=all",
        &["--vpmu", "on", "--vcpus", "2"],
    );
    for cpu in 0..2 {
        let c = result(&r, cpu, "cycles");
        let ratio = c.num("run_ratio_permille") / 1000.0;
        assert!(
            (0.85..=1.15).contains(&ratio),
            "vCPU {cpu}: cycles/tsc = {ratio:.3}: {c:?}"
        );
        assert!(
            perf_opens(&o, cpu) >= 1,
            "vCPU {cpu} has its own host events"
        );
    }
}

#[test]
fn paused_time_is_not_counted() {
    require_kvm!();
    let _serial = timing_lock();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let child = common::vmm()
        .args([
            "--vpmu",
            "on",
            "--cmdline",
            "probe.tests=cycles probe.cycles_ms=1500",
            "--timeout",
            "60",
            "--api-socket",
        ])
        .arg(&sock)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_for_api(&sock);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (status, body) = common::api(&sock, "PUT", "/vm/pause").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"all_vcpus_parked\": true"), "{body}");
    let paused_at = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let (status, _) = common::api(&sock, "PUT", "/vm/resume").unwrap();
    let paused = paused_at.elapsed();
    assert_eq!(status, 200);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    let r = common::probe_results(&common::stdout(&o));
    let c = result(&r, 0, "cycles");
    // The guest's TSC ran on while paused; its counter must not have.
    let tsc_khz = common::tsc_khz(&common::stdout(&o));
    let paused_tsc = paused.as_secs_f64() * tsc_khz * 1000.0;
    let steal_tsc = c.num("steal_us") * tsc_khz / 1000.0;
    let running_tsc = c.num("tsc") - paused_tsc - steal_tsc;
    let ratio = c.num("cycles") / running_tsc;
    assert!(
        (0.85..=1.15).contains(&ratio),
        "cycles / (tsc - paused - steal) = {ratio:.3}; paused {paused:?}: {c:?}"
    );
    assert!(
        c.num("cycles") < c.num("tsc") - 0.5 * paused_tsc,
        "paused time was counted: {c:?}"
    );
}

#[test]
fn a_tiny_sampling_period_is_throttled_not_a_stall() {
    require_kvm!();
    let _serial = timing_lock();
    // Period 16 cycles: unthrottled, that would be a PMI every few ns.
    let start = std::time::Instant::now();
    let (r, o) = run_probe(
        "probe.tests=pmi,detect probe.pmi_period=16 probe.pmi_ms=200",
        &["--vpmu", "on"],
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
    let p = result(&r, 0, "pmi");
    assert!(p.num("pmis") >= 1.0, "{p:?}");
    assert_eq!(p.num("status_ok"), p.num("pmis"), "{p:?}");
    // At most one PMI per 50 us of guest time (the clock-backing minimum).
    assert!(p.num("pmis") <= 200_000.0 / 50.0, "{p:?}");
    let throttled = common::vpmu_summary(&o, 0, " throttled");
    assert!(throttled > 0, "{}", common::stderr(&o));
    // The guest carried on after the storm.
    assert_eq!(result(&r, 0, "detect").get("msr_probe"), "ok");
}
