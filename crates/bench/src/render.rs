//! Turns live-migration benchmark results into artefacts a reviewer can read without tooling:
//! an SVG chart for the eye and a markdown table for the numbers, both dependency-free so the
//! benchmark can emit them from CI without pulling in a plotting stack.

use std::fmt::Write;

/// One line of a plot: (seconds since migration start, MiB of guest memory still to send).
/// Kept as raw pairs so benchmark code can push samples as it polls, without any conversion.
pub struct Series {
    /// Identifies the configuration across panels, so it also decides the line colour.
    pub label: String,
    /// Samples in the order they were taken; non-finite values are tolerated and skipped.
    pub points: Vec<(f64, f64)>,
}

/// One small chart, e.g. one benchmark scenario, with one line per configuration.
/// Small multiples keep scenarios with very different scales readable side by side.
pub struct Panel {
    /// Names the scenario, since the axes alone do not say what was measured.
    pub title: String,
    /// One entry per configuration compared in this scenario.
    pub series: Vec<Series>,
}

/// Okabe-Ito palette (colour-blind safe), ordered so that the first lines are the most distinct.
const PALETTE: [&str; 8] = [
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#B8A300",
];
/// Once the palette is exhausted, dash patterns keep lines apart.
const DASHES: [&str; 4] = ["none", "7 3", "2 3", "9 3 2 3"];
const COLS: usize = 2;
const PANEL_W: f64 = 480.0;
const PANEL_H: f64 = 300.0;
const GAP: f64 = 20.0;
const MARGIN: f64 = 20.0;
const LEGEND_TOP: f64 = 58.0;
const LEGEND_ROW: f64 = 20.0;

/// Classes keep the markup small; the SVG stays standalone because the sheet is inline.
const STYLE: &str = "<style>text{font-size:12px}.doc{font-size:20px;font-weight:bold}\
    .head{font-size:14px;font-weight:bold}.mid{text-anchor:middle}.end{text-anchor:end}\
    .tick{font-size:11px}.note{fill:#666;font-size:11px}.grid{stroke:#e6e6e6}\
    .axis{fill:none;stroke:#888}.frame{fill:none;stroke:#ccc}\
    .line,.dot{fill:none;stroke-width:2;stroke-linecap:round;stroke-linejoin:round}\
    .dot{stroke-width:7}</style>";

/// Renders panels as one standalone SVG document, so a benchmark run leaves a picture that
/// opens in any browser or inline on GitHub. Panels sit in a 2-column grid with "nice"
/// (1/2/5 x 10^n) ticks and light grid lines; each label keeps one colour-blind-safe colour in
/// every panel and appears once in a shared legend at the top, so a configuration can be
/// followed across scenarios. Empty panels show "no data" (series without points are named in
/// a note) instead of panicking, NaN/inf samples are skipped, and all text is XML-escaped.
pub fn remaining_memory_svg(title: &str, panels: &[Panel]) -> String {
    let mut labels: Vec<&str> = Vec::new();
    for s in panels.iter().flat_map(|p| &p.series) {
        if !labels.contains(&s.label.as_str()) {
            labels.push(&s.label);
        }
    }
    let cols = panels.len().clamp(1, COLS);
    let width = 2.0 * MARGIN + cols as f64 * (PANEL_W + GAP) - GAP;
    let mut legend = String::new();
    let legend_rows = legend_svg(&mut legend, &labels, width);
    let grid_top = LEGEND_TOP + legend_rows as f64 * LEGEND_ROW + 6.0;
    let rows = panels.len().div_ceil(COLS).max(1);
    let height = grid_top + rows as f64 * (PANEL_H + GAP) - GAP + MARGIN;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\">\n{STYLE}\n\
         <rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n"
    );
    text(
        &mut out,
        (MARGIN, 32.0),
        "doc",
        &truncate(title, (width / 13.0) as usize),
    );
    out.push_str(&legend);
    if panels.is_empty() {
        text(&mut out, (MARGIN, grid_top + 20.0), "note", "no data");
    }
    for (i, panel) in panels.iter().enumerate() {
        let x = MARGIN + (i % COLS) as f64 * (PANEL_W + GAP);
        let y = grid_top + (i / COLS) as f64 * (PANEL_H + GAP);
        panel_svg(&mut out, panel, (x, y), &labels);
    }
    out.push_str("</svg>\n");
    out
}

