//! The writer: one open log, one writer thread, plus a flusher thread that bounds how long an
//! appended record can stay unsynced when no further record comes to trigger the group commit.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use serde_json::{Map, Value};

use super::format::{encode, now_rfc3339_millis};
use super::scan::scan;
use super::{AuditError, GroupCommit, RECOVERED_KIND, Record};

/// An open audit log. Single writer: `open` takes an exclusive advisory lock on the file
/// (unix; held until drop, released by the OS if the process dies), so two runs cannot
/// interleave records. Dropping it syncs what is pending.
pub struct AuditLog {
    path: PathBuf,
    file: File,
    next_seq: u64,
    last_hash: String,
    /// Byte length of the verified log; where the next record goes.
    end: u64,
    commit: GroupCommit,
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
    /// Set after a failed write or fsync: what reached the disk is unknown, so no more records.
    failed: bool,
}

struct Shared {
    state: Mutex<FlushState>,
    wake: Condvar,
}

#[derive(Default)]
struct FlushState {
    /// Records written since the last sync.
    pending: usize,
    /// When the oldest of them was written.
    dirty_since: Option<Instant>,
    shutdown: bool,
    /// A failed background fsync, reported by the next `append`/`sync`.
    error: Option<std::io::Error>,
}

fn lock(s: &Shared) -> MutexGuard<'_, FlushState> {
    // Nothing panics while holding the lock; recover the state rather than propagate a panic.
    s.state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AuditLog {
    /// Opens or creates the log at `path`. An existing log is verified first: a broken chain is
    /// an error ([`AuditError::Broken`]) because we never append to a tampered log. A torn final
    /// line (no trailing newline, or not JSON), which a crash mid-write can leave, is cut off and
    /// the cut recorded in a [`RECOVERED_KIND`] record (offset, length and SHA-256 of the
    /// discarded bytes), so the log verifies afterwards and the event is visible. Returns the
    /// log and every record it now holds, in order (for resume), the `recovered` one included.
    pub fn open(path: &Path, commit: GroupCommit) -> Result<(AuditLog, Vec<Record>), AuditError> {
        let io = |op, source| AuditError::Io {
            path: path.to_path_buf(),
            op,
            source,
        };
        let (mut file, created) = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(f) => (f, true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| io("open", e))?,
                false,
            ),
            Err(e) => return Err(io("create", e)),
        };
        // A lock that is gone within LOCK_PATIENCE was not another writer's: a process forked
        // by any thread of this one holds copies of its descriptors (close-on-exec, but open
        // until the child's exec), and with them the lock of a log that was just closed here.
        let patience = Instant::now() + LOCK_PATIENCE;
        while !try_lock_exclusive(&file).map_err(|e| io("lock", e))? {
            if Instant::now() >= patience {
                return Err(AuditError::Locked {
                    path: path.to_path_buf(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if created {
            sync_parent_dir(path);
        }

        let mut records = Vec::new();
        let outcome = scan(BufReader::with_capacity(1 << 16, &file), |r| {
            records.push(r)
        })
        .map_err(|e| io("read", e))?;
        let torn = match (outcome.report.broken, outcome.torn) {
            (None, _) => None,
            (Some(_), Some(t)) => Some(t),
            (Some(broken), None) => {
                return Err(AuditError::Broken {
                    path: path.to_path_buf(),
                    broken,
                });
            }
        };
        file.seek(SeekFrom::Start(outcome.good_end))
            .map_err(|e| io("seek", e))?;

        let shared = Arc::new(Shared {
            state: Mutex::new(FlushState::default()),
            wake: Condvar::new(),
        });
        let flusher = if commit.max_delay.is_zero() || commit.max_records <= 1 {
            None
        } else {
            let f = file.try_clone().map_err(|e| io("clone handle of", e))?;
            let s = Arc::clone(&shared);
            let delay = commit.max_delay;
            Some(
                std::thread::Builder::new()
                    .name("audit-flush".into())
                    .spawn(move || flush_loop(&s, &f, delay))
                    .map_err(|e| io("start the flush thread for", e))?,
            )
        };
        let mut log = AuditLog {
            path: path.to_path_buf(),
            file,
            next_seq: outcome.report.records,
            last_hash: outcome.report.head,
            end: outcome.good_end,
            commit,
            shared,
            flusher,
            failed: false,
        };

        if let Some(t) = torn {
            tracing::warn!(
                "audit log {}: cut off a torn final record ({} bytes at offset {}, {}); recorded as seq {}",
                path.display(),
                t.len,
                t.offset,
                t.cause,
                log.next_seq
            );
            let mut body = Map::new();
            body.insert("offset".into(), t.offset.into());
            body.insert("discarded_bytes".into(), t.len.into());
            body.insert("discarded_sha256".into(), t.sha256.into());
            body.insert("cause".into(), t.cause.into());
            let record = log.append_record(RECOVERED_KIND, body)?;
            // The record overwrote the torn bytes from their start; drop any left beyond it.
            // Until this runs, a crash leaves recovered-record + leftover, itself a torn tail.
            log.file.set_len(log.end).map_err(|e| io("truncate", e))?;
            log.sync()?;
            records.push(record);
        }
        Ok((log, records))
    }

    /// Appends one record: the line is written with one `write_all` before returning (so a
    /// killed process loses nothing already appended); `fsync` follows the group-commit bounds.
    /// Returns the new record's hash (hex). Body keys may not be envelope names.
    pub fn append(&mut self, kind: &str, body: Map<String, Value>) -> Result<String, AuditError> {
        self.append_record(kind, body).map(|r| r.hash)
    }

    /// [`append`](Self::append), returning the whole record as a reader would see it.
    pub fn append_record(
        &mut self,
        kind: &str,
        body: Map<String, Value>,
    ) -> Result<Record, AuditError> {
        self.usable()?;
        let time = now_rfc3339_millis();
        let (line, hash) = encode(self.next_seq, &self.last_hash, &time, kind, &body)?;
        if let Err(source) = self.file.write_all(&line) {
            self.failed = true;
            // Best effort: drop a partial line so the file still verifies up to here.
            let _ = self.file.set_len(self.end);
            return Err(AuditError::Io {
                path: self.path.clone(),
                op: "append to",
                source,
            });
        }
        let record = Record {
            seq: self.next_seq,
            kind: kind.to_string(),
            time,
            body,
            hash,
        };
        self.end += line.len() as u64;
        self.next_seq += 1;
        self.last_hash.clone_from(&record.hash);
        let due = {
            let mut st = lock(&self.shared);
            st.pending += 1;
            if st.dirty_since.is_none() {
                st.dirty_since = Some(Instant::now());
                self.shared.wake.notify_one();
            }
            self.flusher.is_none() || st.pending >= self.commit.max_records
        };
        if due {
            self.sync()?;
        }
        Ok(record)
    }

    /// `fsync`s now (e.g. at run end, before reporting success).
    pub fn sync(&mut self) -> Result<(), AuditError> {
        self.usable()?;
        {
            let mut st = lock(&self.shared);
            st.pending = 0;
            st.dirty_since = None;
        }
        self.file.sync_data().map_err(|source| {
            self.failed = true;
            AuditError::Io {
                path: self.path.clone(),
                op: "fsync",
                source,
            }
        })
    }

    /// Next sequence number and the hash of the last record ([`ZERO_HASH`](super::ZERO_HASH)
    /// for an empty log).
    /// Keeping a copy elsewhere lets a later verification detect records cut off the end.
    pub fn head(&self) -> (u64, String) {
        (self.next_seq, self.last_hash.clone())
    }

    /// Records written but not yet synced.
    #[cfg(test)]
    pub(super) fn pending(&self) -> usize {
        lock(&self.shared).pending
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn usable(&mut self) -> Result<(), AuditError> {
        if let Some(source) = lock(&self.shared).error.take() {
            self.failed = true;
            return Err(AuditError::Io {
                path: self.path.clone(),
                op: "fsync (background)",
                source,
            });
        }
        if self.failed {
            return Err(AuditError::Failed {
                path: self.path.clone(),
            });
        }
        Ok(())
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        lock(&self.shared).shutdown = true;
        self.shared.wake.notify_all();
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
        }
        if !self.failed && lock(&self.shared).pending > 0 {
            // Errors cannot be returned from drop; callers wanting them call `sync` first.
            let _ = self.file.sync_data();
        }
    }
}

/// Syncs at the latest `delay` after the oldest unsynced record. Clearing `dirty_since` before
/// syncing is what makes it race-free: a record written after the clear sets it again and gets
/// its own sync.
fn flush_loop(shared: &Shared, file: &File, delay: std::time::Duration) {
    loop {
        let mut st = lock(shared);
        loop {
            if st.shutdown {
                return;
            }
            match st.dirty_since {
                None => st = shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner),
                Some(t) => {
                    let now = Instant::now();
                    let deadline = t + delay;
                    if now >= deadline {
                        break;
                    }
                    st = shared
                        .wake
                        .wait_timeout(st, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
        st.dirty_since = None;
        st.pending = 0;
        drop(st);
        if let Err(e) = file.sync_data() {
            lock(shared).error = Some(e);
            return;
        }
    }
}

/// How long `open` retries a held lock before reporting [`AuditError::Locked`] (measured: a
/// test reopening a log it had just closed, while other tests spawned processes, found it held).
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when another open file holds it. Advisory, and
/// released by the kernel when the holder dies, so a killed run never blocks the rerun.
/// (`File::try_lock` does the same but needs Rust 1.89; the workspace's MSRV is 1.87.)
#[cfg(unix)]
fn try_lock_exclusive(file: &File) -> std::io::Result<bool> {
    use rustix::fs::{FlockOperation, flock};
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// No advisory lock off unix: single writer by contract only.
#[cfg(not(unix))]
fn try_lock_exclusive(_file: &File) -> std::io::Result<bool> {
    Ok(true)
}

/// A new file's directory entry must reach the disk too, or a crash can lose the whole log.
/// Best effort: some filesystems refuse to fsync a directory, and the log itself is fine.
fn sync_parent_dir(path: &Path) {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}
