//! `vmm stat`: a `perf stat`-like view of a running VM's guest counters,
//! from the host, through the VM's API socket (`GET /vpmu`).
//!
//! Every `--interval` it reads the export again and prints, per vCPU and
//! counter, what the counter counted under its current programming, the
//! rate per second since the previous read, the event, how it is backed
//! and how much of its enabled time the host event really ran; then the
//! VM's totals per programming id with their rates. `--json` prints one
//! JSON object per refresh (one line each) instead.
//!
//! Each refresh is one `GET /vpmu` through [`crate::api::client`], read as
//! the [`VpmuDoc`] the server sends.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use vpmu::{Backing, CounterSnapshot, ProgrammingId};

use crate::api::client::{self, printable};
use crate::api::documents::{backing_label, counter_label, event_label, VpmuDoc};

/// How long one request may take.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What `vmm stat` was asked.
#[derive(Clone, Debug)]
pub struct StatOptions {
    pub socket: PathBuf,
    pub interval: Duration,
    /// Refreshes to print; `None`: until the VM goes away.
    pub count: Option<u64>,
    pub json: bool,
}

/// Why `vmm stat` cannot read the VM.
pub use crate::api::client::ClientError as StatError;

/// Reads `GET /vpmu` from the socket at `path`.
pub fn fetch(path: &Path) -> Result<VpmuDoc, StatError> {
    let body = client::get(path, "/vpmu", IO_TIMEOUT)?;
    parse_doc(&body).map_err(|why| StatError::NotVmm(path.to_path_buf(), why))
}

/// [`fetch`], trying again for up to 5 s while the API is busy.
fn fetch_patiently(path: &Path) -> Result<VpmuDoc, StatError> {
    let body = client::get_patiently(path, "/vpmu", IO_TIMEOUT)?;
    parse_doc(&body).map_err(|why| StatError::NotVmm(path.to_path_buf(), why))
}

/// The export document, checked to be one.
pub fn parse_doc(body: &[u8]) -> Result<VpmuDoc, String> {
    serde_json::from_slice(body).map_err(|e| format!("GET /vpmu is not the vPMU export: {e}"))
}

/// One counter line of a refresh.
#[derive(Clone, Debug, PartialEq)]
pub struct CounterRow {
    pub vcpu: u8,
    pub counter: String,
    pub event: String,
    pub id: ProgrammingId,
    pub usr: bool,
    pub os: bool,
    pub int: bool,
    pub running: bool,
    pub value: u64,
    /// Counted under the current programming.
    pub count: u64,
    /// Per second since the previous read (`None` on the first).
    pub rate: Option<f64>,
    pub backing: &'static str,
    pub reason: Option<String>,
    pub enabled_ns: u64,
    pub running_ns: u64,
}

impl CounterRow {
    /// Share of the host event's enabled time it was on a counter.
    pub fn running_pct(&self) -> Option<f64> {
        (self.enabled_ns > 0).then(|| 100.0 * self.running_ns as f64 / self.enabled_ns as f64)
    }
}

/// One VM total line of a refresh.
#[derive(Clone, Debug, PartialEq)]
pub struct TotalRow {
    pub event: String,
    pub id_hex: String,
    pub count: u64,
    pub rate: Option<f64>,
}

/// A refresh: every row, with rates between `before` and `now`.
#[derive(Clone, Debug, PartialEq)]
pub struct Refresh {
    pub uptime_ms: u64,
    pub paused: bool,
    pub vcpus: Vec<(u8, bool)>,
    pub counters: Vec<CounterRow>,
    pub totals: Vec<TotalRow>,
    pub elapsed: Option<Duration>,
}

/// A counter is shown once the guest programmed it.
fn shown(c: &CounterSnapshot) -> bool {
    c.running || c.ran || c.counted > 0 || c.control != 0
}

fn rate(now: u64, before: Option<u64>, elapsed: Option<Duration>) -> Option<f64> {
    let secs = elapsed?.as_secs_f64();
    (secs > 0.0).then(|| now.saturating_sub(before.unwrap_or(0)) as f64 / secs)
}