/// A GitHub-flavoured markdown table, so benchmark numbers paste straight into a PR or report.
/// Cells are escaped for '|' and newlines so arbitrary text cannot break the table; a header
/// starting with '>' marks a right-aligned (numeric) column and the '>' is not shown. Rows
/// longer than the header get unnamed columns rather than silently losing cells.
pub fn markdown_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let ncols = rows.iter().map(Vec::len).fold(headers.len(), usize::max);
    let mut table = vec![vec![String::new(); ncols]; rows.len() + 1];
    let mut right = vec![false; ncols];
    for (i, h) in headers.iter().enumerate() {
        right[i] = h.starts_with('>');
        table[0][i] = escape_cell(h.strip_prefix('>').unwrap_or(h));
    }
    for (r, row) in rows.iter().enumerate() {
        for (i, cell) in row.iter().enumerate() {
            table[r + 1][i] = escape_cell(cell);
        }
    }
    let mut widths = vec![3; ncols];
    for (i, cell) in table.iter().flat_map(|row| row.iter().enumerate()) {
        widths[i] = widths[i].max(cell.chars().count());
    }
    let rule = widths.iter().zip(&right);
    let rule = rule.map(|(w, r)| format!("{}{}", "-".repeat(w - 1), if *r { ':' } else { '-' }));
    table.insert(1, rule.collect());
    let mut out = String::new();
    for row in table.iter().filter(|_| ncols > 0) {
        out.push('|');
        for ((cell, w), right) in row.iter().zip(&widths).zip(&right) {
            let pad = " ".repeat(w - cell.chars().count());
            let (before, after) = if *right { (&*pad, "") } else { ("", &*pad) };
            let _ = write!(out, " {before}{cell}{after} |");
        }
        out.push('\n');
    }
    out
}

/// A table cell for a figure that may be missing: the figure, or "-".
pub fn dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".into())
}

fn escape(s: &str) -> String {
    let s = s
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    s.replace('"', "&quot;").replace('\'', "&#39;")
}

fn escape_cell(s: &str) -> String {
    let s = s.replace("\r\n", "\n");
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '|' => out.push_str("\\|"),
            // A backslash right before a pipe would otherwise swallow the pipe's escape.
            '\\' if chars.peek() == Some(&'|') => out.push_str("\\\\"),
            '\n' | '\r' => out.push_str("<br>"),
            _ => out.push(c),
        }
    }
    out
}

/// Cuts text longer than `max` characters, so long names cannot overlap their neighbours.
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    s.chars().take(max.saturating_sub(1)).chain(['…']).collect()
}

/// Writes one text element; the body is escaped here, so no caller can forget to.
fn text(out: &mut String, (x, y): (f64, f64), class: &str, body: &str) {
    let (at, body) = (format!("x=\"{x:.1}\" y=\"{y:.1}\""), escape(body));
    let _ = writeln!(out, "<text {at} class=\"{class}\">{body}</text>");
}

fn line(out: &mut String, (x1, y1): (f64, f64), (x2, y2): (f64, f64), attrs: &str) {
    let from = format!("x1=\"{x1:.1}\" y1=\"{y1:.1}\"");
    let _ = writeln!(out, "<line {from} x2=\"{x2:.1}\" y2=\"{y2:.1}\" {attrs}/>");
}

fn rect(out: &mut String, (x, y): (f64, f64), (w, h): (f64, f64), class: &str) {
    let at = format!("x=\"{x:.1}\" y=\"{y:.1}\"");
    let _ = writeln!(
        out,
        "<rect {at} width=\"{w:.1}\" height=\"{h:.1}\" class=\"{class}\"/>"
    );
}

/// Colour, and past the palette a dash pattern, by the label's first appearance in the document.
fn stroke(label: &str, labels: &[&str], class: &str) -> String {
    let i = labels.iter().position(|l| *l == label).unwrap_or(0);
    let colour = PALETTE[i % PALETTE.len()];
    let dash = DASHES[(i / PALETTE.len()) % DASHES.len()];
    format!("class=\"{class}\" stroke=\"{colour}\" stroke-dasharray=\"{dash}\"")
}

