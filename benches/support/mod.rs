//! What the benchmarks share: quick mode, medians with their spread, raw figures as JSON under
//! target/bench/, bar and line charts as SVG under images/, and Envoy run alone with the flags
//! sesame gives it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use plotters::prelude::*;

/// `make bench QUICK=1` (SESAME_BENCH_QUICK set): one run per figure, for a quick look.
pub fn quick() -> bool {
    std::env::var_os("SESAME_BENCH_QUICK").is_some_and(|v| !v.is_empty())
}

/// Runs per figure: at least 5, so that a median means something.
pub fn runs() -> usize {
    if quick() { 1 } else { 5 }
}

/// `cargo test --benches` runs bench binaries too; only `cargo bench` passes --bench.
pub fn invoked_by_cargo_bench() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Median, min and max of a set of figures.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
        Spread { median, min: sorted[0], max: sorted[n - 1] }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digits = if self.max < 10.0 { 1 } else { 0 };
        write!(f, "{:.*} [{:.*}, {:.*}]", digits, self.median, digits, self.min, digits, self.max)
    }
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Writes the raw figures to target/bench/NAME.json.
pub fn write_json(name: &str, value: &impl serde::Serialize) -> PathBuf {
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir).expect("create target/bench");
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(value).expect("json")).expect("write json");
    path
}

/// A horizontal bar per label (median), with a whisker from min to max; written to images/NAME.svg.
/// Readable on light and dark backgrounds: mid-tone bars and grey text on a transparent canvas.
pub fn bar_chart(name: &str, title: &str, unit: &str, bars: &[(String, Spread)]) {
    let path = root().join("images").join(format!("{name}.svg"));
    let height = 80 + 56 * bars.len() as u32;
    let root_area = SVGBackend::new(&path, (720, height)).into_drawing_area();
    let max = bars.iter().map(|(_, s)| s.max).fold(0.0_f64, f64::max).max(1e-9) * 1.1;
    let grey = RGBColor(128, 128, 128);
    let text = ("sans-serif", 15).into_font().color(&grey);
    let rows = bars.len() as f64;
    let mut chart = ChartBuilder::on(&root_area)
        .caption(title, ("sans-serif", 18).into_font().color(&grey))
        .margin(14)
        .x_label_area_size(34)
        .y_label_area_size(8)
        .build_cartesian_2d(0.0..max, 0.0..rows)
        .expect("chart");
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .bold_line_style(grey.mix(0.25))
        .light_line_style(grey.mix(0.1))
        .axis_style(grey)
        .x_desc(unit)
        .label_style(text.clone())
        .axis_desc_style(text.clone())
        .draw()
        .expect("mesh");
    let colour = RGBColor(66, 133, 244);
    // First bar at the top: row i from the top is band rows-1-i.
    for (i, (label, spread)) in bars.iter().enumerate() {
        let band = rows - 1.0 - i as f64;
        let bar = Rectangle::new([(0.0, band + 0.12), (spread.median, band + 0.5)], colour.mix(0.8).filled());
        chart.draw_series(std::iter::once(bar)).expect("bar");
        let whisker = vec![(spread.min, band + 0.31), (spread.max, band + 0.31)];
        chart.draw_series(std::iter::once(PathElement::new(whisker, grey.stroke_width(2)))).expect("whisker");
        let caption = Text::new(format!("{label}: {spread}"), (0.0, band + 0.92), text.clone());
        chart.draw_series(std::iter::once(caption)).expect("label");
    }
    root_area.present().expect("write svg");
}

/// Mid-tone colours for the series of a line chart, in order.
const SERIES: [RGBColor; 8] = [
    RGBColor(66, 133, 244),
    RGBColor(234, 134, 0),
    RGBColor(15, 157, 88),
    RGBColor(219, 68, 55),
    RGBColor(142, 99, 206),
    RGBColor(0, 172, 193),
    RGBColor(192, 120, 60),
    RGBColor(120, 144, 156),
];

