//! The minimal plugin runner (`adverse plugins run`), written so the pipeline engine can reuse
//! it: decode files, group frames of equal geometry into batches, one `process` call per batch,
//! derived DICOM for every file whose frames all succeeded, and one result row per frame with
//! the plugin's audit values. A failing or panicking plugin fails that batch's files only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use adverse_plugin_sdk::{FrameMeta, cpu};
use serde::Serialize;
use serde_json::Value;

use super::host::{BatchInput, BatchModel, Instance, PluginBackend};
use crate::dicom::{
    DecodeLimits, DecodedImage, DerivedOptions, DicomFile, ImageMeta, PixelKind, write_derived,
};
use crate::runtime::backend::{Backend, LossTargets, Tensor};
use crate::runtime::card::ModelCard;
use crate::runtime::ir::Graph;
use crate::runtime::loss::LossSpec;
use crate::runtime::preprocess::{FrameConsts, FrameParams, Pipeline, WindowSpec};

/// A model with its card, as given to a run.
#[derive(Debug)]
pub struct RunModel {
    pub graph: Graph,
    pub card: ModelCard,
    pub logits_output: usize,
}

#[derive(Debug)]
pub struct RunOptions {
    pub params: Value,
    pub out_dir: PathBuf,
    /// True class of every frame (for untargeted attacks).
    pub label: Option<u32>,
    /// Target class of every frame (for targeted attacks).
    pub target: Option<u32>,
    pub seed: u64,
    pub batch_size: usize,
    pub model: Option<RunModel>,
    pub limits: DecodeLimits,
}

/// One frame's result (or one file's, when it could not be decoded: `frame` is None).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ResultRow {
    pub file: String,
    pub frame: Option<u32>,
    pub plugin: String,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_sha256: Option<String>,
    pub values: BTreeMap<String, Value>,
}

/// The audit record of one file: what ran, on what, with which parameters, and what it wrote.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub file: String,
    pub plugin: String,
    pub plugin_version: String,
    pub plugin_kind: String,
    pub library: String,
    pub library_sha256: String,
    pub abi: String,
    pub params: Value,
    pub backend: String,
    pub seed: u64,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_sha256: Option<String>,
    pub frames: Vec<BTreeMap<String, Value>>,
}

/// What a run produced.
#[derive(Debug, Default)]
pub struct RunReport {
    pub rows: Vec<ResultRow>,
    pub audit: Vec<AuditRecord>,
    pub failed_files: usize,
}

struct FileState {
    path: PathBuf,
    src: Option<DicomFile>,
    image: Option<DecodedImage>,
    error: Option<String>,
    changed: bool,
    values: Vec<BTreeMap<String, Value>>,
}

/// The frame description a plugin sees.
pub fn frame_meta(
    m: &ImageMeta,
    frame_index: u32,
    label: Option<u32>,
    target: Option<u32>,
) -> FrameMeta {
    FrameMeta {
        rows: m.rows,
        cols: m.cols,
        samples_per_pixel: u32::from(m.samples_per_pixel),
        bits_allocated: u32::from(m.bits_allocated),
        bits_stored: u32::from(m.bits_stored),
        signed: m.is_signed(),
        float: m.kind != PixelKind::Integer,
        frame_index,
        rescale_slope: m.rescale_slope,
        rescale_intercept: m.rescale_intercept,
        window: m
            .window_center
            .first()
            .copied()
            .zip(m.window_width.first().copied()),
        value_range: m.value_range(),
        label,
        target,
        modality: m.modality.clone().unwrap_or_default(),
    }
}

/// Interleaved `[H, W, C]` -> planar `[C, H, W]`.
pub(crate) fn to_planar(v: &[f32], c: usize) -> Vec<f32> {
    if c == 1 {
        return v.to_vec();
    }
    let px = v.len() / c;
    let mut out = vec![0f32; v.len()];
    for p in 0..px {
        for ch in 0..c {
            out[ch * px + p] = v[p * c + ch];
        }
    }
    out
}

