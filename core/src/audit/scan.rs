//! Streaming verification: one pass, one line in memory at a time, so a log of millions of
//! records verifies in constant memory.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::format::check_line;
use super::{AuditError, BreakKind, Broken, MAX_RECORD_BYTES, Record, VerifyReport, ZERO_HASH};

/// Verifies the whole chain of the log at `path`. `Err` only when the file cannot be read;
/// a broken chain is reported in [`VerifyReport::broken`]. A log being appended to at the same
/// time may show a truncated last record (a write in progress).
pub fn verify(path: &Path) -> Result<VerifyReport, AuditError> {
    let io = |op, source| AuditError::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    let file = File::open(path).map_err(|e| io("open", e))?;
    if file.metadata().map_err(|e| io("stat", e))?.is_dir() {
        return Err(io(
            "read",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "is a directory"),
        ));
    }
    let outcome =
        scan(BufReader::with_capacity(1 << 16, file), |_| {}).map_err(|e| io("read", e))?;
    Ok(outcome.report)
}

/// A torn final line that [`super::AuditLog::open`] may cut off.
pub(super) struct Torn {
    pub offset: u64,
    pub len: u64,
    pub sha256: String,
    pub cause: &'static str,
}

pub(super) struct Outcome {
    pub report: VerifyReport,
    /// Byte length of the records that verified.
    pub good_end: u64,
    /// Set when the break is the final line and is what a crash mid-write leaves: no newline,
    /// or (with a newline) not JSON.
    pub torn: Option<Torn>,
}

enum LineEnd {
    Eof,
    Newline,
    /// Data ends without a newline.
    Unterminated,
    TooLong,
}

/// Reads one line into `buf` (newline included), refusing to buffer past [`MAX_RECORD_BYTES`].
fn read_line<R: BufRead>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<LineEnd> {
    buf.clear();
    loop {
        let avail = match r.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(if buf.is_empty() {
                LineEnd::Eof
            } else {
                LineEnd::Unterminated
            });
        }
        let (take, found) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if buf.len() + take > MAX_RECORD_BYTES {
            return Ok(LineEnd::TooLong);
        }
        buf.extend_from_slice(&avail[..take]);
        r.consume(take);
        if found {
            return Ok(LineEnd::Newline);
        }
    }
}

/// Verifies records in order, handing each verified one to `sink`, and stops at the first
/// break.
pub(super) fn scan<R: BufRead>(mut r: R, mut sink: impl FnMut(Record)) -> std::io::Result<Outcome> {
    let mut buf = Vec::new();
    let mut next: u64 = 0;
    let mut head = ZERO_HASH.to_string();
    let mut offset: u64 = 0;
    loop {
        let end = read_line(&mut r, &mut buf)?;
        let line = next + 1;
        let broken = |kind, reason: String| Broken {
            line,
            seq: next,
            kind,
            reason,
        };
        let report = |head: &str, broken| VerifyReport {
            records: next,
            head: head.to_string(),
            broken,
        };
        let torn = |cause| Torn {
            offset,
            len: buf.len() as u64,
            sha256: hex::encode(Sha256::digest(&buf)),
            cause,
        };
        let content = match end {
            LineEnd::Eof => {
                return Ok(Outcome {
                    report: report(&head, None),
                    good_end: offset,
                    torn: None,
                });
            }
            LineEnd::TooLong => {
                let b = broken(
                    BreakKind::TooLong,
                    format!(
                        "line longer than the {} MiB record limit",
                        MAX_RECORD_BYTES >> 20
                    ),
                );
                return Ok(Outcome {
                    report: report(&head, Some(b)),
                    good_end: offset,
                    torn: None,
                });
            }
            LineEnd::Unterminated => {
                let b = broken(
                    BreakKind::Truncated,
                    "truncated record (no trailing newline): the log was cut off or a write was torn"
                        .into(),
                );
                let t = looks_torn(&buf, next).then(|| torn("no trailing newline"));
                return Ok(Outcome {
                    report: report(&head, Some(b)),
                    good_end: offset,
                    torn: t,
                });
            }
            LineEnd::Newline => &buf[..buf.len() - 1],
        };
        let fail = match check_line(content) {
            Err((kind, reason)) => Some((kind, reason)),
            Ok(c) if c.record.seq != next => Some((
                BreakKind::SeqMismatch,
                format!(
                    "seq is {}, expected {next}: a record was deleted, inserted or reordered",
                    c.record.seq
                ),
            )),
            Ok(c) if c.prev != head => Some((
                BreakKind::PrevMismatch,
                if next == 0 {
                    "prev of the first record is not 64 zeros: records before it were deleted"
                        .to_string()
                } else {
                    format!(
                        "prev does not match record {}'s hash: a record was deleted, inserted or reordered",
                        next - 1
                    )
                },
            )),
            Ok(c) => {
                head = c.record.hash.clone();
                sink(c.record);
                None
            }
        };
        if let Some((kind, reason)) = fail {
            // A crash can leave garbage only at the very end, so only a final unparsable line
            // counts as torn; anything else that fails is tampering.
            let at_eof = r.fill_buf()?.is_empty();
            let t = (kind == BreakKind::InvalidJson && at_eof && looks_torn(content, next))
                .then(|| torn("invalid JSON"));
            let b = broken(kind, reason);
            return Ok(Outcome {
                report: report(&head, Some(b)),
                good_end: offset,
                torn: t,
            });
        }
        offset += buf.len() as u64;
        next += 1;
    }
}

/// Whether a bad final line is what our writer can leave when interrupted: a prefix of the
/// record it was writing (which starts `{"seq":<next>,`), possibly followed by the zeros a
/// power loss leaves where data never reached the disk. Anything else (a foreign file, an edit)
/// is not ours to cut off.
fn looks_torn(bytes: &[u8], next: u64) -> bool {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let data = &bytes[..end];
    let start = format!("{{\"seq\":{next},");
    let start = start.as_bytes();
    data.starts_with(start) || start.starts_with(data)
}
