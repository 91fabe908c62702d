//! Readiness: when a file in the drop folder may be taken.
//!
//! Copy tools give no "finished" signal that works everywhere (inotify's close-after-write is
//! local only; a copy may open and close a file several times), so a file is taken when
//! (1) its size and mtime have not changed for `settle`, and (2) it parses as a complete DICOM
//! file (file meta, data set and a pixel data element). A stable file that fails (2) is most
//! likely a writer that paused mid-copy: it is checked again after each further `settle` and
//! only after `incomplete_timeout` is it handed on anyway, so the engine quarantines it with
//! its parse error. A stable file that is clearly not DICOM (no magic, no known data set start)
//! is handed on at once for the same reason.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use rayon::prelude::*;

use crate::dicom::{DicomError, DicomFile};

/// What a complete-DICOM check says about a stable file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Take it: complete DICOM, or certainly not DICOM (the engine reports why).
    Take,
    /// Looks like DICOM cut short: wait.
    Incomplete(String),
    /// It disappeared (renamed or claimed by a neighbour).
    Gone,
}

/// Reads `path` and decides whether it is a whole DICOM file.
pub fn check(path: &Path) -> Check {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Check::Gone,
        // Unreadable (permissions...): the engine records the error and it is quarantined.
        Err(_) => return Check::Take,
    };
    if bytes.len() < 132 {
        return Check::Incomplete(format!("only {} bytes", bytes.len()));
    }
    match DicomFile::from_bytes(path, &bytes) {
        Ok(f) => {
            use dicom_dictionary_std::tags;
            let has_pixels = [
                tags::PIXEL_DATA,
                tags::FLOAT_PIXEL_DATA,
                tags::DOUBLE_FLOAT_PIXEL_DATA,
            ]
            .into_iter()
            .any(|t| f.obj.get(t).is_some());
            if has_pixels {
                Check::Take
            } else {
                Check::Incomplete("no pixel data element yet".into())
            }
        }
        Err(DicomError::NotDicom { .. }) => Check::Take,
        Err(e) => Check::Incomplete(e.to_string()),
    }
}

#[derive(Debug, Clone)]
struct Candidate {
    size: u64,
    mtime: Option<SystemTime>,
    /// When size or mtime last changed (or the file was first seen).
    changed_at: Instant,
    /// When the complete-DICOM check first failed on the stable file.
    incomplete_since: Option<Instant>,
    due: Instant,
}

/// Files seen but not yet taken, each with its stability clock.
#[derive(Debug)]
pub struct Tracker {
    settle: Duration,
    incomplete_timeout: Duration,
    files: BTreeMap<PathBuf, Candidate>,
    /// Files left in place (`done: keep`) with the size and mtime they had: not taken again
    /// unless they change.
    kept: HashMap<PathBuf, (u64, Option<SystemTime>)>,
}

/// A file handed on, and whether it passed the complete-DICOM check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub path: PathBuf,
    /// Why it is handed on although it did not parse completely (the incomplete timeout).
    pub incomplete: Option<String>,
}

fn stat(path: &Path) -> Option<(u64, Option<SystemTime>)> {
    let m = std::fs::metadata(path).ok()?;
    m.is_file().then(|| (m.len(), m.modified().ok()))
}

impl Tracker {
    pub fn new(settle: Duration, incomplete_timeout: Duration) -> Tracker {
        Tracker {
            settle,
            incomplete_timeout,
            files: BTreeMap::new(),
            kept: HashMap::new(),
        }
    }

    /// Files waiting.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// A hint that `path` exists or changed. Unknown files start their settle clock now; a
    /// known one is re-examined at its next poll anyway.
    pub fn note(&mut self, path: PathBuf, now: Instant) {
        if self.files.contains_key(&path) {
            return;
        }
        let Some((size, mtime)) = stat(&path) else {
            return;
        };
        if let Some(k) = self.kept.get(&path) {
            if *k == (size, mtime) {
                return;
            }
            self.kept.remove(&path);
        }
        self.files.insert(
            path,
            Candidate {
                size,
                mtime,
                changed_at: now,
                incomplete_since: None,
                due: now + self.settle,
            },
        );
    }

    /// Remember a file put back in place so that it is not taken again while unchanged.
    pub fn keep(&mut self, path: PathBuf) {
        if let Some(s) = stat(&path) {
            self.kept.insert(path, s);
        }
    }

