#!/usr/bin/env python3
"""PyTorch reference for the runtime benchmark: the same ONNX file run by PyTorch (eager), so
adverse's GPU rows can be compared with what a PyTorch user gets on the same card.

Usage:
  torch_bench.py MODEL --batch B --iters K [--device cuda|cpu]
      prints JSON {"forward": images/s, "grad": images/s, "grad_resident": images/s,
                   "max_rel_err_vs_ort": float, "device": name}

The ONNX graph is interpreted op by op with torch.nn.functional (Conv, BatchNormalization,
Relu, LeakyRelu, MaxPool, AveragePool, GlobalAveragePool, Add, Flatten, Gemm), weights taken
from the file; its forward output is checked against onnxruntime before timing, so the timed
network is the benchmark's network.

"grad" is what adverse's "forward+input grad" row does per step: forward, summed cross-entropy
against labels i % 10, input gradient, and the gradient copied to host memory.
"grad_resident" is the same without the copy (one synchronisation per step): the faster of the
two ways a PyTorch PGD loop can run.
"""
import json
import sys
import time

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper


def attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def pads2(p):
    # ONNX [top, left, bottom, right] -> symmetric torch padding (the bench models use only that)
    if not p:
        return (0, 0)
    assert p[0] == p[2] and p[1] == p[3], f"asymmetric pads {p}"
    return (p[0], p[1])


class OnnxTorch:
    def __init__(self, path, device):
        m = onnx.load(path)
        self.graph = m.graph
        self.w = {
            t.name: torch.from_numpy(numpy_helper.to_array(t).copy()).to(device)
            for t in m.graph.initializer
        }
        self.input = m.graph.input[0].name
        self.output = m.graph.output[0].name

    def __call__(self, x):
        v = dict(self.w)
        v[self.input] = x
        for n in self.graph.node:
            a = attrs(n)
            i = [v[k] for k in n.input if k]
            t = n.op_type
            if t == "Conv":
                y = F.conv2d(i[0], i[1], i[2] if len(i) > 2 else None,
                             stride=tuple(a.get("strides", [1, 1])), padding=pads2(a.get("pads")),
                             dilation=tuple(a.get("dilations", [1, 1])), groups=a.get("group", 1))
            elif t == "BatchNormalization":
                y = F.batch_norm(i[0], i[3], i[4], i[1], i[2], False, 0.0, a.get("epsilon", 1e-5))
            elif t == "Relu":
                y = F.relu(i[0])
            elif t == "LeakyRelu":
                y = F.leaky_relu(i[0], a.get("alpha", 0.01))
            elif t == "MaxPool":
                y = F.max_pool2d(i[0], tuple(a["kernel_shape"]), tuple(a.get("strides", a["kernel_shape"])),
                                 pads2(a.get("pads")))
            elif t == "AveragePool":
                y = F.avg_pool2d(i[0], tuple(a["kernel_shape"]), tuple(a.get("strides", a["kernel_shape"])),
                                 pads2(a.get("pads")), count_include_pad=bool(a.get("count_include_pad", 0)))
            elif t == "GlobalAveragePool":
                y = i[0].mean(dim=(2, 3), keepdim=True)
            elif t == "Add":
                y = i[0] + i[1]
            elif t == "Flatten":
                y = torch.flatten(i[0], a.get("axis", 1))
            elif t == "Gemm":
                b = i[1].t() if a.get("transB", 0) else i[1]
                aa = i[0].t() if a.get("transA", 0) else i[0]
                y = a.get("alpha", 1.0) * (aa @ b)
                if len(i) > 2:
                    y = y + a.get("beta", 1.0) * i[2]
            else:
                raise SystemExit(f"torch_bench.py: operator {t} (node {n.name}) not supported")
            v[n.output[0]] = y
        return v[self.output]


def timed(fn, iters, sync, rounds=5):
    """Seconds for `iters` calls: the best of `rounds` rounds, as the Rust bench measures."""
    fn()
    sync()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv):
    if not argv or argv[0].startswith("--"):
        print(__doc__, file=sys.stderr)
        return 2
    path = argv[0]
    opts = dict(zip(argv[1::2], argv[2::2]))
    batch, iters = int(opts.get("--batch", 64)), int(opts.get("--iters", 20))
    dev = torch.device(opts.get("--device", "cuda" if torch.cuda.is_available() else "cpu"))
    net = OnnxTorch(path, dev)
    shape = [batch] + [d.dim_value for d in net.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = torch.from_numpy(np.random.RandomState(0).rand(*shape).astype(np.float32)).to(dev)
    labels = (torch.arange(batch) % 10).to(dev)

    # The timed network must be the benchmark's network: compare with onnxruntime first.
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    xs = x[: min(batch, 8)]
    want = sess.run(None, {sess.get_inputs()[0].name: xs.cpu().numpy()})[0]
    with torch.no_grad():
        got = net(xs).cpu().numpy()
    rel = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def fwd():
        with torch.no_grad():
            net(x)

    def grad(copy):
        xr = x.detach().requires_grad_(True)
        loss = F.cross_entropy(net(xr), labels, reduction="sum")
        (g,) = torch.autograd.grad(loss, xr)
        if copy:
            g.cpu()

    out = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch": batch,
        "max_rel_err_vs_ort": rel,
        "forward": batch * iters / timed(fwd, iters, sync),
        "grad": batch * iters / timed(lambda: grad(True), iters, sync),
        "grad_resident": batch * iters / timed(lambda: grad(False), iters, sync),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
