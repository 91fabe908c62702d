#!/usr/bin/env python3
"""Independent references for the purifier plugins (plugins/purifiers tests).

Usage:
  purifiers.py tv IN.f64 H W WEIGHT ITERATIONS OUT.f64
      scikit-image's denoise_tv_chambolle on an H x W float64 plane (raw little-endian), with a
      fixed iteration count (eps = 0 disables the early stop).
  purifiers.py jpeg-decode IN.jpg OUT.u8
      PIL (libjpeg) decode of a JPEG; writes the interleaved 8-bit samples and prints
      "WIDTH HEIGHT BANDS".
"""
import sys

import numpy as np


def main(argv):
    cmd = argv[0]
    if cmd == "tv":
        from skimage.restoration import denoise_tv_chambolle

        src, h, w, weight, iters, dst = argv[1:7]
        x = np.fromfile(src, dtype="<f8").reshape(int(h), int(w))
        y = denoise_tv_chambolle(x, weight=float(weight), eps=0.0, max_num_iter=int(iters))
        np.asarray(y, dtype="<f8").tofile(dst)
    elif cmd == "jpeg-decode":
        from PIL import Image

        src, dst = argv[1:3]
        im = Image.open(src)
        im.load()
        a = np.asarray(im, dtype=np.uint8)
        a.tofile(dst)
        print(im.size[0], im.size[1], len(im.getbands()))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
