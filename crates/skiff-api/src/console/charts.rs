//! The console's charts and start waterfalls, drawn on the server as SVG:
//! no script and no style attribute (the console's content security
//! policy allows neither inline), only elements, numbers and class names
//! the stylesheet colours. Text in them is escaped.

use std::fmt::Write;

use crate::types::Start;

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 120.0;
/// Room for the axis labels.
const LEFT: f64 = 48.0;
const BOTTOM: f64 = 18.0;

/// One line of a chart: its legend, its class (colour) and its values
/// (`None`: no value that minute).
#[derive(Debug)]
pub struct Line<'a> {
    pub label: &'a str,
    pub class: &'a str,
    pub values: Vec<Option<f64>>,
}

/// A line chart of per-minute values, oldest left; `unit` follows the
/// largest value on the axis; `span` labels the time axis.
pub fn line_chart(title: &str, unit: &str, lines: &[Line<'_>], span: &str) -> String {
    let n = lines.iter().map(|l| l.values.len()).max().unwrap_or(0);
    let max = lines
        .iter()
        .flat_map(|l| l.values.iter().flatten())
        .fold(0.0f64, |m, v| m.max(*v));
    let top = nice_ceiling(max);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {} {}" role="img" aria-label="{}">"#,
        WIDTH,
        HEIGHT + BOTTOM,
        escape(title)
    );
    let _ = write!(svg, "<title>{}</title>", escape(title));
    // Axes and the top value.
    let _ = write!(
        svg,
        r#"<line class="axis" x1="{LEFT}" y1="0" x2="{LEFT}" y2="{HEIGHT}"/><line class="axis" x1="{LEFT}" y1="{HEIGHT}" x2="{WIDTH}" y2="{HEIGHT}"/><line class="grid" x1="{LEFT}" y1="1" x2="{WIDTH}" y2="1"/>"#
    );
    let _ = write!(
        svg,
        r#"<text class="label" x="{}" y="10" text-anchor="end">{} {}</text><text class="label" x="{}" y="{HEIGHT}" text-anchor="end">0</text>"#,
        LEFT - 4.0,
        number(top),
        escape(unit),
        LEFT - 4.0
    );
    let _ = write!(
        svg,
        r#"<text class="label" x="{LEFT}" y="{}">{}</text><text class="label" x="{WIDTH}" y="{}" text-anchor="end">now</text>"#,
        HEIGHT + 14.0,
        escape(span),
        HEIGHT + 14.0
    );
    if n == 0 {
        let _ = write!(
            svg,
            r#"<text class="label" x="{}" y="{}" text-anchor="middle">no data yet: samples come every 10 s</text>"#,
            LEFT + (WIDTH - LEFT) / 2.0,
            HEIGHT / 2.0
        );
    }
    // The legend, right to left from the top right corner.
    for (i, line) in lines.iter().rev().enumerate() {
        let _ = write!(
            svg,
            r#"<text class="label key-{}" x="{:.1}" y="10" text-anchor="end">{}</text>"#,
            escape(line.class),
            WIDTH - 4.0 - 70.0 * i as f64,
            escape(line.label)
        );
    }
    for line in lines {
        for run in runs(&line.values) {
            let points: Vec<String> = run
                .iter()
                .map(|(i, v)| {
                    format!(
                        "{:.1},{:.1}",
                        x_of(*i, n),
                        HEIGHT - (v / top) * (HEIGHT - 2.0)
                    )
                })
                .collect();
            if points.len() == 1 {
                let (x, y) = points[0].split_once(',').unwrap_or(("0", "0"));
                let _ = write!(
                    svg,
                    r#"<circle class="{}" cx="{x}" cy="{y}" r="2"/>"#,
                    escape(line.class)
                );
            } else {
                let _ = write!(
                    svg,
                    r#"<polyline class="{}" points="{}"/>"#,
                    escape(line.class),
                    points.join(" ")
                );
            }
        }
    }
    svg.push_str("</svg>");
    svg
}

/// The x of the `i`th of `n` minutes.
fn x_of(i: usize, n: usize) -> f64 {
    if n <= 1 {
        return WIDTH;
    }
    LEFT + (WIDTH - LEFT) * i as f64 / (n - 1) as f64
}

