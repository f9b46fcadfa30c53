//! `loss.png`: the train and validation loss curves.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

/// DejaVu Sans (its license is `assets/DejaVuSans-LICENSE.txt`), so that the plot needs no
/// system font.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Draws `train` and `val` (iteration, loss) curves into the PNG `path`, written to a
/// temporary file and renamed.
pub fn loss_curves(path: &Path, train: &[(f64, f64)], val: &[(f64, f64)]) -> Result<()> {
    register_font();
    let tmp = path.with_file_name(format!(".{}.tmp-{}.png", path.file_name().and_then(|n| n.to_str()).unwrap_or("loss"), std::process::id()));
    let all = train.iter().chain(val);
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let finite = all.map(|p| p.1).filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.05).max(1e-3);
    {
        let root = BitMapBackend::new(&tmp, (800, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("loss", ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, (lo - pad)..(hi + pad))?;
        chart.configure_mesh().x_desc("iteration").y_desc("loss").label_style(("sans-serif", 14)).draw()?;
        if !train.is_empty() {
            chart
                .draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2)))?
                .label("train")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
        }
        if !val.is_empty() {
            chart
                .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))?
                .label("validation")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
            chart.draw_series(val.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).label_font(("sans-serif", 14)).draw()?;
        root.present()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
