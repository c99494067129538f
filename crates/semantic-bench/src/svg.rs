//! Line charts as standalone SVG, written by hand: axes with "nice" ticks
//! (linear, or decades on a log scale), one polyline with point markers per
//! series, and a legend. No scripts, no external fonts.

use std::fmt::Write;

#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed (a reference line such as the theoretical value).
    pub dashed: bool,
}

impl Series {
    pub fn new(name: &str, points: Vec<(f64, f64)>) -> Series {
        Series { name: name.to_owned(), points, dashed: false }
    }
}

#[derive(Clone, Debug, Default)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub log_y: bool,
}

const W: f64 = 780.0;
const H: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 270.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 56.0;
const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// Escapes text for XML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// About `n` round tick values covering `[lo, hi]` (steps of 1, 2 or 5 x 10^k).
pub fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).abs().max(1e-12);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let first = (lo / step).floor() as i64;
    let last = (hi / step - 1e-9).ceil() as i64;
    // Rounded so that 3 x 0.2 prints and compares as 0.6.
    (first..=last.max(first + 1)).map(|k| format!("{:.12e}", k as f64 * step).parse().unwrap_or(0.0)).collect()
}

/// Short tick labels: 2048 -> "2048", 15000 -> "15k", 0.25 -> "0.25".
pub fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e4 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

struct Scale {
    x: (f64, f64),
    y: (f64, f64),
    log_y: bool,
}

impl Scale {
    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x.0) / (self.x.1 - self.x.0).max(1e-12) * (W - LEFT - RIGHT)
    }

    fn py(&self, y: f64) -> f64 {
        let (lo, hi, v) =
            if self.log_y { (self.y.0.log10(), self.y.1.log10(), y.log10()) } else { (self.y.0, self.y.1, y) };
        H - BOTTOM - (v - lo) / (hi - lo).max(1e-12) * (H - TOP - BOTTOM)
    }
}

impl LineChart {
    fn points(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        let log = self.log_y;
        self.series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(move |p| p.0.is_finite() && p.1.is_finite() && (!log || p.1 > 0.0))
    }

