//! Tamper-evident audit log: an append-only JSON Lines file whose records form a SHA-256 hash
//! chain, so a compliance officer can check with `adverse audit verify FILE` that nothing was
//! edited, deleted, inserted, reordered or cut off since it was written.
//!
//! # Format
//!
//! One record per line (UTF-8 JSON object, compact, `\n`-terminated, at most
//! [`MAX_RECORD_BYTES`] including the newline). Members, in this order:
//!
//! | member | meaning |
//! |--------|---------|
//! | `seq`  | 0-based position in the log; consecutive |
//! | `prev` | `hash` of the previous record; 64 zeros for the first |
//! | `time` | when it was appended, RFC 3339 UTC with milliseconds (`2025-01-31T09:08:07.123Z`) |
//! | `kind` | what happened (`run_start`, `instance`, `run_end`, `recovered`, ...) |
//! | ...    | the body: the caller's fields (none may be named like an envelope member) |
//! | `hash` | lowercase hex SHA-256, always the last member |
//!
//! `hash` is the SHA-256 of the record's exact bytes *without* its hash member: the line with the
//! suffix `,"hash":"<64 hex>"}` replaced by `}` (itself a valid JSON object). Verification
//! hashes those bytes as stored, never a re-serialisation, so key order, number formatting and
//! escaping cannot make an untouched record fail, and any changed byte (including in the last
//! record) changes the hash. `seq` and `prev` bind each record to its position and predecessor,
//! so a deleted, inserted or reordered record breaks the chain at the first place it differs; a
//! missing final newline marks a truncated (or torn) last record.
//!
//! # What it does not prove
//!
//! The chain is unkeyed: whoever can rewrite the whole file can recompute every hash, and cutting
//! off whole trailing records leaves a shorter chain that still verifies. Both are caught by
//! comparing the head (`seq`, `hash`, printed by `adverse audit verify`) with a copy kept
//! elsewhere, e.g. in a run summary or a ticket.
//!
//! # Durability
//!
//! [`AuditLog::append`] writes each line with a single `write_all` before returning, so a killed
//! process loses nothing already appended; `fsync` (`sync_data`) is group-committed: at the
//! latest after [`GroupCommit::max_records`] records or [`GroupCommit::max_delay`] (a background
//! thread enforces the delay even when no further record arrives). A crash can leave a torn
//! final line; [`AuditLog::open`] cuts it off and records the cut in a `recovered` record, so the
//! event stays visible and the log verifies again. Anything else that does not verify is
//! treated as tampering: the log is refused, never appended to.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

mod format;
/// The timestamp format of audit records, shared by watch mode's reason and status files.
pub(crate) use format::now_rfc3339_millis;
mod log;
mod scan;
#[cfg(test)]
mod tests;

pub use log::AuditLog;
pub use scan::verify;

/// Longest accepted record line, newline included. Far above any real record (a few KiB), it
/// keeps a corrupted or hostile file from making verification buffer unbounded lines.
pub const MAX_RECORD_BYTES: usize = 16 << 20;

/// `prev` of the first record.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Member names the log owns; a body may not use them.
pub const ENVELOPE_KEYS: [&str; 5] = ["seq", "prev", "time", "kind", "hash"];

/// Kind of the record [`AuditLog::open`] appends after cutting off a torn final line. Its body:
/// `offset` (byte offset of the cut), `discarded_bytes`, `discarded_sha256`, `cause`.
pub const RECOVERED_KIND: &str = "recovered";

/// Bounds on how long an appended record may sit in the page cache before `fsync`: trading a
/// few hundred milliseconds of records lost on power failure (never on a process kill) for not
/// paying one `fsync` per instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    /// Sync once this many records are unsynced (0 or 1: every record).
    pub max_records: usize,
    /// Sync at the latest this long after the oldest unsynced record (zero: every record).
    pub max_delay: Duration,
}

impl Default for GroupCommit {
    fn default() -> Self {
        GroupCommit {
            max_records: 64,
            max_delay: Duration::from_millis(200),
        }
    }
}

/// One verified record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub kind: String,
    pub time: String,
    /// The caller's fields, without the envelope members.
    pub body: Map<String, Value>,
    /// Lowercase hex SHA-256 of the record.
    pub hash: String,
}

/// Result of [`verify`]: a file that can be read always yields a report; a broken chain is a
/// finding, not an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Records that verified (all of them when `broken` is `None`, else those before the break).
    pub records: u64,
    /// Hash of the last record that verified ([`ZERO_HASH`] when none did).
    pub head: String,
    /// The first record that does not verify.
    pub broken: Option<Broken>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.broken.is_none()
    }
}

/// Where and why the chain breaks. `seq` is the record number the line holds in an intact log
/// (`line - 1`), whatever the line itself claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Broken {
    /// 1-based line number.
    pub line: u64,
    pub seq: u64,
    pub kind: BreakKind,
    /// Human-readable cause; never contains record contents.
    pub reason: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "record {} (line {}): {}",
            self.seq, self.line, self.reason
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakKind {
    /// The last line has no newline: cut off, or torn by a crash mid-write.
    Truncated,
    /// A line over [`MAX_RECORD_BYTES`].
    TooLong,
    /// Not a JSON object with unique keys.
    InvalidJson,
    /// No well-formed `hash` as the last member.
    MissingHash,
    /// The bytes do not hash to the stored `hash`.
    HashMismatch,
    /// `seq`, `prev`, `time` or `kind` missing or of the wrong type.
    BadEnvelope,
    /// `seq` is not the line's position.
    SeqMismatch,
    /// `prev` is not the previous record's hash.
    PrevMismatch,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: cannot {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("audit log {path} does not verify at {broken}; refusing to append to it")]
    Broken { path: PathBuf, broken: Broken },
    #[error("audit log {path} is in use by another process")]
    Locked { path: PathBuf },
    #[error("audit log {path}: an earlier write or fsync failed; reopen the log to continue")]
    Failed { path: PathBuf },
    #[error(
        "audit record body uses the reserved key `{key}` (reserved: seq, prev, time, kind, hash)"
    )]
    ReservedKey { key: String },
    #[error("audit record kind is empty")]
    EmptyKind,
    #[error("audit record of kind `{kind}` is {bytes} bytes, over the {max}-byte limit")]
    TooLong {
        kind: String,
        bytes: usize,
        max: usize,
    },
}
