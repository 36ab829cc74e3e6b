//! The Intel model end to end under KVM on any host: `--cpu-vendor intel`
//! presents GenuineIntel and builds the Intel architectural PMU (versions
//! 1-4), which the probe's Intel driver detects and drives the way Linux's
//! `intel_pmu_init` and `intel_pmu_handle_irq` do.

mod common;

use common::{api, result, run_probe, timing_lock, ProbeResult, Running};

/// The probe on the Intel model of `version`, with extra flags.
fn run_intel(cmdline: &str, version: u8, extra: &[&str]) -> (Vec<ProbeResult>, String) {
    let v = version.to_string();
    let mut flags = vec![
        "--cpu-vendor",
        "intel",
        "--vpmu",
        "on",
        "--vpmu-version",
        &v,
    ];
    flags.extend_from_slice(extra);
    let (results, o) = run_probe(cmdline, &flags);
    (results, common::stderr(&o))
}

/// `vPMU on: Intel v4, 4 general-purpose counters (48 bits), 3 fixed (48
/// bits), ...` from the VMM's start-up report, as (version, gp, gp width,
/// fixed, fixed width).
fn advertised(stderr: &str) -> (u32, u32, u32, u32, u32) {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("vmm: vPMU on: Intel v"))
        .unwrap_or_else(|| panic!("no Intel vPMU line: {stderr}"));
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let fixed = line.contains(" fixed (");
    match (fixed, nums.as_slice()) {
        (true, [v, gp, w, f, fw, ..]) => (*v, *gp, *w, *f, *fw),
        (false, [v, gp, w, ..]) => (*v, *gp, *w, 0, 0),
        _ => panic!("unexpected vPMU line: {line}"),
    }
}

#[test]
fn the_probe_detects_each_intel_version_exactly_as_advertised() {
    require_kvm!();
    for (version, shape) in [
        (1, &[][..]),
        (2, &[][..]),
        (
            3,
            &["--vpmu-gp-counters", "2", "--vpmu-fixed-counters", "1"][..],
        ),
        (4, &[][..]),
    ] {
        let (r, err) = run_intel("probe.tests=detect", version, shape);
        let d = result(&r, 0, "detect");
        assert_eq!(d.get("vendor"), "GenuineIntel", "{d:?}");
        assert_eq!(d.get("pmu"), "intel", "{d:?}");
        assert_eq!(d.get("msr_probe"), "ok", "{d:?}");
        let (v, gp, width, fixed, fixed_width) = advertised(&err);
        assert_eq!(v, u32::from(version), "{err}");
        let seen = (
            d.num("version") as u32,
            d.num("gp") as u32,
            d.num("gp_width") as u32,
            d.num("fixed") as u32,
            d.num("fixed_width") as u32,
        );
        assert_eq!(
            seen,
            (v, gp, width, fixed, fixed_width),
            "v{version}: {d:?}"
        );
        if version == 1 {
            assert_eq!(fixed, 0, "version 1 has no fixed counters");
        }
        if version == 3 {
            assert_eq!((gp, fixed), (2, 1), "the shape flags were applied");
        }
        // PERF_CAPABILITIES says full-width writes, and the probe found it.
        assert_eq!(d.get("full_width"), "1", "{d:?}");
        if common::host_is_amd() {
            assert!(
                err.contains("(Intel, --cpu-vendor) is not the host's (Amd)"),
                "{err}"
            );
        }
    }
}

