//! IR -> ONNX export: a [`Graph`] (with its current, e.g. trained, parameters) as a
//! `ModelProto` at opset 13 that onnxruntime and adverse's own importer load.
//!
//! Every IR op maps to one standard ONNX node (Affine to a Mul + Add pair), parameters become
//! float initializers, and axis 0 of every graph input and output is the symbolic batch `N`.
//! Ops whose ONNX form would need information the IR folded away (legacy-softmax coercion,
//! symbolic reshapes other than "keep the batch") are refused with the node name rather than
//! exported approximately.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use onnx_protobuf::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
    tensor_proto::DataType, tensor_shape_proto, type_proto,
};
use protobuf::{EnumOrUnknown, Message, MessageField};

use super::backend::{
    Binary, CoordTransform, NearestMode, PadMode, PoolKind, ReduceOp, ResizeMode, Unary,
};
use super::ir::{Graph, Op, PadSpec, ReshapeRule, ResizeSize, ValueId};

/// The opset exported models declare.
pub const EXPORT_OPSET: i64 = 13;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("node `{node}` ({op}): cannot export: {what}")]
    Unsupported {
        node: String,
        op: &'static str,
        what: String,
    },
    #[error("{0} parameter tensors given for a graph with {1}")]
    ParamCount(usize, usize),
    #[error("parameter `{name}`: {got} values for shape {shape:?}")]
    ParamLen {
        name: String,
        got: usize,
        shape: Vec<usize>,
    },
    #[error("cannot write {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("serialising the model: {0}")]
    Proto(#[from] protobuf::Error),
}