pub(crate) fn to_interleaved(v: &[f32], c: usize) -> Vec<f32> {
    if c == 1 {
        return v.to_vec();
    }
    let px = v.len() / c;
    let mut out = vec![0f32; v.len()];
    for p in 0..px {
        for ch in 0..c {
            out[p * c + ch] = v[ch * px + p];
        }
    }
    out
}

/// The model service for one batch: the card's preprocessing + the model, with the batch's
/// per-frame constants; or the reason it cannot run on these frames.
pub(crate) enum ModelService<'p, B: Backend> {
    Ready {
        pipe: &'p Pipeline<B>,
        consts: FrameConsts<B>,
        /// The card's `features` value name.
        feature: Option<&'p str>,
        /// sha256 of the imported graph, computed on first use.
        id: &'p std::sync::OnceLock<String>,
        graph: &'p Graph,
    },
    Broken(String),
}

/// The batch constants repeated for `rows` rows when that is a whole multiple (> 1) of the
/// batch's frames (row `r` takes frame `r mod N`'s constants); `None` when no tiling is needed.
fn tiled_consts<B: Backend>(
    b: &B,
    consts: &FrameConsts<B>,
    rows: usize,
) -> Result<Option<FrameConsts<B>>, String> {
    let n = consts.a.shape.first().copied().unwrap_or(0);
    if rows == n {
        return Ok(None);
    }
    if n == 0 || !rows.is_multiple_of(n) {
        return Err(format!(
            "the model service takes the batch's {n} frames or a whole multiple of them, got {rows} rows"
        ));
    }
    let tile = |t: &Tensor<B>| {
        let v = b.download(t);
        let rep: Vec<f32> = v.iter().copied().cycle().take(rows).collect();
        b.upload(&rep, &[rows, 1, 1, 1])
    };
    Ok(Some(FrameConsts {
        a: tile(&consts.a),
        b: tile(&consts.b),
    }))
}

