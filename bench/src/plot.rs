//! `entrepot-bench plot` (feature `plot`): the throughput-versus-p99 PNG of
//! `benches/compare.sh`, drawn from the per-run JSON files it writes (`CASE-BROKER.json`,
//! the `--json` output of `entrepot-bench`).
//!
//! One point per run: delivered msgs/s across, p99 produce→accepted down, both on log
//! scales (the workloads span two orders of magnitude), one colour per broker, each point
//! labelled with its case. Runs that failed or were not applicable are left out.
//!
//! Built on plotters' bitmap backend with text through ab_glyph, so it needs a TrueType
//! font at run time (`--font`, else DejaVu Sans or Liberation Sans from the usual system
//! paths); the PNG is encoded with the `png` crate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 800;
const FONT: &str = "sans-serif";
/// Where a sans-serif TrueType font usually is, when `--font` is not given.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];
/// Most JSON files read from `--input` (compare.sh writes about twenty).
const RUNS_MAX: usize = 1000;

#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// Directory of per-run JSON files (`CASE-BROKER.json`, as benches/compare.sh writes).
    #[arg(long)]
    pub input: PathBuf,
    /// The PNG to write.
    #[arg(long)]
    pub output: PathBuf,
    /// TrueType font for the labels [default: DejaVu Sans or Liberation Sans].
    #[arg(long)]
    pub font: Option<PathBuf>,
}

/// One measured run.
#[derive(Debug, Clone, PartialEq)]
struct Point {
    case: String,
    msgs_per_s: f64,
    p99_ms: f64,
}

pub fn run(args: PlotArgs) -> anyhow::Result<()> {
    let runs = read_runs(&args.input)?;
    if runs.is_empty() {
        bail!("no measured runs in {}", args.input.display());
    }
    load_font(args.font.as_deref())?;
    let pixels = draw(&runs)?;
    write_png(&args.output, &pixels)?;
    let n: usize = runs.values().map(Vec::len).sum();
    println!(
        "{}: {n} runs of {} brokers",
        args.output.display(),
        runs.len()
    );
    Ok(())
}

/// Broker → its runs, from `CASE-BROKER.json` files with figures (skips `na`/`failed`).
fn read_runs(dir: &Path) -> anyhow::Result<BTreeMap<String, Vec<Point>>> {
    let mut runs: BTreeMap<String, Vec<Point>> = BTreeMap::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries.take(RUNS_MAX) {
        let path = entry?.path();
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        let Some((case, broker)) = split_name(stem) else {
            continue;
        };
        let text = std::fs::read_to_string(&path)?;
        let Ok(j) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        if let Some(p) = point(case, &j) {
            runs.entry(broker.to_owned()).or_default().push(p);
        }
    }
    Ok(runs)
}

/// `p1k-8x8-rabbitmq-qq` → (`p1k-8x8`, `rabbitmq-qq`): the broker is the part from the
/// first known broker name on.
fn split_name(stem: &str) -> Option<(&str, &str)> {
    ["-entrepot", "-rabbitmq", "-nats"]
        .iter()
        .filter_map(|b| stem.find(b))
        .min()
        .map(|i| (&stem[..i], &stem[i + 1..]))
}

fn point(case: &str, j: &serde_json::Value) -> Option<Point> {
    if j.get("na").is_some() || j.get("failed").is_some_and(|f| f != false) {
        return None;
    }
    let msgs_per_s = j.get("receive_msgs_per_s")?.as_f64()?;
    let p99_ms = j.get("produce_to_accepted")?.get("p99_us")?.as_f64()? / 1000.0;
    (msgs_per_s > 0.0 && p99_ms > 0.0).then(|| Point {
        case: case.to_owned(),
        msgs_per_s,
        p99_ms,
    })
}

fn load_font(path: Option<&Path>) -> anyhow::Result<()> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => FONT_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("no TrueType font found (install fonts-dejavu-core, or pass --font)")?,
    };
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font(FONT, FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a usable TrueType font", path.display()))
}

