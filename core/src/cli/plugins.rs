//! `adverse plugins list|info|run` and `adverse plugin new`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;

use super::exit;
use crate::dicom::DecodeLimits;
use crate::plugin::host::{Instance, PluginBackend};
use crate::plugin::loader::Pins;
use crate::plugin::runner::{self, RunModel, RunOptions};
use crate::plugin::{PluginError, Registry, SearchPath, abi_string, host_abi};
use crate::runtime::card::{ModelCard, card_path};
use crate::runtime::select::{self, BackendChoice};

#[derive(Args, Debug, Clone)]
pub struct SearchArgs {
    /// A directory of plugin libraries, or one library file (repeatable; searched before
    /// $ADVERSE_PLUGIN_PATH).
    #[arg(long = "plugin-dir", value_name = "PATH")]
    pub plugin_dir: Vec<PathBuf>,
    /// Require plugin NAME's library to have this SHA-256 (repeatable): NAME=HEX.
    #[arg(long = "pin", value_name = "NAME=SHA256")]
    pub pin: Vec<String>,
}

#[derive(Args, Debug)]
pub struct PluginsArgs {
    #[command(subcommand)]
    pub cmd: PluginsCmd,
}

#[derive(Subcommand, Debug)]
pub enum PluginsCmd {
    /// List the plugins on the search path (refused libraries are reported on stderr).
    List {
        #[command(flatten)]
        search: SearchArgs,
        /// One JSON object per plugin.
        #[arg(long)]
        json: bool,
    },
    /// Show a plugin's kind, version, ABI, library hash and parameter schema.
    Info {
        name: String,
        #[command(flatten)]
        search: SearchArgs,
    },
    /// Run one plugin on DICOM files: derived DICOM plus one JSON result row per frame.
    Run(RunArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The plugin.
    pub name: String,
    /// DICOM files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Parameters: a JSON object, or @FILE to read it from a file.
    #[arg(long, default_value = "{}")]
    pub params: String,
    /// ONNX model (with its `<model>.card.yaml`) for the model services.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// auto, cpu, gpu or gpu-software (default: $ADVERSE_BACKEND, else auto).
    #[arg(long)]
    pub backend: Option<BackendChoice>,
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// True class of every frame.
    #[arg(long)]
    pub label: Option<u32>,
    /// Target class of every frame (targeted attacks).
    #[arg(long)]
    pub target: Option<u32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Frames per `process` call.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    pub search: SearchArgs,
}

#[derive(Args, Debug)]
pub struct PluginArgs {
    #[command(subcommand)]
    pub cmd: PluginCmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ScaffoldKind {
    Attack,
    Purifier,
    Detector,
}

#[derive(Subcommand, Debug)]
pub enum PluginCmd {
    /// Create a plugin crate that builds and passes its own test.
    New {
        /// Plugin name ([a-z0-9_-]); the crate goes to DIR/NAME.
        name: String,
        #[arg(long, value_enum)]
        kind: ScaffoldKind,
        /// Parent directory (default: the current directory).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Path to the adverse-plugin-sdk crate (default: $ADVERSE_SDK_PATH, else the SDK of the
        /// source tree this binary was built from).
        #[arg(long)]
        sdk_path: Option<PathBuf>,
    },
}

pub fn run(args: PluginsArgs) -> anyhow::Result<ExitCode> {
    match args.cmd {
        PluginsCmd::List { search, json } => list(&search, json),
        PluginsCmd::Info { name, search } => info(&name, &search),
        PluginsCmd::Run(r) => run_plugin(r),
    }
}

pub fn run_new(args: PluginArgs) -> anyhow::Result<ExitCode> {
    match args.cmd {
        PluginCmd::New {
            name,
            kind,
            dir,
            sdk_path,
        } => scaffold(&name, kind, &dir, sdk_path),
    }
}

fn usage(e: impl std::fmt::Display) -> anyhow::Result<ExitCode> {
    eprintln!("adverse: error: {e}");
    Ok(ExitCode::from(exit::USAGE))
}

fn registry(search: &SearchArgs) -> Result<Registry, PluginError> {
    Registry::discover(&SearchPath::new(&[], &search.plugin_dir, true)?)
}

fn list(search: &SearchArgs, json: bool) -> anyhow::Result<ExitCode> {
    let reg = match registry(search) {
        Ok(r) => r,
        Err(e) => return usage(e),
    };
    let mut out = std::io::stdout().lock();
    for p in &reg.plugins {
        if json {
            let v = serde_json::json!({
                "name": p.name, "kind": p.kind.name(), "version": p.version, "abi": abi_string(p.library.abi),
                "library": p.library.path.display().to_string(), "sha256": p.library.sha256, "description": p.description,
            });
            writeln!(out, "{v}")?;
        } else {
            writeln!(
                out,
                "{}\t{}\t{}\tabi {}\t{}",
                p.name,
                p.kind,
                p.version,
                abi_string(p.library.abi),
                p.library.path.display()
            )?;
        }
    }
    for e in &reg.refused {
        eprintln!("adverse plugins: refused: {e}");
    }
    if reg.plugins.is_empty() && reg.refused.is_empty() {
        eprintln!(
            "adverse plugins: no plugins found (search path: {})",
            reg.searched
        );
    }
    Ok(ExitCode::from(if reg.refused.is_empty() {
        exit::OK
    } else {
        exit::SOME_FAILED
    }))
}

fn info(name: &str, search: &SearchArgs) -> anyhow::Result<ExitCode> {
    let found = Pins::parse(&search.pin).and_then(|pins| registry(search)?.get(name, &pins));
    let p = match found {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    println!("name: {}", p.name);
    println!("kind: {}", p.kind);
    println!("version: {}", p.version);
    println!("description: {}", p.description);
    println!(
        "abi: {} (host {})",
        abi_string(p.library.abi),
        abi_string(host_abi())
    );
    println!("library: {}", p.library.path.display());
    println!("sha256: {}", p.library.sha256);
    println!(
        "parameters: {}",
        serde_json::to_string_pretty(&p.schema).unwrap_or_else(|_| p.schema_text.clone())
    );
    Ok(ExitCode::SUCCESS)
}

fn parse_params(text: &str) -> anyhow::Result<Value> {
    let body = match text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read parameters file {path}"))?,
        None => text.to_string(),
    };
    serde_json::from_str(&body).with_context(|| format!("--params is not valid JSON: {body}"))
}

fn run_plugin(a: RunArgs) -> anyhow::Result<ExitCode> {
    // Everything that can be checked is checked before any file is read.
    let params = match parse_params(&a.params) {
        Ok(p) => p,
        Err(e) => return usage(format!("{e:#}")),
    };
    let handle = match Pins::parse(&a.search.pin)
        .and_then(|pins| registry(&a.search)?.get(&a.name, &pins))
    {
        Ok(h) => h,
        Err(e) => return usage(e),
    };
    if let Err(e) = handle.validate_params(&params) {
        return usage(e);
    }
    if a.batch_size == 0 {
        return usage("--batch-size must be at least 1");
    }
    let model = match &a.model {
        None => None,
        Some(m) => {
            let graph = crate::runtime::onnx::load(m)?;
            let cp = card_path(m);
            if !cp.exists() {
                bail!(
                    "{}: the model services need its card {}",
                    m.display(),
                    cp.display()
                );
            }
            let card = ModelCard::load(&cp)?;
            let logits_output = card.logits_index(&graph)?;
            Some(RunModel {
                graph,
                card,
                logits_output,
            })
        }
    };
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let backend = select::select(select::resolve_choice(a.backend)?)?;
    eprintln!("backend: {}", backend.describe());
    let opts = RunOptions {
        params,
        out_dir: a.out.clone(),
        label: a.label,
        target: a.target,
        seed: a.seed,
        batch_size: a.batch_size,
        model,
        limits: DecodeLimits::default(),
    };
    crate::with_backend!(&backend, |b| run_on(b, handle, &a.files, &opts))
}

fn run_on<B: PluginBackend>(
    b: &B,
    handle: std::sync::Arc<crate::plugin::PluginHandle>,
    files: &[PathBuf],
    opts: &RunOptions,
) -> anyhow::Result<ExitCode> {
    let mut instance = match Instance::create(handle, &opts.params, b) {
        Ok(i) => i,
        Err(e) => return usage(e),
    };
    let report = runner::run_files(b, &mut instance, files, opts);
    drop(instance);
    runner::write_report(&opts.out_dir, &report).with_context(|| {
        format!(
            "cannot write the result files in {}",
            opts.out_dir.display()
        )
    })?;
    let mut out = std::io::stdout().lock();
    for r in &report.rows {
        writeln!(out, "{}", serde_json::to_string(r)?)?;
        if let Some(e) = &r.error {
            eprintln!("adverse plugins run: {}: {e}", r.file);
        }
    }
    Ok(ExitCode::from(if report.failed_files > 0 {
        exit::SOME_FAILED
    } else {
        exit::OK
    }))
}

// ---- scaffolding ---------------------------------------------------------------------------------

fn default_sdk_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ADVERSE_SDK_PATH") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("plugins")
        .join("sdk");
    p.canonicalize().ok()
}

fn camel(name: &str) -> String {
    name.split(['-', '_'])
        .filter(|s| !s.is_empty())
        .map(|s| {
            let mut c = s.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn scaffold(
    name: &str,
    kind: ScaffoldKind,
    dir: &Path,
    sdk: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        || name.starts_with(|c: char| c.is_ascii_digit())
    {
        return usage(format!(
            "plugin name {name:?}: use [a-z0-9_-], starting with a letter"
        ));
    }
    let Some(sdk) = sdk.or_else(default_sdk_path) else {
        return usage(
            "cannot find the adverse-plugin-sdk crate: give --sdk-path or set ADVERSE_SDK_PATH",
        );
    };
    if !sdk.join("Cargo.toml").exists() {
        return usage(format!(
            "{} is not the adverse-plugin-sdk crate (no Cargo.toml)",
            sdk.display()
        ));
    }
    let root = dir.join(name);
    if root.exists() {
        return usage(format!("{} already exists", root.display()));
    }
    std::fs::create_dir_all(root.join("src"))
        .with_context(|| format!("cannot create {}", root.display()))?;
    let sdk_str = sdk.display().to_string().replace('\\', "/");
    let ty = camel(name);
    let files = [
        ("Cargo.toml", cargo_toml(name, &sdk_str)),
        ("src/lib.rs", lib_rs(name, &ty, kind)),
        ("README.md", readme(name, kind, &sdk_str)),
        (".gitignore", "/target\n".to_string()),
    ];
    for (rel, text) in files {
        std::fs::write(root.join(rel), text)
            .with_context(|| format!("cannot write {}", root.join(rel).display()))?;
    }
    println!(
        "created {} ({} plugin `{name}`, SDK at {sdk_str})",
        root.display(),
        kind_name(kind)
    );
    Ok(ExitCode::SUCCESS)
}

fn kind_name(k: ScaffoldKind) -> &'static str {
    match k {
        ScaffoldKind::Attack => "attack",
        ScaffoldKind::Purifier => "purifier",
        ScaffoldKind::Detector => "detector",
    }
}

fn readme(name: &str, kind: ScaffoldKind, sdk: &str) -> String {
    let lib = format!(
        "{}{}.{}",
        std::env::consts::DLL_PREFIX,
        name.replace('-', "_"),
        std::env::consts::DLL_EXTENSION
    );
    format!(
        "# {name}\n\nAn adverse {} plugin. `cargo test` runs it in-process against the SDK's test host;\n`cargo build` makes `target/debug/{lib}`, which the host loads with\n`adverse plugins run {name} --plugin-dir target/debug --out OUT FILE.dcm`.\nSee the SDK tutorial: {sdk}/README.md\n",
        kind_name(kind)
    )
}

fn cargo_toml(name: &str, sdk: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

# Its own workspace, so it builds wherever it is created.
[workspace]

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
adverse-plugin-sdk = {{ path = "{sdk}" }}
serde = {{ version = "1", features = ["derive"] }}

[dev-dependencies]
adverse-plugin-sdk = {{ path = "{sdk}", features = ["testing"] }}
serde_json = "1"
"#
    )
}

fn lib_rs(name: &str, ty: &str, kind: ScaffoldKind) -> String {
    let body = match kind {
        ScaffoldKind::Attack => ATTACK_TEMPLATE,
        ScaffoldKind::Purifier => PURIFIER_TEMPLATE,
        ScaffoldKind::Detector => DETECTOR_TEMPLATE,
    };
    body.replace("__NAME__", name).replace("__TYPE__", ty)
}

const ATTACK_TEMPLATE: &str = r##"//! `__NAME__`: an adverse attack plugin (starter: uniform random noise in an L-inf ball).
//! Replace the body of `attack` with your method; the host services are on `batch.host()`.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Attack, Batch, Host, Norm, PluginInfo, Result, Tensor, export_plugins};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct Params {
    /// Largest change per stored value.
    pub eps: f32,
}

#[derive(Debug)]
pub struct __TYPE__ {
    eps: f32,
}

impl PluginInfo for __TYPE__ {
    const NAME: &'static str = "__NAME__";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Random noise within eps stored units (starter attack)";
    type Params = Params;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"eps":{"type":"number","minimum":0}},"required":["eps"],"additionalProperties":false}"#
    }
    fn create(p: Params, _host: &Host<'_>) -> Result<Self> {
        Ok(__TYPE__ { eps: p.eps })
    }
}

