//! The markdown tables of the scale bench: medians with [min, max] over the runs of one row, counts
//! as a value (or a range when the runs differ).

use crate::idle;
use crate::reload::{self, thousands};
use crate::sni;
use crate::support::Spread;

fn spread<R>(runs: &[&R], value: impl Fn(&R) -> Option<f64>) -> String {
    let values: Vec<f64> = runs.iter().filter_map(|r| value(r)).collect();
    if values.is_empty() { "—".into() } else { Spread::of(&values).to_string() }
}

/// A count the runs of a row should agree on: its value, or its range when they do not.
fn count<R>(runs: &[&R], value: impl Fn(&R) -> Option<i64>) -> String {
    let values: Vec<i64> = runs.iter().filter_map(|r| value(r)).collect();
    match (values.iter().min(), values.iter().max()) {
        (Some(min), Some(max)) if min == max => min.to_string(),
        (Some(min), Some(max)) => format!("{min}–{max}"),
        _ => "—".into(),
    }
}

/// The rows of the SNI tables, in the order first run: (N, way).
fn sni_rows(runs: &[sni::Run]) -> Vec<(usize, String)> {
    let mut rows: Vec<(usize, String)> = Vec::new();
    for run in runs {
        if !rows.iter().any(|(n, way)| *n == run.n && *way == run.way) {
            rows.push((run.n, run.way.clone()));
        }
    }
    // Envoy alone, hot restart, in place, then in place at a limit too low for it.
    let rank = |way: &str| {
        [sni::Way::EnvoyAlone, sni::Way::HotRestart, sni::Way::InPlace].iter().position(|w| w.name() == way)
    };
    rows.sort_by_key(|(n, way)| (*n, rank(way).unwrap_or(3)));
    rows
}

pub fn sni(runs: &[sni::Run]) {
    let limit = runs.iter().map(|r| r.inotify_limit).max().unwrap_or(0);
    println!("## N SNI certificate pairs (fs.inotify.max_user_instances {limit} unless the row says otherwise)\n");
    println!(
        "| N | launcher | start → LIVE, ms | vs Envoy alone | sesame VmRSS / RssAnon 2 s after LIVE, KiB | sesame \
         peak VmHWM, KiB | Envoy's inotify instances |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (n, way) in sni_rows(runs) {
        let batch: Vec<&sni::Run> = runs.iter().filter(|r| r.n == n && r.way == way).collect();
        // The ratio run by run, against Envoy alone started in the same round.
        let alone =
            |round: usize| runs.iter().find(|r| r.n == n && r.round == round && r.way == sni::Way::EnvoyAlone.name());
        let ratios: Vec<f64> = batch
            .iter()
            .filter_map(|r| Some(r.start_to_live_ms / alone(r.round)?.start_to_live_ms))
            .filter(|_| way != sni::Way::EnvoyAlone.name())
            .collect();
        let ratio = if ratios.is_empty() { "—".into() } else { format!("{:.2}×", Spread::of(&ratios).median) };
        let memory = if batch.iter().all(|r| r.sesame_vm_rss_kib.is_none()) {
            "—".to_string()
        } else {
            let rss = spread(&batch, |r| r.sesame_vm_rss_kib.map(|v| v as f64));
            format!("{rss} / {}", spread(&batch, |r| r.sesame_rss_anon_kib.map(|v| v as f64)))
        };
        println!(
            "| {} | {way} | {} | {ratio} | {memory} | {} | {} |",
            thousands(n),
            spread(&batch, |r| Some(r.start_to_live_ms)),
            spread(&batch, |r| r.sesame_vm_hwm_kib.map(|v| v as f64)),
            count(&batch, |r| r.envoy_inotify_instances.map(|v| v as i64)),
        );
    }
    println!(
        "\n| N | --cert-reload | one pair: write → new serial served, ms | sesame CPU for it, ms | hot restarts / \
         swaps | all N: first write → all served, ms | last write → all served, ms | the N writes took, ms | hot \
         restarts / swaps | sesame CPU for all N, ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (n, way) in sni_rows(runs).into_iter().filter(|(_, way)| way != sni::Way::EnvoyAlone.name()) {
        let batch: Vec<&sni::Run> = runs.iter().filter(|r| r.n == n && r.way == way).collect();
        let counts = |of: fn(&sni::Run) -> Option<sni::Counts>| {
            let other = count(&batch, |r| of(r).map(|c| c.other));
            let other = if other == "0" { String::new() } else { format!(" ({other} other)") };
            format!(
                "{} / {}{other}",
                count(&batch, |r| of(r).map(|c| c.hot_restarts)),
                count(&batch, |r| of(r).map(|c| c.swaps))
            )
        };
        println!(
            "| {} | {way} | {} | {} | {} | {} | {} | {} | {} | {} |",
            thousands(n),
            spread(&batch, |r| r.one_served_ms),
            spread(&batch, |r| r.one_cpu_ms),
            counts(|r| r.one),
            spread(&batch, |r| r.burst_served_ms),
            spread(&batch, |r| r.burst_after_last_write_ms),
            spread(&batch, |r| r.burst_write_ms),
            counts(|r| r.burst),
            spread(&batch, |r| r.burst_cpu_ms),
        );
    }
    println!();
}