/// A line per series over the sizes `x` (1, 100, 1,000 ...: evenly spaced, as on a log scale, and
/// labelled with their values), each point its median with a whisker from min to max; written to
/// images/NAME.svg. The same look as `bar_chart`.
pub fn line_chart(name: &str, title: &str, x_desc: &str, y_desc: &str, series: &[(String, Vec<(f64, Spread)>)]) {
    let path = root().join("images").join(format!("{name}.svg"));
    let root_area = SVGBackend::new(&path, (720, 420)).into_drawing_area();
    let mut sizes: Vec<f64> = series.iter().flat_map(|(_, points)| points.iter().map(|(x, _)| *x)).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    let at = |x: f64| SegmentValue::CenterOf(sizes.iter().position(|s| *s == x).unwrap_or(0) as u32);
    let y_max = series.iter().flat_map(|(_, p)| p.iter().map(|(_, s)| s.max)).fold(0.0_f64, f64::max).max(1e-9) * 1.15;
    let grey = RGBColor(128, 128, 128);
    let text = ("sans-serif", 15).into_font().color(&grey);
    let mut chart = ChartBuilder::on(&root_area)
        .caption(title, ("sans-serif", 18).into_font().color(&grey))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d((0..(sizes.len() as u32).saturating_sub(1)).into_segmented(), 0.0..y_max)
        .expect("chart");
    let label = |v: &SegmentValue<u32>| match v {
        SegmentValue::CenterOf(i) => sizes.get(*i as usize).map_or_else(String::new, |x| thousands(*x)),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .bold_line_style(grey.mix(0.25))
        .light_line_style(grey.mix(0.1))
        .axis_style(grey)
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(sizes.len())
        .x_label_formatter(&label)
        .label_style(text.clone())
        .axis_desc_style(text.clone())
        .draw()
        .expect("mesh");
    for (i, (label, points)) in series.iter().enumerate() {
        let colour = SERIES[i % SERIES.len()];
        let line = LineSeries::new(points.iter().map(|(x, s)| (at(*x), s.median)), colour.stroke_width(2));
        chart
            .draw_series(line)
            .expect("line")
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
        let marks = points.iter().map(|(x, s)| Circle::new((at(*x), s.median), 3, colour.filled()));
        chart.draw_series(marks).expect("points");
        for (x, s) in points {
            let whisker = PathElement::new(vec![(at(*x), s.min), (at(*x), s.max)], colour.mix(0.6).stroke_width(2));
            chart.draw_series(std::iter::once(whisker)).expect("whisker");
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(text)
        .border_style(grey.mix(0.4))
        .draw()
        .expect("legend");
    root_area.present().expect("write svg");
}

/// 10000 → "10,000".
fn thousands(x: f64) -> String {
    let digits = format!("{x:.0}");
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The flags sesame gives epoch 0 (hot restart on, its drain times), with the base id written to
/// `dir`: Envoy run alone with them starts as it does under sesame, so that start to LIVE compares
/// the launchers and not two ways of starting Envoy.
pub fn envoy_flags_as_sesame_gives(dir: &Path) -> Vec<String> {
    let base_id = dir.join("envoy-base-id").to_string_lossy().into_owned();
    let flags = ["--drain-time-s", "30", "--drain-strategy", "immediate", "--parent-shutdown-time-s", "45"];
    let hot_restart = ["--restart-epoch", "0", "--use-dynamic-base-id", "--base-id-path", &base_id];
    flags.iter().chain(hot_restart.iter()).map(|f| f.to_string()).collect()
}

/// Removes the hot-restart shared memory that an Envoy started alone with those flags left behind
/// (sesame removes its own when it exits).
pub fn remove_envoy_shared_memory(dir: &Path) {
    let base_id = std::fs::read_to_string(dir.join("envoy-base-id")).ok();
    if let Some(id) = base_id.and_then(|id| id.trim().parse::<u64>().ok()) {
        let _ = std::fs::remove_file(format!("/dev/shm/envoy_shared_memory_{}", id * 10));
    }
}
