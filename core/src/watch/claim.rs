//! Claims, leases, and where an input goes when it is finished.
//!
//! ```text
//! <watch>/.adverse/instances/<id>.lock      flock'ed while instance <id> runs (one per id)
//! <watch>/.adverse/processing/<id>/<rel>    inputs claimed by <id> (moved there atomically)
//! <watch>/.adverse/processing/<id>/.heartbeat   mtime touched while <id> is alive
//! <watch>/.adverse/done/<rel>               finished inputs (done: move)
//! <watch>/.adverse/quarantine/<rel>         inputs that failed, beside <rel>.reason.json
//! ```
//! A claim is one `rename(2)` from the drop folder into the instance's processing folder.
//! Rename is atomic on one filesystem, also over NFS and SMB where the server performs it, so
//! of several processes (on one host or several) racing for a file exactly one succeeds; the
//! others get "not found" and drop it. `RENAME_NOREPLACE` (Linux) keeps a claim from replacing a
//! file of the same name still in processing; where the filesystem does not support the flag,
//! an existence check before a plain rename is the (racy, documented) fallback.
//!
//! Files in a processing folder outlive a crash. The same instance re-queues its own at start;
//! another instance takes them over by renaming them into its own folder once the owner's
//! heartbeat is older than the lease, so work of a host that died is not stuck forever.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::WatchError;

/// Folder of the watcher's own state inside the watched folder (hidden: never an input).
pub const STATE_DIR: &str = ".adverse";
const HEARTBEAT: &str = ".heartbeat";

/// The folders of one watched root.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    pub state: PathBuf,
    pub processing: PathBuf,
    pub instances: PathBuf,
    pub done: PathBuf,
    pub quarantine: PathBuf,
}

impl Layout {
    pub fn new(root: &Path, done: Option<&Path>, quarantine: Option<&Path>) -> Layout {
        let state = root.join(STATE_DIR);
        Layout {
            root: root.to_path_buf(),
            processing: state.join("processing"),
            instances: state.join("instances"),
            done: done.map_or_else(|| state.join("done"), Path::to_path_buf),
            quarantine: quarantine.map_or_else(|| state.join("quarantine"), Path::to_path_buf),
            state,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WatchError + '_ {
    move |source| WatchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Renames `from` to `to` unless `to` exists. Ok(false): `from` is gone or `to` is taken.
pub fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<bool> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::{CWD, RenameFlags, renameat_with};
        match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
            Ok(()) => return Ok(true),
            Err(e) if e == rustix::io::Errno::NOENT || e == rustix::io::Errno::EXIST => {
                return Ok(false);
            }
            // The filesystem does not support the flag: fall through to the checked rename.
            Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {}
            Err(e) => return Err(e.into()),
        }
    }
    if to.exists() {
        return Ok(false);
    }
    match std::fs::rename(from, to) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Moves a file, across filesystems too (copy, sync, then remove).
fn move_file(from: &Path, to: &Path) -> std::io::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
            copy_atomic(from, to)?;
            std::fs::remove_file(from)
        }
        Err(e) => Err(e),
    }
}

/// Copies through a temporary name beside `to`, so a reader never sees half a file.
pub fn copy_atomic(from: &Path, to: &Path) -> std::io::Result<()> {
    let parent = to.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".adverse-")
        .suffix(".tmp")
        .tempfile_in(parent)?;
    std::io::copy(&mut File::open(from)?, tmp.as_file_mut())?;
    tmp.as_file().sync_all()?;
    tmp.persist(to).map_err(|e| e.error)?;
    Ok(())
}