/// Writes the legend, wrapping onto new rows, and returns how many rows it used.
fn legend_svg(out: &mut String, labels: &[&str], width: f64) -> usize {
    let (mut x, mut y) = (MARGIN, LEGEND_TOP);
    for label in labels {
        let shown = truncate(label, 60);
        let item_w = 44.0 + 6.8 * shown.chars().count() as f64;
        if x > MARGIN && x + item_w > width - MARGIN {
            (x, y) = (MARGIN, y + LEGEND_ROW);
        }
        let (y4, attrs) = (y - 4.0, stroke(label, labels, "line"));
        line(out, (x, y4), (x + 20.0, y4), &attrs);
        text(out, (x + 26.0, y), "", &shown);
        x += item_w;
    }
    let rows = ((y - LEGEND_TOP) / LEGEND_ROW).round() as usize + 1;
    rows * usize::from(!labels.is_empty())
}

fn finite(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let ok = |(x, y): &(f64, f64)| x.is_finite() && y.is_finite();
    points.iter().copied().filter(ok).collect()
}

fn panel_svg(out: &mut String, panel: &Panel, (px, py): (f64, f64), labels: &[&str]) {
    out.push_str("<g>\n");
    rect(out, (px, py), (PANEL_W, PANEL_H), "frame");
    let head = truncate(&panel.title, 50);
    text(out, (px + PANEL_W / 2.0, py + 20.0), "head mid", &head);
    let pts: Vec<Vec<(f64, f64)>> = panel.series.iter().map(|s| finite(&s.points)).collect();
    // Both axes include 0: the plot shows progress from migration start towards nothing left.
    let (mut xr, mut yr) = ((0.0f64, 0.0f64), (0.0f64, 0.0f64));
    for &(x, y) in pts.iter().flatten() {
        xr = (xr.0.min(x), xr.1.max(x));
        yr = (yr.0.min(y), yr.1.max(y));
    }
    let (xt, yt) = (nice_ticks(xr.0, xr.1, 6), nice_ticks(yr.0, yr.1, 5));
    let ylabels: Vec<String> = yt.values.iter().map(|v| yt.label(*v)).collect();
    let ylabel_chars = ylabels.iter().map(|l| l.chars().count()).max().unwrap_or(1);
    let (left, right) = (px + 34.0 + 6.6 * ylabel_chars as f64, px + PANEL_W - 22.0);
    let (top, bottom) = (py + 46.0, py + PANEL_H - 46.0);
    let (mx, my, ax) = ((left + right) / 2.0, (top + bottom) / 2.0, px + 16.0);
    let sx = |x| xt.scale(x, (left, right));
    let sy = |y| yt.scale(y, (bottom, top));
    let at = |&(x, y): &(f64, f64)| format!("{:.1},{:.1}", sx(x), sy(y));
    text(out, (mx, py + PANEL_H - 10.0), "mid", "time (s)");
    let turn = format!("transform=\"translate({ax:.1} {my:.1}) rotate(-90)\"");
    let _ = writeln!(out, "<text {turn} class=\"mid\">remaining (MiB)</text>");
    if pts.iter().all(Vec::is_empty) {
        rect(out, (left, top), (right - left, bottom - top), "axis");
        text(out, (mx, my), "note mid", "no data");
        out.push_str("</g>\n");
        return;
    }
    for v in &xt.values {
        line(out, (sx(*v), top), (sx(*v), bottom), "class=\"grid\"");
        text(out, (sx(*v), bottom + 16.0), "tick mid", &xt.label(*v));
    }
    for (v, label) in yt.values.iter().zip(&ylabels) {
        line(out, (left, sy(*v)), (right, sy(*v)), "class=\"grid\"");
        text(out, (left - 6.0, sy(*v) + 4.0), "tick end", label);
    }
    line(out, (left, top), (left, bottom), "class=\"axis\"");
    line(out, (left, bottom), (right, bottom), "class=\"axis\"");
    let missing = panel.series.iter().zip(&pts).filter(|(_, p)| p.is_empty());
    let missing: Vec<&str> = missing.map(|(s, _)| s.label.as_str()).collect();
    if !missing.is_empty() {
        let note = truncate(&format!("no data: {}", missing.join(", ")), 72);
        text(out, (px + PANEL_W / 2.0, py + 36.0), "note mid", &note);
    }
    for (s, p) in panel.series.iter().zip(&pts) {
        let mut xy: Vec<String> = p.iter().map(at).collect();
        // A lone sample becomes a zero-length line, which a wide round cap draws as a dot.
        let class = if xy.len() == 1 { "dot" } else { "line" };
        xy.extend(xy.first().filter(|_| xy.len() == 1).cloned());
        let (attrs, tip) = (stroke(&s.label, labels, class), escape(&s.label));
        if !xy.is_empty() {
            let xy = xy.join(" ");
            let _ = writeln!(
                out,
                "<polyline points=\"{xy}\" {attrs}><title>{tip}</title></polyline>"
            );
        }
    }
    out.push_str("</g>\n");
}

