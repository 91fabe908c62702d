//! Finding, loading and checking plugin libraries.
//!
//! Lifetime rule: a library is never unloaded while anything from it lives. Every
//! [`PluginHandle`] holds an `Arc` of its [`PluginLibrary`] (which owns the
//! `libloading::Library`), and every instance holds an `Arc` of its handle, so the code and the
//! static descriptor strings stay mapped until the last instance is destroyed.
//!
//! Pins: the SHA-256 of a library file is computed before it is loaded and kept with it; a pin
//! (`name=sha256`) is checked when that plugin is looked up, before it is created. Note that
//! loading a library runs its initialisers, so pins guarantee that no unpinned *plugin code*
//! processes data, not that an unpinned library was never mapped.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use adverse_plugin_sdk::Kind;
use adverse_plugin_sdk::abi::{
    self, AdvAbiVersion, AdvCreateFn, AdvDestroyFn, AdvEntryFn, AdvLibrary, AdvPluginDesc,
    AdvProcessFn,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{PluginError, abi_string, host_abi, schema};

/// Environment variable with extra plugin directories (platform path-list syntax).
pub const ENV_PATH: &str = "ADVERSE_PLUGIN_PATH";

/// Where plugins are looked for, in priority order: the pipeline file's directories, then
/// `--plugin-dir` entries, then `ADVERSE_PLUGIN_PATH`. An entry is a directory (every shared
/// library directly inside it) or a library file.
#[derive(Debug, Clone, Default)]
pub struct SearchPath {
    pub entries: Vec<PathBuf>,
}

impl SearchPath {
    /// `explicit` entries must exist (a typo is a usage error); environment entries that do not
    /// exist are skipped.
    pub fn new(
        pipeline_dirs: &[PathBuf],
        explicit: &[PathBuf],
        include_env: bool,
    ) -> Result<Self, PluginError> {
        let mut entries = Vec::new();
        for p in pipeline_dirs.iter().chain(explicit) {
            if !p.exists() {
                return Err(PluginError::MissingPath(p.clone()));
            }
            entries.push(p.clone());
        }
        if include_env && let Some(v) = std::env::var_os(ENV_PATH) {
            entries.extend(
                std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty() && p.exists()),
            );
        }
        Ok(SearchPath { entries })
    }

    /// Library files, in search order.
    pub fn libraries(&self) -> Result<Vec<PathBuf>, PluginError> {
        let mut out = Vec::new();
        for e in &self.entries {
            if e.is_dir() {
                let rd = std::fs::read_dir(e).map_err(|source| PluginError::Io {
                    path: e.clone(),
                    source,
                })?;
                let mut libs: Vec<PathBuf> = rd
                    .filter_map(|d| d.ok().map(|d| d.path()))
                    .filter(|p| p.is_file() && is_library(p))
                    .collect();
                libs.sort();
                out.extend(libs);
            } else {
                out.push(e.clone());
            }
        }
        let mut seen = std::collections::HashSet::new();
        out.retain(|p| seen.insert(p.canonicalize().unwrap_or_else(|_| p.clone())));
        Ok(out)
    }

    pub fn describe(&self) -> String {
        if self.entries.is_empty() {
            return format!("empty: give --plugin-dir or set {ENV_PATH}");
        }
        self.entries
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn is_library(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e == std::env::consts::DLL_EXTENSION)
}

/// A loaded library (or an in-process table).
pub struct PluginLibrary {
    /// The file, or `<in-process:NAME>`.
    pub path: PathBuf,
    /// SHA-256 of the file (hex); empty for in-process tables.
    pub sha256: String,
    pub abi: AdvAbiVersion,
    // Field order matters only for documentation: nothing here points into the library after
    // the handles (which own Arcs of this) are gone.
    _lib: Option<libloading::Library>,
}

impl std::fmt::Debug for PluginLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginLibrary")
            .field("path", &self.path)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// One plugin of a loaded library.
pub struct PluginHandle {
    pub name: String,
    pub version: String,
    pub description: String,
    pub kind: Kind,
    pub schema_text: String,
    pub schema: Value,
    pub(crate) create: AdvCreateFn,
    pub(crate) process: AdvProcessFn,
    pub(crate) destroy: AdvDestroyFn,
    /// ABI 1.3: the detector's score gradient w.r.t. the model's features (see the ABI).
    pub(crate) score_grad: Option<ScoreGradFn>,
    pub library: Arc<PluginLibrary>,
}

/// The type of [`AdvPluginDesc::score_grad`].
pub(crate) type ScoreGradFn = unsafe extern "C" fn(
    *mut std::ffi::c_void,
    *const adverse_plugin_sdk::abi::AdvHost,
    *const f32,
    usize,
    usize,
    *mut f32,
    *mut f32,
) -> adverse_plugin_sdk::abi::AdvStatus;

/// `sizeof(AdvPluginDesc)` in ABI 1.0 to 1.2, before `score_grad` was appended: the smallest
/// descriptor stride a library of those versions may declare.
const DESC_SIZE_V1_0: usize = std::mem::offset_of!(AdvPluginDesc, score_grad);

/// The smallest descriptor a library of ABI `minor` (same major) must provide.
fn min_desc_size(minor: u32) -> usize {
    if minor >= 3 {
        std::mem::size_of::<AdvPluginDesc>()
    } else {
        DESC_SIZE_V1_0
    }
}

impl std::fmt::Debug for PluginHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHandle")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("library", &self.library.path)
            .finish_non_exhaustive()
    }
}

