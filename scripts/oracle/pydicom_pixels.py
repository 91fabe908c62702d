#!/usr/bin/env python3
"""pydicom oracle for adverse's DICOM tests (test-only).

  pydicom_pixels.py pixels OUTDIR FILE...   decode each FILE with pydicom; write OUTDIR/<i>.json
                                            (status, dtype, shape, photometric) and OUTDIR/<i>.bin
                                            (pixel_array, C order, little endian)
  pydicom_pixels.py elements FILE...        one JSON object per FILE on stdout: every top-level
                                            element (and the file meta group) as comparable values

Conventions (documented in the tests): files are read with force=True; a data set without a
file meta group gets the DICOM default transfer syntax (implicit VR little endian); pixel_array
is taken with as_rgb=False, so YBR data stays YBR (the stored values), while what a codec itself
converted (JPEG 2000 MCT, JPEG YCbCr) is what both sides see.
"""
import hashlib
import json
import os
import sys
import warnings

import numpy as np
import pydicom
from pydicom.uid import ImplicitVRLittleEndian

warnings.simplefilter("ignore")


def read(path):
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def pixels(outdir, files):
    for i, path in enumerate(files):
        info = {"file": os.path.basename(path)}
        try:
            ds = read(path)
            ds.pixel_array_options(as_rgb=False)
            arr = ds.pixel_array
            arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<")))
            info.update(
                ok=True,
                dtype=arr.dtype.str,
                shape=list(arr.shape),
                photometric=str(ds.get("PhotometricInterpretation", "")),
            )
            with open(os.path.join(outdir, f"{i}.bin"), "wb") as f:
                f.write(arr.tobytes())
        except Exception as e:  # reported, compared by the test
            info.update(ok=False, error=f"{type(e).__name__}: {e}")
        with open(os.path.join(outdir, f"{i}.json"), "w") as f:
            json.dump(info, f)


SWAP = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def value(elem, little):
    if elem.VR == "SQ":
        return [dataset(item, little) for item in elem.value]
    v = elem.value
    if isinstance(v, (bytes, bytearray)):
        width = SWAP.get(elem.VR)
        if not little and width:
            v = np.frombuffer(v[: len(v) // width * width], dtype=f">u{width}").astype(f"<u{width}").tobytes()
        return {"bytes": len(v), "sha256": hashlib.sha256(v).hexdigest()}
    if isinstance(v, (list, pydicom.multival.MultiValue)):
        return [str(x) for x in v]
    if v is None:
        return None
    return str(v)


def dataset(ds, little):
    out = {}
    for elem in ds:
        if elem.tag.group == 0x7FE0:
            continue
        out[f"{elem.tag.group:04X}{elem.tag.element:04X}"] = value(elem, little)
    return out


def elements(files):
    for path in files:
        ds = read(path)
        little = ds.file_meta.TransferSyntaxUID != pydicom.uid.ExplicitVRBigEndian
        print(json.dumps({"meta": dataset(ds.file_meta, True), "dataset": dataset(ds, little)}))


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "pixels":
        pixels(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) >= 2 and sys.argv[1] == "elements":
        elements(sys.argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
