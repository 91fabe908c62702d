//! Encoding one record line and checking one line on its own (the chain checks, which need the
//! previous record, are in `scan`).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{AuditError, BreakKind, ENVELOPE_KEYS, MAX_RECORD_BYTES, Record};

/// `,"hash":"` + 64 hex + `"}`.
const HASH_PREFIX: &[u8] = b",\"hash\":\"";
const SUFFIX_LEN: usize = HASH_PREFIX.len() + 64 + 2;

/// Now as RFC 3339 UTC with milliseconds. Fixed width so records line up and sort as text.
pub(crate) fn now_rfc3339_millis() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// The full line (with its newline) and the record's hash.
pub(super) fn encode(
    seq: u64,
    prev: &str,
    time: &str,
    kind: &str,
    body: &Map<String, Value>,
) -> Result<(Vec<u8>, String), AuditError> {
    if kind.is_empty() {
        return Err(AuditError::EmptyKind);
    }
    if let Some(key) = body.keys().find(|k| ENVELOPE_KEYS.contains(&k.as_str())) {
        return Err(AuditError::ReservedKey { key: key.clone() });
    }
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(format!("{{\"seq\":{seq},\"prev\":\"{prev}\",\"time\":").as_bytes());
    push_json(&mut out, time);
    out.extend_from_slice(b",\"kind\":");
    push_json(&mut out, kind);
    for (k, v) in body {
        out.push(b',');
        push_json(&mut out, k);
        out.push(b':');
        push_json(&mut out, v);
    }
    out.push(b'}');
    let hash = hex::encode(Sha256::digest(&out));
    out.pop();
    out.extend_from_slice(HASH_PREFIX);
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(b"\"}\n");
    if out.len() > MAX_RECORD_BYTES {
        return Err(AuditError::TooLong {
            kind: kind.to_string(),
            bytes: out.len(),
            max: MAX_RECORD_BYTES,
        });
    }
    Ok((out, hash))
}

/// Compact JSON never contains a raw newline (strings escape it), so a record stays one line.
fn push_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    // Serialising a str or a `Value` into a Vec cannot fail: keys are strings, numbers finite.
    if serde_json::to_writer(&mut *out, v).is_err() {
        out.extend_from_slice(b"null");
    }
}

/// A line that is a well-formed record on its own: its hash matches its bytes.
pub(super) struct Checked {
    pub prev: String,
    pub record: Record,
}

/// Checks one line (without its newline): JSON, hash member, hash, envelope types. Errors carry
/// a reason that never quotes the content.
pub(super) fn check_line(content: &[u8]) -> Result<Checked, (BreakKind, String)> {
    let obj = match serde_json::from_slice::<StrictObject>(content) {
        Ok(o) => o.0,
        Err(e) => return Err((BreakKind::InvalidJson, json_reason(&e))),
    };
    let n = content.len();
    let hash_ok = n > SUFFIX_LEN
        && content[n - SUFFIX_LEN..].starts_with(HASH_PREFIX)
        && content[n - 66..n - 2]
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && &content[n - 2..] == b"\"}";
    if !hash_ok {
        return Err((
            BreakKind::MissingHash,
            "no `hash` (64 lowercase hex digits) as the last member: content edited".into(),
        ));
    }
    let stored = &content[n - 66..n - 2];
    let mut h = Sha256::new();
    h.update(&content[..n - SUFFIX_LEN]);
    h.update(b"}");
    let computed = hex::encode(h.finalize());
    if computed.as_bytes() != stored {
        return Err((
            BreakKind::HashMismatch,
            "hash mismatch: content edited".into(),
        ));
    }
    let hash = computed;

    let mut seq = None;
    let mut prev = None;
    let mut time = None;
    let mut kind = None;
    let mut body = Map::new();
    for (k, v) in obj {
        match k.as_str() {
            "seq" => seq = Some(v),
            "prev" => prev = Some(v),
            "time" => time = Some(v),
            "kind" => kind = Some(v),
            "hash" => {}
            _ => {
                body.insert(k, v);
            }
        }
    }
    let bad = |what: &str| (BreakKind::BadEnvelope, format!("envelope member {what}"));
    let seq = seq
        .and_then(|v| v.as_u64())
        .ok_or_else(|| bad("`seq` missing or not an unsigned integer"))?;
    let prev = match prev {
        Some(Value::String(s)) if is_hash(&s) => s,
        _ => return Err(bad("`prev` missing or not 64 lowercase hex digits")),
    };
    let time = match time {
        Some(Value::String(s)) => s,
        _ => return Err(bad("`time` missing or not a string")),
    };
    let kind = match kind {
        Some(Value::String(s)) if !s.is_empty() => s,
        _ => return Err(bad("`kind` missing or not a non-empty string")),
    };
    Ok(Checked {
        prev,
        record: Record {
            seq,
            kind,
            time,
            body,
            hash,
        },
    })
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// serde_json's data errors can quote the offending value; only position and category are safe.
fn json_reason(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Syntax => format!("syntax error at column {}", e.column()),
        Category::Eof => "empty or incomplete".to_string(),
        Category::Data => "not a JSON object with unique member names".to_string(),
        Category::Io => "unreadable".to_string(),
    };
    format!("invalid JSON ({what}): content edited or corrupted")
}

/// A top-level JSON object that rejects duplicate member names: with duplicates, which value a
/// reader sees would depend on the parser, and the hash would vouch for both.
struct StrictObject(Map<String, Value>);

impl<'de> Deserialize<'de> for StrictObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrictObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<StrictObject, A::Error> {
                let mut m = Map::new();
                while let Some(k) = a.next_key::<String>()? {
                    if m.contains_key(&k) {
                        return Err(de::Error::custom("duplicate member name"));
                    }
                    let v: Value = a.next_value()?;
                    m.insert(k, v);
                }
                Ok(StrictObject(m))
            }
        }
        d.deserialize_map(V)
    }
}
