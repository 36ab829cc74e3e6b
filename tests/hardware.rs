//! The vPMU's hardware paths, end to end with the probe guest: exact
//! instructions and branches of a known loop, guest RDPMC through KVM's
//! PMU, and the Intel model on hardware fixed counters. The tests that need
//! a host PMU are ignored by `cargo test`; `scripts/pmu-host-check` runs
//! them (`--ignored`) where `vmm host` finds what they need and says why
//! not elsewhere. The others follow the host: they check the hardware path
//! where the host has it and the honest answer where it does not.

mod common;

use common::{perf_opens, result, run, run_probe, stderr, stdout};
use serde_json::Value;

/// Iterations of the probe's known loop (`dec; jnz`).
const LOOPS: u64 = 1_000_000;
/// Guest instructions outside the loop between the enabling and the
/// disabling WRMSR (the MSR writes themselves, the call and return).
const SLACK: f64 = 100.0;

/// What `vmm host --json` says of this host.
fn host_report() -> Value {
    let o = run(&["host", "--json"]);
    assert_eq!(o.status.code(), Some(0), "vmm host: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).expect("vmm host --json prints JSON")
}

/// The host's vendor and the other one, as `--cpu-vendor` spells them.
fn vendors(host: &Value) -> (&'static str, &'static str) {
    match host["vendor"].as_str() {
        Some("intel") => ("intel", "amd"),
        _ => ("amd", "intel"),
    }
}

/// The plan `vmm host` reports for a guest of `vendor`.
fn plan<'a>(host: &'a Value, vendor: &str) -> &'a Value {
    host["plans"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["guest"] == vendor))
        .unwrap_or_else(|| panic!("no {vendor} plan in {host}"))
}

/// The probe's instructions test with `flags`: (instructions, branches).
fn known_loop(counter: &str, flags: &[&str]) -> (f64, f64, std::process::Output) {
    let cmdline = format!("probe.tests=instructions probe.loops={LOOPS} {counter}");
    let mut args = vec!["--vpmu", "on"];
    args.extend_from_slice(flags);
    let (r, o) = run_probe(&cmdline, &args);
    let t = result(&r, 0, "instructions");
    (t.num("instructions"), t.num("branches"), o)
}

fn assert_exact(what: &str, got: f64, expected: u64) {
    let expected = expected as f64;
    assert!(
        (expected..=expected + SLACK).contains(&got),
        "{what}: {got} for a loop of {expected}"
    );
}

#[test]
#[ignore = "needs host hardware events: scripts/pmu-host-check runs it"]
fn a_known_guest_loop_retires_exactly_its_instructions_and_branches() {
    require_kvm!();
    let host = host_report();
    let own = vendors(&host).0;
    assert_eq!(
        plan(&host, own)["hardware_events"]["ok"],
        true,
        "this host has no hardware events for its own guests: {host}"
    );
    let (instructions, branches, o) = known_loop("probe.counter=0", &[]);
    assert_exact("instructions", instructions, 2 * LOOPS);
    assert_exact("branches", branches, LOOPS);
    assert!(perf_opens(&o, 0) >= 2, "the vPMU opened host events");
}

#[test]
fn a_guest_whose_events_the_host_cannot_count_reads_zero_and_is_told_why() {
    require_kvm!();
    // A guest of the other vendor: host perf can never count its event
    // codes (they mean other events on the host's PMU), on any host.
    let other = vendors(&host_report()).1;
    let (instructions, branches, o) = known_loop("probe.counter=0", &["--cpu-vendor", other]);
    assert_eq!((instructions, branches), (0.0, 0.0), "no invented counts");
    let err = stderr(&o);
    assert!(
        err.contains("other events are unbacked and read as not counting"),
        "the start-up report says so: {err}"
    );
}

#[test]
fn guest_rdpmc_reads_the_counter_where_kvm_serves_it_and_faults_elsewhere() {
    require_kvm!();
    let host = host_report();
    let own = vendors(&host).0;
    let served = plan(&host, own)["rdpmc"]["ok"] == true;
    let (r, o) = run_probe("probe.tests=rdpmc probe.rdpmc=1", &["--vpmu", "on"]);
    let t = result(&r, 0, "rdpmc");
    if served {
        assert_eq!(
            t.get("rdpmc"),
            "ok",
            "RDPMC equals RDMSR of the counter: {t:?}"
        );
        assert!(t.num("rdmsr") > 0.0, "the counter counted: {t:?}");
    } else {
        assert_eq!(t.get("rdpmc"), "gp", "{t:?}");
        assert!(
            stderr(&o).contains("guest RDPMC raises #GP"),
            "the start-up report says why: {}",
            stderr(&o)
        );
    }
}

#[test]
#[ignore = "needs an Intel host with hardware events: scripts/pmu-host-check runs it"]
fn the_intel_model_counts_on_hardware_fixed_and_general_purpose_counters() {
    require_kvm!();
    let host = host_report();
    assert_eq!(host["vendor"], "intel", "an Intel host: {host}");
    assert_eq!(
        plan(&host, "intel")["hardware_events"]["ok"],
        true,
        "{host}"
    );
    let intel = ["--cpu-vendor", "intel"];
    let (fixed0, _, _) = known_loop("probe.fixed=0", &intel);
    assert_exact("instructions on fixed counter 0", fixed0, 2 * LOOPS);
    let (gp, branches, _) = known_loop("probe.counter=0", &intel);
    assert_exact("instructions on counter 0", gp, 2 * LOOPS);
    assert_exact("branches on counter 1", branches, LOOPS);
    // Core cycles on fixed counter 1 against the loop's run time: the
    // core clock may run above or below the TSC (turbo, power states).
    let (r, o) = run_probe(
        "probe.tests=cycles probe.cycles_ms=300 probe.fixed=1",
        &["--vpmu", "on", "--cpu-vendor", "intel"],
    );
    let ratio = result(&r, 0, "cycles").num("run_ratio_permille") / 1000.0;
    assert!(
        (0.5..=2.0).contains(&ratio),
        "fixed counter 1 cycles/run = {ratio}"
    );
    assert!(perf_opens(&o, 0) >= 1, "the vPMU opened a host event");
}