/// `path`, or `path.1`, `path.2`... whichever does not exist yet: an input dropped twice under
/// one name keeps both copies in done/ and quarantine/.
fn free_name(path: &Path) -> PathBuf {
    if !path.exists() {
        return path.to_path_buf();
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (1u32..)
        .map(|i| path.with_file_name(format!("{name}.{i}")))
        .find(|p| !p.exists())
        .unwrap_or_else(|| path.to_path_buf())
}

fn rel_of(base: &Path, path: &Path) -> String {
    path.strip_prefix(base)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

/// Files under `dir` (its heartbeat excluded), as paths relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter(|e| !(e.depth() == 1 && e.file_name() == HEARTBEAT))
        .map(|e| rel_of(dir, e.path()))
        .collect();
    out.sort();
    out
}

/// What to do with a finished input.
pub use crate::pipeline::config::DoneAction;

/// One running instance's hold on the watched folder.
#[derive(Debug)]
pub struct Claims {
    pub layout: Layout,
    pub id: String,
    /// `processing/<id>`.
    pub mine: PathBuf,
    /// Held for the instance's lifetime: the flock is the "one process per id" guarantee.
    _lock: File,
    heartbeat: File,
}

#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use rustix::fs::{FlockOperation, flock};
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// No advisory lock off unix: one process per instance name by contract only.
#[cfg(not(unix))]
fn try_lock(_file: &File) -> std::io::Result<bool> {
    Ok(true)
}

impl Claims {
    /// Takes instance `id`'s lock (refused while another process holds it), creates the folders
    /// and starts the heartbeat.
    pub fn open(layout: Layout, id: &str) -> Result<Claims, WatchError> {
        for d in [&layout.processing, &layout.instances] {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        let lock_path = layout.instances.join(format!("{id}.lock"));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        if !try_lock(&lock).map_err(io(&lock_path))? {
            return Err(WatchError::InstanceRunning {
                id: id.to_string(),
                lock: lock_path,
            });
        }
        let mine = layout.processing.join(id);
        std::fs::create_dir_all(&mine).map_err(io(&mine))?;
        let hb = mine.join(HEARTBEAT);
        let heartbeat = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&hb)
            .map_err(io(&hb))?;
        let c = Claims {
            layout,
            id: id.to_string(),
            mine,
            _lock: lock,
            heartbeat,
        };
        c.beat();
        Ok(c)
    }

    /// Touches the heartbeat (best effort: a failure only makes the lease look older).
    pub fn beat(&self) {
        if let Err(e) = self.heartbeat.set_modified(SystemTime::now()) {
            tracing::warn!("heartbeat {}: {e}", self.mine.join(HEARTBEAT).display());
        }
    }

    /// Where a claimed input lies.
    pub fn claimed_path(&self, rel: &str) -> PathBuf {
        self.mine.join(rel)
    }

    /// Claims `path` (a file in the watched folder). Ok(None): a neighbour was faster, or a
    /// file of that name is still in this instance's processing folder (retried later).
    pub fn claim(&self, path: &Path) -> Result<Option<String>, WatchError> {
        let rel = rel_of(&self.layout.root, path);
        let to = self.mine.join(&rel);
        Ok(rename_noreplace(path, &to)
            .map_err(io(path))?
            .then_some(rel))
    }

    /// Inputs a previous run of this instance claimed and did not finish.
    pub fn leftovers(&self) -> Vec<String> {
        files_under(&self.mine)
    }

    /// Takes over the claims of instances whose heartbeat is older than `lease`: their files
    /// are renamed into this instance's folder (atomic: of two live instances doing this at
    /// once, each file goes to one). Returns the relative paths taken.
    pub fn take_over_stale(&self, lease: Duration) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.layout.processing) else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        for e in rd.flatten() {
            let dir = e.path();
            if dir == self.mine || !dir.is_dir() {
                continue;
            }
            let stale = |dir: &Path| {
                let m = std::fs::metadata(dir.join(HEARTBEAT)).or_else(|_| std::fs::metadata(dir));
                m.ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .map(|age| (age > lease, age))
            };
            let Some((true, age)) = stale(&dir) else {
                continue;
            };
            let files = files_under(&dir);
            if files.is_empty() {
                continue;
            }
            let owner = e.file_name().to_string_lossy().into_owned();
            let mut n = 0;
            for rel in files {
                // Re-check right before each move: an owner that restarts touches its
                // heartbeat before it re-queues its files.
                if !matches!(stale(&dir), Some((true, _))) {
                    break;
                }
                match rename_noreplace(&dir.join(&rel), &self.mine.join(&rel)) {
                    Ok(true) => {
                        n += 1;
                        taken.push(rel);
                    }
                    Ok(false) => {}
                    Err(err) => tracing::warn!("taking over {rel} from {owner}: {err}"),
                }
            }
            if n > 0 {
                tracing::warn!(
                    "instance {owner} has not renewed its lease for {} s (lease {} s): took over \
                     {n} claimed file(s)",
                    age.as_secs(),
                    lease.as_secs()
                );
            }
        }
        taken
    }

    /// Removes empty folders left between a finished file and the processing folder.
    fn prune(&self, rel: &str) {
        let mut p = self.mine.join(rel);
        while let Some(parent) = p.parent() {
            if parent == self.mine || std::fs::remove_dir(parent).is_err() {
                break;
            }
            p = parent.to_path_buf();
        }
    }

    /// Disposes of a finished input. Returns the path it was put back at for `Keep`.
    pub fn finish(&self, rel: &str, action: DoneAction) -> Result<Option<PathBuf>, WatchError> {
        let from = self.mine.join(rel);
        let result = match action {
            DoneAction::Delete => std::fs::remove_file(&from).map(|_| None),
            DoneAction::Move => {
                let to = free_name(&self.layout.done.join(rel));
                move_file(&from, &to).map(|_| None)
            }
            DoneAction::Keep => {
                let back = self.layout.root.join(rel);
                match rename_noreplace(&from, &back) {
                    Ok(true) => Ok(Some(back)),
                    // A new file of that name arrived meanwhile: keep ours in done/ instead.
                    Ok(false) => {
                        let to = free_name(&self.layout.done.join(rel));
                        move_file(&from, &to).map(|_| None)
                    }
                    Err(e) => Err(e),
                }
            }
        };
        self.prune(rel);
        result.map_err(io(&from))
    }

    /// Moves a failed input to the quarantine folder with `<name>.reason.json` beside it.
    pub fn quarantine(&self, rel: &str, reason: &Value) -> Result<PathBuf, WatchError> {
        let from = self.mine.join(rel);
        let to = free_name(&self.layout.quarantine.join(rel));
        move_file(&from, &to).map_err(io(&from))?;
        self.prune(rel);
        let mut name = to.file_name().unwrap_or_default().to_os_string();
        name.push(".reason.json");
        let rp = to.with_file_name(name);
        let text = serde_json::to_string_pretty(reason).unwrap_or_default() + "\n";
        write_atomic(&rp, text.as_bytes()).map_err(io(&rp))?;
        Ok(to)
    }
}