    fn scale(&self) -> Option<(Scale, Vec<f64>, Vec<f64>)> {
        let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
        for (x, y) in self.points() {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        if !x0.is_finite() {
            return None;
        }
        if x1 == x0 {
            (x0, x1) = (x0 - 1.0, x1 + 1.0);
        }
        let mut xs: Vec<f64> = self.points().map(|p| p.0).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        // Few distinct x values (agent counts, context sizes) are their own ticks.
        let xt = if xs.len() <= 8 { xs } else { nice_ticks(x0, x1, 6) };
        let pad = (x1 - x0) * 0.04;
        let x = (x0 - pad, x1 + pad);
        let (y, yt) = if self.log_y {
            let (lo, hi) = (y0.log10().floor(), y1.log10().ceil().max(y0.log10().floor() + 1.0));
            ((10f64.powf(lo), 10f64.powf(hi)), (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect())
        } else {
            let yt = nice_ticks(0f64.min(y0), y1, 5);
            ((yt[0], yt.last().copied().unwrap_or(y1).max(y1)), yt)
        };
        Some((Scale { x, y, log_y: self.log_y }, xt, yt))
    }

    pub fn to_svg(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = write!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = write!(
            s,
            r#"<text x="{}" y="24" font-size="15" text-anchor="middle">{}</text>"#,
            (W - RIGHT + LEFT) / 2.0,
            escape(&self.title)
        );
        match self.scale() {
            None => {
                let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="middle">no data</text>"#, W / 2.0, H / 2.0);
            }
            Some((sc, xt, yt)) => {
                self.axes(&mut s, &sc, &xt, &yt);
                self.lines(&mut s, &sc);
                self.legend(&mut s);
            }
        }
        s.push_str("</svg>\n");
        s
    }

    fn axes(&self, s: &mut String, sc: &Scale, xt: &[f64], yt: &[f64]) {
        let (x0, x1, y0, y1) = (LEFT, W - RIGHT, H - BOTTOM, TOP);
        for &t in xt.iter().filter(|t| **t >= sc.x.0 && **t <= sc.x.1) {
            let x = sc.px(t);
            let _ = write!(s, r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{y1}" stroke="#eee"/>"##);
            let _ = write!(s, r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#, y0 + 16.0, tick_label(t));
        }
        for &t in yt {
            let y = sc.py(t);
            let _ = write!(s, r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#eee"/>"##);
            let _ =
                write!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, x0 - 6.0, y + 4.0, tick_label(t));
        }
        let _ = write!(s, r##"<polyline points="{x0},{y1} {x0},{y0} {x1},{y0}" fill="none" stroke="#333"/>"##);
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (x0 + x1) / 2.0,
            H - 14.0,
            escape(&self.x_label)
        );
        let _ = write!(
            s,
            r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
            (y0 + y1) / 2.0,
            (y0 + y1) / 2.0,
            escape(&self.y_label)
        );
    }

    fn lines(&self, s: &mut String, sc: &Scale) {
        for (i, series) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let mut pts: Vec<(f64, f64)> = series
                .points
                .iter()
                .copied()
                .filter(|p| p.0.is_finite() && p.1.is_finite() && (!self.log_y || p.1 > 0.0))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sc.px(x), sc.py(y))).collect();
            let dash = if series.dashed { r#" stroke-dasharray="6 4""# } else { "" };
            let _ = write!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
                path.join(" ")
            );
            for &(x, y) in &pts {
                let _ = write!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#, sc.px(x), sc.py(y));
            }
        }
    }

    fn legend(&self, s: &mut String) {
        for (i, series) in self.series.iter().enumerate() {
            let (x, y) = (W - RIGHT + 16.0, TOP + 10.0 + i as f64 * 20.0);
            let color = COLORS[i % COLORS.len()];
            let dash = if series.dashed { r#" stroke-dasharray="5 3""# } else { "" };
            let _ = write!(
                s,
                r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="3"{dash}/>"#,
                x + 18.0
            );
            let _ = write!(s, r#"<text x="{}" y="{}">{}</text>"#, x + 24.0, y + 4.0, escape(&series.name));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Checks that tags nest and close (`<a>..</a>`, `<b/>`), and that text
    /// has no raw `<` or `&` outside entities.
    pub(crate) fn assert_well_formed(svg: &str) {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(i) = rest.find(['<', '&']) {
            let after = &rest[i..];
            if after.starts_with('&') {
                let end = after.find(';').expect("entity ends with ;");
                assert!(
                    ["&lt;", "&gt;", "&amp;", "&quot;", "&apos;"].contains(&&after[..=end]),
                    "bad entity {after:.20}"
                );
                rest = &after[end + 1..];
                continue;
            }
            let end = after.find('>').expect("tag closes");
            let tag = &after[1..end];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name), "mismatched </{name}>");
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().expect("tag name").to_owned());
            }
            assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes in <{tag}>");
            rest = &after[end + 1..];
        }
        assert!(stack.is_empty(), "unclosed {stack:?}");
    }

    fn chart(log_y: bool) -> LineChart {
        LineChart {
            title: "TTFT <cold & warm>".into(),
            x_label: "context tokens".into(),
            y_label: "ms".into(),
            series: vec![
                Series::new("semantic cold", vec![(2048.0, 2200.0), (8128.0, 34000.0)]),
                Series { dashed: true, ..Series::new("semantic warm", vec![(2048.0, 20.0), (8128.0, 70.0)]) },
            ],
            log_y,
        }
    }

    #[test]
    fn charts_are_well_formed_and_contain_every_series() {
        for log in [false, true] {
            let svg = chart(log).to_svg();
            assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
            assert_well_formed(&svg);
            assert!(svg.contains("semantic cold") && svg.contains("semantic warm"));
            assert!(svg.contains("TTFT &lt;cold &amp; warm&gt;"));
            assert_eq!(svg.matches("<polyline").count(), 3, "two series and the axes");
            assert_eq!(svg.matches("<circle").count(), 4);
            assert!(svg.contains("stroke-dasharray"));
        }
        let log = chart(true).to_svg();
        assert!(log.contains(">10<") && log.contains(">100k<"), "decade ticks");
        assert!(log.contains(">2048<") && log.contains(">8128<"), "few x values are their own ticks");
    }

    #[test]
    fn empty_and_degenerate_charts() {
        let empty = LineChart { title: "t".into(), ..LineChart::default() }.to_svg();
        assert_well_formed(&empty);
        assert!(empty.contains("no data"));
        let one =
            LineChart { series: vec![Series::new("a", vec![(1.0, 5.0), (f64::NAN, 1.0)])], ..LineChart::default() };
        let svg = one.to_svg();
        assert_well_formed(&svg);
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(nice_ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(nice_ticks(1.0, 8.0, 6), vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!(nice_ticks(0.0, 0.7, 4), vec![0.0, 0.2, 0.4, 0.6, 0.8]);
        assert_eq!(tick_label(1500.0), "1500");
        assert_eq!(tick_label(15_000.0), "15k");
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(2_000_000.0), "2M");
        assert_eq!(escape("a<b&\"c'"), "a&lt;b&amp;&quot;c&apos;");
    }
}
