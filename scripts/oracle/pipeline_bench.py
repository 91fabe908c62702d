#!/usr/bin/env python3
"""Reference side of the pipeline benchmark (core/benches/pipeline.rs): the work of
`adverse run` with a median purifier, done the usual Python way, in one process (no
multiprocessing: this is the script a researcher would write).

  pipeline_bench.py IN OUT

For every *.dcm under IN (recursively, sorted): read it with pydicom, median-filter the pixels
(scipy.ndimage.median_filter, size 3, mode 'reflect' - the plugin's (2r+1)^2 window with r = 1
and its reflect border), write a new instance with a new SOP Instance UID under OUT (same relative
path). Prints one JSON object: {"files": N, "seconds": S} (S: the loop, without interpreter start
and imports; the benchmark measures the whole process too).
"""
import json
import os
import sys
import time
import warnings

import numpy as np
import pydicom
from pydicom.uid import generate_uid
from scipy.ndimage import median_filter

warnings.simplefilter("ignore")


def main():
    src, dst = sys.argv[1], sys.argv[2]
    files = []
    for root, _dirs, names in os.walk(src):
        files.extend(os.path.join(root, n) for n in names if n.endswith(".dcm"))
    files.sort()
    t0 = time.perf_counter()
    for f in files:
        ds = pydicom.dcmread(f)
        px = ds.pixel_array
        out = median_filter(px, size=3, mode="reflect").astype(px.dtype, copy=False)
        ds.PixelData = np.ascontiguousarray(out).tobytes()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = os.path.join(dst, os.path.relpath(f, src))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    print(json.dumps({"files": len(files), "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
