//! The chart: every path's throughput as a ratio of its baseline (plain
//! tonic, or raw TCP for the raw yamux copy), one bar per case, with the
//! performance targets as horizontal marks.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use super::report::Summary;

const COLORS: [RGBColor; 7] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

/// Writes an SVG bar chart of the summaries' throughput ratios to `path`.
pub fn write(path: &Path, summaries: &[Summary], title: &str) -> anyhow::Result<()> {
    write_noted(
        path,
        summaries,
        title,
        "red marks: targets; black line: parity with the baseline (plain tonic; raw TCP for raw-yamux; forward for hub)",
    )
}

/// [`write`] with `note` under the chart.
pub fn write_noted(
    path: &Path,
    summaries: &[Summary],
    title: &str,
    note: &str,
) -> anyhow::Result<()> {
    let bars: Vec<(&Summary, f64)> = summaries
        .iter()
        .filter_map(|s| s.tput_ratio.map(|r| (s, r)))
        .collect();
    if bars.is_empty() {
        return Err(anyhow!("no ratios to chart"));
    }
    let mut paths: Vec<&str> = Vec::new();
    for (s, _) in &bars {
        if !paths.contains(&s.med.path.as_str()) {
            paths.push(&s.med.path);
        }
    }
    let ymax = bars.iter().map(|b| b.1).fold(1.2f64, f64::max) * 1.1;
    let width = (160 + bars.len() as u32 * 46).max(640);
    let root = SVGBackend::new(path, (width, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(120)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..bars.len() as f64, 0f64..ymax)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_desc("throughput / baseline")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    // Parity line.
    chart
        .draw_series(LineSeries::new(
            [(0.0, 1.0), (bars.len() as f64, 1.0)],
            BLACK.stroke_width(1),
        ))
        .map_err(|e| anyhow!("{e}"))?;
    for (i, (s, r)) in bars.iter().enumerate() {
        let ci = paths.iter().position(|p| *p == s.med.path).unwrap_or(0);
        let color = COLORS[ci % COLORS.len()];
        let x = i as f64;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x + 0.12, 0.0), (x + 0.88, *r)],
                color.filled(),
            )))
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{r:.2}"),
                (x + 0.15, *r + ymax * 0.03),
                ("sans-serif", 12),
            )))
            .map_err(|e| anyhow!("{e}"))?;
        if let Some(t) = target(s) {
            chart
                .draw_series(LineSeries::new(
                    [(x + 0.05, t), (x + 0.95, t)],
                    RED.stroke_width(2),
                ))
                .map_err(|e| anyhow!("{e}"))?;
        }
        // Rotated label under the bar: path, workload, case.
        let label = format!("{} {} {}", s.med.path, s.med.workload, s.med.case);
        let style = ("sans-serif", 11)
            .into_font()
            .transform(FontTransform::Rotate270)
            .color(&BLACK);
        let (px, py) = chart.backend_coord(&(x + 0.35, 0.0));
        root.draw_text(&label, &style, (px, py + 112))
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.draw_text(
        note,
        &("sans-serif", 11).into_font().color(&BLACK),
        (12, 462),
    )
    .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The throughput target for a summary, if it has one.
pub fn target(s: &Summary) -> Option<f64> {
    match (s.med.workload.as_str(), s.med.path.as_str()) {
        ("upload" | "download", "forward" | "reverse") => Some(0.95),
        ("echo", "forward" | "reverse") if s.med.case.ends_with("c=32") => Some(0.9),
        ("upload" | "download", "hub") => Some(0.6),
        ("copy", "raw-yamux") => Some(0.8),
        _ => None,
    }
}
