//! Shared by the demo-model tests and the `detector_eval` example: the demo model and samples,
//! and plugins run in-process through the adverse host (the real host services table and model
//! service, on the CPU backend).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use adverse::dicom::{DecodeLimits, DicomFile};
use adverse::plugin::host::Instance;
use adverse::plugin::runner::{MemoryRunner, RunModel, frame_meta};
use adverse::plugin::{PluginHandle, PluginLibrary};
use adverse::runtime::card::{ModelCard, card_path};
use adverse::runtime::cpu::CpuBackend;
use adverse_plugin_sdk::FrameMeta;
use adverse_plugin_sdk::abi::AdvLibrary;
use serde_json::Value;

pub type Audit = BTreeMap<String, Value>;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `pipelines/models/<name>.onnx` with its card.
pub fn load_model(name: &str) -> RunModel {
    let path = repo_root()
        .join("pipelines/models")
        .join(format!("{name}.onnx"));
    let graph = adverse::runtime::onnx::load(&path).expect("load the demo model");
    let card = ModelCard::load(&card_path(&path)).expect("load the demo card");
    let logits_output = card.logits_index(&graph).expect("logits output");
    RunModel {
        graph,
        card,
        logits_output,
    }
}

/// Frames of one size: stored values `[n, 1, h, w]`, descriptions and labels.
#[derive(Debug, Clone)]
pub struct Frames {
    pub data: Vec<f32>,
    pub metas: Vec<FrameMeta>,
    pub hw: [usize; 2],
}

impl Frames {
    pub fn len(&self) -> usize {
        self.metas.len()
    }
    pub fn per(&self) -> usize {
        self.hw[0] * self.hw[1]
    }
    pub fn labels(&self) -> Vec<u32> {
        self.metas.iter().map(|m| m.label.unwrap_or(0)).collect()
    }
    /// The same frames with other stored values.
    pub fn with_data(&self, data: Vec<f32>) -> Frames {
        Frames {
            data,
            metas: self.metas.clone(),
            hw: self.hw,
        }
    }
}

/// The first `limit` demo samples (pipelines/samples/pneumoniamnist, 8-bit DICOM) with their
/// labels from labels.csv.
pub fn load_samples(limit: usize) -> Frames {
    let dir = repo_root().join("pipelines/samples/pneumoniamnist");
    let csv = std::fs::read_to_string(dir.join("labels.csv")).expect("labels.csv");
    let mut data = Vec::new();
    let mut metas = Vec::new();
    let mut hw = [0, 0];
    for line in csv.lines().skip(1).take(limit) {
        let cols: Vec<&str> = line.split(',').collect();
        let label: u32 = cols[2].trim().parse().expect("label");
        let limits = DecodeLimits::default();
        let f = DicomFile::open(&dir.join(cols[0]), &limits).expect("open sample");
        let img = f.decode(&limits).expect("decode sample");
        hw = [img.meta.rows as usize, img.meta.cols as usize];
        data.extend(img.frame_f32(0).expect("frame 0"));
        metas.push(frame_meta(&img.meta, 0, Some(label), None));
    }
    Frames { data, metas, hw }
}

/// PneumoniaMNIST test images `skip..skip+limit` from tests/data (the 64 demo samples are test
/// images 0..64), described like the demo samples (8-bit MONOCHROME2 28x28).
pub fn load_npz_test(skip: usize, limit: usize) -> Frames {
    load_npz_split("test", skip, limit)
}

