//! `adverse report DIR`: one self-contained HTML file from an evaluation's outputs.
//!
//! The audience is a clinician-facing team that will not open JSON: every number of
//! `evaluation.json` is shown as a figure or a table, the sanity verdicts say in words whether
//! the numbers can be trusted, example images show what the perturbations look like, and the
//! model card and the exact evaluation file make the page reproducible. No external asset is
//! referenced (figures are inline SVG, images data: URIs), so the file can be archived and
//! mailed. A small script records any script error and the sections it finds in
//! `#selfcheck`, which the browser test reads back.

pub mod svg;

use std::fmt::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::Value;

use svg::{Chart, Series, escape};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an evaluation result ({message}); run `adverse evaluate` first")]
    Format { path: PathBuf, message: String },
}

/// The sections every report has, in order (ids of the HTML sections).
pub const SECTIONS: &[&str] = &[
    "summary",
    "accuracy",
    "tables",
    "sanity",
    "detection",
    "certification",
    "examples",
    "model-card",
    "reproduce",
];

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}
fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}
fn arr<'a>(v: &'a Value, k: &str) -> &'a [Value] {
    v.get(k)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}
fn pct(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.1}%", v * 100.0))
}
fn num(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}"))
}

/// Writes `DIR/report.html` from `DIR/evaluation.json`; returns its path.
pub fn write(dir: &Path) -> Result<PathBuf, ReportError> {
    let path = dir.join("evaluation.json");
    let bytes = std::fs::read(&path).map_err(|source| ReportError::Io {
        path: path.clone(),
        source,
    })?;
    let ev: Value = serde_json::from_slice(&bytes).map_err(|e| ReportError::Format {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if !ev.get("cells").is_some_and(Value::is_array)
        || !ev.get("clean").is_some_and(Value::is_array)
    {
        return Err(ReportError::Format {
            path,
            message: "no `cells` / `clean` arrays".into(),
        });
    }
    let html = render(&ev, dir);
    let out = dir.join("report.html");
    std::fs::write(&out, html).map_err(|source| ReportError::Io {
        path: out.clone(),
        source,
    })?;
    Ok(out)
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}\
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}\
table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}\
th{background:#f3f3f3}td.l,th.l{text-align:left}.pass{color:#006d2c;font-weight:bold}.fail{color:#b30000;font-weight:bold}\
.na{color:#777}.charts{display:flex;flex-wrap:wrap;gap:1em}.ex{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}\
figure{margin:0}figcaption{font-size:.8em;color:#444;max-width:420px}img.pv{image-rendering:pixelated;width:420px;border:1px solid #ccc}\
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.85em}.note{color:#555;font-style:italic}";

/// Records script errors before anything else runs.
const HEAD_SCRIPT: &str = "window.__errors=[];window.addEventListener('error',function(e){window.__errors.push(String(e.message||e.type))},true);";

/// Runs last: lists the sections and figures found, and any error, in `#selfcheck`.
const TAIL_SCRIPT: &str = "(function(){var ids=[];document.querySelectorAll('section[id]').forEach(function(s){ids.push(s.id)});\
var r={errors:window.__errors,sections:ids,figures:document.querySelectorAll('svg.chart').length,\
images:document.querySelectorAll('img').length,broken_images:Array.prototype.filter.call(document.images,function(i){return i.complete&&i.naturalWidth===0}).length};\
document.getElementById('selfcheck').textContent=JSON.stringify(r);})();";

fn render(ev: &Value, dir: &Path) -> String {
    let mut h = String::new();
    let name = s(ev, "name");
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>adverse report: {}</title>\
         <script>{HEAD_SCRIPT}</script><style>{STYLE}</style></head><body>",
        escape(name)
    );
    let _ = write!(h, "<h1>Robustness report: {}</h1>", escape(name));
    summary(&mut h, ev);
    accuracy(&mut h, ev);
    tables(&mut h, ev);
    sanity(&mut h, ev);
    detection(&mut h, ev);
    certification(&mut h, ev);
    examples(&mut h, ev, dir);
    model_card(&mut h, ev);
    reproduce(&mut h, ev);
    let _ = write!(
        h,
        "<pre id=\"selfcheck\" hidden></pre><script>{TAIL_SCRIPT}</script></body></html>"
    );
    h
}

fn summary(h: &mut String, ev: &Value) {
    let spec = ev.get("spec").unwrap_or(&Value::Null);
    let checks = arr(ev, "checks");
    let failed = checks.iter().filter(|c| s(c, "verdict") == "fail").count();
    let clean: Vec<String> = arr(ev, "clean")
        .iter()
        .map(|c| format!("{}: {}", escape(s(c, "defense")), pct(f(c, "accuracy"))))
        .collect();
    let _ = write!(
        h,
        "<section id=\"summary\"><h2>Summary</h2><p>Model <code>{}</code>, evaluated by {} on the {} backend in {:.1} s. \
         Budgets ε in <b>{}</b> units of the stored DICOM values; every number is measured on the files as written \
         (integer pixels) and read back.</p><p>Clean accuracy — {}.</p><p>Sanity checks: {}</p></section>",
        escape(
            spec.get("model")
                .and_then(|m| m.get("onnx"))
                .and_then(Value::as_str)
                .unwrap_or("")
        ),
        escape(s(ev, "tool")),
        escape(s(ev, "backend")),
        f(ev, "seconds").unwrap_or(0.0),
        escape(spec.get("unit").and_then(Value::as_str).unwrap_or("stored")),
        clean.join("; "),
        if checks.is_empty() {
            "none computed.".to_string()
        } else if failed == 0 {
            format!(
                "<span class=\"pass\">all {} applicable checks pass</span>.",
                checks.iter().filter(|c| s(c, "verdict") == "pass").count()
            )
        } else {
            format!(
                "<span class=\"fail\">{failed} failed</span>: treat the robustness numbers below with suspicion \
                 (see <a href=\"#sanity\">Sanity checks</a>)."
            )
        }
    );
}

fn defenses(ev: &Value) -> Vec<String> {
    arr(ev, "clean")
        .iter()
        .map(|c| s(c, "defense").to_string())
        .collect()
}

fn accuracy(h: &mut String, ev: &Value) {
    let _ = write!(
        h,
        "<section id=\"accuracy\"><h2>Accuracy under attack</h2><p>Accuracy of the written files against the budget ε, per \
         defense (one line per attack; dashed: clean accuracy and the per-image worst case over all attacks).</p><div class=\"charts\">"
    );
    // L2-budgeted attacks have their own ε scale: they are in the tables, not on these axes.
    let cells: Vec<&Value> = arr(ev, "cells")
        .iter()
        .filter(|c| s(c, "role") != "iterative-l2")
        .collect();
    let unit = ev
        .get("spec")
        .and_then(|v| v.get("unit"))
        .and_then(Value::as_str)
        .unwrap_or("stored");
    let mut all_eps: Vec<f64> = cells.iter().filter_map(|c| f(c, "eps")).collect();
    all_eps.sort_by(f64::total_cmp);
    let (lo, hi) = (
        all_eps.first().copied().unwrap_or(0.0),
        all_eps.last().copied().unwrap_or(1.0),
    );
    let mut worst_by_def = Vec::new();
    for d in defenses(ev) {
        let mut series: Vec<Series> = Vec::new();
        for c in cells.iter().filter(|c| s(c, "defense") == d) {
            let (Some(e), Some(a)) = (f(c, "eps"), f(c, "accuracy")) else {
                continue;
            };
            let name = s(c, "attack").to_string();
            match series.iter_mut().find(|x| x.name == name) {
                Some(x) => x.points.push((e, a)),
                None => series.push(Series {
                    name,
                    points: vec![(e, a)],
                    dashed: false,
                }),
            }
        }
        for x in &mut series {
            x.points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        if let Some(c) = arr(ev, "clean")
            .iter()
            .find(|c| s(c, "defense") == d)
            .and_then(|c| f(c, "accuracy"))
        {
            series.push(Series {
                name: "clean".into(),
                points: vec![(lo, c), (hi, c)],
                dashed: true,
            });
        }
        let worst: Vec<(f64, f64)> = arr(ev, "worst_case")
            .iter()
            .filter(|w| s(w, "defense") == d)
            .filter_map(|w| Some((f(w, "eps")?, f(w, "accuracy")?)))
            .collect();
        if !worst.is_empty() {
            series.push(Series {
                name: "worst case".into(),
                points: worst.clone(),
                dashed: true,
            });
            worst_by_def.push(Series {
                name: d.clone(),
                points: worst,
                dashed: false,
            });
        }
        h.push_str(
            &Chart {
                title: format!("defense: {d}"),
                x_label: format!("ε ({unit} units)"),
                y_label: "accuracy".into(),
                x_range: None,
                y_range: Some((0.0, 1.0)),
                series,
                markers: true,
            }
            .render(),
        );
    }
    if worst_by_def.len() > 1 {
        h.push_str(
            &Chart {
                title: "worst case over attacks, per defense".into(),
                x_label: format!("ε ({unit} units)"),
                y_label: "accuracy".into(),
                x_range: None,
                y_range: Some((0.0, 1.0)),
                series: worst_by_def,
                markers: true,
            }
            .render(),
        );
    }
    h.push_str("</div></section>");
}

fn tables(h: &mut String, ev: &Value) {
    let _ = write!(
        h,
        "<section id=\"tables\"><h2>Success and distances</h2><p>Success = images the model classified correctly \
         before the attack and wrongly after it (written file), over the correctly classified ones. Distances are \
         means over the successful perturbations, in stored units.</p><table><tr><th class=\"l\">defense</th>\
         <th class=\"l\">attack</th><th class=\"l\">role</th><th>ε</th><th>accuracy</th><th>success</th><th>mean L∞</th>\
         <th>mean L2</th><th>files failed</th><th>seconds</th></tr>"
    );
    for c in arr(ev, "cells").iter().chain(arr(ev, "large_eps")) {
        let _ = write!(
            h,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td>\
             <td>{} ({}/{})</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td></tr>",
            escape(s(c, "defense")),
            escape(s(c, "attack")),
            escape(c.get("role").and_then(Value::as_str).unwrap_or("–")),
            f(c, "eps").map_or("min-norm".into(), |e| format!("{e}")),
            pct(f(c, "accuracy")),
            pct(f(c, "success_rate")),
            c.get("fooled").and_then(Value::as_u64).unwrap_or(0),
            c.get("clean_correct").and_then(Value::as_u64).unwrap_or(0),
            num(f(c, "mean_linf")),
            num(f(c, "mean_l2")),
            c.get("failed").and_then(Value::as_u64).unwrap_or(0),
            f(c, "seconds").unwrap_or(0.0)
        );
    }
    h.push_str("</table></section>");
}

fn sanity(h: &mut String, ev: &Value) {
    let _ = write!(
        h,
        "<section id=\"sanity\"><h2>Sanity checks</h2><p>The checks of Carlini et al. 2019 (“On Evaluating Adversarial \
         Robustness”): a failed check means the attacks did not behave as attacks must, and robustness numbers are then \
         likely overestimated (gradient masking, a broken attack, too few steps).</p><table><tr><th class=\"l\">defense</th>\
         <th class=\"l\">check</th><th class=\"l\">verdict</th><th class=\"l\">detail</th></tr>"
    );
    for c in arr(ev, "checks") {
        let (cls, word) = match s(c, "verdict") {
            "pass" => ("pass", "pass"),
            "fail" => ("fail", "FAIL"),
            _ => ("na", "n/a"),
        };
        let _ = write!(
            h,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l {cls}\">{word}</td><td class=\"l\">{}</td></tr>",
            escape(s(c, "defense")),
            escape(s(c, "check")),
            escape(s(c, "detail"))
        );
    }
    h.push_str("</table>");
    let pairs = arr(ev, "norm_comparisons");
    if !pairs.is_empty() {
        h.push_str(
            "<p>Minimum-norm attacks against an L2-budgeted one at equal success: the smallest L2 budget whose \
             success reaches the minimum-norm attack's (within one image). Mean L2 of the successful perturbations, \
             stored units.</p><table><tr><th class=\"l\">defense</th><th class=\"l\">minimum-norm</th><th>success</th>\
             <th>mean L2</th><th class=\"l\">budgeted</th><th>ε (L2)</th><th>success</th><th>mean L2</th></tr>",
        );
        for c in pairs {
            let _ = write!(
                h,
                "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td class=\"l\">{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(s(c, "defense")),
                escape(s(c, "minimal")),
                pct(f(c, "minimal_success")),
                num(f(c, "minimal_mean_l2")),
                escape(s(c, "budgeted")),
                f(c, "eps").map_or_else(
                    || format!("&gt; {}", f(c, "largest_eps").unwrap_or(0.0)),
                    |e| format!("{e}")
                ),
                pct(f(c, "budgeted_success")),
                num(f(c, "budgeted_mean_l2"))
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>");
}

fn detection(h: &mut String, ev: &Value) {
    let _ = write!(h, "<section id=\"detection\"><h2>Detectors</h2>");
    let det = arr(ev, "detection");
    if det.is_empty() {
        h.push_str(
            "<p class=\"note\">No detector was evaluated (add <code>detectors:</code> to the evaluation file).</p></section>",
        );
        return;
    }
    h.push_str("<p>ROC curves of each detector's score, clean images (negatives) against the attacked ones (positives).</p><div class=\"charts\">");
    let mut rows = String::new();
    let mut by_det: Vec<(String, Vec<Series>)> = Vec::new();
    for d in det {
        let name = s(d, "detector").to_string();
        let label = format!(
            "{} ε={}{}",
            s(d, "attack"),
            f(d, "eps").map_or("–".into(), |e| format!("{e}")),
            if d.get("adaptive").and_then(Value::as_bool) == Some(true) {
                " (adaptive)"
            } else {
                ""
            }
        );
        let roc: Vec<(f64, f64)> = arr(d, "roc")
            .iter()
            .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
            .collect();
        let se = Series {
            name: format!("{label} AUC {}", num(f(d, "auc"))),
            points: roc,
            dashed: false,
        };
        match by_det.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => v.push(se),
            None => by_det.push((name.clone(), vec![se])),
        }
        let _ = write!(
            rows,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&name),
            escape(&label),
            num(f(d, "auc")),
            pct(f(d, "tpr_at_5_fpr")),
            d.get("positives").and_then(Value::as_u64).unwrap_or(0),
            d.get("negatives").and_then(Value::as_u64).unwrap_or(0)
        );
    }
    for (name, mut series) in by_det {
        series.push(Series {
            name: "chance".into(),
            points: vec![(0.0, 0.0), (1.0, 1.0)],
            dashed: true,
        });
        h.push_str(
            &Chart {
                title: format!("detector: {name}"),
                x_label: "false-positive rate".into(),
                y_label: "true-positive rate".into(),
                x_range: Some((0.0, 1.0)),
                y_range: Some((0.0, 1.0)),
                series,
                markers: false,
            }
            .render(),
        );
    }
    let _ = write!(
        h,
        "</div><table><tr><th class=\"l\">detector</th><th class=\"l\">attack</th><th>AUC</th><th>TPR at 5% FPR</th>\
         <th>attacked</th><th>clean</th></tr>{rows}</table></section>"
    );
}

fn certification(h: &mut String, ev: &Value) {
    h.push_str("<section id=\"certification\"><h2>Certified robustness</h2>");
    let cert = arr(ev, "certification");
    if cert.is_empty() {
        h.push_str(
            "<p class=\"note\">No randomized-smoothing certification was run (add <code>certify:</code> to the evaluation file).</p></section>",
        );
        return;
    }
    h.push_str("<p>Randomized smoothing (Cohen et al. 2019): the fraction of images whose smoothed prediction is correct \
                and certified at L2 radius r (model-input scale), per noise level σ.</p><div class=\"charts\">");
    let mut series = Vec::new();
    let mut rows = String::new();
    for c in cert {
        let pts: Vec<(f64, f64)> = arr(c, "curve")
            .iter()
            .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
            .collect();
        series.push(Series {
            name: match c.get("model").and_then(Value::as_str) {
                Some(m) => format!("σ = {}, {m}", num(f(c, "sigma"))),
                None => format!("σ = {}", num(f(c, "sigma"))),
            },
            points: pts,
            dashed: false,
        });
        for p in arr(c, "at") {
            let _ = write!(
                rows,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                num(f(c, "sigma")),
                num(p.get(0).and_then(Value::as_f64)),
                pct(p.get(1).and_then(Value::as_f64))
            );
        }
    }
    h.push_str(
        &Chart {
            title: "certified accuracy".into(),
            x_label: "L2 radius (model-input scale)".into(),
            y_label: "certified accuracy".into(),
            x_range: None,
            y_range: Some((0.0, 1.0)),
            series,
            markers: false,
        }
        .render(),
    );
    let _ = write!(
        h,
        "</div><table><tr><th>σ</th><th>radius</th><th>certified accuracy</th></tr>{rows}</table></section>"
    );
}

/// Up to four frames of the strongest iterative attack at the largest budget, for each defense
/// that ran it: the previews the engine wrote (original | result | amplified difference).
fn examples(h: &mut String, ev: &Value, dir: &Path) {
    h.push_str(
        "<section id=\"examples\"><h2>Example images</h2><p>Each panel: original | written result (adversarial, or \
         adversarial then purified) | difference amplified to the full grey range.</p>",
    );
    let cells = arr(ev, "cells");
    let iterative: Vec<&Value> = cells
        .iter()
        .filter(|c| s(c, "role") == "iterative" && f(c, "eps").is_some())
        .collect();
    let max_eps = iterative
        .iter()
        .filter_map(|c| f(c, "eps"))
        .fold(f64::MIN, f64::max);
    let attack = iterative.first().map(|c| s(c, "attack").to_string());
    let mut shown = 0;
    if let Some(attack) = attack {
        for run in arr(ev, "runs") {
            if s(run, "purpose") != "grid"
                || s(run, "attack") != attack
                || f(run, "eps") != Some(max_eps)
            {
                continue;
            }
            let pdir = dir.join(s(run, "dir")).join("previews");
            let mut files: Vec<PathBuf> = std::fs::read_dir(&pdir)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|x| x == "png"))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            let _ = write!(
                h,
                "<h3>defense: {} — {attack} at ε = {max_eps}</h3><div class=\"ex\">",
                escape(s(run, "defense"))
            );
            for p in files.iter().take(4) {
                let Ok(bytes) = std::fs::read(p) else {
                    continue;
                };
                let _ = write!(
                    h,
                    "<figure><img class=\"pv\" alt=\"{n}\" src=\"data:image/png;base64,{}\"><figcaption>{n}</figcaption></figure>",
                    base64::engine::general_purpose::STANDARD.encode(&bytes),
                    n = escape(&p.file_name().unwrap_or_default().to_string_lossy())
                );
                shown += 1;
            }
            h.push_str("</div>");
        }
    }
    if shown == 0 {
        h.push_str("<p class=\"note\">No previews were written (set <code>output: {previews: true}</code>).</p>");
    }
    h.push_str("</section>");
}

fn model_card(h: &mut String, ev: &Value) {
    let card = ev.get("model_card").filter(|v| !v.is_null());
    let text = card
        .and_then(|c| serde_yaml::to_string(c).ok())
        .unwrap_or_else(|| "(no model card found beside the model)".into());
    let _ = write!(
        h,
        "<section id=\"model-card\"><h2>Model card</h2><pre>{}</pre></section>",
        escape(&text)
    );
}

fn reproduce(h: &mut String, ev: &Value) {
    let spec = ev
        .get("spec")
        .and_then(|v| serde_yaml::to_string(v).ok())
        .unwrap_or_default();
    let _ = write!(
        h,
        "<section id=\"reproduce\"><h2>Reproduce</h2><p>{} — <code>adverse evaluate {}</code>. Each run's folder holds its \
         pipeline file, derived DICOM, results and a hash-chained audit log (<code>adverse audit verify</code>).</p>\
         <p>The evaluation as run (paths resolved):</p><pre>{}</pre></section>",
        escape(s(ev, "tool")),
        escape(s(ev, "evaluation_file")),
        escape(&spec)
    );
}
