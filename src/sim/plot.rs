//! The picture of a run: temperature against the setpoint band, heater-on periods shaded, one
//! panel per room, and the moment of the setpoint change marked. SVG via plotters.

use std::path::Path;

use plotters::prelude::*;

use super::Summary;

const PANEL_HEIGHT: u32 = 260;
const WIDTH: u32 = 1000;

pub fn write_svg(path: &Path, summary: &Summary, rooms: usize) -> Result<(), String> {
    let rooms = rooms.min(summary.rooms.len()).max(1);
    let root = SVGBackend::new(path, (WIDTH, PANEL_HEIGHT * rooms as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((rooms, 1));
    for (i, panel) in panels.iter().enumerate() {
        let (Some(name), Some(samples)) = (summary.rooms.get(i), summary.samples.get(i)) else {
            continue;
        };
        draw_room(panel, name, samples, summary.change_at_minutes).map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

fn draw_room<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    name: &str,
    samples: &[super::Sample],
    change_at: Option<f64>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let end = samples.last().map_or(1.0, |s| s.simulated_minutes).max(1.0);
    let lows = samples.iter().map(|s| s.celsius.min(s.band.0));
    let highs = samples.iter().map(|s| s.celsius.max(s.band.1));
    let low = lows.fold(f64::INFINITY, f64::min).min(15.0) - 0.5;
    let high = highs.fold(f64::NEG_INFINITY, f64::max) + 0.5;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{name}: temperature, setpoint band, heater on (shaded)"),
            ("sans-serif", 16),
        )
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0.0..end, low..high)?;
    chart
        .configure_mesh()
        .x_desc("simulated minutes")
        .y_desc("°C")
        .light_line_style(WHITE)
        .draw()?;

    // Heater-on periods as shaded columns.
    let shade = RGBColor(255, 170, 120).mix(0.35).filled();
    chart.draw_series(samples.windows(2).filter(|w| w[1].heater_on).map(|w| {
        Rectangle::new(
            [
                (w[0].simulated_minutes, low),
                (w[1].simulated_minutes, high),
            ],
            shade,
        )
    }))?;
    let band = BLUE.mix(0.6).stroke_width(1);
    chart.draw_series(LineSeries::new(
        samples.iter().map(|s| (s.simulated_minutes, s.band.0)),
        band,
    ))?;
    chart.draw_series(LineSeries::new(
        samples.iter().map(|s| (s.simulated_minutes, s.band.1)),
        band,
    ))?;
    chart.draw_series(LineSeries::new(
        samples.iter().map(|s| (s.simulated_minutes, s.celsius)),
        RED.stroke_width(2),
    ))?;
    let band_changed = samples.first().map(|s| s.band) != samples.last().map(|s| s.band);
    if let Some(at) = change_at.filter(|_| band_changed) {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(at, low), (at, high)],
            BLACK.stroke_width(1),
        )))?;
    }
    Ok(())
}
