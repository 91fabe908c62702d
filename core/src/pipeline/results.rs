//! Result files: `results.jsonl` (appended one instance at a time while the run goes, so an
//! interrupted run keeps what it finished), then compacted at the end (last row per input frame
//! wins, torn lines dropped) and turned into `results.csv` and `summary.json`.
//!
//! Compaction is what makes a resumed run's results equal an uninterrupted run's: rows of an
//! instance that was redone replace the earlier ones instead of duplicating them. It streams the
//! file twice and keeps one 16-byte key per row in memory, so it stays small for large archives.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Columns every CSV row has, in order; stage columns (`<stage>.<key>`) follow, sorted.
pub const FIXED_COLUMNS: &[&str] = &[
    "input",
    "frame",
    "status",
    "error",
    "failed_stage",
    "sop_instance_uid",
    "output",
    "output_sop_instance_uid",
    "output_sha256",
    "label",
    "pred_before",
    "conf_before",
    "pred_final",
    "pred_written",
    "conf_written",
    "attack_success",
    "flagged",
    "linf_stored",
    "l2_stored",
    "linf_hu",
    "l2_hu",
    "psnr_db",
    "ssim",
    "decode_ms",
    "compute_ms",
    "write_ms",
    "model_note",
];

fn row_key(row: &Map<String, Value>) -> Option<[u8; 16]> {
    let input = row.get("input")?.as_str()?;
    let frame = row.get("frame").cloned().unwrap_or(Value::Null);
    let mut h = Sha256::new();
    h.update(input.as_bytes());
    h.update([0]);
    h.update(frame.to_string().as_bytes());
    let d = h.finalize();
    let mut k = [0u8; 16];
    k.copy_from_slice(&d[..16]);
    Some(k)
}

pub fn read_rows(path: &Path, mut f: impl FnMut(usize, Map<String, Value>)) -> std::io::Result<()> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let rd = std::io::BufReader::new(file);
    for (i, line) in rd.split(b'\n').enumerate() {
        let line = line?;
        if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(&line) {
            f(i, m);
        }
    }
    Ok(())
}

/// Aggregates over the compacted rows.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct Totals {
    pub instances: usize,
    pub instances_ok: usize,
    pub instances_failed: usize,
    pub instances_written: usize,
    pub frames: usize,
    pub labelled_frames: usize,
    pub accuracy_before: Option<f64>,
    pub accuracy_after: Option<f64>,
    pub attacked_frames: usize,
    pub attack_success_rate: Option<f64>,
    pub flagged_frames: usize,
    pub mean_linf_stored: Option<f64>,
    pub mean_l2_stored: Option<f64>,
    pub mean_psnr_db: Option<f64>,
    pub mean_ssim: Option<f64>,
}

#[derive(Default)]
struct Mean(f64, usize);
impl Mean {
    fn add(&mut self, v: Option<f64>) {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            self.0 += v;
            self.1 += 1;
        }
    }
    fn get(&self) -> Option<f64> {
        (self.1 > 0).then(|| self.0 / self.1 as f64)
    }
}

