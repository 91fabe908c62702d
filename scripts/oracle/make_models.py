#!/usr/bin/env python3
"""Build the ONNX test models adverse's runtime is checked against (random weights, fixed seed).

Usage:
  make_models.py OUTDIR            # the small oracle models (writes OUTDIR/<name>.onnx + manifest.json)
  make_models.py --bench OUTDIR    # the benchmark models: demo_cnn (1x28x28), resnet18 (3x224x224)

Built with the `onnx.helper` API only (no PyTorch), so the models are independent of adverse's
importer; onnxruntime (scripts/oracle/ort_run.py) is the numerical oracle.
manifest.json lists, per model: file, input shape at batch 1 (axis 0 is dynamic "N"), outputs,
and the operators the model exercises.
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.RandomState(1234)


class B:
    """Tiny graph builder: unique names, initializers from numpy."""

    def __init__(self, name, opset=17):
        self.name, self.opset = name, opset
        self.nodes, self.inits, self.k = [], [], 0

    def fresh(self, p="t"):
        self.k += 1
        return f"{p}{self.k}"

    def init(self, arr, p="w", raw=True):
        n = self.fresh(p)
        arr = np.asarray(arr)
        if raw:
            self.inits.append(numpy_helper.from_array(arr, n))
        else:  # float_data / int64_data encoding instead of raw_data
            dt = TensorProto.FLOAT if arr.dtype == np.float32 else TensorProto.INT64
            self.inits.append(helper.make_tensor(n, dt, arr.shape, arr.flatten().tolist()))
        return n

    def w(self, *shape, scale=None, raw=True):
        fan = np.prod(shape[1:]) if len(shape) > 1 else shape[0]
        s = scale if scale is not None else 1.0 / np.sqrt(fan)
        return self.init((RNG.randn(*shape) * s).astype(np.float32), raw=raw)

    def op(self, op_type, inputs, n_out=1, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(op_type + "_"), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, cin, cout, k=3, bias=True, **attrs):
        ins = [x, self.w(cout, cin // attrs.get("group", 1), k, k)]
        if bias:
            ins.append(self.w(cout, scale=0.1))
        return self.op("Conv", ins, kernel_shape=[k, k], **attrs)

    def bn(self, x, c):
        g = self.init((1 + 0.2 * RNG.randn(c)).astype(np.float32))
        b = self.init((0.1 * RNG.randn(c)).astype(np.float32))
        m = self.init((0.1 * RNG.randn(c)).astype(np.float32))
        v = self.init((0.5 + RNG.rand(c)).astype(np.float32))
        return self.op("BatchNormalization", [x, g, b, m, v], epsilon=1e-5)

    def model(self, x_shape, outs):
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N"] + list(x_shape))
        outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs]
        g = helper.make_graph(self.nodes, self.name, [inp], outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="adverse-make_models")
        m.ir_version = 8
        # Output shapes from ONNX's own shape inference (the checker wants typed outputs).
        inferred = onnx.shape_inference.infer_shapes(m).graph.output
        for o, i in zip(m.graph.output, inferred):
            o.type.CopyFrom(i.type)
        onnx.checker.check_model(m, full_check=True)
        return m


def plain_cnn():
    b = B("plain_cnn", 17)
    x = b.conv("input", 1, 4, pads=[1, 1, 1, 1])
    x = b.op("Relu", [x])
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.conv(x, 4, 6, strides=[2, 2], pads=[1, 1, 1, 1])
    x = b.op("LeakyRelu", [x], alpha=0.1)
    x = b.op("Flatten", [x], axis=1)
    y = b.op("Gemm", [x, b.w(5, 6 * 3 * 3, raw=False), b.w(5, scale=0.1)], transB=1)
    return b.model([1, 12, 12], [y]), ["Conv", "Relu", "MaxPool", "LeakyRelu", "Flatten", "Gemm"]


def resnet_block():
    b = B("resnet_block", 17)
    x = b.bn("input", 3)  # BN on the input: cannot fold, lowered to scale/shift
    s = b.conv(x, 3, 8, bias=False, pads=[1, 1, 1, 1])
    s = b.bn(s, 8)  # folded into the conv (no bias)
    s = b.op("Relu", [s])
    t = b.conv(s, 8, 8, pads=[1, 1, 1, 1])
    t = b.bn(t, 8)  # folded (conv with bias)
    t = b.op("Add", [t, s])
    t = b.op("Relu", [t])
    t = b.conv(t, 8, 8, k=3, strides=[2, 2], auto_pad="SAME_UPPER", group=2)
    t = b.conv(t, 8, 8, k=3, pads=[2, 2, 2, 2], dilations=[2, 2], group=8)
    t = b.op("GlobalAveragePool", [t])
    t = b.op("Flatten", [t])
    y = b.op("Gemm", [t, b.w(8, 4), b.w(4, scale=0.1)])
    return b.model([3, 8, 8], [y]), ["BatchNormalization", "Conv", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm"]


def unet():
    b = B("unet", 13)
    e1 = b.op("Relu", [b.conv("input", 1, 4, pads=[1, 1, 1, 1])])
    d = b.op("MaxPool", [e1], kernel_shape=[2, 2], strides=[2, 2])
    e2 = b.op("Relu", [b.conv(d, 4, 8, pads=[1, 1, 1, 1])])
    u = b.op("ConvTranspose", [e2, b.w(8, 4, 3, 3), b.w(4, scale=0.1)], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
    c = b.op("Concat", [u, e1], axis=1)
    c = b.op("Sigmoid", [b.conv(c, 8, 4, pads=[1, 1, 1, 1])])
    u2 = b.op("ConvTranspose", [e2, b.w(8, 2, 2, 2)], kernel_shape=[2, 2], strides=[2, 2], group=2)
    r = b.op("Resize", [e2, "", b.init(np.array([1, 1, 2, 2], np.float32))], mode="linear", coordinate_transformation_mode="half_pixel")
    nc = b.op("Slice", [b.op("Shape", [d]), b.init(np.array([0], np.int64)), b.init(np.array([2], np.int64))])
    sizes = b.op("Concat", [nc, b.init(np.array([8, 8], np.int64))], axis=0)  # [N, C, 8, 8] like PyTorch's export
    rn = b.op("Resize", [d, "", "", sizes], mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    ra = b.op("Resize", [e2, "", b.init(np.array([1, 1, 2, 2], np.float32))], mode="linear", coordinate_transformation_mode="align_corners")
    c2 = b.op("Concat", [c, u2, r, rn, ra], axis=1)
    y = b.op("Tanh", [b.conv(c2, 4 + 4 + 8 + 4 + 8, 2, k=1)])
    return b.model([1, 8, 8], [y]), ["Conv", "Relu", "MaxPool", "ConvTranspose", "Concat", "Sigmoid", "Resize", "Tanh"]


def gemm_matmul():
    b = B("gemm_matmul", 17)
    x = b.op("Flatten", ["input"], axis=1)  # [N, 12]
    h = b.op("MatMul", [x, b.w(12, 6)])
    h = b.op("Add", [h, b.w(6, scale=0.1)])
    h = b.op("Tanh", [h])
    h = b.op("Gemm", [b.w(5, 6), h], transB=1, alpha=0.5)  # [5, N]... keep batch on axis 0 below
    h = b.op("Transpose", [h], perm=[1, 0])  # [N, 5]
    r = b.op("Reshape", [h, b.init(np.array([0, 5, 1], np.int64))])  # [N, 5, 1]
    r = b.op("MatMul", [r, b.w(1, 3)])  # batched [N,5,3]
    r = b.op("Mul", [r, b.w(5, 1, scale=1.0)])
    r = b.op("Sub", [r, b.w(3, scale=0.5)])
    r = b.op("Div", [r, b.init((1.5 + RNG.rand(1, 3)).astype(np.float32))])
    r = b.op("Flatten", [r])
    y = b.op("Gemm", [r, b.w(15, 4), b.w(1, 4, scale=0.1)], alpha=0.7, beta=2.0)
    return b.model([3, 2, 2], [y]), ["Flatten", "MatMul", "Add", "Tanh", "Gemm", "Transpose", "Reshape", "Mul", "Sub", "Div"]


def dropout_pad():
    b = B("dropout_pad", 13)
    x = b.op("Pad", ["input", b.init(np.array([0, 0, 2, 1, 0, 0, 1, 2], np.int64))], mode="reflect")
    x = b.conv(x, 2, 3)
    x = b.op("Dropout", [x, b.init(np.array(0.3, np.float32))], n_out=1)
    x = b.op("Pad", [x, b.init(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), b.init(np.array(0.5, np.float32))], mode="constant")
    x = b.op("Pad", [x, b.init(np.array([0, 0, 0, 1, 0, 0, 2, 0], np.int64))], mode="edge")
    x = b.op("Relu", [x])
    x = b.op("AveragePool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)
    x = b.op("Flatten", [x])
    y = b.op("Gemm", [x, b.w(3 * 6 * 5, 6)])
    return b.model([2, 7, 6], [y]), ["Pad", "Conv", "Dropout", "Relu", "AveragePool", "Flatten", "Gemm"]


def avgpool_clip():
    b = B("avgpool_clip", 11)
    x = b.conv("input", 2, 4, pads=[1, 1, 1, 1])
    x = b.op("Clip", [x, b.init(np.array(-0.3, np.float32)), b.init(np.array(0.4, np.float32))])
    x = b.op("AveragePool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1, count_include_pad=0)
    x = b.op("Sigmoid", [x])
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    y = b.op("Softmax", [x], axis=1)  # opset 11: softmax over the flattened C*H*W
    return b.model([2, 9, 9], [y]), ["Conv", "Clip", "AveragePool", "Sigmoid", "MaxPool", "Softmax"]


def softmax_out():
    b = B("softmax_out", 13)
    x = b.conv("input", 1, 3, k=3)
    x = b.op("Relu", [x])
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x])
    x = b.op("Gemm", [x, b.w(3, 5), b.w(5, scale=0.1)])
    y = b.op("Softmax", [x], axis=-1)
    z = b.op("LogSoftmax", [x], axis=1)
    return b.model([1, 6, 6], [y, z]), ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm", "Softmax", "LogSoftmax"]


def shape_reshape():
    """PyTorch's `x.view(x.size(0), -1)` export: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    b = B("shape_reshape", 13)
    x = b.op("Relu", [b.conv("input", 1, 4, pads=[1, 1, 1, 1])])
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    sh = b.op("Shape", [x])
    n = b.op("Gather", [sh, b.init(np.array(0, np.int64))], axis=0)
    n = b.op("Unsqueeze", [n, b.init(np.array([0], np.int64))])
    m1 = b.op("Constant", [], value=helper.make_tensor("v", TensorProto.INT64, [1], [-1]))
    shp = b.op("Concat", [n, m1], axis=0)
    c = b.op("Cast", [shp], to=TensorProto.INT64)
    x = b.op("Reshape", [x, c])
    hw = b.op("Slice", [sh, b.init(np.array([2], np.int64)), b.init(np.array([4], np.int64))])
    one = b.op("ConstantOfShape", [b.init(np.array([1], np.int64))], value=helper.make_tensor("one", TensorProto.INT64, [1], [1]))
    _unused = b.op("Mul", [hw, one])
    y = b.op("Gemm", [x, b.w(4 * 4 * 4, 3)])
    s = b.op("Unsqueeze", [y, b.init(np.array([2], np.int64))])
    s = b.op("Squeeze", [s, b.init(np.array([2], np.int64))])
    return b.model([1, 8, 8], [s]), ["Conv", "Relu", "MaxPool", "Shape", "Gather", "Unsqueeze", "Constant", "Concat", "Cast", "Reshape", "Slice", "ConstantOfShape", "Gemm", "Squeeze"]


