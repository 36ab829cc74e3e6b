//! `vmm top`: every VM on the host in one table that refreshes, like
//! `virt-top`: name, vCPUs, guest cycles per second per vCPU, PMIs and
//! PMU MSR exits per second, how the counters are backed, and state. Read
//! through [`crate::fleet`]; drawn with `ratatui` on a terminal, printed as
//! plain text with `--once` or when stdout is not a terminal.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::Constraint;
use ratatui::style::{Modifier, Style};
use ratatui::widgets::{Block, Row as TableRow, Table};

use crate::api::documents::{backing_label, VpmuDoc};
use crate::fleet::{Fleet, Scraped};

/// What `vmm top` was asked.
pub struct TopOptions {
    pub sockets: PathBuf,
    pub interval: Duration,
    pub once: bool,
    pub sort: SortKey,
}

/// The column rows are sorted by (largest first, names A to Z).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    Name,
    Cycles,
    Pmis,
    Exits,
}

/// A VM's counts at one read.
#[derive(Clone, Copy)]
struct Counts {
    /// When its views were taken: the read less their mean age (the fleet
    /// reads without waiting for fresh views, so they may be as old as the
    /// last read).
    at: Instant,
    cycles: u64,
    pmis: u64,
    exits: u64,
}

impl Counts {
    fn of(doc: &VpmuDoc, read: Instant) -> Self {
        let stats = doc.vcpus.iter().map(|v| &v.vpmu.stats);
        let ages: u64 = doc.vcpus.iter().map(|v| v.age_ms).sum();
        let age = Duration::from_millis(ages / (doc.vcpus.len().max(1) as u64));
        Counts {
            at: read.checked_sub(age).unwrap_or(read),
            cycles: doc
                .totals
                .iter()
                .filter(|t| t.event == "cycles")
                .map(|t| t.count)
                .sum(),
            pmis: stats.clone().map(|s| s.pmis).sum(),
            exits: stats.map(|s| s.rdmsr.total() + s.wrmsr.total()).sum(),
        }
    }
}

/// One line of the table.
#[derive(Clone, Debug, PartialEq)]
struct Line {
    name: String,
    vcpus: usize,
    /// Per second (cycles: per vCPU); `None` before a second read.
    cycles: Option<f64>,
    pmis: Option<f64>,
    exits: Option<f64>,
    backing: String,
    state: String,
}

const HEADER: [&str; 7] = [
    "VM",
    "vCPUs",
    "cycles/s/vCPU",
    "PMIs/s",
    "MSR exits/s",
    "backing",
    "state",
];

/// The table's lines from a scrape, with rates against `last` (updated).
fn lines(vms: &[Scraped], last: &mut HashMap<PathBuf, Counts>, now: Instant) -> Vec<Line> {
    let mut out = Vec::new();
    for vm in vms {
        let Ok(doc) = &vm.state else {
            let down = vm.state.as_ref().err().map_or("", |d| d.label());
            out.push(Line {
                name: vm.name.clone(),
                vcpus: 0,
                cycles: None,
                pmis: None,
                exits: None,
                backing: String::new(),
                state: format!("down ({down})"),
            });
            continue;
        };
        let counts = Counts::of(doc, now);
        let before = last.insert(vm.socket.clone(), counts);
        let rate = |pick: fn(&Counts) -> u64| {
            let b = before?;
            let secs = counts.at.saturating_duration_since(b.at).as_secs_f64();
            (secs > 0.0).then(|| pick(&counts).saturating_sub(pick(&b)) as f64 / secs)
        };
        let vcpus = doc.vcpus.len();
        out.push(Line {
            name: vm.name.clone(),
            vcpus,
            cycles: rate(|c| c.cycles).map(|r| r / vcpus.max(1) as f64),
            pmis: rate(|c| c.pmis),
            exits: rate(|c| c.exits),
            backing: backings(doc),
            state: if doc.vm.paused { "paused" } else { "running" }.into(),
        });
    }
    last.retain(|socket, _| vms.iter().any(|v| &v.socket == socket));
    out
}