/// Cycles over a busy loop and PMIs at the programmed period on counter
/// `counter_key` (`probe.counter=0` or `probe.fixed=1`).
fn cycles_and_pmis(version: u8, counter_key: &str) {
    let cmdline =
        format!("probe.tests=cycles,pmi probe.cycles_ms=300 probe.pmi_ms=300 {counter_key}");
    let (r, err) = run_intel(&cmdline, version, &[]);
    let what = format!("v{version} {counter_key}");
    let c = result(&r, 0, "cycles");
    // Against the loop's TSC length less steal time (see tests/vpmu.rs).
    let ratio = c.num("run_ratio_permille") / 1000.0;
    assert!(
        (0.85..=1.15).contains(&ratio),
        "{what}: cycles/(tsc - steal) = {ratio:.3} outside 15%: {c:?}"
    );
    let p = result(&r, 0, "pmi");
    let (pmis, expected) = (p.num("pmis"), p.num("expected_run"));
    // At least 50 periods of run time, even when other processes steal
    // most of the 300 ms window from the vCPU.
    assert!(expected >= 50.0, "{p:?}");
    assert!(
        (pmis - expected).abs() <= 0.3 * expected,
        "{what}: {pmis} PMIs, expected {expected} within 30%: {p:?}"
    );
    // Each PMI had its GLOBAL_STATUS bit (bit 32+i for fixed counter i),
    // acked through GLOBAL_OVF_CTRL (v2+; v1 tests the counter's top bit).
    assert_eq!(p.num("status_ok"), pmis, "{what}: {p:?}");
    assert_eq!(p.get("first_bad_status"), "none", "{what}: {p:?}");
    assert_eq!(p.num("handler_gp"), 0.0, "{what}: {p:?}");
    // Intel's LAPIC masks LVTPC on every PMI (here in x2APIC mode) and only
    // the handler's unmask lets the next one through: all arrived.
    assert_eq!(p.num("lvt_masked"), pmis, "{what}: {p:?}");
    assert_eq!(p.num("after_disable"), 0.0, "{what}: {p:?}");
    assert_eq!(p.num("unexpected_nmis"), 0.0, "{what}: {p:?}");
    assert!(err.contains(&format!("{} PMIs", pmis as u64)), "{err}");
}

#[test]
fn cycles_and_pmis_on_general_purpose_and_fixed_counters_of_each_version() {
    require_kvm!();
    let _serial = timing_lock();
    let r = run_probe(
        "probe.tests=detect",
        &["--cpu-vendor", "intel", "--vpmu", "on"],
    );
    assert!(
        common::stdout(&r.1).contains("apic=x2apic"),
        "the PMIs below are x2APIC ones"
    );
    for version in 1..=4 {
        cycles_and_pmis(version, "probe.counter=0");
        if version >= 2 {
            // Fixed counter 1: CPU_CLK_UNHALTED.CORE.
            cycles_and_pmis(version, "probe.fixed=1");
        }
    }
}

#[test]
fn every_reserved_bit_faults_and_legacy_counter_writes_sign_extend() {
    require_kvm!();
    for version in 1..=4 {
        let (r, _) = run_intel("probe.tests=gp,detect probe.rsvd=gp", version, &[]);
        let g = result(&r, 0, "gp");
        let what = format!("v{version}");
        assert_eq!(g.get("model"), "intel", "{g:?}");
        assert!(g.num("gp_expected") >= 128.0, "{what}: {g:?}");
        assert_eq!(g.num("gp_got"), g.num("gp_expected"), "{what}: {g:?}");
        // `mismatches` includes IA32_PMCx writes of bit 31 that did not read
        // back sign-extended, and A_PMCx writes that did not read back as
        // written.
        assert_eq!(g.num("mismatches"), 0.0, "{what}: {g:?}");
        let (got, total) = g.get("outside").split_once('/').unwrap();
        assert_eq!(
            got, total,
            "{what}: every out-of-model access faults: {g:?}"
        );
        // Full-width writes beyond the 48-bit width: 16 bits x 4 counters.
        assert_eq!(g.get("counter_rsvd"), "64/64", "{what}: {g:?}");
        // PERF_CAPABILITIES (and GLOBAL_STATUS, INUSE) take no writes.
        let (got, total) = g.get("ro_write").split_once('/').unwrap();
        assert_eq!(got, total, "{what}: {g:?}");
        if version >= 2 {
            let (got, total) = g.get("global_rsvd").split_once('/').unwrap();
            assert_eq!(got, total, "{what}: {g:?}");
            assert!(total.parse::<u32>().unwrap() > 100, "{what}: {g:?}");
        }
        assert_eq!(result(&r, 0, "detect").get("msr_probe"), "ok");
    }
}

