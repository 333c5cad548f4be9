//! Renders the charts of docs/benchmarks.md from the raw figures that the other benchmarks wrote under
//! target/bench/ (so that a chart can be redrawn without measuring again). Run by `make bench`
//! after the measurements.

mod support;

#[path = "charts/scale.rs"]
mod scale;

use serde_json::Value;
use support::Spread;

fn load(name: &str) -> Option<Vec<Value>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/bench/{name}.json"));
    let text = std::fs::read_to_string(&path).ok()?;
    serde_json::from_str(&text).ok()
}

/// One bar per `group`, in first-seen order: the spread of `value` over the runs that pass `keep`.
fn bars(runs: &[Value], group: &str, value: &str, keep: impl Fn(&Value) -> bool) -> Vec<(String, Spread)> {
    let mut order: Vec<String> = Vec::new();
    for run in runs.iter().filter(|r| keep(r)) {
        let name = run[group].as_str().unwrap_or_default().to_string();
        if !order.contains(&name) {
            order.push(name);
        }
    }
    order
        .into_iter()
        .filter_map(|name| {
            let values: Vec<f64> = runs
                .iter()
                .filter(|r| keep(r) && r[group] == name.as_str())
                .filter_map(|r| r[value].as_f64())
                .collect();
            (!values.is_empty()).then(|| (name, Spread::of(&values)))
        })
        .collect()
}

fn main() {
    if !support::invoked_by_cargo_bench() {
        return;
    }
    if let Some(runs) = load("shutdown") {
        let bars = bars(&runs, "launcher", "errors", |r| r["in_flight"] == 200);
        support::bar_chart(
            "bench-shutdown-errors",
            "Requests failed by a shutdown with 200 in flight",
            "failed requests",
            &bars,
        );
    }
    if let Some(mut runs) = load("rotation") {
        for run in &mut runs {
            let how = if run["hot_restart"] == true { "hot restart" } else { "stop, start" };
            let connections = if run["keep_alive"] == true { "keep-alive" } else { "new conn." };
            run["name"] = Value::from(format!("{how}, {connections}"));
        }
        let bars = bars(&runs, "name", "failed", |_| true);
        support::bar_chart(
            "bench-rotation-failures",
            "Requests failed by a certificate rotation",
            "failed requests",
            &bars,
        );
    }
    if let Some(mut runs) = load("rotation-in-place") {
        // Each bar's label says what the time cost besides: Envoys at once, long-lived connections cut.
        let modes: Vec<String> = bars(&runs, "mode", "served_ms", |_| true).into_iter().map(|(m, _)| m).collect();
        for mode in modes {
            let of = |r: &&Value| r["mode"] == mode.as_str();
            let total = |field: &str| runs.iter().filter(of).filter_map(|r| r[field].as_u64()).sum::<u64>();
            let envoys = runs.iter().filter(of).filter_map(|r| r["envoys_max"].as_u64()).max().unwrap_or(0);
            let cut = total("long_lived_https_cut") + total("long_lived_tcp_cut");
            let long_lived = total("long_lived_https") + total("long_lived_tcp");
            let plural = if envoys == 1 { "" } else { "s" };
            let name = format!("{mode} ({envoys} Envoy{plural}, {cut} of {long_lived} long-lived cut)");
            for run in runs.iter_mut().filter(|r| r["mode"] == mode.as_str()) {
                run["name"] = Value::from(name.clone());
            }
        }
        let served = bars(&runs, "name", "served_ms", |_| true);
        support::bar_chart(
            "bench-rotation-in-place",
            "Certificate rotation: new certificate file to its first handshake",
            "milliseconds",
            &served,
        );
    }
    if let Some(mut runs) = load("recovery") {
        for run in &mut runs {
            let connections = if run["keep_alive"] == true { "keep-alive" } else { "new conn." };
            run["name"] = Value::from(format!("{}, {connections}", run["way"].as_str().unwrap_or_default()));
        }
        let failed = bars(&runs, "name", "failed", |_| true);
        support::bar_chart(
            "bench-recovery-failures",
            "Requests failed by a blocked hot restart",
            "failed requests",
            &failed,
        );
        let healthy = bars(&runs, "name", "healthy_ms", |_| true);
        support::bar_chart(
            "bench-recovery-time",
            "Blocked hot restart to a healthy, hot-restartable Envoy",
            "milliseconds",
            &healthy,
        );
    }
    if let Some(runs) = load("overhead") {
        let live = bars(&runs, "launcher", "start_to_live_ms", |_| true);
        support::bar_chart("bench-start-to-live", "Start to Envoy LIVE", "milliseconds", &live);
        let mut rss = bars(&runs, "launcher", "rss_kib", |r| r["rss_kib"].is_number());
        // sesame's idle memory 2 s after a status request, next to its bar.
        let after = bars(&runs, "launcher", "rss_after_status_kib", |r| r["rss_after_status_kib"].is_number());
        for (name, spread) in after.into_iter().rev() {
            let at = rss.iter().position(|(n, _)| *n == name).map_or(rss.len(), |i| i + 1);
            rss.insert(at, (format!("{name}, after status"), spread));
        }
        for (_, spread) in &mut rss {
            *spread = Spread { median: spread.median / 1024.0, min: spread.min / 1024.0, max: spread.max / 1024.0 };
        }
        support::bar_chart("bench-idle-rss", "Resident memory of the init, Envoy under it", "MiB", &rss);
    }
    if let Some(runs) = load("reaping") {
        let wall = bars(&runs, "init", "reap_ms", |_| true);
        support::bar_chart("bench-reaping", "Reaping 10,000 orphans: wall time", "milliseconds", &wall);
        let cpu = bars(&runs, "init", "init_cpu_ms", |_| true);
        support::bar_chart("bench-reaping-cpu", "Reaping 10,000 orphans: CPU time of the init", "milliseconds", &cpu);
    }
    if let Some(runs) = load("scale-sni") {
        scale::sni(&runs);
    }
    if let Some(runs) = load("scale-reload") {
        scale::reload(&runs);
    }
    if let Some(runs) = load("scale-idle") {
        scale::idle(&runs);
    }
    println!("charts written to images/bench-*.svg");
}