MODELS = [plain_cnn, resnet_block, unet, gemm_matmul, dropout_pad, avgpool_clip, softmax_out, shape_reshape]


def basic_block(b, x, cin, cout, stride):
    s = b.op("Relu", [b.bn(b.conv(x, cin, cout, bias=False, strides=[stride, stride], pads=[1, 1, 1, 1]), cout)])
    s = b.bn(b.conv(s, cout, cout, bias=False, pads=[1, 1, 1, 1]), cout)
    if stride != 1 or cin != cout:
        x = b.bn(b.conv(x, cin, cout, k=1, bias=False, strides=[stride, stride]), cout)
    return b.op("Relu", [b.op("Add", [s, x])])


def resnet18():
    b = B("resnet18", 17)
    x = b.op("Relu", [b.bn(b.conv("input", 3, 64, k=7, bias=False, strides=[2, 2], pads=[3, 3, 3, 3]), 64)])
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        x = basic_block(b, x, cin, cout, stride)
        x = basic_block(b, x, cout, cout, 1)
        cin = cout
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])])
    y = b.op("Gemm", [x, b.w(1000, 512), b.w(1000, scale=0.01)], transB=1)
    return b.model([3, 224, 224], [y])


def demo_cnn():
    b = B("demo_cnn", 17)
    x = b.op("Relu", [b.conv("input", 1, 16, pads=[1, 1, 1, 1])])
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Relu", [b.conv(x, 16, 32, pads=[1, 1, 1, 1])])
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Flatten", [x])
    x = b.op("Relu", [b.op("Gemm", [x, b.w(128, 32 * 7 * 7), b.w(128, scale=0.01)], transB=1)])
    y = b.op("Gemm", [x, b.w(10, 128), b.w(10, scale=0.01)], transB=1)
    return b.model([1, 28, 28], [y])


def main(argv):
    bench = "--bench" in argv
    args = [a for a in argv if not a.startswith("--")]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    if bench:
        for name, fn, shape in [("demo_cnn", demo_cnn, [1, 28, 28]), ("resnet18", resnet18, [3, 224, 224])]:
            onnx.save(fn(), str(out / f"{name}.onnx"))
            manifest.append({"name": name, "file": f"{name}.onnx", "input_shape": [1] + shape})
    else:
        for fn in MODELS:
            m, ops = fn()
            onnx.save(m, str(out / f"{fn.__name__}.onnx"))
            shape = [1] + [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]]
            used = sorted({n.op_type for n in m.graph.node})
            assert set(ops) <= set(used), (fn.__name__, set(ops) - set(used))
            manifest.append({"name": fn.__name__, "file": f"{fn.__name__}.onnx", "input_shape": shape, "ops": used,
                             "outputs": [o.name for o in m.graph.output], "opset": m.opset_import[0].version})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