pub fn reload(runs: &[reload::Run]) {
    println!("## Large bootstraps: start, validation, reload\n");
    println!(
        "| bootstrap | size, KiB | Envoy alone: start → LIVE, ms | sesame: start → LIVE, ms | envoy --mode validate \
         alone, ms | POST /reload → new epoch LIVE, ms | of it, sesame's checks and validator, ms | of it, the new \
         epoch's start → LIVE, ms | validate alone / reload | sesame CPU for the reload, ms | sesame VmRSS / RssAnon / \
         VmHWM, KiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut names: Vec<&str> = Vec::new();
    for run in runs {
        if !names.contains(&run.bootstrap.as_str()) {
            names.push(&run.bootstrap);
        }
    }
    for name in names {
        let batch: Vec<&reload::Run> = runs.iter().filter(|r| r.bootstrap == name).collect();
        let share: Vec<f64> = batch.iter().map(|r| r.validate_alone_ms / r.reload_ms).collect();
        println!(
            "| {name} | {:.0} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {} / {} / {} |",
            batch[0].bootstrap_bytes as f64 / 1024.0,
            spread(&batch, |r| Some(r.envoy_alone_start_to_live_ms)),
            spread(&batch, |r| Some(r.sesame_start_to_live_ms)),
            spread(&batch, |r| Some(r.validate_alone_ms)),
            spread(&batch, |r| Some(r.reload_ms)),
            spread(&batch, |r| r.reload_checks_ms),
            spread(&batch, |r| r.reload_new_epoch_ms),
            Spread::of(&share).median,
            spread(&batch, |r| Some(r.sesame_reload_cpu_ms)),
            spread(&batch, |r| Some(r.sesame_vm_rss_kib as f64)),
            spread(&batch, |r| Some(r.sesame_rss_anon_kib as f64)),
            spread(&batch, |r| Some(r.sesame_vm_hwm_kib as f64)),
        );
    }
    println!();
}

pub fn idle(runs: &[idle::Run]) {
    println!(
        "## Idle keep-alive connections at SIGTERM (closed by the clients {} s after it; one by one: evenly over {} s)\n",
        1,
        idle::ONE_BY_ONE.as_secs()
    );
    println!(
        "| connections | init, clients' close | opened in, ms | closed by Envoy before the clients closed | SIGTERM → \
         Envoy exit, ms | last close → Envoy exit, ms | last close → drain ended, ms | last close → Envoy's last connection end, ms | Envoy's last connection end → drain ended, ms | sesame's admin requests in the drain (connection polls) | \
         admin requests/s | drain ended | open when sesame sent SIGTERM |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows: Vec<(usize, &str)> = Vec::new();
    for run in runs {
        if !rows.contains(&(run.connections, run.way)) {
            rows.push((run.connections, run.way));
        }
    }
    for (connections, way) in rows {
        let batch: Vec<&idle::Run> = runs.iter().filter(|r| r.connections == connections && r.way == way).collect();
        let ends: Vec<String> = batch.iter().filter_map(|r| r.drain_end.clone()).collect();
        let mut reasons: Vec<String> = Vec::new();
        for end in &ends {
            if !reasons.contains(end) {
                reasons.push(end.clone());
            }
        }
        let reasons = reasons
            .iter()
            .map(|why| format!("{why} ({} of {})", ends.iter().filter(|e| *e == why).count(), batch.len()))
            .collect::<Vec<_>>()
            .join("; ");
        let open: Vec<&str> = batch.iter().filter_map(|r| r.open_at_sigterm.as_deref()).collect();
        println!(
            "| {} | {way} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} |",
            thousands(connections),
            spread(&batch, |r| Some(r.open_ms)),
            count(&batch, |r| Some(r.closed_by_envoy as i64)),
            spread(&batch, |r| (r.sigterm_to_exit_ms > 0.0).then_some(r.sigterm_to_exit_ms)),
            spread(&batch, |r| r.last_close_to_exit_ms),
            spread(&batch, |r| r.last_close_to_drain_end_ms),
            spread(&batch, |r| r.last_close_to_last_end_ms),
            spread(&batch, |r| r.last_end_to_drain_end_ms),
            spread(&batch, |r| r.drain_admin_requests.map(|v| v as f64)),
            spread(&batch, |r| r.drain_polls.map(|v| v as f64)),
            spread(&batch, |r| Some(r.drain_admin_requests? as f64 / r.drain_seconds?)),
            if reasons.is_empty() { "—".to_string() } else { reasons },
            if open.is_empty() { "—".to_string() } else { open.join(", ") },
        );
    }
    let lost: Vec<String> =
        runs.iter().filter(|r| r.ends_lost).map(|r| format!("{} {}", r.connections, r.way)).collect();
    if !lost.is_empty() {
        println!("The bench's own watch of the connection ends lost some in: {}.", lost.join(", "));
    }
    println!();
}
