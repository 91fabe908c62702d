//! ONNX import: `ModelProto` (via `onnx-protobuf`) -> [`Graph`].
//!
//! Import does three jobs besides translation: it folds shape arithmetic (Shape, Gather,
//! Unsqueeze, Concat, ... on tensors whose values are known at import, with the batch kept
//! symbolic so the model stays batch-agnostic), it folds BatchNormalization into a preceding Conv
//! when that Conv feeds only the BN (fewer passes over the activations, one fewer op to
//! differentiate), and it rejects anything it cannot run faithfully with an error naming the
//! node, the operator and what is missing, instead of guessing.

use std::collections::HashMap;
use std::path::Path;

use onnx_protobuf::{ModelProto, NodeProto, TensorProto};
use protobuf::Message;

use super::backend::{
    Binary, CoordTransform, NearestMode, PadMode, PoolKind, ReduceOp, ResizeMode, Unary,
};
use super::ir::{Graph, Op, PadSpec, ReshapeRule, ResizeSize, SymInt, ValueId, ValueKind};
use super::shape::ShapeError;

/// Default-domain opsets this importer implements.
pub const OPSET_MIN: i64 = 11;
pub const OPSET_MAX: i64 = 21;

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("cannot read model {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: not a valid ONNX model")]
    Parse {
        origin: String,
        #[source]
        source: protobuf::Error,
    },
    #[error(
        "{origin}: opset {version} of domain `{domain}` is not supported (adverse runs the default ONNX domain at opsets {OPSET_MIN}-{OPSET_MAX}; re-export the model with a supported opset)"
    )]
    Opset {
        origin: String,
        domain: String,
        version: i64,
    },
    #[error("{origin}: the model has no graph")]
    NoGraph { origin: String },
    #[error("node `{node}` ({op}): unsupported operator (domain `{domain}`)")]
    UnsupportedOp {
        node: String,
        op: String,
        domain: String,
    },
    #[error("node `{node}` ({op}): {what}")]
    Unsupported {
        node: String,
        op: String,
        what: String,
    },
    #[error("tensor `{name}`: {what}")]
    Tensor { name: String, what: String },
    #[error("graph input `{name}`: {what}")]
    Input { name: String, what: String },
    #[error("graph: {0}")]
    Graph(String),
    #[error("shape inference: {0}")]
    Shape(#[from] ShapeError),
}

/// Read and import an ONNX file.
pub fn load(path: &Path) -> Result<Graph, OnnxError> {
    let bytes = std::fs::read(path).map_err(|source| OnnxError::Io {
        path: path.display().to_string(),
        source,
    })?;
    import_bytes(&bytes, &path.display().to_string())
}

/// Import from serialized bytes; `origin` names the source in errors.
pub fn import_bytes(bytes: &[u8], origin: &str) -> Result<Graph, OnnxError> {
    let model = ModelProto::parse_from_bytes(bytes).map_err(|source| OnnxError::Parse {
        origin: origin.to_string(),
        source,
    })?;
    import_model(&model, origin)
}

/// Integer or float data known at import time.
#[derive(Clone, Debug)]
enum CData {
    F(Vec<f32>),
    I(Vec<SymInt>),
}

#[derive(Clone, Debug)]
struct Const {
    shape: Vec<usize>,
    data: CData,
}

impl Const {
    fn len(&self) -> usize {
        match &self.data {
            CData::F(v) => v.len(),
            CData::I(v) => v.len(),
        }
    }
    fn ints(v: Vec<i64>) -> Const {
        Const {
            shape: vec![v.len()],
            data: CData::I(v.into_iter().map(SymInt::lit).collect()),
        }
    }
}

#[derive(Clone, Debug)]
enum Entry {
    Const(Const),
    Value(ValueId),
}

const DT_FLOAT: i32 = 1;
const DT_UINT8: i32 = 2;
const DT_INT8: i32 = 3;
const DT_INT32: i32 = 6;
const DT_INT64: i32 = 7;
const DT_BOOL: i32 = 9;
const DT_DOUBLE: i32 = 11;

fn tensor_to_const(t: &TensorProto) -> Result<Const, OnnxError> {
    let name = if t.name.is_empty() {
        "<unnamed>".to_string()
    } else {
        t.name.clone()
    };
    let err = |what: String| OnnxError::Tensor {
        name: name.clone(),
        what,
    };
    if !t.external_data.is_empty() || t.data_location.value() == 1 {
        return Err(err("external data is not supported (save the model with the weights inside the .onnx file)".into()));
    }
    if t.segment.is_some() {
        return Err(err("segmented tensors are not supported".into()));
    }
    let mut shape = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(err(format!("negative dimension {d}")));
        }
        shape.push(d as usize);
    }
    let n: usize = shape.iter().product();
    let raw = &t.raw_data;
    let data = match t.data_type {
        DT_FLOAT => CData::F(if !raw.is_empty() {
            if raw.len() != n * 4 {
                return Err(err(format!(
                    "raw_data has {} bytes for {n} floats",
                    raw.len()
                )));
            }
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        } else {
            t.float_data.clone()
        }),
        DT_DOUBLE => CData::F(if !raw.is_empty() {
            if raw.len() != n * 8 {
                return Err(err(format!(
                    "raw_data has {} bytes for {n} doubles",
                    raw.len()
                )));
            }
            raw.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect()
        } else {
            t.double_data.iter().map(|&v| v as f32).collect()
        }),
        DT_INT64 => CData::I(if !raw.is_empty() {
            if raw.len() != n * 8 {
                return Err(err(format!(
                    "raw_data has {} bytes for {n} int64",
                    raw.len()
                )));
            }
            raw.chunks_exact(8)
                .map(|c| SymInt::lit(i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))))
                .collect()
        } else {
            t.int64_data.iter().map(|&v| SymInt::lit(v)).collect()
        }),
        DT_INT32 => CData::I(if !raw.is_empty() {
            if raw.len() != n * 4 {
                return Err(err(format!(
                    "raw_data has {} bytes for {n} int32",
                    raw.len()
                )));
            }
            raw.chunks_exact(4)
                .map(|c| SymInt::lit(i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64))
                .collect()
        } else {
            t.int32_data
                .iter()
                .map(|&v| SymInt::lit(v as i64))
                .collect()
        }),
        DT_UINT8 | DT_INT8 | DT_BOOL => CData::I(if !raw.is_empty() {
            if raw.len() != n {
                return Err(err(format!(
                    "raw_data has {} bytes for {n} bytes",
                    raw.len()
                )));
            }
            raw.iter()
                .map(|&b| {
                    SymInt::lit(if t.data_type == DT_INT8 {
                        b as i8 as i64
                    } else {
                        b as i64
                    })
                })
                .collect()
        } else {
            t.int32_data
                .iter()
                .map(|&v| SymInt::lit(v as i64))
                .collect()
        }),
        other => {
            return Err(err(format!(
                "data type {other} is not supported (float32, float64, int8/32/64, uint8, bool are)"
            )));
        }
    };
    let c = Const { shape, data };
    if c.len() != n {
        return Err(err(format!(
            "has {} elements for shape {:?}",
            c.len(),
            c.shape
        )));
    }
    Ok(c)
}

/// The attributes of one node, with use tracking so unknown attributes are reported.
struct Attrs<'a> {
    node: &'a NodeProto,
    name: String,
}