impl Attack for __TYPE__ {
    fn attack(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let h = batch.host();
        let x = batch.input();
        let noise = h.random_uniform(&h.shape(x)?, -self.eps, self.eps, 0)?;
        let adv = h.clip_to_range(h.axpby(1.0, x, 1.0, noise)?)?;
        let d = h.axpby(1.0, adv, -1.0, x)?;
        for (i, n) in h.norm_per_sample(d, Norm::Linf)?.iter().enumerate() {
            batch.audit_number(i, "linf_change", f64::from(*n))?;
        }
        Ok(adv)
    }
}

export_plugins!(attack: __TYPE__);

#[cfg(test)]
mod tests {
    use super::*;
    use adverse_plugin_sdk::testing::{self, TestHost};
    use serde_json::json;

    #[test]
    fn stays_within_eps_and_the_stored_range() {
        let x: Vec<f32> = (0..16).map(|i| (i * 270) as f32).collect();
        let mut host = TestHost::new(vec![TestHost::frame(4, 4)]).with_seed(7);
        let out = testing::run(adverse_plugin_library(), "__NAME__", &json!({"eps": 8.0}), &mut host, &x, [1, 1, 4, 4]).unwrap();
        let y = out.output.unwrap();
        assert!(y.iter().zip(&x).all(|(a, b)| (a - b).abs() <= 8.0 && (0.0..=4095.0).contains(a)));
        assert!(y != x, "the attack must change something");
        assert!(out.audit[0]["linf_change"].as_f64().unwrap() <= 8.0);
    }
}
"##;

