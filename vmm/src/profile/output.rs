//! A [`Profile`] as folded stacks (what flame-graph tools read), an SVG
//! flame graph (drawn by `inferno`) or a `perf report --stdio`-like table.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{Profile, Stack, MODE_DROPPED, MODE_USER};

/// Rows of the table.
pub const TOP: usize = 25;

/// The frames of one stack, outermost first, as flame graphs draw them: a
/// truncated kernel stack starts with `[truncated: WHY]`, a user-mode
/// sample is one `[user cr3=0x...]` frame.
pub fn frames(stack: &Stack) -> Vec<String> {
    match stack.mode.as_str() {
        MODE_USER => vec![format!("[user cr3={:#x}]", stack.cr3.map_or(0, |c| c.0))],
        MODE_DROPPED => vec!["[dropped: too many distinct stacks]".into()],
        _ => {
            let mut out: Vec<String> = stack
                .truncated
                .iter()
                .map(|t| format!("[truncated: {t}]"))
                .collect();
            out.extend(stack.names.iter().rev().map(|n| clean(n)));
            out
        }
    }
}

/// A name as one folded frame: no `;` (the separator) or line breaks.
fn clean(name: &str) -> String {
    name.replace(';', ",").replace(['\n', '\r'], " ")
}

/// Folded stacks, `outer;...;leaf COUNT`, one line per distinct stack,
/// sorted.
pub fn folded(profile: &Profile) -> String {
    let mut lines: BTreeMap<String, u64> = BTreeMap::new();
    for stack in &profile.stacks {
        *lines.entry(frames(stack).join(";")).or_default() += stack.count;
    }
    lines
        .into_iter()
        .map(|(stack, count)| format!("{stack} {count}\n"))
        .collect()
}

/// One line saying what the profile is.
pub fn title(profile: &Profile) -> String {
    let source = profile
        .per_vcpu
        .iter()
        .map(|v| v.source.as_str())
        .find(|s| !s.is_empty())
        .unwrap_or("no sampling event");
    // The length sampled: shorter than asked when the VM ended first.
    let length = profile.length();
    let over = match length + 0.05 < profile.seconds {
        true => format!(
            "{length:.1} s (of {} s asked: the VM ended)",
            profile.seconds
        ),
        false => format!("{} s", profile.seconds),
    };
    format!(
        "vmm profile: {} samples of {} vCPU{} over {over} at {} Hz ({source})",
        profile.samples,
        profile.vcpus,
        if profile.vcpus == 1 { "" } else { "s" },
        profile.hz
    )
}

/// What was left out, if anything: samples of stacks past the bounds on
/// what the VMM keeps, and stacks merged to keep the answer small.
pub fn dropped(profile: &Profile) -> Option<String> {
    let dropped = profile.dropped();
    (dropped > 0).then(|| {
        format!(
            "{dropped} samples counted as [dropped]: {} of new stacks past what the VMM keeps \
             per vCPU and per profile, {} of {} less frequent stacks merged to keep the answer \
             small",
            dropped - profile.merged_samples,
            profile.merged_samples,
            profile.merged_stacks
        )
    })
}

/// An SVG flame graph.
pub fn svg(profile: &Profile) -> std::io::Result<Vec<u8>> {
    let folded = folded(profile);
    let mut options = inferno::flamegraph::Options::default();
    options.title = title(profile);
    let mut subtitle = format!("{}; {}", profile.symbols, profile.kaslr);
    if let Some(dropped) = dropped(profile) {
        subtitle.push_str("; ");
        subtitle.push_str(&dropped);
    }
    options.subtitle = Some(subtitle);
    options.count_name = "samples".into();
    let mut out = Vec::new();
    if folded.is_empty() {
        // inferno refuses an empty profile; say so in an SVG all the same.
        options.title = format!("{} (no samples)", options.title);
        inferno::flamegraph::from_lines(&mut options, ["[no samples] 1"], &mut out)?;
    } else {
        inferno::flamegraph::from_lines(&mut options, folded.lines(), &mut out)?;
    }
    Ok(out)
}

