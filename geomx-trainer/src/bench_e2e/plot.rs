//! PNG plots of `geomx bench e2e`, drawn with `plotters` into an RGB buffer and encoded with
//! `png`. Labels use an embedded subset of DejaVu Sans (font/LICENSE), so nothing depends on
//! fontconfig or system fonts.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::results::{human_bytes, E2eResults, Status};
use super::E2eError;

/// DejaVu Sans cut down to printable ASCII (see font/LICENSE).
static FONT: &[u8] = include_bytes!("font/DejaVuSans-subset.ttf");
/// The family name the plots ask for.
const FAMILY: &str = "sans-serif";

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 650;

fn register_font() -> Result<(), E2eError> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .map_err(|_| E2eError::Plot("the embedded font does not parse".into()));
    });
    res
}

fn plot_err(e: impl std::fmt::Display) -> E2eError {
    E2eError::Plot(e.to_string())
}

/// Draws with `draw` on a white `WIDTH × HEIGHT` canvas and writes it to `path` as PNG.
fn render(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), E2eError>,
) -> Result<(), E2eError> {
    register_font()?;
    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw(&root)?;
        root.present().map_err(plot_err)?;
    }
    write_png(path, &buf, WIDTH, HEIGHT)
}

/// Encodes 8-bit RGB pixels as a PNG file.
pub fn write_png(path: &Path, rgb: &[u8], width: u32, height: u32) -> Result<(), E2eError> {
    let file = std::fs::File::create(path)
        .map_err(|e| E2eError::Io(format!("creating {}", path.display()), e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(plot_err)?;
    w.write_image_data(rgb).map_err(plot_err)?;
    w.finish().map_err(plot_err)
}

fn color(i: usize) -> RGBColor {
    // Tableau-like palette; distinguishable lines for up to ten scenarios.
    const C: [(u8, u8, u8); 10] = [
        (0, 0, 0),
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (23, 190, 207),
    ];
    let (r, g, b) = C[i % C.len()];
    RGBColor(r, g, b)
}

/// Test accuracy against wall time (log scale) for every scenario that ran, with the target.
pub fn accuracy_plot(r: &E2eResults, path: &Path) -> Result<(), E2eError> {
    let runs: Vec<_> = r
        .scenarios
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.progress.is_empty())
        .collect();
    let times = runs
        .iter()
        .flat_map(|(_, s)| s.progress.iter().map(|p| p.elapsed_s))
        .filter(|t| *t > 0.0);
    let (tmin, tmax) = times.fold((f64::INFINITY, 0.0f64), |(a, b), t| (a.min(t), b.max(t)));
    let (x0, x1) = if tmin.is_finite() && tmax > tmin {
        (tmin / 1.5, tmax * 1.5)
    } else {
        (0.1, 10.0)
    };
    let accs = runs
        .iter()
        .flat_map(|(_, s)| s.progress.iter().map(|p| p.test_accuracy));
    let amin = accs.fold(r.params.target_accuracy, f64::min);
    let y0 = ((amin - 0.05) * 10.0).floor() / 10.0;
    let y0 = y0.clamp(0.0, 0.9);
    render(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!(
                    "Test accuracy vs wall time ({} Mbit/s, {} ms one way, lab: {})",
                    r.params.wan.rate_mbit, r.params.wan.delay_ms, r.lab_mode
                ),
                (FAMILY, 22),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d((x0..x1).log_scale(), y0..1.0f64)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_labels(12)
            .x_label_formatter(&|v| {
                format!("{v:.3}")
                    .trim_end_matches('0')
                    .trim_end_matches('.')
                    .to_string()
            })
            .x_desc("wall time since the workers started (s, log scale)")
            .y_desc("test accuracy")
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .draw()
            .map_err(plot_err)?;
        let target = r.params.target_accuracy;
        chart
            .draw_series(LineSeries::new(
                [(x0, target), (x1, target)],
                ShapeStyle::from(&RGBColor(170, 170, 170)).stroke_width(1),
            ))
            .map_err(plot_err)?
            .label(format!("target {:.1} %", target * 100.0))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RGBColor(170, 170, 170)));
        for (i, s) in &runs {
            let c = color(*i);
            let pts: Vec<(f64, f64)> = s
                .progress
                .iter()
                .filter(|p| p.elapsed_s > 0.0)
                .map(|p| (p.elapsed_s, p.test_accuracy))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(plot_err)?
                .label(s.title.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))
                .map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FAMILY, 14))
            .draw()
            .map_err(plot_err)?;
        Ok(())
    })
}

