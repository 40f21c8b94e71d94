//! The throughput table as a picture: records/s against shard count (log axis), one solid line for
//! the service and one dashed line for the async-nats ceiling per record size. Hand-written SVG, so the
//! benchmark needs no plotting dependency.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::throughput::Row;

/// Canvas and plot-area geometry, in SVG user units (pixels).
const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
/// One colour per record size, in the order the sizes appear in the table.
const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// Where the plot goes: `BENCH_PLOT`, or `target/bench-throughput.svg` under the workspace, or (a
/// bench binary copied without its source tree) `bench-throughput.svg` in the working directory.
pub fn path() -> PathBuf {
    std::env::var_os("BENCH_PLOT").map(PathBuf::from).unwrap_or_else(|| {
        // `workspace_root` ends in `tests/support/../..`; the printed path reads better without it.
        let root = test_support::workspace_root();
        if !root.join("Cargo.toml").is_file() {
            return PathBuf::from("bench-throughput.svg");
        }
        root.canonicalize().unwrap_or(root).join("target/bench-throughput.svg")
    })
}

/// Writes the SVG of `rows` to `path`.
pub fn write(rows: &[Row], path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, svg(rows))
}

/// A "nice" upper bound for the y axis and its tick step (1, 2 or 5 times a power of ten).
fn y_scale(max: f64) -> (f64, f64) {
    let rough = (max.max(1.0) / 5.0).max(1.0);
    let power = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * power).find(|step| *step >= rough).unwrap_or(power * 10.0);
    ((max / step).ceil().max(1.0) * step, step)
}

fn svg(rows: &[Row]) -> String {
    let mut shards: Vec<usize> = rows.iter().map(|row| row.shards).collect();
    shards.sort_unstable();
    shards.dedup();
    let mut sizes: Vec<usize> = Vec::new();
    for row in rows {
        if !sizes.contains(&row.size) {
            sizes.push(row.size);
        }
    }
    let (low, high) = (shards.first().copied().unwrap_or(1) as f64, shards.last().copied().unwrap_or(1) as f64);
    // A single shard count still gets a visible axis: one decade around it.
    let (log_low, log_high) =
        if high > low { (low.log10(), high.log10()) } else { (low.log10() - 0.5, low.log10() + 0.5) };
    let max = rows.iter().map(|row| row.ceiling.max(row.service)).fold(0.0, f64::max);
    let (y_max, y_step) = y_scale(max);
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let x = |n: usize| LEFT + ((n as f64).log10() - log_low) / (log_high - log_low) * plot_w;
    let y = |v: f64| TOP + plot_h - v / y_max * plot_h;

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">Throughput against shard count: service and async-nats ceiling</text>"#,
        LEFT + plot_w / 2.0
    );
    // Grid lines and y ticks.
    let mut tick = 0.0;
    while tick <= y_max + y_step / 2.0 {
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{2:.1}" y="{3:.1}" text-anchor="end">{4:.0}</text>"##,
            y(tick),
            LEFT + plot_w,
            LEFT - 6.0,
            y(tick) + 4.0,
            tick
        );
        tick += y_step;
    }
    // x ticks at the measured shard counts (log scale).
    for n in &shards {
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{1:.1}" stroke="#eee"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle">{n}</text>"##,
            x(*n),
            TOP + plot_h,
            TOP + plot_h + 18.0
        );
    }
    let _ =
        writeln!(out, r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">shards (log scale)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 16.0
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">records/s</text>"#,
        TOP + plot_h / 2.0
    );
    // One line per record size and program, and its legend entry.
    let mut legend_y = TOP + 10.0;
    for (index, size) in sizes.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let mut own: Vec<&Row> = rows.iter().filter(|row| row.size == *size).collect();
        own.sort_by_key(|row| row.shards);
        for (label, dash, value) in [
            ("service", "", (|row: &Row| row.service) as fn(&Row) -> f64),
            ("ceiling", r#" stroke-dasharray="6 4""#, |row: &Row| row.ceiling),
        ] {
            let points: Vec<String> =
                own.iter().map(|row| format!("{:.1},{:.1}", x(row.shards), y(value(row)))).collect();
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"#,
                points.join(" ")
            );
            for row in &own {
                let _ = writeln!(
                    out,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                    x(row.shards),
                    y(value(row))
                );
            }
            let legend_x = LEFT + plot_w + 16.0;
            let _ = writeln!(
                out,
                r#"<line x1="{legend_x}" y1="{legend_y}" x2="{}" y2="{legend_y}" stroke="{colour}" stroke-width="2"{dash}/><text x="{}" y="{}">{label}, {size} B</text>"#,
                legend_x + 28.0,
                legend_x + 34.0,
                legend_y + 4.0
            );
            legend_y += 20.0;
        }
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn y_scale_rounds_up_to_a_nice_step() {
        assert_eq!(y_scale(83_454.0), (100_000.0, 20_000.0));
        assert_eq!(y_scale(47_224.0), (50_000.0, 10_000.0));
    }
}