fn colour(broker: &str) -> RGBColor {
    match broker {
        "entrepot" => RGBColor(31, 119, 180),
        "rabbitmq-qq" => RGBColor(255, 127, 14),
        "rabbitmq-classic" => RGBColor(214, 39, 40),
        "nats" => RGBColor(44, 160, 44),
        _ => RGBColor(127, 127, 127),
    }
}

/// Log-scale bounds with some room around the points.
fn bounds(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(v), h.max(v)));
    (lo / 1.6)..(hi * 1.6)
}

/// A log axis label only at 1, 2 and 5 times a power of ten (the others stay unlabelled
/// grid lines, so the labels never run into each other).
fn tick(v: &f64) -> String {
    if *v <= 0.0 {
        return String::new();
    }
    let mantissa = v / 10f64.powf(v.log10().floor());
    let nice = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .any(|m| (mantissa - m).abs() < 0.02 * m);
    match (nice, *v >= 10.0) {
        (false, _) => String::new(),
        (true, true) => format!("{v:.0}"),
        (true, false) => format!("{v:.1}"),
    }
}

/// The chart as RGB pixels, `WIDTH` × `HEIGHT`.
fn draw(runs: &BTreeMap<String, Vec<Point>>) -> anyhow::Result<Vec<u8>> {
    let mut pixels = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let all = || runs.values().flatten();
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "entrepot bench: throughput vs p99 produce->accepted (persistent)",
                (FONT, 24),
            )
            .margin(20)
            .x_label_area_size(55)
            .y_label_area_size(75)
            .build_cartesian_2d(
                bounds(all().map(|p| p.msgs_per_s)).log_scale(),
                bounds(all().map(|p| p.p99_ms)).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc("delivered msgs/s (log)")
            .y_desc("p99 produce->accepted, ms (log)")
            .x_label_formatter(&tick)
            .y_label_formatter(&tick)
            .label_style((FONT, 15))
            .draw()?;
        for (broker, points) in runs {
            let c = colour(broker);
            chart
                .draw_series(
                    points
                        .iter()
                        .map(|p| Circle::new((p.msgs_per_s, p.p99_ms), 6, c.filled())),
                )?
                .label(broker.as_str())
                .legend(move |(x, y)| Circle::new((x + 10, y), 6, c.filled()));
            // The label sits beside its point, not on it.
            chart.draw_series(points.iter().map(|p| {
                EmptyElement::at((p.msgs_per_s, p.p99_ms))
                    + Text::new(p.case.clone(), (9, -16), (FONT, 14).into_font().color(&c))
            }))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(pixels)
}

fn write_png(path: &Path, pixels: &[u8]) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(pixels)?;
    writer.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_points_from_compare_json() {
        assert_eq!(
            split_name("p1k-8x8-rabbitmq-qq"),
            Some(("p1k-8x8", "rabbitmq-qq"))
        );
        assert_eq!(
            split_name("lat-half-entrepot"),
            Some(("lat-half", "entrepot"))
        );
        assert_eq!(split_name("table"), None);
        let j = serde_json::json!({"receive_msgs_per_s": 2000.0,
            "produce_to_accepted": {"p99_us": 4500}});
        assert_eq!(
            point("fanout", &j),
            Some(Point {
                case: "fanout".into(),
                msgs_per_s: 2000.0,
                p99_ms: 4.5
            })
        );
        assert_eq!(point("x", &serde_json::json!({"na": "no topic"})), None);
        assert_eq!(
            (tick(&20000.0), tick(&70000.0), tick(&0.5)),
            ("20000".into(), String::new(), "0.5".into())
        );
        let failed = serde_json::json!({"failed": true, "receive_msgs_per_s": 1.0,
            "produce_to_accepted": {"p99_us": 1}});
        assert_eq!(point("x", &failed), None);
    }
}