const PURIFIER_TEMPLATE: &str = r##"//! `__NAME__`: an adverse purifier plugin (starter: median filter).
//! Replace the body of `purify` with your method; the host services are on `batch.host()`.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Batch, Host, PluginInfo, Purifier, Result, Tensor, export_plugins};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct Params {
    #[serde(default = "default_radius")]
    pub radius: u32,
}

fn default_radius() -> u32 {
    1
}

#[derive(Debug)]
pub struct __TYPE__ {
    radius: u32,
}

impl PluginInfo for __TYPE__ {
    const NAME: &'static str = "__NAME__";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Median filter (starter purifier)";
    type Params = Params;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"radius":{"type":"integer","minimum":1,"maximum":8}},"additionalProperties":false}"#
    }
    fn create(p: Params, _host: &Host<'_>) -> Result<Self> {
        Ok(__TYPE__ { radius: p.radius })
    }
}

impl Purifier for __TYPE__ {
    fn purify(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let y = batch.host().median_filter(batch.input(), self.radius)?;
        for i in 0..batch.len() {
            batch.audit_flag(i, "purified", true)?;
        }
        Ok(y)
    }
}

export_plugins!(purifier: __TYPE__);

#[cfg(test)]
mod tests {
    use super::*;
    use adverse_plugin_sdk::testing::{self, TestHost};
    use serde_json::json;