/// The backings of the counters the guest enabled, each once.
fn backings(doc: &VpmuDoc) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for c in doc.vcpus.iter().flat_map(|v| &v.vpmu.counters) {
        let label = backing_label(&c.backing);
        if c.running && !seen.contains(&label) {
            seen.push(label);
        }
    }
    if seen.is_empty() {
        return "-".into();
    }
    seen.join(",")
}

fn sort(lines: &mut [Line], key: SortKey) {
    let by = |l: &Line| match key {
        SortKey::Name => 0.0,
        SortKey::Cycles => l.cycles.unwrap_or(-1.0),
        SortKey::Pmis => l.pmis.unwrap_or(-1.0),
        SortKey::Exits => l.exits.unwrap_or(-1.0),
    };
    lines.sort_by(|a, b| by(b).total_cmp(&by(a)).then_with(|| a.name.cmp(&b.name)));
}

/// A rate as people read it: 1.23 G, 456.7 M, 12.3 k.
fn human(rate: Option<f64>) -> String {
    let Some(r) = rate else { return "-".into() };
    match r {
        r if r >= 1e9 => format!("{:.2} G", r / 1e9),
        r if r >= 1e6 => format!("{:.1} M", r / 1e6),
        r if r >= 1e3 => format!("{:.1} k", r / 1e3),
        r => format!("{r:.0}"),
    }
}

fn cells(l: &Line) -> [String; 7] {
    let vcpus = if l.vcpus == 0 {
        "-".into()
    } else {
        l.vcpus.to_string()
    };
    [
        l.name.clone(),
        vcpus,
        human(l.cycles),
        human(l.pmis),
        human(l.exits),
        l.backing.clone(),
        l.state.clone(),
    ]
}

/// The table as plain text.
fn plain(lines: &[Line]) -> String {
    let rows: Vec<[String; 7]> = std::iter::once(HEADER.map(String::from))
        .chain(lines.iter().map(cells))
        .collect();
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cols: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cols.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Runs `vmm top`; the exit code.
pub fn run(options: &TopOptions) -> i32 {
    match std::fs::metadata(&options.sockets) {
        Ok(meta) if meta.is_dir() => {}
        _ => {
            eprintln!(
                "vmm top: --sockets {}: not a directory",
                options.sockets.display()
            );
            return 2;
        }
    }
    let ms = Duration::from_millis;
    let fleet = Fleet::new(options.sockets.clone(), ms(250), ms(800));
    let mut top = Top {
        fleet,
        last: HashMap::new(),
        sort: options.sort,
    };
    if options.once || !std::io::stdout().is_terminal() {
        return top.print(options);
    }
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vmm top: the terminal: {e}");
            return 2;
        }
    };
    let code = top.live(&mut terminal, options.interval);
    ratatui::restore();
    code
}

struct Top {
    fleet: Fleet,
    last: HashMap<PathBuf, Counts>,
    sort: SortKey,
}

impl Top {
    fn refresh(&mut self) -> Result<Vec<Line>, String> {
        let scrape = self.fleet.scrape().map_err(|e| e.to_string())?;
        let mut lines = lines(&scrape.vms, &mut self.last, Instant::now());
        sort(&mut lines, self.sort);
        Ok(lines)
    }

    /// Plain text: with `--once` one table of rates over one interval,
    /// else one table per interval until the process is ended.
    fn print(&mut self, options: &TopOptions) -> i32 {
        loop {
            if let Err(e) = self.refresh() {
                eprintln!("vmm top: {e}");
                return 2;
            }
            std::thread::sleep(options.interval);
            match self.refresh() {
                Ok(lines) => print!("{}", plain(&lines)),
                Err(e) => {
                    eprintln!("vmm top: {e}");
                    return 2;
                }
            }
            if options.once {
                return 0;
            }
            println!();
        }
    }