/// Writes through a temporary name so readers (and a crash) see the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".adverse-")
        .suffix(".tmp")
        .tempfile_in(parent)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Layout) {
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        (d, Layout::new(&root, None, None))
    }

    #[test]
    fn a_second_process_with_the_same_id_is_refused() {
        let (_d, l) = setup();
        let a = Claims::open(l.clone(), "one").unwrap();
        let e = Claims::open(l.clone(), "one").unwrap_err();
        assert!(matches!(e, WatchError::InstanceRunning { .. }), "{e}");
        assert!(Claims::open(l.clone(), "two").is_ok());
        drop(a);
        assert!(Claims::open(l, "one").is_ok());
    }

    #[test]
    fn a_file_is_claimed_once_and_never_over_a_pending_one() {
        let (_d, l) = setup();
        let a = Claims::open(l.clone(), "a").unwrap();
        let b = Claims::open(l.clone(), "b").unwrap();
        let f = l.root.join("sub/x.dcm");
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"1").unwrap();
        assert_eq!(a.claim(&f).unwrap().as_deref(), Some("sub/x.dcm"));
        assert_eq!(b.claim(&f).unwrap(), None);
        std::fs::write(&f, b"2").unwrap();
        // Same name still in a's processing folder: not claimed, not overwritten.
        assert_eq!(a.claim(&f).unwrap(), None);
        assert_eq!(std::fs::read(a.claimed_path("sub/x.dcm")).unwrap(), b"1");
        assert_eq!(a.leftovers(), vec!["sub/x.dcm".to_string()]);
        a.finish("sub/x.dcm", DoneAction::Move).unwrap();
        assert_eq!(a.claim(&f).unwrap().as_deref(), Some("sub/x.dcm"));
        a.finish("sub/x.dcm", DoneAction::Move).unwrap();
        assert_eq!(std::fs::read(l.done.join("sub/x.dcm")).unwrap(), b"1");
        assert_eq!(std::fs::read(l.done.join("sub/x.dcm.1")).unwrap(), b"2");
        assert!(a.leftovers().is_empty());
    }

    #[test]
    fn quarantine_writes_the_reason_and_keep_puts_the_file_back() {
        let (_d, l) = setup();
        let a = Claims::open(l.clone(), "a").unwrap();
        let f = l.root.join("bad.dcm");
        std::fs::write(&f, b"junk").unwrap();
        let rel = a.claim(&f).unwrap().unwrap();
        let to = a
            .quarantine(
                &rel,
                &serde_json::json!({"error": "not DICOM", "stage": "decode"}),
            )
            .unwrap();
        assert_eq!(to, l.quarantine.join("bad.dcm"));
        let r: Value = serde_json::from_slice(
            &std::fs::read(l.quarantine.join("bad.dcm.reason.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(r["stage"], "decode");
        std::fs::write(&f, b"ok").unwrap();
        let rel = a.claim(&f).unwrap().unwrap();
        assert_eq!(a.finish(&rel, DoneAction::Keep).unwrap(), Some(f.clone()));
        assert_eq!(std::fs::read(&f).unwrap(), b"ok");
        let rel = a.claim(&f).unwrap().unwrap();
        assert_eq!(a.finish(&rel, DoneAction::Delete).unwrap(), None);
        assert!(!f.exists() && a.leftovers().is_empty());
    }

    #[test]
    fn stale_claims_are_taken_over_and_live_ones_are_not() {
        let (_d, l) = setup();
        let dead = Claims::open(l.clone(), "dead").unwrap();
        let live = Claims::open(l.clone(), "live").unwrap();
        for (c, name) in [(&dead, "d.dcm"), (&live, "l.dcm")] {
            let f = l.root.join(name);
            std::fs::write(&f, b"x").unwrap();
            c.claim(&f).unwrap().unwrap();
        }
        let me = Claims::open(l.clone(), "me").unwrap();
        assert!(me.take_over_stale(Duration::from_secs(60)).is_empty());
        let old = SystemTime::now() - Duration::from_secs(120);
        dead.heartbeat.set_modified(old).unwrap();
        assert_eq!(
            me.take_over_stale(Duration::from_secs(60)),
            vec!["d.dcm".to_string()]
        );
        assert_eq!(me.leftovers(), vec!["d.dcm".to_string()]);
        assert_eq!(live.leftovers(), vec!["l.dcm".to_string()]);
    }
}
