//! The picture of a run: temperature against the effective setpoint band, heater-on periods
//! shaded, one panel for each of the first rooms, every change of a room's band marked, and a
//! strip along the bottom of each panel colored by the level of the priority array that decided
//! (legend on the right), and along the top a marker at each switch a hold deferred and each OFF
//! for a maximum run. SVG via plotters.

use std::path::Path;

use plotters::prelude::*;

use super::{level_name, AppliedCommand, Sample, Summary};
use thermostat::proto::v1::SetpointLevel;

const PANEL_HEIGHT: u32 = 260;
const WIDTH: u32 = 1000;
/// The legend's column, right of each panel's chart.
const LEGEND_WIDTH: u32 = 110;
/// The strip of deciding levels takes this share of the temperature axis, below the data.
const STRIP_SHARE: f64 = 0.07;

/// The levels the strip tells apart, lowest first, and their colors.
const LEVELS: [(SetpointLevel, RGBColor); 4] = [
    (SetpointLevel::Default, RGBColor(150, 150, 150)),
    (SetpointLevel::Schedule, RGBColor(40, 150, 80)),
    (SetpointLevel::Override, RGBColor(140, 70, 200)),
    (SetpointLevel::Safety, RGBColor(230, 170, 0)),
];

/// Markers of the switches a hold deferred (`DEFERRED_*`): triangles.
const DEFERRED: RGBColor = RGBColor(0, 120, 120);
/// Markers of the OFFs for a maximum run (`MAX_RUN_TIME`): crosses.
const MAX_RUN: RGBColor = RGBColor(180, 0, 90);
/// The markers' row lies this share of the temperature axis below its top.
const MARKER_SHARE: f64 = 0.04;
/// Marker size, pixels.
const MARKER_SIZE: i32 = 5;

