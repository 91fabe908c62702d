//! Line charts as inline SVG: the report must be one file that opens anywhere (a hospital's
//! locked-down browser, an e-mail attachment, an archive years later), so figures are drawn as
//! SVG markup rather than with a charting script or image files.

use std::fmt::Write;

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Dashed (e.g. a baseline or a reference line).
    pub dashed: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Axis ranges; `None` = from the data.
    pub x_range: Option<(f64, f64)>,
    pub y_range: Option<(f64, f64)>,
    pub series: Vec<Series>,
    /// Draw markers at the points (sparse curves) or not (ROC curves).
    pub markers: bool,
}

/// Colour-blind-safe palette (Okabe and Ito 2008).
const PALETTE: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
];

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// "Nice" tick positions (1, 2, 5 × 10^k steps) covering `[lo, hi]`.
pub fn ticks(lo: f64, hi: f64, want: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / want.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    // Multiples of the step, rounded to its decimals so 3 x 0.2 prints (and compares) as 0.6.
    let scale = 10f64.powi((-step.log10().floor()).max(0.0) as i32 + 1);
    let first = (lo / step).ceil() as i64;
    let mut out = Vec::new();
    for k in first.. {
        let v = ((k as f64 * step) * scale).round() / scale;
        if v > hi + step * 1e-9 || out.len() >= 50 {
            break;
        }
        out.push(v);
    }
    out
}

fn fmt_tick(v: f64) -> String {
    if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

impl Chart {
    fn ranges(&self) -> ((f64, f64), (f64, f64)) {
        let pts = self.series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts {
            if x.is_finite() && y.is_finite() {
                x0 = x0.min(x);
                x1 = x1.max(x);
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
        let fix = |lo: f64, hi: f64| {
            if lo > hi {
                (0.0, 1.0)
            } else if lo == hi {
                (lo - 0.5, hi + 0.5)
            } else {
                (lo, hi)
            }
        };
        (
            self.x_range.unwrap_or_else(|| fix(x0, x1)),
            self.y_range.unwrap_or_else(|| fix(y0, y1)),
        )
    }

    /// The chart as an `<svg>` element (role="img" with a title, for screen readers).
    pub fn render(&self) -> String {
        let (w, h) = (560.0, 340.0);
        let (ml, mr, mt, mb) = (58.0, 150.0, 30.0, 46.0);
        let (pw, ph) = (w - ml - mr, h - mt - mb);
        let ((x0, x1), (y0, y1)) = self.ranges();
        let sx = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| mt + ph - (y - y0) / (y1 - y0) * ph;
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img"><title>{t}</title>"#,
            t = escape(&self.title)
        );
        let _ = write!(
            s,
            r#"<text x="{}" y="18" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
            ml + pw / 2.0,
            escape(&self.title)
        );
        // Grid and ticks.
        for t in ticks(x0, x1, 6) {
            let x = sx(t);
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" y1="{mt}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"##,
                mt + ph,
                mt + ph + 15.0,
                fmt_tick(t)
            );
        }
        for t in ticks(y0, y1, 5) {
            let y = sy(t);
            let _ = write!(
                s,
                r##"<line x1="{ml}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"##,
                ml + pw,
                ml - 5.0,
                y + 4.0,
                fmt_tick(t)
            );
        }
        let _ = write!(
            s,
            r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
        );
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">{}</text>"#,
            ml + pw / 2.0,
            h - 8.0,
            escape(&self.x_label)
        );
        let _ = write!(
            s,
            r#"<text transform="translate(14 {:.1}) rotate(-90)" text-anchor="middle" font-size="12">{}</text>"#,
            mt + ph / 2.0,
            escape(&self.y_label)
        );
        for (i, se) in self.series.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            let pts: Vec<String> = se
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            let dash = if se.dashed {
                r#" stroke-dasharray="5 3""#
            } else {
                ""
            };
            let _ = write!(
                s,
                r#"<polyline class="series" data-name="{}" fill="none" stroke="{c}" stroke-width="2"{dash} points="{}"/>"#,
                escape(&se.name),
                pts.join(" ")
            );
            if self.markers {
                for p in &pts {
                    let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                    let _ = write!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{c}"/>"#);
                }
            }
            let ly = mt + 10.0 + 18.0 * i as f64;
            let lx = ml + pw + 12.0;
            let _ = write!(
                s,
                r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="2"{dash}/><text x="{}" y="{}" font-size="11">{}</text>"#,
                lx + 20.0,
                lx + 25.0,
                ly + 4.0,
                escape(&se.name)
            );
        }
        s.push_str("</svg>");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 1.0, 5), [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!(ticks(1.0, 8.0, 6), [2.0, 4.0, 6.0, 8.0]);
        assert_eq!(ticks(3.0, 3.0, 5), [3.0]);
        let t = ticks(-0.3, 0.7, 5);
        assert!(t.contains(&0.0) && t.windows(2).all(|w| w[1] > w[0]));
    }

    #[test]
    fn points_land_where_the_axes_say() {
        let c = Chart {
            title: "a<b".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_range: Some((0.0, 10.0)),
            y_range: Some((0.0, 1.0)),
            series: vec![Series {
                name: "s&t".into(),
                points: vec![(0.0, 0.0), (10.0, 1.0), (5.0, f64::NAN)],
                dashed: false,
            }],
            markers: true,
        };
        let svg = c.render();
        // Plot area: x 58..410, y 30..294: (0,0) bottom-left, (10,1) top-right; NaN dropped.
        assert!(svg.contains(r#"points="58.0,294.0 410.0,30.0""#), "{svg}");
        assert!(svg.contains("<title>a&lt;b</title>"));
        assert!(svg.contains(r#"data-name="s&amp;t""#));
        assert_eq!(svg.matches("<circle").count(), 2);
    }
}