/// WAN bytes per round of every scenario that reported them, as bars on a log scale.
pub fn wan_bytes_plot(r: &E2eResults, path: &Path) -> Result<(), E2eError> {
    let bars: Vec<(usize, &str, f64)> = r
        .scenarios
        .iter()
        .enumerate()
        .filter(|(_, s)| s.status != Status::Unavailable)
        .filter_map(|(i, s)| {
            s.wan_bytes_per_round
                .filter(|b| *b > 0.0)
                .map(|b| (i, s.id.name(), b))
        })
        .collect();
    let n = bars.len().max(1);
    let last = bars.len().saturating_sub(1).max(1);
    let (lo, hi) = bars.iter().fold((f64::INFINITY, 0.0f64), |(a, b), x| {
        (a.min(x.2), b.max(x.2))
    });
    let (y0, y1) = if lo.is_finite() {
        (
            // A decade below the smallest bar, so that it has a visible height.
            10f64.powf(lo.log10().floor() - 1.0),
            10f64.powf((hi.log10() + 0.3).ceil()),
        )
    } else {
        (1.0, 1e9)
    };
    render(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!(
                    "WAN bytes per round (counted at the sockets; model {} of f32)",
                    human_bytes(r.model_params as f64 * 4.0)
                ),
                (FAMILY, 22),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(80)
            // Segments 0..=last: one per bar (two when there is a single bar).
            .build_cartesian_2d((0..last).into_segmented(), (y0..y1).log_scale())
            .map_err(plot_err)?;
        let names: Vec<&str> = bars.iter().map(|b| b.1).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => names.get(*i).copied().unwrap_or("").to_string(),
                _ => String::new(),
            })
            .y_label_formatter(&|v| human_bytes(*v))
            .y_desc("bytes per round (log scale)")
            .label_style((FAMILY, 13))
            .axis_desc_style((FAMILY, 16))
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(k, (i, _, b))| {
                let mut rect = Rectangle::new(
                    [
                        (SegmentValue::Exact(k), y0),
                        (SegmentValue::Exact(k + 1), *b),
                    ],
                    color(*i).filled(),
                );
                rect.set_margin(0, 0, 12, 12);
                rect
            }))
            .map_err(plot_err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(k, (_, _, b))| {
                Text::new(
                    human_bytes(*b),
                    (SegmentValue::CenterOf(k), *b * 1.1),
                    TextStyle::from((FAMILY, 13).into_font())
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                )
            }))
            .map_err(plot_err)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench_e2e::results::ScenarioResult;
    use crate::bench_e2e::scenario::{MatrixParams, ScenarioId};
    use crate::hips::worker::Progress;

    fn results() -> E2eResults {
        let mut a =
            ScenarioResult::empty(ScenarioId::Flat, Status::Reached, None, Default::default());
        let mut b =
            ScenarioResult::empty(ScenarioId::Hips, Status::Reached, None, Default::default());
        for (k, (s, scale)) in [(&mut a, 10.0), (&mut b, 1.0)].into_iter().enumerate() {
            s.wan_bytes_per_round = Some(1e6 * scale);
            s.progress = (1..=5)
                .map(|i| Progress {
                    round: i * 10,
                    loss: 1.0,
                    test_loss: 1.0,
                    test_accuracy: 0.5 + 0.09 * i as f64 - 0.01 * k as f64,
                    elapsed_s: i as f64 * scale,
                })
                .collect();
        }
        E2eResults {
            command: "test".into(),
            lab_mode: "off".into(),
            model_params: 1000,
            params: MatrixParams::quick(),
            total_wall_s: 1.0,
            scenarios: vec![a, b, ScenarioResult::unavailable(ScenarioId::Dgt, "n/a")],
        }
    }

    fn png_size(path: &Path) -> (u32, u32) {
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let reader = dec.read_info().unwrap();
        let info = reader.info();
        (info.width, info.height)
    }

    #[test]
    fn plots_are_valid_pngs_with_drawn_content() {
        let dir = std::env::temp_dir().join(format!("geomx-e2e-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let r = results();
        let acc = dir.join("accuracy.png");
        let wan = dir.join("wan.png");
        accuracy_plot(&r, &acc).unwrap();
        wan_bytes_plot(&r, &wan).unwrap();
        for p in [&acc, &wan] {
            assert_eq!(png_size(p), (WIDTH, HEIGHT));
            // Decode and check that something besides white was drawn (axes, lines, text).
            let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
            let mut reader = dec.read_info().unwrap();
            let mut buf = vec![0; reader.output_buffer_size()];
            reader.next_frame(&mut buf).unwrap();
            let dark = buf
                .chunks(3)
                .filter(|px| px.iter().all(|&c| c < 100))
                .count();
            assert!(dark > 1000, "{}: {dark} dark pixels", p.display());
            let blue = buf
                .chunks(3)
                .filter(|px| px[0] == 31 && px[1] == 119 && px[2] == 180)
                .count();
            assert!(
                blue > 100,
                "{}: the second scenario's colour is drawn",
                p.display()
            );
        }
        // No run at all still gives a (blank-axes) plot rather than an error.
        let mut empty = r.clone();
        empty.scenarios.clear();
        accuracy_plot(&empty, &acc).unwrap();
        wan_bytes_plot(&empty, &wan).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn png_encoder_round_trips_pixels() {
        let dir = std::env::temp_dir().join(format!("geomx-e2e-png-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.png");
        let px: Vec<u8> = (0..4 * 3 * 3).map(|i| (i * 7) as u8).collect();
        write_png(&path, &px, 4, 3).unwrap();
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(buf, px);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
