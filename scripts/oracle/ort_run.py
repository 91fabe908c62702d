#!/usr/bin/env python3
"""Run an ONNX model with onnxruntime (CPU): the numerical oracle for adverse's runtime.

Usage:
  ort_run.py MODEL IN.npy OUT_PREFIX
      writes OUT_PREFIX.<i>.npy for each model output i (float32), input fed to the first input.
  ort_run.py --bench MODEL --batch B --iters K [--threads T] [--rounds R]  (best round)
      times K forward passes on a random float32 batch and prints JSON {"images_per_s": ...}.
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def session(model, threads=None):
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def run(model, inp, prefix):
    sess = session(model)
    x = np.load(inp).astype(np.float32)
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    for i, o in enumerate(outs):
        np.save(f"{prefix}.{i}.npy", np.ascontiguousarray(o.astype(np.float32)))


def bench(argv):
    model = argv[0]
    opts = dict(zip(argv[1::2], argv[2::2]))
    batch, iters = int(opts.get("--batch", 1)), int(opts.get("--iters", 10))
    threads = int(opts["--threads"]) if "--threads" in opts else None
    sess = session(model, threads)
    inp = sess.get_inputs()[0]
    shape = [batch] + [d for d in inp.shape[1:]]
    x = np.random.RandomState(0).rand(*shape).astype(np.float32)
    rounds = int(opts.get("--rounds", 5))
    sess.run(None, {inp.name: x})  # warm-up
    # The best of several rounds, as the Rust side measures: on a shared machine the mean
    # carries other tenants' load, which neither side controls.
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            sess.run(None, {inp.name: x})
        best = min(best, time.perf_counter() - t0)
    print(json.dumps({"images_per_s": batch * iters / best, "seconds": best, "batch": batch,
                      "iters": iters, "rounds": rounds}))


def main(argv):
    if argv and argv[0] == "--bench":
        bench(argv[1:])
        return 0
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    run(*argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