impl<'a> Attrs<'a> {
    fn find(&self, key: &str) -> Option<&'a onnx_protobuf::AttributeProto> {
        self.node.attribute.iter().find(|a| a.name == key)
    }
    fn err(&self, what: impl Into<String>) -> OnnxError {
        OnnxError::Unsupported {
            node: self.name.clone(),
            op: self.node.op_type.clone(),
            what: what.into(),
        }
    }
    /// Reject attributes this importer does not interpret.
    fn only(&self, known: &[&str]) -> Result<(), OnnxError> {
        for a in &self.node.attribute {
            if !known.contains(&a.name.as_str()) {
                return Err(self.err(format!("attribute `{}` is not supported", a.name)));
            }
        }
        Ok(())
    }
    fn int(&self, key: &str, default: i64) -> i64 {
        self.find(key).map(|a| a.i).unwrap_or(default)
    }
    fn float(&self, key: &str, default: f32) -> f32 {
        self.find(key).map(|a| a.f).unwrap_or(default)
    }
    fn ints(&self, key: &str) -> Option<Vec<i64>> {
        self.find(key).map(|a| a.ints.clone())
    }
    fn string(&self, key: &str, default: &str) -> String {
        self.find(key)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
            .unwrap_or_else(|| default.to_string())
    }
    fn usize2(&self, key: &str, default: usize) -> Result<[usize; 2], OnnxError> {
        match self.ints(key) {
            None => Ok([default; 2]),
            Some(v) if v.len() == 2 && v.iter().all(|&x| x >= 0) => {
                Ok([v[0] as usize, v[1] as usize])
            }
            Some(v) => Err(self.err(format!(
                "`{key}` = {v:?}: only 2-D (two non-negative values) is supported"
            ))),
        }
    }
    /// ONNX pads `[x1_begin, x2_begin, x1_end, x2_end]` -> [top, left, bottom, right].
    fn pads4(&self) -> Result<[usize; 4], OnnxError> {
        match self.ints("pads") {
            None => Ok([0; 4]),
            Some(v) if v.len() == 4 && v.iter().all(|&x| x >= 0) => {
                Ok([v[0] as usize, v[1] as usize, v[2] as usize, v[3] as usize])
            }
            Some(v) => Err(self.err(format!(
                "`pads` = {v:?}: only 2-D non-negative pads are supported"
            ))),
        }
    }
    fn pad_spec(&self) -> Result<PadSpec, OnnxError> {
        match self.string("auto_pad", "NOTSET").as_str() {
            "NOTSET" => Ok(PadSpec::Explicit(self.pads4()?)),
            "VALID" => Ok(PadSpec::Explicit([0; 4])),
            "SAME_UPPER" => Ok(PadSpec::SameUpper),
            "SAME_LOWER" => Ok(PadSpec::SameLower),
            other => Err(self.err(format!("auto_pad `{other}` is not supported"))),
        }
    }
}

fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Gather elements of `data` at flat indices `idx`.
fn pick(data: &CData, idx: &[usize]) -> CData {
    match data {
        CData::F(v) => CData::F(idx.iter().map(|&i| v[i]).collect()),
        CData::I(v) => CData::I(idx.iter().map(|&i| v[i]).collect()),
    }
}

struct Importer<'m> {
    g: Graph,
    entries: HashMap<String, Entry>,
    /// Float constants already turned into params (so shared weights stay shared).
    materialized: HashMap<String, ValueId>,
    consumers: HashMap<String, usize>,
    opset: i64,
    _model: &'m ModelProto,
}

impl<'m> Importer<'m> {
    fn get(&self, at: &Attrs, name: &str) -> Result<Entry, OnnxError> {
        self.entries.get(name).cloned().ok_or_else(|| {
            at.err(format!(
                "input `{name}` is not defined before this node (graph not topologically sorted?)"
            ))
        })
    }