    /// The full-screen table until `q`: keys n, c, p, e sort.
    fn live(&mut self, terminal: &mut ratatui::DefaultTerminal, interval: Duration) -> i32 {
        let mut lines = Vec::new();
        let mut next = Instant::now();
        loop {
            if Instant::now() >= next {
                lines = self.refresh().unwrap_or_default();
                next = Instant::now() + interval;
            }
            let title = format!(
                " vmm top: {} (q quits; sort: n c p e) ",
                self.fleet.dir.display()
            );
            let draw = terminal.draw(|frame| {
                let rows = lines.iter().map(|l| TableRow::new(cells(l)));
                let widths = [16, 6, 14, 10, 12, 16, 14].map(Constraint::Length);
                let header = TableRow::new(HEADER).style(Style::new().add_modifier(Modifier::BOLD));
                let table = Table::new(rows, widths)
                    .header(header)
                    .block(Block::bordered().title(title));
                frame.render_widget(table, frame.area());
            });
            if draw.is_err() {
                return 1;
            }
            let wait = next.saturating_duration_since(Instant::now());
            if let Ok(true) = event::poll(wait) {
                if let Ok(Event::Key(key)) = event::read() {
                    if key.kind != KeyEventKind::Press {
                        continue;
                    }
                    match key.code {
                        KeyCode::Char('q') => return 0,
                        KeyCode::Char('n') => self.sort = SortKey::Name,
                        KeyCode::Char('c') => self.sort = SortKey::Cycles,
                        KeyCode::Char('p') => self.sort = SortKey::Pmis,
                        KeyCode::Char('e') => self.sort = SortKey::Exits,
                        _ => continue,
                    }
                    sort(&mut lines, self.sort);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pmu::export::{fixtures, Export};
    use std::sync::Arc;

    /// A VM whose one vCPU counted `cycles`, read with a view `age_ms` old.
    fn scraped(cycles: u64, age_ms: u64) -> Scraped {
        let mut counter = fixtures::counter(0, 0x43_0076, cycles, true);
        counter.event_name = Some("cycles".into());
        let view = Arc::new(fixtures::view(0, vec![counter], &[]));
        let plan = fixtures::plan(Some(fixtures::snapshot(vec![]).model));
        let export = Export::new(Arc::new(plan), 1);
        let mut doc = VpmuDoc::new(&"vm".parse().unwrap(), &export, &[view], false);
        doc.vcpus[0].age_ms = age_ms;
        Scraped {
            socket: PathBuf::from("/vm.sock"),
            name: "vm".into(),
            state: Ok(doc),
            took: Duration::ZERO,
        }
    }

    #[test]
    fn rates_run_between_the_times_the_views_were_taken_not_read() {
        let mut last = HashMap::new();
        let t0 = Instant::now();
        let first = lines(&[scraped(1_000_000, 0)], &mut last, t0);
        assert_eq!(first[0].cycles, None, "no rate from one read");
        // Read 1.5 s later, a view 0.5 s old: 1 s of counting.
        let t1 = t0 + Duration::from_millis(1500);
        let second = lines(&[scraped(2_000_000, 500)], &mut last, t1);
        let rate = second[0].cycles.unwrap();
        assert!((rate - 1e6).abs() < 1e3, "{rate}");
    }

    fn line(name: &str, cycles: Option<f64>) -> Line {
        Line {
            name: name.into(),
            vcpus: 1,
            cycles,
            pmis: Some(0.0),
            exits: None,
            backing: "software_clock".into(),
            state: "running".into(),
        }
    }

    #[test]
    fn rows_sort_by_their_key_and_print_as_a_plain_table() {
        let mut lines = vec![
            line("b", Some(5e8)),
            line("a", Some(2.5e9)),
            line("c", None),
        ];
        sort(&mut lines, SortKey::Cycles);
        let names: Vec<&str> = lines.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        sort(&mut lines, SortKey::Name);
        let text = plain(&lines);
        let rows: Vec<&str> = text.lines().collect();
        assert!(rows[0].starts_with("VM  vCPUs  cycles/s/vCPU"), "{text}");
        assert!(rows[1].starts_with("a   1      2.50 G"), "{text}");
        assert!(rows[2].contains("500.0 M"), "{text}");
        assert!(rows[3].contains(" - "), "{text}");
    }
}