impl<B: Backend> BatchModel<B> for ModelService<'_, B> {
    fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>, String> {
        match self {
            ModelService::Ready { pipe, consts, .. } => {
                let rows = x.shape.first().copied().unwrap_or(0);
                let tiled = tiled_consts(b, consts, rows)?;
                let outs = pipe
                    .forward(b, x, tiled.as_ref().unwrap_or(consts))
                    .map_err(|e| e.to_string())?;
                outs.into_iter()
                    .nth(pipe.model.logits_output)
                    .ok_or_else(|| "the model has no logits output".to_string())
            }
            ModelService::Broken(m) => Err(m.clone()),
        }
    }
    fn loss_grad(
        &self,
        b: &B,
        x: &Tensor<B>,
        spec: LossSpec,
        targets: &[u32],
    ) -> Result<(Vec<f32>, Tensor<B>), String> {
        match self {
            ModelService::Ready { pipe, consts, .. } => {
                let (l, g, _) = pipe
                    .loss_and_stored_grad(b, x, consts, spec, &LossTargets::Classes(targets))
                    .map_err(|e| e.to_string())?;
                Ok((l, g))
            }
            ModelService::Broken(m) => Err(m.clone()),
        }
    }
    fn vjp(&self, b: &B, x: &Tensor<B>, dz: &Tensor<B>) -> Result<(Tensor<B>, Tensor<B>), String> {
        match self {
            ModelService::Ready { pipe, consts, .. } => {
                let (_, g, z) = pipe
                    .loss_and_stored_grad(b, x, consts, LossSpec::Dense, &LossTargets::Dense(dz))
                    .map_err(|e| e.to_string())?;
                Ok((z, g))
            }
            ModelService::Broken(m) => Err(m.clone()),
        }
    }
    fn input_scale(&self, b: &B) -> Result<Vec<f64>, String> {
        match self {
            ModelService::Ready { pipe, consts, .. } => {
                let spec = &pipe.spec;
                // `a` is the per-frame affine before the window clip; the card's scale follows
                // the clip when windowing (it is already folded into `a` otherwise), then the
                // normalisation divides by std (one value when the channels are replicated).
                let after_clip = match spec.window {
                    WindowSpec::Fixed { .. } | WindowSpec::FromDicom => f64::from(spec.scale),
                    WindowSpec::MinMax | WindowSpec::None => 1.0,
                };
                let std = match spec.std.first() {
                    None => 1.0,
                    Some(&s0) if spec.std.iter().all(|&s| s == s0) => f64::from(s0),
                    Some(_) => {
                        return Err(format!(
                            "the card normalises channels with different std {:?}: no single input scale",
                            spec.std
                        ));
                    }
                };
                Ok(b.download(&consts.a)
                    .iter()
                    .map(|&a| f64::from(a) * after_clip / std)
                    .collect())
            }
            ModelService::Broken(m) => Err(m.clone()),
        }
    }
    fn features(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>, String> {
        match self {
            ModelService::Ready {
                pipe,
                consts,
                feature,
                ..
            } => {
                let rows = x.shape.first().copied().unwrap_or(0);
                let tiled = tiled_consts(b, consts, rows)?;
                pipe.features(b, x, tiled.as_ref().unwrap_or(consts), *feature)
            }
            ModelService::Broken(m) => Err(m.clone()),
        }
    }
    fn features_vjp(&self, b: &B, x: &Tensor<B>, df: &Tensor<B>) -> Result<Tensor<B>, String> {
        match self {
            ModelService::Ready {
                pipe,
                consts,
                feature,
                ..
            } => pipe.features_vjp(b, x, consts, *feature, df),
            ModelService::Broken(m) => Err(m.clone()),
        }
    }
    fn head(&self, b: &B, f: &Tensor<B>) -> Result<Tensor<B>, String> {
        match self {
            ModelService::Ready { pipe, feature, .. } => pipe.head(b, f, *feature),
            ModelService::Broken(m) => Err(m.clone()),
        }
    }
    fn model_id(&self) -> Result<String, String> {
        match self {
            ModelService::Ready { id, graph, .. } => {
                Ok(id.get_or_init(|| graph_sha256(graph)).clone())
            }
            ModelService::Broken(m) => Err(m.clone()),
        }
    }
}

/// sha256 (hex) of an imported graph: its ops, wiring, value shapes and parameters. Equal for
/// the same model file, different for any change of weights or architecture; independent of
/// where the file lives. What fitted detector states record to refuse another model.
pub fn graph_sha256(g: &Graph) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"adverse-graph-v1\0");
    for v in &g.values {
        h.update(format!("{}|{:?}|{:?}|{};", v.name, v.kind, v.shape, v.batched).as_bytes());
    }
    for n in &g.nodes {
        h.update(format!("{:?}|{:?}|{};", n.op, n.inputs, n.output).as_bytes());
    }
    for p in &g.params {
        h.update(format!("{}|{:?}|", p.name, p.shape).as_bytes());
        for x in &p.data {
            h.update(x.to_le_bytes());
        }
    }
    h.update(format!("{:?}{:?}", g.inputs, g.outputs).as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Preprocessing + model pipelines per frame size, built on first use: the model service of
/// every batch, for the runner and the pipeline engine.
pub(crate) struct ModelCache<'m, B: Backend> {
    model: &'m RunModel,
    pipes: HashMap<[usize; 2], Result<Pipeline<B>, String>>,
    id: std::sync::OnceLock<String>,
}

impl<'m, B: Backend> ModelCache<'m, B> {
    pub(crate) fn new(model: &'m RunModel) -> Self {
        ModelCache {
            model,
            pipes: HashMap::new(),
            id: std::sync::OnceLock::new(),
        }
    }