    /// Files ready now, at most `max`, in name order. They leave the tracker: the caller claims
    /// them (or drops them when a neighbour was faster).
    pub fn poll(&mut self, now: Instant, max: usize) -> Vec<Ready> {
        if max == 0 {
            return Vec::new();
        }
        let mut stable = Vec::new();
        let mut gone = Vec::new();
        for (path, c) in self.files.iter_mut() {
            if c.due > now {
                continue;
            }
            let Some((size, mtime)) = stat(path) else {
                gone.push(path.clone());
                continue;
            };
            if (size, mtime) != (c.size, c.mtime) {
                (c.size, c.mtime) = (size, mtime);
                c.changed_at = now;
                c.incomplete_since = None;
                c.due = now + self.settle;
                continue;
            }
            if now.duration_since(c.changed_at) < self.settle {
                c.due = c.changed_at + self.settle;
                continue;
            }
            stable.push(path.clone());
            if stable.len() >= max {
                break;
            }
        }
        for p in gone {
            self.files.remove(&p);
        }
        let checked: Vec<(PathBuf, Check)> = stable
            .into_par_iter()
            .map(|p| {
                let c = check(&p);
                (p, c)
            })
            .collect();
        let mut out = Vec::new();
        for (path, verdict) in checked {
            match verdict {
                Check::Gone => {
                    self.files.remove(&path);
                }
                Check::Take => {
                    self.files.remove(&path);
                    out.push(Ready {
                        path,
                        incomplete: None,
                    });
                }
                Check::Incomplete(why) => {
                    let Some(c) = self.files.get_mut(&path) else {
                        continue;
                    };
                    let since = *c.incomplete_since.get_or_insert(now);
                    if now.duration_since(since) >= self.incomplete_timeout {
                        tracing::warn!(
                            "{}: still not complete DICOM after {} ms ({why}); processing it \
                             anyway (it will be quarantined if it does not decode)",
                            path.display(),
                            self.incomplete_timeout.as_millis()
                        );
                        self.files.remove(&path);
                        out.push(Ready {
                            path,
                            incomplete: Some(why),
                        });
                    } else {
                        tracing::debug!("{}: not complete yet ({why})", path.display());
                        c.due = now + self.settle;
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../pipelines/samples/pneumoniamnist"
        );
        let f = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "dcm"))
            .unwrap();
        std::fs::read(f).unwrap()
    }

    #[test]
    fn check_tells_complete_truncated_and_foreign_files_apart() {
        let dir = tempfile::tempdir().unwrap();
        let full = sample();
        let p = dir.path().join("a.dcm");
        std::fs::write(&p, &full).unwrap();
        assert_eq!(check(&p), Check::Take);
        for cut in [10, 140, full.len() / 2, full.len() - 7] {
            std::fs::write(&p, &full[..cut]).unwrap();
            assert!(
                matches!(check(&p), Check::Incomplete(_)),
                "cut at {cut}: {:?}",
                check(&p)
            );
        }
        std::fs::write(&p, vec![b'x'; 500]).unwrap();
        assert_eq!(check(&p), Check::Take);
        std::fs::remove_file(&p).unwrap();
        assert_eq!(check(&p), Check::Gone);
    }

    #[test]
    fn a_file_is_taken_only_after_it_settles_and_completes() {
        let dir = tempfile::tempdir().unwrap();
        let full = sample();
        let p = dir.path().join("a.dcm");
        let settle = Duration::from_millis(100);
        let mut t = Tracker::new(settle, Duration::from_millis(300));
        let t0 = Instant::now();
        std::fs::write(&p, &full[..full.len() / 2]).unwrap();
        t.note(p.clone(), t0);
        assert!(t.poll(t0, 10).is_empty(), "taken before settling");
        // Stable but incomplete: waits.
        assert!(t.poll(t0 + settle, 10).is_empty());
        assert_eq!(t.len(), 1);
        // The writer goes on: the clock restarts even though it is due.
        std::fs::write(&p, &full).unwrap();
        let later = t0 + settle * 2;
        // Force a visible change even on coarse-mtime filesystems: the size changed.
        assert!(t.poll(later, 10).is_empty());
        let r = t.poll(later + settle, 10);
        assert_eq!(
            r,
            vec![Ready {
                path: p.clone(),
                incomplete: None
            }]
        );
        assert!(t.is_empty());
    }

    #[test]
    fn an_incomplete_file_is_handed_on_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let full = sample();
        let p = dir.path().join("cut.dcm");
        std::fs::write(&p, &full[..full.len() - 20]).unwrap();
        let settle = Duration::from_millis(50);
        let mut t = Tracker::new(settle, Duration::from_millis(200));
        let t0 = Instant::now();
        t.note(p.clone(), t0);
        assert!(t.poll(t0 + settle, 10).is_empty());
        assert!(t.poll(t0 + settle * 3, 10).is_empty());
        let r = t.poll(t0 + settle * 6, 10);
        assert_eq!(r.len(), 1);
        assert!(r[0].incomplete.is_some());
    }

    #[test]
    fn kept_files_are_ignored_until_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.dcm");
        std::fs::write(&p, sample()).unwrap();
        let mut t = Tracker::new(Duration::from_millis(1), Duration::from_millis(1));
        t.keep(p.clone());
        t.note(p.clone(), Instant::now());
        assert!(t.is_empty());
        std::fs::write(&p, b"changed, and longer than before.........").unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .set_len(2000)
            .unwrap();
        t.note(p.clone(), Instant::now());
        assert_eq!(t.len(), 1);
    }
}
