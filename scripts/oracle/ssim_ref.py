#!/usr/bin/env python3
"""Independent reference for core/src/pipeline/metrics.rs: SSIM (Wang et al. 2004, 11x11
Gaussian window sigma 1.5, K1 0.01, K2 0.03, population moments), PSNR, L-inf and L2.

  ssim_ref.py ORIG.f32:NEW.f32:ROWS:COLS:SAMPLES:RANGE ...

Each argument names two raw little-endian float32 files holding one interleaved
[ROWS, COLS, SAMPLES] frame, and the data range L. Prints a JSON list, one object per argument.
The Gaussian filter is scipy.ndimage.gaussian_filter (truncate 3.5 -> radius int(3.5*1.5+0.5)=5,
an 11-tap window) with 'reflect' borders; the mean is over the positions where the window lies
inside the image (crop 5 on each side), or over the whole map when a side is under 11.
"""
import json
import sys

import numpy as np
from scipy.ndimage import gaussian_filter

SIGMA, TRUNCATE, RADIUS, K1, K2 = 1.5, 3.5, 5, 0.01, 0.03


def ssim_plane(x, y, L):
    f = lambda a: gaussian_filter(a, SIGMA, truncate=TRUNCATE, mode="reflect")
    mx, my = f(x), f(y)
    vx = f(x * x) - mx * mx
    vy = f(y * y) - my * my
    cov = f(x * y) - mx * my
    c1, c2 = (K1 * L) ** 2, (K2 * L) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    if x.shape[0] >= 2 * RADIUS + 1 and x.shape[1] >= 2 * RADIUS + 1:
        s = s[RADIUS:-RADIUS, RADIUS:-RADIUS]
    return s.mean()


def main():
    out = []
    for arg in sys.argv[1:]:
        a, b, rows, cols, spp, L = arg.rsplit(":", 5)
        shape = (int(rows), int(cols), int(spp))
        x = np.fromfile(a, dtype="<f4").astype(np.float64).reshape(shape)
        y = np.fromfile(b, dtype="<f4").astype(np.float64).reshape(shape)
        L = float(L)
        ssim = float(np.mean([ssim_plane(x[:, :, c], y[:, :, c], L) for c in range(shape[2])]))
        d = y - x
        mse = float(np.mean(d * d))
        out.append({
            "ssim": ssim,
            "psnr": 10 * np.log10(L * L / mse) if mse > 0 else None,
            "linf": float(np.abs(d).max()),
            "l2": float(np.sqrt(np.sum(d * d))),
        })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
