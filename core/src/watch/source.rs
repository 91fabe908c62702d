//! Change notifications, as hints only: an event says "look at this path", never "this file is
//! ready". Readiness is decided by [`super::ready`] from the file itself, and a periodic full
//! rescan finds whatever the events missed, so a lost event delays a file, never loses it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crossbeam::channel::{self, Receiver, Sender};
use notify::{RecursiveMode, Watcher};

use super::WatchError;

/// Where change hints come from (like watchexec's choice): the OS's native events, or notify's
/// poll watcher for folders whose writers are on other hosts (NFS, SMB: inotify only sees
/// writes made through this host's kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Native,
    Poll(Duration),
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Native => write!(f, "native events"),
            Mode::Poll(d) => write!(f, "polling every {} ms", d.as_millis()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    /// Something happened at this path (a file or a folder).
    Path(PathBuf),
    /// Events may have been lost: rescan everything. The reason is logged as a warning.
    Rescan(String),
}

/// A running watcher; dropping it stops the notifications.
pub struct Events {
    _watcher: Box<dyn Watcher + Send>,
    pub rx: Receiver<Hint>,
    /// The mode actually in use (native falls back to polling when the OS refuses a watch).
    pub mode: Mode,
}

/// Interval used when the native watcher cannot be set up (watch limit reached).
const FALLBACK_POLL: Duration = Duration::from_millis(1000);

fn handler(tx: Sender<Hint>) -> impl FnMut(notify::Result<notify::Event>) + Send + 'static {
    move |res: notify::Result<notify::Event>| {
        let hints: Vec<Hint> = match res {
            Ok(ev) if ev.need_rescan() => vec![Hint::Rescan(
                "the OS event queue overflowed (events were dropped); rescanning the folder".into(),
            )],
            // Reads and opens are no news, and our own scans open every folder: passing them
            // on would make each scan trigger the next (and two watchers feed each other).
            Ok(ev) if is_read_only(&ev.kind) => Vec::new(),
            Ok(ev) => ev.paths.into_iter().map(Hint::Path).collect(),
            Err(e) => vec![Hint::Rescan(describe(&e))],
        };
        for h in hints {
            let _ = tx.send(h);
        }
    }
}

/// Access events other than "closed after writing" (opens, reads, closes of readers).
fn is_read_only(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    matches!(kind, EventKind::Access(a) if *a != AccessKind::Close(AccessMode::Write))
}

fn describe(e: &notify::Error) -> String {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => "the inotify watch limit is reached (raise \
             fs.inotify.max_user_watches): events for some folders are missing; the periodic \
             rescan still finds their files"
            .into(),
        _ => format!("watcher error ({e}); rescanning the folder"),
    }
}

/// Starts watching `root`. A native watcher that the OS refuses (watch limit, unsupported
/// filesystem) falls back to polling, with a warning that says why.
pub fn start(mode: Mode, root: &Path, recursive: bool) -> Result<Events, WatchError> {
    let (tx, rx) = channel::unbounded();
    let rm = if recursive {
        RecursiveMode::Recursive
    } else {
        RecursiveMode::NonRecursive
    };
    let poll =
        |interval: Duration, tx: Sender<Hint>, rx: Receiver<Hint>| -> Result<Events, WatchError> {
            let cfg = notify::Config::default().with_poll_interval(interval);
            let mut w =
                notify::PollWatcher::new(handler(tx), cfg).map_err(|e| WatchError::Notify {
                    path: root.to_path_buf(),
                    message: e.to_string(),
                })?;
            w.watch(root, rm).map_err(|e| WatchError::Notify {
                path: root.to_path_buf(),
                message: e.to_string(),
            })?;
            Ok(Events {
                _watcher: Box::new(w),
                rx,
                mode: Mode::Poll(interval),
            })
        };
    match mode {
        Mode::Poll(interval) => poll(interval, tx, rx),
        Mode::Native => {
            let native = notify::recommended_watcher(handler(tx.clone())).and_then(|mut w| {
                w.watch(root, rm)?;
                Ok(w)
            });
            match native {
                Ok(w) => Ok(Events {
                    _watcher: Box::new(w),
                    rx,
                    mode: Mode::Native,
                }),
                Err(e) => {
                    tracing::warn!(
                        "native file events unavailable for {}: {}; falling back to polling \
                         every {} ms",
                        root.display(),
                        describe(&e),
                        FALLBACK_POLL.as_millis()
                    );
                    poll(FALLBACK_POLL, tx, rx)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(rx: &Receiver<Hint>, want: &Path) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(Hint::Path(p)) if p.ends_with(want.file_name().unwrap()) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    }

    #[test]
    fn both_modes_report_a_new_file() {
        for mode in [Mode::Native, Mode::Poll(Duration::from_millis(50))] {
            let dir = tempfile::tempdir().unwrap();
            let root = std::fs::canonicalize(dir.path()).unwrap();
            let ev = start(mode, &root, true).unwrap();
            assert_eq!(ev.mode, mode);
            let f = root.join("x.dcm");
            std::fs::write(&f, b"abc").unwrap();
            assert!(wait_for(&ev.rx, &f), "{mode}: no event for {}", f.display());
        }
    }

    #[test]
    fn reading_the_folder_is_not_an_event() {
        // Scans open every folder and the readiness check reads files: if those were events,
        // each scan would trigger the next (a storm that starved the engine of CPU).
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.dcm"), b"abc").unwrap();
        let ev = start(Mode::Native, &root, true).unwrap();
        for _ in 0..20 {
            for e in walkdir::WalkDir::new(&root).into_iter().flatten() {
                if e.file_type().is_file() {
                    let _ = std::fs::read(e.path()).unwrap();
                }
            }
        }
        let got: Vec<Hint> = {
            std::thread::sleep(Duration::from_millis(300));
            ev.rx.try_iter().collect()
        };
        assert!(got.is_empty(), "reads produced events: {got:?}");
        // A real change still does.
        std::fs::write(root.join("sub/b.dcm"), b"x").unwrap();
        assert!(wait_for(&ev.rx, &root.join("sub/b.dcm")));
    }
}
