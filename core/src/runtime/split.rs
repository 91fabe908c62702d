//! Splitting a graph at an intermediate value: the sub-graph that computes a value from the
//! graph's inputs ("forward up to V"), and the one that computes the logits from that value
//! ("forward from V"). Feature-space detectors use both: the features of the last hidden layer
//! and the head that maps (perturbed) features to logits.
//!
//! Sub-graphs are rebuilt value by value (only what the requested outputs need), so they are
//! ordinary [`Graph`]s that either backend executes with the usual executor.

use std::collections::HashSet;

use super::ir::{Graph, Node, Op, ValueId, ValueKind};

/// The sub-graph of `g` computing `outputs` from `inputs` (which become its graph inputs, in
/// that order, keeping their names and batch-1 shapes). Fails when an output depends on a graph
/// input of `g` that is not in `inputs` (e.g. a skip connection around the split point), or
/// when an input is not a batched value.
pub fn subgraph(g: &Graph, inputs: &[ValueId], outputs: &[ValueId]) -> Result<Graph, String> {
    for &i in inputs {
        let v = g
            .values
            .get(i)
            .ok_or_else(|| format!("value {i} is not in the graph"))?;
        if !v.batched {
            return Err(format!(
                "`{}` is not a per-sample (batched) value and cannot be a sub-graph input",
                v.name
            ));
        }
    }
    let stop: HashSet<ValueId> = inputs.iter().copied().collect();
    // Values the outputs need, walking back from them and stopping at the new inputs.
    let mut needed = vec![false; g.values.len()];
    let mut stack: Vec<ValueId> = outputs.to_vec();
    while let Some(v) = stack.pop() {
        if v >= needed.len() {
            return Err(format!("value {v} is not in the graph"));
        }
        if std::mem::replace(&mut needed[v], true) || stop.contains(&v) {
            continue;
        }
        match g.values[v].kind {
            ValueKind::Node(n) => stack.extend(g.nodes[n].inputs.iter().copied()),
            ValueKind::Input(_) => {
                return Err(format!(
                    "the requested outputs depend on the graph input `{}` other than through {}",
                    g.values[v].name,
                    names(g, inputs)
                ));
            }
            ValueKind::Param(_) => {}
        }
    }
    let mut out = Graph {
        opset: g.opset,
        ..Graph::default()
    };
    let mut map = vec![usize::MAX; g.values.len()];
    for &i in inputs {
        map[i] = out.add_input(g.values[i].name.clone(), g.values[i].shape.clone());
    }
    for p in &g.params {
        if needed[p.value] {
            map[p.value] = out.add_param(p.name.clone(), p.shape.clone(), p.data.clone());
        }
    }
    for n in &g.nodes {
        if !needed[n.output] || stop.contains(&n.output) {
            continue;
        }
        let v = &g.values[n.output];
        let nid = out.nodes.len();
        let o = out.add_value(
            v.name.clone(),
            ValueKind::Node(nid),
            v.shape.clone(),
            v.batched,
        );
        map[n.output] = o;
        let ins = n
            .inputs
            .iter()
            .map(|&i| match map[i] {
                usize::MAX => Err(format!(
                    "node `{}` reads `{}` before it is computed",
                    n.name, g.values[i].name
                )),
                m => Ok(m),
            })
            .collect::<Result<Vec<_>, String>>()?;
        out.nodes.push(Node {
            name: n.name.clone(),
            op: n.op.clone(),
            inputs: ins,
            output: o,
        });
    }
    out.outputs = outputs.iter().map(|&o| map[o]).collect();
    Ok(out)
}

fn names(g: &Graph, vs: &[ValueId]) -> String {
    let v: Vec<String> = vs
        .iter()
        .map(|&i| format!("`{}`", g.values[i].name))
        .collect();
    v.join(", ")
}