pub fn sha256_file(path: &Path) -> Result<String, PluginError> {
    let bytes = std::fs::read(path).map_err(|source| PluginError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// Reads a descriptor string; `what` names the field in errors.
///
/// # Safety
/// `p` must be null or a NUL-terminated string that lives as long as the library.
unsafe fn desc_str(p: *const std::ffi::c_char, what: &str) -> Result<String, String> {
    if p.is_null() {
        return Err(format!("{what} is null"));
    }
    // SAFETY: per the function contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(str::to_string)
        .map_err(|_| format!("{what} is not UTF-8"))
}

impl PluginLibrary {
    /// Loads a library file and reads its plugin table.
    pub fn open(path: &Path) -> Result<Vec<PluginHandle>, PluginError> {
        let sha256 = sha256_file(path)?;
        // SAFETY: loading a library runs its initialisers; plugin libraries are trusted code by
        // design (the user put them on the search path, and may pin their hashes).
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| PluginError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let entry: AdvEntryFn = {
            // SAFETY: the symbol's type is fixed by the ABI (`AdvEntryFn`); a library exporting a
            // different type under this reserved name breaks the ABI contract.
            let sym = unsafe { lib.get::<AdvEntryFn>(abi::ADVERSE_ENTRY_SYMBOL.as_bytes()) }
                .map_err(|e| PluginError::NoEntry {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
            *sym
        };
        // SAFETY: calling the entry function per the ABI; the library stays loaded (moved into
        // the PluginLibrary below) for as long as the table is used.
        let table = unsafe { entry() };
        Self::from_table(path.to_path_buf(), sha256, table, Some(lib))
    }

    /// Plugins from a table already in this process (e.g. a plugin crate's
    /// `adverse_plugin_library()`), for tests and static builds: no library is loaded.
    pub fn in_process(
        label: &str,
        table: &'static AdvLibrary,
    ) -> Result<Vec<PluginHandle>, PluginError> {
        Self::from_table(
            PathBuf::from(format!("<in-process:{label}>")),
            String::new(),
            table,
            None,
        )
    }

    fn from_table(
        path: PathBuf,
        sha256: String,
        table: *const AdvLibrary,
        lib: Option<libloading::Library>,
    ) -> Result<Vec<PluginHandle>, PluginError> {
        if table.is_null() {
            return Err(PluginError::NullEntry { path });
        }
        // SAFETY: non-null; the first field is the frozen AdvAbiVersion in every ABI version, so
        // reading it is valid whatever version the library was built for.
        let version = unsafe { (*table).abi };
        let host = host_abi();
        if version.major != host.major || version.minor > host.minor {
            return Err(PluginError::AbiMismatch {
                path,
                library: version,
                host,
            });
        }
        // SAFETY: same major, minor <= ours: the table has at least the fields of the version it
        // declares, all of which this host knows.
        let t = unsafe { &*table };
        let bad = |index: usize, reason: String| PluginError::BadDescriptor {
            path: path.clone(),
            index,
            reason,
        };
        if (t.size as usize) < std::mem::size_of::<AdvLibrary>()
            || (t.plugin_desc_size as usize) < min_desc_size(version.minor)
        {
            return Err(bad(
                0,
                format!(
                    "table sizes {} / {} are smaller than ABI {} requires",
                    t.size,
                    t.plugin_desc_size,
                    abi_string(version)
                ),
            ));
        }
        if t.plugin_count > 0 && t.plugins.is_null() {
            return Err(bad(0, "plugin array is null".into()));
        }
        let mut raw = Vec::new();
        for i in 0..t.plugin_count as usize {
            // The library's descriptor, copied into a full-size one: a library of ABI < 1.3
            // has a shorter layout (no `score_grad`), and the fields it lacks stay zero (None).
            let stride = t.plugin_desc_size as usize;
            let n = stride.min(min_desc_size(version.minor));
            // SAFETY: every field of AdvPluginDesc is an integer, a raw pointer or an
            // `Option<extern fn>`, for all of which all-zero bytes are a valid value.
            let mut desc: AdvPluginDesc = unsafe { std::mem::zeroed() };
            // SAFETY: the library declares `plugin_count` descriptors with stride `stride`
            // (>= the layout of its ABI version, checked above) in a static array; `n` bytes
            // of descriptor `i` are read into `desc`, which is at least `n` bytes long.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    t.plugins.cast::<u8>().add(i * stride),
                    (&raw mut desc).cast::<u8>(),
                    n,
                );
            }
            let d = &desc;
            let score_grad = if n >= std::mem::size_of::<AdvPluginDesc>()
                && (d.size as usize) >= std::mem::size_of::<AdvPluginDesc>()
            {
                d.score_grad
            } else {
                None
            };
            // SAFETY: descriptor strings are NUL-terminated statics of the library.
            let strs = unsafe {
                (
                    desc_str(d.name, "name"),
                    desc_str(d.version, "version"),
                    desc_str(d.description, "description"),
                    desc_str(d.param_schema, "param_schema"),
                )
            };
            let (name, ver, descr, schema_text) = match strs {
                (Ok(a), Ok(b), Ok(c), Ok(e)) => (a, b, c, e),
                (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (.., Err(e)) => {
                    return Err(bad(i, e));
                }
            };
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(bad(
                    i,
                    format!("invalid plugin name {name:?} (use [A-Za-z0-9_-])"),
                ));
            }
            let kind = Kind::from_raw(d.kind)
                .ok_or_else(|| bad(i, format!("plugin `{name}`: unknown kind {}", d.kind)))?;
            let (Some(create), Some(process), Some(destroy)) = (d.create, d.process, d.destroy)
            else {
                return Err(bad(
                    i,
                    format!("plugin `{name}`: create, process and destroy are required"),
                ));
            };
            let schema: Value =
                serde_json::from_str(&schema_text).map_err(|e| PluginError::BadSchema {
                    plugin: name.clone(),
                    reason: format!("not JSON: {e}"),
                })?;
            schema::check_schema(&schema).map_err(|reason| PluginError::BadSchema {
                plugin: name.clone(),
                reason,
            })?;
            raw.push((
                name,
                ver,
                descr,
                kind,
                schema_text,
                schema,
                create,
                process,
                destroy,
                score_grad,
            ));
        }
        let library = Arc::new(PluginLibrary {
            path,
            sha256,
            abi: version,
            _lib: lib,
        });
        Ok(raw
            .into_iter()
            .map(
                |(
                    name,
                    version,
                    description,
                    kind,
                    schema_text,
                    schema,
                    create,
                    process,
                    destroy,
                    score_grad,
                )| PluginHandle {
                    name,
                    version,
                    description,
                    kind,
                    schema_text,
                    schema,
                    create,
                    process,
                    destroy,
                    score_grad,
                    library: library.clone(),
                },
            )
            .collect())
    }
}

impl PluginHandle {
    /// Checks `params` against the plugin's schema; the error names the plugin and the first
    /// offending parameter (all violations are listed in its reason when there are several).
    pub fn validate_params(&self, params: &Value) -> Result<(), PluginError> {
        let v = schema::validate(&self.schema, params);
        match v.first() {
            None => Ok(()),
            Some(first) => {
                let mut reason = first.reason.clone();
                if v.len() > 1 {
                    let rest: Vec<String> = v[1..]
                        .iter()
                        .map(|x| format!("`{}` {}", x.path, x.reason))
                        .collect();
                    reason = format!("{reason} (also: {})", rest.join("; "));
                }
                Err(PluginError::InvalidParam {
                    plugin: self.name.clone(),
                    param: if first.path.is_empty() {
                        "<root>".into()
                    } else {
                        first.path.clone()
                    },
                    reason,
                })
            }
        }
    }
}

/// Every plugin found on a search path, plus the libraries that were refused and why.
#[derive(Debug, Default)]
pub struct Registry {
    pub plugins: Vec<Arc<PluginHandle>>,
    pub refused: Vec<PluginError>,
    pub searched: String,
}

impl Registry {
    /// Loads every library on `path`. A library that fails to load is recorded in `refused` and
    /// the search goes on; a plugin name seen twice keeps the first.
    pub fn discover(path: &SearchPath) -> Result<Registry, PluginError> {
        let mut reg = Registry {
            searched: path.describe(),
            ..Default::default()
        };
        let mut by_name: HashMap<String, PathBuf> = HashMap::new();
        for lib in path.libraries()? {
            match PluginLibrary::open(&lib) {
                Ok(handles) => reg.add(handles, &mut by_name),
                Err(e) => reg.refused.push(e),
            }
        }
        Ok(reg)
    }

    /// Adds plugins (e.g. from [`PluginLibrary::in_process`]).
    pub fn add_handles(&mut self, handles: Vec<PluginHandle>) {
        let mut by_name: HashMap<String, PathBuf> = self
            .plugins
            .iter()
            .map(|p| (p.name.clone(), p.library.path.clone()))
            .collect();
        self.add(handles, &mut by_name);
    }

    fn add(&mut self, handles: Vec<PluginHandle>, by_name: &mut HashMap<String, PathBuf>) {
        for h in handles {
            if let Some(first) = by_name.get(&h.name) {
                self.refused.push(PluginError::Duplicate {
                    name: h.name.clone(),
                    first: first.clone(),
                    second: h.library.path.clone(),
                });
                continue;
            }
            by_name.insert(h.name.clone(), h.library.path.clone());
            self.plugins.push(Arc::new(h));
        }
    }

    /// The plugin `name`, checked against its pin if `pins` has one.
    pub fn get(&self, name: &str, pins: &Pins) -> Result<Arc<PluginHandle>, PluginError> {
        let Some(h) = self.plugins.iter().find(|p| p.name == name) else {
            let refused = if self.refused.is_empty() {
                String::new()
            } else {
                format!(
                    "; refused: {}",
                    self.refused
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            };
            return Err(PluginError::NotFound {
                name: name.to_string(),
                searched: self.searched.clone(),
                refused,
            });
        };
        pins.check(h)?;
        Ok(h.clone())
    }
}

/// SHA-256 pins per plugin name.
#[derive(Debug, Clone, Default)]
pub struct Pins(pub BTreeMap<String, String>);

impl Pins {
    /// Parses `NAME=HEX` entries.
    pub fn parse(entries: &[String]) -> Result<Pins, PluginError> {
        let mut m = BTreeMap::new();
        for e in entries {
            let (name, hash) = e
                .split_once('=')
                .ok_or_else(|| PluginError::BadPin(e.clone()))?;
            let hash = hash.trim().to_ascii_lowercase();
            if name.is_empty() || hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(PluginError::BadPin(e.clone()));
            }
            m.insert(name.trim().to_string(), hash);
        }
        Ok(Pins(m))
    }

    /// Refuses `h` when a pin for its name exists and its library's hash differs.
    pub fn check(&self, h: &PluginHandle) -> Result<(), PluginError> {
        match self.0.get(&h.name) {
            Some(expected) if *expected != h.library.sha256 => Err(PluginError::HashMismatch {
                name: h.name.clone(),
                path: h.library.path.clone(),
                expected: expected.clone(),
                actual: h.library.sha256.clone(),
            }),
            _ => Ok(()),
        }
    }
}