/// Rewrites `jsonl` keeping the last row per (input, frame), writes `csv`, and returns totals.
pub fn compact(jsonl: &Path, csv_path: &Path) -> std::io::Result<Totals> {
    let mut last: HashMap<[u8; 16], usize> = HashMap::new();
    read_rows(jsonl, |i, m| {
        if let Some(k) = row_key(&m) {
            last.insert(k, i);
        }
    })?;
    let keep: BTreeSet<usize> = last.into_values().collect();
    let dir = jsonl.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".adverse-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    let mut stage_cols: BTreeSet<String> = BTreeSet::new();
    let mut werr: Option<std::io::Error> = None;
    {
        let mut w = BufWriter::new(tmp.as_file_mut());
        read_rows(jsonl, |i, m| {
            if keep.contains(&i) {
                if let Some(Value::Object(st)) = m.get("stages") {
                    for (stage, v) in st {
                        if let Value::Object(vals) = v {
                            for k in vals.keys() {
                                stage_cols.insert(format!("{stage}.{k}"));
                            }
                        }
                    }
                }
                let r = serde_json::to_writer(&mut w, &m)
                    .map_err(std::io::Error::other)
                    .and_then(|_| w.write_all(b"\n"));
                if let Err(e) = r {
                    werr.get_or_insert(e);
                }
            }
        })?;
        w.flush()?;
    }
    if let Some(e) = werr {
        return Err(e);
    }
    tmp.as_file().sync_all()?;
    tmp.persist(jsonl).map_err(|e| e.error)?;

    // CSV and totals from the compacted file.
    let mut tmp = tempfile::Builder::new()
        .prefix(".adverse-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    let mut totals = Totals::default();
    let (mut linf, mut l2, mut psnr, mut ssim) = (
        Mean::default(),
        Mean::default(),
        Mean::default(),
        Mean::default(),
    );
    let (mut correct_before, mut correct_after, mut labelled_after, mut success) =
        (0usize, 0usize, 0usize, 0usize);
    let mut instances: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    {
        let mut w = csv::Writer::from_writer(BufWriter::new(tmp.as_file_mut()));
        let header: Vec<String> = FIXED_COLUMNS
            .iter()
            .map(|s| s.to_string())
            .chain(stage_cols.iter().cloned())
            .collect();
        w.write_record(&header).map_err(std::io::Error::other)?;
        let mut err = None;
        read_rows(jsonl, |_, m| {
            let cell = |v: Option<&Value>| match v {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            let mut rec: Vec<String> = FIXED_COLUMNS.iter().map(|c| cell(m.get(*c))).collect();
            for col in &stage_cols {
                let (stage, key) = col.split_once('.').unwrap_or((col, ""));
                rec.push(cell(
                    m.get("stages")
                        .and_then(|s| s.get(stage))
                        .and_then(|s| s.get(key)),
                ));
            }
            if let Err(e) = w.write_record(&rec) {
                err.get_or_insert(e);
            }
            // Totals.
            let input = cell(m.get("input"));
            let ok = m.get("status").and_then(Value::as_str) == Some("ok");
            let written = m.get("output").is_some_and(|v| !v.is_null());
            let e = instances.entry(input).or_insert((true, false));
            e.0 &= ok;
            e.1 |= written;
            if !ok {
                return;
            }
            totals.frames += 1;
            let num = |k: &str| m.get(k).and_then(Value::as_f64);
            let label = m.get("label").and_then(Value::as_u64);
            let before = m.get("pred_before").and_then(Value::as_u64);
            let after = m
                .get("pred_written")
                .and_then(Value::as_u64)
                .or(m.get("pred_final").and_then(Value::as_u64));
            if let Some(l) = label {
                totals.labelled_frames += 1;
                if before == Some(l) {
                    correct_before += 1;
                }
                if let Some(a) = after {
                    labelled_after += 1;
                    if a == l {
                        correct_after += 1;
                    }
                }
            }
            if let Some(s) = m.get("attack_success").and_then(Value::as_bool) {
                totals.attacked_frames += 1;
                if s {
                    success += 1;
                }
            }
            if m.get("flagged").and_then(Value::as_bool) == Some(true) {
                totals.flagged_frames += 1;
            }
            linf.add(num("linf_stored"));
            l2.add(num("l2_stored"));
            psnr.add(num("psnr_db"));
            ssim.add(num("ssim"));
        })?;
        if let Some(e) = err {
            return Err(std::io::Error::other(e));
        }
        w.flush()?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(csv_path).map_err(|e| e.error)?;
    totals.instances = instances.len();
    totals.instances_ok = instances.values().filter(|v| v.0).count();
    totals.instances_failed = totals.instances - totals.instances_ok;
    totals.instances_written = instances.values().filter(|v| v.0 && v.1).count();
    let frac = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
    totals.accuracy_before = frac(correct_before, totals.labelled_frames);
    totals.accuracy_after = frac(correct_after, labelled_after);
    totals.attack_success_rate = frac(success, totals.attacked_frames);
    totals.mean_linf_stored = linf.get();
    totals.mean_l2_stored = l2.get();
    totals.mean_psnr_db = psnr.get();
    totals.mean_ssim = ssim.get();
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compaction_keeps_the_last_row_per_frame_and_drops_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("results.jsonl");
        let c = dir.path().join("results.csv");
        std::fs::write(
            &j,
            concat!(
                r#"{"input":"a.dcm","frame":0,"status":"failed","error":"x"}"#, "\n",
                r#"{"input":"b.dcm","frame":0,"status":"ok","label":1,"pred_before":1,"pred_written":0,"attack_success":true,"linf_stored":4,"stages":{"pgd":{"l2":3.5}}}"#, "\n",
                r#"{"input":"a.dcm","frame":0,"status":"ok","label":0,"pred_before":0,"pred_written":0,"attack_success":false,"linf_stored":2,"output":"a.dcm"}"#, "\n",
                r#"{"input":"c.dcm","fra"#
            ),
        )
        .unwrap();
        let t = compact(&j, &c).unwrap();
        let text = std::fs::read_to_string(&j).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(!text.contains("failed") && !text.contains("c.dcm"));
        assert_eq!(t.instances, 2);
        assert_eq!(t.instances_ok, 2);
        assert_eq!(t.instances_written, 1);
        assert_eq!(t.accuracy_before, Some(1.0));
        assert_eq!(t.accuracy_after, Some(0.5));
        assert_eq!(t.attack_success_rate, Some(0.5));
        assert_eq!(t.mean_linf_stored, Some(3.0));
        let csv = std::fs::read_to_string(&c).unwrap();
        let header = csv.lines().next().unwrap();
        assert!(
            header.starts_with("input,frame,status") && header.ends_with(",pgd.l2"),
            "{header}"
        );
        assert_eq!(csv.lines().count(), 3);
        assert!(csv.contains("b.dcm,0,ok"), "{csv}");
        // Idempotent.
        let t2 = compact(&j, &c).unwrap();
        assert_eq!(t, t2);
    }
}