    #[test]
    fn removes_an_impulse() {
        let mut x = vec![50f32; 25];
        x[12] = 4000.0;
        let mut host = TestHost::new(vec![TestHost::frame(5, 5)]);
        let out = testing::run(adverse_plugin_library(), "__NAME__", &json!({}), &mut host, &x, [1, 1, 5, 5]).unwrap();
        assert_eq!(out.output.unwrap(), vec![50f32; 25]);
        assert_eq!(out.audit[0]["purified"], json!(true));
    }
}
"##;

const DETECTOR_TEMPLATE: &str = r##"//! `__NAME__`: an adverse detector plugin (starter: flags frames with many saturated values).
//! Replace the body of `detect` with your method; the host services are on `batch.host()`.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Batch, Detector, Host, PluginInfo, Result, export_plugins};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct Params {
    /// Fraction of values at the stored range's ends above which a frame is flagged.
    pub threshold: f64,
}

#[derive(Debug)]
pub struct __TYPE__ {
    threshold: f64,
}

impl PluginInfo for __TYPE__ {
    const NAME: &'static str = "__NAME__";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Saturated-value fraction (starter detector)";
    type Params = Params;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"threshold":{"type":"number","minimum":0,"maximum":1}},"required":["threshold"],"additionalProperties":false}"#
    }
    fn create(p: Params, _host: &Host<'_>) -> Result<Self> {
        Ok(__TYPE__ { threshold: p.threshold })
    }
}