    /// The service for a batch of `[n, c, h, w]` stored values `data` with frame descriptions
    /// `metas`; a broken service (wrong channel count, a size the model cannot take) carries
    /// its reason, reported when a plugin calls it.
    pub(crate) fn service(
        &mut self,
        backend: &B,
        [c, h, w]: [usize; 3],
        data: &[f32],
        metas: &[FrameMeta],
    ) -> ModelService<'_, B> {
        if c != 1 {
            return ModelService::Broken(format!(
                "the model's preprocessing takes 1-sample frames, these have {c}"
            ));
        }
        let m = self.model;
        let id = &self.id;
        let entry = self.pipes.entry([h, w]).or_insert_with(|| {
            Pipeline::new(
                backend,
                m.card.preprocess.clone(),
                &m.graph,
                [h, w],
                m.logits_output,
            )
            .map_err(|e| e.to_string())
        });
        match entry {
            Err(e) => ModelService::Broken(e.clone()),
            Ok(pipe) => {
                let params: Vec<FrameParams> = metas
                    .iter()
                    .map(|f| FrameParams {
                        slope: f.rescale_slope,
                        intercept: f.rescale_intercept,
                        window: f.window,
                    })
                    .collect();
                match pipe.frame_consts(backend, data, &params) {
                    Ok(consts) => ModelService::Ready {
                        pipe,
                        consts,
                        feature: m.card.features.as_deref(),
                        id,
                        graph: &m.graph,
                    },
                    Err(e) => ModelService::Broken(e.to_string()),
                }
            }
        }
    }
}

/// Runs batches of frames held in memory through plugin instances with a model's services:
/// for evaluations and tests that craft, score and compare frames without writing DICOM
/// (the same model service as [`run_files`] and the pipeline engine).
pub struct MemoryRunner<'m, B: Backend> {
    cache: Option<ModelCache<'m, B>>,
}

impl<B: Backend> std::fmt::Debug for MemoryRunner<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRunner")
            .field("model", &self.cache.is_some())
            .finish()
    }
}

impl<'m, B: PluginBackend> MemoryRunner<'m, B> {
    pub fn new(model: Option<&'m RunModel>) -> Self {
        MemoryRunner {
            cache: model.map(ModelCache::new),
        }
    }

    /// One `process` call on `[n, c, h, w]` stored values `data` with one description per
    /// frame: the stored values the plugin set (if any) and its audit values per frame.
    pub fn process(
        &mut self,
        backend: &B,
        instance: &mut Instance,
        data: &[f32],
        shape: [usize; 4],
        frames: Vec<FrameMeta>,
        seed: u64,
    ) -> Result<(Option<Vec<f32>>, Vec<BTreeMap<String, Value>>), super::PluginError> {
        let [n, c, h, w] = shape;
        let contract = |message: String| super::PluginError::Contract {
            plugin: instance.handle().name.clone(),
            message,
        };
        if frames.len() != n || data.len() != n * c * h * w {
            return Err(contract(format!(
                "{} frame descriptions and {} values for shape {shape:?}",
                frames.len(),
                data.len()
            )));
        }
        let service = self
            .cache
            .as_mut()
            .map(|m| m.service(backend, [c, h, w], data, &frames));
        let input = backend.upload(data, &shape);
        let out = instance.process(BatchInput {
            backend,
            frames,
            input,
            model: service.as_ref().map(|s| s as &dyn BatchModel<B>),
            seed,
        })?;
        Ok((out.output.map(|t| backend.download(&t)), out.audit))
    }
}

