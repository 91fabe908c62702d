//! Import behaviour: folding, BN fusion, clear errors.

use super::*;
use crate::runtime::ir::Op;
use crate::runtime::onnx::{self, OnnxError};

fn load(name: &str) -> crate::runtime::ir::Graph {
    let (_, list) = models();
    let m = list
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("model {name}"));
    onnx::load(&m.path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn shape_arithmetic_folds_to_a_batch_symbolic_reshape() {
    let g = load("shape_reshape");
    let kinds: Vec<&str> = g.nodes.iter().map(|n| n.op.kind_name()).collect();
    // Shape/Gather/Unsqueeze/Concat/Cast/Slice/ConstantOfShape/Mul all vanish at import.
    assert_eq!(
        kinds,
        [
            "Conv", "Relu", "MaxPool", "Reshape", "Gemm", "Reshape", "Reshape"
        ],
        "{kinds:?}"
    );
    let Op::Reshape(crate::runtime::ir::ReshapeRule::Spec { dims, .. }) = &g.nodes[3].op else {
        panic!("reshape rule")
    };
    assert_eq!(dims[0], crate::runtime::ir::SymInt::BATCH);
    assert_eq!(g.values[g.outputs[0]].shape, vec![1, 3]);
}

#[test]
fn batchnorm_folds_into_exclusive_convs_only() {
    let g = load("resnet_block");
    let counts = g.op_counts();
    let get = |k: &str| counts.iter().find(|(n, _)| *n == k).map_or(0, |(_, c)| *c);
    // The input BN (no conv before it) stays as scale + shift; the two after convs fold.
    assert_eq!(get("Mul"), 1, "{counts:?}");
    assert_eq!(get("Add"), 2, "{counts:?}");
    assert_eq!(get("Conv"), 4, "{counts:?}");
    // The bias-less conv got a folded bias.
    assert!(g.params.iter().any(|p| p.name.ends_with(".folded_bias")));
    assert!(g.param_count() > 0 && g.flops_per_image() > 0);
}

/// Minimal ModelProto builder for error cases.
fn model_with(op: &str, opset: i64, attrs: Vec<onnx_protobuf::AttributeProto>) -> Vec<u8> {
    use onnx_protobuf::*;
    use protobuf::Message;
    let mut m = ModelProto::new();
    m.ir_version = 8;
    let mut o = OperatorSetIdProto::new();
    o.version = opset;
    m.opset_import.push(o);
    let mut g = GraphProto::new();
    let mut vi = ValueInfoProto::new();
    vi.name = "x".into();
    let mut tt = type_proto::Tensor::new();
    tt.elem_type = 1;
    let mut sh = TensorShapeProto::new();
    for d in [1i64, 2] {
        let mut dim = tensor_shape_proto::Dimension::new();
        dim.value = Some(tensor_shape_proto::dimension::Value::DimValue(d));
        sh.dim.push(dim);
    }
    tt.shape = protobuf::MessageField::some(sh);
    let mut tp = TypeProto::new();
    tp.value = Some(type_proto::Value::TensorType(tt));
    vi.type_ = protobuf::MessageField::some(tp);
    g.input.push(vi);
    let mut n = NodeProto::new();
    n.op_type = op.into();
    n.name = "the_node".into();
    n.input.push("x".into());
    n.output.push("y".into());
    n.attribute = attrs;
    g.node.push(n);
    let mut out = ValueInfoProto::new();
    out.name = "y".into();
    g.output.push(out);
    m.graph = protobuf::MessageField::some(g);
    m.write_to_bytes().expect("serialize")
}

#[test]
fn unsupported_operator_names_node_and_op() {
    let e = onnx::import_bytes(&model_with("Einsum", 17, vec![]), "t.onnx").unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, OnnxError::UnsupportedOp { .. }), "{msg}");
    assert!(msg.contains("the_node") && msg.contains("Einsum"), "{msg}");
}

#[test]
fn unsupported_attribute_is_named() {
    let mut a = onnx_protobuf::AttributeProto::new();
    a.name = "fancy".into();
    a.type_ = protobuf::EnumOrUnknown::new(onnx_protobuf::attribute_proto::AttributeType::INT);
    let e = onnx::import_bytes(&model_with("Relu", 17, vec![a]), "t.onnx").unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("the_node") && msg.contains("Relu") && msg.contains("fancy"),
        "{msg}"
    );
}

#[test]
fn opsets_outside_11_to_21_are_refused() {
    for v in [9, 22] {
        let e = onnx::import_bytes(&model_with("Relu", v, vec![]), "t.onnx").unwrap_err();
        assert!(
            matches!(e, OnnxError::Opset { version, .. } if version == v),
            "{e}"
        );
    }
    assert!(onnx::import_bytes(&model_with("Relu", 11, vec![]), "t.onnx").is_ok());
    assert!(onnx::import_bytes(&model_with("Relu", 21, vec![]), "t.onnx").is_ok());
}

#[test]
fn garbage_and_external_data_are_errors() {
    assert!(matches!(
        onnx::import_bytes(b"\xff\xff\xffnot onnx", "junk.onnx"),
        Err(OnnxError::Parse { .. })
    ));
    let mut t = onnx_protobuf::TensorProto::new();
    t.name = "w".into();
    t.data_type = 1;
    t.dims = vec![2];
    let mut kv = onnx_protobuf::StringStringEntryProto::new();
    kv.key = "location".into();
    kv.value = "w.bin".into();
    t.external_data.push(kv);
    let mut m: onnx_protobuf::ModelProto =
        protobuf::Message::parse_from_bytes(&model_with("Relu", 17, vec![])).expect("parse");
    if let Some(g) = m.graph.as_mut() {
        g.initializer.push(t);
    }
    let e = onnx::import_model(&m, "ext.onnx").unwrap_err();
    assert!(e.to_string().contains("external data"), "{e}");
}
