//! `adverse validate`: every problem of a pipeline file at once, each with `file:line:column`,
//! the offending key and the valid choices.
//!
//! A user fixing a pipeline for an archive run should not have to iterate one error at a time, so
//! nothing here stops at the first problem: the document is walked generically
//! (`serde_yaml::Value`) against the known schema, so every unknown, missing or mistyped key is
//! found, and every section whose structure is sound is then checked against the world (plugins
//! on the search path and their parameter schemas, pins, model, card, labels, input, output).
//! `serde_yaml` has no node positions, so a second, marker-keeping parse (`yaml-rust2`'s event
//! parser) maps key paths such as `stages[0].params.eps` to line and column; it is used for
//! nothing else. When the structure is sound, [`Pipeline::parse`] gives the typed view the engine
//! runs; any disagreement between the two is itself reported, so a file never validates while
//! the engine would refuse it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_yaml::Value as Yaml;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use super::config::{Pipeline, resolve};
use crate::plugin::loader::Pins;
use crate::plugin::{Kind, PluginError, PluginHandle, Registry, SearchPath, schema};
use crate::runtime::card::{ModelCard, card_path};
use crate::runtime::select::BackendChoice;

/// One thing wrong with a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// 1-based; `None` when the problem has no place in the file (a missing top-level key).
    pub line: Option<usize>,
    /// 1-based, in characters.
    pub column: Option<usize>,
    /// Dotted path of the offending key (`stages[0].params.eps`); empty for file-level problems.
    pub key: String,
    pub message: String,
    /// The accepted values or key names, when there is a closed set.
    pub choices: Vec<String>,
}

impl Problem {
    /// `FILE:LINE:COL: KEY: MESSAGE (valid: a, b, c)`, the form editors and CI logs link.
    pub fn render(&self, file: &Path) -> String {
        let mut s = file.display().to_string();
        if let Some(l) = self.line {
            s.push_str(&format!(":{l}"));
            if let Some(c) = self.column {
                s.push_str(&format!(":{c}"));
            }
        }
        s.push_str(": ");
        if !self.key.is_empty() {
            s.push_str(&self.key);
            s.push_str(": ");
        }
        s.push_str(&self.message);
        if !self.choices.is_empty() {
            s.push_str(&format!(" (valid: {})", self.choices.join(", ")));
        }
        s
    }
}

/// The outcome of validating one pipeline file.
#[derive(Debug)]
pub struct Report {
    pub file: PathBuf,
    /// Ordered by position in the file; problems without a position come first.
    pub problems: Vec<Problem>,
    /// The typed pipeline whenever [`Pipeline::parse`] accepted the file (even if other checks
    /// found problems).
    pub pipeline: Option<Pipeline>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Validates the pipeline at `path`. Never panics; every problem found is in the report.
pub fn validate_file(path: &Path) -> Report {
    match std::fs::read(path) {
        Ok(bytes) => validate_bytes(path, &bytes),
        Err(e) => Report {
            file: path.to_path_buf(),
            problems: vec![Problem {
                line: None,
                column: None,
                key: String::new(),
                message: format!("cannot read the pipeline file: {e}"),
                choices: Vec::new(),
            }],
            pipeline: None,
        },
    }
}

/// Validates pipeline text as if it were the file `path` (relative paths resolve against
/// `path`'s directory).
pub fn validate_bytes(path: &Path, bytes: &[u8]) -> Report {
    validate_bytes_with(path, bytes, Vec::new())
}

/// [`validate_bytes`] with plugins already in this process (static builds, tests) added to the
/// search path's, after them.
pub fn validate_bytes_with(path: &Path, bytes: &[u8], in_process: Vec<PluginHandle>) -> Report {
    let mut v = Validator {
        locator: Locator::default(),
        problems: Vec::new(),
        in_process,
    };
    let doc: Yaml = match serde_yaml::from_slice(bytes) {
        Ok(d) => d,
        Err(e) => {
            let (line, column) = match e.location() {
                Some(l) => (Some(l.line()), Some(l.column())),
                None => (None, None),
            };
            let dup = std::str::from_utf8(bytes)
                .ok()
                .filter(|_| e.to_string().contains("duplicate entry with key"))
                .and_then(|t| Locator::from_text(t).duplicates.into_iter().next());
            if let Some((key, (line, column))) = dup {
                let name = key.rsplit('.').next().unwrap_or(&key).to_string();
                v.problems.push(Problem {
                    line: Some(line),
                    column: Some(column),
                    key,
                    message: format!("`{name}` is written twice in the same mapping"),
                    choices: Vec::new(),
                });
                return v.finish(path, None);
            }
            v.problems.push(Problem {
                line,
                column,
                key: String::new(),
                message: format!("not valid YAML: {e}"),
                choices: Vec::new(),
            });
            return v.finish(path, None);
        }
    };
    if let Ok(text) = std::str::from_utf8(bytes) {
        v.locator = Locator::from_text(text);
    }
    let structure_ok = v.structure(&doc);
    let pipeline = match Pipeline::parse(path, bytes) {
        Ok(p) => Some(p),
        Err(e) => {
            // The generic walk is meant to refuse everything the typed parse refuses; should the
            // two ever disagree, the typed parse's reason is still shown.
            if structure_ok {
                v.problems.push(Problem {
                    line: None,
                    column: None,
                    key: String::new(),
                    message: e.to_string(),
                    choices: Vec::new(),
                });
            }
            None
        }
    };
    v.semantics(path, &doc);
    v.finish(path, pipeline)
}

// ---------------------------------------------------------------------------------------------
// Locating key paths.

/// Where each key path of the document is: the key itself for mapping entries, the node start
/// for sequence items.
#[derive(Debug, Default)]
pub struct Locator {
    marks: HashMap<String, (usize, usize)>,
    /// Keys written twice in one mapping, at their second occurrence (`serde_yaml` refuses
    /// them but places the error at the mapping, not at the repeated key).
    duplicates: Vec<(String, (usize, usize))>,
}

impl Locator {
    /// Parses `text` with a marker-keeping YAML parser. A document this parser cannot read
    /// (after `serde_yaml` could) simply has no positions.
    pub fn from_text(text: &str) -> Locator {
        let mut rx = Receiver::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut rx, false).is_err() {
            return Locator::default();
        }
        Locator {
            marks: rx.marks,
            duplicates: rx.duplicates,
        }
    }

    /// Line and column of `key`, or of its nearest enclosing key when it is not in the file
    /// (a missing key points at the mapping that lacks it).
    pub fn locate(&self, key: &str) -> Option<(usize, usize)> {
        let mut k = key;
        loop {
            if let Some(&m) = self.marks.get(k) {
                return Some(m);
            }
            k = parent_key(k)?;
        }
    }
}

/// `a.b[2]` -> `a.b` -> `a` -> `` -> None.
fn parent_key(k: &str) -> Option<&str> {
    if k.is_empty() {
        return None;
    }
    if k.ends_with(']')
        && let Some(i) = k.rfind('[')
    {
        return Some(&k[..i]);
    }
    Some(k.rfind('.').map_or("", |i| &k[..i]))
}

fn join_key(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

enum Frame {
    /// `path` is `None` inside nodes that have no key path (complex keys and their contents).
    /// `want` is the path of the value the map expects next, `None` when it expects a key.
    Map {
        path: Option<String>,
        want: Option<Option<String>>,
        /// A block mapping's start marker is at its first key's `:`, so a mapping that is a
        /// sequence item is placed at its first key instead (or at the start marker if empty).
        place: Option<(String, Marker)>,
    },
    Seq {
        path: Option<String>,
        next: usize,
    },
}

#[derive(Default)]
struct Receiver {
    stack: Vec<Frame>,
    marks: HashMap<String, (usize, usize)>,
    duplicates: Vec<(String, (usize, usize))>,
    documents: usize,
}

impl Receiver {
    /// Records the position of the node starting now and returns its key path. The parent's
    /// state moves on here, at the start of the node, so container ends need no bookkeeping.
    fn node_start(&mut self, ev: &Event, m: Marker) -> Option<String> {
        let path = match self.stack.last_mut() {
            None => return Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = path.as_ref().map(|p| format!("{p}[{next}]"));
                *next += 1;
                p
            }
            Some(Frame::Map { path, want, place }) => match want.take() {
                Some(value_path) => value_path,
                None => {
                    if let Some((p, _)) = place.take() {
                        self.marks.entry(p).or_insert((m.line(), m.col() + 1));
                    }
                    // A key: its text names the value that follows.
                    let full = match (ev, path.as_ref()) {
                        (Event::Scalar(s, ..), Some(p)) => Some(join_key(p, s)),
                        _ => None,
                    };
                    *want = Some(full.clone());
                    if let Some(k) = full {
                        let at = (m.line(), m.col() + 1);
                        match self.marks.entry(k) {
                            std::collections::hash_map::Entry::Occupied(e) => {
                                self.duplicates.push((e.key().clone(), at))
                            }
                            std::collections::hash_map::Entry::Vacant(e) => {
                                e.insert(at);
                            }
                        }
                    }
                    // The key node itself (scalar or complex) has no path of its own.
                    return None;
                }
            },
        };
        if let Some(p) = &path
            && !matches!(ev, Event::MappingStart(..))
        {
            // yaml-rust2 markers: line 1-based, column 0-based.
            self.marks
                .entry(p.clone())
                .or_insert((m.line(), m.col() + 1));
        }
        path
    }
}