/// Tick positions on a 1/2/5 x 10^n grid covering the data range (at least two, ascending).
struct Ticks {
    values: Vec<f64>,
    decimals: usize,
}

impl Ticks {
    /// Maps a data value onto the pixel range `(from, to)` spanned by the first and last tick.
    fn scale(&self, v: f64, (from, to): (f64, f64)) -> f64 {
        let (lo, hi) = (self.values[0], self.values[self.values.len() - 1]);
        from + (v - lo) / (hi - lo) * (to - from)
    }
    fn label(&self, v: f64) -> String {
        // Adding 0.0 turns -0.0 into 0.0, so no "-0" label appears.
        format!("{:.*}", self.decimals, v + 0.0)
    }
}

/// Picks about `target` ticks; a degenerate range is widened so the axis never has zero length.
fn nice_ticks(a: f64, b: f64, target: usize) -> Ticks {
    let (mut lo, mut hi) = (a.min(b), a.max(b));
    if hi - lo <= f64::EPSILON * lo.abs().max(hi.abs()) {
        let pad = lo.abs() * 0.1;
        (lo, hi) = (lo - pad, hi + if pad > 0.0 { pad } else { 1.0 });
    }
    // NaN, infinities and spans that overflow f64 get a unit axis rather than NaN coordinates.
    if !(hi - lo).is_finite() || hi <= lo {
        (lo, hi) = (0.0, 1.0);
    }
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag * (1.0 - 1e-9);
    let mult = [1.0, 2.0, 5.0, 10.0].into_iter().find(|m| norm <= *m);
    let step = mag * mult.unwrap_or(10.0);
    let (first, last) = ((lo / step + 1e-9).floor(), (hi / step - 1e-9).ceil());
    let decimals = (-(step.log10() + 1e-9).floor()).clamp(0.0, 12.0) as usize;
    // Spans too fine for f64 to step through fall back to just the two ends.
    let fine = step > 0.0 && step.is_finite() && last > first && last - first <= 1e3;
    let tick = |i: i64| (first + i as f64) * step;
    let values = if fine {
        (0..=(last - first) as i64).map(tick).collect()
    } else {
        vec![lo, hi]
    };
    Ticks { values, decimals }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panel(title: &str, series: &[(&str, &[(f64, f64)])]) -> Panel {
        let series = series.iter().map(|(l, p)| Series {
            label: (*l).to_owned(),
            points: p.to_vec(),
        });
        let title = title.to_owned();
        Panel {
            title,
            series: series.collect(),
        }
    }

    /// The stroke colour of every line whose tooltip names `label`.
    fn strokes_of(svg: &str, label: &str) -> Vec<String> {
        let title = format!("<title>{label}</title>");
        let lines = svg.split("<polyline").filter(|e| e.contains(&title));
        let colour = |e: &str| Some(e.split("stroke=\"").nth(1)?.split('"').next()?.to_owned());
        lines.filter_map(colour).collect()
    }

    fn assert_nice(a: f64, b: f64) -> Vec<f64> {
        let t = nice_ticks(a, b, 5);
        let (lo, hi) = (t.values[0], t.values[t.values.len() - 1]);
        let ok = lo <= a.min(b) && hi >= a.max(b) && (3..=12).contains(&t.values.len());
        assert!(ok, "{a}..{b}: {:?}", t.values);
        let step = t.values[1] - t.values[0];
        let norm = step / 10f64.powf(step.log10().floor());
        let nice = [1.0, 2.0, 5.0, 10.0].contains(&((norm * 1e6).round() / 1e6));
        assert!(nice, "{a}..{b}: step {step}");
        t.values
    }

    #[test]
    fn nice_ticks_for_typical_ranges() {
        let t = nice_ticks(0.0, 0.37, 5);
        let labels: Vec<String> = assert_nice(0.0, 0.37).iter().map(|v| t.label(*v)).collect();
        assert_eq!(labels, ["0.0", "0.1", "0.2", "0.3", "0.4"]);
        assert_eq!(assert_nice(0.0, 512.0), [0.0, 200.0, 400.0, 600.0]);
        let big = [0.0, 500.0, 1000.0, 1500.0, 2000.0, 2500.0];
        assert_eq!(assert_nice(0.0, 2048.0), big);
        assert_eq!(nice_ticks(0.0, 2048.0, 5).label(500.0), "500");
        assert_nice(-3.0, 17.5);
    }

    #[test]
    fn degenerate_ranges_are_widened() {
        assert_nice(512.0, 512.0);
        assert_eq!(assert_nice(0.0, 0.0).first(), Some(&0.0));
        for (a, b) in [
            (f64::NAN, f64::INFINITY),
            (f64::MAX, f64::MAX),
            (-f64::MAX, f64::MAX),
        ] {
            let t = nice_ticks(a, b, 5).values;
            assert!(t.len() >= 2 && t[0] < t[1] && (t[t.len() - 1] - t[0]).is_finite());
        }
        for y in [64.0, 0.0] {
            let flat = [(0.0, y), (1.0, y), (2.0, y)];
            let svg = remaining_memory_svg("t", &[panel("flat", &[("a", &flat)])]);
            let ok = svg.contains("<polyline points=\"") && !svg.contains("NaN");
            assert!(ok, "{svg}");
        }
    }

    #[test]
    fn svg_is_well_formed_and_escaped() {
        let panels = [
            panel(
                "a<&>b",
                &[("x<&>y", &[(0.0, 9.0), (f64::NAN, 5.0), (1.0, 0.0)])],
            ),
            panel("empty", &[]),
            panel("blank", &[("z", &[]), ("nan", &[(f64::INFINITY, 1.0)])]),
            panel("single", &[("one", &[(2.0, 3.0)]), ("gone", &[])]),
        ];
        let svg = remaining_memory_svg("T & \"q\"", &panels);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<g>").count(), svg.matches("</g>").count());
        assert!(svg.contains("x&lt;&amp;&gt;y") && svg.contains("a&lt;&amp;&gt;b"));
        assert!(svg.contains("T &amp; &quot;q&quot;") && !svg.contains("x<&>y"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        assert_eq!(svg.matches(">no data<").count(), 2);
        assert!(svg.contains(">no data: gone<"));
        for p in svg.split("<polyline points=\"").skip(1) {
            let pts = p.split('"').next().unwrap_or("").split(' ');
            assert!(
                pts.filter(|xy| xy.contains(',')).count() >= 2,
                "bad polyline: {p}"
            );
        }
        assert_eq!(svg.matches("<polyline").count(), 2, "one line, one dot");
        assert!(remaining_memory_svg("none", &[]).contains(">no data<"));
    }

    #[test]
    fn same_label_same_colour_across_panels() {
        let line: &[(f64, f64)] = &[(0.0, 9.0), (1.0, 1.0)];
        let first = panel("p1", &[("a", line), ("b", line)]);
        let second = panel("p2", &[("b", line), ("c", line), ("a", line)]);
        let svg = remaining_memory_svg("t", &[first, second]);
        for label in ["a", "b", "c"] {
            let strokes = strokes_of(&svg, label);
            let same = !strokes.is_empty() && strokes.iter().all(|s| *s == strokes[0]);
            assert!(same, "{label}: {strokes:?}");
            let in_legend = svg.matches(&format!(">{label}</text>")).count();
            assert_eq!(in_legend, 1, "legend: {label}");
        }
        assert_ne!(strokes_of(&svg, "a"), strokes_of(&svg, "b"));
    }

    #[test]
    fn markdown_table_aligns_and_escapes() {
        let rows = [vec!["a|b".into(), "12".into()], vec!["x\ny\\|".into()]];
        let md = markdown_table(&["name", ">MiB"], &rows);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("| name") && lines[0].ends_with("| MiB |"));
        assert_eq!(lines[1].replace(' ', ""), "|----------|--:|");
        assert!(lines[2].contains("a\\|b") && lines[2].ends_with("  12 |"));
        assert!(lines[3].contains("x<br>y\\\\\\|") && lines[3].ends_with("|     |"));
        assert_eq!(markdown_table(&[], &[]), "");
        let wide = markdown_table(&["a"], &[vec!["1".into(), "2".into()]]);
        assert_eq!(wide.lines().nth(1), Some("| --- | --- |"));
    }
}