/// The default feature value for `logits`: the input of the last Gemm/MatMul the logits depend
/// on (the last hidden layer of a classifier).
pub fn default_feature_value(g: &Graph, logits: ValueId) -> Result<ValueId, String> {
    let mut anc = vec![false; g.values.len()];
    let mut stack = vec![logits];
    while let Some(v) = stack.pop() {
        if std::mem::replace(&mut anc[v], true) {
            continue;
        }
        if let ValueKind::Node(n) = g.values[v].kind {
            stack.extend(g.nodes[n].inputs.iter().copied());
        }
    }
    let node = g
        .nodes
        .iter()
        .rev()
        .find(|n| anc[n.output] && matches!(n.op, Op::Gemm { .. } | Op::MatMul))
        .ok_or_else(|| {
            "the model has no Gemm/MatMul before its logits: name the feature value with \
             `features: <value name>` in the model card"
                .to_string()
        })?;
    if let Op::Gemm { trans_a: true, .. } = node.op {
        return Err(format!(
            "the last Gemm (`{}`) transposes its input: name the feature value with \
             `features: <value name>` in the model card",
            node.name
        ));
    }
    Ok(node.inputs[0])
}

/// Resolves the feature value: the value named `name` (a per-sample intermediate value), or the
/// default of [`default_feature_value`].
pub fn feature_value(g: &Graph, logits: ValueId, name: Option<&str>) -> Result<ValueId, String> {
    match name {
        None => default_feature_value(g, logits),
        Some(n) => {
            let v = g
                .values
                .iter()
                .position(|v| v.name == n && matches!(v.kind, ValueKind::Node(_)))
                .ok_or_else(|| {
                    format!(
                        "the model has no intermediate value named `{n}` (values folded at \
                         import, such as Dropout or Identity outputs, do not exist)"
                    )
                })?;
            if !g.values[v].batched {
                return Err(format!("`{n}` is not a per-sample value"));
            }
            Ok(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::backend::{Backend, Unary};
    use crate::runtime::cpu::CpuBackend;
    use crate::runtime::exec::Model;

    /// x [1,3] -> Gemm(W1) -> Relu -> h ; h -> Gemm(W2) -> logits
    fn mlp() -> (Graph, ValueId, ValueId) {
        let mut g = Graph::default();
        let x = g.add_input("x", vec![1, 3]);
        let w1 = g.add_param(
            "w1",
            vec![4, 3],
            (0..12).map(|i| (i as f32 - 5.0) / 7.0).collect(),
        );
        let w2 = g.add_param(
            "w2",
            vec![2, 4],
            (0..8).map(|i| (i as f32 - 3.0) / 5.0).collect(),
        );
        let gemm = Op::Gemm {
            alpha: 1.0,
            beta: 1.0,
            trans_a: false,
            trans_b: true,
        };
        let a = g.add_node("fc1", gemm.clone(), vec![x, w1]).unwrap();
        let h = g.add_node("h", Op::Unary(Unary::Relu), vec![a]).unwrap();
        let z = g.add_node("logits", gemm, vec![h, w2]).unwrap();
        g.outputs = vec![z];
        (g, h, z)
    }

    #[test]
    fn head_of_features_is_the_forward() {
        let (g, h, z) = mlp();
        assert_eq!(default_feature_value(&g, z).unwrap(), h);
        let fg = subgraph(&g, &g.inputs.clone(), &[h]).unwrap();
        let hg = subgraph(&g, &[h], &[z]).unwrap();
        assert_eq!(fg.nodes.len(), 2);
        assert_eq!(hg.nodes.len(), 1);
        assert_eq!(hg.params.len(), 1);
        let b = CpuBackend::new(Some(1));
        let x = b.upload(&[0.5, -1.0, 2.0, 1.5, 0.25, -0.75], &[2, 3]);
        let full = Model::new(&b, g).forward(&b, &x).unwrap();
        let f = Model::new(&b, fg).forward(&b, &x).unwrap();
        let y = Model::new(&b, hg).forward(&b, &f[0]).unwrap();
        assert_eq!(f[0].shape, vec![2, 4]);
        assert_eq!(b.download(&y[0]), b.download(&full[0]));
    }

    #[test]
    fn named_feature_and_errors() {
        let (g, h, z) = mlp();
        assert_eq!(feature_value(&g, z, Some("h")).unwrap(), h);
        let e = feature_value(&g, z, Some("nope")).unwrap_err();
        assert!(e.contains("`nope`"), "{e}");
        // A params-only value cannot be an input.
        let w = g.params[0].value;
        assert!(subgraph(&g, &[w], &[z]).unwrap_err().contains("batched"));
        // The logits from fc1's output still need x through nothing else: fine; from the
        // weights alone they depend on x.
        let fc1 = g.value_by_name("fc1").unwrap();
        assert!(subgraph(&g, &[fc1], &[z]).is_ok());
        let e = subgraph(&g, &[z], &[fc1]).unwrap_err();
        assert!(e.contains("graph input `x`"), "{e}");
    }

    /// The demo model through the plugin host's model service: features equal onnxruntime's
    /// value of the last hidden layer (`layer8`, exposed as an output with the onnx helper),
    /// the head of the features equals the forward, on the CPU and lavapipe backends, for the
    /// batch and for a whole multiple of it.
    mod demo {
        use super::super::super::graph_tests::{python, read_npy, rel_err, repo_root, write_npy};
        use crate::plugin::host::{BatchModel, PluginBackend};
        use crate::plugin::runner::{ModelCache, RunModel};
        use crate::runtime::card::{ModelCard, card_path};
        use crate::runtime::cpu::CpuBackend;
        use crate::runtime::gpu::{AdapterPolicy, GpuBackend, GpuOptions};
        use adverse_plugin_sdk::FrameMeta;

        fn demo() -> RunModel {
            let path = repo_root().join("pipelines/models/pneumonia-cnn.onnx");
            let graph = crate::runtime::onnx::load(&path).unwrap();
            let card = ModelCard::load(&card_path(&path)).unwrap();
            let logits_output = card.logits_index(&graph).unwrap();
            RunModel {
                graph,
                card,
                logits_output,
            }
        }

        fn frames(n: usize) -> (Vec<f32>, Vec<FrameMeta>) {
            let data: Vec<f32> = (0..n * 784)
                .map(|i| ((i * 7919 + i / 13) % 256) as f32)
                .collect();
            let meta = FrameMeta {
                rows: 28,
                cols: 28,
                samples_per_pixel: 1,
                bits_allocated: 8,
                bits_stored: 8,
                signed: false,
                float: false,
                frame_index: 0,
                rescale_slope: 1.0,
                rescale_intercept: 0.0,
                window: None,
                value_range: (0.0, 255.0),
                label: None,
                target: None,
                modality: "OT".into(),
            };
            (data, vec![meta; n])
        }

        /// (features, head(features), forward) for the batch and for 2x its rows.
        fn run<B: PluginBackend>(b: &B, m: &RunModel) -> Vec<[Vec<f32>; 3]> {
            let (data, metas) = frames(4);
            let mut cache = ModelCache::new(m);
            let svc = cache.service(b, [1, 28, 28], &data, &metas);
            let mut out = Vec::new();
            for reps in [1usize, 2] {
                let rows: Vec<f32> = data
                    .iter()
                    .copied()
                    .cycle()
                    .take(reps * data.len())
                    .collect();
                let x = b.upload(&rows, &[4 * reps, 1, 28, 28]);
                let f = svc.features(b, &x).unwrap();
                assert_eq!(f.shape, vec![4 * reps, 64]);
                let z = svc.head(b, &f).unwrap();
                let y = svc.forward(b, &x).unwrap();
                assert_eq!(z.shape, y.shape);
                out.push([b.download(&f), b.download(&z), b.download(&y)]);
            }
            let e = svc.head(b, &b.upload(&[0.0; 6], &[2, 3])).unwrap_err();
            assert!(e.contains("[R, 64]"), "{e}");
            out
        }

        #[test]
        fn features_match_onnxruntime_and_head_of_features_is_the_forward() {
            let m = demo();
            let cpu = run(&CpuBackend::new(Some(2)), &m);
            for [f, z, y] in &cpu {
                assert!(
                    rel_err(z, y) < 1e-6,
                    "CPU head vs forward {}",
                    rel_err(z, y)
                );
                assert!(
                    f.iter().any(|&v| v > 0.0) && f.iter().all(|&v| v >= 0.0),
                    "ReLU features"
                );
            }
            // onnxruntime's value of layer8 on the preprocessed frames (stored / 255).
            let dir = tempfile::tempdir().unwrap();
            let (data, _) = frames(4);
            let x: Vec<f32> = data.iter().map(|v| v / 255.0).collect();
            let inp = dir.path().join("x.npy");
            let outp = dir.path().join("f.npy");
            write_npy(&inp, &x, &[4, 1, 28, 28]);
            let code = format!(
                "import onnx, onnxruntime as ort, numpy as np\n\
                 m = onnx.load({model:?})\n\
                 m.graph.output.append(onnx.helper.make_tensor_value_info('layer8', onnx.TensorProto.FLOAT, None))\n\
                 s = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])\n\
                 x = np.load({inp:?})\n\
                 out = s.run(['layer8'], {{s.get_inputs()[0].name: x}})[0]\n\
                 np.save({outp:?}, out.astype(np.float32))\n",
                model = repo_root()
                    .join("pipelines/models/pneumonia-cnn.onnx")
                    .display()
                    .to_string(),
                inp = inp.display().to_string(),
                outp = outp.display().to_string(),
            );
            let o = std::process::Command::new(python())
                .args(["-c", &code])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let (want, shape) = read_npy(&outp);
            assert_eq!(shape, vec![4, 64]);
            let e = rel_err(&cpu[0][0], &want);
            assert!(e < 1e-4, "features vs onnxruntime: relative error {e:.3e}");
            // The 2x rows are the batch twice (up to the GEMM's blocking at another batch size).
            assert!(rel_err(&cpu[1][0][..256], &cpu[0][0]) < 1e-6);
            assert!(rel_err(&cpu[1][0][256..], &cpu[0][0]) < 1e-6);

            let gpu = GpuBackend::new(GpuOptions {
                adapter: AdapterPolicy::SoftwareOnly,
            })
            .expect("lavapipe adapter (install mesa-vulkan-drivers)");
            let g = run(&gpu, &m);
            for (gi, ci) in g.iter().zip(&cpu) {
                for k in 0..3 {
                    let e = rel_err(&gi[k], &ci[k]);
                    assert!(e < 1e-4, "GPU vs CPU output {k}: {e:.3e}");
                }
                assert!(rel_err(&gi[1], &gi[2]) < 1e-5, "GPU head vs forward");
            }
        }

        #[test]
        fn the_model_id_changes_with_the_weights() {
            let m = demo();
            let a = crate::plugin::runner::graph_sha256(&m.graph);
            assert_eq!(a.len(), 64);
            assert_eq!(a, crate::plugin::runner::graph_sha256(&demo().graph));
            let mut m2 = demo();
            m2.graph.params[0].data[0] += 1e-3;
            assert_ne!(a, crate::plugin::runner::graph_sha256(&m2.graph));
            let b = CpuBackend::new(Some(1));
            let (data, metas) = frames(2);
            let mut cache = ModelCache::new(&m);
            let svc = cache.service(&b, [1, 28, 28], &data, &metas);
            assert_eq!(svc.model_id().unwrap(), a);
        }
    }
}