pub fn write_svg(path: &Path, summary: &Summary, rooms: usize) -> Result<(), String> {
    let rooms = rooms.min(summary.rooms.len()).max(1);
    let root = SVGBackend::new(path, (WIDTH, PANEL_HEIGHT * rooms as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((rooms, 1));
    for (i, panel) in panels.iter().enumerate() {
        let (Some(name), Some(samples)) = (summary.rooms.get(i), summary.samples.get(i)) else {
            continue;
        };
        let commands: Vec<&AppliedCommand> =
            summary.commands.iter().filter(|c| c.room == i).collect();
        draw_room(panel, name, samples, &commands).map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

fn draw_room<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    name: &str,
    samples: &[Sample],
    commands: &[&AppliedCommand],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let end = samples.last().map_or(1.0, |s| s.simulated_minutes).max(1.0);
    let (low, high) = celsius_range(samples);
    let bottom = low - (high - low) * STRIP_SHARE;
    let (area, legend) = area.split_horizontally(WIDTH - LEGEND_WIDTH);
    draw_legend(&legend)?;
    let mut chart = ChartBuilder::on(&area)
        .caption(
            format!(
                "{name}: temperature, effective setpoint band, heater on (shaded), \
                 deciding level (strip), protection (top)"
            ),
            ("sans-serif", 16),
        )
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0.0..end, bottom..high)?;
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
    chart.draw_series(
        band_changes(samples)
            .map(|at| PathElement::new(vec![(at, low), (at, high)], BLACK.stroke_width(1))),
    )?;
    chart.draw_series(
        level_spans(samples)
            .into_iter()
            .filter_map(|(from, to, level)| {
                let color = level_color(level)?;
                Some(Rectangle::new([(from, bottom), (to, low)], color.filled()))
            }),
    )?;
    // At the top, where the heater's shading begins or ends: the switches a hold deferred, and
    // the OFFs of maximum runs.
    let row = high - (high - bottom) * MARKER_SHARE;
    chart.draw_series(commands.iter().filter(|c| c.deferred()).map(|c| {
        TriangleMarker::new((c.simulated_minutes, row), MARKER_SIZE, DEFERRED.filled())
    }))?;
    chart.draw_series(commands.iter().filter(|c| c.max_run()).map(|c| {
        Cross::new(
            (c.simulated_minutes, row),
            MARKER_SIZE,
            MAX_RUN.stroke_width(2),
        )
    }))?;
    Ok(())
}

/// The strip's colors, by level name, with a heading.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let font = ("sans-serif", 12).into_font();
    area.draw(&Text::new("deciding level", (4, 40), font.clone()))?;
    for (i, (level, color)) in LEVELS.iter().enumerate() {
        let y = 60 + 20 * i as i32;
        area.draw(&Rectangle::new([(4, y), (18, y + 12)], color.filled()))?;
        area.draw(&Text::new(level_name(*level), (24, y), font.clone()))?;
    }
    area.draw(&Text::new("heater switch", (4, 150), font.clone()))?;
    area.draw(&TriangleMarker::new(
        (11, 176),
        MARKER_SIZE,
        DEFERRED.filled(),
    ))?;
    area.draw(&Text::new("deferred", (24, 170), font.clone()))?;
    area.draw(&Cross::new((11, 196), MARKER_SIZE, MAX_RUN.stroke_width(2)))?;
    area.draw(&Text::new("max run time", (24, 190), font))?;
    Ok(())
}

fn level_color(level: SetpointLevel) -> Option<RGBColor> {
    LEVELS
        .iter()
        .find(|(l, _)| *l == level)
        .map(|(_, color)| *color)
}

/// Stretches of simulated minutes with one deciding level, in order: (from, to, level). As the
/// heater shading, a stretch between two samples takes the later one's level.
fn level_spans(samples: &[Sample]) -> Vec<(f64, f64, SetpointLevel)> {
    let mut spans: Vec<(f64, f64, SetpointLevel)> = Vec::new();
    for w in samples.windows(2) {
        let (from, to, level) = (w[0].simulated_minutes, w[1].simulated_minutes, w[1].level);
        match spans.last_mut() {
            Some(last) if last.2 == level => last.1 = to,
            _ => spans.push((from, to, level)),
        }
    }
    spans
}

/// The panel's temperature axis: every finite temperature and band edge, and at least 15 °C
/// to 16 °C, with a margin. Without samples, or with only non-finite ones, the default range:
/// an infinite range never finishes placing its tick marks.
fn celsius_range(samples: &[Sample]) -> (f64, f64) {
    let values = samples
        .iter()
        .flat_map(|s| [s.celsius, s.band.0, s.band.1])
        .filter(|v| v.is_finite());
    let (low, high) = values.fold((15.0_f64, 16.0_f64), |(low, high), v| {
        (low.min(v), high.max(v))
    });
    (low - 0.5, high + 0.5)
}

/// Simulated minutes at which the room's band changed.
fn band_changes(samples: &[Sample]) -> impl Iterator<Item = f64> + '_ {
    samples
        .windows(2)
        .filter(|w| w[0].band != w[1].band)
        .map(|w| w[1].simulated_minutes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use thermostat::proto::v1::CommandReason;

    fn sample(minutes: f64, celsius: f64, band: (f64, f64)) -> Sample {
        Sample {
            simulated_minutes: minutes,
            celsius,
            heater_on: false,
            band,
            level: SetpointLevel::Default,
        }
    }

    #[test]
    fn the_range_holds_every_value_and_is_finite_whatever_the_samples() {
        assert_eq!(celsius_range(&[]), (14.5, 16.5));
        let (low, high) = celsius_range(&[
            sample(1.0, 12.0, (20.5, 21.5)),
            sample(2.0, f64::NAN, (f64::NEG_INFINITY, f64::INFINITY)),
            sample(3.0, 22.0, (23.5, 24.5)),
        ]);
        assert_eq!((low, high), (11.5, 25.0));
    }

    #[test]
    fn every_band_change_is_marked_once() {
        let a = (20.5, 21.5);
        let b = (23.5, 24.5);
        let samples = [
            sample(1.0, 18.0, a),
            sample(2.0, 18.0, a),
            sample(3.0, 18.0, b),
            sample(4.0, 18.0, b),
            sample(5.0, 18.0, a),
        ];
        assert_eq!(band_changes(&samples).collect::<Vec<_>>(), [3.0, 5.0]);
        assert_eq!(band_changes(&samples[..2]).count(), 0);
    }

    #[test]
    fn the_strip_has_one_stretch_per_run_of_a_deciding_level() {
        let band = (20.5, 21.5);
        let at = |minutes: f64, level| Sample {
            level,
            ..sample(minutes, 18.0, band)
        };
        let samples = [
            at(1.0, SetpointLevel::Override),
            at(2.0, SetpointLevel::Override),
            at(3.0, SetpointLevel::Override),
            at(4.0, SetpointLevel::Schedule),
            at(5.0, SetpointLevel::Schedule),
            at(6.0, SetpointLevel::Default),
        ];
        assert_eq!(
            level_spans(&samples),
            [
                (1.0, 3.0, SetpointLevel::Override),
                (3.0, 5.0, SetpointLevel::Schedule),
                (5.0, 6.0, SetpointLevel::Default),
            ]
        );
        assert!(level_spans(&samples[..1]).is_empty());
    }

    #[test]
    fn the_picture_names_every_level_and_draws_the_strip_in_their_colors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("levels.svg");
        let band = (20.5, 21.5);
        let samples = (0..20)
            .map(|i| Sample {
                level: if i < 10 {
                    SetpointLevel::Override
                } else {
                    SetpointLevel::Schedule
                },
                ..sample(f64::from(i), 20.0, band)
            })
            .collect();
        let summary = Summary {
            rooms: vec!["b/room-02".into()],
            samples: vec![samples],
            ..Summary::default()
        };
        write_svg(&path, &summary, 1).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for (level, color) in LEVELS {
            assert!(svg.contains(level_name(level)), "{svg}");
            let hex = format!("#{:02X}{:02X}{:02X}", color.0, color.1, color.2);
            // The legend's square, and the strip's stretches of the levels that decided.
            let expected = match level {
                SetpointLevel::Override | SetpointLevel::Schedule => 2,
                _ => 1,
            };
            assert_eq!(svg.matches(&hex).count(), expected, "{level:?} {hex}");
        }
    }

    fn command(room: usize, minutes: f64, on: bool, reason: CommandReason) -> AppliedCommand {
        AppliedCommand {
            room,
            simulated_minutes: minutes,
            heater_on: on,
            reason,
            setpoint_revision: 1,
            setpoint_level: SetpointLevel::Default,
            level_revision: 1,
            celsius: Some(20.0),
            decided_at: None,
        }
    }

    #[test]
    fn held_switches_of_the_plotted_rooms_are_marked_and_named_in_the_legend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holds.svg");
        let band = (20.5, 21.5);
        let samples: Vec<Sample> = (0..20).map(|i| sample(f64::from(i), 21.0, band)).collect();
        use CommandReason::{DeferredTooCold, DeferredTooHot, MaxRunTime, TooCold, TooHot};
        let summary = Summary {
            rooms: vec!["b/room-00".into(), "b/room-01".into(), "b/room-02".into()],
            samples: vec![samples.clone(), samples.clone(), samples],
            commands: vec![
                command(0, 1.0, true, TooCold),
                command(0, 5.0, false, DeferredTooHot),
                command(0, 9.0, true, DeferredTooCold),
                command(1, 3.0, true, TooCold),
                command(1, 12.0, false, MaxRunTime),
                command(1, 15.0, true, DeferredTooCold),
                command(1, 17.0, false, TooHot),
                // Not plotted: no marker.
                command(2, 4.0, true, DeferredTooCold),
                command(2, 6.0, false, MaxRunTime),
            ],
            ..Summary::default()
        };
        write_svg(&path, &summary, 2).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let hex = |c: RGBColor| format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2);
        // Each panel's legend, then a triangle per deferred switch and a cross (two strokes)
        // per maximum run's OFF in the plotted rooms.
        assert_eq!(svg.matches("deferred").count(), 2, "{svg}");
        assert_eq!(svg.matches("max run time").count(), 2, "{svg}");
        assert_eq!(svg.matches(&hex(DEFERRED)).count(), 2 + 3, "{svg}");
        assert_eq!(svg.matches(&hex(MAX_RUN)).count(), 2 * (2 + 1), "{svg}");
    }

    #[test]
    fn a_run_without_samples_still_makes_a_picture() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.svg");
        let summary = Summary {
            rooms: vec!["b/room-00".into()],
            samples: vec![Vec::new()],
            ..Summary::default()
        };
        write_svg(&path, &summary, 3).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("b/room-00"), "{svg}");
    }
}