/// PneumoniaMNIST images `skip..skip+limit` of `split` (train, val or test), described like the
/// demo samples.
pub fn load_npz_split(split: &str, skip: usize, limit: usize) -> Frames {
    let template = load_samples(1).metas[0].clone();
    let path = repo_root().join("tests/data/pneumoniamnist/pneumoniamnist.npz");
    let mut npz = npyz::npz::NpzArchive::open(&path).expect("open the npz");
    let images: Vec<u8> = npz
        .by_name(&format!("{split}_images"))
        .expect("read")
        .expect("images")
        .into_vec()
        .expect("u8 images");
    let labels: Vec<u8> = npz
        .by_name(&format!("{split}_labels"))
        .expect("read")
        .expect("labels")
        .into_vec()
        .expect("u8 labels");
    let per = 28 * 28;
    let n = labels.len().saturating_sub(skip).min(limit);
    let mut metas = Vec::with_capacity(n);
    for i in skip..skip + n {
        let mut m = template.clone();
        m.label = Some(u32::from(labels[i]));
        metas.push(m);
    }
    Frames {
        data: images[skip * per..(skip + n) * per]
            .iter()
            .map(|&v| f32::from(v))
            .collect(),
        metas,
        hw: [28, 28],
    }
}

/// The attack catalogue, built as a library (cargo build, in this binary's profile) and loaded
/// like any plugin library; the directory must outlive the handles.
pub fn attack_library() -> (tempfile::TempDir, Vec<Arc<PluginHandle>>) {
    let dir = adverse_tests::plugin_dir(&["adverse-plugins-attacks"], &["adverse_plugins_attacks"]);
    let file = format!(
        "{}adverse_plugins_attacks{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let handles = PluginLibrary::open(&dir.path().join(file)).expect("load the attack library");
    (dir, handles.into_iter().map(Arc::new).collect())
}

/// Creates plugin `name` from loaded handles.
pub fn instance_from(
    handles: &[Arc<PluginHandle>],
    name: &str,
    params: &Value,
    backend: &CpuBackend,
) -> Instance {
    let h = handles
        .iter()
        .find(|h| h.name == name)
        .unwrap_or_else(|| panic!("no plugin {name}"));
    Instance::create(h.clone(), params, backend).unwrap_or_else(|e| panic!("create {name}: {e}"))
}

/// Creates plugin `name` from an in-process library table.
pub fn instance(
    label: &str,
    lib: &'static AdvLibrary,
    name: &str,
    params: &Value,
    backend: &CpuBackend,
) -> Instance {
    let handles: Vec<PluginHandle> = PluginLibrary::in_process(label, lib).expect("plugin table");
    let h = handles
        .into_iter()
        .find(|h| h.name == name)
        .unwrap_or_else(|| panic!("no plugin {name}"));
    Instance::create(Arc::new(h), params, backend).unwrap_or_else(|e| panic!("create {name}: {e}"))
}

/// Runs `frames` through `inst` in batches of `batch`: the concatenated output (or the input
/// where the plugin set none) and the audit values per frame.
pub fn run_batched(
    runner: &mut MemoryRunner<'_, CpuBackend>,
    backend: &CpuBackend,
    inst: &mut Instance,
    frames: &Frames,
    batch: usize,
    seed: u64,
) -> (Vec<f32>, Vec<Audit>) {
    let per = frames.per();
    let mut out = Vec::with_capacity(frames.data.len());
    let mut audits = Vec::with_capacity(frames.len());
    for (b, start) in (0..frames.len()).step_by(batch).enumerate() {
        let end = (start + batch).min(frames.len());
        let data = &frames.data[start * per..end * per];
        let (o, a) = runner
            .process(
                backend,
                inst,
                data,
                [end - start, 1, frames.hw[0], frames.hw[1]],
                frames.metas[start..end].to_vec(),
                seed.wrapping_add(b as u64),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        out.extend(o.unwrap_or_else(|| data.to_vec()));
        audits.extend(a);
    }
    (out, audits)
}

pub fn num(a: &Audit, key: &str) -> f64 {
    a.get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("audit {key}: {a:?}"))
}

pub fn flag(a: &Audit, key: &str) -> bool {
    a.get(key)
        .and_then(Value::as_bool)
        .unwrap_or_else(|| panic!("audit {key}: {a:?}"))
}