    /// Input `i` of the node as a runtime value (float constants become parameters).
    fn value(&mut self, at: &Attrs, i: usize) -> Result<ValueId, OnnxError> {
        let name = at
            .node
            .input
            .get(i)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| at.err(format!("missing input {i}")))?
            .clone();
        match self.get(at, &name)? {
            Entry::Value(v) => Ok(v),
            Entry::Const(c) => {
                if let Some(&v) = self.materialized.get(&name) {
                    return Ok(v);
                }
                let CData::F(data) = c.data else {
                    return Err(at.err(format!("integer tensor `{name}` used as data (only float tensors flow through the graph)")));
                };
                let v = self.g.add_param(name.clone(), c.shape, data);
                self.materialized.insert(name, v);
                Ok(v)
            }
        }
    }

    /// Input `i` if present and non-empty.
    fn opt_input(&self, at: &Attrs, i: usize) -> Option<String> {
        at.node.input.get(i).filter(|s| !s.is_empty()).cloned()
    }

    /// Input `i` as an import-time constant.
    fn konst(&self, at: &Attrs, i: usize) -> Result<Option<Const>, OnnxError> {
        let Some(name) = self.opt_input(at, i) else {
            return Ok(None);
        };
        match self.get(at, &name)? {
            Entry::Const(c) => Ok(Some(c)),
            Entry::Value(_) => Err(at.err(format!("input `{name}` must be known at import time (a constant or foldable shape arithmetic), but it is computed from the model input"))),
        }
    }

    fn const_ints(&self, at: &Attrs, i: usize) -> Result<Option<Vec<SymInt>>, OnnxError> {
        match self.konst(at, i)? {
            None => Ok(None),
            Some(Const {
                data: CData::I(v), ..
            }) => Ok(Some(v)),
            Some(Const {
                data: CData::F(v), ..
            }) => Ok(Some(v.iter().map(|&f| SymInt::lit(f as i64)).collect())),
        }
    }

    fn lit_ints(&self, at: &Attrs, i: usize) -> Result<Option<Vec<i64>>, OnnxError> {
        match self.const_ints(at, i)? {
            None => Ok(None),
            Some(v) => v
                .into_iter()
                .map(|s| {
                    s.as_lit().ok_or_else(|| {
                        at.err("a batch-dependent value where a fixed integer is required")
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
        }
    }

    fn const_floats(&self, at: &Attrs, i: usize) -> Result<Option<Vec<f32>>, OnnxError> {
        match self.konst(at, i)? {
            None => Ok(None),
            Some(Const {
                data: CData::F(v), ..
            }) => Ok(Some(v)),
            Some(Const {
                data: CData::I(v), ..
            }) => v
                .iter()
                .map(|s| {
                    s.as_lit()
                        .map(|x| x as f32)
                        .ok_or_else(|| at.err("batch-dependent float"))
                })
                .collect::<Result<_, _>>()
                .map(Some),
        }
    }

    fn is_const(&self, name: &str) -> bool {
        matches!(self.entries.get(name), Some(Entry::Const(_)))
    }

    fn all_const(&self, node: &NodeProto) -> bool {
        node.input
            .iter()
            .filter(|s| !s.is_empty())
            .all(|s| self.is_const(s))
    }

    /// Shape of an entry as symbolic ints (batch axis symbolic).
    fn sym_shape(&self, e: &Entry) -> Vec<SymInt> {
        match e {
            Entry::Const(c) => c.shape.iter().map(|&d| SymInt::lit(d as i64)).collect(),
            Entry::Value(v) => {
                let val = &self.g.values[*v];
                val.shape
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| {
                        if i == 0 && val.batched {
                            SymInt::BATCH
                        } else {
                            SymInt::lit(d as i64)
                        }
                    })
                    .collect()
            }
        }
    }

    fn rank_of(&self, e: &Entry) -> usize {
        match e {
            Entry::Const(c) => c.shape.len(),
            Entry::Value(v) => self.g.values[*v].shape.len(),
        }
    }

    fn set_out(&mut self, node: &NodeProto, e: Entry) {
        if let Some(o) = node.output.first() {
            self.entries.insert(o.clone(), e);
        }
    }

    fn add(&mut self, at: &Attrs, op: Op, inputs: Vec<ValueId>) -> Result<(), OnnxError> {
        let out = self.g.add_node(at.name.clone(), op, inputs)?;
        if let Some(o) = at.node.output.first() {
            self.g.values[out].name = o.clone();
        }
        self.set_out(at.node, Entry::Value(out));
        Ok(())
    }

    /// Extra outputs (MaxPool indices, BN running stats, Dropout mask) must be unused.
    fn only_first_output(&self, at: &Attrs) -> Result<(), OnnxError> {
        for o in at.node.output.iter().skip(1) {
            if !o.is_empty() && self.consumers.get(o).copied().unwrap_or(0) > 0 {
                return Err(at.err(format!(
                    "output `{o}` (beyond the first) is used, which is not supported"
                )));
            }
        }
        Ok(())
    }

    fn node(&mut self, node: &NodeProto, idx: usize) -> Result<(), OnnxError> {
        let name = if node.name.is_empty() {
            format!("{}#{idx}", node.op_type)
        } else {
            node.name.clone()
        };
        let at = Attrs { node, name };
        if !(node.domain.is_empty() || node.domain == "ai.onnx") {
            return Err(OnnxError::UnsupportedOp {
                node: at.name.clone(),
                op: node.op_type.clone(),
                domain: node.domain.clone(),
            });
        }
        let op = node.op_type.as_str();
        match op {
            "Constant" => {
                at.only(&[
                    "value",
                    "value_float",
                    "value_floats",
                    "value_int",
                    "value_ints",
                ])?;
                let c = if let Some(a) = at.find("value") {
                    let t =
                        a.t.as_ref()
                            .ok_or_else(|| at.err("`value` has no tensor"))?;
                    tensor_to_const(t)?
                } else if let Some(a) = at.find("value_float") {
                    Const {
                        shape: vec![],
                        data: CData::F(vec![a.f]),
                    }
                } else if let Some(a) = at.find("value_floats") {
                    Const {
                        shape: vec![a.floats.len()],
                        data: CData::F(a.floats.clone()),
                    }
                } else if let Some(a) = at.find("value_int") {
                    Const {
                        shape: vec![],
                        data: CData::I(vec![SymInt::lit(a.i)]),
                    }
                } else if let Some(a) = at.find("value_ints") {
                    Const::ints(a.ints.clone())
                } else {
                    return Err(at.err("no supported value attribute"));
                };
                self.set_out(node, Entry::Const(c));
            }
            "Identity" | "Dropout" => {
                at.only(&["ratio", "seed", "is_test"])?;
                self.only_first_output(&at)?;
                let name = self
                    .opt_input(&at, 0)
                    .ok_or_else(|| at.err("missing input"))?;
                let e = self.get(&at, &name)?;
                self.set_out(node, e);
            }
            "Shape" => {
                at.only(&["start", "end"])?;
                let name = self
                    .opt_input(&at, 0)
                    .ok_or_else(|| at.err("missing input"))?;
                let e = self.get(&at, &name)?;
                let s = self.sym_shape(&e);
                let r = s.len() as i64;
                let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                let start = clampi(at.int("start", 0));
                let end = clampi(at.int("end", r));
                let v = if start < end {
                    s[start..end].to_vec()
                } else {
                    vec![]
                };
                self.set_out(
                    node,
                    Entry::Const(Const {
                        shape: vec![v.len()],
                        data: CData::I(v),
                    }),
                );
            }
            "Gather" => {
                at.only(&["axis"])?;
                if !self.all_const(node) {
                    return Err(at.err(
                        "Gather on a computed tensor is not supported (only on shapes/constants)",
                    ));
                }
                let data = self.konst(&at, 0)?.ok_or_else(|| at.err("missing data"))?;
                let idx = self
                    .lit_ints(&at, 1)?
                    .ok_or_else(|| at.err("missing indices"))?;
                let idx_shape = self.konst(&at, 1)?.map(|c| c.shape).unwrap_or_default();
                let axis = norm_axis(at.int("axis", 0), data.shape.len())
                    .ok_or_else(|| at.err("axis out of range"))?;
                let d = data.shape[axis];
                let mut norm = Vec::with_capacity(idx.len());
                for &i in &idx {
                    let j = if i < 0 { i + d as i64 } else { i };
                    if !(0..d as i64).contains(&j) {
                        return Err(at.err(format!("index {i} out of range for axis of size {d}")));
                    }
                    norm.push(j as usize);
                }
                let outer: usize = data.shape[..axis].iter().product();
                let inner: usize = data.shape[axis + 1..].iter().product();
                let mut flat = Vec::new();
                for o in 0..outer {
                    for &j in &norm {
                        for k in 0..inner {
                            flat.push((o * d + j) * inner + k);
                        }
                    }
                }
                let mut shape = data.shape[..axis].to_vec();
                shape.extend_from_slice(&idx_shape);
                shape.extend_from_slice(&data.shape[axis + 1..]);
                self.set_out(
                    node,
                    Entry::Const(Const {
                        shape,
                        data: pick(&data.data, &flat),
                    }),
                );
            }
            "Unsqueeze" | "Squeeze" => {
                at.only(&["axes"])?;
                let name = self
                    .opt_input(&at, 0)
                    .ok_or_else(|| at.err("missing input"))?;
                let e = self.get(&at, &name)?;
                let axes_raw = if self.opset >= 13 {
                    self.lit_ints(&at, 1)?
                } else {
                    at.ints("axes")
                };
                let rank = self.rank_of(&e);
                let out_rank = if op == "Unsqueeze" {
                    rank + axes_raw.as_ref().map_or(0, |a| a.len())
                } else {
                    rank
                };
                let mut axes = match axes_raw {
                    Some(a) => a
                        .iter()
                        .map(|&x| {
                            norm_axis(x, out_rank)
                                .ok_or_else(|| at.err(format!("axis {x} out of range")))
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                    None if op == "Squeeze" => {
                        let s = self.sym_shape(&e);
                        let batched = matches!(e, Entry::Value(v) if self.g.values[v].batched);
                        (0..rank)
                            .filter(|&i| s[i] == SymInt::lit(1) && !(i == 0 && batched))
                            .collect()
                    }
                    None => return Err(at.err("missing axes")),
                };
                axes.sort_unstable();
                axes.dedup();
                let rule = if op == "Unsqueeze" {
                    ReshapeRule::Unsqueeze { axes }
                } else {
                    ReshapeRule::Squeeze { axes }
                };
                self.reshape_like(&at, e, rule)?;
            }
            "Flatten" => {
                at.only(&["axis"])?;
                let name = self
                    .opt_input(&at, 0)
                    .ok_or_else(|| at.err("missing input"))?;
                let e = self.get(&at, &name)?;
                let rank = self.rank_of(&e);
                let a = at.int("axis", 1);
                let axis = if a < 0 { a + rank as i64 } else { a };
                if !(0..=rank as i64).contains(&axis) {
                    return Err(at.err(format!("axis {a} out of range")));
                }
                self.reshape_like(
                    &at,
                    e,
                    ReshapeRule::Flatten {
                        axis: axis as usize,
                    },
                )?;
            }
            "Reshape" => {
                at.only(&["allowzero"])?;
                let name = self
                    .opt_input(&at, 0)
                    .ok_or_else(|| at.err("missing input"))?;
                let e = self.get(&at, &name)?;
                let dims = self
                    .const_ints(&at, 1)?
                    .ok_or_else(|| at.err("missing shape input"))?;
                let rule = ReshapeRule::Spec {
                    dims,
                    allowzero: at.int("allowzero", 0) != 0,
                };
                self.reshape_like(&at, e, rule)?;
            }
            "Cast" => {
                at.only(&["to", "saturate"])?;
                let to = at.int("to", DT_FLOAT as i64) as i32;
                let name = self
                    .opt_input(&at, 0)
                    .ok_or_else(|| at.err("missing input"))?;
                match self.get(&at, &name)? {
                    Entry::Value(v) => {
                        if to != DT_FLOAT && to != DT_DOUBLE {
                            return Err(at.err(format!(
                                "cast of a computed tensor to data type {to} (only float)"
                            )));
                        }
                        self.set_out(node, Entry::Value(v));
                    }
                    Entry::Const(c) => {
                        let data = match (c.data, to) {
                            (CData::F(v), DT_FLOAT | DT_DOUBLE) => CData::F(v),
                            (CData::I(v), DT_FLOAT | DT_DOUBLE) => CData::F(
                                v.iter()
                                    .map(|s| {
                                        s.as_lit().map(|x| x as f32).ok_or_else(|| {
                                            at.err("cast of a batch-dependent value to float")
                                        })
                                    })
                                    .collect::<Result<_, _>>()?,
                            ),
                            (CData::F(v), DT_BOOL) => CData::I(
                                v.iter().map(|&x| SymInt::lit((x != 0.0) as i64)).collect(),
                            ),
                            (CData::F(v), _) => {
                                CData::I(v.iter().map(|&x| SymInt::lit(x.trunc() as i64)).collect())
                            }
                            (CData::I(v), _) => CData::I(v),
                        };
                        self.set_out(
                            node,
                            Entry::Const(Const {
                                shape: c.shape,
                                data,
                            }),
                        );
                    }
                }
            }
            "ConstantOfShape" => {
                at.only(&["value"])?;
                let shape = self
                    .lit_ints(&at, 0)?
                    .ok_or_else(|| at.err("missing shape"))?;
                if shape.iter().any(|&d| d < 0) {
                    return Err(at.err("negative dimension"));
                }
                let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                let n: usize = shape.iter().product();
                let data = match at.find("value").and_then(|a| a.t.as_ref()) {
                    Some(t) => match tensor_to_const(t)?.data {
                        CData::F(v) => CData::F(vec![v.first().copied().unwrap_or(0.0); n]),
                        CData::I(v) => {
                            CData::I(vec![v.first().copied().unwrap_or(SymInt::lit(0)); n])
                        }
                    },
                    None => CData::F(vec![0.0; n]),
                };
                self.set_out(node, Entry::Const(Const { shape, data }));
            }
            "Slice" => {
                at.only(&[])?;
                let name = self
                    .opt_input(&at, 0)
                    .ok_or_else(|| at.err("missing input"))?;
                let e = self.get(&at, &name)?;
                let starts = self
                    .lit_ints(&at, 1)?
                    .ok_or_else(|| at.err("missing starts"))?;
                let ends = self
                    .lit_ints(&at, 2)?
                    .ok_or_else(|| at.err("missing ends"))?;
                let rank = self.rank_of(&e);
                let axes = self
                    .lit_ints(&at, 3)?
                    .unwrap_or_else(|| (0..starts.len() as i64).collect());
                let steps = self
                    .lit_ints(&at, 4)?
                    .unwrap_or_else(|| vec![1; starts.len()]);
                if starts.len() != ends.len()
                    || axes.len() != starts.len()
                    || steps.len() != starts.len()
                {
                    return Err(at.err("starts/ends/axes/steps lengths differ"));
                }
                let shape: Vec<usize> = match &e {
                    Entry::Const(c) => c.shape.clone(),
                    Entry::Value(v) => self.g.values[*v].shape.clone(),
                };
                // Per-axis (start, step, count) over the batch-1 shape.
                let mut ranges: Vec<(i64, i64, usize)> = shape.iter().map(|&d| (0, 1, d)).collect();
                for k in 0..starts.len() {
                    let ax = norm_axis(axes[k], rank)
                        .ok_or_else(|| at.err(format!("axis {} out of range", axes[k])))?;
                    let d = shape[ax] as i64;
                    let step = steps[k];
                    if step == 0 {
                        return Err(at.err("step 0"));
                    }
                    let fix = |v: i64| if v < 0 { v + d } else { v };
                    let (s, en) = if step > 0 {
                        (fix(starts[k]).clamp(0, d), fix(ends[k]).clamp(0, d))
                    } else {
                        (
                            fix(starts[k]).clamp(-1, d - 1),
                            fix(ends[k]).clamp(-1, d - 1),
                        )
                    };
                    let count = if step > 0 {
                        ((en - s).max(0) + step - 1) / step
                    } else {
                        ((s - en).max(0) + (-step) - 1) / (-step)
                    };
                    ranges[ax] = (s, step, count as usize);
                }
                match e {
                    Entry::Const(c) => {
                        let st = strides_of(&c.shape);
                        let out_shape: Vec<usize> = ranges.iter().map(|r| r.2).collect();
                        let total: usize = out_shape.iter().product();
                        let ost = strides_of(&out_shape);
                        let mut flat = Vec::with_capacity(total);
                        for o in 0..total {
                            let mut src = 0usize;
                            for ax in 0..rank {
                                let i = (o / ost[ax]) % out_shape[ax].max(1);
                                src += (ranges[ax].0 + ranges[ax].1 * i as i64) as usize * st[ax];
                            }
                            flat.push(src);
                        }
                        self.set_out(
                            node,
                            Entry::Const(Const {
                                shape: out_shape,
                                data: pick(&c.data, &flat),
                            }),
                        );
                    }
                    Entry::Value(v) => {
                        let batched = self.g.values[v].batched;
                        let mut cur = v;
                        for (ax, &(s, step, count)) in ranges.iter().enumerate() {
                            if count == shape[ax] && (count == 0 || s == 0) && step == 1 {
                                continue;
                            }
                            if step != 1 {
                                return Err(
                                    at.err("Slice with a step other than 1 on a computed tensor")
                                );
                            }
                            if ax == 0 && batched {
                                return Err(at.err("Slice along the batch axis"));
                            }
                            let op = Op::Slice {
                                axis: ax,
                                start: s as usize,
                                end: s as usize + count,
                            };
                            cur =
                                self.g
                                    .add_node(format!("{}/axis{ax}", at.name), op, vec![cur])?;
                        }
                        if let Some(o) = node.output.first() {
                            self.g.values[cur].name = o.clone();
                        }
                        self.set_out(node, Entry::Value(cur));
                    }
                }
            }
            "Concat" => {
                at.only(&["axis"])?;
                let names: Vec<String> = node
                    .input
                    .iter()
                    .filter(|s| !s.is_empty())
                    .cloned()
                    .collect();
                if names.is_empty() {
                    return Err(at.err("no inputs"));
                }
                let first = self.get(&at, &names[0])?;
                let rank = self.rank_of(&first);
                let axis = norm_axis(at.int("axis", 0), rank)
                    .ok_or_else(|| at.err("axis out of range"))?;
                if self.all_const(node) {
                    let cs: Vec<Const> = names
                        .iter()
                        .map(|n| match self.entries.get(n) {
                            Some(Entry::Const(c)) => Ok(c.clone()),
                            _ => Err(at.err("internal: const expected")),
                        })
                        .collect::<Result<_, _>>()?;
                    let mut shape = cs[0].shape.clone();
                    let outer: usize = shape[..axis].iter().product();
                    let mut data_f = Vec::new();
                    let mut data_i = Vec::new();
                    let is_f = matches!(cs[0].data, CData::F(_));
                    for c in &cs[1..] {
                        if c.shape.len() != rank || matches!(c.data, CData::F(_)) != is_f {
                            return Err(at.err("Concat of incompatible constants"));
                        }
                        shape[axis] += c.shape[axis];
                    }
                    for o in 0..outer {
                        for c in &cs {
                            let inner: usize = c.shape[axis..].iter().product();
                            match &c.data {
                                CData::F(v) => {
                                    data_f.extend_from_slice(&v[o * inner..(o + 1) * inner])
                                }
                                CData::I(v) => {
                                    data_i.extend_from_slice(&v[o * inner..(o + 1) * inner])
                                }
                            }
                        }
                    }
                    let data = if is_f {
                        CData::F(data_f)
                    } else {
                        CData::I(data_i)
                    };
                    self.set_out(node, Entry::Const(Const { shape, data }));
                } else {
                    let mut ins = Vec::new();
                    for i in 0..node.input.len() {
                        if self.opt_input(&at, i).is_some() {
                            ins.push(self.value(&at, i)?);
                        }
                    }
                    self.add(&at, Op::Concat { axis }, ins)?;
                }
            }
            "Add" | "Sub" | "Mul" | "Div" => {
                at.only(&[])?;
                let b = match op {
                    "Add" => Binary::Add,
                    "Sub" => Binary::Sub,
                    "Mul" => Binary::Mul,
                    _ => Binary::Div,
                };
                if self.all_const(node) {
                    let x = self.konst(&at, 0)?.ok_or_else(|| at.err("missing input"))?;
                    let y = self.konst(&at, 1)?.ok_or_else(|| at.err("missing input"))?;
                    let c = fold_binary(&at, b, x, y)?;
                    self.set_out(node, Entry::Const(c));
                } else {
                    let x = self.value(&at, 0)?;
                    let y = self.value(&at, 1)?;
                    self.add(&at, Op::Binary(b), vec![x, y])?;
                }
            }
            "Relu" | "Sigmoid" | "Tanh" | "Neg" | "Exp" | "Log" | "Sqrt" | "Abs" | "LeakyRelu" => {
                at.only(&["alpha"])?;
                let u = match op {
                    "Relu" => Unary::Relu,
                    "Sigmoid" => Unary::Sigmoid,
                    "Tanh" => Unary::Tanh,
                    "Neg" => Unary::Neg,
                    "Exp" => Unary::Exp,
                    "Log" => Unary::Log,
                    "Sqrt" => Unary::Sqrt,
                    "Abs" => Unary::Abs,
                    _ => Unary::LeakyRelu {
                        alpha: at.float("alpha", 0.01),
                    },
                };
                let x = self.value(&at, 0)?;
                self.add(&at, Op::Unary(u), vec![x])?;
            }
            "Clip" => {
                at.only(&["min", "max"])?;
                let (mut lo, mut hi) = (
                    at.float("min", f32::NEG_INFINITY),
                    at.float("max", f32::INFINITY),
                );
                if let Some(v) = self.const_floats(&at, 1)? {
                    lo = *v.first().ok_or_else(|| at.err("empty min"))?;
                }
                if let Some(v) = self.const_floats(&at, 2)? {
                    hi = *v.first().ok_or_else(|| at.err("empty max"))?;
                }
                let x = self.value(&at, 0)?;
                self.add(&at, Op::Unary(Unary::Clip { min: lo, max: hi }), vec![x])?;
            }
            "Conv" => {
                at.only(&[
                    "kernel_shape",
                    "strides",
                    "pads",
                    "dilations",
                    "group",
                    "auto_pad",
                ])?;
                let x = self.value(&at, 0)?;
                let w = self.value(&at, 1)?;
                let ws = self.g.values[w].shape.clone();
                if ws.len() != 4 {
                    return Err(at.err(format!(
                        "only 2-D convolution is supported (weight shape {ws:?})"
                    )));
                }
                let kernel = at
                    .usize2("kernel_shape", 0)
                    .map(|k| if k == [0, 0] { [ws[2], ws[3]] } else { k })?;
                let group = at.int("group", 1);
                if group < 1 {
                    return Err(at.err("group < 1"));
                }
                let conv = Op::Conv {
                    kernel,
                    stride: at.usize2("strides", 1)?,
                    dilation: at.usize2("dilations", 1)?,
                    pad: at.pad_spec()?,
                    groups: group as usize,
                };
                let mut ins = vec![x, w];
                if self.opt_input(&at, 2).is_some() {
                    ins.push(self.value(&at, 2)?);
                }
                self.add(&at, conv, ins)?;
            }
            "ConvTranspose" => {
                at.only(&[
                    "kernel_shape",
                    "strides",
                    "pads",
                    "dilations",
                    "group",
                    "auto_pad",
                    "output_padding",
                    "output_shape",
                ])?;
                let x = self.value(&at, 0)?;
                let w = self.value(&at, 1)?;
                let ws = self.g.values[w].shape.clone();
                if ws.len() != 4 {
                    return Err(at.err(format!(
                        "only 2-D transposed convolution is supported (weight shape {ws:?})"
                    )));
                }
                let kernel = at
                    .usize2("kernel_shape", 0)
                    .map(|k| if k == [0, 0] { [ws[2], ws[3]] } else { k })?;
                let same_upper = match at.string("auto_pad", "NOTSET").as_str() {
                    "NOTSET" | "VALID" => None,
                    "SAME_UPPER" => Some(true),
                    "SAME_LOWER" => Some(false),
                    o => return Err(at.err(format!("auto_pad `{o}` is not supported"))),
                };
                let output_shape = match at.ints("output_shape") {
                    None => None,
                    Some(v) if v.len() == 2 && v.iter().all(|&d| d > 0) => {
                        Some([v[0] as usize, v[1] as usize])
                    }
                    Some(v) => {
                        return Err(at.err(format!(
                            "output_shape {v:?}: only 2 spatial sizes are supported"
                        )));
                    }
                };
                let group = at.int("group", 1);
                if group < 1 {
                    return Err(at.err("group < 1"));
                }
                let ct = Op::ConvTranspose {
                    kernel,
                    stride: at.usize2("strides", 1)?,
                    dilation: at.usize2("dilations", 1)?,
                    pads: at.pads4()?,
                    output_padding: at.usize2("output_padding", 0)?,
                    groups: group as usize,
                    output_shape,
                    same_upper,
                };
                let mut ins = vec![x, w];
                if self.opt_input(&at, 2).is_some() {
                    ins.push(self.value(&at, 2)?);
                }
                self.add(&at, ct, ins)?;
            }
            "BatchNormalization" => {
                at.only(&["epsilon", "momentum", "training_mode", "spatial"])?;
                if at.int("training_mode", 0) != 0 {
                    return Err(at.err(
                        "training_mode=1 (batch statistics) is not supported; export in eval mode",
                    ));
                }
                self.only_first_output(&at)?;
                let eps = at.float("epsilon", 1e-5);
                let get = |i: usize, what: &str| -> Result<Vec<f32>, OnnxError> {
                    self.const_floats(&at, i)?
                        .ok_or_else(|| at.err(format!("missing {what}")))
                };
                let gamma = get(1, "scale")?;
                let beta = get(2, "bias")?;
                let mean = get(3, "mean")?;
                let var = get(4, "var")?;
                let c = gamma.len();
                if beta.len() != c || mean.len() != c || var.len() != c {
                    return Err(at.err("scale/bias/mean/var lengths differ"));
                }
                let scale: Vec<f32> = (0..c)
                    .map(|i| (gamma[i] as f64 / (var[i] as f64 + eps as f64).sqrt()) as f32)
                    .collect();
                let shift: Vec<f32> = (0..c)
                    .map(|i| (beta[i] as f64 - mean[i] as f64 * scale[i] as f64) as f32)
                    .collect();
                let xname = self
                    .opt_input(&at, 0)
                    .ok_or_else(|| at.err("missing input"))?;
                if !self.try_fold_bn(&xname, node, &scale, &shift) {
                    let x = self.value(&at, 0)?;
                    let rank = self.g.values[x].shape.len();
                    if rank < 2 || self.g.values[x].shape[1] != c {
                        return Err(at.err(format!(
                            "input shape {:?} does not have {c} channels on axis 1",
                            self.g.values[x].shape
                        )));
                    }
                    let mut pshape = vec![c];
                    pshape.extend(std::iter::repeat_n(1, rank - 2));
                    let s =
                        self.g
                            .add_param(format!("{}.bn_scale", at.name), pshape.clone(), scale);
                    let b = self
                        .g
                        .add_param(format!("{}.bn_shift", at.name), pshape, shift);
                    let m = self.g.add_node(
                        format!("{}/scale", at.name),
                        Op::Binary(Binary::Mul),
                        vec![x, s],
                    )?;
                    self.add(&at, Op::Binary(Binary::Add), vec![m, b])?;
                }
            }
            "MaxPool" | "AveragePool" => {
                at.only(&[
                    "kernel_shape",
                    "strides",
                    "pads",
                    "dilations",
                    "ceil_mode",
                    "auto_pad",
                    "count_include_pad",
                    "storage_order",
                ])?;
                self.only_first_output(&at)?;
                if at.int("storage_order", 0) != 0 {
                    return Err(at.err("storage_order=1 is not supported"));
                }
                let kernel = at.usize2("kernel_shape", 0)?;
                if kernel[0] == 0 || kernel[1] == 0 {
                    return Err(at.err("kernel_shape must be 2 positive values"));
                }
                let kind = if op == "MaxPool" {
                    PoolKind::Max
                } else {
                    PoolKind::Avg {
                        count_include_pad: at.int("count_include_pad", 0) != 0,
                    }
                };
                let p = Op::Pool {
                    kind,
                    kernel,
                    stride: at.usize2("strides", 1)?,
                    dilation: at.usize2("dilations", 1)?,
                    pad: at.pad_spec()?,
                    ceil_mode: at.int("ceil_mode", 0) != 0,
                };
                let x = self.value(&at, 0)?;
                self.add(&at, p, vec![x])?;
            }
            "GlobalAveragePool" => {
                at.only(&[])?;
                let x = self.value(&at, 0)?;
                let rank = self.g.values[x].shape.len();
                if rank < 3 {
                    return Err(at.err("input rank < 3"));
                }
                self.add(
                    &at,
                    Op::Reduce {
                        axes: (2..rank).collect(),
                        op: ReduceOp::Mean,
                        keepdims: true,
                    },
                    vec![x],
                )?;
            }
            "ReduceMean" | "ReduceSum" => {
                at.only(&["axes", "keepdims", "noop_with_empty_axes"])?;
                let x = self.value(&at, 0)?;
                let rank = self.g.values[x].shape.len();
                let axes_in = if (op == "ReduceSum" && self.opset >= 13) || self.opset >= 18 {
                    self.lit_ints(&at, 1)?
                } else {
                    at.ints("axes")
                };
                let mut axes = match axes_in {
                    Some(a) if !a.is_empty() => a
                        .iter()
                        .map(|&v| norm_axis(v, rank).ok_or_else(|| at.err("axis out of range")))
                        .collect::<Result<Vec<_>, _>>()?,
                    _ => {
                        if at.int("noop_with_empty_axes", 0) != 0 {
                            self.set_out(node, Entry::Value(x));
                            return Ok(());
                        }
                        (0..rank).collect()
                    }
                };
                axes.sort_unstable();
                axes.dedup();
                if axes.contains(&0) && self.g.values[x].batched {
                    return Err(at.err("reduction over the batch axis"));
                }
                let rop = if op == "ReduceMean" {
                    ReduceOp::Mean
                } else {
                    ReduceOp::Sum
                };
                self.add(
                    &at,
                    Op::Reduce {
                        axes,
                        op: rop,
                        keepdims: at.int("keepdims", 1) != 0,
                    },
                    vec![x],
                )?;
            }
            "Gemm" => {
                at.only(&["alpha", "beta", "transA", "transB"])?;
                let a = self.value(&at, 0)?;
                let b = self.value(&at, 1)?;
                let mut ins = vec![a, b];
                if self.opt_input(&at, 2).is_some() {
                    ins.push(self.value(&at, 2)?);
                }
                let g = Op::Gemm {
                    alpha: at.float("alpha", 1.0),
                    beta: at.float("beta", 1.0),
                    trans_a: at.int("transA", 0) != 0,
                    trans_b: at.int("transB", 0) != 0,
                };
                self.add(&at, g, ins)?;
            }
            "MatMul" => {
                at.only(&[])?;
                let a = self.value(&at, 0)?;
                let b = self.value(&at, 1)?;
                if self.g.values[a].shape.len() < 2 || self.g.values[b].shape.len() < 2 {
                    return Err(at.err("MatMul with a 1-D operand is not supported"));
                }
                self.add(&at, Op::MatMul, vec![a, b])?;
            }
            "Transpose" => {
                at.only(&["perm"])?;
                let x = self.value(&at, 0)?;
                let rank = self.g.values[x].shape.len();
                let perm: Vec<usize> = match at.ints("perm") {
                    Some(p) => p
                        .iter()
                        .map(|&v| norm_axis(v, rank).ok_or_else(|| at.err("perm out of range")))
                        .collect::<Result<_, _>>()?,
                    None => (0..rank).rev().collect(),
                };
                self.add(&at, Op::Transpose { perm }, vec![x])?;
            }
            "Resize" | "Upsample" => self.resize(&at)?,
            "Pad" => {
                at.only(&["mode", "pads", "value"])?;
                let x = self.value(&at, 0)?;
                let rank = self.g.values[x].shape.len();
                let mode = match at.string("mode", "constant").as_str() {
                    "constant" => PadMode::Constant,
                    "reflect" => PadMode::Reflect,
                    "edge" => PadMode::Edge,
                    o => return Err(at.err(format!("mode `{o}` is not supported"))),
                };
                let (raw, value) = if self.opset >= 11 {
                    let p = self
                        .lit_ints(&at, 1)?
                        .ok_or_else(|| at.err("missing pads"))?;
                    let v = self
                        .const_floats(&at, 2)?
                        .and_then(|v| v.first().copied())
                        .unwrap_or(0.0);
                    (p, v)
                } else {
                    (
                        at.ints("pads").ok_or_else(|| at.err("missing pads"))?,
                        at.float("value", 0.0),
                    )
                };
                let axes: Vec<usize> = match self.lit_ints(&at, 3)? {
                    Some(a) => a
                        .iter()
                        .map(|&v| norm_axis(v, rank).ok_or_else(|| at.err("axis out of range")))
                        .collect::<Result<_, _>>()?,
                    None => (0..rank).collect(),
                };
                if raw.len() != 2 * axes.len() {
                    return Err(at.err(format!("{} pads for {} axes", raw.len(), axes.len())));
                }
                let mut pads = vec![(0usize, 0usize); rank];
                for (k, &ax) in axes.iter().enumerate() {
                    let (b, e) = (raw[k], raw[k + axes.len()]);
                    if b < 0 || e < 0 {
                        return Err(at.err("negative pads (cropping) are not supported"));
                    }
                    pads[ax] = (b as usize, e as usize);
                }
                if self.g.values[x].batched && pads[0] != (0, 0) {
                    return Err(at.err("padding the batch axis"));
                }
                if mode == PadMode::Reflect {
                    let s = &self.g.values[x].shape;
                    if pads
                        .iter()
                        .zip(s)
                        .any(|(&(b, e), &d)| b.max(e) >= d && (b, e) != (0, 0))
                    {
                        return Err(at.err("reflect padding must be smaller than the axis"));
                    }
                }
                self.add(&at, Op::Pad { pads, mode, value }, vec![x])?;
            }
            "Softmax" | "LogSoftmax" => {
                at.only(&["axis"])?;
                let x = self.value(&at, 0)?;
                let rank = self.g.values[x].shape.len();
                let legacy = self.opset < 13;
                let a = at.int("axis", if legacy { 1 } else { -1 });
                let axis =
                    norm_axis(a, rank).ok_or_else(|| at.err(format!("axis {a} out of range")))?;
                if legacy && axis == 0 && self.g.values[x].batched {
                    return Err(at.err("legacy softmax over the batch axis"));
                }
                self.add(
                    &at,
                    Op::Softmax {
                        axis,
                        log: op == "LogSoftmax",
                        legacy: legacy && axis + 1 < rank,
                    },
                    vec![x],
                )?;
            }
            _ => {
                return Err(OnnxError::UnsupportedOp {
                    node: at.name.clone(),
                    op: node.op_type.clone(),
                    domain: if node.domain.is_empty() {
                        "ai.onnx".into()
                    } else {
                        node.domain.clone()
                    },
                });
            }
        }
        Ok(())
    }

    /// Reshape-like op on a constant (folded) or a computed value (IR node).
    fn reshape_like(&mut self, at: &Attrs, e: Entry, rule: ReshapeRule) -> Result<(), OnnxError> {
        match e {
            Entry::Const(c) => {
                let shape = super::shape::reshape_target(&rule, &c.shape, 1)
                    .map_err(|s| s.at_node(&at.name))?;
                self.set_out(
                    at.node,
                    Entry::Const(Const {
                        shape,
                        data: c.data,
                    }),
                );
                Ok(())
            }
            Entry::Value(v) => self.add(at, Op::Reshape(rule), vec![v]),
        }
    }

    fn resize(&mut self, at: &Attrs) -> Result<(), OnnxError> {
        let upsample = at.node.op_type == "Upsample";
        at.only(&[
            "mode",
            "coordinate_transformation_mode",
            "nearest_mode",
            "cubic_coeff_a",
            "exclude_outside",
            "extrapolation_value",
            "antialias",
            "axes",
            "keep_aspect_ratio_policy",
            "scales",
        ])?;
        let x = self.value(at, 0)?;
        let xs = self.g.values[x].shape.clone();
        if xs.len() != 4 {
            return Err(at.err(format!("only 4-D NCHW inputs are supported (shape {xs:?})")));
        }
        let mode_s = at.string("mode", "nearest");
        let coord_s = at.string(
            "coordinate_transformation_mode",
            if upsample { "asymmetric" } else { "half_pixel" },
        );
        let coord = match coord_s.as_str() {
            "half_pixel" => CoordTransform::HalfPixel,
            "pytorch_half_pixel" => CoordTransform::PytorchHalfPixel,
            "align_corners" => CoordTransform::AlignCorners,
            "asymmetric" => CoordTransform::Asymmetric,
            o => {
                return Err(at.err(format!(
                    "coordinate_transformation_mode `{o}` is not supported"
                )));
            }
        };
        let nearest = match at
            .string(
                "nearest_mode",
                if upsample {
                    "floor"
                } else {
                    "round_prefer_floor"
                },
            )
            .as_str()
        {
            "round_prefer_floor" => NearestMode::RoundPreferFloor,
            "round_prefer_ceil" => NearestMode::RoundPreferCeil,
            "floor" => NearestMode::Floor,
            "ceil" => NearestMode::Ceil,
            o => return Err(at.err(format!("nearest_mode `{o}` is not supported"))),
        };
        let mode = match mode_s.as_str() {
            "nearest" => ResizeMode::Nearest(nearest),
            "linear" | "bilinear" => ResizeMode::Linear,
            o => return Err(at.err(format!("mode `{o}` is not supported (nearest, linear are)"))),
        };
        if at.int("exclude_outside", 0) != 0 {
            return Err(at.err("exclude_outside=1 is not supported"));
        }
        if at.int("antialias", 0) != 0 {
            return Err(at.err("antialias=1 is not supported"));
        }
        if at.string("keep_aspect_ratio_policy", "stretch") != "stretch" {
            return Err(at.err("keep_aspect_ratio_policy other than stretch is not supported"));
        }
        if let Some(axes) = at.ints("axes") {
            let norm: Vec<Option<usize>> = axes.iter().map(|&a| norm_axis(a, 4)).collect();
            if norm != [Some(2), Some(3)] {
                return Err(at.err(format!("axes {axes:?}: only [2, 3] is supported")));
            }
        }
        let axes_given = at.ints("axes").is_some();
        let (scales_idx, sizes_idx) = if upsample { (1, usize::MAX) } else { (2, 3) };
        let scales = if upsample && at.find("scales").is_some() {
            at.find("scales").map(|a| a.floats.clone())
        } else {
            self.const_floats(at, scales_idx)?
        };
        let sizes = if sizes_idx == usize::MAX {
            None
        } else {
            self.const_ints(at, sizes_idx)?
        };
        let size = match (
            scales.filter(|s| !s.is_empty()),
            sizes.filter(|s| !s.is_empty()),
        ) {
            (Some(s), None) => {
                let s = if axes_given {
                    vec![1.0, 1.0, s[0], *s.get(1).unwrap_or(&1.0)]
                } else {
                    s
                };
                if s.len() != 4 || s[0] != 1.0 || s[1] != 1.0 {
                    return Err(at.err(format!(
                        "scales {s:?}: only H/W scaling of NCHW is supported"
                    )));
                }
                ResizeSize::Scales([s[2], s[3]])
            }
            (None, Some(z)) => {
                let z = if axes_given {
                    vec![
                        SymInt::BATCH,
                        SymInt::lit(xs[1] as i64),
                        z[0],
                        *z.get(1).unwrap_or(&SymInt::lit(1)),
                    ]
                } else {
                    z
                };
                let hw: Vec<i64> = z[2..].iter().filter_map(|s| s.as_lit()).collect();
                let batch_ok =
                    z[0] == SymInt::BATCH || (z[0] == SymInt::lit(1) && !self.g.values[x].batched);
                if z.len() != 4
                    || hw.len() != 2
                    || z[1] != SymInt::lit(xs[1] as i64)
                    || !(batch_ok || z[0] == SymInt::lit(1))
                    || hw.iter().any(|&v| v <= 0)
                {
                    return Err(at.err(format!(
                        "sizes {z:?}: only H/W resizing of NCHW is supported"
                    )));
                }
                ResizeSize::Sizes([hw[0] as usize, hw[1] as usize])
            }
            _ => return Err(at.err("exactly one of scales/sizes must be given")),
        };
        self.add(at, Op::Resize { mode, coord, size }, vec![x])
    }

    /// Fold a BN into the Conv producing `xname` when that Conv output feeds only the BN and the
    /// Conv's weights are not shared. Returns false when it does not apply.
    fn try_fold_bn(&mut self, xname: &str, bn: &NodeProto, scale: &[f32], shift: &[f32]) -> bool {
        let Some(Entry::Value(v)) = self.entries.get(xname).cloned() else {
            return false;
        };
        let ValueKind::Node(nid) = self.g.values[v].kind else {
            return false;
        };
        if !matches!(self.g.nodes[nid].op, Op::Conv { .. })
            || self.consumers.get(xname).copied().unwrap_or(0) != 1
            || self.g.outputs.contains(&v)
        {
            return false;
        }
        let ins = self.g.nodes[nid].inputs.clone();
        let m = self.g.values[ins[1]].shape[0];
        if m != scale.len() {
            return false;
        }
        // The weight (and bias) must be params used by this conv only.
        let exclusive = |vid: ValueId, me: &Self| -> Option<usize> {
            let ValueKind::Param(p) = me.g.values[vid].kind else {
                return None;
            };
            let uses =
                me.g.nodes
                    .iter()
                    .filter(|n| n.inputs.contains(&vid))
                    .count();
            let onnx_uses = me
                .consumers
                .get(&me.g.values[vid].name)
                .copied()
                .unwrap_or(0);
            (uses == 1 && onnx_uses <= 1).then_some(p)
        };
        let Some(wp) = exclusive(ins[1], self) else {
            return false;
        };
        let bp = match ins.get(2) {
            Some(&b) => match exclusive(b, self) {
                Some(p) => Some(p),
                None => return false,
            },
            None => None,
        };
        let per = self.g.params[wp].data.len() / m;
        for (o, chunk) in self.g.params[wp].data.chunks_mut(per).enumerate() {
            for w in chunk {
                *w = (*w as f64 * scale[o] as f64) as f32;
            }
        }
        match bp {
            Some(p) => {
                for (o, b) in self.g.params[p].data.iter_mut().enumerate() {
                    *b = (*b as f64 * scale[o] as f64 + shift[o] as f64) as f32;
                }
            }
            None => {
                let name = format!("{}.folded_bias", self.g.nodes[nid].name);
                let b = self.g.add_param(name, vec![m], shift.to_vec());
                self.g.nodes[nid].inputs.push(b);
            }
        }
        if let Some(o) = bn.output.first() {
            self.g.values[v].name = o.clone();
            self.entries.insert(o.clone(), Entry::Value(v));
        }
        true
    }
}

fn fold_binary(at: &Attrs, op: Binary, x: Const, y: Const) -> Result<Const, OnnxError> {
    let shape = super::shape::broadcast(&x.shape, &y.shape).map_err(|e| e.at_node(&at.name))?;
    let n: usize = shape.iter().product();
    let idx = |s: &[usize], o: usize| -> usize {
        // Broadcast index of output flat `o` into shape `s` (right-aligned).
        let ost = strides_of(&shape);
        let st = strides_of(s);
        let off = shape.len() - s.len();
        let mut src = 0;
        for (k, &d) in s.iter().enumerate() {
            let i = (o / ost[k + off]) % shape[k + off];
            if d != 1 {
                src += i * st[k];
            }
        }
        src
    };
    let data = match (&x.data, &y.data) {
        (CData::I(a), CData::I(b)) => {
            let mut out = Vec::with_capacity(n);
            for o in 0..n {
                let (p, q) = (a[idx(&x.shape, o)], b[idx(&y.shape, o)]);
                let r = match op {
                    Binary::Add => SymInt {
                        coef: p.coef + q.coef,
                        offset: p.offset + q.offset,
                    },
                    Binary::Sub => SymInt {
                        coef: p.coef - q.coef,
                        offset: p.offset - q.offset,
                    },
                    Binary::Mul => match (p.as_lit(), q.as_lit()) {
                        (Some(k), _) => SymInt {
                            coef: q.coef * k,
                            offset: q.offset * k,
                        },
                        (_, Some(k)) => SymInt {
                            coef: p.coef * k,
                            offset: p.offset * k,
                        },
                        _ => return Err(at.err("product of two batch-dependent values")),
                    },
                    _ => match q.as_lit() {
                        Some(k) if k != 0 && p.coef % k == 0 && p.offset % k == 0 => SymInt {
                            coef: p.coef / k,
                            offset: p.offset / k,
                        },
                        Some(k) if k != 0 && p.coef == 0 => SymInt::lit(p.offset.div_euclid(k)),
                        _ => return Err(at.err(
                            "integer division that depends on the batch size or divides by zero",
                        )),
                    },
                };
                out.push(r);
            }
            CData::I(out)
        }
        _ => {
            let to_f = |c: &Const| -> Result<Vec<f32>, OnnxError> {
                match &c.data {
                    CData::F(v) => Ok(v.clone()),
                    CData::I(v) => v
                        .iter()
                        .map(|s| {
                            s.as_lit()
                                .map(|x| x as f32)
                                .ok_or_else(|| at.err("batch-dependent float"))
                        })
                        .collect(),
                }
            };
            let (a, b) = (to_f(&x)?, to_f(&y)?);
            CData::F(
                (0..n)
                    .map(|o| {
                        let (p, q) = (a[idx(&x.shape, o)], b[idx(&y.shape, o)]);
                        match op {
                            Binary::Add => p + q,
                            Binary::Sub => p - q,
                            Binary::Mul => p * q,
                            Binary::Div => p / q,
                            Binary::Max => p.max(q),
                            Binary::Min => p.min(q),
                        }
                    })
                    .collect(),
            )
        }
    };
    Ok(Const { shape, data })
}

/// Translate a parsed model.
pub fn import_model(model: &ModelProto, origin: &str) -> Result<Graph, OnnxError> {
    let mut opset = None;
    for o in &model.opset_import {
        if o.domain.is_empty() || o.domain == "ai.onnx" {
            opset = Some(o.version);
        }
    }
    let opset = opset.unwrap_or(0);
    if !(OPSET_MIN..=OPSET_MAX).contains(&opset) {
        return Err(OnnxError::Opset {
            origin: origin.to_string(),
            domain: "ai.onnx".into(),
            version: opset,
        });
    }
    let graph = model.graph.as_ref().ok_or_else(|| OnnxError::NoGraph {
        origin: origin.to_string(),
    })?;
    let mut imp = Importer {
        g: Graph {
            opset,
            ..Graph::default()
        },
        entries: HashMap::new(),
        materialized: HashMap::new(),
        consumers: HashMap::new(),
        opset,
        _model: model,
    };
    for n in &graph.node {
        for i in n.input.iter().filter(|s| !s.is_empty()) {
            *imp.consumers.entry(i.clone()).or_insert(0) += 1;
        }
    }
    for o in &graph.output {
        *imp.consumers.entry(o.name.clone()).or_insert(0) += 1;
    }
    for t in &graph.initializer {
        imp.entries
            .insert(t.name.clone(), Entry::Const(tensor_to_const(t)?));
    }
    if !graph.sparse_initializer.is_empty() {
        return Err(OnnxError::Graph(
            "sparse initializers are not supported".into(),
        ));
    }
    for inp in &graph.input {
        if imp.entries.contains_key(&inp.name) {
            continue; // initializer listed as input (IR < 4 style): a parameter
        }
        let err = |what: String| OnnxError::Input {
            name: inp.name.clone(),
            what,
        };
        let Some(onnx_protobuf::type_proto::Value::TensorType(tt)) =
            inp.type_.as_ref().and_then(|t| t.value.as_ref())
        else {
            return Err(err("not a tensor".into()));
        };
        if tt.elem_type != DT_FLOAT {
            return Err(err(format!(
                "element type {} (only float32 inputs are supported)",
                tt.elem_type
            )));
        }
        let dims = tt.shape.as_ref().map(|s| s.dim.clone()).unwrap_or_default();
        if dims.is_empty() {
            return Err(err(
                "no shape (a static shape apart from the batch axis is required)".into(),
            ));
        }
        let mut shape = vec![1];
        for (i, d) in dims.iter().enumerate().skip(1) {
            match &d.value {
                Some(onnx_protobuf::tensor_shape_proto::dimension::Value::DimValue(v))
                    if *v > 0 =>
                {
                    shape.push(*v as usize)
                }
                _ => {
                    return Err(err(format!(
                        "axis {i} is dynamic or empty: only the batch axis (0) may be dynamic"
                    )));
                }
            }
        }
        let v = imp.g.add_input(inp.name.clone(), shape);
        imp.entries.insert(inp.name.clone(), Entry::Value(v));
    }
    if imp.g.inputs.is_empty() {
        return Err(OnnxError::Graph(
            "the model has no (non-initializer) input".into(),
        ));
    }
    for (i, n) in graph.node.iter().enumerate() {
        imp.node(n, i)?;
    }
    for o in &graph.output {
        match imp.entries.get(&o.name) {
            Some(Entry::Value(v)) => imp.g.outputs.push(*v),
            Some(Entry::Const(_)) => {
                return Err(OnnxError::Graph(format!(
                    "output `{}` is a constant (does not depend on the input)",
                    o.name
                )));
            }
            None => {
                return Err(OnnxError::Graph(format!(
                    "output `{}` is never produced",
                    o.name
                )));
            }
        }
    }
    let g = prune(imp.g);
    check_batch_agnostic(&g)?;
    Ok(g)
}

/// Drop nodes and params the outputs do not depend on (e.g. a BN's unused original bias).
fn prune(g: Graph) -> Graph {
    let mut live = vec![false; g.values.len()];
    for &o in &g.outputs {
        live[o] = true;
    }
    for n in g.nodes.iter().rev() {
        if live[n.output] {
            for &i in &n.inputs {
                live[i] = true;
            }
        }
    }
    for &i in &g.inputs {
        live[i] = true;
    }
    let mut out = Graph {
        opset: g.opset,
        ..Graph::default()
    };
    let mut map = vec![usize::MAX; g.values.len()];
    for &i in &g.inputs {
        let v = &g.values[i];
        map[i] = out.add_input(v.name.clone(), v.shape.clone());
    }
    for p in &g.params {
        if live[p.value] {
            map[p.value] = out.add_param(p.name.clone(), p.shape.clone(), p.data.clone());
        }
    }
    for n in &g.nodes {
        if !live[n.output] {
            continue;
        }
        let nid = out.nodes.len();
        let v = &g.values[n.output];
        let vid = out.add_value(
            v.name.clone(),
            ValueKind::Node(nid),
            v.shape.clone(),
            v.batched,
        );
        map[n.output] = vid;
        out.nodes.push(super::ir::Node {
            name: n.name.clone(),
            op: n.op.clone(),
            inputs: n.inputs.iter().map(|&i| map[i]).collect(),
            output: vid,
        });
    }
    out.outputs = g.outputs.iter().map(|&o| map[o]).collect();
    out
}

/// Re-infer every shape at batch 2: every batched value must hold twice the elements it holds
/// at batch 1 and every output must carry the batch on axis 0; otherwise the model hard-codes
/// its batch size somewhere (e.g. a Reshape to a literal `[1, -1]`).
fn check_batch_agnostic(g: &Graph) -> Result<(), OnnxError> {
    let mut shapes: Vec<Vec<usize>> = g.values.iter().map(|v| v.shape.clone()).collect();
    for &i in &g.inputs {
        shapes[i][0] = 2;
    }
    for n in &g.nodes {
        let ins: Vec<&[usize]> = n.inputs.iter().map(|&i| shapes[i].as_slice()).collect();
        let s = super::shape::infer(&n.op, &ins, 2).map_err(|e| {
            OnnxError::Graph(format!(
                "node `{}` does not accept a batch of 2 (hard-coded batch size?): {e}",
                n.name
            ))
        })?;
        let v = &g.values[n.output];
        let (c1, c2) = (
            v.shape.iter().product::<usize>(),
            s.iter().product::<usize>(),
        );
        let want = if v.batched { 2 * c1 } else { c1 };
        let mut axis0 = v.shape.clone();
        if v.batched && !axis0.is_empty() {
            axis0[0] *= 2;
        }
        if c2 != want || (g.outputs.contains(&n.output) && s != axis0) {
            return Err(OnnxError::Graph(format!(
                "node `{}`: output shape {s:?} at batch 2 is not the batch-1 shape {:?} with a doubled batch axis 0",
                n.name, v.shape
            )));
        }
        shapes[n.output] = s;
    }
    Ok(())
}