impl MarkedEventReceiver for Receiver {
    fn on_event(&mut self, ev: Event, m: Marker) {
        if self.documents > 1 {
            return;
        }
        match ev {
            Event::DocumentStart => self.documents += 1,
            Event::Scalar(..) | Event::Alias(..) => {
                self.node_start(&ev, m);
            }
            Event::MappingStart(..) => {
                let path = self.node_start(&ev, m);
                let place = path.clone().filter(|p| !p.is_empty()).map(|p| (p, m));
                self.stack.push(Frame::Map {
                    path,
                    want: None,
                    place,
                });
            }
            Event::SequenceStart(..) => {
                let path = self.node_start(&ev, m);
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                if let Some(Frame::Map {
                    place: Some((p, start)),
                    ..
                }) = self.stack.pop()
                {
                    self.marks
                        .entry(p)
                        .or_insert((start.line(), start.col() + 1));
                }
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The schema walk.

#[derive(Clone, Copy)]
enum Ty {
    Str,
    /// A [`BackendChoice`] name.
    Backend,
    Bool,
    /// An unsigned integer with this maximum.
    Uint(u64),
    /// Like `Uint` but 0 is refused (counts such as `jobs`).
    Count,
    /// A finite number in `0..=max`.
    Num(f64),
    StrList,
    StrMap,
    Params,
    Stages,
    Obj(&'static [Field]),
}

#[derive(Clone, Copy)]
struct Field {
    name: &'static str,
    required: bool,
    /// `null` is accepted (an `Option` field in [`super::config`], or one the typed parse
    /// defaults when null).
    nullable: bool,
    ty: Ty,
}

const fn f(name: &'static str, required: bool, nullable: bool, ty: Ty) -> Field {
    Field {
        name,
        required,
        nullable,
        ty,
    }
}

const ROLE_KEYS: [&str; 4] = ["attack", "purifier", "detector", "stage"];

const INPUT: &[Field] = &[
    f("path", true, false, Ty::Str),
    f("recursive", false, false, Ty::Bool),
    f("include", false, false, Ty::StrList),
    f("exclude", false, false, Ty::StrList),
];
const MODEL: &[Field] = &[
    f("onnx", true, false, Ty::Str),
    f("card", false, true, Ty::Str),
];
const LABELS: &[Field] = &[
    f("csv", false, true, Ty::Str),
    f("all", false, true, Ty::Uint(u32::MAX as u64)),
    f("target", false, true, Ty::Uint(u32::MAX as u64)),
];
const STAGE: &[Field] = &[
    f("attack", false, true, Ty::Str),
    f("purifier", false, true, Ty::Str),
    f("detector", false, true, Ty::Str),
    f("stage", false, true, Ty::Str),
    f("params", false, false, Ty::Params),
    f("id", false, true, Ty::Str),
    f("adaptive", false, false, Ty::Bool),
    f("eot", false, false, Ty::Uint(super::config::MAX_EOT as u64)),
    f("shadow", false, false, Ty::Bool),
    f(
        "score_weight",
        false,
        false,
        Ty::Num(super::config::MAX_SCORE_WEIGHT as f64),
    ),
];
const OUTPUT: &[Field] = &[
    f("dir", true, false, Ty::Str),
    f("dicom", false, false, Ty::Bool),
    f("previews", false, false, Ty::Bool),
    f("audit", false, true, Ty::Str),
];
const PLUGINS: &[Field] = &[
    f("dirs", false, false, Ty::StrList),
    f("pins", false, false, Ty::StrMap),
];
const RUN: &[Field] = &[
    f("backend", false, true, Ty::Backend),
    f("jobs", false, true, Ty::Count),
    f("batch_size", false, true, Ty::Count),
    f("seed", false, true, Ty::Uint(u64::MAX)),
];
const FLAGGED: &[Field] = &[
    f("dir", true, false, Ty::Str),
    f("mode", false, false, Ty::Str),
];
const WATCH: &[Field] = &[
    f("path", false, true, Ty::Str),
    f("recursive", false, true, Ty::Bool),
    f("settle_ms", false, true, Ty::Count),
    f("poll_ms", false, true, Ty::Count),
    f("rescan_s", false, true, Ty::Uint(u64::MAX)),
    f("incomplete_timeout_ms", false, true, Ty::Uint(u64::MAX)),
    f("done", false, false, Ty::Str),
    f("done_dir", false, true, Ty::Str),
    f("quarantine", false, true, Ty::Str),
    f("lease_s", false, true, Ty::Count),
    f("flagged", false, true, Ty::Obj(FLAGGED)),
    f("status_every_s", false, true, Ty::Uint(u64::MAX)),
    f("status_file", false, true, Ty::Str),
];
const TOP: &[Field] = &[
    f("name", true, false, Ty::Str),
    f("input", true, false, Ty::Obj(INPUT)),
    f("model", false, true, Ty::Obj(MODEL)),
    f("labels", false, true, Ty::Obj(LABELS)),
    f("stages", false, true, Ty::Stages),
    f("output", true, false, Ty::Obj(OUTPUT)),
    f("plugins", false, true, Ty::Obj(PLUGINS)),
    f("run", false, true, Ty::Obj(RUN)),
    f("watch", false, true, Ty::Obj(WATCH)),
];

fn backends() -> Vec<String> {
    ["auto", "cpu", "gpu", "gpu-software"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn type_name(v: &Yaml) -> &'static str {
    match v {
        Yaml::Null => "null",
        Yaml::Bool(_) => "a boolean",
        Yaml::Number(n) if n.is_f64() => "a number",
        Yaml::Number(_) => "an integer",
        Yaml::String(_) => "a string",
        Yaml::Sequence(_) => "a list",
        Yaml::Mapping(_) => "a mapping",
        Yaml::Tagged(_) => "a tagged value",
    }
}

fn key_text(k: &Yaml) -> String {
    match k {
        Yaml::String(s) => s.clone(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Null => "~".into(),
        other => serde_yaml::to_string(other)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into()),
    }
}

/// A scalar as the typed parse reads it into a `String`/`PathBuf`: `serde_yaml` accepts plain
/// numbers and booleans there (`name: 2024`), so the walk does too.
fn text(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Number(n) => Some(n.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn get<'a>(m: &'a serde_yaml::Mapping, key: &str) -> Option<&'a Yaml> {
    m.get(key).filter(|v| !v.is_null())
}

struct Validator {
    locator: Locator,
    problems: Vec<Problem>,
    in_process: Vec<PluginHandle>,
}

impl Validator {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>, choices: Vec<String>) {
        let key = key.into();
        let (line, column) = match self.locator.locate(&key) {
            Some((l, c)) => (Some(l), Some(c)),
            None => (None, None),
        };
        self.problems.push(Problem {
            line,
            column,
            key,
            message: message.into(),
            choices,
        });
    }

    fn finish(mut self, path: &Path, pipeline: Option<Pipeline>) -> Report {
        // Stable: problems on one key keep the order they were found in.
        self.problems
            .sort_by_key(|p| (p.line.is_some(), p.line, p.column));
        Report {
            file: path.to_path_buf(),
            problems: self.problems,
            pipeline,
        }
    }

    /// Walks the whole document; true when it found nothing wrong.
    fn structure(&mut self, doc: &Yaml) -> bool {
        let before = self.problems.len();
        match doc {
            Yaml::Mapping(_) => self.object(doc, "", TOP),
            Yaml::Null => self.push("", "the pipeline file is empty", Vec::new()),
            other => self.push(
                "",
                format!("a pipeline is a mapping, found {}", type_name(other)),
                Vec::new(),
            ),
        }
        self.problems.len() == before
    }

    fn object(&mut self, v: &Yaml, path: &str, fields: &[Field]) {
        let Yaml::Mapping(m) = v else {
            self.push(
                path,
                format!("expected a mapping, found {}", type_name(v)),
                Vec::new(),
            );
            return;
        };
        let names: Vec<String> = fields.iter().map(|f| f.name.to_string()).collect();
        for (k, val) in m {
            let name = key_text(k);
            match fields.iter().find(|f| k.as_str() == Some(f.name)) {
                Some(field) => {
                    let p = join_key(path, &name);
                    if val.is_null() {
                        if !field.nullable {
                            self.push(p, "has no value", Vec::new());
                        }
                    } else {
                        self.value(val, &p, field.ty);
                    }
                }
                None => self.push(
                    join_key(path, &name),
                    format!("unknown key `{name}`"),
                    names.clone(),
                ),
            }
        }
        for field in fields.iter().filter(|f| f.required) {
            if !m.contains_key(field.name) {
                let what = if path.is_empty() {
                    "the pipeline".to_string()
                } else {
                    format!("`{path}`")
                };
                self.push(
                    join_key(path, field.name),
                    format!("missing required key `{}` in {what}", field.name),
                    Vec::new(),
                );
            }
        }
    }

    fn value(&mut self, v: &Yaml, path: &str, ty: Ty) {
        let wrong = |want: &str| format!("expected {want}, found {}", type_name(v));
        match ty {
            Ty::Str => {
                if text(v).is_none() {
                    self.push(path, wrong("a string"), Vec::new());
                }
            }
            Ty::Backend => match text(v) {
                None => self.push(path, wrong("a backend name"), backends()),
                Some(b) if b.parse::<BackendChoice>().is_err() => {
                    self.push(path, format!("unknown backend `{b}`"), backends())
                }
                Some(_) => {}
            },
            Ty::Bool => {
                if !v.is_bool() {
                    self.push(path, wrong("true or false"), Vec::new());
                }
            }
            Ty::Uint(_) | Ty::Count if v.as_u64().is_none() => {
                self.push(path, wrong("a non-negative integer"), Vec::new());
            }
            Ty::Uint(max) => {
                if v.as_u64().is_some_and(|n| n > max) {
                    self.push(path, format!("must be at most {max}"), Vec::new());
                }
            }
            Ty::Num(max) => match v.as_f64() {
                Some(x) if x.is_finite() && (0.0..=max).contains(&x) => {}
                Some(_) => self.push(path, format!("must be a number in 0..={max}"), Vec::new()),
                None => self.push(path, wrong("a number"), Vec::new()),
            },
            Ty::Count => {
                if v.as_u64() == Some(0) {
                    self.push(path, "must be at least 1", Vec::new());
                }
            }
            Ty::StrList => match v {
                Yaml::Sequence(items) => {
                    for (i, it) in items.iter().enumerate() {
                        if text(it).is_none() {
                            self.push(
                                format!("{path}[{i}]"),
                                format!("expected a string, found {}", type_name(it)),
                                Vec::new(),
                            );
                        }
                    }
                }
                _ => self.push(path, wrong("a list of strings"), Vec::new()),
            },
            Ty::StrMap => match v {
                Yaml::Mapping(m) => {
                    for (k, val) in m {
                        let p = join_key(path, &key_text(k));
                        if text(k).is_none() {
                            self.push(p, "keys must be names", Vec::new());
                        } else if text(val).is_none() {
                            self.push(
                                p,
                                format!("expected a string, found {}", type_name(val)),
                                Vec::new(),
                            );
                        }
                    }
                }
                _ => self.push(path, wrong("a mapping"), Vec::new()),
            },
            Ty::Params => match v {
                Yaml::Mapping(m) => {
                    for k in m.keys() {
                        if !(k.is_string() || k.is_number()) {
                            self.push(
                                join_key(path, &key_text(k)),
                                "parameter names must be strings",
                                Vec::new(),
                            );
                        }
                    }
                }
                _ => self.push(path, wrong("a mapping of parameters"), Vec::new()),
            },
            Ty::Stages => match v {
                Yaml::Sequence(items) => self.stages(items, path),
                _ => self.push(path, wrong("a list of stages"), Vec::new()),
            },
            Ty::Obj(fields) => self.object(v, path, fields),
        }
    }

    fn stages(&mut self, items: &[Yaml], path: &str) {
        let mut labels: BTreeMap<String, usize> = BTreeMap::new();
        for (i, st) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            self.value(st, &p, Ty::Obj(STAGE));
            let Yaml::Mapping(m) = st else { continue };
            // In file order, so a second plugin key is reported where it is written.
            let roles: Vec<&str> = m
                .iter()
                .filter(|(_, v)| !v.is_null())
                .filter_map(|(k, _)| ROLE_KEYS.iter().copied().find(|r| k.as_str() == Some(r)))
                .collect();
            let choices = ROLE_KEYS.iter().map(|s| s.to_string()).collect();
            match roles.as_slice() {
                [] => self.push(
                    p.clone(),
                    "a stage needs one of `attack`, `purifier`, `detector`, `stage` naming its plugin",
                    choices,
                ),
                [_] => {}
                [_, second, ..] => self.push(
                    format!("{p}.{second}"),
                    format!(
                        "a stage names one plugin, this one has {}",
                        roles
                            .iter()
                            .map(|r| format!("`{r}`"))
                            .collect::<Vec<_>>()
                            .join(" and ")
                    ),
                    choices,
                ),
            }
            let id = get(m, "id").and_then(text);
            // A stage with no or several plugins has no label yet; its own problem says why.
            let named = match roles.as_slice() {
                [one] => get(m, one).and_then(text),
                _ => None,
            };
            let label = id.clone().or(named);
            if let Some(label) = label {
                if let Some(first) = labels.get(&label) {
                    let at = if id.is_some() {
                        format!("{p}.id")
                    } else {
                        format!("{p}.{}", roles[0])
                    };
                    self.push(
                        at,
                        format!(
                            "stage `{label}` already appears as {path}[{first}]; give one an `id`"
                        ),
                        Vec::new(),
                    );
                } else {
                    labels.insert(label, i);
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Checks against plugins and files, on every section whose structure allows them.

    fn semantics(&mut self, file: &Path, doc: &Yaml) {
        let Yaml::Mapping(top) = doc else { return };
        let base = base_dir(file);
        let section = |k: &str| match get(top, k) {
            Some(Yaml::Mapping(m)) => Some(m),
            _ => None,
        };
        let path_at = |m: &serde_yaml::Mapping, k: &str| {
            get(m, k)
                .and_then(text)
                .map(|s| resolve(&base, Path::new(&s)))
        };

        if let Some(input) = section("input") {
            if let Some(p) = path_at(input, "path") {
                self.check_input(&p);
            }
            for list in ["include", "exclude"] {
                if let Some(Yaml::Sequence(pats)) = get(input, list) {
                    for (i, pat) in pats.iter().enumerate() {
                        if let Some(pat) = text(pat)
                            && let Err(e) = globset::Glob::new(&pat)
                        {
                            self.push(
                                format!("input.{list}[{i}]"),
                                format!("not a valid glob pattern: {e}"),
                                Vec::new(),
                            );
                        }
                    }
                }
            }
        }

        let mut classes: Option<Vec<String>> = None;
        if let Some(model) = section("model")
            && let Some(onnx) = path_at(model, "onnx")
        {
            let card = path_at(model, "card");
            classes = self.check_model(&onnx, card.as_deref());
        }

        if let Some(labels) = section("labels") {
            if let Some(csv) = path_at(labels, "csv") {
                self.check_labels_csv(&csv);
            }
            for k in ["all", "target"] {
                if let (Some(c), Some(n)) = (&classes, get(labels, k).and_then(Yaml::as_u64))
                    && n >= c.len() as u64
                {
                    let choices = c
                        .iter()
                        .enumerate()
                        .map(|(i, name)| format!("{i} ({name})"))
                        .collect();
                    self.push(
                        format!("labels.{k}"),
                        format!(
                            "class {n} does not exist: the model has {} classes",
                            c.len()
                        ),
                        choices,
                    );
                }
            }
        }

        if let Some(output) = section("output") {
            if let Some(dir) = path_at(output, "dir") {
                self.check_output_dir(&dir, "output.dir");
            }
            if let Some(audit) = path_at(output, "audit") {
                if audit.is_dir() {
                    self.push(
                        "output.audit",
                        format!("{} is a directory, not a log file", audit.display()),
                        Vec::new(),
                    );
                } else if let Some(parent) = audit.parent() {
                    self.check_output_dir(parent, "output.audit");
                }
            }
        }

        self.check_plugins(top, &base);
    }

    fn check_input(&mut self, p: &Path) {
        let shown = p.display();
        let problem = match std::fs::metadata(p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some(format!("input {shown} does not exist"))
            }
            Err(e) => Some(format!("input {shown} cannot be read: {e}")),
            Ok(m) if m.is_dir() => std::fs::read_dir(p)
                .err()
                .map(|e| format!("input folder {shown} cannot be read: {e}")),
            Ok(_) => std::fs::File::open(p)
                .err()
                .map(|e| format!("input file {shown} cannot be read: {e}")),
        };
        if let Some(msg) = problem {
            self.push("input.path", msg, Vec::new());
        }
    }

    /// Parses the model and its card the way a run would; returns the class names when both
    /// load.
    fn check_model(&mut self, onnx: &Path, card: Option<&Path>) -> Option<Vec<String>> {
        let graph = if !onnx.is_file() {
            self.push(
                "model.onnx",
                format!("model file {} does not exist", onnx.display()),
                Vec::new(),
            );
            None
        } else {
            match crate::runtime::onnx::load(onnx) {
                Ok(g) => Some(g),
                Err(e) => {
                    self.push(
                        "model.onnx",
                        format!("the model cannot be loaded: {}", chain(&e)),
                        Vec::new(),
                    );
                    None
                }
            }
        };
        let (card_path, card_key) = match card {
            Some(c) => (c.to_path_buf(), "model.card"),
            None => (card_path(onnx), "model.onnx"),
        };
        if !card_path.is_file() {
            // Without a model file the default card's absence is the same mistake.
            if card.is_some() || graph.is_some() {
                self.push(
                    card_key,
                    format!("model card {} does not exist", card_path.display()),
                    Vec::new(),
                );
            }
            return None;
        }
        match ModelCard::load(&card_path) {
            Err(e) => {
                self.push(card_key, chain(&e), Vec::new());
                None
            }
            Ok(c) => {
                let g = graph?;
                if let Err(e) = c.logits_index(&g) {
                    self.push(card_key, chain(&e), Vec::new());
                }
                Some(c.classes)
            }
        }
    }

    fn check_labels_csv(&mut self, csv: &Path) {
        let header = match std::fs::File::open(csv) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.push(
                    "labels.csv",
                    format!("labels file {} does not exist", csv.display()),
                    Vec::new(),
                );
                return;
            }
            Err(e) => {
                self.push(
                    "labels.csv",
                    format!("labels file {} cannot be read: {e}", csv.display()),
                    Vec::new(),
                );
                return;
            }
            Ok(f) => {
                let mut line = String::new();
                match std::io::BufRead::read_line(&mut std::io::BufReader::new(f), &mut line) {
                    Ok(_) => line,
                    Err(e) => {
                        self.push(
                            "labels.csv",
                            format!("labels file {} cannot be read: {e}", csv.display()),
                            Vec::new(),
                        );
                        return;
                    }
                }
            }
        };
        let columns: Vec<String> = header
            .trim_start_matches('\u{feff}')
            .trim_end()
            .split(',')
            .map(|c| c.trim().trim_matches('"').to_string())
            .collect();
        let has = |c: &str| columns.iter().any(|x| x == c);
        if !has("label") {
            self.push(
                "labels.csv",
                format!(
                    "{} has no `label` column (header: {})",
                    csv.display(),
                    columns.join(",")
                ),
                vec!["label".into(), "SOPInstanceUID".into(), "file".into()],
            );
        } else if !has("SOPInstanceUID") && !has("file") {
            self.push(
                "labels.csv",
                format!(
                    "{} needs a `SOPInstanceUID` or `file` column to match labels to inputs (header: {})",
                    csv.display(),
                    columns.join(",")
                ),
                vec!["SOPInstanceUID".into(), "file".into()],
            );
        }
    }

    /// The folder must exist as a folder or be creatable: its nearest existing ancestor must be a
    /// folder.
    fn check_output_dir(&mut self, dir: &Path, key: &str) {
        let mut at = Some(dir);
        while let Some(p) = at {
            if let Ok(m) = std::fs::metadata(p) {
                if !m.is_dir() {
                    let msg = if p == dir {
                        format!("{} exists and is not a folder", dir.display())
                    } else {
                        format!(
                            "{} cannot be created: {} is a file",
                            dir.display(),
                            p.display()
                        )
                    };
                    self.push(key, msg, Vec::new());
                }
                return;
            }
            at = p.parent().filter(|q| !q.as_os_str().is_empty());
        }
    }

    fn check_plugins(&mut self, top: &serde_yaml::Mapping, base: &Path) {
        let plugins = match get(top, "plugins") {
            Some(Yaml::Mapping(m)) => Some(m),
            _ => None,
        };
        let mut dirs = Vec::new();
        if let Some(Yaml::Sequence(list)) = plugins.and_then(|m| get(m, "dirs")) {
            for (i, d) in list.iter().enumerate() {
                let Some(d) = text(d) else { continue };
                let p = resolve(base, Path::new(&d));
                if p.exists() {
                    dirs.push(p);
                } else {
                    self.push(
                        format!("plugins.dirs[{i}]"),
                        format!("plugin folder {} does not exist", p.display()),
                        Vec::new(),
                    );
                }
            }
        }
        let mut pins = BTreeMap::new();
        let mut pin_names = Vec::new();
        if let Some(Yaml::Mapping(m)) = plugins.and_then(|m| get(m, "pins")) {
            for (k, v) in m {
                let (Some(name), Some(hash)) = (text(k), text(v)) else {
                    continue;
                };
                let hex = hash.strip_prefix("sha256:").unwrap_or(&hash);
                pin_names.push(name.clone());
                match Pins::parse(&[format!("{name}={hex}")]) {
                    Ok(p) => pins.extend(p.0),
                    Err(_) => self.push(
                        format!("plugins.pins.{name}"),
                        format!(
                            "`{hash}` is not a SHA-256 pin: expected sha256:HEX (64 hex digits)"
                        ),
                        Vec::new(),
                    ),
                }
            }
        }
        let pins = Pins(pins);

        let stages: Vec<(usize, &'static str, String, Option<&Yaml>)> = match get(top, "stages") {
            Some(Yaml::Sequence(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, st)| {
                    let m = st.as_mapping()?;
                    let mut roles: Vec<(&'static str, String)> = ROLE_KEYS
                        .iter()
                        .filter_map(|r| Some((*r, text(get(m, r)?)?)))
                        .collect();
                    match roles.len() {
                        1 => {
                            let (role, name) = roles.remove(0);
                            Some((i, role, name, get(m, "params")))
                        }
                        _ => None,
                    }
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut used: Vec<String> = stages.iter().map(|s| s.2.to_string()).collect();
        used.sort();
        used.dedup();
        for name in &pin_names {
            if !used.contains(name) {
                self.push(
                    format!("plugins.pins.{name}"),
                    format!("pins `{name}`, which no stage uses (a misspelt pin protects nothing)"),
                    used.clone(),
                );
            }
        }
        if stages.is_empty() {
            return;
        }

        let registry = match SearchPath::new(&dirs, &[], true).and_then(|s| Registry::discover(&s))
        {
            Ok(mut r) => {
                r.add_handles(std::mem::take(&mut self.in_process));
                r
            }
            Err(e) => {
                self.push("plugins.dirs", chain(&e), Vec::new());
                return;
            }
        };
        let mut known: Vec<String> = registry.plugins.iter().map(|p| p.name.clone()).collect();
        known.sort();
        for (i, role, name, params) in stages {
            let name = name.as_str();
            let key = format!("stages[{i}].{role}");
            let handle = match registry.get(name, &pins) {
                Ok(h) => h,
                Err(PluginError::HashMismatch {
                    path,
                    expected,
                    actual,
                    ..
                }) => {
                    self.push(
                        format!("plugins.pins.{name}"),
                        format!(
                            "the library {} of `{name}` has SHA-256 {actual}, not the pinned {expected}",
                            path.display()
                        ),
                        Vec::new(),
                    );
                    continue;
                }
                Err(PluginError::NotFound {
                    searched, refused, ..
                }) => {
                    self.push(
                        key,
                        format!(
                            "no plugin named `{name}` on the search path ({searched}){refused}"
                        ),
                        known.clone(),
                    );
                    continue;
                }
                Err(e) => {
                    self.push(key, chain(&e), known.clone());
                    continue;
                }
            };
            let want = match role {
                "attack" => Kind::Attack,
                "purifier" => Kind::Purifier,
                "detector" => Kind::Detector,
                _ => Kind::Other,
            };
            if handle.kind != want {
                let right = kind_key(handle.kind);
                let same_kind: Vec<String> = registry
                    .plugins
                    .iter()
                    .filter(|p| p.kind == want)
                    .map(|p| p.name.clone())
                    .collect();
                self.push(
                    key,
                    format!(
                        "`{name}` is {} plugin, not {}: write `{right}: {name}`",
                        a(right),
                        a(role)
                    ),
                    same_kind,
                );
            }
            self.check_params(i, &handle, params);
        }
    }

    fn check_params(&mut self, stage: usize, h: &PluginHandle, params: Option<&Yaml>) {
        let base = format!("stages[{stage}].params");
        let json = match params {
            None => serde_json::Value::Object(Default::default()),
            Some(p) if p.is_mapping() => match serde_json::to_value(p) {
                Ok(j) => j,
                Err(e) => {
                    self.push(base, format!("not valid parameters: {e}"), Vec::new());
                    return;
                }
            },
            // Reported by the structure walk.
            Some(_) => return,
        };
        let props = h.schema.get("properties").and_then(|p| p.as_object());
        for v in schema::validate(&h.schema, &json) {
            let top = v.path.split(['.', '[']).next().unwrap_or_default();
            let prop = props.and_then(|p| p.get(top));
            let choices: Vec<String> = match prop {
                None => props
                    .map(|p| p.keys().cloned().collect())
                    .unwrap_or_default(),
                Some(s) => s
                    .get("enum")
                    .and_then(|e| e.as_array())
                    .map(|e| e.iter().map(|x| x.to_string()).collect())
                    .unwrap_or_default(),
            };
            let key = if v.path.is_empty() {
                base.clone()
            } else {
                format!("{base}.{}", v.path)
            };
            let shown = if v.path.is_empty() {
                String::new()
            } else {
                format!("`{}` ", v.path)
            };
            // The schema validator lists the known names in its reason; here they are choices.
            let reason = match v.reason.find(" (known:") {
                Some(i) if !choices.is_empty() => &v.reason[..i],
                _ => v.reason.as_str(),
            };
            self.push(
                key,
                format!("{}: parameter {shown}{reason}", h.name),
                choices,
            );
        }
    }
}

/// `attack` -> `an attack`, `purifier` -> `a purifier`.
fn a(word: &str) -> String {
    let article = if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {word}")
}

fn kind_key(k: Kind) -> &'static str {
    match k {
        Kind::Attack => "attack",
        Kind::Purifier => "purifier",
        Kind::Detector => "detector",
        Kind::Other => "stage",
    }
}

/// The directory relative paths resolve against: the same rule as [`Pipeline::parse`].
fn base_dir(file: &Path) -> PathBuf {
    let base = file
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::canonicalize(&base).unwrap_or(base)
}

/// An error and its sources, `: `-joined, so the reason a model failed to load is not lost.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use adverse_plugin_sdk::__private::{AsAttack, AsPurifier, LibraryHolder, descriptor};
    use adverse_plugin_sdk::serde::Deserialize;
    use adverse_plugin_sdk::{Attack, Batch, Host, PluginInfo, Purifier, Result, Tensor};

    use super::*;
    use crate::plugin::PluginLibrary;

    // Two in-process plugins (no library is built): an attack and a purifier with schemas.
    #[derive(Debug, Deserialize)]
    #[serde(crate = "adverse_plugin_sdk::serde")]
    struct NoParams {}

    #[derive(Debug)]
    struct Push;
    impl PluginInfo for Push {
        const NAME: &'static str = "push";
        const VERSION: &'static str = "0.1.0";
        const DESCRIPTION: &'static str = "validate test attack";
        type Params = NoParams;
        fn param_schema() -> &'static str {
            r#"{"type":"object","properties":{"eps":{"type":"number","minimum":0,"maximum":10},"norm":{"enum":["l2","linf"]}},"required":["eps"],"additionalProperties":false}"#
        }
        fn create(_: NoParams, _: &Host<'_>) -> Result<Self> {
            Ok(Push)
        }
    }
    impl Attack for Push {
        fn attack(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
            Ok(batch.input())
        }
    }

    #[derive(Debug)]
    struct Blur;
    impl PluginInfo for Blur {
        const NAME: &'static str = "blur";
        const VERSION: &'static str = "0.1.0";
        const DESCRIPTION: &'static str = "validate test purifier";
        type Params = NoParams;
        fn param_schema() -> &'static str {
            r#"{"type":"object","properties":{"radius":{"type":"integer","minimum":1,"maximum":8}},"additionalProperties":false}"#
        }
        fn create(_: NoParams, _: &Host<'_>) -> Result<Self> {
            Ok(Blur)
        }
    }
    impl Purifier for Blur {
        fn purify(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
            Ok(batch.input())
        }
    }

    fn handles() -> Vec<PluginHandle> {
        static LIB: OnceLock<LibraryHolder> = OnceLock::new();
        let lib = LIB.get_or_init(|| {
            LibraryHolder::new(vec![
                descriptor::<AsAttack<Push>>(),
                descriptor::<AsPurifier<Blur>>(),
            ])
        });
        PluginLibrary::in_process("validate-tests", lib.library()).expect("test table loads")
    }

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// A workspace with an input folder, so only the mistakes a test writes are reported.
    struct Ws {
        dir: tempfile::TempDir,
    }

    impl Ws {
        fn new() -> Ws {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("in")).unwrap();
            Ws { dir }
        }
        fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }
        fn check(&self, yaml: &str) -> Report {
            validate_bytes_with(&self.path("p.yaml"), yaml.as_bytes(), handles())
        }
    }

    const HEAD: &str = "name: t\ninput: {path: in}\noutput: {dir: out}\n";

    fn keys(r: &Report) -> Vec<&str> {
        r.problems.iter().map(|p| p.key.as_str()).collect()
    }

    fn one<'a>(r: &'a Report, key: &str) -> &'a Problem {
        let found: Vec<&Problem> = r.problems.iter().filter(|p| p.key == key).collect();
        assert_eq!(found.len(), 1, "one problem at {key}: {:#?}", r.problems);
        found[0]
    }

    fn at(p: &Problem) -> (usize, usize) {
        (p.line.expect("line"), p.column.expect("column"))
    }

    // --- locator ------------------------------------------------------------------------------

    #[test]
    fn locator_block_mappings() {
        let l = Locator::from_text("a:\n  b:\n    c: 1\n  # note\n  d: [x]\ne: 2\n");
        assert_eq!(l.locate("a"), Some((1, 1)));
        assert_eq!(l.locate("a.b"), Some((2, 3)));
        assert_eq!(l.locate("a.b.c"), Some((3, 5)));
        assert_eq!(l.locate("a.d"), Some((5, 3)));
        assert_eq!(l.locate("a.d[0]"), Some((5, 7)));
        assert_eq!(l.locate("e"), Some((6, 1)));
    }

    #[test]
    fn locator_flow_mappings_nested() {
        let l = Locator::from_text("top: { x: 1, inner: {y: 2,  z: {w: 3}} }\nnext: 0\n");
        assert_eq!(l.locate("top"), Some((1, 1)));
        assert_eq!(l.locate("top.x"), Some((1, 8)));
        assert_eq!(l.locate("top.inner"), Some((1, 14)));
        assert_eq!(l.locate("top.inner.y"), Some((1, 22)));
        assert_eq!(l.locate("top.inner.z"), Some((1, 29)));
        assert_eq!(l.locate("top.inner.z.w"), Some((1, 33)));
        assert_eq!(l.locate("next"), Some((2, 1)));
    }

    #[test]
    fn locator_sequences() {
        let text =
            "s:\n  - a: 1\n    b: {c: 2}\n  - [10, {k: v}]\n  - plain\nt: [{u: 1}, {u: 2}]\n";
        let l = Locator::from_text(text);
        assert_eq!(l.locate("s[0]"), Some((2, 5)));
        assert_eq!(l.locate("s[0].a"), Some((2, 5)));
        assert_eq!(l.locate("s[0].b.c"), Some((3, 9)));
        assert_eq!(l.locate("s[1]"), Some((4, 5)));
        assert_eq!(l.locate("s[1][0]"), Some((4, 6)));
        assert_eq!(l.locate("s[1][1].k"), Some((4, 11)));
        assert_eq!(l.locate("s[2]"), Some((5, 5)));
        assert_eq!(l.locate("t[1].u"), Some((6, 14)));
    }

    #[test]
    fn locator_falls_back_to_the_nearest_enclosing_key() {
        let l = Locator::from_text("a:\n  b: {c: 1}\nlist: [1]\n");
        assert_eq!(l.locate("a.b.missing"), Some((2, 3)));
        assert_eq!(l.locate("a.b.missing.deeper"), Some((2, 3)));
        assert_eq!(l.locate("list[5]"), Some((3, 1)));
        assert_eq!(l.locate("nothing"), None);
    }

    #[test]
    fn locator_survives_complex_keys_anchors_and_later_documents() {
        let text =
            "? [a, b]\n: {inside: 1}\nbase: &b {x: 1}\nuse: *b\nafter: {y: 2}\n---\nafter: 9\n";
        let l = Locator::from_text(text);
        assert_eq!(l.locate("base.x"), Some((3, 11)));
        assert_eq!(l.locate("use"), Some((4, 1)));
        assert_eq!(l.locate("after.y"), Some((5, 9)));
        assert_eq!(l.marks.keys().filter(|k| k.contains("inside")).count(), 0);
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let l = Locator::from_text("name: \"é\u{00e9}\"\nx: {é: 1, y: 2}\n");
        assert_eq!(l.locate("x.y"), Some((2, 11)));
    }

    // --- structure ----------------------------------------------------------------------------

    #[test]
    fn yaml_syntax_error_has_its_location() {
        let ws = Ws::new();
        let r = ws.check("name: t\ninput: {path: in\noutput: {dir: out}\n");
        assert_eq!(r.problems.len(), 1, "{:#?}", r.problems);
        let p = &r.problems[0];
        assert!(p.message.starts_with("not valid YAML"), "{}", p.message);
        assert!(p.line.is_some_and(|l| l >= 2), "{p:?}");
        assert!(r.pipeline.is_none());
        let r = ws.check("a: 1\n  b: 2\n");
        assert_eq!(r.problems[0].line, Some(2), "{:?}", r.problems);
    }

    #[test]
    fn duplicate_keys_point_at_the_second_occurrence() {
        let ws = Ws::new();
        let r = ws.check(
            "name: t\ninput: {path: in}\noutput:\n  dir: out\n  dicom: true\n  dir: again\n",
        );
        assert_eq!(r.problems.len(), 1, "{:#?}", r.problems);
        let p = &r.problems[0];
        assert_eq!((p.key.as_str(), at(p)), ("output.dir", (6, 3)));
        assert_eq!(p.message, "`dir` is written twice in the same mapping");
    }

    #[test]
    fn unknown_keys_at_every_level_with_choices() {
        let ws = Ws::new();
        let yaml = "name: t\nnmae: x\ninput: {path: in, recursve: true}\noutput:\n  dir: out\n  preview: true\nstages:\n  - purifier: blur\n    parms: {radius: 2}\nrun: {backend: cpu, threads: 2}\n";
        let r = ws.check(yaml);
        assert_eq!(
            keys(&r),
            [
                "nmae",
                "input.recursve",
                "output.preview",
                "stages[0].parms",
                "run.threads"
            ]
        );
        let p = one(&r, "nmae");
        assert_eq!(at(p), (2, 1));
        assert!(p.choices.contains(&"name".to_string()), "{p:?}");
        assert_eq!(at(one(&r, "input.recursve")), (3, 19));
        let p = one(&r, "output.preview");
        assert_eq!(at(p), (6, 3));
        assert_eq!(p.choices, ["dir", "dicom", "previews", "audit"]);
        let p = one(&r, "stages[0].parms");
        assert_eq!(at(p), (9, 5));
        assert!(p.choices.contains(&"params".to_string()));
        assert_eq!(at(one(&r, "run.threads")), (10, 21));
        assert!(r.pipeline.is_none());
    }

    #[test]
    fn missing_required_keys_point_at_the_mapping_that_lacks_them() {
        let ws = Ws::new();
        let r = ws.check("input:\n  recursive: false\nmodel: {card: c.yaml}\n");
        assert_eq!(
            keys(&r),
            ["name", "output", "input.path", "model.onnx"],
            "{:#?}",
            r.problems
        );
        assert_eq!(one(&r, "name").line, None);
        assert!(
            one(&r, "output")
                .message
                .contains("missing required key `output`")
        );
        assert_eq!(at(one(&r, "input.path")), (1, 1));
        assert_eq!(at(one(&r, "model.onnx")), (3, 1));
    }

    #[test]
    fn wrong_types_and_empty_values() {
        let ws = Ws::new();
        let yaml = "name: [a]\ninput: {path: in, recursive: yes, include: \"*.dcm\"}\noutput: {dir: out, dicom: 1}\nlabels: {all: -1}\nstages: {purifier: blur}\nplugins: {dirs: [[1]], pins: {x: [2]}}\nrun: {jobs: 0, batch_size: 2.5, seed: 7}\n";
        let r = ws.check(yaml);
        let want = [
            ("name", "expected a string, found a list"),
            ("input.recursive", "expected true or false, found a string"),
            (
                "input.include",
                "expected a list of strings, found a string",
            ),
            ("output.dicom", "expected true or false, found an integer"),
            (
                "labels.all",
                "expected a non-negative integer, found an integer",
            ),
            ("stages", "expected a list of stages, found a mapping"),
            ("plugins.dirs[0]", "expected a string, found a list"),
            ("plugins.pins.x", "expected a string, found a list"),
            ("run.jobs", "must be at least 1"),
            (
                "run.batch_size",
                "expected a non-negative integer, found a number",
            ),
        ];
        assert_eq!(r.problems.len(), want.len(), "{:#?}", r.problems);
        for (k, msg) in want {
            assert_eq!(one(&r, k).message, msg, "{k}");
        }
        // `plugins:` alone is an empty section; a stage's `params:` left empty is a mistake.
        let r = ws.check(&format!(
            "{HEAD}plugins:\nstages:\n  - purifier: blur\n    params:\n"
        ));
        assert_eq!(keys(&r), ["stages[0].params"]);
        assert_eq!(one(&r, "stages[0].params").message, "has no value");
        let r = ws.check("name: ~\ninput: {path: in}\noutput: {dir: out}\n");
        assert_eq!(keys(&r), ["name"]);
    }

    #[test]
    fn stages_need_exactly_one_plugin() {
        let ws = Ws::new();
        let yaml = format!(
            "{HEAD}stages:\n  - params: {{radius: 1}}\n  - purifier: blur\n    attack: push\n    params: {{eps: 1}}\n  - 7\n"
        );
        let r = ws.check(&yaml);
        let p = one(&r, "stages[0]");
        assert!(p.message.contains("needs one of"), "{p:?}");
        assert_eq!(at(p), (5, 5));
        assert_eq!(p.choices, ["attack", "purifier", "detector", "stage"]);
        let p = one(&r, "stages[1].attack");
        assert!(p.message.contains("`purifier` and `attack`"), "{p:?}");
        assert_eq!(at(p), (7, 5));
        assert_eq!(
            one(&r, "stages[2]").message,
            "expected a mapping, found an integer"
        );
        assert_eq!(r.problems.len(), 3, "{:#?}", r.problems);
    }

    #[test]
    fn duplicate_stage_labels() {
        let ws = Ws::new();
        let yaml = format!(
            "{HEAD}stages:\n  - purifier: blur\n  - purifier: blur\n  - purifier: blur\n    id: second\n  - attack: push\n    params: {{eps: 1}}\n    id: second\n"
        );
        let r = ws.check(&yaml);
        assert_eq!(keys(&r), ["stages[1].purifier", "stages[3].id"]);
        let p = one(&r, "stages[1].purifier");
        assert_eq!(at(p), (6, 5));
        assert!(p.message.contains("already appears as stages[0]"), "{p:?}");
        assert_eq!(at(one(&r, "stages[3].id")), (11, 5));
    }

    #[test]
    fn the_walk_agrees_with_the_typed_parse() {
        // (document, does the walk accept it). Whatever the walk accepts the typed parse must
        // accept (validate never passes a file the engine refuses); the walk is stricter only
        // where serde_yaml reads `~` as the text "~" for a required name or path.
        let h = |rest: &str| format!("{HEAD}{rest}");
        let io = |input: &str, output: &str| format!("name: t\ninput: {input}\noutput: {output}");
        let docs: Vec<(String, bool)> = vec![
            (HEAD.into(), true),
            (h("model:\nlabels: ~\nrun: {backend: ~, seed: ~}"), true),
            (h("stages:"), true),
            (h("stages: []\nplugins: {}"), true),
            (h("run:"), true),
            (h("plugins:"), true),
            (h("plugins: {dirs: ~}"), false),
            (h("plugins: {pins: ~}"), false),
            (h("plugins: {dirs: [5], pins: {a: 5, 6: b}}"), true),
            (io("{path: in, recursive: ~}", "{dir: out}"), false),
            (io("{path: in, recursive: \"true\"}", "{dir: out}"), false),
            (io("{path: in, include: ~}", "{dir: out}"), false),
            (io("{path: in, include: [5]}", "{dir: out}"), true),
            (io("{path: 5}", "{dir: out}"), true),
            (io("", "{dir: out}"), false),
            (io("{path: in}", "{dir: out, dicom: ~}"), false),
            (io("{path: in}", "{dir: ~}"), false),
            (
                "name: 5\ninput: {path: in}\noutput: {dir: out}".into(),
                true,
            ),
            (
                "name: true\ninput: {path: in}\noutput: {dir: out}".into(),
                true,
            ),
            (
                "name: ~\ninput: {path: in}\noutput: {dir: out}".into(),
                false,
            ),
            (h("stages: [{purifier: blur, params: []}]"), false),
            (h("stages: [{purifier: blur, params: ~}]"), false),
            (h("stages: [{purifier: blur, params: {1: a}}]"), true),
            (h("stages: [{purifier: blur, id: ~}]"), true),
            (h("stages: [{purifier: 5}]"), true),
            (h("stages: [~]"), false),
            (h("labels: {all: 4294967296}"), false),
            (h("labels: {all: 4294967295}"), true),
            (h("labels: {all: \"1\"}"), false),
            (h("run: {jobs: 18446744073709551615}"), true),
            (h("run: {jobs: \"4\"}"), false),
            (h("run: {seed: 1.0}"), false),
            (h("run: {backend: 5}"), false),
            (h("model: {onnx: m.onnx, card: 5}"), true),
            (h("extra: 1"), false),
        ];
        let mut bad = Vec::new();
        for (d, want) in docs {
            let mut v = Validator {
                locator: Locator::default(),
                problems: Vec::new(),
                in_process: Vec::new(),
            };
            let doc: Yaml = serde_yaml::from_str(&d).unwrap();
            let walk_ok = v.structure(&doc);
            let parse = Pipeline::parse(Path::new("/x/p.yaml"), d.as_bytes());
            if walk_ok != want || (walk_ok && parse.is_err()) {
                bad.push(format!(
                    "{d}\nwalk: {:?}\nparse: {:?}",
                    v.problems,
                    parse.err()
                ));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n\n"));
    }

    // --- checks against plugins and files -----------------------------------------------------

    #[test]
    fn clean_pipeline_validates_and_carries_the_typed_view() {
        let ws = Ws::new();
        let r = ws.check(&format!("{HEAD}stages:\n  - attack: push\n    params: {{eps: 2, norm: linf}}\n  - purifier: blur\n"));
        assert!(r.is_ok(), "{:#?}", r.problems);
        let p = r.pipeline.expect("typed pipeline");
        assert_eq!(p.spec.stages.len(), 2);
        assert_eq!(p.input, ws.dir.path().canonicalize().unwrap().join("in"));
    }

    #[test]
    fn unknown_plugin_lists_the_plugins_found() {
        let ws = Ws::new();
        let r = ws.check(&format!("{HEAD}stages:\n  - purifier: bulr\n"));
        let p = one(&r, "stages[0].purifier");
        assert_eq!(at(p), (5, 5));
        assert!(p.message.contains("no plugin named `bulr`"), "{p:?}");
        assert_eq!(p.choices, ["blur", "push"]);
        assert!(
            r.pipeline.is_some(),
            "structure is sound, so the typed view exists"
        );
    }

    #[test]
    fn plugin_of_the_wrong_kind_for_its_role() {
        let ws = Ws::new();
        let r = ws.check(&format!(
            "{HEAD}stages:\n  - purifier: push\n    params: {{eps: 1}}\n  - detector: blur\n"
        ));
        let p = one(&r, "stages[0].purifier");
        assert_eq!(
            p.message,
            "`push` is an attack plugin, not a purifier: write `attack: push`"
        );
        assert_eq!(p.choices, ["blur"]);
        let p = one(&r, "stages[1].detector");
        assert!(p.message.contains("write `purifier: blur`"), "{p:?}");
        assert!(p.choices.is_empty());
        assert_eq!(r.problems.len(), 2);
    }

    #[test]
    fn params_outside_the_schema_point_at_their_own_line() {
        let ws = Ws::new();
        let yaml = format!(
            "{HEAD}stages:\n  - purifier: blur\n    params:\n      radius: 9\n  - attack: push\n    params: {{norm: l3, epz: 1}}\n"
        );
        let r = ws.check(&yaml);
        let p = one(&r, "stages[0].params.radius");
        assert_eq!(at(p), (7, 7));
        assert_eq!(p.message, "blur: parameter `radius` must be <= 8, got 9");
        let p = one(&r, "stages[1].params.norm");
        assert_eq!(at(p), (9, 14));
        assert_eq!(p.choices, ["\"l2\"", "\"linf\""]);
        let p = one(&r, "stages[1].params.epz");
        assert_eq!(at(p), (9, 24));
        assert_eq!(
            p.message,
            "push: parameter `epz` is not a parameter of this plugin"
        );
        assert_eq!(p.choices, ["eps", "norm"]);
        // A required parameter that is absent points at its `params` mapping.
        let p = one(&r, "stages[1].params.eps");
        assert_eq!(at(p), (9, 5));
        assert!(p.message.ends_with("is required"), "{p:?}");
        assert_eq!(r.problems.len(), 4, "{:#?}", r.problems);
    }

    #[test]
    fn pins_bad_mismatched_and_unused() {
        let ws = Ws::new();
        let hash = "ab".repeat(32);
        let yaml = format!(
            "{HEAD}stages: [{{purifier: blur}}, {{attack: push, params: {{eps: 1}}}}]\nplugins:\n  pins:\n    blur: \"sha256:{hash}\"\n    push: \"sha256:12\"\n    blr: \"{hash}\"\n"
        );
        let r = ws.check(&yaml);
        let p = one(&r, "plugins.pins.blur");
        assert_eq!(at(p), (7, 5));
        assert!(p.message.contains("not the pinned"), "{p:?}");
        let p = one(&r, "plugins.pins.push");
        assert!(p.message.contains("is not a SHA-256 pin"), "{p:?}");
        let p = one(&r, "plugins.pins.blr");
        assert!(p.message.contains("no stage uses"), "{p:?}");
        assert_eq!(p.choices, ["blur", "push"]);
        assert_eq!(r.problems.len(), 3, "{:#?}", r.problems);
    }

    #[test]
    fn plugin_dirs_must_exist() {
        let ws = Ws::new();
        let r = ws.check(&format!(
            "{HEAD}stages: [{{purifier: blur}}]\nplugins: {{dirs: [in, nowhere]}}\n"
        ));
        let p = one(&r, "plugins.dirs[1]");
        assert_eq!(at(p), (5, 22));
        assert!(p.message.contains("does not exist"), "{p:?}");
        assert_eq!(r.problems.len(), 1, "{:#?}", r.problems);
    }

    #[test]
    fn input_must_exist_and_globs_must_parse() {
        let ws = Ws::new();
        let r = ws.check("name: t\ninput: {path: gone, include: [\"a[\"]}\noutput: {dir: out}\n");
        let p = one(&r, "input.path");
        assert_eq!(at(p), (2, 9));
        assert!(p.message.contains("does not exist"), "{p:?}");
        assert!(one(&r, "input.include[0]").message.contains("glob"));
        std::fs::write(ws.path("one.dcm"), b"x").unwrap();
        let r = ws.check("name: t\ninput: {path: one.dcm}\noutput: {dir: out}\n");
        assert!(
            r.is_ok(),
            "a single readable file is a valid input: {:?}",
            r.problems
        );
    }

    #[test]
    fn model_missing_unloadable_and_card_problems() {
        let ws = Ws::new();
        let r = ws.check(&format!("{HEAD}model:\n  onnx: models/m.onnx\n"));
        let p = one(&r, "model.onnx");
        assert_eq!(at(p), (5, 3));
        assert!(p.message.contains("does not exist"), "{p:?}");
        assert_eq!(
            r.problems.len(),
            1,
            "no extra card noise: {:#?}",
            r.problems
        );

        std::fs::write(ws.path("bad.onnx"), b"not a protobuf").unwrap();
        let r = ws.check(&format!(
            "{HEAD}model: {{onnx: bad.onnx, card: nocard.yaml}}\n"
        ));
        assert!(one(&r, "model.onnx").message.contains("cannot be loaded"));
        assert!(one(&r, "model.card").message.contains("does not exist"));

        let onnx = repo().join("pipelines/models/pneumonia-cnn.onnx");
        std::fs::write(ws.path("card.yaml"), "name: [unclosed\n").unwrap();
        let r = ws.check(&format!(
            "{HEAD}model: {{onnx: {}, card: card.yaml}}\n",
            onnx.display()
        ));
        let p = one(&r, "model.card");
        assert!(p.message.contains("model card"), "{p:?}");
        assert_eq!(r.problems.len(), 1, "{:#?}", r.problems);

        // The bundled model with its default card is clean; a class index it lacks is not.
        let r = ws.check(&format!(
            "{HEAD}model: {{onnx: {}}}\nlabels: {{all: 1, target: 2}}\n",
            onnx.display()
        ));
        let p = one(&r, "labels.target");
        assert_eq!(p.message, "class 2 does not exist: the model has 2 classes");
        assert_eq!(p.choices, ["0 (normal)", "1 (pneumonia)"]);
        assert_eq!(r.problems.len(), 1, "{:#?}", r.problems);
    }

    #[test]
    fn labels_csv_missing_or_without_columns() {
        let ws = Ws::new();
        let r = ws.check(&format!("{HEAD}labels: {{csv: l.csv}}\n"));
        assert!(one(&r, "labels.csv").message.contains("does not exist"));
        std::fs::write(ws.path("l.csv"), "file,class\na.dcm,1\n").unwrap();
        let r = ws.check(&format!("{HEAD}labels: {{csv: l.csv}}\n"));
        let p = one(&r, "labels.csv");
        assert!(p.message.contains("no `label` column"), "{p:?}");
        std::fs::write(ws.path("l.csv"), "label,patient\n1,x\n").unwrap();
        let r = ws.check(&format!("{HEAD}labels: {{csv: l.csv}}\n"));
        assert!(one(&r, "labels.csv").message.contains("SOPInstanceUID"));
        std::fs::write(
            ws.path("l.csv"),
            "\u{feff}\"SOPInstanceUID\", label\r\n1.2,1\n",
        )
        .unwrap();
        let r = ws.check(&format!("{HEAD}labels: {{csv: l.csv}}\n"));
        assert!(r.is_ok(), "{:?}", r.problems);
    }

    #[test]
    fn backend_choices() {
        let ws = Ws::new();
        let r = ws.check(&format!("{HEAD}run: {{backend: tpu}}\n"));
        let p = one(&r, "run.backend");
        assert_eq!(p.choices, ["auto", "cpu", "gpu", "gpu-software"]);
        assert_eq!(at(p), (4, 7));
        assert!(
            r.pipeline.is_none(),
            "the typed parse refuses an unknown backend too"
        );
        assert!(
            ws.check(&format!("{HEAD}run: {{backend: gpu-software}}\n"))
                .is_ok()
        );
    }

    #[test]
    fn output_dir_must_be_creatable() {
        let ws = Ws::new();
        std::fs::write(ws.path("file"), b"x").unwrap();
        let r = ws.check("name: t\ninput: {path: in}\noutput: {dir: file/sub/out, audit: in}\n");
        let p = one(&r, "output.dir");
        assert!(p.message.contains("is a file"), "{p:?}");
        assert!(one(&r, "output.audit").message.contains("is a directory"));
        let r = ws.check("name: t\ninput: {path: in}\noutput: {dir: file}\n");
        assert!(one(&r, "output.dir").message.contains("not a folder"));
        let r = ws
            .check("name: t\ninput: {path: in}\noutput: {dir: new/deeper, audit: logs/a.jsonl}\n");
        assert!(r.is_ok(), "{:?}", r.problems);
    }

    #[test]
    fn every_problem_is_reported_at_once_in_file_order() {
        let ws = Ws::new();
        let yaml = "input: {path: gone}\noutput: {dir: out, x: 1}\nstages:\n  - purifier: nope\n  - purifier: blur\n    params: {radius: 0}\nrun: {backend: fast}\n";
        let r = ws.check(yaml);
        assert_eq!(
            keys(&r),
            [
                "name",
                "input.path",
                "output.x",
                "stages[0].purifier",
                "stages[1].params.radius",
                "run.backend"
            ],
            "{:#?}",
            r.problems
        );
        let lines: Vec<Option<usize>> = r.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [None, Some(1), Some(2), Some(4), Some(6), Some(7)]);
    }

    #[test]
    fn render_format() {
        let p = Problem {
            line: Some(3),
            column: Some(7),
            key: "stages[0].params.eps".into(),
            message: "must be <= 8".into(),
            choices: vec!["a".into(), "b".into()],
        };
        assert_eq!(
            p.render(Path::new("p.yaml")),
            "p.yaml:3:7: stages[0].params.eps: must be <= 8 (valid: a, b)"
        );
        let p = Problem {
            line: None,
            column: None,
            key: "name".into(),
            message: "missing".into(),
            choices: vec![],
        };
        assert_eq!(p.render(Path::new("p.yaml")), "p.yaml: name: missing");
    }

    #[test]
    fn unreadable_file_is_a_problem_not_a_panic() {
        let r = validate_file(Path::new("/definitely/not/here.yaml"));
        assert_eq!(r.problems.len(), 1);
        assert!(r.problems[0].message.contains("cannot read"));
        let ws = Ws::new();
        assert!(ws.check("").problems[0].message.contains("empty"));
        assert!(
            ws.check("- a\n- b\n").problems[0]
                .message
                .contains("mapping")
        );
        assert!(!ws.check("\u{0}\u{1}\u{2}").is_ok());
    }

    #[test]
    fn resolution_matches_the_typed_parse() {
        let p = Pipeline::parse(Path::new("/repo/pipelines/x.yaml"), HEAD.as_bytes()).unwrap();
        assert_eq!(
            resolve(
                &base_dir(Path::new("/repo/pipelines/x.yaml")),
                Path::new("in")
            ),
            p.input
        );
        let p = Pipeline::parse(Path::new("x.yaml"), HEAD.as_bytes()).unwrap();
        assert_eq!(
            resolve(&base_dir(Path::new("x.yaml")), Path::new("in")),
            p.input
        );
    }
}