impl Detector for __TYPE__ {
    fn detect(&mut self, batch: &Batch<'_>) -> Result<()> {
        let h = batch.host();
        let x = h.download(batch.input())?;
        let per = x.len() / batch.len().max(1);
        for (i, frame) in x.chunks(per.max(1)).enumerate() {
            let (lo, hi) = batch.meta(i)?.value_range;
            let sat = frame.iter().filter(|&&v| f64::from(v) <= lo || f64::from(v) >= hi).count() as f64 / frame.len() as f64;
            batch.audit_number(i, "saturated_fraction", sat)?;
            batch.audit_flag(i, "suspicious", sat > self.threshold)?;
        }
        Ok(())
    }
}

export_plugins!(detector: __TYPE__);

#[cfg(test)]
mod tests {
    use super::*;
    use adverse_plugin_sdk::testing::{self, TestHost};
    use serde_json::json;

    #[test]
    fn flags_the_saturated_frame_only() {
        let mut x = vec![100f32; 8];
        x[4..8].copy_from_slice(&[4095.0, 4095.0, 0.0, 7.0]);
        let mut host = TestHost::new(vec![TestHost::frame(2, 2), TestHost::frame(2, 2)]);
        let out = testing::run(adverse_plugin_library(), "__NAME__", &json!({"threshold": 0.5}), &mut host, &x, [2, 1, 2, 2]).unwrap();
        assert!(out.output.is_none());
        assert_eq!(out.audit[0]["suspicious"], json!(false));
        assert_eq!(out.audit[1]["saturated_fraction"], json!(0.75));
        assert_eq!(out.audit[1]["suspicious"], json!(true));
    }
}
"##;
