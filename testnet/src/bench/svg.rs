//! A small hand-written SVG line chart (no plotting crate): axes, ticks, one polyline
//! per series, a legend. Enough to eyeball latency over a run.

use std::fmt::Write as _;

pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    /// `(x, y)` points in data units; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

const W: f64 = 800.0;
const H: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// Renders the chart as a standalone SVG document.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series<'_>]) -> String {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().filter(finite).copied())
        .collect();
    let x_max = nice_ceil(all.iter().map(|p| p.0).fold(0.0, f64::max));
    let y_max = nice_ceil(all.iter().map(|p| p.1).fold(0.0, f64::max));
    let x_min = all.iter().map(|p| p.0).fold(0.0, f64::min);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (x - x_min) / (x_max - x_min).max(f64::EPSILON) * plot_w;
    let sy = |y: f64| TOP + plot_h - y / y_max * plot_h;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    // Grid and ticks.
    for i in 0..=5 {
        let f = f64::from(i) / 5.0;
        let y = sy(y_max * f);
        let x = sx(x_min + (x_max - x_min) * f);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
            W - RIGHT
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(y_max * f)
        );
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + plot_h + 18.0,
            fmt_tick(x_min + (x_max - x_min) * f)
        );
    }
    let _ = writeln!(
        s,
        r#"<polyline points="{LEFT},{TOP} {LEFT},{} {},{}" fill="none" stroke="black"/>"#,
        TOP + plot_h,
        W - RIGHT,
        TOP + plot_h
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        H - 10.0,
        escape(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        escape(y_label)
    );
    // Series and legend.
    for (i, ser) in series.iter().enumerate() {
        let pts: Vec<String> = ser
            .points
            .iter()
            .filter(finite)
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline class="series" data-name="{}" points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
            escape(ser.name),
            pts.join(" "),
            escape(ser.color)
        );
        let ly = TOP + 14.0 + 16.0 * i as f64;
        let lx = LEFT + 12.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="2"/>"#,
            lx + 20.0,
            escape(ser.color)
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{}</text>"#,
            lx + 26.0,
            ly + 4.0,
            escape(ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The smallest of 1, 2, 5 × 10^k that is ≥ `v` (1 for empty or non-positive data).
fn nice_ceil(v: f64) -> f64 {
    if !(v > 0.0 && v.is_finite()) {
        return 1.0;
    }
    let mag = 10f64.powi(v.log10().floor() as i32);
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * mag)
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that tags nest and close properly and attributes are quoted: enough
    /// of XML well-formedness for what `line_chart` writes.
    fn well_formed(doc: &str) -> Result<(), String> {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = doc;
        while let Some(open) = rest.find('<') {
            let text = &rest[..open];
            if text.contains('>') || (text.contains('&') && !text.contains(';')) {
                return Err(format!("stray markup in text {text:?}"));
            }
            let close = rest[open..].find('>').ok_or("unterminated tag")? + open;
            let tag = &rest[open + 1..close];
            if tag.matches('"').count() & 1 == 1 {
                return Err(format!("unbalanced quotes in <{tag}>"));
            }
            if let Some(name) = tag.strip_prefix('/') {
                match stack.pop() {
                    Some(top) if top == name => {}
                    other => return Err(format!("</{name}> closes {other:?}")),
                }
            } else if !tag.ends_with('/') {
                let name = tag.split_whitespace().next().ok_or("empty tag")?;
                stack.push(name.to_string());
            }
            rest = &rest[close + 1..];
        }
        if !stack.is_empty() {
            return Err(format!("unclosed {stack:?}"));
        }
        Ok(())
    }

    #[test]
    fn chart_is_well_formed_and_has_the_series() {
        let p50 = Series {
            name: "p50 <ms>",
            color: "#1f77b4",
            points: (0..30)
                .map(|t| (f64::from(t), 2.0 + f64::from(t % 3)))
                .collect(),
        };
        let p99 = Series {
            name: "p99 & tail",
            color: "#d62728",
            points: vec![(0.0, 10.0), (1.0, f64::NAN), (2.0, 35.5)],
        };
        let svg = line_chart("delivery \"latency\"", "s", "ms", &[p50, p99]);
        assert!(svg.starts_with("<svg"));
        well_formed(&svg)
            .map_err(|e| format!("{e}\n{svg}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(svg.matches(r#"class="series""#).count(), 2);
        assert!(svg.contains(r#"data-name="p50 &lt;ms&gt;""#));
        assert!(svg.contains(r#"data-name="p99 &amp; tail""#));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // The p99 series kept its two finite points.
        let line = svg
            .lines()
            .find(|l| l.contains(r#"data-name="p99"#))
            .unwrap_or_default();
        let pts = line.split("points=\"").nth(1).unwrap_or_default();
        let pts = pts.split('"').next().unwrap_or_default();
        assert_eq!(pts.split(' ').count(), 2, "{line}");
    }

    #[test]
    fn empty_chart_is_still_valid() {
        let svg = line_chart("empty", "x", "y", &[]);
        assert_eq!(well_formed(&svg), Ok(()));
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn nice_axis_bounds() {
        assert_eq!(nice_ceil(0.0), 1.0);
        assert_eq!(nice_ceil(7.0), 10.0);
        assert_eq!(nice_ceil(1.5), 2.0);
        assert_eq!(nice_ceil(420.0), 500.0);
        assert_eq!(nice_ceil(100.0), 100.0);
    }
}