#[test]
fn every_pmu_msr_a_shape_lacks_faults_for_both_vendors() {
    require_kvm!();
    // KVM answers IA32_PMC1 and IA32_PERFEVTSEL1 itself (as P6 MSRs) unless
    // the VMM traps them: one counter is the shape that showed it.
    // (vendor, version, gp counters, fixed counters if given)
    let shapes = [
        ("intel", "1", "1", None),
        ("intel", "2", "1", Some("0")),
        ("intel", "2", "1", Some("1")),
        ("intel", "3", "3", Some("2")),
        ("intel", "4", "1", Some("3")),
        ("intel", "4", "8", Some("3")),
        ("amd", "1", "4", None),
        ("amd", "1", "6", None),
        ("amd", "2", "1", None),
        ("amd", "2", "6", None),
    ];
    for (vendor, version, gp, fixed) in shapes {
        let rsvd = if vendor == "intel" { "gp" } else { "ignore" };
        let mut flags = vec![
            "--cpu-vendor",
            vendor,
            "--vpmu",
            "on",
            "--vpmu-version",
            version,
            "--vpmu-gp-counters",
            gp,
        ];
        if let Some(fixed) = fixed {
            flags.extend(["--vpmu-fixed-counters", fixed]);
        }
        let (r, _) = run_probe(&format!("probe.tests=gp,detect probe.rsvd={rsvd}"), &flags);
        let g = result(&r, 0, "gp");
        let (got, total) = g.get("outside").split_once('/').unwrap();
        assert_eq!(
            got, total,
            "{flags:?}: every MSR outside the model faults: {g:?}"
        );
        // More than one MSR past the model's end was tried.
        assert!(total.parse::<u32>().unwrap() >= 6, "{flags:?}: {g:?}");
        assert_eq!(g.num("gp_got"), g.num("gp_expected"), "{flags:?}: {g:?}");
        assert_eq!(g.num("mismatches"), 0.0, "{flags:?}: {g:?}");
    }
}

#[test]
fn enable_toggles_never_reopen_host_events_on_the_intel_model() {
    require_kvm!();
    common::assert_toggles_open_no_host_events(&["--cpu-vendor", "intel", "--vpmu", "on"]);
}

