//! The charts of the scale bench (docs/benchmarks.md, "Scale"): a curve per way over the size, from
//! target/bench/scale-{sni,reload,idle}.json.

use serde_json::Value;

use crate::support::{self, Spread};

type Curve = (String, Vec<(f64, Spread)>);

/// One curve per value of `series` (in first-seen order), over `x`: the spread of `value` at each x.
fn curves(runs: &[Value], series: &str, x: &str, value: impl Fn(&Value) -> Option<f64>) -> Vec<Curve> {
    let mut names: Vec<String> = Vec::new();
    for run in runs.iter().filter(|r| value(r).is_some()) {
        let name = run[series].as_str().unwrap_or_default().to_string();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    // The same order in every chart: Envoy alone, then sesame's ways as the bench names them.
    let rank = |name: &str| ["envoy alone", "hot restart", "in place"].iter().position(|w| *w == name).unwrap_or(3);
    names.sort_by_key(|name| rank(name));
    names
        .into_iter()
        .map(|name| {
            let of: Vec<&Value> = runs.iter().filter(|r| r[series] == name.as_str() && value(r).is_some()).collect();
            let mut xs: Vec<f64> = of.iter().filter_map(|r| r[x].as_f64()).collect();
            xs.sort_by(f64::total_cmp);
            xs.dedup();
            let points = xs
                .into_iter()
                .map(|at| {
                    let values: Vec<f64> =
                        of.iter().filter(|r| r[x].as_f64() == Some(at)).filter_map(|r| value(r)).collect();
                    (at, Spread::of(&values))
                })
                .collect();
            (name, points)
        })
        .collect()
}

fn field(name: &'static str) -> impl Fn(&Value) -> Option<f64> {
    move |run| run[name].as_f64()
}

fn mib(name: &'static str) -> impl Fn(&Value) -> Option<f64> {
    move |run| run[name].as_f64().map(|kib| kib / 1024.0)
}

pub fn sni(runs: &[Value]) {
    let n = "N SNI certificate pairs";
    let start = curves(runs, "way", "n", field("start_to_live_ms"));
    support::line_chart("bench-scale-start", "Start to Envoy LIVE, N SNI certificates", n, "milliseconds", &start);
    let mut memory = curves(runs, "way", "n", mib("sesame_vm_rss_kib"));
    memory.iter_mut().for_each(|(name, _)| *name = format!("{name}, VmRSS"));
    let mut anon = curves(runs, "way", "n", mib("sesame_rss_anon_kib"));
    anon.iter_mut().for_each(|(name, _)| *name = format!("{name}, RssAnon"));
    memory.extend(anon);
    support::line_chart("bench-scale-memory", "sesame's own memory, 2 s after LIVE", n, "MiB", &memory);
    let peak = curves(runs, "way", "n", mib("sesame_vm_hwm_kib"));
    support::line_chart("bench-scale-memory-peak", "sesame's own peak memory (VmHWM) over the run", n, "MiB", &peak);
    let one = curves(runs, "way", "n", field("one_served_ms"));
    support::line_chart(
        "bench-scale-renew-one",
        "One pair renewed: write to new serial served",
        n,
        "milliseconds",
        &one,
    );
    let cpu = curves(runs, "way", "n", field("one_cpu_ms"));
    support::line_chart("bench-scale-renew-one-cpu", "One pair renewed: sesame's CPU time", n, "milliseconds", &cpu);
    let all = curves(runs, "way", "n", field("burst_served_ms"));
    support::line_chart("bench-scale-renew-all", "All N renewed: first write to all served", n, "milliseconds", &all);
}

pub fn reload(runs: &[Value]) {
    let mut bars = Vec::new();
    let mut names: Vec<&str> = runs.iter().filter_map(|r| r["bootstrap"].as_str()).collect();
    names.dedup();
    for name in names {
        let of: Vec<&Value> = runs.iter().filter(|r| r["bootstrap"] == name).collect();
        for (what, key) in [
            ("Envoy alone, start → LIVE", "envoy_alone_start_to_live_ms"),
            ("envoy --mode validate alone", "validate_alone_ms"),
            ("sesame, POST /reload → new epoch LIVE", "reload_ms"),
        ] {
            let values: Vec<f64> = of.iter().filter_map(|r| r[key].as_f64()).collect();
            if !values.is_empty() {
                bars.push((format!("{name}: {what}"), Spread::of(&values)));
            }
        }
    }
    support::bar_chart("bench-scale-reload", "Large bootstraps: start, validation and reload", "milliseconds", &bars);
}

pub fn idle(runs: &[Value]) {
    let c = "idle keep-alive connections at SIGTERM";
    let last = curves(runs, "way", "connections", field("last_close_to_exit_ms"));
    support::line_chart("bench-scale-idle-exit", "Last close to Envoy's exit", c, "milliseconds", &last);
    let end = curves(runs, "way", "connections", field("last_end_to_drain_end_ms"));
    let title = "Envoy's last connection end to the drain's end";
    support::line_chart("bench-scale-idle-drain-end", title, c, "milliseconds", &end);
    let admin = curves(runs, "way", "connections", field("drain_admin_requests"));
    support::line_chart("bench-scale-idle-admin", "sesame's admin requests during the drain", c, "requests", &admin);
}
