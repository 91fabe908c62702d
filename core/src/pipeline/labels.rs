//! Ground-truth labels for a run: a CSV keyed by SOP Instance UID or by file path, or one class
//! for every input. Without labels, attacks are untargeted against the model's own prediction.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::config::resolve;

#[derive(Debug, thiserror::Error)]
pub enum LabelsError {
    #[error("{path}: {reason}")]
    Csv { path: PathBuf, reason: String },
    #[error("{path}:{line}: {reason}")]
    Row {
        path: PathBuf,
        line: u64,
        reason: String,
    },
}

#[derive(Debug, Default, Clone)]
pub struct Labels {
    by_uid: HashMap<String, u32>,
    by_path: HashMap<PathBuf, u32>,
    all: Option<u32>,
    pub target: Option<u32>,
}

impl Labels {
    pub fn new(
        csv: Option<&Path>,
        all: Option<u32>,
        target: Option<u32>,
    ) -> Result<Self, LabelsError> {
        let mut l = Labels {
            all,
            target,
            ..Default::default()
        };
        if let Some(p) = csv {
            l.read_csv(p)?;
        }
        Ok(l)
    }

    fn read_csv(&mut self, path: &Path) -> Result<(), LabelsError> {
        let csv_err = |reason: String| LabelsError::Csv {
            path: path.to_path_buf(),
            reason,
        };
        let mut rd = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_path(path)
            .map_err(|e| csv_err(e.to_string()))?;
        let headers = rd.headers().map_err(|e| csv_err(e.to_string()))?.clone();
        let col = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
        let label = col("label").ok_or_else(|| {
            csv_err(format!(
                "no `label` column (columns: {})",
                headers.iter().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let uid = col("SOPInstanceUID");
        let file = col("file");
        if uid.is_none() && file.is_none() {
            return Err(csv_err(
                "needs a `SOPInstanceUID` or a `file` column to match rows to images".into(),
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        for rec in rd.records() {
            let rec = rec.map_err(|e| csv_err(e.to_string()))?;
            let line = rec.position().map(|p| p.line()).unwrap_or(0);
            let row_err = |reason: String| LabelsError::Row {
                path: path.to_path_buf(),
                line,
                reason,
            };
            let text = rec.get(label).unwrap_or("");
            let class: u32 = text
                .parse()
                .map_err(|_| row_err(format!("label `{text}` is not a non-negative integer")))?;
            if let Some(u) = uid.and_then(|i| rec.get(i)).filter(|s| !s.is_empty()) {
                self.by_uid.insert(u.to_string(), class);
            }
            if let Some(f) = file.and_then(|i| rec.get(i)).filter(|s| !s.is_empty()) {
                self.by_path.insert(resolve(&base, Path::new(f)), class);
            }
        }
        Ok(())
    }

    /// The label of an instance: by SOP Instance UID, then by path, then the run-wide class.
    pub fn lookup(&self, path: &Path, sop_instance_uid: Option<&str>) -> Option<u32> {
        if let Some(c) = sop_instance_uid.and_then(|u| self.by_uid.get(u)) {
            return Some(*c);
        }
        let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        self.by_path.get(&abs).copied().or(self.all)
    }

    pub fn is_empty(&self) -> bool {
        self.by_uid.is_empty() && self.by_path.is_empty() && self.all.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_by_uid_then_path_then_default() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.dcm"), b"x").unwrap();
        std::fs::write(dir.path().join("b.dcm"), b"x").unwrap();
        let csv = dir.path().join("labels.csv");
        std::fs::write(&csv, "file,SOPInstanceUID,label\na.dcm,1.2.3,1\nb.dcm,,0\n").unwrap();
        let l = Labels::new(Some(&csv), Some(7), None).unwrap();
        assert_eq!(
            l.lookup(Path::new("/elsewhere/z.dcm"), Some("1.2.3")),
            Some(1)
        );
        assert_eq!(l.lookup(&dir.path().join("b.dcm"), None), Some(0));
        assert_eq!(l.lookup(&dir.path().join("./b.dcm"), Some("9.9")), Some(0));
        assert_eq!(l.lookup(Path::new("/nope.dcm"), None), Some(7));
    }

    #[test]
    fn bad_csvs_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("l.csv");
        std::fs::write(&csv, "file,class\na,1\n").unwrap();
        let e = Labels::new(Some(&csv), None, None).unwrap_err().to_string();
        assert!(
            e.contains("no `label` column") && e.contains("l.csv"),
            "{e}"
        );
        std::fs::write(&csv, "file,label\na,1\nb,x\n").unwrap();
        let e = Labels::new(Some(&csv), None, None).unwrap_err().to_string();
        assert!(e.contains(":3:") && e.contains("`x`"), "{e}");
    }
}