fn attr_i(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: EnumOrUnknown::new(AttributeType::INT),
        i: v,
        ..Default::default()
    }
}
fn attr_f(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: EnumOrUnknown::new(AttributeType::FLOAT),
        f: v,
        ..Default::default()
    }
}
fn attr_ints(name: &str, v: &[usize]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: EnumOrUnknown::new(AttributeType::INTS),
        ints: v.iter().map(|&x| x as i64).collect(),
        ..Default::default()
    }
}
fn attr_s(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: EnumOrUnknown::new(AttributeType::STRING),
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn f32_tensor(name: &str, shape: &[usize], data: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: shape.iter().map(|&d| d as i64).collect(),
        data_type: DataType::FLOAT as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}
fn i64_tensor(name: &str, data: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![data.len() as i64],
        data_type: DataType::INT64 as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn value_info(name: &str, shape: &[usize], batched: bool) -> ValueInfoProto {
    let dim = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| tensor_shape_proto::Dimension {
            value: Some(if i == 0 && batched {
                tensor_shape_proto::dimension::Value::DimParam("N".into())
            } else {
                tensor_shape_proto::dimension::Value::DimValue(d as i64)
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        type_: MessageField::some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::FLOAT as i32,
                shape: MessageField::some(TensorShapeProto {
                    dim,
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Builds the node list, inventing unique names for constants and helper values.
struct Emitter {
    nodes: Vec<NodeProto>,
    consts: Vec<TensorProto>,
    used: HashSet<String>,
}

impl Emitter {
    fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 1;
        while !self.used.insert(name.clone()) {
            name = format!("{base}_{k}");
            k += 1;
        }
        name
    }
    fn const_i64(&mut self, base: &str, v: &[i64]) -> String {
        let n = self.fresh(base);
        self.consts.push(i64_tensor(&n, v));
        n
    }
    fn const_f32(&mut self, base: &str, v: f32) -> String {
        let n = self.fresh(base);
        self.consts.push(f32_tensor(&n, &[], &[v]));
        n
    }
    fn node(
        &mut self,
        name: &str,
        op: &str,
        inputs: Vec<String>,
        output: String,
        attrs: Vec<AttributeProto>,
    ) {
        self.nodes.push(NodeProto {
            name: name.into(),
            op_type: op.into(),
            input: inputs,
            output: vec![output],
            attribute: attrs,
            ..Default::default()
        });
    }
}

fn pads4(p: &PadSpec) -> Result<Vec<AttributeProto>, String> {
    Ok(match p {
        PadSpec::Explicit(p) => vec![attr_ints("pads", p)],
        PadSpec::SameUpper => vec![attr_s("auto_pad", "SAME_UPPER")],
        PadSpec::SameLower => vec![attr_s("auto_pad", "SAME_LOWER")],
    })
}

/// Export `graph` with `params` (host copies in `graph.params` order; `None` = the graph's own).
pub fn to_model_proto(
    graph: &Graph,
    params: Option<&[Vec<f32>]>,
    name: &str,
) -> Result<ModelProto, ExportError> {
    if let Some(p) = params
        && p.len() != graph.params.len()
    {
        return Err(ExportError::ParamCount(p.len(), graph.params.len()));
    }
    // Unique ONNX names for every IR value.
    let mut used = HashSet::new();
    let mut names: HashMap<ValueId, String> = HashMap::new();
    for (i, v) in graph.values.iter().enumerate() {
        let base = if v.name.is_empty() {
            format!("v{i}")
        } else {
            v.name.clone()
        };
        let mut n = base.clone();
        let mut k = 1;
        while !used.insert(n.clone()) {
            n = format!("{base}_{k}");
            k += 1;
        }
        names.insert(i, n);
    }
    let nm = |v: ValueId| names[&v].clone();
    let mut e = Emitter {
        nodes: Vec::new(),
        consts: Vec::new(),
        used,
    };
    let mut initializers = Vec::new();
    for (i, p) in graph.params.iter().enumerate() {
        let data = params.map_or(p.data.as_slice(), |ps| ps[i].as_slice());
        if data.len() != p.shape.iter().product::<usize>() {
            return Err(ExportError::ParamLen {
                name: p.name.clone(),
                got: data.len(),
                shape: p.shape.clone(),
            });
        }
        initializers.push(f32_tensor(&nm(p.value), &p.shape, data));
    }
    for node in &graph.nodes {
        let unsupported = |what: &str| ExportError::Unsupported {
            node: node.name.clone(),
            op: node.op.kind_name(),
            what: what.to_string(),
        };
        let ins: Vec<String> = node.inputs.iter().map(|&v| nm(v)).collect();
        let out = nm(node.output);
        let nn = node.name.as_str();
        match &node.op {
            Op::Conv {
                kernel,
                stride,
                dilation,
                pad,
                groups,
            } => {
                let mut a = vec![
                    attr_ints("kernel_shape", kernel),
                    attr_ints("strides", stride),
                    attr_ints("dilations", dilation),
                    attr_i("group", *groups as i64),
                ];
                a.extend(pads4(pad).map_err(|w| unsupported(&w))?);
                e.node(nn, "Conv", ins, out, a);
            }
            Op::ConvTranspose {
                kernel,
                stride,
                dilation,
                pads,
                output_padding,
                groups,
                output_shape,
                same_upper,
            } => {
                let mut a = vec![
                    attr_ints("kernel_shape", kernel),
                    attr_ints("strides", stride),
                    attr_ints("dilations", dilation),
                    attr_ints("output_padding", output_padding),
                    attr_i("group", *groups as i64),
                ];
                match (output_shape, same_upper) {
                    (None, None) => a.push(attr_ints("pads", pads)),
                    (None, Some(up)) => a.push(attr_s(
                        "auto_pad",
                        if *up { "SAME_UPPER" } else { "SAME_LOWER" },
                    )),
                    (Some(s), _) => a.push(attr_ints("output_shape", s)),
                }
                e.node(nn, "ConvTranspose", ins, out, a);
            }
            Op::Unary(u) => {
                let (op, attrs, extra): (&str, Vec<AttributeProto>, Vec<String>) = match *u {
                    Unary::Relu => ("Relu", vec![], vec![]),
                    Unary::LeakyRelu { alpha } => {
                        ("LeakyRelu", vec![attr_f("alpha", alpha)], vec![])
                    }
                    Unary::Sigmoid => ("Sigmoid", vec![], vec![]),
                    Unary::Tanh => ("Tanh", vec![], vec![]),
                    Unary::Neg => ("Neg", vec![], vec![]),
                    Unary::Exp => ("Exp", vec![], vec![]),
                    Unary::Log => ("Log", vec![], vec![]),
                    Unary::Sqrt => ("Sqrt", vec![], vec![]),
                    Unary::Abs => ("Abs", vec![], vec![]),
                    Unary::Sign => ("Sign", vec![], vec![]),
                    Unary::Clip { min, max } => {
                        let lo = e.const_f32(&format!("{nn}_min"), min);
                        let hi = e.const_f32(&format!("{nn}_max"), max);
                        ("Clip", vec![], vec![lo, hi])
                    }
                    Unary::Powf { p } => {
                        let c = e.const_f32(&format!("{nn}_exponent"), p);
                        ("Pow", vec![], vec![c])
                    }
                    Unary::Affine { a, b } => {
                        let ca = e.const_f32(&format!("{nn}_scale"), a);
                        let cb = e.const_f32(&format!("{nn}_shift"), b);
                        let mid = e.fresh(&format!("{nn}_scaled"));
                        e.node(
                            &format!("{nn}_mul"),
                            "Mul",
                            vec![ins[0].clone(), ca],
                            mid.clone(),
                            vec![],
                        );
                        e.node(&format!("{nn}_add"), "Add", vec![mid, cb], out, vec![]);
                        continue;
                    }
                };
                let mut i = ins;
                i.extend(extra);
                e.node(nn, op, i, out, attrs);
            }
            Op::Binary(b) => {
                let op = match b {
                    Binary::Add => "Add",
                    Binary::Sub => "Sub",
                    Binary::Mul => "Mul",
                    Binary::Div => "Div",
                    Binary::Max => "Max",
                    Binary::Min => "Min",
                };
                e.node(nn, op, ins, out, vec![]);
            }
            Op::Pool {
                kind,
                kernel,
                stride,
                dilation,
                pad,
                ceil_mode,
            } => {
                let mut a = vec![
                    attr_ints("kernel_shape", kernel),
                    attr_ints("strides", stride),
                    attr_i("ceil_mode", *ceil_mode as i64),
                ];
                a.extend(pads4(pad).map_err(|w| unsupported(&w))?);
                let op = match kind {
                    PoolKind::Max => {
                        a.push(attr_ints("dilations", dilation));
                        "MaxPool"
                    }
                    PoolKind::Avg { count_include_pad } => {
                        if *dilation != [1, 1] {
                            return Err(unsupported("dilated AveragePool needs opset 19"));
                        }
                        a.push(attr_i("count_include_pad", *count_include_pad as i64));
                        "AveragePool"
                    }
                };
                e.node(nn, op, ins, out, a);
            }
            Op::Reduce { axes, op, keepdims } => {
                let kd = attr_i("keepdims", *keepdims as i64);
                match op {
                    ReduceOp::Mean => e.node(
                        nn,
                        "ReduceMean",
                        ins,
                        out,
                        vec![attr_ints("axes", axes), kd],
                    ),
                    ReduceOp::Sum => {
                        let ax: Vec<i64> = axes.iter().map(|&a| a as i64).collect();
                        let c = e.const_i64(&format!("{nn}_axes"), &ax);
                        let mut i = ins;
                        i.push(c);
                        e.node(nn, "ReduceSum", i, out, vec![kd]);
                    }
                }
            }
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => e.node(
                nn,
                "Gemm",
                ins,
                out,
                vec![
                    attr_f("alpha", *alpha),
                    attr_f("beta", *beta),
                    attr_i("transA", *trans_a as i64),
                    attr_i("transB", *trans_b as i64),
                ],
            ),
            Op::MatMul => e.node(nn, "MatMul", ins, out, vec![]),
            Op::Concat { axis } => {
                e.node(nn, "Concat", ins, out, vec![attr_i("axis", *axis as i64)])
            }
            Op::Slice { axis, start, end } => {
                let s = e.const_i64(&format!("{nn}_starts"), &[*start as i64]);
                let en = e.const_i64(&format!("{nn}_ends"), &[*end as i64]);
                let ax = e.const_i64(&format!("{nn}_axes"), &[*axis as i64]);
                let mut i = ins;
                i.extend([s, en, ax]);
                e.node(nn, "Slice", i, out, vec![]);
            }
            Op::Reshape(rule) => match rule {
                ReshapeRule::Flatten { axis } => {
                    e.node(nn, "Flatten", ins, out, vec![attr_i("axis", *axis as i64)])
                }
                ReshapeRule::Squeeze { axes } | ReshapeRule::Unsqueeze { axes } => {
                    let ax: Vec<i64> = axes.iter().map(|&a| a as i64).collect();
                    let c = e.const_i64(&format!("{nn}_axes"), &ax);
                    let op = if matches!(rule, ReshapeRule::Squeeze { .. }) {
                        "Squeeze"
                    } else {
                        "Unsqueeze"
                    };
                    let mut i = ins;
                    i.push(c);
                    e.node(nn, op, i, out, vec![]);
                }
                ReshapeRule::Spec { dims, allowzero } => {
                    let in_batched = graph.values[node.inputs[0]].batched;
                    let mut shape = Vec::with_capacity(dims.len());
                    for (k, d) in dims.iter().enumerate() {
                        match d.as_lit() {
                            Some(0) if *allowzero => return Err(unsupported("allowzero reshape")),
                            Some(v) => shape.push(v),
                            None if k == 0
                                && *d == super::ir::SymInt::BATCH
                                && in_batched
                                && !*allowzero =>
                            {
                                shape.push(0)
                            }
                            None => {
                                return Err(unsupported(
                                    "a reshape whose size depends on the batch other than keeping it",
                                ));
                            }
                        }
                    }
                    let c = e.const_i64(&format!("{nn}_shape"), &shape);
                    let mut i = ins;
                    i.push(c);
                    e.node(nn, "Reshape", i, out, vec![]);
                }
            },
            Op::Transpose { perm } => {
                e.node(nn, "Transpose", ins, out, vec![attr_ints("perm", perm)])
            }
            Op::Resize { mode, coord, size } => {
                let (m, mut a) = match mode {
                    ResizeMode::Nearest(nmode) => {
                        let s = match nmode {
                            NearestMode::RoundPreferFloor => "round_prefer_floor",
                            NearestMode::RoundPreferCeil => "round_prefer_ceil",
                            NearestMode::Floor => "floor",
                            NearestMode::Ceil => "ceil",
                        };
                        ("nearest", vec![attr_s("nearest_mode", s)])
                    }
                    ResizeMode::Linear => ("linear", vec![]),
                    ResizeMode::Area => {
                        return Err(unsupported("area resize has no ONNX Resize mode"));
                    }
                };
                a.push(attr_s("mode", m));
                a.push(attr_s(
                    "coordinate_transformation_mode",
                    match coord {
                        CoordTransform::HalfPixel => "half_pixel",
                        CoordTransform::PytorchHalfPixel => "pytorch_half_pixel",
                        CoordTransform::AlignCorners => "align_corners",
                        CoordTransform::Asymmetric => "asymmetric",
                    },
                ));
                let roi = e.fresh(&format!("{nn}_roi"));
                e.consts.push(f32_tensor(&roi, &[0], &[]));
                let mut i = ins;
                i.push(roi);
                match size {
                    ResizeSize::Scales([sh, sw]) => {
                        let s = e.fresh(&format!("{nn}_scales"));
                        e.consts.push(f32_tensor(&s, &[4], &[1.0, 1.0, *sh, *sw]));
                        i.push(s);
                    }
                    ResizeSize::Sizes([oh, ow]) => {
                        let in_shape = &graph.values[node.inputs[0]].shape;
                        if graph.values[node.inputs[0]].batched {
                            return Err(unsupported(
                                "fixed-size Resize of a batched input (sizes would pin the batch)",
                            ));
                        }
                        let s = e.fresh(&format!("{nn}_scales"));
                        e.consts.push(f32_tensor(&s, &[0], &[]));
                        let z = e.const_i64(
                            &format!("{nn}_sizes"),
                            &[
                                in_shape[0] as i64,
                                in_shape[1] as i64,
                                *oh as i64,
                                *ow as i64,
                            ],
                        );
                        i.extend([s, z]);
                    }
                }
                e.node(nn, "Resize", i, out, a);
            }
            Op::Pad { pads, mode, value } => {
                let mut p: Vec<i64> = pads.iter().map(|&(b, _)| b as i64).collect();
                p.extend(pads.iter().map(|&(_, a)| a as i64));
                let pc = e.const_i64(&format!("{nn}_pads"), &p);
                let vc = e.const_f32(&format!("{nn}_value"), *value);
                let m = match mode {
                    PadMode::Constant => "constant",
                    PadMode::Reflect => "reflect",
                    PadMode::Edge => "edge",
                };
                let mut i = ins;
                i.extend([pc, vc]);
                e.node(nn, "Pad", i, out, vec![attr_s("mode", m)]);
            }
            Op::Softmax { axis, log, legacy } => {
                if *legacy && *axis + 1 != graph.values[node.inputs[0]].shape.len() {
                    return Err(unsupported("opset < 13 softmax over a flattened tail"));
                }
                let op = if *log { "LogSoftmax" } else { "Softmax" };
                e.node(nn, op, ins, out, vec![attr_i("axis", *axis as i64)]);
            }
        }
    }
    initializers.extend(e.consts);
    let g = GraphProto {
        name: name.into(),
        node: e.nodes,
        initializer: initializers,
        input: graph
            .inputs
            .iter()
            .map(|&v| value_info(&nm(v), &graph.values[v].shape, graph.values[v].batched))
            .collect(),
        output: graph
            .outputs
            .iter()
            .map(|&v| value_info(&nm(v), &graph.values[v].shape, graph.values[v].batched))
            .collect(),
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: 7,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: EXPORT_OPSET,
            ..Default::default()
        }],
        producer_name: "adverse".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: MessageField::some(g),
        ..Default::default()
    })
}

/// Serialise to bytes.
pub fn to_bytes(
    graph: &Graph,
    params: Option<&[Vec<f32>]>,
    name: &str,
) -> Result<Vec<u8>, ExportError> {
    Ok(to_model_proto(graph, params, name)?.write_to_bytes()?)
}

/// Write an `.onnx` file (through a temporary file and a rename, so a crash never leaves half a
/// model behind).
pub fn save(
    graph: &Graph,
    params: Option<&[Vec<f32>]>,
    name: &str,
    path: &Path,
) -> Result<(), ExportError> {
    let bytes = to_bytes(graph, params, name)?;
    let io = |source| ExportError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("onnx.tmp");
    std::fs::write(&tmp, &bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::backend::Backend;
    use crate::runtime::cpu::CpuBackend;
    use crate::runtime::exec::Model;
    use crate::runtime::ir::SymInt;
    use crate::runtime::onnx;

    /// A graph touching most exportable ops; exported and re-imported it must compute the same.
    fn mixed_graph() -> Graph {
        let mut g = Graph::default();
        let x = g.add_input("x", vec![1, 2, 6, 6]);
        let w = g.add_param(
            "w",
            vec![3, 2, 3, 3],
            (0..54)
                .map(|i| ((i * 7 % 11) as f32 - 5.0) / 10.0)
                .collect(),
        );
        let b = g.add_param("b", vec![3], vec![0.1, -0.2, 0.3]);
        let c = g
            .add_node(
                "conv",
                Op::Conv {
                    kernel: [3, 3],
                    stride: [1, 1],
                    dilation: [1, 1],
                    pad: PadSpec::Explicit([1, 0, 1, 0]),
                    groups: 1,
                },
                vec![x, w, b],
            )
            .unwrap();
        let r = g
            .add_node("lrelu", Op::Unary(Unary::LeakyRelu { alpha: 0.1 }), vec![c])
            .unwrap();
        let a = g
            .add_node(
                "affine",
                Op::Unary(Unary::Affine { a: 2.0, b: -0.5 }),
                vec![r],
            )
            .unwrap();
        let cl = g
            .add_node(
                "clip",
                Op::Unary(Unary::Clip {
                    min: -1.0,
                    max: 1.5,
                }),
                vec![a],
            )
            .unwrap();
        let p = g
            .add_node(
                "pool",
                Op::Pool {
                    kind: PoolKind::Avg {
                        count_include_pad: false,
                    },
                    kernel: [2, 2],
                    stride: [2, 2],
                    dilation: [1, 1],
                    pad: PadSpec::Explicit([0; 4]),
                    ceil_mode: true,
                },
                vec![cl],
            )
            .unwrap();
        let s = g
            .add_node(
                "slice",
                Op::Slice {
                    axis: 1,
                    start: 1,
                    end: 3,
                },
                vec![p],
            )
            .unwrap();
        let rs = g
            .add_node(
                "reshape",
                Op::Reshape(ReshapeRule::Spec {
                    dims: vec![SymInt::BATCH, SymInt::lit(-1)],
                    allowzero: false,
                }),
                vec![s],
            )
            .unwrap();
        let red = g
            .add_node(
                "rsum",
                Op::Reduce {
                    axes: vec![1],
                    op: ReduceOp::Sum,
                    keepdims: true,
                },
                vec![rs],
            )
            .unwrap();
        let cat = g
            .add_node("cat", Op::Concat { axis: 1 }, vec![rs, red])
            .unwrap();
        let sm = g
            .add_node(
                "lsm",
                Op::Softmax {
                    axis: 1,
                    log: true,
                    legacy: false,
                },
                vec![cat],
            )
            .unwrap();
        g.outputs.push(sm);
        g
    }

    #[test]
    fn export_then_import_computes_the_same() {
        let b = CpuBackend::new(Some(1));
        let g = mixed_graph();
        let bytes = to_bytes(&g, None, "mixed").unwrap();
        let g2 = onnx::import_bytes(&bytes, "exported").unwrap();
        let x: Vec<f32> = (0..2 * 2 * 36)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0)
            .collect();
        let xt = b.upload(&x, &[2, 2, 6, 6]);
        let y1 = b.download(&Model::new(&b, g).forward(&b, &xt).unwrap()[0]);
        let y2 = b.download(&Model::new(&b, g2).forward(&b, &xt).unwrap()[0]);
        assert_eq!(y1.len(), y2.len());
        for (a, c) in y1.iter().zip(&y2) {
            assert!((a - c).abs() < 1e-5, "{a} vs {c}");
        }
    }

    #[test]
    fn replaced_params_are_exported_and_checked() {
        let g = mixed_graph();
        let mut ps: Vec<Vec<f32>> = g.params.iter().map(|p| p.data.clone()).collect();
        ps[1] = vec![9.0, 9.0, 9.0];
        let g2 = onnx::import_bytes(&to_bytes(&g, Some(&ps), "m").unwrap(), "m").unwrap();
        let bias = g2
            .params
            .iter()
            .find(|p| p.shape == vec![3] && p.data == vec![9.0, 9.0, 9.0]);
        assert!(bias.is_some(), "the replaced bias is in the export");
        ps[1].pop();
        assert!(matches!(
            to_bytes(&g, Some(&ps), "m"),
            Err(ExportError::ParamLen { .. })
        ));
        assert!(matches!(
            to_bytes(&g, Some(&ps[..1]), "m"),
            Err(ExportError::ParamCount(1, 2))
        ));
    }
}
