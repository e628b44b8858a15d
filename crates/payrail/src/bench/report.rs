//! The harness's results: a table, JSON, and an SVG chart.

use std::fmt::Write;

use serde_json::json;

use super::Mode;
use super::load::Summary;

pub struct Row {
    pub connections: usize,
    pub healthz: Summary,
    pub debit: Summary,
}

impl Row {
    /// Debit throughput as a share of the same run's `/healthz` throughput.
    pub fn ratio(&self) -> f64 {
        if self.healthz.rps > 0.0 {
            self.debit.rps / self.healthz.rps
        } else {
            0.0
        }
    }
}

pub struct Report {
    pub mode: Mode,
    pub wallets: usize,
    pub duration_s: u64,
    pub threads: usize,
    pub target: String,
    pub startup_ms: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    pub rows: Vec<Row>,
}

pub fn print_row(r: &Row) {
    eprintln!(
        "C={:<4} healthz {:>9.0} req/s p99 {:>6.2} ms | debit {:>9.0} req/s p50 {:>6.2} p99 {:>6.2} p99.9 {:>6.2} ms, not SUCCESS {}, errors {} | ratio {:.0}%",
        r.connections,
        r.healthz.rps,
        r.healthz.p99_ms,
        r.debit.rps,
        r.debit.p50_ms,
        r.debit.p99_ms,
        r.debit.p999_ms,
        r.debit.not_ok,
        r.debit.errors,
        r.ratio() * 100.0
    );
}

pub fn print_table(rep: &Report) {
    println!(
        "\nmode {:?}, {} wallets, {} s per run, {} load threads, target: {}",
        rep.mode, rep.wallets, rep.duration_s, rep.threads, rep.target
    );
    if let Some(ms) = rep.startup_ms {
        println!("server start-up on this database: {ms:.0} ms");
    }
    if let Some(mib) = rep.peak_rss_mib {
        println!("server peak RSS: {mib:.0} MiB");
    }
    println!(
        "\n| conns | healthz req/s | debit req/s | debit/healthz | debit p50 ms | debit p99 ms | debit p99.9 ms | not SUCCESS | errors |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rep.rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.0}% | {:.2} | {:.2} | {:.2} | {} | {} |",
            r.connections,
            r.healthz.rps,
            r.debit.rps,
            r.ratio() * 100.0,
            r.debit.p50_ms,
            r.debit.p99_ms,
            r.debit.p999_ms,
            r.debit.not_ok,
            r.debit.errors + r.healthz.errors
        );
    }
}

fn summary_json(s: &Summary) -> serde_json::Value {
    json!({
        "requests": s.requests,
        "rps": (s.rps * 10.0).round() / 10.0,
        "p50_ms": s.p50_ms,
        "p99_ms": s.p99_ms,
        "p999_ms": s.p999_ms,
        "max_ms": s.max_ms,
        "not_success": s.not_ok,
        "errors": s.errors,
    })
}

pub fn json(rep: &Report) -> String {
    let v = json!({
        "mode": format!("{:?}", rep.mode).to_lowercase(),
        "wallets": rep.wallets,
        "duration_s": rep.duration_s,
        "load_threads": rep.threads,
        "target": rep.target,
        "startup_ms": rep.startup_ms,
        "peak_rss_mib": rep.peak_rss_mib,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "runs": rep.rows.iter().map(|r| json!({
            "connections": r.connections,
            "healthz": summary_json(&r.healthz),
            "debit": summary_json(&r.debit),
            "debit_over_healthz": (r.ratio() * 1000.0).round() / 1000.0,
        })).collect::<Vec<_>>(),
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// Two panels side by side: throughput (healthz and debit) and debit p99,
/// against the number of connections (log scale).
pub fn svg(rep: &Report) -> String {
    let (w, h, pad) = (960.0, 420.0, 60.0);
    let panel_w = (w - 3.0 * pad) / 2.0;
    let panel_h = h - 2.0 * pad;
    let xs: Vec<f64> = rep
        .rows
        .iter()
        .map(|r| (r.connections.max(1) as f64).log2())
        .collect();
    let (xmin, xmax) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
    let xspan = if xmax > xmin { xmax - xmin } else { 1.0 };
    let x_at = |x: f64, left: f64| left + (x - xmin) / xspan * panel_w;
    let max_rps = rep
        .rows
        .iter()
        .map(|r| r.healthz.rps.max(r.debit.rps))
        .fold(1.0, f64::max)
        * 1.1;
    let max_p99 = rep.rows.iter().map(|r| r.debit.p99_ms).fold(1.0, f64::max) * 1.1;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"{pad}\" y=\"24\" font-size=\"15\">payrail bench: {:?} mode, {} wallets ({} CPUs)</text>",
        rep.mode,
        rep.wallets,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let mut panel =
        |left: f64, title: &str, ymax: f64, unit: &str, series: &[(&str, &str, Vec<f64>)]| {
            let top = pad;
            let _ = write!(
                s,
                "<text x=\"{left}\" y=\"{}\">{title}</text>\
             <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\
             <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>",
                top - 8.0,
                top + panel_h,
                left + panel_w,
                top + panel_h,
                top + panel_h
            );
            for i in 0..=4 {
                let v = ymax * f64::from(i) / 4.0;
                let y = top + panel_h - panel_h * f64::from(i) / 4.0;
                let _ = write!(
                    s,
                    "<text x=\"{}\" y=\"{y}\" text-anchor=\"end\">{}</text>\
                 <line x1=\"{left}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#ddd\"/>",
                    left - 4.0,
                    if ymax >= 100.0 {
                        format!("{v:.0}")
                    } else {
                        format!("{v:.1}")
                    },
                    left + panel_w
                );
            }
            for (r, x) in rep.rows.iter().zip(&xs) {
                let _ = write!(
                    s,
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                    x_at(*x, left),
                    top + panel_h + 16.0,
                    r.connections
                );
            }
            let _ = write!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">connections ({unit})</text>",
                left + panel_w / 2.0,
                top + panel_h + 34.0
            );
            for (k, (name, color, ys)) in series.iter().enumerate() {
                let points: Vec<String> = xs
                    .iter()
                    .zip(ys)
                    .map(|(x, y)| {
                        format!(
                            "{:.1},{:.1}",
                            x_at(*x, left),
                            top + panel_h - y / ymax * panel_h
                        )
                    })
                    .collect();
                let _ = write!(
                    s,
                    "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                    points.join(" ")
                );
                for p in &points {
                    let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
                    let _ = write!(
                        s,
                        "<circle cx=\"{px}\" cy=\"{py}\" r=\"3\" fill=\"{color}\"/>"
                    );
                }
                let _ = write!(
                    s,
                    "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>",
                    left + 10.0,
                    top + 16.0 + 16.0 * k as f64
                );
            }
        };
    let healthz: Vec<f64> = rep.rows.iter().map(|r| r.healthz.rps).collect();
    let debit: Vec<f64> = rep.rows.iter().map(|r| r.debit.rps).collect();
    let p99: Vec<f64> = rep.rows.iter().map(|r| r.debit.p99_ms).collect();
    panel(
        pad,
        "throughput, requests/s",
        max_rps,
        "req/s",
        &[
            ("/healthz", "#888", healthz),
            ("/debitwallet", "#c33", debit),
        ],
    );
    panel(
        2.0 * pad + panel_w,
        "debit p99 latency, ms",
        max_p99,
        "ms",
        &[("/debitwallet p99", "#c33", p99)],
    );
    s.push_str("</svg>\n");
    s
}
