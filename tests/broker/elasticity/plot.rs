//! The timeline as a PNG, with no plotting crate: a palette image drawn pixel by pixel
//! (lines, shaded spans, a 3×5 pixel font for numbers and step labels) and written as a
//! PNG with stored (uncompressed) deflate blocks. Chosen over plotters (the bench crate's
//! `plot` feature) to add no dependency to the broker crate; the file is a few hundred
//! KiB.

use std::path::Path;

/// Palette indexes.
const WHITE: u8 = 0;
const BLACK: u8 = 1;
const BLUE: u8 = 2;
const GREY: u8 = 3;
const SHADE: u8 = 4;
const ORANGE: u8 = 5;
const LIGHT: u8 = 6;
const PALETTE: [[u8; 3]; 7] = [
    [255, 255, 255],
    [0, 0, 0],
    [31, 90, 200],
    [150, 150, 150],
    [255, 236, 179],
    [230, 120, 0],
    [225, 225, 225],
];
const PLOT_HEIGHT: usize = 260;
const TOP: usize = 40;
const BOTTOM: usize = 30;
const LEFT: usize = 70;
const RIGHT: usize = 20;
/// Font scale: a glyph is 3×5 pixels times this.
const SCALE: usize = 2;
/// Largest width drawn (pixels per second shrink to fit).
const MAX_WIDTH: usize = 4000;

struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Canvas {
        Canvas {
            width,
            height,
            pixels: vec![WHITE; width * height],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: u8) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            self.pixels[y as usize * self.width + x as usize] = c;
        }
    }

    fn rect(&mut self, x0: usize, y0: usize, x1: usize, y1: usize, c: u8) {
        for y in y0..y1 {
            for x in x0..x1 {
                self.set(x as i64, y as i64, c);
            }
        }
    }

    /// A two-pixel-wide line (Bresenham).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: u8) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            self.set(x, y + 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn text(&mut self, x: usize, y: usize, s: &str, c: u8) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        let px = x + (i * 4 + col) * SCALE;
                        let py = y + r * SCALE;
                        self.rect(px, py, px + SCALE, py + SCALE, c);
                    }
                }
            }
        }
    }
}

/// 3×5 glyphs, one row per byte, bit 2 the left column; unknown characters are blank.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '>' => [4, 2, 1, 2, 4],
        'R' => [6, 5, 6, 5, 5],
        's' => [3, 4, 2, 1, 6],
        '/' => [1, 1, 2, 4, 4],
        'm' => [0, 6, 7, 5, 5],
        'g' => [3, 5, 3, 1, 6],
        'k' => [4, 5, 6, 5, 5],
        '-' => [0, 0, 7, 0, 0],
        '.' => [0, 0, 0, 0, 2],
        _ => [0; 5],
    }
}

/// Draws `series` (per second: accepted, consumed) with `spans` (start s, end s, label)
/// and writes the PNG.
pub fn timeline(
    series: &[(f64, f64)],
    spans: &[(f64, f64, &str)],
    path: &Path,
) -> std::io::Result<()> {
    let seconds = series.len().max(1);
    let px = ((MAX_WIDTH - LEFT - RIGHT) / seconds).clamp(1, 8);
    let (width, height) = (LEFT + seconds * px + RIGHT, TOP + PLOT_HEIGHT + BOTTOM);
    let mut c = Canvas::new(width, height);
    let top = series.iter().map(|(a, b)| a.max(*b)).fold(1.0, f64::max);
    let y_max = nice_ceiling(top);
    let x_of = |s: f64| LEFT as i64 + (s * px as f64) as i64;
    let y_of = |v: f64| (TOP + PLOT_HEIGHT) as i64 - (v / y_max * PLOT_HEIGHT as f64) as i64;
    for (i, (start, end, label)) in spans.iter().enumerate() {
        let (x0, x1) = (x_of(*start).max(0) as usize, x_of(*end).max(0) as usize + 1);
        c.rect(x0, TOP, x1, TOP + PLOT_HEIGHT, SHADE);
        c.rect(x0, TOP, x0 + 1, TOP + PLOT_HEIGHT, ORANGE);
        // Labels alternate between two rows, so close steps do not overwrite each other.
        c.text(x0, 6 + (i % 2) * 14, label, BLACK);
    }
    for tick in 0..=4 {
        let v = y_max * tick as f64 / 4.0;
        let y = y_of(v);
        c.rect(LEFT, y as usize, width - RIGHT, y as usize + 1, LIGHT);
        c.text(4, (y as usize).saturating_sub(5), &format!("{v:.0}"), BLACK);
    }
    for s in (0..=seconds).step_by(10) {
        let x = x_of(s as f64) as usize;
        c.rect(x, TOP + PLOT_HEIGHT, x + 1, TOP + PLOT_HEIGHT + 5, BLACK);
        c.text(x, TOP + PLOT_HEIGHT + 10, &format!("{s}s"), BLACK);
    }
    c.text(4, TOP + PLOT_HEIGHT + 10, "msg/s", BLACK);
    for (pick, color) in [(1, GREY), (0, BLUE)] {
        let value = |i: usize| if pick == 0 { series[i].0 } else { series[i].1 };
        for i in 1..series.len() {
            let a = (x_of(i as f64 - 0.5), y_of(value(i - 1)));
            let b = (x_of(i as f64 + 0.5), y_of(value(i)));
            c.line(a, b, color);
        }
    }
    c.rect(LEFT, TOP, LEFT + 1, TOP + PLOT_HEIGHT, BLACK);
    c.rect(
        LEFT,
        TOP + PLOT_HEIGHT,
        width - RIGHT,
        TOP + PLOT_HEIGHT + 1,
        BLACK,
    );
    std::fs::write(path, encode(&c))
}

/// 1, 2 or 5 times a power of ten, at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    let mut p = 1.0;
    loop {
        for m in [1.0, 2.0, 5.0] {
            if m * p >= v {
                return m * p;
            }
        }
        p *= 10.0;
    }
}

/// The canvas as a palette PNG (colour type 3, 8 bits), IDAT as stored deflate blocks.
fn encode(c: &Canvas) -> Vec<u8> {
    let mut raw = Vec::with_capacity((c.width + 1) * c.height);
    for row in c.pixels.chunks(c.width) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut zlib = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        zlib.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        zlib.extend_from_slice(&len.to_le_bytes());
        zlib.extend_from_slice(&(!len).to_le_bytes());
        zlib.extend_from_slice(block);
    }
    zlib.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(c.width as u32).to_be_bytes());
    ihdr.extend_from_slice(&(c.height as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 3, 0, 0, 0]);
    let plte: Vec<u8> = PALETTE.iter().flatten().copied().collect();
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [
        (b"IHDR", ihdr.as_slice()),
        (b"PLTE", &plte),
        (b"IDAT", &zlib),
        (b"IEND", &[]),
    ] {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = png.len();
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        let crc = crc32(&png[start..]);
        png.extend_from_slice(&crc.to_be_bytes());
    }
    png
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn the_png_encoding_matches_known_checksums() {
    // Standard check values of the two checksums.
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    let png = encode(&Canvas::new(3, 2));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    assert!(png.ends_with(&[0xAE, 0x42, 0x60, 0x82]), "IEND's CRC");
}
