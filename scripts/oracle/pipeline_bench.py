#!/usr/bin/env python3
"""Reference side of the pipeline benchmark (core/benches/pipeline.rs): the work of
`adverse run` with a median purifier, done the usual Python way, in one process (no
multiprocessing: this is the script a researcher would write).

  pipeline_bench.py [--full] IN OUT

For every *.dcm under IN (recursively, sorted): read it with pydicom, median-filter the pixels
(scipy.ndimage.median_filter, size 3, mode 'reflect' - the plugin's (2r+1)^2 window with r = 1
and its reflect border), write a new instance with a new SOP Instance UID under OUT (same relative
path). Prints one JSON object: {"files": N, "seconds": S} (S: the loop, without interpreter start
and imports; the benchmark measures the whole process too).

--full does, per file, the rest of what `adverse run` does too (its default run cannot skip
any of it), the usual Python way:
- SHA-256 of the input bytes (hashlib) and of the written file's bytes;
- the written file is read back with pydicom and its pixels compared with the filtered array;
- L-inf and L2 of the change, PSNR and SSIM per frame with the definitions of
  core/src/pipeline/metrics.rs (the data range of the original as L; SSIM as
  scripts/oracle/ssim_ref.py: scipy gaussian_filter sigma 1.5, 11 taps, valid-window mean);
- one JSON line per file in OUT/results.jsonl and a hash-chained audit log OUT/audit.jsonl
  (each record carries the SHA-256 of the previous one), and results.csv at the end.
"""
import csv
import hashlib
import io
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

# The SSIM metrics.rs is tested against (scripts/oracle/ssim_ref.py), beside this script.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ssim_ref import ssim_plane  # noqa: E402


def metrics(orig, new):
    x = orig.astype(np.float64)
    y = new.astype(np.float64)
    d = y - x
    sq = float(np.sum(d * d))
    L = float(x.max() - x.min()) or 1.0
    return {
        "linf_stored": float(np.abs(d).max()),
        "l2_stored": sq ** 0.5,
        "psnr_db": 10 * np.log10(L * L / (sq / d.size)) if sq > 0 else None,
        "ssim": ssim_plane(x, y, L),
    }


def main():
    args = sys.argv[1:]
    full = "--full" in args
    args = [a for a in args if a != "--full"]
    src, dst = args
    files = []
    for root, _dirs, names in os.walk(src):
        files.extend(os.path.join(root, n) for n in names if n.endswith(".dcm"))
    files.sort()
    t0 = time.perf_counter()
    if full:
        os.makedirs(dst, exist_ok=True)
        results = open(os.path.join(dst, "results.jsonl"), "w")
        audit = open(os.path.join(dst, "audit.jsonl"), "w")
        prev = "0" * 64
        rows = []
    for f in files:
        rel = os.path.relpath(f, src)
        path = os.path.join(dst, rel)
        if full:
            with open(f, "rb") as fh:
                raw = fh.read()
            in_sha = hashlib.sha256(raw).hexdigest()
            ds = pydicom.dcmread(io.BytesIO(raw))
        else:
            ds = pydicom.dcmread(f)
        px = ds.pixel_array
        out = median_filter(px, size=3, mode="reflect").astype(px.dtype, copy=False)
        ds.PixelData = np.ascontiguousarray(out).tobytes()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not full:
            ds.save_as(path, enforce_file_format=True)
            continue
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        with open(path, "wb") as fh:
            fh.write(data)
        out_sha = hashlib.sha256(data).hexdigest()
        back = pydicom.dcmread(path).pixel_array
        if not np.array_equal(back, out):
            raise SystemExit(f"{path}: the written pixels differ")
        row = {
            "input": rel, "frame": 0, "status": "ok",
            "output": rel, "output_sha256": out_sha,
            "output_sop_instance_uid": str(ds.SOPInstanceUID),
            **{k: (round(v, 4) if v is not None else None) for k, v in metrics(px, out).items()},
        }
        results.write(json.dumps(row) + "\n")
        rows.append(row)
        record = json.dumps({"prev": prev, "input": rel, "input_sha256": in_sha,
                             "output_sha256": out_sha, "outcome": "ok", "frames": [row]},
                            sort_keys=True)
        prev = hashlib.sha256((prev + record).encode()).hexdigest()
        audit.write(json.dumps({"hash": prev, "record": record}) + "\n")
    if full:
        results.close()
        audit.close()
        with open(os.path.join(dst, "results.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["input"])
            w.writeheader()
            w.writerows(rows)
    print(json.dumps({"files": len(files), "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
