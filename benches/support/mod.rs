//! What the benchmarks share: quick mode, medians with their spread, raw figures as JSON under
//! target/bench/, and bar charts as SVG under images/.
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