/// The seed of batch `index` for plugin `name`: distinct per plugin and batch, fixed per run seed.
pub fn batch_seed(run_seed: u64, plugin: &str, index: u64) -> u64 {
    let h = plugin.bytes().fold(0xcbf2_9ce4_8422_2325u64, |a, b| {
        (a ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    cpu::stream_seed(run_seed ^ h, index)
}

fn unique_name(stem: &str, used: &mut HashSet<String>) -> String {
    let mut name = format!("{stem}.dcm");
    let mut i = 1;
    while !used.insert(name.clone()) {
        name = format!("{stem}-{i}.dcm");
        i += 1;
    }
    name
}

/// Runs `instance` over `files` on `backend`; never fails as a whole: per-file problems are in
/// the rows. The caller writes the rows and audit records.
pub fn run_files<B: PluginBackend>(
    backend: &B,
    instance: &mut Instance,
    files: &[PathBuf],
    opts: &RunOptions,
) -> RunReport {
    let plugin = instance.handle().name.clone();
    let mut states: Vec<FileState> = files
        .iter()
        .map(|p| {
            let decoded = DicomFile::open(p, &opts.limits).and_then(|f| {
                let img = f.decode(&opts.limits)?;
                Ok((f, img))
            });
            match decoded {
                Ok((f, img)) => {
                    let n = img.frame_count();
                    FileState {
                        path: p.clone(),
                        src: Some(f),
                        image: Some(img),
                        error: None,
                        changed: false,
                        values: vec![BTreeMap::new(); n],
                    }
                }
                Err(e) => FileState {
                    path: p.clone(),
                    src: None,
                    image: None,
                    error: Some(e.to_string()),
                    changed: false,
                    values: Vec::new(),
                },
            }
        })
        .collect();

    // Frames grouped by geometry (samples, rows, cols), in file order within a group.
    let mut groups: BTreeMap<(u16, u32, u32), Vec<(usize, usize)>> = BTreeMap::new();
    for (fi, s) in states.iter().enumerate() {
        if let Some(img) = &s.image {
            let m = &img.meta;
            for k in 0..img.frame_count() {
                groups
                    .entry((m.samples_per_pixel, m.rows, m.cols))
                    .or_default()
                    .push((fi, k));
            }
        }
    }

    let mut cache = opts.model.as_ref().map(ModelCache::new);
    let mut batch_index = 0u64;
    for ((spp, rows, cols), frames) in groups {
        let (c, h, w) = (spp as usize, rows as usize, cols as usize);
        for chunk in frames.chunks(opts.batch_size.max(1)) {
            // Frames of files that already failed are not worth processing.
            let chunk: Vec<(usize, usize)> = chunk
                .iter()
                .copied()
                .filter(|(fi, _)| states[*fi].error.is_none())
                .collect();
            if chunk.is_empty() {
                continue;
            }
            let n = chunk.len();
            let mut data = Vec::with_capacity(n * c * h * w);
            let mut metas = Vec::with_capacity(n);
            for &(fi, k) in &chunk {
                let img = states[fi]
                    .image
                    .as_ref()
                    .expect("decoded files have an image");
                let v = img.frame_f32(k).unwrap_or_default();
                data.extend(to_planar(&v, c));
                metas.push(frame_meta(&img.meta, k as u32, opts.label, opts.target));
            }
            let input = backend.upload(&data, &[n, c, h, w]);
            let service: Option<ModelService<'_, B>> = cache
                .as_mut()
                .map(|m| m.service(backend, [c, h, w], &data, &metas));
            let seed = batch_seed(opts.seed, &plugin, batch_index);
            batch_index += 1;
            let result = instance.process(BatchInput {
                backend,
                frames: metas,
                input,
                model: service.as_ref().map(|s| s as &dyn BatchModel<B>),
                seed,
            });
            match result {
                Err(e) => {
                    let msg = e.to_string();
                    tracing::warn!("{msg}");
                    for &(fi, _) in &chunk {
                        states[fi].error.get_or_insert_with(|| msg.clone());
                    }
                }
                Ok(out) => {
                    let new_values = out.output.as_ref().map(|t| backend.download(t));
                    for (j, &(fi, k)) in chunk.iter().enumerate() {
                        let st = &mut states[fi];
                        st.values[k] = out.audit.get(j).cloned().unwrap_or_default();
                        if let (Some(v), Some(img)) = (&new_values, st.image.as_mut()) {
                            let per = c * h * w;
                            let frame = to_interleaved(&v[j * per..(j + 1) * per], c);
                            if img.set_frame_f32(k, &frame) {
                                st.changed = true;
                            }
                        }
                    }
                }
            }
        }
    }

    let handle = instance.handle().clone();
    let params_text = opts.params.to_string();
    let pipeline_id = format!("plugin:{}@{}:{}", handle.name, handle.version, params_text);
    let mut used = HashSet::new();
    let mut report = RunReport::default();
    for st in &mut states {
        let mut output = None;
        if st.error.is_none()
            && st.changed
            && let (Some(src), Some(img)) = (&st.src, &st.image)
        {
            let stem = st
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "out".into());
            let out_path = opts.out_dir.join(unique_name(&stem, &mut used));
            let dopts = DerivedOptions {
                pipeline_id: pipeline_id.clone(),
                derivation_description: format!(
                    "adverse {}: plugin {} {} ({}) {params_text}",
                    env!("CARGO_PKG_VERSION"),
                    handle.name,
                    handle.version,
                    handle.kind
                ),
            };
            match write_derived(src, img, &dopts, &out_path) {
                Ok(info) => output = Some((info.path, info.sha256)),
                Err(e) => st.error = Some(e.to_string()),
            }
        }
        let status = if st.error.is_some() { "failed" } else { "ok" };
        if st.error.is_some() {
            report.failed_files += 1;
        }
        let file = st.path.display().to_string();
        let out_str = output.as_ref().map(|(p, _)| p.display().to_string());
        let out_sha = output.as_ref().map(|(_, s)| s.clone());
        let row = |frame: Option<u32>, values: BTreeMap<String, Value>| ResultRow {
            file: file.clone(),
            frame,
            plugin: handle.name.clone(),
            status,
            error: st.error.clone(),
            output: out_str.clone(),
            output_sha256: out_sha.clone(),
            values,
        };
        if st.values.is_empty() {
            report.rows.push(row(None, BTreeMap::new()));
        } else {
            for (k, v) in st.values.iter().enumerate() {
                report.rows.push(row(Some(k as u32), v.clone()));
            }
        }
        report.audit.push(AuditRecord {
            file: file.clone(),
            plugin: handle.name.clone(),
            plugin_version: handle.version.clone(),
            plugin_kind: handle.kind.to_string(),
            library: handle.library.path.display().to_string(),
            library_sha256: handle.library.sha256.clone(),
            abi: super::abi_string(handle.library.abi),
            params: opts.params.clone(),
            backend: backend.describe(),
            seed: opts.seed,
            status,
            error: st.error.clone(),
            output: out_str.clone(),
            output_sha256: out_sha.clone(),
            frames: st.values.clone(),
        });
    }
    report
}

/// Writes `results.jsonl` and `audit.jsonl` into `dir`.
pub fn write_report(dir: &Path, report: &RunReport) -> std::io::Result<()> {
    use std::io::Write;
    let lines = |items: Vec<String>| items.join("\n") + "\n";
    let rows: Vec<String> = report
        .rows
        .iter()
        .map(|r| serde_json::to_string(r).unwrap_or_default())
        .collect();
    let audit: Vec<String> = report
        .audit
        .iter()
        .map(|r| serde_json::to_string(r).unwrap_or_default())
        .collect();
    std::fs::File::create(dir.join("results.jsonl"))?.write_all(lines(rows).as_bytes())?;
    std::fs::File::create(dir.join("audit.jsonl"))?.write_all(lines(audit).as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planar_round_trip() {
        let hwc = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let chw = to_planar(&hwc, 3);
        assert_eq!(chw, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(to_interleaved(&chw, 3), hwc.to_vec());
    }

    #[test]
    fn batch_seeds_differ_by_plugin_and_batch() {
        assert_ne!(batch_seed(1, "a", 0), batch_seed(1, "b", 0));
        assert_ne!(batch_seed(1, "a", 0), batch_seed(1, "a", 1));
        assert_eq!(batch_seed(1, "a", 0), batch_seed(1, "a", 0));
    }
}