#[test]
fn the_api_names_intel_counters_and_fixed_counters() {
    require_kvm!();
    let vm = Running::start(
        "probe.tests=cycles probe.fixed=1 probe.hold_ms=20000",
        &["--cpu-vendor", "intel", "--vpmu-version", "4"],
    );
    vm.wait_serial("test=cycles", std::time::Duration::from_secs(60));
    let v = vm.vpmu();
    let model = &v["vm"]["model"];
    assert_eq!(model["vendor"], "intel", "{v}");
    let counters = v["vcpus"][0]["vpmu"]["counters"].as_array().unwrap();
    let named: Vec<(String, u64)> = counters
        .iter()
        .map(|c| {
            (
                format!("{}{}", c["kind"].as_str().unwrap(), c["index"]),
                c["msr"].as_u64().unwrap(),
            )
        })
        .collect();
    let expect: Vec<(String, u64)> = (0..4)
        .map(|i| (format!("gp{i}"), 0xc1 + i))
        .chain((0..3).map(|i| (format!("fixed{i}"), 0x309 + i)))
        .collect();
    assert_eq!(named, expect, "{v}");
    let fixed1 = &counters[5];
    assert_eq!(fixed1["event_name"], "cycles", "{fixed1}");
    assert!(fixed1["counted"].as_u64().unwrap() > 0, "{fixed1}");
    let (status, metrics) = api(&vm.sock, "GET", "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"vmm_vpmu_counter_value{vcpu="0",counter="fixed1",event="cycles"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"counter="fixed0",event="instructions"}"#)
            && metrics.contains(r#"counter="fixed2",event="ref-cycles"}"#),
        "{metrics}"
    );
}

#[test]
fn halt_two_vcpus_and_throttling_behave_on_the_intel_model_as_on_amd() {
    require_kvm!();
    let _serial = timing_lock();
    // On each of two vCPUs, with its own host events: a halted window
    // counts (almost) nothing, a busy one its run time.
    let (r, err) = run_intel(
        "probe.tests=halt,cycles probe.halt_ms=200 probe.cycles_ms=200 probe.cpus=all",
        4,
        &["--vcpus", "2"],
    );
    for cpu in 0..2 {
        let h = result(&r, cpu, "halt");
        assert!(h.num("timer_irqs") >= 1.0, "vCPU {cpu}: {h:?}");
        let halted = h.num("cycles") / h.num("tsc");
        assert!(
            halted < 0.05,
            "vCPU {cpu}: halted cycles/tsc = {halted:.3}: {h:?}"
        );
        let c = result(&r, cpu, "cycles");
        let ratio = c.num("run_ratio_permille") / 1000.0;
        assert!(
            (0.85..=1.15).contains(&ratio),
            "vCPU {cpu}: cycles/(tsc - steal) = {ratio:.3}: {c:?}"
        );
        assert!(
            common::vpmu_summary_text(&err, cpu, " perf_event_open") >= 1,
            "vCPU {cpu} has its own host events: {err}"
        );
    }
    // Period 16 on a fixed counter: throttled to the host minimum, every
    // PMI with its status bit, and the guest carries on.
    let start = std::time::Instant::now();
    let (r, err) = run_intel(
        "probe.tests=pmi,detect probe.pmi_period=16 probe.pmi_ms=200 probe.fixed=1",
        4,
        &[],
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
    let p = result(&r, 0, "pmi");
    assert!(p.num("pmis") >= 1.0, "{p:?}");
    assert_eq!(p.num("status_ok"), p.num("pmis"), "{p:?}");
    assert_eq!(p.num("lvt_masked"), p.num("pmis"), "{p:?}");
    assert!(p.num("pmis") <= 200_000.0 / 50.0, "{p:?}");
    assert!(
        common::vpmu_summary_text(&err, 0, " throttled") > 0,
        "{err}"
    );
    assert_eq!(result(&r, 0, "detect").get("msr_probe"), "ok");
}

#[test]
fn msr_and_pmi_storms_get_hardware_answers_on_the_intel_model() {
    require_kvm!();
    let _serial = timing_lock();
    let (r, err) = run_intel(
        "probe.tests=msrstorm,pmistorm,detect probe.storm_n=100000 probe.storm_ms=600",
        4,
        &[],
    );
    let s = result(&r, 0, "msrstorm");
    common::assert_msr_storm_answered(s, 100_000.0);
    let p = result(&r, 0, "pmistorm");
    // Four general-purpose and three fixed counters at period one.
    assert_eq!(p.num("counters"), 7.0, "{p:?}");
    assert!(p.num("pmis") >= 1.0, "{p:?}");
    assert_eq!(p.num("nostatus"), 0.0, "{p:?}");
    assert!(p.num("late") <= 1.0, "{p:?}");
    assert_eq!(p.num("gp") + p.num("handler_gp"), 0.0, "{p:?}");
    assert_eq!(p.num("unexpected_nmis"), 0.0, "{p:?}");
    assert!(
        common::vpmu_summary_text(&err, 0, " throttled") > 0,
        "{err}"
    );
    assert_eq!(result(&r, 0, "detect").get("msr_probe"), "ok");
}