/// Builds a refresh from the current read and the previous one (taken
/// `elapsed` earlier). A counter reprogrammed in between restarts its
/// count: its rate is what it counted since.
pub fn refresh(now: &VpmuDoc, before: Option<&VpmuDoc>, elapsed: Option<Duration>) -> Refresh {
    let mut previous: HashMap<(u8, u32), (u64, u64)> = HashMap::new();
    let mut previous_totals: HashMap<ProgrammingId, u64> = HashMap::new();
    if let Some(before) = before {
        for v in &before.vcpus {
            for c in &v.vpmu.counters {
                previous.insert((v.index, c.msr), (c.generation, c.counted));
            }
        }
        previous_totals.extend(before.totals.iter().map(|t| (t.id, t.count)));
    }
    let elapsed = before.and(elapsed);
    let mut counters = Vec::new();
    for v in &now.vcpus {
        for c in v.vpmu.counters.iter().filter(|c| shown(c)) {
            let before = previous
                .get(&(v.index, c.msr))
                .filter(|(generation, _)| *generation == c.generation)
                .map(|&(_, counted)| counted);
            let reason = match &c.backing {
                Backing::Unbacked { reason } => Some(reason.to_string()),
                Backing::Denied => Some("denied by the event policy".to_string()),
                _ => None,
            };
            counters.push(CounterRow {
                vcpu: v.index,
                counter: counter_label(c),
                event: event_label(c),
                id: c.programming_id,
                usr: c.decoded.usr,
                os: c.decoded.os,
                int: c.decoded.int,
                running: c.running,
                value: c.value,
                count: c.counted,
                rate: rate(c.counted, before, elapsed),
                backing: backing_label(&c.backing),
                reason,
                enabled_ns: c.host_time_enabled_ns,
                running_ns: c.host_time_running_ns,
            });
        }
    }
    let totals = now
        .totals
        .iter()
        .map(|t| TotalRow {
            event: t.event.clone(),
            id_hex: t.id_hex.clone(),
            count: t.count,
            rate: rate(t.count, previous_totals.get(&t.id).copied(), elapsed),
        })
        .collect();
    Refresh {
        uptime_ms: now.vm.uptime_ms,
        paused: now.vm.paused,
        vcpus: now.vcpus.iter().map(|v| (v.index, v.paused)).collect(),
        counters,
        totals,
        elapsed,
    }
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// A rate with an SI prefix: `2.40 G`.
pub fn si(x: f64) -> String {
    let prefixes = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    match prefixes.iter().find(|(scale, _)| x >= *scale) {
        Some((scale, p)) => format!("{:.2} {p}", x / scale),
        None => format!("{x:.2}  "),
    }
}

fn modifiers(r: &CounterRow) -> String {
    let mut m: Vec<&str> = Vec::new();
    match (r.usr, r.os) {
        (true, true) => m.push("u+k"),
        (true, false) => m.push("u"),
        (false, true) => m.push("k"),
        (false, false) => {}
    }
    if r.int {
        m.push("int");
    }
    if !r.running {
        m.push("off");
    }
    m.join(",")
}

/// The refresh as a table.
pub fn table(r: &Refresh, socket: &Path) -> String {
    let mut out = String::new();
    let paused = r.vcpus.iter().filter(|(_, p)| *p).count();
    let state = match (r.paused, paused) {
        (true, _) => ", paused".to_string(),
        (false, 0) => String::new(),
        (false, n) => format!(", {n} vCPUs parked"),
    };
    let over = match r.elapsed {
        Some(e) => format!(", rates over {:.2} s", e.as_secs_f64()),
        None => String::new(),
    };
    out.push_str(&format!(
        "vmm stat {}: {} vCPUs, up {:.1} s{state}{over}\n",
        socket.display(),
        r.vcpus.len(),
        r.uptime_ms as f64 / 1000.0
    ));
    out.push_str(&format!(
        "{:>5}  {:<8} {:<16} {:<11} {:>22} {:>10}  {:<15} {:>8}\n",
        "vcpu", "counter", "event", "modifiers", "count", "rate/s", "backing", "running"
    ));
    let rate_txt = |rate: Option<f64>| rate.map(si).unwrap_or_else(|| "-".into());
    for row in &r.counters {
        let running = row
            .running_pct()
            .map(|p| format!("{p:.1}%"))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:>5}  {:<8} {:<16} {:<11} {:>22} {:>10}  {:<15} {:>8}\n",
            row.vcpu,
            row.counter,
            printable(&row.event),
            modifiers(row),
            thousands(row.count),
            rate_txt(row.rate),
            row.backing,
            running
        ));
    }
    if r.counters.is_empty() {
        out.push_str("        (the guest has programmed no counter)\n");
    }
    for t in &r.totals {
        out.push_str(&format!(
            "{:>5}  {:<8} {:<16} {:<11} {:>22} {:>10}\n",
            "total",
            "",
            printable(&t.event),
            printable(&t.id_hex),
            thousands(t.count),
            rate_txt(t.rate)
        ));
    }
    let mut reasons: Vec<String> = r
        .counters
        .iter()
        .filter_map(|c| {
            let why = c.reason.as_ref()?;
            Some(format!("{}: {}", printable(&c.event), printable(why)))
        })
        .collect();
    reasons.sort();
    reasons.dedup();
    for why in reasons {
        out.push_str(&format!("  not counting: {why}\n"));
    }
    out
}