/// The stretches of values without a gap.
fn runs(values: &[Option<f64>]) -> Vec<Vec<(usize, f64)>> {
    let mut runs = vec![Vec::new()];
    for (i, v) in values.iter().enumerate() {
        match v {
            Some(v) => runs.last_mut().map(|r| r.push((i, *v))).unwrap_or(()),
            None if runs.last().is_some_and(|r| !r.is_empty()) => runs.push(Vec::new()),
            None => {}
        }
    }
    runs.retain(|r| !r.is_empty());
    runs
}

/// A round number at or above `v` (1, 2 or 5 times a power of ten).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if step * power >= v {
            return step * power;
        }
    }
    10.0 * power
}

fn number(v: f64) -> String {
    if v >= 1.0 && v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// Where each recent start's time went, one bar per start: sandbox ready,
/// process started, port listening, first answer, to one scale.
pub fn waterfall(starts: &[Start]) -> String {
    const ROW: f64 = 22.0;
    const LABEL: f64 = 150.0;
    const TOTAL: f64 = 90.0;
    let longest = starts
        .iter()
        .map(|s| s.first_answer_ms)
        .fold(0.0f64, f64::max)
        .max(0.001);
    let height = ROW * starts.len() as f64 + 4.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="waterfall" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="start phases">"#
    );
    let span = WIDTH - LABEL - TOTAL;
    for (row, s) in starts.iter().enumerate() {
        let y = row as f64 * ROW + 2.0;
        let _ = write!(
            svg,
            r#"<text class="label" x="0" y="{:.1}">{}</text>"#,
            y + 14.0,
            escape(&s.at.chars().take(19).collect::<String>().replace('T', " "))
        );
        let phases = [
            ("sandbox", 0.0, s.sandbox_ready_ms),
            ("process", s.sandbox_ready_ms, s.process_started_ms),
            ("listen", s.process_started_ms, s.port_listening_ms),
            ("answer", s.port_listening_ms, s.first_answer_ms),
        ];
        for (class, from, to) in phases {
            let x = LABEL + span * (from / longest);
            let w = (span * ((to - from).max(0.0) / longest)).max(0.5);
            let _ = write!(
                svg,
                r#"<rect class="phase-{class}" x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{:.1}"><title>{class}: {:.1} ms</title></rect>"#,
                ROW - 6.0,
                to - from
            );
        }
        let _ = write!(
            svg,
            r#"<text class="label" x="{WIDTH}" y="{:.1}" text-anchor="end">{:.1} ms</text>"#,
            y + 14.0,
            s.first_answer_ms
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Text for SVG or HTML: `&`, `<`, `>`, quotes escaped.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_draws_each_unbroken_stretch_and_scales_to_a_round_top() {
        let svg = line_chart(
            "Requests <per> minute",
            "req",
            &[Line {
                label: "requests",
                class: "s1",
                values: vec![Some(1.0), Some(3.0), None, Some(7.0)],
            }],
            "60 min ago",
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("Requests &lt;per&gt; minute"), "{svg}");
        assert_eq!(svg.matches("<polyline").count(), 1, "{svg}");
        assert_eq!(svg.matches("<circle").count(), 1, "{svg}");
        assert!(svg.contains(">10 req<"), "{svg}");
        assert!(!svg.contains("style="));
        assert!(svg.contains(r#"class="label key-s1""#) && svg.contains(">requests<"));
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(13.0), 20.0);
        assert_eq!(nice_ceiling(4800.0), 5000.0);
    }

    #[test]
    fn an_empty_chart_says_why() {
        let svg = line_chart("x", "ms", &[], "60 min ago");
        assert!(svg.contains("no data yet"));
    }

    #[test]
    fn a_waterfall_has_four_phases_per_start_to_one_scale() {
        let start = |total: f64| Start {
            instance: "i".into(),
            version: Some(1),
            at: "2026-11-30T07:00:00.000Z".into(),
            sandbox_ready_ms: total * 0.1,
            process_started_ms: total * 0.2,
            port_listening_ms: total * 0.9,
            first_answer_ms: total,
        };
        let svg = waterfall(&[start(50.0), start(100.0)]);
        assert_eq!(svg.matches("<rect").count(), 8);
        assert!(svg.contains(">100.0 ms<") && svg.contains(">50.0 ms<"));
        assert!(svg.contains("2026-11-30 07:00:00"));
        assert!(!svg.contains("style="));
    }
}
