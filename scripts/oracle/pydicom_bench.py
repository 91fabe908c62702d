#!/usr/bin/env python3
"""pydicom side of the dicom_io benchmark: decode every file and write it uncompressed
(explicit VR little endian), ITERATIONS times; prints one JSON object with the counts, the
elapsed seconds and this process's peak RSS.

  pydicom_bench.py OUTDIR ITERATIONS FILE...
"""
import json
import os
import resource
import sys
import time
import warnings

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

warnings.simplefilter("ignore")


def main():
    outdir, iterations, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    nbytes = sum(os.path.getsize(f) for f in files)
    t0 = time.perf_counter()
    for _ in range(iterations):
        for i, f in enumerate(files):
            ds = pydicom.dcmread(f)
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()
            else:
                ds.PixelData = ds.pixel_array.tobytes()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(os.path.join(outdir, f"{i}.dcm"), enforce_file_format=True)
    secs = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"files": len(files) * iterations, "bytes": nbytes * iterations,
                      "secs": secs, "peak_rss_kib": peak_kib}))


if __name__ == "__main__":
    main()