/// Samples per leaf (`self`) and per function anywhere on the stack
/// (`total`, counted once per sample), by name.
fn tallies(profile: &Profile) -> (HashMap<String, u64>, HashMap<String, u64>) {
    let (mut own, mut total): (HashMap<String, u64>, HashMap<String, u64>) = Default::default();
    for stack in &profile.stacks {
        let frames = frames(stack);
        let Some(leaf) = frames.last() else { continue };
        *own.entry(leaf.clone()).or_default() += stack.count;
        let distinct: HashSet<&String> = frames.iter().collect();
        for name in distinct {
            *total.entry(name.clone()).or_default() += stack.count;
        }
    }
    (own, total)
}

/// A table like `perf report --stdio`: a header saying what was sampled
/// and how, then the [`TOP`] functions by samples in themselves.
pub fn text(profile: &Profile) -> String {
    let mut out = format!("# {}\n", title(profile));
    out.push_str(&format!(
        "# expected {} samples (seconds x Hz x vCPUs)\n",
        profile.expected
    ));
    if let Some(dropped) = dropped(profile) {
        out.push_str(&format!("# {dropped}\n"));
    }
    for v in &profile.per_vcpu {
        let state = match (&v.error, v.answered) {
            (_, false) => " (did not answer: paused or stopped)".to_string(),
            (Some(e), _) => format!(" ({e})"),
            (None, true) => String::new(),
        };
        out.push_str(&format!(
            "# vCPU {}: {} samples over {:.1} ms of {}, {} user, {} truncated, {} dropped{state}\n",
            v.vcpu,
            v.samples,
            v.run_ms,
            if v.source.is_empty() { "-" } else { &v.source },
            v.user,
            v.truncated,
            v.dropped
        ));
    }
    out.push_str(&format!(
        "# symbols: {}\n# {}\n",
        profile.symbols, profile.kaslr
    ));
    let user: u64 = profile.per_vcpu.iter().map(|v| v.user).sum();
    let truncated: u64 = profile.per_vcpu.iter().map(|v| v.truncated).sum();
    let pct = |n: u64| 100.0 * n as f64 / profile.samples.max(1) as f64;
    out.push_str(&format!(
        "# user-mode samples: {user} ({:.2}%), truncated kernel stacks: {truncated} ({:.2}%)\n#\n",
        pct(user),
        pct(truncated)
    ));
    out.push_str("# Overhead  Children   Samples  Symbol\n");
    out.push_str("# ........  ........  ........  ......\n");
    let (own, total) = tallies(profile);
    let mut rows: Vec<(&String, &u64)> = own.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (name, count) in rows.into_iter().take(TOP) {
        out.push_str(&format!(
            "  {:>7.2}%  {:>7.2}%  {:>8}  {name}\n",
            pct(*count),
            pct(total.get(name).copied().unwrap_or(0)),
            count
        ));
    }
    if profile.samples == 0 {
        out.push_str("  (no samples)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{Hex, VcpuSummary, MODE_KERNEL};
    use super::*;

    fn stack(count: u64, names: &[&str], truncated: Option<&str>) -> Stack {
        Stack {
            count,
            mode: MODE_KERNEL.into(),
            cr3: None,
            frames: names.iter().map(|_| Hex(1)).collect(),
            names: names.iter().map(|s| s.to_string()).collect(),
            truncated: truncated.map(String::from),
        }
    }

    fn profile() -> Profile {
        let mut user = stack(2, &[], None);
        user.mode = MODE_USER.into();
        user.cr3 = Some(Hex(0x7000));
        Profile {
            seconds: 1.0,
            elapsed: 1.0,
            hz: 10,
            vcpus: 1,
            samples: 10,
            expected: 10,
            merged_stacks: 0,
            merged_samples: 0,
            symbols: "3 symbols from m".into(),
            kaslr: "KASLR offset 0x0".into(),
            kaslr_offset: Hex(0),
            per_vcpu: vec![VcpuSummary {
                vcpu: 0,
                answered: true,
                source: "task-clock".into(),
                samples: 10,
                user: 2,
                truncated: 1,
                ..Default::default()
            }],
            stacks: vec![
                stack(4, &["leaf", "mid", "main"], None),
                stack(3, &["leaf", "other;odd", "main"], None),
                stack(1, &["mid", "main"], Some("frame-pointer cycle")),
                user,
            ],
        }
    }

    #[test]
    fn folded_stacks_run_outermost_first_with_their_markers() {
        let f = folded(&profile());
        assert_eq!(
            f,
            "[truncated: frame-pointer cycle];main;mid 1\n\
             [user cr3=0x7000] 2\n\
             main;mid;leaf 4\n\
             main;other,odd;leaf 3\n"
        );
    }

    #[test]
    fn the_table_ranks_functions_by_their_own_samples() {
        let t = text(&profile());
        assert!(
            t.contains("# vmm profile: 10 samples of 1 vCPU over 1 s at 10 Hz (task-clock)"),
            "{t}"
        );
        assert!(t.contains("user-mode samples: 2 (20.00%)"), "{t}");
        let rows: Vec<&str> = t.lines().filter(|l| !l.starts_with('#')).collect();
        // leaf: 7 own, 7 total; [user ...]: 2; mid: 1 own, 5 total; main: 0 own.
        assert!(
            rows[0].contains("70.00%") && rows[0].ends_with("leaf"),
            "{rows:?}"
        );
        assert!(rows[1].ends_with("[user cr3=0x7000]"), "{rows:?}");
        assert!(
            rows[2].contains("10.00%") && rows[2].contains("50.00%") && rows[2].ends_with("mid"),
            "{rows:?}"
        );
        assert_eq!(rows.len(), 3);
    }

    #[test]
    fn the_flame_graph_is_an_svg_even_without_samples() {
        let drawn = String::from_utf8(svg(&profile()).unwrap()).unwrap();
        assert!(
            drawn.starts_with("<?xml") && drawn.contains("<svg"),
            "{}",
            &drawn[..100]
        );
        assert!(drawn.contains("leaf") && drawn.contains("[user cr3=0x7000]"));
        let mut empty = profile();
        empty.stacks.clear();
        empty.samples = 0;
        let drawn = String::from_utf8(svg(&empty).unwrap()).unwrap();
        assert!(drawn.contains("no samples"));
        assert!(text(&empty).contains("(no samples)"));
    }

    #[test]
    fn the_table_says_how_long_was_sampled_and_what_was_dropped() {
        let mut p = profile();
        p.seconds = 20.0;
        p.elapsed = 3.04;
        p.stacks.push(Stack {
            count: 5,
            mode: MODE_DROPPED.into(),
            cr3: None,
            frames: Vec::new(),
            names: Vec::new(),
            truncated: None,
        });
        p.merged_stacks = 2;
        p.merged_samples = 3;
        let t = text(&p);
        assert!(
            t.contains("over 3.0 s (of 20 s asked: the VM ended) at 10 Hz"),
            "{t}"
        );
        assert!(
            t.contains("# 5 samples counted as [dropped]: 2 of new stacks past what the VMM keeps per vCPU and per profile, 3 of 2 less frequent stacks merged"),
            "{t}"
        );
        assert!(folded(&p).contains("[dropped: too many distinct stacks] 5"));
        let drawn = String::from_utf8(svg(&p).unwrap()).unwrap();
        assert!(drawn.contains("5 samples counted as [dropped]"));
        // As asked (the answer of an older VMM has no elapsed): no note.
        p.elapsed = 0.0;
        assert!(text(&p).contains("over 20 s at 10 Hz"), "{}", text(&p));
        p.elapsed = 19.98;
        assert!(text(&p).contains("over 20 s at 10 Hz"), "{}", text(&p));
    }
}
