#!/usr/bin/env python3
"""Run an ONNX model with onnxruntime (CPU): the numerical oracle for adverse's runtime.

Usage:
  ort_run.py MODEL IN.npy OUT_PREFIX
      writes OUT_PREFIX.<i>.npy for each model output i (float32), input fed to the first input.
  ort_run.py --bench MODEL --batch B --iters K [--threads T] [--rounds R]  (best round)
      times K forward passes on a random float32 batch and prints JSON {"images_per_s": ...}.
  ort_run.py --serve MODEL --batch B --iters K [--threads T]
      prints "ready" once the session is made and warm, then for each line "round" read from
      stdin runs one untimed forward pass, times a round of K more and prints its seconds on a
      line; ends at EOF.
      The Rust bench interleaves these rounds with its own, so both sides see the same phases
      of a shared machine.
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


def bench_setup(argv):
    """The session, input name, input batch and options of a --bench or --serve command line."""
    model = argv[0]
    opts = dict(zip(argv[1::2], argv[2::2]))
    batch = int(opts.get("--batch", 1))
    threads = int(opts["--threads"]) if "--threads" in opts else None
    sess = session(model, threads)
    inp = sess.get_inputs()[0]
    shape = [batch] + [d for d in inp.shape[1:]]
    x = np.random.RandomState(0).rand(*shape).astype(np.float32)
    sess.run(None, {inp.name: x})  # warm-up
    return sess, inp.name, x, opts


def serve(argv):
    sess, name, x, opts = bench_setup(argv)
    iters = int(opts.get("--iters", 10))
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            print(f"unknown command {line.strip()!r}", file=sys.stderr)
            return 2
        sess.run(None, {name: x})  # wakes the pool's threads, which slept since the last round
        t0 = time.perf_counter()
        for _ in range(iters):
            sess.run(None, {name: x})
        print(time.perf_counter() - t0, flush=True)
    return 0


def bench(argv):
    sess, name, x, opts = bench_setup(argv)
    batch, iters = x.shape[0], int(opts.get("--iters", 10))
    rounds = int(opts.get("--rounds", 5))
    # The best of several rounds, as the Rust side measures: on a shared machine the mean
    # carries other tenants' load, which neither side controls.
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            sess.run(None, {name: x})
        best = min(best, time.perf_counter() - t0)
    print(json.dumps({"images_per_s": batch * iters / best, "seconds": best, "batch": batch,
                      "iters": iters, "rounds": rounds}))


def main(argv):
    if argv and argv[0] == "--bench":
        bench(argv[1:])
        return 0
    if argv and argv[0] == "--serve":
        return serve(argv[1:])
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    run(*argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