/// The refresh as one JSON object.
pub fn json(r: &Refresh) -> serde_json::Value {
    let vcpus: Vec<serde_json::Value> = r
        .vcpus
        .iter()
        .map(|&(vcpu, paused)| {
            let counters: Vec<serde_json::Value> = r
                .counters
                .iter()
                .filter(|c| c.vcpu == vcpu)
                .map(|c| {
                    json!({
                        "counter": c.counter,
                        "event": c.event,
                        "id": format!("{:#x}", c.id.0),
                        "usr": c.usr,
                        "os": c.os,
                        "int": c.int,
                        "running": c.running,
                        "value": c.value,
                        "count": c.count,
                        "rate_per_s": c.rate,
                        "backing": c.backing,
                        "reason": c.reason,
                        "host_time_enabled_ns": c.enabled_ns,
                        "host_time_running_ns": c.running_ns,
                        "running_pct": c.running_pct(),
                    })
                })
                .collect();
            json!({ "vcpu": vcpu, "paused": paused, "counters": counters })
        })
        .collect();
    let totals: Vec<serde_json::Value> = r
        .totals
        .iter()
        .map(
            |t| json!({ "event": t.event, "id": t.id_hex, "count": t.count, "rate_per_s": t.rate }),
        )
        .collect();
    json!({
        "uptime_ms": r.uptime_ms,
        "paused": r.paused,
        "interval_ms": r.elapsed.map(|e| e.as_millis() as u64),
        "vcpus": vcpus,
        "totals": totals,
    })
}

/// Runs `vmm stat`; returns the exit code: 0 done, 1 the VM went away
/// before `--count` refreshes (or stopped answering in time), 2 the socket
/// is missing, not a vmm API or gives no first answer in time.
pub fn run(opts: &StatOptions) -> i32 {
    let mut before = match fetch_patiently(&opts.socket) {
        Ok(doc) => doc,
        Err(e) => {
            eprintln!("vmm stat: {}", printable(&e.to_string()));
            return 2;
        }
    };
    let mut taken = Instant::now();
    let mut printed = 0u64;
    let mut stdout = std::io::stdout().lock();
    while opts.count.is_none_or(|n| printed < n) {
        std::thread::sleep(opts.interval.saturating_sub(taken.elapsed()));
        let now = match fetch_patiently(&opts.socket) {
            Ok(doc) => doc,
            Err(e @ (StatError::Busy(..) | StatError::Timeout(..))) => {
                eprintln!("vmm stat: {}", printable(&e.to_string()));
                return 1;
            }
            Err(_) => {
                eprintln!(
                    "vmm stat: the VM at {} went away after {printed} refreshes",
                    opts.socket.display()
                );
                return opts.count.is_some() as i32;
            }
        };
        let at = Instant::now();
        let r = refresh(&now, Some(&before), Some(at - taken));
        let text = match opts.json {
            true => format!("{}\n", json(&r)),
            false => format!("{}\n", table(&r, &opts.socket)),
        };
        // A closed stdout (`| head`) ends the view quietly.
        if stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return 0;
        }
        printed += 1;
        (before, taken) = (now, at);
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pmu::export::{fixtures, Export};
    use std::sync::Arc;

    /// What the server answers for one vCPU whose counter 0 counted
    /// `counted` under programming `generation`, and a VM total of `total`
    /// for its programming; read back as `vmm stat` reads it.
    fn doc(counted: u64, generation: u64, total: u64) -> VpmuDoc {
        let select = 0x76 | vpmu::evtsel::USR | vpmu::evtsel::OS | vpmu::evtsel::EN;
        let mut counter = fixtures::counter(0, select, counted, true);
        counter.event_name = Some("cycles".into());
        (counter.generation, counter.host_time_enabled_ns) = (generation, 200);
        counter.host_time_running_ns = 100;
        let retired = [(select, total - counted, 1)];
        let views = [Arc::new(fixtures::view(0, vec![counter], &retired))];
        let export = Export::new(Arc::new(fixtures::plan(None)), 1);
        let sent = serde_json::to_vec(&VpmuDoc::new(
            &"vm".parse().unwrap(),
            &export,
            &views,
            false,
        ))
        .unwrap();
        parse_doc(&sent).unwrap()
    }

    #[test]
    fn rates_are_per_second_and_restart_with_a_new_programming() {
        let half = Some(Duration::from_millis(500));
        let r = refresh(&doc(3000, 1, 5000), Some(&doc(1000, 1, 2000)), half);
        assert_eq!(r.counters[0].rate, Some(4000.0));
        assert_eq!(r.totals[0].rate, Some(6000.0));
        assert_eq!(r.counters[0].running_pct(), Some(50.0));
        let r = refresh(&doc(300, 2, 5000), Some(&doc(1000, 1, 4000)), half);
        assert_eq!(
            r.counters[0].rate,
            Some(600.0),
            "counted since reprogrammed"
        );
        let first = refresh(&doc(300, 2, 5000), None, half);
        assert_eq!(first.counters[0].rate, None);
        let text = table(&r, Path::new("/s"));
        assert!(text.contains("cycles") && text.contains("u+k") && text.contains("50.0%"));
        let j = json(&r);
        assert_eq!(j["vcpus"][0]["counters"][0]["count"], 300);
        assert_eq!(j["totals"][0]["rate_per_s"], 2000.0);
    }

    #[test]
    fn numbers_are_grouped_and_prefixed() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(123456), "123,456");
        assert_eq!(si(2.4e9), "2.40 G");
        assert_eq!(si(12.0), "12.00  ");
    }

    #[test]
    fn answers_that_are_not_the_export_are_refused() {
        assert!(parse_doc(b"{}").is_err());
        assert!(parse_doc(b"[1,2]").is_err());
    }
}
