//! PNG plots with plotters' bitmap backend. No text is drawn: plotters
//! renders text through fontconfig (`ttf`) or an embedded font file
//! (`ab_glyph`), and neither is worth a system dependency or a vendored font
//! here, so the legend lives in report.md (see `LEGEND`).

use crate::report::ModeReport;
use crate::scenario::{Kind, Scenario};
use plotters::prelude::*;

pub const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

pub const LEGEND: &str = "Plots carry no text (no font dependency). One panel per mode, \
top to bottom in the table's column order; x = simulated time. `calls.png`: calls per \
second to each model (blue = first model of the route, orange = second, green = third); \
shaded bands are phases (red = outage, yellow = rate limit, grey = revoked key, light \
blue = slow). `outcomes.png`: user requests answered so far, stacked (blue = completed \
first time, orange = deferred then completed).";

fn shade(k: &Kind) -> RGBAColor {
    match k {
        Kind::Outage { .. } => RGBColor(230, 80, 80).mix(0.18),
        Kind::RateLimit { .. } => RGBColor(230, 200, 40).mix(0.25),
        Kind::Revoked => RGBColor(90, 90, 90).mix(0.18),
        Kind::Slow { .. } => RGBColor(80, 160, 230).mix(0.18),
    }
}

type Err = Box<dyn std::error::Error>;

pub fn draw(dir: &std::path::Path, s: &Scenario, modes: &[&ModeReport]) -> Result<(), Err> {
    let n = modes.len().max(1);
    let secs = s.duration.ceil() as usize;
    let calls_path = dir.join("calls.png");
    let root = BitMapBackend::new(&calls_path, (900, 170 * n as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = modes
        .iter()
        .flat_map(|m| m.calls_per_second.iter().flatten())
        .copied()
        .max()
        .unwrap_or(1)
        .max(1);
    for (panel, m) in root.split_evenly((n, 1)).iter().zip(modes) {
        let mut c = ChartBuilder::on(panel)
            .margin(6)
            .build_cartesian_2d(0f64..s.duration, 0f64..ymax as f64 * 1.05)?;
        for p in &s.phases {
            c.draw_series(std::iter::once(Rectangle::new(
                [(p.from, 0.0), (p.to.min(s.duration), ymax as f64 * 1.05)],
                shade(&p.kind).filled(),
            )))?;
        }
        for (i, series) in m.calls_per_second.iter().enumerate() {
            c.draw_series(LineSeries::new(
                series
                    .iter()
                    .take(secs)
                    .enumerate()
                    .map(|(t, v)| (t as f64, *v as f64)),
                COLORS[i % COLORS.len()].stroke_width(2),
            ))?;
        }
        panel.draw(&PathElement::new(
            vec![(0, 0), (899, 0)],
            BLACK.stroke_width(1),
        ))?;
    }
    root.present()?;

    let out_path = dir.join("outcomes.png");
    let root = BitMapBackend::new(&out_path, (900, 150 * n as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let total = modes
        .iter()
        .map(|m| {
            m.answers_per_second
                .iter()
                .map(|a| u64::from(a[0] + a[1]))
                .sum::<u64>()
        })
        .max()
        .unwrap_or(1)
        .max(1);
    for (panel, m) in root.split_evenly((n, 1)).iter().zip(modes) {
        let mut c = ChartBuilder::on(panel)
            .margin(6)
            .build_cartesian_2d(0f64..s.duration, 0f64..total as f64 * 1.05)?;
        let (mut a, mut b) = (0u64, 0u64);
        let mut first = Vec::new();
        let mut both = Vec::new();
        for (t, x) in m.answers_per_second.iter().take(secs).enumerate() {
            a += u64::from(x[0]);
            b += u64::from(x[1]);
            first.push((t as f64, a as f64));
            both.push((t as f64, (a + b) as f64));
        }
        c.draw_series(AreaSeries::new(both, 0.0, COLORS[1].mix(0.7)))?;
        c.draw_series(AreaSeries::new(first, 0.0, COLORS[0].mix(0.8)))?;
        panel.draw(&PathElement::new(
            vec![(0, 0), (899, 0)],
            BLACK.stroke_width(1),
        ))?;
    }
    root.present()?;
    Ok(())
}
