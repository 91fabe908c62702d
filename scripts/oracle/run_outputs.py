#!/usr/bin/env python3
"""Independent check of `adverse run` outputs: read every pair ORIGINAL=WRITTEN with pydicom
and print one JSON object per pair: the written file's SOP Instance UID, the largest absolute
difference of the stored values, and (with --model) onnxruntime's top-1 class on the written
pixels for 8-bit 28x28 frames (the demo model's input: stored / 255).

Usage: run_outputs.py [--model MODEL.onnx] ORIG=OUT ...
"""
import json
import sys

import numpy as np
import pydicom


def main(argv):
    sess = None
    if argv and argv[0] == "--model":
        import onnxruntime as ort

        sess = ort.InferenceSession(argv[1], providers=["CPUExecutionProvider"])
        argv = argv[2:]
    for pair in argv:
        orig, out = pair.split("=", 1)
        a = pydicom.dcmread(orig).pixel_array.astype(np.int64)
        ds = pydicom.dcmread(out)
        b = ds.pixel_array.astype(np.int64)
        rec = {
            "out": out,
            "sop_instance_uid": str(ds.SOPInstanceUID),
            "image_type": list(ds.ImageType) if "ImageType" in ds else None,
            "shape": list(b.shape),
            "max_abs_diff": int(np.abs(a - b).max()) if a.shape == b.shape else None,
        }
        if sess is not None and b.shape == (28, 28):
            x = (b.astype(np.float32) / 255.0).reshape(1, 1, 28, 28)
            logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
            rec["ort_pred"] = int(np.argmax(logits[0]))
        print(json.dumps(rec))


if __name__ == "__main__":
    main(sys.argv[1:])
